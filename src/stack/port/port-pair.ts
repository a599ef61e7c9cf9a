import type { Logger } from "pino";
import type { Capabilities, Layer } from "../layer.js";
import { DirtyTracker } from "./dirty-tracker.js";
import { FenceLayer } from "./fence-layer.js";
import { PortRedirector } from "./redirector.js";
import { RemotePort, type OwnerAddress, type RemotePortOptions } from "./remote-port.js";
import type { AuditedOp } from "./write-audit.js";

/**
 * What a cluster node tells the stack builder about one export's resource: whether it owns it as
 * the stack opens, whether port A may write now (epoch fencing), and where the owner is.
 */
export interface PortPairOwner {
  /** This node owns the resource when the stack opens (port A first; otherwise port B). */
  owned: boolean;
  /** Asked before every request through port A (and again after each write): false fences it; a promise makes it wait (see FenceLayer). */
  mayWrite(): boolean | Promise<boolean>;
  /**
   * Asked before every write that reaches the image itself, below the layers that hold writes
   * back (a power-loss cache, a cow overlay's map), so a deposed owner's late write-back never
   * lands. Default: mayWrite; a node also lets a live copy into it write here.
   */
  mayWriteImage?(): boolean | Promise<boolean>;
  /**
   * Told of every write, zero, trim and flush that passed the image-level fence, right before it
   * goes to the image (serve --write-audit); a flush has offset and length 0.
   */
  auditWrite?(op: AuditedOp, offset: number, length: number): void;
  /** The current owner's NBD address (port B connects there, and again on every reconnect), and who it is. */
  locate(): OwnerAddress | Promise<OwnerAddress>;
  /** Whether this node still owns the resource (an adopting node checks before its own writes). */
  stillOwner(): boolean | Promise<boolean>;
  /** TLS of port B towards peers. */
  tls?: RemotePortOptions["tls"];
  /** Port B gives up a link whose requests get no reply for this long (see RemotePortOptions). */
  requestTimeoutMs?: number;
  /** Appended to the export's description (`[owner=… epoch=…]`). */
  label?(): string;
  /** The epoch at which this node owns (or adopts) the resource now; null when it does not. */
  epoch?(): number | null;
}

/** The parts of a node's port pair that the node steers. */
export interface PortPair {
  redirector: PortRedirector;
  /** Above port A: records writes while a live copy runs. */
  tracker: DirtyTracker;
  /**
   * The resource itself: the image in its slot with the fault layers declared on it, below the
   * tracker and the fence. A live copy into this node writes here while port A is closed.
   */
  resource: Layer;
  /** Opens port B to `first` (a peer about to become the owner), later wherever the owner is. */
  openRemote(first?: OwnerAddress): Promise<Layer>;
  /**
   * The record now names `owner` (node@epoch), as a store that pushes changes told: port B,
   * if its link reaches someone else, gives that link up and links to the owner now, rather than
   * when a request next fails there.
   */
  ownerChanged(owner: string, handedFrom?: string[]): void;
  /** An owner announced a move to node `node` at `to` (MoveNotice): port B links to it ahead (RemotePort.warm). */
  moveAnnounced(to: OwnerAddress & { node: string }): void;
}

/**
 * Port A / port B of a node's export (MISSION.md, "The mechanism"): `resource` (the image in a
 * PortSlot, so the layers on it outlive hand-overs) → dirty tracker → fence → redirector, whose
 * port B is an NBD connection to the owner. `offline` gives size and abilities when no owner can
 * be reached yet. Built by the stack builder (compose.ts), never by hand.
 */
export function buildPortPair(exportName: string, resource: Layer, offline: () => Promise<{ size: number; caps: Capabilities }>, owner: PortPairOwner, log: Logger): PortPair {
  const tracker = new DirtyTracker(resource);
  const portA: Layer = new FenceLayer(tracker, () => owner.mayWrite());
  let latest: RemotePort | null = null;
  const openRemote = async (first?: OwnerAddress): Promise<Layer> => {
    // A replaced link may have taken acknowledged, unflushed writes with it: the redirector tells
    // their clients; one replaced by a link to the owner it handed over to made them durable.
    const onNewLink = () => redirector.ownerLost();
    const onHandedOver = () => redirector.ownerHandedOver();
    const p = new RemotePort({ exportName, first, locate: () => owner.locate(), log, tls: owner.tls, offline: first ? undefined : offline, onNewLink, onHandedOver, requestTimeoutMs: owner.requestTimeoutMs });
    latest = p;
    await p.open();
    return p;
  };
  const ownerChanged = (to: string, handedFrom?: string[]): void => {
    if (redirector.state === "REMOTE" && latest && latest.owner !== undefined && latest.owner !== to) latest.relink(`the record names ${to} now`, { owner: to, handedFrom });
  };
  const moveAnnounced = (to: OwnerAddress & { node: string }): void => {
    if (redirector.state === "REMOTE") latest?.warm(to);
  };
  const redirector = new PortRedirector(
    exportName,
    {
      openLocal: async () => {
        await portA.open();
        return portA;
      },
      openRemote: () => openRemote(),
      stillOwner: () => owner.stillOwner(),
      ...(owner.epoch ? { epoch: () => owner.epoch!() } : {}),
    },
    owner.owned,
    log,
  );
  return { redirector, tracker, resource, openRemote, ownerChanged, moveAnnounced };
}
