import { afterEach, describe, expect, it, vi } from "vitest";
import { NbdError } from "../errors.js";
import { plainIo, type Layer } from "../stack/layer.js";
import { MemoryPort } from "../stack/port/memory-port.js";
import { seededRandom } from "../stack/fault/rules.js";
import { DirtyBitmap } from "./dirty-bitmap.js";
import { DirtyTracker } from "../stack/port/dirty-tracker.js";
import { RangeLock } from "../util/range-lock.js";
import { CopyAbortedError, Copier, markInitial, type CopyTarget } from "./copier.js";

const KiB = 1024;
const MiB = 1024 * KiB;

describe("DirtyBitmap", () => {
  it("marks whole chunks, takes runs in order and counts bytes up to the device's end", () => {
    const b = new DirtyBitmap(10 * 64 * KiB + 100, 64 * KiB);
    expect(b.chunks).toBe(11);
    b.mark(64 * KiB - 1, 2); // chunks 0 and 1
    b.mark(10 * 64 * KiB, 1); // the short last chunk
    expect(b.dirtyBytes).toBe(2 * 64 * KiB + 100);
    expect(b.take(1 * MiB)).toEqual({ offset: 0, length: 128 * KiB });
    expect(b.take(1 * MiB)).toEqual({ offset: 10 * 64 * KiB, length: 100 });
    expect(b.take(1 * MiB)).toBeNull();
    expect(b.dirtyBytes).toBe(0);
  });

  it("limits runs to maxBytes, wraps around from its cursor and clears only whole chunks", () => {
    const b = new DirtyBitmap(100 * 64 * KiB);
    b.markAll();
    expect(b.take(256 * KiB)).toEqual({ offset: 0, length: 256 * KiB });
    b.clear(10 * 64 * KiB + 1, 3 * 64 * KiB); // chunk 10 partly: stays; 11, 12 cleared; 13 partly: stays
    let total = 256 * KiB;
    const seen: number[] = [];
    for (let r = b.take(10 * MiB); r; r = b.take(10 * MiB)) {
      total += r.length;
      seen.push(r.offset / (64 * KiB));
    }
    expect(total).toBe(98 * 64 * KiB);
    expect(seen).toEqual([4, 13]);
    b.mark(0, 1);
    expect(b.take(MiB)).toEqual({ offset: 0, length: 64 * KiB }); // wrapped around
  });
});

/**
 * A destination that is a memory device, with seeded delays; `failEvery` N fails every N-th call
 * (counted, so the number of failures does not depend on timing), `fail` fails every call.
 */
function target(dev: MemoryPort, random: () => number, failEvery = 0): CopyTarget & { fail: boolean; calls: number } {
  const t = {
    fail: false,
    calls: 0,
    async pwrite(buf: Buffer, offset: number) {
      const n = ++t.calls;
      await new Promise((r) => setTimeout(r, random() * 2));
      if (t.fail || (failEvery && n % failEvery === 0)) throw new NbdError("EIO", "link down");
      await dev.pwrite(Buffer.from(buf), offset, plainIo);
    },
    async zero(length: number, offset: number) {
      const n = ++t.calls;
      await new Promise((r) => setTimeout(r, random() * 2));
      if (t.fail || (failEvery && n % failEvery === 0)) throw new NbdError("EIO", "link down");
      await dev.zero(length, offset, { ...plainIo, mayTrim: false });
    },
    async flush() {},
  };
  return t;
}

async function read(l: Layer): Promise<Buffer> {
  const b = Buffer.alloc(l.size());
  await l.pread(b, 0, plainIo);
  return b;
}

/**
 * Random writes and zeroes of random sizes through `top`, `total` of them over 4 loops (a count,
 * not a time, so a slow machine does the same work); the source is the model.
 */
function writer(top: Layer, random: () => number, total: number): { done: () => boolean; count: () => number; stop: () => Promise<number> } {
  let running = true;
  let n = 0;
  const size = top.size();
  const loops = Array.from({ length: 4 }, async () => {
    while (running && n < total) {
      n++;
      const len = 1 + Math.floor(random() * 200 * KiB);
      const off = Math.floor(random() * (size - len));
      if (random() < 0.15) await top.zero(len, off, { ...plainIo, mayTrim: false });
      else await top.pwrite(Buffer.alloc(len, 1 + Math.floor(random() * 255)), off, plainIo);
      await new Promise((r) => setTimeout(r, random() * 3));
    }
  });
  let finished = false;
  void Promise.all(loops).then(() => (finished = true));
  return {
    done: () => finished,
    count: () => n,
    stop: async () => {
      running = false;
      await Promise.all(loops);
      return n;
    },
  };
}

const yieldToTimers = () => new Promise((r) => setImmediate(r));

describe("live copy: copier + dirty tracker", () => {
  for (const seed of [1, 2, 3]) {
    it(`ends with both sides equal after random concurrent writes (seed ${seed}), retrying failed copies`, async () => {
      const random = seededRandom(seed);
      const size = 8 * MiB + 4096;
      const src = new MemoryPort({ size });
      await src.open();
      for (let i = 0; i < 20; i++) await src.pwrite(Buffer.alloc(100 * KiB, i + 1), Math.floor(random() * (size - 100 * KiB)), plainIo);
      const tracker = new DirtyTracker(src);
      const dst = new MemoryPort({ size });
      await dst.open();
      const bitmap = new DirtyBitmap(size);
      const locks = new RangeLock();
      tracker.track(bitmap, locks);
      await markInitial(src, bitmap, true);
      expect(bitmap.dirtyBytes).toBeLessThan(size / 2); // holes are not copied to a fresh (zero) destination
      const t = target(dst, random, 7);
      const copier = new Copier(src, t, bitmap, locks, { parallel: 8, copyBytes: 256 * KiB, maxFailures: 50, backoffMs: 1 });
      const w = writer(tracker, random, 80);
      // In background mode the copy runs alongside the writes until the writer has done all of them.
      while (!w.done()) {
        await copier.pass(() => w.done());
        await yieldToTimers();
      }
      expect(await w.stop()).toBe(80);
      await copier.pass(); // the final pass: nothing writes any more
      expect(bitmap.dirtyBytes).toBe(0);
      expect((await read(dst)).equals(await read(src))).toBe(true);
      // Every 7th call failed and was retried: the count is exact, whatever the timing.
      expect(copier.progress().failures).toBe(Math.floor(t.calls / 7));
      expect(copier.progress().failures).toBeGreaterThan(0);
    });
  }

  it("write-blocking mode converges while writes go on: once the bitmap is empty the sides stay equal", async () => {
    const random = seededRandom(9);
    const size = 4 * MiB;
    const src = new MemoryPort({ size });
    await src.open();
    await src.pwrite(Buffer.alloc(size, 7), 0, plainIo);
    const tracker = new DirtyTracker(src);
    const dst = new MemoryPort({ size });
    await dst.open();
    const bitmap = new DirtyBitmap(size);
    const locks = new RangeLock();
    const t = target(dst, random);
    tracker.track(bitmap, locks);
    await markInitial(src, bitmap, true);
    tracker.writeThrough(t);
    const w = writer(tracker, random, 1e9);
    const copier = new Copier(src, t, bitmap, locks, { parallel: 4, copyBytes: 128 * KiB });
    await copier.pass(); // returns only when nothing is dirty, though the writer never stopped
    expect(bitmap.dirtyBytes).toBe(0);
    // Twenty more writes after that, each written through: none leaves a chunk dirty.
    const after = w.count() + 20;
    while (w.count() < after) await yieldToTimers();
    await w.stop();
    expect(bitmap.dirtyBytes).toBe(0);
    expect(tracker.throughFailures).toBe(0);
    expect((await read(dst)).equals(await read(src))).toBe(true);
  });

  it("a write-through to any byte of a chunk being copied waits for the copy: the copy's older data never lands after it", async () => {
    const size = 256 * KiB;
    const src = new MemoryPort({ size });
    await src.open();
    await src.pwrite(Buffer.alloc(size, 1), 0, plainIo);
    const dst = new MemoryPort({ size });
    await dst.open();
    const tracker = new DirtyTracker(src);
    const bitmap = new DirtyBitmap(size);
    const locks = new RangeLock();
    tracker.track(bitmap, locks);
    bitmap.mark(64 * KiB, 1); // chunk 1: [64 KiB, 128 KiB)
    let copying!: () => void;
    const inCopy = new Promise<void>((r) => (copying = r));
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    let first = true;
    const t: CopyTarget = {
      async pwrite(buf, offset) {
        if (first) {
          first = false; // the copy, with the data it read before the client's write
          copying();
          await gate;
        }
        await dst.pwrite(Buffer.from(buf), offset, plainIo);
      },
      zero: (length, offset) => dst.zero(length, offset, { ...plainIo, mayTrim: false }),
      async flush() {},
    };
    tracker.writeThrough(t);
    const pass = new Copier(src, t, bitmap, locks, { parallel: 1 }).pass();
    await inCopy;
    let written = false;
    const write = tracker.pwrite(Buffer.alloc(10, 2), 128 * KiB - 10, plainIo).then(() => (written = true));
    await new Promise((r) => setTimeout(r, 10));
    expect(written).toBe(false); // held by the copy's lock on the chunk's bytes
    release();
    await pass;
    await write;
    expect(bitmap.dirtyBytes).toBe(0);
    const chunk = (b: Buffer) => b.subarray(64 * KiB, 128 * KiB);
    expect(chunk(await read(dst)).equals(chunk(await read(src)))).toBe(true); // the one chunk copied, with the client's write
  });

  it("a write-through that fails marks its chunks dirty instead of failing the client", async () => {
    const size = MiB;
    const src = new MemoryPort({ size });
    await src.open();
    const tracker = new DirtyTracker(src);
    const dst = new MemoryPort({ size });
    await dst.open();
    const bitmap = new DirtyBitmap(size);
    const t = target(dst, seededRandom(1));
    tracker.track(bitmap, new RangeLock());
    tracker.writeThrough(t);
    t.fail = true;
    await tracker.pwrite(Buffer.alloc(4096, 1), 70 * KiB, plainIo);
    expect(tracker.throughFailures).toBe(1);
    expect(bitmap.take(MiB)).toEqual({ offset: 64 * KiB, length: 64 * KiB });
  });

  it("gives up after failures in a row, with the ranges still dirty", async () => {
    const size = MiB;
    const src = new MemoryPort({ size });
    await src.open();
    await src.pwrite(Buffer.alloc(size, 3), 0, plainIo);
    const bitmap = new DirtyBitmap(size);
    bitmap.markAll();
    const t = target(new MemoryPort({ size }), seededRandom(1));
    t.fail = true;
    const copier = new Copier(src, t, bitmap, new RangeLock(), { parallel: 2, maxFailures: 3, backoffMs: 1 });
    await expect(copier.pass()).rejects.toBeInstanceOf(CopyAbortedError);
    expect(bitmap.dirtyBytes).toBe(size);
  });
});

/**
 * Timing of the copier (rate limit, backoff) on a fake clock: setTimeout and performance.now()
 * are virtual, so the assertions are about the schedule the copier keeps, not this machine's speed.
 */
describe("copier schedule (fake clock)", () => {
  afterEach(() => {
    vi.useRealTimers();
  });
  const fake = () => vi.useFakeTimers({ toFake: ["setTimeout", "clearTimeout", "setImmediate", "performance"] });

  /** A source of `size` bytes of data, all dirty, and a destination that records when each copy arrived. */
  async function setup(size: number) {
    const src = new MemoryPort({ size });
    await src.open();
    await src.pwrite(Buffer.alloc(size, 3), 0, plainIo);
    const bitmap = new DirtyBitmap(size);
    bitmap.markAll();
    const dst = new MemoryPort({ size });
    await dst.open();
    const arrivals: number[] = [];
    const t0 = performance.now();
    const state = { down: 0 as number | "always" };
    const t: CopyTarget = {
      async pwrite(buf, offset) {
        arrivals.push(performance.now() - t0);
        if (state.down === "always" || state.down-- > 0) throw new NbdError("EIO", "link down");
        await dst.pwrite(Buffer.from(buf), offset, plainIo);
      },
      async zero(length, offset) {
        await dst.zero(length, offset, { ...plainIo, mayTrim: false });
      },
      async flush() {},
    };
    return { src, dst, bitmap, t, arrivals, state, locks: new RangeLock() };
  }

  it("keeps to --max-rate: the k-th copy of 256 KiB at 8 MiB/s starts no earlier than k × 31.25 ms", async () => {
    fake();
    const s = await setup(2 * MiB);
    const copier = new Copier(s.src, s.t, s.bitmap, s.locks, { maxRate: 8 * MiB, copyBytes: 256 * KiB });
    const done = copier.pass();
    await vi.runAllTimersAsync();
    await done;
    expect(s.arrivals).toHaveLength(8);
    // (timers run at whole milliseconds: up to 1 ms early is rounding, not a burst)
    s.arrivals.forEach((at, i) => expect(at).toBeGreaterThanOrEqual((i + 1) * 31.25 - 1));
    expect((await read(s.dst)).equals(await read(s.src))).toBe(true);
  });

  it("counts a copy waiting for its turn under --max-rate as dirty, so progress does not run ahead of the copy", async () => {
    fake();
    const s = await setup(4 * MiB);
    const copier = new Copier(s.src, s.t, s.bitmap, s.locks, { maxRate: 1 * MiB, copyBytes: 1 * MiB });
    const done = copier.pass();
    await vi.advanceTimersByTimeAsync(1500); // the first 1 MiB is due at 1 s, the second at 2 s
    expect(copier.progress()).toMatchObject({ doneBytes: 1 * MiB, dirtyBytes: 3 * MiB });
    await vi.runAllTimersAsync();
    await done;
    expect(copier.progress()).toMatchObject({ doneBytes: 4 * MiB, dirtyBytes: 0 });
  });

  it("stops at once when aborted: copies waiting for the rate limit do not start, their ranges stay dirty", async () => {
    fake();
    const s = await setup(8 * MiB);
    const copier = new Copier(s.src, s.t, s.bitmap, s.locks, { maxRate: 1 * MiB, copyBytes: 1 * MiB });
    let outcome = "running";
    const done = copier.pass().then(
      () => (outcome = "resolved"),
      (err: Error) => (outcome = err.message),
    );
    await vi.advanceTimersByTimeAsync(1500);
    expect(s.arrivals).toHaveLength(1);
    copier.abort(new CopyAbortedError("cancelled"));
    // No time passes now (only what is due at once runs), yet the pass ends.
    await vi.advanceTimersByTimeAsync(0);
    expect(outcome).toBe("cancelled");
    expect(s.arrivals).toHaveLength(1);
    expect(s.bitmap.dirtyBytes).toBe(7 * MiB);
    await vi.runAllTimersAsync();
    await done;
  });

  it("retries a failed copy after a backoff that doubles (100, 200, 400, 800, 1600 ms) and gives up at the sixth failure in a row", async () => {
    fake();
    const s = await setup(1 * MiB);
    s.state.down = "always";
    const copier = new Copier(s.src, s.t, s.bitmap, s.locks, { parallel: 1 });
    const done = copier.pass();
    const settled = done.then(
      () => "resolved",
      (err: Error) => err,
    );
    await vi.runAllTimersAsync();
    const err = await settled;
    expect(err).toBeInstanceOf(CopyAbortedError);
    expect((err as Error).message).toMatch(/copy failed 6 times in a row: link down/);
    expect(s.arrivals).toHaveLength(6);
    const gaps = s.arrivals.slice(1).map((at, i) => at - s.arrivals[i]!);
    [100, 200, 400, 800, 1600].forEach((b, i) => expect(gaps[i]).toBeGreaterThanOrEqual(b));
    expect(copier.progress()).toMatchObject({ failures: 6, dirtyBytes: 1 * MiB });
  });

  it("counts copies that fail together once: an outage that fails all 16 copies in flight is ridden out", async () => {
    fake();
    const s = await setup(32 * MiB);
    s.state.down = 16; // every copy in flight when the link went down fails
    const copier = new Copier(s.src, s.t, s.bitmap, s.locks, {});
    const done = copier.pass();
    await vi.runAllTimersAsync();
    await done;
    expect(copier.progress().failures).toBe(16);
    expect((await read(s.dst)).equals(await read(s.src))).toBe(true);
  });

  it("with the link down for good, 16 parallel copies give up after six rounds of backoff, not six failures at once", async () => {
    fake();
    const s = await setup(32 * MiB);
    s.state.down = "always";
    const copier = new Copier(s.src, s.t, s.bitmap, s.locks, {});
    const settled = copier.pass().then(
      () => "resolved",
      (err: Error) => err.message,
    );
    await vi.runAllTimersAsync();
    expect(await settled).toMatch(/copy failed 6 times in a row/);
    // Six rounds, each after the backoff of the one before: 0, ≥100, ≥300, ≥700, ≥1500, ≥3100 ms.
    const rounds = [...new Set(s.arrivals.map((t) => Math.floor(t)))];
    expect(rounds).toHaveLength(6);
    [0, 100, 300, 700, 1500, 3100].forEach((t, i) => expect(rounds[i]).toBeGreaterThanOrEqual(t));
    expect(s.bitmap.dirtyBytes).toBe(32 * MiB);
  });
});

describe("copier: progress, pause, hooks and locks", () => {
  async function dataSource(size: number) {
    const src = new MemoryPort({ size });
    await src.open();
    await src.pwrite(Buffer.alloc(size, 5), 0, plainIo);
    return src;
  }

  it("reports one progress: planned bytes, completed copies only, then done or failed with the error", async () => {
    const size = 1 * MiB;
    const src = await dataSource(size);
    const bitmap = new DirtyBitmap(size);
    bitmap.mark(0, 256 * KiB);
    const t = target(new MemoryPort({ size }), seededRandom(3), 3);
    const seen: number[] = [];
    const copier = new Copier(src, t, bitmap, new RangeLock(), { parallel: 1, copyBytes: 64 * KiB, backoffMs: 1, onProgress: (p) => seen.push(p.doneBytes + p.dirtyBytes) });
    copier.planDirty();
    expect(copier.progress()).toMatchObject({ state: "running", doneBytes: 0, totalBytes: 256 * KiB, dirtyBytes: 256 * KiB, failures: 0, finishedAt: null });
    await copier.pass();
    // A report after each copy that completed: done plus still dirty is the whole; the failed copy (the 3rd call) added nothing.
    expect(seen).toEqual([256 * KiB, 256 * KiB, 256 * KiB, 256 * KiB]);
    expect(copier.progress()).toMatchObject({ state: "running", doneBytes: 256 * KiB, totalBytes: 256 * KiB, failures: 1 });
    copier.finish();
    expect(copier.progress()).toMatchObject({ state: "done", dirtyBytes: 0, etaSeconds: 0, finishedAt: expect.any(Number) });
    copier.finish(new Error("too late")); // the first end stands
    expect(copier.progress().state).toBe("done");

    bitmap.markAll();
    const failing = new Copier(src, t, bitmap, new RangeLock());
    failing.abort(new CopyAbortedError("cancelled"));
    await expect(failing.pass()).rejects.toThrow("cancelled");
    expect(failing.progress()).toMatchObject({ state: "failed", error: "cancelled", finishedAt: expect.any(Number) });
  });

  it("pause() waits for the copies in flight and starts none until resume()", async () => {
    const size = 2 * MiB;
    const src = await dataSource(size);
    const dst = new MemoryPort({ size });
    await dst.open();
    const t = target(dst, seededRandom(4));
    const bitmap = new DirtyBitmap(size);
    bitmap.markAll();
    let paused: Promise<void> | undefined;
    const copier = new Copier(src, t, bitmap, new RangeLock(), {
      parallel: 4,
      copyBytes: 64 * KiB,
      onProgress: (p) => {
        if (!paused && p.doneBytes >= 256 * KiB) paused = copier.pause();
      },
    });
    const pass = copier.pass();
    while (!paused) await new Promise((r) => setTimeout(r, 1));
    await paused;
    const at = t.calls;
    await new Promise((r) => setTimeout(r, 30));
    expect(t.calls).toBe(at);
    expect(bitmap.dirtyBytes).toBeGreaterThan(0);
    copier.resume();
    await pass;
    expect(bitmap.dirtyBytes).toBe(0);
    expect((await read(dst)).equals(await read(src))).toBe(true);
  });

  it("locks whole chunks in bytes: a write to any byte of a chunk being copied waits; the copied hook runs under the lock after the write", async () => {
    const size = 256 * KiB;
    const src = await dataSource(size);
    const locks = new RangeLock();
    const bitmap = new DirtyBitmap(size);
    bitmap.mark(70 * KiB, 1); // chunk 1: [64 KiB, 128 KiB)
    const order: string[] = [];
    let writerDone: Promise<void> | null = null;
    const t: CopyTarget = {
      async pwrite(buf, offset) {
        order.push(`copy ${offset}+${buf.length}`);
        // A writer of the chunk's last byte must wait for the copy to finish, hook included.
        writerDone = locks.acquire(128 * KiB - 1, 128 * KiB).then((release) => {
          order.push("writer");
          release();
        });
        await new Promise((r) => setTimeout(r, 5));
      },
      async zero() {},
      async flush() {},
    };
    const copier = new Copier(src, t, bitmap, locks, { copied: (o, l) => order.push(`copied ${o}+${l}`) });
    await copier.pass();
    await writerDone;
    expect(order).toEqual([`copy ${64 * KiB}+${64 * KiB}`, `copied ${64 * KiB}+${64 * KiB}`, "writer"]);
  });

  it("with zeroDetect off, data that reads as zeros is written, not zeroed; zero extents are still zeroed", async () => {
    const size = 256 * KiB;
    const src = new MemoryPort({ size });
    await src.open();
    await src.pwrite(Buffer.alloc(64 * KiB), 0, plainIo); // data (allocated) that reads as zeros
    const calls: string[] = [];
    const t: CopyTarget = {
      async pwrite(buf, offset) {
        calls.push(`pwrite ${offset}`);
      },
      async zero(_l, offset) {
        calls.push(`zero ${offset}`);
      },
      async flush() {},
    };
    const bitmap = new DirtyBitmap(size);
    bitmap.markAll();
    await new Copier(src, t, bitmap, new RangeLock(), { parallel: 1, copyBytes: size, zeroDetect: false }).pass();
    expect(calls[0]).toBe("pwrite 0");
    expect(calls.slice(1).every((c) => c.startsWith("zero"))).toBe(true);
    calls.length = 0;
    bitmap.markAll();
    await new Copier(src, t, bitmap, new RangeLock(), { parallel: 1, copyBytes: size }).pass();
    expect(calls.every((c) => c.startsWith("zero"))).toBe(true);
  });

  it("destZero: a copy whose write fails midway takes its chunk out of the destination-is-zero set, so zeros read later are sent", async () => {
    const size = 256 * KiB;
    const src = new MemoryPort({ size });
    await src.open();
    await src.pwrite(Buffer.alloc(64 * KiB, 9), 64 * KiB, plainIo);
    const dst = new MemoryPort({ size });
    await dst.open();
    let failNext = true;
    const t: CopyTarget = {
      async pwrite(buf, offset) {
        await dst.pwrite(Buffer.from(buf), offset, plainIo); // it landed…
        if (failNext) {
          failNext = false;
          throw new NbdError("EIO", "link dropped before the reply"); // …but the reply was lost
        }
      },
      zero: (length, offset) => dst.zero(length, offset, { ...plainIo, mayTrim: false }),
      async flush() {},
    };
    const destZero = new DirtyBitmap(size);
    destZero.markAll(); // a fresh destination
    const bitmap = new DirtyBitmap(size);
    bitmap.mark(64 * KiB, 64 * KiB);
    const copier = new Copier(src, t, bitmap, new RangeLock(), { parallel: 1, destZero, backoffMs: 1 });
    // The first copy fails (the chunk is dirty again); the source's chunk becomes zeros before the retry.
    await copier.pass(() => failNext === false);
    await src.trim(64 * KiB, 64 * KiB, plainIo);
    await copier.pass();
    const b = Buffer.alloc(64 * KiB, 1);
    await dst.pread(b, 64 * KiB, plainIo);
    expect(b.every((x) => x === 0)).toBe(true);
  });
});
