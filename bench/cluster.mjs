#!/usr/bin/env node
// npm run bench:cluster — three hosts (network namespaces on a bridge, a 3-member etcd:
// test/cluster/lab.mjs), one node per host (serve --etcd, --lease-ttl 2s) sharing one image.
//   1. fio (nbd engine, 4 KiB random writes, QD32) runs inside h1 against h1's node: BASE_SECS of
//      baseline, then MOVES planned moves h1 → h2 → h3 → h1 … every MOVE_EVERY seconds. From fio's
//      per-request latency log: the longest gap between completions around each move, next to the
//      longest gap of the baseline (this machine's own noise).
//   2. Proxied ÷ direct: PROXY_SECS of the same load through a non-owner host (port B over the
//      bridge to the owner) and through the owner host itself.
//   A move's stall is the longest gap between completions from its migrate call until 500 ms after
//   the destination serves through port A (the client's node relinks port B when etcd's watch
//   names the new owner, which comes after).
//   3. The owner is SIGKILLed while fio writes through another host: the time without an owner
//      (kill → the new owner's "taking the image over" log line; target ≤ lease + 1 s) and the
//      client's longest gap.
// Needs root, etcd, fio (see test/cluster/README.md). Knobs (environment): BASE_SECS (4),
// MOVES (6), MOVE_EVERY (2), PROXY_SECS (5), SIZE_MIB (256), RATE_IOPS (0: uncapped), DEBUG=1
// (the run's ten longest gaps and the moves' times), ETCD_DATA_IN=DIR (etcd's data there, e.g. /dev/shm:
// a disk of etcd's own, as etcd's docs ask for, instead of the one the image is flushed to),
// CPU_PROF=DIR (each node writes DIR/HOST.cpuprofile when the lab stops it), LOG_DIR=DIR (each
// node's JSON log kept as DIR/HOST.log, and fio's per-request logs), LOG_LEVEL (the nodes' --log-level, default info).
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { controlCall, getStatus } from "../dist/control/control-client.js";
import { Lab, netnsUnavailable } from "../test/cluster/lab.mjs";
import { cpuSeconds, knobsOnly, nodeCommandOf } from "./tools.mjs";

knobsOnly(import.meta.url);

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const CLI = path.join(ROOT, "dist/cli.js");
const num = (k, d) => Number(process.env[k] ?? d);
const BASE_SECS = num("BASE_SECS", 4);
const MOVES = num("MOVES", 6);
const MOVE_EVERY = num("MOVE_EVERY", 2);
const PROXY_SECS = num("PROXY_SECS", 5);
const SIZE_MIB = num("SIZE_MIB", 256);
const RATE_IOPS = num("RATE_IOPS", 0);
const LEASE_MS = 2000;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const why = netnsUnavailable();
if (why) {
  console.error(`bench:cluster needs the multi-host lab: ${why}`);
  process.exit(1);
}

const ETCD_DATA_IN = process.env.ETCD_DATA_IN;
const lab = await Lab.up({ hosts: 3, etcdArgs: ["--pre-vote"], etcdDataIn: ETCD_DATA_IN }); // see test/cluster/README.md
const dir = path.join(lab.dir, "bench");
fs.mkdirSync(dir, { recursive: true });
const img = path.join(dir, "disk.img");
fs.writeFileSync(img, "");
fs.truncateSync(img, SIZE_MIB * 1024 * 1024);
const hosts = ["h1", "h2", "h3"];
const url = (h) => `http://${lab.addr(h)}:9000`;
const uri = (h) => `nbd://${lab.addr(h)}:10809/disk`;
const nodes = {};

async function startNode(h) {
  const prof = process.env.CPU_PROF ? ["--cpu-prof", `--cpu-prof-dir=${process.env.CPU_PROF}`, `--cpu-prof-name=${h}.cpuprofile`] : [];
  // As `nbdstack serve` runs (its shebang's environment and Node flags), the profiler's flags beside Node's.
  const cmd = nodeCommandOf(CLI);
  const at = cmd.indexOf(process.execPath) + 1;
  const proc = lab.spawn(h, cmd[0], [
    ...cmd.slice(1, at), ...prof, ...cmd.slice(at), "serve", img, "--name", "disk", "--node-id", h, "--etcd", lab.etcdEndpoints.join(","), "--lease-ttl", "2s",
    "--listen", `${lab.addr(h)}:10809`, "--control", `${url(h).slice(7)}`, "--log-format", "json", "--log-level", process.env.LOG_LEVEL ?? "info",
  ]);
  let out = "";
  let err = "";
  proc.stderr.on("data", (d) => (err += d));
  await new Promise((resolve, reject) => {
    proc.stdout.on("data", (d) => {
      out += d;
      if (/^control /m.test(out)) resolve();
    });
    proc.once("exit", (c) => reject(new Error(`node ${h} exited (${c}): ${err}`)));
  });
  nodes[h] = { proc, stderr: () => err, exited: new Promise((r) => (proc.exitCode !== null ? r() : proc.once("exit", r))) };
}

/** fio inside `host` against `target`'s node for `secs`; resolves with its JSON job and latency log, on this machine's wall clock. */
function fio(host, target, secs, tag) {
  const lat = path.join(dir, `${tag}`);
  const cpu0 = Object.fromEntries(Object.entries(nodes).map(([h, n]) => [h, cpuSeconds(n.proc.pid)]));
  const p = lab.spawn(host, "fio", [
    "--name=bench", "--ioengine=nbd", `--uri=${uri(target)}`, "--rw=randwrite", "--bs=4k", "--iodepth=32", `--size=${SIZE_MIB}m`,
    "--norandommap", "--randrepeat=0", "--time_based", `--runtime=${secs}`, `--write_lat_log=${lat}`, "--log_avg_msec=0", "--log_unix_epoch=1",
    ...(RATE_IOPS ? [`--rate_iops=${RATE_IOPS}`] : []), "--output-format=json",
  ]);
  let out = "";
  let err = "";
  p.stdout.on("data", (d) => (out += d));
  p.stderr.on("data", (d) => (err += d));
  return new Promise((resolve, reject) =>
    p.once("close", (code) => {
      const i = out.indexOf("{");
      if (i < 0) return reject(new Error(`fio in ${host} printed no JSON (exit ${code}): ${err}`));
      const report = JSON.parse(out.slice(i));
      const job = report.jobs[0];
      // Completion times on the wall clock (--log_unix_epoch): fio's report time minus its runtime
      // is not the log's zero (fio writes the report after closing its connections).
      const times = [];
      for (const f of fs.readdirSync(dir).filter((n) => n.startsWith(`${tag}_lat.`))) {
        for (const line of fs.readFileSync(path.join(dir, f), "utf8").split("\n")) {
          const c = line.split(",");
          if (c.length >= 4) times.push(Number(c[0]));
        }
      }
      times.sort((a, b) => a - b);
      const cpu = Object.fromEntries(Object.entries(cpu0).map(([h, t]) => [h, (cpuSeconds(nodes[h].proc.pid) - t) * 1e6]));
      resolve({ code, err, job, times, iops: job.write.iops, errors: job.error, cpu });
    }),
  );
}

/** Server CPU per request of each node during a fio run, and fio's own. */
function cpuPerRequest(f) {
  const n = f.job.write.total_ios;
  const per = Object.entries(f.cpu).filter(([, us]) => us > 0).map(([h, us]) => `${h} ${(us / n).toFixed(1)}`);
  const fioUs = ((f.job.usr_cpu + f.job.sys_cpu) / 100) * f.job.job_runtime * 1000;
  return `CPU µs per request: ${per.join(", ")}; fio ${(fioUs / n).toFixed(1)}`;
}

/** The longest interval without a completion that overlaps [from, to] (wall ms). */
function longestGap(times, from, to) {
  let best = 0;
  for (let i = 1; i < times.length; i++) {
    const a = times[i - 1];
    const b = times[i];
    if (b < from || a > to) continue;
    best = Math.max(best, b - a);
  }
  return best;
}

const alive = (h) => nodes[h].proc.exitCode === null && nodes[h].proc.signalCode === null;
const owner = async () => (await getStatus(url(Object.keys(nodes).find(alive)))).cluster.exports[0];
const pct = (xs, p) => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor((p / 100) * xs.length))];

try {
  await startNode("h1");
  await Promise.all([startNode("h2"), startNode("h3")]);

  // 1. Baseline, then planned moves, under fio through h1.
  const run1 = fio("h1", "h1", BASE_SECS + MOVES * MOVE_EVERY + 1, "moves");
  await sleep(1000);
  const baseFrom = Date.now();
  await sleep(BASE_SECS * 1000);
  const baseTo = Date.now();
  const moves = [];
  let at = "h1";
  for (let i = 0; i < MOVES; i++) {
    const to = hosts[(hosts.indexOf(at) + 1) % 3];
    const t0 = Date.now();
    const r = await controlCall(url(at), "POST", "v1/exports/disk/migrate", { to: url(to) }, 30_000);
    for (;;) {
      const e = (await getStatus(url(to))).exports.find((x) => x.name === "disk");
      if (e?.state === "LOCAL") break;
      await sleep(20);
    }
    moves.push({ from: at, to, epoch: r.epoch, t0, t1: Date.now() });
    at = to;
    await sleep(Math.max(0, MOVE_EVERY * 1000 - (Date.now() - t0)));
  }
  const f1 = await run1;
  if (process.env.DEBUG) {
    const gaps = f1.times.slice(1).map((b, i) => [b - f1.times[i], f1.times[i]]).sort((a, b) => b[0] - a[0]).slice(0, 10);
    console.log("top gaps (ms, at):", gaps.map(([g, t]) => `${g}@${t}`).join(" "));
    console.log("moves:", moves.map((m) => `${m.t0}-${m.t1}`).join(" "), "base", baseFrom, baseTo, "first/last completion", f1.times[0], f1.times.at(-1));
    // CLOCK_MONOTONIC (a .cpuprofile's time base, in µs) against the wall clock, to place profile samples.
    console.log("wall ms - monotonic ms:", Date.now() - Number(process.hrtime.bigint() / 1000n) / 1000);
  }
  const baseGap = longestGap(f1.times, baseFrom, baseTo);
  // A move's window runs from the migrate call to 500 ms after the destination serves through
  // port A: the client's node (h1) relinks its port B when etcd's watch names the new owner, after that.
  for (const m of moves) m.stall = longestGap(f1.times, m.t0, m.t1 + 500);

  // 2. Proxied ÷ direct.
  const own = (await owner()).owner;
  const other = hosts.find((h) => h !== own);
  const direct = await fio(own, own, PROXY_SECS, "direct");
  const proxied = await fio(other, other, PROXY_SECS, "proxied");

  // 3. Kill the owner under fio through a surviving host.
  const run3 = fio(other, other, 10, "kill");
  await sleep(2000);
  const killAt = Date.now();
  nodes[own].proc.kill("SIGKILL");
  await nodes[own].exited;
  let next;
  for (;;) {
    next = await owner();
    if (next.owner !== own && next.live) break;
    await sleep(20);
  }
  const took = nodes[next.owner]
    .stderr()
    .split("\n")
    .filter((l) => l.includes("taking the image over"))
    .map((l) => JSON.parse(l).time)
    .find((t) => t >= killAt);
  const f3 = await run3;
  const killGap = longestGap(f3.times, killAt - 100, killAt + 10_000);

  const ms = (x) => `${Math.round(x)} ms`;
  console.log(`\nbench:cluster — 3 hosts (network namespaces), etcd, --lease-ttl 2s, fio 4 KiB randwrite QD32${RATE_IOPS ? ` at ${RATE_IOPS} IOPS` : ""}, ${SIZE_MIB} MiB image${ETCD_DATA_IN ? `, etcd's data in ${ETCD_DATA_IN}` : ", etcd's data on the image's file system"}\n`);
  console.log(`baseline (${BASE_SECS} s through h1, no move): longest gap ${ms(baseGap)}`);
  console.log("planned moves (fio through h1):");
  console.log("  move          epoch  call→LOCAL  longest stall");
  for (const m of moves) console.log(`  ${`${m.from} → ${m.to}`.padEnd(13)} ${String(m.epoch).padStart(5)}  ${ms(m.t1 - m.t0).padStart(10)}  ${ms(m.stall).padStart(13)}`);
  const stalls = moves.map((m) => m.stall);
  console.log(`  median stall ${ms(pct(stalls, 50))}, max ${ms(Math.max(...stalls))} (baseline gap ${ms(baseGap)}); fio: ${f1.job.write.total_ios} writes, ${f1.errors} errors, ${Math.round(f1.iops)} IOPS over the run`);
  console.log(`direct (fio in ${own} → ${own}, the owner): ${Math.round(direct.iops)} IOPS, errors ${direct.errors}`);
  console.log(`  ${cpuPerRequest(direct)}`);
  console.log(`proxied (fio in ${other} → ${other} → port B → ${own}): ${Math.round(proxied.iops)} IOPS, errors ${proxied.errors}`);
  console.log(`  ${cpuPerRequest(proxied)}`);
  console.log(`proxied ÷ direct: ${(proxied.iops / direct.iops).toFixed(2)}`);
  console.log(`owner ${own} SIGKILLed: ${next.owner} took the image over after ${took ? ms(took - killAt) : "?"} (target ≤ lease + 1 s = ${ms(LEASE_MS + 1000)}); client (fio through ${other}) longest gap ${ms(killGap)}, errors ${f3.errors}`);
  const bad = [f1, direct, proxied, f3].filter((f) => f.errors !== 0);
  if (bad.length) console.log(`WARNING: fio reported errors: ${bad.map((f) => f.err.trim().split("\n").pop()).join(" | ")}`);
} finally {
  if (process.env.LOG_DIR) {
    fs.mkdirSync(process.env.LOG_DIR, { recursive: true });
    for (const [h, n] of Object.entries(nodes)) fs.writeFileSync(path.join(process.env.LOG_DIR, `${h}.log`), n.stderr());
    // fio's per-request logs too (time on the wall clock in ms, latency in ns, …, offset).
    for (const f of fs.readdirSync(dir).filter((n) => n.includes("_lat."))) fs.copyFileSync(path.join(dir, f), path.join(process.env.LOG_DIR, f));
  }
  if (process.env.CPU_PROF) {
    // A profile is written at a clean exit only: stop the nodes gently before the lab kills them.
    for (const n of Object.values(nodes)) n.proc.kill("SIGTERM");
    await Promise.race([Promise.all(Object.values(nodes).map((n) => n.exited)), sleep(10_000)]);
  }
  lab.teardown({ quiet: true });
}
