import { DirtyTracker } from "../stack/port/dirty-tracker.js";
import type { CopyMode } from "../migration/live-copy.js";
import { controlCall, getStatus, type ExportStatus, type NodeStatus } from "../control/control-client.js";
import { HttpError } from "../control/control-server.js";
import { DEFAULT_TTL_MS, LeaseError, LeaseFile, type NodeIdentity } from "../migration/lease.js";
import type { Ownership } from "../migration/ownership.js";
import { Export } from "../stack/export.js";
import { createDiskLayer } from "../stack/disk/disk-layer.js";
import { buildLayer, faultAbovePort, stackOf, StackHandles, type ExportSpec } from "../stack/compose.js";
import { createFilePort } from "../stack/port/file-port.js";
import { PortRedirector } from "../stack/port/redirector.js";
import { FenceLayer } from "../stack/port/fence-layer.js";
import { PortSlot } from "../stack/port/port-slot.js";
import type { Layer } from "../stack/layer.js";
import { RemotePort, ownerIsHere } from "../stack/port/remote-port.js";
import { migrateByCopy } from "./copy-source.js";
import { abandonCopyTarget, completeCopyTarget, createCopyTarget } from "./copy-target.js";
import { parseHostPort, type CopyMigrateOptions, type ExportPublisher, type Managed, type MoveResult, type NodeContext, type StorageNodeOptions } from "./node-context.js";

export type { CopyMigrateOptions, ExportPublisher, StorageNodeOptions } from "./node-context.js";

/** Share of the lease time after a renewal during which port A writes without checking the record. */
const FRESH = 0.8;

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
    if (faultAbovePort(spec)) {
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
  async migrate(name: string, to: string, beforeRelease?: () => Promise<void>, privateCopy = false): Promise<MoveResult> {
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
    await completeCopyTarget(this.context, m, epoch);
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

  /** Destination side of a live copy: see copy-target.ts. */
  createCopyTarget(name: string, size: number, owner: NodeIdentity, epoch: number): Promise<{ target: string; nbd: string; fresh: boolean }> {
    return createCopyTarget(this.context, name, size, owner, epoch);
  }

  /** The source gave up a live copy into this node: see copy-target.ts. */
  abandonCopyTarget(name: string): Promise<void> {
    return abandonCopyTarget(this.context, name);
  }

  /** Moves export `name` to a node that does not share its storage: see copy-source.ts. */
  migrateCopy(name: string, to: string, o: CopyMigrateOptions): Promise<MoveResult & { copied: number; mode: CopyMode }> {
    return migrateByCopy(this.context, name, to, o);
  }

  /** What the live-copy roles see of this node. */
  // Getters: this initialiser runs before the constructor sets the node's fields.
  private readonly context: NodeContext = (() => {
    const node = this;
    return {
      get identity() {
        return node.identity;
      },
      get ttlMs() {
        return node.ttlMs;
      },
      get opts() {
        return node.opts;
      },
      get publisher() {
        return node.publisher;
      },
      find: (name) => node.find(name),
      lookup: (name) => node.managed.get(name),
      createExport: (spec, handles) => node.createExport(spec, handles),
      ownershipOf: (image) => node.ownershipOf(image),
      migrate: (name, to, beforeRelease, privateCopy) => node.migrate(name, to, beforeRelease, privateCopy),
    };
  })();

  async close(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    for (const m of this.managed.values()) if (m.epoch !== null) m.lease.release(this.identity, m.epoch);
  }
}
