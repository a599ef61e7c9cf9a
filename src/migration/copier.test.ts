import { describe, expect, it } from "vitest";
import { NbdError } from "../errors.js";
import { plainIo, type Layer } from "../stack/layer.js";
import { MemoryPort } from "../stack/port/memory-port.js";
import { seededRandom } from "../stack/fault/rules.js";
import { DirtyBitmap } from "./dirty-bitmap.js";
import { ChunkLocks, DirtyTracker, type CopyTarget } from "./dirty-tracker.js";
import { CopyAbortedError, Copier, markInitial } from "./copier.js";

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

/** A destination that is a memory device, with seeded delays and (optionally) failures. */
function target(dev: MemoryPort, random: () => number, failRate = 0): CopyTarget & { fail: boolean } {
  const t = {
    fail: false,
    async pwrite(buf: Buffer, offset: number) {
      await new Promise((r) => setTimeout(r, random() * 2));
      if (t.fail || random() < failRate) throw new NbdError("EIO", "link down");
      await dev.pwrite(Buffer.from(buf), offset, plainIo);
    },
    async zero(length: number, offset: number) {
      await new Promise((r) => setTimeout(r, random() * 2));
      if (t.fail || random() < failRate) throw new NbdError("EIO", "link down");
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

/** Random writes and zeroes of random sizes through `top` until stopped; records nothing: the source is the model. */
function writer(top: Layer, random: () => number): { stop: () => Promise<number> } {
  let running = true;
  let n = 0;
  const size = top.size();
  const loops = Array.from({ length: 4 }, async () => {
    while (running) {
      const len = 1 + Math.floor(random() * 200 * KiB);
      const off = Math.floor(random() * (size - len));
      if (random() < 0.15) await top.zero(len, off, { ...plainIo, mayTrim: false });
      else await top.pwrite(Buffer.alloc(len, 1 + Math.floor(random() * 255)), off, plainIo);
      n++;
      await new Promise((r) => setTimeout(r, random() * 3));
    }
  });
  return {
    stop: async () => {
      running = false;
      await Promise.all(loops);
      return n;
    },
  };
}

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
      const locks = new ChunkLocks(bitmap.granularity);
      tracker.track(bitmap, locks);
      await markInitial(src, bitmap, true);
      expect(bitmap.dirtyBytes).toBeLessThan(size / 2); // holes are not copied to a fresh (zero) destination
      const copier = new Copier(src, target(dst, random, 0.05), bitmap, locks, { parallel: 8, copyBytes: 256 * KiB, maxFailures: 50 });
      const w = writer(tracker, random);
      // In background mode the writer can keep the copy busy forever: stop each pass after a while.
      for (let i = 0; i < 2; i++) {
        const t0 = performance.now();
        await copier.pass(() => performance.now() - t0 > 300);
      }
      const writes = await w.stop();
      expect(writes).toBeGreaterThan(10);
      await copier.pass(); // the final pass: nothing writes any more
      expect(bitmap.dirtyBytes).toBe(0);
      expect((await read(dst)).equals(await read(src))).toBe(true);
      expect(copier.stats().failures).toBeGreaterThan(0);
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
    const locks = new ChunkLocks(bitmap.granularity);
    const t = target(dst, random);
    tracker.track(bitmap, locks);
    await markInitial(src, bitmap, true);
    tracker.writeThrough(t);
    const w = writer(tracker, random);
    const copier = new Copier(src, t, bitmap, locks, { parallel: 4, copyBytes: 128 * KiB });
    await copier.pass(); // returns only when nothing is dirty, though the writer never stopped
    expect(bitmap.dirtyBytes).toBe(0);
    await new Promise((r) => setTimeout(r, 30));
    await w.stop();
    expect(bitmap.dirtyBytes).toBe(0);
    expect((await read(dst)).equals(await read(src))).toBe(true);
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
    tracker.track(bitmap, new ChunkLocks(bitmap.granularity));
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
    const copier = new Copier(src, t, bitmap, new ChunkLocks(bitmap.granularity), { parallel: 2, maxFailures: 3 });
    await expect(copier.pass()).rejects.toBeInstanceOf(CopyAbortedError);
    expect(bitmap.dirtyBytes).toBe(size);
  });

  it("keeps to --max-rate", async () => {
    const size = 2 * MiB;
    const src = new MemoryPort({ size });
    await src.open();
    await src.pwrite(Buffer.alloc(size, 3), 0, plainIo);
    const bitmap = new DirtyBitmap(size);
    bitmap.markAll();
    const dst = new MemoryPort({ size });
    await dst.open();
    const copier = new Copier(src, target(dst, () => 0), bitmap, new ChunkLocks(bitmap.granularity), { maxRate: 8 * MiB, copyBytes: 256 * KiB });
    const t0 = performance.now();
    await copier.pass();
    // 2 MiB at 8 MiB/s: at least ~220 ms (the first 256 KiB go at once).
    expect(performance.now() - t0).toBeGreaterThan(200);
  });
});
