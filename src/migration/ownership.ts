import type { LeaseRecord, NodeIdentity } from "./lease.js";

/**
 * A hand-over as its source made it: the record for the peer, and the store's revision of that
 * write — or, for a hand-over the source planned and did not write (`planHandOver`), the source's
 * own record (`prev`) and the revisions of it and of its liveness key (`at`, `liveAt`): the
 * peer's claim then writes the hand-over itself.
 */
export interface HandedView {
  record: LeaseRecord;
  at: number;
  prev?: LeaseRecord;
  liveAt?: number;
}

/**
 * The ownership of one image: who may write it (the owner), at which epoch (the fencing token),
 * and until when without renewing (the lease). One interface, so a node does not care where the
 * record lives: `FileOwnership` (a LeaseFile) keeps it beside the image (nodes on one machine);
 * `EtcdOwnership` keeps it in etcd for nodes on several hosts.
 *
 * Rules every implementation keeps:
 * - Each method is one atomic change (or read) of the record; when the record is not what the
 *   method expects (another owner, another epoch, a lease not yet expired), it changes nothing and
 *   rejects with `LeaseError` carrying the record it found. Any other error (the store cannot be
 *   reached, the outcome of a change is unknown) decides nothing: the caller asks again later.
 * - Calls on one Ownership object run one at a time, in the order they were made.
 * - Every change of owner bumps the epoch; epochs never go back.
 * - A lease is broken only after it expired (`takeOver`), never while its owner may still use it:
 *   expiry is judged on the observer's own monotonic clock or by the store's own lease (etcd),
 *   never by comparing two nodes' wall clocks; an owner trusts its lease only until a local
 *   monotonic deadline shorter than the lease, measured from before the renewal that granted it.
 */
export interface Ownership {
  /** Where the record lives, for messages. */
  readonly where: string;
  read(): Promise<LeaseRecord | null>;
  /** Takes the lease if it is free, expired, or already mine (this process's). */
  acquire(me: NodeIdentity, ttlMs: number): Promise<LeaseRecord>;
  /**
   * Extends my lease held at `epoch`. The first renewal by a node the lease was handed to is its
   * claim: from then on the hand-over can no longer be taken back. `from`: the hand-over as its
   * source wrote it, which a store with revisions may start the claim from instead of reading
   * (a wrong view costs a read, never a wrong decision).
   */
  renew(me: NodeIdentity, epoch: number, from?: HandedView): Promise<LeaseRecord>;
  /** Optional: the store's revision of `record` as this object just wrote or read it, or undefined (see HandedView). */
  revisionOf?(record: LeaseRecord): number | undefined;
  /** The epoch of a hand-over to `me` that I have not claimed yet (shared records only), or null. */
  handedTo(me: NodeIdentity): Promise<number | null>;
  /**
   * Optional: reads what a hand-over to `to` needs before a move's hold begins (a shared store's
   * membership of `to`), so that less of it happens while clients wait. Never decides anything.
   */
  prepareHandOver?(to: NodeIdentity): Promise<void>;
  /**
   * Optional (stores with revisions): a hand-over of my lease (at `epoch`) to `to` that writes
   * nothing: the peer's claim, started from `view`, writes it in one change that compares my record
   * as it is now — one write per move instead of two. Until that claim my record stands unchanged;
   * `reclaim` with the returned record then changes it, so a claim that comes later fails.
   */
  planHandOver?(me: NodeIdentity, epoch: number, to: NodeIdentity, ttlMs: number): Promise<{ record: LeaseRecord; view: HandedView }>;
  /** Hands my lease (at `epoch`) to `to`, at epoch + 1; the peer's claim of it commits the move. */
  handOver(me: NodeIdentity, epoch: number, to: NodeIdentity, ttlMs: number, privateCopy?: boolean): Promise<LeaseRecord>;
  /** Takes the image over if its owner's lease expired (never a node's private copy); null while it is valid. */
  takeOver(me: NodeIdentity, ttlMs: number): Promise<LeaseRecord | null>;
  /**
   * Takes the lease back after a hand-over (`handed`, as handOver returned it) that did not
   * complete: only while the peer has not claimed it (renewed it), or once it expired.
   */
  reclaim(me: NodeIdentity, handed: LeaseRecord, ttlMs: number): Promise<LeaseRecord>;
  /**
   * Gives up my lease at `epoch` (the next owner bumps the epoch). `clean`: this owner never opened
   * port A, so nothing it acknowledged can be lost (the next owner keeps `handedFrom`).
   */
  release(me: NodeIdentity, epoch: number, clean?: boolean): Promise<void>;
  /**
   * Names `who` owner at `epoch` on a node's own copy of an image (a live copy's destination),
   * keeping `handedFrom`. A file record beside a copy is written unconditionally (no other node
   * keeps one there); a shared store (etcd) writes it only while the record names `who` at `epoch`
   * already (the source before the copy, the destination after the hand-over).
   */
  assign(who: NodeIdentity, epoch: number, ttlMs: number, handedFrom?: string[]): Promise<LeaseRecord>;
  /**
   * Calls `onChange` with the record each time it changes (pushed by the store; a file record
   * has no push and returns null: nodes then learn of a change when they next read it), and with
   * `ownerGone` when the owner's lease ended with the record unchanged (it died or lost the store).
   * Returns a function that stops watching.
   */
  watch(onChange: (r: LeaseRecord | null, ownerGone?: boolean) => void, onMove?: (n: MoveNotice) => void): (() => void) | null;
  /**
   * Optional (stores that push changes): tells every watcher, before a move's hold, that the owner
   * (`me` at `epoch`) is about to hand the image to `to`, so that nodes forwarding to it can link
   * to `to` ahead of the claim (see MoveNotice). Advice only: nothing is decided by it, and it
   * goes with the announcing process.
   */
  announceMove?(me: NodeIdentity, epoch: number, to: NodeIdentity): Promise<void>;
}

/**
 * An owner's announcement of a move it starts (Ownership.announceMove): `from` (node@epoch) is
 * about to hand the image to node `to`, whose NBD address is `nbd` (HOST:PORT).
 */
export interface MoveNotice {
  from: string;
  to: string;
  nbd: string;
}
