import type { Logger } from "pino";
import type { Layer } from "../stack/layer.js";
import { Copier, CopyAbortedError, markInitial, type CopyTarget } from "../copy/copier.js";
import { DirtyBitmap } from "../copy/dirty-bitmap.js";
import type { CopyProgress } from "../copy/progress.js";
import { DEFAULT_STALL_MS, type DirtyTracker } from "../stack/port/dirty-tracker.js";
import { RangeLock } from "../util/range-lock.js";

export type CopyMode = "background" | "write-blocking";

export interface LiveCopyOptions {
  /** Start in write-blocking mode instead of switching to it when the copy stops gaining. */
  mode?: CopyMode;
  /**
   * Ranges not to copy (free space of a file system, with --skip-free), or how to find them: a
   * function is called once tracking has started, so nothing written after it was read is skipped.
   * Chunks written while the copy runs are copied whatever this says.
   */
  skip?: Ranges | (() => Promise<Ranges>);
  /** Whether the destination reads as zeros everywhere (a freshly created image). */
  destIsZero: boolean;
  maxRate?: number;
  parallel?: number;
  /** Dirty bytes left for the final copy under hold (default: what 40 ms of copying moves, 1–16 MiB). */
  budgetBytes?: number;
  granularity?: number;
  /** Bound on a write-through in write-blocking mode (default 2 s): past it the write is acknowledged from the source alone and the copy aborts. */
  stallMs?: number;
  /** The final copy (requests held) aborts when no copy completes for this long (default 5 s): the move rolls back. */
  finalStallMs?: number;
  /**
   * The copy before the hand-over aborts when, with chunks left to copy, none completes for this
   * long (default 30 s, or four copies' time at maxRate if longer); the destination flushing does
   * not count. The source stays the owner.
   */
  copyStallMs?: number;
  /** Cuts the link to the destination, so that requests in flight there fail at once (called when the copy aborts). */
  onAbort?: () => void;
  log?: Logger;
}

type Ranges = Array<{ offset: number; length: number }>;

/**
 * What a live copy adds to its copier's progress: its phase and mode, the passes made, and the
 * names this status had before the copy engine was shared (total, copied, dirty, eta: the same
 * numbers as totalBytes, doneBytes, dirtyBytes, etaSeconds).
 */
export interface LiveCopyState {
  phase: "starting" | "copying" | "final" | "done" | "aborted";
  mode: CopyMode;
  passes: number;
  total: number;
  copied: number;
  dirty: number;
  eta: number | null;
}

export class CopyCancelledError extends CopyAbortedError {}

/** How much longer than its first pass a background copy may take before it turns write-blocking. */
const SLACK = 0.2;

/**
 * The mirror phase of a migration without shared storage: a dirty tracker above the source's
 * port records writes, a copier sends dirty ranges to the destination until what is left fits the
 * hand-over budget. In background mode, if the dirty set stops shrinking the copy switches to
 * write-blocking (writes reach both sides before they are acknowledged), which always converges.
 * `finish()` is the final copy, run by the port redirector while requests are held.
 */
export class LiveCopy {
  private readonly bitmap: DirtyBitmap;
  private readonly locks = new RangeLock();
  private readonly copier: Copier;
  private readonly destZero: DirtyBitmap | undefined;
  private mode: CopyMode;
  private phase: LiveCopyState["phase"] = "starting";
  private passes = 0;
  private abortErr: Error | null = null;
  /** Rejects once the copy is aborted: every wait of the copy races it, so a hung destination holds nothing. */
  private readonly abortedP: Promise<never>;
  private rejectAborted!: (e: Error) => void;
  /** When a copy last completed (performance.now()), or the destination answered a flush. */
  private progressAt = 0;
  private flushing = false;

  constructor(
    private readonly tracker: DirtyTracker,
    private readonly source: Layer,
    private readonly target: CopyTarget,
    private readonly opts: LiveCopyOptions,
  ) {
    const size = source.size();
    this.bitmap = new DirtyBitmap(size, opts.granularity);
    this.mode = opts.mode ?? "background";
    if (opts.destIsZero) {
      this.destZero = new DirtyBitmap(size, this.bitmap.granularity);
      this.destZero.markAll();
    }
    this.copier = new Copier(source, target, this.bitmap, this.locks, {
      parallel: opts.parallel,
      maxRate: opts.maxRate,
      destZero: this.destZero,
      log: opts.log,
      onProgress: () => (this.progressAt = performance.now()),
    });
    this.abortedP = new Promise<never>((_, reject) => (this.rejectAborted = reject));
    this.abortedP.catch(() => undefined);
  }

  progress(): CopyProgress & LiveCopyState {
    const p = this.copier.progress();
    return { ...p, phase: this.phase, mode: this.mode, passes: this.passes, total: p.totalBytes, copied: p.doneBytes, dirty: p.dirtyBytes, eta: p.etaSeconds };
  }

  private budget(): number {
    if (this.opts.budgetBytes !== undefined) return this.opts.budgetBytes;
    return Math.max(1 << 20, Math.min(16 << 20, this.copier.progress().rate * 0.04));
  }

  private setMode(mode: CopyMode): void {
    this.mode = mode;
    this.tracker.writeThrough(mode === "write-blocking" ? this.target : null);
  }

  /** Resolves or rejects with `p`, or rejects as soon as the copy is aborted. */
  private until<T>(p: Promise<T>): Promise<T> {
    return Promise.race([p, this.abortedP]);
  }

  /** Starts tracking, then copies until the dirty set fits the hand-over budget. */
  async converge(): Promise<void> {
    let watchdog: NodeJS.Timeout | undefined;
    try {
      if (this.abortErr) throw this.abortErr;
      // Tracking first: every write that completes from here on is marked, and nothing found
      // afterwards (the scan, the free map) ever clears a marked chunk.
      this.tracker.track(this.bitmap, this.locks, {
        destZero: this.destZero,
        stallMs: this.opts.stallMs ?? DEFAULT_STALL_MS,
        onStall: (err) => {
          this.opts.log?.warn({ err: err.message }, "live copy: a write-through stalled; aborting the copy");
          this.abort(new CopyAbortedError(err.message));
        },
      });
      const skip = typeof this.opts.skip === "function" ? await this.until(this.opts.skip()) : this.opts.skip;
      await this.until(markInitial(this.source, this.bitmap, this.opts.destIsZero, skip));
      this.copier.planDirty();
      this.phase = "copying";
      this.setMode(this.mode);
      // Background mode converges while the copy cleans chunks faster than writes dirty them. Once
      // the first pass is done, the dirty set's recent shrink rate tells when it would get under
      // the budget; if that is later than the first pass's time × (1 + SLACK) — or never —
      // writes keep up with the copy: write-blocking, which only shrinks the dirty set.
      const start = performance.now();
      this.progressAt = start;
      const stallMs = this.opts.copyStallMs ?? Math.max(30_000, this.opts.maxRate ? (4 * (1 << 20) * 1000) / this.opts.maxRate : 0);
      watchdog = setInterval(() => {
        if (this.flushing || this.copier.progress().dirtyBytes === 0) this.progressAt = performance.now();
        else if (performance.now() - this.progressAt > stallMs) this.abort(new CopyAbortedError(`the copy made no progress for ${stallMs} ms: the destination is stopped or hung`));
      }, Math.max(10, Math.min(1000, stallMs / 4)));
      let firstPassMs: number | null = null;
      const history: Array<{ t: number; dirty: number }> = [];
      let flushed = false;
      for (;;) {
        const t0 = performance.now();
        await this.until(this.copier.pass(() => this.bitmap.dirtyBytes <= this.budget() || performance.now() - t0 > 1000));
        this.passes++;
        const now = performance.now();
        const dirty = this.bitmap.dirtyBytes;
        if (dirty <= this.budget()) {
          if (flushed) return;
          // Make the destination durable now, while requests flow: the flush under hold then only
          // covers the last pass, not the whole image sitting in the destination's page cache.
          this.flushing = true;
          try {
            await this.until(this.target.flush());
          } finally {
            this.flushing = false;
            this.progressAt = performance.now();
          }
          flushed = true;
          continue;
        }
        if (this.mode !== "background") continue;
        const p = this.copier.progress();
        if (firstPassMs === null && p.doneBytes >= p.totalBytes) firstPassMs = now - start;
        history.push({ t: now, dirty });
        // The shrink rate over the last 2–4 s (at least two passes apart).
        while (history.length > 2 && now - history[1]!.t >= 2000) history.shift();
        if (firstPassMs === null || history.length < 2 || now - history[0]!.t < 2000) continue;
        const shrink = (history[0]!.dirty - dirty) / ((now - history[0]!.t) / 1000); // bytes per second
        const eta = shrink > 0 ? ((dirty - this.budget()) / shrink) * 1000 : Infinity;
        if (now + eta - start > firstPassMs * (1 + SLACK)) {
          this.opts.log?.warn({ dirty, shrinkPerSecond: Math.round(shrink) }, "live copy: writes keep up with the copy; switching to write-blocking mode");
          this.setMode("write-blocking");
        }
      }
    } catch (err) {
      this.fail(err as Error);
      throw err;
    } finally {
      clearInterval(watchdog);
    }
  }

  /**
   * The final copy, with every request held and port A drained: copies what is dirty, flushes the
   * destination. It rejects — and the move rolls back — when cancelled, when it aborted before, or
   * when no copy completes for `finalStallMs` (a stopped or hung destination).
   */
  async finish(): Promise<void> {
    this.phase = "final";
    const stallMs = this.opts.finalStallMs ?? 5000;
    this.progressAt = performance.now();
    const watchdog = setInterval(() => {
      if (performance.now() - this.progressAt > stallMs) this.abort(new CopyAbortedError(`the final copy made no progress for ${stallMs} ms: the destination is stopped or hung`));
    }, Math.max(10, stallMs / 4));
    try {
      if (this.abortErr) throw this.abortErr;
      await this.until(this.copier.pass());
      await this.until(this.target.flush());
      this.phase = "done";
      this.copier.finish();
    } catch (err) {
      this.fail(err as Error);
      throw err;
    } finally {
      clearInterval(watchdog);
      this.tracker.stop();
    }
  }

  /** Stops the copy (cancel, or the destination went away), in any phase before done; the source serves on as before. */
  cancel(reason = "cancelled"): void {
    this.abort(new CopyCancelledError(reason));
  }

  /**
   * Aborts the copy: tracking ends (no more write-throughs), no copy starts, the link to the
   * destination is cut (`onAbort`) and whatever the copy waits for — converge() or finish() —
   * rejects with `err` at once.
   */
  private abort(err: Error): void {
    if (this.abortErr || this.phase === "done") return;
    this.abortErr = err;
    this.phase = "aborted"; // the status says so at once, even before converge() or finish() notices
    this.tracker.stop();
    this.copier.abort(err);
    this.copier.finish(err);
    this.rejectAborted(err);
    try {
      this.opts.onAbort?.();
    } catch (e) {
      this.opts.log?.warn({ err: (e as Error).message }, "live copy: cutting the link failed");
    }
  }

  private fail(err: Error): void {
    this.phase = "aborted";
    this.copier.finish(err);
    this.tracker.stop();
  }
}
