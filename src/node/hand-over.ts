import { ControlError, controlCall, getStatus } from "../control/control-client.js";
import { HttpError } from "../control/control-server.js";
import { LeaseError, type LeaseRecord, type NodeIdentity } from "../migration/lease.js";
import type { HandedView } from "../migration/ownership.js";
import { completeCopyTarget } from "./copy-target.js";
import { renew } from "./lease-keeper.js";
import { parseHostPort, type Managed, type MoveResult, type NodeContext } from "./node-context.js";

/*
 * A move (MISSION.md, "Sequence of a move"): the owner's redirector holds new requests, drains
 * and flushes port A, hands the lease to the peer and asks it to adopt; then forwards the held
 * requests through port B. The commit point is the peer's claim of the handed lease — its first
 * renewal of the shared record, or (a live copy, where each node keeps its own record) its answer
 * that it adopted. Before it, the owner takes the lease back and rolls back; after it, the owner
 * follows the peer, whatever the adopt call said (it may have timed out).
 */

/** Moves export `name` from this node (its owner) to the node whose control API is at `to`. */
export async function moveOut(node: NodeContext, name: string, to: string, beforeRelease?: () => Promise<void>, privateCopy = false): Promise<MoveResult> {
  const m = node.find(name);
  if (m.epoch === null || m.redirector.state !== "LOCAL") throw new HttpError(409, `${name} is not owned here (state ${m.redirector.state}); migrate it on its owner`);
  // One move at a time: a second one would hand over the epoch this node had when it was asked,
  // which the first move may have changed (a rollback takes the lease back at a new epoch).
  if (moving.has(m)) throw new HttpError(409, `${name}: a move is under way already; try again when it ended`);
  moving.add(m);
  try {
    return await moveOnce(node, m, to, beforeRelease, privateCopy);
  } finally {
    moving.delete(m);
  }
}

/** How long a move waits for its announcement (advice: a slow store must not delay the move). */
export const ANNOUNCE_MS = 500;

/** Announces the move to the store's watchers (Ownership.announceMove); never fails the move, nor waits past ANNOUNCE_MS. */
export function announce(node: NodeContext, m: Managed, epoch: number, to: NodeIdentity): Promise<void> | undefined {
  if (!m.lease.announceMove) return undefined;
  const said = m.lease.announceMove(node.identity, epoch, to).catch((err: Error) => node.opts.log.debug({ export: m.name, err: err.message }, "move: could not announce it"));
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([said, new Promise<void>((r) => (timer = setTimeout(r, ANNOUNCE_MS)))]).finally(() => clearTimeout(timer));
}

/** Exports with a move under way. */
const moving = new WeakSet<Managed>();

async function moveOnce(node: NodeContext, m: Managed, to: string, beforeRelease: (() => Promise<void>) | undefined, privateCopy: boolean): Promise<MoveResult> {
  const name = m.name;
  const peer = await getStatus(to).catch((err: Error) => {
    throw new HttpError(502, `peer ${to} unreachable: ${err.message}`);
  });
  if (!beforeRelease && !peer.exports.some((e) => e.name === name)) throw new HttpError(409, `peer ${peer.nodeId} does not serve "${name}"`);
  const t0 = performance.now();
  const myEpoch = m.epoch;
  if (myEpoch === null) throw new HttpError(409, `${name} is not owned here any more; migrate it on its owner`);
  let handed: LeaseRecord | null = null;
  let [tAssign, tHanded, tAdopted] = [0, 0, 0];
  const { held } = await m.redirector.moveOut({
    beforeRelease,
    // Port B to the peer, opened before the hold so its connection costs no stall; and what the
    // hand-over will need from the store, read now for the same reason.
    prepare: async () => {
      // The move is announced too (a store that pushes changes): nodes forwarding to this one link
      // to the peer now, so that after the claim they switch links without a handshake. Advice
      // only: a failed announcement costs those nodes a new link later, nothing else.
      const them = { nodeId: peer.nodeId, nbd: peer.nbd, control: peer.control };
      const [port] = await Promise.all([
        m.pair.openRemote({ ...parseHostPort(peer.nbd), owner: `${peer.nodeId}@${myEpoch + 1}` }),
        m.lease.prepareHandOver?.(them),
        !privateCopy && announce(node, m, myEpoch, them),
      ]);
      return port;
    },
    assign: async () => {
      // From here until the answer, this node writes nothing: the record may name the peer already.
      m.epoch = null;
      m.validUntil = 0;
      tAssign = performance.now();
      const them = { nodeId: peer.nodeId, nbd: peer.nbd, control: peer.control };
      let view: HandedView | undefined;
      try {
        if (!privateCopy && m.lease.planHandOver) {
          // A store with revisions (etcd): nothing is written here; the peer's claim is the
          // hand-over (one write per move). Until it, the record still names this node.
          ({ record: handed, view } = await m.lease.planHandOver(node.identity, myEpoch, them, node.ttlMs));
        } else {
          handed = await m.lease.handOver(node.identity, myEpoch, them, node.ttlMs, privateCopy);
          // The record as written and its store revision: the peer's claim starts from them instead of reading.
          const at = m.lease.revisionOf?.(handed);
          if (at !== undefined) view = { record: handed, at };
        }
      } catch (err) {
        m.epoch = myEpoch; // the record did not change (or the reclaim below decides): still mine
        throw err;
      }
      tHanded = performance.now();
      m.record = handed;
      const h = handed;
      await controlCall(to, "POST", `v1/exports/${encodeURIComponent(name)}/adopt`, { epoch: h.epoch, handedFrom: h.handedFrom, ...(view ?? {}) }, node.adoptTimeoutMs);
      tAdopted = performance.now();
    },
    reclaim: async () => {
      if (!handed) {
        // Nothing was handed over: the lease is still mine if the record says so (renewed if it
        // can be; if the record can be read but not written, say on a full disk, it is kept as is).
        try {
          await renew(node, m, myEpoch);
        } catch (err) {
          const r = err instanceof LeaseError ? null : await m.lease.read();
          if (r?.owner !== node.identity.nodeId || r.epoch !== myEpoch) throw err;
        }
        m.epoch = myEpoch;
        return;
      }
      // A live copy's peer keeps its own record: only its answer tells whether it adopted.
      if (privateCopy) await refuseAdoption(node, to, name, handed.epoch);
      const back = await m.lease.reclaim(node.identity, handed, node.ttlMs);
      m.record = back;
      m.epoch = back.epoch;
    },
    // Port A would not open after the reclaim: released (clean: nothing was acknowledged at this
    // epoch), so any node — this one at its next renewal tick — may take the image at once.
    giveUp: async () => {
      const e = m.epoch;
      m.epoch = null;
      m.validUntil = 0;
      if (e !== null) await m.lease.release(node.identity, e, true);
    },
  });
  const ms = performance.now() - t0;
  const epoch = (handed as LeaseRecord | null)?.epoch ?? myEpoch;
  const r1 = (x: number) => Math.round(x * 10) / 10;
  node.opts.log.info({ export: name, to: peer.nodeId, epoch, ms: Math.round(ms), handOverMs: r1(tHanded - tAssign), adoptMs: r1(tAdopted - tHanded) }, "export moved");
  return { export: name, from: node.identity.nodeId, to: peer.nodeId, epoch, ms, held };
}

/**
 * Asks the peer never to adopt `name` at `epoch`. Resolves once it agreed; throws (the owner then
 * follows the peer) if it adopted already. While the peer cannot be reached the question is
 * asked again — the held requests wait — since neither answer can be assumed.
 */
async function refuseAdoption(node: NodeContext, to: string, name: string, epoch: number): Promise<void> {
  for (let delay = 100; ; delay = Math.min(delay * 2, 2000)) {
    try {
      await controlCall(to, "POST", `v1/copy-targets/${encodeURIComponent(name)}/abandon`, { epoch }, node.adoptTimeoutMs);
      return;
    } catch (err) {
      if (err instanceof ControlError && err.status === 409) throw new Error(`${name}: the peer adopted it at epoch ${epoch} after all`);
      if (err instanceof ControlError && err.status >= 400 && err.status < 500) throw err;
      node.opts.log.warn({ export: name, err: (err as Error).message }, "cannot ask the peer whether it adopted; asking again (requests wait)");
      await new Promise((r) => setTimeout(r, delay));
    }
  }
}

/**
 * Takes ownership of `name` after its owner handed the lease to this node at `epoch`. The first
 * step is the claim (see above); an epoch the owner took back first is refused (409).
 */
export function adopt(node: NodeContext, name: string, epoch: number, handedFrom?: string[], from?: HandedView): Promise<void> {
  const m = node.find(name);
  if (epoch <= m.refused) return Promise.reject(new HttpError(409, `${name}: the owner took epoch ${epoch} back`));
  const running = adoptions.get(m);
  // The renewal loop may have found the hand-over first: the adopt call then waits for that adoption.
  if (running && m.adopting === epoch) return running;
  if (m.adopting !== null) return Promise.reject(new HttpError(409, `${name}: adopting epoch ${m.adopting} already`));
  m.adopting = epoch; // from here on, the owner's abandon at this epoch is answered "adopted"
  const p = adoptAt(node, m, epoch, handedFrom, from).finally(() => adoptions.delete(m));
  adoptions.set(m, p);
  return p;
}

/** Adoptions under way, so that a second request for the same epoch waits for the first. */
const adoptions = new WeakMap<Managed, Promise<void>>();

async function adoptAt(node: NodeContext, m: Managed, epoch: number, handedFrom?: string[], from?: HandedView): Promise<void> {
  const name = m.name;
  const t0 = performance.now();
  let [tClaimed, tOpen] = [t0, t0];
  try {
    await completeCopyTarget(node, m, epoch, handedFrom);
    let claimed: LeaseRecord;
    // Peers that learn of the claim from the store may send before its answer reaches this node:
    // their requests wait for it here rather than being sent back (and their links dropped).
    m.redirector.expectAdoption();
    try {
      claimed = await renew(node, m, epoch, from); // the claim
    } catch (err) {
      m.redirector.adoptionFailed();
      if (!(err instanceof LeaseError)) throw err;
      const r = err.current;
      throw new HttpError(409, `lease of ${name} is ${r ? `${r.owner}@${r.epoch}` : "absent"}, not ${node.identity.nodeId}@${epoch}`);
    }
    m.epoch = epoch;
    tClaimed = performance.now();
    try {
      // A live copy's record lists what the source's did, and the source (see completeCopyTarget).
      await m.redirector.adopt({ ownerFlushed: true, handedFrom: claimed.handedFrom });
      tOpen = performance.now();
    } catch (err) {
      // Claimed but port A would not open: give the lease up (released, so the source can take it
      // back or another node take it over at once) rather than hold it with nothing to write it.
      await m.lease.release(node.identity, epoch, true).catch(() => undefined);
      throw err;
    }
  } catch (err) {
    m.epoch = null;
    throw err;
  } finally {
    m.adopting = null;
  }
  const r1 = (x: number) => Math.round(x * 10) / 10;
  node.opts.log.info({ export: name, epoch, claimMs: r1(tClaimed - t0), openMs: r1(tOpen - tClaimed) }, "export adopted");
}

/**
 * The owner gave up a hand-over at `epoch` (its adopt call failed or timed out): never adopt it
 * now. 409 if this node adopts or adopted it already: the owner must follow this node then.
 */
export function refuse(node: NodeContext, name: string, epoch: number): void {
  const m = node.find(name);
  if (m.adopting === epoch || (m.epoch !== null && m.epoch >= epoch)) throw new HttpError(409, `${name}: adopted at epoch ${m.adopting ?? m.epoch} already`);
  m.refused = Math.max(m.refused, epoch);
}
