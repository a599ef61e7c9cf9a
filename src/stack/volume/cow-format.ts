import { NbdError } from "../../errors.js";
import { bytes, chars, struct, StructError, u16le, u32le, u64le } from "../../util/struct.js";

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

/** The header's bytes: the layout drawn above, declared once. */
const Header = struct(
  "overlay header",
  {
    magic: chars(0, 8), // "NBDSCOW1"
    version: u32le(8),
    headerSize: u32le(12),
    blockSize: u32le(16),
    flags: u32le(20),
    virtualSize: u64le(24),
    baseSize: u64le(32),
    mapOffset: u64le(40),
    mapEntries: u64le(48),
    dataOffset: u64le(56),
    backingLength: u16le(64),
    backing: bytes(66, MAX_BACKING), // UTF-8, backingLength bytes of it
    baseDescriptionLength: u16le(1090),
    baseDescription: bytes(1092, MAX_DESC), // UTF-8, baseDescriptionLength bytes of it
    crc: u32le(HEADER_SIZE - 4), // CRC-32 of the bytes before it
  },
  { size: HEADER_SIZE },
);

/** One allocation map entry, one per block, ABSENT, ZEROED or slot + 2; the map is these back to back. */
const MapEntry = struct("overlay map entry", { value: u32le(0) });
export const MAP_ENTRY_SIZE = MapEntry.size;

/** Names of the u64 fields in "out of range" errors. */
const U64_NAMES: Record<string, string> = { virtualSize: "virtual size", baseSize: "base size", mapOffset: "map offset", mapEntries: "map entries", dataOffset: "data offset" };

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
  const dataOffset = alignUp(mapOffset + alignUp(mapEntries * MAP_ENTRY_SIZE, MAP_PAGE), blockSize);
  return { blockSize, virtualSize: size, baseSize: size, mapOffset, mapEntries, dataOffset, backing, baseDescription };
}

function utf8Within(s: string, max: number, what: string): Buffer {
  const b = Buffer.from(s, "utf8");
  if (b.length > max) throw new NbdError("EINVAL", `${what} is longer than ${max} bytes: ${s}`);
  return b;
}

/** The 4096 header bytes of `h`, checksum included. */
export function encodeHeader(h: CowHeader): Buffer {
  const backing = utf8Within(h.backing, MAX_BACKING, "backing overlay name");
  const desc = utf8Within(h.baseDescription.slice(0, MAX_DESC / 4), MAX_DESC, "base description");
  const buf = Buffer.alloc(HEADER_SIZE);
  Header.write(buf, {
    magic: COW_MAGIC,
    version: COW_VERSION,
    headerSize: HEADER_SIZE,
    blockSize: h.blockSize,
    flags: 0,
    virtualSize: h.virtualSize,
    baseSize: h.baseSize,
    mapOffset: h.mapOffset,
    mapEntries: h.mapEntries,
    dataOffset: h.dataOffset,
    backingLength: backing.length,
    backing,
    baseDescriptionLength: desc.length,
    baseDescription: desc,
    crc: 0,
  });
  Header.set(buf, "crc", crc32(buf.subarray(0, Header.fields.crc.offset)));
  return buf;
}

/** A damaged or foreign overlay file. */
export function corrupt(file: string, what: string): NbdError {
  return new NbdError("EIO", `${file}: ${what}`);
}

/** Parses and checks a header read from `file` (named in errors). */
export function decodeHeader(buf: Buffer, file: string): CowHeader {
  const magic = Header.get(buf, "magic");
  if (magic !== COW_MAGIC) throw corrupt(file, `not an nbdstack copy-on-write overlay (magic ${JSON.stringify(magic)}, expected "${COW_MAGIC}")`);
  if (Header.get(buf, "crc") !== crc32(buf.subarray(0, Header.fields.crc.offset))) throw corrupt(file, "overlay header checksum mismatch (the header is damaged)");
  const version = Header.get(buf, "version");
  if (version !== COW_VERSION) throw corrupt(file, `overlay version ${version} is not supported (this build reads version ${COW_VERSION})`);
  let f: ReturnType<typeof Header.read>;
  try {
    f = Header.read(buf);
  } catch (err) {
    const what = err instanceof StructError && err.field ? U64_NAMES[err.field] : undefined;
    throw what ? corrupt(file, `overlay header field ${what} is out of range (${(err as StructError).value})`) : err;
  }
  const str = (b: Buffer, n: number, max: number, what: string) => {
    if (n > max) throw corrupt(file, `overlay header field ${what} is too long (${n} bytes)`);
    return b.toString("utf8", 0, n);
  };
  const h: CowHeader = {
    blockSize: f.blockSize,
    virtualSize: f.virtualSize,
    baseSize: f.baseSize,
    mapOffset: f.mapOffset,
    mapEntries: f.mapEntries,
    dataOffset: f.dataOffset,
    backing: str(f.backing, f.backingLength, MAX_BACKING, "backing"),
    baseDescription: str(f.baseDescription, f.baseDescriptionLength, MAX_DESC, "base description"),
  };
  const bs = h.blockSize;
  if (bs < 4096 || bs > 1 << 24 || (bs & (bs - 1)) !== 0) throw corrupt(file, `overlay block size ${bs} is not a power of two between 4 KiB and 16 MiB`);
  if (h.mapEntries !== Math.ceil(h.virtualSize / bs)) throw corrupt(file, `overlay map has ${h.mapEntries} entries, but a ${h.virtualSize}-byte device has ${Math.ceil(h.virtualSize / bs)} blocks`);
  if (h.mapOffset < HEADER_SIZE || h.dataOffset < h.mapOffset + h.mapEntries * MAP_ENTRY_SIZE || h.dataOffset % bs !== 0)
    throw corrupt(file, `overlay map (at ${h.mapOffset}) and data area (at ${h.dataOffset}) overlap or are misplaced`);
  return h;
}

/** The allocation map's entries, from its bytes. */
export function decodeMap(raw: Buffer): Uint32Array {
  const map = new Uint32Array(raw.length / MAP_ENTRY_SIZE);
  for (let b = 0; b < map.length; b++) map[b] = MapEntry.get(raw, "value", b * MAP_ENTRY_SIZE);
  return map;
}

/** The bytes of entries first..last-1 of the allocation map. */
export function encodeMap(map: ArrayLike<number>, first: number, last: number): Buffer {
  const buf = Buffer.allocUnsafe((last - first) * MAP_ENTRY_SIZE);
  for (let b = first; b < last; b++) MapEntry.set(buf, "value", map[b]!, (b - first) * MAP_ENTRY_SIZE);
  return buf;
}
