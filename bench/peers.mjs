#!/usr/bin/env node
// npm run bench:peers — nbdstack, nbdkit (file plugin), qemu-nbd and nbd-server serve the same 1 GiB
// random image file, taking turns, in one run; `nbdstack bench --engine fio` drives each with fio's nbd engine for
// every workload, servers interleaved, REPS repetitions; prints medians and the ratio
// nbdstack/peer per workload (> 1.00: nbdstack better; for latencies the ratio is peer/nbdstack).
// Also "nbdstack-stack": nbdstack serving partition 1 of the image through the full stack of a
// cluster node (disk → fault, no rules → partition → redirector → fence → dirty tracker → file), and nbdkit's memory
// plugin as the ceiling of protocol + loopback, and nbd-server (it daemonises: its PID comes from
// its pid file). The workload
// "nbdcopy-1g" copies the whole export to null: with nbdcopy (its default 4 connections), after
// one unmeasured copy per server.
// For nbdcopy also the machine's busy time (every CPU, /proc/stat) less nbdcopy's own, per MiB.
// Besides throughput and latency it prints the server's CPU time per request (user + system time
// of the server process and its reaped children, from /proc, over the run ÷ requests done): on
// this 2-core machine client and server share the CPUs, so that figure is steadier than IOPS and
// ranks servers the same way (see ANCHORS.md). Last, each server's peak RSS (VmHWM).
// Then the qcow2 rows: nbdstack against qemu-nbd on one qcow2 image (the 1 GiB image converted, every
// cluster allocated; 64 KiB clusters), each server started for its run alone: 4 KiB random read and
// write at QD32, 1 MiB sequential read and write at QD8, and allocating writes (4 KiB random at
// QD32) into a fresh, empty 1 GiB overlay over the raw image as backing file (made anew for every
// run: the first write to each 64 KiB cluster copies the rest of it from the backing file).
// Knobs: REPS (3), RUNTIME (10 s), WORKLOADS (space-separated, default all: seqread-1m-qd8
// seqwrite-1m-qd8 randread-4k-qd32 randwrite-4k-qd32 randrw70-4k-qd16 randread-4k-qd1
// mc1-randread-4k-qd8 mc2-randread-4k-qd8 mc4-randread-4k-qd8 nbdcopy-1g), QCOW2 (1; 0: no qcow2
// rows; only: only them), QCOW2_WORKLOADS (default all: qcow2-randread-4k-qd32
// qcow2-randwrite-4k-qd32 qcow2-seqread-1m-qd8 qcow2-seqwrite-1m-qd8 qcow2-alloc-randwrite-4k-qd32),
// THREADS (0: no nbdstack-t2 row), NBDSTACK_ARGS, KEEP=1 keeps the images.
// For CPU accounting and steal detection use `npm run bench:anchors` (the shared harness).
import { execFileSync, spawn, spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { childrenOf, cpuSeconds, has, knobsOnly, machineBusySeconds, nodeCommandOf, reapedChildrenSeconds } from "./tools.mjs";

knobsOnly(import.meta.url);

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
  // Multi-conn scaling: the same QD8 stream over 1, 2 and 4 connections (fio jobs) at once.
  "mc1-randread-4k-qd8": { rw: "randread", bs: "4k", qd: 8, conns: 1, metric: "iops" },
  "mc2-randread-4k-qd8": { rw: "randread", bs: "4k", qd: 8, conns: 2, metric: "iops" },
  "mc4-randread-4k-qd8": { rw: "randread", bs: "4k", qd: 8, conns: 4, metric: "iops" },
  "nbdcopy-1g": { nbdcopy: true, metric: "mibPerSec" },
};
const QCOW2 = process.env.QCOW2 ?? "1";
const workloads = QCOW2 === "only" ? [] : (process.env.WORKLOADS ?? Object.keys(ALL).join(" ")).split(/\s+/).filter(Boolean);
const QALL = {
  "qcow2-randread-4k-qd32": { rw: "randread", bs: "4k", qd: 32, metric: "iops" },
  "qcow2-randwrite-4k-qd32": { rw: "randwrite", bs: "4k", qd: 32, metric: "iops" },
  "qcow2-seqread-1m-qd8": { rw: "read", bs: "1M", qd: 8, metric: "mibPerSec" },
  "qcow2-seqwrite-1m-qd8": { rw: "write", bs: "1M", qd: 8, metric: "mibPerSec" },
  "qcow2-alloc-randwrite-4k-qd32": { rw: "randwrite", bs: "4k", qd: 32, metric: "iops", overlay: true },
};
const qworkloads = QCOW2 === "0" ? [] : (process.env.QCOW2_WORKLOADS ?? Object.keys(QALL).join(" ")).split(/\s+/).filter(Boolean);
for (const [list, known, what] of [[workloads, ALL, "WORKLOADS"], [qworkloads, QALL, "QCOW2_WORKLOADS"]]) {
  const unknown = list.filter((w) => !Object.hasOwn(known, w));
  if (unknown.length) {
    console.error(`${what}: no workload named ${unknown.join(", ")}; known: ${Object.keys(known).join(" ")}`);
    process.exit(2);
  }
}

const dir = fs.mkdtempSync(path.join(os.tmpdir(), "nbdstack-peers-"));
const base = path.join(dir, "base.img");
console.error(`making a 1 GiB random image in ${dir}`);
execFileSync("dd", ["if=/dev/urandom", `of=${base}`, "bs=1M", "count=1024", "status=none"]);
// One GPT partition over (almost) all of it, for the full-stack variant; the others serve the whole image.
if (has("sgdisk")) execFileSync("sgdisk", ["-n", "1:1M:0", base], { stdio: "ignore" });
const servers = QCOW2 === "only" ? [] : [
  { name: "nbdstack", port: 10820, cmd: (img) => [...nodeCommandOf(CLI), "serve", img, "--name", "", "--listen", "127.0.0.1:10820", "--log-level", "warn", ...(process.env.NBDSTACK_ARGS ?? "").split(" ").filter(Boolean)] },
  // serve --threads 2: a worker process beside the primary (src/server/THREADS.md). THREADS=0 leaves it out.
  ...(process.env.THREADS === "0" ? [] : [{ name: "nbdstack-t2", port: 10829, cmd: (img) => [...nodeCommandOf(CLI), "serve", img, "--name", "", "--listen", "127.0.0.1:10829", "--log-level", "warn", "--threads", "2", ...(process.env.NBDSTACK_ARGS ?? "").split(" ").filter(Boolean)] }]),
  ...(has("sgdisk")
    ? [
        {
          name: "nbdstack-stack",
          port: 10825,
          cmd: (img) => {
            const cfg = path.join(dir, "stack.yaml");
            fs.writeFileSync(cfg, `node-id: bench\ncontrol: 127.0.0.1:0\nexports:\n  - name: ""\n    stack: file:${img} → partition:1 → fault\n`);
            return [...nodeCommandOf(CLI), "serve", "--config", cfg, "--listen", "127.0.0.1:10825", "--log-level", "warn", ...(process.env.NBDSTACK_ARGS ?? "").split(" ").filter(Boolean)];
          },
        },
      ]
    : []),
  ...(has("nbdkit") ? [{ name: "nbdkit-file", port: 10821, cmd: (img) => ["nbdkit", "-f", "-i", "127.0.0.1", "-p", "10821", "file", img] }] : []),
  ...(has("nbdkit") ? [{ name: "nbdkit-memory", port: 10824, cmd: () => ["nbdkit", "-f", "-i", "127.0.0.1", "-p", "10824", "memory", "1G"] }] : []),
  ...(has("nbd-server")
    ? [
        {
          name: "nbd-server",
          port: 10823,
          exportName: "disk",
          daemon: path.join(dir, "nbd-server.pid"),
          cmd: (img) => {
            const conf = path.join(dir, "nbd-server.conf");
            const root = process.getuid?.() === 0 ? "    user = root\n    group = root\n" : "";
            fs.writeFileSync(conf, `[generic]\n${root}    listenaddr = 127.0.0.1\n    port = 10823\n    allowlist = true\n[disk]\n    exportname = ${img}\n`);
            return ["nbd-server", "-C", conf, "-p", path.join(dir, "nbd-server.pid")];
          },
        },
      ]
    : []),
  ...(has("qemu-nbd") ? [{ name: "qemu-nbd", port: 10822, cmd: (img) => ["qemu-nbd", "-f", "raw", "-b", "127.0.0.1", "-p", "10822", "-x", "", "--persistent", "--shared=8", "--cache=writeback", "--aio=threads", img] }] : []),
];
const procs = [];
/** Stops a server started here and resolves once it exited (signalled once: nbdstack exits at once on a second signal). */
const stop = (child) => new Promise((r) => (child.exitCode !== null || child.signalCode !== null ? r() : (child.once("exit", r), child.kill("SIGTERM"))));
for (const s of servers) {
  // Every server serves the same file (they take turns, so none sees another's I/O): the page
  // cache then holds one copy. With a copy each, six 1 GiB images did not fit the page cache this
  // machine grants (about 4 GiB) and reads went to the disk, which swamped every other difference.
  const [cmd, ...args] = s.cmd(base);
  const child = spawn(cmd, args, { stdio: ["ignore", "ignore", "inherit"] });
  procs.push(child);
  s.child = child;
  s.pid = s.daemon ? undefined : child.pid;
  s.uri = `nbd://127.0.0.1:${s.port}/${s.exportName ?? ""}`;
}
const cleanup = () => {
  for (const p of procs) if (p.exitCode === null && p.signalCode === null) p.kill("SIGTERM");
  for (const s of servers) {
    if (!s.daemon) continue;
    try {
      process.kill(Number(fs.readFileSync(s.daemon, "utf8")), "SIGTERM");
    } catch {
      // not started, or gone already
    }
  }
  if (!process.env.KEEP) fs.rmSync(dir, { recursive: true, force: true });
};
process.on("SIGINT", () => (cleanup(), process.exit(130)));
// A run that fails half-way stops its servers too: left running, they held the ports and the next
// run measured them in place of its own (their CPU read as 0).
process.on("exit", (code) => code !== 0 && cleanup());
process.on("SIGTERM", () => process.exit(143));
for (const s of servers) {
  for (let i = 0; ; i++) {
    try {
      // Exited (its port taken, say): whatever answers on that port is not this run's server.
      if (!s.daemon && s.child.exitCode !== null) break;
      execFileSync("nbdinfo", ["--size", s.uri], { stdio: "ignore", timeout: 5000 });
      break;
    } catch {
      if (i > 100) throw new Error(`${s.name} did not start`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  if (!s.daemon && s.child.exitCode !== null) throw new Error(`${s.name} exited at start (code ${s.child.exitCode}): is its port ${s.port} taken?`);
}

for (const s of servers) if (s.daemon) s.pid = Number(fs.readFileSync(s.daemon, "utf8"));
/** Peak resident set size of `pid`, MiB (with its live children's peaks added: worker loops). */
const peakRss = (pid) =>
  Number(/VmHWM:\s+(\d+)/.exec(fs.readFileSync(`/proc/${pid}/status`, "utf8"))?.[1] ?? NaN) / 1024 + childrenOf(pid).reduce((t, c) => t + (fs.existsSync(`/proc/${c}/status`) ? peakRss(c) : 0), 0);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// The memory plugin starts empty: fill it with the same image, or its reads would all be holes.
for (const s of servers) if (s.name === "nbdkit-memory") execFileSync("nbdcopy", [base, s.uri]);

// Warm-up: a short mixed run against every server (JIT compilation, page cache, buffer pools), unmeasured.
for (const s of servers)
  execFileSync(process.execPath, [CLI, "bench", s.uri, "--engine", "fio", "--rw", "randrw", "--bs", "64k", "--qd", "16", "--duration", "2s"], { stdio: "ignore" });

const results = {}; // workload -> server -> [{metric, p50, p99}]
// One unmeasured copy per server first: the repetitions measure servers that run, not ones that
// start (a fresh nbdstack's first copy costs it 1.3–1.6 × the CPU of the next ones, nearly all of
// it user time — first-use work such as compiling its read path; the fio rows run long enough for
// that not to count).
if (workloads.some((w) => ALL[w].nbdcopy)) for (const s of servers) execFileSync("nbdcopy", [s.uri, "null:"], { stdio: ["ignore", "ignore", "inherit"] });
for (let rep = 1; rep <= REPS; rep++) {
  for (const w of workloads) {
    const wl = ALL[w];
    // The servers take turns in a different order each repetition, so none always goes first.
    const turn = servers.map((_, i) => servers[(i + rep - 1) % servers.length]);
    for (const s of turn) {
      const json = path.join(dir, "run.json");
      execFileSync("sync");
      const size = Number(execFileSync("nbdinfo", ["--size", s.uri], { encoding: "utf8" }));
      const cpu0 = cpuSeconds(s.pid);
      if (wl.nbdcopy) {
        const [busy0, client0] = [machineBusySeconds(), reapedChildrenSeconds()];
        const t0 = performance.now();
        execFileSync("nbdcopy", [s.uri, "null:"], { stdio: ["ignore", "ignore", "inherit"] });
        const mibPerSec = size / (1 << 20) / ((performance.now() - t0) / 1000);
        // The machine's busy time less nbdcopy's own: a cross-check of the /proc figure that does not
        // depend on how a server's processes and threads are accounted (it counts the loopback's
        // softirq work too, and whatever else ran meanwhile).
        const busy = machineBusySeconds() - busy0 - (reapedChildrenSeconds() - client0);
        await sleep(200); // let a forking server reap its connection's child
        const mib = size / (1 << 20);
        const cpuPerMiB = ((cpuSeconds(s.pid) - cpu0) * 1e6) / mib;
        const machinePerMiB = (busy * 1e6) / mib;
        ((results[w] ??= {})[s.name] ??= []).push({ v: mibPerSec, p50: 0, p99: 0, cpu: cpuPerMiB, machine: machinePerMiB });
        console.error(`rep ${rep} ${w.padEnd(20)} ${s.name.padEnd(14)} ${mibPerSec.toFixed(0)} MiB/s  server CPU ${cpuPerMiB.toFixed(0)} µs/MiB  machine less client ${machinePerMiB.toFixed(0)} µs/MiB`);
        continue;
      }
      execFileSync(process.execPath, [CLI, "bench", s.uri, "--engine", "fio", "--rw", wl.rw, "--bs", wl.bs, "--qd", String(wl.qd), "--conns", String(wl.conns ?? 1), "--duration", `${RUNTIME}s`, "--json", json], { stdio: ["ignore", "ignore", "inherit"] });
      await sleep(200);
      const sum = JSON.parse(fs.readFileSync(json, "utf8")).summary;
      const cpuPerIo = ((cpuSeconds(s.pid) - cpu0) * 1e6) / sum.ops;
      ((results[w] ??= {})[s.name] ??= []).push({ v: sum[wl.metric], p50: sum.latencyUs.p50, p99: sum.latencyUs.p99, cpu: cpuPerIo });
      console.error(`rep ${rep} ${w.padEnd(20)} ${s.name.padEnd(12)} ${wl.metric === "iops" ? `${sum.iops} IOPS` : `${sum.mibPerSec} MiB/s`}  p50 ${sum.latencyUs.p50.toFixed(0)} µs  p99 ${sum.latencyUs.p99.toFixed(0)} µs  server CPU ${cpuPerIo.toFixed(1)} µs/request`);
    }
  }
}
const rss = Object.fromEntries(servers.map((s) => [s.name, peakRss(s.pid)]));
// The raw servers are done (the qcow2 runs have the machine): each stopped and waited for, so that
// the cluster node has released its lease beside the image before cleanup removes the directory.
await Promise.all(procs.map(stop));

// ---- qcow2 rows: nbdstack and qemu-nbd on one qcow2 image, each started for its run alone ----
const qresults = {}; // workload -> server -> [{v, p50, p99, cpu}]
if (qworkloads.length) {
  const filled = path.join(dir, "filled.qcow2");
  execFileSync("qemu-img", ["convert", "-O", "qcow2", "-f", "raw", base, filled]);
  const overlay = path.join(dir, "overlay.qcow2");
  const qservers = [
    { name: "nbdstack", port: 10826, cmd: (img) => [...nodeCommandOf(CLI), "serve", img, "--name", "", "--listen", "127.0.0.1:10826", "--log-level", "warn", ...(process.env.NBDSTACK_ARGS ?? "").split(" ").filter(Boolean)] },
    ...(has("qemu-nbd") ? [{ name: "qemu-nbd", port: 10827, cmd: (img) => ["qemu-nbd", "-f", "qcow2", "-b", "127.0.0.1", "-p", "10827", "-x", "", "--persistent", "--shared=8", "--cache=writeback", "--aio=threads", "--discard=unmap", img] }] : []),
  ];
  const startQ = async (s, img) => {
    const [cmd, ...args] = s.cmd(img);
    const child = spawn(cmd, args, { stdio: ["ignore", "ignore", "inherit"] });
    const uri = `nbd://127.0.0.1:${s.port}/`;
    for (let i = 0; ; i++) {
      try {
        execFileSync("nbdinfo", ["--size", uri], { stdio: "ignore" });
        break;
      } catch {
        if (i > 100) throw new Error(`${s.name} did not start on ${img}`);
        await sleep(100);
      }
    }
    return { child, uri };
  };
  // Warm-up of each server on the filled image (JIT, page cache), unmeasured.
  for (const s of qservers) {
    const { child, uri } = await startQ(s, filled);
    execFileSync(process.execPath, [CLI, "bench", uri, "--engine", "fio", "--rw", "randrw", "--bs", "64k", "--qd", "16", "--duration", "2s"], { stdio: "ignore" });
    await stop(child);
  }
  for (let rep = 1; rep <= REPS; rep++) {
    for (const w of qworkloads) {
      const wl = QALL[w];
      const turn = qservers.map((_, i) => qservers[(i + rep - 1) % qservers.length]);
      for (const s of turn) {
        let img = filled;
        if (wl.overlay) {
          fs.rmSync(overlay, { force: true });
          execFileSync("qemu-img", ["create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", overlay, "1G"]);
          img = overlay;
        }
        execFileSync("sync");
        const { child, uri } = await startQ(s, img);
        const json = path.join(dir, "run.json");
        const cpu0 = cpuSeconds(child.pid);
        execFileSync(process.execPath, [CLI, "bench", uri, "--engine", "fio", "--rw", wl.rw, "--bs", wl.bs, "--qd", String(wl.qd), "--duration", `${RUNTIME}s`, "--json", json], { stdio: ["ignore", "ignore", "inherit"] });
        await sleep(200);
        const sum = JSON.parse(fs.readFileSync(json, "utf8")).summary;
        const cpuPerIo = ((cpuSeconds(child.pid) - cpu0) * 1e6) / sum.ops;
        await stop(child);
        ((qresults[w] ??= {})[s.name] ??= []).push({ v: sum[wl.metric], p50: sum.latencyUs.p50, p99: sum.latencyUs.p99, cpu: cpuPerIo });
        console.error(`rep ${rep} ${w.padEnd(30)} ${s.name.padEnd(10)} ${wl.metric === "iops" ? `${sum.iops} IOPS` : `${sum.mibPerSec} MiB/s`}  p50 ${sum.latencyUs.p50.toFixed(0)} µs  p99 ${sum.latencyUs.p99.toFixed(0)} µs  server CPU ${cpuPerIo.toFixed(1)} µs/request`);
      }
    }
  }
  // The images the runs wrote are still sound qcow2 images.
  for (const img of [filled, ...(fs.existsSync(overlay) ? [overlay] : [])]) {
    const r = spawnSync("qemu-img", ["check", img], { encoding: "utf8" });
    console.error(`qemu-img check ${path.basename(img)}: ${r.status === 0 ? "no errors" : `exit ${r.status}: ${r.stdout}${r.stderr}`}`);
  }
}
cleanup();

const med = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor((s.length - 1) / 2)];
};
if (qworkloads.length) {
  console.log(`\nbench:peers, qcow2 rows — nbdstack and qemu-nbd (-f qcow2 --cache=writeback --aio=threads) on one qcow2 image (64 KiB clusters), medians of ${REPS} runs of ${RUNTIME} s`);
  console.log(["workload".padEnd(30), "metric".padEnd(10), "nbdstack".padStart(10), "qemu-nbd".padStart(10), "nbdstack÷qemu-nbd".padStart(18)].join(" "));
  for (const w of qworkloads) {
    const by = qresults[w];
    const iops = QALL[w].metric === "iops";
    for (const [label, get, lower] of [[iops ? "IOPS" : "MiB/s", (r) => r.v, false], ["p50 µs", (r) => r.p50, true], ["p99 µs", (r) => r.p99, true], ["CPU µs/req", (r) => r.cpu, true]]) {
      const m = (n) => (by[n] ? med(by[n].map(get)) : NaN);
      const [a, q] = [m("nbdstack"), m("qemu-nbd")];
      const digits = label === "CPU µs/req" ? 1 : 0;
      console.log([w.padEnd(30), label.padEnd(10), a.toFixed(digits).padStart(10), q.toFixed(digits).padStart(10), (lower ? q / a : a / q).toFixed(2).padStart(18)].join(" "));
    }
  }
  console.log("ratio > 1.00: nbdstack better (latency and CPU rows: qemu-nbd ÷ nbdstack).");
}
if (QCOW2 === "only") process.exit(0);
const peers = servers.filter((s) => !s.name.startsWith("nbdstack")).map((s) => s.name);
const real = peers.filter((p) => p !== "nbdkit-memory"); // the ceiling is not a peer to beat
console.log(`\nbench:peers — fio nbd engine through 'nbdstack bench --engine fio', medians of ${REPS} runs of ${RUNTIME} s`);
console.log(`ratios: nbdstack (and its full stack) ÷ the best of ${real.join(", ")} on each row (> 1.00: nbdstack better; latency rows: best ÷ nbdstack); nbdkit-memory is the ceiling, not a peer`);
const mine = servers.filter((s) => s.name.startsWith("nbdstack")).map((s) => s.name);
console.log(["workload".padEnd(20), "metric".padEnd(14), ...servers.map((s) => s.name.padStart(14)), ...mine.map((n) => `${n}÷best`.padStart(20))].join(" "));
for (const w of workloads) {
  const byServer = results[w];
  const rows = [[ALL[w].metric === "iops" ? "IOPS" : "MiB/s", (r) => r.v, false]];
  if (!ALL[w].nbdcopy)
    rows.push(
      ["p50 µs", (r) => r.p50, true],
      ["p99 µs", (r) => r.p99, true],
    );
  rows.push([ALL[w].nbdcopy ? "CPU µs/MiB" : "CPU µs/req", (r) => r.cpu, true]);
  if (ALL[w].nbdcopy) rows.push(["machine µs/MiB", (r) => r.machine, true]);
  for (const [label, get, lower] of rows) {
    const m = Object.fromEntries(servers.map((s) => [s.name, med(byServer[s.name].map(get))]));
    const best = lower ? Math.min(...real.map((p) => m[p])) : Math.max(...real.map((p) => m[p]));
    const ratios = mine.map((n) => (lower ? best / m[n] : m[n] / best));
    const digits = label === "CPU µs/req" ? 1 : 0;
    console.log([w.padEnd(20), label.padEnd(14), ...servers.map((s) => m[s.name].toFixed(digits).padStart(14)), ...ratios.map((r) => r.toFixed(2).padStart(20))].join(" "));
  }
}
console.log(["peak RSS MiB".padEnd(35), ...servers.map((s) => rss[s.name].toFixed(0).padStart(14))].join(" "));
console.log("CPU rows: server CPU time per request (per MiB for nbdcopy), lower is better; ratio = best peer ÷ nbdstack.");
if (workloads.some((w) => ALL[w].nbdcopy)) console.log("machine µs/MiB: every CPU's busy time during the copy less nbdcopy's own, per MiB (a cross-check of the server's /proc figure, whatever its processes and threads).");
