#!/usr/bin/env node
// npm run bench:peers — nbdstack, nbdkit (file plugin) and qemu-nbd serve copies of the same 1 GiB
// random image in one run; `nbdstack bench --engine fio` drives each with fio's nbd engine for
// every workload, servers interleaved, REPS repetitions; prints medians and the ratio
// nbdstack/peer per workload (> 1.00: nbdstack better; for latencies the ratio is peer/nbdstack).
// Knobs: REPS (3), RUNTIME (10 s), WORKLOADS (names below), NBDSTACK_ARGS, KEEP=1 keeps the images.
// For CPU accounting and steal detection use `npm run bench:anchors` (the shared harness).
import { execFileSync, spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const CLI = path.join(ROOT, "dist/cli.js");
const REPS = Number(process.env.REPS ?? 3);
const RUNTIME = Number(process.env.RUNTIME ?? 10);
const ALL = {
  "seqread-1m-qd8": { rw: "read", bs: "1M", qd: 8, metric: "mibPerSec" },
  "seqwrite-1m-qd8": { rw: "write", bs: "1M", qd: 8, metric: "mibPerSec" },
  "randread-4k-qd32": { rw: "randread", bs: "4k", qd: 32, metric: "iops" },
  "randwrite-4k-qd32": { rw: "randwrite", bs: "4k", qd: 32, metric: "iops" },
  "randrw70-4k-qd16": { rw: "randrw", bs: "4k", qd: 16, metric: "iops" },
  "randread-4k-qd1": { rw: "randread", bs: "4k", qd: 1, metric: "iops" },
};
const workloads = (process.env.WORKLOADS ?? Object.keys(ALL).join(" ")).split(/\s+/).filter(Boolean);
const has = (cmd) => {
  try {
    execFileSync("sh", ["-c", `command -v ${cmd}`], { stdio: "ignore" });
    return true;
  } catch {
    return false;
  }
};

const dir = fs.mkdtempSync(path.join(os.tmpdir(), "nbdstack-peers-"));
const base = path.join(dir, "base.img");
console.error(`making a 1 GiB random image in ${dir}`);
execFileSync("dd", ["if=/dev/urandom", `of=${base}`, "bs=1M", "count=1024", "status=none"]);
const servers = [
  { name: "nbdstack", port: 10820, cmd: (img) => [process.execPath, CLI, "serve", img, "--name", "", "--listen", "127.0.0.1:10820", "--log-level", "warn", ...(process.env.NBDSTACK_ARGS ?? "").split(" ").filter(Boolean)] },
  ...(has("nbdkit") ? [{ name: "nbdkit-file", port: 10821, cmd: (img) => ["nbdkit", "-f", "-i", "127.0.0.1", "-p", "10821", "file", img] }] : []),
  ...(has("qemu-nbd") ? [{ name: "qemu-nbd", port: 10822, cmd: (img) => ["qemu-nbd", "-f", "raw", "-b", "127.0.0.1", "-p", "10822", "-x", "", "--persistent", "--shared=8", "--cache=writeback", "--aio=threads", img] }] : []),
];
const procs = [];
for (const s of servers) {
  const img = path.join(dir, `${s.name}.img`);
  fs.copyFileSync(base, img);
  const [cmd, ...args] = s.cmd(img);
  procs.push(spawn(cmd, args, { stdio: ["ignore", "ignore", "inherit"] }));
  s.uri = `nbd://127.0.0.1:${s.port}`;
}
const cleanup = () => {
  for (const p of procs) p.kill("SIGTERM");
  if (!process.env.KEEP) fs.rmSync(dir, { recursive: true, force: true });
};
process.on("SIGINT", () => (cleanup(), process.exit(130)));
for (const s of servers) {
  for (let i = 0; ; i++) {
    try {
      execFileSync("nbdinfo", ["--size", s.uri], { stdio: "ignore" });
      break;
    } catch {
      if (i > 100) throw new Error(`${s.name} did not start`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }
}

const results = {}; // workload -> server -> [{metric, p50, p99}]
for (let rep = 1; rep <= REPS; rep++) {
  for (const w of workloads) {
    const wl = ALL[w];
    for (const s of servers) {
      const json = path.join(dir, "run.json");
      execFileSync("sync");
      execFileSync(process.execPath, [CLI, "bench", s.uri, "--engine", "fio", "--rw", wl.rw, "--bs", wl.bs, "--qd", String(wl.qd), "--duration", `${RUNTIME}s`, "--json", json], { stdio: ["ignore", "ignore", "inherit"] });
      const sum = JSON.parse(fs.readFileSync(json, "utf8")).summary;
      ((results[w] ??= {})[s.name] ??= []).push({ v: sum[wl.metric], p50: sum.latencyUs.p50, p99: sum.latencyUs.p99 });
      console.error(`rep ${rep} ${w.padEnd(18)} ${s.name.padEnd(12)} ${wl.metric === "iops" ? `${sum.iops} IOPS` : `${sum.mibPerSec} MiB/s`}  p50 ${sum.latencyUs.p50.toFixed(0)} µs  p99 ${sum.latencyUs.p99.toFixed(0)} µs`);
    }
  }
}
cleanup();

const med = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor((s.length - 1) / 2)];
};
const peers = servers.slice(1).map((s) => s.name);
console.log(`\nbench:peers — fio nbd engine through 'nbdstack bench --engine fio', medians of ${REPS} runs of ${RUNTIME} s`);
console.log(["workload".padEnd(18), "metric".padEnd(9), ...servers.map((s) => s.name.padStart(12)), ...peers.map((p) => `vs ${p}`.padStart(16))].join(" "));
for (const w of workloads) {
  const byServer = results[w];
  const rows = [
    [ALL[w].metric === "iops" ? "IOPS" : "MiB/s", (r) => r.v, false],
    ["p50 µs", (r) => r.p50, true],
    ["p99 µs", (r) => r.p99, true],
  ];
  for (const [label, get, lower] of rows) {
    const m = Object.fromEntries(servers.map((s) => [s.name, med(byServer[s.name].map(get))]));
    const ratios = peers.map((p) => (lower ? m[p] / m.nbdstack : m.nbdstack / m[p]));
    console.log([w.padEnd(18), label.padEnd(9), ...servers.map((s) => m[s.name].toFixed(0).padStart(12)), ...ratios.map((r) => r.toFixed(2).padStart(16))].join(" "));
  }
}
