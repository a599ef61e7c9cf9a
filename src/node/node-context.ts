import type { Logger } from "pino";
import type { LiveCopy, CopyMode } from "../migration/live-copy.js";
import type { ClusterStatus } from "../control/control-client.js";
import type { DirtyTracker } from "../stack/port/dirty-tracker.js";
import type { LeaseRecord, NodeIdentity } from "../migration/lease.js";
import type { Ownership } from "../migration/ownership.js";
import type { Export } from "../stack/export.js";
import type { ExportSpec, StackHandles } from "../stack/compose.js";
import type { FaultLayerOptions } from "../stack/fault/fault-layer.js";
import type { IoMode } from "../stack/port/file-port.js";
import type { PortPair } from "../stack/port/port-pair.js";
import type { PortRedirector } from "../stack/port/redirector.js";
import type { RemotePortOptions } from "../stack/port/remote-port.js";
import type { WriteAudit } from "../stack/port/write-audit.js";

/** What a node knows of one of its exports. */
export interface Managed {
  name: string;
  image: string;
  lease: Ownership;
  /** The record as this node last read it (or had it pushed): for descriptions and status. */
  record: LeaseRecord | null;
  /** Stops the record's watch (a store that pushes changes), if any. */
  unwatch: (() => void) | null;
  /** When (performance.now()) this node learnt that the owner's lease ended, while nobody has taken over yet. */
  ownerGoneAt: number | null;
  /** Take-overs by this node and the time without an owner before each (see lease-keeper's takeOverIfExpired). */
  takeovers: { count: number; lastOwnerlessMs: number; totalOwnerlessMs: number };
  /** Port A / port B of the export (see port-pair.ts); `redirector` and `tracker` are its. */
  pair: PortPair;
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
  /** The epoch this node is adopting right now (see hand-over.ts), or null. */
  adopting: number | null;
  /** Epochs up to this one were taken back by their owner: never adopt them (0: none). */
  refused: number;
  /**
   * A hand-over to this node whose adopt call has not come: its epoch, and when this node first
   * saw it (performance.now()). Adopted without the call only ORPHAN_GRACE_MS later (lease-keeper.ts).
   */
  handedSeen: { epoch: number; at: number } | null;
  /** Set while this node is the destination of a live copy: the export the source writes into. */
  target: { exp: Export; marker: string } | null;
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

export interface StorageNodeOptions {
  nodeId: string;
  /** NBD address peers use to reach this node (host:port). */
  nbd: string;
  log: Logger;
  ttlMs?: number;
  /** With --fault: the export a live copy writes into gets a fault layer too (steered by the export's name), to slow or break the link. */
  fault?: FaultLayerOptions;
  handles?: StackHandles;
  /** The ownership record of export `name` on `image` (default: a lease file beside the image). */
  ownership?: (image: string, name: string) => Ownership;
  /** Directory where this node creates the images it receives by live copy (--data-dir). */
  dataDir?: string;
  io?: IoMode;
  /** How long an owner waits for a peer's answer to adopt before it takes the hand-over back (default 10 s). */
  adoptTimeoutMs?: number;
  /** With etcd: the whole cluster's view, for status. */
  cluster?: () => Promise<ClusterStatus>;
  /** TLS of port B connections to peers (this node's own TLS credentials), if configured. */
  peerTls?: RemotePortOptions["tls"];
  /** Every write-type request that reaches an image is recorded here (serve --write-audit). */
  audit?: WriteAudit;
}

export interface MoveResult {
  export: string;
  from: string;
  to: string;
  epoch: number;
  ms: number;
  held: number;
}

/** The parts of a node that its live-copy roles (copy-source.ts, copy-target.ts) use. */
export interface NodeContext {
  readonly identity: NodeIdentity;
  readonly ttlMs: number;
  /** See StorageNodeOptions.adoptTimeoutMs. */
  readonly adoptTimeoutMs: number;
  readonly opts: StorageNodeOptions;
  readonly publisher: ExportPublisher | null;
  /** The node runs its renewal loop (started, not closed): scheduled checks run only then. */
  readonly running: boolean;
  /** The export `name`, or a 404. */
  find(name: string): Managed;
  lookup(name: string): Managed | undefined;
  createExport(spec: ExportSpec & { name: string }, handles?: StackHandles): Promise<Export>;
  ownershipOf(image: string, name: string): Ownership;
  /** The port redirector's hand-over to the node at `to` (see StorageNode.migrate). */
  migrate(name: string, to: string, beforeRelease?: () => Promise<void>, privateCopy?: boolean): Promise<MoveResult>;
}

export function parseHostPort(s: string): { host: string; port: number } {
  const i = s.lastIndexOf(":");
  return { host: s.slice(0, i).replace(/^\[|\]$/g, ""), port: Number(s.slice(i + 1)) };
}
