import { LeaseError, type LeaseRecord } from "../migration/lease.js";
import type { HandedView } from "../migration/ownership.js";
import { ownerIsHere, type OwnerAddress } from "../stack/port/remote-port.js";
import { adopt } from "./hand-over.js";
import { parseHostPort, type Managed, type NodeContext } from "./node-context.js";

/*
 * A node's side of ownership: it renews the leases it holds, fences port A the moment one is lost,
 * and takes over an image whose owner stopped renewing once that lease expired. What the record
 * guarantees (one atomic change per call, epochs that only grow) is the Ownership interface's.
 */

/** Share of the lease time after a renewal during which port A writes without checking the record. */
const FRESH = 0.8;

/**
 * Whether port A may write now: yes while the lease renewed last is fresh (answered at once, the
 * hot path); past that (this node was paused, or renewals stalled) the record decides, and a lost
 * lease fences port A at once. When the record cannot be read (a lock held too long, EACCES,
 * ESTALE, etcd out of reach) nothing is decided: the write waits, asking again, until the record
 * answers. It never goes ahead unchecked.
 */
export function mayWrite(node: NodeContext, m: Managed): boolean | Promise<boolean> {
  if (m.epoch === null) return false;
  if (performance.now() < m.validUntil) return true;
  return (async () => {
    for (let delay = 10; ; delay = Math.min(delay * 2, 200)) {
      const now = await decide(node, m);
      if (now !== null) return now;
      await new Promise((r) => setTimeout(r, delay));
    }
  })();
}

/** true: write; false: fenced; null: the record cannot tell now. */
async function decide(node: NodeContext, m: Managed): Promise<boolean | null> {
  const epoch = m.epoch;
  if (epoch === null) return false;
  if (performance.now() < m.validUntil) return true;
  try {
    await renew(node, m, epoch);
    // A move or a loss while the record answered decides instead (null: ask again).
    return m.epoch === epoch ? true : m.epoch === null ? false : null;
  } catch (err) {
    if (m.epoch !== epoch) return m.epoch === null ? false : null;
    if (!(err instanceof LeaseError)) {
      node.opts.log.warn({ export: m.name, err: (err as Error).message }, "lease record unreadable before a write: the write waits");
      return null;
    }
    node.opts.log.error({ export: m.name, err: err.message }, "lease lost before a write: fencing port A");
    m.epoch = null;
    return false; // the redirector fences port A and sends the request to the new owner
  }
}

/**
 * Keeps `r`, a record as read, as what this node knows of the record of `m` — unless it knows a
 * newer one. Reads run concurrently (a peer's lookup, a status, a watch): one that began before
 * this node adopted or took the export over may end after, and must not put the old owner back
 * (the export's description, which names the owners this one vouches for, is built from it).
 */
export function noteRecord(m: Managed, r: LeaseRecord | null | undefined): void {
  if (r && (!m.record || r.epoch >= m.record.epoch)) m.record = r;
}

/**
 * Extends my lease of `m` at `epoch` and trusts it for a share of its time, counted from before
 * the renewal: a pause inside renew() shortens the trust, it never extends it. Trust is given
 * only if the node still holds `epoch` when the answer comes (a move or a loss meanwhile wins).
 */
export async function renew(node: NodeContext, m: Managed, epoch: number, from?: HandedView): Promise<LeaseRecord> {
  const t0 = performance.now();
  const r = await m.lease.renew(node.identity, epoch, from);
  m.record = r;
  if (m.epoch === epoch || m.adopting === epoch) m.validUntil = t0 + node.ttlMs * FRESH;
  return r;
}

/**
 * The NBD address of the owner that the record of `m` names, and who it is (node@epoch: each
 * process of a node owns at a new epoch); an EOWNER error if that is this node.
 */
export async function locateOwner(node: NodeContext, m: Managed): Promise<OwnerAddress> {
  const lease = m.lease;
  // This process owns it now (it adopted or took it over): port A, without asking the store — a
  // request the old owner sent back after a move must not wait for a read (a store round trip
  // inside the move's stall). Port A's fence still checks the lease before every write.
  if (m.epoch !== null) throw ownerIsHere(`this node owns ${m.name} (${node.identity.nodeId}@${m.epoch})`);
  let r: LeaseRecord | null;
  try {
    r = await lease.read();
  } catch (err) {
    // The store is out of reach (etcd cut off): nobody knows the owner now. Port B's requests
    // wait, asking again, as for an owner that cannot be reached; they never fail for it.
    throw Object.assign(new Error(`the owner cannot be told now: ${lease.where}: ${(err as Error).message}`), { code: "EOWNERUNKNOWN" });
  }
  noteRecord(m, r);
  if (!r) throw Object.assign(new Error(`no lease record in ${lease.where}`), { code: "ENOENT" });
  // This process, or a hand-over to this node not claimed yet, or (by address) this very server:
  // the request belongs on port A. Another process of this node that still owns it (a restart
  // while the old one runs) is reached like any owner.
  const here = r.owner === node.identity.nodeId && (r.pid === undefined || r.pid === process.pid || r.nbd === node.identity.nbd);
  if (here) throw ownerIsHere(`${lease.where} names this node (${r.owner}@${r.epoch}) as the owner`);
  return { ...parseHostPort(r.nbd), owner: `${r.owner}@${r.epoch}`, handedFrom: r.handedFrom };
}

/**
 * How long a hand-over to this node waits for its adopt call before the node adopts it on its own
 * (its source died right after handing it over). The call comes within milliseconds of the
 * hand-over, and its claim starts from the hand-over as written (one etcd transaction inside the
 * move's hold); a claim of this node's own would read first, and the two would wait for each
 * other.
 */
export const ORPHAN_GRACE_MS = 1000;

/**
 * Notes a hand-over to this node at `epoch`, seen now (read or pushed), and checks again once the
 * grace has passed. True when it was first seen at least ORPHAN_GRACE_MS ago: adopt it now.
 */
export function sawHandOver(node: NodeContext, m: Managed, epoch: number): boolean {
  const now = performance.now();
  if (m.handedSeen?.epoch === epoch) return now - m.handedSeen.at >= ORPHAN_GRACE_MS;
  m.handedSeen = { epoch, at: now };
  setTimeout(() => {
    if (node.running && m.handedSeen?.epoch === epoch) void checkNow(node, m);
  }, ORPHAN_GRACE_MS + 5).unref();
  return false;
}

/** One tick of the renewal loop over every export of the node (exports in parallel, each once). */
export async function renewAll(node: NodeContext, exports: Iterable<Managed>): Promise<void> {
  await Promise.all([...exports].map((m) => checkNow(node, m)));
}

/** Checks under way, so that a pushed change and the loop's tick never check one export at once. */
const checking = new WeakMap<Managed, Promise<void>>();

/**
 * Renews, fences or takes over `m` now (see renewOne): the loop's tick, or a change of the record
 * that the store pushed. Joins a check already under way rather than running a second.
 */
export function checkNow(node: NodeContext, m: Managed): Promise<void> {
  const running = checking.get(m);
  if (running) return running;
  // One export's trouble (an unreadable record) is no reason to stop the others' renewals.
  const p = renewOne(node, m)
    .catch((err: Error) => node.opts.log.error({ export: m.name, err: err.message }, "lease check failed"))
    .finally(() => checking.delete(m));
  checking.set(m, p);
  return p;
}

/** Renews my lease of `m`, fences port A if it was lost, or takes the image over if its owner's expired. */
async function renewOne(node: NodeContext, m: Managed): Promise<void> {
  // (A private record, the node's own copy, is taken over only by this node: see LeaseFile.takeOver.)
  if (m.epoch === null && m.adopting === null && m.redirector.state === "REMOTE" && !m.target) {
    // A hand-over to this node whose adopt call never came (its source died right after it): claim it.
    const handed = await m.lease.handedTo(node.identity);
    if (handed !== null && m.epoch === null && m.adopting === null && sawHandOver(node, m, handed)) {
      node.opts.log.warn({ export: m.name, epoch: handed }, "the lease was handed to this node without an adopt call: adopting it");
      adopt(node, m.name, handed).catch((err: Error) => node.opts.log.error({ export: m.name, err: err.message }, "adopting a handed lease failed"));
      return;
    }
    if (handed === null) await takeOverIfExpired(node, m);
    return;
  }
  // Renewed in every state while this node holds the lease: a move that drains slowly must not
  // let the lease expire while port A may still write.
  const epoch = m.epoch;
  if (epoch === null) return;
  try {
    await renew(node, m, epoch);
  } catch (err) {
    if (m.epoch !== epoch) return; // moved or lost meanwhile: that path decided already
    if (!(err instanceof LeaseError)) {
      node.opts.log.error({ export: m.name, err: (err as Error).message }, "lease renewal failed");
      return;
    }
    // Someone broke my lease: stop writing through port A at once and follow the new owner.
    fenceLost(node, m, err.message);
  }
}

/**
 * The lease of `m` is lost (the record names another owner, or this process's session with the
 * store ended): port A stops writing at once, and requests follow whoever owns the image next.
 */
export function fenceLost(node: NodeContext, m: Managed, why: string): void {
  if (m.epoch === null) return;
  node.opts.log.error({ export: m.name, err: why }, "lease lost: fencing port A");
  m.epoch = null;
  void m.redirector.fence();
}

/** The owner stopped renewing (it died): once its lease expired, take the image over. */
async function takeOverIfExpired(node: NodeContext, m: Managed): Promise<void> {
  const t0 = performance.now();
  let epoch: number;
  let taken: LeaseRecord | null;
  try {
    taken = await m.lease.takeOver(node.identity, node.ttlMs);
    if (!taken) return; // the owner's lease is still valid
    m.record = taken;
    epoch = taken.epoch;
  } catch (err) {
    // Another node was quicker; or the record cannot be read now (tried again at the next tick).
    if (!(err instanceof LeaseError)) node.opts.log.error({ export: m.name, err: (err as Error).message }, "take-over check failed");
    return;
  }
  node.opts.log.warn({ export: m.name, epoch }, "lease of the owner expired: taking the image over");
  m.epoch = epoch;
  m.validUntil = 0;
  // Without an owner: from when this node learnt the owner's lease ended (a store that pushes
  // it, etcd) or found it expired (a lease file), until port A serves here.
  const since = m.ownerGoneAt ?? t0;
  // An owner whose lease expired stopped without a hand-over: what it acknowledged without a
  // FLUSH may be gone. A record released cleanly (an adoption whose port A would not open) lists
  // in handedFrom the owners that handed it on after their flush and the one that released it
  // without opening port A: they vouch for what went through them, as in a hand-over.
  const how = taken.handedFrom?.length ? { ownerFlushed: true, handedFrom: taken.handedFrom } : { ownerFlushed: false };
  m.redirector.adopt(how).then(() => {
    const ms = Math.round(performance.now() - since);
    m.ownerGoneAt = null;
    m.takeovers.count++;
    m.takeovers.lastOwnerlessMs = ms;
    m.takeovers.totalOwnerlessMs += ms;
    node.opts.log.warn({ export: m.name, epoch, ownerlessMs: ms }, "took the image over: served here again after this long without an owner");
  }, (err: Error) => {
    // Port A would not open: give the record up (released, so any node may take it at once)
    // rather than name this node owner with nothing to write it — its port B would wait on itself.
    node.opts.log.error({ export: m.name, err: err.message }, "take-over failed: releasing the lease");
    m.epoch = null;
    m.lease.release(node.identity, epoch, true).catch((e: Error) => node.opts.log.error({ export: m.name, err: e.message }, "releasing the lease failed"));
  });
}
