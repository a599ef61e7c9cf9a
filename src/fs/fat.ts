import { BaseFs, Device, pushAlloc, pushRun, type Run } from "./base-fs.js";
import { FsError, type AllocationRun, type FileStat, type FsKind } from "./file-system.js";
import { bytes, chars, struct, u16le, u32le, u8 } from "../util/struct.js";

// Structures as Microsoft's FAT specification (fatgen103) names them.

/** The boot sector's BIOS Parameter Block, common to FAT12, FAT16 and FAT32. */
const BootSector = struct(
  "FAT boot sector",
  {
    jmpBoot: bytes(0, 3), // BS_jmpBoot: EB xx 90 or E9 xx xx
    oemName: chars(3, 8), // BS_OEMName
    bytsPerSec: u16le(11), // BPB_BytsPerSec
    secPerClus: u8(13), // BPB_SecPerClus
    rsvdSecCnt: u16le(14), // BPB_RsvdSecCnt
    numFats: u8(16), // BPB_NumFATs
    rootEntCnt: u16le(17), // BPB_RootEntCnt (0 on FAT32)
    totSec16: u16le(19), // BPB_TotSec16
    media: u8(21), // BPB_Media
    fatSz16: u16le(22), // BPB_FATSz16 (0 on FAT32)
    totSec32: u32le(32), // BPB_TotSec32
    signature: u16le(510), // 0xAA55
  },
  { size: 512 },
);

/** The FAT32 part of the BPB, from byte 36. */
const Fat32Bpb = struct("FAT32 BPB", {
  fatSz32: u32le(36), // BPB_FATSz32
  extFlags: u16le(40), // BPB_ExtFlags: bit 7 one active FAT, bits 0-3 which
  rootClus: u32le(44), // BPB_RootClus
});

/** The extended boot fields: at byte 36 on FAT12/16 and 64 on FAT32 (offsets from there). */
const ExtendedBoot = struct("FAT extended boot record", {
  drvNum: u8(0), // BS_DrvNum
  state: u8(1), // BS_Reserved1: Linux sets bit 0 (FAT_STATE_DIRTY) while mounted read-write
  bootSig: u8(2), // BS_BootSig: 0x29 (serial and label follow) or 0x28 (serial only)
  volId: u32le(3), // BS_VolID
  volLab: chars(7, 11), // BS_VolLab
});

/** A 32-byte directory entry. */
const DirEntry = struct(
  "FAT directory entry",
  {
    name: bytes(0, 11), // DIR_Name: 8 + 3, space-padded; [0] 0 = end, 0xE5 = free, 0x05 = a real 0xE5
    attr: u8(11), // DIR_Attr
    ntRes: u8(12), // DIR_NTRes: 0x08 base name in lower case, 0x10 extension in lower case
    fstClusHi: u16le(20), // DIR_FstClusHI (FAT32 only)
    wrtTime: u16le(22), // DIR_WrtTime
    wrtDate: u16le(24), // DIR_WrtDate
    fstClusLo: u16le(26), // DIR_FstClusLO
    fileSize: u32le(28), // DIR_FileSize
  },
  { size: 32 },
);

/** A long-name entry (DIR_Attr 0x0F) in the same 32 bytes: 13 UTF-16 characters of the name. */
const LfnEntry = struct(
  "FAT long-name entry",
  {
    ord: u8(0), // LDIR_Ord: sequence number, 0x40 on the last (first stored) one
    name1: chars(1, 10, "utf16le"), // LDIR_Name1
    attr: u8(11), // LDIR_Attr
    chksum: u8(13), // LDIR_Chksum
    name2: chars(14, 12, "utf16le"), // LDIR_Name2
    name3: chars(28, 4, "utf16le"), // LDIR_Name3
  },
  { size: 32 },
);

interface FatNode {
  root: boolean;
  attr: number;
  cluster: number;
  size: number;
  mtime: Date;
  /** Byte offset of the directory entry (0 for the root). */
  at: number;
}

const ATTR_RO = 0x01;
const ATTR_VOLUME = 0x08;
const ATTR_DIR = 0x10;
const ATTR_LFN = 0x0f;
/** The FAT spec's limit: 65536 entries of 32 bytes. */
const DIR_MAX_BYTES = 65536 * DirEntry.size;
const FAT_CACHE_CHUNK = 1024 * 1024;
const FAT_WHOLE_MAX = 16 * 1024 * 1024;

function fatTime(date: number, time: number): Date {
  if (date === 0) return new Date(Date.UTC(1980, 0, 1));
  return new Date(Date.UTC(1980 + (date >> 9), ((date >> 5) & 15) - 1, date & 31, time >> 11, (time >> 5) & 63, (time & 31) * 2));
}

/** The checksum of an 8.3 name that each of its long-name entries carries. */
export function lfnChecksum(shortName: Buffer): number {
  let sum = 0;
  for (let i = 0; i < 11; i++) sum = (((sum & 1) << 7) + (sum >> 1) + shortName[i]!) & 0xff;
  return sum;
}

/** A read-only FAT12/16/32 file system. */
export class FatFs extends BaseFs<FatNode> {
  kind!: FsKind;
  label = "";
  uuid!: string;
  blockSize!: number;
  totalBytes!: number;
  freeBytes!: number;

  private bits: 12 | 16 | 32 = 12;
  private bps = 0;
  private clusterSize = 0;
  private clusterCount = 0;
  private fatStart = 0;
  private rootStart = 0;
  private rootEntries = 0;
  private rootCluster = 0;
  private dataStart = 0;
  private fatWhole: Buffer | null = null;
  private readonly fatChunks = new Map<number, Buffer>();

  /** Reads the boot sector; null when it does not look like FAT. */
  static async probe(dev: Device): Promise<FatFs | null> {
    if (dev.size < 1024) return null;
    const b = await dev.read(512, 0, "FAT boot sector");
    const bs = BootSector.read(b);
    const jump = (bs.jmpBoot[0] === 0xeb && bs.jmpBoot[2] === 0x90) || bs.jmpBoot[0] === 0xe9;
    const bps = bs.bytsPerSec;
    const spc = bs.secPerClus;
    const oem = bs.oemName;
    if (!jump || bs.signature !== 0xaa55 || oem === "NTFS    " || oem === "EXFAT   ") return null;
    if (![512, 1024, 2048, 4096].includes(bps) || spc === 0 || (spc & (spc - 1)) !== 0) return null;
    if (bs.rsvdSecCnt === 0 || bs.numFats === 0 || (bs.media !== 0xf0 && bs.media < 0xf8)) return null;
    const fs = new FatFs(dev);
    await fs.load(b);
    return fs;
  }

  private async load(b: Buffer): Promise<void> {
    const bad = (reason: string) => FsError.corrupt("FAT boot sector", 0, reason);
    const bs = BootSector.read(b);
    const bpb32 = Fat32Bpb.read(b);
    this.bps = bs.bytsPerSec;
    const spc = bs.secPerClus;
    const reserved = bs.rsvdSecCnt;
    const nfats = bs.numFats;
    this.rootEntries = bs.rootEntCnt;
    const total = bs.totSec16 || bs.totSec32;
    const fatSize16 = bs.fatSz16;
    const fatSize = fatSize16 || bpb32.fatSz32;
    if (total === 0) throw bad("total sector count is 0");
    if (total * this.bps > this.dev.size) throw bad(`${total} sectors of ${this.bps} bytes do not fit the device (${this.dev.size} bytes)`);
    if (fatSize === 0) throw bad("FAT size is 0");
    const rootSectors = Math.ceil((this.rootEntries * DirEntry.size) / this.bps);
    const firstData = reserved + nfats * fatSize + rootSectors;
    if (firstData >= total) throw bad(`metadata (${firstData} sectors) fills the whole volume of ${total} sectors`);
    this.clusterSize = spc * this.bps;
    this.clusterCount = Math.floor((total - firstData) / spc);
    if (this.clusterCount === 0) throw bad("no data clusters");
    // As Linux decides: FAT32 by its BPB layout (no 16-bit FAT size), FAT12 or 16 by cluster count.
    this.bits = fatSize16 === 0 ? 32 : this.clusterCount < 4085 ? 12 : 16;
    this.kind = `fat${this.bits}`;
    let active = 0;
    if (this.bits === 32) {
      if (this.rootEntries !== 0) throw bad(`FAT32 with a fixed root directory of ${this.rootEntries} entries`);
      const flags = bpb32.extFlags;
      if (flags & 0x80) active = flags & 0xf;
      if (active >= nfats) throw bad(`active FAT ${active} of ${nfats}`);
      this.rootCluster = bpb32.rootClus;
      if (this.rootCluster < 2 || this.rootCluster > this.clusterCount + 1) throw bad(`root directory cluster ${this.rootCluster} is outside clusters 2 to ${this.clusterCount + 1}`);
    } else if (this.rootEntries === 0) throw bad(`FAT${this.bits} (${this.clusterCount} clusters) without root directory entries`);
    if (Math.floor((fatSize * this.bps * 8) / this.bits) < this.clusterCount + 2) throw bad(`a FAT of ${fatSize} sectors cannot hold ${this.clusterCount} clusters`);
    this.fatStart = (reserved + active * fatSize) * this.bps;
    this.rootStart = (reserved + nfats * fatSize) * this.bps;
    this.dataStart = firstData * this.bps;
    this.blockSize = this.clusterSize;
    this.totalBytes = total * this.bps;
    const ext = ExtendedBoot.read(b, this.bits === 32 ? 64 : 36);
    this.inUse = (ext.state & 0x01) !== 0;
    const serial = ext.bootSig === 0x29 || ext.bootSig === 0x28 ? ext.volId : 0;
    const hex = serial.toString(16).toUpperCase().padStart(8, "0");
    this.uuid = `${hex.slice(0, 4)}-${hex.slice(4)}`;
    const bpbLabel = ext.bootSig === 0x29 ? ext.volLab.trimEnd() : "";
    const fatBytes = Math.ceil(((this.clusterCount + 2) * this.bits) / 8);
    if (fatBytes <= FAT_WHOLE_MAX) this.fatWhole = await this.dev.read(fatBytes, this.fatStart, "FAT");
    let free = 0;
    await this.scan((_c, v) => {
      if (v === 0) free++;
    });
    this.freeBytes = free * this.clusterSize;
    const rootLabel = await this.volumeLabel();
    this.label = (rootLabel ?? bpbLabel) === "NO NAME" ? "" : (rootLabel ?? bpbLabel);
  }

  /** The FAT bytes holding entry c, and where in them it starts. */
  private async fatAt(c: number): Promise<[Buffer, number]> {
    const at = this.bits === 12 ? c + (c >> 1) : (c * this.bits) / 8;
    if (this.fatWhole) return [this.fatWhole, at];
    const k = Math.floor(at / FAT_CACHE_CHUNK);
    let chunk = this.fatChunks.get(k);
    if (!chunk) {
      const len = Math.min(FAT_CACHE_CHUNK, Math.ceil(((this.clusterCount + 2) * this.bits) / 8) - k * FAT_CACHE_CHUNK);
      chunk = await this.dev.read(len, this.fatStart + k * FAT_CACHE_CHUNK, "FAT");
      if (this.fatChunks.size >= 16) this.fatChunks.delete(this.fatChunks.keys().next().value!);
      this.fatChunks.set(k, chunk);
    }
    return [chunk, at - k * FAT_CACHE_CHUNK];
  }

  private decode(c: number, b: Buffer, o: number): number {
    if (this.bits === 12) {
      const v = b.readUInt16LE(o);
      return c & 1 ? v >> 4 : v & 0xfff;
    }
    return this.bits === 16 ? b.readUInt16LE(o) : b.readUInt32LE(o) & 0x0fffffff;
  }

  private async entry(c: number): Promise<number> {
    const [b, o] = await this.fatAt(c);
    return this.decode(c, b, o);
  }

  /** Calls back with every data cluster's FAT entry, in order (FAT12 never leaves one buffer). */
  private async scan(cb: (c: number, v: number) => void): Promise<void> {
    const step = this.bits === 12 ? Infinity : FAT_CACHE_CHUNK / (this.bits / 8);
    for (let c = 2; c < this.clusterCount + 2; ) {
      const [b, o] = await this.fatAt(c);
      const end = Math.min(this.clusterCount + 2, this.fatWhole ? Infinity : c + (step - (o * 8) / this.bits));
      for (let i = c, off = o; i < end; i++) {
        cb(i, this.decode(i, b, this.bits === 12 ? i + (i >> 1) : off));
        off += this.bits / 8;
      }
      c = end;
    }
  }

  private isEnd(v: number): boolean {
    return v >= (this.bits === 12 ? 0xff8 : this.bits === 16 ? 0xfff8 : 0x0ffffff8);
  }

  /** Follows a cluster chain for at most `max` clusters (or to its end, when `toEnd`). */
  private async chain(first: number, max: number, toEnd: boolean, what: string): Promise<number[]> {
    const out: number[] = [];
    const seen = new Set<number>();
    let c = first;
    for (;;) {
      if (c < 2 || c > this.clusterCount + 1) throw FsError.corrupt(`FAT chain of ${what}`, this.fatStart, `cluster ${c} after ${out.length} clusters is not a data cluster (2 to ${this.clusterCount + 1})`);
      if (seen.has(c)) throw FsError.corrupt(`FAT chain of ${what}`, this.fatStart, `loops back to cluster ${c}`);
      seen.add(c);
      out.push(c);
      if (!toEnd && out.length >= max) return out;
      const next = await this.entry(c);
      if (this.isEnd(next)) return out;
      if (out.length >= max) throw FsError.corrupt(`FAT chain of ${what}`, this.fatStart, `longer than ${max} clusters`);
      c = next;
    }
  }

  private clusterOffset(c: number): number {
    return this.dataStart + (c - 2) * this.clusterSize;
  }

  protected async root(): Promise<FatNode> {
    return { root: true, attr: ATTR_DIR, cluster: this.bits === 32 ? this.rootCluster : 0, size: 0, mtime: new Date(0), at: 0 };
  }

  protected async statNode(n: FatNode): Promise<FileStat> {
    const dir = (n.attr & ATTR_DIR) !== 0;
    return {
      type: dir ? "dir" : "file",
      size: dir ? 0 : n.size,
      mode: dir ? 0o40755 : n.attr & ATTR_RO ? 0o100444 : 0o100644,
      uid: 0,
      gid: 0,
      nlink: 1,
      mtime: n.mtime,
      ino: n.cluster,
    };
  }

  protected async symlinkTarget(_n: FatNode, path: string): Promise<string> {
    throw new FsError("EINVAL", `${path}: FAT has no symbolic links`);
  }

  /** The raw 32-byte entries of a directory, with the byte offset of each. */
  private async rawDir(dir: FatNode, path: string): Promise<Array<{ b: Buffer; at: number }>> {
    const out: Array<{ b: Buffer; at: number }> = [];
    if (dir.root && this.bits !== 32) {
      const b = await this.dev.read(this.rootEntries * DirEntry.size, this.rootStart, "FAT root directory");
      out.push({ b, at: this.rootStart });
      return out;
    }
    if (dir.cluster === 0) throw FsError.corrupt(`FAT directory entry of ${path}`, dir.at, "a directory without a first cluster");
    for (const c of await this.chain(dir.cluster, Math.ceil(DIR_MAX_BYTES / this.clusterSize), true, `directory ${path}`)) {
      const at = this.clusterOffset(c);
      out.push({ b: await this.dev.read(this.clusterSize, at, `FAT directory ${path}`), at });
    }
    return out;
  }

  private async volumeLabel(): Promise<string | null> {
    for (const { b } of await this.rawDir(await this.root(), "/")) {
      for (let p = 0; p + DirEntry.size <= b.length; p += DirEntry.size) {
        const d = DirEntry.read(b, p);
        if (d.name[0] === 0) return null;
        if (d.name[0] !== 0xe5 && d.attr !== ATTR_LFN && d.attr & ATTR_VOLUME) return d.name.toString("latin1").trimEnd();
      }
    }
    return null;
  }

  protected async list(dir: FatNode, path: string): Promise<Array<{ name: string; node: FatNode }>> {
    const out: Array<{ name: string; node: FatNode }> = [];
    let lfn: string[] = [];
    let lfnNext = 0;
    let lfnSum = -1;
    for (const { b, at } of await this.rawDir(dir, path)) {
      for (let p = 0; p + DirEntry.size <= b.length; p += DirEntry.size) {
        const d = DirEntry.read(b, p);
        const first = d.name[0]!;
        if (first === 0) return out;
        const attr = d.attr;
        if (first === 0xe5) {
          lfn = [];
          lfnNext = 0;
          continue;
        }
        if ((attr & 0x3f) === ATTR_LFN) {
          const l = LfnEntry.read(b, p);
          const seq = l.ord & 0x1f;
          if (l.ord & 0x40) {
            lfn = new Array<string>(seq).fill("");
            lfnNext = seq;
            lfnSum = l.chksum;
          }
          if (seq === 0 || seq !== lfnNext || l.chksum !== lfnSum) {
            lfnNext = 0;
            continue;
          }
          lfn[seq - 1] = (l.name1 + l.name2 + l.name3).replace(/\0.*$/s, "").replace(/\uffff+$/, "");
          lfnNext = seq - 1;
          continue;
        }
        const hasLfn = lfnNext === 0 && lfn.length > 0 && lfnSum === lfnChecksum(d.name);
        const longName = hasLfn ? lfn.join("") : null;
        lfn = [];
        lfnNext = 0;
        if (attr & ATTR_VOLUME) continue;
        const raw = Buffer.from(d.name);
        if (raw[0] === 0x05) raw[0] = 0xe5;
        let base = raw.subarray(0, 8).toString("latin1").trimEnd();
        let ext = raw.subarray(8, 11).toString("latin1").trimEnd();
        if (d.ntRes & 0x08) base = base.toLowerCase();
        if (d.ntRes & 0x10) ext = ext.toLowerCase();
        const name = longName ?? (ext ? `${base}.${ext}` : base);
        if (name === "." || name === "..") continue;
        const cluster = d.fstClusLo + (this.bits === 32 ? d.fstClusHi * 65536 : 0);
        out.push({
          name,
          node: { root: false, attr, cluster, size: d.fileSize, mtime: fatTime(d.wrtDate, d.wrtTime), at: at + p },
        });
      }
    }
    return out;
  }

  protected async lookup(dir: FatNode, name: string, path: string): Promise<FatNode | null> {
    const want = name.toUpperCase();
    return (await this.list(dir, path)).find((e) => e.name.toUpperCase() === want)?.node ?? null;
  }

  protected async mapNode(n: FatNode, path: string): Promise<Run[]> {
    if (n.size === 0) return [];
    const what = `FAT directory entry of ${path}`;
    if (n.size > this.clusterCount * this.clusterSize) throw FsError.corrupt(what, n.at, `size ${n.size} is larger than the volume's data area`);
    if (n.cluster === 0) throw FsError.corrupt(what, n.at, `${n.size} bytes but no first cluster`);
    const need = Math.ceil(n.size / this.clusterSize);
    const clusters = await this.chain(n.cluster, need, false, path);
    if (clusters.length < need) throw FsError.corrupt(`FAT chain of ${path}`, this.fatStart, `ends after ${clusters.length} clusters; the file's ${n.size} bytes need ${need}`);
    const runs: Run[] = [];
    clusters.forEach((c, i) => pushRun(runs, i * this.clusterSize, this.clusterOffset(c), Math.min(this.clusterSize, n.size - i * this.clusterSize)));
    return runs;
  }

  async allocationMap(): Promise<AllocationRun[]> {
    const out: AllocationRun[] = [];
    pushAlloc(out, 0, this.dataStart, true);
    await this.scan((c, v) => pushAlloc(out, this.clusterOffset(c), this.clusterSize, v !== 0));
    const end = this.clusterOffset(this.clusterCount + 2);
    pushAlloc(out, end, this.dev.size - end, true);
    return out;
  }
}
