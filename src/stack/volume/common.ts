import { NbdError } from "../../errors.js";
import type { Capabilities, Extent, ExtentKind, Io, Layer } from "../layer.js";

/**
 * What a volume can do over several children: every ability only if every child has it;
 * block sizes so that a request valid for the volume is valid for each child
 * (minimum = largest minimum, preferred = largest preferred, maximum = smallest maximum).
 */
export function combineCapabilities(caps: Capabilities[]): Capabilities {
  if (caps.length === 0) throw new NbdError("EINVAL", "a volume needs at least one child");
  const all = (k: keyof Omit<Capabilities, "blockSize">) => caps.every((c) => c[k]);
  const writable = all("writable");
  const minimum = Math.max(...caps.map((c) => c.blockSize.minimum));
  const maximum = Math.min(...caps.map((c) => c.blockSize.maximum));
  if (maximum < minimum) throw new NbdError("EINVAL", `children's block sizes do not fit together (minimum ${minimum} > maximum ${maximum})`);
  return {
    writable,
    flush: all("flush"),
    fua: writable && all("fua"),
    trim: writable && all("trim"),
    zero: writable && all("zero"),
    fastZero: writable && all("fastZero"),
    cache: all("cache"),
    extents: all("extents"),
    depth: all("depth"),
    multiConn: all("multiConn"),
    blockSize: { minimum, preferred: Math.max(minimum, ...caps.map((c) => c.blockSize.preferred)), maximum },
  };
}

/** Opens every child; if one fails, closes those that opened and throws the first error. */
export async function openAll(children: Layer[]): Promise<void> {
  const r = await Promise.allSettled(children.map((c) => c.open()));
  const failed = r.find((x): x is PromiseRejectedResult => x.status === "rejected");
  if (!failed) return;
  await Promise.allSettled(children.filter((_, i) => r[i]!.status === "fulfilled").map((c) => c.close()));
  throw failed.reason;
}

/** Closes every child (all are tried), then throws the first error if any. */
export async function closeAll(children: Layer[]): Promise<void> {
  const r = await Promise.allSettled(children.map((c) => c.close()));
  const failed = r.find((x): x is PromiseRejectedResult => x.status === "rejected");
  if (failed) throw failed.reason;
}

/** Runs fn over [offset, offset+length) in consecutive pieces of at most `max` bytes (aligned to `align`). */
export async function inPieces(offset: number, length: number, max: number, align: number, fn: (off: number, len: number) => Promise<void>): Promise<void> {
  const step = Math.max(align, max - (max % align));
  for (let at = 0; at < length; at += step) await fn(offset + at, Math.min(step, length - at));
}

/** Appends extents to `out`, joining runs with equal flags. */
export function pushExtents(out: Extent[], more: Iterable<Extent>): void {
  for (const e of more) {
    if (e.length <= 0) continue;
    const last = out[out.length - 1];
    if (last && last.flags === e.flags) last.length += e.length;
    else out.push({ length: e.length, flags: e.flags });
  }
}

/**
 * The extents of [offset, offset+length) of one child, asking again where the child answered
 * short, in requests of at most `max` bytes. The result covers exactly `length` bytes.
 */
export async function extentsCovering(child: Layer, length: number, offset: number, io: Io, max: number, align: number, kind: ExtentKind = "allocation"): Promise<Extent[]> {
  const out: Extent[] = [];
  let done = 0;
  while (done < length) {
    const want = Math.min(length - done, Math.max(align, max - (max % align)));
    const got = await child.extents(want, offset + done, io, kind);
    let n = 0;
    const clipped: Extent[] = [];
    for (const e of got) {
      const len = Math.min(e.length, want - n);
      if (len <= 0) break;
      clipped.push({ length: len, flags: e.flags });
      n += len;
    }
    if (n === 0) throw new NbdError("EIO", `${child.describe()} returned no extents for ${want} bytes at ${offset + done}`);
    pushExtents(out, clipped);
    done += n;
  }
  return out;
}

/** Takes extents off a list in order, `length` bytes at a time (splitting an extent where needed). */
export class ExtentCursor {
  private i = 0;
  private used = 0;
  constructor(private readonly list: Extent[]) {}
  take(length: number, out: Extent[]): void {
    let left = length;
    while (left > 0) {
      const e = this.list[this.i];
      if (!e) throw new NbdError("EIO", "extent list shorter than the range it should cover");
      const n = Math.min(left, e.length - this.used);
      pushExtents(out, [{ length: n, flags: e.flags }]);
      left -= n;
      this.used += n;
      if (this.used === e.length) {
        this.i++;
        this.used = 0;
      }
    }
  }
}

/** Runs every job; when all are done, throws the first failure (an NbdError offset is kept). */
export async function allDone(jobs: Promise<void>[]): Promise<void> {
  const r = await Promise.allSettled(jobs);
  const failed = r.find((x): x is PromiseRejectedResult => x.status === "rejected");
  if (failed) throw failed.reason;
}

/**
 * Moves the failing offset of a child's error into the volume's offsets: a part that covers
 * [childOffset, childOffset+length) of the child and starts at volumeOffset on the volume.
 */
export function remapError(err: unknown, childOffset: number, length: number, volumeOffset: number): unknown {
  if (err instanceof NbdError && err.offset !== undefined) {
    const inside = err.offset >= childOffset && err.offset < childOffset + length;
    err.offset = volumeOffset + (inside ? err.offset - childOffset : 0);
  }
  return err;
}
