import { execFile } from "node:child_process";
import fs from "node:fs";

/** A byte range of a file, [offset, end). */
export interface PunchRange {
  offset: number;
  end: number;
}

/**
 * Deallocates ranges of a file, keeping its size. The default runs util-linux
 * `fallocate --punch-hole --keep-size` (Node.js has no fallocate(2)): one process for one range,
 * one `sh` running one `fallocate` per range for a batch.
 */
export type PunchRunner = (file: string, ranges: readonly PunchRange[]) => Promise<void>;

const BATCH_SCRIPT = 'f=$1; shift; while [ $# -gt 1 ]; do fallocate --punch-hole --keep-size --offset "$1" --length "$2" "$f" || exit 1; shift 2; done';

export const fallocateRunner: PunchRunner = (file, ranges) =>
  new Promise((resolve, reject) => {
    const one = ranges.length === 1 ? ranges[0]! : null;
    const [cmd, args] = one
      ? ["fallocate", ["--punch-hole", "--keep-size", "--offset", String(one.offset), "--length", String(one.end - one.offset), file]]
      : ["sh", ["-c", BATCH_SCRIPT, "sh", file, ...ranges.flatMap((r) => [String(r.offset), String(r.end - r.offset)])]];
    execFile(cmd, args, { timeout: 60_000 }, (err, _out, stderr) => (err ? reject(new Error(stderr.trim() || err.message)) : resolve()));
  });

interface Pending extends PunchRange {
  /** Writes that were in flight over the range when the trim came: the punch runs after them. */
  after: Promise<unknown> | null;
  done: Promise<void>;
  resolve(): void;
}

export interface HolePuncherOptions {
  /** The file, as the child process opens it (see filePathOf). */
  file: string;
  runner?: PunchRunner;
  /** Most ranges one process punches (after coalescing). Default 256. */
  maxBatch?: number;
  /** Told once when punching fails; trims are then acknowledged without punching. */
  onFailure?: (err: Error) => void;
}

/**
 * The path a child process opens to reach the file behind descriptor `fd` of this process: the
 * /proc magic link, which stays on the same file even if its name is renamed over (a cow snapshot
 * renames a new overlay onto the old one's name), else `fallback`.
 */
export function filePathOf(fd: number, fallback: string): string {
  const p = `/proc/${process.pid}/fd/${fd}`;
  return fs.existsSync(p) ? p : fallback;
}

/**
 * Hole punching off the hot path, for a file port's trim.
 *
 * - `punch()` queues a range and resolves once the hole is punched (the trim is acknowledged then:
 *   `du` has shrunk by the time the client hears back). One process runs at a time; the ranges
 *   queued meanwhile are sorted, coalesced (adjacent and overlapping ranges become one) and
 *   punched by the next process, up to `maxBatch` ranges each. The queue is bounded by the
 *   requests a client may have in flight (the server's per-connection cap).
 * - Order with writes: a write that arrives while a punch over its range is queued or running
 *   waits for it (`waitFor`), so a punch never undoes a later write; a punch waits for writes that
 *   were in flight over its range when the trim arrived (`after`), so it never lands before them
 *   either. Requests are thus applied in the order they arrived, as with a real fallocate call.
 * - A punch that fails (no `fallocate`, a file system without hole punching) is logged once
 *   (`onFailure`) and punching stops: later trims are acknowledged at once, which TRIM allows
 *   (the data simply stays).
 */
export class HolePuncher {
  private readonly runner: PunchRunner;
  private readonly maxBatch: number;
  private queue: Pending[] = [];
  private running: Pending[] = [];
  private working = false;
  private failed: Error | null = null;
  /** Ranges punched, processes run (for tests and the bench). */
  readonly stats = { ranges: 0, processes: 0 };

  constructor(private readonly opts: HolePuncherOptions) {
    this.runner = opts.runner ?? fallocateRunner;
    this.maxBatch = opts.maxBatch ?? 256;
  }

  /** True while any punch is queued or running: writes must call waitFor() first. */
  get busy(): boolean {
    return this.queue.length > 0 || this.running.length > 0;
  }

  /** Whether punching has failed and was given up (trims are then acknowledged without punching). */
  get disabled(): boolean {
    return this.failed !== null;
  }

  /** Resolves when no queued or running punch overlaps [offset, end). */
  async waitFor(offset: number, end: number): Promise<void> {
    for (;;) {
      const hit = this.running.find((p) => p.offset < end && offset < p.end) ?? this.queue.find((p) => p.offset < end && offset < p.end);
      if (!hit) return;
      await hit.done;
    }
  }

  /** Punches [offset, offset + length) after `after` (writes in flight over it); resolves when done. */
  punch(offset: number, length: number, after: Promise<unknown> | null = null): Promise<void> {
    if (this.failed || length <= 0) return Promise.resolve();
    let resolve!: () => void;
    const done = new Promise<void>((r) => (resolve = r));
    this.queue.push({ offset, end: offset + length, after, done, resolve });
    if (!this.working) {
      // Started on the next turn of the event loop: trims that arrive together go in one process.
      this.working = true;
      setImmediate(() => void this.work());
    }
    return done;
  }

  private async work(): Promise<void> {
    try {
      while (this.queue.length > 0) {
        // Take the oldest ranges, whole; coalescing happens over what was taken.
        this.running = this.queue.splice(0, this.maxBatch);
        const afters = this.running.flatMap((p) => (p.after ? [p.after.catch(() => undefined)] : []));
        if (afters.length) await Promise.all(afters);
        const ranges = coalesce(this.running);
        if (!this.failed) {
          try {
            await this.runner(this.opts.file, ranges);
            this.stats.ranges += ranges.length;
            this.stats.processes++;
          } catch (err) {
            this.failed = err as Error;
            this.opts.onFailure?.(this.failed);
          }
        }
        const finished = this.running;
        this.running = [];
        for (const p of finished) p.resolve();
      }
    } finally {
      this.working = false;
    }
  }
}

/** Sorted ranges with overlapping and adjacent ones merged. */
export function coalesce(ranges: readonly PunchRange[]): PunchRange[] {
  const sorted = [...ranges].sort((a, b) => a.offset - b.offset);
  const out: PunchRange[] = [];
  for (const r of sorted) {
    const last = out[out.length - 1];
    if (last && r.offset <= last.end) last.end = Math.max(last.end, r.end);
    else out.push({ offset: r.offset, end: r.end });
  }
  return out;
}
