#!/usr/bin/env node
// serve --threads: server CPU per request and throughput at 1 and 2 event loops, with the client
// and the server free to use both CPUs, or pinned by taskset (client on CPU 0, server on CPU 1;
// client on CPU 0 and server free). fio's nbd engine, 4 KiB random reads at QD32 over CONNS (4)
// connections, on a RANDOM image held in the page cache; RUNTIME (5) s a run, REPS (2) rounds
// whose order rotates. Server CPU: user + system time from /proc of the primary and of its worker
// processes (live ones: /proc/PID/stat of a child counts only its own time), over the run ÷ requests.
//
//   npm run build && flock /work/bench.lock node bench/threads.mjs
//   THREADS="1 2 4" PLACES="free" RW=randwrite node bench/threads.mjs
//   RATE=10000 PLACES="free pinned" node bench/threads.mjs      # a fixed offered load
import { execFileSync, spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { cpuSeconds } from "./tools.mjs";

const ROOT = fileURLToPath(new URL("..", import.meta.url));
const CLI = path.join(ROOT, "dist/cli.js");
const REPS = Number(process.env.REPS ?? 2);
const RUNTIME = Number(process.env.RUNTIME ?? 5);
const CONNS = Number(process.env.CONNS ?? 4);
const QD = Number(process.env.QD ?? 32);
const BS = process.env.BS ?? "4k";
const RW = process.env.RW ?? "randread";
const SIZE_MIB = Number(process.env.SIZE_MIB ?? 256);
// Requests per second per connection (fio --rate_iops), 0: as fast as it goes. A fixed offered load
// compares the loops' CPU per request at equal work, without the CPUs being saturated.
const RATE = Number(process.env.RATE ?? 0);
const THREADS = (process.env.THREADS ?? "1 2").split(/\s+/).filter(Boolean).map(Number);
// free: no taskset; pinned: client on CPU 0, server on CPU 1; client0: client on CPU 0, server free.
const PLACES = (process.env.PLACES ?? "free pinned client0").split(/\s+/).filter(Boolean);
const PORT = 10860;

const dir = fs.mkdtempSync(path.join(os.tmpdir(), "nbdstack-threads-"));
const img = path.join(dir, "bench.img");
execFileSync("dd", ["if=/dev/urandom", `of=${img}`, "bs=1M", `count=${SIZE_MIB}`, "status=none"]);
execFileSync("cat", [img], { stdio: ["ignore", "ignore", "ignore"], maxBuffer: 1 << 30 });
process.on("exit", () => fs.rmSync(dir, { recursive: true, force: true }));


async function startServer(threads, place) {
  const cmd = [process.execPath, CLI, "serve", img, "--name", "", "--listen", `127.0.0.1:${PORT}`, "--log-level", "warn", "--threads", String(threads)];
  const argv = place === "pinned" ? ["taskset", "-c", "1", ...cmd] : cmd;
  const child = spawn(argv[0], argv.slice(1), { stdio: ["ignore", "pipe", "inherit"] });
  await new Promise((resolve, reject) => {
    let out = "";
    child.stdout.on("data", (d) => {
      out += d;
      if (out.includes("\n")) resolve();
    });
    child.once("exit", (c) => reject(new Error(`server exited with ${c}`)));
  });
  return child;
}

function fio(place, runtime) {
  const args = ["--name=t", "--ioengine=nbd", `--uri=nbd://127.0.0.1:${PORT}/`, `--rw=${RW}`, `--bs=${BS}`, `--iodepth=${QD}`, `--numjobs=${CONNS}`, "--group_reporting", `--runtime=${runtime}`, "--time_based", "--output-format=json", ...(RATE ? [`--rate_iops=${RATE}`] : [])];
  const argv = place === "free" ? ["fio", ...args] : ["taskset", "-c", "0", "fio", ...args];
  const out = execFileSync(argv[0], argv.slice(1), { encoding: "utf8" });
  const j = JSON.parse(out.slice(out.indexOf("{"))).jobs[0];
  return { ios: j.read.total_ios + j.write.total_ios, iops: j.read.iops + j.write.iops };
}

const results = {};
const configs = THREADS.flatMap((t) => PLACES.map((p) => ({ t, p })));
for (let rep = 0; rep < REPS; rep++) {
  for (let k = 0; k < configs.length; k++) {
    const { t, p } = configs[(k + rep) % configs.length];
    const srv = await startServer(t, p);
    try {
      fio(p, 1); // warm up
      const c0 = cpuSeconds(srv.pid);
      const r = fio(p, RUNTIME);
      const cpu = cpuSeconds(srv.pid) - c0;
      const perIo = (cpu * 1e6) / r.ios;
      (results[`${t} ${p}`] ??= []).push({ iops: r.iops, perIo, cores: cpu / RUNTIME });
      console.error(`rep ${rep} threads ${t} ${p.padEnd(8)} ${r.iops.toFixed(0)} IOPS  server CPU ${perIo.toFixed(1)} µs/request (${(cpu / RUNTIME).toFixed(2)} cores)`);
    } finally {
      srv.kill("SIGTERM");
      await new Promise((r) => srv.once("exit", r));
    }
  }
}
const median = (v) => [...v].sort((a, b) => a - b)[Math.floor(v.length / 2)];
console.log(`\n${RW} ${BS} QD${QD} × ${CONNS} connections${RATE ? ` at ${RATE} IOPS each` : ""}, ${REPS} × ${RUNTIME} s, medians (free: no taskset; pinned: client CPU 0, server CPU 1; client0: client CPU 0, server free)`);
console.log("| threads | placement | IOPS | server CPU µs/request | server cores busy |");
console.log("|---|---|---|---|---|");
for (const [k, v] of Object.entries(results)) {
  const [t, p] = k.split(" ");
  console.log(`| ${t} | ${p} | ${median(v.map((x) => x.iops)).toFixed(0)} | ${median(v.map((x) => x.perIo)).toFixed(1)} | ${median(v.map((x) => x.cores)).toFixed(2)} |`);
}
