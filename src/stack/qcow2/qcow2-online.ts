import fs from "node:fs";
import path from "node:path";
import type { Logger } from "pino";
import { Copier } from "../../copy/copier.js";
import { DirtyBitmap } from "../../copy/dirty-bitmap.js";
import { idleProgress, type CopyProgress } from "../../copy/progress.js";
import { NbdError } from "../../errors.js";
import { RangeLock } from "../../util/range-lock.js";
import { plainIo, type Extent, type Layer } from "../layer.js";
import type { CowChainEntry, CowInfo } from "../volume/cow-layer.js";
import { baseMergeTarget, type MergeEnds, type MergeOptions, type MergeTarget } from "../volume/cow-merge.js";
import { createQcow2 } from "./qcow2-create.js";
import { Qcow2Layer } from "./qcow2-layer.js";
import { fsyncDir } from "../../util/fsync-dir.js";

const MERGE_PARALLEL = 4;
/**
 * A merge pauses clients for its last copies once this little is dirty (or nothing): writes that
 * come faster than the copy would otherwise keep it going for ever.
 */
const LAST_COPIES = 2 * 1024 * 1024;
const SCAN = 1 << 30;
/**
 * How long the bytes each image of the chain holds are reused by info(): counting them reads every
 * L2 table of the chain, and `nbdstack merge --wait` asks for the status four times a second.
 */
const HELD_TTL_MS = 5000;

/**
 * Online snapshot and merge of the qcow2 image a stack serves (`nbdstack snapshot` / `merge`),
 * as the cow layer offers them, with files `qemu-img` knows:
 * - snapshot: the image is frozen under a second name beside it (`vm.snap-N.qcow2`, a hard link)
 *   and a new, empty overlay backed by it takes the image's name — what
 *   `mv vm.qcow2 vm.snap-1.qcow2; qemu-img create -f qcow2 -b vm.snap-1.qcow2 -F qcow2 vm.qcow2`
 *   makes, switched in under a pause of a few milliseconds while clients keep writing;
 * - merge: what the image holds is copied into its backing file (the one copy engine, while
 *   clients keep writing to the image), as `qemu-img commit` does; then, paused, the backing file
 *   takes the image's name (one rename: the chain is one shorter), or, with `mergeIntoBase` when
 *   the backing file is the bottom of the chain, a new empty overlay over it replaces the image.
 */
export class Qcow2Online {
  private busy: "snapshot" | "merge" | null = null;
  private merging: ({ copier: Copier } & MergeEnds) | null = null;
  private held = new Map<string, { at: number; data: number; zero: number }>();

  constructor(
    readonly layer: Qcow2Layer,
    private readonly log?: Logger,
  ) {}

  private check(op: string): void {
    if (this.layer.isReadOnly) throw new NbdError("EPERM", `${op}: ${this.layer.path} is served read-only`);
    if (this.layer.backingIgnored) throw new NbdError("EINVAL", `${op}: ${this.layer.path} is served with backing: none, not the backing file it names (a new overlay would hide what is below)`);
    if (this.busy) throw new NbdError("EINVAL", `${this.layer.path}: a ${this.busy} is running`);
  }

  /** Freezes the image as `name` (a file name beside it; default IMAGE.snap-N.EXT) under a new overlay; returns the frozen file's path. */
  async snapshot(name?: string): Promise<string> {
    this.check("snapshot");
    const top = this.layer.path;
    const dir = path.dirname(top);
    let snap: string;
    if (name !== undefined) {
      if (!name || name.includes("/") || name === "." || name === "..") throw new NbdError("EINVAL", `snapshot name "${name}" must be a file name (it is made beside ${top})`);
      snap = path.join(dir, name);
      if (fs.existsSync(snap)) throw new NbdError("EINVAL", `${snap} exists already`);
    } else snap = freeSnapName(top);
    this.busy = "snapshot";
    try {
      await this.layer.flush(plainIo); // most of the image made durable now, not while clients wait
      await this.layer.pause();
      const paused = performance.now();
      try {
        const size = this.layer.size();
        await this.layer.close(); // flushed, reserved clusters given back
        try {
          fs.linkSync(top, snap);
          try {
            fsyncDir(dir);
            createQcow2({ path: top, size, backing: path.basename(snap), backingFormat: "qcow2", replace: true });
          } catch (err) {
            fs.rmSync(snap, { force: true });
            throw err;
          }
        } finally {
          this.held.clear();
          await this.layer.open(); // the new overlay over the snapshot, or the image again if the switch failed
        }
      } finally {
        this.layer.unpause();
        this.log?.info({ image: top, snapshot: snap, pausedMs: Math.round((performance.now() - paused) * 10) / 10 }, "qcow2 snapshot");
      }
      return snap;
    } finally {
      this.busy = null;
    }
  }

  /** Progress of the running (or last) merge. */
  get progress(): CopyProgress & MergeEnds {
    const m = this.merging;
    return m ? { ...m.copier.progress(), from: m.from, into: m.into } : { ...idleProgress(), from: null, into: null };
  }

  /**
   * Starts copying the image into its backing file; throws at once when that is not possible (no
   * backing file, the bottom of the chain without `mergeIntoBase`, a backing file elsewhere than
   * beside the image or not writable). `done` settles once the chain has been switched.
   */
  startMerge(opts: MergeOptions = {}): { done: Promise<void> } {
    this.check("merge");
    const top = this.layer.path;
    const below = this.layer.below;
    if (!below) throw new NbdError("EINVAL", `${top} has no backing file to merge into${this.layer.hasBacking ? " (its backing stack is only read)" : ""}`);
    // The bottom of the chain: nothing below it (a backing stack, only read, does not count as the base).
    const bottom = below.format === "raw" || (below.layer instanceof Qcow2Layer && !below.layer.hasBacking);
    if (below.layer.size() !== this.layer.size())
      throw new NbdError("EINVAL", `${top}: its backing file ${below.path} has ${below.layer.size()} bytes, the image ${this.layer.size()}: resize it first (qemu-img resize)`);
    if (bottom && !opts.mergeIntoBase)
      throw new NbdError("EINVAL", `${top}: its backing file ${below.path} is the base of the chain; merging changes it, ask for it with mergeIntoBase (--into-base)`);
    if (!bottom && path.dirname(below.path) !== path.dirname(top))
      throw new NbdError("EINVAL", `${top}: its backing file ${below.path} is not in the same directory, and the merged image takes the overlay's name there; commit it offline (qemu-img commit ${top})`);
    try {
      fs.accessSync(below.path, fs.constants.W_OK);
    } catch {
      throw new NbdError("EPERM", `${top}: cannot merge into ${below.path}: the file is not writable`);
    }
    this.busy = "merge";
    const cs = this.layer.clusterSize;
    const bitmap = new DirtyBitmap(this.layer.size(), cs);
    let target: MergeTarget | null = null;
    const into: MergeTarget = {
      name: below.path,
      pwrite: (b, o) => target!.pwrite(b, o),
      zero: (l, o) => target!.zero(l, o),
      flush: () => target!.flush(),
    };
    const source = {
      pread: (b: Buffer, o: number) => this.layer.readUngated(b, o, plainIo),
      extents: (l: number, o: number) => this.layer.extentsUngated(l, o, plainIo),
    };
    const copier = new Copier(source, into, bitmap, new RangeLock(), {
      parallel: MERGE_PARALLEL,
      copyBytes: Math.max(cs, 1024 * 1024),
      zeroDetect: false,
      onProgress: () => opts.onProgress?.(this.progress),
    });
    this.merging = { copier, from: top, into: below.path };
    const done = this.runMerge(copier, bitmap, bottom, into, (t) => (target = t)).then(
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
    const settled = done.finally(() => (this.busy = null));
    settled.catch(() => undefined); // a failure shows in the progress: nobody need wait for it
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

  private async runMerge(copier: Copier, bitmap: DirtyBitmap, bottom: boolean, into: MergeTarget, setTarget: (t: MergeTarget) => void): Promise<void> {
    const layer = this.layer;
    const top = layer.path;
    // Paused: the backing file is opened writable, and from now on every write marks what it changed.
    await layer.pause();
    try {
      setTarget(baseMergeTarget(await layer.writableBacking()));
      layer.written = (o, l) => bitmap.mark(o, l);
    } finally {
      layer.unpause();
    }
    try {
      // What the image holds (data and zero clusters: depth 1) is what the backing file must get.
      const size = layer.size();
      for (let at = 0; at < size; ) {
        const ext = await layer.extentsUngated(Math.min(SCAN, size - at), at, plainIo, "depth");
        for (const e of ext) {
          if (e.flags === 1) bitmap.mark(at, e.length);
          at += e.length;
        }
      }
      copier.planDirty();
      const enough = () => bitmap.dirtyBytes <= LAST_COPIES;
      await copier.pass(enough);
      // Most of what was copied, and of the image, made durable now, not while clients wait; then
      // what was written meanwhile copied too.
      await into.flush();
      await layer.flush(plainIo);
      await copier.pass(enough);
      await layer.pause();
      const paused = performance.now();
      const last = bitmap.dirtyBytes;
      try {
        // The last writes, with none coming: then the backing file holds all the image holds.
        copier.planDirty();
        await copier.pass();
        await into.flush();
        layer.written = null;
        const below = layer.below!;
        await layer.close(); // the image and the writable backing file below it
        try {
          if (!bottom) {
            fs.renameSync(below.path, top); // the merged snapshot takes the image's name; the image goes
            fsyncDir(path.dirname(top));
          } else {
            createQcow2({ path: top, size, backing: below.name, backingFormat: below.format, replace: true });
          }
        } finally {
          this.held.clear();
          await layer.open();
        }
      } finally {
        layer.written = null;
        layer.unpause();
        this.log?.info({ image: top, into: this.merging?.into, lastBytes: last, pausedMs: Math.round((performance.now() - paused) * 10) / 10 }, "qcow2 merge switched");
      }
    } catch (err) {
      layer.written = null;
      throw err;
    }
  }

  /** The chain, top first (the image, then the qcow2 images below with a backing file), and the base. */
  async info(): Promise<CowInfo> {
    const chain: CowChainEntry[] = [];
    let l: Layer | null = this.layer;
    let base = "";
    while (l instanceof Qcow2Layer) {
      const b: Qcow2Layer["below"] = l.below;
      if (!b && l !== this.layer && !l.hasBacking) {
        base = l.describe();
        break;
      }
      const known = this.held.get(l.path);
      const held = known && performance.now() - known.at < HELD_TTL_MS ? known : { at: performance.now(), ...(await heldBytes(l)) };
      this.held.set(l.path, held);
      chain.push({ path: l.path, role: l === this.layer ? "overlay" : "snapshot", allocatedBytes: held.data, zeroedBytes: held.zero, fileBytes: fs.statSync(l.path).size });
      l = b ? b.layer : l.hasBacking ? l.stackBelow : null;
    }
    if (l && !(l instanceof Qcow2Layer)) base = l.describe();
    return { overlay: this.layer.path, size: this.layer.size(), blockSize: this.layer.clusterSize, chain, base, allocatedBytes: chain[0]?.allocatedBytes ?? 0, merge: this.progress };
  }
}

/** The bytes a qcow2 image holds itself (depth 1): as data, and as zero clusters. */
async function heldBytes(l: Qcow2Layer): Promise<{ data: number; zero: number }> {
  const size = l.size();
  let data = 0;
  let zero = 0;
  for (let at = 0; at < size; ) {
    const want = Math.min(SCAN, size - at);
    const depth = await l.extents(want, at, plainIo, "depth");
    const n = depth.reduce((s, e) => s + e.length, 0);
    const alloc = await collect(l, n, at);
    let pos = at;
    let i = 0;
    let used = 0;
    for (const d of depth) {
      let left = d.length;
      while (left > 0) {
        const a = alloc[i]!;
        const k = Math.min(left, a.length - used);
        if (d.flags === 1) {
          if (a.flags & 2) zero += k;
          else data += k;
        }
        left -= k;
        used += k;
        pos += k;
        if (used === a.length) {
          i++;
          used = 0;
        }
      }
    }
    at = pos;
  }
  return { data, zero };
}

/** base:allocation extents of exactly [at, at + length). */
async function collect(l: Qcow2Layer, length: number, at: number): Promise<Extent[]> {
  const out: Extent[] = [];
  for (let done = 0; done < length; ) {
    const e = await l.extents(length - done, at + done, plainIo);
    for (const x of e) {
      const k = Math.min(x.length, length - done);
      out.push({ length: k, flags: x.flags });
      done += k;
      if (done >= length) break;
    }
  }
  return out;
}

/** IMAGE.snap-N.EXT (or IMAGE.snap-N without an extension) beside the image, for the lowest free N. */
function freeSnapName(top: string): string {
  const ext = path.extname(top);
  const stem = top.slice(0, top.length - ext.length);
  for (let n = 1; ; n++) {
    const p = `${stem}.snap-${n}${ext}`;
    if (!fs.existsSync(p)) return p;
  }
}
