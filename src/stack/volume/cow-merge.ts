import { Copier, type CopySource, type CopyTarget } from "../../copy/copier.js";
import { DirtyBitmap } from "../../copy/dirty-bitmap.js";
import type { CopyProgress } from "../../copy/progress.js";
import type { RangeLock } from "../../util/range-lock.js";
import { plainIo, type Layer } from "../layer.js";
import { MAX_REQUEST, alignDown, alignUp, readFrom, type CowBlocks } from "./cow-blocks.js";
import { ABSENT } from "./cow-format.js";

const MERGE_PARALLEL = 4;

export interface MergeOptions {
  /** With no snapshot below the overlay, fold it into the base itself (the base must be writable). */
  mergeIntoBase?: boolean;
  /** After each block copied down, and at the end: the layer's `progress`. */
  onProgress?: (p: CopyProgress & MergeEnds) => void;
}

/** The overlay being folded down and what it is folded into (null before any merge). */
export interface MergeEnds {
  from: string | null;
  into: string | null;
}

/** Where a merge writes: the frozen snapshot below the overlay, or the base. */
export interface MergeTarget extends CopyTarget {
  name: string;
}

/**
 * The copier of a merge: the overlay of `blocks` as its source (a block it holds is read from its
 * slot, a zeroed one is zeroed), `target` as its target, a bitmap of blocks, and `locks`, the cow
 * layer's lock over block bytes that client requests take too. Each block is copied under its
 * exclusive lock, MERGE_PARALLEL at a time, and forgotten by the overlay only once it has reached
 * the target, still under the lock: a client write to a block waits, or lands in the overlay
 * before the copy (which then copies it), or finds the block forgotten and goes to the target.
 */
export function mergeCopier(blocks: CowBlocks, locks: RangeLock, target: MergeTarget, onProgress: () => void): Copier {
  const source: CopySource = { extents: (l, o, io) => blocks.extents(l, o, io), pread: (b, o, io) => blocks.read(b, o, io) };
  const forget = (offset: number, length: number) => {
    for (let b = offset / blocks.bs; b * blocks.bs < offset + length; b++) blocks.store.set(b, ABSENT);
  };
  return new Copier(source, target, new DirtyBitmap(blocks.bytes, blocks.bs), locks, { parallel: MERGE_PARALLEL, copyBytes: blocks.bs, zeroDetect: false, copied: forget, onProgress });
}

/**
 * Copies down every block the overlay of `blocks` holds, pass after pass, until it holds none.
 * The caller has pointed `blocks.through` at the copier's target (writes to blocks the overlay does
 * not hold go there), and ends the copier's progress once the merge is complete.
 */
export async function copyDown(blocks: CowBlocks, copier: Copier): Promise<void> {
  for (;;) {
    const todo = blocks.store.usedBlocks();
    if (todo.length === 0) return;
    for (const b of todo) copier.bitmap.mark(b * blocks.bs, blocks.blockLen(b));
    copier.planDirty();
    await copier.pass();
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
    pwrite: write,
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
