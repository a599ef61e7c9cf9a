import fs from "node:fs";
import path from "node:path";
import { NbdError } from "../../errors.js";
import { plainIo } from "../layer.js";
import { FilePort, type IoMode } from "../port/file-port.js";

/**
 * The overlay file of a copy-on-write layer (all integers little-endian):
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
 *
 * Crash safety: a new slot's data is written first; its map entry reaches the file only in
 * flush(), after an fdatasync of the data, and is followed by another fdatasync. So the map on
 * disk never names a slot whose data is not durable, and everything flushed survives a crash.
 * A slot given up (block zeroed or merged away) is reused only once that change is durable.
 */
export const COW_MAGIC = "NBDSCOW1";
export const COW_VERSION = 1;
export const HEADER_SIZE = 4096;
export const ABSENT = 0;
export const ZEROED = 1;
const MAX_BACKING = 1024;
const MAX_DESC = 2048;
const MAP_PAGE = 4096;
const MAX_SLOT = 0xffffffff - 2;

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

function corrupt(file: string, what: string): NbdError {
  return new NbdError("EIO", `${file}: ${what}`);
}

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

function fsyncDir(dir: string): void {
  const fd = fs.openSync(dir, "r");
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

/** Renames `from` to `to` (replacing it) and makes the rename durable. */
export function durableRename(from: string, to: string): void {
  fs.renameSync(from, to);
  fsyncDir(path.dirname(to));
}

export interface CowStoreOptions {
  io?: IoMode;
}

/** One overlay file: its header, allocation map and data slots. Block-level, no locking. */
export class CowStore {
  /** The file's current name (changes when a snapshot freezes it or a merge promotes it). */
  path: string;
  readonly header: CowHeader;
  readonly readOnly: boolean;
  private readonly port: FilePort;
  /** The map as the layer sees it. */
  private readonly map: Uint32Array;
  /** The map as it is on disk (or being written there by the flush in progress). */
  private readonly durable: Uint32Array;
  private pending = new Map<number, number>();
  /** Slots given up by changes not yet durable; free once the next flush completes. */
  private pendingFree: number[] = [];
  private readonly free: number[] = [];
  private nextSlot: number;
  private dirty = false;
  private flushing: Promise<void> = Promise.resolve();
  private closed = false;
  allocatedBlocks = 0;
  zeroedBlocks = 0;

  private constructor(file: string, header: CowHeader, port: FilePort, readOnly: boolean, map: Uint32Array, nextSlot: number, free: number[]) {
    this.path = file;
    this.header = header;
    this.port = port;
    this.readOnly = readOnly;
    this.map = map;
    this.durable = map.slice();
    this.nextSlot = nextSlot;
    this.free = free;
    for (const v of map) {
      if (v === ZEROED) this.zeroedBlocks++;
      else if (v !== ABSENT) this.allocatedBlocks++;
    }
  }

  /**
   * Writes a new, empty overlay at `file` (through a temporary file, renamed into place and made
   * durable, so `file` is never seen half-written) and opens it. Replaces an existing `file`.
   */
  static async create(file: string, h: CowHeader, opts: CowStoreOptions = {}): Promise<CowStore> {
    const tmp = `${file}.${process.pid}.new`;
    const fd = fs.openSync(tmp, "w", 0o644);
    try {
      fs.writeSync(fd, encodeHeader(h), 0, HEADER_SIZE, 0);
      fs.ftruncateSync(fd, h.dataOffset);
      fs.fsyncSync(fd);
    } catch (err) {
      fs.closeSync(fd);
      fs.rmSync(tmp, { force: true });
      throw err;
    }
    fs.closeSync(fd);
    durableRename(tmp, file);
    return CowStore.open(file, opts);
  }

  static async open(file: string, opts: CowStoreOptions = {}): Promise<CowStore> {
    let st: fs.Stats;
    try {
      st = fs.statSync(file);
    } catch (err) {
      throw new NbdError("EINVAL", `${file}: cannot open the overlay (${(err as Error).message})`);
    }
    if (!st.isFile()) throw new NbdError("EINVAL", `${file}: an overlay must be a regular file`);
    if (st.size < HEADER_SIZE) throw corrupt(file, `too short (${st.size} bytes) to be an nbdstack copy-on-write overlay`);
    let readOnly = false;
    try {
      fs.accessSync(file, fs.constants.W_OK);
    } catch {
      readOnly = true;
    }
    const port = new FilePort({ path: file, readOnly, io: opts.io });
    await port.open();
    try {
      const hb = Buffer.alloc(HEADER_SIZE);
      await port.pread(hb, 0, plainIo);
      const h = decodeHeader(hb, file);
      const mapBytes = h.mapEntries * 4;
      if (st.size < h.mapOffset + mapBytes) throw corrupt(file, `truncated: the allocation map ends at ${h.mapOffset + mapBytes}, the file at ${st.size}`);
      const raw = Buffer.alloc(mapBytes);
      if (mapBytes > 0) await port.pread(raw, h.mapOffset, plainIo);
      const map = new Uint32Array(h.mapEntries);
      const used = new Uint8Array(Math.max(0, Math.floor((st.size - h.dataOffset) / h.blockSize) + 1));
      let top = -1;
      for (let b = 0; b < h.mapEntries; b++) {
        const v = raw.readUInt32LE(b * 4);
        map[b] = v;
        if (v < 2) continue;
        const slot = v - 2;
        const len = Math.min(h.blockSize, h.virtualSize - b * h.blockSize);
        const at = h.dataOffset + slot * h.blockSize;
        if (at + len > st.size) throw corrupt(file, `allocation map entry of block ${b} (map offset ${h.mapOffset + b * 4}) points at ${at}, past the end of the file (${st.size})`);
        if (used[slot]) throw corrupt(file, `allocation map gives data slot ${slot} to two blocks (one is block ${b}, map offset ${h.mapOffset + b * 4})`);
        used[slot] = 1;
        if (slot > top) top = slot;
      }
      // Slots below the highest one in use that no block names (left by a crash) are reused.
      const free: number[] = [];
      for (let s = top - 1; s >= 0; s--) if (!used[s]) free.push(s);
      return new CowStore(path.resolve(file), h, port, readOnly, map, top + 1, free);
    } catch (err) {
      await port.close();
      throw err;
    }
  }

  get blockSize(): number {
    return this.header.blockSize;
  }
  get blocks(): number {
    return this.header.mapEntries;
  }
  /** Bytes the file takes (its length; holes not subtracted). */
  fileBytes(): number {
    try {
      return fs.statSync(this.path).size;
    } catch {
      return 0;
    }
  }

  entry(block: number): number {
    return this.map[block]!;
  }

  slotOffset(slot: number): number {
    return this.header.dataOffset + slot * this.header.blockSize;
  }

  /** A slot for a new block's data; give it back with returnSlot() if the data never got mapped. */
  allocSlot(): number {
    const s = this.free.pop();
    if (s !== undefined) return s;
    if (this.nextSlot > MAX_SLOT) throw new NbdError("ENOSPC", `${this.path}: the overlay has no free data slot left`);
    return this.nextSlot++;
  }

  returnSlot(slot: number): void {
    this.free.push(slot);
  }

  /** Sets a block's map entry (in memory; made durable by the next flush). */
  set(block: number, value: number): void {
    const old = this.map[block]!;
    if (old === value) return;
    if (old === ZEROED) this.zeroedBlocks--;
    else if (old !== ABSENT) {
      this.allocatedBlocks--;
      // A slot the disk map may still name is free only once the change is durable.
      if (this.durable[block] === old) this.pendingFree.push(old - 2);
      else this.free.push(old - 2);
    }
    if (value === ZEROED) this.zeroedBlocks++;
    else if (value !== ABSENT) this.allocatedBlocks++;
    this.map[block] = value;
    if (this.durable[block] === value) this.pending.delete(block);
    else this.pending.set(block, value);
  }

  /** Non-absent blocks, ascending. */
  usedBlocks(): number[] {
    const out: number[] = [];
    for (let b = 0; b < this.map.length; b++) if (this.map[b] !== ABSENT) out.push(b);
    return out;
  }

  read(buf: Buffer, fileOffset: number): Promise<void> {
    return this.port.pread(buf, fileOffset, plainIo);
  }

  async write(buf: Buffer, fileOffset: number): Promise<void> {
    this.dirty = true;
    await this.port.pwrite(buf, fileOffset, plainIo);
    this.dirty = true;
  }

  /**
   * Makes every write and map change completed before the call durable. `beforeMap` runs after
   * the data is durable and before the map entries are written (a merge makes the layer below
   * durable there, before this map forgets the blocks it copied down). Flushes run one at a time.
   */
  flush(beforeMap?: () => Promise<void>): Promise<void> {
    const p = this.flushing.then(() => this.doFlush(beforeMap));
    this.flushing = p.catch(() => undefined);
    return p;
  }

  private async doFlush(beforeMap?: () => Promise<void>): Promise<void> {
    if (this.closed) throw new NbdError("ESHUTDOWN", `${this.path} is closed`);
    const entries = this.pending;
    const frees = this.pendingFree;
    if (entries.size === 0 && !this.dirty && !beforeMap) return;
    this.pending = new Map();
    this.pendingFree = [];
    this.dirty = false;
    const before = new Map<number, number>();
    for (const [b, v] of entries) {
      before.set(b, this.durable[b]!);
      this.durable[b] = v;
    }
    try {
      await this.port.flush(plainIo);
      if (beforeMap) await beforeMap();
      if (entries.size > 0) {
        await this.writeMapPages([...new Set([...entries.keys()].map((b) => Math.floor((b * 4) / MAP_PAGE)))].sort((a, b) => a - b));
        await this.port.flush(plainIo);
      }
    } catch (err) {
      // Nothing is known to be on disk: put the changes back for the next flush.
      for (const [b, v] of before) this.durable[b] = v;
      for (const [b, v] of entries) if (!this.pending.has(b) && this.map[b] === v) this.pending.set(b, v);
      this.pendingFree.push(...frees);
      this.dirty = true;
      throw err;
    }
    this.free.push(...frees);
  }

  private async writeMapPages(pages: number[]): Promise<void> {
    const perPage = MAP_PAGE / 4;
    let i = 0;
    while (i < pages.length) {
      let j = i;
      while (j + 1 < pages.length && pages[j + 1] === pages[j]! + 1) j++;
      const first = pages[i]! * perPage;
      const last = Math.min(this.durable.length, (pages[j]! + 1) * perPage);
      const buf = Buffer.allocUnsafe((last - first) * 4);
      for (let b = first; b < last; b++) buf.writeUInt32LE(this.durable[b]!, (b - first) * 4);
      await this.port.pwrite(buf, this.header.mapOffset + first * 4, plainIo);
      i = j + 1;
    }
  }

  /** Flushes (unless read-only) and closes. */
  async close(): Promise<void> {
    if (this.closed) return;
    if (!this.readOnly) await this.flush();
    this.closed = true;
    await this.port.close();
  }

  /** Closes without flushing (the file is being thrown away). */
  async discard(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.port.close();
  }
}
