import type { CopyMode } from "../migration/live-copy.js";
import type { ExportStatus, NodeStatus } from "../control/control-client.js";
import { HttpError } from "../control/control-server.js";
import { DEFAULT_TTL_MS, LeaseError, type LeaseRecord, type NodeIdentity } from "../migration/lease.js";
import { FileOwnership } from "../migration/file-ownership.js";
import type { HandedView, Ownership } from "../migration/ownership.js";
import type { Export } from "../stack/export.js";
import { loadKinds, stackOf, StackHandles, type ExportSpec } from "../stack/compose.js";
import { composeNodeExport } from "../stack/compose-node.js";
import type { PortRedirector } from "../stack/port/redirector.js";
import { migrateByCopy } from "./copy-source.js";
import { abandonCopyTarget, createCopyTarget, type FileIdentity } from "./copy-target.js";
import { adopt, moveOut, refuse } from "./hand-over.js";
import { checkNow, fenceLost, locateOwner, mayWrite, noteRecord, renew, renewAll, sawHandOver } from "./lease-keeper.js";
import { followerLabel, ownerLabel } from "../stack/port/remote-port.js";
import { parseHostPort, type CopyMigrateOptions, type ExportPublisher, type Managed, type MoveResult, type NodeContext, type StorageNodeOptions } from "./node-context.js";

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
  async createExport(spec: ExportSpec & { name: string }, handles: StackHandles = new StackHandles()): Promise<Export> {
    // The image at the bottom of the stack is the resource that moves: port A opens it, port B
    // reaches whoever owns it. A raw file or a qcow2 image (its backing chain is only read, by
    // the owner); a live copy sends the guest-visible data, never the file.
    const stack = stackOf(spec);
    const bottom = stack[0]!;
    if (bottom.kind !== "file" && bottom.kind !== "qcow2") throw new Error(`${spec.name}: a node's exports must sit on an image file (raw or qcow2, shared with peers), not ${bottom.kind}`);
    await loadKinds(stack); // before the lease: from here on the export is built without a pause
    const lease = this.ownershipOf(bottom.path, spec.name);
    let epoch: number | null = null;
    let record: LeaseRecord | null = null;
    try {
      record = await lease.acquire(this.identity, this.ttlMs);
      epoch = record.epoch;
    } catch (err) {
      if (err instanceof LeaseError) record = err.current;
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
      locate: () => locateOwner(this.context, m),
      ...(this.opts.audit ? { auditWrite: (op, offset, length) => this.opts.audit!.record({ node: this.identity.nodeId, export: spec.name, epoch: m.epoch, op, offset, length }) } : {}),
      // A lease this process renewed lately answers at once, as it does for every write at port A
      // (mayWrite): a claimed lease is never taken back before it ends. Past that the record
      // decides, asked again until it answers (the adoption waits meanwhile; it never guesses).
      stillOwner: async () => {
        if (m.epoch !== null && performance.now() < m.validUntil) return true;
        for (let delay = 10; ; delay = Math.min(delay * 2, 500)) {
          try {
            const r = await lease.read();
            noteRecord(m, r);
            return r?.owner === this.identity.nodeId && r.epoch === m.epoch;
          } catch (err) {
            this.opts.log.warn({ export: spec.name, err: (err as Error).message }, "lease record unreadable before adopting: asking again");
            await new Promise((res) => setTimeout(res, delay));
          }
        }
      },
      tls: this.opts.peerTls,
      // An owner that answers nothing for three lease times is stopped or cut off: port B finds the owner again.
      requestTimeoutMs: Math.max(5000, 3 * this.ttlMs),
      epoch: () => m.epoch ?? m.adopting,
      // The owner names itself (port B of its peers reads it: see ownerLabel); others name the record's owner.
      label: () => {
        if (m.epoch !== null) return ownerLabel(this.identity.nodeId, m.epoch, m.record?.owner === this.identity.nodeId && m.record.epoch === m.epoch ? m.record.handedFrom : undefined);
        return followerLabel(m.record?.owner, m.record?.epoch, m.record?.nbd);
      },
    });
    m = { name: spec.name, image: bottom.path, lease, record, unwatch: null, ownerGoneAt: null, takeovers: { count: 0, lastOwnerlessMs: 0, totalOwnerlessMs: 0 }, epoch, validUntil: 0, private: !!record?.private, copy: null, target: null, adopting: null, refused: 0, handedSeen: null, exp, pair, redirector: pair.redirector, tracker: pair.tracker };
    this.managed.set(spec.name, m);
    // A store that pushes changes (etcd): port B follows a new owner at once, and a node that may
    // take the export checks at once when its owner's lease ended, after ORPHAN_GRACE_MS when the
    // export was handed to it (the adopt call normally comes first).
    m.unwatch = lease.watch((r, ownerGone) => {
      noteRecord(m, r);
      if (ownerGone && m.ownerGoneAt === null) m.ownerGoneAt = performance.now();
      else if (!ownerGone) m.ownerGoneAt = null; // a new record: someone owns it (or released it) now
      if (!r || m.epoch !== null) return;
      m.pair.ownerChanged(`${r.owner}@${r.epoch}`, r.handedFrom);
      // A hand-over to this node: its source's adopt call is on its way (and claims in one
      // transaction); checking now would only race it. Checked after the grace instead.
      if (!ownerGone && r.owner === this.identity.nodeId && r.holder === undefined && r.leaseStart !== 0 && !r.private) sawHandOver(this.context, m, r.epoch);
      else if (this.timer) void checkNow(this.context, m);
    }, (n) => {
      // The owner starts a move to another node: port B links to it now, not once the record names it.
      if (m.epoch !== null || n.to === this.identity.nodeId || !m.record || `${m.record.owner}@${m.record.epoch}` !== n.from) return;
      const at = parseHostPort(n.nbd);
      if (Number.isInteger(at.port) && at.port > 0) m.pair.moveAnnounced({ ...at, node: n.to });
    });
    return exp;
  }

  private ownershipOf(image: string, name: string): Ownership {
    return this.opts.ownership ? this.opts.ownership(image, name) : FileOwnership.of(image);
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

  /**
   * This process's session with the ownership store ended (its etcd lease ran out: cut off from
   * etcd, or frozen): every lease it held is gone, known here without asking the store (which
   * may not answer for seconds), so every export it owned is fenced now, at its deadline.
   */
  storeLost(why: string): void {
    for (const m of this.managed.values()) fenceLost(this.context, m, why);
  }

  /** Starts lease renewal once the control API listens at `controlUrl`. */
  async start(controlUrl: string): Promise<void> {
    this.identity.control = controlUrl;
    // Record the addresses peers need (the NBD port may only now be known).
    for (const m of this.managed.values()) if (m.epoch !== null) await renew(this.context, m, m.epoch);
    // One tick at a time: a slow store (a frozen etcd member) must not pile renewals up.
    const tick = () => {
      this.timer = setTimeout(() => {
        void renewAll(this.context, this.managed.values()).finally(() => {
          if (this.timer) tick();
        });
      }, Math.max(100, this.ttlMs / 3));
      this.timer.unref();
    };
    tick();
  }

  setNbdAddress(nbd: string): void {
    this.identity.nbd = nbd;
  }

  /** Redirector state of every export, and its take-overs by this node, for metrics. */
  redirectors(): Array<{ name: string; stats: ReturnType<PortRedirector["stats"]>; takeovers: Managed["takeovers"] }> {
    return [...this.managed.values()].map((m) => ({ name: m.name, stats: m.redirector.stats(), takeovers: m.takeovers }));
  }

  /** What the node serves, with each export's record read afresh (one that cannot be read now shows as last seen). */
  async status(): Promise<NodeStatus> {
    const [, cluster] = await Promise.all([
      Promise.all(
        [...this.managed.values()].map(async (m) => {
          noteRecord(m, await m.lease.read().catch(() => undefined));
        }),
      ),
      this.opts.cluster?.().catch((err: Error) => ({ error: err.message })),
    ]);
    return { ...this.statusNow(), ...(cluster ? { cluster } : {}) };
  }

  /** status() with each record as last seen, without reading it. */
  statusNow(): NodeStatus {
    const exports: ExportStatus[] = [...this.managed.values()].map((m) => {
      const r = m.record;
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
  adopt(name: string, epoch: number, handedFrom?: string[], from?: HandedView): Promise<void> {
    return adopt(this.context, name, epoch, handedFrom, from);
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
      get running() {
        return node.timer !== null;
      },
      find: (name) => node.find(name),
      lookup: (name) => node.managed.get(name),
      createExport: (spec, handles) => node.createExport(spec, handles),
      ownershipOf: (image, name) => node.ownershipOf(image, name),
      migrate: (name, to, beforeRelease, privateCopy) => moveOut(node.context, name, to, beforeRelease, privateCopy),
    };
  })();

  async close(): Promise<void> {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    for (const m of this.managed.values()) {
      m.unwatch?.();
      if (m.epoch !== null) await m.lease.release(this.identity, m.epoch).catch((err: Error) => this.opts.log.warn({ export: m.name, err: err.message }, "releasing the lease failed"));
    }
  }
}
