import type { ChildProcess } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it, onTestFinished } from "vitest";
import { controlCall, getStatus, type ClusterStatus } from "../../src/control/control-client.js";
import { WriteAudit, type AuditEntry } from "../../src/stack/port/write-audit.js";
import { exportStatus, fioLoad, fioOutcome, logLines, pollUntil } from "../helpers/migration.js";
import type { LogLine } from "../helpers/wait.js";
import { blankImage, CLI, tempDir } from "../helpers/serve.js";
import { needTools } from "../helpers/tools.js";
// @ts-expect-error -- a plain ES module without types, shared with scripts run by node
import { needEtcd } from "./etcd.mjs";
// @ts-expect-error -- a plain ES module without types, shared with scripts run by node
import { Lab, needNetns } from "./lab.mjs";

const MiB = 1024 * 1024;
const NBD_PORT = 10809;
const CONTROL_PORT = 9000;
/** Every node also listens here on any address of its host: the service address, where it is. */
const SERVICE_PORT = 10810;

/**
 * A gratuitous ARP for `ip` sent on eth0 (what keepalived sends when it takes a virtual address):
 * the hosts that knew the address by another host's MAC now send to this one. Python's raw packet
 * socket, as no arping is installed here.
 */
const GARP = `
import socket, struct, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
mac = s.getsockname()[4]
ip = socket.inet_aton(sys.argv[1])
for op in (1, 2):
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, op, mac, ip, b"\\xff" * 6 if op == 2 else b"\\0" * 6, ip)
    s.send(b"\\xff" * 6 + mac + struct.pack("!H", 0x0806) + arp)
`;
const TAKE_OVER = "lease of the owner expired: taking the image over";
const SESSION_LOST = "etcd lease lost: this node fences what it owned and joins again";
const canRun = needNetns() && needEtcd() && needTools("fio", "qemu-io");
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

interface LabNode {
  host: string;
  proc: ChildProcess;
  stderr(): string;
  exited: Promise<unknown>;
}

/**
 * Three hosts (network namespaces on a bridge, a 3-member etcd: test/cluster/lab.mjs), one node
 * per host serving one image that all of them see (this machine's file system is the shared
 * storage), coordinated by etcd (serve --etcd, lease 2 s). Clients run inside the hosts. Every
 * node keeps a write audit (serve --write-audit): each write, zero, trim and flush that reached
 * the image, with its wall time, so "never two writers" is read from what really hit the image.
 * The one-machine version of this scenario is test/interop/etcd-nodes.test.ts.
 */
describe.skipIf(!canRun)("nodes on three hosts coordinated by etcd (serve --etcd in network namespaces)", () => {
  let lab: Lab;
  let dir: string;
  let img: string;
  const nodes: Record<string, LabNode> = {};
  const logs: Record<string, string[]> = { h1: [], h2: [], h3: [] }; // every process's stderr, in order
  const audit = (h: string) => path.join(dir, `audit-${h}.jsonl`);
  const url = (h: string) => `http://${lab.addr(h)}:${CONTROL_PORT}`;
  const nbdUri = (h: string) => `nbd://${lab.addr(h)}:${NBD_PORT}/disk`;
  const cluster = async (h: string) => (await getStatus(url(h))).cluster as ClusterStatus;

  async function startNode(h: string): Promise<LabNode> {
    const args = [
      CLI, "serve", img, "--name", "disk", "--node-id", h, "--etcd", lab.etcdEndpoints.join(","), "--etcd-prefix", "/lab17", "--lease-ttl", "2s",
      "--listen", `${lab.addr(h)}:${NBD_PORT}`, "--listen", `0.0.0.0:${SERVICE_PORT}`, "--control", `${lab.addr(h)}:${CONTROL_PORT}`, "--write-audit", audit(h), "--log-format", "json", "--log-level", "debug",
    ];
    const proc = lab.spawn(h, process.execPath, args);
    let out = "";
    let err = "";
    const i = logs[h]!.push("") - 1;
    proc.stderr!.on("data", (d: Buffer) => {
      err += d;
      logs[h]![i] = err;
    });
    const exited = new Promise((r) => proc.once("exit", r));
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`node ${h} did not start: ${err}`)), 20_000);
      proc.stdout!.on("data", (d: Buffer) => {
        out += d;
        if (/^control /m.test(out)) {
          clearTimeout(timer);
          resolve();
        }
      });
      void exited.then(() => reject(new Error(`node ${h} exited: ${err}`)));
    });
    nodes[h] = { host: h, proc, stderr: () => err, exited };
    return nodes[h]!;
  }

  beforeAll(async () => {
    // --pre-vote (etcd 3.5's default, off in 3.4): without it h1's member, back from the partition
    // with the higher term it reached campaigning alone, forces an election, and with a 2 s lease
    // every node's session is lost in it (observed: "no leader" from each member for over 1.3 s).
    lab = await Lab.up({ hosts: 3, etcdArgs: ["--pre-vote"] });
    dir = tempDir("nbdstack-lab17-");
    fs.chmodSync(dir, 0o755);
    img = blankImage(path.join(dir, "disk.img"), 32 * MiB);
    await startNode("h1"); // the first node takes the image: h1 owns it at epoch 1
    await Promise.all([startNode("h2"), startNode("h3")]);
  }, 60_000);
  afterAll(() => {
    lab?.teardown();
  });

  /** fio (nbd engine, crc32c verification, rate-limited) run inside `host`. */
  const fioIn = (host: string, uri: string) => fioLoad(uri, { size: "8m", rateIops: 300, launch: (cmd, args) => lab.spawn(host, cmd, args) });

  it("moves h1 → h2 → h3 → h1 under fio in h2; a partitioned owner is replaced, never writes after it, and rejoins without taking the export back", async () => {
    expect((await cluster("h3")).exports).toEqual([expect.objectContaining({ name: "disk", owner: "h1", epoch: 1, live: true })]);
    const load = fioIn("h2", nbdUri("h2"));
    await sleep(500);
    let epoch = 1;
    const t0 = performance.now();
    for (let i = 0; i < 10; i++)
      for (const [from, to] of [["h1", "h2"], ["h2", "h3"], ["h3", "h1"]] as const) {
        const r = await controlCall<{ epoch: number }>(url(from), "POST", "v1/exports/disk/migrate", { to: url(to) }, 30_000);
        expect(r.epoch).toBe(++epoch);
        await pollUntil(`${to} serves through port A`, async () => (await exportStatus(url(to), "disk"))?.state === "LOCAL");
      }
    const movesMs = performance.now() - t0;
    expect((await cluster("h2")).exports[0]).toMatchObject({ owner: "h1", epoch, live: true });

    // h1, the owner, is cut off from everyone (etcd included: its member has no quorum).
    await sleep(300);
    const cutAt = Date.now();
    lab.partition("h1");
    onTestFinished(() => lab.heal("h1")); // also when a check below fails: the tests after this one need h1
    const now = await pollUntil(
      "another host owns the export",
      async () => {
        const e = (await cluster("h2")).exports[0];
        return e && e.owner !== "h1" && e.epoch > epoch && e.live ? e : undefined;
      },
      20_000,
      50,
    );
    const ownerMs = Date.now() - cutAt;
    await sleep(1500); // fio keeps writing through h2 to the new owner
    const f = await load.stop();
    expect(fioOutcome(f)).toEqual({ exit: "stopped", error: 0, complaints: [] });
    expect(f.job.write.io_bytes).toBeGreaterThan(0);

    // What reached the image: h1's last write came before the new owner took the image over.
    // One take-over, and one more for each session a survivor lost meanwhile: an etcd election
    // under load can outlast a 2 s lease, and that node fences, joins again and takes the export
    // (back) once its old session's lease ended. Any other take-over is a failure, shown with the
    // survivors' lines about their sessions and take-overs.
    const after = (h: string, msg: string) => logLines(logs[h]!.join(""), msg).filter((l) => l.time >= cutAt);
    const took = ["h2", "h3"].flatMap((h) => after(h, TAKE_OVER).map((l): LogLine => ({ ...l, node: h }))).sort((a, b) => a.time - b.time);
    const sessionsLost = ["h2", "h3"].flatMap((h) => after(h, SESSION_LOST));
    const story = ["h2", "h3"].flatMap((h) => [TAKE_OVER, SESSION_LOST, "joined the etcd cluster (a new session)"].flatMap((m) => after(h, m).map((l) => `${l.time - cutAt} ms ${h}: ${l.msg}`)));
    expect(took.length, story.join("\n")).toBeGreaterThanOrEqual(1);
    expect(took.length, story.join("\n")).toBeLessThanOrEqual(1 + sessionsLost.length);
    expect(took[0]).toMatchObject({ node: now.owner, epoch: now.epoch });
    const a1 = WriteAudit.read(audit("h1"));
    const lastOfH1 = a1.at(-1)!;
    expect(lastOfH1.t).toBeLessThan(took[0]!.time);
    expect(a1.every((e) => e.epoch !== null && e.epoch <= epoch)).toBe(true);
    // Never two writers: each epoch is one node's, and its writes all precede the next epoch's.
    const all: AuditEntry[] = ["h1", "h2", "h3"].flatMap((h) => WriteAudit.read(audit(h)));
    const byEpoch = new Map<number, AuditEntry[]>();
    for (const e of all) {
      expect(e.epoch).not.toBeNull();
      byEpoch.set(e.epoch!, [...(byEpoch.get(e.epoch!) ?? []), e]);
    }
    const epochs = [...byEpoch.keys()].sort((a, b) => a - b);
    // The last epoch that wrote is one a survivor took over (now's, unless a lost session made another).
    const lastTake = took.find((t) => t.epoch === epochs.at(-1));
    expect(lastTake, story.join("\n")).toBeDefined();
    for (let i = 0; i < epochs.length; i++) {
      const es = byEpoch.get(epochs[i]!)!;
      expect(new Set(es.map((e) => e.node)).size).toBe(1);
      if (i + 1 < epochs.length) expect(Math.max(...es.map((e) => e.t))).toBeLessThanOrEqual(Math.min(...byEpoch.get(epochs[i + 1]!)!.map((e) => e.t)));
    }
    expect(byEpoch.get(lastTake!.epoch)![0]!.node).toBe(lastTake!.node);
    // h1 fenced itself once its etcd lease could not be renewed.
    await pollUntil("h1 logs its lease lost", () => logLines(nodes.h1!.stderr(), SESSION_LOST).length > 0, 10_000);

    // Healed, h1 joins again (a new session) and leaves the export where it is.
    lab.heal("h1");
    await pollUntil("h1 is a member again", async () => (await cluster("h2")).nodes.some((n) => n.nodeId === "h1"), 20_000, 100);
    await sleep(2500);
    const settled = (await cluster("h2")).exports[0]!;
    expect((await cluster("h1")).exports[0]).toMatchObject({ owner: settled.owner, epoch: settled.epoch, live: true });
    expect(settled.owner).not.toBe("h1");
    expect((await exportStatus(url("h1"), "disk"))?.state).toBe("REMOTE");
    expect(WriteAudit.read(audit("h1")).length).toBe(a1.length);
    const lost = (h: string) => logLines(logs[h]!.join(""), SESSION_LOST).length;
    console.log(`sessions lost: h1 ${lost("h1")}, h2 ${lost("h2")}, h3 ${lost("h3")}`);
    console.log(`30 moves under fio in ${Math.round(movesMs)} ms; a new owner (${now.owner}) named ${ownerMs} ms after the partition; fio: ${f.job.write.io_bytes / 4096} writes, 0 errors`);
  }, 90_000);

  /**
   * qemu-io inside `host` (nbd driver, reconnect-delay=10): writes 64 KiB of pattern A at
   * `at[0]` MiB, sleeps 500 ms (the test breaks its link meanwhile), writes pattern B at `at[1]`
   * MiB, reads both back and flushes. Resolves once the first write reached the image (a node's
   * write audit has it, whichever node owns the export); `finish()` waits for qemu-io, checks it
   * reported no failure and both reads, and checks the image holds both writes.
   */
  async function qemuIoAcrossBreak(host: string, server: string, port: number, at: [number, number], pattern: [number, number]) {
    const hex = (b: number) => `0x${b.toString(16)}`;
    const q = lab.spawn(host, "qemu-io", [
      "--image-opts", `driver=nbd,server.type=inet,server.host=${server},server.port=${port},export=disk,reconnect-delay=10`,
      "-c", `write -P ${hex(pattern[0])} ${at[0]}M 64k`,
      "-c", "sleep 500",
      "-c", `write -P ${hex(pattern[1])} ${at[1]}M 64k`,
      "-c", `read -P ${hex(pattern[0])} ${at[0]}M 64k`,
      "-c", `read -P ${hex(pattern[1])} ${at[1]}M 64k`,
      "-c", "flush",
    ]);
    let out = "";
    q.stdout!.on("data", (d: Buffer) => (out += d));
    q.stderr!.on("data", (d: Buffer) => (out += d));
    const qDone = new Promise<number | null>((r) => q.once("close", r));
    const landed = (mib: number) => ["h1", "h2", "h3"].flatMap((x) => WriteAudit.read(audit(x))).find((e) => e.op === "write" && e.offset === mib * MiB && e.length === 64 * 1024);
    await pollUntil("the first write reached the image", () => {
      if (landed(at[0])) return true;
      if (q.exitCode !== null) throw new Error(`qemu-io exited (${q.exitCode}) before its first write reached the image: ${out}`);
    }, 20_000);
    expect(q.exitCode).toBeNull(); // the link breaks while qemu-io runs
    return {
      landed,
      async finish() {
        const code = await qDone;
        expect({ code, failed: out.split("\n").filter((l) => /fail|error/i.test(l)) }).toEqual({ code: 0, failed: [] });
        expect(out.match(/^read 65536\/65536 bytes/gm)).toHaveLength(2);
        const buf = fs.readFileSync(img);
        for (const i of [0, 1]) expect(buf.subarray(at[i]! * MiB, at[i]! * MiB + 65536).every((b) => b === pattern[i])).toBe(true);
      },
    };
  }

  it("qemu-io (reconnect-delay=10) through a non-owner keeps working across that node's SIGKILL and restart", async () => {
    const owner = (await pollUntil("an owner", async () => (await cluster("h2")).exports.find((e) => e.live)))!.owner;
    const h = ["h1", "h2", "h3"].find((x) => x !== owner)!;
    // h's node is killed meanwhile: the second write waits for the reconnection.
    const q = await qemuIoAcrossBreak(h, lab.addr(h), NBD_PORT, [2, 3], [0x5a, 0xa5]);
    nodes[h]!.proc.kill("SIGKILL");
    await nodes[h]!.exited;
    const t0 = performance.now();
    await startNode(h);
    const restartMs = performance.now() - t0;
    await q.finish();
    expect(q.landed(3)).toBeDefined();
    console.log(`qemu-io through ${h} (owner ${owner}); the node was back in ${Math.round(restartMs)} ms`);
  }, 60_000);

  it("a service address that moves between hosts (keepalived-like): qemu-io follows it, and its I/O goes on", async () => {
    const svc = lab.addr("h1").replace(/\.\d+$/, ".200");
    const ip = (h: string, op: "add" | "del") => expect(lab.exec(h, "ip", ["addr", op, `${svc}/24`, "dev", "eth0"]).stderr).toBe("");
    const garp = (h: string) => expect(lab.exec(h, "python3", ["-c", GARP, svc])).toMatchObject({ code: 0 });
    ip("h2", "add");
    garp("h2");
    // The address moves from h2 to h3 while qemu-io sleeps.
    const q = await qemuIoAcrossBreak("h1", svc, SERVICE_PORT, [4, 5], [0x3c, 0xc3]);
    const conns = (h: string) => logLines(nodes[h]!.stderr(), "transmission started").filter((l) => l.portB === false).length;
    const before = { h2: conns("h2"), h3: conns("h3") };
    // The move, as keepalived makes it: h2 gives the address up, h3 takes it and announces it.
    ip("h2", "del");
    ip("h3", "add");
    garp("h3");
    await q.finish();
    expect(before.h2).toBeGreaterThan(0);
    expect(conns("h3")).toBeGreaterThan(before.h3); // qemu-io reconnected, to h3's node
    ip("h3", "del");
  }, 60_000);
});
