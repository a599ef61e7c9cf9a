#!/usr/bin/env node
// Reproduces the first bug the nemesis found (seed 2, 3 nodes, 60 s; README.md "Findings"):
// a node frozen past its lease keeps its power-loss cache (--fault-powerloss: writes no FLUSH
// covered) while it is fenced; when the export is later moved back to it, it adopts with that
// cache, serves those old writes to readers and writes them to the image on the next FLUSH —
// over newer, flushed data of other owners. Exits 1 when the bug shows, 0 when it does not.
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { NbdClient } from "../../../dist/client/nbd-client.js";
import { controlCall } from "../../../dist/control/control-client.js";
import { Node, freePort } from "../cluster.mjs";

const dir = fs.mkdtempSync(path.join(os.tmpdir(), "nbdstack-repro-"));
const img = path.join(dir, "disk.img");
fs.writeFileSync(img, "");
fs.truncateSync(img, 16 * 1024 * 1024);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const mkNode = async (id) => {
  const nbdPort = await freePort();
  const controlPort = await freePort();
  return new Node({ id, dir, nbdPort, controlPort, args: [img, "--name", "disk", "--node-id", id, "--lease-ttl", "1s", "--listen", `127.0.0.1:${nbdPort}`, "--control", `127.0.0.1:${controlPort}`, "--fault-powerloss", "--log-format", "json"] });
};
const state = async (n) => (await controlCall(n.control, "GET", "v1/status")).exports[0];
const until = async (what, f) => {
  for (let i = 0; i < 200; i++, await sleep(50)) if (await f().catch(() => false)) return;
  throw new Error(`timed out waiting for ${what}`);
};
const a = await mkNode("a");
const b = await mkNode("b");
let bug = false;
try {
  await a.start(); // a owns the image (epoch 1)
  await b.start();
  const ca = await NbdClient.connect(a.addr, { exportName: "disk" });
  await ca.pwrite(Buffer.alloc(4096, 0x41), 0); // "A": acknowledged by a, never flushed
  a.pause(); // SIGSTOP past the lease
  await until("b to take the image over", async () => (await state(b)).state === "LOCAL");
  const cb = await NbdClient.connect(b.addr, { exportName: "disk" });
  await cb.pwrite(Buffer.alloc(4096, 0x42), 0); // "B", then a FLUSH: durable
  await cb.flush().catch((e) => console.log(`first FLUSH on b: ${e.errno} (expected once: a died with unflushed writes)`));
  await cb.flush();
  a.resume();
  await until("a to notice it lost the lease", async () => (await state(a)).state === "REMOTE");
  console.log("a fenced:", JSON.stringify(await state(a)));
  await controlCall(b.control, "POST", "v1/exports/disk/migrate", { to: a.control }); // move it back to a
  const got = (await cb.pread(4096, 0))[0];
  console.log(`read after moving back to a: ${String.fromCharCode(got)} (expected B)`);
  await cb.flush();
  await a.kill();
  await b.kill();
  const disk = Buffer.alloc(1);
  const fd = fs.openSync(img, "r");
  fs.readSync(fd, disk, 0, 1, 0);
  fs.closeSync(fd);
  console.log(`image after a FLUSH and SIGKILL: ${String.fromCharCode(disk[0])} (expected B)`);
  bug = got !== 0x42 || disk[0] !== 0x42;
  ca.destroy();
  cb.destroy();
} finally {
  await a.kill();
  await b.kill();
  fs.rmSync(dir, { recursive: true, force: true });
}
console.log(bug ? "BUG: the fenced node's stale power-loss cache came back on adopt" : "ok");
process.exit(bug ? 1 : 0);
