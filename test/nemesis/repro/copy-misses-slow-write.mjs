#!/usr/bin/env node
// Reproduction of the fourth finding (seed 51, --copy-node; README.md "Findings"): a write still
// in flight in the source's port A (slow: here a fault-layer delay below the dirty tracker) while a
// live copy copies its chunk is acknowledged, yet the copy carries the old data and the chunk is
// never copied again: after the hand-over the destination has lost the write. Exits 1 then.
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
const mkNode = async (id, args) => {
  const nbdPort = await freePort();
  const controlPort = await freePort();
  return new Node({ id, dir, nbdPort, controlPort, args: [...args, "--node-id", id, "--lease-ttl", "2s", "--listen", `127.0.0.1:${nbdPort}`, "--control", `127.0.0.1:${controlPort}`, "--fault", "--log-format", "json"] });
};
const a = await mkNode("a", [img, "--name", "disk"]);
const x = await mkNode("x", ["--data-dir", path.join(dir, "x-data")]);
let bug = false;
try {
  await a.start();
  await x.start();
  const c = await NbdClient.connect(a.addr, { exportName: "disk" });
  await controlCall(a.control, "POST", "v1/exports/disk/faults", { add: "op=pwrite,delay=800ms" }); // a slow disk under a's tracker
  const write = c.pwrite(Buffer.alloc(4096, 0x57), 0).then(() => "acknowledged");
  await sleep(50);
  const move = controlCall(a.control, "POST", "v1/exports/disk/migrate", { to: x.control, copy: true }, 60_000);
  console.log(`write: ${await write}`);
  console.log(`move: ${JSON.stringify(await move)}`);
  await c.flush();
  const got = (await c.pread(4096, 0))[0]; // through a's port B: x owns it now
  console.log(`block 0 through the new owner: 0x${got.toString(16)} (the write was 0x57)`);
  bug = got !== 0x57;
  c.destroy();
} finally {
  await a.kill();
  await x.kill();
  fs.rmSync(dir, { recursive: true, force: true });
}
console.log(bug ? "BUG: the live copy lost a write that was in flight while its chunk was copied" : "not reproduced");
process.exit(bug ? 1 : 0);
