#!/usr/bin/env node
// npm run bench:trim — what a TRIM costs on a file port, where Node.js has no fallocate(2) and
// holes are punched by util-linux `fallocate` child processes (src/stack/port/hole-puncher.ts).
// nbdstack and qemu-nbd (--discard=unmap, which calls fallocate(2) itself) each serve a fresh
// 256 MiB file of data; the project's NBD client sends 64 KiB trims at random 64 KiB-aligned
// offsets: at QD1 (latency: median and p99) and at QD32 (trims/s; batches coalesce them).
// Knobs: COUNT (trims per phase, 400), SIZE (trim bytes, 65536). Build first (npm run build).
import { execFileSync, spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { has, knobsOnly } from "./tools.mjs";

knobsOnly(import.meta.url);

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const CLI = path.join(ROOT, "dist/cli.js");
const { NbdClient } = await import(path.join(ROOT, "dist/client/nbd-client.js"));
const COUNT = Number(process.env.COUNT ?? 400);
const SIZE = Number(process.env.SIZE ?? 65536);
const IMAGE = 256 * 1024 * 1024;
const dir = fs.mkdtempSync(path.join(os.tmpdir(), "nbdstack-trim-"));
const servers = [
  { name: "nbdstack", port: 10830, cmd: (img) => [process.execPath, CLI, "serve", img, "--name", "", "--listen", "127.0.0.1:10830", "--log-level", "warn"] },
  ...(has("qemu-nbd") ? [{ name: "qemu-nbd", port: 10831, cmd: (img) => ["qemu-nbd", "-f", "raw", "-b", "127.0.0.1", "-p", "10831", "-x", "", "--discard=unmap", "--cache=writeback", "--aio=threads", img] }] : []),
];
const slots = IMAGE / SIZE;
const offsets = () => {
  const a = Array.from({ length: slots }, (_, i) => i * SIZE);
  for (let i = a.length - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1));
    [a[i], a[j]] = [a[j], a[i]];
  }
  return a;
};
const pct = (xs, p) => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor((p / 100) * xs.length))];
const rows = [];
try {
  for (const s of servers) {
    const img = path.join(dir, `${s.name}.img`);
    execFileSync("dd", ["if=/dev/urandom", `of=${img}`, "bs=1M", `count=${IMAGE >> 20}`, "status=none"]);
    const [cmd, ...args] = s.cmd(img);
    const child = spawn(cmd, args, { stdio: ["ignore", "ignore", "inherit"] });
    try {
      let c;
      for (let i = 0; ; i++) {
        try {
          c = await NbdClient.connect({ host: "127.0.0.1", port: s.port }, { exportName: "" });
          break;
        } catch (err) {
          if (i > 100) throw err;
          await new Promise((r) => setTimeout(r, 100));
        }
      }
      const offs = offsets();
      const usedBefore = fs.statSync(img).blocks * 512;
      // QD1: one trim at a time.
      const lat = [];
      for (let i = 0; i < COUNT; i++) {
        const t = performance.now();
        await c.trim(SIZE, offs[i]);
        lat.push(performance.now() - t);
      }
      // QD32: 32 in flight.
      let next = COUNT;
      const end = 2 * COUNT;
      const t0 = performance.now();
      await Promise.all(
        Array.from({ length: 32 }, async () => {
          while (next < end) await c.trim(SIZE, offs[next++]);
        }),
      );
      const qd32 = COUNT / ((performance.now() - t0) / 1000);
      await c.flush();
      const freed = usedBefore - fs.statSync(img).blocks * 512;
      await c.disconnect();
      rows.push({ server: s.name, "qd1 trims/s": Math.round(1000 / (lat.reduce((a, b) => a + b, 0) / lat.length)), "qd1 p50 ms": pct(lat, 50).toFixed(2), "qd1 p99 ms": pct(lat, 99).toFixed(2), "qd32 trims/s": Math.round(qd32), "freed MiB": (freed / 2 ** 20).toFixed(1), "expected MiB": ((2 * COUNT * SIZE) / 2 ** 20).toFixed(1) });
    } finally {
      child.kill("SIGTERM");
      await new Promise((r) => child.once("exit", r));
      fs.rmSync(img, { force: true });
    }
  }
} finally {
  fs.rmSync(dir, { recursive: true, force: true });
}
console.log(`${COUNT} trims of ${SIZE} bytes per phase, ${os.cpus().length} CPUs, load ${os.loadavg()[0].toFixed(2)}`);
console.table(rows);
