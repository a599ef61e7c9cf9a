import fs from "node:fs";
import path from "node:path";
import { NbdError } from "../../errors.js";
import { plainIo } from "../layer.js";
import { FilePort, type IoMode } from "../port/file-port.js";
import { ABSENT, HEADER_SIZE, MAP_PAGE, MAX_SLOT, ZEROED, corrupt, decodeHeader, encodeHeader, type CowHeader } from "./cow-format.js";

/**
 * The store of a copy-on-write layer: one overlay file (format in cow-format.ts), its allocation
 * map and its data slots.
 *
 * Crash safety: a new slot's data is written first; its map entry reaches the file only in
 * flush(), after an fdatasync of the data, and is followed by another fdatasync. So the map on
 * disk never names a slot whose data is not durable, and everything flushed survives a crash.
 * A slot given up (block zeroed or merged away) is reused only once that change is durable.
 */

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
