import type { CopyMode } from "../migration/live-copy.js";
import type { ExportStatus, NodeStatus } from "../control/control-client.js";
import { HttpError } from "../control/control-server.js";
import { DEFAULT_TTL_MS, LeaseError, LeaseFile, type NodeIdentity } from "../migration/lease.js";
import type { Ownership } from "../migration/ownership.js";
import type { Export } from "../stack/export.js";
import { composeNodeExport, stackOf, StackHandles, type ExportSpec } from "../stack/compose.js";
import type { PortRedirector } from "../stack/port/redirector.js";
import { migrateByCopy } from "./copy-source.js";
import { abandonCopyTarget, createCopyTarget, type FileIdentity } from "./copy-target.js";
import { adopt, moveOut, refuse } from "./hand-over.js";
import { locateOwner, mayWrite, renew, renewAll } from "./lease-keeper.js";
import type { CopyMigrateOptions, ExportPublisher, Managed, MoveResult, NodeContext, StorageNodeOptions } from "./node-context.js";

export type { CopyMigrateOptions, ExportPublisher, StorageNodeOptions } from "./node-context.js";

/**
 * A node of a cluster: serves file exports whose stack has a port redirector, owns images through
 * lease records beside them, and moves exports to and from peers through its control API. Its
 * roles live beside it: lease-keeper.ts (renew, fence, take over), hand-over.ts (moves with
 * shared storage), copy-source.ts and copy-target.ts (live copies).
 */
export class StorageNode {
  readonly identity: NodeIdentity;
  private readonly managed = new Map<string, Managed>();
  private readonly ttlMs: number;
  private timer: NodeJS.Timeout | null = null;
  private publisher: ExportPublisher | null = null;

  constructor(private readonly opts: StorageNodeOptions) {
    this.identity = { nodeId: opts.nodeId, nbd: opts.nbd, control: "" };
    this.ttlMs = opts.ttlMs ?? DEFAULT_TTL_MS;
  }

  /**
   * The export for one image: its declared stack built over the node's port pair, port A the
   * image and port B its owner. Takes the lease if it is free; otherwise the export starts as REMOTE.
   */
  createExport(spec: ExportSpec & { name: string }, handles: StackHandles = new StackHandles()): Export {
    // The image at the bottom of the stack is the resource that moves: port A opens it, port B
    // reaches whoever owns it.
    const bottom = stackOf(spec)[0]!;
    if (bottom.kind !== "file") throw new Error(`${spec.name}: a node's exports must sit on an image file (shared with peers), not ${bottom.kind}`);
    const lease = this.ownershipOf(bottom.path);
    let epoch: number | null = null;
    try {
      epoch = lease.acquire(this.identity, this.ttlMs).epoch;
    } catch (err) {
      // Owned by another node; or the record cannot be written now (a full disk, a lock held by a
      // stopped process): serve through port B meanwhile — the renewal loop takes the image over
      // once its lease is free.
      if (err instanceof LeaseError) this.opts.log.info({ export: spec.name, owner: err.current?.owner }, "image owned by another node: serving through port B");
      else this.opts.log.warn({ export: spec.name, err: (err as Error).message }, "cannot take the lease now: serving through port B until it can");
    }
    let m!: Managed; // set below, before the export opens and these hooks run
    const { exp, pair } = composeNodeExport(spec, handles, this.opts.log, {
      owned: epoch !== null,
      mayWrite: () => mayWrite(this.context, m),
      // A live copy into this node writes the image while another node owns the export.
      mayWriteImage: () => m.target !== null || mayWrite(this.context, m),
      locate: () => locateOwner(this.context, lease),
      stillOwner: () => {
        const r = lease.read();
        return r?.owner === this.identity.nodeId && r.epoch === m.epoch;
      },
      tls: this.opts.peerTls,
      // An owner that answers nothing for three lease times is stopped or cut off: port B finds the owner again.
      requestTimeoutMs: Math.max(5000, 3 * this.ttlMs),
      label: () => {
        const r = lease.read();
        return `[owner=${r?.owner ?? "?"} epoch=${r?.epoch ?? "?"}]`;
      },
    });
    m = { name: spec.name, image: bottom.path, lease, epoch, validUntil: 0, private: !!lease.read()?.private, copy: null, target: null, adopting: null, refused: 0, exp, pair, redirector: pair.redirector, tracker: pair.tracker };
    this.managed.set(spec.name, m);
    return exp;
  }

  private ownershipOf(image: string): Ownership {
    return this.opts.ownership ? this.opts.ownership(image) : new LeaseFile(image);
  }

  /**
   * Stops the live copy of `name` that this node runs as its source — in the final copy too (the
   * move then rolls back: the held requests drain through port A); 409 if none is running.
   */
  cancelCopy(name: string): void {
    const m = this.find(name);
    const phase = m.copy?.progress().phase;
    if (!m.copy || (phase !== "copying" && phase !== "starting" && phase !== "final")) throw new HttpError(409, `${name}: no live copy to cancel`);
    m.copy.cancel("cancelled by request");
  }

  /** Starts lease renewal once the control API listens at `controlUrl`. */
  start(controlUrl: string): void {
    this.identity.control = controlUrl;
    // Record the addresses peers need (the NBD port may only now be known).
    for (const m of this.managed.values()) if (m.epoch !== null) renew(this.context, m, m.epoch);
    this.timer = setInterval(() => renewAll(this.context, this.managed.values()), Math.max(100, this.ttlMs / 3));
    this.timer.unref();
  }

  setNbdAddress(nbd: string): void {
    this.identity.nbd = nbd;
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

  /** Moves export `name` from this node (its owner) to the node whose control API is at `to`: see hand-over.ts. */
  migrate(name: string, to: string): Promise<MoveResult> {
    return moveOut(this.context, name, to);
  }

  /** Takes ownership of `name` after its owner handed the lease to this node at `epoch`: see hand-over.ts. */
  adopt(name: string, epoch: number, handedFrom?: string[]): Promise<void> {
    return adopt(this.context, name, epoch, handedFrom);
  }

  /** Lets the node add exports to the NBD server at run time (live-copy destinations). */
  setPublisher(p: ExportPublisher): void {
    this.publisher = p;
  }

  /** Destination side of a live copy: see copy-target.ts. */
  createCopyTarget(name: string, size: number, owner: NodeIdentity, epoch: number, sourceImage?: FileIdentity, handedFrom?: string[]): Promise<{ target: string; nbd: string; fresh: boolean }> {
    return createCopyTarget(this.context, name, size, owner, epoch, sourceImage, handedFrom);
  }

  /**
   * The source gave up a live copy into this node (see copy-target.ts); with `epoch`, after handing
   * it over at that epoch: 409 if this node adopted it already (see hand-over.ts).
   */
  abandonCopyTarget(name: string, epoch?: number): Promise<void> {
    if (epoch !== undefined) refuse(this.context, name, epoch);
    return abandonCopyTarget(this.context, name);
  }

  /** Moves export `name` to a node that does not share its storage: see copy-source.ts. */
  migrateCopy(name: string, to: string, o: CopyMigrateOptions): Promise<MoveResult & { copied: number; mode: CopyMode }> {
    return migrateByCopy(this.context, name, to, o);
  }

  /** What the node's roles see of it. */
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
      get adoptTimeoutMs() {
        return node.opts.adoptTimeoutMs ?? 10_000;
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
      migrate: (name, to, beforeRelease, privateCopy) => moveOut(node.context, name, to, beforeRelease, privateCopy),
    };
  })();

  async close(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    for (const m of this.managed.values()) if (m.epoch !== null) m.lease.release(this.identity, m.epoch);
  }
}
