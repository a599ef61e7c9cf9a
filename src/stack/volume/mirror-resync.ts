import type { Logger } from "pino";
import { Copier, type CopySource, type CopyTarget } from "../../copy/copier.js";
import { DirtyBitmap } from "../../copy/dirty-bitmap.js";
import type { CopyProgress } from "../../copy/progress.js";
import { State } from "../../protocol/constants.js";
import type { RangeLock } from "../../util/range-lock.js";
import { plainIo, type Capabilities, type Layer } from "../layer.js";

export interface ResyncCopy {
  /** The mirror's capabilities and size. */
  caps: Capabilities;
  size: number;
  /** Bytes per copy (default 1 MiB, cut to the legs' maximum request and aligned to their minimum) and copies in flight. */
  chunk?: number;
  parallel: number;
  /** The mirror's lock over bytes, which client writes take while a resync runs. */
  lock: RangeLock;
  /** Runs a read on an ok leg, trying the others when it fails (and degrading those that failed). */
  read<T>(op: "pread" | "extents", fn: (l: Layer) => Promise<T>): Promise<T>;
  /** The leg being rebuilt, and what to do when a write to it fails (degrade it: that aborts the copier). */
  leg: Layer;
  failed(err: unknown): void;
  onProgress(p: CopyProgress): void;
  log?: Logger;
}

/**
 * The copy of a mirror leg's resync: every chunk of the mirror, read from the ok legs and written
 * to the leg, each under the mirror's lock. A chunk the ok legs report as reading zero is zeroed on
 * the leg (when the legs can zero), others are written as read. A read that fails on every ok leg
 * is retried by the copier's rules; a write to the leg that fails ends the resync (the mirror
 * degrades the leg and aborts the copier).
 */
export function resyncCopier(r: ResyncCopy): Copier {
  const { minimum, maximum } = r.caps.blockSize;
  const want = Math.min(r.chunk ?? 1 << 20, maximum);
  const chunk = Math.max(minimum, want - (want % minimum));
  const bitmap = new DirtyBitmap(r.size, Math.max(512, chunk & -chunk));
  bitmap.markAll();
  const zero = State.NBD_STATE_HOLE | State.NBD_STATE_ZERO;
  const source: CopySource = {
    extents: async (length, offset) => {
      if (!r.caps.extents || !r.caps.zero) return [{ length, flags: 0 }];
      const e = (await r.read("extents", (l) => l.extents(length, offset, plainIo)))[0];
      return [{ length, flags: e && e.length >= length && e.flags & State.NBD_STATE_ZERO ? zero : 0 }];
    },
    pread: (buf, offset) => r.read("pread", (l) => l.pread(buf, offset, plainIo)),
  };
  const write = async (op: () => Promise<void>) => {
    try {
      await op();
    } catch (err) {
      r.failed(err);
      throw err;
    }
  };
  const target: CopyTarget = {
    pwrite: (buf, offset) => write(() => r.leg.pwrite(buf, offset, plainIo)),
    zero: (length, offset) => write(() => r.leg.zero(length, offset, plainIo)),
    flush: () => r.leg.flush(plainIo),
  };
  const copier = new Copier(source, target, bitmap, r.lock, { parallel: r.parallel, copyBytes: chunk, zeroDetect: false, onProgress: r.onProgress, log: r.log });
  copier.planDirty();
  return copier;
}

/** A resync's progress with the names it had before the copy engine was shared: done and total (doneBytes and totalBytes). */
export function withDoneTotal(p: CopyProgress): CopyProgress & { done: number; total: number } {
  return { ...p, done: p.doneBytes, total: p.totalBytes };
}
