#!/usr/bin/env node
// npm run bench:migrate — 4 KiB random writes at QD32 through node a while the export moves
// between two nodes sharing one image, every MIGRATE_EVERY ms. Prints IOPS before / during / after,
// latency percentiles, and per hand-over: its duration and the longest stall (longest time with no
// completion) next to the longest gap seen without any move. Every write is read back at the end.
// Knobs: DURATION (30000 ms), MIGRATE_EVERY (5000 ms), QD (32), SIZE_MIB (256), NBDSTACK_ARGS.
import { spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const { NbdClient } = await import(path.join(ROOT, "dist/client/nbd-client.js"));
const { controlCall } = await import(path.join(ROOT, "dist/control/control-client.js"));

const DURATION = Number(process.env.DURATION ?? 30_000);
const EVERY = Number(process.env.MIGRATE_EVERY ?? 5_000);
const QD = Number(process.env.QD ?? 32);
const SIZE = Number(process.env.SIZE_MIB ?? 256) * 1024 * 1024;
const BS = 4096;

const dir = fs.mkdtempSync(path.join(os.tmpdir(), "nbdstack-bench-migrate-"));
const img = path.join(dir, "disk.img");
fs.writeFileSync(img, Buffer.alloc(0));
fs.truncateSync(img, SIZE);

function startNode(id) {
  const args = [path.join(ROOT, "dist/cli.js"), "serve", img, "--name", "disk", "--listen", "127.0.0.1:0", "--node-id", id, "--control", "127.0.0.1:0", "--log-level", "warn", ...(process.env.NBDSTACK_ARGS ?? "").split(" ").filter(Boolean)];
  const proc = spawn(process.execPath, args, { stdio: ["ignore", "pipe", "inherit"] });
  return new Promise((resolve, reject) => {
    let out = "";
    proc.stdout.on("data", (d) => {
      out += d;
      const lines = out.split("\n").filter(Boolean);
      if (lines.length >= 2) resolve({ proc, uri: new URL(lines[0]), control: lines[1].slice(8) });
    });
    proc.once("exit", (c) => reject(new Error(`node ${id} exited with ${c}`)));
  });
}

const a = await startNode("a");
const b = await startNode("b");
const client = await NbdClient.connect({ host: a.uri.hostname, port: Number(a.uri.port) }, { exportName: "disk" });

// Load: QD workers, each writing a self-describing block (offset + sequence) to random blocks.
const blocks = SIZE / BS;
const lastSeq = new Int32Array(blocks).fill(-1);
// No two writes to one block are ever in flight together: NBD leaves the order of concurrent
// overlapping writes open, so only then does "the last acknowledged write" have one value.
const busy = new Uint8Array(blocks);
const completions = []; // ms timestamps
const latencies = [];
let errors = 0;
let seq = 0;
let rnd = 12345;
const rand = () => ((rnd = (rnd * 1103515245 + 12345) >>> 0) % blocks);
const t0 = performance.now();
let running = true;
async function worker() {
  while (running) {
    let blk = rand();
    while (busy[blk]) blk = rand();
    busy[blk] = 1;
    const s = seq++;
    const buf = Buffer.alloc(BS);
    buf.writeUInt32LE(blk, 0);
    buf.writeUInt32LE(s, 4);
    buf.fill(s & 0xff, 8);
    const start = performance.now();
    try {
      await client.pwrite(buf, blk * BS);
      const end = performance.now();
      if (s > lastSeq[blk]) lastSeq[blk] = s;
      completions.push(end - t0);
      latencies.push(end - start);
    } catch (err) {
      errors++;
      console.error("write failed:", err.message);
    }
    busy[blk] = 0;
  }
}
const workers = Array.from({ length: QD }, worker);

// Moves: a -> b -> a ... every EVERY ms.
const moves = [];
let [from, to] = [a.control, b.control];
for (let at = EVERY; at < DURATION; at += EVERY) {
  await new Promise((r) => setTimeout(r, at - (performance.now() - t0)));
  const start = performance.now() - t0;
  const r = await controlCall(from, "POST", "v1/exports/disk/migrate", { to });
  moves.push({ start, end: performance.now() - t0, ms: r.ms, to: r.to });
  [from, to] = [to, from];
}
await new Promise((r) => setTimeout(r, Math.max(0, DURATION - (performance.now() - t0))));
running = false;
await Promise.all(workers);

// Verify: every block holds its last acknowledged write.
let lost = 0;
for (let blk = 0; blk < blocks; blk++) {
  if (lastSeq[blk] < 0) continue;
  const got = await client.pread(BS, blk * BS);
  if (got.readUInt32LE(0) !== blk || got.readUInt32LE(4) < lastSeq[blk]) lost++;
}
await client.disconnect();
await Promise.all([a, b].map((n) => new Promise((r) => (n.proc.once("exit", r), n.proc.kill("SIGTERM")))));
fs.rmSync(dir, { recursive: true, force: true });

// Report.
completions.sort((x, y) => x - y);
const gapIn = (s, e) => {
  let g = 0;
  let prev = s;
  for (const c of completions) {
    if (c < s) continue;
    if (c > e) break;
    g = Math.max(g, c - prev);
    prev = c;
  }
  return g;
};
const iopsIn = (s, e) => completions.filter((c) => c >= s && c < e).length / ((e - s) / 1000);
const pct = (arr, p) => {
  const s = [...arr].sort((x, y) => x - y);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))];
};
const firstMove = moves[0]?.start ?? DURATION;
const baselineGap = gapIn(500, firstMove - 100);
console.log(`\nbench:migrate — 4 KiB random writes, QD${QD}, ${DURATION / 1000} s, a move every ${EVERY / 1000} s (shared image)`);
console.log(`requests: ${completions.length} completed, ${errors} failed; lost acknowledged writes: ${lost}`);
console.log(`IOPS: before first move ${iopsIn(500, firstMove).toFixed(0)}, overall ${iopsIn(0, DURATION).toFixed(0)}`);
console.log(`latency ms: p50 ${pct(latencies, 50).toFixed(2)}  p99 ${pct(latencies, 99).toFixed(2)}  p99.9 ${pct(latencies, 99.9).toFixed(2)}  max ${pct(latencies, 100).toFixed(2)}`);
console.log(`longest gap between completions with no move (baseline): ${baselineGap.toFixed(1)} ms`);
console.log("move  to  hand-over ms  longest stall ms  IOPS next 4 s (through port B when a->b)");
moves.forEach((m, i) => {
  console.log(`${String(i + 1).padEnd(4)}  ${m.to.padEnd(2)}  ${m.ms.toFixed(1).padStart(12)}  ${gapIn(m.start - 50, m.end + 50).toFixed(1).padStart(16)}  ${iopsIn(m.end, Math.min(m.end + 4000, DURATION)).toFixed(0).padStart(8)}`);
});
process.exit(errors || lost ? 1 : 0);
