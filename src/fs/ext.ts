import { BaseFs, Device, pushAlloc, pushRun, READ_FILE_MAX, type Run } from "./base-fs.js";
import {
  BG_BLOCK_UNINIT,
  BlockMap,
  COMPAT_HAS_JOURNAL,
  COMPAT_SPARSE_SUPER2,
  DirEntry,
  EXT_MAGIC,
  EXTENT_INIT_MAX_LEN,
  EXTENT_MAGIC,
  EXTENT_MAX_DEPTH,
  Extent,
  ExtentHeader,
  ExtentIndex,
  GroupDesc,
  GroupDescHi,
  INCOMPAT_64BIT,
  INCOMPAT_COMPRESSION,
  INCOMPAT_DIRDATA,
  INCOMPAT_EXTENTS,
  INCOMPAT_FILETYPE,
  INCOMPAT_FLEX_BG,
  INCOMPAT_INLINE_DATA,
  INCOMPAT_JOURNAL_DEV,
  INCOMPAT_META_BG,
  INCOMPAT_RECOVER,
  INODE_FL_EXTENTS,
  INODE_FL_INLINE_DATA,
  InodeCore,
  InodeExtra,
  RO_COMPAT_BIGALLOC,
  RO_COMPAT_DIR_NLINK,
  RO_COMPAT_EXTRA_ISIZE,
  RO_COMPAT_GDT_CSUM,
  RO_COMPAT_HUGE_FILE,
  RO_COMPAT_METADATA_CSUM,
  RO_COMPAT_SPARSE_SUPER,
  ROOT_INO,
  SB_OFFSET,
  STATE_ERROR_FS,
  Superblock,
  XATTR_INDEX_SYSTEM,
  XATTR_MAGIC,
  XattrEntry,
  XattrIbodyHeader,
} from "./ext-format.js";
import { FsError, type AllocationRun, type FileStat, type FileType, type FsKind } from "./file-system.js";

/** Where i_block lies in an inode. */
const I_BLOCK = InodeCore.fields.block.offset;

interface Group {
  blockBitmap: number;
  inodeBitmap: number;
  inodeTable: number;
  freeBlocks: number;
  flags: number;
  /** Byte offset of the descriptor, for error messages. */
  at: number;
}

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

function isPowerOf(n: number, b: number): boolean {
  while (n > 1 && n % b === 0) n /= b;
  return n === 1;
}

/** A read-only ext2/3/4 file system. */
export class ExtFs extends BaseFs<Inode> {
  kind!: FsKind;
  label!: string;
  uuid!: string;
  blockSize!: number;
  totalBytes!: number;
  freeBytes!: number;

  private sb!: ReturnType<typeof Superblock.read>;
  private bs = 0;
  private blocks = 0;
  private firstDataBlock = 0;
  private blocksPerGroup = 0;
  private clustersPerGroup = 0;
  /** Blocks per cluster (1 without bigalloc). */
  private clusterRatio = 1;
  private inodesPerGroup = 0;
  private inodesCount = 0;
  private inodeSize = InodeCore.size;
  private descSize = 32;
  private groupCount = 0;
  private incompat = 0;
  private roCompat = 0;
  private compat = 0;
  private groups: Group[] = [];
  private readonly cache = new Map<number, Buffer>();

  /** Reads the superblock at byte 1024; null when there is no ext magic there. */
  static async probe(dev: Device): Promise<ExtFs | null> {
    if (dev.size < SB_OFFSET + 1024) return null;
    const sb = await dev.read(Superblock.size, SB_OFFSET, "ext superblock");
    if (Superblock.get(sb, "magic") !== EXT_MAGIC) return null;
    const fs = new ExtFs(dev);
    await fs.load(sb);
    return fs;
  }

  private bad(reason: string): FsError {
    return FsError.corrupt("ext superblock", SB_OFFSET, reason);
  }

  private async load(raw: Buffer): Promise<void> {
    const sb = (this.sb = Superblock.read(raw));
    const logBs = sb.logBlockSize;
    if (logBs > 6) throw this.bad(`block size 2^(10+${logBs}) is not 1 KiB to 64 KiB`);
    this.bs = 1024 << logBs;
    this.compat = sb.featureCompat;
    this.incompat = sb.featureIncompat;
    this.roCompat = sb.featureRoCompat;
    const rev = sb.revLevel;
    const is64 = (this.incompat & INCOMPAT_64BIT) !== 0;
    this.blocks = sb.blocksCountLo + (is64 ? sb.blocksCountHi * 2 ** 32 : 0);
    this.firstDataBlock = sb.firstDataBlock;
    this.blocksPerGroup = sb.blocksPerGroup;
    this.inodesPerGroup = sb.inodesPerGroup;
    this.inodesCount = sb.inodesCount;
    if (this.incompat & INCOMPAT_JOURNAL_DEV) throw new FsError("unsupported", "ext superblock at byte 1024: an external journal device, not a file system");
    if (this.incompat & INCOMPAT_COMPRESSION) throw new FsError("unsupported", "ext superblock at byte 1024: compression is not supported");
    if (this.incompat & INCOMPAT_DIRDATA) throw new FsError("unsupported", "ext superblock at byte 1024: dirdata is not supported");
    if (this.roCompat & RO_COMPAT_BIGALLOC) {
      const logCs = sb.logClusterSize;
      if (logCs < logBs || logCs - logBs > 16) throw this.bad(`cluster size 2^(10+${logCs}) does not fit block size ${this.bs}`);
      this.clusterRatio = 2 ** (logCs - logBs);
      this.clustersPerGroup = sb.clustersPerGroup;
      if (this.clustersPerGroup * this.clusterRatio !== this.blocksPerGroup) throw this.bad(`clusters per group ${this.clustersPerGroup} × ${this.clusterRatio} is not blocks per group ${this.blocksPerGroup}`);
    } else this.clustersPerGroup = this.blocksPerGroup;
    if (this.blocks === 0 || this.blocks * this.bs > this.dev.size)
      throw this.bad(`${this.blocks} blocks of ${this.bs} bytes do not fit the device (${this.dev.size} bytes)`);
    if (this.firstDataBlock >= this.blocks || this.firstDataBlock !== (this.bs === 1024 && this.clusterRatio === 1 ? 1 : 0))
      throw this.bad(`first data block ${this.firstDataBlock} is wrong for block size ${this.bs}`);
    if (this.clustersPerGroup === 0 || this.clustersPerGroup > this.bs * 8) throw this.bad(`${this.clustersPerGroup} blocks per group (1 to ${this.bs * 8})`);
    if (this.inodesPerGroup === 0 || this.inodesPerGroup > this.bs * 8) throw this.bad(`${this.inodesPerGroup} inodes per group (1 to ${this.bs * 8})`);
    if (rev >= 1) {
      this.inodeSize = sb.inodeSize;
      if (this.inodeSize < InodeCore.size || this.inodeSize > this.bs || (this.inodeSize & (this.inodeSize - 1)) !== 0) throw this.bad(`inode size ${this.inodeSize}`);
    }
    this.groupCount = Math.ceil((this.blocks - this.firstDataBlock) / this.blocksPerGroup);
    if (this.inodesCount > this.groupCount * this.inodesPerGroup || this.inodesCount < ROOT_INO)
      throw this.bad(`${this.inodesCount} inodes do not fit ${this.groupCount} groups of ${this.inodesPerGroup}`);
    if (is64) {
      this.descSize = sb.descSize;
      if (this.descSize < 64 || this.descSize > 1024 || (this.descSize & (this.descSize - 1)) !== 0) throw this.bad(`group descriptor size ${this.descSize}`);
    }
    // Counted in blocks even with bigalloc (the group descriptors count clusters).
    const freeBlocks = sb.freeBlocksCountLo + (is64 ? sb.freeBlocksCountHi * 2 ** 32 : 0);
    this.blockSize = this.bs * this.clusterRatio;
    this.totalBytes = this.blocks * this.bs;
    this.freeBytes = Math.min(freeBlocks * this.bs, this.totalBytes);
    this.label = sb.volumeName;
    const u = sb.uuid.toString("hex");
    this.uuid = `${u.slice(0, 8)}-${u.slice(8, 12)}-${u.slice(12, 16)}-${u.slice(16, 20)}-${u.slice(20)}`;
    const ext4 =
      (this.incompat & (INCOMPAT_EXTENTS | INCOMPAT_64BIT | INCOMPAT_FLEX_BG | INCOMPAT_INLINE_DATA)) !== 0 ||
      (this.roCompat & (RO_COMPAT_HUGE_FILE | RO_COMPAT_GDT_CSUM | RO_COMPAT_DIR_NLINK | RO_COMPAT_EXTRA_ISIZE | RO_COMPAT_METADATA_CSUM | RO_COMPAT_BIGALLOC)) !== 0;
    this.kind = ext4 ? "ext4" : this.compat & COMPAT_HAS_JOURNAL ? "ext3" : "ext2";
    if (this.incompat & INCOMPAT_RECOVER) this.notes.push("the journal needs recovery: recent changes may not be visible");
    if (sb.state & STATE_ERROR_FS) this.notes.push("the file system has errors (state: not clean)");
    await this.loadGroups();
  }

  private get descPerBlock(): number {
    return this.bs / this.descSize;
  }

  private groupFirstBlock(g: number): number {
    return this.firstDataBlock + g * this.blocksPerGroup;
  }

  private groupHasSuper(g: number): boolean {
    if (g === 0) return true;
    if (this.compat & COMPAT_SPARSE_SUPER2) return g === this.sb.backupBgs[0] || g === this.sb.backupBgs[1];
    if (g <= 1 || !(this.roCompat & RO_COMPAT_SPARSE_SUPER)) return true;
    if (!(g & 1)) return false;
    return isPowerOf(g, 3) || isPowerOf(g, 5) || isPowerOf(g, 7);
  }

  private get metaBg(): boolean {
    return (this.incompat & INCOMPAT_META_BG) !== 0;
  }

  /** Block holding descriptor block `i` (the primary copy). */
  private descBlock(i: number): number {
    const firstMeta = this.sb.firstMetaBg;
    if (!this.metaBg || i < firstMeta) return this.firstDataBlock + 1 + i;
    const g = i * this.descPerBlock;
    return this.groupFirstBlock(g) + (this.groupHasSuper(g) ? 1 : 0);
  }

  private async loadGroups(): Promise<void> {
    const descBlocks = Math.ceil(this.groupCount / this.descPerBlock);
    const hi = this.incompat & INCOMPAT_64BIT;
    const itBlocks = Math.ceil((this.inodesPerGroup * this.inodeSize) / this.bs);
    for (let i = 0; i < descBlocks; i++) {
      const blk = this.descBlock(i);
      if (blk >= this.blocks) throw this.bad(`group descriptor block ${i} lies at block ${blk}, beyond the ${this.blocks} blocks`);
      const b = await this.dev.read(this.bs, blk * this.bs, `ext group descriptor block ${i}`);
      for (let j = 0; j < this.descPerBlock && this.groups.length < this.groupCount; j++) {
        const o = j * this.descSize;
        const d = GroupDesc.read(b, o);
        const h = hi ? GroupDescHi.read(b, o) : { blockBitmapHi: 0, inodeBitmapHi: 0, inodeTableHi: 0, freeBlocksCountHi: 0 };
        const g: Group = {
          blockBitmap: d.blockBitmapLo + h.blockBitmapHi * 2 ** 32,
          inodeBitmap: d.inodeBitmapLo + h.inodeBitmapHi * 2 ** 32,
          inodeTable: d.inodeTableLo + h.inodeTableHi * 2 ** 32,
          freeBlocks: d.freeBlocksCountLo + h.freeBlocksCountHi * 65536,
          flags: d.flags,
          at: blk * this.bs + o,
        };
        const n = this.groups.length;
        const where = `ext group descriptor ${n}`;
        if (g.blockBitmap < this.firstDataBlock || g.blockBitmap >= this.blocks) throw FsError.corrupt(where, g.at, `block bitmap at block ${g.blockBitmap}, outside the file system (${this.blocks} blocks)`);
        if (g.inodeBitmap < this.firstDataBlock || g.inodeBitmap >= this.blocks) throw FsError.corrupt(where, g.at, `inode bitmap at block ${g.inodeBitmap}, outside the file system`);
        if (g.inodeTable < this.firstDataBlock || g.inodeTable + itBlocks > this.blocks) throw FsError.corrupt(where, g.at, `inode table at block ${g.inodeTable} (${itBlocks} blocks), outside the file system`);
        this.groups.push(g);
      }
    }
  }

  private async block(n: number, what: string): Promise<Buffer> {
    const hit = this.cache.get(n);
    if (hit) {
      this.cache.delete(n);
      this.cache.set(n, hit);
      return hit;
    }
    const b = await this.dev.read(this.bs, n * this.bs, what);
    this.cache.set(n, b);
    if (this.cache.size > 256) this.cache.delete(this.cache.keys().next().value!);
    return b;
  }

  private async inode(ino: number): Promise<Inode> {
    if (ino < 1 || ino > this.inodesCount) throw FsError.corrupt(`ext inode ${ino}`, 0, `inode number out of range (1 to ${this.inodesCount})`);
    const g = Math.floor((ino - 1) / this.inodesPerGroup);
    const idx = (ino - 1) % this.inodesPerGroup;
    const at = this.groups[g]!.inodeTable * this.bs + idx * this.inodeSize;
    const blk = Math.floor(at / this.bs);
    const b = await this.block(blk, `ext inode table of group ${g}`);
    const raw = b.subarray(at - blk * this.bs, at - blk * this.bs + this.inodeSize);
    const i = InodeCore.read(raw);
    const hi = i.sizeHigh;
    if (hi >= 2 ** 21) throw FsError.corrupt(`ext inode ${ino}`, at, `size ${hi} × 2^32 is too large`);
    const ext = this.inodeSize > InodeCore.size ? InodeExtra.get(raw, "extraIsize") : 0;
    if (this.inodeSize > InodeCore.size && InodeCore.size + ext > this.inodeSize) throw FsError.corrupt(`ext inode ${ino}`, at, `extra inode size ${ext} exceeds the inode size ${this.inodeSize}`);
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
    if (this.inodeSize <= InodeCore.size) return Buffer.alloc(0);
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
    const bs = this.bs;
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
          if (child < this.firstDataBlock || child >= this.blocks) throw FsError.corrupt(what, at + o, `extent index points at block ${child}, outside the file system`);
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
        if (phys < this.firstDataBlock || phys + len > this.blocks) throw FsError.corrupt(what, at + o, `extent of ${len} blocks at block ${phys} lies outside the file system (${this.blocks} blocks)`);
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
    const bs = this.bs;
    const per = bs / 4;
    const fileBlocks = Math.ceil(n.size / bs);
    const runs: Run[] = [];
    const seen = new Set<number>();
    const what = `ext inode ${n.ino} (${path})`;
    const check = (blk: number, where: number, kind: string) => {
      if (blk < this.firstDataBlock || blk >= this.blocks) throw FsError.corrupt(what, where, `${kind} block pointer ${blk} is outside the file system (${this.blocks} blocks)`);
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
        const nameLen = this.incompat & INCOMPAT_FILETYPE ? e.nameLen : e.nameLen16;
        if (recLen < DirEntry.size || recLen % 4 !== 0 || p + recLen > end || DirEntry.size + nameLen > recLen)
          throw new FsError("corrupt", `${where(p)}: bad directory entry (rec_len ${recLen}, name_len ${nameLen}) of directory ${path}`);
        if (ino !== 0 && nameLen > 0) {
          const name = b.subarray(p + DirEntry.size, p + DirEntry.size + nameLen).toString("utf8");
          if (ino > this.inodesCount) throw new FsError("corrupt", `${where(p)}: directory entry "${name}" of ${path} names inode ${ino}, beyond the ${this.inodesCount} inodes`);
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
      for (let s = 0; s < b.length; s += this.bs) parse(b, s, Math.min(b.length, s + this.bs), (p) => `ext directory block at byte ${r.deviceOffset + p}`);
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

  /** Blocks of group g that hold metadata, for groups whose bitmap was never written (BLOCK_UNINIT). */
  private uninitUsed(g: number, mark: (blk: number, count: number) => void): void {
    let groupBlock = this.groupFirstBlock(g);
    if (groupBlock === 0 && this.bs === 1024) groupBlock = 1;
    const hasSuper = this.groupHasSuper(g);
    const firstMeta = this.sb.firstMetaBg;
    const descBlocks = Math.ceil(this.groupCount / this.descPerBlock);
    const oldDescBlocks = this.metaBg ? firstMeta : descBlocks + this.sb.reservedGdtBlocks;
    if (hasSuper) mark(groupBlock, 1);
    const metaGroup = Math.floor(g / this.descPerBlock);
    if (!this.metaBg || metaGroup < firstMeta) {
      if (hasSuper) mark(groupBlock + 1, Math.min(oldDescBlocks, this.blocks - groupBlock - 1));
    } else {
      const r = g % this.descPerBlock;
      if (r === 0 || r === 1 || r === this.descPerBlock - 1) mark(groupBlock + (hasSuper ? 1 : 0), 1);
    }
    const itBlocks = Math.ceil((this.inodesPerGroup * this.inodeSize) / this.bs);
    for (const grp of this.groups) {
      mark(grp.blockBitmap, 1);
      mark(grp.inodeBitmap, 1);
      mark(grp.inodeTable, itBlocks);
    }
  }

  async allocationMap(): Promise<AllocationRun[]> {
    const out: AllocationRun[] = [];
    const bs = this.bs;
    const unit = bs * this.clusterRatio;
    pushAlloc(out, 0, this.firstDataBlock * bs, true);
    const csum = (this.roCompat & (RO_COMPAT_GDT_CSUM | RO_COMPAT_METADATA_CSUM)) !== 0;
    for (let g = 0; g < this.groupCount; g++) {
      const first = this.groupFirstBlock(g);
      const blocksHere = Math.min(this.blocksPerGroup, this.blocks - first);
      const clusters = Math.ceil(blocksHere / this.clusterRatio);
      const grp = this.groups[g]!;
      let bm: Uint8Array;
      if (csum && grp.flags & BG_BLOCK_UNINIT) {
        const used = new Uint8Array(Math.ceil(clusters / 8));
        this.uninitUsed(g, (blk, count) => {
          for (let b = Math.max(blk, first); b < Math.min(blk + count, first + blocksHere); b++) {
            const c = Math.floor((b - first) / this.clusterRatio);
            used[c >> 3]! |= 1 << (c & 7);
          }
        });
        bm = used;
      } else bm = await this.dev.read(bs, grp.blockBitmap * bs, `ext block bitmap of group ${g}`);
      const end = (first + blocksHere) * bs;
      bitRuns(bm, clusters, (start, count, used) => {
        const off = first * bs + start * unit;
        pushAlloc(out, off, Math.min(count * unit, end - off), used);
      });
    }
    pushAlloc(out, this.blocks * bs, this.dev.size - this.blocks * bs, true);
    return out;
  }
}

/** Calls back once per run of equal bits among the first `count` bits (LSB first) of a bitmap. */
export function bitRuns(bm: Uint8Array, count: number, cb: (start: number, length: number, set: boolean) => void): void {
  let runStart = 0;
  let runSet = count > 0 && (bm[0]! & 1) === 1;
  let i = 0;
  while (i < count) {
    const byte = bm[i >> 3]!;
    if ((i & 7) === 0 && i + 8 <= count && (byte === 0 || byte === 0xff)) {
      const set = byte === 0xff;
      if (set !== runSet) {
        cb(runStart, i - runStart, runSet);
        runStart = i;
        runSet = set;
      }
      i += 8;
      continue;
    }
    const set = ((byte >> (i & 7)) & 1) === 1;
    if (set !== runSet) {
      cb(runStart, i - runStart, runSet);
      runStart = i;
      runSet = set;
    }
    i++;
  }
  if (count > runStart) cb(runStart, count - runStart, runSet);
}
