#!/usr/bin/env node
// npm run demo:vm — a QEMU guest (TCG) boots from an nbdstack export served by two nodes on shared
// storage; its disk moves between the nodes every few seconds while the guest writes, fsyncs,
// renames, deletes and rereads files. Per move it prints what the nodes did (how long the source
// held requests, from its log; how long the migrate call took) next to what the guest saw (its
// longest I/O and its longest wait between two operations during the move, and its longest I/O
// until the next move). Then the guest shuts down and the image is checked (e2fsck -fn).
// Needs: qemu-system-x86, busybox-static, e2fsprogs (and apt-get to download linux-image-cloud-amd64;
// see test/vm/README.md). Knobs (environment): MOVES (10), EVERY (3s), SIZE_MIB (96), CONSOLE=1 (show
// the guest's console).
import { spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { controlCall } from "../dist/control/control-client.js";
import { buildGuest, fsck, guestUnavailable, longestDuring, longestGapDuring, longestIn, makeGuestDisk, startGuest } from "../test/vm/guest.mjs";
import { knobsOnly } from "../bench/tools.mjs";

knobsOnly(import.meta.url, "demo:vm");

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const CLI = path.join(ROOT, "dist/cli.js");
const MOVES = Number(process.env.MOVES ?? 10);
const EVERY = Number.parseFloat(process.env.EVERY ?? "3") * 1000;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const why = guestUnavailable();
if (why) {
  console.error(`demo:vm: ${why}`);
  process.exit(1);
}
const dir = fs.mkdtempSync(path.join(os.tmpdir(), "nbdstack-demo-vm-"));
const procs = [];
const cleanup = () => {
  for (const p of procs) if (p.exitCode === null && p.signalCode === null) p.kill("SIGKILL");
  fs.rmSync(dir, { recursive: true, force: true });
};
// Stopped by a signal, or by a reader that went away (`| head`): the nodes and the guest go too.
for (const [signal, code] of [["SIGINT", 130], ["SIGTERM", 143], ["SIGHUP", 129]])
  process.on(signal, () => {
    cleanup();
    process.exit(code);
  });
process.stdout.on("error", () => {
  cleanup();
  process.exit(141);
});

function startNode(id, img) {
  const proc = spawn(process.execPath, [CLI, "serve", img, "--name", "disk", "--listen", "127.0.0.1:0", "--node-id", id, "--control", "127.0.0.1:0", "--log-format", "json"], {
    stdio: ["ignore", "pipe", "pipe"],
  });
  procs.push(proc);
  const node = { id, proc, log: [], nbd: "", control: "" };
  let err = "";
  proc.stderr.on("data", (d) => {
    err += d;
    const lines = err.split("\n");
    err = lines.pop();
    for (const l of lines) if (l.startsWith("{")) node.log.push(JSON.parse(l));
  });
  return new Promise((resolve, reject) => {
    let out = "";
    proc.stdout.on("data", (d) => {
      out += d;
      const lines = out.split("\n").filter(Boolean);
      if (lines.length >= 2) {
        node.nbd = lines.find((l) => l.startsWith("nbd://"));
        node.control = lines.find((l) => l.startsWith("control ")).slice("control ".length);
        resolve(node);
      }
    });
    proc.once("exit", (code) => reject(new Error(`node ${id} exited with ${code}`)));
  });
}

try {
  const guest = buildGuest((s) => console.log(s));
  const img = makeGuestDisk(guest, path.join(dir, "disk.img"), Number(process.env.SIZE_MIB ?? 96));
  const a = await startNode("a", img);
  const b = await startNode("b", img);
  console.log(`nodes: a ${a.nbd} (${a.control}), b ${b.nbd} (${b.control}); the guest dials a`);
  const vm = startGuest(guest, {
    port: Number(new URL(a.nbd).port),
    exportName: "disk",
    reconnectDelay: 10,
    params: { mode: "run", seconds: Math.ceil((MOVES * EVERY) / 1000) + 60 },
    timeoutMs: MOVES * EVERY + 120_000,
    onLine: process.env.CONSOLE === "1" ? (l) => console.log(`  guest| ${l.text}`) : undefined,
  });
  procs.push(vm.proc);
  const booted = await vm.waitFor(/^GUEST-BOOTED /, "boot");
  console.log(`guest booted from the export in ${((booted.t - vm.startedAt) / 1000).toFixed(1)} s (TCG, ${guest.packages.name} ${guest.packages.version})`);
  await vm.waitFor(/^GUEST-WORKLOAD-START/, "the workload");
  await sleep(Math.min(EVERY, 1500));
  const base = vm.ops();
  console.log(`guest workload running; before any move its longest I/O was ${Math.max(0, ...base.map((o) => o.ms))} ms\n`);
  console.log("move    nodes: held requests (drain/flush/assign)  migrate call | guest during the move: longest I/O, wait | until the next move: longest I/O, ops");

  const report = (m, until) => {
    const ops = vm.ops().filter((o) => o.t >= m.t0 && o.t < until);
    const g = longestIn(ops, m.t0, until);
    const d = longestDuring(ops, m.t0, m.t1);
    const w = longestGapDuring(ops, m.t0, m.t1);
    const held = m.src.log.filter((l) => l.msg === "move: now served through port B")[m.srcIndex];
    const host = held ? `${held.holdMs.toFixed(1).padStart(6)} ms (${held.drainMs}/${held.flushMs}/${held.assignMs})` : "?";
    console.log(`${String(m.i).padStart(2)} ${m.from}→${m.to}  ${host.padEnd(36)} ${`${m.ms.toFixed(0)} ms`.padStart(8)}     | ${(d ? `${d.ms} ms (${d.op}), ${w.gapMs} ms` : "none").padEnd(27)} | ${g ? `${g.ms} ms (${g.op})` : "no I/O"}, ${ops.length} ops`);
  };
  let [from, to] = [a, b];
  let prev = null;
  const movedFrom = { a: 0, b: 0 };
  for (let i = 1; i <= MOVES; i++) {
    const t0 = Date.now();
    const r = await controlCall(from.control, "POST", "v1/exports/disk/migrate", { to: to.control });
    const m = { i, from: from.id, to: to.id, src: from, srcIndex: movedFrom[from.id]++, t0, t1: Date.now(), ms: r.ms };
    if (prev) report(prev, t0);
    prev = m;
    [from, to] = [to, from];
    await sleep(Math.max(0, t0 + EVERY - Date.now()));
  }
  vm.stop();
  const exit = await vm.waitExit();
  if (prev) report(prev, Date.now());
  const s = vm.summary();
  console.log(
    `\nguest: ${s?.ops} operations, ${s?.written} files written, ${s?.deleted} deleted, ${s?.reread} rereads, ${s?.verified}/${s?.files} files verified at the end; ` +
      `I/O errors ${s?.ioerrors}, kernel complaints ${s?.kmsgs}; longest I/O ${s?.maxio} ms (${s?.maxop}), longest wait between two operations ${s?.maxgap} ms; ${vm.grep("GUEST-HALT").join(" ")}, QEMU exit ${exit.code}`,
  );
  for (const n of [a, b]) {
    n.proc.kill("SIGTERM");
    await new Promise((r) => n.proc.once("exit", r));
  }
  const f = fsck(img);
  console.log(`host: e2fsck -fn ${f.clean ? "clean" : `NOT clean:\n${f.output}`}`);
  process.exitCode = s && s.ioerrors === 0 && s.bad === 0 && f.clean && exit.code === 0 ? 0 : 1;
} catch (e) {
  console.error(e.message);
  process.exitCode = 1;
} finally {
  cleanup();
}
