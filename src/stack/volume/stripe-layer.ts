import { NbdError } from "../../errors.js";
import type { Capabilities, Extent, ExtentKind, Io, Layer } from "../layer.js";
import { allDone, closeAll, combineCapabilities, ExtentCursor, extentsCovering, inPieces, openAll, remapError } from "./common.js";

/** One child's share of a request: a contiguous range of the child. */
interface Span {
  child: number;
  offset: number;
  length: number;
}

/**
 * RAID-0: the volume is cut into chunks of `chunkSize` bytes; chunk i lives on child i % n at
 * offset floor(i / n) × chunkSize. The size is n × (the smallest child's size rounded down to a
 * chunk); bytes of larger children beyond that are unused. Reads and writes are split per chunk
 * and the parts run in parallel. Zero, trim and cache need no buffer, so each child gets one
 * contiguous range (consecutive chunks of a child are adjacent on it). Extents are asked of each
 * child once and laid back in chunk order.
 */
export class StripeLayer implements Layer {
  private total = 0;
  private caps!: Capabilities;

  constructor(
    readonly children: Layer[],
    readonly chunkSize: number,
  ) {
    if (children.length === 0) throw new NbdError("EINVAL", "stripe needs at least one child");
    if (!Number.isSafeInteger(chunkSize) || chunkSize <= 0) throw new NbdError("EINVAL", `stripe: bad chunk size ${chunkSize}`);
  }

  describe(): string {
    return `stripe/${this.chunkSize}[${this.children.map((c) => c.describe()).join(", ")}]`;
  }

  async open(): Promise<void> {
    await openAll(this.children);
    try {
      this.caps = combineCapabilities(this.children.map((c) => c.capabilities()));
      const align = this.caps.blockSize.minimum;
      if (this.chunkSize % align !== 0) throw new NbdError("EINVAL", `stripe: chunk size ${this.chunkSize} is not a multiple of the children's block size ${align}`);
      const rows = Math.floor(Math.min(...this.children.map((c) => c.size())) / this.chunkSize);
      this.total = rows * this.chunkSize * this.children.length;
    } catch (err) {
      await closeAll(this.children).catch(() => undefined);
      throw err;
    }
  }

  close(): Promise<void> {
    return closeAll(this.children);
  }

  size(): number {
    return this.total;
  }

  capabilities(): Capabilities {
    return this.caps;
  }

  private check(offset: number, length: number): void {
    if (offset + length > this.total) throw new NbdError("EINVAL", `${length} bytes at ${offset} is beyond the end of the stripe volume (${this.total})`);
  }

  /** Runs fn for each chunk-sized part of [offset, offset+length), in parallel. */
  private async perChunk(offset: number, length: number, fn: (child: Layer, childOff: number, len: number, at: number) => Promise<void>): Promise<void> {
    this.check(offset, length);
    const n = this.children.length;
    const cs = this.chunkSize;
    const jobs: Promise<void>[] = [];
    for (let at = 0; at < length; ) {
      const pos = offset + at;
      const chunk = Math.floor(pos / cs);
      const inChunk = pos - chunk * cs;
      const len = Math.min(cs - inChunk, length - at);
      const childOff = Math.floor(chunk / n) * cs + inChunk;
      const volOff = pos;
      jobs.push(fn(this.children[chunk % n]!, childOff, len, at).catch((err) => Promise.reject(remapError(err, childOff, len, volOff))));
      at += len;
    }
    return jobs.length === 1 ? jobs[0]! : allDone(jobs);
  }

  /** The contiguous range each child holds of [offset, offset+length), in child order (children with none are left out). */
  private spans(offset: number, length: number): Span[] {
    this.check(offset, length);
    const n = this.children.length;
    const cs = this.chunkSize;
    const c0 = Math.floor(offset / cs);
    const c1 = Math.floor((offset + length - 1) / cs);
    const out: Span[] = [];
    for (let j = 0; j < n; j++) {
      const first = c0 + ((j - (c0 % n) + n) % n);
      if (first > c1) continue;
      const last = c1 - (((c1 % n) - j + n) % n);
      const start = Math.floor(first / n) * cs + (first === c0 ? offset - c0 * cs : 0);
      const end = Math.floor(last / n) * cs + (last === c1 ? offset + length - c1 * cs : cs);
      out.push({ child: j, offset: start, length: end - start });
    }
    return out;
  }

  private async perChild(offset: number, length: number, fn: (child: Layer, off: number, len: number) => Promise<void>): Promise<void> {
    const { maximum, minimum } = this.caps.blockSize;
    return allDone(this.spans(offset, length).map((s) => inPieces(s.offset, s.length, maximum, minimum, (off, len) => fn(this.children[s.child]!, off, len))));
  }

  pread(buf: Buffer, offset: number, io: Io): Promise<void> {
    return this.perChunk(offset, buf.length, (c, off, len, at) => c.pread(buf.subarray(at, at + len), off, io));
  }

  pwrite(buf: Buffer, offset: number, io: Io): Promise<void> {
    return this.perChunk(offset, buf.length, (c, off, len, at) => c.pwrite(buf.subarray(at, at + len), off, io));
  }

  zero(length: number, offset: number, io: Io): Promise<void> {
    return this.perChild(offset, length, (c, off, len) => c.zero(len, off, io));
  }

  trim(length: number, offset: number, io: Io): Promise<void> {
    return this.perChild(offset, length, (c, off, len) => c.trim(len, off, io));
  }

  cache(length: number, offset: number, io: Io): Promise<void> {
    return this.perChild(offset, length, (c, off, len) => c.cache(len, off, io));
  }

  flush(io: Io): Promise<void> {
    return allDone(this.children.map((c) => c.flush(io)));
  }

  async extents(length: number, offset: number, io: Io, kind?: ExtentKind): Promise<Extent[]> {
    const { maximum, minimum } = this.caps.blockSize;
    const spans = this.spans(offset, length);
    const lists = await Promise.all(spans.map((s) => extentsCovering(this.children[s.child]!, s.length, s.offset, io, maximum, minimum, kind)));
    const cursors = new Map<number, ExtentCursor>(spans.map((s, i) => [s.child, new ExtentCursor(lists[i]!)]));
    const n = this.children.length;
    const cs = this.chunkSize;
    const out: Extent[] = [];
    for (let at = 0; at < length; ) {
      const pos = offset + at;
      const chunk = Math.floor(pos / cs);
      const len = Math.min(cs - (pos - chunk * cs), length - at);
      cursors.get(chunk % n)!.take(len, out);
      at += len;
    }
    return out;
  }

  async quiesce(): Promise<void> {
    await Promise.all(this.children.map((c) => c.quiesce()));
  }

  resume(): void {
    for (const c of this.children) c.resume();
  }
}

export function createStripeLayer(children: Layer[], chunkSize: number): StripeLayer {
  return new StripeLayer(children, chunkSize);
}
