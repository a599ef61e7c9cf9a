import { DEFAULT_TTL_MS, describeRecord, HANDED_FROM_MAX, handedFromAfter, handedOn, LeaseError, type LeaseRecord, type NodeIdentity } from "../migration/lease.js";
import type { HandedView, MoveNotice, Ownership } from "../migration/ownership.js";
import { EtcdError, compare, op, type Compare, type KeyValue, type TxnOp, type Watcher } from "./etcd-client.js";
import type { EtcdSession } from "./etcd-session.js";

export { EtcdSession, type EtcdSessionOptions, type MemberInfo } from "./etcd-session.js";

/** The record and its liveness key as read at one revision. */
interface State {
  rec: LeaseRecord | null;
  recKv: KeyValue | null;
  /** PREFIX/exports/NAME/owner: present while the process that may write (or was handed the lease) lives. */
  live: KeyValue | null;
  revision: number;
}

/** A change: the new record, what happens to the liveness key, and what else must hold. */
interface Write {
  record: LeaseRecord;
  /** Bind the liveness key to this etcd lease, delete it, or leave it (undefined). */
  live?: { lease: string } | "delete";
  compare?: Compare[];
}

type Plan<T> = { done: T } | { write: Write; result: T };

/**
 * The ownership record of export `name` in etcd, for nodes on several hosts (one object per
 * export per node process, all sharing the process's `EtcdSession`). Keys:
 * - PREFIX/exports/NAME/record: the LeaseRecord (JSON), bound to no lease, so its epoch outlives
 *   every owner; changed only by transactions that compare its modRevision.
 * - PREFIX/exports/NAME/owner: the liveness key, bound to the etcd lease of the process that may
 *   write the image (after a hand-over: of the peer's process, until it claims). Its absence is
 *   what "expired" means: etcd deleted it when that lease ran out, or the owner released it.
 *
 * Rules (README.md, "Ownership in etcd"): a change of owner happens only by a transaction that
 * finds the record at the revision it read, and — unless the record names this process already
 * or is exactly an unclaimed hand-over — the liveness key absent; epochs only grow; an owner acts
 * on its lease only until `session.deadline()`; `renew` renews the session's etcd lease itself,
 * so a caller may trust it for its lease time counted from before the call, minus the margin.
 */
export class EtcdOwnership implements Ownership {
  readonly recordKey: string;
  readonly liveKey: string;
  /** The owner's announcement of a move it starts (announceMove), bound to its session's lease. */
  readonly nextKey: string;
  private readonly prefix: string;
  private queue: Promise<unknown> = Promise.resolve();
  /** The record and liveness key as this object last read or wrote them (a change may start from it: see cas). */
  private cached: State | null = null;
  /** A peer's membership read before a move's hold (prepareHandOver), used once by handOver. */
  private peerHint: { nodeId: string; member: Awaited<ReturnType<EtcdSession["member"]>> } | null = null;

  /**
   * `session`: the node process's session, or something that holds the current one (a node that
   * lost its lease starts a new session; its records name the old one's lease, so they are not
   * "mine" any more and the node must take or be handed the export again, at a new epoch).
   */
  constructor(
    private readonly ref: EtcdSession | { readonly session: EtcdSession; readonly prefix: string },
    readonly name: string,
  ) {
    // The prefix is known before a session is (a node that has not joined etcd yet).
    this.prefix = ref.prefix;
    const base = `${this.prefix}/exports/${encodeURIComponent(name)}`;
    this.recordKey = `${base}/record`;
    this.liveKey = `${base}/owner`;
    this.nextKey = `${base}/next`;
  }

  get session(): EtcdSession {
    return "session" in this.ref ? this.ref.session : this.ref;
  }

  get where(): string {
    return `etcd ${this.prefix}/exports/${encodeURIComponent(this.name)}`;
  }

  /** Until when (performance.now()) this process may write what it owns: its session's deadline. */
  deadline(): number {
    return this.session.deadline();
  }

  read(): Promise<LeaseRecord | null> {
    return this.serial(async () => (await this.load()).rec);
  }

  /** Takes the lease if the record is absent, released, expired (no liveness key), or this process's already. */
  acquire(me: NodeIdentity, ttlMs = DEFAULT_TTL_MS): Promise<LeaseRecord> {
    return this.serial(() =>
      this.cas<LeaseRecord>((st) => {
        const cur = st.rec;
        const same = !!cur && this.mine(cur, me);
        if (cur && cur.owner !== me.nodeId && cur.private) throw new LeaseError(`image is a copy; its data is owned by ${cur.owner} (epoch ${cur.epoch}) and no other node takes it`, cur);
        if (cur && !same && st.live)
          throw new LeaseError(`image is owned by ${cur.owner} (epoch ${cur.epoch}${cur.owner === me.nodeId ? `, an earlier process ${cur.pid ?? ""}` : ""}); its etcd lease has not expired`, cur);
        const epoch = !cur ? 1 : same ? cur.epoch : cur.epoch + 1;
        const record = { ...this.record(me, epoch, ttlMs), ...(cur?.owner === me.nodeId && cur.private ? { private: true } : {}), ...(same && cur.handedFrom ? { handedFrom: cur.handedFrom } : handedOn(cur)) };
        return { write: { record, live: { lease: this.session.leaseId }, compare: same ? [] : [compare.absent(this.liveKey)] }, result: record };
      }),
    );
  }

  /**
   * Renews this process's etcd lease (one keep-alive, sent after the call started) and checks, by
   * a linearizable read, that the record names me at `epoch`. A hand-over to my node not claimed
   * yet is claimed here: the record gets this process (pid, host, holder) and the liveness key
   * this process's lease, by a transaction on the record's revision — after it the source cannot
   * reclaim. A lost session lease is a lost lease (LeaseError).
   */
  renew(me: NodeIdentity, epoch: number, from?: HandedView): Promise<LeaseRecord> {
    return this.serial(async () => {
      const plan = (st: State): Plan<LeaseRecord> => {
        const cur = st.rec;
        const prev = from?.prev;
        if (prev && cur && st.recKv && st.live && cur.epoch + 1 === epoch && JSON.stringify(cur) === JSON.stringify(prev)) {
          // A hand-over its source planned and did not write (planHandOver): the source's record
          // is still exactly as it was when it stopped writing, its process alive (the liveness
          // key, compared by revision): this transaction is the hand-over and its claim at once.
          const record: LeaseRecord = { ...from!.record, nbd: me.nbd, control: me.control, leaseStart: this.session.wall(), serial: (from!.record.serial ?? 0) + 1, pid: this.session.pid, host: this.session.host, holder: this.session.leaseId };
          return { write: { record, live: { lease: this.session.leaseId }, compare: [compare.value(this.recordKey, "==", st.recKv.value)] }, result: record };
        }
        if (!cur || !this.mine(cur, me) || cur.epoch !== epoch) throw new LeaseError(`lease lost: record is ${describeRecord(cur)}, expected ${me.nodeId}@${epoch}`, cur);
        if (cur.leaseStart === 0) throw new LeaseError(`lease lost: record ${describeRecord(cur)} was released`, cur);
        if (cur.holder === this.session.leaseId) {
          if (st.live?.lease !== this.session.leaseId) throw new LeaseError(`lease lost: the liveness key of ${describeRecord(cur)} is ${st.live ? `bound to lease ${st.live.lease}` : "gone"}`, cur);
          if (cur.nbd === me.nbd && cur.control === me.control) return { done: cur };
          // The addresses peers need, known only once the node listens: written once.
          const record: LeaseRecord = { ...cur, nbd: me.nbd, control: me.control };
          return { write: { record }, result: record };
        }
        // The claim of a hand-over to this node. The record's value is compared too: a claim
        // started from the source's report (see below) keeps every field the source wrote.
        const record: LeaseRecord = { ...cur, nbd: me.nbd, control: me.control, leaseStart: this.session.wall(), serial: (cur.serial ?? 0) + 1, pid: this.session.pid, host: this.session.host, holder: this.session.leaseId };
        return { write: { record, live: { lease: this.session.leaseId }, compare: st.recKv ? [compare.value(this.recordKey, "==", st.recKv.value)] : [] }, result: record };
      };
      // A claim that starts from the hand-over as its source wrote it needs no read: its
      // transaction compares that revision (a stale or wrong view fails it, and the claim is then
      // decided on what etcd answered), and goes with the keep-alive — one round trip inside a
      // move's hold. A put bound to a lease etcd no longer has fails, so a claim never outlives
      // the session it names. Otherwise the keep-alive and the read go together (one round trip):
      // a record read before etcd got the keep-alive is still a linearizable read of it, and a
      // change decided on it compares the liveness key too, which is gone if the lease was.
      const view = from && from.record.owner === me.nodeId && from.record.epoch === epoch ? this.stateOf(from) : null;
      if (view) this.cached = view;
      const deciding = view ? this.cas<LeaseRecord>(plan, { cached: true }) : this.load();
      deciding.catch(() => undefined);
      try {
        await this.session.renewLease();
      } catch (err) {
        if (!this.session.lost) throw err; // etcd cannot say now: nothing decided
        // The record, for the message, if etcd answers soon (a node cut off from etcd learns nothing more).
        if (view) await deciding.catch(() => undefined); // a claim in flight: its outcome first (one change at a time); a read is not waited for
        const seen = await Promise.race([this.load().then((s) => s.rec, () => null), new Promise<null>((r) => setTimeout(r, 250, null))]);
        throw new LeaseError(`lease lost: this process's etcd lease ${this.session.leaseId} is gone (${this.session.lost.message})`, seen);
      }
      if (view) return (await deciding) as LeaseRecord;
      return this.cas<LeaseRecord>(plan, { first: deciding as Promise<State> });
    });
  }

  /**
   * The revision at which this object last wrote or read `record` (exactly that record), or
   * undefined: a hand-over's peer can claim from it without reading (renew's `from`).
   */
  revisionOf(record: LeaseRecord): number | undefined {
    const c = this.cached;
    return c?.recKv && c.rec && JSON.stringify(c.rec) === JSON.stringify(record) ? c.recKv.modRevision : undefined;
  }

  /**
   * The state a hand-over to this process left, as its source reports it: its record and liveness
   * key as the hand-over wrote them at `at`, or (planned, not written) the source's own record at
   * `at` and its liveness key at `liveAt`.
   */
  private stateOf(from: HandedView): State {
    const kv = (key: string, value: string, lease: string, rev: number): KeyValue => ({ key: Buffer.from(key), value: Buffer.from(value), createRevision: 0, modRevision: rev, version: 0, lease });
    const rec = from.prev ?? from.record;
    const lease = from.prev ? (from.prev.holder ?? "0") : this.session.leaseId;
    const live = JSON.stringify({ owner: rec.owner, epoch: rec.epoch, lease });
    return { rec, recKv: kv(this.recordKey, JSON.stringify(rec), "0", from.at), live: kv(this.liveKey, live, lease, from.prev ? (from.liveAt ?? 0) : from.at), revision: from.at };
  }

  handedTo(me: NodeIdentity): Promise<number | null> {
    return this.serial(async () => {
      const r = (await this.load()).rec;
      return r && r.owner === me.nodeId && r.holder === undefined && !r.private && r.leaseStart !== 0 ? r.epoch : null;
    });
  }

  /**
   * Hands my lease (at `epoch`) to `to` at epoch + 1. The liveness key is bound to the etcd lease
   * of `to`'s live process (its membership key, compared in the same transaction), so an unclaimed
   * hand-over expires when that process dies. Rejects (code ENOPEER) when `to` has no live process.
   */
  handOver(me: NodeIdentity, epoch: number, to: NodeIdentity, ttlMs = DEFAULT_TTL_MS, privateCopy = false): Promise<LeaseRecord> {
    return this.serial(() =>
      this.cas<LeaseRecord>(async (st) => {
        const cur = st.rec;
        if (!cur || !this.mine(cur, me) || cur.epoch !== epoch) throw new LeaseError(`cannot hand over: record is ${describeRecord(cur)}, expected ${me.nodeId}@${epoch}`, cur);
        const hint = this.peerHint?.nodeId === to.nodeId ? this.peerHint.member : undefined;
        this.peerHint = null;
        const peer = hint !== undefined ? hint : await this.session.member(to.nodeId);
        if (!peer) throw Object.assign(new Error(`cannot hand ${this.name} over: node ${to.nodeId} has no live process in etcd (no ${this.session.memberKey(to.nodeId)})`), { code: "ENOPEER" });
        const handedFrom = handedFromAfter(cur);
        const record: LeaseRecord = { image: this.name, owner: to.nodeId, nbd: to.nbd, control: to.control, epoch: epoch + 1, leaseStart: this.session.wall(), ttlMs, serial: 0, handedFrom, ...(privateCopy ? { private: true } : {}) };
        const memberKey = this.session.memberKey(to.nodeId);
        return { write: { record, live: { lease: peer.info.leaseId }, compare: [compare.modRevision(memberKey, "==", peer.kv.modRevision)] }, result: record };
      }, { cached: true }),
    );
  }

  /**
   * A hand-over that writes nothing (see Ownership.planHandOver): decided on the record as this
   * object last read or wrote it (read now if it has none, or if that does not name this process
   * at `epoch`), and on `to`'s membership (prepareHandOver's, else read: ENOPEER when `to` has no
   * live process). The peer's claim compares the record and this process's liveness key by
   * revision, so a view that was stale only makes that claim read and refuse.
   */
  planHandOver(me: NodeIdentity, epoch: number, to: NodeIdentity, ttlMs = DEFAULT_TTL_MS): Promise<{ record: LeaseRecord; view: HandedView }> {
    return this.serial(async () => {
      const ok = (st: State | null) => !!st?.rec && !!st.recKv && this.mine(st.rec, me) && st.rec.epoch === epoch && st.rec.holder === this.session.leaseId && st.live?.lease === this.session.leaseId;
      let st = this.cached;
      if (!ok(st)) st = await this.load();
      const cur = st!.rec;
      if (!ok(st)) throw new LeaseError(`cannot hand over: record is ${describeRecord(cur)}, expected ${me.nodeId}@${epoch} held by this process`, cur);
      const hint = this.peerHint?.nodeId === to.nodeId ? this.peerHint.member : undefined;
      this.peerHint = null;
      const peer = hint !== undefined ? hint : await this.session.member(to.nodeId);
      if (!peer) throw Object.assign(new Error(`cannot hand ${this.name} over: node ${to.nodeId} has no live process in etcd (no ${this.session.memberKey(to.nodeId)})`), { code: "ENOPEER" });
      const record: LeaseRecord = { image: this.name, owner: to.nodeId, nbd: to.nbd, control: to.control, epoch: epoch + 1, leaseStart: this.session.wall(), ttlMs, serial: 0, handedFrom: handedFromAfter(cur!) };
      return { record, view: { record, at: st!.recKv!.modRevision, prev: cur!, liveAt: st!.live!.modRevision } };
    });
  }

  /**
   * Reads `to`'s membership before a move's hold begins, so that the hand-over inside the hold is
   * one transaction: it starts from the record as this object last saw it and from this
   * membership, and compares both (a stale one fails the transaction: it reads and decides again).
   */
  async prepareHandOver(to: NodeIdentity): Promise<void> {
    try {
      this.peerHint = { nodeId: to.nodeId, member: await this.session.member(to.nodeId) };
    } catch {
      this.peerHint = null; // read inside the hand-over then
    }
  }

  /**
   * Takes the export over once no process holds it (the liveness key is gone: its lease expired,
   * or it was released): null while one does, and for another node's private copy. A record that
   * names this very process with a live key is returned as it is (a change of ours whose answer
   * was lost, applied after all).
   */
  takeOver(me: NodeIdentity, ttlMs = DEFAULT_TTL_MS): Promise<LeaseRecord | null> {
    return this.serial(() =>
      this.cas<LeaseRecord | null>((st) => {
        const cur = st.rec;
        if (cur && cur.owner === me.nodeId && cur.holder === this.session.leaseId && cur.leaseStart !== 0 && st.live?.lease === this.session.leaseId) return { done: cur };
        if (st.live || (cur?.private && cur.owner !== me.nodeId)) return { done: null };
        const record = { ...this.record(me, (cur?.epoch ?? 0) + 1, ttlMs), ...(cur?.private ? { private: true } : {}), ...handedOn(cur) };
        return { write: { record, live: { lease: this.session.leaseId }, compare: [compare.absent(this.liveKey)] }, result: record };
      }),
    );
  }

  /**
   * Takes the lease back after a hand-over that did not complete: only while the record is still
   * that hand-over unclaimed, or names me, or no process holds it. Bumps the epoch.
   */
  reclaim(me: NodeIdentity, handed: LeaseRecord, ttlMs = DEFAULT_TTL_MS): Promise<LeaseRecord> {
    return this.serial(() =>
      this.cas<LeaseRecord>((st) => {
        const cur = st.rec;
        const untouched = !!cur && cur.owner === handed.owner && cur.epoch === handed.epoch && cur.holder === undefined && (cur.serial ?? 0) === (handed.serial ?? 0);
        const mine = !!cur && this.mine(cur, me);
        if (cur && !untouched && !mine && st.live) throw new LeaseError(`cannot reclaim: record is ${describeRecord(cur)}${cur.owner === handed.owner && cur.epoch === handed.epoch ? ", claimed by it" : ""}`, cur);
        const handedFrom = untouched || mine ? cur!.handedFrom : handedOn(cur).handedFrom;
        const record = { ...this.record(me, (cur?.epoch ?? handed.epoch) + 1, ttlMs), ...(handedFrom ? { handedFrom } : {}) };
        return { write: { record, live: { lease: this.session.leaseId }, compare: untouched || mine || !cur ? [] : [compare.absent(this.liveKey)] }, result: record };
      }),
    );
  }

  /**
   * Gives up my lease at `epoch`: deletes the liveness key (any node may take the export at once)
   * and marks the record released (leaseStart 0); `clean` appends me@epoch to handedFrom, which
   * the next owner keeps. Nothing happens if the record does not name me at `epoch`.
   */
  release(me: NodeIdentity, epoch: number, clean = false): Promise<void> {
    return this.serial(() =>
      this.cas<void>((st) => {
        const cur = st.rec;
        if (!cur || !this.mine(cur, me) || cur.epoch !== epoch) return { done: undefined };
        const handedFrom = clean ? handedFromAfter(cur) : undefined;
        const { handedFrom: _was, ...rest } = cur;
        return { write: { record: { ...rest, leaseStart: 0, ...(handedFrom ? { handedFrom } : {}) }, live: "delete" }, result: undefined };
      }),
    );
  }

  /**
   * Only while the record names `who` at `epoch` (else LeaseError): sets `handedFrom` (when given)
   * and, when `who` is this process's own node, marks the record private (the image is its own
   * copy: no other node takes it over). Assigning another node (a live copy's destination naming
   * its source) never marks it private: that node's image may be shared with others.
   */
  assign(who: NodeIdentity, epoch: number, _ttlMs = DEFAULT_TTL_MS, handedFrom?: string[]): Promise<LeaseRecord> {
    return this.serial(() =>
      this.cas<LeaseRecord>((st) => {
        const cur = st.rec;
        if (!cur || cur.owner !== who.nodeId || cur.epoch !== epoch) throw new LeaseError(`cannot assign ${who.nodeId}@${epoch}: record is ${describeRecord(cur)}`, cur);
        const record: LeaseRecord = { ...cur, ...(who.nodeId === this.session.identity.nodeId ? { private: true } : {}), ...(handedFrom?.length ? { handedFrom: handedFrom.slice(-HANDED_FROM_MAX) } : {}) };
        if (JSON.stringify(record) === JSON.stringify(cur)) return { done: cur };
        return { write: { record }, result: record };
      }),
    );
  }

  /**
   * Calls `onChange` with the record as read when the watch starts (so nothing between this call
   * and the stream is missed), then with each new version of it (null: deleted), in order, and
   * with the record as it stands when the liveness key goes (its owner's lease ended or was
   * released: nodes may take the export over now). After a compaction it reads again and goes on
   * from there. Returns a function that stops it.
   */
  watch(onChange: (r: LeaseRecord | null, ownerGone?: boolean) => void, onMove?: (n: MoveNotice) => void): () => void {
    let stopped = false;
    let w: Watcher | null = null;
    let last: Buffer | null = null;
    const deliver = (value: Buffer | null, ownerGone = false) => {
      if (stopped) return;
      last = value;
      let r: LeaseRecord | null;
      try {
        r = value === null ? null : parseRecord(value, this.recordKey);
      } catch {
        return; // not a record: nothing to tell
      }
      onChange(r, ownerGone);
    };
    const base = this.recordKey.slice(0, this.recordKey.lastIndexOf("/") + 1);
    const start = async (): Promise<void> => {
      for (let delay = 100; !stopped; delay = Math.min(delay * 2, 2000)) {
        try {
          const r = await this.session.client.get(this.recordKey);
          if (stopped) return;
          deliver(r.kvs[0]?.value ?? null);
          w = this.session.client.watch(base, {
            prefix: true,
            startRevision: r.header.revision + 1,
            onEvents: (events) => {
              let recordAt = -1; // a change of the record and its liveness key in one transaction is told once
              for (const e of events) {
                const key = e.kv.key.toString();
                if (key === this.recordKey) {
                  recordAt = e.kv.modRevision;
                  deliver(e.type === "put" ? e.kv.value : null);
                } else if (key === this.liveKey && e.type === "delete" && e.kv.modRevision !== recordAt) deliver(last, true);
                else if (key === this.nextKey && e.type === "put" && onMove && !stopped) {
                  const n = parseNotice(e.kv.value);
                  if (n) onMove(n);
                }
              }
            },
            onCompacted: () => void start(),
            onError: () => void start(),
          });
          return;
        } catch {
          await new Promise((res) => setTimeout(res, delay));
        }
      }
    };
    void start();
    return () => {
      stopped = true;
      w?.close();
    };
  }

  /**
   * Writes the move notice (MoveNotice) under the export, bound to this process's etcd lease: one
   * put, outside any transaction and outside the move's hold. Watchers act on it only while the
   * record still names `from`; a later notice replaces it.
   */
  async announceMove(me: NodeIdentity, epoch: number, to: NodeIdentity): Promise<void> {
    const n: MoveNotice = { from: `${me.nodeId}@${epoch}`, to: to.nodeId, nbd: to.nbd };
    await this.session.client.put(this.nextKey, JSON.stringify(n), { lease: this.session.leaseId });
  }

  // ——— internals ———

  /** The record names me and this process, or no process yet (a hand-over to my node, unclaimed). */
  private mine(r: LeaseRecord, me: NodeIdentity): boolean {
    return r.owner === me.nodeId && (r.holder === undefined || r.holder === this.session.leaseId);
  }

  private record(who: NodeIdentity, epoch: number, ttlMs: number): LeaseRecord {
    const s = this.session;
    return { image: this.name, owner: who.nodeId, nbd: who.nbd, control: who.control, epoch, leaseStart: s.wall(), ttlMs, serial: 0, pid: s.pid, host: s.host, holder: s.leaseId };
  }

  /** One call at a time, in order (the interface's rule); a failed call does not stop the next. */
  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const p = this.queue.then(() => fn());
    this.queue = p.catch(() => {});
    return p;
  }

  /** Record and liveness key at one revision (a linearizable read). */
  private async load(): Promise<State> {
    const r = await this.session.client.txn({ success: [op.get(this.recordKey), op.get(this.liveKey)] });
    const kvOf = (i: number) => {
      const x = r.results[i];
      return x?.type === "get" ? (x.kvs[0] ?? null) : null;
    };
    const recKv = kvOf(0);
    return (this.cached = { rec: recKv ? parseRecord(recKv.value, this.recordKey) : null, recKv, live: kvOf(1), revision: r.header.revision });
  }

  /**
   * Reads, decides (`plan` throws LeaseError, or answers, or asks for a change) and applies the
   * change by a transaction on the record's and the liveness key's revisions; when another change
   * came first, decides again on the state that transaction's answer carries. `first`: a read
   * already under way. `cached`: start from the state this object last read or wrote, without a
   * read — only a change may be decided on it (the transaction compares what it saw); an answer
   * or a refusal is given on a fresh read only.
   */
  private async cas<T>(plan: (st: State) => Plan<T> | Promise<Plan<T>>, o: { first?: Promise<State>; cached?: boolean } = {}): Promise<T> {
    let fromCache = o.cached === true && this.cached !== null && !o.first;
    let st = fromCache ? this.cached! : await (o.first ?? this.load());
    for (let round = 1; ; round++) {
      let p: Plan<T>;
      try {
        p = await plan(st);
      } catch (err) {
        if (!fromCache) throw err;
        p = { done: undefined as T }; // decided on the cache: read and decide again
      }
      if ("done" in p) {
        if (!fromCache) return p.done;
        st = await this.load();
        fromCache = false;
        continue;
      }
      const r = await this.apply(st, p.write);
      if (r.applied) return p.result;
      if (round >= 20) throw Object.assign(new Error(`${this.where}: the record kept changing under ${round} attempts; try again later`), { code: "EBUSY" });
      st = r.now ?? (await this.load());
      fromCache = false;
    }
  }

  /**
   * One transaction: the record and the liveness key still at the revisions read (or still absent)
   * and `w.compare` → the new record and liveness key. Either way it reads both back in the same
   * transaction: what this object knows next. When its outcome is unknown, the record is read
   * back: exactly what was written (the record carries a wall-clock stamp, the liveness key the
   * lease) counts as applied; anything else rejects with the original error (nothing decided).
   */
  private async apply(st: State, w: Write): Promise<{ applied: boolean; now?: State }> {
    // A lease this process called lost binds nothing more: etcd may still hold it (a new leader
    // extends leases; a revocation waits for etcd), and would take a claim made with it — for an
    // owner that writes nothing, until etcd ends the lease (nemesis on the lab, seed 20).
    const lost = this.session.lost;
    if (lost && typeof w.live === "object" && w.live.lease === this.session.leaseId)
      throw new LeaseError(`lease lost: this process's etcd lease ${this.session.leaseId} is gone (${lost.message}); nothing is claimed with it`, st.rec);
    this.cached = null; // until this transaction's answer says what is there
    const value = JSON.stringify(w.record);
    const ops: TxnOp[] = [op.put(this.recordKey, value)];
    if (w.live === "delete") ops.push(op.delete(this.liveKey));
    else if (w.live) ops.push(op.put(this.liveKey, JSON.stringify({ owner: w.record.owner, epoch: w.record.epoch, lease: w.live.lease }), { lease: w.live.lease }));
    const cmp = [
      st.recKv ? compare.modRevision(this.recordKey, "==", st.recKv.modRevision) : compare.absent(this.recordKey),
      st.live ? compare.modRevision(this.liveKey, "==", st.live.modRevision) : compare.absent(this.liveKey),
      ...(w.compare ?? []),
    ];
    const reads = [op.get(this.recordKey), op.get(this.liveKey)];
    try {
      const r = await this.session.client.txn({ compare: cmp, success: [...ops, ...reads], failure: reads });
      const at = r.succeeded ? ops.length : 0;
      const kvOf = (i: number) => {
        const x = r.results[at + i];
        return x?.type === "get" ? (x.kvs[0] ?? null) : null;
      };
      const recKv = kvOf(0);
      const now: State = { rec: recKv ? parseRecord(recKv.value, this.recordKey) : null, recKv, live: kvOf(1), revision: r.header.revision };
      this.cached = now;
      return { applied: r.succeeded, now };
    } catch (err) {
      if (!(err instanceof EtcdError && err.code === "ETCD_OUTCOME_UNKNOWN")) throw err;
      const now = await this.load().catch(() => null);
      const liveOk = w.live === undefined || (w.live === "delete" ? !now?.live : now?.live?.lease === w.live.lease);
      if (now?.recKv?.value.toString() === value && liveOk) return { applied: true };
      throw err;
    }
  }
}

function parseRecord(value: Buffer, key: string): LeaseRecord {
  const r = JSON.parse(value.toString()) as LeaseRecord;
  if (typeof r?.owner !== "string" || !Number.isSafeInteger(r.epoch)) throw new Error(`etcd ${key}: not a lease record`);
  return r;
}

/** A move notice as announceMove wrote it, or null for anything else. */
function parseNotice(value: Buffer): MoveNotice | null {
  try {
    const n = JSON.parse(value.toString()) as Partial<MoveNotice>;
    return typeof n.from === "string" && typeof n.to === "string" && typeof n.nbd === "string" ? { from: n.from, to: n.to, nbd: n.nbd } : null;
  } catch {
    return null;
  }
}
