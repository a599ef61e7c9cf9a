import fs from "node:fs";
import { NbdError } from "../../errors.js";
import { COMPRESSED_HI, COPIED_HI, HDR, compressedExtent, corrupt, entryOffset, l2EntrySize, ownedEntry, refcountAt, setRefcount, writeEntry, type Qcow2Header } from "./qcow2-format.js";

/**
 * A new L2 entry: [hi, lo] of the descriptor, and with extended L2 entries the subcluster bitmap's
 * [zeroes, allocated] halves (bits 32-63 and 0-31; 0 when left out).
 */
export type L2Value = readonly [number, number] | readonly [number, number, number, number];

/**
 * The metadata of an open qcow2 image (nbdkit's blk.c to the layer's cow.c): the L1 table, the L2
 * tables and refcount blocks (cached), and cluster allocation. The caches are writeback, as QEMU's
 * (block/qcow2-cache.c): a change is made in the cached table, which is dirty until written back;
 * lookups see it at once, and a dirty table is never evicted.
 *
 * Crash safety (see README.md, "Update order"): a reference reaches the file only after what it
 * points to is durable, and the count of a cluster is lowered only after the reference that held
 * it is durably gone. As changes are made:
 * 1. clusters are reserved in batches: their refcounts set to 1 in the cache (a new refcount block
 *    is written and made durable before the refcount table points to it, a grown refcount table
 *    before the header does: rare, and done at once);
 * 2. the layer writes data into reserved clusters, then changes L2 entries in the cache (a new L2
 *    table is made in the cache, its L1 entry changed in memory);
 * 3. counts of clusters no longer referenced are lowered only after a flush's last fdatasync.
 * Write-back (writeback: at a flush, at close, and when a cache holds more dirty tables than its
 * size) keeps QEMU's dependency order, a group and an fdatasync at a time: dirty refcount blocks,
 * fdatasync (counts and data durable); dirty L2 tables, fdatasync; dirty L1 entries; a flush then
 * ends with its own fdatasync. A crash at any point leaves at worst clusters counted but
 * unreferenced (leaks), never a reference to a cluster counted zero, to a table not on disk or
 * to data not on disk.
 *
 * Every change runs under one lock (`locked`); lookups need none.
 */
export interface Qcow2MetaOptions {
  /** Bytes of L2 tables kept in memory. */
  l2Cache: number;
  /** Bytes of refcount blocks kept in memory. */
  refcountCache: number;
  /**
   * Called at a flush for clusters whose last reference is durably gone, before their counts fall
   * to 0 (so none of them can be allocated again while it runs): waits for writes still in flight
   * to them and gives their space back to the file system (punches holes).
   */
  punch?: (clusters: number[]) => Promise<void>;
}

/** Clusters reserved at a time (their counts written with one fdatasync): up to 4 MiB, 2 to 1024 clusters. */
function batchOf(cs: number): number {
  return Math.min(1024, Math.max(2, Math.floor((4 * 1024 * 1024) / cs)));
}

/** Host offsets stay below 2^56 (bits 9-55 of an entry). */
const MAX_HOST = 2 ** 56;

/**
 * Tables by file offset, least recently used first. A table changed in memory is dirty (the bytes
 * changed, as one range) until it is written back; only clean tables are evicted, so the file
 * holds every table the cache does not, and a cache of dirty tables may grow past `max` until
 * the next write-back.
 */
class TableCache {
  private readonly map = new Map<number, Buffer>();
  /** Offset → [start, end) of the bytes changed since the table was last written. */
  readonly dirty = new Map<number, [number, number]>();
  constructor(private readonly max: number) {}
  get overfull(): boolean {
    return this.map.size > this.max;
  }
  peek(offset: number): Buffer | undefined {
    return this.map.get(offset);
  }
  get(offset: number): Buffer | undefined {
    const b = this.map.get(offset);
    if (b && this.map.size > 1) {
      // most recently used last
      this.map.delete(offset);
      this.map.set(offset, b);
    }
    return b;
  }
  set(offset: number, b: Buffer): void {
    this.map.delete(offset);
    this.map.set(offset, b);
    this.shrink();
  }
  /**
   * Bytes [start, end) of `b`, the table at `offset`, were changed. `b` may have been evicted (clean)
   * while its changer awaited something: it goes back in, replacing any copy read since.
   */
  markDirty(offset: number, b: Buffer, start: number, end: number): void {
    if (this.map.get(offset) !== b) {
      this.map.delete(offset);
      this.map.set(offset, b);
    }
    const d = this.dirty.get(offset);
    if (!d) this.dirty.set(offset, [start, end]);
    else {
      d[0] = Math.min(d[0], start);
      d[1] = Math.max(d[1], end);
    }
  }
  /** Evicts clean tables, least recently used first, down to `max` (dirty ones stay). */
  shrink(): void {
    if (this.map.size <= this.max) return;
    for (const off of this.map.keys()) {
      if (this.map.size <= this.max) return;
      if (!this.dirty.has(off)) this.map.delete(off);
    }
  }
}

function readAt(fd: number, buf: Buffer, offset: number): Promise<void> {
  return new Promise((resolve, reject) => {
    let done = 0;
    const step = (): void =>
      fs.read(fd, buf, done, buf.length - done, offset + done, (err, n) => {
        if (err) return reject(err);
        if (n === 0) {
          buf.fill(0, done); // past the end of the file: zeroes, as a sparse file reads
          return resolve();
        }
        done += n;
        if (done < buf.length) step();
        else resolve();
      });
    step();
  });
}

export class Qcow2Meta {
  readonly cs: number;
  readonly l2Entries: number;
  /** Bytes per L2 entry: 8, or 16 with extended L2 entries (the subcluster bitmap follows). */
  readonly l2EntrySize: 8 | 16;
  private readonly refBits: number;
  /** Refcount entries per refcount block. */
  private readonly rbEntries: number;
  private l1!: Buffer;
  private rt!: Buffer;
  private readonly l2Cache: TableCache;
  private readonly rbCache: TableCache;
  private readonly loading = new Map<number, Promise<Buffer>>();
  /** Tables written while a read of them was in flight: that read may be stale and is made again. */
  private readonly touched = new Set<number>();
  private chain: Promise<unknown> = Promise.resolve();
  /** L1 entries changed in memory and not yet written (indexes). */
  private readonly l1Dirty = new Set<number>();
  /** A flush queued behind the lock and not started yet: later flushes join it. */
  private queuedFlush: Promise<void> | null = null;
  /** Clusters counted 1 on disk but not used yet (cluster indexes, ascending). */
  private reserved: number[] = [];
  /** Clusters whose count is lowered at the next flush (cluster indexes, one per reference dropped). */
  private pendingFrees: number[] = [];
  /** Where the search for free clusters starts (cluster index). */
  private freeHint = 0;
  private readonly batch: number;
  /**
   * Where the image ends: the file's size at open, or past the last cluster allocated since. Every
   * offset a table gives must lie below it (a corrupt image must not send writes terabytes away).
   */
  fileEnd = 0;

  constructor(
    private readonly fd: number,
    readonly file: string,
    readonly header: Qcow2Header,
    opts: Qcow2MetaOptions,
  ) {
    this.cs = 2 ** header.clusterBits;
    this.l2EntrySize = l2EntrySize(header);
    this.l2Entries = this.cs / this.l2EntrySize;
    this.refBits = 2 ** header.refcountOrder;
    this.rbEntries = (this.cs * 8) / this.refBits;
    this.l2Cache = new TableCache(Math.max(4, Math.floor(opts.l2Cache / this.cs)));
    this.rbCache = new TableCache(Math.max(4, Math.floor(opts.refcountCache / this.cs)));
    this.batch = batchOf(this.cs);
    this.punch = opts.punch;
  }
  private readonly punch?: (clusters: number[]) => Promise<void>;

  async load(): Promise<void> {
    const h = this.header;
    this.fileEnd = fs.fstatSync(this.fd).size;
    if (h.l1TableOffset + h.l1Size * 8 > this.fileEnd) throw corrupt(this.file, `the L1 table (${h.l1Size} entries at ${h.l1TableOffset}) lies past the end of the file`);
    if (h.refcountTableOffset + h.refcountTableClusters * this.cs > this.fileEnd)
      throw corrupt(this.file, `the refcount table (${h.refcountTableClusters} clusters at ${h.refcountTableOffset}) lies past the end of the file`);
    if (h.l1Size > 0 && h.l1TableOffset < h.refcountTableOffset + h.refcountTableClusters * this.cs && h.refcountTableOffset < h.l1TableOffset + h.l1Size * 8)
      throw corrupt(this.file, "the L1 table and the refcount table overlap");
    if (h.l1TableOffset < this.cs && h.l1Size > 0) throw corrupt(this.file, "the L1 table overlaps the header");
    this.l1 = Buffer.alloc(h.l1Size * 8);
    if (h.l1Size) await readAt(this.fd, this.l1, h.l1TableOffset);
    this.rt = Buffer.alloc(h.refcountTableClusters * this.cs);
    await readAt(this.fd, this.rt, h.refcountTableOffset);
  }

  // ---- the lock ----

  /**
   * Runs `fn` when every change begun before it has finished (one change at a time). When a cache
   * holds more dirty tables than its size, they are written back after `fn` (see writeback).
   */
  locked<T>(fn: () => Promise<T>): Promise<T> {
    const step = async (): Promise<T> => {
      const r = await fn();
      if (this.l2Cache.overfull || this.rbCache.overfull) await this.writeback();
      return r;
    };
    const run = this.chain.then(step, step);
    this.chain = run.catch(() => undefined);
    return run;
  }

  // ---- lookups ----

  /** The L2 table of L1 entry `i` if it is in memory; null if there is none; undefined if it must be read. */
  l2Now(i: number): Buffer | null | undefined {
    if (i >= this.header.l1Size) return null;
    const off = entryOffset(this.l1.readUInt32BE(i * 8), this.l1.readUInt32BE(i * 8 + 4));
    if (off === 0) return null;
    return this.l2Cache.get(off);
  }

  /** The L2 table of L1 entry `i` (null: none, all its clusters unallocated). */
  async l2(i: number): Promise<Buffer | null> {
    const now = this.l2Now(i);
    if (now !== undefined) return now;
    const off = entryOffset(this.l1.readUInt32BE(i * 8), this.l1.readUInt32BE(i * 8 + 4));
    if (off % this.cs !== 0) throw corrupt(this.file, `L1 entry ${i} points to unaligned offset ${off}`);
    if (off + this.cs > this.fileEnd) throw corrupt(this.file, `L1 entry ${i} points past the end of the file (${off})`);
    if (this.overlapsFixed(off, this.cs)) throw corrupt(this.file, `L1 entry ${i} points into the header or a table (${off})`);
    return this.loadTable(off, this.l2Cache);
  }

  private loadTable(off: number, cache: TableCache): Promise<Buffer> {
    let p = this.loading.get(off);
    if (!p) {
      const buf = Buffer.allocUnsafe(this.cs);
      const read = async (): Promise<void> => {
        do {
          this.touched.delete(off);
          await readAt(this.fd, buf, off);
        } while (this.touched.has(off));
      };
      p = read().then(
        () => {
          this.loading.delete(off);
          const now = cache.peek(off); // a table made at this offset meanwhile is newer than the file
          if (now) return now;
          cache.set(off, buf);
          return buf;
        },
        (err: unknown) => {
          this.loading.delete(off);
          throw err;
        },
      );
      this.loading.set(off, p);
    }
    return p;
  }

  private l1Entry(i: number): [number, number] {
    return [this.l1.readUInt32BE(i * 8), this.l1.readUInt32BE(i * 8 + 4)];
  }

  /** Whether [off, off + len) touches the header cluster, the L1 table or the refcount table. */
  overlapsFixed(off: number, len: number): boolean {
    const h = this.header;
    const end = off + len;
    return off < this.cs || (off < h.l1TableOffset + h.l1Size * 8 && h.l1TableOffset < end) || (off < h.refcountTableOffset + h.refcountTableClusters * this.cs && h.refcountTableOffset < end);
  }

  // ---- refcounts ----

  private rtEntry(t: number): number {
    if (t * 8 >= this.rt.length) return 0;
    return entryOffset(this.rt.readUInt32BE(t * 8) & 0x00ffffff, this.rt.readUInt32BE(t * 8 + 4));
  }

  private async refBlock(t: number): Promise<Buffer | null> {
    const off = this.rtEntry(t);
    if (off === 0) return null;
    if (off % this.cs !== 0) throw corrupt(this.file, `refcount table entry ${t} points to unaligned offset ${off}`);
    if (off + this.cs > this.fileEnd) throw corrupt(this.file, `refcount table entry ${t} points past the end of the file (${off})`);
    if (this.overlapsFixed(off, this.cs)) throw corrupt(this.file, `refcount table entry ${t} points into the header or a table (${off})`);
    return this.rbCache.get(off) ?? this.loadTable(off, this.rbCache);
  }

  /** The refcount of cluster `c` (a cluster index). */
  async refcount(c: number): Promise<number> {
    const b = await this.refBlock(Math.floor(c / this.rbEntries));
    return b ? refcountAt(b, c % this.rbEntries, this.refBits) : 0;
  }

  private async setCount(c: number, value: number): Promise<void> {
    const t = Math.floor(c / this.rbEntries);
    const b = await this.refBlock(t);
    if (!b) throw corrupt(this.file, `no refcount block for cluster ${c}`);
    const [s, e] = setRefcount(b, c % this.rbEntries, this.refBits, value);
    this.rbCache.markDirty(this.rtEntry(t), b, s, e);
  }

  private writeNow(buf: Buffer, start: number, end: number, fileOffset: number): void {
    for (let done = start; done < end; ) done += fs.writeSync(this.fd, buf, done, end - done, fileOffset + done - start);
  }

  sync(): Promise<void> {
    return new Promise((resolve, reject) => fs.fdatasync(this.fd, (err) => (err ? reject(err) : resolve())));
  }

  // ---- allocation (call under the lock) ----

  /**
   * `n` clusters for new data or tables (host offsets, ascending, contiguous where the free space
   * is). Their refcounts are 1 in the cache (written back before any L2 table that maps them).
   */
  async allocate(n: number): Promise<number[]> {
    if (this.reserved.length < n) await this.reserve(Math.max(n - this.reserved.length, this.batch));
    return this.reserved.splice(0, n).map((c) => c * this.cs);
  }

  /** Gives back clusters from `allocate` that nothing references (a write that failed before it linked them). */
  unreserve(hosts: number[]): void {
    this.reserved.push(...hosts.map((h) => h / this.cs));
    this.reserved.sort((a, b) => a - b);
  }

  private async reserve(n: number): Promise<void> {
    const found: number[] = [];
    let c = Math.max(1, this.freeHint);
    // Past the end of the file every cluster is free in a sound image (but for leaks of a crash):
    // counts still taken 1 GiB further mean corrupt refcounts, not a reason to write terabytes away.
    const limit = Math.min(MAX_HOST, this.fileEnd + 2 ** 30 + (n + 2) * this.cs);
    while (found.length < n) {
      if (c * this.cs >= limit)
        throw corrupt(this.file, `no free cluster up to ${limit} bytes (1 GiB past the end of the file): the refcounts look wrong; repair it with: qemu-img check -r all ${this.file}`);
      const t = Math.floor(c / this.rbEntries);
      if (t * 8 >= this.rt.length) {
        await this.growRefcountTable(t);
        continue;
      }
      let b = await this.refBlock(t);
      if (!b) {
        b = await this.newRefcountBlock(t);
        continue; // its own cluster is now counted
      }
      const end = (t + 1) * this.rbEntries;
      for (; c < end && found.length < n; c++) {
        if (refcountAt(b, c % this.rbEntries, this.refBits) !== 0) continue;
        if (this.overlapsFixed(c * this.cs, this.cs)) throw corrupt(this.file, `cluster ${c} holds the header or a table but its refcount is 0; repair it with: qemu-img check -r all ${this.file}`);
        found.push(c);
      }
    }
    for (const f of found) await this.setCount(f, 1);
    this.fileEnd = Math.max(this.fileEnd, (found[found.length - 1]! + 1) * this.cs);
    this.reserved.push(...found);
    this.reserved.sort((a, b) => a - b);
    this.freeHint = found[found.length - 1]! + 1;
  }

  /**
   * A refcount block for range `t` (clusters t·E … t·E+E-1), all free: it goes in the first cluster
   * of its range and counts itself. Written and made durable before the table points to it.
   */
  private async newRefcountBlock(t: number): Promise<Buffer> {
    const c = t * this.rbEntries;
    if (this.overlapsFixed(c * this.cs, this.cs)) throw corrupt(this.file, `refcount table entry ${t} is empty but its range holds the header or a table`);
    this.fileEnd = Math.max(this.fileEnd, (c + 1) * this.cs);
    const b = Buffer.alloc(this.cs);
    setRefcount(b, 0, this.refBits, 1);
    this.writeNow(b, 0, this.cs, c * this.cs);
    await this.sync();
    const e = Buffer.alloc(8);
    writeEntry(e, 0, ...ownedEntry(c * this.cs));
    e.writeUInt32BE(e.readUInt32BE(0) & 0x00ffffff, 0); // refcount table entries carry no flags
    e.copy(this.rt, t * 8);
    this.writeNow(this.rt, t * 8, t * 8 + 8, this.header.refcountTableOffset + t * 8);
    this.rbCache.set(c * this.cs, b);
    return b;
  }

  /**
   * The refcount table is full at range `t`: a larger table (twice the entries, or enough for `t`)
   * goes in range `t` after a new refcount block that counts both; written, made durable, then the
   * header points to it. The old table's clusters are freed at the next flush.
   */
  private async growRefcountTable(t: number): Promise<void> {
    if (t * this.rbEntries * this.cs >= MAX_HOST) throw new NbdError("ENOSPC", `${this.file}: no room for refcounts below 2^56 bytes`);
    const oldEntries = this.rt.length / 8;
    const want = Math.max(t + 1, oldEntries * 2);
    const clusters = Math.ceil((want * 8) / this.cs);
    if (clusters + 1 > this.rbEntries)
      throw new NbdError("ENOSPC", `${this.file}: the refcount table would have to grow to ${clusters} clusters, more than one refcount block can place; convert the image to a larger cluster size (qemu-img convert -O qcow2 -o cluster_size=64k)`);
    const first = t * this.rbEntries;
    this.fileEnd = Math.max(this.fileEnd, (first + 1 + clusters) * this.cs);
    const block = Buffer.alloc(this.cs);
    for (let i = 0; i <= clusters; i++) setRefcount(block, i, this.refBits, 1);
    const table = Buffer.alloc(clusters * this.cs);
    this.rt.copy(table, 0);
    table.writeUInt32BE(Math.floor((first * this.cs) / 0x100000000), t * 8);
    table.writeUInt32BE((first * this.cs) % 0x100000000, t * 8 + 4);
    this.writeNow(block, 0, this.cs, first * this.cs);
    this.writeNow(table, 0, table.length, (first + 1) * this.cs);
    await this.sync();
    const hdr = Buffer.alloc(12);
    hdr.writeBigUInt64BE(BigInt((first + 1) * this.cs), 0);
    hdr.writeUInt32BE(clusters, 8);
    this.writeNow(hdr, 0, 12, HDR.refcountTableOffset);
    await this.sync();
    const oldStart = this.header.refcountTableOffset / this.cs;
    for (let i = 0; i < this.header.refcountTableClusters; i++) this.pendingFrees.push(oldStart + i);
    this.header.refcountTableOffset = (first + 1) * this.cs;
    this.header.refcountTableClusters = clusters;
    this.rt = table;
    this.rbCache.set(first * this.cs, block);
  }

  // ---- references (call under the lock) ----

  /** Drops one reference held by an old L2 entry [hi, lo] (standard or compressed): counted down at the next flush. */
  dropEntry(hi: number, lo: number): void {
    if (hi & COMPRESSED_HI) {
      const { offset, length } = compressedExtent(hi, lo, this.header.clusterBits);
      const start = offset - (offset % 512);
      const first = Math.floor(start / this.cs);
      const last = Math.floor((start + Math.ceil((offset - start + length) / 512) * 512 - 1) / this.cs);
      for (let c = first; c <= last; c++) this.pendingFrees.push(c);
      return;
    }
    const off = entryOffset(hi, lo);
    if (off !== 0) this.pendingFrees.push(off / this.cs);
  }

  /**
   * The L2 table of L1 entry `i`, ready to be written: a table of our own (COPIED in L1) as is; a
   * missing one made zeroed, a shared one (an internal snapshot holds it too) copied. A new table
   * is dirty in the cache and so is its L1 entry: written back table first, then a sync, then L1.
   */
  async writableL2(i: number): Promise<Buffer> {
    if (i >= this.header.l1Size) throw new NbdError("EINVAL", `${this.file}: guest offset beyond the L1 table`);
    const [hi, lo] = this.l1Entry(i);
    const old = await this.l2(i);
    if (old && hi & COPIED_HI) return old;
    const [at] = await this.allocate(1);
    const table = Buffer.alloc(this.cs);
    old?.copy(table);
    this.l2Cache.markDirty(at!, table, 0, this.cs);
    writeEntry(this.l1, i * 8, ...ownedEntry(at!));
    this.l1Dirty.add(i);
    if (old) this.dropEntry(hi, lo);
    return table;
  }

  /**
   * Sets L2 entries of guest clusters (ascending) to new values and drops what the old ones
   * referenced. `values[k]` is the entry for guest cluster `clusters[k]` (with extended L2
   * entries its subcluster bitmap too, written with it).
   */
  async setEntries(clusters: number[], values: L2Value[]): Promise<void> {
    const esz = this.l2EntrySize;
    for (let k = 0; k < clusters.length; ) {
      const i = Math.floor(clusters[k]! / this.l2Entries);
      const table = await this.writableL2(i);
      let lo = this.cs;
      let hiEnd = 0;
      for (; k < clusters.length && Math.floor(clusters[k]! / this.l2Entries) === i; k++) {
        const at = (clusters[k]! % this.l2Entries) * esz;
        const oh = table.readUInt32BE(at);
        const ol = table.readUInt32BE(at + 4);
        const v = values[k]!;
        const [nh, nl] = v;
        const nz = esz === 16 ? (v[2] ?? 0) >>> 0 : 0;
        const na = esz === 16 ? (v[3] ?? 0) >>> 0 : 0;
        if (oh === nh >>> 0 && ol === nl >>> 0 && (esz === 8 || (table.readUInt32BE(at + 8) === nz && table.readUInt32BE(at + 12) === na))) continue;
        const sameCluster = !(oh & COMPRESSED_HI) && !(nh & COMPRESSED_HI) && entryOffset(oh, ol) === entryOffset(nh, nl);
        if (!sameCluster) this.dropEntry(oh, ol);
        writeEntry(table, at, nh, nl);
        if (esz === 16) writeEntry(table, at + 8, nz, na);
        lo = Math.min(lo, at);
        hiEnd = Math.max(hiEnd, at + esz);
      }
      if (hiEnd > lo) this.l2Cache.markDirty(this.l2OffsetOf(i), table, lo, hiEnd);
    }
  }

  private l2OffsetOf(i: number): number {
    const [hi, lo] = this.l1Entry(i);
    return entryOffset(hi, lo);
  }

  /** Writes the dirty ranges of a cache's tables to the file. */
  private writeDirty(cache: TableCache): void {
    for (const [off, [s, e]] of cache.dirty) {
      this.writeNow(cache.peek(off)!, s, e, off + s);
      if (this.loading.has(off)) this.touched.add(off);
    }
    cache.dirty.clear();
  }

  /**
   * Writes dirty metadata back in dependency order (QEMU's cache dependencies): refcount blocks;
   * fdatasync (the counts, and the guest data already written, are durable before anything maps
   * them); L2 tables; fdatasync (a new table is durable before L1 points to it); L1 entries. The
   * last group is durable at the caller's next sync. Runs under the lock: at a flush, at close,
   * and when a cache holds more dirty tables than its size.
   */
  async writeback(): Promise<void> {
    this.writeDirty(this.rbCache);
    if (this.l2Cache.dirty.size > 0) {
      await this.sync();
      this.writeDirty(this.l2Cache);
    }
    if (this.l1Dirty.size > 0) {
      await this.sync();
      for (const i of [...this.l1Dirty].sort((a, b) => a - b)) this.writeNow(this.l1, i * 8, i * 8 + 8, this.header.l1TableOffset + i * 8);
      this.l1Dirty.clear();
    }
    this.rbCache.shrink();
    this.l2Cache.shrink();
  }

  /**
   * A flush under the lock, shared: one asked for while another waits for the lock (not started
   * yet, so it will cover every write done before this call) joins it.
   */
  flushShared(): Promise<void> {
    if (!this.queuedFlush)
      this.queuedFlush = this.locked(() => {
        this.queuedFlush = null;
        return this.flush();
      });
    return this.queuedFlush;
  }

  /**
   * Writes back dirty metadata (see writeback) and makes everything durable, then lowers, in the
   * cache, the counts of clusters whose last reference was dropped before it (a crash before they
   * are written leaves them leaked, never in use).
   */
  async flush(): Promise<void> {
    const frees = this.pendingFrees;
    this.pendingFrees = [];
    await this.writeback();
    await this.sync();
    if (frees.length === 0) return;
    const drops = new Map<number, number>();
    for (const c of frees) drops.set(c, (drops.get(c) ?? 0) + 1);
    let doubleFree = -1;
    const counts = new Map<number, number>();
    const freed: number[] = [];
    for (const [c, d] of drops) {
      const n = await this.refcount(c);
      if (n < d) doubleFree = c;
      const m = Math.max(0, n - d);
      if (m !== n) counts.set(c, m);
      if (m === 0 && n > 0) freed.push(c);
    }
    // Holes first: until its count is 0 a cluster cannot be allocated, so no punch lands on new data.
    if (freed.length > 0 && this.punch) await this.punch(freed);
    for (const [c, m] of counts) {
      await this.setCount(c, m);
      if (m === 0 && c < this.freeHint) this.freeHint = c;
    }
    if (doubleFree >= 0) throw corrupt(this.file, `cluster ${doubleFree} was referenced but its refcount is 0`);
  }

  /** At close: flush, give back the clusters reserved but not used, and write the counts lowered. */
  async release(): Promise<void> {
    await this.flush();
    const left = this.reserved;
    this.reserved = [];
    for (const c of left) await this.setCount(c, 0);
    if (this.rbCache.dirty.size === 0) return;
    this.writeDirty(this.rbCache);
    await this.sync();
  }

  /** Clears autoclear feature bits (bitmaps and others this layer does not keep up to date) before writing. */
  clearAutoclear(): void {
    const h = this.header;
    if (h.version < 3 || (h.autoclear[0] === 0 && h.autoclear[1] === 0)) return;
    const z = Buffer.alloc(8);
    this.writeNow(z, 0, 8, HDR.autoclear);
    h.autoclear = [0, 0];
  }
}
