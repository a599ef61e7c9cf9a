import fs from "node:fs";
import path from "node:path";
import { NbdError } from "../../errors.js";
import { fsyncDir } from "../../util/fsync-dir.js";
import { plainIo } from "../layer.js";
import { FilePort, type IoMode } from "../port/file-port.js";
import {
  ABSENT,
  DEFAULT_COW_BLOCK_SIZE,
  HEADER_SIZE,
  MAP_ENTRY_SIZE,
  MAP_PAGE,
  MAX_SLOT,
  ZEROED,
  corrupt,
  decodeHeader,
  decodeMap,
  encodeHeader,
  encodeMap,
  newHeader,
  type CowHeader,
} from "./cow-format.js";

/**
 * The store of a copy-on-write layer (nbdkit's blk.c to the layer's cow.c): one overlay file
 * (its bytes are described in cow-format.ts) with its allocation map, held in memory, and its data
 * slots; and the chain of overlays a cow stack is made of: the writable top, then frozen snapshots,
 * each header naming the file below it. No locking: the layer locks blocks, and pauses requests
 * around a snapshot and the end of a merge.
 *
 * The rules the store keeps, and the order of its writes:
 * - Data before map. A block's new data goes to a slot that no map on disk names (a fresh slot or
 *   a free one); the caller sets the block's map entry (set()) only once that write has completed.
 *   The map reaches the file only in flush(): fdatasync of the data, then the changed map pages,
 *   then fdatasync again. So the map on disk never names a slot whose data is not durable.
 * - After a crash (kill -9, power loss) an overlay reopens consistent and holds every flushed
 *   write. An unflushed write into a block the overlay did not hold yet is gone (the block reads as
 *   before, never half written); one into a block it held may or may not be there, as on any disk.
 * - A slot given up (its block zeroed or merged away) is reused only once a map that no longer
 *   names it is durable, so a crash never makes one block show another's data. Slots no block
 *   names (left by a crash) are found and reused when the file is opened.
 * - A merge hooks into flush() between the two steps: its target is made durable after this
 *   overlay's data and before this overlay's map forgets the blocks copied down, so a crash in a
 *   merge reopens consistent and the merge can simply be run again.
 * - A new overlay is written whole under a temporary name (header, empty map, fsync) and renamed
 *   into place, the directory synced: a name never shows a half-written overlay.
 * - A snapshot (freeze()): flush; a hard link gives the overlay its frozen name; a new, empty
 *   overlay naming the frozen file replaces the top name as above. At every step the top name is
 *   a complete overlay; a stray frozen name left by a crash is removed by the next snapshot.
 * - The end of a merge into a snapshot (renameOver()): the snapshot takes the top name in one
 *   durable rename, which drops the emptied overlay.
 */


/** Renames `from` to `to` (replacing it) and makes the rename durable. */
function durableRename(from: string, to: string): void {
  fs.renameSync(from, to);
  fsyncDir(path.dirname(to));
}

export interface CowStoreOptions {
  /** How the file is read and written (see FilePort). */
  io?: IoMode;
}

export interface CowChainOptions extends CowStoreOptions {
  /** The device's size: every overlay in the chain must have been made for it. */
  size: number;
  /** The block size every overlay must have (default: the top one's); a new top gets it, or 64 KiB. */
  blockSize?: number;
  /** Create the top overlay when it does not exist (default true). */
  create?: boolean;
  /** The base's description: kept in a new overlay's header and named in errors. */
  base: string;
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
  private readonly io: IoMode | undefined;
  allocatedBlocks = 0;
  zeroedBlocks = 0;

  private constructor(file: string, header: CowHeader, port: FilePort, readOnly: boolean, map: Uint32Array, nextSlot: number, free: number[], io: IoMode | undefined) {
    this.path = file;
    this.io = io;
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

  /** Opens an overlay, checking its header and map, and finds the slots free after a crash. */
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
      const mapBytes = h.mapEntries * MAP_ENTRY_SIZE;
      if (st.size < h.mapOffset + mapBytes) throw corrupt(file, `truncated: the allocation map ends at ${h.mapOffset + mapBytes}, the file at ${st.size}`);
      const raw = Buffer.alloc(mapBytes);
      if (mapBytes > 0) await port.pread(raw, h.mapOffset, plainIo);
      const map = decodeMap(raw);
      const used = new Uint8Array(Math.max(0, Math.floor((st.size - h.dataOffset) / h.blockSize) + 1));
      let top = -1;
      for (let b = 0; b < h.mapEntries; b++) {
        const v = map[b]!;
        if (v < 2) continue;
        const slot = v - 2;
        const len = Math.min(h.blockSize, h.virtualSize - b * h.blockSize);
        const at = h.dataOffset + slot * h.blockSize;
        if (at + len > st.size) throw corrupt(file, `allocation map entry of block ${b} (map offset ${h.mapOffset + b * MAP_ENTRY_SIZE}) points at ${at}, past the end of the file (${st.size})`);
        if (used[slot]) throw corrupt(file, `allocation map gives data slot ${slot} to two blocks (one is block ${b}, map offset ${h.mapOffset + b * MAP_ENTRY_SIZE})`);
        used[slot] = 1;
        if (slot > top) top = slot;
      }
      // Slots below the highest one in use that no block names (left by a crash) are reused.
      const free: number[] = [];
      for (let s = top - 1; s >= 0; s--) if (!used[s]) free.push(s);
      return new CowStore(path.resolve(file), h, port, readOnly, map, top + 1, free, opts.io);
    } catch (err) {
      await port.close();
      throw err;
    }
  }

  /**
   * Opens the overlay `top` (created first if it is missing, unless `create: false`) and every
   * snapshot its chain of headers names, top first. Each must have been made for a device of
   * `size` bytes and have the block size asked for; the top must be writable.
   */
  static async openChain(top: string, o: CowChainOptions): Promise<CowStore[]> {
    const size = o.size;
    if (!fs.existsSync(top)) {
      if (o.create === false) throw new NbdError("EINVAL", `${top}: the overlay does not exist (and creating it was not asked for)`);
      const h = newHeader(size, o.blockSize ?? DEFAULT_COW_BLOCK_SIZE, "", o.base);
      await (await CowStore.create(top, h, { io: o.io })).close();
    }
    const files: CowStore[] = [];
    try {
      const seen = new Set<string>();
      for (let p = top; ; ) {
        const real = fs.realpathSync(p);
        if (seen.has(real)) throw new NbdError("EINVAL", `${top}: the chain of backing overlays loops at ${p}`);
        seen.add(real);
        const f = await CowStore.open(p, { io: o.io });
        files.push(f);
        const h = f.header;
        const want = o.blockSize ?? files[0]!.blockSize;
        if (h.virtualSize !== size || h.baseSize !== size)
          throw new NbdError("EINVAL", `${p}: the overlay was made for a ${h.virtualSize}-byte device, but the base ${o.base} has ${size} bytes`);
        if (h.blockSize !== want)
          throw new NbdError("EINVAL", `${p}: the overlay's block size is ${h.blockSize}, not ${want}${files.length > 1 ? ` (the block size of ${top})` : ""}`);
        if (files.length === 1 && f.readOnly) throw new NbdError("EPERM", `${p}: the overlay file is not writable`);
        if (!h.backing) break;
        const next = path.resolve(path.dirname(p), h.backing);
        if (!fs.existsSync(next)) throw new NbdError("EINVAL", `${p}: its backing overlay ${next} is missing`);
        p = next;
      }
    } catch (err) {
      for (const f of files) await f.discard();
      throw err;
    }
    return files;
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
        await this.writeMapPages([...new Set([...entries.keys()].map((b) => Math.floor((b * MAP_ENTRY_SIZE) / MAP_PAGE)))].sort((a, b) => a - b));
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
    const perPage = MAP_PAGE / MAP_ENTRY_SIZE;
    let i = 0;
    while (i < pages.length) {
      let j = i;
      while (j + 1 < pages.length && pages[j + 1] === pages[j]! + 1) j++;
      const first = pages[i]! * perPage;
      const last = Math.min(this.durable.length, (pages[j]! + 1) * perPage);
      await this.port.pwrite(encodeMap(this.durable, first, last), this.header.mapOffset + first * MAP_ENTRY_SIZE, plainIo);
      i = j + 1;
    }
  }

  /**
   * Freezes this overlay, the top of its chain, for a snapshot (the caller keeps writes away):
   * flushes it, gives it a second name, `name` (a file name beside it) or PATH.snap-N (the lowest
   * free N), and puts a new, empty overlay naming the frozen file in its place. Returns the new
   * top; this store carries the frozen name from then on.
   */
  async freeze(name: string | undefined, base: string): Promise<CowStore> {
    await this.flush();
    const top = this.path;
    const frozenPath = this.snapshotPath(name);
    try {
      fs.linkSync(top, frozenPath);
    } catch (err) {
      throw new NbdError("EINVAL", `${top}: cannot name the snapshot ${frozenPath} (${(err as Error).message})`);
    }
    let fresh: CowStore;
    try {
      const h = newHeader(this.header.virtualSize, this.blockSize, path.relative(path.dirname(top), frozenPath), base);
      fresh = await CowStore.create(top, h, { io: this.io });
    } catch (err) {
      fs.rmSync(frozenPath, { force: true });
      throw err;
    }
    this.path = frozenPath;
    return fresh;
  }

  private snapshotPath(name?: string): string {
    const top = this.path;
    const dir = path.dirname(top);
    const taken = (p: string): boolean => {
      let st: fs.Stats;
      try {
        st = fs.statSync(p);
      } catch {
        return false;
      }
      // A second name of the overlay itself is left by a snapshot interrupted before it finished.
      const me = fs.statSync(top);
      if (st.ino === me.ino && st.dev === me.dev) {
        fs.rmSync(p);
        return false;
      }
      return true;
    };
    if (name !== undefined) {
      // Snapshots live beside the overlay: headers name their backing file relative to it.
      if (!name || name.includes("\0") || name.includes("/") || name === "." || name === "..")
        throw new NbdError("EINVAL", `bad snapshot name ${JSON.stringify(name)}: a file name (no directory) beside ${top}`);
      const p = path.join(dir, name);
      if (taken(p)) throw new NbdError("EINVAL", `snapshot ${p} already exists`);
      return p;
    }
    for (let n = 1; ; n++) {
      const p = `${top}.snap-${n}`;
      if (!taken(p)) return p;
    }
  }

  /** Takes the name `to`, replacing the file there, in one durable rename (the end of a merge). */
  renameOver(to: string): void {
    durableRename(this.path, to);
    this.path = to;
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
