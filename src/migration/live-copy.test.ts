import { describe, expect, it } from "vitest";
import { NbdError } from "../errors.js";
import type { CopyTarget } from "../copy/copier.js";
import { PassthroughLayer, plainIo, type Extent, type Io, type Layer } from "../stack/layer.js";
import { DirtyTracker } from "../stack/port/dirty-tracker.js";
import { MemoryPort } from "../stack/port/memory-port.js";
import { CopyCancelledError, LiveCopy } from "./live-copy.js";

/*
 * Holes of the live copy (issue 16, "make moves fault-proof"), each forced with a gate in a fake
 * layer or a destination that never answers. Each test is named after the hole it closes.
 */

const KiB = 1024;
const MiB = 1024 * KiB;
const CHUNK = 64 * KiB;

/** A gate: `wait()` blocks until `open()`; `reached` resolves once something waits. */
function gate() {
  let open!: () => void;
  let reached!: () => void;
  const opened = new Promise<void>((r) => (open = r));
  const hit = new Promise<void>((r) => (reached = r));
  return {
    open,
    reached: hit,
    wait: () => {
      reached();
      return opened;
    },
  };
}

/** The device below the tracker, with optional gates on its next pwrite and its next extents call. */
class GatedLayer extends PassthroughLayer {
  writeGate: ReturnType<typeof gate> | null = null;
  extentsGate: ReturnType<typeof gate> | null = null;
  override async pwrite(buf: Buffer, offset: number, io: Io): Promise<void> {
    const g = this.writeGate;
    this.writeGate = null;
    if (g) await g.wait();
    return this.next.pwrite(buf, offset, io);
  }
  override async extents(length: number, offset: number, io: Io): Promise<Extent[]> {
    const g = this.extentsGate;
    this.extentsGate = null;
    const e = await this.next.extents(length, offset, io);
    if (g) await g.wait(); // answers what it saw before the gate: a write landing meanwhile is not in it
    return e;
  }
}

/** A destination over a memory device; `hang` makes its writes (and flushes) never answer until `cut()`. */
function destination(dev: MemoryPort) {
  const hung = new Set<(e: Error) => void>();
  const t: CopyTarget & { hang: boolean; writes: number; cut(): void; stall(): Promise<void> } = {
    hang: false,
    writes: 0,
    cut() {
      for (const f of hung) f(new NbdError("ESHUTDOWN", "link cut"));
      hung.clear();
    },
    stall(): Promise<void> {
      return new Promise<void>((_, reject) => hung.add(reject));
    },
    async pwrite(buf: Buffer, offset: number) {
      t.writes++;
      if (t.hang) return t.stall();
      await dev.pwrite(Buffer.from(buf), offset, plainIo);
    },
    async zero(length: number, offset: number) {
      if (t.hang) return t.stall();
      await dev.zero(length, offset, { ...plainIo, mayTrim: false });
    },
    async flush() {
      if (t.hang) return t.stall();
    },
  };
  return t;
}

async function setup(size = MiB) {
  const dev = new MemoryPort({ size });
  await dev.open();
  const below = new GatedLayer(dev);
  const tracker = new DirtyTracker(below);
  const dst = new MemoryPort({ size });
  await dst.open();
  return { dev, below, tracker, dst, target: destination(dst) };
}

async function contents(l: Layer, offset = 0, length = l.size()): Promise<Buffer> {
  const b = Buffer.alloc(length);
  await l.pread(b, offset, plainIo);
  return b;
}

/** Resolves with `p`'s outcome, or rejects with `what` if it takes longer than `ms` (a hang fails the test, with a message). */
function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer!: NodeJS.Timeout;
  return Promise.race([p, new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`${what}: still pending after ${ms} ms`)), ms)))]).finally(() => clearTimeout(timer));
}

describe("live copy: holes of issue 16", () => {
  it("skip-free: a chunk written while the copy scans the source is copied, though the free map calls it free", async () => {
    const { dev, below, tracker, dst, target } = await setup();
    await dev.pwrite(Buffer.alloc(CHUNK, 1), 0, plainIo); // some data, so the scan has something to find
    const g = gate();
    below.extentsGate = g;
    const free = [{ offset: 5 * CHUNK, length: 3 * CHUNK }]; // the file system's free map, read before the write
    const copy = new LiveCopy(tracker, below, target, { destIsZero: true, skip: free, budgetBytes: 0 });
    const converging = copy.converge();
    await g.reached;
    // Tracking has started; the scan is under way. A client writes into a "free" chunk.
    await tracker.pwrite(Buffer.alloc(4 * KiB, 0xab), 6 * CHUNK, plainIo);
    g.open();
    await converging;
    await copy.finish();
    expect((await contents(dst, 6 * CHUNK, 4 * KiB)).every((b) => b === 0xab)).toBe(true);
  });

  it("in-flight writes: a write already inside port A when tracking starts is copied", async () => {
    const { below, tracker, dst, target } = await setup();
    below.writeGate = gate();
    const g = below.writeGate;
    // Entered the tracker before any copy: held below it, it completes only after tracking began.
    const write = tracker.pwrite(Buffer.alloc(8 * KiB, 0xcd), 3 * CHUNK, plainIo);
    await g.reached;
    const copy = new LiveCopy(tracker, below, target, { destIsZero: true, budgetBytes: 0 });
    await copy.converge();
    g.open();
    await write; // the redirector drains port A before the final copy
    await copy.finish();
    expect((await contents(dst, 3 * CHUNK, 8 * KiB)).every((b) => b === 0xcd)).toBe(true);
  });

  it("write-blocking: a destination that stops answering does not freeze the source's writes; the copy aborts", async () => {
    const { dev, below, tracker, target } = await setup();
    const copy = new LiveCopy(tracker, below, target, { destIsZero: true, mode: "write-blocking", budgetBytes: 0, stallMs: 200, onAbort: () => target.cut() });
    await copy.converge();
    target.hang = true; // SIGSTOP
    const t0 = performance.now();
    await within(tracker.pwrite(Buffer.alloc(4 * KiB, 0xee), 2 * CHUNK, plainIo), 3000, "a client's write while the destination is stopped");
    expect(performance.now() - t0).toBeLessThan(2000);
    expect((await contents(dev, 2 * CHUNK, 4 * KiB)).every((b) => b === 0xee)).toBe(true); // written here, acknowledged
    await expect(within(copy.finish(), 3000, "the final copy after a stalled write-through")).rejects.toThrow(/did not answer|stalled/);
    expect(copy.progress().phase).toBe("aborted");
    // Tracking has ended: the next write goes to the source only, at once.
    await within(tracker.pwrite(Buffer.alloc(512, 1), 0, plainIo), 500, "a write after the abort");
  });

  it("cancel during the final copy: a stopped destination cannot hold the final copy, cancel ends it at once", async () => {
    const { dev, below, tracker, target } = await setup();
    await dev.pwrite(Buffer.alloc(CHUNK, 1), 0, plainIo);
    const copy = new LiveCopy(tracker, below, target, { destIsZero: true, budgetBytes: 4 * MiB, onAbort: () => target.cut() });
    await copy.converge(); // the one dirty chunk fits the budget: it is left for the final copy
    target.hang = true;
    const final = copy.finish();
    await new Promise((r) => setTimeout(r, 20));
    expect(copy.progress().phase).toBe("final");
    copy.cancel("cancelled by request");
    await expect(within(final, 1000, "the final copy after cancel")).rejects.toBeInstanceOf(CopyCancelledError);
    expect(copy.progress().phase).toBe("aborted");
  });

  it("cancel during the final copy: a final copy that makes no progress gives up by itself after finalStallMs", async () => {
    const { dev, below, tracker, target } = await setup();
    await dev.pwrite(Buffer.alloc(CHUNK, 1), 0, plainIo);
    const copy = new LiveCopy(tracker, below, target, { destIsZero: true, budgetBytes: 4 * MiB, finalStallMs: 200, onAbort: () => target.cut() });
    await copy.converge();
    target.hang = true;
    await expect(within(copy.finish(), 3000, "a final copy into a stopped destination")).rejects.toThrow(/no progress|did not answer|stalled/);
  });

  it("background: a destination that stops answering mid-copy ends the copy after copyStallMs instead of holding it forever", async () => {
    const { dev, below, tracker, target } = await setup();
    await dev.pwrite(Buffer.alloc(MiB, 1), 0, plainIo);
    target.hang = true;
    const copy = new LiveCopy(tracker, below, target, { destIsZero: true, budgetBytes: 0, copyStallMs: 200, onAbort: () => target.cut() });
    await expect(within(copy.converge(), 3000, "a copy into a stopped destination")).rejects.toThrow(/no progress/);
    expect(copy.progress().phase).toBe("aborted");
  });

  it("destZero: a chunk written through to the destination leaves the destination-is-zero set", async () => {
    const { below, tracker, dst, target } = await setup();
    const copy = new LiveCopy(tracker, below, target, { destIsZero: true, mode: "write-blocking", budgetBytes: 0 });
    await copy.converge();
    await tracker.pwrite(Buffer.alloc(CHUNK, 0x5a), 4 * CHUNK, plainIo); // written through: the destination holds it
    await tracker.trim(CHUNK, 4 * CHUNK, plainIo); // not written through: marked, the copy sends what it reads (zeros)
    await copy.finish();
    expect((await contents(dst, 4 * CHUNK, CHUNK)).every((b) => b === 0)).toBe(true);
  });
});
