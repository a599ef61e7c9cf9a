import { NbdError } from "../../errors.js";

/**
 * The qcow2 on-disk format (QEMU's docs/interop/qcow2.rst): the header and its extensions, L1/L2
 * entries and refcount entries. Everything is big-endian. Byte offsets are numbers: host offsets
 * are at most 2^56 and guest sizes at most 2^53 here (larger ones are refused).
 */

export const QCOW2_MAGIC = Buffer.from([0x51, 0x46, 0x49, 0xfb]); // "QFI\xfb"

/** Incompatible feature bits (header bytes 72-79). */
export const INCOMPAT = { dirty: 0, corrupt: 1, dataFile: 2, compression: 3, extendedL2: 4 } as const;
const KNOWN_INCOMPAT_NAMES = ["dirty bit", "corrupt bit", "external data file", "compression type", "extended L2 entries"];

/** Header extension types. */
export const EXT = { end: 0, backingFormat: 0xe2792aca, featureNames: 0x6803f857, bitmaps: 0x23852875, encryption: 0x0537be77, dataFile: 0x44415441 } as const;

/** Header fields rewritten in place (byte offsets). */
export const HDR = { refcountTableOffset: 48, refcountTableClusters: 56, incompatible: 72, autoclear: 88 } as const;

export interface Qcow2Header {
  version: 2 | 3;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  /** Feature bitmaps as [high 32 bits, low 32 bits]. */
  incompatible: [number, number];
  compatible: [number, number];
  autoclear: [number, number];
  refcountOrder: number;
  headerLength: number;
  compressionType: number;
  backingFormat: string | null;
  dataFile: string | null;
  hasEncryptionExt: boolean;
  /** Names from the feature name table, by "type:bit" (type 0 incompatible, 1 compatible, 2 autoclear). */
  featureNames: Map<string, string>;
}

/** Bit `bit` (0-63) of a feature bitmap. */
export function featureBit(f: [number, number], bit: number): boolean {
  return bit >= 32 ? ((f[0] >>> (bit - 32)) & 1) === 1 : ((f[1] >>> bit) & 1) === 1;
}

function u64(buf: Buffer, at: number, what: string, file: string): number {
  const v = buf.readBigUInt64BE(at);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw corrupt(file, `${what} ${v} is too large`);
  return Number(v);
}

/** An image whose metadata is inconsistent: EIO with the file and what is wrong. */
export function corrupt(file: string, what: string): NbdError {
  return new NbdError("EIO", `${file}: corrupt qcow2 image: ${what}`);
}

/** An image that uses a feature this layer does not implement: ENOTSUP naming it and what to do. */
export function refused(file: string, feature: string, hint: string): NbdError {
  return new NbdError("ENOTSUP", `${file}: qcow2 feature "${feature}" is not supported${hint ? `; ${hint}` : ""}`);
}

/** True when `head` (the first bytes of a file) starts with the qcow2 magic. */
export function isQcow2(head: Buffer): boolean {
  return head.length >= 4 && head.subarray(0, 4).equals(QCOW2_MAGIC);
}

/** The size of the header and the first cluster to read, from the first 104 bytes. */
export function clusterSizeOf(head: Buffer, file: string): number {
  if (!isQcow2(head)) throw new NbdError("EINVAL", `${file}: not a qcow2 image (no "QFI\\xfb" magic)`);
  const bits = head.readUInt32BE(20);
  if (bits < 9 || bits > 21) throw refused(file, `cluster size 2^${bits}`, "cluster sizes from 512 bytes to 2 MiB are supported");
  return 2 ** bits;
}

/**
 * Parses the header and its extensions from the image's first cluster (`first`) and checks that
 * everything in it is something this layer can serve; errors name the feature.
 */
export function parseHeader(first: Buffer, file: string): Qcow2Header {
  if (first.length < 72) throw corrupt(file, "header truncated");
  const cs = clusterSizeOf(first, file);
  const version = first.readUInt32BE(4);
  if (version !== 2 && version !== 3) throw refused(file, `version ${version}`, "versions 2 and 3 are supported");
  const v3 = version === 3;
  const h: Qcow2Header = {
    version,
    backingFileOffset: u64(first, 8, "backing file offset", file),
    backingFileSize: first.readUInt32BE(16),
    clusterBits: first.readUInt32BE(20),
    size: u64(first, 24, "virtual size", file),
    cryptMethod: first.readUInt32BE(32),
    l1Size: first.readUInt32BE(36),
    l1TableOffset: u64(first, 40, "L1 table offset", file),
    refcountTableOffset: u64(first, 48, "refcount table offset", file),
    refcountTableClusters: first.readUInt32BE(56),
    nbSnapshots: first.readUInt32BE(60),
    snapshotsOffset: u64(first, 64, "snapshot table offset", file),
    incompatible: v3 ? [first.readUInt32BE(72), first.readUInt32BE(76)] : [0, 0],
    compatible: v3 ? [first.readUInt32BE(80), first.readUInt32BE(84)] : [0, 0],
    autoclear: v3 ? [first.readUInt32BE(88), first.readUInt32BE(92)] : [0, 0],
    refcountOrder: v3 ? first.readUInt32BE(96) : 4,
    headerLength: v3 ? first.readUInt32BE(100) : 72,
    compressionType: 0,
    backingFormat: null,
    dataFile: null,
    hasEncryptionExt: false,
    featureNames: new Map(),
  };
  if (v3 && (h.headerLength < 104 || h.headerLength % 8 !== 0 || h.headerLength > cs)) throw corrupt(file, `header length ${h.headerLength}`);
  if (v3 && h.headerLength > 104) h.compressionType = first[104]!;
  if (h.refcountOrder > 6) throw corrupt(file, `refcount order ${h.refcountOrder} (at most 6)`);
  readExtensions(first, h, file);

  // What is refused, most fundamental first.
  if (h.cryptMethod !== 0 || h.hasEncryptionExt)
    throw refused(file, `encryption (${h.cryptMethod === 1 ? "AES" : h.cryptMethod === 2 ? "LUKS" : `method ${h.cryptMethod}`})`, "decrypt it first: qemu-img convert --object secret,... --image-opts ... -O qcow2 plain.qcow2");
  const unknown: string[] = [];
  for (let bit = 0; bit < 64; bit++) {
    if (!featureBit(h.incompatible, bit)) continue;
    if (bit === INCOMPAT.dirty) continue; // read-only with advice, decided by the layer
    if (bit === INCOMPAT.corrupt) throw new NbdError("EIO", `${file}: the image is marked corrupt (qcow2 corrupt bit set); repair it with: qemu-img check -r all ${file}`);
    if (bit === INCOMPAT.dataFile) throw refused(file, `external data file${h.dataFile ? ` (${h.dataFile})` : ""}`, `convert it to a self-contained image: qemu-img convert -O qcow2 ${file} NEW.qcow2`);
    if (bit === INCOMPAT.extendedL2) continue; // subclusters: the cluster size is checked below
    if (bit === INCOMPAT.compression) continue; // checked with the compression type below
    unknown.push(h.featureNames.get(`0:${bit}`) ?? (KNOWN_INCOMPAT_NAMES[bit] ? KNOWN_INCOMPAT_NAMES[bit]! : `incompatible feature bit ${bit}`));
  }
  if (unknown.length) throw refused(file, unknown.join(", "), "this layer does not know it (unknown incompatible feature)");
  if (h.compressionType !== 0 && h.compressionType !== ZSTD) throw refused(file, `compression type ${h.compressionType}`, "only deflate (zlib) and zstd are");
  if (h.size > Number.MAX_SAFE_INTEGER - cs) throw refused(file, `virtual size ${h.size}`, "at most 2^53 bytes");
  // Subclusters are cluster_size / 32 bytes; QEMU refuses them below 512 bytes (its minimum
  // cluster size), so extended L2 entries need clusters of at least 16 KiB.
  if (featureBit(h.incompatible, INCOMPAT.extendedL2) && cs < MIN_EXTENDED_L2_CLUSTER)
    throw refused(file, `extended L2 entries with ${cs}-byte clusters`, `subclusters (1/32 of a cluster) must be at least 512 bytes, as QEMU requires: qemu-img convert -O qcow2 -o extended_l2=on,cluster_size=16k ${file} NEW.qcow2 (or extended_l2=off)`);
  const l2Entries = cs / l2EntrySize(h);
  if (h.l1Size * l2Entries * cs < h.size) throw corrupt(file, `L1 table of ${h.l1Size} entries is too small for ${h.size} bytes`);
  if (h.l1Size > 32 * 1024 * 1024 / 8) throw corrupt(file, `L1 table of ${h.l1Size} entries (QEMU's limit is 32 MiB)`);
  if (h.l1TableOffset % cs !== 0 || (h.l1Size > 0 && h.l1TableOffset === 0)) throw corrupt(file, `L1 table offset ${h.l1TableOffset} is not cluster aligned`);
  if (h.refcountTableOffset % cs !== 0 || h.refcountTableOffset === 0) throw corrupt(file, `refcount table offset ${h.refcountTableOffset}`);
  if (h.refcountTableClusters === 0 || h.refcountTableClusters * cs > 8 * 1024 * 1024 * 8) throw corrupt(file, `refcount table of ${h.refcountTableClusters} clusters`);
  if (h.backingFileOffset !== 0 && (h.backingFileSize === 0 || h.backingFileSize > 1023 || h.backingFileOffset + h.backingFileSize > cs))
    throw corrupt(file, `backing file name (${h.backingFileSize} bytes at ${h.backingFileOffset})`);
  return h;
}

function readExtensions(first: Buffer, h: Qcow2Header, file: string): void {
  let at = h.headerLength;
  const end = h.backingFileOffset > 0 ? Math.min(first.length, h.backingFileOffset) : first.length;
  while (at + 8 <= end) {
    const type = first.readUInt32BE(at);
    const len = first.readUInt32BE(at + 4);
    if (type === EXT.end) return;
    const data = at + 8;
    if (data + len > end) throw corrupt(file, `header extension 0x${type.toString(16)} runs past the first cluster`);
    const s = () => first.toString("latin1", data, data + len).replace(/\0+$/, "");
    if (type === EXT.backingFormat) h.backingFormat = s();
    else if (type === EXT.dataFile) h.dataFile = s();
    else if (type === EXT.encryption) h.hasEncryptionExt = true;
    else if (type === EXT.featureNames) {
      for (let e = data; e + 48 <= data + len; e += 48) h.featureNames.set(`${first[e]}:${first[e + 1]}`, first.toString("latin1", e + 2, e + 48).replace(/\0.*$/s, ""));
    }
    at = data + Math.ceil(len / 8) * 8;
  }
}

/** The backing file name stored in the header (null: none). */
export function backingName(first: Buffer, h: Qcow2Header): string | null {
  if (h.backingFileOffset === 0) return null;
  return first.toString("utf8", h.backingFileOffset, h.backingFileOffset + h.backingFileSize);
}

// ---- L1 / L2 entries: read as two 32-bit halves (hi: bits 32-63, lo: bits 0-31) ----

/** Extended L2 entries need clusters of at least this many bytes (subclusters of 512 bytes). */
export const MIN_EXTENDED_L2_CLUSTER = 16 * 1024;
/** Subclusters per cluster with extended L2 entries. */
export const SUBCLUSTERS = 32;
/** The subcluster bitmap's halves: bits 0-31 (allocated) and bits 32-63 (reads as zeroes). */
export const ALL_SUBCLUSTERS = 0xffffffff;

/** True when the image's L2 entries are extended (incompatible bit 4: 128-bit entries, subclusters). */
export function hasExtendedL2(h: Qcow2Header): boolean {
  return featureBit(h.incompatible, INCOMPAT.extendedL2);
}

/**
 * Bytes per L2 entry: 8, or 16 with extended L2 entries — the standard descriptor, then the
 * subcluster bitmap (big-endian 64 bits: bytes 8-11 are bits 32-63, a subcluster's "reads as
 * zeroes" bit, bit 32 + x for subcluster x; bytes 12-15 are bits 0-31, its "allocated" bit x).
 */
export function l2EntrySize(h: Qcow2Header): 8 | 16 {
  return hasExtendedL2(h) ? 16 : 8;
}

/** Bits [first, first + n) of a 32-bit subcluster mask (n from 0 to 32). */
export function subclusterMask(first: number, n: number): number {
  return n <= 0 ? 0 : ((2 ** n - 1) * 2 ** first) >>> 0;
}

/** How many bits are set in `mask` from bit `from` on, before the first clear one (0 to 32 - from). */
export function onesFrom(mask: number, from: number): number {
  const v = ~(mask >>> from); // the run's bits are clear now, and so is nothing above bit 31 - from
  return v === 0 ? 32 : 31 - Math.clz32(v & -v);
}

/** Bit 63 of an L1/L2 entry: refcount is exactly one (the cluster may be written in place). */
export const COPIED_HI = 0x80000000;
/** The header's compression type for zstd-compressed clusters (0 is deflate). */
export const ZSTD = 1;

/** Bit 62 of an L2 entry: compressed cluster. */
export const COMPRESSED_HI = 0x40000000;
/** Bit 0 of an L2 entry (v3): the cluster reads as zeroes (reserved, 0, with extended L2 entries). */
export const ZERO_LO = 1;

/** Bits 9-55 of an entry: a cluster-aligned host offset (0: none). */
export function entryOffset(hi: number, lo: number): number {
  return (hi & 0x00ffffff) * 0x100000000 + ((lo & 0xfffffe00) >>> 0);
}

/** Writes the entry [hi, lo] for `offset` with the flags given. */
export function writeEntry(buf: Buffer, at: number, hi: number, lo: number): void {
  buf.writeUInt32BE(hi >>> 0, at);
  buf.writeUInt32BE(lo >>> 0, at + 4);
}

/** [hi, lo] of a standard entry at host `offset` (cluster aligned) with the COPIED flag. */
export function ownedEntry(offset: number): [number, number] {
  return [(Math.floor(offset / 0x100000000) | COPIED_HI) >>> 0, offset % 0x100000000];
}

/** A compressed cluster's descriptor: its first byte in the file and how many bytes to read. */
export function compressedExtent(hi: number, lo: number, clusterBits: number): { offset: number; length: number } {
  const x = 62 - (clusterBits - 8); // offset bits; x >= 49 for cluster sizes up to 2 MiB
  const hiBits = x - 32;
  const offset = (hi & (2 ** hiBits - 1)) * 0x100000000 + (lo >>> 0);
  const sectors = ((hi & 0x3fffffff) >>> hiBits) + 1;
  return { offset, length: sectors * 512 - (offset % 512) };
}

// ---- refcount entries ----

/** Entry `i` of a refcount block of `bits`-bit entries (1 to 64). */
export function refcountAt(block: Buffer, i: number, bits: number): number {
  if (bits >= 8) {
    const bytes = bits / 8;
    if (bytes <= 4) return bytes === 2 ? block.readUInt16BE(i * 2) : block.readUIntBE(i * bytes, bytes);
    const v = block.readBigUInt64BE(i * 8);
    return v > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(v);
  }
  const bit = i * bits;
  return (block[bit >>> 3]! >>> (bit & 7)) & ((1 << bits) - 1);
}

/** Sets entry `i` and returns the byte range [start, end) of the block it changed. */
export function setRefcount(block: Buffer, i: number, bits: number, value: number): [number, number] {
  if (value < 0 || value >= 2 ** Math.min(bits, 53)) throw new NbdError("EIO", `refcount ${value} does not fit ${bits} bits`);
  if (bits >= 8) {
    const bytes = bits / 8;
    if (bytes <= 4) block.writeUIntBE(value, i * bytes, bytes);
    else block.writeBigUInt64BE(BigInt(value), i * 8);
    return [i * bytes, (i + 1) * bytes];
  }
  const bit = i * bits;
  const byte = bit >>> 3;
  const mask = ((1 << bits) - 1) << (bit & 7);
  block[byte] = (block[byte]! & ~mask) | ((value << (bit & 7)) & mask);
  return [byte, byte + 1];
}
