import net from "node:net";
import pino from "pino";
import { afterEach, describe, expect, it } from "vitest";
import { NbdClient } from "../client/nbd-client.js";
import type { NbdError } from "../errors.js";
import { silentLogger, type Logger } from "../log.js";
import { Cmd, CmdFlag, NBD_REQUEST_MAGIC, TransmissionFlag as F } from "../protocol/constants.js";
import { DiskLayer } from "../stack/disk/disk-layer.js";
import { PassthroughLayer, plainIo, type Io, type Layer } from "../stack/layer.js";
import { MemoryPort } from "../stack/port/memory-port.js";
import { Export } from "../stack/export.js";
import type { ConnectionLimits } from "./connection.js";
import { NbdServer } from "./server.js";
import { newPeerSession, peerExportName } from "../internal-exports.js";
import { ioBuffers } from "../util/buffer-pool.js";

const MiB = 1024 * 1024;
let servers: NbdServer[] = [];
afterEach(async () => {
  await Promise.all(servers.map((s) => s.close()));
  servers = [];
});

async function start(opts: { readOnly?: boolean; directReads?: boolean; limits?: Partial<ConnectionLimits>; top?: (l: Layer) => Layer; log?: Logger } = {}) {
  const port = new MemoryPort({ size: 16 * MiB, readOnly: opts.readOnly });
  const disk = new DiskLayer(port);
  const server = new NbdServer({
    exports: [new Export("mem", opts.top ? opts.top(disk) : disk), new Export("second", new DiskLayer(new MemoryPort({ size: MiB })), "the second one")],
    tcp: [{ host: "127.0.0.1", port: 0 }],
    log: opts.log ?? silentLogger(),
    limits: opts.limits,
    directReads: opts.directReads,
  });
  await server.start();
  servers.push(server);
  const a = server.addresses()[0] as { host: string; port: number };
  return { server, port, addr: { host: a.host, port: a.port } };
}

/**
 * Sits on top of an export and watches the requests the server lets into the stack: how many are
 * inside at once, how many payload bytes were inside when another one came in. Requests for which
 * `slow(offset)` holds wait a few event-loop turns, so later ones can overtake them.
 */
class Probe extends PassthroughLayer {
  inside = 0;
  insideBytes = 0;
  maxInside = 0;
  /** Largest number of payload bytes already inside when a request entered. */
  maxBytesAtEntry = 0;
  entered = 0;
  constructor(
    next: Layer,
    private readonly slow: (offset: number) => boolean = () => false,
  ) {
    super(next);
  }
  private async track(len: number, offset: number, go: () => Promise<void>): Promise<void> {
    this.maxBytesAtEntry = Math.max(this.maxBytesAtEntry, this.insideBytes);
    this.entered++;
    this.inside++;
    this.insideBytes += len;
    this.maxInside = Math.max(this.maxInside, this.inside);
    try {
      if (this.slow(offset)) for (let i = 0; i < 3; i++) await new Promise((r) => setImmediate(r));
      await go();
    } finally {
      this.inside--;
      this.insideBytes -= len;
    }
  }
  override pread(b: Buffer, o: number, io: Io) {
    return this.track(b.length, o, () => super.pread(b, o, io));
  }
  override pwrite(b: Buffer, o: number, io: Io) {
    return this.track(b.length, o, () => super.pwrite(b, o, io));
  }
}

/** Every write, read and flush takes `ms` (the disk is slow). */
class Slow extends PassthroughLayer {
  constructor(
    next: Layer,
    private readonly ms: number,
  ) {
    super(next);
  }
  private async later<T>(go: () => Promise<T>): Promise<T> {
    await new Promise((r) => setTimeout(r, this.ms));
    return go();
  }
  override pread(b: Buffer, o: number, io: Io) {
    return this.later(() => super.pread(b, o, io));
  }
  override pwrite(b: Buffer, o: number, io: Io) {
    return this.later(() => super.pwrite(b, o, io));
  }
  override flush(io: Io) {
    return this.later(() => super.flush(io));
  }
}

/** NBD_OPT_GO for export `name`, asking for no information. */
function goFrame(name: string): Buffer {
  const n = Buffer.from(name);
  const d = Buffer.alloc(4 + n.length + 2);
  d.writeUInt32BE(n.length, 0);
  n.copy(d, 4);
  return optionFrame(7, d);
}

/** Resolves once `cond()` holds; polls, and fails with `what` after a generous deadline. */
async function until(cond: () => boolean, what: string, ms = 20_000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

/** Waits for `p`, failing with `what` after a generous deadline. */
async function within<T>(p: Promise<T>, what: string, ms = 20_000): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([p, new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), ms)))]);
  } finally {
    clearTimeout(timer);
  }
}

/** A plain TCP client that keeps every byte the server sends. */
async function rawConnect(addr: { host: string; port: number }) {
  const socket = net.connect(addr.port, addr.host);
  const rx: Buffer[] = [];
  let total = 0;
  socket.on("data", (d: Buffer) => {
    rx.push(d);
    total += d.length;
  });
  socket.on("error", () => undefined);
  const closed = new Promise<void>((r) => socket.once("close", () => r()));
  await new Promise((r) => socket.once("connect", r));
  const received = () => Buffer.concat(rx);
  return {
    socket,
    closed,
    received,
    /** Waits until at least `n` bytes came in; returns all of them. */
    bytes: async (n: number) => {
      await until(() => total >= n, `${n} bytes from the server`);
      return received();
    },
  };
}

function optionFrame(opt: number, data: Buffer, len = data.length): Buffer {
  const h = Buffer.alloc(16);
  h.write("IHAVEOPT", 0, "latin1");
  h.writeUInt32BE(opt, 8);
  h.writeUInt32BE(len, 12);
  return Buffer.concat([h, data]);
}

/** A trace-level logger whose lines the test can wait for. */
function captureLog() {
  const lines: Array<Record<string, unknown>> = [];
  const logger = pino({ level: "trace" }, { write: (l: string) => void lines.push(JSON.parse(l)) });
  return {
    logger,
    lines,
    async waitFor(match: (l: Record<string, any>) => boolean): Promise<Record<string, any>> {
      await until(() => lines.some(match), "a log line");
      return lines.find(match)!;
    },
  };
}

function rawHeader(type: number, flags: number, cookie: number, offset: number, length: number): Buffer {
  const b = Buffer.alloc(28);
  b.writeUInt32BE(NBD_REQUEST_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeUInt32BE(cookie, 12);
  b.writeBigUInt64BE(BigInt(offset), 16);
  b.writeUInt32BE(length, 24);
  return b;
}

describe("NbdServer against the memory port", () => {
  it("advertises truthful transmission flags and block sizes", async () => {
    const { addr } = await start();
    const c = await NbdClient.connect(addr, { exportName: "mem" });
    expect(c.size).toBe(16 * MiB);
    const want = F.NBD_FLAG_HAS_FLAGS | F.NBD_FLAG_SEND_FLUSH | F.NBD_FLAG_SEND_FUA | F.NBD_FLAG_SEND_TRIM | F.NBD_FLAG_SEND_WRITE_ZEROES |
      F.NBD_FLAG_SEND_DF | F.NBD_FLAG_CAN_MULTI_CONN | F.NBD_FLAG_SEND_CACHE | F.NBD_FLAG_SEND_FAST_ZERO;
    expect(c.flags).toBe(want);
    expect(c.flags & F.NBD_FLAG_ROTATIONAL).toBe(0);
    expect(c.blockSize).toEqual({ minimum: 1, preferred: 4096, maximum: 32 * MiB });
    expect(c.allocationContext).toBeGreaterThan(0);
    await c.disconnect();
  });

  it("serves every command and flag, with simple and structured replies", async () => {
    const { addr, port } = await start();
    for (const structured of [true, false]) {
      const c = await NbdClient.connect(addr, { exportName: "mem", structured });
      const data = Buffer.alloc(10000);
      for (let i = 0; i < data.length; i++) data[i] = (i * 13 + (structured ? 1 : 2)) & 0xff;
      await c.pwrite(data, 12345);
      await c.pwrite(data.subarray(0, 100), 1_000_000, CmdFlag.NBD_CMD_FLAG_FUA);
      expect((await c.pread(10000, 12345)).equals(data)).toBe(true);
      expect((await c.pread(100, 1_000_000)).equals(data.subarray(0, 100))).toBe(true);
      await c.zero(1000, 12345 + 10, 0);
      await c.zero(1000, 12345 + 2000, CmdFlag.NBD_CMD_FLAG_NO_HOLE | CmdFlag.NBD_CMD_FLAG_FUA);
      const z = await c.pread(3000, 12345);
      expect(z.subarray(10, 1010).every((b) => b === 0)).toBe(true);
      expect(z.subarray(2000, 3000).every((b) => b === 0)).toBe(true);
      expect(z.subarray(1010, 2000).equals(data.subarray(1010, 2000))).toBe(true);
      await c.zero(MiB, 2 * MiB, CmdFlag.NBD_CMD_FLAG_FAST_ZERO);
      await c.trim(MiB, 4 * MiB);
      await c.cache(MiB, 0);
      await c.flush();
      if (structured) {
        const want = Buffer.from(data.subarray(0, 4096)).fill(0, 10, 1010).fill(0, 2000, 3000);
        expect((await c.pread(4096, 12345, CmdFlag.NBD_CMD_FLAG_DF)).equals(want)).toBe(true);
        const ext = await c.blockStatus(16 * MiB, 0);
        expect(ext.reduce((s, e) => s + e.length, 0)).toBe(16 * MiB);
        expect(ext[0]).toEqual({ length: 65536, flags: 0 });
        expect(ext[1]).toEqual({ length: 983040 - 65536, flags: 3 }); // up to the page written at 1_000_000
        expect(ext[2]).toEqual({ length: 65536, flags: 0 });
        const one = await c.blockStatus(16 * MiB, 0, CmdFlag.NBD_CMD_FLAG_REQ_ONE);
        expect(one).toEqual([{ length: 65536, flags: 0 }]);
      } else {
        await expect(c.blockStatus(4096, 0)).rejects.toMatchObject({ errno: "EINVAL" });
      }
      await c.disconnect();
    }
    expect(port.allocatedBytes()).toBeGreaterThan(0);
  });

  it("sends zero runs of large reads as holes and reassembles them", async () => {
    const { addr } = await start();
    const c = await NbdClient.connect(addr, { exportName: "mem" });
    const block = Buffer.alloc(4096, 0x5a);
    await c.pwrite(block, 8 * MiB + 300 * 1024);
    const got = await c.pread(MiB, 8 * MiB);
    const want = Buffer.alloc(MiB);
    block.copy(want, 300 * 1024);
    expect(got.equals(want)).toBe(true);
    await c.disconnect();
  });

  it("answers out-of-range and bad requests with the spec's errors and keeps the connection", async () => {
    const { addr } = await start();
    const c = await NbdClient.connect(addr, { exportName: "mem" });
    const end = 16 * MiB;
    await expect(c.pread(2, end - 1)).rejects.toMatchObject({ errno: "EINVAL" });
    await expect(c.pwrite(Buffer.alloc(2), end - 1)).rejects.toMatchObject({ errno: "ENOSPC" });
    await expect(c.zero(4096, end)).rejects.toMatchObject({ errno: "ENOSPC" });
    await expect(c.trim(4096, end)).rejects.toMatchObject({ errno: "EINVAL" });
    await expect(c.cache(4096, end)).rejects.toMatchObject({ errno: "EINVAL" });
    await expect(c.blockStatus(4096, end)).rejects.toMatchObject({ errno: "EINVAL" });
    await expect(c.pread(0, 0)).rejects.toMatchObject({ errno: "EINVAL" });
    await expect(c.pread(4096, 2 ** 60)).rejects.toMatchObject({ errno: "EINVAL" });
    await expect(c.pread(33 * MiB, 0)).rejects.toMatchObject({ errno: "EINVAL" });
    await expect(c.request(Cmd.NBD_CMD_READ, 1 << 9, 0, 512)).rejects.toMatchObject({ errno: "EINVAL" });
    await expect(c.request(Cmd.NBD_CMD_WRITE, CmdFlag.NBD_CMD_FLAG_DF, 0, 1, Buffer.alloc(1))).rejects.toMatchObject({ errno: "EINVAL" });
    await expect(c.request(Cmd.NBD_CMD_FLUSH, CmdFlag.NBD_CMD_FLAG_FAST_ZERO, 0, 0)).rejects.toMatchObject({ errno: "EINVAL" });
    await expect(c.request(99, 0, 0, 0)).rejects.toMatchObject({ errno: "EINVAL" });
    // Errors carry a message in structured replies.
    await expect(c.pwrite(Buffer.alloc(2), end - 1)).rejects.toThrow(/beyond the end/);
    // Still usable.
    await c.pwrite(Buffer.from("ok"), 0);
    expect((await c.pread(2, 0)).toString()).toBe("ok");
    await c.disconnect();
  });

  it("refuses writes to a read-only export with EPERM", async () => {
    const { addr } = await start({ readOnly: true });
    const c = await NbdClient.connect(addr, { exportName: "mem" });
    expect(c.flags & F.NBD_FLAG_READ_ONLY).toBeTruthy();
    expect(c.flags & (F.NBD_FLAG_SEND_TRIM | F.NBD_FLAG_SEND_WRITE_ZEROES | F.NBD_FLAG_SEND_FUA | F.NBD_FLAG_SEND_FLUSH)).toBe(0);
    await expect(c.pwrite(Buffer.alloc(512), 0)).rejects.toMatchObject({ errno: "EPERM" });
    await expect(c.zero(512, 0)).rejects.toMatchObject({ errno: "EPERM" });
    await expect(c.trim(512, 0)).rejects.toMatchObject({ errno: "EPERM" });
    expect((await c.pread(512, 0)).every((b) => b === 0)).toBe(true);
    await c.disconnect();
  });

  it("finds named exports, the default export, and refuses unknown ones", async () => {
    const { addr } = await start();
    const d = await NbdClient.connect(addr, { exportName: "" });
    expect(d.size).toBe(16 * MiB);
    await d.disconnect();
    const s = await NbdClient.connect(addr, { exportName: "second" });
    expect(s.size).toBe(MiB);
    await s.disconnect();
    await expect(NbdClient.connect(addr, { exportName: "nope" })).rejects.toThrow(/refused NBD_OPT_GO/);
  });

  it("makes a write on one connection visible on another after flush (multi-conn)", async () => {
    const { addr } = await start();
    const a = await NbdClient.connect(addr, { exportName: "mem" });
    const b = await NbdClient.connect(addr, { exportName: "mem" });
    await a.pwrite(Buffer.from("shared"), 4096);
    await a.flush();
    expect((await b.pread(6, 4096)).toString()).toBe("shared");
    await Promise.all([a.disconnect(), b.disconnect()]);
  });

  for (const directReads of [true, false]) {
    it(`completes many concurrent requests of every size, out of order, past the in-flight cap (${directReads ? "direct reads" : "data events"})`, async () => {
      // Every third write dawdles inside the stack, so later ones overtake it.
      let probe!: Probe;
      const slowAt = new Set<number>();
      const { addr } = await start({ directReads, limits: { maxInflightRequests: 4, maxInflightBytes: 64 * 1024 }, top: (l) => (probe = new Probe(l, (o) => slowAt.has(o))) });
      const c = await NbdClient.connect(addr, { exportName: "mem" });
      const jobs: Promise<void>[] = [];
      const acked: number[] = []; // write indexes in the order their replies came
      let off = 0;
      for (let i = 0; i < 300; i++) {
        // Small payloads, and payloads big enough to be read straight into place; no two overlap.
        const len = i % 5 === 0 ? 100_000 + (i % 10) * 20_000 : 4096 + (i % 7) * 1000;
        const buf = Buffer.alloc(len);
        for (let j = 0; j < len; j += 997) buf[j] = ((i + j) & 0xff) | 1;
        const at = off;
        off += len;
        if (i % 3 === 0) slowAt.add(at);
        jobs.push(
          c.pwrite(buf, at).then(async () => {
            acked.push(i);
            expect((await c.pread(buf.length, at)).equals(buf)).toBe(true);
          }),
        );
      }
      await Promise.all(jobs);
      await c.disconnect();
      expect(probe.entered).toBe(600);
      // Out of order: some write was acknowledged before one sent earlier.
      expect(acked).toHaveLength(300);
      expect(acked.some((v, k) => k > 0 && v < acked[k - 1]!)).toBe(true);
      // The cap was reached and never exceeded: at most 4 requests inside the stack at once, and a
      // request only went in while fewer than 64 KiB of payload were inside.
      expect(probe.maxInside).toBe(4);
      expect(probe.maxBytesAtEntry).toBeLessThan(64 * 1024);
    });
  }

  // Issue 21, finding 1: a zero-length WRITE sent as the last request was answered only once
  // more bytes came (the direct-read path kept a 0-byte payload pending).
  for (const directReads of [true, false]) {
    it(`answers a zero-length WRITE that is the last thing sent (direct reads ${directReads ? "on" : "off"})`, async () => {
      const { addr } = await start({ directReads });
      const c = await NbdClient.connect(addr, { exportName: "mem" });
      const reply = c.request(Cmd.NBD_CMD_WRITE, 0, 0, 0, Buffer.alloc(0)).then(
        () => "ok",
        (e: NbdError) => e.errno,
      );
      const answer = await Promise.race([reply, new Promise((r) => setTimeout(() => r("no reply within 2 s"), 2000))]);
      expect(answer).not.toBe("no reply within 2 s");
      await c.pwrite(Buffer.from("after"), 0);
      expect((await c.pread(5, 0)).toString()).toBe("after");
      await c.disconnect();
    });
  }

  // Found by the grammar-aware fuzzer (issue 21): Node's net.Server ended the write side as soon as
  // the client's end came, so replies to requests still in the stack were dropped. libnbd shuts
  // its write side down right after NBD_CMD_DISC, and the spec says the server MUST handle all
  // outstanding requests.
  for (const disc of [true, false]) {
    it(`answers every request in flight when the client half-closes ${disc ? "after NBD_CMD_DISC" : "without NBD_CMD_DISC"}`, async () => {
      const { addr } = await start({ top: (l) => new Slow(l, 50) });
      const s = await rawConnect(addr);
      const reqs = [rawHeader(Cmd.NBD_CMD_WRITE, CmdFlag.NBD_CMD_FLAG_FUA, 1, 0, 4096), Buffer.alloc(4096, 1), rawHeader(Cmd.NBD_CMD_READ, 0, 2, 0, 512), rawHeader(Cmd.NBD_CMD_FLUSH, 0, 3, 0, 0)];
      s.socket.end(Buffer.concat([Buffer.from([0, 0, 0, 3]), goFrame("mem"), ...reqs, ...(disc ? [rawHeader(Cmd.NBD_CMD_DISC, 0, 4, 0, 0)] : [])]));
      await s.closed;
      const got = s.received();
      // After the greeting and the three option replies of NBD_OPT_GO: 16 + (16 + 512) + 16 bytes.
      const at = got.length - (16 + 16 + 512 + 16);
      expect(got.length).toBe(18 + 32 + 34 + 20 + 16 + 16 + 512 + 16);
      const cookies = [];
      for (let p = at; p < got.length; ) {
        expect(got.readUInt32BE(p)).toBe(0x67446698);
        expect(got.readUInt32BE(p + 4)).toBe(0);
        const cookie = got.readUInt32BE(p + 12);
        cookies.push(cookie);
        p += 16 + (cookie === 2 ? 512 : 0);
      }
      expect(cookies.sort()).toEqual([1, 2, 3]);
    });
  }

  // A WRITE refused for its flags (the grammar-aware fuzzer sends them) never gave its payload
  // buffer back to the pool: each one made a new buffer, and the old ones waited for the collector.
  it("gives the payload buffer of a write refused for its flags back to the pool", async () => {
    const { addr } = await start();
    const s = await rawConnect(addr);
    s.socket.write(Buffer.concat([Buffer.from([0, 0, 0, 3]), goFrame("mem")]));
    let expected = 18 + 32 + 34 + 20;
    await s.bytes(expected);
    const before = ioBuffers.made;
    for (let i = 0; i < 8; i++) {
      s.socket.write(Buffer.concat([rawHeader(Cmd.NBD_CMD_WRITE, CmdFlag.NBD_CMD_FLAG_REQ_ONE, i, 0, 2 * MiB), Buffer.alloc(2 * MiB, i)]));
      const got = await s.bytes((expected += 16));
      expect(got.readUInt32BE(expected - 12)).toBe(22); // EINVAL
    }
    expect(ioBuffers.made - before).toBeLessThanOrEqual(1);
    s.socket.destroy();
  });

  // The handshake failed its reads as soon as the client's end came, even with the options still
  // buffered: a client that pipelined its options, half-closed and then read lost the session.
  it("answers every option sent before the client half-closed, and the session after them", async () => {
    const { addr } = await start();
    const s = await rawConnect(addr);
    const lists = Array.from({ length: 40_000 }, () => optionFrame(3, Buffer.alloc(0)));
    s.socket.pause(); // the replies pile up: the server waits for the client to read them
    s.socket.end(Buffer.concat([Buffer.from([0, 0, 0, 3]), ...lists, goFrame("mem"), rawHeader(Cmd.NBD_CMD_READ, 0, 9, 0, 512)]));
    await new Promise((r) => setTimeout(r, 500));
    s.socket.resume();
    await s.closed;
    const got = s.received();
    let at = 18;
    let acks = 0;
    while (at + 20 <= got.length && got.readBigUInt64BE(at) === 0x3e889045565a9n) {
      if (got.readUInt32BE(at + 12) === 1) acks++;
      at += 20 + got.readUInt32BE(at + 16);
    }
    expect(acks).toBe(40_000 + 1); // every NBD_OPT_LIST and NBD_OPT_GO
    expect(got.length - at).toBe(16 + 512); // and the read
    expect(got.readUInt32BE(at + 12)).toBe(9);
  });

  it("closes only the offending connection on a bad magic, an oversized write or a truncated frame, saying why", async () => {
    const log = captureLog();
    const { addr, server } = await start({ log: log.logger });
    const good = await NbdClient.connect(addr, { exportName: "mem" });
    for (const [bad, msg, reason] of [
      [
        (() => {
          const h = rawHeader(Cmd.NBD_CMD_READ, 0, 1, 0, 512);
          h.writeUInt32BE(0x12345678, 0);
          return h;
        })(),
        "closing connection: protocol violation",
        "bad request magic 0x12345678",
      ],
      [rawHeader(Cmd.NBD_CMD_WRITE, 0, 1, 0, 64 * MiB), "closing connection: protocol violation", `write payload of ${64 * MiB} bytes exceeds the maximum of ${32 * MiB}`],
      [rawHeader(Cmd.NBD_CMD_WRITE, 0, 1, 0, 4096).subarray(0, 17), "closing connection: truncated request frame", undefined],
    ] as const) {
      const victim = await NbdClient.connect(addr, { exportName: "mem" });
      const port = victim.socket.localPort;
      victim.socket.write(bad);
      if (bad.length === 17) victim.socket.end();
      await victim.closed;
      // The server closed it, for this reason (a client may also hang up on a reply it did not ask for).
      await log.waitFor((l) => l.peer === `127.0.0.1:${port}` && l.msg === msg && l.reason === reason);
      await good.pwrite(Buffer.from("still here"), 0);
      expect((await good.pread(10, 0)).toString()).toBe("still here");
    }
    await until(() => server.connectionCount === 1, "only the good connection left");
    await good.disconnect();
  });

  // Issue 21, finding 3: the spec says SET_META_CONTEXT replaces the selection "including when
  // this command fails"; a failed one left base:allocation selected, and BLOCK_STATUS answered.
  it("a failed NBD_OPT_SET_META_CONTEXT clears the earlier selection: BLOCK_STATUS then gets EINVAL", async () => {
    const { addr } = await start();
    const s = await rawConnect(addr);
    await s.bytes(18); // the greeting
    s.socket.write(Buffer.from([0, 0, 0, 3])); // FIXED_NEWSTYLE | NO_ZEROES
    const str = (t: string) => {
      const b = Buffer.from(t);
      const l = Buffer.alloc(4);
      l.writeUInt32BE(b.length);
      return Buffer.concat([l, b]);
    };
    const meta = (name: string) => Buffer.concat([str(name), Buffer.from([0, 0, 0, 1]), str("base:allocation")]);
    s.socket.write(optionFrame(8, Buffer.alloc(0))); // STRUCTURED_REPLY
    s.socket.write(optionFrame(10, meta("mem"))); // SET_META_CONTEXT: selected
    s.socket.write(optionFrame(10, meta("nope"))); // SET_META_CONTEXT for an unknown export: fails
    s.socket.write(optionFrame(7, Buffer.concat([str("mem"), Buffer.from([0, 0])]))); // GO
    // Option replies: magic(8) option(4) type(4) length(4) data; after GO's ACK, transmission.
    let at = 18;
    const types: Array<[number, number]> = [];
    for (;;) {
      const b = await s.bytes(at + 20);
      const len = b.readUInt32BE(at + 16);
      await s.bytes(at + 20 + len);
      const opt = b.readUInt32BE(at + 8);
      const type = b.readUInt32BE(at + 12);
      types.push([opt, type]);
      at += 20 + len;
      if (opt === 7 && type === 1) break;
    }
    expect(types.filter(([o]) => o === 10).map(([, t]) => t >= 0x80000000)).toEqual([false, false, true]); // META_CONTEXT, ACK; then an error
    s.socket.write(rawHeader(Cmd.NBD_CMD_BLOCK_STATUS, 0, 9, 0, 4096));
    const r = await s.bytes(at + 20);
    expect(r.readUInt32BE(at)).toBe(0x668e33ef); // a structured reply chunk
    expect(r.readUInt16BE(at + 6)).toBe((1 << 15) + 1); // NBD_REPLY_TYPE_ERROR, not block status
    const e = await s.bytes(at + 24);
    expect(e.readUInt32BE(at + 20)).toBe(22); // EINVAL
    s.socket.destroy();
  });

  it("drops a client that sends unknown handshake flags, and answers unknown options with ERR_UNSUP", async () => {
    const { addr } = await start();
    const s = await rawConnect(addr);
    await s.bytes(18); // the greeting
    s.socket.write(Buffer.from([0, 0, 0, 0x83])); // FIXED_NEWSTYLE | NO_ZEROES | unknown bit 7
    await s.closed;
    expect(s.received()).toHaveLength(18); // nothing but the greeting was ever sent

    const t = await rawConnect(addr);
    t.socket.write(Buffer.concat([Buffer.from([0, 0, 0, 3]), optionFrame(4242, Buffer.alloc(0))]));
    const unsup = (await t.bytes(18 + 20)).subarray(18);
    expect(unsup.readUInt32BE(8)).toBe(4242);
    expect(unsup.readUInt32BE(12)).toBe(0x80000001); // NBD_REP_ERR_UNSUP
    const msgLen = unsup.readUInt32BE(16);
    expect((await t.bytes(38 + msgLen)).subarray(38).toString()).toMatch(/option 4242 is not supported/);
    // Negotiation goes on: NBD_OPT_ABORT is acknowledged, then the server closes.
    const at = t.received().length;
    t.socket.write(optionFrame(2, Buffer.alloc(0)));
    const ack = (await t.bytes(at + 20)).subarray(at);
    expect([ack.readUInt32BE(8), ack.readUInt32BE(12)]).toEqual([2, 1]); // NBD_OPT_ABORT, NBD_REP_ACK
    await t.closed;
  });

  it("serves a client without the fixed-newstyle flag through NBD_OPT_EXPORT_NAME, and closes it on any other option", async () => {
    const log = captureLog();
    const { addr } = await start({ log: log.logger });
    // Plain newstyle (flags 0): the reply to NBD_OPT_EXPORT_NAME carries the 124 zero bytes.
    const a = await rawConnect(addr);
    a.socket.write(Buffer.concat([Buffer.from([0, 0, 0, 0]), optionFrame(1, Buffer.from("mem")), rawHeader(Cmd.NBD_CMD_READ, 0, 7, 0, 512)]));
    const got = await a.bytes(18 + 134 + 16 + 512);
    expect(got.readBigUInt64BE(18)).toBe(BigInt(16 * MiB));
    expect(got.subarray(18 + 10, 18 + 134).equals(Buffer.alloc(124))).toBe(true);
    expect([got.readUInt32BE(152), got.readUInt32BE(156), got.readUInt32BE(164)]).toEqual([0x67446698, 0, 7]); // a simple reply to the read
    a.socket.destroy();
    // NO_ZEROES alone is honoured too.
    const b = await rawConnect(addr);
    b.socket.write(Buffer.concat([Buffer.from([0, 0, 0, 2]), optionFrame(1, Buffer.from("mem")), rawHeader(Cmd.NBD_CMD_FLUSH, 0, 8, 0, 0)]));
    const gotB = await b.bytes(18 + 10 + 16);
    expect(gotB.readUInt32BE(28)).toBe(0x67446698);
    b.socket.destroy();
    // Any other option: such a client cannot read option replies, so the connection is closed.
    const c = await rawConnect(addr);
    c.socket.write(Buffer.concat([Buffer.from([0, 0, 0, 0]), optionFrame(3, Buffer.alloc(0))]));
    await c.closed;
    expect(c.received()).toHaveLength(18);
    const line = await log.waitFor((l) => l.msg === "closing connection: handshake failed");
    expect(line.reason).toBe("option 3 from a client without fixed newstyle (it can only send NBD_OPT_EXPORT_NAME)");
  });

  it("skips options over 64 KiB without holding them: NBD_REP_ERR_TOO_BIG (known) or ERR_UNSUP (unknown), then goes on; over 32 MiB, or NBD_OPT_EXPORT_NAME, closes", async () => {
    const log = captureLog();
    const { server, addr } = await start({ log: log.logger });
    const t = await rawConnect(addr);
    const reply = async (at: number) => {
      const h = (await t.bytes(at + 20)).subarray(at);
      const len = h.readUInt32BE(16);
      await t.bytes(at + 20 + len);
      return { opt: h.readUInt32BE(8), type: h.readUInt32BE(12), end: at + 20 + len };
    };
    t.socket.write(Buffer.concat([Buffer.from([0, 0, 0, 3]), optionFrame(6, Buffer.alloc(64 * 1024 + 1, 1))]));
    let r = await reply(18);
    expect([r.opt, r.type]).toEqual([6, 0x80000009]); // NBD_OPT_INFO, NBD_REP_ERR_TOO_BIG
    t.socket.write(optionFrame(4242, Buffer.alloc(8 * MiB, 2)));
    r = await reply(r.end);
    expect([r.opt, r.type]).toEqual([4242, 0x80000001]); // NBD_REP_ERR_UNSUP
    expect(server.memoryBudget.stats().peak).toBeLessThan(512 * 1024); // skipped, never held
    t.socket.write(optionFrame(3, Buffer.alloc(0)));
    r = await reply(r.end); // NBD_REP_SERVER "mem"
    r = await reply(r.end); // …"second"
    r = await reply(r.end);
    expect([r.opt, r.type]).toEqual([3, 1]); // NBD_OPT_LIST still answered: NBD_REP_ACK
    // 32 MiB + 1: closed at once, without waiting for the data.
    t.socket.write(optionFrame(4243, Buffer.alloc(0), 32 * MiB + 1));
    await t.closed;
    expect((await log.waitFor((l) => l.msg === "closing connection: handshake failed")).reason).toBe("option 4243 has length 33554433, over the limit of 33554432");
    // NBD_OPT_EXPORT_NAME has no error reply: a name over 64 KiB closes too.
    const u = await rawConnect(addr);
    u.socket.write(Buffer.concat([Buffer.from([0, 0, 0, 3]), optionFrame(1, Buffer.alloc(64 * 1024 + 1, 0x61))]));
    await u.closed;
    expect(u.received()).toHaveLength(18);
  });

  it("stops reading requests while 1 MiB of replies waits for a client that does not read, and goes on when it reads", async () => {
    const log = captureLog();
    let probe!: Probe;
    const { addr } = await start({ log: log.logger, limits: { maxQueuedReplyBytes: MiB, maxInflightRequests: 10_000, maxInflightBytes: 2 * MiB }, top: (l) => (probe = new Probe(l)) });
    const c = await NbdClient.connect(addr, { exportName: "mem" });
    const pattern = Buffer.alloc(8 * MiB);
    for (let i = 0; i < pattern.length; i += 4096) pattern.fill((i >> 12) & 0xff, i, i + 4096);
    await c.pwrite(pattern, 0); // into the stack as 8 pieces of 1 MiB
    c.socket.pause(); // replies pile up on the server's side
    const n = 200; // 100 MiB of replies asked for
    const reads = Array.from({ length: n }, (_, i) => c.pread(512 * 1024, (i % 16) * 512 * 1024));
    const paused = await log.waitFor((l) => l.msg === "pausing the socket" && l.cap === "replies");
    expect(paused.queuedReplyBytes).toBeGreaterThan(MiB);
    // The server stopped taking requests: far fewer than were sent got into the stack (the rest
    // of what it answered sits in the kernel's socket buffers).
    expect(probe.entered).toBeLessThan(8 + n);
    c.socket.resume();
    const got = await Promise.all(reads);
    got.forEach((b, i) => expect(b.equals(pattern.subarray((i % 16) * 512 * 1024, ((i % 16) + 1) * 512 * 1024))).toBe(true));
    expect(probe.entered).toBe(8 + n);
    await log.waitFor((l) => l.msg === "resuming the socket");
    await c.disconnect();
  });

  it("finishes requests in flight before a graceful shutdown, refuses later ones, then refuses new connections", async () => {
    // A gate holds every write inside the stack until the test opens it.
    let open!: () => void;
    const gate = new Promise<void>((r) => (open = r));
    let held = 0;
    class Gate extends PassthroughLayer {
      override async pwrite(b: Buffer, o: number, io: Io) {
        held++;
        await gate;
        return super.pwrite(b, o, io);
      }
    }
    const port = new MemoryPort({ size: 16 * MiB });
    const server = new NbdServer({ exports: [new Export("mem", new DiskLayer(new Gate(port)))], tcp: [{ host: "127.0.0.1", port: 0 }], log: silentLogger() });
    await server.start();
    servers.push(server);
    const a = server.addresses()[0] as { host: string; port: number };
    const c = await NbdClient.connect({ host: a.host, port: a.port }, { exportName: "mem" });
    const writes = Array.from({ length: 50 }, (_, i) => c.pwrite(Buffer.alloc(65536, i + 1), i * 65536));
    await until(() => held === 50, "50 writes held in the stack");
    const closing = server.close();
    const late = c.pwrite(Buffer.alloc(512), 0).then(
      () => "acknowledged",
      (e) => e.errno,
    );
    // Refused at once, while the 50 are still held.
    expect(await late).toBe("ESHUTDOWN");
    open();
    const results = await Promise.allSettled(writes);
    expect(results.every((r) => r.status === "fulfilled")).toBe(true);
    await closing;
    await c.closed;
    const back = Buffer.alloc(65536);
    for (let i = 0; i < 50; i++) {
      await port.pread(back, i * 65536, plainIo);
      expect(back.every((b) => b === i + 1)).toBe(true);
    }
    await expect(NbdClient.connect({ host: a.host, port: a.port }, { exportName: "mem" })).rejects.toThrow();
  });

  it("stops after the grace period even when a request never finishes, closing that connection", async () => {
    let held = 0;
    class Stuck extends PassthroughLayer {
      override pwrite(): Promise<void> {
        held++;
        return new Promise<void>(() => undefined); // a peer that is gone, a stall nobody releases
      }
    }
    const server = new NbdServer({ exports: [new Export("mem", new DiskLayer(new Stuck(new MemoryPort({ size: MiB }))))], tcp: [{ host: "127.0.0.1", port: 0 }], log: silentLogger() });
    await server.start();
    const a = server.addresses()[0] as { host: string; port: number };
    const c = await NbdClient.connect({ host: a.host, port: a.port }, { exportName: "mem" });
    const write = c.pwrite(Buffer.alloc(512), 0).then(
      () => "acknowledged",
      (e) => e.errno,
    );
    await until(() => held === 1, "the write to get stuck");
    await within(server.close(100), "server.close() with a request that never finishes");
    await c.closed;
    expect(await write).toBe("ESHUTDOWN"); // the client's side: the connection went away unanswered
    expect(server.connectionCount).toBe(0);
  });

  it("stops after the grace period when the client of a request that never finishes hangs up during the shutdown", async () => {
    let held = 0;
    class Stuck extends PassthroughLayer {
      override pwrite(): Promise<void> {
        held++;
        return new Promise<void>(() => undefined);
      }
    }
    const server = new NbdServer({ exports: [new Export("mem", new DiskLayer(new Stuck(new MemoryPort({ size: MiB }))))], tcp: [{ host: "127.0.0.1", port: 0 }], log: silentLogger() });
    await server.start();
    const a = server.addresses()[0] as { host: string; port: number };
    const c = await NbdClient.connect({ host: a.host, port: a.port }, { exportName: "mem" });
    void c.pwrite(Buffer.alloc(512), 0).catch(() => undefined);
    await until(() => held === 1, "the write to get stuck");
    const closing = server.close(300);
    c.destroy(); // the client goes during the shutdown; its request is still inside the stack
    await until(() => server.connectionCount === 0, "the server to see the client go");
    await within(closing, "server.close() when the client of a stuck request hung up during it");
  });
});

describe("a peer's link carries the owner epoch it was made at", () => {
  const servers: NbdServer[] = [];
  afterEach(async () => {
    for (const s of servers.splice(0)) await s.close();
  });
  it("marks a peer connection's session with the export's owner epoch at the handshake; other clients get none", async () => {
    const seen: Array<number | null | undefined> = [];
    class Spy extends PassthroughLayer {
      override pwrite(b: Buffer, o: number, io: Io): Promise<void> {
        seen.push(io.session?.peerEpoch);
        return super.pwrite(b, o, io);
      }
    }
    let epoch: number | null = 3;
    const exp = new Export("mem", new DiskLayer(new Spy(new MemoryPort({ size: MiB }))));
    exp.ownerEpoch = () => epoch;
    const server = new NbdServer({ exports: [exp], tcp: [{ host: "127.0.0.1", port: 0 }], log: silentLogger() });
    await server.start();
    servers.push(server);
    const a = server.addresses()[0] as { host: string; port: number };
    const peer = await NbdClient.connect(a, { exportName: peerExportName("mem", newPeerSession()) });
    epoch = 5; // the link keeps the epoch of its handshake
    await peer.pwrite(Buffer.alloc(512, 1), 0);
    epoch = null;
    const toNonOwner = await NbdClient.connect(a, { exportName: peerExportName("mem") });
    await toNonOwner.pwrite(Buffer.alloc(512, 1), 0);
    const client = await NbdClient.connect(a, { exportName: "mem" });
    await client.pwrite(Buffer.alloc(512, 1), 0);
    expect(seen).toEqual([3, null, undefined]);
    for (const c of [peer, toNonOwner, client]) await c.disconnect();
  });
});
