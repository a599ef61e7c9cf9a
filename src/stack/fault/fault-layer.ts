import type { Logger } from "pino";
import { NbdError } from "../../errors.js";
import { PassthroughLayer, plainIo, type Extent, type ExtentKind, type Io, type Layer } from "../layer.js";
import { parseRule, seededRandom, type FaultOp, type FaultRule } from "./rules.js";

export interface FaultLayerOptions {
  seed?: number;
  log?: Logger;
  /** Keep writes since the last FLUSH in a volatile cache that a power cut can lose. */
  powerloss?: boolean;
}

export interface PowerCutOptions {
  /** Fraction of the unflushed writes that still reach the device, in order, chosen by the seed (default 0). */
  keep?: number;
  /** Whether a kept write may be torn: only a prefix of its 512-byte sectors reaches the device. */
  torn?: boolean;
}

interface Volatile {
  offset: number;
  data: Buffer;
}

/**
 * The fault layer: a filter that fails, delays, stalls or corrupts requests by rules changed at
 * run time, and can "lose power" (drop writes that were never flushed). Every random decision
 * comes from one seeded generator, so a run is reproducible. Each injected fault is logged and counted.
 */
export class FaultLayer extends PassthroughLayer {
  private rules: FaultRule[] = [];
  private nextId = 1;
  private random: () => number;
  private stalled: Array<{ go: () => void; stop: (err: Error) => void }> = [];
  private volatile: Volatile[] = [];
  private powered = true;
  private persisting: Promise<void> = Promise.resolve();
  /** Bumped by close(): a write that was still waiting for its fault (a delay) when the layer closed never lands. */
  private session = 0;
  readonly counts = { injected: 0, delayed: 0, stalled: 0, corrupted: 0, lostWrites: 0 };

  constructor(
    next: Layer,
    private readonly opts: FaultLayerOptions = {},
  ) {
    super(next);
    this.random = seededRandom(opts.seed ?? 1);
  }

  override describe(): string {
    return `fault(${this.rules.length} rules${this.opts.powerloss ? ", powerloss" : ""}) → ${this.next.describe()}`;
  }

  addRule(text: string): FaultRule {
    const r = parseRule(text, this.nextId++, performance.now());
    this.rules.push(r);
    return r;
  }
  clearRules(): void {
    this.rules = [];
    this.releaseStalled();
  }
  listRules(): FaultRule[] {
    return this.rules.map((r) => ({ ...r }));
  }
  /** Lets every stalled request go on. */
  releaseStalled(): number {
    const s = this.stalled;
    this.stalled = [];
    for (const w of s) w.go();
    return s.length;
  }

  /** Stalled requests end with ESHUTDOWN (they never go down): closing must not wait for a release. */
  /**
   * Stalled requests end with ESHUTDOWN. Writes still in the volatile cache are dropped, as a power
   * cut would: a close that wanted them kept flushed first (shutdown, a hand-over), and one that did
   * not (port A fenced after the lease was lost) must never write them later, over another owner's.
   */
  override async close(): Promise<void> {
    this.session++;
    const s = this.stalled;
    this.stalled = [];
    for (const w of s) w.stop(new NbdError("ESHUTDOWN", "the fault layer closed while this request was stalled"));
    await this.persisting;
    if (this.volatile.length) {
      this.counts.lostWrites += this.volatile.length;
      this.opts.log?.warn({ lost: this.volatile.length }, "closed with unflushed writes in the volatile cache: they are lost");
      this.volatile = [];
    }
    return this.next.close();
  }

  /** Unflushed writes are lost (all, or all but a seeded subset, possibly torn); then every request fails with ESHUTDOWN. */
  async powerCut(o: PowerCutOptions = {}): Promise<{ lost: number; kept: number }> {
    if (!this.opts.powerloss) throw new NbdError("EINVAL", "this fault layer was not set up for power loss");
    this.powered = false;
    await this.persisting; // writes already on their way to the device get there
    const pending = this.volatile;
    this.volatile = [];
    let kept = 0;
    for (const w of pending) {
      if (this.random() >= (o.keep ?? 0)) continue;
      let data = w.data;
      if (o.torn && data.length > 512) data = data.subarray(0, 512 * (1 + Math.floor(this.random() * Math.floor(data.length / 512))));
      await this.next.pwrite(data, w.offset, plainIo);
      kept++;
    }
    this.counts.lostWrites += pending.length - kept;
    this.opts.log?.warn({ lost: pending.length - kept, kept }, "power cut");
    return { lost: pending.length - kept, kept };
  }

  powerOn(): void {
    this.powered = true;
    this.opts.log?.warn("power on");
  }

  /**
   * Applies the rules to one request; resolves when it may go on, throws the injected error. A
   * request delayed or stalled past the end of its client's connection ends with ESHUTDOWN there:
   * its client may have sent it again elsewhere, and it must not land later over newer data.
   */
  private async inject(op: FaultOp, offset: number, length: number, io?: Io): Promise<FaultRule | null> {
    if (!this.powered && op !== "open") throw new NbdError("ESHUTDOWN", "the disk has no power (powercut)");
    let corruptBy: FaultRule | null = null;
    for (const r of this.rules) {
      if (r.op === "any" ? op === "open" : r.op !== op) continue;
      if (r.range && (length === 0 || offset >= r.range.end || offset + length <= r.range.start)) continue;
      r.seen++;
      if (r.afterCount !== undefined && r.seen <= r.afterCount) continue;
      if (r.afterMs !== undefined && performance.now() - r.addedAt < r.afterMs) continue;
      const fire = r.once ? r.fired === 0 : r.every !== undefined ? r.seen % r.every === 0 : r.rate !== undefined ? this.random() < r.rate : true;
      if (!fire) continue;
      r.fired++;
      if (r.delay) {
        const d = r.delay.min + (r.delay.max - r.delay.min) * this.random();
        this.counts.delayed++;
        await new Promise((res) => setTimeout(res, d));
      }
      if (r.stall) {
        this.counts.stalled++;
        this.opts.log?.warn({ rule: r.id, op, offset }, `stalling ${op} at 0x${offset.toString(16)} until released`);
        await new Promise<void>((go, stop) => this.stalled.push({ go, stop }));
      }
      if ((r.delay || r.stall) && io?.session?.ended) throw new NbdError("ESHUTDOWN", `the client of this ${op} is gone (it waited on fault rule ${r.id})`);
      if (r.corrupt !== undefined) corruptBy = r;
      if (r.errno) {
        this.counts.injected++;
        const at = r.range ? Math.max(offset, r.range.start) : offset;
        this.opts.log?.warn({ rule: r.id, op, offset: at, errno: r.errno }, `injecting ${r.errno} into ${op} at 0x${at.toString(16)}`);
        throw new NbdError(r.errno, `injected ${r.errno} (fault rule ${r.id}: ${r.text})`, op === "pread" ? at : undefined);
      }
    }
    return corruptBy;
  }

  /** Opening the device below (port A of a node adopting an image) can be delayed, stalled or failed by `op=open` rules. */
  override async open(): Promise<void> {
    if (this.rules.length) await this.inject("open", 0, 0);
    return this.next.open();
  }

  // With no rules, power on and nothing unflushed held back, reads and writes go straight down
  // (plain methods adding no promise of their own): a fault layer waiting for rules costs nothing.
  // Layers below reject rather than throw (see PortSlot), so no try/catch is needed here.
  override pread(buf: Buffer, offset: number, io: Io): Promise<void> {
    if (this.rules.length === 0 && this.powered && this.volatile.length === 0) return this.next.pread(buf, offset, io);
    return this.faultyPread(buf, offset, io);
  }

  override pwrite(buf: Buffer, offset: number, io: Io): Promise<void> {
    if (this.rules.length === 0 && this.powered && !this.opts.powerloss) return this.next.pwrite(buf, offset, io);
    return this.faultyPwrite(buf, offset, io);
  }

  private async faultyPread(buf: Buffer, offset: number, io: Io): Promise<void> {
    const corrupt = await this.inject("pread", offset, buf.length, io);
    await this.next.pread(buf, offset, io);
    for (const w of this.volatile) {
      const s = Math.max(offset, w.offset);
      const e = Math.min(offset + buf.length, w.offset + w.data.length);
      if (e > s) w.data.copy(buf, s - offset, s - w.offset, e - w.offset);
    }
    if (corrupt && this.random() < (corrupt.corrupt ?? 0)) {
      const bit = Math.floor(this.random() * buf.length * 8);
      buf[bit >> 3] ^= 1 << (bit & 7);
      this.counts.corrupted++;
      this.opts.log?.warn({ rule: corrupt.id, offset: offset + (bit >> 3) }, `flipping a bit in pread at 0x${(offset + (bit >> 3)).toString(16)}`);
    }
  }

  /** A write that waited (an injected delay) across a close: it must not reach the device, or a later session's cache. */
  private closedSince(session: number, op: string): void {
    if (session !== this.session) throw new NbdError("ESHUTDOWN", `the fault layer closed while this ${op} waited for its fault`);
  }

  private async faultyPwrite(buf: Buffer, offset: number, io: Io): Promise<void> {
    const session = this.session;
    await this.inject("pwrite", offset, buf.length, io);
    this.closedSince(session, "write");
    if (!this.opts.powerloss) return this.next.pwrite(buf, offset, io);
    this.volatile.push({ offset, data: Buffer.from(buf) });
    if (io.fua) await this.persist();
  }

  override async zero(length: number, offset: number, io: Io): Promise<void> {
    const session = this.session;
    await this.inject("zero", offset, length, io);
    this.closedSince(session, "write zeroes");
    if (!this.opts.powerloss) return this.next.zero(length, offset, io);
    this.volatile.push({ offset, data: Buffer.alloc(length) });
    if (io.fua) await this.persist();
  }

  override async trim(length: number, offset: number, io: Io): Promise<void> {
    const session = this.session;
    await this.inject("trim", offset, length, io);
    this.closedSince(session, "trim");
    if (!this.opts.powerloss) return this.next.trim(length, offset, io);
    await this.persist(); // trim goes straight down; earlier writes first, so order is kept
    return this.next.trim(length, offset, io);
  }

  override async flush(io: Io): Promise<void> {
    await this.inject("flush", 0, 0, io);
    if (this.opts.powerloss) await this.persist();
    return this.next.flush(io);
  }

  override async cache(length: number, offset: number, io: Io): Promise<void> {
    await this.inject("cache", offset, length, io);
    return this.next.cache(length, offset, io);
  }

  override async extents(length: number, offset: number, io: Io, kind: ExtentKind = "allocation"): Promise<Extent[]> {
    await this.inject("extents", offset, length, io);
    const ext = await this.next.extents(length, offset, io, kind);
    if (this.volatile.length === 0) return ext;
    // Unflushed data: report it allocated (in the top layer, for depth).
    return [{ length: ext.reduce((s, e) => s + e.length, 0), flags: kind === "depth" ? 1 : 0 }];
  }

  /**
   * Writes the volatile cache to the device below, oldest first, then makes it durable. Runs one
   * at a time; entries stay readable in the cache until they are on the device.
   */
  private persist(): Promise<void> {
    const run = this.persisting.then(async () => {
      const n = this.volatile.length;
      for (let i = 0; i < n; i++) await this.next.pwrite(this.volatile[i]!.data, this.volatile[i]!.offset, plainIo);
      this.volatile.splice(0, n);
      if (n) await this.next.flush(plainIo);
    });
    this.persisting = run.catch(() => undefined);
    return run;
  }
}

export function createFaultLayer(next: Layer, opts?: FaultLayerOptions): FaultLayer {
  return new FaultLayer(next, opts);
}
