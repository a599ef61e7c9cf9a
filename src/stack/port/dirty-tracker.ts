import type { CopyTarget } from "../../copy/copier.js";
import { lockChunks, type DirtyBitmap } from "../../copy/dirty-bitmap.js";
import type { RangeLock } from "../../util/range-lock.js";
import { PassthroughLayer, type Io, type Layer } from "../layer.js";

/** How long a write-through may wait for its chunk lock, or for the destination, by default. */
export const DEFAULT_STALL_MS = 2000;

/** What a tracker records into while a live copy runs. */
export interface Tracking {
  bitmap: DirtyBitmap;
  locks: RangeLock;
  /** Chunks of the destination known to read as zeros: a chunk leaves it as data is written through to it. */
  destZero?: DirtyBitmap;
  /** Bound on a write-through (its lock wait, then the destination's answer), in ms (default 2 s). */
  stallMs?: number;
  /** Called when a write-through hit the bound: the destination is stopped or hung (the copy aborts). */
  onStall?: (err: Error) => void;
}

const TIMEOUT = Symbol("timeout");

/**
 * The filter above a source's port during a live copy (migration without shared storage): every
 * write that reaches the device marks its chunks dirty once it has completed, so the copier sends
 * them (again) — a write already in flight when tracking starts included: what decides is whether
 * tracking runs when the write completes, not when it entered. In write-blocking mode a write is
 * also sent to the destination before it is acknowledged (under the chunk lock shared with the
 * copier): the dirty set then only shrinks, which is what guarantees convergence under any write
 * load. A write-through that fails, or does not get its lock or the destination's answer within
 * `stallMs`, marks its chunks dirty instead of failing or holding the client (a stall also tells
 * the copy, which aborts). With no copy running it only passes requests on.
 */
export class DirtyTracker extends PassthroughLayer {
  private t: Tracking | null = null;
  private through: CopyTarget | null = null;
  /** Write-throughs that failed or stalled (their chunks were marked dirty instead). */
  throughFailures = 0;

  override describe(): string {
    return this.t ? `dirty-tracker(${this.through ? "write-blocking" : "background"}) → ${this.next.describe()}` : this.next.describe();
  }

  /** The device below (copies read it directly, so they are not tracked as writes). */
  below(): Layer {
    return this.next;
  }

  /** Starts tracking writes into `bitmap` (every write completing from now on marks its chunks). */
  track(bitmap: DirtyBitmap, locks: RangeLock, more: Omit<Tracking, "bitmap" | "locks"> = {}): void {
    this.t = { bitmap, locks, ...more };
  }
  /** Write-blocking mode on (a target) or off (null). */
  writeThrough(target: CopyTarget | null): void {
    this.through = target;
  }
  get writeBlocking(): boolean {
    return this.through !== null;
  }
  stop(): void {
    this.t = null;
    this.through = null;
  }

  /** Marks the chunks of a completed write in whatever bitmap tracks writes now. */
  private completed(offset: number, length: number): void {
    this.t?.bitmap.mark(offset, length);
  }

  private async tracked(offset: number, length: number, local: () => Promise<void>, remote: ((t: CopyTarget) => Promise<void>) | null, data = false): Promise<void> {
    const tr = this.t;
    const target = remote && tr ? this.through : null;
    if (!tr || !target) {
      await local();
      this.completed(offset, length);
      return;
    }
    const stallMs = tr.stallMs ?? DEFAULT_STALL_MS;
    const stalled = (what: string) => {
      this.throughFailures++;
      this.completed(offset, length);
      tr.onStall?.(new Error(`the destination did not answer ${what} within ${stallMs} ms (stalled)`));
    };
    const locking = lockChunks(tr.locks, tr.bitmap.granularity, offset, length);
    const got = await raceTimeout(locking, stallMs);
    if (got === TIMEOUT) {
      // A copy holds the chunk and hangs on the destination: write here only; the chunk is marked.
      void locking.then((unlock) => unlock());
      await local();
      stalled("a copy holding the chunk (write-through lock)");
      return;
    }
    try {
      await local();
      // Before the write-through: one that fails or stalls may have landed in part.
      if (data) tr.destZero?.unmark(offset, length);
      const r = await raceTimeout(
        remote!(target).then(
          () => true,
          () => false,
        ),
        stallMs,
      );
      if (r === TIMEOUT) stalled("a write-through");
      else if (!r) {
        this.throughFailures++;
        this.completed(offset, length);
      }
    } finally {
      got();
    }
  }

  override pwrite(buf: Buffer, offset: number, io: Io): Promise<void> {
    if (!this.t) return this.next.pwrite(buf, offset, io).then(() => this.completed(offset, buf.length));
    return this.tracked(offset, buf.length, () => this.next.pwrite(buf, offset, io), (t) => t.pwrite(buf, offset), true);
  }
  override zero(length: number, offset: number, io: Io): Promise<void> {
    return this.tracked(offset, length, () => this.next.zero(length, offset, io), (t) => t.zero(length, offset));
  }
  override trim(length: number, offset: number, io: Io): Promise<void> {
    // What a trimmed range reads as is up to the device: the copier sends whatever it reads.
    return this.tracked(offset, length, () => this.next.trim(length, offset, io), null);
  }
}

/** `p`'s value, or TIMEOUT once `ms` passed first. */
function raceTimeout<T>(p: Promise<T>, ms: number): Promise<T | typeof TIMEOUT> {
  let timer!: NodeJS.Timeout;
  const t = new Promise<typeof TIMEOUT>((resolve) => (timer = setTimeout(() => resolve(TIMEOUT), ms)));
  return Promise.race([p, t]).finally(() => clearTimeout(timer));
}
