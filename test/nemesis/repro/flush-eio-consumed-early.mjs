#!/usr/bin/env node
// Reproduction of the third finding (seed 41, 2 nodes, kills only; README.md "Findings"): the
// once-only EIO that tells a client its unflushed writes died with the owner goes to a FLUSH that
// was already in flight before such a write was acknowledged; the client's next FLUSH, which does
// cover the lost write, then succeeds. Exits 1 when a FLUSH succeeds over a lost write.
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
const a = await mkNode("a");
const b = await mkNode("b");
let bug = false;
try {
  await a.start(); // a owns the image
  await b.start();
  const c = await NbdClient.connect(b.addr, { exportName: "disk" }); // through b's port B to a
  await controlCall(a.control, "POST", "v1/exports/disk/faults", { add: "op=flush,stall" }); // a's flushes hang
  const f1 = c.flush().then(() => "ok", (e) => `${e.errno}`); // sent before the write below
  await sleep(100);
  await c.pwrite(Buffer.alloc(4096, 0x56), 0); // acknowledged by a, in its power-loss cache only
  await a.kill(); // the write is gone; b takes the image over once a's lease expires
  console.log(`FLUSH sent before the write: ${await f1}`);
  const f2 = await c.flush().then(() => "ok", (e) => `${e.errno}`);
  console.log(`FLUSH sent after the write was acknowledged: ${f2}`);
  const got = (await c.pread(4096, 0))[0];
  console.log(`block 0 now: 0x${got.toString(16)} (the write was 0x56)`);
  bug = f2 === "ok" && got !== 0x56;
  c.destroy();
} finally {
  await a.kill();
  await b.kill();
  fs.rmSync(dir, { recursive: true, force: true });
}
console.log(bug ? "BUG: a FLUSH succeeded over a write that was lost with its owner" : "not reproduced");
process.exit(bug ? 1 : 0);
