// The fuzzer's judge: what an NBD server must answer to a client's byte stream (doc/proto.md of
// NetworkBlockDevice/nbd, plus this server's documented choices where the spec leaves one), and a
// checker that holds the server's bytes against it.
//
// oracle(bytes, env) reads the whole stream a client will send, as a server must, and returns the
// obligations it creates in order: the greeting, a reply per option, a reply per request, and how
// the conversation ends (a protocol violation, NBD_CMD_DISC, the client's end, a frame cut short).
// Judge consumes the server's bytes as they come and says what is wrong, what is still due, and
// whether the server must close.
//
// Where the spec leaves the server a choice, the oracle allows each choice (sets of reply types
// and errnos); where this server documents one (README: "What the server speaks", "Two unclear
// cases", "Memory under hostile clients"), it expects that one.

export const NBDMAGIC = 0x4e42444d41474943n;
export const IHAVEOPT = 0x49484156454f5054n;
export const OPT_REPLY_MAGIC = 0x3e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_MAGIC = 0x67446698;
export const STRUCTURED_MAGIC = 0x668e33ef;

export const Opt = { EXPORT_NAME: 1, ABORT: 2, LIST: 3, PEEK_EXPORT: 4, STARTTLS: 5, INFO: 6, GO: 7, STRUCTURED_REPLY: 8, LIST_META_CONTEXT: 9, SET_META_CONTEXT: 10, EXTENDED_HEADERS: 11 };
export const Rep = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: 0x80000001,
  ERR_POLICY: 0x80000002,
  ERR_INVALID: 0x80000003,
  ERR_PLATFORM: 0x80000004,
  ERR_TLS_REQD: 0x80000005,
  ERR_UNKNOWN: 0x80000006,
  ERR_SHUTDOWN: 0x80000007,
  ERR_BLOCK_SIZE_REQD: 0x80000008,
  ERR_TOO_BIG: 0x80000009,
};
export const Info = { EXPORT: 0, NAME: 1, DESCRIPTION: 2, BLOCK_SIZE: 3 };
export const Cmd = { READ: 0, WRITE: 1, DISC: 2, FLUSH: 3, TRIM: 4, CACHE: 5, WRITE_ZEROES: 6, BLOCK_STATUS: 7 };
export const CmdFlag = { FUA: 1, NO_HOLE: 2, DF: 4, REQ_ONE: 8, FAST_ZERO: 16 };
export const TFlag = { HAS_FLAGS: 1, READ_ONLY: 2, SEND_FLUSH: 4, SEND_FUA: 8, ROTATIONAL: 16, SEND_TRIM: 32, SEND_WRITE_ZEROES: 64, SEND_DF: 128, CAN_MULTI_CONN: 256, SEND_RESIZE: 512, SEND_CACHE: 1024, SEND_FAST_ZERO: 2048 };
export const ReplyType = { NONE: 0, OFFSET_DATA: 1, OFFSET_HOLE: 2, BLOCK_STATUS: 5, ERROR: 32769, ERROR_OFFSET: 32770 };
export const Errno = { EPERM: 1, EIO: 5, ENOMEM: 12, EINVAL: 22, ENOSPC: 28, EOVERFLOW: 75, ENOTSUP: 95, ESHUTDOWN: 108 };
const ERRNO_NAME = Object.fromEntries(Object.entries(Errno).map(([k, v]) => [v, k]));
export const errnoName = (e) => (e === 0 ? "ok" : (ERRNO_NAME[e] ?? `errno ${e}`));
export const optName = (o) => Object.entries(Opt).find(([, v]) => v === o)?.[0] ?? `option ${o}`;
export const cmdName = (c) => Object.entries(Cmd).find(([, v]) => v === c)?.[0] ?? `command ${c}`;
const repName = (r) => Object.entries(Rep).find(([, v]) => v === r)?.[0] ?? `reply 0x${r.toString(16)}`;

/** This server's limits (README): option data read up to 64 KiB, skipped up to 32 MiB; write payloads up to 32 MiB. */
export const MAX_OPTION = 64 * 1024;
export const MAX_SKIPPED_OPTION = 32 * 1024 * 1024;
export const MAX_PAYLOAD = 32 * 1024 * 1024;
const MAX_STRING = 4096;

/** Flags each command may carry (doc/proto.md "Command flags"): FUA everywhere, DF on reads (structured only), REQ_ONE on block status, NO_HOLE and FAST_ZERO on write zeroes. */
const ALLOWED_FLAGS = {
  [Cmd.READ]: CmdFlag.FUA | CmdFlag.DF,
  [Cmd.WRITE]: CmdFlag.FUA,
  [Cmd.FLUSH]: CmdFlag.FUA,
  [Cmd.TRIM]: CmdFlag.FUA,
  [Cmd.CACHE]: CmdFlag.FUA,
  [Cmd.WRITE_ZEROES]: CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
  [Cmd.BLOCK_STATUS]: CmdFlag.FUA | CmdFlag.REQ_ONE,
};
const KNOWN_OPTIONS = new Set([Opt.EXPORT_NAME, Opt.ABORT, Opt.LIST, Opt.STARTTLS, Opt.INFO, Opt.GO, Opt.STRUCTURED_REPLY, Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT]);

/**
 * env: { exports: [{ name, size, flags (transmission flags with structured replies), minBlock,
 * maxBlock, description, listed }] } — the first export is the default one (name "").
 */
export function findExport(env, name) {
  const e = env.exports.find((x) => x.name === name);
  if (e || name !== "") return e ?? null;
  return env.exports[0] ?? null;
}

class Stream {
  constructor(bytes) {
    this.b = bytes;
    this.at = 0;
  }
  left() {
    return this.b.length - this.at;
  }
  take(n) {
    const out = this.b.subarray(this.at, this.at + n);
    this.at += n;
    return out;
  }
}

/**
 * The obligations a client byte stream creates. Returns { steps, end } where each step is
 * { kind: "greeting" } | { kind: "option", opt, finals: number[], nonFinal: number[], exp?, go? }
 * | { kind: "export-name", exp, noZeroes } | { kind: "request", cookie, type, flags, offset, length,
 * allowed: number[], structured, contextIds, df, reqOne } and end is { why, close, detail }:
 * why ∈ violation | disc | eof | truncated | abort | refused | open; close: the server must close.
 * `clientEnds`: the client half-closes after the last byte (else it leaves the socket open).
 */
export function oracle(bytes, env, clientEnds) {
  const s = new Stream(bytes);
  const steps = [{ kind: "greeting", at: 0 }];
  const end = (why, close, detail, at = s.at) => ({ steps, end: { why, close, detail, at } });
  const cut = () => (clientEnds ? end("truncated", true, "the client's end cut a frame short") : end("open", false, "a frame waits for bytes the client never sends"));
  if (s.left() < 4) return s.left() === 0 ? (clientEnds ? end("eof", true, "the client's end during the handshake") : end("open", false, "nothing sent")) : cut();
  const cflags = s.take(4).readUInt32BE(0);
  if (cflags & ~3) return end("violation", true, "unknown client flags", s.at);
  const fixed = (cflags & 1) !== 0;
  const noZeroes = (cflags & 2) !== 0;
  let structured = false;
  let metaExport = null;
  // The contexts the last NBD_OPT_SET_META_CONTEXT selected (base:allocation, qemu:allocation-depth).
  let selected = { allocation: false, depth: false };
  for (;;) {
    if (s.left() === 0) return clientEnds ? end("eof", true, "the client's end during the handshake") : end("open", false, "the handshake waits for the client");
    if (s.left() < 16) return cut();
    const head = s.take(16);
    if (head.readBigUInt64BE(0) !== IHAVEOPT) return end("violation", true, "bad option magic");
    const opt = head.readUInt32BE(8);
    const len = head.readUInt32BE(12);
    if (!fixed && opt !== Opt.EXPORT_NAME) return end("violation", true, "without fixed newstyle");
    if (len > MAX_SKIPPED_OPTION) return end("violation", true, "over the limit of 33554432");
    if (len > MAX_OPTION) {
      if (opt === Opt.EXPORT_NAME) return end("violation", true, "NBD_OPT_EXPORT_NAME of");
      if (s.left() < len) return cut();
      s.take(len);
      if (opt === Opt.SET_META_CONTEXT) {
        selected = { allocation: false, depth: false };
        metaExport = null;
      }
      steps.push({ kind: "option", opt, at: s.at, finals: [KNOWN_OPTIONS.has(opt) ? Rep.ERR_TOO_BIG : Rep.ERR_UNSUP], nonFinal: [] });
      continue;
    }
    if (s.left() < len) return cut();
    const data = s.take(len);
    const at = s.at;
    switch (opt) {
      case Opt.EXPORT_NAME: {
        const exp = findExport(env, data.toString("utf8"));
        if (!exp) return end("refused", true, "NBD_OPT_EXPORT_NAME of an unknown export");
        steps.push({ kind: "export-name", at, exp, noZeroes });
        return transmission(s, env, steps, { exp, structured, contextIds: contextIdsOf(selected, metaExport === exp.name) }, clientEnds);
      }
      case Opt.ABORT:
        steps.push({ kind: "option", opt, at, finals: [Rep.ACK], nonFinal: [], optional: true });
        return end("abort", true, "NBD_OPT_ABORT");
      case Opt.LIST:
        steps.push(len ? { kind: "option", opt, at, finals: [Rep.ERR_INVALID], nonFinal: [] } : { kind: "option", opt, at, finals: [Rep.ACK], nonFinal: [Rep.SERVER], servers: env.exports.filter((e) => e.listed).length });
        break;
      case Opt.STARTTLS: // TLS is off on the fuzzed server
        steps.push({ kind: "option", opt, at, finals: [Rep.ERR_POLICY, ...(len ? [Rep.ERR_INVALID] : [])], nonFinal: [] });
        break;
      case Opt.INFO:
      case Opt.GO: {
        const p = parseInfoRequest(data);
        if (typeof p === "string") {
          steps.push({ kind: "option", opt, at, finals: [Rep.ERR_INVALID], nonFinal: [], why: p });
          break;
        }
        const exp = findExport(env, p.name);
        if (!exp) {
          steps.push({ kind: "option", opt, at, finals: [Rep.ERR_UNKNOWN], nonFinal: [] });
          break;
        }
        steps.push({ kind: "option", opt, at, finals: [Rep.ACK], nonFinal: [Rep.INFO], exp, structured, infos: p.infos });
        if (opt === Opt.GO) return transmission(s, env, steps, { exp, structured, contextIds: contextIdsOf(selected, metaExport === exp.name) }, clientEnds);
        break;
      }
      case Opt.STRUCTURED_REPLY:
        if (len) steps.push({ kind: "option", opt, at, finals: [Rep.ERR_INVALID], nonFinal: [] });
        else {
          // Asked again: the spec lets the server refuse it (ERR_INVALID); structured either way.
          steps.push({ kind: "option", opt, at, finals: structured ? [Rep.ACK, Rep.ERR_INVALID] : [Rep.ACK], nonFinal: [] });
          structured = true;
        }
        break;
      case Opt.LIST_META_CONTEXT:
      case Opt.SET_META_CONTEXT: {
        const set = opt === Opt.SET_META_CONTEXT;
        if (set) {
          // "including when this command fails"
          selected = { allocation: false, depth: false };
          metaExport = null;
        }
        if (set && !structured) {
          steps.push({ kind: "option", opt, at, finals: [Rep.ERR_INVALID], nonFinal: [] });
          break;
        }
        const p = parseMetaRequest(data);
        if (typeof p === "string") {
          steps.push({ kind: "option", opt, at, finals: [Rep.ERR_INVALID], nonFinal: [], why: p });
          break;
        }
        const exp = findExport(env, p.name);
        if (!exp) {
          steps.push({ kind: "option", opt, at, finals: [Rep.ERR_UNKNOWN], nonFinal: [] });
          break;
        }
        // Every export here answers both contexts (file and memory ports: depth 1). LIST with no
        // query, or a bare namespace, lists what it offers (in that namespace).
        const wanted = (ctx) => (set ? p.queries.includes(ctx) : p.queries.length === 0 || p.queries.some((q) => q === ctx || q === ctx.slice(0, ctx.indexOf(":") + 1)));
        const matches = { allocation: wanted(BASE_ALLOCATION), depth: wanted(ALLOCATION_DEPTH) };
        if (set) {
          metaExport = exp.name;
          selected = matches;
        }
        steps.push({ kind: "option", opt, at, finals: [Rep.ACK], nonFinal: [Rep.META_CONTEXT], contexts: Number(matches.allocation) + Number(matches.depth), set });
        break;
      }
      default:
        steps.push({ kind: "option", opt, at, finals: [Rep.ERR_UNSUP], nonFinal: [] });
    }
  }
}

const BASE_ALLOCATION = "base:allocation";
const ALLOCATION_DEPTH = "qemu:allocation-depth";

/** The context ids BLOCK_STATUS answers with: this server numbers base:allocation 1 and qemu:allocation-depth 2. */
function contextIdsOf(selected, forThisExport) {
  if (!forThisExport) return [];
  return [...(selected.allocation ? [1] : []), ...(selected.depth ? [2] : [])];
}

/** NBD_OPT_INFO/GO data (doc/proto.md): name length, name, number of requests, requests. */
export function parseInfoRequest(d) {
  if (d.length < 6) return "option data too short";
  const nameLen = d.readUInt32BE(0);
  if (nameLen > MAX_STRING) return "export name too long";
  if (4 + nameLen + 2 > d.length) return "export name length runs past the option";
  const name = d.toString("utf8", 4, 4 + nameLen);
  const n = d.readUInt16BE(4 + nameLen);
  if (d.length !== 4 + nameLen + 2 + 2 * n) return "information request count does not match the option length";
  const infos = [];
  for (let i = 0; i < n; i++) infos.push(d.readUInt16BE(4 + nameLen + 2 + 2 * i));
  return { name, infos };
}

/** NBD_OPT_{LIST,SET}_META_CONTEXT data: name length, name, number of queries, (length, query)… */
export function parseMetaRequest(d) {
  if (d.length < 8) return "option data too short";
  const nameLen = d.readUInt32BE(0);
  if (nameLen > MAX_STRING) return "export name too long";
  if (4 + nameLen + 4 > d.length) return "export name length runs past the option";
  const name = d.toString("utf8", 4, 4 + nameLen);
  const n = d.readUInt32BE(4 + nameLen);
  let at = 8 + nameLen;
  const queries = [];
  for (let i = 0; i < n; i++) {
    if (at + 4 > d.length) return "query count runs past the option";
    const ql = d.readUInt32BE(at);
    if (ql > MAX_STRING || at + 4 + ql > d.length) return "query length runs past the option";
    queries.push(d.toString("utf8", at + 4, at + 4 + ql));
    at += 4 + ql;
  }
  if (at !== d.length) return "trailing bytes after the queries";
  return { name, queries };
}

/** The errnos a request may get (0: success), by the spec's SHOULDs; several when several rules apply. */
export function allowedOutcomes(r, t) {
  const { exp, structured, contextIds } = t;
  const size = BigInt(exp.size);
  const out = new Set();
  const known = ALLOWED_FLAGS[r.type];
  if (known === undefined) return [Errno.EINVAL]; // unknown command
  const allowedFlags = structured ? known : known & ~CmdFlag.DF;
  if (r.flags & ~allowedFlags) out.add(Errno.EINVAL);
  const writeOp = r.type === Cmd.WRITE || r.type === Cmd.TRIM || r.type === Cmd.WRITE_ZEROES;
  const ro = (exp.flags & TFlag.READ_ONLY) !== 0;
  if (writeOp && ro) out.add(Errno.EPERM);
  if ((r.flags & CmdFlag.FUA) && writeOp && !(exp.flags & TFlag.SEND_FUA)) out.add(Errno.EINVAL);
  if (r.type === Cmd.FLUSH) {
    if (!(exp.flags & TFlag.SEND_FLUSH)) out.add(Errno.EINVAL);
    // Offset and length are reserved (MUST be zero); what the server does otherwise is not said.
    if (r.offset !== 0n || r.length !== 0) {
      out.add(Errno.EINVAL);
      out.add(0);
    }
    if (out.size === 0) out.add(0);
    return [...out];
  }
  const cap = { [Cmd.TRIM]: TFlag.SEND_TRIM, [Cmd.WRITE_ZEROES]: TFlag.SEND_WRITE_ZEROES, [Cmd.CACHE]: TFlag.SEND_CACHE }[r.type];
  if (cap && !(exp.flags & cap)) out.add(Errno.EINVAL);
  if (r.type === Cmd.BLOCK_STATUS && (!structured || contextIds.length === 0)) out.add(Errno.EINVAL);
  const lengthLimited = r.type === Cmd.READ || r.type === Cmd.WRITE;
  if (lengthLimited && r.length > exp.maxBlock) out.add(Errno.EINVAL); // a read; a write this long was a violation
  if (r.offset + BigInt(r.length) > size) out.add(r.type === Cmd.WRITE || r.type === Cmd.WRITE_ZEROES ? Errno.ENOSPC : Errno.EINVAL);
  if (r.length === 0) {
    // A zero length is not forbidden by the spec; this server refuses it (EINVAL). Either is fine.
    if (out.size === 0) out.add(0);
    out.add(Errno.EINVAL);
  }
  if (r.type === Cmd.READ && r.flags & CmdFlag.DF && out.size === 0) {
    // "Use of this flag MAY trigger an NBD_EOVERFLOW error chunk, if the request length is too large."
    out.add(Errno.EOVERFLOW);
    out.add(0);
  }
  if (r.type === Cmd.WRITE_ZEROES && (r.flags & CmdFlag.FAST_ZERO) && out.size === 0) {
    // NBD_CMD_FLAG_FAST_ZERO: ENOTSUP when zeroing would not be fast.
    out.add(Errno.ENOTSUP);
    out.add(0);
  }
  if (out.size === 0) out.add(0);
  return [...out];
}

function transmission(s, env, steps, t, clientEnds) {
  // After NBD_CMD_DISC the client MUST NOT send anything: what comes is answered ESHUTDOWN if the
  // server reads it before it closes (optional), and a violation there lets it hang up at once.
  let disc = null;
  // A violation after it may be read (the server hangs up at once: nothing is owed) or not (the server
  // stopped reading at NBD_CMD_DISC): either way it closes, and need not say why.
  const end = (why, close, detail) => ({ steps, end: !disc ? { why, close, detail, at: s.at } : why === "violation" ? { ...disc, why: "disc-violation", detail: `NBD_CMD_DISC, then ${detail}` } : disc });
  for (;;) {
    if (s.left() === 0) return clientEnds ? end("eof", true, "the client's end") : end("open", false, "the client keeps the connection open");
    if (s.left() < 28) return clientEnds ? end("truncated", true, "the client's end cut a request short") : end("open", false, "a request waits for bytes the client never sends");
    const h = s.take(28);
    if (h.readUInt32BE(0) !== REQUEST_MAGIC) return end("violation", true, "bad request magic");
    const r = {
      kind: "request",
      flags: h.readUInt16BE(4),
      type: h.readUInt16BE(6),
      cookie: h.readBigUInt64BE(8),
      offset: h.readBigUInt64BE(16),
      length: h.readUInt32BE(24),
    };
    if (r.type === Cmd.WRITE) {
      if (r.length > MAX_PAYLOAD) return end("violation", true, "exceeds the maximum");
      if (s.left() < r.length) return clientEnds ? end("truncated", true, "the client's end cut a write payload short") : end("open", false, "a write payload waits for bytes the client never sends");
      s.take(r.length);
    }
    r.at = s.at;
    if (r.type === Cmd.DISC) {
      disc ??= { why: "disc", close: true, detail: "NBD_CMD_DISC", at: s.at };
      continue;
    }
    r.allowed = disc ? [Errno.ESHUTDOWN] : allowedOutcomes(r, t);
    r.optional = disc !== null;
    r.structured = t.structured;
    r.contextIds = t.contextIds;
    r.exp = t.exp;
    steps.push(r);
  }
}

const hex = (b) => b.toString("hex");

/** Received bytes as the chunks they came in: peeking copies only what spans chunks, skipping copies nothing. */
class ByteQueue {
  constructor() {
    this.chunks = [];
    this.head = 0;
    this.length = 0;
  }
  push(c) {
    if (!c.length) return;
    this.chunks.push(c);
    this.length += c.length;
  }
  /** The first n bytes (n <= length). */
  peek(n) {
    if (n === 0) return Buffer.alloc(0);
    const first = this.chunks[this.head];
    if (first.length >= n) return first.subarray(0, n);
    const out = Buffer.allocUnsafe(n);
    let at = 0;
    for (let i = this.head; at < n; i++) at += this.chunks[i].copy(out, at, 0, Math.min(this.chunks[i].length, n - at));
    return out;
  }
  skip(n) {
    this.length -= n;
    while (n > 0) {
      const c = this.chunks[this.head];
      if (c.length <= n) {
        n -= c.length;
        this.chunks[this.head++] = null;
      } else {
        this.chunks[this.head] = c.subarray(n);
        n = 0;
      }
    }
    if (this.head > 1024) {
      this.chunks = this.chunks.slice(this.head);
      this.head = 0;
    }
  }
  take(n) {
    const out = this.peek(n);
    this.skip(n);
    return out;
  }
}

/**
 * Holds the server's bytes against the oracle's steps. feed() as bytes arrive; closed() when the
 * socket closed. `problems` collects what is wrong; due() counts replies still owed.
 */
export class Judge {
  constructor(plan, sentBytes = Infinity) {
    this.steps = plan.steps;
    this.end = plan.end;
    this.sent = sentBytes; // client bytes actually sent (obligations past them are void)
    this.problems = [];
    this.q = new ByteQueue();
    this.i = 0; // next sequential (handshake) step
    this.phase = "handshake";
    this.pending = new Map(); // cookie → [request state]
    this.answered = 0;
    this.optionsAnswered = 0;
    this.serverClosed = false;
    this.cur = null; // option being answered: { step, infos: Set, servers, contexts }
  }

  /** Client bytes sent so far: only obligations of frames sent in full count. */
  setSent(n) {
    this.sent = n;
  }

  problem(msg) {
    if (this.problems.length < 20) this.problems.push(msg);
  }

  /** Replies still owed for frames the client sent in full. */
  due() {
    // Before a violation the server may hang up at once, answered or not.
    if ((this.end.why === "violation" || this.end.why === "disc-violation" || this.end.why === "abort") && this.end.at <= this.sent) return 0;
    let n = 0;
    for (let j = this.i; j < this.steps.length; j++) {
      const st = this.steps[j];
      if (st.at <= this.sent && !st.optional) n++;
    }
    for (const list of this.pending.values()) for (const r of list) if (r.step.at <= this.sent && !r.step.optional) n++;
    return n;
  }

  /** What is owed, for messages: the first few. */
  dueList(max = 3) {
    const out = [];
    for (let j = this.i; j < this.steps.length && out.length < max; j++) {
      const st = this.steps[j];
      if (st.at <= this.sent && !st.optional) out.push(st.kind === "option" ? optName(st.opt) : st.kind === "request" ? cmdName(st.type) : st.kind);
    }
    for (const list of this.pending.values()) for (const r of list) if (r.step.at <= this.sent && !r.step.optional && out.length < max) out.push(`${cmdName(r.step.type)} flags 0x${r.step.flags.toString(16)} offset ${r.step.offset} length ${r.step.length} (cookie ${r.step.cookie})`);
    return out.join(", ");
  }

  /** Everything owed was answered, and the conversation is in a state where the server must close. */
  mustClose() {
    return this.end.close && this.end.at <= this.sent;
  }

  feed(chunk) {
    this.q.push(chunk);
    for (;;) {
      const before = this.q.length;
      this.step();
      if (this.problems.length || this.q.length === before) break;
    }
  }

  /** Whether bytes are expected now (false: anything more is unexpected). */
  expecting() {
    return this.phase === "transmission" ? this.pending.size > 0 : this.i < this.steps.length;
  }

  take(n) {
    return this.q.take(n);
  }

  step() {
    const q = this.q;
    if (q.length === 0) return;
    const b = q.peek(Math.min(q.length, 20)); // headers only; payloads are taken or skipped below
    if (this.phase === "handshake") {
      const st = this.steps[this.i];
      if (!st) return this.problem(`unexpected bytes after the last obligation: ${hex(b.subarray(0, 32))}`);
      if (st.kind === "greeting") {
        if (b.length < 18) return;
        const g = this.take(18);
        if (g.readBigUInt64BE(0) !== NBDMAGIC || g.readBigUInt64BE(8) !== IHAVEOPT) return this.problem(`bad greeting ${hex(g)}`);
        if (g.readUInt16BE(16) !== 3) this.problem(`greeting flags 0x${g.readUInt16BE(16).toString(16)}, expected FIXED_NEWSTYLE|NO_ZEROES`);
        this.i++;
        return;
      }
      if (st.kind === "export-name") {
        const n = st.noZeroes ? 10 : 134;
        if (q.length < n) return;
        const r = this.take(n);
        if (r.readBigUInt64BE(0) !== BigInt(st.exp.size)) this.problem(`NBD_OPT_EXPORT_NAME: size ${r.readBigUInt64BE(0)}, expected ${st.exp.size}`);
        const flags = r.readUInt16BE(8);
        if ((flags & ~TFlag.SEND_DF) !== (st.exp.flags & ~TFlag.SEND_DF)) this.problem(`NBD_OPT_EXPORT_NAME: flags 0x${flags.toString(16)}, expected 0x${st.exp.flags.toString(16)}`);
        if (!st.noZeroes && !r.subarray(10).equals(Buffer.alloc(124))) this.problem("NBD_OPT_EXPORT_NAME: the 124 reserved bytes are not zero");
        this.i++;
        this.enterTransmission();
        return;
      }
      if (st.kind === "request") {
        this.enterTransmission();
        return;
      }
      // An option reply.
      if (b.length < 20) return;
      const len = b.readUInt32BE(16);
      if (b.readBigUInt64BE(0) !== OPT_REPLY_MAGIC) return this.problem(`${optName(st.opt)}: bad option reply magic ${hex(b.subarray(0, 20))}`);
      if (len > 1 << 20) return this.problem(`${optName(st.opt)}: option reply of ${len} bytes`);
      if (q.length < 20 + len) return;
      const h = this.take(20);
      const data = this.take(len);
      const opt = h.readUInt32BE(8);
      const type = h.readUInt32BE(12);
      if (opt !== st.opt) return this.problem(`reply to option ${opt} while ${optName(st.opt)} was due`);
      this.cur ??= { infos: new Set(), servers: 0, contexts: 0 };
      if (st.nonFinal.includes(type)) {
        this.checkNonFinal(st, type, data);
        return;
      }
      if (!st.finals.includes(type)) return this.problem(`${optName(st.opt)}: got ${repName(type)}, expected ${st.finals.map(repName).join(" or ")}${st.why ? ` (${st.why})` : ""}`);
      if (type & 0x80000000 && len > MAX_STRING) this.problem(`${optName(st.opt)}: error message of ${len} bytes`);
      if (type === Rep.ACK) {
        if ((st.opt === Opt.INFO || st.opt === Opt.GO) && !this.cur.infos.has(Info.EXPORT)) this.problem(`${optName(st.opt)}: ACK without NBD_INFO_EXPORT`);
        if (st.opt === Opt.LIST && this.cur.servers !== st.servers) this.problem(`NBD_OPT_LIST: ${this.cur.servers} exports listed, expected ${st.servers}`);
        if (st.contexts !== undefined && this.cur.contexts !== st.contexts) this.problem(`${optName(st.opt)}: ${this.cur.contexts} meta contexts, expected ${st.contexts}`);
      }
      this.cur = null;
      this.i++;
      this.optionsAnswered++;
      if (st.opt === Opt.GO && type === Rep.ACK) this.enterTransmission();
      return;
    }
    // Transmission: simple or structured replies, any order.
    if (b.length < 4) return;
    const magic = b.readUInt32BE(0);
    if (magic === SIMPLE_MAGIC) {
      if (b.length < 16) return;
      const errno = b.readUInt32BE(4);
      const cookie = b.readBigUInt64BE(8);
      const r = this.lookup(cookie);
      if (!r) return this.problem(`simple reply for cookie ${cookie}, which is not outstanding`);
      const data = r.step.type === Cmd.READ && errno === 0 ? r.step.length : 0;
      if (q.length < 16 + data) return;
      q.skip(16 + data);
      if (r.step.structured && r.step.type === Cmd.READ) this.problem(`simple reply to a READ after structured replies were negotiated (cookie ${cookie})`);
      this.finish(r, errno);
      return;
    }
    if (magic === STRUCTURED_MAGIC) {
      if (b.length < 20) return;
      const flags = b.readUInt16BE(4);
      const type = b.readUInt16BE(6);
      const cookie = b.readBigUInt64BE(8);
      const len = b.readUInt32BE(16);
      const r = this.lookup(cookie);
      if (!r) return this.problem(`structured reply for cookie ${cookie}, which is not outstanding`);
      if (len > MAX_PAYLOAD + 64) return this.problem(`structured chunk of ${len} bytes`);
      if (q.length < 20 + len) return;
      q.skip(20);
      // Read data is skipped, not copied: only its offset matters here.
      const p = type === ReplyType.OFFSET_DATA && len > 8 ? q.peek(8) : q.peek(len);
      q.skip(len);
      if (!r.step.structured) this.problem(`structured reply without NBD_OPT_STRUCTURED_REPLY (cookie ${cookie})`);
      this.chunk(r, flags, type, p, len);
      if (flags & 1) this.finish(r, r.error);
      return;
    }
    this.problem(`bad reply magic 0x${magic.toString(16)} (${hex(b.subarray(0, 32))})`);
  }

  checkNonFinal(st, type, data) {
    const name = optName(st.opt);
    if (type === Rep.SERVER) {
      if (data.length < 4 || data.readUInt32BE(0) > data.length - 4) return this.problem(`NBD_OPT_LIST: malformed NBD_REP_SERVER ${hex(data)}`);
      this.cur.servers++;
    } else if (type === Rep.INFO) {
      if (data.length < 2) return this.problem(`${name}: empty NBD_REP_INFO`);
      const it = data.readUInt16BE(0);
      this.cur.infos.add(it);
      if (it === Info.EXPORT) {
        if (data.length !== 12) return this.problem(`${name}: NBD_INFO_EXPORT of ${data.length} bytes`);
        if (data.readBigUInt64BE(2) !== BigInt(st.exp.size)) this.problem(`${name}: size ${data.readBigUInt64BE(2)}, expected ${st.exp.size}`);
        const f = data.readUInt16BE(10);
        const want = st.structured ? st.exp.flags : st.exp.flags & ~TFlag.SEND_DF;
        if (f !== want) this.problem(`${name}: transmission flags 0x${f.toString(16)}, expected 0x${want.toString(16)}`);
      } else if (it === Info.BLOCK_SIZE) {
        if (data.length !== 14) return this.problem(`${name}: NBD_INFO_BLOCK_SIZE of ${data.length} bytes`);
        const [min, pref, max] = [data.readUInt32BE(2), data.readUInt32BE(6), data.readUInt32BE(10)];
        if (min < 1 || pref < min || max < pref || (min & (min - 1)) || (pref & (pref - 1))) this.problem(`${name}: block sizes ${min}/${pref}/${max}`);
      } else if (it === Info.NAME || it === Info.DESCRIPTION) {
        if (data.length - 2 > MAX_STRING) this.problem(`${name}: info string of ${data.length - 2} bytes`);
        if (!st.infos.includes(it)) this.problem(`${name}: NBD_REP_INFO ${it} that was not asked for`);
      } else this.problem(`${name}: unknown NBD_REP_INFO type ${it}`);
    } else if (type === Rep.META_CONTEXT) {
      if (data.length < 5) return this.problem(`${name}: malformed NBD_REP_META_CONTEXT`);
      const id = data.readUInt32BE(0);
      const ctx = data.toString("utf8", 4);
      if (ctx !== BASE_ALLOCATION && ctx !== ALLOCATION_DEPTH) this.problem(`${name}: meta context "${ctx}"`);
      if (st.set ? id === 0 : id !== 0) this.problem(`${name}: context id ${id}`);
      this.cur.contexts++;
    }
  }

  enterTransmission() {
    this.phase = "transmission";
    for (let j = this.i; j < this.steps.length; j++) {
      const st = this.steps[j];
      if (st.kind !== "request") continue;
      const key = st.cookie;
      const r = { step: st, error: 0, chunks: 0, covered: [], extents: 0, contextsSeen: [], doneData: false };
      if (!this.pending.has(key)) this.pending.set(key, []);
      this.pending.get(key).push(r);
    }
    this.i = this.steps.length;
  }

  lookup(cookie) {
    const list = this.pending.get(cookie);
    return list?.[0] ?? null;
  }

  chunk(r, flags, type, p, len = p.length) {
    const st = r.step;
    const name = `${cmdName(st.type)} (cookie ${st.cookie})`;
    r.chunks++;
    if (flags & ~1) this.problem(`${name}: chunk flags 0x${flags.toString(16)}`);
    switch (type) {
      case ReplyType.NONE:
        if (p.length !== 0 || !(flags & 1)) this.problem(`${name}: NBD_REPLY_TYPE_NONE of ${p.length} bytes, flags ${flags}`);
        return;
      case ReplyType.ERROR:
      case ReplyType.ERROR_OFFSET: {
        if (p.length < 6) return this.problem(`${name}: error chunk of ${p.length} bytes`);
        const errno = p.readUInt32BE(0);
        const ml = p.readUInt16BE(4);
        if (errno === 0) this.problem(`${name}: error chunk with errno 0`);
        if (6 + ml + (type === ReplyType.ERROR_OFFSET ? 8 : 0) !== p.length) this.problem(`${name}: error chunk lengths do not add up`);
        if (type === ReplyType.ERROR_OFFSET) {
          const off = p.readBigUInt64BE(6 + ml);
          if (st.type !== Cmd.READ || off < st.offset || off >= st.offset + BigInt(st.length)) this.problem(`${name}: error offset ${off} outside the request`);
        }
        r.error ||= errno;
        return;
      }
      case ReplyType.OFFSET_DATA:
      case ReplyType.OFFSET_HOLE: {
        if (st.type !== Cmd.READ) return this.problem(`${name}: content chunk for a ${cmdName(st.type)}`);
        if (type === ReplyType.OFFSET_DATA ? len < 9 : len !== 12) return this.problem(`${name}: content chunk of ${len} bytes`);
        const off = p.readBigUInt64BE(0);
        const n = type === ReplyType.OFFSET_DATA ? len - 8 : p.readUInt32BE(8);
        if (n === 0) return this.problem(`${name}: empty hole`);
        const a = off - st.offset;
        if (off < st.offset || a + BigInt(n) > BigInt(st.length)) return this.problem(`${name}: content [${off}, +${n}) outside the request [${st.offset}, +${st.length})`);
        for (const [x, y] of r.covered) if (Number(a) < y && Number(a) + n > x) return this.problem(`${name}: content chunks overlap`);
        r.covered.push([Number(a), Number(a) + n]);
        if ((st.flags & CmdFlag.DF) && (r.covered.length > 1 || type !== ReplyType.OFFSET_DATA)) this.problem(`${name}: NBD_CMD_FLAG_DF read answered in ${r.covered.length} chunks`);
        return;
      }
      case ReplyType.BLOCK_STATUS: {
        if (st.type !== Cmd.BLOCK_STATUS) return this.problem(`${name}: block status chunk for a ${cmdName(st.type)}`);
        if (p.length < 12 || (p.length - 4) % 8) return this.problem(`${name}: block status chunk of ${p.length} bytes`);
        const id = p.readUInt32BE(0);
        if (!st.contextIds.includes(id)) this.problem(`${name}: context id ${id}, expected one of ${st.contextIds.join(", ")}`);
        if (r.contextsSeen.includes(id)) this.problem(`${name}: two block status chunks for context ${id}`);
        r.contextsSeen.push(id);
        const n = (p.length - 4) / 8;
        let sum = 0;
        for (let k = 0; k < n; k++) {
          const l = p.readUInt32BE(4 + 8 * k);
          if (l === 0) this.problem(`${name}: zero-length extent`);
          if (k < n - 1) sum += l;
          else if (st.flags & CmdFlag.REQ_ONE && l > st.length) this.problem(`${name}: REQ_ONE extent of ${l} bytes for a request of ${st.length}`);
        }
        if (n > 1 && sum >= st.length) this.problem(`${name}: the first ${n - 1} extents already cover the request`);
        if (st.flags & CmdFlag.REQ_ONE && n !== 1) this.problem(`${name}: ${n} extents with NBD_CMD_FLAG_REQ_ONE`);
        r.extents++;
        return;
      }
      default:
        this.problem(`${name}: unknown chunk type ${type}`);
    }
  }

  finish(r, errno) {
    const st = r.step;
    const list = this.pending.get(st.cookie);
    list.shift();
    if (list.length === 0) this.pending.delete(st.cookie);
    this.answered++;
    const name = `${cmdName(st.type)} flags 0x${st.flags.toString(16)} offset ${st.offset} length ${st.length} on "${st.exp.name}" (cookie ${st.cookie})`;
    if (!st.allowed.includes(errno)) {
      this.problem(`${name}: answered ${errnoName(errno)}, expected ${st.allowed.map(errnoName).join(" or ")}`);
      return;
    }
    if (errno !== 0 || !st.structured) return;
    if (st.type === Cmd.READ) {
      const total = r.covered.reduce((t, [x, y]) => t + (y - x), 0);
      if (total !== st.length) this.problem(`${name}: content chunks cover ${total} of ${st.length} bytes`);
    }
    if (st.type === Cmd.BLOCK_STATUS && r.extents !== st.contextIds.length) this.problem(`${name}: ${r.extents} block status chunks, expected ${st.contextIds.length} (one per selected context)`);
  }

  /** The socket closed. Returns problems of the end: replies still owed when none may be lost. */
  closed() {
    this.serverClosed = true;
    if (this.q.length && !this.problems.length) {
      // A reply cut short is fine only where the server may hang up (a violation).
      if (this.end.why !== "violation" && this.end.why !== "disc-violation") this.problem(`the connection closed in the middle of a reply (${this.q.length} bytes: ${hex(this.q.peek(Math.min(32, this.q.length)))})`);
    }
  }
}
