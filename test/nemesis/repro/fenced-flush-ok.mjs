#!/usr/bin/env node
// Reproduction of the eighth finding (seed 101, 2 nodes, the CI settings, on main 438bb7a;
// README.md "Findings"): an owner frozen past its lease with writes it acknowledged through its
// own port A (in its power-loss cache, never flushed) drops them when it finds itself fenced, and
// its client's next FLUSH, forwarded to the new owner, succeeds: a FLUSH vouches for lost writes.
// Exits 1 when a FLUSH succeeds and the write is gone.
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { NbdClient } from "../../../dist/client/nbd-client.js";
import { controlCall } from "../../../dist/control/control-client.js";
import { Node, freePort } from "../cluster.mjs";

process.once("SIGTERM", () => process.exit(143)); // the nodes are killed on exit
const dir = fs.mkdtempSync(path.join(os.tmpdir(), "nbdstack-repro-"));
const img = path.join(dir, "disk.img");
fs.writeFileSync(img, "");
fs.truncateSync(img, 16 * 1024 * 1024);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const state = async (n) => (await controlCall(n.control, "GET", "v1/status", undefined, 1000)).exports[0];
const until = async (what, f) => {
  for (let i = 0; i < 300; i++, await sleep(50)) if (await f().catch(() => false)) return;
  throw new Error(`timed out waiting for ${what}`);
};
const mkNode = async (id) => {
  const nbdPort = await freePort();
  const controlPort = await freePort();
  return new Node({ id, dir, nbdPort, controlPort, args: [img, "--name", "disk", "--node-id", id, "--lease-ttl", "1s", "--listen", `127.0.0.1:${nbdPort}`, "--control", `127.0.0.1:${controlPort}`, "--fault-powerloss", "--log-format", "json"] });
};
const a = await mkNode("a");
const b = await mkNode("b");
let bug = false;
try {
  await a.start(); // a owns the image
  await b.start();
  const c = await NbdClient.connect(a.addr, { exportName: "disk" });
  await c.pwrite(Buffer.alloc(4096, 0x56), 0); // acknowledged by a's port A, in its power-loss cache
  a.pause(); // past the lease: b takes the image over
  await until("b to take the image over", async () => (await state(b)).state === "LOCAL");
  a.resume();
  const flush = await c.flush().then(() => "ok", (e) => `${e.errno} ${e.message}`);
  console.log(`FLUSH after a continued: ${flush}`);
  const got = (await c.pread(4096, 0))[0];
  console.log(`block 0: 0x${got.toString(16)} (the write was 0x56)`);
  bug = flush === "ok" && got !== 0x56;
  c.destroy();
} finally {
  await a.kill();
  await b.kill();
  fs.rmSync(dir, { recursive: true, force: true });
}
console.log(bug ? "BUG: a FLUSH succeeded over writes the fenced owner dropped" : "not reproduced");
process.exit(bug ? 1 : 0);
