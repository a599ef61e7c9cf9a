import type { Logger } from "pino";
import type { LeaseRecord, NodeIdentity } from "../migration/lease.js";
import type { Ownership } from "../migration/ownership.js";
import { EtcdClient, type EtcdAuthOptions, type EtcdTlsOptions } from "./etcd-client.js";
import { EtcdOwnership } from "./etcd-ownership.js";
import { EtcdSession, type MemberInfo } from "./etcd-session.js";

export interface EtcdNodeOptions {
  /** Client URLs of the etcd members (http:// or https://). */
  endpoints: string[];
  /** Key prefix of everything this cluster keeps in etcd (default /nbdstack). */
  prefix?: string;
  tls?: EtcdTlsOptions;
  auth?: EtcdAuthOptions;
  identity: NodeIdentity;
  /** The node's lease time (--lease-ttl): its etcd lease lasts as long, rounded up to seconds. */
  ttlMs: number;
  log: Logger;
}

/** The cluster as etcd sees it, from any node (`nbdstack status`). */
export interface ClusterView {
  etcd: { endpoints: string[]; prefix: string };
  nodes: Array<MemberInfo & { alive: true }>;
  exports: Array<{ name: string; owner: string; epoch: number; nbd: string; control: string; live: boolean; released: boolean; handedFrom?: string[] }>;
}

/**
 * A node's place in an etcd cluster (serve --etcd): its session (one etcd lease, kept alive, and
 * its membership key PREFIX/nodes/NODEID with its addresses) and an `EtcdOwnership` per export.
 * When the session's lease is lost (the node was cut off from etcd, or frozen, past its lease),
 * every record it held is no longer its own: the node's renewals fail, port A is fenced, and
 * requests wait for whichever node owns the export next. Meanwhile a new session is started,
 * again and again until etcd answers, so the node comes back as a member (a new process identity:
 * whatever it takes then, it takes at a new epoch). A node that cannot reach etcd when it starts
 * starts all the same and joins the same way: until then it owns nothing, and its clients'
 * requests wait.
 */
export class EtcdNode {
  readonly client: EtcdClient;
  readonly prefix: string;
  private current: EtcdSession | null = null;
  private closed = false;
  private restarting = false;
  private readonly lostListeners: Array<(err: Error) => void> = [];

  private constructor(private readonly o: EtcdNodeOptions) {
    this.client = new EtcdClient({ endpoints: o.endpoints, tls: o.tls, auth: o.auth, logger: o.log.child({ role: "etcd" }) });
    this.prefix = (o.prefix ?? "/nbdstack").replace(/\/+$/, "") || "/nbdstack";
  }

  /**
   * Joins the cluster. The first attempt gets `joinWaitMs` (default 1 s): when etcd cannot be
   * reached now (a lost quorum, this host cut off, a member that accepts and never answers) the
   * node starts all the same, so that it listens and holds its clients instead of refusing them,
   * and keeps trying in the background; meanwhile every ownership call fails (nothing is
   * decided: the node owns nothing, its clients' requests wait).
   */
  static async start(o: EtcdNodeOptions & { joinWaitMs?: number }): Promise<EtcdNode> {
    const n = new EtcdNode(o);
    const joined = n.rejoin(true);
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([joined, new Promise((r) => (timer = setTimeout(r, o.joinWaitMs ?? 1000)))]);
    clearTimeout(timer);
    if (!n.current) o.log.warn({ etcd: o.endpoints }, "cannot reach etcd now: serving without owning anything until it answers");
    return n;
  }

  /** Calls `f` when the node's session is lost (its etcd lease ran out): whatever it owned is not its own any more. */
  onSessionLost(f: (err: Error) => void): void {
    this.lostListeners.push(f);
  }

  /** The session now (a new one after a loss); throws while the node has not joined etcd yet. */
  get session(): EtcdSession {
    if (!this.current) throw Object.assign(new Error(`not joined to etcd at ${this.o.endpoints.join(",")} yet`), { code: "ETCD_NOT_JOINED" });
    return this.current;
  }

  /** The ownership record of export `name` (one per export; it follows the node's session). */
  ownership(name: string): Ownership {
    return new EtcdOwnership(this, name);
  }

  /** Publishes the node's addresses (known once it listens) in its membership key. */
  async publish(identity: NodeIdentity): Promise<void> {
    this.o.identity = identity;
    await this.current?.publish(identity); // a session started later publishes these addresses itself
  }

  /** Every live node and every export's record, as etcd has them now. */
  async cluster(): Promise<ClusterView> {
    const [members, recs] = await Promise.all([this.session.members(), this.client.get(`${this.prefix}/exports/`, { prefix: true })]);
    const live = new Set<string>();
    const records: Array<[string, LeaseRecord]> = [];
    for (const kv of recs.kvs) {
      const key = kv.key.toString().slice(`${this.prefix}/exports/`.length);
      const [name, what] = key.split("/");
      if (!name) continue;
      if (what === "owner") live.add(name);
      else if (what === "record") {
        try {
          records.push([decodeURIComponent(name), JSON.parse(kv.value.toString()) as LeaseRecord]);
        } catch {
          // not a record of ours
        }
      }
    }
    return {
      etcd: { endpoints: this.o.endpoints, prefix: this.prefix },
      nodes: members.map((m) => ({ ...m, alive: true as const })).sort((a, b) => a.nodeId.localeCompare(b.nodeId)),
      exports: records
        .map(([name, r]) => ({ name, owner: r.owner, epoch: r.epoch, nbd: r.nbd, control: r.control, live: live.has(encodeURIComponent(name)), released: r.leaseStart === 0, ...(r.handedFrom ? { handedFrom: r.handedFrom } : {}) }))
        .sort((a, b) => a.name.localeCompare(b.name)),
    };
  }

  /** Leaves the cluster: revokes the lease (what this node owned is free at once). */
  async close(): Promise<void> {
    this.closed = true;
    await this.current?.close().catch(() => undefined);
    this.client.close();
  }

  private newSession(): Promise<EtcdSession> {
    return EtcdSession.start({ client: this.client, identity: this.o.identity, ttlMs: this.o.ttlMs, prefix: this.prefix, onLost: (err, s) => this.lost(err, s) });
  }

  /** A session's lease is lost: when it is the node's current one, the node fences and joins again (a session lost while it was being started is rejected by its start instead). */
  private lost(err: Error, s: EtcdSession): void {
    if (this.closed || this.restarting || s !== this.current) return;
    this.o.log.error({ err: err.message }, "etcd lease lost: this node fences what it owned and joins again");
    for (const f of this.lostListeners) f(err);
    void this.rejoin();
  }

  /** Starts new sessions until one is granted (backoff 200 ms doubling to 5 s); resolves then (or when closed). */
  private rejoin(first = false): Promise<void> {
    if (this.closed || this.restarting) return Promise.resolve();
    this.restarting = true;
    return (async () => {
      for (let delay = 200; !this.closed; delay = Math.min(delay * 2, 5000)) {
        try {
          const s = await this.newSession();
          if (this.closed) {
            await s.close().catch(() => undefined);
            break;
          }
          this.current = s;
          if (first) this.o.log.info({ etcd: this.o.endpoints, prefix: this.prefix, lease: s.leaseId, ttl: s.ttlSeconds, marginMs: s.marginMs }, "joined the etcd cluster");
          else this.o.log.warn({ lease: s.leaseId }, "joined the etcd cluster (a new session)");
          break;
        } catch (e) {
          this.o.log.warn({ err: (e as Error).message }, "cannot join etcd yet; trying again");
          await new Promise((r) => setTimeout(r, delay));
        }
      }
      this.restarting = false;
    })();
  }
}
