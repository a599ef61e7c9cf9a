import type { Logger } from "pino";
import { NbdError } from "../../errors.js";
import { isOwnerHere } from "./remote-port.js";
import { isFenced } from "./fence-layer.js";
import { InflightTracker, plainIo, type Capabilities, type Extent, type ExtentKind, type Io, type Layer } from "../layer.js";
import { FlushLedger } from "./flush-ledger.js";

/**
 * LOCAL: this node owns the resource; requests go to port A.
 * DRAINING: a move started; new requests are held while port A finishes and flushes.
 * HANDOVER: port A is closed; the resource is being assigned to the peer.
 * REMOTE: the peer owns the resource; this node's clients' requests go to port B, a peer's are sent back (notOwner).
 * ROLLBACK: the peer could not take it; this node reopens port A.
 * ADOPTING: this node just took the resource; requests forwarded by peers go to port A, this
 *   node's own new requests are held until the ones it sent through port B have completed.
 */
export const REDIRECTOR_STATES = ["LOCAL", "DRAINING", "HANDOVER", "REMOTE", "ROLLBACK", "ADOPTING"] as const;
export type RedirectorState = (typeof REDIRECTOR_STATES)[number];

/** A move's flushes before its hold, while requests still flow: at most this many passes, and this long in all. */
const PRE_FLUSH_PASSES = 8;
const PRE_FLUSH_MS = 3000;

/** How a redirector reaches its resource and its peers; supplied by the node. */
export interface RedirectorPorts {
  /** Opens port A (the image, owned by this node from now on). */
  openLocal(): Promise<Layer>;
  /** Opens port B to whichever node owns the resource now. */
  openRemote(): Promise<Layer>;
  /** Whether this node still owns the resource (checked before an adopting node starts writing its own requests). */
  stillOwner?(): boolean | Promise<boolean>;
  /** The epoch at which this node owns (or adopts) the resource now; null when it does not. */
  epoch?(): number | null;
}

export interface HandOver {
  /** Opens port B to the peer before the hold starts, so its connection costs no stall (optional). */
  prepare?(): Promise<Layer>;
  /**
   * Runs once port A has drained and flushed, while requests are held, before port A closes: the
   * last copy of a live copy goes here. If it throws, the move is abandoned and port A serves on.
   */
  beforeRelease?(): Promise<void>;
  /** Assigns the resource to the peer (lease hand-over + the peer adopting it). Throws if it cannot. */
  assign(): Promise<void>;
  /** Undoes a failed assign: takes the resource back for this node. */
  reclaim(): Promise<void>;
  /** Taken back, but port A would not open: give the resource up (another node, or a later try here, takes it). */
  giveUp?(): Promise<void>;
}

/**
 * What a node that does not own the resource answers a peer's request: ESHUTDOWN, which a port B
 * takes as "find the owner again" (it reads the record and sends the request there itself, under
 * its own session, which the owner applies once). Forwarding it instead would let it be applied
 * twice: a peer may give a request up (this node was stopped, its link timed out), send it to the
 * owner — or take the resource over and write it itself — while this node, once it continues,
 * still reads it from the link and would forward it under its own session, over newer writes.
 */
function notOwner(name: string): NbdError {
  return new NbdError("ESHUTDOWN", `${name}: this node does not own the resource; send the request to its owner`);
}

/** How this node came to own the resource (see PortRedirector.adopt). */
export interface AdoptHow {
  /** A hand-over (the old owner drained and flushed), not a take-over of an owner that stopped. */
  ownerFlushed: boolean;
  /** With a hand-over: the owners the record names as having handed the resource on (LeaseRecord.handedFrom). */
  handedFrom?: string[];
}

interface Held {
  run: (port: Layer) => Promise<unknown>;
  /** Its request's context: `peer` (forwarded by a peer's port B), `session` (its client connection: gone by the time it is released, it is not run). */
  io?: Io;
  resolve: (v: unknown) => void;
  reject: (e: unknown) => void;
}

export interface RedirectorStats {
  state: RedirectorState;
  inflightA: number;
  inflightB: number;
  held: number;
  moves: number;
}

/**
 * The port redirector (MISSION.md, "The mechanism"): sits between the stack and two ports and
 * decides per request where it goes. A move holds new requests in arrival order, drains and
 * flushes port A, hands the resource over, and forwards the held requests through port B; if the
 * peer cannot take the resource, it rolls back and drains the held queue through port A. No
 * request is refused or failed by a move; every request completes exactly once.
 */
export class PortRedirector implements Layer {
  private a: Layer | null = null;
  private b: Layer | null = null;
  private st: RedirectorState;
  private readonly inA = new InflightTracker();
  private readonly inB = new InflightTracker();
  private held: Held[] = [];
  /** What each client's FLUSH may vouch for (see flush-ledger.ts). */
  private readonly ledger = new FlushLedger();
  /** While an adopting node opens port A: requests forwarded by peers, which wait for it. */
  private peerHeld: Held[] | null = null;
  private caps!: Capabilities;
  private bytes = 0;
  private moves = 0;
  private busy: Promise<void> = Promise.resolve();
  private closing = false;
  /** While an adoption waits for port B to drain: ends that wait (the resource was lost meanwhile). */
  private stopAdopting: (() => void) | null = null;

  constructor(
    private readonly name: string,
    private readonly ports: RedirectorPorts,
    /** Whether this node owns the resource when the stack opens. */
    private readonly ownerAtOpen: boolean,
    private readonly log?: Logger,
  ) {
    this.st = ownerAtOpen ? "LOCAL" : "REMOTE";
  }

  describe(): string {
    return `redirector(${this.st}) → ${this.a ? this.a.describe() : this.b ? this.b.describe() : this.name}`;
  }

  get state(): RedirectorState {
    return this.st;
  }

  stats(): RedirectorStats {
    return { state: this.st, inflightA: this.inA.inflight, inflightB: this.inB.inflight, held: this.held.length, moves: this.moves };
  }

  async open(): Promise<void> {
    const port = this.ownerAtOpen ? (this.a = await this.ports.openLocal()) : (this.b = await this.ports.openRemote());
    this.bytes = port.size();
    // Depth is not offered: port B (the link to the owner) asks for base:allocation only.
    this.caps = { ...port.capabilities(), depth: false };
  }

  /** Port B closes at once (requests waiting on a peer end with ESHUTDOWN); port A after it drained. */
  async close(): Promise<void> {
    this.closing = true;
    const b = this.b;
    await b?.close();
    await this.busy;
    for (const h of [...this.held.splice(0), ...(this.peerHeld?.splice(0) ?? [])]) h.reject(new NbdError("ESHUTDOWN", `${this.name}: closed during a move`));
    await Promise.all([this.inA.idle(), this.inB.idle()]);
    const a = this.a;
    this.a = this.b = null;
    await a?.close();
  }

  size(): number {
    return this.bytes;
  }
  capabilities(): Capabilities {
    return this.caps;
  }

  /** `write`: a write, zero or trim (counted per client at port A; see `written`). */
  private route<T>(io: Io, run: (port: Layer) => Promise<T>, write = false): Promise<T> {
    switch (this.st) {
      case "LOCAL":
        if (io.peer && !this.linkCurrent(io)) return Promise.reject(notOwner(this.name));
        return this.viaA(run, io, write);
      case "REMOTE":
        // Forwarded to this node because it is the owner now, while its port A still opens:
        // sent back through port B they would only come here again.
        if (io.peer && this.peerHeld) return this.holdPeer(run, io);
        // A peer took this node for the owner (an old record, or one it read before a move): it goes back.
        if (io.peer) return Promise.reject(notOwner(this.name));
        return this.viaB(run, io);
      case "ADOPTING":
        if (io.peer) return this.linkCurrent(io) ? this.viaA(run, io, write) : Promise.reject(notOwner(this.name));
        return this.hold(run, io);
      default:
        return this.hold(run, io);
    }
  }

  /**
   * Whether a peer's request came on a link made to this node at the epoch it owns now. A link to
   * an earlier ownership of this node carries requests its sender may have given up and sent
   * elsewhere since (a link that timed out while this node was frozen): run now, they would undo
   * newer writes. They are refused as to a non-owner; a sender still listening links again.
   */
  private linkCurrent(io: Io): boolean {
    const s = io.session;
    const now = this.ports.epoch?.();
    if (!s || s.peerEpoch === undefined || now === undefined || now === null) return true;
    if (s.peerEpoch === null) s.peerEpoch = now; // a link made to a non-owner: a hand-over's first
    return s.peerEpoch === now;
  }

  /** `write`: a write, zero or trim, so that a refused one is taken back from its client's count. */
  private async viaA<T>(run: (port: Layer) => Promise<T>, io?: Io, write = false): Promise<T> {
    const a = this.a!;
    this.inA.enter();
    try {
      return await run(a);
    } catch (err) {
      // Refused by the fence (the lease is gone, see FenceLayer), or ended by port A closing under
      // it (a stall of a fault layer: this node gave up an adoption it lost): it goes to the owner.
      if (!isFenced(err) && !(this.a !== a && (err as NbdError).errno === "ESHUTDOWN")) throw err;
    } finally {
      this.inA.leave();
    }
    // Refused: it never reached the device, so it is not among the client's unflushed writes there.
    if (io && write && !io.fua) this.ledger.refusedA(io);
    // Port B serves already: straight there (a peer's goes back to it). Otherwise the fence moves
    // the export to port B and releases the held requests there, this one among them.
    if (this.st === "REMOTE") return io?.peer ? Promise.reject(notOwner(this.name)) : this.viaB(run, io);
    const held = this.hold(run, io);
    void this.fence().catch(() => undefined);
    return held;
  }

  private viaB<T>(run: (port: Layer) => Promise<T>, io?: Io): Promise<T> {
    this.inB.enter();
    let p: Promise<T>;
    try {
      p = run(this.b!);
    } catch (err) {
      p = Promise.reject(err);
    }
    // One reaction on the common path; the owner being this node now takes the slow one.
    return p.then(
      (v) => {
        this.inB.leave();
        return v;
      },
      (err) => this.viaBAgain(err, run, io),
    );
  }

  private async viaBAgain<T>(err: unknown, run: (port: Layer) => Promise<T>, io?: Io): Promise<T> {
    try {
      for (;;) {
        // The owner is this node now (it adopted or took over the resource): the request, older
        // than anything held, goes to port A as soon as that is open — unless its client is gone
        // meanwhile (it may have sent it elsewhere): then it must never run.
        if (!isOwnerHere(err)) throw err;
        if (io?.session?.ended) throw new NbdError("ESHUTDOWN", `${this.name}: the client of this request is gone`);
        if (this.a) return await this.viaA(run, io);
        await new Promise((r) => setTimeout(r, 5));
        try {
          return await run(this.b!);
        } catch (e) {
          err = e;
        }
      }
    } finally {
      this.inB.leave();
    }
  }

  private holdPeer<T>(run: (port: Layer) => Promise<T>, io: Io): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      this.peerHeld!.push({ run, io, resolve: resolve as (v: unknown) => void, reject });
    });
  }

  private hold<T>(run: (port: Layer) => Promise<T>, io?: Io): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      this.held.push({ run, io, resolve: resolve as (v: unknown) => void, reject });
    });
  }

  /**
   * Sends every held request, in arrival order, through the port of the (new) state. Requests
   * that peers sent are never forwarded on (see notOwner).
   */
  private release(): void {
    const q = this.held;
    this.held = [];
    for (const h of q) {
      // Its client is gone (and may have sent it again elsewhere): it must not run late.
      if (h.io?.session?.ended) {
        h.reject(new NbdError("ESHUTDOWN", `${this.name}: the client of this held request is gone`));
        continue;
      }
      if (this.st !== "LOCAL" && h.io?.peer) {
        h.reject(notOwner(this.name));
        continue;
      }
      const p = this.st === "LOCAL" ? this.viaA(h.run, h.io) : this.viaB(h.run, h.io);
      p.then(h.resolve, h.reject);
    }
  }

  /** Serialises moves: one at a time per redirector. */
  private serial(fn: () => Promise<void>): Promise<void> {
    const next = this.busy.then(fn);
    this.busy = next.catch(() => undefined);
    return next;
  }

  /**
   * Moves the resource to the peer (steps 2–5 of the mechanism, or rollback). Resolves when
   * requests flow again: through port B after a hand-over, through port A after a rollback
   * (then it rejects with the reason).
   */
  moveOut(h: HandOver): Promise<{ held: number }> {
    let held = 0;
    return this.serial(async () => {
      if (this.st !== "LOCAL") throw new NbdError("EINVAL", `${this.name}: cannot move out while ${this.st}`);
      const prepared = h.prepare ? await h.prepare().catch(() => null) : null;
      // Pre-flush while requests still flow: most dirty data reaches the disk now, so the flush
      // under hold (step 3) only covers the last moment's writes and the stall stays short.
      // Repeat while a pass is slow: each pass leaves only what was written during the previous one
      // (under 4 KiB random writes at ~40k IOPS each pass took about a third of the one before:
      // 585, 116, 43 ms, and 18 ms under hold after three), for at most PRE_FLUSH_PASSES passes
      // and PRE_FLUSH_MS in all.
      const preFlushMs: number[] = [];
      const p0 = performance.now();
      for (let pass = 0; pass < PRE_FLUSH_PASSES && this.caps.flush && performance.now() - p0 < PRE_FLUSH_MS; pass++) {
        const f0 = performance.now();
        const ok = await this.a!.flush(plainIo).then(() => true, () => false);
        preFlushMs.push(Math.round((performance.now() - f0) * 10) / 10);
        if (!ok || performance.now() - f0 < 3) break;
      }
      const t0 = performance.now();
      this.st = "DRAINING";
      this.log?.debug("move: draining port A");
      await this.inA.idle();
      const tDrained = performance.now();
      const a = this.a!;
      try {
        if (this.caps.flush) await a.flush(plainIo);
        await h.beforeRelease?.();
      } catch (err) {
        // Port A cannot make its state durable (or the last copy failed): keep it, and serve on locally.
        this.st = "LOCAL";
        this.release();
        await prepared?.close().catch(() => undefined);
        throw err;
      }
      await a.close();
      const tFlushed = performance.now();
      this.a = null;
      this.st = "HANDOVER";
      try {
        await h.assign();
      } catch (err) {
        await prepared?.close().catch(() => undefined);
        this.log?.warn({ err: (err as Error).message }, "move: the peer could not take the resource; rolling back");
        this.st = "ROLLBACK";
        let reclaimed = false;
        try {
          await h.reclaim();
          reclaimed = true;
          this.a = await this.ports.openLocal();
          this.st = "LOCAL";
        } catch (again) {
          // The resource is someone else's now after all, or it is this node's but port A would
          // not open: then give it up (never name this node owner with nothing to serve it — its
          // own port B would wait on itself), and follow whoever takes it next.
          if (reclaimed) await h.giveUp?.().catch((e: Error) => this.log?.error({ err: e.message }, "move: giving the resource up failed"));
          this.log?.warn({ err: (again as Error).message, gaveUp: reclaimed }, "move: cannot take the resource back; following its owner");
          this.b = await this.openRemoteUntilDone();
          this.st = "REMOTE";
        }
        this.release();
        throw err;
      }
      const tAssigned = performance.now();
      this.b = prepared ?? (await this.openRemoteUntilDone());
      this.st = "REMOTE";
      this.moves++;
      held = this.held.length;
      this.release();
      const ms = (x: number, y: number) => Math.round((y - x) * 10) / 10;
      const end = performance.now();
      this.log?.info(
        { held, preFlushMs, holdMs: ms(t0, end), drainMs: ms(t0, tDrained), flushMs: ms(tDrained, tFlushed), assignMs: ms(tFlushed, tAssigned), portBMs: ms(tAssigned, end) },
        "move: now served through port B",
      );
    }).then(() => ({ held }));
  }

  /**
   * This node claims the resource now (a hand-over's adopt call): until adopt or adoptionFailed,
   * requests that peers forward here wait (a peer may learn of the claim from the store before this
   * node does) instead of being sent back.
   */
  expectAdoption(): void {
    if (this.st === "REMOTE" && this.peerHeld === null) this.peerHeld = [];
  }

  /** The claim failed: requests peers forwarded meanwhile go back to them (they find the owner). */
  adoptionFailed(): void {
    if (this.st !== "REMOTE") return;
    const q = this.peerHeld ?? [];
    this.peerHeld = null;
    for (const h of q) h.reject(notOwner(this.name));
  }

  /**
   * Takes the resource on this node (the peer has handed it over): port A opens at once and serves
   * requests forwarded by peers; this node's own new requests wait until those it had sent through
   * port B completed, then everything flows through port A. Resolves once port A is open.
   */
  adopt(how: AdoptHow = { ownerFlushed: true }): Promise<void> {
    // A hand-over drained and flushed the old owner: what port B wrote through it is durable —
    // unless port B's link reached an owner before it that did not hand over (it was taken over
    // since). A take-over follows an owner that stopped: what it acknowledged without a FLUSH may be gone.
    const reached = (this.b as { owner?: string } | null)?.owner;
    const flushed = how.ownerFlushed && (reached === undefined || !how.handedFrom || how.handedFrom.includes(reached));
    if (!flushed) {
      this.ownerLost();
      // What still waits on the old owner (it may be stopped, not dead) goes to port A instead.
      (this.b as { dropLink?: (reason: string) => void } | null)?.dropLink?.("this node takes the resource over");
    } else this.ledger.settled();
    let opened!: () => void;
    let failed!: (e: unknown) => void;
    const ready = new Promise<void>((res, rej) => ((opened = res), (failed = rej)));
    void this.serial(async () => {
      if (this.st === "LOCAL") return opened();
      if (this.st !== "REMOTE") return failed(new NbdError("EINVAL", `${this.name}: cannot adopt while ${this.st}`));
      this.peerHeld ??= []; // held since expectAdoption, perhaps
      try {
        this.a = await this.ports.openLocal();
      } catch (err) {
        const q = this.peerHeld ?? [];
        this.peerHeld = null;
        for (const h of q) this.viaB(h.run, h.io).then(h.resolve, h.reject);
        failed(err);
        return;
      }
      this.st = "ADOPTING";
      const q = this.peerHeld ?? [];
      this.peerHeld = null;
      for (const h of q) (h.io && !this.linkCurrent(h.io) ? Promise.reject(notOwner(this.name)) : this.viaA(h.run, h.io)).then(h.resolve, h.reject);
      opened();
      // Port B drains (a request may hang there a while: a stalled old owner) unless a fence says
      // this node lost the resource meanwhile: then nothing waits on it.
      await Promise.race([this.inB.idle(), new Promise<void>((r) => (this.stopAdopting = r))]);
      this.stopAdopting = null;
      if (this.ports.stillOwner && !(await this.ports.stillOwner())) {
        // The hand-over was taken back meanwhile (its owner rolled back), or the lease was lost
        // (this node was frozen past it): never write as a second owner.
        this.log?.warn("adopt: the resource was taken back or lost; following its owner");
        const a = this.a;
        this.a = null; // first: what port A's closing ends goes to the owner (see viaA)
        await a.close().catch(() => undefined);
        this.st = "REMOTE";
        this.release();
        return;
      }
      const b = this.b;
      this.b = null;
      this.st = "LOCAL";
      this.moves++;
      this.release();
      await b?.close().catch(() => undefined);
      this.log?.info("adopt: now served through port A");
    });
    return ready;
  }

  /**
   * This node lost the resource without a move (its lease was broken): stop using port A at once
   * for new requests, let the ones in flight finish, then forward everything through port B.
   */
  fence(): Promise<void> {
    // An adoption still waiting for port B ends now; it finds the lease gone and follows the owner.
    this.stopAdopting?.();
    return this.serial(async () => {
      if (this.st !== "LOCAL") return;
      this.st = "DRAINING";
      await this.inA.idle();
      // Port A closes without a flush (its lease is gone): what it never flushed may be lost.
      this.ledger.fenced();
      await this.a!.close().catch(() => undefined);
      this.a = null;
      this.st = "HANDOVER";
      this.b = await this.openRemoteUntilDone();
      this.st = "REMOTE";
      this.release();
    });
  }

  /** Port B must open once the peer owns the resource: held requests wait, retrying with backoff. */
  private async openRemoteUntilDone(): Promise<Layer> {
    for (let delay = 10; ; delay = Math.min(delay * 2, 1000)) {
      if (this.closing) throw new NbdError("ESHUTDOWN", `${this.name}: closing`);
      try {
        return await this.ports.openRemote();
      } catch (err) {
        this.log?.warn({ err: (err as Error).message }, "port B: cannot reach the owner yet; retrying");
        await new Promise((r) => setTimeout(r, delay));
      }
    }
  }

  pread(buf: Buffer, offset: number, io: Io): Promise<void> {
    return this.route(io, (p) => p.pread(buf, offset, io));
  }
  pwrite(buf: Buffer, offset: number, io: Io): Promise<void> {
    return this.route(io, (p) => this.written(p, io, p.pwrite(buf, offset, io)), true);
  }
  zero(length: number, offset: number, io: Io): Promise<void> {
    return this.route(io, (p) => this.written(p, io, p.zero(length, offset, io)), true);
  }
  trim(length: number, offset: number, io: Io): Promise<void> {
    return this.route(io, (p) => this.written(p, io, p.trim(length, offset, io)), true);
  }
  /**
   * A FLUSH. It fails with EIO when it covers a write that may have been lost with an owner, a
   * link or a fence (see flush-ledger.ts): it never vouches for lost writes.
   */
  flush(io: Io): Promise<void> {
    const ticket = this.ledger.flushSent(io);
    return this.route(io, (p) => p.flush(io)).then(() => {
      const lost = this.ledger.flushed(ticket);
      if (lost) throw new NbdError("EIO", `${this.name}: ${lost}`);
    });
  }

  /** Counts a write that only a FLUSH makes durable, through port A as sent, through port B once acknowledged. */
  private written(p: Layer, io: Io, done: Promise<void>): Promise<void> {
    if (io.fua) return done;
    if (p === this.a) {
      this.ledger.sentA(io); // a write the fence refuses is taken back in viaA
      return done;
    }
    if (p !== this.b) return done;
    return done.then(() => this.ledger.ackedB(io));
  }

  /**
   * What port B acknowledged without a FLUSH may be gone: its owner died (this node takes the
   * resource over) or the link to it moved to another owner. Each client with such writes gets EIO
   * from the FLUSHes that cover one of them, wherever they go.
   */
  ownerLost(): void {
    const clients = this.ledger.ownerLost();
    if (clients) this.log?.warn({ clients }, "writes acknowledged through port B were not flushed when its owner or link went: each client's next FLUSH fails");
  }

  /**
   * Port B's link moved to the owner the one it reached handed the resource to: that owner drained
   * and flushed first, and served this node's link at its own epoch only (linkCurrent), so what it
   * acknowledged is durable. Without this, a take-over of the new owner would count those writes
   * as lost (nemesis on the lab, seed 20).
   */
  ownerHandedOver(): void {
    this.ledger.settled();
  }

  cache(length: number, offset: number, io: Io): Promise<void> {
    return this.route(io, (p) => p.cache(length, offset, io));
  }
  extents(length: number, offset: number, io: Io, kind?: ExtentKind): Promise<Extent[]> {
    return this.route(io, (p) => p.extents(length, offset, io, kind));
  }
  async quiesce(): Promise<void> {
    await Promise.all([this.inA.idle(), this.inB.idle()]);
  }
  resume(): void {}
}
