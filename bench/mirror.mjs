#!/usr/bin/env node
// npm run bench:mirror — migration without shared storage (live copy) under a moderate write load,
// next to QEMU's blockdev-mirror onto a qemu-nbd target on the same image and load.
//
// A SIZE_MIB image with ALLOC_PCT % random data (spread evenly, 1 MiB at a time; holes elsewhere).
// Per repetition, each side starting from a fresh copy of that image and an empty destination:
//   idle      one live copy with nothing writing: the measured copy bandwidth (bytes copied ÷ time)
//   baseline  the load with no migration: client IOPS and the longest completion gap (noise floor)
//   loaded    the load with one live-copy migration at MIGRATE_AT
// The load is fio's nbd engine through `nbdstack bench --engine fio` (QEMU: the same fio arguments):
// 4 KiB random writes at QD, capped at RATE_IOPS, crc32c-verified (verify_backlog).
//
// Knobs (environment): SIZE_MIB (2048), ALLOC_PCT (50), DURATION (seconds of load per run; default
// auto: MIGRATE_AT + 4 × the slower side's idle copy + 8, at least 20, at most 180, fixed after the
// first repetition's idle copies so that the hand-over happens under load), MIGRATE_AT (5: seconds), RATE_IOPS (2000; 0 = as fast as possible), QD (8), MODE (background |
// write-blocking), REPS (1; >1: medians, sides interleaved), QEMU (auto | 0), NBDCOPY (1),
// KEEP (1: keep the temporary directory), NBDSTACK_ARGS (extra serve flags).
import { spawn, spawnSync } from "node:child_process";
import crypto from "node:crypto";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { has, knobsOnly } from "./tools.mjs";

knobsOnly(import.meta.url);

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const CLI = path.join(ROOT, "dist/cli.js");
const { controlCall, getStatus } = await import(path.join(ROOT, "dist/control/control-client.js"));
const QMP_PY = path.resolve(ROOT, "../shared/bench/qemu-mirror/qmp.py");

const MiB = 1024 * 1024;
const env = (k, d) => (process.env[k] === undefined || process.env[k] === "" ? d : process.env[k]);
const SIZE_MIB = Number(env("SIZE_MIB", 2048));
const ALLOC_PCT = Number(env("ALLOC_PCT", 50));
const DURATION_ENV = String(env("DURATION", "auto")).replace(/s$/, "");
let DURATION = DURATION_ENV === "auto" ? 0 : Number(DURATION_ENV);
const MIGRATE_AT = Number(String(env("MIGRATE_AT", 5)).replace(/s$/, ""));
const RATE_IOPS = Number(env("RATE_IOPS", 2000));
const QD = Number(env("QD", 8));
const MODE = env("MODE", "background");
const REPS = Number(env("REPS", 1));
const KEEP = env("KEEP", "0") === "1";
const NBDCOPY = env("NBDCOPY", "1") !== "0";
if (!["background", "write-blocking"].includes(MODE)) throw new Error(`MODE=${MODE}: background or write-blocking`);
if (!(MIGRATE_AT > 1) || (DURATION_ENV !== "auto" && !(DURATION > MIGRATE_AT + 3))) throw new Error("need 1 < MIGRATE_AT and MIGRATE_AT + 3 < DURATION");

let qemuWhy = null;
if (env("QEMU", "auto") === "0") qemuWhy = "QEMU=0";
else if (!has("qemu-storage-daemon")) qemuWhy = "qemu-storage-daemon not found (Debian package qemu-system-common)";
else if (!has("qemu-nbd")) qemuWhy = "qemu-nbd not found (Debian package qemu-utils)";
else if (!fs.existsSync(QMP_PY)) qemuWhy = `${QMP_PY} not found (the shared QMP helper of qmig.sh)`;
else if (!has("python3")) qemuWhy = "python3 not found (needed by qmp.py)";
if (!has("fio")) throw new Error("fio is needed (Debian package fio)");

const log = (...a) => console.error(`[${new Date().toISOString().slice(11, 19)}]`, ...a);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const dir = fs.mkdtempSync(path.join(os.tmpdir(), "nbdstack-bench-mirror-"));
const children = new Set();

/** Spawns a process we own; it is killed (by its pid) at cleanup if still running. */
function start(cmd, args, opts = {}) {
  const p = spawn(cmd, args, { stdio: ["ignore", "pipe", "pipe"], ...opts });
  children.add(p);
  p.once("exit", () => children.delete(p));
  p.done = new Promise((r) => p.once("exit", (code, sig) => r(code ?? sig)));
  return p;
}
async function stop(p) {
  if (!p || p.exitCode !== null || p.signalCode !== null) return;
  p.kill("SIGTERM");
  const t = setTimeout(() => p.kill("SIGKILL"), 10_000);
  await p.done;
  clearTimeout(t);
}
async function cleanup() {
  await Promise.all([...children].map(stop));
  if (!KEEP) fs.rmSync(dir, { recursive: true, force: true });
  else log(`kept ${dir}`);
}
for (const [signal, code] of [["SIGINT", 130], ["SIGTERM", 143], ["SIGHUP", 129]]) process.on(signal, () => cleanup().then(() => process.exit(code)));

function run(cmd, args) {
  const r = spawnSync(cmd, args, { encoding: "utf8" });
  return { code: r.status, out: (r.stdout ?? "") + (r.stderr ?? "") };
}
async function freePort() {
  const s = net.createServer().listen(0, "127.0.0.1");
  await new Promise((r) => s.once("listening", r));
  const p = s.address().port;
  await new Promise((r) => s.close(r));
  return p;
}
async function waitPort(port, ms = 20_000) {
  const until = Date.now() + ms;
  for (;;) {
    const ok = await new Promise((r) => {
      const c = net.connect(port, "127.0.0.1", () => (c.destroy(), r(true)));
      c.once("error", () => r(false));
    });
    if (ok) return;
    if (Date.now() > until) throw new Error(`nothing listens on port ${port}`);
    await sleep(100);
  }
}

// ---- the image ----------------------------------------------------------------------------
const base = path.join(dir, "base.img");
{
  log(`creating a ${SIZE_MIB} MiB image with ${ALLOC_PCT} % random data`);
  const fd = fs.openSync(base, "w");
  fs.ftruncateSync(fd, SIZE_MIB * MiB);
  const buf = Buffer.alloc(MiB);
  for (let i = 0; i < SIZE_MIB; i++) {
    if (Math.floor(((i + 1) * ALLOC_PCT) / 100) === Math.floor((i * ALLOC_PCT) / 100)) continue;
    crypto.randomFillSync(buf);
    fs.writeSync(fd, buf, 0, MiB, i * MiB);
  }
  fs.closeSync(fd);
}
const allocMiB = (f) => (fs.statSync(f).blocks * 512) / MiB;
log(`image: ${SIZE_MIB} MiB, ${allocMiB(base).toFixed(0)} MiB allocated`);
function freshCopy(to) {
  fs.rmSync(to, { force: true });
  const r = run("cp", ["--sparse=always", base, to]);
  if (r.code !== 0) throw new Error(`cp: ${r.out}`);
}

// ---- the same fio load for both sides ---------------------------------------------------------
const benchLoad = ["--rw", "randwrite", "--bs", "4k", "--qd", String(QD), "--verify", "--engine", "fio", ...(RATE_IOPS > 0 ? ["--rate-iops", String(RATE_IOPS)] : [])];
/** The arguments src/bench/fio.ts gives fio for the load above, plus absolute log times. */
const fioArgs = (uri, lat) => [
  "--name=bench", "--ioengine=nbd", `--uri=${uri}`, "--rw=randwrite", "--rwmixread=70", "--bs=4096", `--iodepth=${QD}`, "--numjobs=1",
  "--group_reporting", "--randseed=1", "--norandommap", `--write_lat_log=${lat}`, "--log_avg_msec=0", "--log_unix_epoch=1", "--output-format=json",
  "--time_based", `--runtime=${DURATION}`, ...(RATE_IOPS > 0 ? [`--rate_iops=${RATE_IOPS}`] : []),
  "--verify=crc32c", "--verify_backlog=1024", "--verify_fatal=1", "--verify_state_save=0",
];

// ---- nbdstack ---------------------------------------------------------------------------------
async function startNode(args, id) {
  const extra = env("NBDSTACK_ARGS", "").split(" ").filter(Boolean);
  const p = start(process.execPath, [CLI, "serve", ...args, "--listen", "127.0.0.1:0", "--node-id", id, "--control", "127.0.0.1:0", "--log-level", "warn", ...extra]);
  let err = "";
  p.stderr.on("data", (d) => (err += d));
  return new Promise((resolve, reject) => {
    let out = "";
    p.stdout.on("data", (d) => {
      out += d;
      const lines = out.split("\n").filter(Boolean);
      const control = lines.find((l) => l.startsWith("control "));
      const uri = lines.find((l) => l.startsWith("nbd://"));
      if (control && (uri || args[0] === "--data-dir")) resolve({ p, uri, control: control.slice(8), stderr: () => err });
    });
    p.once("exit", (c) => reject(new Error(`node ${id} exited with ${c}: ${err}`)));
  });
}
async function nodes(tag) {
  const d = path.join(dir, `nbdstack-${tag}`);
  fs.rmSync(d, { recursive: true, force: true });
  fs.mkdirSync(path.join(d, "a"), { recursive: true });
  fs.mkdirSync(path.join(d, "b"));
  const img = path.join(d, "a", "disk.img");
  freshCopy(img);
  const a = await startNode([img, "--name", "disk"], "a");
  const b = await startNode(["--data-dir", path.join(d, "b")], "b");
  return { a, b, imgA: img, imgB: path.join(d, "b", "disk.img"), stop: () => Promise.all([stop(a.p), stop(b.p)]) };
}

async function nbdstackIdle(rep) {
  const n = await nodes(`idle-${rep}`);
  const m = {};
  try {
    if (NBDCOPY && has("nbdcopy")) {
      const out = path.join(dir, "nbdcopy.img");
      fs.writeFileSync(out, "");
      const t = performance.now();
      const r = run("nbdcopy", [n.a.uri, out]);
      const s = (performance.now() - t) / 1000;
      if (r.code === 0) m.nbdcopyMiBs = allocMiB(base) / s;
      else log(`nbdcopy failed: ${r.out.trim()}`);
      fs.rmSync(out, { force: true });
    }
    const t = performance.now();
    const res = await controlCall(n.a.control, "POST", "v1/exports/disk/migrate", { to: n.b.control, copy: true, mode: MODE }, 3_600_000);
    m.idleS = (performance.now() - t) / 1000;
    m.idleMiB = res.copied / MiB;
    m.idleMiBs = m.idleMiB / m.idleS;
    m.idleMode = res.mode;
  } finally {
    await n.stop();
  }
  const c = run("qemu-img", ["compare", "-q", "-f", "raw", "-F", "raw", n.imgA, n.imgB]);
  m.idleCompare = c.code === 0 ? "identical" : `DIFFER (${c.out.trim() || c.code})`;
  return m;
}

async function nbdstackBench(rep, migrate) {
  const n = await nodes(`${migrate ? "loaded" : "baseline"}-${rep}`);
  const json = path.join(dir, `nbdstack-${migrate ? "loaded" : "baseline"}-${rep}.json`);
  try {
    const args = [CLI, "bench", n.a.uri, ...benchLoad, "--duration", `${DURATION}s`, "--json", json, "--nodes", `${n.a.control},${n.b.control}`];
    if (migrate) args.push("--migrate-at", `${MIGRATE_AT}s`, "--migrate-copy", "--copy-mode", MODE);
    const p = start(process.execPath, args);
    let out = "";
    p.stdout.on("data", (d) => (out += d));
    p.stderr.on("data", (d) => (out += d));
    const code = await p.done;
    process.stderr.write(out.replace(/^/gm, "    "));
    if (!fs.existsSync(json)) throw new Error(`nbdstack bench exited with ${code} and wrote no JSON:\n${out}`);
  } finally {
    await n.stop();
  }
  const j = JSON.parse(fs.readFileSync(json, "utf8"));
  const s = j.summary;
  const m = { iops: s.iops, gap: s.baselineGapMs, errors: s.errors, verify: s.verify };
  if (!migrate) return m;
  const h = s.handovers[0];
  if (!h) return { ...m, error: "no move happened" };
  if (h.error) return { ...m, error: h.error };
  const c = h.copy;
  const endS = h.endMs / 1000;
  // IOPS after the hand-over: client → node a → port B → node b
  const after = j.timeline.filter((b) => b.t >= h.endMs + 200 && b.t + 100 <= s.seconds * 1000 - 200);
  return {
    ...m,
    totalS: (h.endMs - h.startMs) / 1000,
    startMiB: c.total / MiB,
    copiedMiB: c.copied / MiB,
    copyIops: c.iops,
    copyGap: c.longestCopyGapMs,
    stall: endS < s.seconds - 0.5 ? h.longestStallMs : NaN,
    underLoad: endS < s.seconds - 0.5,
    afterIops: after.length ? after.reduce((x, b) => x + b.iops, 0) / after.length : NaN,
    mode: c.mode,
  };
}

// ---- QEMU: qemu-storage-daemon (source, QMP) + qemu-nbd (target), as in qmig.sh -------------------
async function qemuServers(tag) {
  const d = path.join(dir, `qemu-${tag}`);
  fs.rmSync(d, { recursive: true, force: true });
  fs.mkdirSync(d, { recursive: true });
  const src = path.join(d, "src.img");
  const dst = path.join(d, "dst.img");
  freshCopy(src);
  fs.writeFileSync(dst, "");
  fs.truncateSync(dst, SIZE_MIB * MiB);
  const srcPort = await freePort();
  const dstPort = await freePort();
  const sock = path.join(d, "qmp.sock");
  const target = start("qemu-nbd", ["-f", "raw", "-b", "127.0.0.1", "-p", String(dstPort), "-x", "disk", "-e", "8", "-t", "--cache=writeback", "--aio=threads", dst]);
  const qsd = start("qemu-storage-daemon", [
    "--blockdev", `driver=file,node-name=src0,filename=${src},cache.direct=off,aio=threads`,
    "--nbd-server", `addr.type=inet,addr.host=127.0.0.1,addr.port=${srcPort}`,
    "--export", "type=nbd,id=exp0,node-name=src0,name=disk,writable=on",
    "--chardev", `socket,path=${sock},server=on,wait=off,id=qmp0`, "--monitor", "chardev=qmp0",
  ]);
  await waitPort(dstPort);
  await waitPort(srcPort);
  return { d, src, dst, sock, dstPort, uri: `nbd://127.0.0.1:${srcPort}/disk`, stop: () => Promise.all([stop(qsd), stop(target)]) };
}

/** qmp.py mirror: blockdev-add of the target, blockdev-mirror at startAt, block-job-complete at READY. */
function qmpMirror(q, startAt, readyDeadline) {
  const out = path.join(q.d, "qmp");
  fs.mkdirSync(out, { recursive: true });
  const p = start("python3", [QMP_PY, "mirror", "--sock", q.sock, "--out", out, "--node", "src0", "--target-node", "dst0", "--job", "mig0",
    "--dst-host", "127.0.0.1", "--dst-port", String(q.dstPort), "--dst-export", "disk", "--copy-mode", MODE,
    "--start-at", String(startAt), "--pivot-at", String(startAt), "--ready-deadline", String(readyDeadline), "--complete-deadline", String(readyDeadline + 60), "--poll", "0.5"]);
  let err = "";
  p.stdout.on("data", (d) => (err += d));
  p.stderr.on("data", (d) => (err += d));
  return p.done.then((code) => {
    const f = path.join(out, "qmp-summary.json");
    const sum = fs.existsSync(f) ? JSON.parse(fs.readFileSync(f, "utf8")) : { status: `qmp.py exited with ${code}: ${err.trim()}` };
    const prog = fs.existsSync(path.join(out, "progress.jsonl")) ? fs.readFileSync(path.join(out, "progress.jsonl"), "utf8").split("\n").filter(Boolean).map((l) => JSON.parse(l)) : [];
    return { code, sum, prog };
  });
}

async function qemuIdle(rep) {
  const q = await qemuServers(`idle-${rep}`);
  const m = {};
  try {
    const { sum } = await qmpMirror(q, Date.now() / 1000 + 0.3, Date.now() / 1000 + 600);
    if (sum.status !== "pivoted") return { idleError: sum.status };
    m.idleS = sum.completed.ts - sum.mirror.send;
    m.idleMiB = sum.ready.data.len / MiB;
    m.idleMiBs = m.idleMiB / m.idleS;
    m.idleMode = MODE;
  } finally {
    await q.stop();
  }
  const c = run("qemu-img", ["compare", "-q", "-f", "raw", "-F", "raw", q.src, q.dst]);
  m.idleCompare = c.code === 0 ? "identical" : `DIFFER (${c.out.trim() || c.code})`;
  return m;
}

/** Completion times (epoch ms, sorted) of reads and writes in fio's per-request logs. */
function fioTimes(d) {
  const t = [];
  for (const f of fs.readdirSync(d).filter((n) => n.startsWith("lat_lat."))) {
    for (const line of fs.readFileSync(path.join(d, f), "utf8").split("\n")) {
      const c = line.split(",");
      if (c.length < 4) continue;
      const dd = Number(c[2]);
      if (dd === 0 || dd === 1) t.push(Number(c[0]));
    }
  }
  return t.sort((x, y) => x - y);
}
/** As Samples.longestGap: the longest time without a completion inside [from, to]. */
function longestGap(ts, from, to) {
  let gap = 0;
  let prev = from;
  for (const t of ts) {
    if (t < from || t > to) continue;
    gap = Math.max(gap, t - prev);
    prev = t;
  }
  return Math.max(gap, to - prev);
}
const countIn = (ts, from, to) => ts.filter((t) => t >= from && t < to).length;

async function qemuBench(rep, migrate) {
  const q = await qemuServers(`${migrate ? "loaded" : "baseline"}-${rep}`);
  const fioDir = path.join(q.d, "fio");
  fs.mkdirSync(fioDir);
  let fioOut = "";
  let mirror = null;
  const t0 = Date.now();
  try {
    const p = start("fio", fioArgs(q.uri, path.join(fioDir, "lat")));
    p.stdout.on("data", (d) => (fioOut += d));
    p.stderr.on("data", (d) => (fioOut += d));
    if (migrate) mirror = qmpMirror(q, t0 / 1000 + MIGRATE_AT, t0 / 1000 + DURATION - 1);
    await p.done;
    if (mirror) mirror = await mirror;
  } finally {
    await q.stop();
  }
  const jsonAt = fioOut.indexOf("{");
  if (jsonAt < 0) throw new Error(`fio failed: ${fioOut}`);
  const job = JSON.parse(fioOut.slice(jsonAt, fioOut.lastIndexOf("}") + 1)).jobs[0];
  const ts = fioTimes(fioDir);
  const first = ts[0];
  const last = ts[ts.length - 1];
  const m = { iops: (ts.length * 1000) / (last - first), errors: job.error ? 1 : 0, verify: job.error ? `FAILED (fio error ${job.error})` : "ok" };
  if (!migrate) return { ...m, gap: longestGap(ts, first + 500, last - 100) };
  const s = mirror.sum;
  const ms = (x) => (x === undefined ? undefined : Math.round(x * 1000));
  const mir = ms(s.mirror?.reply ? s.mirror.send : undefined);
  const ready = ms(s.ready?.ts);
  const comp = ms(s.complete?.send);
  const done = ms(s.completed?.ts);
  const quiet = [mir ? longestGap(ts, first + 500, mir - 100) : 0, done && done + 700 < last - 100 ? longestGap(ts, done + 500, last - 100) : 0];
  m.gap = Math.max(...quiet);
  if (s.status !== "pivoted") {
    const why = s.status === "not ready" ? `no BLOCK_JOB_READY in ${((last - mir) / 1000).toFixed(0)} s of load, cancelled` : `QEMU: ${s.status}`;
    return { ...m, error: why, copyIops: mir ? (countIn(ts, mir, last) * 1000) / (last - mir) : NaN, copyGap: mir ? longestGap(ts, mir, last) : NaN, mode: MODE };
  }
  const firstLen = mirror.prog.find((x) => x.len)?.len;
  const after = done + 200 < last - 200 ? (countIn(ts, done + 200, last - 200) * 1000) / (last - 400 - done) : NaN;
  return {
    ...m,
    totalS: (done - mir) / 1000,
    startMiB: firstLen === undefined ? NaN : firstLen / MiB,
    copiedMiB: (mirror.prog.at(-1)?.len ?? s.ready.data.len) / MiB,
    copyIops: (countIn(ts, mir, ready) * 1000) / (ready - mir),
    copyGap: longestGap(ts, mir, ready),
    stall: done < last - 500 ? longestGap(ts, comp, done + 50) : NaN,
    underLoad: done < last - 500,
    afterIops: after,
    mode: MODE,
  };
}

// ---- the runs -------------------------------------------------------------------------------
const sides = [{ name: "nbdstack", idle: nbdstackIdle, bench: nbdstackBench }];
if (!qemuWhy) sides.push({ name: "QEMU", idle: qemuIdle, bench: qemuBench });
else log(`QEMU comparison skipped: ${qemuWhy}`);
const results = Object.fromEntries(sides.map((s) => [s.name, []]));
const load0 = os.loadavg()[0];
try {
  for (let rep = 1; rep <= REPS; rep++) {
    const r = Object.fromEntries(sides.map((s) => [s.name, {}]));
    for (const [what, fn] of [["idle copy", (s) => s.idle(rep)], ["baseline load", (s) => s.bench(rep, false)], ["load + live copy", (s) => s.bench(rep, true)]]) {
      if (what === "baseline load" && !DURATION) {
        const slowest = Math.max(...sides.map((s) => r[s.name].idle?.idleS ?? 0));
        DURATION = Math.round(Math.min(180, Math.max(20, MIGRATE_AT + 4 * slowest + 8)));
        log(`DURATION=auto: ${DURATION} s of load per run (slowest idle copy ${slowest.toFixed(1)} s)`);
      }
      for (const s of sides) {
        log(`rep ${rep}/${REPS}: ${s.name}: ${what}`);
        try {
          const m = await fn(s);
          const key = what === "idle copy" ? "idle" : what === "baseline load" ? "base" : "load";
          r[s.name][key] = m;
        } catch (err) {
          log(`${s.name} ${what} failed: ${err.message}`);
          r[s.name][what === "idle copy" ? "idle" : what === "baseline load" ? "base" : "load"] = { error: err.message };
        }
      }
    }
    for (const s of sides) results[s.name].push(r[s.name]);
  }
} finally {
  await cleanup();
}

// ---- the table ------------------------------------------------------------------------------
const median = (xs) => {
  const v = xs.filter((x) => typeof x === "number" && Number.isFinite(x)).sort((a, b) => a - b);
  if (!v.length) return NaN;
  return v.length % 2 ? v[(v.length - 1) / 2] : (v[v.length / 2 - 1] + v[v.length / 2]) / 2;
};
const pick = (side, f) => {
  const vals = results[side].map((r) => {
    try {
      return f(r);
    } catch {
      return undefined;
    }
  });
  if (vals.every((v) => typeof v === "number" || v === undefined)) return median(vals);
  return [...new Set(vals.map((v) => (v === undefined ? "-" : String(v))))].join(" / ");
};
const fmt = (v, d = 0) => (typeof v === "number" ? (Number.isFinite(v) ? v.toFixed(d) : "-") : v);
const ratio = (r) => r.load.totalS / (r.load.startMiB / r.idle.idleMiBs);
const rows = [
  ["copy bandwidth, no load (MiB copied ÷ wall time)", (r) => r.idle.idleMiBs, 0],
  ["  idle copy: MiB copied / seconds", (r) => `${fmt(r.idle.idleMiB)} / ${fmt(r.idle.idleS, 2)}`],
  ["  images compared after the idle copy", (r) => r.idle.idleCompare],
  ["baseline IOPS (no migration; writes + verify reads)", (r) => r.base.iops, 0],
  ["baseline longest completion gap, ms", (r) => r.base.gap, 1],
  ["migration under load: total time, s", (r) => (r.load.error ? `not done (${r.load.error})` : r.load.totalS), 2],
  ["  MiB to copy at the start (allocated)", (r) => r.load.startMiB, 0],
  ["  expected: MiB at start ÷ idle bandwidth, s", (r) => r.load.startMiB / r.idle.idleMiBs, 2],
  ["  time ÷ expected (target ≤ 1.2)", ratio, 2],
  ["  MiB copied in all", (r) => r.load.copiedMiB, 0],
  ["IOPS during the copy (until the hand-over or the load's end)", (r) => r.load.copyIops, 0],
  ["  ÷ baseline IOPS (target ≥ 0.8)", (r) => r.load.copyIops / r.base.iops, 2],
  ["  longest completion gap during the copy, ms", (r) => r.load.copyGap, 1],
  ["longest stall at the hand-over, ms (target ≤ 100)", (r) => r.load.stall, 1],
  ["  same run's longest gap away from the move, ms", (r) => r.load.gap, 1],
  ["  hand-over while the load ran", (r) => (r.load.error ? "-" : r.load.underLoad ? "yes" : "NO (after the load)")],
  ["IOPS after the hand-over (proxied) ÷ baseline", (r) => r.load.afterIops / r.base.iops, 2],
  ["mode the copy ended in", (r) => r.load.mode],
  ["errors (baseline + loaded)", (r) => r.base.errors + r.load.errors, 0],
  ["verify (baseline / loaded)", (r) => `${r.base.verify} / ${r.load.verify}`],
];
const names = sides.map((s) => s.name);
const cells = rows.map(([label, f, d]) => [label, ...names.map((n) => fmt(pick(n, f), d))]);
const problems = names.flatMap((n) => results[n].flatMap((r, i) => ["idle", "base", "load"].flatMap((k) => (r[k]?.error || r[k]?.idleError ? [`${n} rep ${i + 1} ${k}: ${r[k].error ?? r[k].idleError}`] : []))));
const w0 = Math.max(...cells.map((c) => c[0].length));
const wn = names.map((_, i) => Math.max(names[i].length, ...cells.map((c) => String(c[i + 1]).length)));
const line = (c) => `| ${c[0].padEnd(w0)} | ${c.slice(1).map((x, i) => String(x).padStart(wn[i])).join(" | ")} |`;
const nbdcopy = median(results.nbdstack.map((r) => r.idle?.nbdcopyMiBs));
console.log(
  `\nbench:mirror — ${SIZE_MIB} MiB image, ${ALLOC_PCT} % allocated; load: fio nbd engine 4 KiB randwrite QD${QD}${RATE_IOPS ? ` at ${RATE_IOPS} IOPS` : " uncapped"} + crc32c verify, ${DURATION} s per run; ` +
    `one ${MODE} live copy at ${MIGRATE_AT} s; ${REPS > 1 ? `medians of ${REPS} interleaved reps` : "1 rep"}; ` +
    `load average ${load0.toFixed(1)} at the start, ${os.loadavg()[0].toFixed(1)} at the end (${os.cpus().length} CPUs)`,
);
console.log(line(["", ...names]));
console.log(`|${"-".repeat(w0 + 2)}|${wn.map((w) => "-".repeat(w + 2)).join("|")}|`);
for (const c of cells) console.log(line(c));
if (Number.isFinite(nbdcopy)) console.log(`nbdcopy out of nbdstack node a (allocated MiB ÷ time, extents skipped): ${nbdcopy.toFixed(0)} MiB/s`);
if (qemuWhy) console.log(`QEMU: not run — ${qemuWhy}`);
else console.log("QEMU: qemu-storage-daemon (file node, cache.direct=off, aio=threads) exporting the image, blockdev-mirror sync=full onto qemu-nbd (--cache=writeback), block-job-complete at READY (qmp.py from ../shared/bench/qemu-mirror)");
for (const p of problems) console.log(`PROBLEM: ${p}`);
const bad = names.includes("nbdstack") && results.nbdstack.some((r) => r.load?.error || r.load?.errors || r.base?.errors || (r.load?.verify && r.load.verify !== "ok"));
process.exit(bad ? 1 : 0);
