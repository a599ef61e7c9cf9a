import { NbdError } from "../../errors.js";
import type { Capabilities, Extent, ExtentKind, Io, Layer } from "../layer.js";
import { allDone, closeAll, combineCapabilities, extentsCovering, inPieces, openAll, pushExtents, remapError } from "./common.js";

interface Part {
  child: Layer;
  /** Offset in the child. */
  offset: number;
  length: number;
  /** Offset of the part from the start of the request. */
  at: number;
}

/**
 * Linear spanning: the children one after the other, the volume's size their sum. A request
 * that crosses the end of a child is split there; the parts run in parallel and the request
 * completes when all have. Extents of the parts are joined. flush goes to every child.
 * Capabilities are the children's ANDed; every child's size must be a multiple of the largest
 * minimum block size (so aligned requests stay aligned in each child).
 */
export class ConcatLayer implements Layer {
  private starts: number[] = [];
  private total = 0;
  private caps!: Capabilities;

  constructor(readonly children: Layer[]) {
    if (children.length === 0) throw new NbdError("EINVAL", "concat needs at least one child");
  }

  describe(): string {
    return `concat[${this.children.map((c) => c.describe()).join(", ")}]`;
  }

  async open(): Promise<void> {
    await openAll(this.children);
    try {
      this.caps = combineCapabilities(this.children.map((c) => c.capabilities()));
      const align = this.caps.blockSize.minimum;
      this.starts = [];
      let at = 0;
      for (const c of this.children) {
        if (c.size() % align !== 0) throw new NbdError("EINVAL", `concat: ${c.describe()} has size ${c.size()}, not a multiple of the block size ${align}`);
        this.starts.push(at);
        at += c.size();
      }
      this.total = at;
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

  /** The parts of [offset, offset+length) in each child, in order. */
  private parts(offset: number, length: number): Part[] {
    const out: Part[] = [];
    // Binary search for the child holding `offset`.
    let lo = 0;
    let hi = this.children.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (this.starts[mid]! <= offset) lo = mid;
      else hi = mid - 1;
    }
    let at = 0;
    for (let i = lo; at < length && i < this.children.length; i++) {
      const child = this.children[i]!;
      const childOff = offset + at - this.starts[i]!;
      const n = Math.min(child.size() - childOff, length - at);
      if (n <= 0) continue; // an empty child
      out.push({ child, offset: childOff, length: n, at });
      at += n;
    }
    if (at < length) throw new NbdError("EINVAL", `${length} bytes at ${offset} is beyond the end of the concat volume (${this.total})`);
    return out;
  }

  /** Runs fn on each part in parallel; waits for all before failing (a failing offset is moved into the volume's offsets). */
  private async each(offset: number, length: number, fn: (p: Part) => Promise<void>): Promise<void> {
    const parts = this.parts(offset, length);
    if (parts.length === 1) return fn(parts[0]!).catch((err) => Promise.reject(remapError(err, parts[0]!.offset, length, offset)));
    return allDone(parts.map((p) => fn(p).catch((err) => Promise.reject(remapError(err, p.offset, p.length, offset + p.at)))));
  }

  /** Like each, but zero/trim/cache parts are also cut at each child's maximum request. */
  private async eachPiece(offset: number, length: number, fn: (child: Layer, off: number, len: number) => Promise<void>): Promise<void> {
    const { maximum, minimum } = this.caps.blockSize;
    return this.each(offset, length, (p) => inPieces(p.offset, p.length, maximum, minimum, (off, len) => fn(p.child, off, len)));
  }

  pread(buf: Buffer, offset: number, io: Io): Promise<void> {
    return this.each(offset, buf.length, (p) => p.child.pread(buf.subarray(p.at, p.at + p.length), p.offset, io));
  }

  pwrite(buf: Buffer, offset: number, io: Io): Promise<void> {
    return this.each(offset, buf.length, (p) => p.child.pwrite(buf.subarray(p.at, p.at + p.length), p.offset, io));
  }

  zero(length: number, offset: number, io: Io): Promise<void> {
    return this.eachPiece(offset, length, (c, off, len) => c.zero(len, off, io));
  }

  trim(length: number, offset: number, io: Io): Promise<void> {
    return this.eachPiece(offset, length, (c, off, len) => c.trim(len, off, io));
  }

  cache(length: number, offset: number, io: Io): Promise<void> {
    return this.eachPiece(offset, length, (c, off, len) => c.cache(len, off, io));
  }

  flush(io: Io): Promise<void> {
    return allDone(this.children.map((c) => c.flush(io)));
  }

  async extents(length: number, offset: number, io: Io, kind?: ExtentKind): Promise<Extent[]> {
    const { maximum, minimum } = this.caps.blockSize;
    const parts = this.parts(offset, length);
    const lists = await Promise.all(parts.map((p) => extentsCovering(p.child, p.length, p.offset, io, maximum, minimum, kind)));
    const out: Extent[] = [];
    for (const l of lists) pushExtents(out, l);
    return out;
  }

  async quiesce(): Promise<void> {
    await Promise.all(this.children.map((c) => c.quiesce()));
  }

  resume(): void {
    for (const c of this.children) c.resume();
  }
}

export function createConcatLayer(children: Layer[]): ConcatLayer {
  return new ConcatLayer(children);
}
