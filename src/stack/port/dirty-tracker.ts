import type { CopyTarget } from "../../copy/copier.js";
import { lockChunks, type DirtyBitmap } from "../../copy/dirty-bitmap.js";
import type { RangeLock } from "../../util/range-lock.js";
import { PassthroughLayer, type Io, type Layer } from "../layer.js";

/**
 * The filter above a source's port during a live copy (migration without shared storage): every
 * write that reaches the device marks its chunks dirty once it has completed, so the copier sends
 * them (again). In write-blocking mode a write is also sent to the destination before it is
 * acknowledged (under the chunk lock shared with the copier): the dirty set then only shrinks,
 * which is what guarantees convergence under any write load. A write-through that fails marks its
 * chunks dirty instead of failing the client. With no copy running it only passes requests on.
 */
export class DirtyTracker extends PassthroughLayer {
  private bitmap: DirtyBitmap | null = null;
  private locks: RangeLock | null = null;
  private through: CopyTarget | null = null;
  /** Write-throughs that failed (their chunks were marked dirty instead). */
  throughFailures = 0;

  override describe(): string {
    return this.bitmap ? `dirty-tracker(${this.through ? "write-blocking" : "background"}) → ${this.next.describe()}` : this.next.describe();
  }

  /** The device below (copies read it directly, so they are not tracked as writes). */
  below(): Layer {
    return this.next;
  }

  /** Starts tracking writes into `bitmap`. */
  track(bitmap: DirtyBitmap, locks: RangeLock): void {
    this.bitmap = bitmap;
    this.locks = locks;
  }
  /** Write-blocking mode on (a target) or off (null). */
  writeThrough(target: CopyTarget | null): void {
    this.through = target;
  }
  get writeBlocking(): boolean {
    return this.through !== null;
  }
  stop(): void {
    this.bitmap = null;
    this.locks = null;
    this.through = null;
  }

  private async tracked(offset: number, length: number, local: () => Promise<void>, remote: ((t: CopyTarget) => Promise<void>) | null): Promise<void> {
    const bm = this.bitmap!;
    const t = remote ? this.through : null;
    if (!t) {
      await local();
      bm.mark(offset, length);
      return;
    }
    const unlock = await lockChunks(this.locks!, bm.granularity, offset, length);
    try {
      await local();
      try {
        await remote!(t);
      } catch {
        this.throughFailures++;
        bm.mark(offset, length);
      }
    } finally {
      unlock();
    }
  }

  override pwrite(buf: Buffer, offset: number, io: Io): Promise<void> {
    if (!this.bitmap) return this.next.pwrite(buf, offset, io);
    return this.tracked(offset, buf.length, () => this.next.pwrite(buf, offset, io), (t) => t.pwrite(buf, offset));
  }
  override zero(length: number, offset: number, io: Io): Promise<void> {
    if (!this.bitmap) return this.next.zero(length, offset, io);
    return this.tracked(offset, length, () => this.next.zero(length, offset, io), (t) => t.zero(length, offset));
  }
  override trim(length: number, offset: number, io: Io): Promise<void> {
    // What a trimmed range reads as is up to the device: the copier sends whatever it reads.
    if (!this.bitmap) return this.next.trim(length, offset, io);
    return this.tracked(offset, length, () => this.next.trim(length, offset, io), null);
  }
}
