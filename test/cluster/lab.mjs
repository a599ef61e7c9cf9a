#!/usr/bin/env node
// A multi-host lab on one machine: N network namespaces as hosts on a Linux bridge (a veth pair
// each, an address each in a /24 of 10.77.0.0/16), a 3-member etcd cluster (one member per host,
// run inside its namespace), and the faults a cluster must survive: partitions, a host cut from
// etcd but not from its peers and the reverse, lost packets, delay (where the kernel has netem),
// a link down, etcd members killed, frozen and restarted. Everything is named nbl-<id>-… with a
// random id, recorded in /run/nbdstack-lab/<id>.json before it is made, and removed by teardown
// — also when the process that made it died (the next lab cleans what a dead one left).
// Usable from tests (Lab.up / lab.teardown) and by hand: `npm run lab -- up|status|down|…`.
import { execFile, execFileSync, spawn, spawnSync } from "node:child_process";
import crypto from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { EtcdMember, ETCD_BIN, haveEtcd } from "./etcd.mjs";

export const PREFIX = "nbl";
export const STATE_DIR = process.env.NBDSTACK_LAB_STATE || "/run/nbdstack-lab";
export const ETCD_CLIENT_PORT = 2379;
export const ETCD_PEER_PORT = 2380;
const PROBE = path.join(path.dirname(fileURLToPath(import.meta.url)), "probe.mjs");
const DELAY = path.join(path.dirname(fileURLToPath(import.meta.url)), "delay.py");
/** The NFQUEUE queue delay.py serves (queues are per network namespace: one number serves every host). */
const DELAY_QUEUE = 7;
const ETCD_PORTS = `${ETCD_CLIENT_PORT},${ETCD_PEER_PORT}`;

// ——— small tools ———

function run(cmd, args, { allowFail = false, timeoutMs = 15_000, input } = {}) {
  const r = spawnSync(cmd, args, { encoding: "utf8", timeout: timeoutMs, input, stdio: [input === undefined ? "ignore" : "pipe", "pipe", "pipe"] });
  const out = { code: r.status, stdout: r.stdout ?? "", stderr: (r.stderr ?? "") + (r.error ? String(r.error.message) : "") };
  if (!allowFail && out.code !== 0) throw new Error(`${cmd} ${args.join(" ")} failed (${out.code}): ${out.stderr.trim() || out.stdout.trim()}`);
  return out;
}
const ipc = (...args) => run("ip", args);
const sleepSync = (ms) => Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);

/** The start time of a process (field 22 of /proc/PID/stat), null when it is gone or a zombie. */
export function procStart(pid) {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, "utf8");
    const rest = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    if (rest[0] === "Z" || rest[0] === "X") return null;
    return rest[19];
  } catch {
    return null;
  }
}

/** True when the process `pid` runs and is the one that started at `start` (not a reused pid). */
export function sameProcess(pid, start) {
  return pid > 0 && start !== null && start !== undefined && procStart(pid) === start;
}

function killAndWait(pids, timeoutMs = 5000) {
  for (const pid of pids) {
    for (const sig of ["SIGCONT", "SIGKILL"]) {
      try {
        process.kill(pid, sig);
      } catch {
        /* gone */
      }
    }
  }
  const end = Date.now() + timeoutMs;
  while (pids.some((p) => procStart(p) !== null) && Date.now() < end) sleepSync(20);
  return pids.filter((p) => procStart(p) !== null);
}

function netnsList() {
  const r = run("ip", ["netns", "list"], { allowFail: true });
  return r.stdout.split("\n").map((l) => l.split(" ")[0]).filter(Boolean);
}

function nsPids(ns) {
  const r = run("ip", ["netns", "pids", ns], { allowFail: true });
  return r.code === 0 ? r.stdout.split("\n").filter(Boolean).map(Number) : [];
}

function linkExists(name) {
  return run("ip", ["link", "show", "dev", name], { allowFail: true }).code === 0;
}

/** Runs a deletion; "it does not exist (any more)" is success. */
function gone(fn) {
  try {
    fn();
  } catch (e) {
    if (!/Cannot find device|does not exist|No such file/.test(e.message)) throw e;
  }
}

function readState(file) {
  try {
    return JSON.parse(fs.readFileSync(file, "utf8"));
  } catch {
    return null;
  }
}

function writeState(state) {
  fs.mkdirSync(STATE_DIR, { recursive: true, mode: 0o700 });
  const file = path.join(STATE_DIR, `${state.id}.json`);
  fs.writeFileSync(`${file}.tmp`, JSON.stringify(state, null, 2));
  fs.renameSync(`${file}.tmp`, file);
}

/** Every lab recorded on this machine, with whether the process that owns it still runs. */
export function listLabs() {
  let files = [];
  try {
    files = fs.readdirSync(STATE_DIR).filter((f) => f.endsWith(".json"));
  } catch {
    return [];
  }
  return files
    .map((f) => readState(path.join(STATE_DIR, f)))
    .filter(Boolean)
    .map((s) => ({ ...s, ownerAlive: s.persistent ? null : sameProcess(s.owner?.pid, s.owner?.start) }));
}

/**
 * Why network namespaces cannot be made here (null when they can): not root, no `ip`, no
 * iptables, or the kernel refuses. Tries for real with a throw-away namespace.
 */
export function netnsUnavailable() {
  if (process.getuid?.() !== 0) return "the lab needs root (network namespaces, a bridge, iptables)";
  for (const tool of ["ip", "iptables"]) {
    if (run("sh", ["-c", `command -v ${tool}`], { allowFail: true }).code !== 0) return `${tool} is not installed (Debian: iproute2, iptables)`;
  }
  const ns = `${PREFIX}-probe-${crypto.randomBytes(3).toString("hex")}`;
  const r = run("ip", ["netns", "add", ns], { allowFail: true });
  if (r.code !== 0) return `ip netns add fails: ${r.stderr.trim()}`;
  const t = run("ip", ["netns", "exec", ns, "iptables", "-w", "-S"], { allowFail: true });
  run("ip", ["netns", "del", ns], { allowFail: true });
  if (t.code !== 0) return `iptables does not work inside a namespace: ${t.stderr.trim()}`;
  return null;
}

/** True when labs can run; else false locally (skip) and an error under CI=true, where a skip is a failure. */
export function needNetns() {
  const why = netnsUnavailable();
  if (why === null) return true;
  if (process.env.CI === "true") throw new Error(`the multi-host lab cannot run under CI: ${why}`);
  console.warn(`skipping: ${why}`);
  return false;
}

/** Removes what a lab recorded in `state` made, step by step, going on past failures. Returns what failed. */
function destroy(state) {
  const problems = [];
  const step = (what, fn) => {
    try {
      fn();
    } catch (e) {
      problems.push(`${what}: ${e.message}`);
    }
  };
  // Processes first: everything running in the lab's namespaces (etcd, nodes, anything spawned),
  // found by the kernel's list for each namespace, so only what runs in them is touched.
  const nss = new Set(netnsList());
  const pids = [];
  for (const h of state.hosts ?? []) if (nss.has(h.ns)) pids.push(...nsPids(h.ns));
  for (const m of state.etcd?.members ?? []) if (sameProcess(m.pid, m.start)) pids.push(m.pid);
  for (const p of state.spawned ?? []) if (sameProcess(p.pid, p.start)) pids.push(p.pid);
  const stuck = killAndWait([...new Set(pids)]);
  if (stuck.length) problems.push(`processes still running: ${stuck.join(", ")}`);
  for (const h of state.hosts ?? []) {
    if (nss.has(h.ns)) step(`delete namespace ${h.ns}`, () => gone(() => ipc("netns", "del", h.ns)));
    // Deleting the namespace deletes the veth pair, but the kernel does it a moment later: the
    // root end may still be listed, then gone before `ip link del` reaches it.
    if (h.veth && linkExists(h.veth)) step(`delete ${h.veth}`, () => gone(() => ipc("link", "del", h.veth)));
  }
  if (state.forwardRule) {
    step("remove the FORWARD rule", () => run("iptables", ["-w", "-D", "FORWARD", "-i", state.bridge, "-o", state.bridge, "-m", "comment", "--comment", `${PREFIX}-${state.id}`, "-j", "ACCEPT"]));
  }
  if (state.bridge && linkExists(state.bridge)) step(`delete bridge ${state.bridge}`, () => gone(() => ipc("link", "del", state.bridge)));
  if (state.dir && path.basename(state.dir).startsWith(`nbdstack-lab-${state.id}`)) step(`remove ${state.dir}`, () => fs.rmSync(state.dir, { recursive: true, force: true }));
  const data = state.etcd?.dataRoot;
  if (data && path.basename(data).startsWith(`nbdstack-lab-${state.id}`)) step(`remove ${data}`, () => fs.rmSync(data, { recursive: true, force: true }));
  if (problems.length === 0) step("remove the state file", () => fs.rmSync(path.join(STATE_DIR, `${state.id}.json`), { force: true }));
  return problems;
}

/**
 * Removes what crashed labs left: labs whose owner process is gone (persistent labs, made by
 * `lab up`, stay until `lab down`), and namespaces and bridges named like ours that no state
 * file claims — a namespace only when no process runs in it, a bridge only when nothing but our
 * veths is attached. Returns what it removed and what it left, and why.
 */
export function cleanLeftovers({ log = () => {} } = {}) {
  const removed = [];
  const left = [];
  const labs = listLabs();
  for (const s of labs) {
    if (s.persistent || s.ownerAlive) continue;
    const problems = destroy(s);
    if (problems.length) left.push(`lab ${s.id}: ${problems.join("; ")}`);
    else removed.push(`lab ${s.id} (owner pid ${s.owner?.pid} is gone)`);
  }
  const claimed = new Set(listLabs().map((s) => s.id));
  const ours = new RegExp(`^${PREFIX}-([0-9a-f]{6})(?:-|$)`);
  for (const ns of netnsList()) {
    const m = ours.exec(ns);
    const probe = ns.startsWith(`${PREFIX}-probe-`); // a netnsUnavailable() check that died halfway
    if (!probe && (!m || claimed.has(m[1]))) continue;
    const pids = nsPids(ns);
    if (pids.length) {
      left.push(`namespace ${ns}: no lab claims it, but processes run in it (${pids.join(", ")}); remove by hand`);
      continue;
    }
    run("ip", ["netns", "del", ns], { allowFail: true });
    removed.push(`namespace ${ns} (unclaimed, empty)`);
  }
  const links = run("ip", ["-o", "link", "show"], { allowFail: true }).stdout.split("\n");
  for (const line of links) {
    const name = line.split(":")[1]?.trim().split("@")[0];
    const m = name && ours.exec(name);
    if (!m || claimed.has(m[1]) || name !== `${PREFIX}-${m[1]}`) continue;
    const ports = run("ip", ["-o", "link", "show", "master", name], { allowFail: true }).stdout.split("\n").filter(Boolean);
    if (ports.some((p) => !ours.test(p.split(":")[1]?.trim() ?? ""))) {
      left.push(`bridge ${name}: unclaimed, but foreign interfaces are attached; remove by hand`);
      continue;
    }
    run("ip", ["link", "del", name], { allowFail: true });
    removed.push(`bridge ${name} (unclaimed)`);
  }
  for (const r of removed) log(`removed ${r}`);
  for (const l of left) log(`left ${l}`);
  return { removed, left };
}

function pickSubnet() {
  const used = new Set(listLabs().map((s) => s.subnet));
  const addrs = run("ip", ["-4", "-o", "addr", "show"], { allowFail: true }).stdout;
  const routes = run("ip", ["-4", "route", "show"], { allowFail: true }).stdout;
  for (let i = 0; i < 256; i++) {
    const subnet = `10.77.${i}`;
    if (used.has(subnet) || addrs.includes(` ${subnet}.`) || routes.includes(`${subnet}.0/24`)) continue;
    return subnet;
  }
  throw new Error("no free /24 in 10.77.0.0/16 for a lab (too many labs?): `npm run lab -- status`");
}

function etcdUser() {
  for (const name of ["etcd", "nobody"]) {
    const r = run("getent", ["passwd", name], { allowFail: true });
    if (r.code === 0) {
      const [, , uid, gid] = r.stdout.split(":");
      return { name, uid: Number(uid), gid: Number(gid) };
    }
  }
  throw new Error("neither user etcd nor nobody exists: the lab runs etcd as an unprivileged user so that iptables can tell it apart");
}

/** Labs of this process that are not persistent: torn down when it exits, whatever happened. */
const mine = new Set();
process.on("exit", () => {
  for (const lab of mine) {
    try {
      lab.teardown();
    } catch {
      /* exiting anyway */
    }
  }
});
for (const sig of ["SIGTERM", "SIGINT", "SIGHUP"]) {
  if (process.listenerCount(sig) === 0) process.once(sig, () => process.exit(128 + os.constants.signals[sig]));
}

export class Lab {
  /**
   * Brings up a lab. On any failure everything made so far is removed and the error thrown.
   * @param {{ hosts?: number, etcd?: boolean, etcdMembers?: number, persistent?: boolean, etcdArgs?: string[], etcdDataIn?: string, log?: (s: string) => void }} o
   *   hosts: how many (default 3); etcd: run a cluster (default true) with etcdMembers members on
   *   the first hosts (default min(3, hosts)); persistent: outlive this process (the CLI's `up`);
   *   etcdDataIn: a directory for the members' data (a directory of their own is made in it, and
   *   removed with the lab), e.g. on another file system than the lab's images (default: the lab's).
   */
  static async up(o = {}) {
    const why = netnsUnavailable();
    if (why) throw new Error(`cannot make a lab: ${why}`);
    const wantEtcd = o.etcd ?? true;
    if (wantEtcd && !haveEtcd()) throw new Error(`cannot make a lab with etcd: ${ETCD_BIN} is missing (apt-get install etcd-server)`);
    const log = o.log ?? (() => {});
    cleanLeftovers({ log });
    const n = o.hosts ?? 3;
    if (!Number.isInteger(n) || n < 1 || n > 50) throw new Error(`hosts must be 1..50, got ${o.hosts}`);
    const id = crypto.randomBytes(3).toString("hex");
    const subnet = pickSubnet();
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), `nbdstack-lab-${id}-`));
    fs.chmodSync(dir, 0o755); // etcd runs as an unprivileged user and keeps its data dir in here
    const state = {
      id,
      created: new Date().toISOString(),
      persistent: o.persistent === true,
      owner: o.persistent ? null : { pid: process.pid, start: procStart(process.pid) },
      subnet,
      bridge: `${PREFIX}-${id}`,
      bridgeAddr: `${subnet}.254`,
      dir,
      forwardRule: false,
      features: { netem: false },
      hosts: [],
      spawned: [],
      etcd: null,
    };
    writeState(state);
    const lab = new Lab(state);
    if (!state.persistent) mine.add(lab);
    try {
      lab.build(n, log);
      if (wantEtcd) await lab.startEtcd(Math.min(o.etcdMembers ?? 3, n), o.etcdArgs ?? [], log, o.etcdDataIn);
    } catch (err) {
      const problems = lab.teardown({ quiet: true });
      if (problems.length) err.message += ` (and the teardown left: ${problems.join("; ")})`;
      throw err;
    }
    return lab;
  }

  /** The lab `id` as recorded (to steer a lab made by another process, e.g. the CLI's). */
  static load(id) {
    const state = readState(path.join(STATE_DIR, `${id}.json`));
    if (!state) throw new Error(`no lab ${id} (see \`npm run lab -- status\`)`);
    return new Lab(state);
  }

  constructor(state) {
    this.state = state;
    /** @type {Map<string, EtcdMember>} members started by this process */
    this.members = new Map();
    this.torn = false;
  }

  get id() {
    return this.state.id;
  }
  get dir() {
    return this.state.dir;
  }
  /** @returns {Array<{ name: string, ns: string, addr: string, veth: string }>} */
  get hosts() {
    return this.state.hosts;
  }
  /** The address of the machine itself on the lab's bridge (the operator's). */
  get bridgeAddr() {
    return this.state.bridgeAddr;
  }
  get features() {
    return this.state.features;
  }
  /** Client URLs of the etcd members, as a node inside the lab dials them. */
  get etcdEndpoints() {
    return (this.state.etcd?.members ?? []).map((m) => `http://${this.host(m.host).addr}:${ETCD_CLIENT_PORT}`);
  }
  get etcdMembers() {
    return this.state.etcd?.members ?? [];
  }

  host(name) {
    const h = this.state.hosts.find((x) => x.name === name || x.ns === name || x.addr === name);
    if (!h) throw new Error(`lab ${this.id} has no host ${name} (hosts: ${this.state.hosts.map((x) => x.name).join(", ")})`);
    return h;
  }

  addr(name) {
    return this.host(name).addr;
  }

  save() {
    if (!this.torn) writeState(this.state);
  }

  build(n, log) {
    const s = this.state;
    ipc("link", "add", s.bridge, "type", "bridge");
    ipc("addr", "add", `${s.bridgeAddr}/24`, "dev", s.bridge);
    ipc("link", "set", s.bridge, "up");
    for (let i = 1; i <= n; i++) {
      const h = { name: `h${i}`, ns: `${PREFIX}-${s.id}-h${i}`, addr: `${s.subnet}.${i}`, veth: `${PREFIX}-${s.id}-${i}` };
      s.hosts.push(h);
      this.save(); // recorded before it exists, so a crash in between still gets it removed
      const peer = `${h.veth}p`;
      ipc("netns", "add", h.ns);
      ipc("link", "add", h.veth, "type", "veth", "peer", "name", peer);
      ipc("link", "set", peer, "netns", h.ns);
      ipc("link", "set", h.veth, "master", s.bridge, "up");
      const inNs = (...args) => run("ip", ["netns", "exec", h.ns, ...args]);
      inNs("ip", "link", "set", peer, "name", "eth0");
      inNs("ip", "addr", "add", `${h.addr}/24`, "dev", "eth0");
      inNs("ip", "link", "set", "eth0", "up");
      inNs("ip", "link", "set", "lo", "up");
      // The lab's own chains: faults go there, heal empties them.
      for (const [chain, hook] of [["LAB_IN", "INPUT"], ["LAB_OUT", "OUTPUT"]]) {
        inNs("iptables", "-w", "-N", chain);
        inNs("iptables", "-w", "-A", hook, "-j", chain);
      }
    }
    // Bridged frames go through this machine's FORWARD chain when br_netfilter asks for it; a
    // DROP policy there (Docker sets one) would cut the hosts from each other.
    const nf = (() => {
      try {
        return fs.readFileSync("/proc/sys/net/bridge/bridge-nf-call-iptables", "utf8").trim() === "1";
      } catch {
        return false;
      }
    })();
    const policy = run("iptables", ["-w", "-S", "FORWARD"], { allowFail: true }).stdout.split("\n")[0]?.trim();
    if (nf && policy !== "-P FORWARD ACCEPT") {
      run("iptables", ["-w", "-I", "FORWARD", "-i", s.bridge, "-o", s.bridge, "-m", "comment", "--comment", `${PREFIX}-${s.id}`, "-j", "ACCEPT"]);
      s.forwardRule = true;
      log(`added a FORWARD rule for ${s.bridge} (policy here: ${policy})`);
    }
    const h1 = s.hosts[0];
    const t = run("ip", ["netns", "exec", h1.ns, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"], { allowFail: true });
    s.features.netem = t.code === 0;
    if (t.code === 0) run("ip", ["netns", "exec", h1.ns, "tc", "qdisc", "del", "dev", "lo", "root"], { allowFail: true });
    else s.features.netemError = t.stderr.trim();
    this.save();
    log(`lab ${s.id}: bridge ${s.bridge} ${s.bridgeAddr}/24, hosts ${s.hosts.map((h) => `${h.name}=${h.addr}`).join(" ")}`);
  }

  /** Checks that the hosts reach each other (a closed port answering "refused" is reached). */
  async checkConnectivity() {
    const s = this.state;
    if (s.hosts.length < 2) return;
    const answers = await this.probe(s.hosts[0].name, s.hosts.slice(1).map((h) => ({ reach: [h.addr, 9], timeoutMs: 1000 })));
    const bad = answers.map((a, i) => [s.hosts[i + 1].name, a]).filter(([, a]) => a !== "refused" && a !== "open");
    if (bad.length) {
      throw new Error(
        `lab ${s.id}: h1 cannot reach ${bad.map(([h, a]) => `${h} (${a})`).join(", ")} over bridge ${s.bridge}; is bridged traffic filtered here (sysctl net.bridge.bridge-nf-call-iptables, iptables -S FORWARD)?`,
      );
    }
  }

  async startEtcd(count, extraArgs, log, dataIn) {
    const s = this.state;
    await this.checkConnectivity();
    const user = etcdUser();
    const hosts = s.hosts.slice(0, count);
    const dataRoot = dataIn ? fs.mkdtempSync(path.join(dataIn, `nbdstack-lab-${s.id}-etcd-`)) : undefined;
    if (dataRoot) fs.chmodSync(dataRoot, 0o755); // etcd runs as an unprivileged user
    s.etcd = {
      dataRoot,
      token: `${PREFIX}-${s.id}`,
      user: user.name,
      uid: user.uid,
      gid: user.gid,
      extraArgs,
      members: hosts.map((h, i) => ({ name: `m${i + 1}`, host: h.name, pid: 0, start: null })),
    };
    this.save();
    for (const m of s.etcd.members) this.startMember(m.name);
    await this.waitEtcd({ timeoutMs: 30_000 });
    log(`lab ${s.id}: etcd ${this.etcdEndpoints.join(",")} healthy`);
  }

  member(name) {
    const m = this.state.etcd?.members.find((x) => x.name === name || x.host === name);
    if (!m) throw new Error(`lab ${this.id} has no etcd member ${name} (members: ${this.etcdMembers.map((x) => `${x.name} on ${x.host}`).join(", ")})`);
    return m;
  }

  /** Starts (or restarts, with its data) the etcd member `name` ("m1", or its host "h1"). */
  startMember(name) {
    const s = this.state;
    const m = this.member(name);
    if (sameProcess(m.pid, m.start)) throw new Error(`etcd member ${m.name} runs already (pid ${m.pid})`);
    const initialCluster = s.etcd.members.map((x) => `${x.name}=http://${this.addr(x.host)}:${ETCD_PEER_PORT}`).join(",");
    const h = this.host(m.host);
    const em = new EtcdMember({
      name: m.name,
      dir: s.dir,
      ...(s.etcd.dataRoot ? { dataDir: path.join(s.etcd.dataRoot, `${m.name}.data`) } : {}),
      host: h.addr,
      clientPort: ETCD_CLIENT_PORT,
      peerPort: ETCD_PEER_PORT,
      initialCluster,
      clusterToken: s.etcd.token,
      netns: h.ns,
      runAs: { uid: s.etcd.uid, gid: s.etcd.gid },
      extraArgs: s.etcd.extraArgs,
      detached: s.persistent,
    }).start();
    this.members.set(m.name, em);
    m.pid = em.pid;
    // The wrappers exec etcd at once; its start time is stable from the first read on.
    m.start = procStart(em.pid);
    this.save();
    return m;
  }

  /** Sends `signal` to an etcd member (SIGKILL: dead, SIGSTOP: frozen, SIGCONT: thawed). */
  async killMember(name, signal = "SIGKILL") {
    const m = this.member(name);
    if (!sameProcess(m.pid, m.start)) return;
    process.kill(m.pid, signal);
    if (signal === "SIGSTOP" || signal === "SIGCONT") return;
    const em = this.members.get(m.name);
    if (em) await em.exited;
    else {
      const end = Date.now() + 10_000;
      while (procStart(m.pid) !== null && Date.now() < end) await new Promise((r) => setTimeout(r, 20));
    }
  }

  memberRunning(name) {
    const m = this.member(name);
    return sameProcess(m.pid, m.start);
  }

  /**
   * Waits until every etcd member (or those in `members`) reports healthy, asked from `from`
   * (default: the first member's host); returns the last health answer.
   * @param {{ from?: string, members?: string[], timeoutMs?: number }} [o]
   */
  async waitEtcd({ from, members, timeoutMs = 30_000 } = {}) {
    const end = Date.now() + timeoutMs;
    const want = members ?? this.etcdMembers.map((m) => m.name);
    let last;
    for (;;) {
      last = await this.etcdHealth(from ?? this.etcdMembers[0].host);
      if (want.every((n) => last[n] === true)) return last;
      const dead = this.etcdMembers.find((m) => want.includes(m.name) && !sameProcess(m.pid, m.start));
      if (dead) throw new Error(`etcd member ${dead.name} on ${dead.host} is not running:\n${this.memberLog(dead.name)}`);
      if (Date.now() > end) throw new Error(`etcd not healthy after ${timeoutMs} ms: ${JSON.stringify(last)}\n${this.etcdMembers.map((m) => `--- ${m.name}\n${this.memberLog(m.name, 6)}`).join("\n")}`);
      await new Promise((r) => setTimeout(r, 200));
    }
  }

  memberLog(name, lines = 20) {
    try {
      return fs.readFileSync(path.join(this.dir, `${name}.log`), "utf8").trimEnd().split("\n").slice(-lines).join("\n");
    } catch {
      return "(no log)";
    }
  }

  // ——— running things on a host ———

  /** Runs a command inside `host` and waits: { code, stdout, stderr }. */
  exec(host, cmd, args = [], { timeoutMs = 30_000, input } = {}) {
    return run("ip", ["netns", "exec", this.host(host).ns, cmd, ...args], { allowFail: true, timeoutMs, input });
  }

  /** The same without blocking the event loop. */
  execAsync(host, cmd, args = [], { timeoutMs = 30_000 } = {}) {
    return new Promise((resolve) => {
      execFile("ip", ["netns", "exec", this.host(host).ns, cmd, ...args], { encoding: "utf8", timeout: timeoutMs }, (err, stdout, stderr) => {
        resolve({ code: err ? (typeof err.code === "number" ? err.code : 1) : 0, stdout, stderr: stderr || (err && typeof err.code !== "number" ? String(err.message) : "") });
      });
    });
  }

  /**
   * Starts a process inside `host` (its pid is the command's own: `ip netns exec` execs it). It
   * is killed at teardown with everything else in the host. Its stdout and stderr are pipes by
   * default: read them, or pass `stdio`, or it stops once a pipe is full.
   */
  spawn(host, cmd, args = [], opts = {}) {
    const p = spawn("ip", ["netns", "exec", this.host(host).ns, cmd, ...args], { stdio: ["ignore", "pipe", "pipe"], ...opts });
    this.state.spawned.push({ host, pid: p.pid, start: procStart(p.pid) });
    this.save();
    return p;
  }

  /** Runs network checks inside `host` (see probe.mjs); answers in order. */
  async probe(host, checks) {
    const wait = Math.max(...checks.map((c) => c.timeoutMs ?? 1000)) + 5000;
    const r = await this.execAsync(host, process.execPath, [PROBE, JSON.stringify(checks)], { timeoutMs: wait });
    if (r.code !== 0) throw new Error(`probe in ${host} failed (${r.code}): ${r.stderr.trim()}`);
    return JSON.parse(r.stdout);
  }

  /** Whether `from` reaches `to` (a host or an address) on `port`: "open", "refused" (reached, nothing listens), "timeout", "unreachable". */
  async reach(from, to, port, timeoutMs = 1000) {
    const addr = this.state.hosts.some((h) => h.name === to) ? this.addr(to) : to;
    return (await this.probe(from, [{ reach: [addr, port], timeoutMs }]))[0];
  }

  /** Each member's /health as `from` sees it: { m1: true | false | "timeout" | …, … }. */
  async etcdHealth(from, timeoutMs = 1500) {
    const members = this.etcdMembers;
    const answers = await this.probe(from, members.map((m) => ({ health: `http://${this.addr(m.host)}:${ETCD_CLIENT_PORT}`, timeoutMs })));
    return Object.fromEntries(members.map((m, i) => [m.name, answers[i]]));
  }

  // ——— faults ———

  rule(host, chain, args) {
    const r = this.exec(host, "iptables", ["-w", "-A", chain, ...args]);
    if (r.code !== 0) throw new Error(`iptables in ${host}: ${r.stderr.trim()}`);
  }

  static target(mode) {
    if (mode === "reject") return ["-j", "REJECT"];
    if (mode !== undefined && mode !== "drop") throw new Error(`mode must be "drop" (silent) or "reject" (refused at once), got ${mode}`);
    return ["-j", "DROP"];
  }

  /** Cuts `host` from every other host and from the bridge, both ways (its loopback keeps working). */
  partition(host, { mode } = {}) {
    const j = Lab.target(mode);
    this.rule(host, "LAB_IN", ["-i", "eth0", ...j]);
    this.rule(host, "LAB_OUT", ["-o", "eth0", ...j]);
  }

  /** Cuts the traffic between two hosts only (both ways). */
  cut(a, b, { mode } = {}) {
    const j = Lab.target(mode);
    this.rule(a, "LAB_IN", ["-s", this.addr(b), ...j]);
    this.rule(a, "LAB_OUT", ["-d", this.addr(b), ...j]);
  }

  /**
   * Cuts the processes of `host` from every etcd member's client port, its own member's too;
   * its member stays in the cluster (peer traffic, and the member's own gateway, run as the etcd
   * user, are let through), and the host still reaches its peers on every other port.
   */
  cutFromEtcd(host, { mode } = {}) {
    const uid = this.state.etcd?.uid;
    const owner = uid === undefined ? [] : ["-m", "owner", "!", "--uid-owner", String(uid)];
    this.rule(host, "LAB_OUT", ["-p", "tcp", "--dport", String(ETCD_CLIENT_PORT), ...owner, ...Lab.target(mode)]);
  }

  /** The reverse: `host` keeps etcd (client and peer ports, both ways) and loses everything else on the network. */
  cutFromPeers(host, { mode } = {}) {
    const j = Lab.target(mode);
    this.rule(host, "LAB_IN", ["-i", "eth0", "-p", "tcp", "-m", "multiport", "--ports", ETCD_PORTS, "-j", "RETURN"]);
    this.rule(host, "LAB_IN", ["-i", "eth0", ...j]);
    this.rule(host, "LAB_OUT", ["-o", "eth0", "-p", "tcp", "-m", "multiport", "--ports", ETCD_PORTS, "-j", "RETURN"]);
    this.rule(host, "LAB_OUT", ["-o", "eth0", ...j]);
  }

  /**
   * Degrades `host`'s link: `lossPct` of its packets dropped in each direction (iptables, any
   * kernel), `delayMs` ± `jitterMs` added to what it sends — with tc netem where the kernel has
   * it (`features.netem`), else by holding each packet in an NFQUEUE until delay.py accepts it
   * (`iptables -t mangle … -j NFQUEUE`, in order, see delay.py). A second delay replaces the first.
   */
  degrade(host, { delayMs = 0, jitterMs = 0, lossPct = 0 } = {}) {
    if (delayMs > 0 || jitterMs > 0) {
      if (delayMs < 0 || jitterMs < 0 || jitterMs > delayMs) throw new Error(`delay must be ≥ 0 with 0 ≤ jitter ≤ delay, got ${delayMs} ± ${jitterMs} ms`);
      if (this.features.netem) {
        const r = this.exec(host, "tc", ["qdisc", "replace", "dev", "eth0", "root", "netem", "delay", `${delayMs}ms`, ...(jitterMs ? [`${jitterMs}ms`] : [])]);
        if (r.code !== 0) throw new Error(`tc in ${host}: ${r.stderr.trim()}`);
      } else this.delayByQueue(host, delayMs, jitterMs);
    }
    if (lossPct > 0) {
      if (lossPct > 100) throw new Error(`lossPct must be 0..100, got ${lossPct}`);
      const p = String(lossPct / 100);
      this.rule(host, "LAB_IN", ["-i", "eth0", "-m", "statistic", "--mode", "random", "--probability", p, "-j", "DROP"]);
      this.rule(host, "LAB_OUT", ["-o", "eth0", "-m", "statistic", "--mode", "random", "--probability", p, "-j", "DROP"]);
    }
  }

  linkDown(host) {
    const r = this.exec(host, "ip", ["link", "set", "eth0", "down"]);
    if (r.code !== 0) throw new Error(`ip link in ${host}: ${r.stderr.trim()}`);
  }

  linkUp(host) {
    const r = this.exec(host, "ip", ["link", "set", "eth0", "up"]);
    if (r.code !== 0) throw new Error(`ip link in ${host}: ${r.stderr.trim()}`);
  }

  /** Delay without netem: delay.py in the host holds what it sends (see degrade). */
  delayByQueue(host, delayMs, jitterMs) {
    this.stopDelay(host);
    const h = this.host(host);
    const log = path.join(this.state.dir, `delay-${h.name}.log`);
    const r = run("ip", ["netns", "exec", h.ns, "sh", "-c", `setsid python3 "$0" "$1" "$2" "$3" >"$4" 2>&1 </dev/null & echo $!`, DELAY, String(DELAY_QUEUE), String(delayMs), String(jitterMs), log], { allowFail: true });
    const pid = Number(r.stdout.trim());
    if (r.code !== 0 || !pid) throw new Error(`cannot start delay.py in ${host}: ${r.stderr.trim()}`);
    (this.state.delays ??= {})[h.name] = { pid, start: procStart(pid) };
    this.save();
    for (let t0 = Date.now(); ; sleepSync(20)) {
      const out = fs.existsSync(log) ? fs.readFileSync(log, "utf8") : "";
      if (/^delay\.py: queue/m.test(out)) break;
      if (procStart(pid) === null || Date.now() - t0 > 5000) {
        this.stopDelay(host);
        throw new Error(`delay.py did not start in ${host} (python3 and the kernel's NFQUEUE, CONFIG_NETFILTER_NETLINK_QUEUE, are needed): ${out.trim() || "no output"}`);
      }
    }
    const q = this.exec(host, "iptables", ["-w", "-t", "mangle", "-A", "POSTROUTING", "-o", "eth0", "-j", "NFQUEUE", "--queue-num", String(DELAY_QUEUE), "--queue-bypass"]);
    if (q.code !== 0) {
      this.stopDelay(host);
      throw new Error(`iptables NFQUEUE in ${host}: ${q.stderr.trim()}`);
    }
  }

  /** Ends a delay made by delayByQueue: the rule first (packets flow undelayed), then delay.py. */
  stopDelay(host) {
    const h = this.host(host);
    this.exec(h.name, "iptables", ["-w", "-t", "mangle", "-F", "POSTROUTING"]);
    const d = this.state.delays?.[h.name];
    if (!d) return;
    if (sameProcess(d.pid, d.start)) killAndWait([d.pid]);
    delete this.state.delays[h.name];
    this.save();
  }

  /** Removes every fault from `host` (every host without one): rules, delay, link down. */
  heal(host) {
    for (const h of host ? [this.host(host)] : this.state.hosts) {
      for (const chain of ["LAB_IN", "LAB_OUT"]) this.exec(h.name, "iptables", ["-w", "-F", chain]);
      if (this.features.netem) this.exec(h.name, "tc", ["qdisc", "del", "dev", "eth0", "root"]);
      else this.stopDelay(h.name);
      this.exec(h.name, "ip", ["link", "set", "eth0", "up"]);
    }
  }

  /** The lab's rules in `host`, for messages. */
  rules(host) {
    const d = this.state.delays?.[this.host(host).name];
    const queued = this.exec(host, "iptables", ["-w", "-t", "mangle", "-S", "POSTROUTING"]).stdout.split("\n").filter((l) => /NFQUEUE/.test(l));
    const delay = queued.length ? [`${queued.join(" ")} (delay.py pid ${d?.pid ?? "?"})`] : [];
    return [...this.exec(host, "iptables", ["-w", "-S"]).stdout.split("\n").filter((l) => /LAB_/.test(l) && l.startsWith("-A LAB_")), ...delay];
  }

  /**
   * Removes everything: processes in the hosts, namespaces, veths, the bridge, the FORWARD rule,
   * the directory, the state file. Synchronous (it also runs from the exit handler); goes on
   * past failures and returns what it could not remove (throws unless `quiet`).
   */
  teardown({ quiet = false } = {}) {
    if (this.torn) return [];
    this.torn = true;
    mine.delete(this);
    const problems = destroy(this.state);
    if (problems.length && !quiet) throw new Error(`lab ${this.id} teardown left: ${problems.join("; ")}`);
    return problems;
  }
}

// ——— CLI: npm run lab -- COMMAND ———

const USAGE = `usage: npm run lab -- COMMAND [ARGS]
  up [--hosts N] [--no-etcd]     bring up a lab that stays until \`down\`; prints its id and addresses
  status                         every lab on this machine, its hosts and etcd health; leftovers
  down [ID | --all]              tear a lab down (the only one, when ID is left out)
  clean                          remove what crashed labs left (owner gone, or unclaimed and empty)
  exec [ID] HOST -- CMD ARGS…    run a command inside a host (e.g. \`exec h1 -- bash\`)
  partition [ID] HOST            cut HOST from everyone          cut [ID] HOST OTHER   cut two hosts apart
  cut-etcd [ID] HOST             cut HOST's processes from etcd  cut-peers [ID] HOST   HOST keeps etcd only
  degrade [ID] HOST [--delay MS] [--jitter MS] [--loss PCT]      heal [ID] [HOST]     remove every fault
  kill [ID] MEMBER [SIGNAL]      kill (default SIGKILL), SIGSTOP or SIGCONT an etcd member (m1, or its host h1)
  start [ID] MEMBER              start an etcd member again (same data)
Hosts: h1…hN. State: ${STATE_DIR}/ID.json.`;

function pickLab(args) {
  const labs = listLabs();
  if (args[0] && labs.some((l) => l.id === args[0])) return [Lab.load(args.shift()), args];
  if (labs.length === 1) return [Lab.load(labs[0].id), args];
  throw new Error(labs.length === 0 ? "no lab is up (npm run lab -- up)" : `several labs are up (${labs.map((l) => l.id).join(", ")}): name one`);
}

async function status() {
  const labs = listLabs();
  if (labs.length === 0) console.log("no lab recorded");
  for (const s of labs) {
    const lab = new Lab(s);
    const owner = s.persistent ? "persistent" : `owner pid ${s.owner?.pid} ${s.ownerAlive ? "running" : "GONE (leftover: npm run lab -- clean)"}`;
    console.log(`lab ${s.id} (${owner}), created ${s.created}, bridge ${s.bridge} ${s.bridgeAddr}/24, dir ${s.dir}`);
    for (const h of s.hosts) console.log(`  ${h.name} ${h.addr} (ip netns exec ${h.ns} …)${lab.rules(h.name).length ? ` faults: ${lab.rules(h.name).join(" | ")}` : ""}`);
    if (s.etcd) {
      let health = {};
      try {
        health = await lab.etcdHealth(s.etcd.members[0].host);
      } catch (e) {
        health = { error: e.message };
      }
      for (const m of s.etcd.members) console.log(`  etcd ${m.name} on ${m.host} pid ${m.pid} ${sameProcess(m.pid, m.start) ? "running" : "not running"}, health ${JSON.stringify(health[m.name])}`);
      console.log(`  endpoints ${lab.etcdEndpoints.join(",")}`);
    }
  }
  const claimed = new Set(labs.map((l) => l.id));
  const orphans = netnsList().filter((ns) => ns.startsWith(`${PREFIX}-`) && !claimed.has(ns.split("-")[1]));
  if (orphans.length) console.log(`unclaimed namespaces: ${orphans.join(" ")} (npm run lab -- clean)`);
}

async function main(argv) {
  const [cmd, ...rest] = argv;
  const log = (s) => console.error(s);
  switch (cmd) {
    case "up": {
      const hosts = rest.includes("--hosts") ? Number(rest[rest.indexOf("--hosts") + 1]) : 3;
      const lab = await Lab.up({ hosts, etcd: !rest.includes("--no-etcd"), persistent: true, log });
      console.log(`lab ${lab.id} is up (tear it down with: npm run lab -- down ${lab.id})`);
      for (const h of lab.hosts) console.log(`  ${h.name} ${h.addr}: ip netns exec ${h.ns} bash`);
      console.log(`  this machine on the bridge: ${lab.bridgeAddr}`);
      if (lab.etcdEndpoints.length) console.log(`  etcd: ${lab.etcdEndpoints.join(",")}`);
      if (!lab.features.netem) console.log("  note: this kernel has no tc netem: degrade --delay holds packets in an NFQUEUE (test/cluster/delay.py)");
      return;
    }
    case "status":
      return status();
    case "down": {
      if (rest[0] === "--all") {
        for (const s of listLabs()) new Lab(s).teardown();
        return;
      }
      const [lab] = pickLab(rest);
      lab.teardown();
      console.log(`lab ${lab.id} is down`);
      return;
    }
    case "clean": {
      const r = cleanLeftovers({ log: (s) => console.log(s) });
      if (!r.removed.length && !r.left.length) console.log("nothing to clean");
      return;
    }
    case "exec": {
      const [lab, args] = pickLab(rest);
      const sep = args.indexOf("--");
      const host = args[0];
      const command = sep >= 0 ? args.slice(sep + 1) : args.slice(1);
      if (!host || command.length === 0) throw new Error("exec [ID] HOST -- CMD ARGS…");
      const r = spawnSync("ip", ["netns", "exec", lab.host(host).ns, ...command], { stdio: "inherit" });
      process.exitCode = r.status ?? 1;
      return;
    }
    case "partition":
    case "cut-etcd":
    case "cut-peers": {
      const [lab, [host]] = pickLab(rest);
      if (cmd === "partition") lab.partition(host);
      else if (cmd === "cut-etcd") lab.cutFromEtcd(host);
      else lab.cutFromPeers(host);
      console.log(`${cmd} ${host}: ${lab.rules(host).join(" | ")}`);
      return;
    }
    case "cut": {
      const [lab, [a, b]] = pickLab(rest);
      lab.cut(a, b);
      return;
    }
    case "degrade": {
      const [lab, args] = pickLab(rest);
      const opt = (k) => (args.includes(k) ? Number(args[args.indexOf(k) + 1]) : 0);
      lab.degrade(args[0], { delayMs: opt("--delay"), jitterMs: opt("--jitter"), lossPct: opt("--loss") });
      return;
    }
    case "heal": {
      const [lab, [host]] = pickLab(rest);
      lab.heal(host);
      return;
    }
    case "kill": {
      const [lab, [member, signal]] = pickLab(rest);
      await lab.killMember(member, signal ?? "SIGKILL");
      return;
    }
    case "start": {
      const [lab, [member]] = pickLab(rest);
      lab.startMember(member);
      await lab.waitEtcd({ members: [lab.member(member).name] });
      return;
    }
    default:
      console.log(USAGE);
      if (cmd && cmd !== "help" && cmd !== "--help") process.exitCode = 2;
  }
}

if (process.argv[1] && import.meta.url === pathToFileURL(path.resolve(process.argv[1])).href) {
  main(process.argv.slice(2)).catch((err) => {
    console.error(err.message);
    process.exitCode = 1;
  });
}
