import path from "node:path";
import { NbdError } from "../../errors.js";
import { InflightTracker, plainIo, type Capabilities, type Extent, type ExtentKind, type Io, type Layer } from "../layer.js";
import type { IoMode } from "../port/file-port.js";
import { newHeader } from "./cow-format.js";
import { CowStore } from "./cow-store.js";
import { RangeLock } from "../../util/range-lock.js";
import type { Copier } from "../../copy/copier.js";
import { idleProgress, type CopyProgress } from "../../copy/progress.js";
import { CowBlocks, MAX_REQUEST, alignDown, alignUp } from "./cow-blocks.js";
import { baseMergeTarget, copyDown, mergeCopier, type MergeEnds, type MergeOptions, type MergeTarget } from "./cow-merge.js";

export { DEFAULT_COW_BLOCK_SIZE } from "./cow-format.js";
export type { MergeEnds, MergeOptions } from "./cow-merge.js";

export interface CowLayerOptions {
  /** Block size of a new overlay (a power of two, 4 KiB to 16 MiB); must match an existing one. Default 64 KiB. */
  blockSize?: number;
  /** Create the overlay when the file does not exist (default true). */
  create?: boolean;
  /** How the overlay files are read and written (see FilePort). */
  io?: IoMode;
}

export interface CowChainEntry {
  path: string;
  role: "overlay" | "snapshot";
  allocatedBytes: number;
  zeroedBytes: number;
  fileBytes: number;
}

export interface CowInfo {
  overlay: string;
  size: number;
  blockSize: number;
  /** Top first: the writable overlay, then frozen snapshots down to the base. */
  chain: CowChainEntry[];
  base: string;
  /** Bytes of data held by the writable overlay. */
  allocatedBytes: number;
  merge: CopyProgress & MergeEnds;
}

/**
 * Copy-on-write: a base device that is never written, plus an overlay file holding the blocks
 * written since. Reads come from the overlay where it has a block, as zeroes where it recorded a
 * zero, else from the layer below. Writes of part of a block read the rest from below
 * (read-modify-write) under a per-block lock. zero and trim of whole blocks only mark them zeroed.
 * Flush and FUA make data and map durable.
 *
 * `snapshot()` freezes the overlay as a read-only layer of its own and starts a new one above it,
 * online; the chain is recorded in the overlay headers, so reopening the overlay rebuilds it.
 * `merge()` folds the overlay into the layer below it, online, and drops it.
 *
 * This class is what a request goes through (the gate that snapshot and merge close, block locks,
 * FUA) and the online operations; the work on blocks is in cow-blocks.ts, the overlay file and its
 * crash-safety rules in cow-store.ts, the copying of a merge in cow-merge.ts.
 */
export class CowLayer implements Layer {
  readonly overlayPath: string;
  private below!: Layer;
  private store!: CowStore;
  private blocks!: CowBlocks;
  private frozen = false;
  private bs = 0;
  private bytes = 0;
  private caps!: Capabilities;
  /** Locks on the bytes of whole blocks: shared for reads, exclusive for writes and merge copies. */
  private readonly locks = new RangeLock();
  private readonly tracker = new InflightTracker();
  private gate: Promise<void> | null = null;
  private openGate: (() => void) | null = null;
  private busy: "snapshot" | "merge" | null = null;
  private mergeDone: Promise<void> | null = null;
  /** The running (or last) merge. */
  private merging: ({ copier: Copier } & MergeEnds) | null = null;
  private closing = false;

  constructor(
    private readonly base: Layer,
    overlayPath: string,
    private readonly opts: CowLayerOptions = {},
  ) {
    this.overlayPath = path.resolve(overlayPath);
    const bs = opts.blockSize;
    if (bs !== undefined && (!Number.isInteger(bs) || bs < 4096 || bs > 1 << 24 || (bs & (bs - 1)) !== 0))
      throw new NbdError("EINVAL", `cow block size ${bs} is not a power of two between 4 KiB and 16 MiB`);
  }

  /** A frozen snapshot in the chain: read-only to clients, written only by a merge from above. */
  private static frozenOver(base: Layer, below: Layer, store: CowStore, opts: CowLayerOptions): CowLayer {
    const l = new CowLayer(base, store.path, opts);
    l.frozen = true;
    l.attach(below, store);
    return l;
  }

  private attach(below: Layer, store: CowStore): void {
    this.below = below;
    this.store = store;
    this.blocks = new CowBlocks(store, below);
    this.bs = store.blockSize;
    this.bytes = store.header.virtualSize;
    const bc = this.base.capabilities();
    const w = !this.frozen;
    this.caps = {
      writable: w,
      flush: w,
      fua: w,
      trim: w,
      zero: w,
      fastZero: w,
      cache: bc.cache,
      extents: true,
      depth: bc.depth, // 1 the overlay, 2… its snapshots, then the base's depth below them
      multiConn: true,
      blockSize: { minimum: 1, preferred: Math.min(this.bs, MAX_REQUEST), maximum: MAX_REQUEST },
    };
  }

  describe(): string {
    return `${this.frozen ? "cow-snapshot" : "cow"}:${this.store?.path ?? this.overlayPath} → ${(this.below ?? this.base).describe()}`;
  }

  /** Opens the chain; a closed layer may be opened again (port A of a node, after a move back). */
  async open(): Promise<void> {
    await this.base.open();
    this.closing = false;
    let files: CowStore[];
    try {
      files = await CowStore.openChain(this.overlayPath, {
        size: this.base.size(),
        blockSize: this.opts.blockSize,
        create: this.opts.create,
        base: this.base.describe(),
        io: this.opts.io,
      });
    } catch (err) {
      await this.base.close();
      throw err;
    }
    let below: Layer = this.base;
    for (let i = files.length - 1; i >= 1; i--) below = CowLayer.frozenOver(this.base, below, files[i]!, this.opts);
    this.attach(below, files[0]!);
  }

  async close(): Promise<void> {
    if (this.frozen) {
      await this.store.close();
      return this.below.close();
    }
    this.closing = true;
    this.merging?.copier.abort(new NbdError("ESHUTDOWN", `${this.store.path} closed during the merge`));
    if (this.mergeDone) await this.mergeDone.catch(() => undefined);
    await this.tracker.idle();
    await this.store.close();
    await this.below.close();
  }

  size(): number {
    return this.bytes;
  }
  capabilities(): Capabilities {
    return this.caps;
  }

  // ---- gate: lets snapshot and merge stop new requests and wait for those in flight ----

  private async enter(): Promise<void> {
    while (this.gate) await this.gate;
    if (this.closing) throw new NbdError("ESHUTDOWN", `${this.overlayPath} is closing`);
    this.tracker.enter();
  }

  private leave(): void {
    this.tracker.leave();
  }

  private async pauseRequests(): Promise<void> {
    while (this.gate) await this.gate;
    this.gate = new Promise((r) => (this.openGate = r));
    await this.tracker.idle();
  }

  private resumeRequests(): void {
    const open = this.openGate;
    this.gate = null;
    this.openGate = null;
    open?.();
  }

  private writableOrThrow(op: string): void {
    if (this.frozen) throw new NbdError("EPERM", `${op} on frozen snapshot ${this.store.path}`);
  }

  private span(offset: number, length: number): [number, number] {
    return [Math.floor(offset / this.bs), Math.floor((offset + length - 1) / this.bs)];
  }

  /** Locks the whole blocks that [offset, offset + length) touches (in bytes, as a merge's copier does). */
  private lockBlocks(offset: number, length: number, shared = false): Promise<() => void> {
    const [first, last] = this.span(offset, length);
    return this.locks.acquire(first * this.bs, (last + 1) * this.bs, shared);
  }

  // ---- Layer methods ----

  async pread(buf: Buffer, offset: number, io: Io): Promise<void> {
    await this.enter();
    try {
      const release = await this.lockBlocks(offset, buf.length, true);
      try {
        await this.blocks.read(buf, offset, io);
      } finally {
        release();
      }
    } finally {
      this.leave();
    }
  }

  async pwrite(buf: Buffer, offset: number, io: Io): Promise<void> {
    this.writableOrThrow("write");
    await this.enter();
    try {
      await this.lockedWrite(buf, offset, io);
      if (io.fua) await this.blocks.flush();
    } finally {
      this.leave();
    }
  }

  async zero(length: number, offset: number, io: Io): Promise<void> {
    this.writableOrThrow("zero");
    if (io.fast) {
      const [first, last] = this.span(offset, length);
      const partial = (b: number) => {
        const s = Math.max(offset, b * this.bs);
        const e = Math.min(offset + length, b * this.bs + this.blocks.blockLen(b));
        return e - s !== this.blocks.blockLen(b);
      };
      if (partial(first) || partial(last)) throw new NbdError("ENOTSUP", "zeroing part of a copy-on-write block needs read-modify-write, which is not fast");
    }
    await this.enter();
    try {
      await this.lockedZero(length, offset, io);
      if (io.fua) await this.blocks.flush();
    } finally {
      this.leave();
    }
  }

  /**
   * Trim drops whole blocks from the overlay: they read from the layer below again (the base, or a
   * snapshot), which TRIM allows, and the overlay's slots are reused. Parts of blocks are left.
   */
  async trim(length: number, offset: number, io: Io): Promise<void> {
    this.writableOrThrow("trim");
    await this.enter();
    try {
      const release = await this.lockBlocks(offset, length);
      try {
        await this.blocks.drop(length, offset, io);
      } finally {
        release();
      }
      if (io.fua) await this.blocks.flush();
    } finally {
      this.leave();
    }
  }

  async flush(_io: Io): Promise<void> {
    this.writableOrThrow("flush");
    await this.enter();
    try {
      await this.blocks.flush();
    } finally {
      this.leave();
    }
  }

  async cache(length: number, offset: number, io: Io): Promise<void> {
    if (!this.caps.cache) return;
    await this.enter();
    try {
      const c = this.below.capabilities().blockSize;
      const start = alignDown(offset, c.minimum);
      const end = Math.min(alignUp(offset + length, c.minimum), this.bytes);
      const step = Math.max(c.minimum, alignDown(Math.min(c.maximum, MAX_REQUEST), c.minimum));
      for (let at = start; at < end; at += step) await this.below.cache(Math.min(step, end - at), at, io);
    } finally {
      this.leave();
    }
  }

  async extents(length: number, offset: number, io: Io, kind: ExtentKind = "allocation"): Promise<Extent[]> {
    await this.enter();
    try {
      return await this.blocks.extents(length, offset, io, kind);
    } finally {
      this.leave();
    }
  }

  async quiesce(): Promise<void> {
    await this.tracker.idle();
    await this.below.quiesce();
  }

  resume(): void {
    this.below.resume();
  }

  private async lockedWrite(buf: Buffer, offset: number, io: Io): Promise<void> {
    const release = await this.lockBlocks(offset, buf.length);
    try {
      await this.blocks.write(buf, offset, io);
    } finally {
      release();
    }
  }

  private async lockedZero(length: number, offset: number, io: Io): Promise<void> {
    const release = await this.lockBlocks(offset, length);
    try {
      await this.blocks.zero(length, offset, io);
    } finally {
      release();
    }
  }

  // ---- snapshot ----

  /**
   * Freezes the overlay as it is now and starts a new, empty one above it, while clients keep
   * going (their requests wait for the few milliseconds the switch takes). The frozen overlay
   * keeps its data under a new name, `name` (a file name in the overlay's directory) or
   * OVERLAY.snap-N; the new overlay's header names it, so reopening OVERLAY rebuilds the chain.
   * Returns the frozen file's path.
   */
  async snapshot(name?: string): Promise<string> {
    this.writableOrThrow("snapshot");
    if (this.busy) throw new NbdError("EINVAL", `${this.overlayPath}: a ${this.busy} is running`);
    this.busy = "snapshot";
    try {
      await this.pauseRequests();
      try {
        const old = this.store;
        const fresh = await old.freeze(name, this.base.describe());
        this.attach(CowLayer.frozenOver(this.base, this.below, old, this.opts), fresh);
        return old.path;
      } finally {
        this.resumeRequests();
      }
    } finally {
      this.busy = null;
    }
  }

  // ---- merge ----

  /** Progress of the running (or last) merge. */
  get progress(): CopyProgress & MergeEnds {
    const m = this.merging;
    return m ? { ...m.copier.progress(), from: m.from, into: m.into } : { ...idleProgress(), from: null, into: null };
  }

  /**
   * Starts folding the overlay into the layer below it: the frozen snapshot below, or, with
   * `mergeIntoBase`, the base (which must be writable). Throws at once if that is not possible;
   * `done` settles when the merge has finished and the emptied overlay has been dropped.
   */
  startMerge(opts: MergeOptions = {}): { done: Promise<void> } {
    this.writableOrThrow("merge");
    if (this.busy) throw new NbdError("EINVAL", `${this.overlayPath}: a ${this.busy} is running`);
    if (this.closing) throw new NbdError("ESHUTDOWN", `${this.overlayPath} is closing`);
    let target: MergeTarget;
    const lower = this.below instanceof CowLayer ? this.below : null;
    if (lower) {
      if (lower.store.readOnly) throw new NbdError("EPERM", `${this.overlayPath}: cannot merge into ${lower.store.path}: the file is not writable`);
      target = lower.asMergeTarget();
    } else if (opts.mergeIntoBase) {
      const bc = this.base.capabilities();
      if (!bc.writable)
        throw new NbdError("EPERM", `${this.overlayPath}: cannot merge into the base ${this.base.describe()}: it is read-only (open it writable to merge into it)`);
      if (this.bs % Math.max(1, bc.blockSize.minimum) !== 0)
        throw new NbdError("EINVAL", `${this.overlayPath}: the base needs ${bc.blockSize.minimum}-byte alignment, which does not divide the block size ${this.bs}`);
      target = baseMergeTarget(this.base);
    } else {
      throw new NbdError(
        "EINVAL",
        `${this.overlayPath}: there is no snapshot below this overlay; merging it into the base ${this.base.describe()} changes the base, ask for it with mergeIntoBase (the base must be writable)`,
      );
    }
    this.busy = "merge";
    const copier = mergeCopier(this.blocks, this.locks, target, () => opts.onProgress?.(this.progress));
    this.merging = { copier, from: this.store.path, into: target.name };
    const done = this.runMerge(target, lower, copier).then(
      () => {
        copier.finish();
        opts.onProgress?.(this.progress);
      },
      (err: unknown) => {
        copier.finish(err);
        opts.onProgress?.(this.progress);
        throw err;
      },
    );
    const settled = done.finally(() => {
      this.busy = null;
      this.mergeDone = null;
    });
    this.mergeDone = settled.catch(() => undefined);
    return { done: settled };
  }

  /** startMerge() and wait for it. */
  merge(opts: MergeOptions = {}): Promise<void> {
    try {
      return this.startMerge(opts).done;
    } catch (err) {
      return Promise.reject(err);
    }
  }

  private async runMerge(target: MergeTarget, lower: CowLayer | null, copier: Copier): Promise<void> {
    // From here on, writes to blocks this overlay does not hold go straight to the target.
    await this.pauseRequests();
    this.blocks.through = target;
    this.resumeRequests();
    try {
      await copyDown(this.blocks, copier).catch(async (err: unknown) => {
        // The blocks copied so far are forgotten in memory: the target must be durable before any flush writes that map.
        await this.blocks.flush().catch(() => undefined);
        throw err;
      });
      await this.pauseRequests();
      try {
        await this.blocks.flush();
        const old = this.store;
        if (lower) {
          // The snapshot below takes the overlay's name: one atomic rename drops the emptied overlay.
          lower.store.renameOver(this.overlayPath);
          this.blocks.through = null;
          this.attach(lower.below, lower.store);
        } else {
          const h = newHeader(this.bytes, this.bs, "", this.base.describe());
          const fresh = await CowStore.create(this.overlayPath, h, { io: this.opts.io });
          this.blocks.through = null;
          this.attach(this.below, fresh);
        }
        await old.discard();
      } finally {
        this.resumeRequests();
      }
    } finally {
      this.blocks.through = null;
    }
  }

  /** This frozen snapshot as the target of a merge from above (under its own block locks). */
  private asMergeTarget(): MergeTarget {
    return {
      name: this.store.path,
      pwrite: (buf, offset) => this.lockedWrite(buf, offset, plainIo),
      zero: (length, offset) => this.lockedZero(length, offset, plainIo),
      flush: () => this.store.flush(),
    };
  }

  // ---- status ----

  info(): CowInfo {
    const chain: CowChainEntry[] = [];
    let l: Layer = this;
    while (l instanceof CowLayer) {
      const f = l.store;
      chain.push({ path: f.path, role: l.frozen ? "snapshot" : "overlay", allocatedBytes: f.allocatedBlocks * f.blockSize, zeroedBytes: f.zeroedBlocks * f.blockSize, fileBytes: f.fileBytes() });
      l = l.below;
    }
    return {
      overlay: this.overlayPath,
      size: this.bytes,
      blockSize: this.bs,
      chain,
      base: this.base.describe(),
      allocatedBytes: this.store.allocatedBlocks * this.bs,
      merge: this.progress,
    };
  }
}

/**
 * A copy-on-write layer over `base` (which it never writes) with its overlay at `overlayPath`,
 * created on first open unless `create: false`; an existing overlay (and its chain of snapshots)
 * must match the base's size and the block size asked for.
 */
export function createCowLayer(base: Layer, overlayPath: string, opts?: CowLayerOptions): CowLayer {
  return new CowLayer(base, overlayPath, opts);
}
