import fs from "node:fs";
import path from "node:path";
import type { Logger } from "pino";
import { NbdClient } from "../client/nbd-client.js";
import type { CopyTarget } from "../migration/dirty-tracker.js";
import { DirtyTracker } from "../migration/dirty-tracker.js";
import { LiveCopy, type CopyMode } from "../migration/live-copy.js";
import { freeRanges } from "../migration/free-space.js";
import type { IoMode } from "../stack/port/file-port.js";
import { FaultLayer, type FaultLayerOptions } from "../stack/fault/fault-layer.js";
import { controlCall, getStatus, type ExportStatus, type NodeStatus } from "../control/control-client.js";
import { HttpError } from "../control/control-server.js";
import { DEFAULT_TTL_MS, LeaseError, LeaseFile, type NodeIdentity } from "../migration/lease.js";
import type { Ownership } from "../migration/ownership.js";
import { Export } from "../server/export.js";
import { newCopyTargetName } from "../internal-exports.js";
import { createDiskLayer } from "../stack/disk/disk-layer.js";
import { buildLayer, stackOf, StackHandles, type ExportSpec } from "../stack/compose.js";
import { createFilePort } from "../stack/port/file-port.js";
import { PortRedirector } from "../stack/port/redirector.js";
import { FenceLayer } from "../stack/port/fence-layer.js";
import { PortSlot } from "../stack/port/port-slot.js";
import type { Layer } from "../stack/layer.js";
import { RemotePort, ownerIsHere, type RemotePortOptions } from "../stack/port/remote-port.js";

interface Managed {
  name: string;
  image: string;
  lease: Ownership;
  redirector: PortRedirector;
  exp: Export;
  /** The epoch of my lease, or null while another node owns the image. */
  epoch: number | null;
  /** Above port A: records writes while a live copy runs. */
  tracker: DirtyTracker;
  /** Until when (performance.now()) port A may write without looking at the lease record again. */
  validUntil: number;
  /**
   * The image is this node's own copy, not shared with the owner (it came or went by a live
   * copy): another node's lease record of it is not renewed here, so expiry means nothing.
   */
  private: boolean;
  /** The live copy of this export to a peer, while one runs (and its last state after). */
  copy: LiveCopy | null;
  /** Set while this node is the destination of a live copy: the export the source writes into. */
  target: { exp: Export; marker: string; restoreFault: () => void } | null;
}

/** Where a node publishes exports it creates at run time (live-copy destinations). */
export interface ExportPublisher {
  add(exp: Export): Promise<void>;
  remove(name: string): Promise<void>;
}

export interface CopyMigrateOptions {
  mode?: CopyMode;
  skipFree?: boolean;
  maxRate?: number;
}

/** Share of the lease time after a renewal during which port A writes without checking the record. */
const FRESH = 0.8;


export interface StorageNodeOptions {
  nodeId: string;
  /** NBD address peers use to reach this node (host:port). */
  nbd: string;
  log: Logger;
  ttlMs?: number;
  /** With --fault: the export a live copy writes into gets a fault layer too (steered by the export's name), to slow or break the link. */
  fault?: FaultLayerOptions;
  handles?: StackHandles;
  /** The ownership record of an image (default: a lease file beside it). */
  ownership?: (image: string) => Ownership;
  /** Directory where this node creates the images it receives by live copy (--data-dir). */
  dataDir?: string;
  io?: IoMode;
  /** TLS of port B connections to peers (this node's own TLS credentials), if configured. */
  peerTls?: RemotePortOptions["tls"];
}

function parseHostPort(s: string): { host: string; port: number } {
  const i = s.lastIndexOf(":");
  return { host: s.slice(0, i).replace(/^\[|\]$/g, ""), port: Number(s.slice(i + 1)) };
}

/**
 * A node of a cluster: serves file exports whose stack has a port redirector, owns images through
 * lease records beside them, and moves exports to and from peers through its control API.
 */
export class StorageNode {
  readonly identity: NodeIdentity;
  private readonly managed = new Map<string, Managed>();
  private readonly ttlMs: number;
  private timer: NodeJS.Timeout | null = null;

  constructor(private readonly opts: StorageNodeOptions) {
    this.identity = { nodeId: opts.nodeId, nbd: opts.nbd, control: "" };
    this.ttlMs = opts.ttlMs ?? DEFAULT_TTL_MS;
  }

  /**
   * The export for one image: disk layer over a port redirector whose port A is the image and
   * port B the owner. Takes the lease if it is free; otherwise the export starts as REMOTE.
   */
  createExport(spec: ExportSpec & { name: string }, handles: StackHandles = new StackHandles()): Export {
    // The image at the bottom of the stack is the resource that moves: port A opens it, port B
    // reaches whoever owns it. The rest of the declared stack sits above the redirector.
    const stack = stackOf(spec);
    const bottom = stack[0]!;
    if (bottom.kind !== "file") throw new Error(`${spec.name}: a node's exports must sit on an image file (shared with peers), not ${bottom.kind}`);
    const image = bottom.path;
    const lease = this.ownershipOf(image);
    let epoch: number | null = null;
    try {
      epoch = lease.acquire(this.identity, this.ttlMs).epoch;
    } catch (err) {
      if (!(err instanceof LeaseError)) throw err;
      this.opts.log.info({ export: spec.name, owner: err.current?.owner }, "image owned by another node: serving through port B");
    }
    const log = this.opts.log.child({ export: spec.name });
    // Port A: the image, opened each time this node owns it; a fault layer above it keeps its rules across moves.
    const slot = new PortSlot(() => createFilePort({ path: image, readOnly: spec.readOnly || bottom.readOnly, io: spec.io }));
    let below: Layer = slot;
    let rest = stack.slice(1);
    const ctx = { exportName: spec.name, readOnly: !!spec.readOnly, io: spec.io, log: this.opts.log, handles };
    if (!spec.stack && spec.fault) {
      // The --fault shorthand: directly above the image, below the redirector.
      below = buildLayer(rest[0]!, slot, ctx);
      rest = rest.slice(1);
    }
    const tracker = new DirtyTracker(below);
    // Epoch fencing: a write through port A after the lease's deadline checks the record first.
    const portA: Layer = new FenceLayer(tracker, () => this.mayWrite(m));
    const redirector = new PortRedirector(
      spec.name,
      {
        openLocal: async () => {
          await portA.open();
          return portA;
        },
        openRemote: async () => {
          const p = new RemotePort({
            exportName: spec.name,
            locate: () => this.locateOwner(lease),
            log,
            tls: this.opts.peerTls,
            // The owner may be down while this node starts: the image itself gives size and abilities.
            offline: async () => {
              const f = createFilePort({ path: image, readOnly: spec.readOnly || bottom.readOnly, io: spec.io });
              await f.open();
              try {
                return { size: f.size(), caps: f.capabilities() };
              } finally {
                await f.close();
              }
            },
          });
          await p.open();
          return p;
        },
        stillOwner: () => {
          const r = lease.read();
          return r?.owner === this.identity.nodeId && r.epoch === m.epoch;
        },
      },
      epoch !== null,
      log,
    );
    const m: Managed = { name: spec.name, image, lease, redirector, exp: null as unknown as Export, epoch, tracker, validUntil: 0, private: !!lease.read()?.private, copy: null, target: null };
    let top: Layer = redirector;
    for (const l of rest) top = buildLayer(l, top, ctx);
    const exp: Export = new Export(spec.name, createDiskLayer(top, { ...spec.disk, readOnly: spec.readOnly }), () => {
      const r = lease.read();
      return `${exp.layer.describe()} [owner=${r?.owner ?? "?"} epoch=${r?.epoch ?? "?"}]`;
    });
    m.exp = exp;
    this.managed.set(spec.name, m);
    return exp;
  }

  /**
   * Whether port A may write now: yes while the lease renewed last is fresh; past that (this node
   * was paused, or renewals stalled) the record decides, and a lost lease fences port A at once.
   */
  private mayWrite(m: Managed): boolean {
    if (m.epoch === null) return false;
    if (performance.now() < m.validUntil) return true;
    try {
      m.lease.renew(this.identity, m.epoch);
      m.validUntil = performance.now() + this.ttlMs * FRESH;
      return true;
    } catch (err) {
      // A record that cannot be read right now (an I/O hiccup) is left to the renewal loop.
      if (!(err instanceof LeaseError)) return true;
      this.opts.log.error({ export: m.name, err: err.message }, "lease lost before a write: fencing port A");
      m.epoch = null;
      return false; // the redirector fences port A and sends the request to the new owner
    }
  }

  private ownershipOf(image: string): Ownership {
    return this.opts.ownership ? this.opts.ownership(image) : new LeaseFile(image);
  }

  private locateOwner(lease: Ownership): { host: string; port: number } {
    const r = lease.read();
    if (!r) throw Object.assign(new Error(`no lease record in ${lease.where}`), { code: "ENOENT" });
    if (r.owner === this.identity.nodeId) throw ownerIsHere(`${lease.where} names this node (${r.owner}@${r.epoch}) as the owner`);
    return parseHostPort(r.nbd);
  }

  /** Stops the live copy of `name` that this node runs as its source; 409 if none is running. */
  cancelCopy(name: string): void {
    const m = this.find(name);
    const phase = m.copy?.progress().phase;
    if (!m.copy || (phase !== "copying" && phase !== "starting")) throw new HttpError(409, `${name}: no live copy to cancel`);
    m.copy.cancel("cancelled by request");
  }

  /** Starts lease renewal once the control API listens at `controlUrl`. */
  start(controlUrl: string): void {
    this.identity.control = controlUrl;
    // Record the addresses peers need (the NBD port may only now be known).
    for (const m of this.managed.values()) if (m.epoch !== null) m.lease.renew(this.identity, m.epoch);
    this.timer = setInterval(() => this.renewAll(), Math.max(100, this.ttlMs / 3));
    this.timer.unref();
  }

  setNbdAddress(nbd: string): void {
    this.identity.nbd = nbd;
  }

  private renewAll(): void {
    for (const m of this.managed.values()) {
      if (m.epoch === null && m.redirector.state === "REMOTE" && !m.private && !m.target) {
        this.takeOverIfExpired(m);
        continue;
      }
      if (m.epoch === null || (m.redirector.state !== "LOCAL" && m.redirector.state !== "ADOPTING")) continue;
      try {
        m.lease.renew(this.identity, m.epoch);
        m.validUntil = performance.now() + this.ttlMs * FRESH;
      } catch (err) {
        if (!(err instanceof LeaseError)) {
          this.opts.log.error({ export: m.name, err: (err as Error).message }, "lease renewal failed");
          continue;
        }
        // Someone broke my lease: stop writing through port A at once and follow the new owner.
        this.opts.log.error({ export: m.name, err: err.message }, "lease lost: fencing port A");
        m.epoch = null;
        void m.redirector.fence();
      }
    }
  }

  /** The owner stopped renewing (it died): once its lease expired, take the image over. */
  private takeOverIfExpired(m: Managed): void {
    let epoch: number;
    try {
      const taken = m.lease.takeOver(this.identity, this.ttlMs);
      if (!taken) return; // the owner's lease is still valid
      epoch = taken.epoch;
    } catch (err) {
      // Another node was quicker; or the record cannot be read now (tried again at the next tick).
      if (!(err instanceof LeaseError)) this.opts.log.error({ export: m.name, err: (err as Error).message }, "take-over check failed");
      return;
    }
    this.opts.log.warn({ export: m.name, epoch }, "lease of the owner expired: taking the image over");
    m.epoch = epoch;
    m.redirector.adopt().catch((err: Error) => {
      this.opts.log.error({ export: m.name, err: err.message }, "take-over failed");
      m.epoch = null;
    });
  }

  /** Redirector state of every export, for metrics. */
  redirectors(): Array<{ name: string; stats: ReturnType<PortRedirector["stats"]> }> {
    return [...this.managed.values()].map((m) => ({ name: m.name, stats: m.redirector.stats() }));
  }

  status(): NodeStatus {
    const exports: ExportStatus[] = [...this.managed.values()].map((m) => {
      const r = m.lease.read();
      return {
        name: m.name,
        image: m.image,
        owner: r?.owner ?? null,
        epoch: r?.epoch ?? null,
        size: m.exp.size(),
        ...m.redirector.stats(),
        ...(m.copy ? { copy: m.copy.progress() } : {}),
        ...(m.target ? { copyTarget: true } : {}),
      };
    });
    return { ...this.identity, exports };
  }

  private find(name: string): Managed {
    const m = this.managed.get(name);
    if (!m) throw new HttpError(404, `no export "${name}" on node ${this.identity.nodeId}`);
    return m;
  }

  /** Moves export `name` from this node (its owner) to the node whose control API is at `to`. */
  async migrate(name: string, to: string, beforeRelease?: () => Promise<void>, privateCopy = false): Promise<{ export: string; from: string; to: string; epoch: number; ms: number; held: number }> {
    const m = this.find(name);
    if (m.epoch === null || m.redirector.state !== "LOCAL") throw new HttpError(409, `${name} is not owned here (state ${m.redirector.state}); migrate it on its owner`);
    const peer = await getStatus(to).catch((err: Error) => {
      throw new HttpError(502, `peer ${to} unreachable: ${err.message}`);
    });
    if (!beforeRelease && !peer.exports.some((e) => e.name === name)) throw new HttpError(409, `peer ${peer.nodeId} does not serve "${name}"`);
    const t0 = performance.now();
    const myEpoch = m.epoch;
    let handed = 0;
    const { held } = await m.redirector.moveOut({
      beforeRelease,
      prepare: async () => {
        const p = new RemotePort({ exportName: name, first: parseHostPort(peer.nbd), locate: () => this.locateOwner(m.lease), log: this.opts.log.child({ export: name }), tls: this.opts.peerTls });
        await p.open();
        return p;
      },
      assign: async () => {
        handed = m.lease.handOver(this.identity, myEpoch, { nodeId: peer.nodeId, nbd: peer.nbd, control: peer.control }, this.ttlMs, privateCopy).epoch;
        m.epoch = null;
        await controlCall(to, "POST", `v1/exports/${encodeURIComponent(name)}/adopt`, { epoch: handed }, 10_000);
      },
      reclaim: async () => {
        m.epoch = m.lease.reclaim(this.identity, peer.nodeId, handed || myEpoch + 1, this.ttlMs).epoch;
      },
    });
    const ms = performance.now() - t0;
    this.opts.log.info({ export: name, to: peer.nodeId, epoch: handed, ms: Math.round(ms) }, "export moved");
    return { export: name, from: this.identity.nodeId, to: peer.nodeId, epoch: handed, ms, held };
  }

  /** Takes ownership of `name` after its owner handed the lease to this node at `epoch`. */
  async adopt(name: string, epoch: number): Promise<void> {
    const m = this.find(name);
    if (m.target) {
      // The end of a live copy into this node: the image here is complete and becomes the one the
      // owner uses. Its lease record is this node's own (the image is not shared).
      const t = m.target;
      m.lease.assign(this.identity, epoch, this.ttlMs);
      m.target = null;
      m.private = true;
      await this.publisher?.remove(t.exp.name);
      await t.exp.close();
      t.restoreFault();
      fs.rmSync(t.marker, { force: true });
    }
    const r = m.lease.read();
    if (!r || r.owner !== this.identity.nodeId || r.epoch !== epoch)
      throw new HttpError(409, `lease of ${name} is ${r ? `${r.owner}@${r.epoch}` : "absent"}, not ${this.identity.nodeId}@${epoch}`);
    m.epoch = epoch;
    try {
      await m.redirector.adopt();
    } catch (err) {
      m.epoch = null;
      throw err;
    }
    m.lease.renew(this.identity, epoch);
    this.opts.log.info({ export: name, epoch }, "export adopted");
  }

  private publisher: ExportPublisher | null = null;

  /** Lets the node add exports to the NBD server at run time (live-copy destinations). */
  setPublisher(p: ExportPublisher): void {
    this.publisher = p;
  }

  /**
   * Destination side of a live copy: an image for export `name` — the one this node serves
   * already (as a non-owner, same size), or a new one in --data-dir — marked incomplete until the
   * copy hands over, and an export only the source knows the name of, that it writes into.
   * Clients of this node reach the export through port B (the source owns it) meanwhile.
   */
  async createCopyTarget(name: string, size: number, owner: NodeIdentity, epoch: number): Promise<{ target: string; nbd: string; fresh: boolean }> {
    if (!this.publisher) throw new HttpError(409, `node ${this.identity.nodeId} cannot publish exports`);
    let m = this.managed.get(name);
    let fresh = false;
    if (m) {
      if (m.epoch !== null || m.redirector.state !== "REMOTE") throw new HttpError(409, `${name} is owned here (${m.redirector.state}); it cannot be a copy target`);
      if (m.exp.size() !== size) throw new HttpError(409, `${name} here is ${m.exp.size()} bytes, the source's is ${size}`);
      if (m.target) await this.abandonCopyTarget(name);
      m.lease.assign(owner, epoch, this.ttlMs);
    } else {
      if (!this.opts.dataDir) throw new HttpError(409, `node ${this.identity.nodeId} has no --data-dir to create "${name}" in`);
      const image = path.join(this.opts.dataDir, `${encodeURIComponent(name)}.img`);
      if (fs.existsSync(image)) {
        if (fs.statSync(image).size !== size) throw new HttpError(409, `${image} exists with another size (${fs.statSync(image).size}, not ${size})`);
      } else {
        fs.writeFileSync(image, "");
        fs.truncateSync(image, size);
        fresh = true;
      }
      this.ownershipOf(image).assign(owner, epoch, this.ttlMs);
      // Its own fault layer (with --fault) above port A, as for exports served from the start.
      const exp = this.createExport({ name, source: image, io: this.opts.io, fault: this.opts.fault }, this.opts.handles);
      m = this.managed.get(name)!;
      await this.publisher.add(exp);
    }
    const marker = `${m.image}.incomplete`;
    fs.writeFileSync(marker, `live copy from ${owner.nodeId} in progress since ${new Date().toISOString()}\n`);
    const targetName = newCopyTargetName(name);
    let port: Layer = createFilePort({ path: m.image, io: this.opts.io });
    let restoreFault = () => {};
    const faults = this.opts.handles?.faults;
    if (this.opts.fault && faults) {
      // While the copy runs, `fault NAME` steers the layer above the copy's writes (to slow or
      // break the link); once the target closes, the name leads back to the export's own layer
      // (above port A), which takes the target's rules over.
      const f = new FaultLayer(port, this.opts.fault);
      const own = faults.get(name);
      if (own) f.inherit(own);
      faults.set(name, f);
      restoreFault = () => {
        if (faults.get(name) !== f) return;
        if (!own) return void faults.delete(name);
        own.inherit(f);
        faults.set(name, own);
      };
      port = f;
    }
    const exp = new Export(targetName, createDiskLayer(port), `live-copy target of ${name}`);
    await this.publisher.add(exp);
    m.target = { exp, marker, restoreFault };
    m.private = true;
    this.opts.log.info({ export: name, from: owner.nodeId, image: m.image, fresh }, "live copy target ready");
    return { target: targetName, nbd: this.identity.nbd, fresh };
  }

  /** The source gave up a live copy into this node: the target export goes, the image stays marked incomplete. */
  async abandonCopyTarget(name: string): Promise<void> {
    const m = this.find(name);
    const t = m.target;
    if (!t) return;
    m.target = null;
    await this.publisher?.remove(t.exp.name);
    await t.exp.close();
    t.restoreFault();
    this.opts.log.warn({ export: name, marker: t.marker }, "live copy abandoned: image left incomplete");
  }

  /**
   * Moves export `name` to a node that does not share its storage: the destination gets an image
   * of its own, a live copy brings it up to date while clients keep writing, and the port
   * redirector hands over as for shared storage, with the final copy made while requests are held.
   */
  async migrateCopy(name: string, to: string, o: CopyMigrateOptions): Promise<{ export: string; from: string; to: string; epoch: number; ms: number; held: number; copied: number; mode: CopyMode }> {
    const m = this.find(name);
    if (m.epoch === null || m.redirector.state !== "LOCAL") throw new HttpError(409, `${name} is not owned here (state ${m.redirector.state}); migrate it on its owner`);
    if (m.copy && ["starting", "copying", "final"].includes(m.copy.progress().phase)) throw new HttpError(409, `${name}: a live copy is running already`);
    const peer = await getStatus(to).catch((err: Error) => {
      throw new HttpError(502, `peer ${to} unreachable: ${err.message}`);
    });
    const t0 = performance.now();
    const log = this.opts.log.child({ export: name, to: peer.nodeId });
    const skip = o.skipFree ? await this.freeSpace(m) : undefined;
    const t = await controlCall<{ target: string; nbd: string; fresh: boolean }>(to, "POST", "v1/copy-targets", { name, size: m.exp.size(), owner: this.identity, epoch: m.epoch }).catch((err: Error) => {
      throw new HttpError(502, `peer ${peer.nodeId} cannot receive ${name}: ${err.message}`);
    });
    const abandon = () => controlCall(to, "POST", `v1/copy-targets/${encodeURIComponent(name)}/abandon`, {}).catch(() => undefined);
    let client: NbdClient;
    try {
      client = await NbdClient.connect(parseHostPort(t.nbd), { exportName: t.target, tls: this.opts.peerTls });
    } catch (err) {
      await abandon();
      throw new HttpError(502, `cannot reach ${peer.nodeId}'s copy target: ${(err as Error).message}`);
    }
    const target: CopyTarget = {
      pwrite: (buf, offset) => client.pwrite(buf, offset),
      zero: (length, offset) => client.zero(length, offset),
      flush: () => client.flush(),
    };
    // Copies read the image below the tracker, so they are not tracked as writes themselves.
    const copy = new LiveCopy(m.tracker, m.tracker.below(), target, { mode: o.mode, skip, destIsZero: t.fresh, maxRate: o.maxRate, log });
    m.copy = copy;
    log.info({ mode: o.mode ?? "background", fresh: t.fresh, skipFree: !!skip }, "live copy: mirror phase");
    try {
      await copy.converge();
      const r = await this.migrate(name, to, () => copy.finish(), true);
      m.private = true;
      const p = copy.progress();
      log.info({ copied: p.copied, passes: p.passes, mode: p.mode, ms: Math.round(performance.now() - t0) }, "live copy: done");
      return { ...r, ms: performance.now() - t0, copied: p.copied, mode: p.mode };
    } catch (err) {
      log.warn({ err: (err as Error).message }, "live copy aborted: this node stays the owner");
      await abandon();
      throw err instanceof HttpError ? err : new HttpError(502, `live copy of ${name} aborted: ${(err as Error).message}`);
    } finally {
      m.tracker.stop();
      client.destroy();
    }
  }

  /** Free space of the file system on an image (for --skip-free); nothing when none is found. */
  private async freeSpace(m: Managed): Promise<Array<{ offset: number; length: number }>> {
    return freeRanges(m.tracker.below());
  }

  async close(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    for (const m of this.managed.values()) if (m.epoch !== null) m.lease.release(this.identity, m.epoch);
  }
}
