import type { Logger } from "pino";
import { controlCall, getStatus, type ExportStatus, type NodeStatus } from "../control/control-client.js";
import { ControlServer, HttpError } from "../control/control-server.js";
import { DEFAULT_TTL_MS, LeaseError, LeaseFile, type NodeIdentity } from "../migration/lease.js";
import { Export } from "../server/export.js";
import { createDiskLayer } from "../stack/disk/disk-layer.js";
import { buildLayer, stackOf, StackHandles, type ExportSpec } from "../stack/compose.js";
import { createFilePort } from "../stack/port/file-port.js";
import { PortRedirector } from "../stack/port/redirector.js";
import { PortSlot } from "../stack/port/port-slot.js";
import type { Layer } from "../stack/layer.js";
import { RemotePort, ownerIsHere, type RemotePortOptions } from "../stack/port/remote-port.js";

interface Managed {
  name: string;
  image: string;
  lease: LeaseFile;
  redirector: PortRedirector;
  exp: Export;
  /** The epoch of my lease, or null while another node owns the image. */
  epoch: number | null;
}

export interface StorageNodeOptions {
  nodeId: string;
  /** NBD address peers use to reach this node (host:port). */
  nbd: string;
  log: Logger;
  ttlMs?: number;
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
    const lease = new LeaseFile(image);
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
    let portA: Layer = slot;
    let rest = stack.slice(1);
    const ctx = { exportName: spec.name, readOnly: !!spec.readOnly, io: spec.io, log: this.opts.log, handles };
    if (!spec.stack && spec.fault) {
      // The --fault shorthand: directly above the image, below the redirector.
      portA = buildLayer(rest[0]!, slot, ctx);
      rest = rest.slice(1);
    }
    const redirector = new PortRedirector(
      spec.name,
      {
        openLocal: async () => {
          await portA.open();
          return portA;
        },
        openRemote: async () => {
          const p = new RemotePort({ exportName: spec.name, locate: () => this.locateOwner(lease), log, tls: this.opts.peerTls });
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
    const m: Managed = { name: spec.name, image, lease, redirector, exp: null as unknown as Export, epoch };
    let top: Layer = redirector;
    for (const l of rest) top = buildLayer(l, top, ctx);
    const exp: Export = new Export(spec.name, createDiskLayer(top, spec.disk), () => {
      const r = lease.read();
      return `${exp.layer.describe()} [owner=${r?.owner ?? "?"} epoch=${r?.epoch ?? "?"}]`;
    });
    m.exp = exp;
    this.managed.set(spec.name, m);
    return exp;
  }

  private locateOwner(lease: LeaseFile): { host: string; port: number } {
    const r = lease.read();
    if (!r) throw Object.assign(new Error(`no lease record in ${lease.file}`), { code: "ENOENT" });
    if (r.owner === this.identity.nodeId) throw ownerIsHere(`${lease.file} names this node (${r.owner}@${r.epoch}) as the owner`);
    return parseHostPort(r.nbd);
  }

  /** Adds the node's routes (status, migrate, adopt) to the control API. */
  attach(c: ControlServer): void {
    c.route("GET", "/v1/status", async () => ({ body: this.status() }));
    c.route("POST", "/v1/exports/:name/migrate", async (p, body) => {
      const to = (body as { to?: unknown })?.to;
      if (typeof to !== "string") throw new HttpError(400, 'body must be {"to": "http://HOST:PORT"}');
      return { body: await this.migrate(p.name!, to) };
    });
    c.route("POST", "/v1/exports/:name/adopt", async (p, body) => {
      const epoch = (body as { epoch?: unknown })?.epoch;
      if (typeof epoch !== "number") throw new HttpError(400, 'body must be {"epoch": N}');
      await this.adopt(p.name!, epoch);
      return { body: { adopted: p.name, epoch } };
    });
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
      if (m.epoch === null && m.redirector.state === "REMOTE") {
        this.takeOverIfExpired(m);
        continue;
      }
      if (m.epoch === null || (m.redirector.state !== "LOCAL" && m.redirector.state !== "ADOPTING")) continue;
      try {
        m.lease.renew(this.identity, m.epoch);
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
    const r = m.lease.read();
    if (!r || !m.lease.expired(r)) return;
    let epoch: number;
    try {
      epoch = m.lease.acquire(this.identity, this.ttlMs).epoch;
    } catch (err) {
      if (err instanceof LeaseError) return; // another node was quicker
      throw err;
    }
    this.opts.log.warn({ export: m.name, previous: r.owner, epoch }, "lease of the owner expired: taking the image over");
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
      return { name: m.name, image: m.image, owner: r?.owner ?? null, epoch: r?.epoch ?? null, size: m.exp.size(), ...m.redirector.stats() };
    });
    return { ...this.identity, exports };
  }

  private find(name: string): Managed {
    const m = this.managed.get(name);
    if (!m) throw new HttpError(404, `no export "${name}" on node ${this.identity.nodeId}`);
    return m;
  }

  /** Moves export `name` from this node (its owner) to the node whose control API is at `to`. */
  async migrate(name: string, to: string): Promise<{ export: string; from: string; to: string; epoch: number; ms: number; held: number }> {
    const m = this.find(name);
    if (m.epoch === null || m.redirector.state !== "LOCAL") throw new HttpError(409, `${name} is not owned here (state ${m.redirector.state}); migrate it on its owner`);
    const peer = await getStatus(to).catch((err: Error) => {
      throw new HttpError(502, `peer ${to} unreachable: ${err.message}`);
    });
    if (!peer.exports.some((e) => e.name === name)) throw new HttpError(409, `peer ${peer.nodeId} does not serve "${name}"`);
    const t0 = performance.now();
    const myEpoch = m.epoch;
    let handed = 0;
    const { held } = await m.redirector.moveOut({
      prepare: async () => {
        const p = new RemotePort({ exportName: name, first: parseHostPort(peer.nbd), locate: () => this.locateOwner(m.lease), log: this.opts.log.child({ export: name }), tls: this.opts.peerTls });
        await p.open();
        return p;
      },
      assign: async () => {
        handed = m.lease.handOver(this.identity, myEpoch, { nodeId: peer.nodeId, nbd: peer.nbd, control: peer.control }, this.ttlMs).epoch;
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
    // Test hook: widen the adopt phase so tests can kill this node in the middle of a hand-over.
    const delay = Number(process.env.NBDSTACK_TEST_ADOPT_DELAY_MS ?? 0);
    if (delay > 0) await new Promise((r) => setTimeout(r, delay));
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

  async close(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    for (const m of this.managed.values()) if (m.epoch !== null) m.lease.release(this.identity, m.epoch);
  }
}
