import net from "node:net";
import { afterEach, describe, expect, it } from "vitest";
import { NbdClient } from "../client/nbd-client.js";
import { silentLogger } from "../log.js";
import { DiskLayer } from "../stack/disk/disk-layer.js";
import { Export } from "../stack/export.js";
import { PassthroughLayer, type Io, type Layer } from "../stack/layer.js";
import { MemoryPort } from "../stack/port/memory-port.js";
import type { ConnectionLimits } from "./connection.js";
import { ioBuffers } from "../util/buffer-pool.js";
import { MemoryBudget } from "./memory-budget.js";
import { NbdError } from "../errors.js";
import { makeBlock } from "../bench/pattern.js";
import { NbdServer } from "./server.js";

const MiB = 1024 * 1024;

describe("MemoryBudget", () => {
  it("takes what fits, makes the rest wait in order, and lets one oversized reservation through alone", () => {
    const b = new MemoryBudget(10);
    expect(b.take(6)).toBe(true);
    expect(b.take(5)).toBe(false);
    const order: string[] = [];
    b.wait(5, () => order.push("a5"));
    expect(b.take(1)).toBe(false); // fits, but someone waits: no overtaking
    b.wait(1, () => order.push("b1"));
    b.give(6);
    expect(order).toEqual(["a5", "b1"]);
    expect(b.used).toBe(6);
    b.give(6);
    expect(b.take(25)).toBe(true); // larger than the budget, but nothing else is held
    expect(b.take(1)).toBe(false);
    b.wait(1, () => order.push("c1"));
    b.give(25);
    expect(order).toEqual(["a5", "b1", "c1"]);
    expect(b.stats()).toEqual({ limit: 10, used: 1, buffered: 0, cached: 0, peak: 25, waits: 3, waiting: 0 });
  });

  it("counts buffered bytes in what is used, but never lets them hold up a reservation", () => {
    const b = new MemoryBudget(10);
    b.buffer(8);
    expect(b.take(10)).toBe(true); // 10 reserved: fits, though 18 are used
    expect(b.stats()).toMatchObject({ used: 18, buffered: 8, peak: 18 });
    expect(b.take(1)).toBe(false);
    b.give(10);
    b.unbuffer(8);
    expect(b.used).toBe(0);
    expect(() => b.unbuffer(1)).toThrow(/buffered bytes given back/);
  });

  it("forces bytes that are held already, past the limit, and admits nothing until they are back", () => {
    const b = new MemoryBudget(10);
    b.force(12);
    expect(b.exhausted).toBe(true);
    expect(b.take(1)).toBe(false);
    let granted = false;
    const w = b.wait(1, () => (granted = true));
    b.give(2);
    expect(granted).toBe(false);
    b.give(1);
    expect(granted).toBe(true);
    b.give(10);
    const w2 = b.wait(20, () => expect.unreachable());
    b.cancel(w2);
    b.cancel(w); // granted already: nothing happens
    expect(b.stats().waiting).toBe(0);
    expect(() => b.give(1)).toThrow(/given back/);
  });
});

/** Holds every write (and cache request) until opened; counts the payload bytes inside the stack at once. */
class Gate extends PassthroughLayer {
  inside = 0;
  maxInside = 0;
  entered = 0;
  caching = 0;
  maxCaching = 0;
  private released = false;
  private waiters: Array<() => void> = [];
  release(): void {
    this.released = true;
    for (const w of this.waiters.splice(0)) w();
  }
  override async cache(length: number, offset: number, io: Io): Promise<void> {
    this.maxCaching = Math.max(this.maxCaching, ++this.caching);
    try {
      if (!this.released) await new Promise<void>((r) => this.waiters.push(r));
      await super.cache(length, offset, io);
    } finally {
      this.caching--;
    }
  }
  override async pwrite(b: Buffer, o: number, io: Io): Promise<void> {
    this.entered++;
    this.inside += b.length;
    this.maxInside = Math.max(this.maxInside, this.inside);
    try {
      if (!this.released) await new Promise<void>((r) => this.waiters.push(r));
      await super.pwrite(b, o, io);
    } finally {
      this.inside -= b.length;
    }
  }
}

let servers: NbdServer[] = [];
afterEach(async () => {
  await Promise.all(servers.map((s) => s.close(1000)));
  servers = [];
});

async function start<T extends Layer = Layer>(maxMemory: number, top: (l: Layer) => T = (l) => l as T, limits: Partial<ConnectionLimits> = {}) {
  const layer = top(new DiskLayer(new MemoryPort({ size: 64 * MiB })));
  const server = new NbdServer({
    exports: [new Export("mem", layer)],
    tcp: [{ host: "127.0.0.1", port: 0 }],
    log: silentLogger(),
    maxMemory,
    limits,
  });
  await server.start();
  servers.push(server);
  return { server, layer, addr: server.addresses()[0] as { host: string; port: number } };
}

async function until(cond: () => boolean, what: string, ms = 20_000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
async function within<T>(p: Promise<T>, what: string, ms = 10_000): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([p, new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), ms)))]);
  } finally {
    clearTimeout(timer);
  }
}

describe("the process-wide memory budget", () => {
  // Free buffers counted inside the budget were given up whenever it was full, so under a full
  // budget each read made a new buffer while the one given up waited for the garbage collector:
  // the resident set rose by tens of MiB over the budget. First in this file: the pool's cap is the
  // smallest budget of any server the process made.
  it("reuses its buffers under a full budget: 1 MiB reads at QD 8 under 8 MiB make few new ones", async () => {
    const { addr } = await start(8 * MiB);
    const c = await NbdClient.connect(addr, { exportName: "mem" });
    await Promise.all(Array.from({ length: 8 }, (_, i) => c.pread(MiB, i * MiB))); // the pool is warm
    const before = ioBuffers.made;
    let next = 0;
    const worker = async () => {
      while (next < 400) await c.pread(MiB, (next++ % 64) * MiB);
    };
    await Promise.all(Array.from({ length: 8 }, worker));
    expect(ioBuffers.made - before).toBeLessThanOrEqual(8);
    await c.disconnect();
  });

  // Found by the grammar-aware fuzzer: a read as big as the budget waited for nothing to be held,
  // while connections queued behind it held the bytes they had read and not parsed; they give
  // those back only once they get in, after it. Everything stopped.
  it("lets a request as big as the budget in once the reservations are back, whatever unparsed bytes waiting connections hold", async () => {
    const { server, addr, layer: gate } = await start(2 * MiB, (l) => new Gate(l));
    const a = await NbdClient.connect(addr, { exportName: "mem" });
    const held = a.pwrite(Buffer.alloc(MiB, 1), 0); // held in the gate: 1 MiB of the budget
    await until(() => gate.entered === 1, "the first write to be held");
    const b = await NbdClient.connect(addr, { exportName: "mem" });
    const big = b.pread(4 * MiB, 0); // two 1 MiB pieces and the request's own cost: more than the budget, so it waits for nothing else to be held
    await until(() => server.memoryBudget.stats().waiting === 1, "the big read to wait");
    // C sends 64 small writes at once: the first waits behind the big read, the rest of what C
    // sent is read from its socket and held, unparsed.
    const c = await NbdClient.connect(addr, { exportName: "mem" });
    c.socket.cork();
    const small = Array.from({ length: 64 }, (_, i) => c.pwrite(Buffer.alloc(4096, 2), 8 * MiB + i * 4096));
    c.socket.uncork();
    await until(() => server.memoryBudget.stats().waiting === 2, "C to wait behind the big read");
    await sleep(100);
    expect(server.memoryBudget.stats().buffered).toBeGreaterThan(0);
    gate.release();
    await held;
    expect((await within(big, "the big read")).equals(Buffer.concat([Buffer.alloc(MiB, 1), Buffer.alloc(3 * MiB)]))).toBe(true);
    await Promise.all(small);
    for (const x of [a, b, c]) await x.disconnect();
    await until(() => server.connectionCount === 0, "the clients to go");
    expect(server.memoryBudget.used).toBe(0);
  });

  it("holds the write payloads of all connections together under --max-memory, and completes every write once memory is released", async () => {
    const { server, addr, layer: gate } = await start(8 * MiB, (l) => new Gate(l));
    // 6 connections, 8 writes of 1 MiB each, all sent at once: 48 MiB, far below each
    // connection's own caps (128 requests, 128 MiB) but 6 times the process-wide budget.
    const clients = await Promise.all(Array.from({ length: 6 }, () => NbdClient.connect(addr, { exportName: "mem" })));
    const data = (c: number, i: number) => Buffer.alloc(MiB, c * 8 + i + 1);
    const writes = clients.flatMap((c, ci) => Array.from({ length: 8 }, (_, i) => c.pwrite(data(ci, i), (ci * 8 + i) * MiB)));
    await until(() => gate.inside >= 6 * MiB, "the writes to fill the budget");
    await sleep(300); // nothing more may come in while the gate holds them
    expect(gate.maxInside).toBeLessThanOrEqual(8 * MiB);
    const s = server.memoryBudget.stats();
    expect(s.waiting).toBeGreaterThan(0); // the others wait for memory, not for an error
    // Besides the payloads, what each connection had read from its socket when it had to stop.
    expect(s.used).toBeLessThanOrEqual(8 * MiB + 6 * 256 * 1024);
    gate.release();
    await Promise.all(writes); // slowed, never failed
    for (let ci = 0; ci < 6; ci++) for (let i = 0; i < 8; i++) expect((await clients[ci]!.pread(MiB, (ci * 8 + i) * MiB)).equals(data(ci, i))).toBe(true);
    expect(gate.entered).toBe(48);
    await Promise.all(clients.map((c) => c.disconnect()));
    await until(() => server.connectionCount === 0, "the clients to go");
    expect(server.memoryBudget.used).toBe(0);
  });

  // Found by the grammar-aware fuzzer: CACHE and BLOCK_STATUS cost the budget nothing, but the file
  // port read up to 1 MiB (cache) or 8 MiB (block status) per request to answer them: pipelined,
  // they took the server past 600 MiB.
  it("counts what a layer may read to answer CACHE and BLOCK_STATUS: 1 MiB each at most", async () => {
    const { server, addr, layer: gate } = await start(4 * MiB, (l) => new Gate(l));
    const c = await NbdClient.connect(addr, { exportName: "mem" });
    c.socket.cork();
    const caches = Array.from({ length: 16 }, (_, i) => c.cache(8 * MiB, (i % 8) * MiB));
    c.socket.uncork();
    await until(() => gate.caching >= 3, "the cache requests to fill the budget");
    await sleep(300);
    expect(gate.maxCaching).toBe(3); // 1 MiB and the request's own cost each: 3 fit in 4 MiB
    gate.release();
    await Promise.all(caches);
    await c.disconnect();
    await until(() => server.connectionCount === 0, "the client to go");
    expect(server.memoryBudget.used).toBe(0);
  });

  it("counts read replies until a slow reader has taken them: connections that do not read stop being served", async () => {
    const { server, addr } = await start(8 * MiB);
    const socks = await Promise.all(
      Array.from({ length: 4 }, async () => {
        const s = net.connect(addr.port, addr.host);
        s.on("error", () => undefined);
        await new Promise((r) => s.once("connect", r));
        return s;
      }),
    );
    const u32 = (v: number) => Buffer.from([v >>> 24, (v >>> 16) & 255, (v >>> 8) & 255, v & 255]);
    const go = Buffer.concat([Buffer.from("IHAVEOPT"), u32(7), u32(4 + 3 + 2), u32(3), Buffer.from("mem"), Buffer.from([0, 0])]);
    const read = (i: number) => {
      const r = Buffer.alloc(28);
      r.writeUInt32BE(0x25609513, 0);
      r.writeUInt32BE(i, 12);
      r.writeBigUInt64BE(BigInt((i % 64) * MiB), 16);
      r.writeUInt32BE(MiB, 24);
      return r;
    };
    // Each asks for 64 MiB of reads and reads nothing: only what fits in the budget (and in the
    // kernel's socket buffers) is answered.
    for (const s of socks) {
      s.pause();
      s.write(Buffer.concat([u32(3), go, ...Array.from({ length: 64 }, (_, i) => read(i))]));
    }
    await until(() => server.memoryBudget.stats().waiting > 0, "the budget to run out");
    await sleep(300);
    const s = server.memoryBudget.stats();
    expect(s.peak).toBeLessThanOrEqual(8 * MiB + 64 * 1024);
    // Once they read, every read is answered: 64 simple replies of 16 + 1 MiB bytes after the
    // handshake (greeting 18, NBD_INFO_EXPORT 20 + 12, NBD_INFO_BLOCK_SIZE 20 + 14, ACK 20).
    const total = 104 + 64 * (16 + MiB);
    const got = await Promise.all(
      socks.map(
        (sock) =>
          new Promise<number>((resolve) => {
            let n = 0;
            sock.on("data", (d: Buffer) => {
              n += d.length;
              if (n >= total) resolve(n);
            });
            sock.resume();
          }),
      ),
    );
    expect(got).toEqual([total, total, total, total]);
    for (const sock of socks) sock.destroy();
    await until(() => server.connectionCount === 0, "the clients to go");
    expect(server.memoryBudget.used).toBe(0);
  });

  it("stops reading options from a client that does not read their replies, and answers every one once it does", async () => {
    const { server, addr } = await start(8 * MiB, undefined, { handshakeTimeoutMs: 50_000 });
    const s = net.connect(addr.port, addr.host);
    s.on("error", () => undefined);
    await new Promise((r) => s.once("connect", r));
    s.pause();
    // Half a million NBD_OPT_LISTs (8 MiB) and not a byte read: about 25 MiB of replies are due.
    const list = Buffer.concat([Buffer.from("IHAVEOPT"), Buffer.from([0, 0, 0, 3, 0, 0, 0, 0])]);
    const n = 8 * 65536;
    s.write(Buffer.from([0, 0, 0, 3]));
    for (let i = 0; i < n / 4096; i++) s.write(Buffer.concat(Array.from({ length: 4096 }, () => list)));
    await sleep(1000);
    // The server stopped taking options: what the kernel's socket buffers do not hold is still on the client's side.
    expect(s.writableLength).toBeGreaterThan(2 * MiB);
    expect(server.memoryBudget.stats().peak).toBeLessThan(MiB);
    // Each LIST gets NBD_REP_SERVER and NBD_REP_ACK.
    let acks = 0;
    let servers = 0;
    await new Promise<void>((resolve) => {
      let buf = Buffer.alloc(0);
      let at = 0;
      let greeting = 18;
      s.on("data", (d: Buffer) => {
        buf = Buffer.concat([buf.subarray(at), d]);
        at = Math.min(greeting, buf.length);
        greeting -= at;
        while (buf.length - at >= 20 && buf.length - at >= 20 + buf.readUInt32BE(at + 16)) {
          const type = buf.readUInt32BE(at + 12);
          if (type === 1) acks++;
          else if (type === 2) servers++;
          at += 20 + buf.readUInt32BE(at + 16);
        }
        if (acks === n) resolve();
      });
      s.resume();
    });
    expect([acks, servers]).toEqual([n, n]);
    s.destroy();
    await until(() => server.connectionCount === 0, "the client to go");
    expect(server.memoryBudget.used).toBe(0);
  }, 60_000);
});

/** Fails reads and writes that touch [from, to) with EIO; counts the calls and their largest length. */
class Faulty extends PassthroughLayer {
  from = Infinity;
  to = Infinity;
  largest = 0;
  private fails(length: number, offset: number): boolean {
    this.largest = Math.max(this.largest, length);
    return offset < this.to && offset + length > this.from;
  }
  override async pread(b: Buffer, o: number, io: Io): Promise<void> {
    if (this.fails(b.length, o)) throw new NbdError("EIO", "injected read error");
    return super.pread(b, o, io);
  }
  override async pwrite(b: Buffer, o: number, io: Io): Promise<void> {
    if (this.fails(b.length, o)) throw new NbdError("EIO", "injected write error");
    return super.pwrite(b, o, io);
  }
}

/** Self-describing data (the bench's pattern): every 512-byte sector names its offset and seed. */
const pattern = (length: number, seed: number): Buffer => makeBlock(length, 0, 1, seed);

describe("requests over 1 MiB are served in 1 MiB pieces", () => {
  // A 32 MiB request held a 32 MiB buffer (mmapped, all of it written): under hostile clients two
  // or three of them were resident at once, most of the fuzzed server's peak.
  for (const structured of [true, false]) {
    it(`a 32 MiB write and read hold about 2 MiB of the budget and reach the stack 1 MiB at a time (${structured ? "structured" : "simple"} replies)`, async () => {
      const { server, addr, layer } = await start(64 * MiB, (l) => new Faulty(l));
      const c = await NbdClient.connect(addr, { exportName: "mem", structured });
      const data = pattern(32 * MiB, structured ? 1 : 2);
      await c.pwrite(data, 16 * MiB);
      // Small reads beside the big one: their replies must not cut into its reply.
      const small = Array.from({ length: 32 }, (_, i) => c.pread(4096, 16 * MiB + i * 65536 + 512));
      const back = await c.pread(32 * MiB, 16 * MiB);
      expect(back.equals(data)).toBe(true);
      for (const [i, s] of (await Promise.all(small)).entries()) expect(s.equals(data.subarray(i * 65536 + 512, i * 65536 + 512 + 4096))).toBe(true);
      expect(layer.largest).toBe(MiB);
      expect(server.memoryBudget.stats().peak).toBeLessThan(3 * MiB);
      await c.disconnect();
      await until(() => server.connectionCount === 0, "the client to go");
      expect(server.memoryBudget.used).toBe(0);
    });
  }

  it("lets at most two pieces of a write into the stack at once, and takes the rest of its payload as they finish", async () => {
    const { server, addr, layer: gate } = await start(64 * MiB, (l) => new Gate(l));
    const c = await NbdClient.connect(addr, { exportName: "mem" });
    const data = pattern(16 * MiB, 3);
    const w = c.pwrite(data, 0);
    await until(() => gate.entered === 2, "two pieces to enter");
    await sleep(200);
    expect(gate.entered).toBe(2);
    expect(gate.maxInside).toBe(2 * MiB);
    gate.release();
    await w;
    expect(gate.entered).toBe(16);
    expect((await c.pread(16 * MiB, 0)).equals(data)).toBe(true);
    await c.disconnect();
    await until(() => server.connectionCount === 0, "the client to go");
    expect(server.memoryBudget.used).toBe(0);
  });

  it("answers a piece that fails with its error after the whole payload, and the connection goes on", async () => {
    const { server, addr, layer } = await start(64 * MiB, (l) => new Faulty(l));
    const c = await NbdClient.connect(addr, { exportName: "mem" });
    layer.from = 5 * MiB;
    layer.to = 5 * MiB + 1;
    await expect(c.pwrite(pattern(8 * MiB, 4), 0)).rejects.toMatchObject({ errno: "EIO" });
    // Refused before the stack (past the end, flags): the payload is still read, then the error.
    await expect(c.pwrite(pattern(8 * MiB, 5), 60 * MiB)).rejects.toMatchObject({ errno: "ENOSPC" });
    await expect(c.pwrite(pattern(8 * MiB, 5), 0, 0x40 /* REQ_ONE: not for writes */)).rejects.toMatchObject({ errno: "EINVAL" });
    // A structured read failing in its fourth piece: an error chunk ends the reply.
    layer.from = 3 * MiB + 4096;
    await expect(c.pread(8 * MiB, 0)).rejects.toMatchObject({ errno: "EIO" });
    layer.from = layer.to = Infinity;
    const data = pattern(8 * MiB, 6);
    await c.pwrite(data, 0);
    expect((await c.pread(8 * MiB, 0)).equals(data)).toBe(true);
    await c.disconnect();
    await until(() => server.connectionCount === 0, "the client to go");
    expect(server.memoryBudget.used).toBe(0);
  });

  // Found by the grammar-aware fuzzer: a read in pieces waited for the socket to take each piece,
  // so after NBD_CMD_DISC a client that reads nothing kept its connection (and a shutdown) open
  // forever; a whole reply queued in the socket is given 5 s (finish()).
  it("closes a connection whose client sent NBD_CMD_DISC and takes none of a long reply, after 5 s, as it does for queued replies", async () => {
    const { server, addr } = await start(64 * MiB);
    const c = await NbdClient.connect(addr, { exportName: "mem", structured: false });
    c.socket.pause();
    const r = c.pread(32 * MiB, 0).catch(() => "failed");
    void c.request(2 /* DISC */, 0, 0, 0);
    const t0 = Date.now();
    await until(() => server.connectionCount === 0, "the connection to be closed", 15_000);
    expect(Date.now() - t0).toBeGreaterThan(3000);
    c.socket.resume(); // the client sees the close only once it reads
    expect(await r).toBe("failed");
    expect(server.memoryBudget.used).toBe(0);
  }, 30_000);

  it("does not answer a streamed write whose payload the client's end cut short, and gives everything back", async () => {
    const { server, addr } = await start(64 * MiB);
    const c = await NbdClient.connect(addr, { exportName: "mem" });
    let replyBytes = 0;
    c.socket.on("data", (d: Buffer) => (replyBytes += d.length));
    const h = Buffer.alloc(28);
    h.writeUInt32BE(0x25609513, 0);
    h.writeUInt16BE(1, 6); // WRITE
    h.writeUInt32BE(77, 12);
    h.writeUInt32BE(8 * MiB, 24);
    c.socket.write(Buffer.concat([h, Buffer.alloc(3 * MiB + 5, 9)]));
    c.socket.end();
    await until(() => server.connectionCount === 0, "the connection to be closed");
    expect(replyBytes).toBe(0);
    expect(server.memoryBudget.used).toBe(0);
    c.destroy();
  });

  it("with simple replies, a read failing in its first piece gets its error; failing after the header went out, the connection is closed (the spec's only way)", async () => {
    const { server, addr, layer } = await start(64 * MiB, (l) => new Faulty(l));
    const c = await NbdClient.connect(addr, { exportName: "mem", structured: false });
    layer.from = 4096;
    layer.to = 4097;
    await expect(c.pread(8 * MiB, 0)).rejects.toMatchObject({ errno: "EIO" });
    expect((await c.pread(4096, 0)).length).toBe(4096);
    layer.from = layer.to = 3 * MiB;
    layer.to++;
    await expect(c.pread(8 * MiB, 0)).rejects.toThrow();
    await until(() => server.connectionCount === 0, "the connection to be closed");
    expect(server.memoryBudget.used).toBe(0);
    c.destroy();
  });
});
