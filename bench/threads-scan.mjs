#!/usr/bin/env node
// serve --threads where the server, not the client, is the bottleneck: NBD_CMD_BLOCK_STATUS over
// a sparse image, for which the file port reads and scans up to 8 MiB per request on its event
// loop (Node.js has no SEEK_DATA), while the client (an nbdsh loop, one request at a time per
// connection) does next to nothing. CONNS (4) connections for RUNTIME (5) s, at 1 and 2 loops in
// turn, REPS (2) rounds; requests per second and server CPU (primary and workers, from /proc).
//
//   npm run build && flock /work/bench.lock node bench/threads-scan.mjs
import { execFileSync, spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { cpuSeconds } from "./tools.mjs";

const CLI = fileURLToPath(new URL("../dist/cli.js", import.meta.url));
const REPS = Number(process.env.REPS ?? 2);
const RUNTIME = Number(process.env.RUNTIME ?? 5);
const CONNS = Number(process.env.CONNS ?? 4);
const THREADS = (process.env.THREADS ?? "1 2").split(/\s+/).filter(Boolean).map(Number);
const PORT = 10867;
const env = { ...process.env, PATH: `/usr/bin:/bin:${process.env.PATH ?? ""}` };

const dir = fs.mkdtempSync(path.join(os.tmpdir(), "nbdstack-scan-"));
const img = path.join(dir, "sparse.img");
fs.writeFileSync(img, "");
fs.truncateSync(img, 512 << 20);
process.on("exit", () => fs.rmSync(dir, { recursive: true, force: true }));


/** One connection asking for the allocation of 8 MiB after 8 MiB until `secs` are over; prints its count. */
const script = (secs) => `
import time
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri("nbd://127.0.0.1:${PORT}/")
size = h.get_size(); step = 8 << 20; off = 0; n = 0
end = time.monotonic() + ${secs}
while time.monotonic() < end:
    h.block_status(step, off, lambda *a: 0)
    off = (off + step) % size; n += 1
print(n)
`;

function load(secs) {
  const procs = Array.from({ length: CONNS }, () => spawn("nbdsh", ["-c", script(secs)], { env, stdio: ["ignore", "pipe", "inherit"] }));
  return Promise.all(
    procs.map(
      (p) =>
        new Promise((resolve) => {
          let out = "";
          p.stdout.on("data", (d) => (out += d));
          p.once("exit", () => resolve(Number(out.trim()) || 0));
        }),
    ),
  ).then((counts) => counts.reduce((a, b) => a + b, 0));
}

const results = {};
for (let rep = 0; rep < REPS; rep++) {
  for (let k = 0; k < THREADS.length; k++) {
    const t = THREADS[(k + rep) % THREADS.length];
    const srv = spawn(process.execPath, [CLI, "serve", img, "--name", "", "--listen", `127.0.0.1:${PORT}`, "--log-level", "warn", "--threads", String(t)], { stdio: ["ignore", "pipe", "inherit"] });
    await new Promise((r) => srv.stdout.once("data", r));
    try {
      await load(1);
      const c0 = cpuSeconds(srv.pid);
      const n = await load(RUNTIME);
      const cpu = cpuSeconds(srv.pid) - c0;
      (results[t] ??= []).push({ rps: n / RUNTIME, perReq: (cpu * 1e6) / n, cores: cpu / RUNTIME });
      console.error(`rep ${rep} threads ${t}: ${(n / RUNTIME).toFixed(0)} requests/s, server CPU ${((cpu * 1e6) / n).toFixed(0)} µs/request (${(cpu / RUNTIME).toFixed(2)} cores)`);
    } finally {
      srv.kill("SIGTERM");
      await new Promise((r) => srv.once("exit", r));
    }
  }
}
const median = (v) => [...v].sort((a, b) => a - b)[Math.floor(v.length / 2)];
console.log(`\nblock status of 8 MiB on a sparse 512 MiB image, ${CONNS} connections (nbdsh, one request at a time each), ${REPS} × ${RUNTIME} s, medians`);
console.log("| threads | requests/s | server CPU µs/request | server cores busy |");
console.log("|---|---|---|---|");
for (const [t, v] of Object.entries(results)) console.log(`| ${t} | ${median(v.map((x) => x.rps)).toFixed(0)} | ${median(v.map((x) => x.perReq)).toFixed(0)} | ${median(v.map((x) => x.cores)).toFixed(2)} |`);
