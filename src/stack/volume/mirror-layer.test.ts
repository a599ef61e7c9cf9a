import { pino } from "pino";
import { describe, expect, it } from "vitest";
import { NbdError } from "../../errors.js";
import { seededRandom } from "../fault/rules.js";
import { FaultLayer } from "../fault/fault-layer.js";
import { PassthroughLayer, plainIo, type Io, type Layer } from "../layer.js";
import { MemoryPort } from "../port/memory-port.js";
import { createMirrorLayer, MirrorLayer, type MirrorLayerOptions, type ResyncEvent } from "./mirror-layer.js";

const SIZE = 1 << 20;

async function mirror(n = 2, size = SIZE, opts: MirrorLayerOptions = {}) {
  const ports = Array.from({ length: n }, () => new MemoryPort({ size }));
  const faults = ports.map((p, i) => new FaultLayer(p, { seed: i + 1 }));
  const m = createMirrorLayer(faults, opts);
  await m.open();
  return { ports, faults, m };
}

function pattern(len: number, seed: number): Buffer {
  const b = Buffer.allocUnsafe(len);
  for (let i = 0; i < len; i++) b[i] = (seed * 131 + i * 7) & 0xff || 1;
  return b;
}

async function readAll(l: Layer): Promise<Buffer> {
  const b = Buffer.alloc(l.size());
  await l.pread(b, 0, plainIo);
  return b;
}

/** Captures pino lines as objects. */
function capture() {
  const lines: Array<Record<string, unknown>> = [];
  const log = pino({ level: "trace" }, { write: (s: string) => void lines.push(JSON.parse(s) as Record<string, unknown>) });
  return { log, lines };
}

/** Random writes, zeroes, trims and reads against a flat model, from a seeded generator. */
async function randomIo(m: Layer, model: Buffer, rnd: () => number, ops: number, from = 0, to = model.length): Promise<void> {
  for (let i = 0; i < ops; i++) {
    const off = from + Math.floor(rnd() * (to - from));
    const len = 1 + Math.floor(rnd() * Math.min(to - off, 100_000));
    const k = rnd();
    if (k < 0.45) {
      const data = pattern(len, Math.floor(rnd() * 1000));
      await m.pwrite(data, off, plainIo);
      data.copy(model, off);
    } else if (k < 0.6) {
      await m.zero(len, off, { fua: false, mayTrim: rnd() < 0.5, fast: false });
      model.fill(0, off, off + len);
    } else if (k < 0.7) {
      await m.trim(len, off, plainIo);
      model.fill(0, off, off + len);
    } else {
      const b = Buffer.alloc(len);
      await m.pread(b, off, plainIo);
      if (!b.equals(model.subarray(off, off + len))) throw new Error(`read of ${len} at ${off} differs from the last written data`);
    }
  }
}

class ReadCounter extends PassthroughLayer {
  reads = 0;
  override pread(b: Buffer, o: number, io: Io) {
    this.reads++;
    return super.pread(b, o, io);
  }
}

describe("MirrorLayer", () => {
  it("writes to every leg and spreads reads over the healthy legs", async () => {
    const legs = [new ReadCounter(new MemoryPort({ size: SIZE })), new ReadCounter(new MemoryPort({ size: SIZE * 2 }))];
    const m = new MirrorLayer(legs);
    await m.open();
    expect(m.size()).toBe(SIZE);
    expect(m.describe()).toBe("mirror[memory:1048576, memory:2097152]");
    await m.pwrite(pattern(5000, 3), 1000, plainIo);
    for (const l of legs) {
      const b = Buffer.alloc(5000);
      await l.pread(b, 1000, plainIo);
      expect(b.equals(pattern(5000, 3))).toBe(true);
      l.reads = 0;
    }
    for (let i = 0; i < 10; i++) await m.pread(Buffer.alloc(100), i * 100, plainIo);
    expect(legs[0]!.reads).toBeGreaterThan(0);
    expect(legs[1]!.reads).toBeGreaterThan(0);
    expect(legs[0]!.reads + legs[1]!.reads).toBe(10);
    expect(m.status().legs.map((l) => l.state)).toEqual(["ok", "ok"]);
  });

  it("marks a leg whose writes fail degraded (logged once) and keeps serving the last written data", async () => {
    const { log, lines } = capture();
    const { m, faults } = await mirror(2, SIZE, { log });
    const model = Buffer.alloc(SIZE);
    const rnd = seededRandom(7);
    await randomIo(m, model, rnd, 40);
    faults[1]!.addRule("op=pwrite,errno=EIO");
    await m.pwrite(pattern(4096, 9), 8192, plainIo); // succeeds on leg 0
    pattern(4096, 9).copy(model, 8192);
    await randomIo(m, model, rnd, 150);
    expect((await readAll(m)).equals(model)).toBe(true);
    const s = m.status();
    expect(s.healthy).toBe(1);
    expect(s.legs[0]).toMatchObject({ state: "ok", errors: 0 });
    expect(s.legs[1]).toMatchObject({ state: "degraded", errors: 1 });
    expect(s.legs[1]!.lastError).toMatch(/EIO/);
    expect(faults[1]!.counts.injected).toBe(1); // skipped from then on
    expect(lines.filter((l) => /degraded/.test(String(l.msg)))).toHaveLength(1);
    await m.flush(plainIo);
  });

  it("serves a read that fails on one leg from the other and degrades the failing leg", async () => {
    const { m, faults } = await mirror();
    await m.pwrite(pattern(SIZE, 5), 0, plainIo);
    faults[0]!.addRule("op=pread,errno=EIO");
    for (let i = 0; i < 6; i++) {
      const b = Buffer.alloc(65536);
      await m.pread(b, i * 65536, plainIo);
      expect(b.equals(pattern(SIZE, 5).subarray(i * 65536, (i + 1) * 65536))).toBe(true);
    }
    expect(m.status().legs.map((l) => l.state)).toEqual(["degraded", "ok"]);
    expect(faults[0]!.counts.injected).toBe(1);
  });

  it("fails a request with the legs' error when every leg fails it, and degrades none", async () => {
    const { m, faults } = await mirror();
    await m.pwrite(pattern(4096, 1), 0, plainIo);
    for (const f of faults) f.addRule("op=pwrite,errno=ENOSPC");
    await expect(m.pwrite(pattern(4096, 2), 0, plainIo)).rejects.toMatchObject({ errno: "ENOSPC" });
    expect(m.status().legs.map((l) => [l.state, l.errors])).toEqual([
      ["ok", 1],
      ["ok", 1],
    ]);
    const b = Buffer.alloc(4096);
    await m.pread(b, 0, plainIo); // reads still work
    for (const f of faults) f.addRule("op=pread,errno=EIO");
    await expect(m.pread(b, 0, plainIo)).rejects.toMatchObject({ errno: "EIO" });
    for (const f of faults) f.addRule("op=flush,errno=EIO");
    await expect(m.flush(plainIo)).rejects.toMatchObject({ errno: "EIO" });
    expect(m.status().healthy).toBe(2);
  });

  it("fails once no leg is healthy", async () => {
    const { m, faults } = await mirror(2, SIZE, { degraded: [1] });
    faults[0]!.addRule("op=pread,errno=EIO");
    await expect(m.pread(Buffer.alloc(10), 0, plainIo)).rejects.toMatchObject({ errno: "EIO" });
    expect(m.status().legs[0]!.state).toBe("ok"); // the last healthy leg is never degraded by a failed read
  });

  it("degrades a leg whose flush fails", async () => {
    const { m, faults } = await mirror(3);
    faults[2]!.addRule("op=flush,errno=EIO");
    await m.flush(plainIo);
    expect(m.status().legs.map((l) => l.state)).toEqual(["ok", "ok", "degraded"]);
  });

  it("answers ENOTSUP to a fast zero a leg cannot do fast, without degrading it", async () => {
    class NoFastZero extends PassthroughLayer {
      override zero(l: number, o: number, io: Io) {
        if (io.fast) return Promise.reject(new NbdError("ENOTSUP", "no fast zero"));
        return super.zero(l, o, io);
      }
    }
    const m = new MirrorLayer([new MemoryPort({ size: SIZE }), new NoFastZero(new MemoryPort({ size: SIZE }))]);
    await m.open();
    await expect(m.zero(4096, 0, { fua: false, mayTrim: false, fast: true })).rejects.toMatchObject({ errno: "ENOTSUP" });
    await m.zero(4096, 0, plainIo);
    expect(m.status().healthy).toBe(2);
  });

  it("resyncs a degraded leg online while writers run; then the legs are identical and ok", async () => {
    const size = 4 << 20;
    const { m, faults, ports } = await mirror(2, size, { resyncChunk: 64 << 10, resyncParallel: 4 });
    const model = Buffer.alloc(size);
    await randomIo(m, model, seededRandom(1), 60);
    faults[1]!.addRule("op=pwrite,errno=EIO,once");
    await randomIo(m, model, seededRandom(2), 60);
    expect(m.status().legs[1]!.state).toBe("degraded");
    faults[1]!.clearRules();
    // Make copies and writes overlap: the source's reads and both legs' writes take a little while.
    faults[0]!.addRule("op=pread,delay=0ms..2ms");
    faults[0]!.addRule("op=pwrite,delay=0ms..1ms");
    faults[1]!.addRule("op=pwrite,delay=0ms..2ms");
    faults[1]!.addRule("op=zero,delay=0ms..2ms");

    const progress: ResyncEvent[] = [];
    const events: ResyncEvent[] = [];
    m.on("resync-progress", (p: ResyncEvent) => events.push(p));
    expect(m.canResync(1)).toBeNull();
    let done = false;
    const resync = m.resync(1, { onProgress: (p) => progress.push(p) }).finally(() => (done = true));
    expect(m.status().legs[1]!.state).toBe("resyncing");
    expect(m.canResync(1)).toMatch(/already/);
    // Four writers, each on its own quarter (so each one's model is exact), each checking its reads.
    const quarter = size / 4;
    const writers = [0, 1, 2, 3].map(async (w) => {
      const rnd = seededRandom(100 + w);
      let after = 10;
      while (!done || after-- > 0) await randomIo(m, model, rnd, 1, w * quarter, (w + 1) * quarter);
    });
    await Promise.all([resync, ...writers]);

    expect(m.status().legs.map((l) => l.state)).toEqual(["ok", "ok"]);
    const finished = { done: size, total: size, doneBytes: size, totalBytes: size, dirtyBytes: 0, etaSeconds: 0, failures: 0 };
    expect(m.status().legs[1]!.resync).toEqual({ ...finished, state: "done", rate: expect.any(Number), startedAt: expect.any(Number), finishedAt: expect.any(Number) });
    expect(progress.at(-1)).toEqual({ leg: 1, ...finished, state: "running", rate: expect.any(Number), startedAt: expect.any(Number), finishedAt: null });
    expect(events).toEqual(progress);
    for (let i = 1; i < progress.length; i++) {
      expect(progress[i]!.done).toBeGreaterThan(progress[i - 1]!.done);
      expect(progress[i]!.done + progress[i]!.dirtyBytes).toBeLessThanOrEqual(size); // no copy counted before it completed
    }
    const a = await readAll(ports[0]!);
    const b = await readAll(ports[1]!);
    expect(a.equals(model)).toBe(true);
    expect(b.equals(model)).toBe(true);
  });

  it("lets writes that began before a resync (and skipped the leg) land before copying", async () => {
    const { m, faults, ports } = await mirror(2, SIZE, { degraded: [1] });
    faults[0]!.addRule("op=pwrite,delay=5ms");
    const w = m.pwrite(pattern(4096, 6), 0, plainIo);
    await m.resync(1);
    await w;
    expect((await readAll(ports[1]!)).equals(await readAll(ports[0]!))).toBe(true);
  });

  it("rebuilds a blank leg listed as out of date, zeroing what reads as zero on the source", async () => {
    const size = 1 << 20;
    const good = new MemoryPort({ size });
    const blank = new MemoryPort({ size });
    await blank.pwrite(Buffer.alloc(size, 0xff), 0, plainIo); // stale garbage everywhere
    const m = new MirrorLayer([good, blank], { degraded: [1], resyncChunk: 65536 });
    await m.open();
    expect(m.status().legs[1]).toMatchObject({ state: "degraded", resync: null });
    expect(m.canResync(0)).toMatch(/in sync/);
    expect(m.canResync(5)).toMatch(/no leg/);
    await m.pwrite(pattern(70_000, 4), 300_000, plainIo);
    // Reads go to the healthy leg only.
    expect((await readAll(m)).subarray(0, 1000).every((x) => x === 0)).toBe(true);
    await m.resync(1);
    expect((await readAll(blank)).equals(await readAll(good))).toBe(true);
    expect(blank.allocatedBytes()).toBeLessThan(size); // holes were trimmed, not written
    await expect(m.resync(1)).rejects.toMatchObject({ errno: "EINVAL" });
  });

  it("leaves the leg degraded when its resync cannot write", async () => {
    const { log, lines } = capture();
    const { m, faults } = await mirror(2, SIZE, { log });
    faults[1]!.addRule("op=pwrite,errno=EIO");
    await m.pwrite(pattern(4096, 1), 0, plainIo);
    await expect(m.resync(1)).rejects.toMatchObject({ errno: "EIO" });
    expect(m.status().legs[1]!.state).toBe("degraded");
    expect(lines.some((l) => /resync failed/.test(String(l.msg)))).toBe(true);
  });

  it("retries a chunk whose read fails on every ok leg (after a backoff) and completes the resync", async () => {
    const { m, faults, ports } = await mirror(2, SIZE, { resyncChunk: 65536, degraded: [1] });
    await m.pwrite(pattern(SIZE, 3), 0, plainIo);
    faults[0]!.addRule("op=pread,errno=EIO,once");
    await m.resync(1);
    expect(faults[0]!.counts.injected).toBe(1);
    expect(m.status().legs.map((l) => [l.state, l.errors])).toEqual([
      ["ok", 1], // the last ok leg: counted, not degraded
      ["ok", 0],
    ]);
    expect(m.status().legs[1]!.resync).toMatchObject({ state: "done", failures: 1, doneBytes: SIZE, dirtyBytes: 0 });
    expect((await readAll(ports[1]!)).equals(pattern(SIZE, 3))).toBe(true);
  });

  it("fails the resync when the leg fails a client write meanwhile", async () => {
    const { m, faults } = await mirror(2, 4 << 20, { resyncChunk: 65536, resyncParallel: 1, degraded: [1] });
    faults[0]!.addRule("op=pread,delay=1ms");
    const r = m.resync(1);
    faults[1]!.addRule("op=pwrite,errno=EIO,range=3000000-3100000");
    await m.pwrite(pattern(1000, 1), 3_000_500, plainIo); // succeeds on leg 0
    await expect(r).rejects.toMatchObject({ errno: "EIO" });
    expect(m.status().legs.map((l) => l.state)).toEqual(["ok", "degraded"]);
  });

  it("pauses a resync on quiesce and goes on after resume", async () => {
    const { m, faults, ports } = await mirror(2, 2 << 20, { resyncChunk: 65536, resyncParallel: 2, degraded: [1] });
    await m.pwrite(pattern(2 << 20, 8), 0, plainIo);
    faults[0]!.addRule("op=pread,delay=1ms");
    let started!: () => void;
    const someCopied = new Promise<void>((res) => (started = res));
    const r = m.resync(1, { onProgress: (p) => p.done >= 4 * 65536 && started() });
    await someCopied;
    await m.quiesce();
    const at = m.status().legs[1]!.resync!.done;
    expect(at).toBeGreaterThan(0);
    expect(at).toBeLessThan(2 << 20);
    await new Promise((res) => setTimeout(res, 20));
    expect(m.status().legs[1]!.resync!.done).toBe(at);
    m.resume();
    await r;
    expect((await readAll(ports[1]!)).equals(pattern(2 << 20, 8))).toBe(true);
  });

  it("stops a resync with ESHUTDOWN when the mirror closes, and leaves the leg degraded", async () => {
    const { m, faults } = await mirror(2, 2 << 20, { resyncChunk: 65536, resyncParallel: 2, degraded: [1] });
    faults[0]!.addRule("op=pread,delay=2ms");
    let started!: () => void;
    const someCopied = new Promise<void>((res) => (started = res));
    const r = m.resync(1, { onProgress: () => started() });
    await someCopied;
    await m.close();
    await expect(r).rejects.toMatchObject({ errno: "ESHUTDOWN" });
    expect(m.status().legs[1]).toMatchObject({ state: "degraded", resync: { state: "failed", error: "the mirror was closed during resync" } });
    expect(m.status().legs[1]!.resync!.done).toBeLessThan(2 << 20);
  });

  it("opens with a leg that fails to open as degraded, and opens it again on resync", async () => {
    let fail = true;
    class Flaky extends PassthroughLayer {
      override open() {
        return fail ? Promise.reject(new NbdError("EIO", "disk missing")) : super.open();
      }
    }
    const m = new MirrorLayer([new MemoryPort({ size: SIZE }), new Flaky(new MemoryPort({ size: SIZE }))]);
    await m.open();
    expect(m.status().legs[1]).toMatchObject({ state: "degraded", lastError: "open: disk missing" });
    await m.pwrite(pattern(100, 1), 0, plainIo);
    fail = false;
    await m.resync(1);
    expect(m.status().healthy).toBe(2);
    await m.close();
  });

  it("refuses to open when no leg opens", async () => {
    class Broken extends PassthroughLayer {
      override open() {
        return Promise.reject(new NbdError("EIO", "gone"));
      }
    }
    const m = new MirrorLayer([new Broken(new MemoryPort({ size: 1 })), new Broken(new MemoryPort({ size: 1 }))]);
    await expect(m.open()).rejects.toMatchObject({ errno: "EIO" });
  });
});
