import { NbdError } from "../../errors.js";
import { State } from "../../protocol/constants.js";
import { deeper, type Extent, type ExtentKind, type Io, type Layer } from "../layer.js";
import { ABSENT, ZEROED } from "./cow-format.js";
import type { MergeTarget } from "./cow-merge.js";
import type { CowStore } from "./cow-store.js";

/** The largest request a cow layer takes; cache and merge requests to the layer below are cut to it too. */
export const MAX_REQUEST = 32 * 1024 * 1024;
const ZERO_FLAGS = State.NBD_STATE_HOLE | State.NBD_STATE_ZERO;

type Kind = "below" | "zero" | "data";
const kindOf = (v: number): Kind => (v === ABSENT ? "below" : v === ZEROED ? "zero" : "data");

/**
 * The block-level work of a cow layer: byte ranges of the device over one overlay store and the
 * layer below it. Each block is read from its slot in the overlay, as zeroes, or from below; writes
 * land in the overlay (store rules in cow-store.ts). Callers hold the block locks of the range.
 */
export class CowBlocks {
  readonly bs: number;
  readonly bytes: number;
  /** While a merge runs: its target, where writes to blocks the overlay does not hold go. */
  through: MergeTarget | null = null;

  constructor(
    readonly store: CowStore,
    readonly below: Layer,
  ) {
    this.bs = store.blockSize;
    this.bytes = store.header.virtualSize;
  }

  /** Bytes in block `b` (the last block may be short). */
  blockLen(b: number): number {
    return Math.min(this.bs, this.bytes - b * this.bs);
  }

  /** Reads [offset, offset + buf.length): runs of blocks from the overlay, as zeroes, or from below. */
  async read(buf: Buffer, offset: number, io: Io): Promise<void> {
    const jobs: Promise<void>[] = [];
    let run: { kind: Kind; at: number; len: number; fileOff: number } | null = null;
    const emit = () => {
      if (!run) return;
      const sub = buf.subarray(run.at, run.at + run.len);
      if (run.kind === "zero") sub.fill(0);
      else if (run.kind === "below") jobs.push(readFrom(this.below, sub, offset + run.at, io));
      else jobs.push(this.store.read(sub, run.fileOff));
      run = null;
    };
    for (let at = 0; at < buf.length; ) {
      const abs = offset + at;
      const b = Math.floor(abs / this.bs);
      const inBlock = abs - b * this.bs;
      const n = Math.min(this.bs - inBlock, buf.length - at);
      const v = this.store.entry(b);
      const kind = kindOf(v);
      const fileOff = kind === "data" ? this.store.slotOffset(v - 2) + inBlock : 0;
      const r = run as { kind: string; at: number; len: number; fileOff: number } | null;
      if (r && r.kind === kind && (kind !== "data" || r.fileOff + r.len === fileOff)) r.len += n;
      else {
        emit();
        run = { kind, at, len: n, fileOff };
      }
      at += n;
    }
    emit();
    await Promise.all(jobs);
  }

  /**
   * Writes `buf` at `offset`: into the slots of blocks the overlay holds; whole new blocks into new
   * slots; parts of new blocks by read-modify-write from below; while a merge runs, blocks the
   * overlay does not hold straight into its target. New slots are mapped once their data is written.
   */
  async write(buf: Buffer, offset: number, io: Io): Promise<void> {
    type Item = { fileOff: number; data: Buffer; at: number; client: boolean };
    const items: Item[] = [];
    const through: Array<{ off: number; at: number; len: number }> = [];
    const fresh: Array<[number, number]> = [];
    try {
      for (let at = 0; at < buf.length; ) {
        const abs = offset + at;
        const b = Math.floor(abs / this.bs);
        const inBlock = abs - b * this.bs;
        const n = Math.min(this.bs - inBlock, buf.length - at);
        const sub = buf.subarray(at, at + n);
        const v = this.store.entry(b);
        if (v >= 2) {
          items.push({ fileOff: this.store.slotOffset(v - 2) + inBlock, data: sub, at, client: true });
        } else if (this.through && v === ABSENT) {
          const t = through[through.length - 1];
          if (t && t.off + t.len === abs) t.len += n;
          else through.push({ off: abs, at, len: n });
        } else {
          const slot = this.store.allocSlot();
          fresh.push([b, slot]);
          if (inBlock === 0 && n === this.blockLen(b)) {
            items.push({ fileOff: this.store.slotOffset(slot), data: sub, at, client: true });
          } else {
            const tmp = await this.blockFromBelow(b, v, io);
            sub.copy(tmp, inBlock);
            items.push({ fileOff: this.store.slotOffset(slot), data: tmp, at, client: false });
          }
        }
        at += n;
      }
      // Whole blocks of the client's buffer that land next to each other in the file: one write.
      const merged: Item[] = [];
      for (const it of items) {
        const p = merged[merged.length - 1];
        if (p && p.client && it.client && p.fileOff + p.data.length === it.fileOff && p.at + p.data.length === it.at)
          p.data = buf.subarray(p.at, it.at + it.data.length);
        else merged.push({ ...it });
      }
      const target = this.through;
      await Promise.all([
        ...merged.map((it) => this.store.write(it.data, it.fileOff)),
        ...through.map((t) => target!.pwrite(buf.subarray(t.at, t.at + t.len), t.off)),
      ]);
    } catch (err) {
      for (const [, slot] of fresh) this.store.returnSlot(slot);
      throw err;
    }
    for (const [b, slot] of fresh) this.store.set(b, slot + 2);
  }

  /** Zeroes [offset, offset + length): whole blocks are only marked zeroed, parts are written. */
  async zero(length: number, offset: number, io: Io): Promise<void> {
    const jobs: Promise<void>[] = [];
    const fresh: Array<[number, number]> = [];
    const marks: number[] = [];
    const target = this.through;
    try {
      for (let at = 0; at < length; ) {
        const abs = offset + at;
        const b = Math.floor(abs / this.bs);
        const inBlock = abs - b * this.bs;
        const n = Math.min(this.bs - inBlock, length - at);
        const v = this.store.entry(b);
        const whole = inBlock === 0 && n === this.blockLen(b);
        if (target && v === ABSENT) jobs.push(target.zero(n, abs));
        else if (whole) marks.push(b);
        else if (v === ZEROED) {
          /* already zero */
        } else if (v >= 2) jobs.push(this.store.write(Buffer.alloc(n), this.store.slotOffset(v - 2) + inBlock));
        else {
          const tmp = await this.blockFromBelow(b, v, io);
          tmp.fill(0, inBlock, inBlock + n);
          const slot = this.store.allocSlot();
          fresh.push([b, slot]);
          jobs.push(this.store.write(tmp, this.store.slotOffset(slot)));
        }
        at += n;
      }
      await Promise.all(jobs);
    } catch (err) {
      for (const [, slot] of fresh) this.store.returnSlot(slot);
      throw err;
    }
    for (const [b, slot] of fresh) this.store.set(b, slot + 2);
    for (const b of marks) this.store.set(b, ZEROED);
  }

  /**
   * Trims [offset, offset + length): whole blocks are dropped from the overlay (they read from
   * below again, which TRIM allows; their slots are reused once the map is durable), parts are
   * left as they are. While a merge runs (writes go through to its target) it zeroes instead.
   */
  async drop(length: number, offset: number, io: Io): Promise<void> {
    if (this.through) return this.zero(length, offset, io);
    const first = Math.ceil(offset / this.bs);
    for (let b = first; b * this.bs < offset + length; b++) {
      if (b * this.bs + this.blockLen(b) > offset + length) break;
      this.store.set(b, ABSENT);
    }
  }

  /** Makes everything completed so far durable (a merge's target first, then this overlay's map). */
  flush(): Promise<void> {
    const target = this.through;
    return this.store.flush(target ? () => target.flush() : undefined);
  }

  /**
   * Block status: overlay blocks are data, zeroed ones holes, the rest as the layer below says.
   * `depth`: blocks the overlay holds or zeroed are 1, the rest the layer below's depth plus one.
   */
  async extents(length: number, offset: number, io: Io, what: ExtentKind = "allocation"): Promise<Extent[]> {
    const depth = what === "depth";
    const out: Extent[] = [];
    const push = (len: number, flags: number) => {
      const last = out[out.length - 1];
      if (last && last.flags === flags) last.length += len;
      else out.push({ length: len, flags });
    };
    const end = offset + length;
    let pos = offset;
    while (pos < end) {
      const b = Math.floor(pos / this.bs);
      const kind = kindOf(this.store.entry(b));
      let runEnd = Math.min(end, b * this.bs + this.blockLen(b));
      while (runEnd < end && kindOf(this.store.entry(Math.floor(runEnd / this.bs))) === kind) runEnd = Math.min(end, runEnd + this.bs);
      if (kind === "below") {
        const from = await extentsFrom(this.below, runEnd - pos, pos, io, what);
        const got = depth ? deeper(from) : from;
        let n = 0;
        for (const e of got) {
          const len = Math.min(e.length, runEnd - pos - n);
          if (len <= 0) break;
          push(len, e.flags);
          n += len;
        }
        pos += n;
        if (pos < runEnd) break; // a short answer from below: the caller asks again
      } else {
        push(runEnd - pos, depth ? 1 : kind === "zero" ? ZERO_FLAGS : 0);
        pos = runEnd;
      }
    }
    if (out.length === 0) throw new NbdError("EIO", `no extents for ${length}@${offset}`);
    return out;
  }

  /** Block contents as the layer below has them, for read-modify-write. */
  private async blockFromBelow(b: number, v: number, io: Io): Promise<Buffer> {
    const len = this.blockLen(b);
    if (v === ZEROED) return Buffer.alloc(len);
    const tmp = Buffer.allocUnsafe(len);
    await readFrom(this.below, tmp, b * this.bs, io);
    return tmp;
  }
}

/** Reads any byte range of `below`, honouring its alignment and request size limits. */
export async function readFrom(below: Layer, buf: Buffer, offset: number, io: Io): Promise<void> {
  const c = below.capabilities().blockSize;
  const a = Math.max(1, c.minimum);
  if (a === 1 && buf.length <= c.maximum) return below.pread(buf, offset, io);
  const start = alignDown(offset, a);
  const end = Math.min(alignUp(offset + buf.length, a), below.size());
  const direct = start === offset && end === offset + buf.length;
  const tmp = direct ? buf : Buffer.allocUnsafe(end - start);
  const step = Math.max(a, alignDown(c.maximum, a));
  for (let at = 0; at < tmp.length; at += step) await below.pread(tmp.subarray(at, Math.min(tmp.length, at + step)), start + at, io);
  if (!direct) tmp.copy(buf, 0, offset - start, offset - start + buf.length);
}

/** The extents of any byte range of `below` (one of flags 0 if it has none), honouring its alignment. */
async function extentsFrom(below: Layer, length: number, offset: number, io: Io, kind: ExtentKind): Promise<Extent[]> {
  const c = below.capabilities().blockSize;
  const a = Math.max(1, c.minimum);
  if (!below.capabilities().extents) return [{ length, flags: kind === "depth" ? 1 : 0 }];
  if (a === 1) return below.extents(length, offset, io, kind);
  const start = alignDown(offset, a);
  const end = Math.min(alignUp(offset + length, a), below.size());
  const raw = await below.extents(end - start, start, io, kind);
  const out: Extent[] = [];
  let pos = start;
  for (const e of raw) {
    const s = Math.max(pos, offset);
    const t = Math.min(pos + e.length, offset + length);
    if (t > s) out.push({ length: t - s, flags: e.flags });
    pos += e.length;
    if (pos >= offset + length) break;
  }
  return out;
}

export function alignDown(n: number, a: number): number {
  return a <= 1 ? n : n - (n % a);
}
export function alignUp(n: number, a: number): number {
  if (a <= 1) return n;
  const r = n % a;
  return r === 0 ? n : n + a - r;
}
