import { NbdError } from "../../errors.js";
import { FsError, type FileExtent, type FsKind } from "../../fs/probe.js";
import { State } from "../../protocol/constants.js";
import { PassthroughLayer, type Capabilities, type Extent, type Io, type Layer } from "../layer.js";
import { probeLayer } from "./fs-probe.js";

/** Where one file's bytes are in its file system, as read when the device below was opened. */
export interface FileMap {
  /** Device runs holding the file's data (holes and unwritten extents left out). */
  runs: FileExtent[];
  size: number;
  kind: FsKind;
}

/**
 * Finds the file system on `dev` (open) and the file `path` in it, and reads the file's extents:
 * the fs-file kind's prepare hook. No file system, no such file or a damaged structure is an NbdError.
 */
export async function readFileMap(dev: Layer, path: string): Promise<FileMap> {
  try {
    const fs = await probeLayer(dev);
    if (!fs) throw new NbdError("EINVAL", `no ext2/3/4 or FAT file system on ${dev.describe()}`);
    const file = await fs.open(path);
    return { runs: await file.extents(), size: file.size, kind: fs.kind };
  } catch (err) {
    if (err instanceof FsError) throw new NbdError(err.code === "corrupt" ? "EIO" : "EINVAL", `file ${path} on ${dev.describe()}: ${err.message}`);
    throw err;
  }
}

/** A piece of a request: file bytes [fileOffset, +length) at deviceOffset, or -1 in a hole. */
interface Piece {
  fileOffset: number;
  length: number;
  deviceOffset: number;
}

/**
 * One regular file stored in an ext2/3/4 or FAT file system, served as a device of its own
 * (a disk image kept inside a partition). Its size is the file's size; every offset is mapped
 * through the file's extents, read once at open, onto the device below.
 * Ranges are checked by the guard at the top of the stack (past the end: ENOSPC for writes).
 * - Holes (and unwritten, preallocated extents) read as zeroes and are reported as HOLE|ZERO.
 * - Writes go only into blocks the file already owns: a write that touches a hole gets EPERM
 *   and writes nothing; the file system's metadata (sizes, times, bitmaps) is never changed.
 * - zero() writes zeroes into the file's blocks and leaves holes as they are; trim goes to the
 *   file's blocks (holes are left out), as the device below offers it: the blocks stay the file's
 *   (the file system's metadata is not touched) and read as whatever the device then gives, which
 *   TRIM allows.
 * The mapping is a snapshot: the file must not be changed through another path while served.
 */
export class FsFileLayer extends PassthroughLayer {
  private caps: Capabilities | null = null;

  /** Over `next`, which is open and stays so while this layer is (whoever opened it closes it). */
  constructor(
    next: Layer,
    readonly path: string,
    private readonly map: FileMap,
  ) {
    super(next);
  }

  private get runs(): FileExtent[] {
    return this.map.runs;
  }
  private get bytes(): number {
    return this.map.size;
  }

  override describe(): string {
    return `file ${this.path} (${this.map.kind}) → ${this.next.describe()}`;
  }

  /** Checks that the file's data sits on whole blocks of the device below. */
  override async open(): Promise<void> {
    const c = this.next.capabilities();
    const min = c.blockSize.minimum;
    const odd = this.runs.find((r) => r.deviceOffset % min !== 0 || r.fileOffset % min !== 0 || (r.length % min !== 0 && r.fileOffset + r.length !== this.bytes));
    if (odd)
      throw new NbdError("EINVAL", `file ${this.path}: its data at file offset ${odd.fileOffset} (device offset ${odd.deviceOffset}) is not aligned to the ${min}-byte blocks of ${this.next.describe()}`);
    this.caps = { ...c, extents: true, depth: false }; // a file's bytes have no place in a backing chain
  }

  override async close(): Promise<void> {
    this.caps = null;
  }

  /** Device runs holding the file's data, as read at open (holes and unwritten extents left out). */
  fileExtents(): FileExtent[] {
    return this.runs.map((r) => ({ ...r }));
  }

  override size(): number {
    return this.bytes;
  }

  override capabilities(): Capabilities {
    if (!this.caps) throw new NbdError("ESHUTDOWN", `file ${this.path}: the layer is not open`);
    return this.caps;
  }

  /** Splits [offset, offset + length) of the file into data pieces and holes. */
  private pieces(offset: number, length: number): Piece[] {
    const out: Piece[] = [];
    const end = offset + length;
    let lo = 0;
    let hi = this.runs.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      const r = this.runs[mid]!;
      if (r.fileOffset + r.length <= offset) lo = mid + 1;
      else hi = mid;
    }
    let pos = offset;
    for (let i = lo; i < this.runs.length && pos < end; i++) {
      const r = this.runs[i]!;
      if (r.fileOffset >= end) break;
      if (r.fileOffset > pos) {
        out.push({ fileOffset: pos, length: r.fileOffset - pos, deviceOffset: -1 });
        pos = r.fileOffset;
      }
      const e = Math.min(end, r.fileOffset + r.length);
      out.push({ fileOffset: pos, length: e - pos, deviceOffset: r.deviceOffset + (pos - r.fileOffset) });
      pos = e;
    }
    if (pos < end) out.push({ fileOffset: pos, length: end - pos, deviceOffset: -1 });
    return out;
  }

  override async pread(buf: Buffer, offset: number, io: Io): Promise<void> {
    const jobs: Array<Promise<void>> = [];
    for (const p of this.pieces(offset, buf.length)) {
      const slice = buf.subarray(p.fileOffset - offset, p.fileOffset - offset + p.length);
      if (p.deviceOffset < 0) slice.fill(0);
      else jobs.push(this.next.pread(slice, p.deviceOffset, io));
    }
    await Promise.all(jobs);
  }

  override async pwrite(buf: Buffer, offset: number, io: Io): Promise<void> {
    const pieces = this.pieces(offset, buf.length);
    const hole = pieces.find((p) => p.deviceOffset < 0);
    if (hole)
      throw new NbdError(
        "EPERM",
        `pwrite of ${buf.length} bytes at ${offset} touches ${hole.length} bytes at ${hole.fileOffset} that ${this.path} has no blocks for (a hole); only the file's own blocks can be written`,
        hole.fileOffset,
      );
    await Promise.all(pieces.map((p) => this.next.pwrite(buf.subarray(p.fileOffset - offset, p.fileOffset - offset + p.length), p.deviceOffset, io)));
  }

  override async zero(length: number, offset: number, io: Io): Promise<void> {
    const data = this.pieces(offset, length).filter((p) => p.deviceOffset >= 0);
    await Promise.all(data.map((p) => this.next.zero(p.length, p.deviceOffset, io)));
  }

  override async trim(length: number, offset: number, io: Io): Promise<void> {
    const data = this.pieces(offset, length).filter((p) => p.deviceOffset >= 0);
    await Promise.all(data.map((p) => this.next.trim(p.length, p.deviceOffset, io)));
  }

  override async cache(length: number, offset: number, io: Io): Promise<void> {
    const data = this.pieces(offset, length).filter((p) => p.deviceOffset >= 0);
    await Promise.all(data.map((p) => this.next.cache(p.length, p.deviceOffset, io)));
  }

  override async extents(length: number, offset: number, io: Io): Promise<Extent[]> {
    const out: Extent[] = [];
    const add = (len: number, flags: number) => {
      const last = out[out.length - 1];
      if (last && last.flags === flags) last.length += len;
      else out.push({ length: len, flags });
    };
    const below = this.next.capabilities().extents;
    for (const p of this.pieces(offset, length)) {
      if (p.deviceOffset < 0) {
        add(p.length, State.NBD_STATE_HOLE | State.NBD_STATE_ZERO);
        continue;
      }
      if (!below) {
        add(p.length, 0);
        continue;
      }
      // The device's own view of the data blocks (ZERO where they read as zero); stop at a short answer.
      let got = 0;
      for (const e of await this.next.extents(p.length, p.deviceOffset, io)) {
        const n = Math.min(e.length, p.length - got);
        if (n <= 0) break;
        add(n, e.flags);
        got += n;
      }
      if (got < p.length) break;
    }
    return out;
  }
}

/** The layer for `path` inside the file system on `below`, which is open and belongs to its opener. */
export async function createFsFileLayer(below: Layer, path: string): Promise<FsFileLayer> {
  return new FsFileLayer(below, path, await readFileMap(below, path));
}
