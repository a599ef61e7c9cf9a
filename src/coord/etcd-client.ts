import {
  decodeDelete,
  decodeHeader,
  decodePut,
  decodeRange,
  decodeTxn,
  encodeDelete,
  encodePut,
  encodeRange,
  encodeTxn,
  id,
  num,
  showKey,
  toBuffer,
  type Bytes,
  type DeleteOptions,
  type DeleteResult,
  type GetOptions,
  type GetResult,
  type KeyValue,
  type LeaseTimeToLive,
  type PutOptions,
  type PutResult,
  type ResponseHeader,
  type TxnRequest,
  type TxnResult,
} from "./etcd-codec.js";
import { EtcdError, type EtcdAttempt } from "./etcd-errors.js";
import { EtcdTransport, type EtcdTransportOptions } from "./etcd-transport.js";
import { LeaseKeeper, type KeepAliveOptions, type LeaseGrant, type Renewal } from "./lease-keeper.js";
import { Watcher, type WatchOptions } from "./etcd-watch.js";

export * from "./etcd-codec.js";
export { EtcdError, type EtcdErrorCode, type EtcdAttempt } from "./etcd-errors.js";
export type { EtcdTlsOptions, EtcdAuthOptions } from "./etcd-transport.js";
export { LeaseKeeper, type KeepAliveOptions, type LeaseGrant } from "./lease-keeper.js";
export { Watcher, type WatchOptions, type WatchStatus } from "./etcd-watch.js";

export type EtcdClientOptions = EtcdTransportOptions;

/** One member's view, from its status call. */
export interface MemberStatus {
  endpoint: string;
  header: ResponseHeader;
  version: string;
  /** Member id of the leader this member follows ("0": none). */
  leader: string;
  raftIndex: number;
  raftTerm: string;
  dbSize: number;
}

const now = () => performance.now();

/**
 * An etcd v3 client over etcd's JSON gateway (etcd ≥ 3.4), with Node's http/https and nothing
 * else. What it guarantees is in README.md; the wire rules (timeouts, fail-over, which calls are
 * sent again) in etcd-transport.ts.
 */
export class EtcdClient {
  private readonly t: EtcdTransport;
  private readonly keepers = new Set<LeaseKeeper>();
  private readonly watchers = new Set<Watcher>();

  constructor(o: EtcdClientOptions) {
    this.t = new EtcdTransport(o);
  }

  get endpoints(): readonly string[] {
    return this.t.endpoints;
  }

  /** The member calls go to first (the last one that answered). */
  get preferredEndpoint(): string {
    return this.t.preferred();
  }

  // ——— keys ———

  async get(key: Bytes, o: GetOptions = {}): Promise<GetResult> {
    const { json } = await this.t.call("/v3/kv/range", encodeRange(key, o), { op: `get ${showKey(key)}${o.prefix ? " (prefix)" : ""}`, mutation: false });
    return decodeRange(json);
  }

  /** The key's current value and revisions, or null when it does not exist. */
  async getOne(key: Bytes, o: Omit<GetOptions, "prefix" | "rangeEnd" | "limit"> = {}): Promise<KeyValue | null> {
    const r = await this.get(key, o);
    return r.kvs[0] ?? null;
  }

  async put(key: Bytes, value: Bytes, o: PutOptions = {}): Promise<PutResult> {
    const { json } = await this.t.call("/v3/kv/put", encodePut(key, value, o), { op: `put ${showKey(key)}`, mutation: true });
    return decodePut(json);
  }

  async delete(key: Bytes, o: DeleteOptions = {}): Promise<DeleteResult> {
    const { json } = await this.t.call("/v3/kv/deleterange", encodeDelete(key, o), { op: `delete ${showKey(key)}${o.prefix ? " (prefix)" : ""}`, mutation: true });
    return decodeDelete(json);
  }

  /**
   * If every comparison holds, runs `success`, else `failure`, atomically at one revision. A txn
   * with only gets and no puts or deletes is a read and is retried like one.
   */
  async txn(t: TxnRequest): Promise<TxnResult> {
    const ops = [...(t.success ?? []), ...(t.failure ?? [])];
    const mutation = ops.some((o) => o.type !== "get");
    const keys = [...new Set([...(t.compare ?? []).map((c) => showKey(c.key)), ...ops.map((o) => showKey(o.key))])];
    const { json } = await this.t.call("/v3/kv/txn", encodeTxn(t), { op: `txn on ${keys.slice(0, 3).join(", ")}${keys.length > 3 ? ", …" : ""}`, mutation });
    return decodeTxn(json);
  }

  // ——— leases ———

  /** Grants a lease of `ttlSeconds` (etcd may raise it to its minimum; the grant says what it gave). */
  async grantLease(ttlSeconds: number, o: { id?: string } = {}): Promise<LeaseGrant> {
    if (!Number.isInteger(ttlSeconds) || ttlSeconds <= 0) throw new TypeError(`lease TTL must be a whole number of seconds > 0, got ${ttlSeconds}`);
    const grantedAt = now();
    const body: Record<string, unknown> = { TTL: String(ttlSeconds) };
    if (o.id !== undefined) body.ID = o.id;
    const { json } = await this.t.call("/v3/lease/grant", body, { op: `grant a ${ttlSeconds} s lease`, mutation: true });
    if (typeof json.error === "string" && json.error) throw new EtcdError("ETCD_SERVER", "grant lease", json.error);
    return { id: id(json.ID), ttl: num(json.TTL, "TTL"), grantedAt };
  }

  /** Renews a lease once: the TTL it was reset to and when the renewal was sent, or null when the lease is gone. */
  async keepAliveOnce(leaseId: string, o: { timeoutMs?: number; attemptTimeoutMs?: number; onFailure?: (a: EtcdAttempt) => void } = {}): Promise<Renewal> {
    const sentAt = now();
    const { json } = await this.t.call("/v3/lease/keepalive", { ID: leaseId }, { op: `keep lease ${leaseId} alive`, mutation: false, timeoutMs: o.timeoutMs, attemptTimeoutMs: o.attemptTimeoutMs, onFailure: o.onFailure });
    const ttl = num(json.TTL, "TTL");
    return ttl > 0 ? { ttl, sentAt } : null;
  }

  /** Keeps a lease alive until stopped, lost or the client is closed: see LeaseKeeper. */
  keepAlive(lease: LeaseGrant, o: KeepAliveOptions = {}): LeaseKeeper {
    // One silent member must not use up the time left: each gets a share of it, so a renewal
    // reaches another member before the deadline (a 2 s lease has 1.33 s left at each renewal).
    const renew = (leaseId: string, leftMs: number, onFailure: (error: string) => void) =>
      this.keepAliveOnce(leaseId, {
        timeoutMs: Math.max(1, Math.min(leftMs, this.t.timeoutMs)),
        attemptTimeoutMs: Math.min(this.t.attemptTimeoutMs, Math.max(200, leftMs / this.t.endpoints.length)),
        onFailure: (a) => onFailure(`${a.endpoint}: ${a.error}`),
      });
    const k = new LeaseKeeper(lease, renew, o);
    this.keepers.add(k);
    void k.done.then(() => this.keepers.delete(k));
    return k;
  }

  /** Revokes a lease (its keys are deleted at once); false when it was gone already. */
  async revokeLease(leaseId: string): Promise<boolean> {
    try {
      await this.t.call("/v3/lease/revoke", { ID: leaseId }, { op: `revoke lease ${leaseId}`, mutation: false });
      return true;
    } catch (err) {
      if (err instanceof EtcdError && err.code === "ETCD_LEASE_NOT_FOUND") return false;
      throw err;
    }
  }

  /** A lease's remaining and granted TTL (and its keys, with `keys`), or null when it is gone. */
  async leaseTimeToLive(leaseId: string, o: { keys?: boolean } = {}): Promise<LeaseTimeToLive | null> {
    const { json } = await this.t.call("/v3/lease/timetolive", { ID: leaseId, keys: o.keys === true }, { op: `time to live of lease ${leaseId}`, mutation: false });
    const ttl = num(json.TTL, "TTL");
    if (ttl < 0) return null;
    return { id: id(json.ID), ttl, grantedTtl: num(json.grantedTTL, "grantedTTL"), keys: ((json.keys as string[]) ?? []).map((k) => Buffer.from(k, "base64")) };
  }

  // ——— watches ———

  /** Watches a key (or a prefix, or a range) from a revision: see Watcher. */
  watch(key: Bytes, o: WatchOptions): Watcher {
    toBuffer(key);
    const w = new Watcher(this.t, key, o);
    this.watchers.add(w);
    void w.done.then(() => this.watchers.delete(w));
    return w;
  }

  // ——— cluster ———

  /** One member's status (`endpoint`), or the first member that answers. */
  async status(endpoint?: string, o: { timeoutMs?: number } = {}): Promise<MemberStatus> {
    const { json, endpoint: ep } = await this.t.call("/v3/maintenance/status", {}, { op: `status${endpoint ? ` of ${endpoint}` : ""}`, mutation: false, endpoint, timeoutMs: o.timeoutMs });
    return {
      endpoint: ep,
      header: decodeHeader(json.header),
      version: String(json.version ?? ""),
      leader: id(json.leader),
      raftIndex: num(json.raftIndex, "raftIndex"),
      raftTerm: id(json.raftTerm),
      dbSize: num(json.dbSize, "dbSize"),
    };
  }

  /**
   * Any other gateway call, e.g. `request("/v3/auth/user/add", {name, password}, {mutation: true})`
   * or `request("/v3/cluster/member/list", {})`: the JSON answer, with the same timeouts,
   * fail-over and auth as every call.
   */
  async request(path: string, body: Record<string, unknown>, o: { mutation: boolean; endpoint?: string; timeoutMs?: number }): Promise<Record<string, unknown>> {
    const { json } = await this.t.call(path, body, { op: `POST ${path}`, ...o });
    return json;
  }

  /** Stops every keeper (leases are left to expire) and watch, and closes every connection. */
  close(): void {
    for (const k of this.keepers) k.stop();
    for (const w of this.watchers) w.close();
    this.t.close();
  }
}
