import { execFile } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { controlCall, getStatus, type ClusterStatus } from "../../src/control/control-client.js";
import { NbdClient } from "../../src/client/nbd-client.js";
import { exportStatus, fioLoad, fioOutcome, logLines, pollUntil, scrape } from "../helpers/migration.js";
import { blankImage, CLI, controlUrl, nbdAddress, serve, tempDir, type Served } from "../helpers/serve.js";
import { needTools } from "../helpers/tools.js";
// @ts-expect-error -- a plain ES module without types, shared with scripts run by node
import { EtcdMember, freePort, needEtcd, startLocalCluster, waitHealthy } from "../cluster/etcd.mjs";
import { clientCertOf, makePki, startProxy } from "../cluster/helpers.js";
import { EtcdClient } from "../../src/coord/etcd-client.js";
import { EtcdOwnership, EtcdSession } from "../../src/coord/etcd-ownership.js";

const run = promisify(execFile);
const MiB = 1024 * 1024;
const hasEtcd = needEtcd();

/**
 * Three nodes on one machine (one image they all see) coordinated by a real 3-member etcd
 * cluster (serve --etcd): the cluster view from any node, moves under fio with crc32c
 * verification, port B following the owner the moment etcd says it changed, and a killed owner
 * replaced automatically. The same across network namespaces is test/cluster/.
 */
describe.skipIf(!hasEtcd || !needTools("fio", "nbdinfo"))("nodes coordinated by etcd (serve --etcd)", () => {
  let etcd: Awaited<ReturnType<typeof startLocalCluster>>;
  let nodes: Record<string, Served> = {};
  let img: string;
  const args = (id: string) => [img, "--name", "disk", "--node-id", id, "--etcd", etcd.endpoints.join(","), "--etcd-prefix", "/t1", "--lease-ttl", "2s", "--control", "127.0.0.1:0"];
  beforeAll(async () => {
    const dir = tempDir();
    etcd = await startLocalCluster({ size: 3, dir });
    img = blankImage(path.join(dir, "disk.img"), 32 * MiB);
    for (const id of ["a", "b", "c"]) nodes[id] = await serve(args(id), 2);
  }, 60_000);
  afterAll(async () => {
    await Promise.all(Object.values(nodes).map((n) => n.stop("SIGKILL")));
    nodes = {};
    await etcd?.stop();
  });
  const url = (id: string) => controlUrl(nodes[id]!);

  it("every node shows the whole cluster; nbdinfo names the owner and epoch", async () => {
    const s = await getStatus(url("c"));
    const cluster = s.cluster as ClusterStatus;
    expect(cluster.nodes.map((n) => n.nodeId)).toEqual(["a", "b", "c"]);
    expect(cluster.nodes.find((n) => n.nodeId === "a")!.nbd).toBe(nodes.a!.uris[0]!.replace(/^nbd:\/\/|\/disk$/g, ""));
    expect(cluster.exports).toEqual([expect.objectContaining({ name: "disk", owner: "a", epoch: 1, live: true, released: false })]);
    const { stdout } = await run("nbdinfo", ["--json", nodes.b!.uris[0]!]);
    expect(JSON.parse(stdout).exports[0].description).toMatch(/redirector\(REMOTE\).*\[owner=a epoch=1 at 127\.0\.0\.1:\d+, through port B\]/);
    const text = await run(process.execPath, [CLI, "status", url("b")]);
    expect(text.stdout).toMatch(/cluster \(etcd .* \/t1\): 3 live nodes/);
    expect(text.stdout).toMatch(/^disk\s+a\s+1\s+yes/m);
  });

  it("moves a → b → c → a three times under fio through c: no error, and port B relinks when etcd says so", async () => {
    const load = fioLoad(nodes.c!.uris[0]!, { size: "8m" });
    await new Promise((r) => setTimeout(r, 500));
    let epoch = 1;
    for (let i = 0; i < 3; i++)
      for (const [from, to] of [["a", "b"], ["b", "c"], ["c", "a"]] as const) {
        const r = await controlCall<{ epoch: number }>(url(from), "POST", "v1/exports/disk/migrate", { to: url(to) }, 30_000);
        expect(r.epoch).toBe(++epoch);
        // The new owner drains what it forwarded before it serves alone (a migrate before that gets 409).
        await pollUntil(`${to} serves through port A`, async () => (await exportStatus(url(to), "disk"))?.state === "LOCAL");
      }
    await new Promise((r) => setTimeout(r, 500));
    const f = await load.stop();
    expect(fioOutcome(f)).toMatchObject({ exit: "stopped", error: 0 });
    expect(f.job.write.io_bytes).toBeGreaterThan(0);
    // The non-owner b was told by etcd's watch, not by a failed request.
    expect(logLines(nodes.b!.stderr(), "port B: giving up the link to the owner").some((l) => /the record names/.test(String(l.reason)))).toBe(true);
    // In each a → b move, c (forwarding fio) linked to b when a announced the move, and switched
    // to that link when etcd named b: no connection or handshake while its requests waited.
    const ahead = logLines(nodes.c!.stderr(), "port B: the link made ahead to the new owner takes over");
    // (A failure shows c's port B log: which link each move used, and why.)
    const portB = () => nodes.c!.stderr().split("\n").filter((l) => /port B/.test(l)).join("\n");
    expect(ahead.map((l) => String(l.to).replace(/@\d+$/, "")), portB()).toEqual(["b", "b", "b"]);
    const cluster = (await getStatus(url("b"))).cluster as ClusterStatus;
    expect(cluster.exports[0]).toMatchObject({ owner: "a", epoch: 10, live: true });
  }, 120_000);

  it("a hand-over whose adopt call never came (its source died right after it) is adopted after a grace, never raced with the adopt call the source is sending", async () => {
    const dir = tempDir();
    const image = blankImage(path.join(dir, "orphan.img"), 8 * MiB);
    const client = new EtcdClient({ endpoints: etcd.endpoints });
    const zid = { nodeId: "z", nbd: "127.0.0.1:9", control: "http://127.0.0.1:9" };
    const z = await EtcdSession.start({ client, identity: zid, ttlMs: 2000, prefix: "/orphan" });
    const own = new EtcdOwnership(z, "disk");
    await own.acquire(zid, 2000);
    const raw = new EtcdClient({ endpoints: etcd.endpoints });
    const o = await serve([image, "--name", "disk", "--node-id", "o", "--etcd", etcd.endpoints.join(","), "--etcd-prefix", "/orphan", "--lease-ttl", "2s", "--control", "127.0.0.1:0"], 2);
    try {
      const ourl = controlUrl(o);
      const st = await getStatus(ourl);
      expect(await exportStatus(ourl, "disk")).toMatchObject({ state: "REMOTE", owner: "z" });
      await own.handOver(zid, 1, { nodeId: "o", nbd: st.nbd, control: ourl }, 2000);
      client.close(); // z dies: no adopt call will come
      const handedAt = performance.now();
      // etcd pushes the hand-over to o at once; o waits for the adopt call a live source sends
      // (whose claim then goes alone, in one transaction) instead of claiming on its own.
      await new Promise((r) => setTimeout(r, 400));
      expect(await exportStatus(ourl, "disk")).toMatchObject({ state: "REMOTE" });
      const record = async () => JSON.parse((await raw.getOne("/orphan/exports/disk/record"))!.value.toString());
      expect(await record()).toMatchObject({ owner: "o", epoch: 2 });
      expect((await record()).holder).toBeUndefined(); // not claimed
      await pollUntil("o adopts the orphaned hand-over", async () => (await exportStatus(ourl, "disk"))?.state === "LOCAL");
      expect(performance.now() - handedAt).toBeLessThan(4000);
      expect(logLines(o.stderr(), "the lease was handed to this node without an adopt call: adopting it")).toHaveLength(1);
      expect(await record()).toMatchObject({ owner: "o", epoch: 2, handedFrom: ["z@1"], holder: expect.any(String) });
    } finally {
      raw.close();
      await o.stop("SIGKILL");
    }
  }, 30_000);

  it("a killed owner is replaced once its etcd lease ends; a client of a surviving node sees a stall, not an error", async () => {
    const cl = await NbdClient.connect(nbdAddress(nodes.b!.uris[0]!), { exportName: "disk" });
    try {
      await cl.pwrite(Buffer.alloc(4096, 0x71), 0);
      await cl.flush();
      const t0 = performance.now();
      await nodes.a!.stop("SIGKILL");
      // Written while no one owns the export: it waits, and lands on the new owner.
      await cl.pwrite(Buffer.alloc(4096, 0x72), MiB);
      const stall = performance.now() - t0;
      expect((await cl.pread(4096, MiB)).equals(Buffer.alloc(4096, 0x72))).toBe(true);
      expect((await cl.pread(4096, 0)).equals(Buffer.alloc(4096, 0x71))).toBe(true);
      await pollUntil("b or c owns the export", async () => ((await getStatus(url("b"))).cluster as ClusterStatus).exports[0]?.epoch === 11);
      const cluster = (await getStatus(url("b"))).cluster as ClusterStatus;
      expect(cluster.nodes.map((n) => n.nodeId)).toEqual(["b", "c"]);
      expect(["b", "c"]).toContain(cluster.exports[0]!.owner);
      // The lease is 2 s (etcd's least); the owner's end is seen within a second of it.
      expect(stall).toBeLessThan(2000 + 1500);
      const took = [...logLines(nodes.b!.stderr(), "lease of the owner expired: taking the image over"), ...logLines(nodes.c!.stderr(), "lease of the owner expired: taking the image over")];
      // (A failure shows every node's lease lines: who took the image at which epoch, and why.)
      const leaseLines = () => ["b", "c"].map((n) => `${n}:\n` + nodes[n]!.stderr().split("\n").filter((l) => /lease|take|fenc/.test(l)).join("\n")).join("\n");
      expect(took, leaseLines()).toHaveLength(1);
      // The time without an owner: a log line and a metric on the node that took over.
      const taker = cluster.exports[0]!.owner;
      await pollUntil("the take-over's log line", async () => logLines(nodes[taker]!.stderr(), "took the image over: served here again after this long without an owner").length === 1);
      const [served] = logLines(nodes[taker]!.stderr(), "took the image over: served here again after this long without an owner");
      expect(served!.ownerlessMs).toEqual(expect.any(Number));
      expect(served!.ownerlessMs as number).toBeLessThan(1000); // from the lease's end (pushed by etcd) to port A serving
      const metrics = await scrape(url(taker));
      expect(metrics.get('nbdstack_takeovers_total{export="disk"}')).toBe(1);
      expect(metrics.get('nbdstack_last_ownerless_seconds{export="disk"}')).toBeCloseTo((served!.ownerlessMs as number) / 1000, 2);
    } finally {
      cl.destroy();
    }
  }, 60_000);
});

/**
 * A node restarted while etcd cannot be reached (a lost quorum, a partitioned host) must not
 * refuse to start: it serves, holds its clients' requests, and joins once etcd answers.
 */
describe.skipIf(!hasEtcd)("a node that starts while etcd cannot be reached", () => {
  it("starts, holds a client's write, and serves it once etcd answers", async () => {
    const dir = tempDir();
    const img = blankImage(path.join(dir, "disk.img"), 16 * MiB);
    const [clientPort, peerPort] = [await freePort(), await freePort()];
    const member = new EtcdMember({ name: "m1", dir, clientPort, peerPort, initialCluster: `m1=http://127.0.0.1:${peerPort}`, clusterToken: `late-${process.pid}` });
    const node = await serve([img, "--name", "disk", "--node-id", "a", "--etcd", `http://127.0.0.1:${clientPort}`, "--lease-ttl", "2s", "--control", "127.0.0.1:0"], 2);
    try {
      expect((await getStatus(controlUrl(node))).exports[0]).toMatchObject({ name: "disk", state: "REMOTE" });
      const cl = await NbdClient.connect(nbdAddress(node.uris[0]!), { exportName: "disk" });
      let done = false;
      const w = cl.pwrite(Buffer.alloc(4096, 0x2e), 0).then(() => (done = true));
      await new Promise((r) => setTimeout(r, 500));
      expect(done).toBe(false); // held: nobody owns the export yet
      member.start();
      await waitHealthy([member]);
      await w; // the node joined, took the export and served the write
      expect((await cl.pread(4096, 0)).equals(Buffer.alloc(4096, 0x2e))).toBe(true);
      expect((await getStatus(controlUrl(node))).exports[0]).toMatchObject({ state: "LOCAL", owner: "a" });
      cl.destroy();
    } finally {
      await node.stop("SIGKILL");
      await member.stop();
    }
  }, 60_000);

  it("listens within a second when etcd is silent (a member that accepts and never answers): clients are held, not refused", async () => {
    // QEMU backs off 1 s, 2 s, 4 s… after a refused connect: a node must not make its clients
    // wait for etcd's timeouts (5 s per call) before it listens.
    const dir = tempDir();
    const img = blankImage(path.join(dir, "disk.img"), 16 * MiB);
    const silent = await startProxy("http://127.0.0.1:9");
    silent.cut(); // accepts connections, answers nothing
    const t0 = performance.now();
    const node = await serve([img, "--name", "disk", "--node-id", "a", "--etcd", silent.url, "--lease-ttl", "2s", "--control", "127.0.0.1:0"], 2);
    const startMs = performance.now() - t0;
    try {
      expect(startMs).toBeLessThan(2500); // the process' own start (Node, modules) included
      const cl = await NbdClient.connect(nbdAddress(node.uris[0]!), { exportName: "disk", timeoutMs: 2000 });
      let settled = false;
      void cl.pwrite(Buffer.alloc(4096, 1), 0).then(
        () => (settled = true),
        () => (settled = true),
      );
      await new Promise((r) => setTimeout(r, 1000));
      expect(settled).toBe(false); // held, as long as nobody can own the export
      cl.destroy();
    } finally {
      await node.stop("SIGKILL");
      silent.close();
    }
  }, 30_000);
});

/**
 * Found by the nemesis on the lab: an owner cut from etcd learns at its deadline that its session
 * is gone, but it went on reporting LOCAL — and started draining for a move asked meanwhile —
 * until a write or a renewal got an answer through calls queued behind etcd's timeouts (6 s
 * there). A lost session is known locally: every export it owned is fenced at once.
 */
describe.skipIf(!hasEtcd)("an owner cut off from etcd", () => {
  it("fences its exports the moment its etcd session ends, without waiting for etcd to answer; a move asked then is refused at once", async () => {
    const dir = tempDir();
    const img = blankImage(path.join(dir, "disk.img"), 16 * MiB);
    const etcd = await startLocalCluster({ size: 1, dir });
    const proxy = await startProxy(etcd.endpoints[0]!);
    const common = [img, "--name", "disk", "--etcd-prefix", "/cut", "--lease-ttl", "2s", "--control", "127.0.0.1:0"];
    const a = await serve([...common, "--node-id", "a", "--etcd", proxy.url], 2);
    const b = await serve([...common, "--node-id", "b", "--etcd", etcd.endpoints[0]!], 2);
    const localOf = async (n: Served) => (await scrape(controlUrl(n))).get('nbdstack_redirector_state{export="disk",state="LOCAL"}');
    try {
      expect(await localOf(a)).toBe(1);
      proxy.cut(); // a reaches etcd no more; every call it makes hangs until its timeout
      const cutAt = performance.now();
      await pollUntil("a fenced", async () => (await localOf(a)) === 0, 10_000, 20);
      const fencedMs = performance.now() - cutAt;
      // Its session ends at most a TTL (2 s) after its last renewal (sent every 2/3 s): fenced
      // then. Waiting for the renewals to fail instead took 2.7–3.3 s here, and with calls
      // queued behind etcd's timeouts (a move, a status read) 6 s on the lab.
      expect(fencedMs).toBeLessThan(2300);
      expect(logLines(a.stderr(), "lease lost: fencing port A")[0]?.err).toMatch(/etcd session ended/);
      const t = performance.now();
      const move = await controlCall(controlUrl(a), "POST", "v1/exports/disk/migrate", { to: controlUrl(b) }, 30_000).then(
        () => "moved",
        (e: Error) => e.message,
      );
      expect(move).toMatch(/not owned here/);
      expect(performance.now() - t).toBeLessThan(1000);
      // b takes the export over once a's lease ended in etcd.
      await pollUntil("b owns it", async () => (await localOf(b)) === 1, 15_000, 50);
    } finally {
      await a.stop("SIGKILL");
      await b.stop("SIGKILL");
      proxy.close();
      await etcd.stop();
    }
  }, 60_000);
});

/**
 * serve's etcd flags end to end: etcd requiring client certificates (--client-cert-auth) and
 * user/password auth, reached with --etcd https://… --etcd-cacert --etcd-cert --etcd-key
 * --etcd-user and the password from $NBDSTACK_ETCD_PASSWORD or --etcd-password-file.
 */
describe.skipIf(!hasEtcd || !needTools("certtool"))("serve --etcd over TLS with client certificates and a user", () => {
  it("joins, owns and moves the export; a wrong password or no client certificate is refused with a clear message", async () => {
    const dir = tempDir();
    const pki = makePki(path.join(dir, "pki"), "etcd");
    const etcd = await startLocalCluster({ size: 1, dir, tls: { cert: pki.serverCert, key: pki.serverKey, ca: pki.ca, clientCertAuth: true, clientCert: pki.clientCert, clientKey: pki.clientKey } });
    const admin = new EtcdClient({ endpoints: etcd.endpoints, tls: { ca: fs.readFileSync(pki.ca), cert: fs.readFileSync(pki.clientCert), key: fs.readFileSync(pki.clientKey) } });
    await admin.request("/v3/auth/user/add", { name: "root", password: "s3cret" }, { mutation: true });
    await admin.request("/v3/auth/user/grant", { user: "root", role: "root" }, { mutation: true });
    await admin.request("/v3/auth/enable", {}, { mutation: true });
    admin.close();
    const img = blankImage(path.join(dir, "disk.img"), 16 * MiB);
    const pwFile = path.join(dir, "etcd-password");
    fs.writeFileSync(pwFile, "s3cret\n", { mode: 0o600 });
    // etcd's JSON gateway, with auth on, refuses client certificates that carry a CommonName.
    const node = clientCertOf(path.join(dir, "pki"), "node", null);
    const tlsArgs = ["--etcd", etcd.endpoints[0]!, "--etcd-cacert", pki.ca, "--etcd-cert", node.cert, "--etcd-key", node.key, "--etcd-user", "root"];
    const common = [img, "--name", "disk", "--etcd-prefix", "/tls", "--lease-ttl", "2s", "--control", "127.0.0.1:0"];
    const nodes: Served[] = [];
    try {
      const a = await serve([...common, "--node-id", "a", ...tlsArgs], 2, { NBDSTACK_ETCD_PASSWORD: "s3cret" });
      nodes.push(a);
      const b = await serve([...common, "--node-id", "b", ...tlsArgs, "--etcd-password-file", pwFile], 2);
      nodes.push(b);
      expect(logLines(a.stderr(), "joined the etcd cluster").length).toBe(1);
      const view = (await getStatus(controlUrl(b))).cluster as ClusterStatus;
      expect(view.nodes.map((n) => n.nodeId)).toEqual(["a", "b"]);
      expect(view.exports).toEqual([expect.objectContaining({ name: "disk", owner: "a", epoch: 1, live: true })]);
      const r = await controlCall<{ epoch: number }>(controlUrl(a), "POST", "v1/exports/disk/migrate", { to: controlUrl(b) }, 30_000);
      expect(r.epoch).toBe(2);
      // A wrong password: the node starts (it owns nothing) and says why it cannot join.
      const bad = await serve([...common, "--node-id", "c", ...tlsArgs], 2, { NBDSTACK_ETCD_PASSWORD: "wrong" });
      nodes.push(bad);
      await pollUntil("c says why it cannot join", async () => /authentication failed/.test(bad.stderr()), 10_000, 50);
      expect((await getStatus(controlUrl(bad))).exports[0]).toMatchObject({ state: "REMOTE" });
      // A client certificate with a CommonName: the gateway refuses it; the node says what to do.
      const withCn = await serve([...common, "--node-id", "e", ...tlsArgs.slice(0, 4), "--etcd-cert", pki.clientCert, "--etcd-key", pki.clientKey, "--etcd-user", "root"], 2, { NBDSTACK_ETCD_PASSWORD: "s3cret" });
      nodes.push(withCn);
      await pollUntil("e says why it cannot join", async () => /without a CommonName/.test(withCn.stderr()), 10_000, 50);
      // No client certificate: etcd refuses the TLS handshake; the node says so.
      const noCert = await serve([...common, "--node-id", "d", "--etcd", etcd.endpoints[0]!, "--etcd-cacert", pki.ca, "--etcd-user", "root"], 2, { NBDSTACK_ETCD_PASSWORD: "s3cret" });
      nodes.push(noCert);
      await pollUntil("d says why it cannot join", async () => /cannot join etcd yet|cannot reach etcd now/.test(noCert.stderr()), 10_000, 50);
      expect(noCert.stderr()).toMatch(/certificate|handshake|socket hang up|ECONNRESET/i);
    } finally {
      await Promise.all(nodes.map((n) => n.stop("SIGKILL")));
      await etcd.stop();
    }
  }, 60_000);
});
