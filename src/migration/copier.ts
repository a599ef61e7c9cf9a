import type { Logger } from "pino";
import { State } from "../protocol/constants.js";
import { plainIo, type Layer } from "../stack/layer.js";
import { lockChunks, type CopyTarget, type DirtyBitmap } from "../util/dirty-bitmap.js";
import type { RangeLock } from "../util/range-lock.js";

export interface CopierOptions {
  /** Copies in flight at once (default 16). */
  parallel?: number;
  /** Largest single copy in bytes (default 1 MiB). */
  copyBytes?: number;
  /** Bytes per second at most (default: no limit). */
  maxRate?: number;
  /**
   * Failures in a row before the copy gives up (default 6). Copies that were in flight together
   * when one failed count as that one failure: a link that goes down fails them all at once.
   */
  maxFailures?: number;
  /** No copy starts for this long after a failure, doubled for each failure in a row up to 32 × (default 100 ms: 100 ms … 3.2 s). */
  backoffMs?: number;
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
  /** Bytes still to copy: dirty, or taken for a copy that has not finished. */
  dirty: number;
  /** Bytes per second over the last second or so. */
  rate: number;
  /** Copies that failed (each range was marked dirty again and retried). */
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
 * and no copy starts until a backoff has passed; too many failures in a row abort the copy.
 */
export class Copier {
  private readonly parallel: number;
  private readonly copyBytes: number;
  private readonly maxFailures: number;
  private readonly backoffMs: number;
  private copied = 0;
  /** Bytes taken from the bitmap for copies not finished yet (waiting for their turn, or in flight). */
  private pending = 0;
  private failuresInRow = 0;
  private failures = 0;
  /** Copies started so far, and that count when the last failure in a row was counted. */
  private started = 0;
  private streakMark = 0;
  /** No copy starts before this time (performance.now()): the backoff after a failure. */
  private resumeAt = 0;
  /** Wakes the copier's sleeps (rate limit, backoff) when it is aborted. */
  private readonly wakers = new Set<() => void>();
  private aborted: Error | null = null;
  private window: Array<{ t: number; bytes: number }> = [];
  private rateStart = performance.now();
  private rateBytes = 0;

  constructor(
    private readonly source: Layer,
    private readonly target: CopyTarget,
    private readonly bitmap: DirtyBitmap,
    private readonly locks: RangeLock,
    private readonly opts: CopierOptions = {},
  ) {
    this.parallel = opts.parallel ?? 16;
    this.copyBytes = opts.copyBytes ?? 1024 * 1024;
    this.maxFailures = opts.maxFailures ?? 6;
    this.backoffMs = opts.backoffMs ?? 100;
  }

  stats(): CopyStats {
    const now = performance.now();
    this.window = this.window.filter((w) => now - w.t < 2000);
    const span = this.window.length ? Math.max(250, now - this.window[0]!.t) : 1000;
    const bytes = this.window.reduce((s, w) => s + w.bytes, 0);
    return { copied: this.copied, dirty: this.bitmap.dirtyBytes + this.pending, rate: (bytes * 1000) / span, failures: this.failures };
  }

  /**
   * Stops the copy: copies in flight finish, no new ones start (those waiting for the rate limit
   * or a backoff put their ranges back as dirty); pass() rejects with `reason`.
   */
  abort(reason: Error): void {
    this.aborted ??= reason;
    for (const wake of [...this.wakers]) wake();
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
        this.pending += run.length;
        try {
          await this.waitTurn(run.length);
          if (this.aborted) {
            this.bitmap.mark(run.offset, run.length);
            return;
          }
          const seq = this.started++;
          try {
            await this.copyRun(run.offset, run.length);
            if (seq >= this.streakMark) this.failuresInRow = 0;
          } catch (err) {
            this.bitmap.mark(run.offset, run.length);
            this.failures++;
            // Started before the last failure was counted: it was in flight with it, one outage.
            if (seq < this.streakMark) continue;
            this.streakMark = this.started;
            if (++this.failuresInRow >= this.maxFailures) {
              this.abort(new CopyAbortedError(`copy failed ${this.failuresInRow} times in a row: ${(err as Error).message}`));
              return;
            }
            const backoff = this.backoffMs * 2 ** Math.min(5, this.failuresInRow - 1);
            this.resumeAt = performance.now() + backoff;
            this.opts.log?.warn({ offset: run.offset, length: run.length, err: (err as Error).message, retryInMs: backoff, failuresInRow: this.failuresInRow }, "copy failed: range marked dirty again");
          }
        } finally {
          this.pending -= run.length;
        }
      }
    };
    await Promise.all(Array.from({ length: this.parallel }, worker));
    if (this.aborted) throw this.aborted;
  }

  /** Waits until no backoff holds copies back and the rate limit lets `bytes` go (or the copy is aborted). */
  private async waitTurn(bytes: number): Promise<void> {
    let throttled = false;
    while (!this.aborted) {
      const backoff = this.resumeAt - performance.now();
      if (backoff > 0) await this.sleep(backoff);
      else if (!throttled) {
        throttled = true;
        await this.throttle(bytes);
      } else return;
    }
  }

  /** A timer that abort() cuts short; never fires early (timers run at whole milliseconds). */
  private sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const wake = () => {
        clearTimeout(timer);
        this.wakers.delete(wake);
        resolve();
      };
      const timer = setTimeout(wake, Math.ceil(ms));
      this.wakers.add(wake);
    });
  }

  private async throttle(bytes: number): Promise<void> {
    const rate = this.opts.maxRate;
    if (!rate) return;
    this.rateBytes += bytes;
    const due = this.rateStart + (this.rateBytes * 1000) / rate;
    const wait = due - performance.now();
    if (wait > 0) await this.sleep(wait);
    else if (wait < -1000) {
      // Idle for a while: do not let the budget build up into a burst.
      this.rateStart = performance.now();
      this.rateBytes = bytes;
    }
  }

  private async copyRun(offset: number, length: number): Promise<void> {
    const unlock = await lockChunks(this.locks, this.bitmap.granularity, offset, length);
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
