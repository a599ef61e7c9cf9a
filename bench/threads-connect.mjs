#!/usr/bin/env node
// What handing a connection to another event loop costs (serve --threads): N (300) sequential
// connections, each its handshake and one 4 KiB read, against --threads 1 and 2 taking turns
// (at 2, the least busy loop takes each connection: half of them are handed over).
//
//   npm run build && flock /work/bench.lock node bench/threads-connect.mjs
import { spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { NbdClient } from "../dist/client/nbd-client.js";

const CLI = fileURLToPath(new URL("../dist/cli.js", import.meta.url));
const N = Number(process.env.N ?? 300);
const PORT = 10866;
const dir = fs.mkdtempSync(path.join(os.tmpdir(), "nbdstack-connect-"));
const img = path.join(dir, "a.img");
fs.writeFileSync(img, "");
fs.truncateSync(img, 16 << 20);
try {
  for (const threads of [1, 2, 1, 2]) {
    const srv = spawn(process.execPath, [CLI, "serve", img, "--name", "", "--listen", `127.0.0.1:${PORT}`, "--log-level", "warn", "--threads", String(threads)], { stdio: ["ignore", "pipe", "inherit"] });
    await new Promise((r) => srv.stdout.once("data", r));
    const times = [];
    for (let i = 0; i < N; i++) {
      const t0 = performance.now();
      const c = await NbdClient.connect({ host: "127.0.0.1", port: PORT }, { exportName: "" });
      await c.pread(4096, 0);
      times.push(performance.now() - t0);
      await c.disconnect();
    }
    times.sort((a, b) => a - b);
    console.log(`--threads ${threads}: connect + handshake + first 4 KiB read p50 ${times[N >> 1].toFixed(3)} ms, p90 ${times[Math.floor(N * 0.9)].toFixed(3)} ms`);
    srv.kill("SIGTERM");
    await new Promise((r) => srv.once("exit", r));
  }
} finally {
  fs.rmSync(dir, { recursive: true, force: true });
}
