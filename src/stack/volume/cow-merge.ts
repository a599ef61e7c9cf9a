import { NbdError } from "../../errors.js";
import { plainIo, type Layer } from "../layer.js";
import { MAX_REQUEST, alignDown, alignUp, readFrom, type CowBlocks } from "./cow-blocks.js";
import { ABSENT, ZEROED } from "./cow-format.js";
import type { RangeLock } from "../../util/range-lock.js";

const MERGE_PARALLEL = 4;

export interface MergeOptions {
  /** With no snapshot below the overlay, fold it into the base itself (the base must be writable). */
  mergeIntoBase?: boolean;
  onProgress?: (p: MergeProgress) => void;
}

export interface MergeProgress {
  state: "idle" | "running" | "done" | "failed";
  /** The overlay being folded down and what it is folded into. */
  from: string | null;
  into: string | null;
  doneBytes: number;
  totalBytes: number;
  startedAt: number | null;
  finishedAt: number | null;
  error?: string;
}

export const idleProgress = (): MergeProgress => ({ state: "idle", from: null, into: null, doneBytes: 0, totalBytes: 0, startedAt: null, finishedAt: null });

/** Where a merge writes: the frozen snapshot below the overlay, or the base. */
export interface MergeTarget {
  name: string;
  write(buf: Buffer, offset: number): Promise<void>;
  zero(length: number, offset: number): Promise<void>;
  flush(): Promise<void>;
}

/**
 * The copying of a merge: every block the overlay of `blocks` holds is copied into `target` under
 * its exclusive lock in `locks` and then forgotten by the overlay, MERGE_PARALLEL blocks at a time,
 * until the overlay holds none (a client write into a block it still holds keeps it there, to be
 * copied in a later pass). Adds to `progress` and calls `report` after each block; stops with
 * ESHUTDOWN once `closing()` says so. The caller has pointed `blocks.through` at `target`.
 */
export async function copyDown(blocks: CowBlocks, locks: RangeLock, target: MergeTarget, progress: MergeProgress, report: () => void, closing: () => boolean): Promise<void> {
  for (;;) {
    const todo = blocks.store.usedBlocks();
    if (todo.length === 0) return;
    progress.totalBytes += todo.reduce((s, b) => s + blocks.blockLen(b), 0);
    let next = 0;
    const worker = async () => {
      while (next < todo.length) {
        if (closing()) throw new NbdError("ESHUTDOWN", `${blocks.store.path} closed during the merge`);
        const b = todo[next++]!;
        await copyBlock(blocks, locks, b, target);
        progress.doneBytes += blocks.blockLen(b);
        report();
      }
    };
    await Promise.all(Array.from({ length: MERGE_PARALLEL }, worker));
  }
}

async function copyBlock(blocks: CowBlocks, locks: RangeLock, b: number, target: MergeTarget): Promise<void> {
  const release = await locks.acquire(b, b + 1);
  try {
    const store = blocks.store;
    const v = store.entry(b);
    if (v === ABSENT) return;
    const len = blocks.blockLen(b);
    if (v === ZEROED) await target.zero(len, b * blocks.bs);
    else {
      const tmp = Buffer.allocUnsafe(len);
      await store.read(tmp, store.slotOffset(v - 2));
      await target.write(tmp, b * blocks.bs);
    }
    store.set(b, ABSENT);
  } finally {
    release();
  }
}

/**
 * The base as a merge target: writes and zeroes of any byte range, widened to its alignment by
 * read-modify-write and split at its request size. Callers hold the overlay's locks on the blocks.
 */
export function baseMergeTarget(base: Layer): MergeTarget {
  const c = base.capabilities();
  const a = Math.max(1, c.blockSize.minimum);
  const step = Math.max(a, alignDown(Math.min(c.blockSize.maximum, MAX_REQUEST), a));
  const write = async (buf: Buffer, offset: number): Promise<void> => {
    const start = alignDown(offset, a);
    const end = Math.min(alignUp(offset + buf.length, a), base.size());
    let data = buf;
    if (start !== offset || end !== offset + buf.length) {
      data = Buffer.allocUnsafe(end - start);
      await readFrom(base, data, start, plainIo);
      buf.copy(data, offset - start);
    }
    for (let at = 0; at < data.length; at += step) await base.pwrite(data.subarray(at, Math.min(data.length, at + step)), start + at, plainIo);
  };
  return {
    name: base.describe(),
    write,
    zero: async (length, offset) => {
      if (c.zero && offset % a === 0 && (length % a === 0 || offset + length === base.size())) {
        for (let at = 0; at < length; at += step) await base.zero(Math.min(step, length - at), offset + at, plainIo);
      } else await write(Buffer.alloc(length), offset);
    },
    flush: async () => {
      if (c.flush) await base.flush(plainIo);
    },
  };
}
