import { LeaseError, type LeaseRecord } from "../migration/lease.js";
import { ownerIsHere, type OwnerAddress } from "../stack/port/remote-port.js";
import type { Ownership } from "../migration/ownership.js";
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
 * Whether port A may write now: yes while the lease renewed last is fresh; past that (this node
 * was paused, or renewals stalled) the record decides, and a lost lease fences port A at once.
 * When the record cannot be read (a lock held too long, EACCES, ESTALE) nothing is decided: the
 * write waits, checking again, until the record answers. It never goes ahead unchecked.
 */
export function mayWrite(node: NodeContext, m: Managed): boolean | Promise<boolean> {
  const now = decide(node, m);
  if (now !== null) return now;
  return (async () => {
    for (let delay = 10; ; delay = Math.min(delay * 2, 200)) {
      await new Promise((r) => setTimeout(r, delay));
      const later = decide(node, m);
      if (later !== null) return later;
    }
  })();
}

/** true: write; false: fenced; null: the record cannot tell now. */
function decide(node: NodeContext, m: Managed): boolean | null {
  if (m.epoch === null) return false;
  if (performance.now() < m.validUntil) return true;
  try {
    renew(node, m, m.epoch);
    return true;
  } catch (err) {
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
 * Extends my lease of `m` at `epoch` and trusts it for a share of its time, counted from before
 * the renewal: a pause inside renew() shortens the trust, it never extends it.
 */
export function renew(node: NodeContext, m: Managed, epoch: number): LeaseRecord {
  const t0 = performance.now();
  const r = m.lease.renew(node.identity, epoch);
  m.validUntil = t0 + node.ttlMs * FRESH;
  return r;
}

/**
 * The NBD address of the owner that `lease` names, and who it is (node@epoch: each process of a
 * node owns at a new epoch); an EOWNER error if that is this node.
 */
export function locateOwner(node: NodeContext, lease: Ownership): OwnerAddress {
  const r = lease.read();
  if (!r) throw Object.assign(new Error(`no lease record in ${lease.where}`), { code: "ENOENT" });
  // This process, or a hand-over to this node not claimed yet, or (by address) this very server:
  // the request belongs on port A. Another process of this node that still owns it (a restart
  // while the old one runs) is reached like any owner.
  const here = r.owner === node.identity.nodeId && (r.pid === undefined || r.pid === process.pid || r.nbd === node.identity.nbd);
  if (here) throw ownerIsHere(`${lease.where} names this node (${r.owner}@${r.epoch}) as the owner`);
  return { ...parseHostPort(r.nbd), owner: `${r.owner}@${r.epoch}`, handedFrom: r.handedFrom };
}

/** One tick of the renewal loop over every export of the node. */
export function renewAll(node: NodeContext, exports: Iterable<Managed>): void {
  for (const m of exports) {
    try {
      renewOne(node, m);
    } catch (err) {
      // One export's trouble (an unreadable record) is no reason to stop the others' renewals.
      node.opts.log.error({ export: m.name, err: (err as Error).message }, "lease check failed");
    }
  }
}

/** Renews my lease of `m`, fences port A if it was lost, or takes the image over if its owner's expired. */
function renewOne(node: NodeContext, m: Managed): void {
  // (A private record, the node's own copy, is taken over only by this node: see LeaseFile.takeOver.)
  if (m.epoch === null && m.adopting === null && m.redirector.state === "REMOTE" && !m.target) {
    // A hand-over to this node whose adopt call never came (its source died right after it): claim it.
    const handed = m.lease.handedTo(node.identity);
    if (handed !== null) {
      node.opts.log.warn({ export: m.name, epoch: handed }, "the lease was handed to this node without an adopt call: adopting it");
      adopt(node, m.name, handed).catch((err: Error) => node.opts.log.error({ export: m.name, err: err.message }, "adopting a handed lease failed"));
      return;
    }
    takeOverIfExpired(node, m);
    return;
  }
  // Renewed in every state while this node holds the lease: a move that drains slowly must not
  // let the lease expire while port A may still write.
  if (m.epoch === null) return;
  try {
    renew(node, m, m.epoch);
  } catch (err) {
    if (!(err instanceof LeaseError)) {
      node.opts.log.error({ export: m.name, err: (err as Error).message }, "lease renewal failed");
      return;
    }
    // Someone broke my lease: stop writing through port A at once and follow the new owner.
    node.opts.log.error({ export: m.name, err: err.message }, "lease lost: fencing port A");
    m.epoch = null;
    void m.redirector.fence();
  }
}

/** The owner stopped renewing (it died): once its lease expired, take the image over. */
function takeOverIfExpired(node: NodeContext, m: Managed): void {
  let epoch: number;
  try {
    const taken = m.lease.takeOver(node.identity, node.ttlMs);
    if (!taken) return; // the owner's lease is still valid
    epoch = taken.epoch;
  } catch (err) {
    // Another node was quicker; or the record cannot be read now (tried again at the next tick).
    if (!(err instanceof LeaseError)) node.opts.log.error({ export: m.name, err: (err as Error).message }, "take-over check failed");
    return;
  }
  node.opts.log.warn({ export: m.name, epoch }, "lease of the owner expired: taking the image over");
  m.epoch = epoch;
  m.validUntil = 0;
  // The owner stopped without a hand-over: what it acknowledged without a FLUSH may be gone.
  m.redirector.adopt({ ownerFlushed: false }).catch((err: Error) => {
    // Port A would not open: give the record up (released, so any node may take it at once)
    // rather than name this node owner with nothing to write it — its port B would wait on itself.
    node.opts.log.error({ export: m.name, err: err.message }, "take-over failed: releasing the lease");
    m.epoch = null;
    try {
      m.lease.release(node.identity, epoch, true);
    } catch (e) {
      node.opts.log.error({ export: m.name, err: (e as Error).message }, "releasing the lease failed");
    }
  });
}
