import type { Logger } from "pino";
import { State } from "../protocol/constants.js";
import { InflightTracker, plainIo, type Layer } from "../stack/layer.js";
import type { RangeLock } from "../util/range-lock.js";
import { DirtyBitmap, lockChunks } from "./dirty-bitmap.js";
import type { CopyProgress } from "./progress.js";

/** Where a copy reads: a Layer, or anything that answers extents and pread like one. */
export type CopySource = Pick<Layer, "extents" | "pread">;

/** Where a copy writes: a peer's image (over NBD), a mirror leg, the layer below a cow overlay. */
export interface CopyTarget {
  pwrite(buf: Buffer, offset: number): Promise<void>;
  zero(length: number, offset: number): Promise<void>;
  flush(): Promise<void>;
}

export interface CopierOptions {
  /** Copies in flight at once (default 16). */
  parallel?: number;
  /** Largest single copy in bytes (default 1 MiB); runs are whole chunks of the bitmap. */
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
   * are not sent at all; a chunk leaves the set as data is sent to it (by a copy or a write-through).
   */
  destZero?: DirtyBitmap;
  /** Whether data read as all zeros travels as a zero request (default true); off, what the source calls data is written as read. */
  zeroDetect?: boolean;
  /** Called under the range lock once a run has reached the target (a cow merge forgets the run's blocks there). */
  copied?: (offset: number, length: number) => void;
  /** Called after each copy that completed. */
  onProgress?: (p: CopyProgress) => void;
  log?: Logger;
}

export class CopyAbortedError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "CopyAbortedError";
  }
}

/**
 * The one copy engine (rules in README.md): copies the dirty runs of a bitmap from a source to a
 * target with bounded parallelism, each run under the chunk lock its writers share (holes and zero
 * runs are sent as write-zeroes). A failed copy re-marks its run and no copy starts until a
 * backoff has passed; too many failures in a row, or abort(), end the copy.
 */
export class Copier {
  private readonly parallel: number;
  private readonly copyBytes: number;
  private readonly maxFailures: number;
  private readonly backoffMs: number;
  private readonly zeroDetect: boolean;
  private done = 0;
  private total = 0;
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
  private paused = false;
  private unpause: Array<() => void> = [];
  /** Copies reading or writing now (pause() waits for them). */
  private readonly running = new InflightTracker();
  private state: CopyProgress["state"] = "running";
  private readonly startedAt = Date.now();
  private finishedAt: number | null = null;
  private error: string | undefined;
  /** Bytes sent over the last two seconds, for the rate. */
  private window: Array<{ t: number; bytes: number }> = [];
  private windowBytes = 0;
  private rateStart = performance.now();
  private rateBytes = 0;

  constructor(
    private readonly source: CopySource,
    private readonly target: CopyTarget,
    readonly bitmap: DirtyBitmap,
    /** Over bytes; shared with every writer of the target's ranges. */
    private readonly locks: RangeLock,
    private readonly opts: CopierOptions = {},
  ) {
    this.parallel = opts.parallel ?? 16;
    this.copyBytes = opts.copyBytes ?? 1024 * 1024;
    this.maxFailures = opts.maxFailures ?? 6;
    this.backoffMs = opts.backoffMs ?? 100;
    this.zeroDetect = opts.zeroDetect ?? true;
  }

  /** Counts what the bitmap holds now as work of this copy (totalBytes grows by it): call it after marking what is to be copied. */
  planDirty(): void {
    this.total += this.bitmap.dirtyBytes;
  }

  progress(): CopyProgress {
    const now = performance.now();
    while (this.window.length && now - this.window[0]!.t >= 2000) this.windowBytes -= this.window.shift()!.bytes;
    const span = this.window.length ? Math.max(250, now - this.window[0]!.t) : 1000;
    const rate = Math.round((this.windowBytes * 1000) / span);
    const dirty = this.bitmap.dirtyBytes + this.pending;
    return {
      state: this.state,
      doneBytes: this.done,
      totalBytes: this.total,
      dirtyBytes: dirty,
      rate,
      etaSeconds: dirty === 0 ? 0 : rate > 0 ? Math.round((dirty / rate) * 10) / 10 : null,
      failures: this.failures,
      startedAt: this.startedAt,
      finishedAt: this.finishedAt,
      ...(this.error !== undefined ? { error: this.error } : {}),
    };
  }

  /** Ends the copy as its progress shows it: done, or failed with `error` (a step of the owner's after the copying counts too). */
  finish(error?: unknown): void {
    if (this.state !== "running") return;
    this.state = error === undefined ? "done" : "failed";
    this.finishedAt = Date.now();
    if (error !== undefined) this.error = error instanceof Error ? error.message : String(error);
  }

  /**
   * Stops the copy: copies in flight finish, no new ones start (those waiting for the rate limit
   * or a backoff put their ranges back as dirty); pass() rejects with `reason`.
   */
  abort(reason: Error): void {
    this.aborted ??= reason;
    for (const wake of [...this.wakers]) wake();
    this.wakeUnpaused();
  }

  /** Starts no more copies until resume() (copies waiting for their turn put their runs back); resolves once none is in flight. */
  pause(): Promise<void> {
    this.paused = true;
    return this.running.idle();
  }

  resume(): void {
    this.paused = false;
    this.wakeUnpaused();
  }

  private wakeUnpaused(): void {
    const w = this.unpause;
    this.unpause = [];
    for (const f of w) f();
  }

  /**
   * Copies until nothing is dirty or `enough()` says stop (checked between copies). Resolves
   * when every copy it started has finished.
   */
  async pass(enough: () => boolean = () => false): Promise<void> {
    const worker = async () => {
      while (!this.aborted && !enough()) {
        if (this.paused) {
          await new Promise<void>((r) => this.unpause.push(r));
          continue;
        }
        const run = this.bitmap.take(this.copyBytes);
        if (!run) return;
        this.pending += run.length;
        let completed = false;
        try {
          completed = await this.copyOne(run.offset, run.length);
        } finally {
          this.pending -= run.length;
        }
        if (completed) this.opts.onProgress?.(this.progress());
      }
    };
    await Promise.all(Array.from({ length: this.parallel }, worker));
    if (this.aborted) {
      this.finish(this.aborted);
      throw this.aborted;
    }
  }

  /** One run taken from the bitmap: copied (true), or marked dirty again (false). */
  private async copyOne(offset: number, length: number): Promise<boolean> {
    await this.waitTurn(length);
    if (this.aborted || this.paused) {
      this.bitmap.mark(offset, length);
      return false;
    }
    const seq = this.started++;
    this.running.enter();
    try {
      await this.copyRun(offset, length);
      this.done += length;
      if (seq >= this.streakMark) this.failuresInRow = 0;
      return true;
    } catch (err) {
      this.bitmap.mark(offset, length);
      this.failures++;
      // Started before the last failure was counted: it was in flight with it, one outage.
      if (this.aborted || seq < this.streakMark) return false;
      this.streakMark = this.started;
      if (++this.failuresInRow >= this.maxFailures) {
        this.abort(new CopyAbortedError(`copy failed ${this.failuresInRow} times in a row: ${(err as Error).message}`));
        return false;
      }
      const backoff = this.backoffMs * 2 ** Math.min(5, this.failuresInRow - 1);
      this.resumeAt = performance.now() + backoff;
      this.opts.log?.warn({ offset, length, err: (err as Error).message, retryInMs: backoff, failuresInRow: this.failuresInRow }, "copy failed: range marked dirty again");
      return false;
    } finally {
      this.running.leave();
    }
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
        if (extents.length === 0) throw new Error(`no extents for ${end - at} bytes at ${at}`);
        for (const e of extents) {
          const n = Math.min(e.length, end - at);
          let buf: Buffer | null = null;
          if (!(e.flags & State.NBD_STATE_ZERO)) {
            buf = Buffer.allocUnsafe(n);
            await this.source.pread(buf, at, plainIo);
            if (this.zeroDetect && isZero(buf)) buf = null; // sparse copy: a run of zeros travels as write-zeroes, or not at all
          }
          const destZero = this.opts.destZero;
          if (buf) {
            // Before the write: one that fails midway may have landed in part.
            destZero?.unmark(at, n);
            await this.target.pwrite(buf, at);
          } else if (!destZero?.covers(at, n)) {
            await this.target.zero(n, at);
          }
          at += n;
          this.window.push({ t: performance.now(), bytes: n });
          this.windowBytes += n;
          if (at >= end) break;
        }
      }
      this.opts.copied?.(offset, length);
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
 * It only ever adds to `bitmap`: the scan and the skip are worked out in a bitmap of their own and
 * merged, so a chunk a writer marked meanwhile (tracking starts before this) stays marked.
 */
export async function markInitial(source: Layer, bitmap: DirtyBitmap, destIsZero: boolean, skip?: Array<{ offset: number; length: number }>): Promise<void> {
  const initial = new DirtyBitmap(bitmap.size, bitmap.granularity);
  if (!destIsZero) initial.markAll();
  else {
    const size = source.size();
    let at = 0;
    while (at < size) {
      const extents = await source.extents(Math.min(size - at, 1 << 30), at, plainIo);
      for (const e of extents) {
        if (!(e.flags & State.NBD_STATE_ZERO)) initial.mark(at, e.length);
        at += e.length;
      }
    }
  }
  for (const s of skip ?? []) initial.clear(s.offset, s.length);
  bitmap.merge(initial);
}
