// A grammar-aware NBD fuzzer: it builds valid conversations (handshake options, then requests) and
// mutates them field by field — magics, option codes, lengths that disagree with the data, nested
// lengths inside NBD_OPT_INFO/GO and the meta-context options, flags on every command, offsets near
// 2^63 and 2^64, zero and huge lengths, write payloads cut short or overlong, noise — and delivers
// them in one piece, frame by frame, split at random or a byte at a time, reading the replies at
// once, late or never, half-closing or leaving the socket open. Every reply is held against
// nbd-oracle.mjs (the spec, and this server's documented choices); a reply that does not come
// within HANG_MS while one is due is a hang. A verifying client writes and reads back its own
// region of the export all along. The server runs as a child process (dist/cli.js), whose peak
// RSS (VmHWM) is measured.
//
// Used by test/fuzz/protocol-fuzz.test.ts (a short pass in the suite) and test/fuzz/run.mjs
// (`npm run fuzz -- --minutes N --seed S`, `--replay FILE`).
import { spawn } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { Cmd, CmdFlag, Judge, Opt, oracle, TFlag } from "./nbd-oracle.mjs";
import { nodeCommandOf } from "../../bench/tools.mjs";

const ROOT = fileURLToPath(new URL("../..", import.meta.url));
export const CLI = process.env.NBDSTACK_FUZZ_CLI ?? path.join(ROOT, "dist/cli.js");
const MiB = 1024 * 1024;
/** No reply for this long while one is due: a hang. Generous: other conversations may hold the memory budget. */
export const HANG_MS = 10_000;
/** Everything owed was answered and the server must close (violation, DISC, the client's end): it must within this. */
export const CLOSE_MS = 10_000;
/** The fuzzed server's --handshake-timeout. */
const HANDSHAKE_TIMEOUT_MS = 5000;
/** The verifying client's region at the start of export "fuzz"; hostile writes never go below it. */
export const VERIFY_BYTES = MiB;

// ---------------------------------------------------------------------------------------------
// Seeded randomness: every decision of conversation N of seed S comes from mix(S, N), so one
// conversation replays alone.

function mix(a, b) {
  let h = (Math.imul(a ^ 0x9e3779b9, 0x85ebca6b) ^ Math.imul(b + 0x7f4a7c15, 0xc2b2ae35)) >>> 0;
  h = Math.imul(h ^ (h >>> 16), 0x85ebca6b) >>> 0;
  h = Math.imul(h ^ (h >>> 13), 0xc2b2ae35) >>> 0;
  return (h ^ (h >>> 16)) >>> 0;
}

export function rng(seed) {
  let a = seed >>> 0 || 1;
  let b = mix(seed, 1);
  let c = mix(seed, 2);
  let d = mix(seed, 3);
  const next = () => {
    // sfc32
    a >>>= 0;
    b >>>= 0;
    c >>>= 0;
    d >>>= 0;
    const t = (((a + b) | 0) + d) | 0;
    d = (d + 1) | 0;
    a = b ^ (b >>> 9);
    b = (c + (c << 3)) | 0;
    c = (c << 21) | (c >>> 11);
    c = (c + t) | 0;
    return (t >>> 0) / 4294967296;
  };
  const R = {
    next,
    int: (n) => Math.floor(next() * n),
    range: (lo, hi) => lo + Math.floor(next() * (hi - lo + 1)),
    chance: (p) => next() < p,
    pick: (arr) => arr[Math.floor(next() * arr.length)],
    weighted(pairs) {
      const total = pairs.reduce((t, [, w]) => t + w, 0);
      let x = next() * total;
      for (const [v, w] of pairs) if ((x -= w) < 0) return v;
      return pairs[pairs.length - 1][0];
    },
    u32: () => Math.floor(next() * 4294967296) >>> 0,
    u64: () => (BigInt(Math.floor(next() * 4294967296)) << 32n) | BigInt(Math.floor(next() * 4294967296)),
    bytes: (n) => Buffer.from(Array.from({ length: n }, () => Math.floor(next() * 256))),
  };
  return R;
}

// ---------------------------------------------------------------------------------------------
// Frames

const u16 = (v) => {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(v & 0xffff);
  return b;
};
const u32 = (v) => {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v >>> 0);
  return b;
};
const str = (s) => Buffer.from(s, "utf8");

function optionFrame(opt, data, lenField = data.length, magic = Buffer.from("IHAVEOPT", "latin1")) {
  return Buffer.concat([magic, u32(opt), u32(lenField), data]);
}
function requestFrame({ magic = 0x25609513, flags, type, cookie, offset, length }) {
  const b = Buffer.alloc(28);
  b.writeUInt32BE(magic >>> 0, 0);
  b.writeUInt16BE(flags & 0xffff, 4);
  b.writeUInt16BE(type & 0xffff, 6);
  b.writeBigUInt64BE(BigInt.asUintN(64, cookie), 8);
  b.writeBigUInt64BE(BigInt.asUintN(64, offset), 16);
  b.writeUInt32BE(length >>> 0, 24);
  return b;
}
/** Write payloads never contain the request magic (0x25…): a misparse cannot look like a request. */
function payload(R, n) {
  const b = Buffer.allocUnsafe(n);
  const base = 0x41 + R.int(20);
  for (let i = 0; i < n; i++) b[i] = base + (i % 7);
  return b;
}

// ---------------------------------------------------------------------------------------------
// The grammar: valid pieces, then mutations of their fields.

const INTERESTING_OFFSETS = (size) => [
  BigInt(size) - 1n,
  BigInt(size),
  BigInt(size) + 1n,
  BigInt(size) - 512n,
  BigInt(size) + 4096n,
  1n << 32n,
  (1n << 53n) - 1n,
  1n << 53n,
  (1n << 53n) + 1n,
  (1n << 63n) - 1n,
  1n << 63n,
  (1n << 63n) + 1n,
  (1n << 64n) - 1n,
  (1n << 64n) - 512n,
];
const INTERESTING_LENGTHS = [0, 1, 511, 512, 4095, 4096, 65536, MiB, 32 * MiB - 1, 32 * MiB, 32 * MiB + 1, 2 ** 31, 2 ** 32 - 1];
const ALL_FLAGS = [CmdFlag.FUA, CmdFlag.NO_HOLE, CmdFlag.DF, CmdFlag.REQ_ONE, CmdFlag.FAST_ZERO, 32, 64, 128, 256, 0x8000, 0xffff];

function exportName(R, env) {
  return R.weighted([
    ["fuzz", 60],
    ["mem", 18],
    ["ro", 10],
    ["", 6],
    [R.pick(["nope", "fuzz/p1", "Fuzz", "fuzz\u0000", "x".repeat(300)]), 6],
  ]);
}

function infoData(R, name, mut) {
  const n = str(name);
  const infos = Array.from({ length: R.int(4) }, () => R.weighted([[1, 3], [2, 3], [3, 3], [0, 1], [R.int(65536), 1]]));
  let nameLen = n.length;
  let count = infos.length;
  let tail = Buffer.concat(infos.map(u16));
  if (mut) {
    switch (R.int(5)) {
      case 0:
        nameLen = R.pick([nameLen + 1, nameLen - 1, nameLen + 2, 0, 4097, 0xffffffff, R.u32()]) >>> 0;
        break;
      case 1:
        count = R.pick([count + 1, count - 1, 0xffff, R.int(65536)]) & 0xffff;
        break;
      case 2:
        tail = tail.subarray(0, Math.max(0, tail.length - 1 - R.int(3)));
        break;
      case 3:
        tail = Buffer.concat([tail, R.bytes(1 + R.int(5))]);
        break;
      default:
        return R.bytes(R.int(12));
    }
  }
  return Buffer.concat([u32(nameLen), n, u16(count), tail]);
}

function metaData(R, name, set, mut) {
  const n = str(name);
  const queries = set
    ? Array.from({ length: R.weighted([[1, 6], [0, 1], [2, 2]]) }, () => R.weighted([["base:allocation", 8], ["qemu:allocation-depth", 3], ["base:", 1], ["qemu:dirty-bitmap:x", 1], ["", 1]]))
    : Array.from({ length: R.int(3) }, () => R.pick(["base:", "base:allocation", "qemu:", "qemu:allocation-depth", "nope:x"]));
  let nameLen = n.length;
  let count = queries.length;
  const qs = queries.map((q) => ({ len: Buffer.byteLength(q), q: str(q) }));
  let extra = Buffer.alloc(0);
  if (mut) {
    switch (R.int(5)) {
      case 0:
        nameLen = R.pick([nameLen + 1, nameLen - 1, 4097, 0xffffffff, R.u32()]) >>> 0;
        break;
      case 1:
        count = R.pick([count + 1, count - 1, 0xffffffff, R.u32()]) >>> 0;
        break;
      case 2:
        if (qs.length) qs[R.int(qs.length)].len = R.pick([qs[0].len + 1, 0, 4097, 0xffffffff]) >>> 0;
        else count = 1;
        break;
      case 3:
        extra = R.bytes(1 + R.int(6));
        break;
      default:
        return R.bytes(R.int(16));
    }
  }
  return Buffer.concat([u32(nameLen), n, u32(count), ...qs.flatMap((x) => [u32(x.len), x.q]), extra]);
}

/** An option frame; with `mut`, one of its fields is wrong. Returns { bytes, desc, mutated }. */
function option(R, env, opt, name, mut) {
  let data;
  switch (opt) {
    case Opt.INFO:
    case Opt.GO:
      data = infoData(R, name, mut && R.chance(0.6));
      break;
    case Opt.LIST_META_CONTEXT:
    case Opt.SET_META_CONTEXT:
      data = metaData(R, name, opt === Opt.SET_META_CONTEXT, mut && R.chance(0.6));
      break;
    case Opt.EXPORT_NAME:
      data = str(name);
      break;
    default:
      data = mut && R.chance(0.3) ? R.bytes(1 + R.int(20)) : Buffer.alloc(0);
  }
  let desc = `option ${opt}${name !== undefined ? ` "${name.slice(0, 20)}"` : ""}`;
  if (!mut || R.chance(0.3)) return { bytes: optionFrame(opt, data), desc, mutated: false };
  switch (R.int(6)) {
    case 0: {
      const m = Buffer.from("IHAVEOPT", "latin1");
      m[R.int(8)] ^= 1 + R.int(255);
      return { bytes: optionFrame(opt, data, data.length, m), desc: `${desc} with a bad magic`, mutated: true };
    }
    case 1: {
      const o = R.pick([0, 4, 11, 12, 0x7fffffff, 0xffffffff, R.u32()]);
      return { bytes: optionFrame(o, data), desc: `option ${o} (was ${opt})`, mutated: true };
    }
    case 2: {
      const len = R.pick([data.length + 1, data.length - 1, data.length + 3, 0, data.length + 28]) >>> 0;
      return { bytes: optionFrame(opt, data, len), desc: `${desc} whose length says ${len} for ${data.length} bytes`, mutated: true };
    }
    case 3: {
      const cut = R.int(data.length + 1);
      return { bytes: optionFrame(opt, data.subarray(0, cut), data.length), desc: `${desc} cut to ${cut} of ${data.length} bytes`, mutated: true };
    }
    default:
      return { bytes: optionFrame(opt, data), desc, mutated: false };
  }
}

function requestFlags(R, type, structured) {
  let f = 0;
  if (R.chance(0.2)) f |= CmdFlag.FUA;
  if (type === Cmd.WRITE_ZEROES) {
    if (R.chance(0.3)) f |= CmdFlag.NO_HOLE;
    if (R.chance(0.2)) f |= CmdFlag.FAST_ZERO;
  }
  if (type === Cmd.READ && structured && R.chance(0.15)) f |= CmdFlag.DF;
  if (type === Cmd.BLOCK_STATUS && R.chance(0.4)) f |= CmdFlag.REQ_ONE;
  return f;
}

/** A request on export `exp` (hostile writes stay above the verifier's region); with `mut`, a field is wrong. */
function request(R, env, exp, structured, cookie, big, mut) {
  const type = R.weighted([
    [Cmd.READ, 28],
    [Cmd.WRITE, 28],
    [Cmd.FLUSH, 7],
    [Cmd.TRIM, 6],
    [Cmd.CACHE, 6],
    [Cmd.WRITE_ZEROES, 10],
    [Cmd.BLOCK_STATUS, 13],
    [8 + R.int(8), 2],
  ]);
  const size = exp ? exp.size : 16 * MiB;
  const low = exp && exp.name === "fuzz" ? VERIFY_BYTES : 0;
  // Big reads cost the fuzzer nothing to send; big writes are kept to 8 MiB (the conversation holds them).
  let length = big ? R.range(1, type === Cmd.WRITE ? 8 : 32) * MiB - (R.chance(0.3) ? R.int(4096) : 0) : R.pick([512, 4096, 4096, 8192, 65536, 131072, 512 * R.range(1, 64)]);
  length = Math.min(length, size - low);
  let offset = BigInt(low + Math.floor(R.next() * (size - low - length + 1)));
  if (R.chance(0.7)) offset -= offset % 512n;
  if (type === Cmd.FLUSH) {
    offset = 0n;
    length = 0;
  }
  let flags = requestFlags(R, type, structured);
  let magic = 0x25609513;
  let data = type === Cmd.WRITE ? payload(R, length) : null;
  let desc = `request type ${type} flags 0x${flags.toString(16)} offset ${offset} length ${length}`;
  let mutated = false;
  if (mut) {
    mutated = true;
    switch (R.int(8)) {
      case 0:
        magic = R.chance(0.5) ? R.u32() : (0x25609513 ^ (1 << R.int(32))) >>> 0;
        desc += " with a bad magic";
        break;
      case 1:
        flags = R.chance(0.5) ? R.pick(ALL_FLAGS) : R.int(65536);
        desc += `, flags changed to 0x${flags.toString(16)}`;
        break;
      case 2:
        offset = R.chance(0.8) ? R.pick(INTERESTING_OFFSETS(size)) : R.u64();
        desc += `, offset changed to ${offset}`;
        break;
      case 3: {
        const l = R.chance(0.8) ? R.pick(INTERESTING_LENGTHS) : R.u32();
        desc += `, length changed to ${l}`;
        length = l;
        if (type === Cmd.WRITE && l <= 8 * MiB && R.chance(0.7)) data = payload(R, l); // a consistent payload, or the old one
        break;
      }
      case 4: {
        const t = R.chance(0.5) ? R.int(16) : R.int(65536);
        desc += `, type changed to ${t}`;
        return { bytes: Buffer.concat([requestFrame({ magic, flags, type: t, cookie, offset, length }), data ?? Buffer.alloc(0)]), desc, mutated, type: t };
      }
      case 5:
        if (data) {
          const cut = R.int(data.length);
          data = data.subarray(0, cut);
          desc += `, payload cut to ${cut} bytes`;
        } else {
          data = payload(R, 1 + R.int(40));
          desc += `, ${data.length} stray bytes after it`;
        }
        break;
      case 6:
        if (data) {
          data = Buffer.concat([data, payload(R, 1 + R.int(64))]);
          desc += `, payload ${data.length - length} bytes too long`;
        } else {
          flags = 0xffff;
          desc += ", every flag set";
        }
        break;
      default:
        mutated = false;
    }
  }
  return { bytes: Buffer.concat([requestFrame({ magic, flags, type, cookie, offset, length }), data ?? Buffer.alloc(0)]), desc, mutated, type };
}

export const KINDS = [
  ["session", 30], // handshake with a few options, then requests; mutations here and there
  ["valid", 12], // the same, never mutated: every reply is checked strictly
  ["handshake", 12], // options only, many of them mutated; ends with ABORT, the client's end, or open
  ["pipeline", 12], // up to 300 requests sent at once, replies read late or never
  ["bigio", 7], // a few reads and writes of up to 32 MiB, pipelined: memory pressure
  ["bytewise", 6], // a small session, one byte per write
  ["plain", 5], // plain newstyle: no fixed-newstyle flag, NBD_OPT_EXPORT_NAME
  ["noise", 5], // random bytes somewhere
  ["longopt", 3], // an option over 64 KiB (skipped) or over 32 MiB (closed)
];

/**
 * Conversation `index` of run `seed`: its frames, how they are delivered, read and ended.
 * Pure data (see conversationToJSON and --replay).
 */
export function generateConversation(seed, index, env, kinds = null) {
  const R = rng(mix(seed, index));
  const kind = R.weighted(kinds ? KINDS.filter(([k]) => kinds.includes(k)) : KINDS);
  const rate = kind === "valid" ? 0 : kind === "handshake" ? 0.4 : R.pick([0.03, 0.08, 0.2]);
  const frames = [];
  const push = (f) => frames.push({ bytes: f.bytes, desc: f.desc, mutated: !!f.mutated });
  let cookie = BigInt(mix(seed, index) >>> 0) << 24n;
  const nextCookie = () => (cookie += 1n + BigInt(R.int(3)));
  const exportsByName = (n) => env.exports.find((e) => e.name === (n === "" ? env.exports[0].name : n)) ?? null;

  // Client flags.
  const flags = kind === "plain" ? R.pick([0, 2]) : R.weighted([[3, 90], [1, 5], [R.pick([0, 2, 4, 0x83, R.u32()]), rate > 0.1 ? 5 : 0]]);
  push({ bytes: u32(flags), desc: `client flags 0x${flags.toString(16)}`, mutated: flags !== 3 && flags !== 1 });

  let structured = false;
  let transmissionExp = null;
  let ended = false;
  if (kind === "plain") {
    const name = R.chance(0.9) ? "fuzz" : exportName(R, env);
    push({ bytes: optionFrame(Opt.EXPORT_NAME, str(name)), desc: `NBD_OPT_EXPORT_NAME "${name}"` });
    transmissionExp = exportsByName(name);
  } else if (kind === "longopt") {
    push({ bytes: optionFrame(Opt.STRUCTURED_REPLY, Buffer.alloc(0)), desc: "NBD_OPT_STRUCTURED_REPLY" });
    const over = R.chance(0.7);
    const opt = R.pick([Opt.INFO, Opt.GO, Opt.LIST, Opt.SET_META_CONTEXT, 4242, Opt.EXPORT_NAME]);
    const len = over ? 64 * 1024 + 1 + R.int(R.chance(0.5) ? 4096 : 2 * MiB) : 32 * MiB + 1 + R.int(1000);
    // Over 32 MiB only the header goes: the server must close without waiting for the data.
    push({ bytes: over ? optionFrame(opt, R.bytes(Math.min(len, 4096)).fill(0x5a), len).subarray(0, 16 + Math.min(len, 4096)) : optionFrame(opt, Buffer.alloc(0), len), desc: `option ${opt} of ${len} bytes`, mutated: true });
    if (over) {
      // The rest of the data, then a LIST that must still be answered.
      const rest = len - Math.min(len, 4096);
      for (let left = rest; left > 0; left -= 1 << 20) push({ bytes: Buffer.alloc(Math.min(left, 1 << 20), 0x5a), desc: "option data" });
      push({ bytes: optionFrame(Opt.LIST, Buffer.alloc(0)), desc: "NBD_OPT_LIST" });
    }
  } else {
    // Options: usually STRUCTURED_REPLY and a meta context first, as libnbd and qemu do.
    if (R.chance(0.85)) {
      push(option(R, env, Opt.STRUCTURED_REPLY, undefined, R.chance(rate)));
      structured = true;
    }
    const n = kind === "handshake" ? R.range(1, 12) : R.int(4);
    for (let i = 0; i < n; i++) {
      const opt = R.weighted([
        [Opt.SET_META_CONTEXT, 4],
        [Opt.LIST_META_CONTEXT, 2],
        [Opt.INFO, 3],
        [Opt.LIST, 2],
        [Opt.STARTTLS, 1],
        [Opt.STRUCTURED_REPLY, 1],
        [R.pick([Opt.PEEK_EXPORT, Opt.EXTENDED_HEADERS, 12, 0, 0x7fffffff]), 1],
      ]);
      const name = opt === Opt.INFO || opt === Opt.SET_META_CONTEXT || opt === Opt.LIST_META_CONTEXT ? (R.chance(0.7) ? "fuzz" : exportName(R, env)) : undefined;
      push(option(R, env, opt, name, R.chance(rate)));
    }
    if (kind === "handshake") {
      const last = R.weighted([["abort", 4], ["go", 3], ["none", 3]]);
      if (last === "abort") push({ bytes: optionFrame(Opt.ABORT, Buffer.alloc(0)), desc: "NBD_OPT_ABORT" });
      if (last === "go") {
        const name = exportName(R, env);
        push(option(R, env, Opt.GO, name, R.chance(rate)));
        transmissionExp = exportsByName(name);
      }
      ended = last !== "go";
    } else {
      const name = R.chance(0.8) ? "fuzz" : exportName(R, env);
      if (R.chance(0.85)) push(option(R, env, Opt.GO, name, R.chance(rate / 2)));
      else push({ bytes: optionFrame(Opt.EXPORT_NAME, str(name)), desc: `NBD_OPT_EXPORT_NAME "${name}"` });
      transmissionExp = exportsByName(name);
    }
  }
  if (!ended && kind !== "longopt") {
    const count = kind === "pipeline" ? R.range(30, 300) : kind === "bigio" ? R.range(2, 6) : kind === "bytewise" ? R.range(1, 4) : kind === "handshake" ? R.int(3) : R.range(1, 25);
    for (let i = 0; i < count; i++) push(request(R, env, transmissionExp, structured, nextCookie(), kind === "bigio", R.chance(rate)));
    if (R.chance(0.35)) push({ bytes: requestFrame({ flags: 0, type: Cmd.DISC, cookie: nextCookie(), offset: 0n, length: 0 }), desc: "NBD_CMD_DISC" });
  }
  if (kind === "noise") {
    // Random bytes at a random frame boundary (often inside the handshake).
    const at = 1 + R.int(frames.length);
    frames.splice(at, 0, { bytes: R.bytes(1 + R.int(200)), desc: "noise", mutated: true });
  }

  const total = frames.reduce((t, f) => t + f.bytes.length, 0);
  const delivery = kind === "bytewise" && total <= 4000 ? "bytewise" : R.weighted([["whole", 4], ["frames", 3], ["random", 3]]);
  let splits = null;
  let pauses = null;
  if (delivery === "random") {
    splits = [];
    pauses = [];
    for (let left = total; left > 0; ) {
      const n = Math.min(left, R.chance(0.5) ? 1 + R.int(40) : 1 + R.int(8192));
      splits.push(n);
      pauses.push(R.chance(0.2) ? R.int(4) : 0);
      left -= n;
    }
  } else if (delivery === "frames") pauses = frames.map(() => (R.chance(0.15) ? R.int(4) : 0));
  const reading = kind === "pipeline" || kind === "bigio" ? R.weighted([["prompt", 3], ["late", 4], ["never", 3]]) : R.weighted([["prompt", 80], ["late", 12], ["never", 8]]);
  return {
    version: 1,
    seed,
    index,
    kind,
    frames,
    delivery,
    splits,
    pauses,
    reading,
    lateMs: R.range(50, 600),
    neverMs: R.range(100, 1200),
    // The client half-closes after its last byte (else it leaves the socket open).
    ends: R.chance(kind === "handshake" ? 0.5 : 0.35),
  };
}

// ---------------------------------------------------------------------------------------------
// One conversation against a live server.

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const immediate = () => new Promise((r) => setImmediate(r));

/**
 * Runs one conversation; resolves { ok, failure?, frames, mutated, bytesSent, answered, options,
 * end, trace }. `logsFor(peer)` returns the server's log lines about that client address.
 */
export async function converse(conv, env, addr, logsFor = null, { hangMs = HANG_MS, closeMs = CLOSE_MS } = {}) {
  const bytes = Buffer.concat(conv.frames.map((f) => f.bytes));
  const plan = oracle(bytes, env, conv.ends);
  const judge = new Judge(plan, 0);
  const sock = net.connect(addr.port, addr.host);
  sock.setNoDelay(true);
  let closed = false;
  let clientClosed = false;
  let lastRx = Date.now();
  let lastTx = Date.now();
  const rx = [];
  let rxBytes = 0;
  const reading = { on: conv.reading === "prompt" };
  const closedP = new Promise((r) => sock.once("close", () => ((closed = true), r())));
  sock.on("error", () => undefined);
  sock.on("data", (d) => {
    lastRx = Date.now();
    if (rxBytes < 4096) rx.push(d.subarray(0, 4096 - rxBytes));
    rxBytes += d.length;
    judge.feed(d);
  });
  if (!reading.on) sock.pause();
  const connected = await new Promise((r) => {
    sock.once("connect", () => r(true));
    sock.once("error", () => r(false));
  });
  if (!connected) return { ok: false, failure: "could not connect to the server", frames: 0 };
  const peer = `127.0.0.1:${sock.localPort}`;
  const connectedAt = Date.now();
  logsFor?.forget(peer);
  let failure = null;
  const fail = (why) => {
    failure ??= why;
  };

  // Deliver.
  let sent = 0;
  let framesSent = 0;
  let mutatedSent = 0;
  const frameEnds = [];
  let acc = 0;
  for (const f of conv.frames) frameEnds.push((acc += f.bytes.length));
  const write = async (chunk) => {
    if (closed || sock.destroyed) return false;
    const ok = sock.write(chunk);
    sent += chunk.length;
    lastTx = Date.now();
    judge.setSent(sent);
    if (!ok) {
      await new Promise((r) => {
        const done = () => {
          sock.off("drain", done);
          sock.off("close", done);
          r();
        };
        sock.on("drain", done);
        sock.on("close", done);
      });
    }
    return !closed;
  };
  const sending = (async () => {
    if (conv.delivery === "whole") await write(bytes);
    else if (conv.delivery === "frames") {
      for (let i = 0; i < conv.frames.length; i++) {
        if (!(await write(conv.frames[i].bytes))) break;
        if (conv.pauses?.[i]) await sleep(conv.pauses[i]);
      }
    } else if (conv.delivery === "bytewise") {
      for (let i = 0; i < bytes.length; i++) {
        if (!(await write(bytes.subarray(i, i + 1)))) break;
        await (i % 97 === 0 ? sleep(1) : immediate());
      }
    } else {
      let at = 0;
      for (let i = 0; i < conv.splits.length; i++) {
        if (!(await write(bytes.subarray(at, at + conv.splits[i])))) break;
        at += conv.splits[i];
        if (conv.pauses[i]) await sleep(conv.pauses[i]);
      }
    }
    for (const e of frameEnds) if (e <= sent) framesSent++;
    for (let i = 0; i < conv.frames.length; i++) if (frameEnds[i] <= sent && conv.frames[i].mutated) mutatedSent++;
    if (conv.ends && !closed && !sock.destroyed) sock.end();
    lastTx = Date.now();
  })();

  const started = Date.now();
  // Reading starts lateMs after the connection (or never, and the client hangs up after neverMs),
  // whether sending is done or not: a server that stops reading our requests while we read nothing
  // is only applying backpressure.
  let sendingDone = false;
  void sending.then(() => (sendingDone = true));
  const lateTimer =
    conv.reading === "late"
      ? setTimeout(() => {
          reading.on = true;
          lastRx = Date.now();
          sock.resume();
        }, conv.lateMs)
      : null;
  const neverTimer =
    conv.reading === "never"
      ? setTimeout(() => {
          clientClosed = !closed;
          sock.destroy();
        }, conv.neverMs)
      : null;
  let doneAt = 0;
  while (!closed && !failure) {
    if (judge.problems.length) break;
    const now = Date.now();
    const due = judge.due();
    if (!reading.on) {
      // Not reading (yet): nothing to judge but the time.
    } else if (due > 0) {
      doneAt = 0;
      if (now - Math.max(lastRx, lastTx) > hangMs) fail(`hang: ${due} replies due, none for ${hangMs} ms (${judge.answered} answered${sendingDone ? "" : `, ${bytes.length - sent} bytes not sent yet`}): ${judge.dueList()}`);
    } else if (sendingDone) {
      doneAt ||= now;
      if (!judge.mustClose()) {
        // Nothing owed and nothing makes the server close: the client ends it.
        clientClosed = true;
        sock.destroy();
        break;
      }
      if (now - doneAt > closeMs) fail(`the server did not close the connection within ${closeMs} ms (${plan.end.why}: ${plan.end.detail})`);
    } else if (now - Math.max(lastRx, lastTx) > hangMs) {
      fail(`the server stopped reading: ${bytes.length - sent} bytes not sent for ${hangMs} ms, and no reply due`);
    }
    if (now - started > 120_000) fail("the conversation took over 2 minutes");
    await sleep(20);
  }
  clearTimeout(lateTimer);
  clearTimeout(neverTimer);
  if (failure || judge.problems.length) sock.destroy();
  await closedP;
  await sending;
  let endWhy = plan.end.why;
  if (!clientClosed && !failure && !judge.problems.length) {
    judge.closed();
    const due = judge.due();
    // The server's handshake timeout (5 s) is its right: a client (this one, when the machine is
    // busy) that takes longer loses the session.
    const timedOut = due > 0 && judge.phase === "handshake" && Date.now() - connectedAt >= HANDSHAKE_TIMEOUT_MS && (await logsFor?.wait(peer, (l) => /^handshake not finished within/.test(l.reason ?? ""), 2000));
    if (timedOut) endWhy = "handshake-timeout";
    else if (due > 0) fail(`the server closed the connection with ${due} replies due (${plan.end.why}: ${plan.end.detail}): ${judge.dueList()}`);
  }
  if (!failure && judge.problems.length) fail(judge.problems.join("; "));
  // A protocol violation must be named in the server's log (the reason it closed).
  if (!failure && !clientClosed && plan.end.why === "violation" && logsFor) {
    // Up to 15 s: on a machine busy with other tests the server's log reaches this process late.
    const line = await logsFor.wait(peer, (l) => /^closing connection/.test(l.msg) && (l.reason ?? "").includes(plan.end.detail), 15_000);
    if (!line) fail(`closed, but the server's log does not say "${plan.end.detail}" for ${peer}: ${JSON.stringify(logsFor.get(peer))}`);
  }
  return {
    ok: !failure,
    failure,
    end: { ...plan.end, why: endWhy },
    frames: framesSent,
    mutated: mutatedSent,
    bytesSent: sent,
    answered: judge.answered,
    options: judge.optionsAnswered,
    trace: failure ? { peer, serverBytes: Buffer.concat(rx).toString("hex"), serverBytesTotal: rxBytes, sent, serverLog: logsFor?.get(peer).map((l) => `${l.msg}${l.reason ? `: ${l.reason}` : ""}`) } : undefined,
  };
}

// ---------------------------------------------------------------------------------------------
// The server under test, and what it logs.

/**
 * Starts `node dist/cli.js serve` on three exports: "mem" (memory, the default export), "fuzz"
 * (a file; the verifier's region at its start) and "ro" (a read-only file). Resolves once it
 * printed its URIs.
 */
export async function startServer({ extraArgs = [], dir = fs.mkdtempSync(path.join(os.tmpdir(), "nbdstack-fuzz-")) } = {}) {
  fs.writeFileSync(path.join(dir, "fuzz.img"), Buffer.alloc(0));
  fs.truncateSync(path.join(dir, "fuzz.img"), 64 * MiB);
  fs.writeFileSync(path.join(dir, "ro.img"), Buffer.alloc(4 * MiB, 0x72));
  const cfg = path.join(dir, "exports.yaml");
  fs.writeFileSync(
    cfg,
    ["exports:", "  - name: mem", "    stack: memory:4M", "  - name: fuzz", "    stack: file:fuzz.img", "  - name: ro", "    stack: file:ro.img", "    read-only: true", ""].join("\n"),
  );
  const [node, ...nodeArgs] = nodeCommandOf(CLI);
  const proc = spawn(node, [...nodeArgs, "serve", "--config", cfg, "--listen", "127.0.0.1:0", "--log-format", "json", "--log-level", "warn", "--handshake-timeout", `${HANDSHAKE_TIMEOUT_MS}ms`, "--control", "127.0.0.1:0", "--token-file", path.join(dir, "token"), ...extraArgs], { stdio: ["ignore", "pipe", "pipe"] });
  const logs = new ServerLogs();
  let out = "";
  proc.stderr.setEncoding("utf8");
  let partial = "";
  proc.stderr.on("data", (d) => {
    partial += d;
    const lines = partial.split("\n");
    partial = lines.pop();
    for (const l of lines) logs.add(l);
  });
  const exited = new Promise((r) => proc.once("exit", (code, signal) => r({ code, signal })));
  const uri = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`server did not start: ${logs.tail()}`)), 20_000);
    proc.stdout.on("data", (d) => {
      out += d;
      const first = out.split("\n").find((l) => l.startsWith("nbd://"));
      if (first && out.includes("control ")) {
        clearTimeout(timer);
        resolve(first);
      }
    });
    void exited.then(({ code }) => reject(new Error(`server exited with ${code}: ${logs.tail()}`)));
  });
  const m = /^nbd:\/\/([^:/]+):(\d+)\//.exec(uri);
  const control = /^control (\S+)$/m.exec(out)[1];
  const addr = { host: m[1], port: Number(m[2]) };
  let peakRss = 0;
  const status = () => {
    try {
      return fs.readFileSync(`/proc/${proc.pid}/status`, "utf8");
    } catch {
      return "";
    }
  };
  const kib = (field) => Number(new RegExp(`^${field}:\\s+(\\d+) kB`, "m").exec(status())?.[1] ?? 0);
  const sampler = setInterval(() => (peakRss = Math.max(peakRss, kib("VmRSS"))), 200);
  return {
    proc,
    addr,
    dir,
    logs,
    exited,
    /** Peak resident set in KiB: the kernel's VmHWM (and our own samples, as a check). */
    peakRssKiB: () => Math.max(kib("VmHWM"), peakRss),
    rssKiB: () => kib("VmRSS"),
    /** The memory budget's gauges from GET /metrics: { limit, used, peak, waiting, waits }. */
    async budget() {
      const text = await (await fetch(`${control}/metrics`)).text();
      const get = (n) => Number(text.split("\n").find((l) => l.startsWith(`nbdstack_memory_budget_${n} `))?.split(" ")[1]);
      return { limit: get("limit_bytes"), used: get("used_bytes"), peak: get("peak_bytes"), waiting: get("waiting"), waits: get("waits_total") };
    },
    async stop() {
      clearInterval(sampler);
      const hwm = Math.max(kib("VmHWM"), peakRss);
      if (proc.exitCode === null && proc.signalCode === null) proc.kill("SIGTERM");
      const r = await exited;
      return { ...r, peakRssKiB: hwm };
    },
  };
}

export class ServerLogs {
  constructor() {
    this.byPeer = new Map();
    /** When each peer address was last taken by a new connection (see forget). */
    this.since = new Map();
    this.errors = [];
    this.recent = [];
  }
  add(line) {
    this.recent.push(line);
    if (this.recent.length > 50) this.recent.shift();
    let l;
    try {
      l = JSON.parse(line);
    } catch {
      this.errors.push(`unparsable log line: ${line}`);
      return;
    }
    if (l.level >= 50) this.errors.push(line);
    const peer = typeof l.peer === "string" ? l.peer : null;
    // A line logged before this address's current connection was made is an earlier connection's
    // from the same port, read late (the server logs why it closes before it closes).
    if (peer && typeof l.time === "number" && l.time < (this.since.get(peer) ?? 0)) return;
    if (peer) {
      if (!this.byPeer.has(peer)) this.byPeer.set(peer, []);
      this.byPeer.get(peer).push(l);
    }
  }
  /**
   * A new connection from `peer` (a port the kernel may have given out before): what was logged
   * for the address so far, and lines logged before now that are still on their way, are not its.
   */
  forget(peer) {
    this.byPeer.delete(peer);
    this.since.set(peer, Date.now());
  }
  get(peer) {
    return this.byPeer.get(peer) ?? [];
  }
  async wait(peer, match, ms) {
    const end = Date.now() + ms;
    for (;;) {
      const found = this.get(peer).find(match);
      if (found || Date.now() > end) return found ?? null;
      await sleep(20);
    }
  }
  tail() {
    return this.recent.slice(-10).join("\n");
  }
}

/** Sizes and transmission flags of the exports, from NBD_OPT_INFO with structured replies (as a client sees them). */
export async function probeEnv(addr) {
  const { NbdClient } = await import(pathToDist("client/nbd-client.js"));
  const exports = [];
  for (const name of ["mem", "fuzz", "ro"]) {
    const c = await NbdClient.connect(addr, { exportName: name });
    exports.push({ name, size: c.size, flags: c.flags, minBlock: c.blockSize.minimum, maxBlock: c.blockSize.maximum, listed: true });
    await c.disconnect();
  }
  if (!(exports[1].flags & TFlag.SEND_DF)) throw new Error("expected the probe to negotiate structured replies");
  return { exports };
}

function pathToDist(rel) {
  return path.join(ROOT, "dist", rel);
}

// ---------------------------------------------------------------------------------------------
// The verifying client: writes its own patterns into [0, VERIFY_BYTES) of "fuzz" and reads them
// back while the fuzzing goes on; a shadow copy says what every byte must be.

export async function startVerifier(addr, seed) {
  const { NbdClient } = await import(pathToDist("client/nbd-client.js"));
  const R = rng(mix(seed, 0x7e51f1e));
  const shadow = Buffer.alloc(VERIFY_BYTES);
  const c = await NbdClient.connect(addr, { exportName: "fuzz" });
  await c.pwrite(shadow, 0); // a known start
  let stop = false;
  let ops = 0;
  let bytes = 0;
  let failure = null;
  let longest = 0;
  const timed = async (what, p) => {
    const t0 = Date.now();
    let timer;
    try {
      return await Promise.race([p, new Promise((_, rej) => (timer = setTimeout(() => rej(new Error(`verifier: ${what} not answered within ${2 * HANG_MS} ms`)), 2 * HANG_MS)))]);
    } finally {
      clearTimeout(timer);
      longest = Math.max(longest, Date.now() - t0);
    }
  };
  const loop = (async () => {
    try {
      while (!stop) {
        const len = R.pick([512, 4096, 16384, 65536, 512 * R.range(1, 100)]);
        const off = R.int((VERIFY_BYTES - len) / 512 + 1) * 512;
        const data = Buffer.alloc(len);
        const tag = ops + 1;
        for (let i = 0; i < len; i += 4) data.writeUInt32BE((tag * 2654435761 + i) >>> 0, i);
        await timed("write", c.pwrite(data, off, R.chance(0.1) ? CmdFlag.FUA : 0));
        data.copy(shadow, off);
        const back = await timed("read", c.pread(len, off));
        if (!back.equals(data)) throw new Error(`verifier: read back ${len} bytes at ${off} differ from what was written (first difference at +${back.findIndex((b, i) => b !== data[i])})`);
        if (R.chance(0.05)) await timed("flush", c.flush());
        if (R.chance(0.05)) {
          const o = R.int(VERIFY_BYTES / 65536) * 65536;
          const whole = await timed("read", c.pread(65536, o));
          if (!whole.equals(shadow.subarray(o, o + 65536))) throw new Error(`verifier: the 64 KiB at ${o} are not what was written there`);
        }
        ops++;
        bytes += 2 * len;
      }
      const all = await timed("final read", c.pread(VERIFY_BYTES, 0));
      if (!all.equals(shadow)) throw new Error(`verifier: the final read of its region differs at ${all.findIndex((b, i) => b !== shadow[i])}`);
      await c.disconnect();
    } catch (err) {
      failure = err.message;
      c.socket.destroy();
    }
  })();
  return {
    async stop() {
      stop = true;
      await loop;
      return { ops, bytes, failure, longestMs: longest };
    },
    get failure() {
      return failure;
    },
  };
}

// ---------------------------------------------------------------------------------------------
// A run: the server, the verifier, and `parallel` conversations at a time.

/**
 * Runs conversations seed:0, seed:1, … until `conversations` ran or `durationMs` passed. Returns
 * the figures and the failures (each a replayable conversation).
 */
export async function runFuzz({ seed, durationMs = Infinity, conversations = Infinity, parallel = 16, serverArgs = [], kinds = null, onProgress = null, progressMs = 30_000, maxFailures = 10 }) {
  const server = await startServer({ extraArgs: serverArgs });
  const failures = [];
  const stats = { seed, conversations: 0, connections: 0, frames: 0, mutatedFrames: 0, bytesSent: 0, requestsAnswered: 0, optionsAnswered: 0, kinds: {}, ends: {} };
  let crashed = null;
  void server.exited.then((r) => (crashed ??= `the server exited (code ${r.code}, signal ${r.signal}): ${server.logs.tail()}`));
  let verifier = null;
  const started = Date.now();
  try {
    const env = await probeEnv(server.addr);
    stats.connections += 3;
    verifier = await startVerifier(server.addr, seed);
    stats.connections += 1;
    let next = 0;
    let lastProgress = Date.now();
    const worker = async () => {
      while (!crashed && failures.length < maxFailures && next < conversations && Date.now() - started < durationMs) {
        const index = next++;
        const conv = generateConversation(seed, index, env, kinds);
        const r = await converse(conv, env, server.addr, server.logs);
        stats.conversations++;
        stats.connections++;
        stats.frames += r.frames;
        stats.mutatedFrames += r.mutated ?? 0;
        stats.bytesSent += r.bytesSent ?? 0;
        stats.requestsAnswered += r.answered ?? 0;
        stats.optionsAnswered += r.options ?? 0;
        stats.kinds[conv.kind] = (stats.kinds[conv.kind] ?? 0) + 1;
        if (r.end) stats.ends[r.end.why] = (stats.ends[r.end.why] ?? 0) + 1;
        if (!r.ok && !crashed) failures.push({ failure: r.failure, conversation: conv, trace: r.trace });
        if (verifier.failure) break;
        if (onProgress && Date.now() - lastProgress >= progressMs) {
          lastProgress = Date.now();
          onProgress({ ...stats, elapsedMs: Date.now() - started, rssKiB: server.rssKiB(), peakRssKiB: server.peakRssKiB(), budget: await server.budget().catch(() => null), failures: failures.length });
        }
      }
    };
    await Promise.all(Array.from({ length: parallel }, worker));
  } finally {
    const v = verifier ? await verifier.stop() : { ops: 0, failure: "the verifier never started" };
    stats.verifier = v;
    if (v.failure) failures.push({ failure: `corruption or verifier error: ${v.failure}` });
    if (crashed) failures.push({ failure: crashed });
    // The server must still serve a new client and shut down cleanly, its budget empty.
    if (!crashed) {
      try {
        const { NbdClient } = await import(pathToDist("client/nbd-client.js"));
        const c = await NbdClient.connect(server.addr, { exportName: "mem", timeoutMs: HANG_MS });
        await c.disconnect();
      } catch (err) {
        failures.push({ failure: `a new client could not connect after the run: ${err.message}` });
      }
    }
    for (const e of server.logs.errors.slice(0, 5)) failures.push({ failure: `the server logged an error: ${e}` });
    stats.budget = await server.budget().catch(() => null);
    const end = await server.stop();
    stats.peakRssKiB = end.peakRssKiB;
    stats.serverExit = { code: end.code, signal: end.signal };
    if (!crashed && end.code !== 0) failures.push({ failure: `the server did not stop cleanly on SIGTERM (code ${end.code}, signal ${end.signal})` });
    stats.elapsedMs = Date.now() - started;
    fs.rmSync(server.dir, { recursive: true, force: true });
  }
  return { stats, failures };
}

/** Replays one saved conversation (a failure's JSON) against a fresh server; resolves with its result. */
export async function replay(conv, { serverArgs = [] } = {}) {
  const server = await startServer({ extraArgs: serverArgs });
  try {
    const env = await probeEnv(server.addr);
    const r = await converse(conv, env, server.addr, server.logs);
    return { ...r, serverLog: server.logs.tail() };
  } finally {
    await server.stop();
    fs.rmSync(server.dir, { recursive: true, force: true });
  }
}

/** A conversation as JSON (frames in hex), to save a failure for --replay. */
export function conversationToJSON(conv) {
  return { ...conv, frames: conv.frames.map((f) => ({ hex: f.bytes.toString("hex"), desc: f.desc, mutated: f.mutated })) };
}

/** The other way round; checks the format. */
export function conversationFromJSON(obj) {
  const conv = obj.conversation ?? obj;
  if (conv.version !== 1 || !Array.isArray(conv.frames)) throw new Error("not a saved fuzz conversation (version 1)");
  return { ...conv, frames: conv.frames.map((f) => ({ bytes: Buffer.from(f.hex, "hex"), desc: f.desc, mutated: f.mutated })) };
}

/** A failure as text: what went wrong, the conversation's frames, and how to replay it. */
export function describeFailure(f, file) {
  const lines = [`FAILURE: ${f.failure}`];
  if (f.conversation) {
    const c = f.conversation;
    lines.push(`  conversation ${c.seed}:${c.index} (${c.kind}; delivery ${c.delivery}, reading ${c.reading}, ${c.ends ? "client half-closes" : "socket left open"})`);
    c.frames.forEach((fr, i) => {
      const h = fr.bytes.subarray(0, 60).toString("hex");
      lines.push(`  ${String(i).padStart(3)} ${fr.mutated ? "*" : " "} ${fr.desc}: ${fr.bytes.length > 60 ? `${h}… (${fr.bytes.length} bytes)` : h}`);
    });
    if (f.trace) lines.push(`  server sent ${f.trace.serverBytesTotal} bytes, first ones: ${f.trace.serverBytes.slice(0, 400)}`);
    if (f.trace?.serverLog?.length) lines.push(`  server log about ${f.trace.peer}: ${f.trace.serverLog.join("; ")}`);
    if (file) lines.push(`  replay: npm run fuzz -- --replay ${file}`);
  }
  return lines.join("\n");
}
