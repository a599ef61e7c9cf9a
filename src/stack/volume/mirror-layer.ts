import { EventEmitter } from "node:events";
import type { Logger } from "pino";
import { errnoOf, errorMessage, NbdError } from "../../errors.js";
import type { Copier } from "../../copy/copier.js";
import type { CopyProgress } from "../../copy/progress.js";
import { RangeLock } from "../../util/range-lock.js";
import { InflightTracker, plainIo, type Capabilities, type Extent, type ExtentKind, type Io, type Layer } from "../layer.js";
import { combineCapabilities } from "./common.js";
import { resyncCopier, withDoneTotal } from "./mirror-resync.js";

export type LegState = "ok" | "degraded" | "resyncing";

export interface LegStatus {
  index: number;
  describe: string;
  state: LegState;
  /** Failed requests seen on this leg (counted every time; the leg is degraded at the first that counts). */
  errors: number;
  lastError: string | null;
  /** Progress of the running (or last) resync of this leg, null if it never ran; done and total are doneBytes and totalBytes. */
  resync: (CopyProgress & { done: number; total: number }) | null;
}

export interface MirrorStatus {
  size: number;
  /** Legs in state "ok". */
  healthy: number;
  legs: LegStatus[];
}

/** What "resync-progress" and onProgress get after each chunk copied. */
export type ResyncEvent = CopyProgress & { leg: number; done: number; total: number };

export interface MirrorLayerOptions {
  log?: Logger;
  /** Legs known to be out of date at start (e.g. a new blank disk): they start degraded, for resync. */
  degraded?: number[];
  /** Bytes copied per step of a resync (default 1 MiB, cut to the legs' maximum request). */
  resyncChunk?: number;
  /** Resync steps in flight at once (default 4). */
  resyncParallel?: number;
}

export interface ResyncOptions {
  onProgress?: (p: ResyncEvent) => void;
}

interface Leg {
  index: number;
  layer: Layer;
  state: LegState;
  opened: boolean;
  errors: number;
  lastError: string | null;
  busy: number;
  /** The copier of the running (or last) resync. */
  copier: Copier | null;
}

/**
 * RAID-1 over `legs`, which are assumed identical at start (the mirror keeps no metadata of its
 * own; list stale legs in `degraded`).
 * - pwrite, zero, trim and flush go to every leg not degraded, in parallel, and succeed when at
 *   least one healthy ("ok") leg succeeded; the legs that failed are then marked degraded (logged
 *   once, counted) and skipped from then on. When every healthy leg fails, no leg is degraded
 *   (none has proved better) and the request fails with the error.
 * - pread goes to the least busy healthy leg (round-robin between equals); a failed read is tried
 *   on the other healthy legs, and a leg whose read failed while another's succeeded is degraded.
 * - extents and cache are answered by a healthy leg.
 * - resync(i) rebuilds a degraded leg online with a Copier (src/copy): chunks are copied from
 *   healthy legs with bounded parallelism, each under the mirror's range lock; while any resync
 *   runs, client writes take the same lock and go to the resyncing leg too, so a chunk copy and a
 *   write to that chunk never interleave. The leg is "ok" again once every chunk is copied and a
 *   flush of the leg succeeded; once it fails a write, the resync stops.
 * Events: "degraded" {leg, error}, "resync-progress" ResyncEvent, "resync-done" {leg, error?}.
 */
export class MirrorLayer extends EventEmitter implements Layer {
  private readonly legs: Leg[];
  private readonly log: Logger | undefined;
  private caps!: Capabilities;
  private total = 0;
  private rr = 0;
  private readonly lock = new RangeLock();
  /** Client writes and zeroes that started while no resync ran (they take no lock). */
  private readonly unlocked = new InflightTracker();
  /** Every request in this layer (for quiesce). */
  private readonly inflight = new InflightTracker();
  private resyncs = 0;
  private readonly runs = new Set<Promise<void>>();
  private paused = false;
  private closing = false;
  /** Opened once already: leg states (degraded legs) are kept across close and open. */
  private started = false;

  constructor(
    legs: Layer[],
    private readonly opts: MirrorLayerOptions = {},
  ) {
    super();
    if (legs.length === 0) throw new NbdError("EINVAL", "mirror needs at least one leg");
    for (const i of opts.degraded ?? []) if (!legs[i]) throw new NbdError("EINVAL", `mirror: no leg ${i} to mark degraded`);
    this.legs = legs.map((layer, index) => ({ index, layer, state: "ok", opened: false, errors: 0, lastError: null, busy: 0, copier: null }));
    this.log = opts.log;
  }

  describe(): string {
    return `mirror[${this.legs.map((l) => l.layer.describe()).join(", ")}]`;
  }

  /**
   * Opens every leg. A leg that fails to open is degraded (it can be resynced later, which tries to
   * open it again); the mirror fails to open only if no leg opens or no healthy leg is left.
   * Leg states survive close and open of the same object.
   */
  async open(): Promise<void> {
    this.closing = false;
    const r = await Promise.allSettled(this.legs.map((l) => l.layer.open()));
    let firstErr: unknown = null;
    for (const l of this.legs) {
      const res = r[l.index]!;
      if (res.status === "fulfilled") l.opened = true;
      else {
        firstErr ??= res.reason;
        this.degrade(l, res.reason, "open");
      }
    }
    const open = this.legs.filter((l) => l.opened);
    if (open.length === 0) throw firstErr;
    const caps = combineCapabilities(open.map((l) => l.layer.capabilities()));
    const align = caps.blockSize.minimum;
    const min = Math.min(...open.map((l) => l.layer.size()));
    this.total = min - (min % align);
    this.caps = caps;
    const first = !this.started;
    this.started = true;
    for (const i of first ? (this.opts.degraded ?? []) : []) {
      const l = this.legs[i]!;
      if (l.state === "ok") {
        l.state = "degraded";
        l.lastError = "listed as out of date at start";
      }
    }
    if (!this.legs.some((l) => l.state === "ok")) {
      await this.close().catch(() => undefined);
      throw firstErr ?? new NbdError("EINVAL", "mirror: every leg is degraded; at least one must be in sync");
    }
  }

  async close(): Promise<void> {
    this.closing = true;
    for (const l of this.legs) if (l.state === "resyncing") l.copier!.abort(new NbdError("ESHUTDOWN", "the mirror was closed during resync"));
    await Promise.allSettled([...this.runs]);
    const opened = this.legs.filter((l) => l.opened);
    for (const l of opened) l.opened = false;
    const r = await Promise.allSettled(opened.map((l) => l.layer.close()));
    const failed = r.find((x): x is PromiseRejectedResult => x.status === "rejected");
    if (failed) throw failed.reason;
  }

  size(): number {
    return this.total;
  }

  capabilities(): Capabilities {
    return this.caps;
  }

  status(): MirrorStatus {
    return {
      size: this.total,
      healthy: this.legs.filter((l) => l.state === "ok").length,
      legs: this.legs.map((l) => ({
        index: l.index,
        describe: l.layer.describe(),
        state: l.state,
        errors: l.errors,
        lastError: l.lastError,
        resync: l.copier ? withDoneTotal(l.copier.progress()) : null,
      })),
    };
  }

  /** Counts an error of a leg; marks the leg degraded (logged once) unless it already is. */
  private degrade(leg: Leg, err: unknown, op: string): void {
    leg.errors++;
    leg.lastError = `${op}: ${errorMessage(err)}`;
    if (leg.state === "degraded") return;
    const was = leg.state;
    leg.state = "degraded";
    this.log?.warn({ leg: leg.index, op, err: errorMessage(err), was }, `mirror leg ${leg.index} degraded: ${op} failed`);
    this.emit("degraded", { leg: leg.index, error: leg.lastError });
    if (was === "resyncing") leg.copier!.abort(new NbdError("EIO", `leg ${leg.index} failed during resync (${leg.lastError})`));
  }

  private countError(leg: Leg, err: unknown, op: string): void {
    leg.errors++;
    leg.lastError = `${op}: ${errorMessage(err)}`;
  }

  /** A healthy leg not in `tried`: the least busy, round-robin between equals. */
  private pick(tried: Set<Leg>): Leg | null {
    let best: Leg | null = null;
    const n = this.legs.length;
    for (let k = 0; k < n; k++) {
      const l = this.legs[(this.rr + k) % n]!;
      if (l.state !== "ok" || tried.has(l)) continue;
      if (!best || l.busy < best.busy) best = l;
    }
    this.rr = (this.rr + 1) % n;
    return best;
  }

  /**
   * Runs fn on healthy legs one after another until one succeeds. With `degradeFailed`, legs that
   * failed before the one that succeeded are degraded; when all fail, the last error is thrown.
   */
  private async onOneLeg<T>(op: string, io: Io, degradeFailed: boolean, fn: (l: Layer) => Promise<T>): Promise<T> {
    const tried = new Set<Leg>();
    const failed: Array<{ leg: Leg; err: unknown }> = [];
    this.inflight.enter();
    try {
      for (let leg = this.pick(tried); leg; leg = this.pick(tried)) {
        tried.add(leg);
        leg.busy++;
        try {
          const v = await fn(leg.layer);
          for (const f of failed) {
            if (degradeFailed) this.degrade(f.leg, f.err, op);
            else this.countError(f.leg, f.err, op);
          }
          return v;
        } catch (err) {
          if (io.signal?.aborted) throw err;
          failed.push({ leg, err });
          this.log?.trace({ leg: leg.index, op, err: errorMessage(err) }, "mirror leg failed; trying another");
        } finally {
          leg.busy--;
        }
      }
      for (const f of failed) this.countError(f.leg, f.err, op);
      if (failed.length) throw failed[failed.length - 1]!.err;
      throw new NbdError("EIO", `mirror: no healthy leg for ${op}`);
    } finally {
      this.inflight.leave();
    }
  }

  /** A write-type request (pwrite, zero, trim): under the range lock while a resync runs. */
  private async write(op: string, offset: number, length: number, io: Io, fn: (l: Layer) => Promise<void>): Promise<void> {
    this.inflight.enter();
    try {
      if (this.resyncs === 0) {
        this.unlocked.enter();
        try {
          await this.toAllLegs(op, io, fn);
        } finally {
          this.unlocked.leave();
        }
        return;
      }
      const release = await this.lock.acquire(offset, offset + length);
      try {
        await this.toAllLegs(op, io, fn);
      } finally {
        release();
      }
    } finally {
      this.inflight.leave();
    }
  }

  /** Runs fn on every leg not degraded, in parallel; see the class comment for what counts as success. */
  private async toAllLegs(op: string, io: Io, fn: (l: Layer) => Promise<void>): Promise<void> {
    const targets = this.legs.filter((l) => l.state !== "degraded");
    const healthyAtStart = targets.filter((l) => l.state === "ok");
    if (healthyAtStart.length === 0) throw new NbdError("EIO", `mirror: no healthy leg for ${op}`);
    const results = await Promise.allSettled(targets.map((l) => fn(l.layer)));
    const fastZero = op === "zero" && io.fast;
    let succeeded = 0;
    let notSupported: unknown = null;
    const failed: Array<{ leg: Leg; err: unknown }> = [];
    targets.forEach((leg, i) => {
      const r = results[i]!;
      if (r.status === "fulfilled") {
        if (leg.state === "ok") succeeded++;
      } else if ((fastZero && errnoOf(r.reason) === "ENOTSUP") || io.signal?.aborted) {
        notSupported ??= r.reason; // not the leg's fault: the client asked for a fast zero or gave up
      } else failed.push({ leg, err: r.reason });
    });
    if (notSupported) throw notSupported;
    if (failed.length === 0) {
      if (succeeded > 0) return;
      throw new NbdError("EIO", `mirror: every healthy leg went away during ${op}`);
    }
    // A resyncing leg that fails is degraded whatever the others did: its resync stops.
    for (const f of failed) if (f.leg.state === "resyncing") this.degrade(f.leg, f.err, op);
    if (succeeded > 0) {
      for (const f of failed) this.degrade(f.leg, f.err, op);
      return;
    }
    for (const f of failed) if (f.leg.state === "ok") this.countError(f.leg, f.err, op);
    throw failed[0]!.err;
  }

  pread(buf: Buffer, offset: number, io: Io): Promise<void> {
    return this.onOneLeg("pread", io, true, (l) => l.pread(buf, offset, io));
  }

  pwrite(buf: Buffer, offset: number, io: Io): Promise<void> {
    return this.write("pwrite", offset, buf.length, io, (l) => l.pwrite(buf, offset, io));
  }

  zero(length: number, offset: number, io: Io): Promise<void> {
    return this.write("zero", offset, length, io, (l) => l.zero(length, offset, io));
  }

  trim(length: number, offset: number, io: Io): Promise<void> {
    return this.write("trim", offset, length, io, (l) => l.trim(length, offset, io));
  }

  async flush(io: Io): Promise<void> {
    this.inflight.enter();
    try {
      await this.toAllLegs("flush", io, (l) => l.flush(io));
    } finally {
      this.inflight.leave();
    }
  }

  cache(length: number, offset: number, io: Io): Promise<void> {
    return this.onOneLeg("cache", io, false, (l) => l.cache(length, offset, io));
  }

  extents(length: number, offset: number, io: Io, kind?: ExtentKind): Promise<Extent[]> {
    return this.onOneLeg("extents", io, false, (l) => l.extents(length, offset, io, kind));
  }

  async quiesce(): Promise<void> {
    this.paused = true;
    await Promise.all([this.inflight.idle(), ...this.legs.map((l) => l.copier?.pause())]);
    await Promise.all(this.legs.filter((l) => l.opened).map((l) => l.layer.quiesce()));
  }

  resume(): void {
    for (const l of this.legs) if (l.opened) l.layer.resume();
    this.paused = false;
    for (const l of this.legs) l.copier?.resume();
  }

  /** Why leg `index` cannot be resynced now, or null if it can. */
  canResync(index: number): string | null {
    const leg = this.legs[index];
    if (!Number.isInteger(index) || !leg) return `no leg ${index} (the mirror has ${this.legs.length})`;
    if (this.closing) return "the mirror is closed";
    if (leg.state === "resyncing") return `leg ${index} is already resyncing`;
    if (leg.state === "ok") return `leg ${index} is in sync`;
    if (!this.legs.some((l) => l.state === "ok")) return "no healthy leg to copy from";
    return null;
  }

  /**
   * Rebuilds degraded leg `index` from the healthy legs while the mirror keeps serving. Resolves
   * when the leg is "ok" again; rejects (the leg stays degraded) if it cannot be completed.
   */
  async resync(index: number, o: ResyncOptions = {}): Promise<void> {
    const why = this.canResync(index);
    if (why) throw new NbdError("EINVAL", `mirror: cannot resync: ${why}`);
    const leg = this.legs[index]!;
    leg.state = "resyncing";
    leg.copier = resyncCopier({
      caps: this.caps,
      size: this.total,
      chunk: this.opts.resyncChunk,
      parallel: Math.max(1, this.opts.resyncParallel ?? 4),
      lock: this.lock,
      read: (op, fn) => this.onOneLeg(op, plainIo, true, fn),
      leg: leg.layer,
      failed: (err) => this.degrade(leg, err, "resync write"),
      onProgress: (p) => {
        const e: ResyncEvent = { leg: leg.index, ...withDoneTotal(p) };
        this.emit("resync-progress", e);
        o.onProgress?.(e);
      },
      log: this.log,
    });
    if (this.paused) void leg.copier.pause();
    this.resyncs++;
    const run = this.runResync(leg).finally(() => {
      this.resyncs--;
      this.runs.delete(run);
    });
    this.runs.add(run);
    return run;
  }

  private async runResync(leg: Leg): Promise<void> {
    const t0 = performance.now();
    const total = this.total;
    const copier = leg.copier!;
    this.log?.info({ leg: leg.index, bytes: total }, `mirror leg ${leg.index} resync started`);
    try {
      if (!leg.opened) {
        await leg.layer.open();
        leg.opened = true;
      }
      const misfit = this.misfit(leg.layer);
      if (misfit) throw new NbdError("EINVAL", `leg ${leg.index} cannot be a leg of this mirror: ${misfit}`);
      // Writes that began before this resync skipped the leg and took no lock: let them land first.
      await this.unlocked.idle();
      await copier.pass();
      if (this.caps.flush) {
        try {
          await leg.layer.flush(plainIo);
        } catch (err) {
          this.degrade(leg, err, "flush");
        }
      }
      if (leg.state !== "resyncing") throw new NbdError("EIO", `leg ${leg.index} failed at the end of resync (${leg.lastError})`);
      leg.state = "ok";
      copier.finish();
      this.log?.info({ leg: leg.index, bytes: total, ms: Math.round(performance.now() - t0) }, `mirror leg ${leg.index} resynced`);
      this.emit("resync-done", { leg: leg.index });
    } catch (err) {
      copier.finish(err);
      if (leg.state === "resyncing") this.degrade(leg, err, "resync");
      this.log?.warn({ leg: leg.index, err: errorMessage(err) }, `mirror leg ${leg.index} resync failed`);
      this.emit("resync-done", { leg: leg.index, error: errorMessage(err) });
      throw err;
    }
  }

  /** Why `layer` cannot serve as a leg of this mirror as opened, or null. */
  private misfit(layer: Layer): string | null {
    if (layer.size() < this.total) return `size ${layer.size()} is below the mirror's ${this.total}`;
    const c = layer.capabilities();
    for (const k of ["writable", "flush", "fua", "trim", "zero", "fastZero", "cache", "extents"] as const) {
      if (this.caps[k] && !c[k]) return `it lacks ${k}`;
    }
    if (this.total > 0 && (c.blockSize.minimum > this.caps.blockSize.minimum || c.blockSize.maximum < this.caps.blockSize.maximum)) return "its block sizes do not fit";
    return null;
  }
}

export function createMirrorLayer(legs: Layer[], opts?: MirrorLayerOptions): MirrorLayer {
  return new MirrorLayer(legs, opts);
}
