import os from "node:os";
import type { NodeIdentity } from "../migration/lease.js";
import { EtcdError, type EtcdClient, type KeyValue, type LeaseKeeper } from "./etcd-client.js";

const now = () => performance.now();

export interface EtcdSessionOptions {
  client: EtcdClient;
  /** This node: its id names it in records; its addresses go into its membership key. */
  identity: NodeIdentity;
  /** The node's lease time; the etcd lease gets ceil(ttlMs / 1000) s (etcd may raise it to its minimum, 2 s by default). */
  ttlMs: number;
  /** Key prefix of everything nbdstack keeps in etcd (default "/nbdstack"). */
  prefix?: string;
  /** How long before the etcd lease may end the node stops trusting it (default max(500 ms, ttlMs / 5)). */
  marginMs?: number;
  /** Called once when the etcd lease is lost (etcd says it is gone, or no renewal came back before it could end). */
  onLost?: (err: EtcdError, session: EtcdSession) => void;
  /** For the membership key and records (defaults: process.pid, os.hostname(), Date.now). */
  pid?: number;
  host?: string;
  wall?: () => number;
}

/** What a node publishes about itself under PREFIX/nodes/NODEID, bound to its session's lease. */
export interface MemberInfo {
  nodeId: string;
  nbd: string;
  control: string;
  leaseId: string;
  pid: number;
  host: string;
  /** Wall-clock start time, for people. */
  started: number;
}

/**
 * One node process's presence in etcd: one etcd lease, kept alive, and the membership key
 * PREFIX/nodes/NODEID bound to it. Every export this process owns has its liveness key
 * (`EtcdOwnership`) bound to the same lease, so when the process dies (or is cut off) all of them
 * expire together, TTL after its last renewal; `close()` revokes the lease (a clean stop frees
 * them at once).
 *
 * `deadline()` is the local monotonic time until which this process may trust that its lease
 * lives: the send time of the last renewal etcd confirmed, plus the TTL it confirmed, minus
 * `marginMs`. etcd restarts a lease's TTL when its leader receives the renewal (after it was
 * sent) and a new leader extends every lease, so no other node can see the lease end before
 * deadline() + marginMs; the margin covers clock-rate differences and a write admitted just before
 * the deadline reaching the disk. A session whose lease is lost stays lost: start a new one (a new
 * lease, so a new process identity: every export it takes gets a new epoch).
 */
export class EtcdSession {
  readonly client: EtcdClient;
  identity: NodeIdentity;
  readonly prefix: string;
  readonly leaseId: string;
  /** The TTL etcd granted, in seconds. */
  readonly ttlSeconds: number;
  readonly marginMs: number;
  readonly pid: number;
  readonly host: string;
  readonly wall: () => number;
  /** Why the lease was lost (or "closed"), once it was; null while it is kept. */
  lost: EtcdError | null = null;
  private started: number | undefined;
  private readonly keeper: LeaseKeeper;
  /** The lease's end as known from renewals sent outside the keeper (`renewLease`). */
  private renewedUntil: number;
  private readonly onLost: ((err: EtcdError, session: EtcdSession) => void) | undefined;

  private constructor(o: EtcdSessionOptions, grant: { id: string; ttl: number; grantedAt: number }) {
    this.client = o.client;
    this.identity = { nodeId: o.identity.nodeId, nbd: o.identity.nbd, control: o.identity.control };
    this.prefix = (o.prefix ?? "/nbdstack").replace(/\/+$/, "");
    this.leaseId = grant.id;
    this.ttlSeconds = grant.ttl;
    this.marginMs = o.marginMs ?? Math.max(500, o.ttlMs / 5);
    this.pid = o.pid ?? process.pid;
    this.host = o.host ?? os.hostname();
    this.wall = o.wall ?? Date.now;
    this.onLost = o.onLost;
    this.renewedUntil = grant.grantedAt + grant.ttl * 1000;
    this.keeper = o.client.keepAlive(grant, { onLost: (err) => this.lose(err) });
  }

  /**
   * Grants the lease, starts keeping it alive and publishes the membership key. Never returns a
   * session that is lost already: a grant answered late (members without a leader tried first, a
   * slow path) can be vouched for only from when it was asked for, so when little of that is left
   * it is renewed before use (or found gone: rejected); a session lost while publishing is closed
   * and rejected too.
   */
  static async start(o: EtcdSessionOptions): Promise<EtcdSession> {
    if (!(o.ttlMs > 0)) throw new TypeError(`ttlMs must be > 0, got ${o.ttlMs}`);
    let grant = await o.client.grantLease(Math.max(1, Math.ceil(o.ttlMs / 1000)));
    const marginMs = o.marginMs ?? Math.max(500, o.ttlMs / 5);
    if (grant.grantedAt + grant.ttl * 1000 - performance.now() < 2 * marginMs) {
      const r = await o.client.keepAliveOnce(grant.id);
      if (!r) throw new EtcdError("ETCD_LEASE_NOT_FOUND", `grant a ${grant.ttl} s lease`, `lease ${grant.id} was granted too late: it had expired when its answer came`);
      grant = { id: grant.id, ttl: r.ttl, grantedAt: r.sentAt };
    }
    const s = new EtcdSession(o, grant);
    if (s.marginMs >= s.ttlSeconds * 1000) {
      await s.close();
      throw new RangeError(`margin ${s.marginMs} ms leaves nothing of a ${s.ttlSeconds} s lease`);
    }
    try {
      await s.publish(s.identity);
    } catch (err) {
      await s.close().catch(() => {});
      throw err;
    }
    if (s.lost) {
      const why = s.lost;
      await s.close().catch(() => {});
      throw why;
    }
    return s;
  }

  /** Writes the membership key again with `identity`'s addresses (known once the node listens). */
  async publish(identity: NodeIdentity): Promise<void> {
    this.identity = { nodeId: this.identity.nodeId, nbd: identity.nbd, control: identity.control };
    this.started ??= this.wall();
    const info: MemberInfo = { nodeId: this.identity.nodeId, nbd: this.identity.nbd, control: this.identity.control, leaseId: this.leaseId, pid: this.pid, host: this.host, started: this.started };
    await this.client.put(this.memberKey(this.identity.nodeId), JSON.stringify(info), { lease: this.leaseId });
  }

  /** The monotonic time (performance.now()) until which this process may act on its lease; -Infinity once lost or closed. */
  deadline(): number {
    if (this.lost) return -Infinity;
    return Math.max(this.keeper.deadline, this.renewedUntil) - this.marginMs;
  }

  /**
   * Renews the lease once, now: on success it lives at least a TTL from before this call (so a
   * caller may trust it for its own lease time counted from before the call, minus the margin).
   * Rejects with the loss once the lease is gone; with another EtcdError when etcd cannot say.
   */
  async renewLease(): Promise<void> {
    if (this.lost) throw this.lost;
    const r = await this.client.keepAliveOnce(this.leaseId, { timeoutMs: Math.max(1, Math.min(5000, this.deadline() + this.marginMs - now())) });
    if (this.lost) throw this.lost;
    if (!r) {
      this.lose(new EtcdError("ETCD_LEASE_NOT_FOUND", `keep lease ${this.leaseId} alive`, "etcd says the lease expired or was revoked"));
      throw this.lost!;
    }
    this.renewedUntil = Math.max(this.renewedUntil, r.sentAt + r.ttl * 1000);
  }

  memberKey(nodeId: string): string {
    return `${this.prefix}/nodes/${encodeURIComponent(nodeId)}`;
  }

  /** A node's membership (its live process's lease), or null when it has no live process. */
  async member(nodeId: string): Promise<{ info: MemberInfo; kv: KeyValue } | null> {
    const kv = await this.client.getOne(this.memberKey(nodeId));
    if (!kv) return null;
    return { info: JSON.parse(kv.value.toString()) as MemberInfo, kv };
  }

  /** Every node with a live process. */
  async members(): Promise<MemberInfo[]> {
    const r = await this.client.get(`${this.prefix}/nodes/`, { prefix: true });
    return r.kvs.map((kv) => JSON.parse(kv.value.toString()) as MemberInfo);
  }

  /** A clean stop: stops renewing and revokes the lease (its keys, this process's exports' liveness keys included, go at once). */
  async close(): Promise<void> {
    const wasLost = this.lost;
    this.keeper.stop();
    if (!this.lost) this.lost = new EtcdError("ETCD_CLOSED", `session of ${this.identity.nodeId}`, "closed");
    if (!wasLost) await this.client.revokeLease(this.leaseId);
  }

  private lose(err: EtcdError): void {
    if (this.lost) return;
    this.lost = err;
    this.keeper.stop();
    this.onLost?.(err, this);
    if (err.code !== "ETCD_LEASE_NOT_FOUND") this.revokeLost();
  }

  /**
   * A lease lost here (no renewal confirmed before the deadline) may live on in etcd: renewals
   * that arrived unanswered, a new leader's extension after an election. Everything bound to it
   * (this process's exports) would stay taken until etcd ends it, a lease time or more from now.
   * Revoked instead once etcd answers, from marginMs after the loss: this process admits no write
   * past deadline(), which is the loss minus the margin at the latest (-Infinity from the loss on),
   * so a write admitted just before gets the margin to reach the disk, as when etcd ends a lease
   * at deadline() + marginMs. Tried every 250 ms until etcd answers, the client closes, or the
   * lease would surely have ended anyway.
   */
  private revokeLost(): void {
    const giveUpAt = now() + this.marginMs + this.ttlSeconds * 1000 + REVOKE_GRACE_MS;
    const attempt = (): void => {
      if (now() > giveUpAt) return;
      this.client.revokeLease(this.leaseId).catch((e: unknown) => {
        if (e instanceof EtcdError && e.code === "ETCD_CLOSED") return;
        setTimeout(attempt, 250).unref();
      });
    };
    setTimeout(attempt, this.marginMs).unref();
  }
}

/** How long past a lost lease's TTL its revocation is still tried (a new etcd leader extends leases by about an election timeout). */
const REVOKE_GRACE_MS = 5000;
