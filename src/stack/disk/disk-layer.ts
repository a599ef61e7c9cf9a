import pLimit from "p-limit";
import { NbdError } from "../../errors.js";
import { RangeLock } from "../../util/range-lock.js";
import { PassthroughLayer, type Capabilities, type Extent, type ExtentKind, type Io, type Layer } from "../layer.js";

export interface DiskLayerOptions {
  /** Largest request advertised to clients (NBD_INFO_BLOCK_SIZE maximum). Default 32 MiB. */
  maxPayload?: number;
  /** How many pieces of one split request run at once. Default 4. */
  splitParallel?: number;
  /**
   * Serve the device read-only whatever the layers below could do: a read-only export whose stack
   * holds a writable layer of its own (a cow overlay above a read-only image) must still refuse writes.
   */
  readOnly?: boolean;
  /**
   * `unmap` (default): offer trim wherever the stack below honours it; `ignore`: never offer it
   * (NBD_FLAG_SEND_TRIM unset, `nbdinfo` shows can_trim false), as qemu-nbd's --discard.
   */
  discard?: DiscardMode;
}

/** What an export does with TRIM: pass it down (`unmap`) or not offer it (`ignore`). */
export type DiscardMode = "unmap" | "ignore";

export const DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024;

/**
 * The disk layer: makes the device below look like a disk with byte granularity to clients.
 * - Requests larger than the child's maximum are split (pieces run with bounded parallelism).
 * - When the child needs alignment, unaligned writes and zeroes are read-modify-write under a
 *   range lock (so two writes into one block never lose each other's bytes); unaligned reads
 *   read the covering blocks; trim shrinks to the aligned interior (trim is advisory).
 * Advertises minimum 1, the child's preferred size (at least 4 KiB), and `maxPayload`.
 */
export class DiskLayer extends PassthroughLayer {
  private caps!: Capabilities;
  private align = 1;
  private maxChunk = 0;
  private readonly maxPayload: number;
  private readonly splitParallel: number;
  private readonly readOnly: boolean;
  private readonly discard: DiscardMode;
  private readonly lock = new RangeLock();

  constructor(next: Layer, opts: DiskLayerOptions = {}) {
    super(next);
    this.maxPayload = opts.maxPayload ?? DEFAULT_MAX_PAYLOAD;
    this.splitParallel = opts.splitParallel ?? 4;
    this.readOnly = !!opts.readOnly;
    this.discard = opts.discard ?? "unmap";
  }

  override describe(): string {
    return `disk → ${this.next.describe()}`;
  }

  /** The layer this disk layer stands on (partitions of this device are stacked on it too). */
  below(): Layer {
    return this.next;
  }

  override async open(): Promise<void> {
    await this.next.open();
    const c = this.next.capabilities();
    this.align = c.blockSize.minimum;
    this.maxChunk = Math.max(this.align, Math.floor(Math.min(c.blockSize.maximum, 0x40000000) / this.align) * this.align);
    const ro = this.readOnly && c.writable ? { writable: false, trim: false, zero: false, fastZero: false, fua: false } : {};
    this.caps = {
      ...c,
      ...ro,
      ...(this.discard === "ignore" ? { trim: false } : {}),
      blockSize: {
        minimum: 1,
        preferred: Math.max(4096, c.blockSize.preferred),
        maximum: this.maxPayload,
      },
    };
  }

  override capabilities(): Capabilities {
    return this.caps;
  }

  /** Runs fn over [offset, offset+length) in pieces of at most maxChunk (aligned when offset is). */
  private async split(offset: number, length: number, fn: (off: number, len: number, at: number) => Promise<void>): Promise<void> {
    if (length <= this.maxChunk) return fn(offset, length, 0);
    const limit = pLimit(this.splitParallel);
    const parts: Promise<void>[] = [];
    for (let at = 0; at < length; at += this.maxChunk) {
      const len = Math.min(this.maxChunk, length - at);
      parts.push(
        limit(() =>
          fn(offset + at, len, at).catch((err) => {
            if (err instanceof NbdError && err.offset === undefined) err.offset = offset + at;
            throw err;
          }),
        ),
      );
    }
    await Promise.all(parts);
  }

  private readSplit(buf: Buffer, offset: number, io: Io): Promise<void> {
    return this.split(offset, buf.length, (off, len, at) => this.next.pread(buf.subarray(at, at + len), off, io));
  }

  private writeSplit(buf: Buffer, offset: number, io: Io): Promise<void> {
    return this.split(offset, buf.length, (off, len, at) => this.next.pwrite(buf.subarray(at, at + len), off, io));
  }

  private alignDown(n: number): number {
    return n - (n % this.align);
  }
  private alignUp(n: number): number {
    const r = n % this.align;
    return r === 0 ? n : n + this.align - r;
  }

  // pread and pwrite are plain (not async) so that an aligned request that needs no splitting
  // goes straight down, adding no promise of its own; a synchronous throw below becomes a rejection.
  override pread(buf: Buffer, offset: number, io: Io): Promise<void> {
    try {
      if (this.align === 1 || (offset % this.align === 0 && buf.length % this.align === 0)) {
        return buf.length <= this.maxChunk ? this.next.pread(buf, offset, io) : this.readSplit(buf, offset, io);
      }
      return this.readUnaligned(buf, offset, io);
    } catch (err) {
      return Promise.reject(err);
    }
  }

  private async readUnaligned(buf: Buffer, offset: number, io: Io): Promise<void> {
    const start = this.alignDown(offset);
    const end = this.alignUp(offset + buf.length);
    const tmp = Buffer.allocUnsafe(end - start);
    await this.readSplit(tmp, start, io);
    tmp.copy(buf, 0, offset - start, offset - start + buf.length);
  }

  override pwrite(buf: Buffer, offset: number, io: Io): Promise<void> {
    try {
      if (this.align === 1) return buf.length <= this.maxChunk ? this.next.pwrite(buf, offset, io) : this.writeSplit(buf, offset, io);
      return this.writeUnaligned(buf, offset, io);
    } catch (err) {
      return Promise.reject(err);
    }
  }

  private async writeUnaligned(buf: Buffer, offset: number, io: Io): Promise<void> {
    const start = this.alignDown(offset);
    const end = this.alignUp(offset + buf.length);
    const release = await this.lock.acquire(start, end);
    try {
      if (start === offset && end === offset + buf.length) return await this.writeSplit(buf, offset, io);
      const tmp = await this.readEdges(start, end, offset, offset + buf.length, io);
      buf.copy(tmp, offset - start);
      await this.writeSplit(tmp, start, io);
    } finally {
      release();
    }
  }

  /** A buffer for [start, end) whose partial edge blocks around [from, to) hold the device's bytes. */
  private async readEdges(start: number, end: number, from: number, to: number, io: Io): Promise<Buffer> {
    const tmp = Buffer.allocUnsafe(end - start);
    const a = this.align;
    if (from !== start) await this.next.pread(tmp.subarray(0, a), start, io);
    if (to !== end && !(end - start === a && from !== start)) await this.next.pread(tmp.subarray(end - start - a), end - a, io);
    return tmp;
  }

  override async zero(length: number, offset: number, io: Io): Promise<void> {
    if (this.align === 1) return this.split(offset, length, (off, len) => this.next.zero(len, off, io));
    const innerStart = this.alignUp(offset);
    const innerEnd = this.alignDown(offset + length);
    const needsRmw = innerStart !== offset || innerEnd !== offset + length;
    if (needsRmw && io.fast) throw new NbdError("ENOTSUP", "unaligned zero needs read-modify-write, which is not fast");
    const start = this.alignDown(offset);
    const end = this.alignUp(offset + length);
    const release = await this.lock.acquire(start, end);
    try {
      if (innerStart >= innerEnd) {
        // Inside one or two blocks and no whole block: write zeroes with read-modify-write.
        const tmp = await this.readEdges(start, end, offset, offset + length, io);
        tmp.fill(0, offset - start, offset - start + length);
        return await this.writeSplit(tmp, start, io);
      }
      const jobs: Promise<void>[] = [];
      if (innerStart > offset) jobs.push(this.zeroPartial(innerStart - this.align, offset, innerStart, io));
      if (innerEnd < offset + length) jobs.push(this.zeroPartial(innerEnd, innerEnd, offset + length, io));
      jobs.push(this.split(innerStart, innerEnd - innerStart, (off, len) => this.next.zero(len, off, io)));
      await Promise.all(jobs);
    } finally {
      release();
    }
  }

  /** Zeroes [from, to) inside the block starting at blockStart. */
  private async zeroPartial(blockStart: number, from: number, to: number, io: Io): Promise<void> {
    const tmp = Buffer.allocUnsafe(this.align);
    await this.next.pread(tmp, blockStart, io);
    tmp.fill(0, from - blockStart, to - blockStart);
    await this.next.pwrite(tmp, blockStart, io);
  }

  override async trim(length: number, offset: number, io: Io): Promise<void> {
    const start = this.alignUp(offset);
    const end = this.alignDown(offset + length);
    if (start >= end) return;
    if (this.align === 1) return this.split(start, end - start, (off, len) => this.next.trim(len, off, io));
    const release = await this.lock.acquire(start, end);
    try {
      await this.split(start, end - start, (off, len) => this.next.trim(len, off, io));
    } finally {
      release();
    }
  }

  override cache(length: number, offset: number, io: Io): Promise<void> {
    const start = this.alignDown(offset);
    const end = this.alignUp(offset + length);
    return this.split(start, end - start, (off, len) => this.next.cache(len, off, io));
  }

  override async extents(length: number, offset: number, io: Io, kind?: ExtentKind): Promise<Extent[]> {
    const start = this.alignDown(offset);
    const end = Math.min(this.alignUp(offset + length), start + this.maxChunk);
    const raw = await this.next.extents(end - start, start, io, kind);
    // Drop the bytes before `offset` and beyond `offset + length`.
    const out: Extent[] = [];
    let pos = start;
    const want = offset + length;
    for (const e of raw) {
      const s = Math.max(pos, offset);
      const t = Math.min(pos + e.length, want);
      if (t > s) out.push({ length: t - s, flags: e.flags });
      pos += e.length;
      if (pos >= want) break;
    }
    if (out.length === 0) throw new NbdError("EIO", `no extents returned for ${length}@${offset}`);
    return out;
  }
}

export function createDiskLayer(next: Layer, opts?: DiskLayerOptions): DiskLayer {
  return new DiskLayer(next, opts);
}
