import type { RangeLock } from "../util/range-lock.js";

/**
 * Which parts of a device differ from its copy, at a fixed granularity (64 KiB by default):
 * one bit per chunk. A writer marks the chunks it touched once its write has completed; the
 * copier takes dirty runs (clearing their bits) and copies them, and re-marks a run whose copy
 * failed. A write that lands while its chunk is being copied marks it again, so it is copied again.
 * The rules of the copy built on it are in README.md.
 */
export class DirtyBitmap {
  private readonly bits: Uint32Array;
  private dirtyChunks = 0;
  readonly chunks: number;
  /** Where the next take() starts looking, so passes sweep the device instead of rereading its start. */
  private cursor = 0;

  constructor(
    readonly size: number,
    readonly granularity = 64 * 1024,
  ) {
    if (!Number.isInteger(Math.log2(granularity)) || granularity < 512) throw new Error(`dirty bitmap granularity must be a power of two ≥ 512, got ${granularity}`);
    this.chunks = Math.ceil(size / granularity);
    this.bits = new Uint32Array(Math.ceil(this.chunks / 32));
  }

  /** Bytes marked dirty (whole chunks; the last one counts only up to the device's end). */
  get dirtyBytes(): number {
    if (this.dirtyChunks === 0) return 0;
    const last = this.chunks - 1;
    const lastShort = this.isDirty(last) ? this.chunks * this.granularity - this.size : 0;
    return this.dirtyChunks * this.granularity - lastShort;
  }

  private isDirty(chunk: number): boolean {
    return (this.bits[chunk >>> 5]! & (1 << (chunk & 31))) !== 0;
  }

  /** Marks every chunk that [offset, offset + length) touches. */
  mark(offset: number, length: number): void {
    if (length <= 0) return;
    const first = Math.floor(offset / this.granularity);
    const last = Math.min(this.chunks - 1, Math.floor((offset + length - 1) / this.granularity));
    for (let c = first; c <= last; c++) {
      const w = c >>> 5;
      const m = 1 << (c & 31);
      if ((this.bits[w]! & m) === 0) {
        this.bits[w]! |= m;
        this.dirtyChunks++;
      }
    }
  }

  markAll(): void {
    this.mark(0, this.size);
  }

  /** Marks every chunk `other` marks (same size and granularity); clears nothing. */
  merge(other: DirtyBitmap): void {
    if (other.size !== this.size || other.granularity !== this.granularity) throw new Error("dirty bitmaps of different shapes cannot merge");
    for (let w = 0; w < this.bits.length; w++) {
      const add = other.bits[w]! & ~this.bits[w]!;
      if (add === 0) continue;
      this.bits[w]! |= add;
      this.dirtyChunks += popcount(add);
    }
  }

  /** Clears every chunk that [offset, offset + length) touches. */
  unmark(offset: number, length: number): void {
    if (length <= 0) return;
    const first = Math.floor(offset / this.granularity);
    const end = Math.min(this.chunks, Math.floor((offset + length - 1) / this.granularity) + 1);
    this.clear(first * this.granularity, (end - first) * this.granularity);
  }

  /** Whether every chunk that [offset, offset + length) touches is marked. */
  covers(offset: number, length: number): boolean {
    const first = Math.floor(offset / this.granularity);
    const last = Math.min(this.chunks - 1, Math.floor((offset + Math.max(1, length) - 1) / this.granularity));
    for (let c = first; c <= last; c++) if (!this.isDirty(c)) return false;
    return true;
  }

  /** Clears every chunk entirely inside [offset, offset + length). */
  clear(offset: number, length: number): void {
    const first = Math.ceil(offset / this.granularity);
    const end = offset + length >= this.size ? this.chunks : Math.floor((offset + length) / this.granularity);
    for (let c = first; c < end; c++) {
      const w = c >>> 5;
      const m = 1 << (c & 31);
      if ((this.bits[w]! & m) !== 0) {
        this.bits[w]! &= ~m;
        this.dirtyChunks--;
      }
    }
  }

  /**
   * Takes the next run of dirty chunks (at most `maxBytes`) at or after the cursor, wrapping
   * around, and clears it. Returns null when nothing is dirty.
   */
  take(maxBytes: number): { offset: number; length: number } | null {
    if (this.dirtyChunks === 0) return null;
    const maxChunks = Math.max(1, Math.floor(maxBytes / this.granularity));
    for (let i = 0; i < this.chunks; ) {
      const c = (this.cursor + i) % this.chunks;
      const word = this.bits[c >>> 5]!;
      if (word === 0 && (c & 31) === 0 && c + 32 <= this.chunks) {
        i += 32; // skip a clean word at once
        continue;
      }
      if (!this.isDirty(c)) {
        i++;
        continue;
      }
      let n = 1;
      while (n < maxChunks && c + n < this.chunks && this.isDirty(c + n)) n++;
      const offset = c * this.granularity;
      const length = Math.min(n * this.granularity, this.size - offset);
      this.clear(offset, length);
      this.cursor = (c + n) % this.chunks;
      return { offset, length };
    }
    return null;
  }
}

function popcount(x: number): number {
  x -= (x >>> 1) & 0x55555555;
  x = (x & 0x33333333) + ((x >>> 2) & 0x33333333);
  return (((x + (x >>> 4)) & 0x0f0f0f0f) * 0x01010101) >>> 24;
}

/**
 * Locks, exclusively, the whole chunks of `granularity` bytes that [offset, offset + length)
 * touches, in a RangeLock over bytes: a copy of a chunk and a write to any byte of it (a
 * write-through, a mirror's client write, a cow block's write) never interleave, or the copy's
 * older data could land after the write.
 */
export function lockChunks(locks: RangeLock, granularity: number, offset: number, length: number): Promise<() => void> {
  const start = Math.floor(offset / granularity) * granularity;
  const end = Math.ceil((offset + Math.max(1, length)) / granularity) * granularity;
  return locks.acquire(start, end);
}
