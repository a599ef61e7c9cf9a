import { Device, pushAlloc } from "./base-fs.js";
import {
  BG_BLOCK_UNINIT,
  COMPAT_HAS_JOURNAL,
  COMPAT_SPARSE_SUPER2,
  GroupDesc,
  GroupDescHi,
  INCOMPAT_64BIT,
  INCOMPAT_COMPRESSION,
  INCOMPAT_DIRDATA,
  INCOMPAT_EXTENTS,
  INCOMPAT_FLEX_BG,
  INCOMPAT_INLINE_DATA,
  INCOMPAT_JOURNAL_DEV,
  INCOMPAT_META_BG,
  INCOMPAT_RECOVER,
  InodeCore,
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
  STATE_VALID_FS,
  Superblock,
} from "./ext-format.js";
import { FsError, type AllocationRun, type FsKind } from "./file-system.js";

export interface Group {
  blockBitmap: number;
  inodeBitmap: number;
  inodeTable: number;
  freeBlocks: number;
  flags: number;
  /** Byte offset of the descriptor, for error messages. */
  at: number;
}

function isPowerOf(n: number, b: number): boolean {
  while (n > 1 && n % b === 0) n /= b;
  return n === 1;
}

/**
 * Where things lie in an ext2/3/4 file system: its superblock, checked, and its block groups
 * (descriptors, bitmaps, inode tables), from which the allocation map comes. ExtFs reads inodes,
 * files and directories through it. Every field is set once, by read().
 */
export class ExtLayout {
  kind!: FsKind;
  label!: string;
  uuid!: string;
  blockSize!: number;
  totalBytes!: number;
  freeBytes!: number;
  readonly notes: string[] = [];
  /** Mounted read-write, or not cleanly unmounted: the on-disk maps may lag the journal and the page cache. */
  inUse = false;

  bs = 0;
  blocks = 0;
  firstDataBlock = 0;
  inodesPerGroup = 0;
  inodesCount = 0;
  inodeSize = InodeCore.size;
  incompat = 0;
  groups: Group[] = [];
  private sb!: ReturnType<typeof Superblock.read>;
  private blocksPerGroup = 0;
  private clustersPerGroup = 0;
  /** Blocks per cluster (1 without bigalloc). */
  private clusterRatio = 1;
  private descSize = 32;
  private groupCount = 0;
  private roCompat = 0;
  private compat = 0;

  private constructor(private readonly dev: Device) {}

  /** Checks the superblock `raw`, read at SB_OFFSET, and reads the group descriptors. */
  static async read(dev: Device, raw: Buffer): Promise<ExtLayout> {
    const layout = new ExtLayout(dev);
    await layout.load(raw);
    return layout;
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
    this.inUse = (this.incompat & INCOMPAT_RECOVER) !== 0 || (sb.state & STATE_VALID_FS) === 0;
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
