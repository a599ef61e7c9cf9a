import { BaseFs, Device, pushRun, READ_FILE_MAX, type Run } from "./base-fs.js";
import {
  BlockMap,
  DirEntry,
  EXT_MAGIC,
  EXTENT_INIT_MAX_LEN,
  EXTENT_MAGIC,
  EXTENT_MAX_DEPTH,
  Extent,
  ExtentHeader,
  ExtentIndex,
  INCOMPAT_FILETYPE,
  INODE_FL_EXTENTS,
  INODE_FL_INLINE_DATA,
  InodeCore,
  InodeExtra,
  ROOT_INO,
  SB_OFFSET,
  Superblock,
  XATTR_INDEX_SYSTEM,
  XATTR_MAGIC,
  XattrEntry,
  XattrIbodyHeader,
} from "./ext-format.js";
import { ExtLayout } from "./ext-layout.js";
import { FsError, type AllocationRun, type FileStat, type FileType, type FsKind } from "./file-system.js";

/** Where i_block lies in an inode. */
const I_BLOCK = InodeCore.fields.block.offset;

interface Inode {
  ino: number;
  /** Byte offset of the inode on the device. */
  at: number;
  raw: Buffer;
  mode: number;
  uid: number;
  gid: number;
  size: number;
  mtime: number;
  links: number;
  flags: number;
  iblock: Buffer;
}

const TYPE_OF_MODE: Record<number, FileType> = {
  0x1000: "fifo",
  0x2000: "chardev",
  0x4000: "dir",
  0x6000: "blockdev",
  0x8000: "file",
  0xa000: "symlink",
  0xc000: "socket",
};

/** A read-only ext2/3/4 file system. */
export class ExtFs extends BaseFs<Inode> {
  readonly kind: FsKind;
  readonly label: string;
  readonly uuid: string;
  readonly blockSize: number;
  readonly totalBytes: number;
  readonly freeBytes: number;
  private readonly cache = new Map<number, Buffer>();

  private constructor(
    dev: Device,
    private readonly layout: ExtLayout,
  ) {
    super(dev);
    this.kind = layout.kind;
    this.label = layout.label;
    this.uuid = layout.uuid;
    this.blockSize = layout.blockSize;
    this.totalBytes = layout.totalBytes;
    this.freeBytes = layout.freeBytes;
    this.notes.push(...layout.notes);
    this.inUse = layout.inUse;
  }

  /** Reads the superblock at byte 1024; null when there is no ext magic there. */
  static async probe(dev: Device): Promise<ExtFs | null> {
    if (dev.size < SB_OFFSET + Superblock.size) return null;
    const sb = await dev.read(Superblock.size, SB_OFFSET, "ext superblock");
    if (Superblock.get(sb, "magic") !== EXT_MAGIC) return null;
    return new ExtFs(dev, await ExtLayout.read(dev, sb));
  }

  private async block(n: number, what: string): Promise<Buffer> {
    const hit = this.cache.get(n);
    if (hit) {
      this.cache.delete(n);
      this.cache.set(n, hit);
      return hit;
    }
    const b = await this.dev.read(this.layout.bs, n * this.layout.bs, what);
    this.cache.set(n, b);
    if (this.cache.size > 256) this.cache.delete(this.cache.keys().next().value!);
    return b;
  }

  private async inode(ino: number): Promise<Inode> {
    const { bs, inodeSize, inodesPerGroup, inodesCount } = this.layout;
    if (ino < 1 || ino > inodesCount) throw FsError.corrupt(`ext inode ${ino}`, 0, `inode number out of range (1 to ${inodesCount})`);
    const g = Math.floor((ino - 1) / inodesPerGroup);
    const idx = (ino - 1) % inodesPerGroup;
    const at = this.layout.groups[g]!.inodeTable * bs + idx * inodeSize;
    const blk = Math.floor(at / bs);
    const b = await this.block(blk, `ext inode table of group ${g}`);
    const raw = b.subarray(at - blk * bs, at - blk * bs + inodeSize);
    const i = InodeCore.read(raw);
    const hi = i.sizeHigh;
    if (hi >= 2 ** 21) throw FsError.corrupt(`ext inode ${ino}`, at, `size ${hi} × 2^32 is too large`);
    const ext = inodeSize > InodeCore.size ? InodeExtra.get(raw, "extraIsize") : 0;
    if (inodeSize > InodeCore.size && InodeCore.size + ext > inodeSize) throw FsError.corrupt(`ext inode ${ino}`, at, `extra inode size ${ext} exceeds the inode size ${inodeSize}`);
    return {
      ino,
      at,
      raw,
      mode: i.mode,
      uid: i.uid | (i.uidHigh << 16),
      gid: i.gid | (i.gidHigh << 16),
      size: i.sizeLo + hi * 2 ** 32,
      mtime: i.mtime,
      links: i.linksCount,
      flags: i.flags,
      iblock: i.block,
    };
  }

  protected root(): Promise<Inode> {
    return this.inode(ROOT_INO);
  }

  protected async statNode(n: Inode): Promise<FileStat> {
    const type = TYPE_OF_MODE[n.mode & 0xf000];
    if (!type) throw FsError.corrupt(`ext inode ${n.ino}`, n.at, `unknown file type in mode 0o${n.mode.toString(8)}`);
    return { type, size: type === "dir" || type === "file" || type === "symlink" ? n.size : 0, mode: n.mode, uid: n.uid, gid: n.gid, nlink: n.links, mtime: new Date(n.mtime * 1000), ino: n.ino };
  }

  /** The system.data extended attribute in the inode body (the rest of an inline file). */
  private inlineXattr(n: Inode): Buffer {
    if (this.layout.inodeSize <= InodeCore.size) return Buffer.alloc(0);
    const start = InodeCore.size + InodeExtra.get(n.raw, "extraIsize");
    if (start + XattrIbodyHeader.size > n.raw.length || XattrIbodyHeader.get(n.raw, "magic", start) !== XATTR_MAGIC) return Buffer.alloc(0);
    const base = start + XattrIbodyHeader.size;
    let p = base;
    while (p + XattrEntry.size <= n.raw.length) {
      const { nameLen, nameIndex, valueOffs, valueSize } = XattrEntry.read(n.raw, p);
      if (nameLen === 0 && nameIndex === 0 && valueOffs === 0) break; // the list ends with four zero bytes
      if (p + XattrEntry.size + nameLen > n.raw.length) break;
      const name = n.raw.subarray(p + XattrEntry.size, p + XattrEntry.size + nameLen).toString("latin1");
      if (nameIndex === XATTR_INDEX_SYSTEM && name === "data") {
        if (base + valueOffs + valueSize > n.raw.length) throw FsError.corrupt(`ext inode ${n.ino} inline data attribute`, n.at + p, `value of ${valueSize} bytes at ${valueOffs} runs past the inode`);
        return n.raw.subarray(base + valueOffs, base + valueOffs + valueSize);
      }
      p += (XattrEntry.size + nameLen + 3) & ~3;
    }
    return Buffer.alloc(0);
  }

  private isInline(n: Inode): boolean {
    return (n.flags & INODE_FL_INLINE_DATA) !== 0;
  }

  protected override dataInMetadata(n: Inode): boolean {
    return this.isInline(n);
  }

  private isFastSymlink(n: Inode): boolean {
    if ((n.mode & 0xf000) !== 0xa000 || this.isInline(n) || n.size >= 60) return false;
    return !(n.flags & INODE_FL_EXTENTS) || ExtentHeader.get(n.iblock, "magic") !== EXTENT_MAGIC;
  }

  protected async symlinkTarget(n: Inode, path: string): Promise<string> {
    if (n.size > 4096) throw FsError.corrupt(`ext inode ${n.ino} (symlink ${path})`, n.at, `target of ${n.size} bytes is longer than 4096`);
    if (this.isFastSymlink(n)) return n.iblock.subarray(0, n.size).toString("utf8");
    const runs = await this.mapNode(n, path);
    return (await this.readNode(n, runs, 0, n.size, `target of symlink ${path}`)).toString("utf8");
  }

  protected override async readNode(n: Inode, runs: Run[], offset: number, length: number, what: string): Promise<Buffer> {
    if (!this.isInline(n)) return super.readNode(n, runs, offset, length, what);
    const data = Buffer.concat([n.iblock, this.inlineXattr(n)]);
    const out = Buffer.alloc(length);
    if (offset < data.length) data.copy(out, 0, offset, Math.min(data.length, offset + length));
    return out;
  }

  protected async mapNode(n: Inode, path: string): Promise<Run[]> {
    const type = n.mode & 0xf000;
    if (this.isInline(n) || this.isFastSymlink(n) || (type !== 0x8000 && type !== 0x4000 && type !== 0xa000)) return [];
    if (n.flags & INODE_FL_EXTENTS) return this.mapExtents(n, path);
    return this.mapIndirect(n, path);
  }

  private async mapExtents(n: Inode, path: string): Promise<Run[]> {
    const runs: Run[] = [];
    const seen = new Set<number>();
    const bs = this.layout.bs;
    let nextLogical = 0;
    const fileBlocks = Math.ceil(n.size / bs);
    const walk = async (node: Buffer, at: number, depth: number | null, what: string): Promise<void> => {
      const { magic, entries, max, depth: d } = ExtentHeader.read(node);
      if (magic !== EXTENT_MAGIC) throw FsError.corrupt(what, at, `bad extent header magic 0x${magic.toString(16)}`);
      if (max === 0 || entries > max || ExtentHeader.size + max * Extent.size > node.length) throw FsError.corrupt(what, at, `${entries} of ${max} extent entries do not fit ${node.length} bytes`);
      if (d > EXTENT_MAX_DEPTH || (depth !== null && d !== depth)) throw FsError.corrupt(what, at, `extent tree depth ${d}${depth !== null ? `, expected ${depth}` : ""}`);
      for (let i = 0; i < entries; i++) {
        const o = ExtentHeader.size + i * Extent.size;
        if (d > 0) {
          const idx = ExtentIndex.read(node, o);
          const child = idx.leafLo + idx.leafHi * 2 ** 32;
          if (child < this.layout.firstDataBlock || child >= this.layout.blocks) throw FsError.corrupt(what, at + o, `extent index points at block ${child}, outside the file system`);
          if (seen.has(child)) throw FsError.corrupt(what, at + o, `extent tree block ${child} is used twice`);
          seen.add(child);
          const b = await this.dev.read(bs, child * bs, `extent tree block of ${path}`);
          await walk(b, child * bs, d - 1, `ext extent tree block ${child} (inode ${n.ino}, ${path})`);
          continue;
        }
        const e = Extent.read(node, o);
        const logical = e.block;
        let len = e.len;
        const unwritten = len > EXTENT_INIT_MAX_LEN;
        if (unwritten) len -= EXTENT_INIT_MAX_LEN;
        const phys = e.startLo + e.startHi * 2 ** 32;
        if (len === 0) continue;
        if (logical < nextLogical) throw FsError.corrupt(what, at + o, `extent for file block ${logical} overlaps or is out of order (expected ≥ ${nextLogical})`);
        if (phys < this.layout.firstDataBlock || phys + len > this.layout.blocks) throw FsError.corrupt(what, at + o, `extent of ${len} blocks at block ${phys} lies outside the file system (${this.layout.blocks} blocks)`);
        nextLogical = logical + len;
        if (unwritten || logical >= fileBlocks) continue;
        const bytes = Math.min(len * bs, n.size - logical * bs);
        pushRun(runs, logical * bs, phys * bs, bytes);
      }
    };
    await walk(n.iblock, n.at + I_BLOCK, null, `ext inode ${n.ino} (${path}) extent root`);
    return runs;
  }

  private async mapIndirect(n: Inode, path: string): Promise<Run[]> {
    const bs = this.layout.bs;
    const per = bs / 4;
    const fileBlocks = Math.ceil(n.size / bs);
    const runs: Run[] = [];
    const seen = new Set<number>();
    const what = `ext inode ${n.ino} (${path})`;
    const check = (blk: number, where: number, kind: string) => {
      if (blk < this.layout.firstDataBlock || blk >= this.layout.blocks) throw FsError.corrupt(what, where, `${kind} block pointer ${blk} is outside the file system (${this.layout.blocks} blocks)`);
    };
    const data = (logical: number, blk: number, where: number) => {
      check(blk, where, "data");
      pushRun(runs, logical * bs, blk * bs, Math.min(bs, n.size - logical * bs));
    };
    // level 1: a block of pointers to data; level 2: pointers to level-1 blocks; and so on.
    const walk = async (blk: number, level: number, first: number, where: number): Promise<void> => {
      check(blk, where, "indirect");
      if (seen.has(blk)) throw FsError.corrupt(what, where, `indirect block ${blk} is used twice`);
      seen.add(blk);
      const b = await this.dev.read(bs, blk * bs, `indirect block of ${path}`);
      const span = per ** (level - 1);
      for (let i = 0; i < per; i++) {
        const logical = first + i * span;
        if (logical >= fileBlocks) break;
        const p = b.readUInt32LE(i * 4);
        if (p === 0) continue;
        if (level === 1) data(logical, p, blk * bs + i * 4);
        else await walk(p, level - 1, logical, blk * bs + i * 4);
      }
    };
    const map = BlockMap.read(n.iblock);
    const direct = map.direct.length;
    for (let i = 0; i < direct && i < fileBlocks; i++) {
      const p = map.direct[i]!;
      if (p !== 0) data(i, p, n.at + I_BLOCK + BlockMap.fields.direct.offset + i * 4);
    }
    let first = direct;
    for (let level = 1; level <= 3; level++) {
      const p = map.indirect[level - 1]!;
      if (first >= fileBlocks) break;
      if (p !== 0) await walk(p, level, first, n.at + I_BLOCK + BlockMap.fields.indirect.offset + (level - 1) * 4);
      first += per ** level;
    }
    return runs;
  }

  /** Directory entries, "." and ".." left out. */
  private async entries(dir: Inode, path: string): Promise<Array<{ name: string; ino: number }>> {
    if (dir.size > Math.min(READ_FILE_MAX, this.dev.size) && !this.isInline(dir))
      throw FsError.corrupt(`ext inode ${dir.ino} (directory ${path})`, dir.at, `size ${dir.size} is larger than the device`);
    const out: Array<{ name: string; ino: number }> = [];
    const parse = (b: Buffer, start: number, end: number, where: (pos: number) => string) => {
      let p = start;
      while (p + DirEntry.size <= end) {
        const e = DirEntry.read(b, p);
        const ino = e.inode;
        const recLen = e.recLen;
        const nameLen = this.layout.incompat & INCOMPAT_FILETYPE ? e.nameLen : e.nameLen16;
        if (recLen < DirEntry.size || recLen % 4 !== 0 || p + recLen > end || DirEntry.size + nameLen > recLen)
          throw new FsError("corrupt", `${where(p)}: bad directory entry (rec_len ${recLen}, name_len ${nameLen}) of directory ${path}`);
        if (ino !== 0 && nameLen > 0) {
          const name = b.subarray(p + DirEntry.size, p + DirEntry.size + nameLen).toString("utf8");
          if (ino > this.layout.inodesCount) throw new FsError("corrupt", `${where(p)}: directory entry "${name}" of ${path} names inode ${ino}, beyond the ${this.layout.inodesCount} inodes`);
          if (name !== "." && name !== "..") out.push({ name, ino });
        }
        p += recLen;
      }
    };
    if (this.isInline(dir)) {
      const iAt = dir.at + I_BLOCK;
      parse(dir.iblock, 4, Math.min(60, Math.max(4, dir.size)), (p) => `ext inode ${dir.ino} inline directory at byte ${iAt + p}`);
      const x = this.inlineXattr(dir);
      parse(x, 0, x.length, (p) => `ext inode ${dir.ino} inline directory attribute, entry at ${p}`);
      return out;
    }
    const runs = await this.mapNode(dir, path);
    for (const r of runs) {
      const b = await this.dev.read(r.length, r.deviceOffset, `directory ${path}`);
      for (let s = 0; s < b.length; s += this.layout.bs) parse(b, s, Math.min(b.length, s + this.layout.bs), (p) => `ext directory block at byte ${r.deviceOffset + p}`);
    }
    return out;
  }

  protected async list(dir: Inode, path: string): Promise<Array<{ name: string; node: Inode }>> {
    const out: Array<{ name: string; node: Inode }> = [];
    for (const e of await this.entries(dir, path)) out.push({ name: e.name, node: await this.inode(e.ino) });
    return out;
  }

  protected async lookup(dir: Inode, name: string, path: string): Promise<Inode | null> {
    const e = (await this.entries(dir, path)).find((x) => x.name === name);
    return e ? this.inode(e.ino) : null;
  }

  allocationMap(): Promise<AllocationRun[]> {
    return this.layout.allocationMap();
  }
}

