// A nemesis run: a cluster of nbdstack nodes serving one image, a verifying client load on every
// node, a seeded nemesis that moves, freezes, kills and slows the nodes, and a checker (checker.mjs)
// that fails the run on a lost acknowledged write, a non-linearizable read, two owners of one
// epoch, two owners for longer than a lease, a node that crashed, a stuck load, or any failed
// request other than the documented EIO of a FLUSH after an owner died. See README.md.
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { performance } from "node:perf_hooks";
import { NbdClient } from "../../dist/client/nbd-client.js";
import { controlCall } from "../../dist/control/control-client.js";
import { CmdFlag } from "../../dist/protocol/constants.js";
import { WriteAudit } from "../../dist/stack/port/write-audit.js";
import { BLOCK, Checker, encodeBlock } from "./checker.mjs";
import { Node, freePort, readLog } from "./cluster.mjs";
import { Lab } from "../cluster/lab.mjs";

/** A small seeded generator (mulberry32): the same seed gives the same schedule of choices. */
export function rng(seed) {
  let a = seed >>> 0;
  const next = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  return {
    next,
    between: (lo, hi) => lo + (hi - lo) * next(),
    int: (n) => Math.floor(next() * n),
    pick: (xs) => xs[Math.floor(next() * xs.length)],
    weighted(table) {
      const total = Object.values(table).reduce((s, w) => s + w, 0);
      let x = next() * total;
      for (const [k, w] of Object.entries(table)) if ((x -= w) < 0) return k;
      return Object.keys(table)[0];
    },
  };
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Fault rules the nemesis puts on a node's export for a while (none of them fails a client request by itself). */
export const FAULT_RULES = [
  "op=pwrite,delay=20ms..200ms",
  "op=any,delay=5ms..30ms",
  "op=flush,delay=300ms..800ms",
  "op=pread,delay=50ms..150ms,rate=0.3",
  "op=open,delay=1000ms..2500ms", // a slow adopt: a window for other faults mid-hand-over
  "op=open,errno=EIO,once", // the next adopt fails: the move rolls back
  "op=pwrite,stall,once", // one write hangs until released: a move must drain it
  "op=flush,stall,once",
];

/** libfaketime's path, when the Debian package faketime is installed. */
export function faketimeLibrary() {
  for (const arch of ["x86_64-linux-gnu", "aarch64-linux-gnu"]) {
    const p = `/usr/lib/${arch}/faketime/libfaketimeMT.so.1`;
    if (fs.existsSync(p)) return p;
  }
  return null;
}

/**
 * Removes libfaketime's shared memory and semaphore (`DIR/faketime_shm_PID`, `DIR/sem.faketime_sem_PID`)
 * of processes that are gone: a process under libfaketime removes its own when it exits, but not
 * when it is killed, as the nemesis kills nodes (and their children, which inherit the preload).
 * A live process's files are kept, whoever it is. Returns how many files were removed.
 */
export function removeDeadFaketimeShm(dir = "/dev/shm") {
  let removed = 0;
  let names = [];
  try {
    names = fs.readdirSync(dir);
  } catch {
    return 0;
  }
  for (const name of names) {
    const m = /^(?:faketime_shm_|sem\.faketime_sem_)(\d+)$/.exec(name);
    if (!m) continue;
    try {
      process.kill(Number(m[1]), 0);
      continue; // alive (or not ours to signal: EPERM means alive too)
    } catch (err) {
      if (err.code !== "ESRCH") continue;
    }
    try {
      fs.unlinkSync(path.join(dir, name));
      removed++;
    } catch {}
  }
  return removed;
}

/** Wall-clock offsets (libfaketime syntax) the skew nemesis sets a node's clock to. */
export const SKEWS = ["+0", "-2h", "+1h", "-30s", "+45s", "+1d", "-1d", "+7s", "-5s"];

/** Mounts a tmpfs of `bytes` on `dir`; false when that is not possible here (not root, no mount). */
function mountTmpfs(dir, bytes) {
  if (process.getuid?.() !== 0) return false;
  try {
    execFileSync("mount", ["-t", "tmpfs", "-o", `size=${bytes}`, "nemesis", dir], { stdio: "ignore" });
    return true;
  } catch {
    return false;
  }
}

const DEFAULTS = {
  seconds: 120,
  seed: 1,
  nodes: 2,
  leaseTtlMs: 2000,
  blocks: 1024,
  workers: 4,
  opsPerSecond: 600,
  /** Mean pause between nemesis actions (ms); each is drawn between a fifth and twice of it. */
  every: 1500,
  weights: { migrate: 30, storm: 10, pause: 12, kill: 12, fault: 25, skew: 6, diskfull: 6, copy: 10, copycancel: 8 },
  /** Wall clocks of the nodes set apart and jumped at run time with libfaketime (when installed). */
  clockSkew: true,
  /**
   * One more node, "x", with its own --data-dir and no image: the export moves to it and back by
   * live copy (migrate {copy: true}), and some copies are cancelled midway.
   */
  copyNode: false,
  /**
   * Run the nodes on hosts of a lab (test/cluster/lab.mjs: network namespaces on a bridge, a
   * 3-member etcd started with --pre-vote), coordinated by etcd (serve --etcd) instead of the lease
   * file, and add the lab's faults to the nemesis (LAB_WEIGHTS): partitions, a host cut from etcd
   * only or from its peers only, two hosts cut apart, packet loss, delay, and etcd members killed (one:
   * the cluster keeps its quorum; two: it loses it).
   */
  lab: false,
  /** Fault rules left out (substrings), e.g. to look past a known bug that a rule triggers. */
  excludeRules: [],
  /** The image on a small tmpfs that the nemesis fills up now and then (needs root and mount). */
  fullDisk: true,
  powerloss: true,
  /** Self-test: the checker counts unflushed writes as durable, so killed owners (with powerloss) must make it fail. */
  trustUnflushed: false,
  stallMs: 30_000,
  keep: false,
  dir: null,
  log: (line) => process.stdout.write(`${line}\n`),
};

/** The lab's own faults, added to the weights in a lab run (and only then: other runs keep their schedules). */
export const LAB_WEIGHTS = { partition: 8, cutetcd: 8, cutpeers: 6, cutpair: 6, loss: 6, delay: 6, etcdminority: 6, etcdmajority: 4 };

export async function runNemesis(options = {}) {
  const o = { ...DEFAULTS, ...options };
  o.weights = { ...DEFAULTS.weights, ...(o.lab ? LAB_WEIGHTS : {}), ...(options.weights ?? {}) };
  const dir = o.dir ?? fs.mkdtempSync(path.join(os.tmpdir(), "nbdstack-nemesis-"));
  fs.mkdirSync(dir, { recursive: true });
  const t0 = performance.now();
  const wall0 = Date.now();
  const now = () => Math.round((performance.now() - t0) * 10) / 10;
  const say = (s) => o.log(`[nemesis ${(now() / 1000).toFixed(1).padStart(6)}s] ${s}`);
  const loadRng = rng(o.seed ^ 0x9e3779b9);
  const nemRng = rng(o.seed);

  // ---- history: every operation and nemesis event, to a file; the recent ones kept for reports
  const historyFile = path.join(dir, "history.jsonl");
  const hist = fs.createWriteStream(historyFile);
  const recent = [];
  const perBlock = new Map();
  const record = (e) => {
    hist.write(`${JSON.stringify(e)}\n`);
    recent.push(e);
    if (recent.length > 400) recent.splice(0, 100);
    if (e.block !== undefined) {
      for (let b = e.block; b < e.block + (e.count ?? 1); b++) {
        let l = perBlock.get(b);
        if (!l) perBlock.set(b, (l = []));
        l.push(e);
        if (l.length > 24) l.shift();
      }
    }
  };
  const nemesisEvents = [];
  const nemEvent = (e) => {
    const ev = { t: now(), nemesis: e.kind, ...e };
    nemesisEvents.push(ev);
    record(ev);
    say(`${e.kind} ${Object.entries(e).filter(([k]) => k !== "kind").map(([k, v]) => `${k}=${typeof v === "string" ? v : JSON.stringify(v)}`).join(" ")}`);
  };

  // ---- failures: the first one stops the run; each keeps the history around it
  let failed = false;
  const failureReports = [];
  const contextOf = (f) => {
    const blocks = f.block !== undefined ? [f.block] : [];
    return {
      failure: f,
      block: blocks.map((b) => ({ block: b, history: perBlock.get(b) ?? [] })),
      recent: recent.slice(-60),
      nemesis: nemesisEvents.filter((e) => e.t > now() - 15_000),
    };
  };
  const checker = new Checker({
    blocks: o.blocks,
    writerOf: (b) => (b % clientsCount) + 1,
    trustUnflushed: o.trustUnflushed,
    onFailure: (f) => {
      failed = true;
      record({ t: now(), failure: f.kind, ...f });
      failureReports.push(contextOf(f));
      say(`FAILURE ${f.kind}: ${JSON.stringify(f)}`);
    },
  });
  const fail = (kind, detail = {}) => checker.fail(kind, { t: now(), ...detail });

  // ---- the cluster
  // The image: on a tmpfs only a little larger than it, when the full-disk nemesis runs, and then
  // written out in full, so that only the lease record (rewritten by every renewal and move) needs
  // new space; else a sparse file.
  const imageBytes = Math.max(o.blocks * BLOCK, 16 * 1024 * 1024);
  const diskDir = path.join(dir, "disk");
  fs.mkdirSync(diskDir, { recursive: true });
  const tmpfs = o.fullDisk && mountTmpfs(diskDir, imageBytes + 4 * 1024 * 1024);
  // Should this process end abruptly (a second Ctrl-C), the mount goes with it (lazily: the
  // nodes, killed at exit too, may still hold files there).
  const unmountAtExit = () => {
    try {
      execFileSync("umount", ["-l", diskDir], { stdio: "ignore" });
    } catch {
      /* not mounted any more */
    }
  };
  if (tmpfs) process.once("exit", unmountAtExit);
  const img = path.join(diskDir, "disk.img");
  if (tmpfs) fs.writeFileSync(img, Buffer.alloc(imageBytes));
  else {
    fs.writeFileSync(img, "");
    fs.truncateSync(img, imageBytes);
  }
  const faketime = o.clockSkew ? faketimeLibrary() : null;
  const clockFile = (id) => path.join(dir, `clock-${id}`);
  // Every write, zero, trim and flush that reached the image, with the node and its epoch then.
  const auditFile = (id) => path.join(dir, `audit-${id}.jsonl`);
  const ids = ["a", "b", "c", "d"].slice(0, o.nodes);
  const usedPorts = new Set();
  const port = async () => {
    for (;;) {
      const p = await freePort();
      if (!usedPorts.has(p)) {
        usedPorts.add(p);
        return p;
      }
    }
  };
  if (o.copyNode) ids.push("x");
  // A lab run: node i on host h(i+1), the same ports on every host (each has its own addresses).
  const lab = o.lab ? await Lab.up({ hosts: ids.length, etcdArgs: ["--pre-vote"] }) : null;
  const hostOf = (id) => `h${ids.indexOf(id) + 1}`;
  const xData = path.join(dir, "x-data");
  const xImage = path.join(xData, "disk.img");
  const imageOf = (id) => (id === "x" ? xImage : img);
  const makeNode = async (id) => {
    const nbdPort = lab ? 10809 : await port();
    const controlPort = lab ? 9000 : await port();
    const host = lab ? lab.addr(hostOf(id)) : "127.0.0.1";
    const args = [
      ...(id === "x" ? ["--data-dir", xData] : [img, "--name", "disk"]), "--node-id", id, "--lease-ttl", `${o.leaseTtlMs}ms`,
      "--listen", `${host}:${nbdPort}`, "--control", `${host}:${controlPort}`,
      ...(lab ? ["--etcd", lab.etcdEndpoints.join(","), "--etcd-prefix", "/nemesis"] : []),
      "--fault", "--fault-seed", String(o.seed), ...(o.powerloss ? ["--fault-powerloss"] : []),
      "--write-audit", auditFile(id),
      "--log-format", "json", "--log-level", process.env.NEMESIS_LOG_LEVEL ?? "info",
    ];
    const env = faketime
      ? { LD_PRELOAD: faketime, FAKETIME_TIMESTAMP_FILE: clockFile(id), FAKETIME_CACHE_DURATION: "1", DONT_FAKE_MONOTONIC: "1" }
      : {};
    if (faketime && !fs.existsSync(clockFile(id))) fs.writeFileSync(clockFile(id), `${id === "a" ? "+0" : nemRng.pick(SKEWS)}\n`);
    const launch = lab ? (cmd, args, opts) => lab.spawn(hostOf(id), cmd, args, opts) : undefined;
    return new Node({ id, args, nbdPort, controlPort, dir, env, host, launch });
  };
  const nodes = [];
  for (const id of ids) nodes.push(await makeNode(id));
  const byId = new Map(nodes.map((n) => [n.id, n]));
  const clientsCount = nodes.length;
  const killedGens = new Set(); // "a#2": processes the nemesis killed on purpose
  const startFailed = new Set(); // processes that exited while starting (restart() tries again)

  const summary = {
    seed: o.seed, seconds: o.seconds, nodes: o.nodes, leaseTtlMs: o.leaseTtlMs, powerloss: o.powerloss, dir,
    clockSkew: !!faketime, fullDisk: !!tmpfs,
    copyNode: !!o.copyNode, lab: !!lab,
    nemesis: { migrate: 0, migrateOk: 0, migrateRefused: 0, stormCalls: 0, stormOk: 0, pause: 0, kill: 0, fault: 0, faultRules: {}, skew: 0, diskfull: 0, copy: 0, copyOk: 0, copyRefused: 0, cancel: 0, cancelOk: 0,
      partition: 0, cutetcd: 0, cutpeers: 0, cutpair: 0, loss: 0, delay: 0, etcdminority: 0, etcdmajority: 0 },
    claims: 0, overlaps: [], restartRefused: [], maxStallMs: 0, eioFlushes: 0,
  };

  let result;
  try {
    // A port found free may be taken by another process before the node binds it: then new ports.
    for (let i = 0; i < nodes.length; i++) {
      for (let attempt = 0; ; attempt++) {
        try {
          await nodes[i].start();
          break;
        } catch (err) {
          if (attempt >= 3 || !/EADDRINUSE/.test(fs.readFileSync(nodes[i].logFile, "utf8"))) throw err;
          nodes[i] = await makeNode(ids[i]);
        }
      }
    }
    say(`cluster of ${nodes.length} nodes up in ${dir}: ${nodes.map((n) => `${n.id} nbd:${n.nbdPort} control:${n.controlPort}`).join(", ")}`);

    // ---- ownership watch: GET /v1/status of every node every 100 ms
    const claims = new Map(); // epoch -> "node#gen"
    const claimClash = new Set();
    const latest = new Map(); // node -> {t, gen, state, epoch}
    const overlapStart = new Map();
    const staleLocal = new Map(); // "a#1@6" -> a node LOCAL while the record names another owner
    let lastOwner = null;
    // Epochs count per image (the copy node's image has a record of its own).
    const claim = (image, epoch, who, t, how) => {
      const key = `${image === img ? "" : `${path.basename(path.dirname(image))}/`}${epoch}`;
      const prev = claims.get(key);
      if (prev === undefined) {
        claims.set(key, who);
        record({ t, claim: key, who, how });
      } else if (prev !== who && !claimClash.has(key)) {
        claimClash.add(key);
        fail("two owners of one epoch", { epoch: key, first: prev, second: who, how });
      }
    };
    const pollOnce = async (n) => {
      if (n.state !== "up") return;
      const gen = n.gen;
      let st;
      try {
        st = await controlCall(n.control, "GET", "v1/status", undefined, 800);
      } catch {
        return;
      }
      const t = now();
      if (n.gen !== gen) return;
      const e = st.exports.find((x) => x.name === "disk");
      if (!e) return;
      const prev = latest.get(n.id);
      if (!prev || prev.state !== e.state || prev.epoch !== e.epoch || prev.gen !== gen) record({ t, status: n.id, gen, state: e.state, epoch: e.epoch, owner: e.owner, held: e.held });
      latest.set(n.id, { t, gen, state: e.state, epoch: e.epoch, owner: e.owner });
      if (e.state !== "LOCAL") {
        for (const k of [...overlapStart.keys()]) if (k.includes(n.id)) endOverlap(k, t);
        return;
      }
      // The status' owner and epoch are the lease record's (one file, read at the poll): a node that
      // is LOCAL while the record names another node is a stale owner that has not noticed yet.
      // Its port A still checks the record before every write past its trusted share of the lease,
      // so this is noted; past two lease times (it should notice at its next renewal) it fails.
      if (e.owner !== n.id) {
        const k = `${n.id}#${gen}@${e.epoch}`;
        if (!staleLocal.has(k)) staleLocal.set(k, { node: n.id, gen, epoch: e.epoch, owner: e.owner, from: t, to: t });
        const sl = staleLocal.get(k);
        sl.to = t;
        if (t - sl.from > 2 * o.leaseTtlMs && !sl.failed) {
          sl.failed = true;
          fail("LOCAL for longer than two lease times after the record named another owner", { ...sl });
        }
        return;
      }
      lastOwner = n.id;
      if (e.epoch != null) claim(imageOf(n.id), e.epoch, `${n.id}#${gen}`, t, "status");
      for (const m of nodes) {
        if (m === n) continue;
        const l = latest.get(m.id);
        const key = [n.id, m.id].sort().join("+");
        if (!l || l.state !== "LOCAL" || t - l.t > 400 || m.state === "down") {
          if (overlapStart.has(key) && (!l || l.state !== "LOCAL" || m.state === "down")) endOverlap(key, t);
          continue;
        }
        if (!overlapStart.has(key)) overlapStart.set(key, { t, epochs: [e.epoch, l.epoch] });
        const ov = overlapStart.get(key);
        if (t - ov.t > o.leaseTtlMs && !ov.failed) {
          ov.failed = true;
          fail("two nodes LOCAL for longer than a lease", { nodes: key, since: ov.t, epochs: [e.epoch, l.epoch] });
        }
      }
    };
    const endOverlap = (key, t) => {
      const ov = overlapStart.get(key);
      overlapStart.delete(key);
      if (ov) {
        summary.overlaps.push({ nodes: key, from: ov.t, ms: Math.round(t - ov.t), epochs: ov.epochs });
        record({ t, overlap: key, ms: Math.round(t - ov.t), epochs: ov.epochs });
      }
    };
    let polling = true;
    const poller = (async () => {
      while (polling) {
        await Promise.all(nodes.map(pollOnce));
        await sleep(100);
      }
    })();

    // ---- the load: one client per node, each the only writer of its blocks, reading every block
    let stopping = false;
    let lastDone = now();
    let connSeq = 0;
    const lossSince = () => checker.lossEvents.length;
    // The harness cannot see the instant another node takes the image over (a lease runs out
    // while a node is frozen, dead, or cannot write its record), only the fault that causes it:
    // so a loss event is declared when the fault starts, when it ends, and one and two lease
    // times after, and a FLUSH EIO is accepted when one of them was declared after the
    // connection's last successful FLUSH was sent and before the EIO came.
    // A network or etcd fault is different: the owner goes on serving, correctly, until its local
    // deadline, and another node takes over some time later, while the fault lasts. A write it
    // acknowledged in between and never flushed is gone after the take-over. So while such a
    // fault lasts (`window`), a loss event is declared every 100 ms: a take-over comes at least
    // the owner's margin (500 ms) after its last write, so an event always falls between.
    const lossTimers = new Set();
    // And a network fault's replies may cross the healed link late (TCP retransmits, up to the
    // 5 s that cutOff allows): a write the owner did before it was fenced, answered within 5 s of
    // one of these events, is owed only once durable (Checker.writeAcked, `until`).
    const lossAround = (why, { window = false } = {}) => {
      const late = (t) => (window ? { until: t + 5000 } : {});
      const declare = (what) => {
        const t = now();
        checker.loss(t, what, late(t));
      };
      declare(why);
      const ticker = window ? setInterval(() => declare(`${why} (during)`), 100) : null;
      return () => {
        if (ticker) clearInterval(ticker);
        declare(`${why} (end)`);
        for (const k of [1, 2]) {
          const timer = setTimeout(() => {
            lossTimers.delete(timer);
            checker.loss(now(), `${why} (end + ${k} lease)`);
          }, k * o.leaseTtlMs);
          lossTimers.add(timer);
        }
      };
    };
    /** Whether this process may have lost `n` to a lab fault (now, or so recently that TCP has not caught up). */
    const cutOff = (n) => n.cut || now() - (n.healedAt ?? -Infinity) < 5000;
    class Client {
      constructor(idx, node) {
        this.idx = idx;
        this.writer = idx + 1;
        this.node = node;
        this.conn = null;
        this.connecting = null;
        this.busy = new Set();
        this.owned = [];
        for (let b = idx; b < o.blocks; b += clientsCount) this.owned.push(b);
      }
      async ready() {
        if (this.conn && !this.conn.dead) return this.conn;
        this.connecting ??= this.connect().finally(() => (this.connecting = null));
        return this.connecting;
      }
      async connect() {
        for (;;) {
          if (stopping) return null;
          const n = this.node;
          if (n.state !== "up") {
            await sleep(50);
            continue;
          }
          const gen = n.gen;
          try {
            // In the lab a cut may drop the connect: give up after a while and try again.
            const nbd = await NbdClient.connect(n.addr, { exportName: "disk", ...(lab ? { timeoutMs: 3000 } : {}) });
            const conn = { nbd, id: ++connSeq, gen, node: n.id, unflushed: [], dead: false, losses: lossSince() };
            void nbd.closed.then(() => (conn.dead = true));
            record({ t: now(), c: this.idx, op: "connect", conn: conn.id, node: n.id, gen });
            this.conn = conn;
            return conn;
          } catch (err) {
            // The copy node serves the export only while it is a copy's target or its owner.
            if (n.id === "x" && /NBD_OPT_GO/.test(err.message)) {
              await sleep(200);
              continue;
            }
            if (n.state === "up" && n.gen === gen && !cutOff(n)) {
              fail("connect failed while its node was up", { client: this.idx, node: n.id, err: err.message });
              return null;
            }
            await sleep(50);
          }
        }
      }
      /** An error of a request on `conn`: expected only when its node was killed or for the documented FLUSH EIO. */
      expected(conn, err, op) {
        const connLost = err.errno === undefined || (err.errno === "ESHUTDOWN" && /connection closed/.test(err.message)) || conn.dead;
        if (connLost) {
          conn.dead = true;
          const n = this.node;
          if (n.gen !== conn.gen || n.state === "down" || n.state === "starting") return "node killed";
          if (cutOff(n)) return "node cut off";
          return null;
        }
        if (op === "flush" && err.errno === "EIO" && /may be lost/.test(err.message)) return "flush EIO";
        return null;
      }
      async run(wid) {
        const interval = (o.workers * clientsCount * 1000) / o.opsPerSecond;
        let next = performance.now() + loadRng.next() * interval;
        while (!stopping && !failed) {
          const wait = next - performance.now();
          if (wait > 0) await sleep(wait);
          next = Math.max(next + interval, performance.now() - 5 * interval);
          const conn = await this.ready();
          if (!conn || stopping) continue;
          const r = loadRng.next();
          if (r < 0.55) await this.write(conn);
          else if (r < 0.93) await this.read(conn);
          else await this.flush(conn);
        }
      }
      async write(conn) {
        let b = -1;
        for (let i = 0; i < 8 && b < 0; i++) {
          const x = this.owned[loadRng.int(this.owned.length)];
          if (!this.busy.has(x)) b = x;
        }
        if (b < 0) return;
        this.busy.add(b);
        const fua = loadRng.next() < 0.1;
        const v = checker.nextVersion(b);
        const w = checker.writeSent(conn, b, v, fua, now());
        record({ t: w.t, c: this.idx, conn: conn.id, op: fua ? "write-fua" : "write", block: b, v });
        try {
          await conn.nbd.pwrite(encodeBlock(b, v, this.writer), b * BLOCK, fua ? CmdFlag.NBD_CMD_FLAG_FUA : 0);
          const t = now();
          lastDone = t;
          checker.writeAcked(w, t);
          record({ t, c: this.idx, conn: conn.id, op: "ack", block: b, v, ms: Math.round(t - w.t) });
        } catch (err) {
          const t = now();
          const why = this.expected(conn, err, "write");
          checker.writeIndeterminate(w, t);
          record({ t, c: this.idx, conn: conn.id, op: "write-failed", block: b, v, err: `${err.errno ?? ""} ${err.message}`, expected: why });
          if (!why) fail("write failed", { client: this.idx, conn: conn.id, block: b, v, err: `${err.errno ?? ""} ${err.message}`, sent: w.t });
        } finally {
          this.busy.delete(b);
        }
      }
      async read(conn) {
        const count = 1 + loadRng.int(4);
        const first = loadRng.int(o.blocks - count + 1);
        const r = checker.readSent(first, count, now());
        record({ t: r.t, c: this.idx, conn: conn.id, op: "read", block: first, count });
        try {
          const buf = await conn.nbd.pread(count * BLOCK, first * BLOCK);
          const t = now();
          lastDone = t;
          const versions = [];
          for (let i = 0; i < count; i++) versions.push(buf.readUInt32LE(i * BLOCK + 8) * (buf.readUInt32LE(i * BLOCK) === 0 ? 0 : 1));
          record({ t, c: this.idx, conn: conn.id, op: "read-ok", block: first, count, got: versions, ms: Math.round(t - r.t) });
          checker.readDone(r, buf, t, `client ${this.idx} conn ${conn.id} via ${conn.node}`);
        } catch (err) {
          checker.readAbandoned(r);
          const why = this.expected(conn, err, "read");
          record({ t: now(), c: this.idx, conn: conn.id, op: "read-failed", block: first, count, err: `${err.errno ?? ""} ${err.message}`, expected: why });
          if (!why) fail("read failed", { client: this.idx, conn: conn.id, block: first, count, err: `${err.errno ?? ""} ${err.message}`, sent: r.t });
        }
      }
      async flush(conn) {
        const f = checker.flushSent(conn, now());
        const lossesAtSend = lossSince();
        const lossesAtLastOk = conn.losses; // as this FLUSH is sent: a concurrent one may succeed first
        record({ t: f.t, c: this.idx, conn: conn.id, op: "flush", covers: f.covers.length });
        try {
          await conn.nbd.flush();
          const t = now();
          lastDone = t;
          checker.flushAcked(f, t);
          conn.losses = Math.max(conn.losses, lossesAtSend);
          record({ t, c: this.idx, conn: conn.id, op: "flush-ok", ms: Math.round(t - f.t) });
        } catch (err) {
          const why = this.expected(conn, err, "flush");
          record({ t: now(), c: this.idx, conn: conn.id, op: "flush-failed", err: `${err.errno ?? ""} ${err.message}`, expected: why });
          if (why === "flush EIO") {
            checker.flushEio(f, now());
            summary.eioFlushes++;
            // The documented EIO: writes were acknowledged through a node that may have lost them.
            // Only a node killed or frozen since this connection's last successful FLUSH explains it.
            if (lossSince() === lossesAtLastOk) fail("FLUSH EIO without an owner killed or frozen", { client: this.idx, conn: conn.id, err: err.message });
          } else if (!why) fail("flush failed", { client: this.idx, conn: conn.id, err: `${err.errno ?? ""} ${err.message}` });
        }
      }
    }
    const clients = nodes.map((n, i) => new Client(i, n));
    const workers = clients.flatMap((c) => Array.from({ length: o.workers }, (_, w) => c.run(w)));

    // ---- watchdog: the load must keep completing requests
    const watchdog = setInterval(() => {
      const gap = now() - lastDone;
      summary.maxStallMs = Math.max(summary.maxStallMs, Math.round(gap));
      if (gap > o.stallMs && !stopping && !failed) fail("no request completed", { forMs: Math.round(gap), nodes: nodes.map((n) => `${n.id}:${n.state}#${n.gen}`) });
    }, 1000);

    // ---- the nemesis
    const deadline = t0 + o.seconds * 1000;
    let disturbing = 0; // nodes killed or frozen right now (at most one: the cluster must stay able to serve)
    const running = new Set();
    const owner = () => (lastOwner && byId.get(lastOwner)?.state === "up" ? byId.get(lastOwner) : null);
    const upNodes = () => nodes.filter((n) => n.state === "up");
    const victim = () => (nemRng.next() < 0.5 && owner() ? owner() : nemRng.pick(upNodes()));
    const migrate = async (from, to, kind) => {
      const t = now();
      try {
        const res = await controlCall(from.control, "POST", "v1/exports/disk/migrate", { to: to.control }, 30_000);
        record({ t: now(), nemesis: `${kind}-done`, from: from.id, to: to.id, ms: Math.round(now() - t), res });
        return true;
      } catch (err) {
        record({ t: now(), nemesis: `${kind}-refused`, from: from.id, to: to.id, ms: Math.round(now() - t), err: err.message });
        return false;
      }
    };
    const actions = {
      async migrate() {
        const from = owner();
        const others = upNodes().filter((n) => n !== from && n.id !== "x");
        if (!from || from.id === "x" || !others.length) return;
        const to = nemRng.pick(others);
        summary.nemesis.migrate++;
        nemEvent({ kind: "migrate", from: from.id, to: to.id });
        if (await migrate(from, to, "migrate")) summary.nemesis.migrateOk++;
        else summary.nemesis.migrateRefused++;
      },
      async storm() {
        const ups = upNodes();
        if (ups.length < 2) return;
        const k = 2 + nemRng.int(3);
        const pairs = [];
        for (let i = 0; i < k; i++) {
          const from = i === 0 && owner() ? owner() : nemRng.pick(ups);
          const to = nemRng.pick(ups.filter((n) => n !== from));
          pairs.push([from, to]);
        }
        summary.nemesis.stormCalls += k;
        nemEvent({ kind: "storm", moves: pairs.map(([f, t]) => `${f.id}->${t.id}`).join(",") });
        const ok = await Promise.all(pairs.map(([f, t]) => migrate(f, t, "storm")));
        summary.nemesis.stormOk += ok.filter(Boolean).length;
      },
      async pause() {
        if (disturbing >= 1) return actions.migrate();
        const n = victim();
        if (!n) return;
        disturbing++;
        const ms = Math.round(o.leaseTtlMs * nemRng.between(1.2, 2.5));
        summary.nemesis.pause++;
        nemEvent({ kind: "pause", node: n.id, gen: n.gen, ms, wasOwner: n.id === lastOwner });
        n.pause();
        const over = lossAround(`SIGSTOP ${n.id}`);
        await sleep(ms);
        n.resume();
        over();
        nemEvent({ kind: "resume", node: n.id });
        disturbing--;
      },
      async kill() {
        if (disturbing >= 1) return actions.migrate();
        const n = victim();
        if (!n) return;
        disturbing++;
        const down = Math.round(nemRng.between(0, 3000));
        summary.nemesis.kill++;
        nemEvent({ kind: "kill", node: n.id, gen: n.gen, downMs: down, wasOwner: n.id === lastOwner });
        killedGens.add(`${n.id}#${n.gen}`);
        const over = lossAround(`SIGKILL ${n.id}`);
        await n.kill();
        await sleep(down);
        await restart(n);
        over();
        disturbing--;
      },
      async fault() {
        const n = nemRng.pick(upNodes());
        if (!n) return;
        const rules = FAULT_RULES.filter((r) => !o.excludeRules.some((x) => r.includes(x)));
        if (!rules.length) return;
        const rule = nemRng.pick(rules);
        const ms = Math.round(nemRng.between(1000, 5000));
        summary.nemesis.fault++;
        summary.nemesis.faultRules[rule] = (summary.nemesis.faultRules[rule] ?? 0) + 1;
        nemEvent({ kind: "fault", node: n.id, rule, ms });
        try {
          await controlCall(n.control, "POST", "v1/exports/disk/faults", { add: rule }, 5000);
        } catch (err) {
          record({ t: now(), nemesis: "fault-refused", node: n.id, err: err.message });
          return;
        }
        await sleep(ms);
        await clearFaults(n);
      },
    };
    // Live copies to the copy node and back; a cancelled one is stopped on its source midway.
    const copy = async (cancel) => {
      const from = owner();
      if (!from) return;
      const to = from.id === "x" ? nemRng.pick(upNodes().filter((n) => n.id !== "x")) : byId.get("x");
      if (!to || to.state !== "up") return;
      const mode = nemRng.next() < 0.3 ? "write-blocking" : "background";
      const after = Math.round(nemRng.between(20, 1500));
      summary.nemesis.copy++;
      nemEvent({ kind: cancel ? "copycancel" : "copy", from: from.id, to: to.id, mode, ...(cancel ? { cancelAfterMs: after } : {}) });
      const t = now();
      const moving = controlCall(from.control, "POST", "v1/exports/disk/migrate", { to: to.control, copy: true, mode }, 120_000).then(
        (res) => {
          summary.nemesis.copyOk++;
          record({ t: now(), nemesis: "copy-done", from: from.id, to: to.id, ms: Math.round(now() - t), res });
        },
        (err) => {
          summary.nemesis.copyRefused++;
          record({ t: now(), nemesis: "copy-refused", from: from.id, to: to.id, ms: Math.round(now() - t), err: err.message });
        },
      );
      if (cancel) {
        await sleep(after);
        summary.nemesis.cancel++;
        try {
          await controlCall(from.control, "POST", "v1/exports/disk/migrate/cancel", {}, 10_000);
          summary.nemesis.cancelOk++;
          record({ t: now(), nemesis: "cancel-done", node: from.id });
        } catch (err) {
          record({ t: now(), nemesis: "cancel-refused", node: from.id, err: err.message });
        }
      }
      await moving;
    };
    actions.copy = () => (o.copyNode ? copy(false) : actions.migrate());
    actions.copycancel = () => (o.copyNode ? copy(true) : actions.migrate());
    let filling = false;
    actions.skew = async () => {
      if (!faketime) return actions.migrate();
      const n = nemRng.pick(nodes);
      const skew = nemRng.pick(SKEWS);
      summary.nemesis.skew++;
      nemEvent({ kind: "skew", node: n.id, clock: skew });
      fs.writeFileSync(clockFile(n.id), `${skew}\n`);
    };
    actions.diskfull = async () => {
      if (!tmpfs || filling) return actions.fault();
      filling = true;
      const ms = Math.round(nemRng.between(500, 2.5 * o.leaseTtlMs));
      summary.nemesis.diskfull++;
      const filler = path.join(diskDir, "filler");
      const fd = fs.openSync(filler, "w");
      const chunk = Buffer.alloc(64 * 1024, 0xee);
      let bytes = 0;
      try {
        for (;;) bytes += fs.writeSync(fd, chunk);
      } catch (err) {
        if (err.code !== "ENOSPC") throw err;
      } finally {
        fs.closeSync(fd);
      }
      nemEvent({ kind: "diskfull", filled: bytes, ms });
      // An owner that cannot rewrite its lease record loses it once the lease runs out, and another
      // node takes the image over as from a dead owner: what no FLUSH covered may be gone.
      const over = ms >= o.leaseTtlMs / 2 ? lossAround("disk full") : () => {};
      await sleep(ms);
      fs.rmSync(filler, { force: true });
      over();
      record({ t: now(), nemesis: "disk-freed" });
      filling = false;
    };
    // ---- the lab's faults (a lab run only): the network between hosts and the etcd cluster
    let etcdFault = false;
    const hostFault = async (kind, n, ms, apply, { cut, loss }) => {
      disturbing++;
      summary.nemesis[kind]++;
      const h = hostOf(n.id);
      if (cut) n.cut = true; // this process, on the bridge, loses the node too
      const over = loss ? lossAround(`${kind} ${n.id}`, { window: true }) : () => {};
      try {
        apply(h);
        await sleep(ms);
      } finally {
        lab.heal(h);
        if (cut) {
          n.cut = false;
          n.healedAt = now();
        }
        over();
        nemEvent({ kind: "healed", node: n.id, after: kind });
        disturbing--;
      }
    };
    const labAction = (fn) => async () => {
      if (!lab) return actions.migrate();
      if (disturbing >= 1) return actions.migrate();
      return fn();
    };
    const leases = (lo, hi) => Math.round(o.leaseTtlMs * nemRng.between(lo, hi));
    // The owner loses everything, its own etcd member's quorum included: another node takes over.
    actions.partition = labAction(async () => {
      const n = victim();
      if (!n) return;
      const ms = leases(0.5, 3);
      nemEvent({ kind: "partition", node: n.id, host: hostOf(n.id), ms, wasOwner: n.id === lastOwner });
      await hostFault("partition", n, ms, (h) => lab.partition(h), { cut: true, loss: true });
    });
    // Cut from etcd only: the node fences itself and holds its clients' requests; it still reaches its peers.
    actions.cutetcd = labAction(async () => {
      const n = victim();
      if (!n) return;
      const ms = leases(0.5, 3);
      nemEvent({ kind: "cutetcd", node: n.id, host: hostOf(n.id), ms, wasOwner: n.id === lastOwner });
      await hostFault("cutetcd", n, ms, (h) => lab.cutFromEtcd(h), { cut: false, loss: true });
    });
    // Cut from its peers (and from this process) but not from etcd: an owner keeps its lease, the
    // others hold their requests until it is back; nothing changes hands and nothing is lost.
    actions.cutpeers = labAction(async () => {
      const n = victim();
      if (!n) return;
      const ms = leases(0.5, 2);
      nemEvent({ kind: "cutpeers", node: n.id, host: hostOf(n.id), ms, wasOwner: n.id === lastOwner });
      await hostFault("cutpeers", n, ms, (h) => lab.cutFromPeers(h), { cut: true, loss: false });
    });
    // Two hosts cannot talk; both reach the third (and etcd keeps its quorum through it).
    actions.cutpair = labAction(async () => {
      const ups = upNodes();
      if (ups.length < 2) return;
      const a = victim() ?? ups[0];
      const b = nemRng.pick(ups.filter((x) => x !== a));
      const ms = leases(0.5, 3);
      nemEvent({ kind: "cutpair", nodes: `${a.id}+${b.id}`, ms });
      await hostFault("cutpair", a, ms, (h) => lab.cut(h, hostOf(b.id)), { cut: false, loss: false });
    });
    // Delay on what one host sends (its clients' replies, port B, its etcd traffic): tc netem, or
    // an NFQUEUE held by test/cluster/delay.py where the kernel has no netem.
    actions.delay = labAction(async () => {
      const n = victim();
      if (!n) return;
      const delayMs = nemRng.pick([5, 20, 50, 150]);
      const jitterMs = Math.round(delayMs * nemRng.pick([0, 0.2, 0.5]));
      const ms = Math.round(nemRng.between(2000, 8000));
      nemEvent({ kind: "delay", node: n.id, host: hostOf(n.id), delayMs, jitterMs, ms });
      await hostFault("delay", n, ms, (h) => lab.degrade(h, { delayMs, jitterMs }), { cut: false, loss: true });
    });
    // Packet loss on one host's link, both ways.
    actions.loss = labAction(async () => {
      const n = victim();
      if (!n) return;
      const pct = nemRng.pick([5, 20, 50]);
      const ms = Math.round(nemRng.between(2000, 8000));
      nemEvent({ kind: "loss", node: n.id, host: hostOf(n.id), pct, ms });
      await hostFault("loss", n, ms, (h) => lab.degrade(h, { lossPct: pct }), { cut: true, loss: true });
    });
    // etcd members killed or frozen: one (the cluster keeps its quorum; an election when it was the
    // leader) or two (no quorum: no node can renew, every node fences itself and holds requests).
    const etcdDown = async (kind, count) => {
      if (!lab || etcdFault) return actions.migrate();
      etcdFault = true;
      summary.nemesis[kind]++;
      const members = [...lab.etcdMembers.map((m) => m.name)];
      const victims = [];
      while (victims.length < count) victims.push(members.splice(nemRng.int(members.length), 1)[0]);
      const freeze = nemRng.next() < 0.3;
      const ms = count > 1 ? Math.round(nemRng.between(1000, 6000)) : Math.round(nemRng.between(1000, 8000));
      nemEvent({ kind, members: victims.join(","), how: freeze ? "SIGSTOP" : "SIGKILL", ms });
      const over = lossAround(`${kind} ${victims.join(",")}`, { window: true });
      try {
        for (const m of victims) await lab.killMember(m, freeze ? "SIGSTOP" : "SIGKILL");
        await sleep(ms);
      } finally {
        for (const m of victims) {
          if (freeze) await lab.killMember(m, "SIGCONT");
          else if (!lab.memberRunning(m)) lab.startMember(m);
        }
        over();
        nemEvent({ kind: "etcd-back", members: victims.join(",") });
        etcdFault = false;
      }
    };
    actions.etcdminority = () => etcdDown("etcdminority", 1);
    actions.etcdmajority = () => etcdDown("etcdmajority", 2);
    const clearFaults = async (n) => {
      try {
        await controlCall(n.control, "POST", "v1/exports/disk/faults", { release: true }, 5000);
        await controlCall(n.control, "POST", "v1/exports/disk/faults", { clear: true }, 5000);
        record({ t: now(), nemesis: "fault-cleared", node: n.id });
      } catch (err) {
        record({ t: now(), nemesis: "fault-clear-failed", node: n.id, err: err.message });
      }
    };
    // A node may refuse to start for a while (e.g. its lease record cannot be written on a full
    // disk): that is noted, not a crash, and it is started again until it comes up.
    const restart = async (n) => {
      for (let i = 0; ; i++) {
        try {
          await n.start();
          nemEvent({ kind: "restarted", node: n.id, gen: n.gen });
          return;
        } catch (err) {
          startFailed.add(`${n.id}#${n.gen}`);
          const last = fs.readFileSync(n.logFile, "utf8").trim().split("\n").pop();
          summary.restartRefused.push({ t: now(), node: n.id, gen: n.gen, said: last.slice(0, 300) });
          record({ t: now(), nemesis: "restart-refused", node: n.id, gen: n.gen, said: last.slice(0, 300) });
          if (i >= 40) {
            fail("cannot restart a killed node", { node: n.id, err: err.message, said: last });
            return;
          }
          await sleep(500);
        }
      }
    };

    const over = () => performance.now() >= deadline || failed || o.signal?.aborted;
    while (!over()) {
      await sleep(Math.min(nemRng.between(o.every / 5, o.every * 2), Math.max(0, deadline - performance.now())));
      if (over()) break;
      const kind = nemRng.weighted(o.weights);
      const p = actions[kind]().catch((err) => fail("nemesis action crashed", { kind, err: err.stack }));
      running.add(p);
      void p.finally(() => running.delete(p));
    }

    // ---- heal: finish every action, wake every node, clear every fault, restart what is down
    say(failed ? "stopping after a failure" : o.signal?.aborted ? "interrupted: healing the cluster" : "nemesis done: healing the cluster");
    await Promise.all([...running]);
    if (lab) {
      lab.heal();
      for (const m of lab.etcdMembers) if (!lab.memberRunning(m.name)) lab.startMember(m.name);
      await lab.waitEtcd();
    }
    await sleep(2 * o.leaseTtlMs + 100); // the last loss events
    for (const n of nodes) {
      if (n.state === "stopped") n.resume();
      if (n.state === "down") await restart(n);
    }
    await Promise.all(nodes.map(clearFaults));
    const healStart = now();
    while (!nodes.some((n) => latest.get(n.id)?.state === "LOCAL" && latest.get(n.id).t > healStart)) {
      if (now() - healStart > 30_000) {
        fail("no owner 30 s after the nemesis stopped", { latest: Object.fromEntries(latest) });
        break;
      }
      await sleep(100);
    }

    // ---- stop the load; every request must end
    stopping = true;
    const allDone = Promise.all(workers);
    const stuck = await Promise.race([allDone.then(() => false), sleep(60_000).then(() => true)]);
    if (stuck) fail("requests still pending 60 s after the load stopped", { pendingReads: checker.pendingReads.size, writesInFlight: [...checker.inflight.entries()].slice(0, 20) });
    clearInterval(watchdog);

    // ---- a last read of every block through every node: now nothing is in flight, floors are exact
    if (!stuck) {
      for (const c of clients) {
        const n = c.node;
        let nbd;
        try {
          try {
            nbd = await NbdClient.connect(n.addr, { exportName: "disk" });
          } catch (err) {
            if (n.id === "x" && /NBD_OPT_GO/.test(err.message)) continue; // it holds no copy now
            throw err;
          }
          for (let first = 0; first < o.blocks; first += 64) {
            const count = Math.min(64, o.blocks - first);
            const r = checker.readSent(first, count, now());
            const buf = await nbd.pread(count * BLOCK, first * BLOCK);
            checker.readDone(r, buf, now(), `final read via ${n.id}`);
          }
          await nbd.disconnect();
        } catch (err) {
          fail("final read failed", { node: n.id, err: `${err.errno ?? ""} ${err.message}` });
          nbd?.destroy();
        }
      }
      for (const c of clients) c.conn?.nbd.destroy();
    }

    // ---- stop everything without a clean shutdown: only what a FLUSH or FUA made durable must be in the image
    polling = false;
    await poller;
    for (const n of nodes) killedGens.add(`${n.id}#${n.gen}`);
    await Promise.all(nodes.map((n) => n.kill()));
    // The image that holds the data now: the copy node's when it owns the export.
    const finalOwner = nodes.find((n) => latest.get(n.id)?.state === "LOCAL" && latest.get(n.id)?.owner === n.id);
    const image = fs.readFileSync(finalOwner ? imageOf(finalOwner.id) : img);
    summary.finalOwner = finalOwner?.id ?? null;
    const { summary: imageSummary } = checker.checkImage(image);

    // ---- the nodes' logs: claims of epochs (adopt, take-over), crashes, lease losses
    let leaseLost = 0;
    for (const n of nodes) {
      for (const l of readLog(n)) {
        const t = l.time - wall0;
        if ((l.msg === "export adopted" || l.msg === "lease of the owner expired: taking the image over") && typeof l.epoch === "number")
          claim(imageOf(n.id), l.epoch, `${n.id}#${l.gen}`, t, l.msg);
        if (/^lease lost/.test(l.msg ?? "")) leaseLost++;
        if (l.level >= 60) fail("fatal log line", { node: n.id, gen: l.gen, line: l });
      }
      for (const x of n.exits) if (!killedGens.has(`${n.id}#${x.gen}`) && !startFailed.has(`${n.id}#${x.gen}`)) fail("node exited on its own", { node: n.id, ...x });
    }
    // ---- the write audits (serve --write-audit): what really reached the images, with the writer's
    // node and epoch. Never two writers: each epoch's writes come from one node, and no node writes
    // at an epoch older than one it wrote at before (epochs only grow; the copy node's image has
    // its own). Failed blocks get every audited write that touched them, for the report.
    const epochWriter = new Map();
    const touching = new Map(failureReports.flatMap((r) => r.block.map((b) => [b.block, []])));
    let audited = 0;
    for (const n of nodes) {
      let entries = [];
      try {
        entries = WriteAudit.read(auditFile(n.id));
      } catch {
        continue; // never started far enough to write one
      }
      let last = -1;
      for (const [i, e] of entries.entries()) {
        if (e.op === "flush") continue;
        audited++;
        for (const [b, list] of touching) if (e.offset < (b + 1) * BLOCK && e.offset + e.length > b * BLOCK) list.push({ node: n.id, line: i + 1, epoch: e.epoch, op: e.op });
        if (e.epoch === null) continue; // a live copy into this node, before it owns the export
        const key = `${n.id === "x" ? "x/" : ""}${e.epoch}`;
        const w = epochWriter.get(key);
        if (w === undefined) epochWriter.set(key, n.id);
        else if (w !== n.id) fail("two writers of one epoch (write audit)", { epoch: key, first: w, second: n.id, line: i + 1 });
        if (e.epoch < last) fail("a node wrote at an older epoch than before (write audit)", { node: n.id, epoch: e.epoch, after: last, line: i + 1 });
        last = Math.max(last, e.epoch);
      }
    }
    for (const r of failureReports) for (const b of r.block) b.audit = touching.get(b.block) ?? [];
    summary.audited = audited;
    summary.auditedEpochs = epochWriter.size;
    summary.claims = claims.size;
    summary.staleLocal = [...staleLocal.values()].map((x) => ({ node: x.node, gen: x.gen, epoch: x.epoch, owner: x.owner, at: x.from, ms: Math.round(x.to - x.from) }));
    summary.leaseLost = leaseLost;
    summary.image = imageSummary;
    summary.ops = checker.counts;
    summary.elapsed = Math.round(now() / 1000);
    result = { ok: checker.failures.length === 0, failures: checker.failures, reports: failureReports, summary, history: historyFile, dir };
  } finally {
    for (const n of nodes) await n.kill().catch(() => {});
    if (faketime) removeDeadFaketimeShm();
    lab?.teardown({ quiet: true });
    await new Promise((r) => hist.end(r));
    if (tmpfs) {
      // A failed run keeps its image beside the history.
      if (!result?.ok) fs.copyFileSync(img, path.join(dir, "disk.img"));
      try {
        execFileSync("umount", [diskDir], { stdio: "ignore" });
        process.off("exit", unmountAtExit);
      } catch (err) {
        o.log(`cannot unmount ${diskDir}: ${err.message}`);
      }
    }
  }
  if (result.ok && !o.keep && !o.dir) fs.rmSync(dir, { recursive: true, force: true });
  return result;
}

/** A readable account of a run: the summary, and for a failed run the seed and the history around each failure. */
export function describe(result) {
  const s = result.summary;
  const lines = [];
  const n = s.nemesis;
  lines.push(`nemesis seed=${s.seed} ${s.elapsed}s nodes=${s.nodes} lease=${s.leaseTtlMs}ms powerloss=${s.powerloss}: ${result.ok ? "PASS" : `FAIL (${result.failures.length} failures)`}`);
  lines.push(`  faults: migrate ${n.migrate} (${n.migrateOk} done, ${n.migrateRefused} refused), storm calls ${n.stormCalls} (${n.stormOk} done), pause ${n.pause}, kill ${n.kill}, fault rules ${n.fault}, clock skews ${n.skew}${s.clockSkew ? "" : " (no libfaketime)"}, disk full ${n.diskfull}${s.fullDisk ? "" : " (no tmpfs)"}${s.copyNode ? `, live copies ${n.copy} (${n.copyOk} done, ${n.copyRefused} refused or cancelled; ${n.cancel} cancels sent, ${n.cancelOk} accepted)` : ""}`);
  if (s.lab) lines.push(`  lab (etcd, hosts in network namespaces): partitions ${n.partition}, cut from etcd ${n.cutetcd}, cut from peers ${n.cutpeers}, pairs cut apart ${n.cutpair}, packet loss ${n.loss}, delay ${n.delay}, one etcd member down ${n.etcdminority}, etcd majority down ${n.etcdmajority}`);
  for (const [r, c] of Object.entries(n.faultRules)) lines.push(`    ${c} × ${r}`);
  const c = s.ops ?? {};
  lines.push(`  load: ${c.writes} writes (${c.fua} FUA, ${c.acked} acknowledged, ${c.indeterminate} lost with their node), ${c.reads} reads (${c.blocksRead} blocks checked), ${c.flushes} flushes (${c.flushOk} ok, ${c.flushEio} EIO)`);
  if (s.audited !== undefined) lines.push(`  write audit: ${s.audited} writes reached the image, at ${s.auditedEpochs} epochs (checked: one node per epoch, epochs only grow per node)`);
  lines.push(`  ownership: ${s.claims} epochs claimed, ${s.leaseLost} lease losses logged, ${s.overlaps.length} brief LOCAL overlaps (longest ${Math.max(0, ...s.overlaps.map((x) => x.ms))} ms), loss events ${c.lossEvents}`);
  for (const x of s.staleLocal ?? []) if (x.ms > 0) lines.push(`  note: ${x.node} (process ${x.gen}) reported LOCAL for ${x.ms} ms at ${(x.at / 1000).toFixed(1)} s while the record named ${x.owner} (epoch ${x.epoch})`);
  if (s.image) lines.push(`  image: ${s.image.written} blocks written, ${s.image.durable} with a durable version, ${s.image.newerThanDurable} hold a newer (unflushed) one`);
  for (const r of s.restartRefused ?? []) lines.push(`  note: node ${r.node} (process ${r.gen}) refused to start at ${(r.t / 1000).toFixed(1)} s: ${r.said}`);
  lines.push(`  longest time without a completed request: ${s.maxStallMs} ms; history: ${result.history}`);
  for (const r of result.reports.slice(0, 3)) {
    lines.push("", `FAILURE (seed ${s.seed}): ${JSON.stringify(r.failure)}`);
    for (const b of r.block) {
      lines.push(`  history of block ${b.block}:`);
      for (const e of b.history) lines.push(`    ${JSON.stringify(e)}`);
      if (b.audit?.length) lines.push(`  writes of block ${b.block} that reached the image (write audit, per node in order): ${b.audit.map((a) => `${a.node}:${a.line}@${a.epoch}`).join(" ")}`);
    }
    lines.push("  nemesis in the 15 s before:");
    for (const e of r.nemesis) lines.push(`    ${JSON.stringify(e)}`);
    lines.push("  last operations:");
    for (const e of r.recent.slice(-30)) lines.push(`    ${JSON.stringify(e)}`);
  }
  if (!result.ok) lines.push("", `reproduce: npm run nemesis -- --seed ${s.seed} --seconds ${s.seconds} --nodes ${s.nodes}${s.lab ? " --lab" : ""}${s.copyNode ? " --copy-node" : ""}   (the seed fixes the schedule of choices, not the interleaving)`);
  return lines.join("\n");
}
