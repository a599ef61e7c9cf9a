import fs from "node:fs";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { EtcdClient, type EtcdClientOptions, type EtcdError } from "./etcd-client.js";
import { EtcdOwnership, EtcdSession } from "./etcd-ownership.js";
import { LeaseError, type LeaseRecord, type NodeIdentity } from "../migration/lease.js";
// @ts-expect-error -- a plain ES module without types, shared with scripts run by node
import { needEtcd, startLocalCluster } from "../../test/cluster/etcd.mjs";
import { startProxy, tempDir, until } from "../../test/cluster/helpers.js";

type Cluster = Awaited<ReturnType<typeof startLocalCluster>>;
const hasEtcd = needEtcd();
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const TTL_MS = 2000; // etcd's smallest lease (2 s with default election settings)
const id = (nodeId: string): NodeIdentity => ({ nodeId, nbd: `127.0.0.1:${nodeId.charCodeAt(0)}`, control: `http://${nodeId}` });

async function leaseError(p: Promise<unknown>): Promise<LeaseError> {
  const err = await p.then(
    () => null,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(LeaseError);
  return err as LeaseError;
}

describe.skipIf(!hasEtcd)("EtcdOwnership against a real etcd", () => {
  let dir: string;
  let cluster: Cluster;
  const clients: EtcdClient[] = [];
  let raw: EtcdClient;
  let n = 0;
  const client = (o: Partial<EtcdClientOptions> = {}) => {
    const c = new EtcdClient({ endpoints: cluster.endpoints, ...o });
    clients.push(c);
    return c;
  };
  /** A node process: its own client and session (prefix shared by the test). */
  const node = (nodeId: string, prefix: string, o: { client?: EtcdClient; onLost?: (e: Error) => void } = {}) =>
    EtcdSession.start({ client: o.client ?? client(), identity: id(nodeId), ttlMs: TTL_MS, prefix, onLost: o.onLost });
  /** A fresh prefix per test, so tests share nothing. */
  const fresh = () => `/t${++n}`;
  /** Node a reaching etcd through the TCP proxy at `url` (short timeouts), node b directly; lostAt(): when a's session was lost (0: not yet). */
  const behindProxy = async (url: string, prefix: string) => {
    let lost = 0;
    const ca = client({ endpoints: [url], timeoutMs: 1000, attemptTimeoutMs: 400, connectTimeoutMs: 300 });
    const sa = await node("a", prefix, { client: ca, onLost: () => (lost = performance.now()) });
    const sb = await node("b", prefix);
    return { sa, a: new EtcdOwnership(sa, "disk"), b: new EtcdOwnership(sb, "disk"), lostAt: () => lost };
  };
  /** Kills a node process as etcd sees it: no more renewals, no revoke (its lease expires after its TTL). */
  const kill = (s: EtcdSession) => s.client.close();

  beforeAll(async () => {
    dir = tempDir("etcd-own");
    cluster = await startLocalCluster({ size: 1, dir });
    raw = client();
  });
  afterAll(async () => {
    for (const c of clients) c.close();
    await cluster?.stop();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  it("acquire: creates epoch 1, keeps it for the same process, refuses another node and a later process of the same node while the owner lives; renew checks the record", async () => {
    const p = fresh();
    const [sa, sb] = await Promise.all([node("a", p), node("b", p)]);
    const [a, b] = [new EtcdOwnership(sa, "disk"), new EtcdOwnership(sb, "disk")];
    expect(a.where).toBe(`etcd ${p}/exports/disk`);
    expect(await a.read()).toBeNull();
    const r1 = await a.acquire(id("a"), TTL_MS);
    expect(r1).toMatchObject({ owner: "a", epoch: 1, holder: sa.leaseId, pid: process.pid, image: "disk" });
    expect((await raw.getOne(a.liveKey))?.lease).toBe(sa.leaseId);
    expect((await a.acquire(id("a"), TTL_MS)).epoch).toBe(1);
    const refused = await leaseError(b.acquire(id("b"), TTL_MS));
    expect(refused.current).toMatchObject({ owner: "a", epoch: 1 });
    expect(await b.takeOver(id("b"), TTL_MS)).toBeNull();
    // A later process of node a: the earlier one may be frozen, not dead.
    const sa2 = await node("a", p);
    expect((await leaseError(new EtcdOwnership(sa2, "disk").acquire(id("a"), TTL_MS))).message).toMatch(/earlier process/);
    expect(await a.renew(id("a"), 1)).toMatchObject({ owner: "a", epoch: 1 });
    await leaseError(a.renew(id("a"), 2));
    await leaseError(b.renew(id("b"), 1));
    expect(await b.read()).toEqual(await a.read());
    // renew renews the session's etcd lease: the deadline is at least the lease time, minus the margin, from before it.
    const t0 = performance.now();
    await a.renew(id("a"), 1);
    expect(a.deadline()).toBeGreaterThanOrEqual(t0 + TTL_MS - sa.marginMs);
  });

  it("hand-over: the peer's first renewal claims it; the source takes an unclaimed hand-over back, never a claimed one", async () => {
    const p = fresh();
    const [sa, sb] = await Promise.all([node("a", p), node("b", p)]);
    const [a, b] = [new EtcdOwnership(sa, "disk"), new EtcdOwnership(sb, "disk")];
    await a.acquire(id("a"), TTL_MS);
    const h2 = await a.handOver(id("a"), 1, id("b"), TTL_MS);
    expect(h2).toMatchObject({ owner: "b", epoch: 2, handedFrom: ["a@1"] });
    expect(h2.holder).toBeUndefined();
    expect(h2.pid).toBeUndefined();
    expect((await raw.getOne(a.liveKey))?.lease).toBe(sb.leaseId); // alive while b's process lives
    expect(await b.handedTo(id("b"))).toBe(2);
    expect(await a.handedTo(id("a"))).toBeNull();
    await leaseError(a.renew(id("a"), 1));
    // Not claimed yet: the source takes it back, at a new epoch, and b can no longer claim epoch 2.
    const back = await a.reclaim(id("a"), h2, TTL_MS);
    expect(back).toMatchObject({ owner: "a", epoch: 3, handedFrom: ["a@1"], holder: sa.leaseId });
    await leaseError(b.renew(id("b"), 2));
    // Handed again and claimed: from then on the source cannot take it back.
    const h4 = await a.handOver(id("a"), 3, id("b"), TTL_MS);
    const claimed = await b.renew(id("b"), 4);
    expect(claimed).toMatchObject({ owner: "b", epoch: 4, holder: sb.leaseId, pid: process.pid, serial: 1, handedFrom: ["a@1", "a@3"] });
    expect(await b.handedTo(id("b"))).toBeNull();
    const refused = await leaseError(a.reclaim(id("a"), h4, TTL_MS));
    expect(refused.message).toMatch(/claimed by it/);
    expect(await b.renew(id("b"), 4)).toEqual(claimed); // later renewals write nothing
    // A node with no live process cannot be handed anything.
    const err = await b.handOver(id("b"), 4, id("ghost"), TTL_MS).catch((e: Error & { code?: string }) => e);
    expect((err as Error & { code?: string }).code).toBe("ENOPEER");
    expect(await b.read()).toEqual(claimed);
  });

  /** Counts what reaches etcd from `c` (the names of the client's calls), from now on. */
  const countCalls = (c: EtcdClient): string[] => {
    const calls: string[] = [];
    const o = c as unknown as Record<string, (...x: unknown[]) => unknown>;
    for (const k of ["txn", "get", "getOne", "keepAliveOnce", "put"]) {
      const f = o[k]!.bind(c);
      o[k] = (...x: unknown[]) => (calls.push(k), f(...x));
    }
    return calls;
  };

  it("a prepared hand-over is one round trip inside the hold; a stale view (the peer restarted meanwhile) reads again and still hands over right", async () => {
    const p = fresh();
    const [sa, sb] = await Promise.all([node("a", p), node("b", p)]);
    const a = new EtcdOwnership(sa, "disk");
    await a.acquire(id("a"), TTL_MS);
    await a.renew(id("a"), 1);
    // Count what reaches etcd from a's client during the hand-over.
    const calls = countCalls(sa.client);
    await a.prepareHandOver(id("b"));
    calls.length = 0;
    const h2 = await a.handOver(id("a"), 1, id("b"), TTL_MS);
    expect(calls).toEqual(["txn"]);
    expect(h2).toMatchObject({ owner: "b", epoch: 2, handedFrom: ["a@1"] });
    expect((await raw.getOne(a.liveKey))?.lease).toBe(sb.leaseId);
    // Taken back (unclaimed), then handed again with a view of b from before b's process changed.
    await a.reclaim(id("a"), h2, TTL_MS);
    await a.prepareHandOver(id("b"));
    await sb.close();
    const sb2 = await node("b", p);
    calls.length = 0;
    const h4 = await a.handOver(id("a"), 3, id("b"), TTL_MS);
    expect(calls.length).toBeGreaterThan(1); // the stale membership failed the first transaction
    expect(h4).toMatchObject({ owner: "b", epoch: 4 });
    expect((await raw.getOne(a.liveKey))?.lease).toBe(sb2.leaseId); // bound to b's live process
  });

  it("a renewal is one round trip: its keep-alive and its read go together, and nothing else is sent", async () => {
    const p = fresh();
    const sa = await node("a", p);
    const a = new EtcdOwnership(sa, "disk");
    await a.acquire(id("a"), TTL_MS);
    await a.renew(id("a"), 1);
    const calls = countCalls(sa.client);
    const r = await a.renew(id("a"), 1);
    expect(r).toMatchObject({ owner: "a", epoch: 1 });
    expect(calls.sort()).toEqual(["keepAliveOnce", "txn"]);
  });

  it("a claim that starts from the hand-over as its source wrote it (record and revision) is one transaction, sent with the keep-alive; a stale one reads and decides again", async () => {
    const p = fresh();
    const [sa, sb] = await Promise.all([node("a", p), node("b", p)]);
    const [a, b] = [new EtcdOwnership(sa, "disk"), new EtcdOwnership(sb, "disk")];
    await a.acquire(id("a"), TTL_MS);
    const h2 = await a.handOver(id("a"), 1, id("b"), TTL_MS);
    const at = a.revisionOf(h2);
    expect(at).toBe((await raw.getOne(a.recordKey))?.modRevision);
    const calls = countCalls(sb.client);
    const claimed = await b.renew(id("b"), 2, { record: h2, at: at! });
    expect(calls.sort()).toEqual(["keepAliveOnce", "txn"]);
    expect(claimed).toMatchObject({ owner: "b", epoch: 2, holder: sb.leaseId, serial: 1, handedFrom: ["a@1"] });
    expect(await b.read()).toEqual(claimed);
    expect((await raw.getOne(a.liveKey))?.lease).toBe(sb.leaseId);
    expect((await leaseError(a.reclaim(id("a"), h2, TTL_MS))).message).toMatch(/claimed by it/);
    // Stale: handed at epoch 3, taken back by a (epoch 4) before b's claim arrives with the old view.
    const h3 = await b.handOver(id("b"), 2, id("a"), TTL_MS);
    const at3 = b.revisionOf(h3)!;
    await b.reclaim(id("b"), h3, TTL_MS);
    calls.length = 0;
    const refused = await leaseError(a.renew(id("a"), 3, { record: h3, at: at3 }));
    expect(refused.current).toMatchObject({ owner: "b", epoch: 4 });
    expect(await a.read()).toMatchObject({ owner: "b", epoch: 4, holder: sb.leaseId });
    // A view whose revision is wrong (a lie or a mix-up) changes nothing by itself: the transaction fails, and the claim is decided on what etcd holds.
    const h5 = await b.handOver(id("b"), 4, id("a"), TTL_MS);
    const ok = await a.renew(id("a"), 5, { record: h5, at: b.revisionOf(h5)! - 1 });
    expect(ok).toMatchObject({ owner: "a", epoch: 5, holder: sa.leaseId });
    expect((await raw.getOne(a.liveKey))?.lease).toBe(sa.leaseId);
    // The right revision with other contents: the claim keeps what etcd holds, not what it was told.
    const h6 = await a.handOver(id("a"), 5, id("b"), TTL_MS);
    const claimed6 = await b.renew(id("b"), 6, { record: { ...h6, handedFrom: ["x@1"] }, at: a.revisionOf(h6)! });
    expect(claimed6).toMatchObject({ owner: "b", epoch: 6, holder: sb.leaseId, handedFrom: h6.handedFrom });
    expect(await b.read()).toEqual(claimed6);
  });

  it("a planned hand-over writes nothing: the peer's claim is the hand-over (one transaction); a reclaim first makes a late claim fail; after the claim a reclaim is refused", async () => {
    const p = fresh();
    const [sa, sb] = await Promise.all([node("a", p), node("b", p)]);
    const [a, b] = [new EtcdOwnership(sa, "disk"), new EtcdOwnership(sb, "disk")];
    const r1 = await a.acquire(id("a"), TTL_MS);
    const callsA = countCalls(sa.client);
    await a.prepareHandOver(id("b"));
    callsA.length = 0;
    const { record: h2, view } = await a.planHandOver(id("a"), 1, id("b"), TTL_MS);
    expect(callsA).toEqual([]); // nothing reaches etcd inside the hold but the peer's claim
    expect(h2).toMatchObject({ owner: "b", epoch: 2, handedFrom: ["a@1"] });
    expect(await b.read()).toEqual(r1); // the record still names a
    const callsB = countCalls(sb.client);
    const claimed = await b.renew(id("b"), 2, view);
    expect(callsB.sort()).toEqual(["keepAliveOnce", "txn"]);
    expect(claimed).toMatchObject({ owner: "b", epoch: 2, holder: sb.leaseId, serial: 1, handedFrom: ["a@1"], pid: process.pid });
    expect(await a.read()).toEqual(claimed);
    expect((await raw.getOne(a.liveKey))?.lease).toBe(sb.leaseId);
    expect((await leaseError(a.reclaim(id("a"), h2, TTL_MS))).message).toMatch(/claimed by it/);
    expect(await b.renew(id("b"), 2)).toEqual(claimed); // a later renewal writes nothing
    // Planned, then taken back before the claim came (the adopt call failed): the late claim fails, and changes nothing.
    const { record: h3, view: v3 } = await b.planHandOver(id("b"), 2, id("a"), TTL_MS);
    const back = await b.reclaim(id("b"), h3, TTL_MS);
    expect(back).toMatchObject({ owner: "b", epoch: 3, holder: sb.leaseId });
    const late = await leaseError(a.renew(id("a"), 3, v3));
    expect(late.current).toMatchObject({ owner: "b", epoch: 3 });
    expect(await a.read()).toEqual(back);
    expect((await raw.getOne(a.liveKey))?.lease).toBe(sb.leaseId);
    // A claim from a view whose source died before it (its liveness key gone): refused; the export is taken over after expiry instead.
    const { view: v4 } = await b.planHandOver(id("b"), 3, id("a"), TTL_MS);
    kill(sb);
    await until("b's liveness key expires", async () => (await raw.getOne(a.liveKey)) === null, 10_000);
    await leaseError(a.renew(id("a"), 4, v4));
    expect(await a.read()).toMatchObject({ owner: "b", epoch: 3 });
    expect(await a.takeOver(id("a"), TTL_MS)).toMatchObject({ owner: "a", epoch: 4 });
  });

  it("a planned hand-over is refused when the record is not this process's at that epoch, and when the peer has no live process", async () => {
    const p = fresh();
    const [sa, sb] = await Promise.all([node("a", p), node("b", p)]);
    const a = new EtcdOwnership(sa, "disk");
    await a.acquire(id("a"), TTL_MS);
    await leaseError(a.planHandOver(id("a"), 7, id("b"), TTL_MS));
    const err = await a.planHandOver(id("a"), 1, id("ghost"), TTL_MS).catch((e: Error & { code?: string }) => e);
    expect((err as Error & { code?: string }).code).toBe("ENOPEER");
    expect((await a.planHandOver(id("a"), 1, id("b"), TTL_MS)).record).toMatchObject({ owner: "b", epoch: 2 });
    void sb;
  });

  it("take-over only once the owner's etcd lease expired: never before its deadline plus margin; the epoch grows and an expiry keeps no handedFrom", async () => {
    const p = fresh();
    const [sa, sb] = await Promise.all([node("a", p), node("b", p)]);
    const [a, b] = [new EtcdOwnership(sa, "disk"), new EtcdOwnership(sb, "disk")];
    await a.acquire(id("a"), TTL_MS);
    await a.release(id("a"), 1, true);
    await a.acquire(id("a"), TTL_MS); // keeps epoch 1 and the handedFrom its clean release wrote
    expect(await a.read()).toMatchObject({ epoch: 1, handedFrom: ["a@1"] });
    await a.renew(id("a"), 1);
    const leaseEnd = sa.deadline() + sa.marginMs; // the lease surely lives until then
    const killedAt = performance.now();
    kill(sa);
    let tries = 0;
    const taken = await until("b takes the export over", async () => {
      tries++;
      return (await b.takeOver(id("b"), TTL_MS)) ?? undefined;
    });
    const at = performance.now();
    expect(at).toBeGreaterThanOrEqual(leaseEnd);
    expect(tries).toBeGreaterThan(10); // it was refused all along before
    expect(taken).toMatchObject({ owner: "b", epoch: 2, holder: sb.leaseId });
    expect(taken.handedFrom).toBeUndefined();
    console.log(`take-over ${Math.round(at - killedAt)} ms after the kill, ${Math.round(at - leaseEnd)} ms after the lease's surely-alive end (etcd TTL ${sa.ttlSeconds} s)`);
  });

  it("an unclaimed hand-over expires with the peer's process; the epoch only grows across deaths, releases, hand-overs and reclaims", async () => {
    const p = fresh();
    const [sa, sb, sc] = await Promise.all([node("a", p), node("b", p), node("c", p)]);
    const [a, b, c] = [sa, sb, sc].map((s) => new EtcdOwnership(s, "disk"));
    const epochs: number[] = [];
    const stop = c!.watch((r) => r && epochs.push(r.epoch));
    await a!.acquire(id("a"), TTL_MS); // 1
    await a!.release(id("a"), 1); // unclean: no handedFrom
    const r2 = await b!.acquire(id("b"), TTL_MS);
    expect(r2).toMatchObject({ epoch: 2 });
    expect(r2.handedFrom).toBeUndefined();
    await b!.release(id("b"), 2, true);
    const r3 = await c!.acquire(id("c"), TTL_MS);
    expect(r3).toMatchObject({ epoch: 3, handedFrom: ["b@2"] }); // a clean release hands on
    await c!.handOver(id("c"), 3, id("b"), TTL_MS); // 4, to b, which dies before claiming
    kill(sb);
    expect(await a!.takeOver(id("a"), TTL_MS)).toBeNull(); // b's process may still claim it
    const r5 = await until("a takes the dead peer's hand-over", async () => (await a!.takeOver(id("a"), TTL_MS)) ?? undefined);
    expect(r5).toMatchObject({ owner: "a", epoch: 5 });
    await until("the watch saw epoch 5", () => epochs.includes(5));
    stop();
    for (let i = 1; i < epochs.length; i++) expect(epochs[i]).toBeGreaterThanOrEqual(epochs[i - 1]!);
    expect([...new Set(epochs)]).toEqual([1, 2, 3, 4, 5]);
  });

  it("a private copy is never taken over by another node; a later process of its own node takes it over", async () => {
    const p = fresh();
    const [sa, sb] = await Promise.all([node("a", p), node("b", p)]);
    const [a, b] = [new EtcdOwnership(sa, "disk"), new EtcdOwnership(sb, "disk")];
    await a.acquire(id("a"), TTL_MS);
    // assign naming another node (a copy's destination naming its source) never makes it private.
    expect((await b.assign(id("a"), 1, TTL_MS, ["x@0"])).private).toBeUndefined();
    await leaseError(b.assign(id("a"), 7, TTL_MS));
    const h = await a.handOver(id("a"), 1, id("b"), TTL_MS, true);
    expect(h).toMatchObject({ owner: "b", epoch: 2, private: true, handedFrom: ["x@0", "a@1"] });
    expect(await b.handedTo(id("b"))).toBeNull(); // a copy's hand-over is committed by the destination's answer
    expect(await b.assign(id("b"), 2, TTL_MS, ["x@0", "a@1"])).toEqual(await b.read()); // nothing to change
    await b.renew(id("b"), 2); // the claim
    kill(sb);
    await until("b's liveness key expired", async () => (await raw.getOne(a.liveKey)) === null);
    expect(await a.takeOver(id("a"), TTL_MS)).toBeNull();
    expect((await leaseError(a.acquire(id("a"), TTL_MS))).message).toMatch(/is a copy/);
    const sb2 = await node("b", p);
    const again = await new EtcdOwnership(sb2, "disk").takeOver(id("b"), TTL_MS);
    expect(again).toMatchObject({ owner: "b", epoch: 3, private: true, holder: sb2.leaseId });
  });

  it("nodes racing for a free record: exactly one wins each round (take-over and acquire)", async () => {
    const p = fresh();
    const sessions = await Promise.all(["a", "b", "c"].map((x) => node(x, p)));
    const owns = sessions.map((s) => new EtcdOwnership(s, "disk"));
    const ids = ["a", "b", "c"].map(id);
    let epoch = 0;
    let prev = -1;
    for (let round = 0; round < 10; round++) {
      const takeOvers = round % 2 === 0;
      const results = await Promise.allSettled(owns.map((o, i) => (takeOvers ? o.takeOver(ids[i]!, TTL_MS) : o.acquire(ids[i]!, TTL_MS))));
      const winners = results.flatMap((r, i) => (r.status === "fulfilled" && r.value ? [{ i, r: r.value as LeaseRecord }] : []));
      expect(winners).toHaveLength(1);
      for (const r of results) if (r.status === "rejected") expect(r.reason).toBeInstanceOf(LeaseError);
      const w = winners[0]!;
      // A process that takes back what it released itself keeps the epoch (as LeaseFile does).
      expect(w.r.epoch).toBe(!takeOvers && w.i === prev ? epoch : epoch + 1);
      epoch = w.r.epoch;
      prev = w.i;
      await owns[w.i]!.release(ids[w.i]!, epoch); // free again (unclean)
    }
  });

  it("watch: tells when the owner's lease ends (the record unchanged), so that nodes can take over at once", async () => {
    const p = fresh();
    const [sa, sw] = await Promise.all([node("a", p), node("w", p)]);
    const [a, w] = [new EtcdOwnership(sa, "disk"), new EtcdOwnership(sw, "disk")];
    await a.acquire(id("a"), TTL_MS);
    const seen: Array<{ r: LeaseRecord | null; at: number }> = [];
    const stop = w.watch((r) => seen.push({ r, at: performance.now() }));
    await until("the watch delivered the record as it was", () => seen.length === 1);
    const killedAt = performance.now();
    kill(sa); // no renewal, no revoke: etcd ends the lease after its TTL and deletes the liveness key
    await until("the watch told of the lease's end", () => seen.length === 2, 10_000);
    expect(seen[1]!.r).toMatchObject({ owner: "a", epoch: 1 }); // the record as it stands
    expect(seen[1]!.at - killedAt).toBeLessThan(sa.ttlSeconds * 1000 + 2000);
    // Now a take-over succeeds at once.
    expect(await w.takeOver(id("w"), TTL_MS)).toMatchObject({ owner: "w", epoch: 2 });
    stop();
  });

  it("announceMove: watchers are told the move before the record changes (in order with it); the notice goes with its announcer's process", async () => {
    const p = fresh();
    const [sa, sb, sw] = await Promise.all([node("a", p), node("b", p), node("w", p)]);
    const [a, b, w] = [sa, sb, sw].map((s) => new EtcdOwnership(s, "disk"));
    await a!.acquire(id("a"), TTL_MS);
    const events: string[] = [];
    const stop = w!.watch(
      (r) => events.push(`record ${r ? `${r.owner}@${r.epoch}` : "none"}`),
      (n) => events.push(`move ${n.from} → ${n.to} at ${n.nbd}`),
    );
    await until("the watch delivered the record as it was", () => events.length === 1);
    await a!.announceMove(id("a"), 1, id("b"));
    const { record, view } = await a!.planHandOver(id("a"), 1, id("b"), TTL_MS);
    await b!.renew(id("b"), record.epoch, view); // the claim
    await until("the watch saw the notice and the claim", () => events.length === 3);
    expect(events).toEqual(["record a@1", `move a@1 → b at ${id("b").nbd}`, "record b@2"]);
    // Bound to the announcer's etcd lease: gone with its process.
    expect(await raw.getOne(`${p}/exports/disk/next`)).not.toBeNull();
    await sa.close();
    expect(await raw.getOne(`${p}/exports/disk/next`)).toBeNull();
    stop();
  });

  it("watch: tells every change of owner, in order, within a bound; stop ends it", async () => {
    const p = fresh();
    const [sa, sb, sw] = await Promise.all([node("a", p), node("b", p), node("w", p)]);
    const [a, b, w] = [sa, sb, sw].map((s) => new EtcdOwnership(s, "disk"));
    const seen: Array<{ r: LeaseRecord | null; at: number }> = [];
    const stop = w!.watch((r) => seen.push({ r, at: performance.now() }));
    await until("the watch delivered the record as it was", () => seen.length === 1);
    expect(seen[0]!.r).toBeNull();
    const changes: Array<{ what: string; at: number }> = [];
    const step = async (what: string, fn: () => Promise<unknown>) => {
      await fn();
      changes.push({ what, at: performance.now() });
    };
    await step("a@1", () => a!.acquire(id("a"), TTL_MS));
    await step("b@2", () => a!.handOver(id("a"), 1, id("b"), TTL_MS));
    await step("b@2", () => b!.renew(id("b"), 2));
    await step("b@2", () => b!.release(id("b"), 2, true));
    await step("a@3", () => a!.acquire(id("a"), TTL_MS));
    await until("the watch saw every change", () => seen.length === 1 + changes.length);
    expect(seen.slice(1).map((s) => `${s.r!.owner}@${s.r!.epoch}`)).toEqual(changes.map((c) => c.what));
    const lags = seen.slice(1).map((s, i) => s.at - changes[i]!.at);
    console.log(`watch lag after each change (ms): ${lags.map((l) => l.toFixed(1)).join(", ")}`);
    expect(Math.max(...lags)).toBeLessThan(500);
    stop();
    await a!.release(id("a"), 3);
    await sleep(200);
    expect(seen).toHaveLength(1 + changes.length);
  });

  it("a node cut off from etcd: its lease is reported lost, renew then says so, and no other node takes over before the cut node's deadline (plus margin) passed", async () => {
    const p = fresh();
    const proxy = await startProxy(cluster.endpoints[0]!);
    try {
      const { sa, a, b, lostAt } = await behindProxy(proxy.url, p);
      await a.acquire(id("a"), TTL_MS);
      await a.renew(id("a"), 1);
      proxy.cut(); // from here no answer reaches a: its deadline cannot move any more
      const cutAt = performance.now();
      const deadline = sa.deadline();
      expect(deadline).toBeGreaterThan(cutAt);
      // A renewal while cut waits for etcd as long as the lease may live: it never calls the lease lost before a's deadline.
      const during = a.renew(id("a"), 1).then(
        () => null,
        (e: Error) => ({ e, at: performance.now() - cutAt }),
      );
      let refusals = 0;
      const taken = await until("b takes the export over", async () => {
        const r = await b.takeOver(id("b"), TTL_MS);
        if (!r) refusals++;
        return r ?? undefined;
      });
      const takenAt = performance.now();
      const d = await during;
      expect(d?.e).toBeInstanceOf(LeaseError);
      expect(d!.at).toBeGreaterThanOrEqual(deadline - cutAt);
      expect(taken).toMatchObject({ owner: "b", epoch: 2 });
      expect(refusals).toBeGreaterThan(10);
      expect(lostAt()).toBeGreaterThan(0);
      // The keeper reports the loss at the lease's surely-alive end: after a's own deadline.
      expect(lostAt()).toBeGreaterThanOrEqual(deadline);
      expect(sa.deadline()).toBe(-Infinity);
      // The point: b got the export only after a's deadline had passed (a stops writing there), by the margin at least.
      expect(takenAt).toBeGreaterThanOrEqual(deadline + sa.marginMs);
      console.log(
        `cut at 0 ms: a's deadline at ${Math.round(deadline - cutAt)} ms, onLost at ${Math.round(lostAt() - cutAt)} ms, a's renew lost at ${Math.round(d!.at)} ms, b took over at ${Math.round(takenAt - cutAt)} ms (${Math.round(takenAt - deadline)} ms after a's deadline, margin ${sa.marginMs} ms)`,
      );
      // Still cut off: a renewal says "lost" at once (the record it shows is read for 250 ms at most), never after etcd's timeout.
      const askedAt = performance.now();
      await leaseError(a.renew(id("a"), 1));
      expect(performance.now() - askedAt).toBeLessThan(600);
    } finally {
      proxy.close();
    }
  });

  it("a session lost while etcd keeps its lease (renewals arrive, their answers do not) is revoked a margin after the loss: another node takes over then, not a lease time later", async () => {
    const p = fresh();
    const proxy = await startProxy(cluster.endpoints[0]!);
    try {
      const { sa, a, b, lostAt } = await behindProxy(proxy.url, p);
      await a.acquire(id("a"), TTL_MS);
      // Every renewal reaches etcd (so its lease lives on, a TTL past the last one) but no answer
      // comes back: a's session is lost at its deadline while etcd still holds the lease.
      proxy.dropReplyTo("/v3/lease/keepalive");
      await until("a's session is lost", () => lostAt() > 0);
      proxy.dropReplyTo(null);
      expect((await raw.getOne(a.liveKey))?.lease).toBe(sa.leaseId); // etcd still has a's lease
      const taken = await until("b takes the export over", async () => (await b.takeOver(id("b"), TTL_MS)) ?? undefined);
      const takenAfter = performance.now() - lostAt();
      expect(taken).toMatchObject({ owner: "b", epoch: 2 });
      // Never before the margin past a's loss; and not a lease time later (etcd would end the lease
      // about TTL after the last renewal it received, which came just before the loss).
      expect(takenAfter).toBeGreaterThanOrEqual(sa.marginMs);
      expect(takenAfter).toBeLessThan(sa.marginMs + 700);
      console.log(`a's session lost at 0 ms; b took over at ${Math.round(takenAfter)} ms (margin ${sa.marginMs} ms, lease ${TTL_MS} ms)`);
    } finally {
      proxy.close();
    }
  });

  it("a process whose session is lost claims nothing with it, though etcd still holds its lease", async () => {
    // Nemesis on the lab, seed 20: c's session was lost while c was cut off (etcd's leader with
    // it), and etcd's new leader had extended c's lease. A hand-over's adopt call, held in TCP,
    // reached c as the network healed: its claim, bound to the lost lease, was written; c then
    // fenced at once, and the export had an owner that wrote nothing until etcd ended the lease.
    const p = fresh();
    const proxy = await startProxy(cluster.endpoints[0]!);
    try {
      const { sa, a, b, lostAt } = await behindProxy(proxy.url, p);
      const r1 = await b.acquire(id("b"), TTL_MS);
      await b.prepareHandOver(id("a"));
      const { view } = await b.planHandOver(id("b"), 1, id("a"), TTL_MS);
      proxy.dropReplyTo("/v3/lease/keepalive");
      await until("a's session is lost", () => lostAt() > 0);
      proxy.dropReplyTo(null);
      expect(performance.now() - lostAt()).toBeLessThan(sa.marginMs); // before its revocation is tried
      const err = await leaseError(a.renew(id("a"), 2, view));
      expect(err.message).toMatch(/is gone/);
      expect(await b.read()).toEqual(r1); // nothing written: the record names b as it planned
      expect(await b.renew(id("b"), 1)).toEqual(r1);
    } finally {
      proxy.close();
    }
  });

  it("a lost session's revocation is tried again while etcd cannot be reached, and lands once it can: another node takes over soon after, however long etcd would keep the lease", async () => {
    const p = fresh();
    const proxy = await startProxy(cluster.endpoints[0]!);
    let extending = true;
    try {
      const { sa, a, b, lostAt } = await behindProxy(proxy.url, p);
      await a.acquire(id("a"), TTL_MS);
      proxy.dropReplyTo("/v3/lease/keepalive");
      await until("a's session is lost", () => lostAt() > 0);
      // From the loss on, a cannot reach etcd at all, and etcd keeps a's lease alive (a leader
      // extending it, renewals still on their way): only a's revocation can free the export.
      proxy.cut();
      proxy.dropReplyTo(null);
      const extend = (async () => {
        while (extending) {
          await raw.keepAliveOnce(sa.leaseId).catch(() => undefined);
          await sleep(300);
        }
      })();
      await sleep(sa.marginMs + 1500); // the revocation's first tries (from the margin on) cannot reach etcd
      expect(await b.takeOver(id("b"), TTL_MS)).toBeNull();
      expect((await raw.getOne(a.liveKey))?.lease).toBe(sa.leaseId);
      proxy.heal();
      const healedAt = performance.now();
      const taken = await until("b takes the export over", async () => (await b.takeOver(id("b"), TTL_MS)) ?? undefined, 5000);
      const takenAfter = performance.now() - healedAt;
      extending = false;
      await extend;
      expect(taken).toMatchObject({ owner: "b", epoch: 2 });
      expect(takenAfter).toBeLessThan(1500);
      console.log(`etcd unreachable from a's loss until ${Math.round(healedAt - lostAt())} ms after it; b took over ${Math.round(takenAfter)} ms after etcd could be reached again`);
    } finally {
      extending = false;
      proxy.close();
    }
  });

  it("a change whose answer is lost (outcome unknown) is read back: applied exactly as written, it counts as done", async () => {
    const p = fresh();
    const proxy = await startProxy(cluster.endpoints[0]!);
    try {
      const ca = client({ endpoints: [proxy.url], timeoutMs: 2000, attemptTimeoutMs: 300, connectTimeoutMs: 300 });
      const sa = await node("a", p, { client: ca });
      const a = new EtcdOwnership(sa, "disk");
      // What the client's transactions ended with (a spy: etcd is real).
      const codes: string[] = [];
      const txn = ca.txn.bind(ca);
      ca.txn = (t) => txn(t).catch((e: EtcdError) => Promise.reject(codes.push(e.code) && e));
      proxy.dropReplyTo("request_put"); // the acquire's transaction reaches etcd; its answer is lost
      const r = await a.acquire(id("a"), TTL_MS);
      expect(r).toMatchObject({ owner: "a", epoch: 1, holder: sa.leaseId });
      expect(codes).toEqual(["ETCD_OUTCOME_UNKNOWN"]);
      proxy.dropReplyTo("request_delete_range");
      expect(await new EtcdOwnership(await node("b", p), "disk").read()).toEqual(r);
      // The same for a release (the liveness key deleted, the record marked released).
      await a.release(id("a"), 1, true);
      expect(codes).toEqual(["ETCD_OUTCOME_UNKNOWN", "ETCD_OUTCOME_UNKNOWN"]);
      expect(await a.read()).toMatchObject({ leaseStart: 0, handedFrom: ["a@1"] });
      expect(await raw.getOne(a.liveKey)).toBeNull();
    } finally {
      proxy.close();
    }
  });
});
