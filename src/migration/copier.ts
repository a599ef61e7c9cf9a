import type { Logger } from "pino";
import { State } from "../protocol/constants.js";
import { plainIo, type Layer } from "../stack/layer.js";
import type { DirtyBitmap } from "./dirty-bitmap.js";
import type { ChunkLocks, CopyTarget } from "./dirty-tracker.js";

export interface CopierOptions {
  /** Copies in flight at once (default 16). */
  parallel?: number;
  /** Largest single copy in bytes (default 1 MiB). */
  copyBytes?: number;
  /** Bytes per second at most (default: no limit). */
  maxRate?: number;
  /** Failed copies in a row before the copy gives up (default 6, with backoff 100 ms … 3.2 s). */
  maxFailures?: number;
  /**
   * Chunks of the destination known to read as zeros (a freshly created image): zero ranges there
   * are not sent at all; a chunk leaves the set once data was sent to it.
   */
  destZero?: DirtyBitmap;
  log?: Logger;
}

export interface CopyStats {
  /** Bytes sent to the destination so far (data and zeroed ranges). */
  copied: number;
  /** Bytes still dirty. */
  dirty: number;
  /** Bytes per second over the last second or so. */
  rate: number;
  failures: number;
}

export class CopyAbortedError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "CopyAbortedError";
  }
}

/**
 * Copies the dirty parts of a device to a target with bounded parallelism: takes runs from the
 * bitmap, reads them from the source (holes and zero runs are sent as write-zeroes), writes them
 * to the target under the chunk lock shared with the dirty tracker. A failed copy re-marks its run
 * and is retried with backoff; too many failures in a row abort the copy.
 */
export class Copier {
  private readonly parallel: number;
  private readonly copyBytes: number;
  private readonly maxFailures: number;
  private copied = 0;
  private failuresInRow = 0;
  private failures = 0;
  private aborted: Error | null = null;
  private window: Array<{ t: number; bytes: number }> = [];
  private rateStart = performance.now();
  private rateBytes = 0;

  constructor(
    private readonly source: Layer,
    private readonly target: CopyTarget,
    private readonly bitmap: DirtyBitmap,
    private readonly locks: ChunkLocks,
    private readonly opts: CopierOptions = {},
  ) {
    this.parallel = opts.parallel ?? 16;
    this.copyBytes = opts.copyBytes ?? 1024 * 1024;
    this.maxFailures = opts.maxFailures ?? 6;
  }

  stats(): CopyStats {
    const now = performance.now();
    this.window = this.window.filter((w) => now - w.t < 2000);
    const span = this.window.length ? Math.max(250, now - this.window[0]!.t) : 1000;
    const bytes = this.window.reduce((s, w) => s + w.bytes, 0);
    return { copied: this.copied, dirty: this.bitmap.dirtyBytes, rate: (bytes * 1000) / span, failures: this.failures };
  }

  /** Stops the copy: copies in flight finish, no new ones start; pass() rejects with `reason`. */
  abort(reason: Error): void {
    this.aborted ??= reason;
  }

  /**
   * Copies until nothing is dirty or `enough()` says stop (checked between copies). Resolves
   * when every copy it started has finished.
   */
  async pass(enough: () => boolean = () => false): Promise<void> {
    const worker = async () => {
      while (!this.aborted && !enough()) {
        const run = this.bitmap.take(this.copyBytes);
        if (!run) return;
        await this.throttle(run.length);
        try {
          await this.copyRun(run.offset, run.length);
          this.failuresInRow = 0;
        } catch (err) {
          this.bitmap.mark(run.offset, run.length);
          this.failures++;
          if (++this.failuresInRow >= this.maxFailures) {
            this.abort(new CopyAbortedError(`copy failed ${this.failuresInRow} times in a row: ${(err as Error).message}`));
            return;
          }
          const backoff = 100 * 2 ** Math.min(5, this.failuresInRow - 1);
          this.opts.log?.warn({ offset: run.offset, length: run.length, err: (err as Error).message, retryInMs: backoff }, "copy failed: range marked dirty again");
          await new Promise((r) => setTimeout(r, backoff));
        }
      }
    };
    await Promise.all(Array.from({ length: this.parallel }, worker));
    if (this.aborted) throw this.aborted;
  }

  private async throttle(bytes: number): Promise<void> {
    const rate = this.opts.maxRate;
    if (!rate) return;
    this.rateBytes += bytes;
    const due = this.rateStart + (this.rateBytes * 1000) / rate;
    const wait = due - performance.now();
    if (wait > 0) await new Promise((r) => setTimeout(r, wait));
    else if (wait < -1000) {
      // Idle for a while: do not let the budget build up into a burst.
      this.rateStart = performance.now();
      this.rateBytes = bytes;
    }
  }

  private async copyRun(offset: number, length: number): Promise<void> {
    const unlock = await this.locks.lock(offset, length);
    try {
      let at = offset;
      const end = offset + length;
      while (at < end) {
        const extents = await this.source.extents(end - at, at, plainIo);
        for (const e of extents) {
          const n = Math.min(e.length, end - at);
          let buf: Buffer | null = null;
          if (!(e.flags & State.NBD_STATE_ZERO)) {
            buf = Buffer.allocUnsafe(n);
            await this.source.pread(buf, at, plainIo);
            if (isZero(buf)) buf = null; // sparse copy: a run of zeros travels as write-zeroes, or not at all
          }
          const destZero = this.opts.destZero;
          if (buf) {
            await this.target.pwrite(buf, at);
            destZero?.unmark(at, n);
          } else if (!destZero?.covers(at, n)) {
            await this.target.zero(n, at);
          }
          at += n;
          this.copied += n;
          this.window.push({ t: performance.now(), bytes: n });
          if (at >= end) break;
        }
      }
    } finally {
      unlock();
    }
  }
}

const ZEROS = Buffer.alloc(1024 * 1024);

function isZero(buf: Buffer): boolean {
  for (let at = 0; at < buf.length; at += ZEROS.length) {
    const n = Math.min(ZEROS.length, buf.length - at);
    if (!buf.subarray(at, at + n).equals(ZEROS.subarray(0, n))) return false;
  }
  return true;
}

/**
 * Marks what a first copy must send: every range of the source that is not a zero run (a fresh
 * destination reads as zeros already) — or everything when the destination is not known to be
 * zero — minus the ranges `skip` names (free space of a file system, with --skip-free).
 */
export async function markInitial(source: Layer, bitmap: DirtyBitmap, destIsZero: boolean, skip?: Array<{ offset: number; length: number }>): Promise<void> {
  if (!destIsZero) bitmap.markAll();
  else {
    const size = source.size();
    let at = 0;
    while (at < size) {
      const extents = await source.extents(Math.min(size - at, 1 << 30), at, plainIo);
      for (const e of extents) {
        if (!(e.flags & State.NBD_STATE_ZERO)) bitmap.mark(at, e.length);
        at += e.length;
      }
    }
  }
  for (const s of skip ?? []) bitmap.clear(s.offset, s.length);
}
