import type { Socket } from "node:net";
import type tls from "node:tls";
import type { Logger } from "pino";
import { ProtocolError } from "../errors.js";
import {
  ALLOCATION_DEPTH,
  BASE_ALLOCATION,
  ClientFlag,
  HandshakeFlag,
  Info,
  NBD_IHAVEOPT,
  NBD_MAGIC,
  NBD_MAX_STRING,
  NBD_OPT_REPLY_MAGIC,
  Opt,
  Rep,
} from "../protocol/constants.js";
import type { Export } from "../stack/export.js";
import type { ServerSocketOptions } from "../tls/tls-config.js";
import { exportOfPeerName, sessionOfPeerName } from "../internal-exports.js";
import type { BudgetWaiter, MemoryBudget } from "./memory-budget.js";

/** Options longer than this are skipped unread and refused (no option we know is near it). */
export const MAX_OPTION_LENGTH = 64 * 1024;
/** Options longer than this close the connection, as qemu-nbd does (2^25, the spec's "not a denial of service" bound). */
export const MAX_SKIPPED_OPTION = 32 * 1024 * 1024;
/** Options this server implements (others get NBD_REP_ERR_UNSUP). */
const KNOWN_OPTIONS: ReadonlySet<number> = new Set([
  Opt.NBD_OPT_EXPORT_NAME,
  Opt.NBD_OPT_ABORT,
  Opt.NBD_OPT_LIST,
  Opt.NBD_OPT_STARTTLS,
  Opt.NBD_OPT_INFO,
  Opt.NBD_OPT_GO,
  Opt.NBD_OPT_STRUCTURED_REPLY,
  Opt.NBD_OPT_LIST_META_CONTEXT,
  Opt.NBD_OPT_SET_META_CONTEXT,
]);
/** Meta context id of base:allocation on every connection. */
export const BASE_ALLOCATION_ID = 1;
/** Meta context id of qemu:allocation-depth on every connection. */
export const ALLOCATION_DEPTH_ID = 2;

export interface ExportDirectory {
  find(name: string): Export | undefined;
  list(): Export[];
}

export interface Negotiated {
  exp: Export;
  /** The client is another node's port B (it asked for peerExportName(name)). */
  peer: boolean;
  /** Its port B session, if it tags its writes (see server/peer-writes.ts). */
  peerSession: string | null;
  structured: boolean;
  /** Meta context id of base:allocation, or 0 when it was not selected. */
  allocationContext: number;
  /** Meta context id of qemu:allocation-depth, or 0 when it was not selected. */
  depthContext: number;
  /** Bytes the client sent after the last option (the start of the request stream). */
  rest: Buffer;
  /** The socket transmission goes on: the TLS socket after NBD_OPT_STARTTLS, else the one given. */
  socket: Socket;
  tls: boolean;
  /** The client's end came during the handshake: after `rest`, nothing more will. */
  ended: boolean;
}

/**
 * TLS as the handshake sees it: offered ("on") or required ("require"), the server socket options,
 * and the upgrade itself (tls-config's handshakeTls): node:tls is loaded only where TLS is configured.
 */
export interface HandshakeTls {
  mode: "on" | "require";
  options: ServerSocketOptions;
  /** The server side of a socket upgraded by NBD_OPT_STARTTLS. */
  wrap(socket: Socket, options: ServerSocketOptions): tls.TLSSocket;
  /** Why the client's certificate failed verification, or null if it passed. */
  certError(t: tls.TLSSocket): string | null;
}

/** Bytes a client may send ahead of what the handshake is reading (the socket is paused beyond). */
const READ_AHEAD = 16 * 1024;
/** Bytes a handshake may hold without regard to the memory budget (every real client's options fit). */
const SMALL_HANDSHAKE = 4 * 1024;
/** Option replies queued for a client that does not read them before no further option is read. */
const MAX_QUEUED_REPLIES = 64 * 1024;

/** The socket whose reading a ByteReader regulates. */
interface Flow {
  pause(): void;
  resume(): void;
}

/**
 * Pulls exact byte counts out of a socket during the (cold) handshake. What it holds counts
 * against the memory budget; it stops reading the socket when the client sends far ahead of
 * what is being read, or holds more than a few KiB while the budget is exhausted.
 */
class ByteReader {
  private chunks: Buffer[] = [];
  private size = 0;
  private want = 0;
  /** Bytes still to be dropped as they arrive (see skip). */
  private skipping = 0;
  private resolve: ((b: Buffer) => void) | null = null;
  private reject: ((e: Error) => void) | null = null;
  private failed: Error | null = null;
  /** The client's end came: reads still get what was sent before it, then this. */
  private ended: Error | null = null;
  private paused = false;
  private waiter: BudgetWaiter | null = null;
  /** Where the reading is regulated: the plain socket, then the TLS socket. */
  flow: Flow | null = null;

  constructor(private readonly budget: MemoryBudget | null) {}

  push(chunk: Buffer): void {
    if (this.failed) return;
    if (this.skipping > 0) {
      const n = Math.min(this.skipping, chunk.length);
      this.skipping -= n;
      chunk = chunk.subarray(n);
      if (this.skipping === 0) this.wake();
      if (chunk.length === 0) return;
    }
    this.chunks.push(chunk);
    this.size += chunk.length;
    this.budget?.buffer(chunk.length);
    this.wake();
    this.regulate();
  }
  fail(err: Error): void {
    this.failed ??= err;
    const r = this.reject;
    this.resolve = this.reject = null;
    r?.(err);
  }
  /** The client shut its side down: what it sent before still counts (it may have pipelined its options). */
  end(err: Error): void {
    this.ended ??= err;
    this.wake();
  }
  read(n: number): Promise<Buffer> {
    if (this.failed) return Promise.reject(this.failed);
    this.want = n;
    return new Promise((resolve, reject) => {
      this.resolve = resolve;
      this.reject = reject;
      this.wake();
      this.regulate();
    });
  }
  /** Drops the next `n` bytes without holding them. */
  skip(n: number): Promise<void> {
    const now = Math.min(n, this.size);
    this.take(now);
    this.skipping = n - now;
    return this.read(0).then(() => undefined);
  }
  /** Everything received and not read yet; it no longer counts here (the caller counts it). */
  rest(): Buffer {
    return this.take(this.size);
  }
  get hasEnded(): boolean {
    return this.ended !== null;
  }
  /** Throws what failed the reader (the client's end, a socket error), if anything did. */
  check(): void {
    if (this.failed) throw this.failed;
  }
  /** Gives back what is held, and leaves the socket flowing (the handshake is over, one way or another). */
  close(): void {
    this.take(this.size);
    if (this.waiter) this.budget?.cancel(this.waiter);
    this.waiter = null;
    this.failed ??= new ProtocolError("handshake over");
    if (this.paused) {
      this.paused = false;
      this.flow?.resume();
    }
  }
  private take(n: number): Buffer {
    let out: Buffer;
    const first = this.chunks[0];
    if (n === 0) out = Buffer.alloc(0);
    else if (first && first.length >= n) {
      out = first.subarray(0, n);
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
    } else {
      const all = Buffer.concat(this.chunks);
      out = all.subarray(0, n);
      this.chunks = all.length > n ? [all.subarray(n)] : [];
    }
    this.size -= n;
    this.budget?.unbuffer(n);
    return out;
  }
  private wake(): void {
    if (!this.resolve) return;
    if (this.skipping > 0 || this.size < this.want) {
      if (this.ended) this.fail(this.ended);
      return;
    }
    const out = this.take(this.want);
    this.want = 0;
    const r = this.resolve;
    this.resolve = this.reject = null;
    r(out);
  }
  /** Pauses the socket while the client is far ahead, or holds more than a little while memory is short. */
  regulate(): void {
    if (!this.flow || this.failed) return;
    const ahead = this.size > this.want + READ_AHEAD;
    const short = this.size > SMALL_HANDSHAKE && this.budget !== null && this.budget.exhausted;
    if (short && !this.waiter) {
      this.waiter = this.budget!.wait(0, () => {
        this.waiter = null;
        queueMicrotask(() => this.regulate());
      });
    }
    if ((ahead || short) !== this.paused) {
      this.paused = ahead || short;
      if (this.paused) this.flow.pause();
      else this.flow.resume();
    }
  }
}

/**
 * Fixed-newstyle negotiation, from the server's greeting to the start of transmission.
 * Resolves with the chosen export, or null when the client aborted or asked for an export that
 * does not exist through NBD_OPT_EXPORT_NAME (which has no error reply). Throws ProtocolError on
 * anything that leaves no way to go on (unknown client flags, bad magic, oversized option, a failed
 * TLS handshake, NBD_OPT_EXPORT_NAME before TLS in require mode). `onUpgrade` gets the TLS socket
 * the moment NBD_OPT_STARTTLS is accepted, so the caller can close the right socket on a timeout.
 */
export async function negotiate(
  socket: Socket,
  exports: ExportDirectory,
  log: Logger,
  tlsConfig: HandshakeTls | null = null,
  onUpgrade?: (s: tls.TLSSocket) => void,
  budget: MemoryBudget | null = null,
): Promise<Negotiated | null> {
  const reader = new ByteReader(budget);
  reader.flow = socket;
  let current = socket;
  const onData = (c: Buffer) => reader.push(c);
  const onEnd = () => reader.end(new ProtocolError("client closed the connection during the handshake"));
  const onClose = () => reader.fail(new ProtocolError("client closed the connection during the handshake"));
  const onError = (err: Error) => reader.fail(new ProtocolError(`${current === socket ? "socket" : "TLS"} error during the handshake: ${err.message}`));
  const attach = (s: Socket) => {
    s.on("data", onData);
    s.on("end", onEnd);
    s.on("close", onClose);
    s.on("error", onError);
  };
  const detach = (s: Socket) => {
    s.off("data", onData);
    s.off("end", onEnd);
    s.off("close", onClose);
    s.off("error", onError);
  };
  attach(socket);
  const startTls = async (): Promise<Socket> => {
    if (reader.rest().length) throw new ProtocolError("client sent bytes after NBD_OPT_STARTTLS before the server's reply");
    detach(socket);
    // Synchronously after the ACK: the client starts the TLS handshake only once it has the ACK,
    // so no byte of it can have been read as plain data.
    const options = tlsConfig!.options;
    let pskIdentity: string | undefined; // accepted
    let unknownIdentity: string | undefined;
    const psk = options.pskCallback;
    const withPsk = (s: tls.TLSSocket, id: string) => {
      const key = psk!(s, id);
      if (key) pskIdentity = id;
      else unknownIdentity = id;
      return key;
    };
    const t = tlsConfig!.wrap(socket, psk ? { ...options, pskCallback: withPsk } : options);
    current = t;
    reader.flow = t;
    attach(t);
    onUpgrade?.(t);
    await new Promise<void>((resolve, reject) => {
      const done = (err?: Error) => {
        t.off("secure", ok);
        t.off("error", failed);
        t.off("close", closed);
        if (err) reject(err);
        else resolve();
      };
      const ok = () => done();
      const failed = (err: Error) =>
        done(new ProtocolError(`TLS handshake failed: ${unknownIdentity !== undefined && !pskIdentity ? `unknown PSK identity "${unknownIdentity}"; ` : ""}${err.message.trim()}`));
      const closed = () => done(new ProtocolError("client closed the connection during the TLS handshake"));
      t.once("secure", ok);
      t.once("error", failed);
      t.once("close", closed);
    });
    if (options.requestCert && !pskIdentity) {
      const why = tlsConfig!.certError(t);
      if (why) throw new ProtocolError(`client certificate refused: ${why}`);
    }
    const client = pskIdentity ?? (options.requestCert ? t.getPeerCertificate().subject?.CN : undefined);
    log.info({ protocol: t.getProtocol(), cipher: t.getCipher()?.name, client }, "TLS established");
    return t;
  };
  // Option replies count against the budget until the socket has taken them.
  let queued = 0;
  const write = (s: Socket, b: Buffer) => {
    if (s.destroyed) return;
    budget?.force(b.length);
    queued += b.length;
    s.write(b, () => {
      if (queued === 0) return; // given back at the end already
      queued -= b.length;
      budget?.give(b.length);
    });
  };
  try {
    return await run(socket, reader, exports, log, tlsConfig, startTls, write);
  } finally {
    detach(current);
    reader.close();
    // Replies still queued now are the socket's business (or it is gone): given back at once.
    budget?.give(queued);
    queued = 0;
  }
}

/** Resolves once `s` has taken its queued replies down to MAX_QUEUED_REPLIES, or fails with `reader`. */
function drained(s: Socket, reader: ByteReader): Promise<void> {
  if (s.writableLength <= MAX_QUEUED_REPLIES) return Promise.resolve();
  return new Promise<void>((resolve) => {
    const done = () => {
      s.off("drain", done);
      s.off("close", done);
      resolve();
    };
    s.on("drain", done);
    s.on("close", done);
  }).then(() => reader.check());
}

async function run(
  socket: Socket,
  reader: ByteReader,
  exports: ExportDirectory,
  log: Logger,
  tlsConfig: HandshakeTls | null,
  startTls: () => Promise<Socket>,
  write: (s: Socket, b: Buffer) => void,
): Promise<Negotiated | null> {
  const greeting = Buffer.alloc(18);
  greeting.writeBigUInt64BE(NBD_MAGIC, 0);
  greeting.writeBigUInt64BE(NBD_IHAVEOPT, 8);
  greeting.writeUInt16BE(HandshakeFlag.NBD_FLAG_FIXED_NEWSTYLE | HandshakeFlag.NBD_FLAG_NO_ZEROES, 16);
  write(socket, greeting);

  const clientFlags = (await reader.read(4)).readUInt32BE(0);
  const known = ClientFlag.NBD_FLAG_C_FIXED_NEWSTYLE | ClientFlag.NBD_FLAG_C_NO_ZEROES;
  if (clientFlags & ~known) throw new ProtocolError(`unknown client flags 0x${clientFlags.toString(16)}`);
  // A client without FIXED_NEWSTYLE speaks plain newstyle: NBD_OPT_EXPORT_NAME is all it may send
  // (and it could not read an option reply), as qemu-nbd and nbdkit serve it.
  const fixed = (clientFlags & ClientFlag.NBD_FLAG_C_FIXED_NEWSTYLE) !== 0;
  const noZeroes = (clientFlags & ClientFlag.NBD_FLAG_C_NO_ZEROES) !== 0;

  let structured = false;
  let metaExport: string | null = null; // export the meta context selection was made for
  let allocationSelected = false;
  let depthSelected = false;
  let sock = socket; // the TLS socket once NBD_OPT_STARTTLS succeeded
  let secured = false;
  const requireTls = tlsConfig?.mode === "require";

  const reply = (opt: number, type: number, data: Buffer = Buffer.alloc(0)) => {
    const h = Buffer.allocUnsafe(20);
    h.writeBigUInt64BE(NBD_OPT_REPLY_MAGIC, 0);
    h.writeUInt32BE(opt, 8);
    h.writeUInt32BE(type, 12);
    h.writeUInt32BE(data.length, 16);
    write(sock, data.length ? Buffer.concat([h, data]) : h);
  };
  const replyError = (opt: number, type: number, message: string) => {
    log.debug({ opt, message }, "option refused");
    reply(opt, type, Buffer.from(message, "utf8"));
  };

  for (;;) {
    // A client that sends options without reading the replies gets no more read until it does.
    await drained(sock, reader);
    const head = await reader.read(16);
    const magic = head.readBigUInt64BE(0);
    if (magic !== NBD_IHAVEOPT) throw new ProtocolError(`bad option magic 0x${magic.toString(16)}`);
    const opt = head.readUInt32BE(8);
    const len = head.readUInt32BE(12);
    if (!fixed && opt !== Opt.NBD_OPT_EXPORT_NAME) throw new ProtocolError(`option ${opt} from a client without fixed newstyle (it can only send NBD_OPT_EXPORT_NAME)`);
    if (len > MAX_SKIPPED_OPTION) throw new ProtocolError(`option ${opt} has length ${len}, over the limit of ${MAX_SKIPPED_OPTION}`);
    if (len > MAX_OPTION_LENGTH) {
      // No option we know is this long: its data is dropped as it comes, never held, and it is refused.
      if (opt === Opt.NBD_OPT_EXPORT_NAME) throw new ProtocolError(`NBD_OPT_EXPORT_NAME of ${len} bytes (names are at most ${NBD_MAX_STRING}), which has no error reply`);
      await reader.skip(len);
      log.debug({ opt, len }, "option over 64 KiB skipped");
      if (opt === Opt.NBD_OPT_SET_META_CONTEXT) {
        allocationSelected = depthSelected = false; // a failed SET_META_CONTEXT clears the selection too
        metaExport = null;
      }
      if (requireTls && !secured && opt !== Opt.NBD_OPT_STARTTLS && opt !== Opt.NBD_OPT_ABORT) replyError(opt, Rep.NBD_REP_ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS first");
      else if (KNOWN_OPTIONS.has(opt)) replyError(opt, Rep.NBD_REP_ERR_TOO_BIG, `option ${opt} of ${len} bytes is over the limit of ${MAX_OPTION_LENGTH}`);
      else replyError(opt, Rep.NBD_REP_ERR_UNSUP, `option ${opt} is not supported`);
      continue;
    }
    const data = len ? await reader.read(len) : Buffer.alloc(0);
    log.trace({ opt, len }, "option");

    if (requireTls && !secured && opt !== Opt.NBD_OPT_STARTTLS && opt !== Opt.NBD_OPT_ABORT) {
      if (opt === Opt.NBD_OPT_EXPORT_NAME) {
        // It has no error reply: the spec says to end the session.
        log.info("closing: NBD_OPT_EXPORT_NAME before TLS, and TLS is required");
        return null;
      }
      replyError(opt, Rep.NBD_REP_ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS first");
      continue;
    }

    switch (opt) {
      case Opt.NBD_OPT_STARTTLS:
        if (!tlsConfig) {
          replyError(opt, Rep.NBD_REP_ERR_POLICY, "TLS is not enabled on this server");
          break;
        }
        if (secured) {
          replyError(opt, Rep.NBD_REP_ERR_INVALID, "TLS is already active");
          break;
        }
        if (len !== 0) {
          replyError(opt, Rep.NBD_REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data");
          break;
        }
        reply(opt, Rep.NBD_REP_ACK);
        sock = await startTls();
        secured = true;
        break;
      case Opt.NBD_OPT_EXPORT_NAME: {
        const name = data.toString("utf8");
        const exp = exports.find(name);
        if (!exp) {
          log.info({ export: name }, "closing: NBD_OPT_EXPORT_NAME for an unknown export");
          return null;
        }
        const out = Buffer.alloc(noZeroes ? 10 : 134);
        out.writeBigUInt64BE(BigInt(exp.size()), 0);
        out.writeUInt16BE(exp.transmissionFlags(structured), 8);
        write(sock, out);
        const meta = metaExport === exp.name;
        return { exp, peer: exportOfPeerName(name) !== null, peerSession: sessionOfPeerName(name), structured, allocationContext: meta && allocationSelected ? BASE_ALLOCATION_ID : 0, depthContext: meta && depthSelected ? ALLOCATION_DEPTH_ID : 0, rest: reader.rest(), socket: sock, tls: secured, ended: reader.hasEnded };
      }
      case Opt.NBD_OPT_ABORT:
        reply(opt, Rep.NBD_REP_ACK);
        log.debug("client aborted the handshake");
        return null;
      case Opt.NBD_OPT_LIST: {
        if (len !== 0) {
          replyError(opt, Rep.NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
          break;
        }
        for (const exp of exports.list()) {
          const name = Buffer.from(exp.name, "utf8");
          const desc = Buffer.from(exp.description, "utf8");
          const d = Buffer.allocUnsafe(4 + name.length + desc.length);
          d.writeUInt32BE(name.length, 0);
          name.copy(d, 4);
          desc.copy(d, 4 + name.length);
          reply(opt, Rep.NBD_REP_SERVER, d);
        }
        reply(opt, Rep.NBD_REP_ACK);
        break;
      }
      case Opt.NBD_OPT_INFO:
      case Opt.NBD_OPT_GO: {
        const parsed = parseInfoRequest(data);
        if (typeof parsed === "string") {
          replyError(opt, Rep.NBD_REP_ERR_INVALID, parsed);
          break;
        }
        const exp = exports.find(parsed.name);
        if (!exp) {
          replyError(opt, Rep.NBD_REP_ERR_UNKNOWN, `unknown export "${parsed.name}"`);
          break;
        }
        const info = Buffer.allocUnsafe(12);
        info.writeUInt16BE(Info.NBD_INFO_EXPORT, 0);
        info.writeBigUInt64BE(BigInt(exp.size()), 2);
        info.writeUInt16BE(exp.transmissionFlags(structured), 10);
        reply(opt, Rep.NBD_REP_INFO, info);
        for (const req of new Set(parsed.infos)) {
          if (req === Info.NBD_INFO_NAME || req === Info.NBD_INFO_DESCRIPTION) {
            const s = Buffer.from(req === Info.NBD_INFO_NAME ? exp.name : exp.description, "utf8");
            const d = Buffer.allocUnsafe(2 + s.length);
            d.writeUInt16BE(req, 0);
            s.copy(d, 2);
            reply(opt, Rep.NBD_REP_INFO, d);
          }
        }
        // Block sizes are always sent: clients that did not ask may ignore them.
        const bs = exp.capabilities().blockSize;
        const b = Buffer.allocUnsafe(14);
        b.writeUInt16BE(Info.NBD_INFO_BLOCK_SIZE, 0);
        b.writeUInt32BE(bs.minimum, 2);
        b.writeUInt32BE(bs.preferred, 6);
        b.writeUInt32BE(bs.maximum, 10);
        reply(opt, Rep.NBD_REP_INFO, b);
        reply(opt, Rep.NBD_REP_ACK);
        if (opt === Opt.NBD_OPT_GO) {
          const meta = metaExport === exp.name;
          return { exp, peer: exportOfPeerName(parsed.name) !== null, peerSession: sessionOfPeerName(parsed.name), structured, allocationContext: meta && allocationSelected ? BASE_ALLOCATION_ID : 0, depthContext: meta && depthSelected ? ALLOCATION_DEPTH_ID : 0, rest: reader.rest(), socket: sock, tls: secured, ended: reader.hasEnded };
        }
        break;
      }
      case Opt.NBD_OPT_STRUCTURED_REPLY:
        if (len !== 0) {
          replyError(opt, Rep.NBD_REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data");
          break;
        }
        structured = true;
        reply(opt, Rep.NBD_REP_ACK);
        break;
      case Opt.NBD_OPT_LIST_META_CONTEXT:
      case Opt.NBD_OPT_SET_META_CONTEXT: {
        const set = opt === Opt.NBD_OPT_SET_META_CONTEXT;
        if (set) {
          // The selection is replaced "including when this command fails" (doc/proto.md).
          allocationSelected = depthSelected = false;
          metaExport = null;
        }
        if (set && !structured) {
          replyError(opt, Rep.NBD_REP_ERR_INVALID, "NBD_OPT_SET_META_CONTEXT needs structured replies first");
          break;
        }
        const parsed = parseMetaRequest(data);
        if (typeof parsed === "string") {
          replyError(opt, Rep.NBD_REP_ERR_INVALID, parsed);
          break;
        }
        const exp = exports.find(parsed.name);
        if (!exp) {
          replyError(opt, Rep.NBD_REP_ERR_UNKNOWN, `unknown export "${parsed.name}"`);
          break;
        }
        // A context is offered where the stack answers it; LIST without queries, or with a bare
        // namespace ("base:", "qemu:"), lists every context offered (in that namespace).
        const caps = exp.capabilities();
        const wanted = (context: string) =>
          set ? parsed.queries.includes(context) : parsed.queries.length === 0 || parsed.queries.some((q) => q === context || q === context.slice(0, context.indexOf(":") + 1));
        const allocation = caps.extents && wanted(BASE_ALLOCATION);
        const depth = caps.extents && caps.depth && wanted(ALLOCATION_DEPTH);
        if (set) {
          metaExport = exp.name;
          allocationSelected = allocation;
          depthSelected = depth;
        }
        for (const [context, id, on] of [[BASE_ALLOCATION, BASE_ALLOCATION_ID, allocation], [ALLOCATION_DEPTH, ALLOCATION_DEPTH_ID, depth]] as const) {
          if (!on) continue;
          const n = Buffer.from(context);
          const d = Buffer.allocUnsafe(4 + n.length);
          d.writeUInt32BE(set ? id : 0, 0);
          n.copy(d, 4);
          reply(opt, Rep.NBD_REP_META_CONTEXT, d);
        }
        reply(opt, Rep.NBD_REP_ACK);
        break;
      }
      default:
        replyError(opt, Rep.NBD_REP_ERR_UNSUP, `option ${opt} is not supported`);
    }
  }
}

function parseInfoRequest(d: Buffer): { name: string; infos: number[] } | string {
  if (d.length < 6) return "option data too short";
  const nameLen = d.readUInt32BE(0);
  if (nameLen > NBD_MAX_STRING) return "export name too long";
  if (4 + nameLen + 2 > d.length) return "export name length runs past the option";
  const name = d.toString("utf8", 4, 4 + nameLen);
  const n = d.readUInt16BE(4 + nameLen);
  if (d.length !== 4 + nameLen + 2 + 2 * n) return "information request count does not match the option length";
  const infos: number[] = [];
  for (let i = 0; i < n; i++) infos.push(d.readUInt16BE(4 + nameLen + 2 + 2 * i));
  return { name, infos };
}

function parseMetaRequest(d: Buffer): { name: string; queries: string[] } | string {
  if (d.length < 8) return "option data too short";
  const nameLen = d.readUInt32BE(0);
  if (nameLen > NBD_MAX_STRING) return "export name too long";
  if (4 + nameLen + 4 > d.length) return "export name length runs past the option";
  const name = d.toString("utf8", 4, 4 + nameLen);
  const n = d.readUInt32BE(4 + nameLen);
  let at = 8 + nameLen;
  const queries: string[] = [];
  for (let i = 0; i < n; i++) {
    if (at + 4 > d.length) return "query count runs past the option";
    const ql = d.readUInt32BE(at);
    if (ql > NBD_MAX_STRING || at + 4 + ql > d.length) return "query length runs past the option";
    queries.push(d.toString("utf8", at + 4, at + 4 + ql));
    at += 4 + ql;
  }
  if (at !== d.length) return "trailing bytes after the queries";
  return { name, queries };
}
