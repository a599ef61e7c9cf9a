import type { LeaseRecord, NodeIdentity } from "./lease.js";

/**
 * The ownership of one image: who may write it (the owner), at which epoch (the fencing token),
 * and until when without renewing (the lease). One interface, so a node does not care where the
 * record lives: `LeaseFile` keeps it beside the image (nodes on one machine); a coordination
 * service (etcd) keeps it for nodes on several hosts.
 *
 * Rules every implementation keeps:
 * - Each method is one atomic change (or read) of the record; when the record is not what the
 *   method expects (another owner, another epoch, a lease not yet expired), it changes nothing and
 *   throws `LeaseError` carrying the record it found.
 * - Every change of owner bumps the epoch; epochs never go back.
 * - A lease is broken only after it expired (`takeOver`), never while its owner may still use it:
 *   expiry is judged on the observer's own monotonic clock (a record unrenewed for the lease time
 *   since the observer saw it so), never by comparing two nodes' wall clocks; an owner trusts its
 *   lease only until a local monotonic deadline shorter than the lease, measured from before the
 *   renewal that granted it.
 */
export interface Ownership {
  /** Where the record lives, for messages. */
  readonly where: string;
  read(): LeaseRecord | null;
  /** Takes the lease if it is free, expired, or already mine (this process's). */
  acquire(me: NodeIdentity, ttlMs: number): LeaseRecord;
  /**
   * Extends my lease held at `epoch`. The first renewal by a node the lease was handed to is its
   * claim: from then on the hand-over can no longer be taken back.
   */
  renew(me: NodeIdentity, epoch: number): LeaseRecord;
  /** The epoch of a hand-over to `me` that I have not claimed yet (shared records only), or null. */
  handedTo(me: NodeIdentity): number | null;
  /** Hands my lease (at `epoch`) to `to`, at epoch + 1; the peer's claim of it commits the move. */
  handOver(me: NodeIdentity, epoch: number, to: NodeIdentity, ttlMs: number, privateCopy?: boolean): LeaseRecord;
  /** Takes the image over if its owner's lease expired (never a node's private copy); null while it is valid. */
  takeOver(me: NodeIdentity, ttlMs: number): LeaseRecord | null;
  /**
   * Takes the lease back after a hand-over (`handed`, as handOver returned it) that did not
   * complete: only while the peer has not claimed it (renewed it), or once it expired.
   */
  reclaim(me: NodeIdentity, handed: LeaseRecord, ttlMs: number): LeaseRecord;
  /**
   * Gives up my lease at `epoch` (the next owner bumps the epoch). `clean`: this owner never opened
   * port A, so nothing it acknowledged can be lost (the next owner keeps `handedFrom`).
   */
  release(me: NodeIdentity, epoch: number, clean?: boolean): void;
  /** Names `who` owner at `epoch` unconditionally: only for a node's own copy of an image. */
  assign(who: NodeIdentity, epoch: number, ttlMs: number, handedFrom?: string[]): LeaseRecord;
}
