import { execFileSync, spawn } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { EtcdClient } from "../../src/coord/etcd-client.js";
// @ts-expect-error -- a plain ES module without types, shared with scripts run by node
import { needEtcd } from "./etcd.mjs";
// @ts-expect-error -- a plain ES module without types, shared with scripts run by node
import { Lab, STATE_DIR, cleanLeftovers, listLabs, needNetns, procStart } from "./lab.mjs";
import { until } from "./helpers.js";

const LAB = path.join(path.dirname(fileURLToPath(import.meta.url)), "lab.mjs");
const canRun = needNetns() && needEtcd();
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const ipOut = (args: string[]) => execFileSync("ip", args, { encoding: "utf8" });
const allHealthy = { m1: true, m2: true, m3: true };

describe.skipIf(!canRun)("the multi-host lab: 3 hosts in network namespaces, a 3-member etcd", () => {
  let lab: Lab;
  beforeAll(async () => {
    lab = await Lab.up({ hosts: 3 });
  });
  afterEach(async () => {
    // Every test starts from a whole lab: no faults, every member running and healthy.
    if (!lab || lab.torn) return;
    lab.heal();
    for (const m of lab.etcdMembers) {
      if (lab.memberRunning(m.name)) await lab.killMember(m.name, "SIGCONT");
      else lab.startMember(m.name);
    }
    await lab.waitEtcd({ timeoutMs: 30_000 });
  });
  afterAll(() => {
    lab?.teardown();
  });

  it("each host reaches the others, and etcd is healthy from each", async () => {
    expect(lab.hosts.map((h: { name: string }) => h.name)).toEqual(["h1", "h2", "h3"]);
    for (const from of lab.hosts) {
      for (const to of lab.hosts) {
        if (to === from) continue;
        // etcd's peer port listens on every host: "open" means the TCP handshake went through.
        expect(await lab.reach(from.name, to.name, 2380), `${from.name} -> ${to.name}`).toBe("open");
      }
      expect(await lab.etcdHealth(from.name)).toEqual(allHealthy);
    }
    expect(lab.etcdEndpoints).toEqual(lab.hosts.map((h: { addr: string }) => `http://${h.addr}:2379`));
  });

  it("a partitioned host cannot reach etcd while the others still can; healed, it can again", async () => {
    lab.partition("h3");
    // From h3: the other members time out; its own member answers, but without a quorum.
    const fromH3 = await lab.etcdHealth("h3");
    expect([fromH3.m1, fromH3.m2]).toEqual(["timeout", "timeout"]);
    expect(fromH3.m3).not.toBe(true);
    expect(await lab.reach("h3", "h1", 2379)).toBe("timeout");
    // The other two keep (or, if m3 led, elect within an election timeout or so) a leader.
    for (const h of ["h1", "h2"]) {
      const health = await lab.waitEtcd({ from: h, members: ["m1", "m2"], timeoutMs: 15_000 });
      expect(health.m3).toBe("timeout");
    }
    lab.heal("h3");
    expect(lab.rules("h3")).toEqual([]);
    await lab.waitEtcd({ from: "h3", timeoutMs: 15_000 });
    expect(await lab.etcdHealth("h3")).toEqual(allHealthy);
  });

  it("a host cut from etcd still reaches its peers, and its member stays in the cluster", async () => {
    lab.cutFromEtcd("h2");
    // Every member's client port, its own member's included, is out of reach for h2's processes...
    expect(await lab.etcdHealth("h2")).toEqual({ m1: "timeout", m2: "timeout", m3: "timeout" });
    // ...but not the peers (any other port), and m2 serves the other hosts and keeps its quorum.
    expect(await lab.reach("h2", "h1", 2380)).toBe("open");
    expect(await lab.reach("h2", "h3", 9)).toBe("refused");
    expect(await lab.etcdHealth("h1")).toEqual(allHealthy);
    expect(await lab.etcdHealth("h3")).toEqual(allHealthy);
    lab.heal("h2");
    expect(await lab.etcdHealth("h2")).toEqual(allHealthy);
  });

  it("a host cut from its peers still reaches etcd, and nothing else on the other hosts", async () => {
    const listener = lab.spawn("h2", process.execPath, ["-e", "require('node:net').createServer().listen(10809, () => console.log('up'))"]);
    await new Promise((r) => listener.stdout!.once("data", r));
    lab.cutFromPeers("h1");
    expect(await lab.reach("h1", "h2", 10809)).toBe("timeout");
    expect(await lab.reach("h3", "h2", 10809)).toBe("open");
    expect(await lab.reach("h1", "h2", 2379)).toBe("open");
    expect(await lab.etcdHealth("h1")).toEqual(allHealthy);
    lab.heal("h1");
    expect(await lab.reach("h1", "h2", 10809)).toBe("open");
    listener.kill();
  });

  it("cuts two hosts apart and leaves the third in touch with both", async () => {
    lab.cut("h1", "h2");
    expect(await lab.reach("h1", "h2", 2380)).toBe("timeout");
    expect(await lab.reach("h2", "h1", 2380)).toBe("timeout");
    expect(await lab.reach("h3", "h1", 2380)).toBe("open");
    expect(await lab.reach("h3", "h2", 2380)).toBe("open");
  });

  it("loses packets (iptables), and delays what a host sends (tc netem, or an NFQUEUE where the kernel has no netem)", async () => {
    lab.degrade("h1", { lossPct: 100 });
    expect(await lab.reach("h1", "h2", 2380, 500)).toBe("timeout");
    lab.heal("h1");
    expect(await lab.reach("h1", "h2", 2380)).toBe("open");
    /** TCP connect times (one round trip each, ms) from `from` to `to`'s etcd peer port, 10 of them. */
    const rtts = async (from: string, to: string): Promise<number[]> => (await lab.probe(from, [{ rtt: [lab.addr(to), 2380], count: 10, timeoutMs: 2000 }]))[0];
    expect(Math.max(...(await rtts("h2", "h1")))).toBeLessThan(20);
    lab.degrade("h1", { delayMs: 100, jitterMs: 20 });
    // What h1 sends waits 80-120 ms (its SYN-ACKs to h2; its own SYNs), what h2 and h3 send to each other does not.
    const slow = await rtts("h2", "h1");
    expect(slow).toHaveLength(10);
    expect(Math.min(...slow)).toBeGreaterThanOrEqual(78);
    expect(Math.max(...slow)).toBeLessThan(200);
    expect(Math.min(...(await rtts("h1", "h3")))).toBeGreaterThanOrEqual(78);
    expect(Math.max(...(await rtts("h2", "h3")))).toBeLessThan(20);
    // TCP through it: etcd on h1 still answers, only later.
    expect((await lab.etcdHealth("h2")).m1).toBe(true);
    lab.degrade("h1", { delayMs: 30 }); // replaces the first
    const mid = await rtts("h2", "h1");
    expect(Math.min(...mid)).toBeGreaterThanOrEqual(29);
    expect(Math.max(...mid)).toBeLessThan(80);
    lab.heal("h1");
    expect(Math.max(...(await rtts("h2", "h1")))).toBeLessThan(20);
    expect(lab.exec("h1", "iptables", ["-w", "-t", "mangle", "-S", "POSTROUTING"]).stdout).not.toMatch(/NFQUEUE/);
    // and no delayer is left running in h1
    const cmdline = (pid: string) => (fs.existsSync(`/proc/${pid}/cmdline`) ? fs.readFileSync(`/proc/${pid}/cmdline`, "utf8") : "");
    const inH1 = execFileSync("ip", ["netns", "pids", lab.host("h1").ns]).toString().split(/\s+/).filter(Boolean);
    expect(inH1.filter((pid) => cmdline(pid).includes("delay.py"))).toEqual([]);
  });

  it("takes a link down and up", async () => {
    lab.linkDown("h2");
    expect(["unreachable", "timeout"]).toContain(await lab.reach("h2", "h1", 2380));
    lab.linkUp("h2");
    await until("h2's link to come back", async () => (await lab.reach("h2", "h1", 2380)) === "open", 10_000);
  });

  it("kills, freezes and restarts etcd members; the cluster keeps a quorum with one down", async () => {
    await lab.killMember("m3");
    expect(lab.memberRunning("m3")).toBe(false);
    // If m3 led, the other two elect a leader first (an election timeout or so).
    const health = await lab.waitEtcd({ members: ["m1", "m2"], timeoutMs: 15_000 });
    expect(health.m3).toBe("refused");
    lab.startMember("m3");
    await lab.waitEtcd({ timeoutMs: 20_000 });
    await lab.killMember("m2", "SIGSTOP");
    expect((await lab.etcdHealth("h1")).m2).toBe("timeout");
    await lab.killMember("m2", "SIGCONT");
    await lab.waitEtcd({ timeoutMs: 20_000 });
  });

  it("an etcd client on this machine reaches the lab over the bridge and fails over from a partitioned host", async () => {
    // A follower's member first: the client must notice it is cut off and move on (a leader's
    // partition would add an election to the time measured).
    const ask = new EtcdClient({ endpoints: lab.etcdEndpoints });
    const statuses = await Promise.all(lab.etcdEndpoints.map((e: string) => ask.status(e)));
    ask.close();
    const i = statuses.findIndex((st: { header: { memberId: string }; leader: string }) => st.header.memberId !== st.leader);
    const victim: string = lab.etcdMembers[i].host;
    const endpoints = [lab.etcdEndpoints[i], ...lab.etcdEndpoints.filter((_: string, j: number) => j !== i)];
    const c = new EtcdClient({ endpoints, attemptTimeoutMs: 1000 });
    try {
      await c.put("/lab/k", "1");
      expect(c.preferredEndpoint).toBe(endpoints[0]);
      lab.partition(victim);
      await sleep(50);
      const t0 = performance.now();
      expect((await c.getOne("/lab/k"))?.value.toString()).toBe("1");
      expect(performance.now() - t0).toBeLessThan(2500);
      expect(c.preferredEndpoint).not.toBe(endpoints[0]);
    } finally {
      c.close();
      lab.heal(victim);
    }
    await lab.waitEtcd({ timeoutMs: 15_000 });
  });

  it("a lab whose owner died is cleaned by the next one; a live lab is never touched; teardown removes everything", async () => {
    // A second lab, made by a process that is then killed without a chance to clean up.
    const child = spawn(process.execPath, ["--input-type=module", "-e", `import { Lab } from ${JSON.stringify(LAB)}; const l = await Lab.up({ hosts: 2, etcd: false }); console.log(l.id); setInterval(() => {}, 1000);`], {
      stdio: ["ignore", "pipe", "inherit"],
    });
    const crashedId = await new Promise<string>((resolve) => child.stdout!.once("data", (d) => resolve(String(d).trim())));
    const crashed = listLabs().find((s: { id: string }) => s.id === crashedId)!;
    // Two labs side by side: their own names and subnets.
    expect(crashed.subnet).not.toBe(lab.state.subnet);
    expect(crashed.bridge).not.toBe(lab.state.bridge);
    child.kill("SIGKILL");
    await new Promise((r) => child.once("exit", r));
    expect(ipOut(["netns", "list"])).toContain(`nbl-${crashedId}-h1`);
    const r = cleanLeftovers();
    expect(r.removed).toContain(`lab ${crashedId} (owner pid ${child.pid} is gone)`);
    expect(ipOut(["netns", "list"])).not.toContain(`nbl-${crashedId}`);
    expect(ipOut(["link", "show"])).not.toContain(`nbl-${crashedId}`);
    expect(fs.existsSync(path.join(STATE_DIR, `${crashedId}.json`))).toBe(false);
    // Ours is alive: untouched.
    expect(await lab.etcdHealth("h1")).toEqual(allHealthy);

    const s = structuredClone(lab.state);
    const pids = s.etcd!.members.map((m: { pid: number }) => m.pid);
    lab.teardown();
    expect(pids.every((p: number) => procStart(p) === null)).toBe(true);
    const netns = ipOut(["netns", "list"]);
    for (const h of s.hosts) expect(netns).not.toContain(h.ns);
    expect(ipOut(["link", "show"])).not.toContain(s.bridge);
    expect(fs.existsSync(s.dir)).toBe(false);
    expect(fs.existsSync(path.join(STATE_DIR, `${s.id}.json`))).toBe(false);
  });
});
