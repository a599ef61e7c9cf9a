#!/usr/bin/env node
// npm run bench:migrate — two local nodes share one image; `nbdstack bench` drives 4 KiB random
// writes at QD32 through node a with --verify while the export moves between the nodes every
// MIGRATE_EVERY, and prints throughput, latency percentiles and the longest stall per hand-over.
// Knobs (environment): DURATION (30s), MIGRATE_EVERY (5s), QD (32), RW (randwrite), SIZE_MIB (256),
// ENGINE (builtin | fio: fio's nbd engine drives the load),
// NBDSTACK_ARGS (extra serve flags), OUT (directory for run.json and run.html; default: none).
import { spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { knobsOnly } from "./tools.mjs";

knobsOnly(import.meta.url);

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const CLI = path.join(ROOT, "dist/cli.js");
const dir = fs.mkdtempSync(path.join(os.tmpdir(), "nbdstack-bench-migrate-"));
const img = path.join(dir, "disk.img");
fs.writeFileSync(img, Buffer.alloc(0));
fs.truncateSync(img, Number(process.env.SIZE_MIB ?? 256) * 1024 * 1024);

function startNode(id) {
  const extra = (process.env.NBDSTACK_ARGS ?? "").split(" ").filter(Boolean);
  const proc = spawn(process.execPath, [CLI, "serve", img, "--name", "disk", "--listen", "127.0.0.1:0", "--node-id", id, "--control", "127.0.0.1:0", "--log-level", "warn", ...extra], {
    stdio: ["ignore", "pipe", "inherit"],
  });
  return new Promise((resolve, reject) => {
    let out = "";
    proc.stdout.on("data", (d) => {
      out += d;
      const lines = out.split("\n").filter(Boolean);
      if (lines.length >= 2) resolve({ proc, uri: lines[0], control: lines[1].slice(8) });
    });
    proc.once("exit", (c) => reject(new Error(`node ${id} exited with ${c}`)));
  });
}

const a = await startNode("a");
const b = await startNode("b");
const out = process.env.OUT;
if (out) fs.mkdirSync(out, { recursive: true });
const args = [
  CLI, "bench", a.uri, "--rw", process.env.RW ?? "randwrite", "--bs", "4k", "--qd", process.env.QD ?? "32",
  "--duration", process.env.DURATION ?? "30s", "--verify", "--migrate-every", process.env.MIGRATE_EVERY ?? "5s",
  "--nodes", `${a.control},${b.control}`, "--engine", process.env.ENGINE ?? "builtin",
  ...(out ? ["--json", path.join(out, "run.json"), "--report", path.join(out, "run.html")] : []),
];
const code = await new Promise((resolve) => spawn(process.execPath, args, { stdio: "inherit" }).on("exit", resolve));
await Promise.all([a, b].map((n) => new Promise((r) => (n.proc.once("exit", r), n.proc.kill("SIGTERM")))));
fs.rmSync(dir, { recursive: true, force: true });
process.exit(code ?? 1);
