import { NbdError } from "../../errors.js";

/**
 * The bytes of a copy-on-write overlay file (all integers little-endian). What is written when,
 * and what holds after a crash, is the store's business: see cow-store.ts.
 *
 *   0     header, 4096 bytes
 *           0  magic "NBDSCOW1"          8  u32 version (1)     12  u32 header size (4096)
 *          16  u32 block size           20  u32 flags (0)      24  u64 virtual size
 *          32  u64 size of the base     40  u64 map offset     48  u64 map entries (blocks)
 *          56  u64 data offset          64  u16 length + backing overlay, relative to this
 *        file's directory ("" when the base is directly below), at most 1024 bytes
 *        1090  u16 length + description of the base when the overlay was made (informational)
 *        4092  u32 CRC-32 of bytes 0..4091
 *   4096  allocation map: one u32 per block: 0 absent (read the layer below), 1 zeroed,
 *         n >= 2: the block's data is slot n-2, at data offset + (n-2) * block size
 *   data offset (a multiple of the block size): data slots, appended as blocks are first written
 */
export const COW_MAGIC = "NBDSCOW1";
export const COW_VERSION = 1;
export const HEADER_SIZE = 4096;
export const DEFAULT_COW_BLOCK_SIZE = 64 * 1024;
/** Map entries: ABSENT (read the layer below), ZEROED, or n >= 2 for data in slot n-2. */
export const ABSENT = 0;
export const ZEROED = 1;
const MAX_BACKING = 1024;
const MAX_DESC = 2048;
/** The map is written in pages of this many bytes. */
export const MAP_PAGE = 4096;
/** The highest slot a u32 map entry can name. */
export const MAX_SLOT = 0xffffffff - 2;

export interface CowHeader {
  blockSize: number;
  virtualSize: number;
  baseSize: number;
  mapOffset: number;
  mapEntries: number;
  dataOffset: number;
  backing: string;
  baseDescription: string;
}

const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();

export function crc32(buf: Buffer): number {
  let c = 0xffffffff;
  for (let i = 0; i < buf.length; i++) c = CRC_TABLE[(c ^ buf[i]!) & 0xff]! ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

const alignUp = (n: number, a: number) => Math.ceil(n / a) * a;

/** Geometry of a new overlay for a device of `size` bytes. */
export function newHeader(size: number, blockSize: number, backing: string, baseDescription: string): CowHeader {
  const mapEntries = Math.ceil(size / blockSize);
  const mapOffset = HEADER_SIZE;
  const dataOffset = alignUp(mapOffset + alignUp(mapEntries * 4, MAP_PAGE), blockSize);
  return { blockSize, virtualSize: size, baseSize: size, mapOffset, mapEntries, dataOffset, backing, baseDescription };
}

function putString(buf: Buffer, at: number, s: string, max: number, what: string): void {
  const b = Buffer.from(s, "utf8");
  if (b.length > max) throw new NbdError("EINVAL", `${what} is longer than ${max} bytes: ${s}`);
  buf.writeUInt16LE(b.length, at);
  b.copy(buf, at + 2);
}

/** The 4096 header bytes of `h`, checksum included. */
export function encodeHeader(h: CowHeader): Buffer {
  const buf = Buffer.alloc(HEADER_SIZE);
  buf.write(COW_MAGIC, 0, "latin1");
  buf.writeUInt32LE(COW_VERSION, 8);
  buf.writeUInt32LE(HEADER_SIZE, 12);
  buf.writeUInt32LE(h.blockSize, 16);
  buf.writeUInt32LE(0, 20);
  buf.writeBigUInt64LE(BigInt(h.virtualSize), 24);
  buf.writeBigUInt64LE(BigInt(h.baseSize), 32);
  buf.writeBigUInt64LE(BigInt(h.mapOffset), 40);
  buf.writeBigUInt64LE(BigInt(h.mapEntries), 48);
  buf.writeBigUInt64LE(BigInt(h.dataOffset), 56);
  putString(buf, 64, h.backing, MAX_BACKING, "backing overlay name");
  putString(buf, 1090, h.baseDescription.slice(0, MAX_DESC / 4), MAX_DESC, "base description");
  buf.writeUInt32LE(crc32(buf.subarray(0, HEADER_SIZE - 4)), HEADER_SIZE - 4);
  return buf;
}

/** A damaged or foreign overlay file. */
export function corrupt(file: string, what: string): NbdError {
  return new NbdError("EIO", `${file}: ${what}`);
}

/** Parses and checks a header read from `file` (named in errors). */
export function decodeHeader(buf: Buffer, file: string): CowHeader {
  const magic = buf.toString("latin1", 0, 8);
  if (magic !== COW_MAGIC) throw corrupt(file, `not an nbdstack copy-on-write overlay (magic ${JSON.stringify(magic)}, expected "${COW_MAGIC}")`);
  if (buf.readUInt32LE(HEADER_SIZE - 4) !== crc32(buf.subarray(0, HEADER_SIZE - 4))) throw corrupt(file, "overlay header checksum mismatch (the header is damaged)");
  const version = buf.readUInt32LE(8);
  if (version !== COW_VERSION) throw corrupt(file, `overlay version ${version} is not supported (this build reads version ${COW_VERSION})`);
  const num = (at: number, what: string) => {
    const v = buf.readBigUInt64LE(at);
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw corrupt(file, `overlay header field ${what} is out of range (${v})`);
    return Number(v);
  };
  const str = (at: number, max: number, what: string) => {
    const n = buf.readUInt16LE(at);
    if (n > max) throw corrupt(file, `overlay header field ${what} is too long (${n} bytes)`);
    return buf.toString("utf8", at + 2, at + 2 + n);
  };
  const h: CowHeader = {
    blockSize: buf.readUInt32LE(16),
    virtualSize: num(24, "virtual size"),
    baseSize: num(32, "base size"),
    mapOffset: num(40, "map offset"),
    mapEntries: num(48, "map entries"),
    dataOffset: num(56, "data offset"),
    backing: str(64, MAX_BACKING, "backing"),
    baseDescription: str(1090, MAX_DESC, "base description"),
  };
  const bs = h.blockSize;
  if (bs < 4096 || bs > 1 << 24 || (bs & (bs - 1)) !== 0) throw corrupt(file, `overlay block size ${bs} is not a power of two between 4 KiB and 16 MiB`);
  if (h.mapEntries !== Math.ceil(h.virtualSize / bs)) throw corrupt(file, `overlay map has ${h.mapEntries} entries, but a ${h.virtualSize}-byte device has ${Math.ceil(h.virtualSize / bs)} blocks`);
  if (h.mapOffset < HEADER_SIZE || h.dataOffset < h.mapOffset + h.mapEntries * 4 || h.dataOffset % bs !== 0)
    throw corrupt(file, `overlay map (at ${h.mapOffset}) and data area (at ${h.dataOffset}) overlap or are misplaced`);
  return h;
}
