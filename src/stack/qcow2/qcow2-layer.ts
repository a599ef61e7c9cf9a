import fs from "node:fs";
import zlib from "node:zlib";
import type { Logger } from "pino";
import { NbdError } from "../../errors.js";
import { State } from "../../protocol/constants.js";
import { deeper, InflightTracker, plainIo, type Capabilities, type Extent, type ExtentKind, type Io, type Layer } from "../layer.js";
import { createFilePort, type FilePort, type IoMode } from "../port/file-port.js";
import { pushExtents } from "../volume/common.js";
import { backingLayer, backingPath, probeFormat, qcow2BackingOf } from "./qcow2-backing.js";
import { backingNameFor, createQcow2 } from "./qcow2-create.js";
import {
  ALL_SUBCLUSTERS,
  COMPRESSED_HI,
  COPIED_HI,
  INCOMPAT,
  SUBCLUSTERS,
  ZERO_LO,
  ZSTD,
  backingName,
  clusterSizeOf,
  compressedExtent,
  corrupt,
  entryOffset,
  featureBit,
  hasExtendedL2,
  l2EntrySize,
  onesFrom,
  ownedEntry,
  parseHeader,
  subclusterMask,
  type Qcow2Header,
} from "./qcow2-format.js";
import { Qcow2Meta, type L2Value } from "./qcow2-meta.js";
import { inflateZstd } from "./qcow2-zstd.js";
import { ioBuffers } from "../../util/buffer-pool.js";

/** Default bytes of L2 tables kept in memory: QEMU's default maximum on Linux (covers 256 GiB at 64 KiB clusters). */
export const DEFAULT_L2_CACHE = 32 * 1024 * 1024;
/** Default bytes of refcount blocks kept in memory (each 64 KiB block counts 2 GiB at 64 KiB clusters). */
export const DEFAULT_REFCOUNT_CACHE = 1024 * 1024;

export interface Qcow2LayerOptions {
  path: string;
  /** Open the image read-only (a backing file always is). */
  readOnly?: boolean;
  /**
   * `auto`: open the backing chain the image names; `none`: unallocated clusters read as zeroes;
   * a layer (`backing: STACK`): the chain the image names is followed, and the last qcow2 image of
   * it (the one naming no backing file) reads its unallocated clusters from the layer, which it
   * opens and closes with itself and only reads (below a raw backing file it is not used).
   */
  backing?: "auto" | "none" | Layer;
  io?: IoMode;
  /**
   * Give freed clusters' space back to the file system (punch holes), as QEMU's discard=unmap:
   * true unless false (`serve --discard ignore`).
   */
  discard?: boolean;
  /** Bytes of L2 tables to cache (default 32 MiB), per image of the chain. */
  l2Cache?: number;
  /** Bytes of refcount blocks to cache (default 1 MiB). */
  refcountCache?: number;
  log?: Logger;
  /** Position in a backing chain (0: the image served). */
  depth?: number;
  /**
   * `serve IMAGE --overlay FILE.qcow2`: the image is an overlay of this one (read-only below it). A
   * missing image is created (empty, backing name and format of `image`, its size); an existing one
   * must name `image` as its backing file.
   */
  overlayOf?: { image: string; format: "raw" | "qcow2" };
}

// What an L2 entry says about its guest cluster.
const UNALLOC = 0;
const ZERO = 1;
/** A standard cluster of ours (COPIED: refcount 1): written in place. */
const OWNED = 2;
/** A standard cluster shared with an internal snapshot (or without COPIED): copied before a write. */
const SHARED = 3;
const COMPRESSED = 4;

/**
 * A write's clusters: of ours (guest cluster, host offset), and those that get new clusters (their
 * old entries: [hi, lo], with extended L2 entries [hi, lo, zeroes, allocated]).
 */
interface WritePlan {
  /** Guest bytes [offset, end) written. */
  offset: number;
  end: number;
  owned: Array<[number, number]>;
  targets: number[];
  olds: Array<readonly number[]>;
  hosts: number[];
  /**
   * Extended L2 entries: clusters of ours written in place where some subclusters written are not
   * allocated yet (their bitmaps change at the link): guest cluster and old entry [hi, lo, zeroes,
   * allocated]. Empty otherwise.
   */
  inPlace: Array<{ gc: number; entry: readonly number[] }>;
}

const HOLE_ZERO = State.NBD_STATE_HOLE | State.NBD_STATE_ZERO;
const DONE: Promise<void> = Promise.resolve();
const MAX_REQUEST = 32 * 1024 * 1024;

/**
 * A qcow2 image (v2 or v3) at the bottom of a stack: guest reads and writes mapped through the L1
 * and L2 tables to clusters of the file, unallocated clusters read from the backing chain (qcow2
 * or raw files) or as zeroes, compressed clusters inflated, new clusters allocated with refcounts.
 *
 * This class is the I/O path; the tables, refcounts, allocation and the order of metadata
 * updates are in qcow2-meta.ts. Reads, and writes into clusters the image owns (COPIED), go
 * straight to the file at the host offset without a lock. Writes that need a cluster (unallocated,
 * zero, compressed, shared with a snapshot) take the metadata lock to plan (look at the tables
 * again, allocate) and to link (change L2 entries), and run concurrently in between, copying and
 * writing data; their guest clusters are in flight meanwhile. Zero and trim run under the lock
 * once none of their clusters is in flight. With extended L2 entries the same holds subcluster by
 * subcluster (mapSubclusters, writeSubclusters, linkSubclusters, zeroSubclusters): a write into
 * subclusters of ours not allocated yet is an allocating write, since their entry changes.
 */
export class Qcow2Layer implements Layer {
  private meta!: Qcow2Meta;
  private data!: FilePort;
  private fd = -1;
  private header!: Qcow2Header;
  private backing: Layer | null = null;
  private backingSize = 0;
  private caps!: Capabilities;
  private cs = 0;
  private l2e = 0;
  private v3 = false;
  /** Extended L2 entries (incompatible bit 4): 16-byte entries, 32 subclusters of `scs` bytes a cluster. */
  private xl2 = false;
  private scs = 0;
  private readOnly: boolean;
  private zeroCluster!: Buffer;
  private readonly tracker = new InflightTracker();
  /** Guest clusters with an allocating write between its plan and its link, and when it ends. */
  private readonly inflight = new Map<number, Promise<void>>();
  /** The last compressed cluster inflated (a client reads one in several requests). */
  private inflated: { hi: number; lo: number; buf: Buffer } | null = null;
  /** The backing file (resolved path), its name as the header has it, and its format; null without one. */
  private backingFile: { path: string; name: string; format: "raw" | "qcow2" } | null = null;
  /** Closed by pause(): requests wait here while snapshot or merge switch files (qcow2-online.ts). */
  private gate: Promise<void> | null = null;
  private openGate: (() => void) | null = null;
  /** While a merge runs: told of each guest range a write, zero or trim changed, once it is done. */
  written: ((offset: number, length: number) => void) | null = null;

  constructor(private readonly opts: Qcow2LayerOptions) {
    this.readOnly = !!opts.readOnly;
  }

  describe(): string {
    return `qcow2:${this.opts.path}${this.backing ? ` → ${this.backing.describe()}` : ""}`;
  }

  /** The image's path. */
  get path(): string {
    return this.opts.path;
  }
  /** Cluster size in bytes (once open). */
  get clusterSize(): number {
    return this.cs;
  }
  get isReadOnly(): boolean {
    return this.readOnly;
  }
  /** Declared `backing: none`: the backing file the image names is not opened. */
  get backingIgnored(): boolean {
    return this.opts.backing === "none";
  }
  /** Something is below the image: a backing file, or a backing stack. */
  get hasBacking(): boolean {
    return this.backing !== null;
  }
  /** The backing stack, where this image reads from one (not from a backing file). */
  get stackBelow(): Layer | null {
    return this.backing && !this.backingFile ? this.backing : null;
  }
  /** The open backing file's layer (a qcow2 layer or a raw file port) and what the header says of it; null without one. */
  get below(): { layer: Layer; path: string; name: string; format: "raw" | "qcow2" } | null {
    return this.backing && this.backingFile ? { layer: this.backing, ...this.backingFile } : null;
  }

  /** Stops new requests (they wait) and resolves once those in flight have completed. */
  async pause(): Promise<void> {
    while (this.gate) await this.gate;
    this.gate = new Promise((r) => (this.openGate = r));
    await this.quiesce();
  }
  /** Lets the requests waiting since pause() go on. */
  unpause(): void {
    const open = this.openGate;
    this.gate = this.openGate = null;
    open?.();
  }

  /**
   * Under pause(): replaces the read-only backing layer by the same file opened writable (a merge
   * writes into it through the layer returned), unless it is already.
   */
  async writableBacking(): Promise<Layer> {
    const b = this.below;
    if (!b) throw new NbdError("EINVAL", `${this.opts.path} has no backing file`);
    if (b.layer.capabilities().writable) return b.layer;
    const depth = (this.opts.depth ?? 0) + 1;
    const w: Layer =
      b.format === "qcow2"
        ? new Qcow2Layer({ ...this.opts, path: b.path, readOnly: false, backing: typeof this.opts.backing === "object" ? this.opts.backing : "auto", depth, overlayOf: undefined })
        : createFilePort({ path: b.path, readOnly: false, io: this.opts.io, discard: this.opts.discard !== false });
    // Closed first: a backing stack below it is opened by one image at a time.
    await b.layer.close();
    try {
      await w.open();
    } catch (err) {
      await b.layer.open();
      throw err;
    }
    this.backing = w;
    return w;
  }

  async open(): Promise<void> {
    const file = this.opts.path;
    this.inflated = null; // opened again after a snapshot or merge: the file under the name may be another
    const over = this.opts.overlayOf;
    if (over && !fs.existsSync(file)) {
      const base = over.format === "qcow2" ? new Qcow2Layer({ path: over.image, readOnly: true, backing: "none" }) : createFilePort({ path: over.image, readOnly: true });
      await base.open();
      const size = base.size();
      await base.close();
      createQcow2({ path: file, size, backing: backingNameFor(file, over.image), backingFormat: over.format });
      this.opts.log?.info({ overlay: file, backing: over.image, format: over.format, size }, "created a qcow2 overlay");
    }
    this.fd = fs.openSync(file, this.readOnly ? "r" : "r+");
    try {
      const head = Buffer.alloc(104);
      fs.readSync(this.fd, head, 0, 104, 0);
      const cs = clusterSizeOf(head, file);
      const first = Buffer.alloc(cs);
      fs.readSync(this.fd, first, 0, cs, 0);
      const h = parseHeader(first, file);
      if (featureBit(h.incompatible, INCOMPAT.dirty) && !this.readOnly) {
        this.readOnly = true;
        fs.closeSync(this.fd);
        this.fd = fs.openSync(file, "r");
        this.opts.log?.warn(
          { image: file },
          `${file} is dirty (lazy refcounts were in use and it was not closed cleanly): serving it read-only; repair it with: qemu-img check -r all ${file}`,
        );
      }
      this.header = h;
      this.cs = cs;
      this.l2e = cs / l2EntrySize(h);
      this.v3 = h.version === 3;
      this.xl2 = hasExtendedL2(h);
      this.scs = cs / SUBCLUSTERS;
      this.zeroCluster = Buffer.alloc(cs);
      this.meta = new Qcow2Meta(this.fd, file, h, {
        l2Cache: this.opts.l2Cache ?? DEFAULT_L2_CACHE,
        refcountCache: this.opts.refcountCache ?? DEFAULT_REFCOUNT_CACHE,
        punch: (clusters) => this.punchClusters(clusters),
      });
      await this.meta.load();
      const name = backingName(first, h);
      if (over) {
        const named = name === null ? null : backingPath(file, name);
        const same = (a: string, b: string) => {
          const [x, y] = [fs.statSync(a), fs.statSync(b)];
          return x.dev === y.dev && x.ino === y.ino;
        };
        // The image may be further down: snapshots taken online stand between (qcow2-online.ts).
        let below = named;
        for (let i = 0; below !== null && fs.existsSync(below) && !same(below, over.image) && i < 64; i++) below = qcow2BackingOf(below);
        if (below === null || !fs.existsSync(below) || !same(below, over.image))
          throw new NbdError("EINVAL", `${file} is ${named === null ? "not an overlay (it names no backing file)" : `an overlay of ${named}`}, not of ${over.image}: give another overlay file, or rebase it (qemu-img rebase -u -b ${over.image} -F ${over.format} ${file})`);
      }
      this.backingFile = null;
      // A backing stack goes below the chain's last image (the one naming no backing file).
      const stack = typeof this.opts.backing === "object" ? this.opts.backing : null;
      if (name !== null && this.opts.backing !== "none") {
        const depth = (this.opts.depth ?? 0) + 1;
        const bf = backingPath(file, name);
        this.backingFile = { path: bf, name, format: (h.backingFormat ?? (fs.existsSync(bf) ? probeFormat(bf) : "raw")) === "qcow2" ? "qcow2" : "raw" };
        this.backing = backingLayer(file, name, h.backingFormat, depth, (f) => new Qcow2Layer({ ...this.opts, path: f, readOnly: true, backing: stack ?? "auto", depth, overlayOf: undefined }));
        await this.backing.open();
        this.backingSize = this.backing.size();
      } else if (stack) {
        await stack.open();
        this.backing = stack;
        this.backingSize = stack.size();
      }
      this.data = createFilePort({
        path: file,
        readOnly: this.readOnly,
        io: this.opts.io,
        discard: this.opts.discard !== false && !this.readOnly,
        onPunchFailure: (err) => this.opts.log?.warn({ image: file, err: err.message }, "punching holes failed: freed clusters keep their space from now on"),
      });
      await this.data.open();
      if (!this.readOnly) this.meta.clearAutoclear();
    } catch (err) {
      await this.backing?.close().catch(() => undefined);
      this.backing = null;
      fs.closeSync(this.fd);
      this.fd = -1;
      throw err;
    }
    const w = !this.readOnly;
    this.caps = {
      writable: w,
      flush: w,
      fua: w,
      trim: w,
      zero: w,
      fastZero: w,
      cache: false,
      extents: true,
      depth: !this.backing || (this.backing.capabilities().extents && this.backing.capabilities().depth),
      multiConn: true,
      // Preferred: the unit a partial write copies (a cluster, or with extended L2 entries a subcluster).
      blockSize: { minimum: 1, preferred: Math.max(4096, Math.min(this.xl2 ? this.scs : this.cs, 1024 * 1024)), maximum: MAX_REQUEST },
    };
  }

  async close(): Promise<void> {
    if (this.fd < 0) return;
    await this.tracker.idle();
    try {
      if (!this.readOnly) await this.meta.locked(() => this.meta.release());
    } finally {
      await this.data.close();
      fs.closeSync(this.fd);
      this.fd = -1;
      await this.backing?.close();
      this.backing = null;
    }
  }

  size(): number {
    return this.header.size;
  }
  capabilities(): Capabilities {
    return this.caps;
  }

  /** What the entry [hi, lo] of an L2 table says (see UNALLOC … COMPRESSED). */
  private kind(hi: number, lo: number): number {
    if (hi & COMPRESSED_HI) return COMPRESSED;
    if (lo & ZERO_LO && this.v3) return ZERO;
    const off = entryOffset(hi, lo);
    if (off === 0) return UNALLOC;
    return this.dataCluster(off, hi);
  }

  /** OWNED or SHARED for a host cluster at `off` (entry bits `hi`); anywhere else is corrupt. */
  private dataCluster(off: number, hi: number): number {
    // The file may end inside its last cluster: only the subclusters written are (QEMU's too), and
    // the rest reads as zeroes. The cluster must start in the file.
    if (off % this.cs !== 0 || off >= this.meta.fileEnd || this.meta.overlapsFixed(off, this.cs)) throw corrupt(this.opts.path, `L2 entry points to ${off}, not a data cluster of the file`);
    return hi & COPIED_HI ? OWNED : SHARED;
  }

  private table(gc: number): Buffer | null | Promise<Buffer | null> {
    const i = Math.floor(gc / this.l2e);
    const t = this.meta.l2Now(i);
    return t !== undefined ? t : this.meta.l2(i);
  }

  // The run mapWith found last (read at once, before anything can await: see run()).
  private mKind = 0;
  private mHost = 0;
  private mLength = 0;
  private mHi = 0;
  private mLo = 0;

  /**
   * The run of clusters from guest byte `g` (at most `max` bytes) that L2 table `t` maps alike:
   * its kind, the host offset of byte `g` (data), its length, and the entry (compressed), in the
   * m* fields.
   */
  private mapWith(t: Buffer | null, g: number, max: number): void {
    const cs = this.cs;
    const gc = Math.floor(g / cs);
    let idx = gc % this.l2e;
    const hi = t ? t.readUInt32BE(idx * 8) : 0;
    const lo = t ? t.readUInt32BE(idx * 8 + 4) : 0;
    const kind = this.kind(hi, lo);
    const within = g - gc * cs;
    const base = kind === OWNED || kind === SHARED ? entryOffset(hi, lo) : 0;
    let length = Math.min(cs - within, max);
    if (kind !== COMPRESSED) {
      const data = kind === OWNED || kind === SHARED;
      let next = base + cs;
      while (length < max && ++idx < this.l2e) {
        const h2 = t ? t.readUInt32BE(idx * 8) : 0;
        const l2 = t ? t.readUInt32BE(idx * 8 + 4) : 0;
        const k2 = this.kind(h2, l2);
        if (k2 !== kind || (data && entryOffset(h2, l2) !== next)) break;
        next += cs;
        length = Math.min(length + cs, max);
      }
    }
    this.mKind = kind;
    this.mHost = base + within;
    this.mLength = length;
    this.mHi = hi;
    this.mLo = lo;
  }

  // An extended L2 entry as entryX read it.
  private xHi = 0;
  private xLo = 0;
  private xZero = 0;
  private xAlloc = 0;

  /**
   * Extended L2 entries: reads entry `idx` of table `t` into the x* fields (hi, lo, and the
   * subcluster bitmap's halves) and says what its cluster is: COMPRESSED (no subclusters), UNALLOC
   * (no host cluster: its subclusters are unallocated or zero), OWNED or SHARED (a host cluster:
   * each subcluster allocated, zero or unallocated). Invalid entries, as QEMU judges them, throw.
   */
  private entryX(t: Buffer | null, idx: number): number {
    const at = idx * 16;
    const hi = t ? t.readUInt32BE(at) : 0;
    const lo = t ? t.readUInt32BE(at + 4) : 0;
    const zero = t ? t.readUInt32BE(at + 8) : 0;
    const alloc = t ? t.readUInt32BE(at + 12) : 0;
    this.xHi = hi;
    this.xLo = lo;
    this.xZero = zero;
    this.xAlloc = alloc;
    if (hi & COMPRESSED_HI) return COMPRESSED; // its bitmap is reserved: not looked at, as QEMU reads
    if ((zero & alloc) !== 0) throw corrupt(this.opts.path, `L2 entry ${idx} has subclusters both allocated and zero (bitmap ${zero.toString(16)}:${alloc.toString(16)})`);
    const off = entryOffset(hi, lo);
    if (off === 0) {
      if (alloc !== 0) throw corrupt(this.opts.path, `L2 entry ${idx} has allocated subclusters but no host cluster`);
      return UNALLOC;
    }
    return this.dataCluster(off, hi);
  }

  /**
   * mapWith for extended L2 entries: the run of subclusters alike from guest byte `g` (at most
   * `max` bytes), across clusters while they continue it (data: the next host cluster, with the
   * same COPIED flag); a compressed cluster is one run of its own.
   */
  private mapSubclusters(t: Buffer | null, g: number, max: number): void {
    const cs = this.cs;
    const scs = this.scs;
    const gc = Math.floor(g / cs);
    let idx = gc % this.l2e;
    const c = this.entryX(t, idx);
    const hi = this.xHi;
    const lo = this.xLo;
    const within = g - gc * cs;
    let kind = COMPRESSED;
    let base = 0;
    let length = Math.min(cs - within, max);
    if (c !== COMPRESSED) {
      const sc = Math.floor(within / scs);
      const alloc = this.xAlloc;
      const zero = this.xZero;
      kind = (alloc >>> sc) & 1 ? c : (zero >>> sc) & 1 ? ZERO : UNALLOC;
      const data = kind === OWNED || kind === SHARED;
      const n = onesFrom(data ? alloc : kind === ZERO ? zero : ~(alloc | zero), sc);
      length = Math.min((sc + n) * scs - within, max);
      if (data) base = entryOffset(hi, lo);
      if (sc + n === SUBCLUSTERS) {
        let next = base + cs;
        while (length < max && ++idx < this.l2e) {
          const c2 = this.entryX(t, idx);
          if (c2 === COMPRESSED || (data && (c2 !== kind || entryOffset(this.xHi, this.xLo) !== next))) break;
          const n2 = onesFrom(data ? this.xAlloc : kind === ZERO ? this.xZero : ~(this.xAlloc | this.xZero), 0);
          if (n2 === 0) break;
          length = Math.min(length + n2 * scs, max);
          next += cs;
          if (n2 < SUBCLUSTERS) break;
        }
      }
    }
    this.mKind = kind;
    this.mHost = base + within;
    this.mLength = length;
    this.mHi = hi;
    this.mLo = lo;
  }

  /** mapWith on the cached table of `g`; false when the table must be read first. */
  private mapNow(g: number, max: number): boolean {
    const t = this.meta.l2Now(Math.floor(g / this.cs / this.l2e));
    if (t === undefined) return false;
    if (this.xl2) this.mapSubclusters(t, g, max);
    else this.mapWith(t, g, max);
    return true;
  }

  /** The run from guest byte `g` (see mapWith), reading its L2 table if needed. */
  private async run(g: number, max: number): Promise<{ kind: number; host: number; length: number; hi: number; lo: number }> {
    if (!this.mapNow(g, max)) {
      const t = await this.meta.l2(Math.floor(g / this.cs / this.l2e));
      if (this.xl2) this.mapSubclusters(t, g, max);
      else this.mapWith(t, g, max);
    }
    return { kind: this.mKind, host: this.mHost, length: this.mLength, hi: this.mHi, lo: this.mLo };
  }

  // ---- reads ----

  /**
   * The fast path: a request that one run of clusters in a cached table maps is one call to the
   * file (or a fill), made before pread returns. Anything else goes to preadRuns.
   */
  pread(buf: Buffer, offset: number, io: Io): Promise<void> {
    if (this.gate) return this.gate.then(() => this.pread(buf, offset, io));
    return this.readUngated(buf, offset, io);
  }

  /** pread, also while paused (a merge's last copies read the image then). */
  readUngated(buf: Buffer, offset: number, io: Io): Promise<void> {
    try {
      if (this.fd >= 0 && this.mapNow(offset, buf.length) && this.mLength === buf.length) {
        const k = this.mKind;
        if (k === OWNED || k === SHARED) return this.data.pread(buf, this.mHost, io);
        if (k === ZERO || (k === UNALLOC && !this.backing)) {
          buf.fill(0);
          return DONE;
        }
      }
    } catch (err) {
      return Promise.reject(err);
    }
    return this.preadRuns(buf, offset, io);
  }

  private async preadRuns(buf: Buffer, offset: number, io: Io): Promise<void> {
    this.tracker.enter();
    try {
      for (let pos = 0; pos < buf.length; ) {
        const r = await this.run(offset + pos, buf.length - pos);
        const part = buf.subarray(pos, pos + r.length);
        if (r.kind === OWNED || r.kind === SHARED) await this.data.pread(part, r.host, io);
        else if (r.kind === ZERO) part.fill(0);
        else if (r.kind === UNALLOC) await this.readBelow(part, offset + pos, io);
        else {
          const c = await this.inflate(r.hi, r.lo);
          const within = (offset + pos) % this.cs;
          c.copy(part, 0, within, within + r.length);
        }
        pos += r.length;
      }
    } finally {
      this.tracker.leave();
    }
  }

  /** Unallocated guest bytes: the backing file's (zeroes past its end), or zeroes. */
  private async readBelow(part: Buffer, g: number, io: Io): Promise<void> {
    const n = this.backing ? Math.max(0, Math.min(part.length, this.backingSize - g)) : 0;
    if (n > 0) await this.backing!.pread(part.subarray(0, n), g, io);
    if (n < part.length) part.fill(0, n);
  }

  private async inflate(hi: number, lo: number): Promise<Buffer> {
    const last = this.inflated;
    if (last && last.hi === hi && last.lo === lo) return last.buf;
    const { offset, length } = compressedExtent(hi, lo, this.header.clusterBits);
    const input = Buffer.alloc(length);
    await this.data.pread(input, offset, { fua: false, mayTrim: false, fast: false });
    let out: Buffer;
    try {
      out = this.header.compressionType === ZSTD ? inflateZstd(input, this.cs) : zlib.inflateRawSync(input, { finishFlush: zlib.constants.Z_SYNC_FLUSH, maxOutputLength: this.cs });
    } catch (err) {
      throw corrupt(this.opts.path, `compressed cluster at ${offset} does not ${this.header.compressionType === ZSTD ? "decode (zstd)" : "inflate"}: ${(err as Error).message}`);
    }
    if (out.length < this.cs) throw corrupt(this.opts.path, `compressed cluster at ${offset} inflates to ${out.length} bytes, not ${this.cs}`);
    this.inflated = { hi, lo, buf: out };
    return out;
  }

  /** The current contents of guest cluster `gc` whose entry is [hi, lo], into `c` (one cluster). */
  private async readCluster(c: Buffer, gc: number, hi: number, lo: number, io: Io): Promise<void> {
    if (this.xl2 && !(hi & COMPRESSED_HI)) {
      // Subcluster by subcluster, as a read maps them (the entry cannot change meanwhile: the
      // cluster is in flight, see lockedClusters).
      for (let pos = 0; pos < this.cs; ) {
        const g = gc * this.cs + pos;
        const r = await this.run(g, this.cs - pos);
        const part = c.subarray(pos, pos + r.length);
        if (r.kind === OWNED || r.kind === SHARED) await this.data.pread(part, r.host, io);
        else if (r.kind === ZERO) part.fill(0);
        else await this.readBelow(part, g, io);
        pos += r.length;
      }
      return;
    }
    const k = this.kind(hi, lo);
    if (k === ZERO) c.fill(0);
    else if (k === UNALLOC) await this.readBelow(c, gc * this.cs, io);
    else if (k === COMPRESSED) (await this.inflate(hi, lo)).copy(c);
    else await this.data.pread(c, entryOffset(hi, lo), io);
  }

  // ---- writes ----

  private writable(op: string): void {
    if (this.readOnly) throw new NbdError("EPERM", `${op} on read-only qcow2 image ${this.opts.path}`);
    if (this.fd < 0) throw new NbdError("ESHUTDOWN", `${this.opts.path} is closed`);
  }

  /** The fast path: an overwrite of clusters of ours that one cached run maps is one pwrite. */
  pwrite(buf: Buffer, offset: number, io: Io): Promise<void> {
    if (this.gate || this.written) return this.pwriteGated(buf, offset, io);
    try {
      this.writable("write");
      if (!io.fua && this.mapNow(offset, buf.length) && this.mLength === buf.length && this.mKind === OWNED) return this.data.pwrite(buf, this.mHost, io);
    } catch (err) {
      return Promise.reject(err);
    }
    return this.pwriteRuns(buf, offset, io);
  }

  /** A write while paused (it waits) or while a merge runs (it tells `written` once done). */
  private pwriteGated(buf: Buffer, offset: number, io: Io): Promise<void> {
    // Marked even when it failed: a failed write may have changed part of it.
    return this.changing(offset, buf.length, () => {
      this.writable("write");
      return this.pwriteRuns(buf, offset, io);
    });
  }

  private async pwriteRuns(buf: Buffer, offset: number, io: Io): Promise<void> {
    this.tracker.enter();
    try {
      const direct = io.fua ? { ...io, fua: false } : io;
      let slow = -1; // start (in buf) of clusters that need the allocating path
      for (let pos = 0; pos < buf.length; ) {
        const r = await this.run(offset + pos, buf.length - pos);
        if (r.kind === OWNED) {
          if (slow >= 0) await this.writeAlloc(buf.subarray(slow, pos), offset + slow, direct);
          slow = -1;
          await this.data.pwrite(buf.subarray(pos, pos + r.length), r.host, direct);
        } else if (slow < 0) slow = pos;
        pos += r.length;
      }
      if (slow >= 0) await this.writeAlloc(buf.subarray(slow), offset + slow, direct);
      if (io.fua) await this.meta.flushShared();
    } finally {
      this.tracker.leave();
    }
  }

  /**
   * What a write at guest `offset` needs (under the metadata lock): clusters of ours are written in
   * place (`owned`: guest cluster, host offset); the others (`targets`, with their old entries) get
   * new clusters (`hosts`), counted in the cache.
   */
  private async plan(data: Buffer, offset: number): Promise<WritePlan> {
    const cs = this.cs;
    const end = offset + data.length;
    const p: WritePlan = { offset, end, owned: [], targets: [], olds: [], hosts: [], inPlace: [] };
    for (let gc = Math.floor(offset / cs); gc * cs < end; gc++) {
      const t = await this.table(gc);
      const idx = gc % this.l2e;
      if (this.xl2) {
        const c = this.entryX(t, idx);
        const entry = [this.xHi, this.xLo, this.xZero, this.xAlloc] as const;
        if (c === OWNED) {
          // A cluster of ours: written in place; subclusters not allocated yet are marked at the link.
          const m = this.touchedMask(gc, offset, end);
          if (((entry[3] & m) >>> 0) === m) p.owned.push([gc, entryOffset(entry[0], entry[1])]);
          else p.inPlace.push({ gc, entry });
        } else {
          p.targets.push(gc);
          p.olds.push(entry);
        }
        continue;
      }
      const hi = t ? t.readUInt32BE(idx * 8) : 0;
      const lo = t ? t.readUInt32BE(idx * 8 + 4) : 0;
      if (this.kind(hi, lo) === OWNED) p.owned.push([gc, entryOffset(hi, lo)]);
      else {
        p.targets.push(gc);
        p.olds.push([hi, lo]);
      }
    }
    if (p.targets.length) p.hosts = await this.meta.allocate(p.targets.length);
    return p;
  }

  /**
   * Writes the data of a plan: in place for clusters of ours, whole into new clusters, or merged
   * with what a partly written cluster held (the backing file, zeroes, the compressed or shared
   * cluster: its old entry cannot change meanwhile, see lockedClusters).
   */
  private async fill(data: Buffer, offset: number, p: WritePlan, io: Io): Promise<void> {
    const cs = this.cs;
    const end = offset + data.length;
    for (const [gc, host] of p.owned) {
      const s = Math.max(offset, gc * cs);
      const e = Math.min(end, (gc + 1) * cs);
      await this.data.pwrite(data.subarray(s - offset, e - offset), host + (s - gc * cs), io);
    }
    for (const { gc, entry } of p.inPlace) await this.writeSubclusters(data, offset, gc, entryOffset(entry[0]!, entry[1]!), entry[2]!, entry[3]!, io);
    const { targets, hosts, olds } = p;
    const whole = (k: number) => targets[k]! * cs >= offset && (targets[k]! + 1) * cs <= end;
    for (let k = 0; k < targets.length; ) {
      const gc = targets[k]!;
      if (whole(k)) {
        let j = k + 1;
        while (j < targets.length && targets[j] === targets[j - 1]! + 1 && hosts[j] === hosts[j - 1]! + cs && whole(j)) j++;
        await this.data.pwrite(data.subarray(gc * cs - offset, (gc + j - k) * cs - offset), hosts[k]!, io);
        k = j;
        continue;
      }
      const [hi, lo, zero] = olds[k]!;
      if (this.xl2 && !(hi! & COMPRESSED_HI) && entryOffset(hi!, lo!) === 0) {
        // A new cluster for unallocated or zero subclusters: only the subclusters written are
        // written (and marked allocated at the link); the others stay as they were, unread.
        await this.writeSubclusters(data, offset, gc, hosts[k]!, zero!, 0, io);
        k++;
        continue;
      }
      // From the I/O buffer pool: a fresh cluster-sized buffer per allocating write was garbage
      // at several GiB/s, and the collections it caused stalled every request for 5–30 ms.
      const backing = ioBuffers.acquire(cs);
      const c = backing.subarray(0, cs); // readCluster fills it whole
      try {
        await this.readCluster(c, gc, hi!, lo!, io);
        const s = Math.max(offset, gc * cs);
        const e = Math.min(end, (gc + 1) * cs);
        data.copy(c, s - gc * cs, s - offset, e - offset);
        await this.data.pwrite(c, hosts[k]!, io);
      } finally {
        ioBuffers.release(backing);
      }
      k++;
    }
  }

  /** Points the L2 entries of a plan's targets to their new clusters (in the cache; under the lock). */
  private link(p: WritePlan): Promise<void> {
    if (this.xl2) return this.linkSubclusters(p);
    return this.meta.setEntries(
      p.targets,
      p.hosts.map((h) => ownedEntry(h)),
    );
  }

  /**
   * link with extended L2 entries: a new cluster's subclusters written become allocated (their
   * zero bits cleared), the others keep what they were; a compressed or shared cluster copied
   * whole is allocated whole; the bitmap of a cluster of ours written in place gains the
   * subclusters written. Entries in guest order, as setEntries wants them.
   */
  private linkSubclusters(p: WritePlan): Promise<void> {
    const clusters: number[] = [];
    const values: L2Value[] = [];
    const value = (gc: number, hi: number, lo: number, zero: number, alloc: number): void => {
      const m = this.touchedMask(gc, p.offset, p.end);
      clusters.push(gc);
      values.push([hi, lo, (zero & ~m) >>> 0, (alloc | m) >>> 0]);
    };
    let j = 0;
    for (let k = 0; k < p.targets.length; k++) {
      const gc = p.targets[k]!;
      for (; j < p.inPlace.length && p.inPlace[j]!.gc < gc; j++) value(p.inPlace[j]!.gc, ...(p.inPlace[j]!.entry as [number, number, number, number]));
      const [hi, lo, zero] = p.olds[k]!;
      const [nh, nl] = ownedEntry(p.hosts[k]!);
      if (hi! & COMPRESSED_HI || entryOffset(hi!, lo!) !== 0) {
        clusters.push(gc);
        values.push([nh, nl, 0, ALL_SUBCLUSTERS]);
      } else value(gc, nh, nl, zero!, 0);
    }
    for (; j < p.inPlace.length; j++) value(p.inPlace[j]!.gc, ...(p.inPlace[j]!.entry as [number, number, number, number]));
    return this.meta.setEntries(clusters, values);
  }

  /** The subclusters of guest cluster `gc` that guest bytes [offset, end) touch (a 32-bit mask). */
  private touchedMask(gc: number, offset: number, end: number): number {
    const base = gc * this.cs;
    const s = Math.max(offset, base) - base;
    const e = Math.min(end, base + this.cs) - base;
    const first = Math.floor(s / this.scs);
    return subclusterMask(first, Math.floor((e - 1) / this.scs) - first + 1);
  }

  /**
   * Writes the bytes of guest cluster `gc` that `data` (at guest `offset`) covers into its host
   * cluster at `host`, whose subclusters are allocated (bits `alloc`), zero (bits `zero`) or
   * unallocated: a partly written subcluster not allocated yet is written whole, the rest of it
   * what it read as before (zeroes, or the backing file's bytes); only that subcluster is read.
   */
  private async writeSubclusters(data: Buffer, offset: number, gc: number, host: number, zero: number, alloc: number, io: Io): Promise<void> {
    const scs = this.scs;
    const base = gc * this.cs;
    const end = offset + data.length;
    const s = Math.max(offset, base);
    const e = Math.min(end, base + this.cs);
    const first = Math.floor((s - base) / scs);
    const last = Math.floor((e - 1 - base) / scs);
    let from = s;
    let to = e;
    if ((s - base) % scs !== 0 && !((alloc >>> first) & 1)) {
      await this.mergeSubcluster(data, offset, base + first * scs, (zero >>> first) & 1, host + first * scs, io);
      from = Math.min(base + (first + 1) * scs, e);
    }
    if ((e - base) % scs !== 0 && !((alloc >>> last) & 1) && !(last === first && from === e)) {
      await this.mergeSubcluster(data, offset, base + last * scs, (zero >>> last) & 1, host + last * scs, io);
      to = base + last * scs;
    }
    if (to > from) await this.data.pwrite(data.subarray(from - offset, to - offset), host + (from - base), io);
  }

  /** Writes the subcluster at guest `start` whole at `host`: `data`'s bytes (at guest `offset`) over zeroes or the backing file's. */
  private async mergeSubcluster(data: Buffer, offset: number, start: number, zero: number, host: number, io: Io): Promise<void> {
    const scs = this.scs;
    const pooled = ioBuffers.acquire(scs);
    const b = pooled.subarray(0, scs);
    try {
      if (zero) b.fill(0);
      else await this.readBelow(b, start, io);
      const s = Math.max(offset, start);
      const e = Math.min(offset + data.length, start + scs);
      data.copy(b, s - start, s - offset, e - offset);
      await this.data.pwrite(b, host, io);
    } finally {
      ioBuffers.release(pooled);
    }
  }

  /**
   * Writes `data` at guest `offset` all under the metadata lock (zero's partial clusters): plan,
   * fill, link. The data is in the file before any reader sees the entries, and durable before the
   * entries are written back (qcow2-meta.ts, writeback).
   */
  private async writeLocked(data: Buffer, offset: number, io: Io): Promise<void> {
    const p = await this.plan(data, offset);
    await this.fill(data, offset, p, io);
    if (p.targets.length || p.inPlace.length) await this.link(p);
  }

  /**
   * An allocating write, concurrent with others: the lock is held only to plan (tables, new
   * clusters) and to link, not while old data is copied and new data written. Its guest clusters
   * are in flight meanwhile, and every other change to them waits (lockedClusters): no other
   * write, zero or trim changes their entries, so the old data copied and the clusters of ours
   * written in place stay theirs.
   */
  private async writeAlloc(data: Buffer, offset: number, io: Io): Promise<void> {
    const cs = this.cs;
    const first = Math.floor(offset / cs);
    const last = Math.floor((offset + data.length - 1) / cs);
    let done!: () => void;
    const settled = new Promise<void>((r) => (done = r));
    const p = await this.lockedClusters(first, last, async () => {
      const plan = await this.plan(data, offset);
      for (let gc = first; gc <= last; gc++) this.inflight.set(gc, settled);
      return plan;
    });
    let filled = false;
    try {
      await this.fill(data, offset, p, io);
      filled = true;
      if (p.targets.length || p.inPlace.length) await this.meta.locked(() => this.link(p));
    } finally {
      for (let gc = first; gc <= last; gc++) this.inflight.delete(gc);
      done();
      // Not linked: the new clusters are unreferenced and go back to the reserve.
      if (!filled && p.hosts.length) this.meta.unreserve(p.hosts);
    }
  }

  /** An allocating write in flight on one of guest clusters [first, last], or null. */
  private busy(first: number, last: number): Promise<void> | null {
    if (this.inflight.size === 0) return null;
    if (this.inflight.size < last - first + 1) {
      for (const [gc, w] of this.inflight) if (gc >= first && gc <= last) return w;
      return null;
    }
    for (let gc = first; gc <= last; gc++) {
      const w = this.inflight.get(gc);
      if (w) return w;
    }
    return null;
  }

  /** Runs `fn` under the metadata lock when no allocating write is in flight on guest clusters [first, last]. */
  private async lockedClusters<T>(first: number, last: number, fn: () => Promise<T>): Promise<T> {
    for (;;) {
      const w = this.busy(first, last);
      if (w) {
        await w;
        continue;
      }
      const r = await this.meta.locked(async (): Promise<{ wait: Promise<void> } | { value: T }> => {
        const b = this.busy(first, last);
        return b ? { wait: b } : { value: await fn() };
      });
      if ("value" in r) return r.value;
      await r.wait;
    }
  }

  /**
   * Cuts [offset, offset + length) into a partial head, whole clusters [first, last) and a partial
   * tail (the last cluster counts as whole up to the disk's end). No whole cluster: all in `head`.
   */
  private cut(length: number, offset: number): { head: [number, number] | null; first: number; last: number; tail: [number, number] | null } {
    const cs = this.cs;
    const end = offset + length;
    const first = Math.ceil(offset / cs);
    const last = end === this.header.size ? Math.ceil(end / cs) : Math.floor(end / cs);
    if (last <= first) return { head: [offset, end], first: 0, last: 0, tail: null };
    return { head: offset < first * cs ? [offset, first * cs] : null, first, last, tail: last * cs < end ? [last * cs, end] : null };
  }

  /** Writes zeroes over guest bytes [start, end), a cluster at a time (under the lock). */
  private async writeZeroes(start: number, end: number, io: Io): Promise<void> {
    for (let at = start; at < end; ) {
      const n = Math.min(end - at, this.cs - (at % this.cs));
      await this.writeLocked(this.zeroCluster.subarray(0, n), at, io);
      at += n;
    }
  }

  zero(length: number, offset: number, io: Io): Promise<void> {
    return this.changing(offset, length, () => this.zeroRuns(length, offset, io));
  }

  /**
   * Runs a change of guest bytes [offset, offset + length) once no pause holds it, tracked (pause()
   * waits for it) and told to a running merge (`written`) once done, failed or not.
   */
  private async changing(offset: number, length: number, run: () => Promise<void>): Promise<void> {
    while (this.gate) await this.gate;
    this.tracker.enter();
    try {
      await run();
    } finally {
      this.written?.(offset, length);
      this.tracker.leave();
    }
  }

  private async zeroRuns(length: number, offset: number, io: Io): Promise<void> {
    this.writable("zero");
    if (this.xl2) return this.zeroSubclusters(length, offset, io);
    const { head, first, last, tail } = this.cut(length, offset);
    // Zero flags need v3; a v2 image over a backing file must write zeroes, as must partial clusters.
    if (io.fast && (head || tail || (!this.v3 && (this.backing || !io.mayTrim) && last > first))) throw new NbdError("ENOTSUP", "fast zero needs whole clusters (and qcow2 v3 over a backing file)");
    this.tracker.enter();
    try {
      const direct = io.fua ? { ...io, fua: false } : io;
      await this.lockedClusters(Math.floor(offset / this.cs), Math.floor((offset + length - 1) / this.cs), async () => {
        for (const p of [head, tail]) if (p) await this.writeZeroes(p[0], p[1], direct);
        if (last <= first) return;
        if (!this.v3 && (this.backing || !io.mayTrim)) return this.writeZeroes(first * this.cs, Math.min(last * this.cs, this.header.size), direct);
        const clusters: number[] = [];
        const values: Array<[number, number]> = [];
        for (let gc = first; gc < last; gc++) {
          const t = await this.table(gc);
          const idx = gc % this.l2e;
          const hi = t ? t.readUInt32BE(idx * 8) : 0;
          const lo = t ? t.readUInt32BE(idx * 8 + 4) : 0;
          const k = this.kind(hi, lo);
          if (k === UNALLOC && !this.backing && (io.mayTrim || !this.v3)) continue; // reads as zeroes already
          clusters.push(gc);
          // Without mayTrim a cluster of ours stays allocated, marked zero (QEMU's "zero, allocated").
          values.push(!this.v3 ? [0, 0] : k === OWNED && !io.mayTrim ? [hi, (lo | ZERO_LO) >>> 0] : [0, ZERO_LO]);
        }
        await this.meta.setEntries(clusters, values);
      });
      if (io.fua) await this.meta.flushShared();
    } finally {
      this.tracker.leave();
    }
  }

  /**
   * zero with extended L2 entries, as QEMU's (qcow2_subcluster_zeroize): whole clusters become
   * all-zero bitmaps (a cluster of ours keeps its allocation without `mayTrim`, as above); whole
   * subclusters of a partly zeroed cluster become zero (their allocated bits cleared, the host
   * cluster kept); partial subclusters, and subclusters of a compressed cluster, are written.
   */
  private async zeroSubclusters(length: number, offset: number, io: Io): Promise<void> {
    const cs = this.cs;
    const scs = this.scs;
    const size = this.header.size;
    const end = offset + length;
    // Whole subclusters [a, b) (the last one counts as whole up to the disk's end); partial ones around.
    const a = Math.ceil(offset / scs) * scs;
    const b = end === size ? end : Math.floor(end / scs) * scs;
    const writes: Array<[number, number]> = [];
    if (b <= a) writes.push([offset, end]);
    else {
      if (offset < a) writes.push([offset, a]);
      if (b < end) writes.push([b, end]);
    }
    const notFast = (): NbdError => new NbdError("ENOTSUP", "fast zero needs whole subclusters, not of a compressed cluster");
    if (io.fast && writes.length) throw notFast();
    this.tracker.enter();
    try {
      const direct = io.fua ? { ...io, fua: false } : io;
      await this.lockedClusters(Math.floor(offset / cs), Math.floor((end - 1) / cs), async () => {
        const clusters: number[] = [];
        const values: L2Value[] = [];
        for (let gc = Math.floor(a / cs); b > a && gc * cs < b; gc++) {
          const c = this.entryX(await this.table(gc), gc % this.l2e);
          const [hi, lo, zero, alloc] = [this.xHi, this.xLo, this.xZero, this.xAlloc];
          const s = Math.max(a, gc * cs);
          const e = Math.min(b, (gc + 1) * cs);
          if (s === gc * cs && (e === (gc + 1) * cs || e === size)) {
            if (c === UNALLOC && zero === 0 && !this.backing && io.mayTrim) continue; // reads as zeroes already
            clusters.push(gc);
            values.push(c === OWNED && !io.mayTrim ? [hi, lo, ALL_SUBCLUSTERS, 0] : [0, 0, ALL_SUBCLUSTERS, 0]);
          } else if (c === COMPRESSED) {
            if (io.fast) throw notFast();
            writes.push([s, e]); // copied into a cluster of ours, then zeroes written (QEMU too)
          } else {
            const m = subclusterMask((s - gc * cs) / scs, Math.ceil((e - s) / scs));
            clusters.push(gc);
            values.push([hi, lo, (zero | m) >>> 0, (alloc & ~m) >>> 0]);
          }
        }
        await this.meta.setEntries(clusters, values);
        for (const [s, e] of writes) await this.writeZeroes(s, e, direct);
      });
      if (io.fua) await this.meta.flushShared();
    } finally {
      this.tracker.leave();
    }
  }

  /**
   * Deallocates whole clusters (partial ones are left: trim is advisory), as QEMU's discard does:
   * on v3 a cluster that was allocated or has a backing file below becomes a zero cluster, else
   * unallocated (on v2 over a backing file it then shows the backing file, which trim allows).
   */
  trim(length: number, offset: number, io: Io): Promise<void> {
    return this.changing(offset, length, () => this.trimRuns(length, offset, io));
  }

  private async trimRuns(length: number, offset: number, io: Io): Promise<void> {
    this.writable("trim");
    const { first, last } = this.cut(length, offset);
    if (last <= first) return;
    this.tracker.enter();
    try {
      await this.lockedClusters(first, last - 1, async () => {
        const clusters: number[] = [];
        const values: L2Value[] = [];
        for (let gc = first; gc < last; gc++) {
          const t = await this.table(gc);
          const idx = gc % this.l2e;
          if (this.xl2) {
            // Extended L2 entries (QEMU's discard_in_l2_slice): whole clusters only, to all-zero bitmaps.
            if (this.entryX(t, idx) === UNALLOC && !this.backing) continue;
            clusters.push(gc);
            values.push([0, 0, ALL_SUBCLUSTERS, 0]);
            continue;
          }
          const hi = t ? t.readUInt32BE(idx * 8) : 0;
          const lo = t ? t.readUInt32BE(idx * 8 + 4) : 0;
          const k = this.kind(hi, lo);
          const allocated = k === OWNED || k === SHARED || k === COMPRESSED || (k === ZERO && entryOffset(hi, lo) !== 0);
          if (!allocated && !this.backing) continue;
          clusters.push(gc);
          values.push(this.v3 && (this.backing || allocated) ? [0, ZERO_LO] : [0, 0]);
        }
        await this.meta.setEntries(clusters, values);
      });
      if (io.fua) await this.meta.flushShared();
    } finally {
      this.tracker.leave();
    }
  }

  /**
   * Before freed clusters can be allocated again (meta.flush): waits for writes still in flight to
   * them — a write into a cluster of ours takes no lock, and one held in the thread pool past a
   * trim and a flush would otherwise land in the cluster's next owner — and punches holes where they
   * were (when the file port offers it; its punch waits for them too; a failure is only logged there).
   */
  private async punchClusters(clusters: number[]): Promise<void> {
    const cs = this.cs;
    if (!this.data.capabilities().trim) await Promise.all(clusters.map((c) => this.data.settled(cs, c * cs)));
    else await Promise.all(clusters.map((c) => this.data.trim(cs, c * cs, plainIo)));
  }

  async flush(_io: Io): Promise<void> {
    while (this.gate) await this.gate;
    if (this.readOnly) return;
    this.tracker.enter();
    try {
      await this.meta.flushShared();
    } finally {
      this.tracker.leave();
    }
  }

  async cache(_length: number, _offset: number, _io: Io): Promise<void> {}

  // ---- block status ----

  /**
   * Answers for at most this many guest bytes at a time: four L2 tables' worth, or 64 MiB where that
   * is less (small clusters), so a call reads at most a few tables; the client asks again.
   */
  private scanMax(): number {
    return Math.max(4 * this.l2e * this.cs, Math.min(64 * 1024 * 1024, 2 ** 17 * this.cs));
  }

  /**
   * Block status from the tables. `depth` (qemu:allocation-depth, as QEMU's
   * bdrv_is_allocated_above counts): 1 for data, compressed and zero clusters; unallocated ones
   * are the backing file's depth plus one, 2 past its end (its zeroes count as its own), and 0
   * without a backing file.
   */
  async extents(length: number, offset: number, io: Io, kind: ExtentKind = "allocation"): Promise<Extent[]> {
    while (this.gate) await this.gate;
    return this.extentsUngated(length, offset, io, kind);
  }

  /** extents, also while paused. */
  async extentsUngated(length: number, offset: number, io: Io, kind: ExtentKind = "allocation"): Promise<Extent[]> {
    const depth = kind === "depth";
    this.tracker.enter();
    try {
      const out: Extent[] = [];
      const lim = Math.min(length, this.scanMax());
      for (let pos = 0; pos < lim; ) {
        const g = offset + pos;
        const r = await this.run(g, lim - pos);
        if (r.kind === UNALLOC && this.backing) {
          const n = Math.max(0, Math.min(r.length, this.backingSize - g));
          if (n > 0) {
            const got = this.backing.capabilities().extents ? await this.backing.extents(n, g, io, kind) : [{ length: n, flags: depth ? 1 : 0 }];
            const below = depth ? deeper(got) : got;
            pushExtents(out, below);
            const sum = below.reduce((s, e) => s + e.length, 0);
            if (sum < n) return out; // the backing file answered short: the client asks again
          }
          if (n < r.length) pushExtents(out, [{ length: r.length - n, flags: depth ? 2 : HOLE_ZERO }]);
        } else if (depth) {
          pushExtents(out, [{ length: r.length, flags: r.kind === UNALLOC ? 0 : 1 }]);
        } else {
          pushExtents(out, [{ length: r.length, flags: r.kind === UNALLOC || r.kind === ZERO ? HOLE_ZERO : 0 }]);
        }
        pos += r.length;
      }
      return out;
    } finally {
      this.tracker.leave();
    }
  }

  /** The fast path hands requests to the file port without counting them here: wait for both. */
  async quiesce(): Promise<void> {
    await this.tracker.idle();
    await this.data.quiesce();
  }
  resume(): void {}
}

export function createQcow2Layer(opts: Qcow2LayerOptions): Qcow2Layer {
  return new Qcow2Layer(opts);
}
