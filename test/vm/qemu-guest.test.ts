import { execFile } from "node:child_process";
import crypto from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { promisify } from "node:util";
import { afterEach, beforeAll, describe, expect, it } from "vitest";
import { catCommand } from "../../src/commands/fs.js";
import { controlCall } from "../../src/control/control-client.js";
import { CLI, controlUrl, serve, tempDir, type Served } from "../helpers/serve.js";
import { needTools } from "../helpers/tools.js";
import { logLines, pollUntil } from "../helpers/wait.js";
// @ts-expect-error -- a plain ES module without types, shared with scripts run by node
import { buildGuest, fsck, longestDuring, longestGapDuring, longestIn, makeGuestDisk, needGuest, startGuest } from "./guest.mjs";

/**
 * Issue 19: a QEMU guest (TCG) whose root file system is an nbdstack export (ext4, journal) boots,
 * writes and fsyncs files while its disk moves between nodes, misbehaves, and loses power. Every
 * guest is bounded in time: a hung one is SIGKILLed and fails its test with its console log.
 */
const execFileP = promisify(execFile);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const sha256 = (b: Buffer) => crypto.createHash("sha256").update(b).digest("hex");

type Guest = ReturnType<typeof startGuest>;
let guest: ReturnType<typeof buildGuest>;
let nodes: Served[] = [];
let vms: Guest[] = [];
afterEach(async () => {
  for (const vm of vms) vm.kill();
  vms = [];
  await Promise.all(nodes.map((n) => n.stop("SIGKILL")));
  nodes = [];
});

function boot(node: Served, params: Record<string, string | number>, timeoutMs = 90_000): Guest {
  const u = new URL(node.uris[0]!);
  const vm = startGuest(guest, { port: Number(u.port), exportName: "disk", reconnectDelay: 10, params, timeoutMs });
  vms.push(vm);
  return vm;
}

/** A file inside the image, read from the host by `nbdstack cat`'s own code (in this process: one CLI start per file would take minutes). */
async function catFile(img: string, p: string): Promise<Buffer> {
  const chunks: Buffer[] = [];
  await catCommand(`${img}:${p}`, { write: (c) => (chunks.push(Buffer.from(c)), true) });
  return Buffer.concat(chunks);
}

/** The guest's manifest ("SHA  /data/NAME" lines), read with the `nbdstack cat` CLI. */
async function manifest(img: string): Promise<Map<string, string>> {
  const { stdout } = await execFileP(process.execPath, [CLI, "cat", `${img}:/data/manifest`], { encoding: "utf8" });
  return new Map(stdout.split("\n").filter(Boolean).map((l) => { const [sum, file] = l.split(/\s+/); return [file!, sum!]; }));
}

/** What a clean run looks like from inside: no I/O error, no kernel complaint, every file verified, a clean shutdown. */
function expectCleanRun(vm: Guest, exit: { code: number | null }) {
  const s = vm.summary();
  if (!s) throw vm.failure("no GUEST-SUMMARY");
  expect({ exit: exit.code, ioerrors: s.ioerrors, kmsgs: s.kmsgs, bad: s.bad, mismatches: s.mismatches, halt: vm.grep("GUEST-HALT"), complaints: vm.grep("GUEST-IOERR").concat(vm.grep("GUEST-KMSG").filter((l: string) => !/mounted filesystem|recovery complete|orphan/.test(l))) })
    .toEqual({ exit: 0, ioerrors: 0, kmsgs: 0, bad: 0, mismatches: 0, halt: ["GUEST-HALT clean"], complaints: [] });
  expect(s.verified).toBe(s.files);
  return s;
}

/** e2fsck -fn clean, and every file of the manifest read from the host matches its sum. */
async function expectImageMatches(img: string, expectedFiles: number) {
  const f = fsck(img);
  expect(f.clean, f.output).toBe(true);
  const m = await manifest(img);
  expect(m.size).toBe(expectedFiles);
  const wrong: string[] = [];
  for (const [file, sum] of m) if (sha256(await catFile(img, file)) !== sum) wrong.push(file);
  expect(wrong).toEqual([]);
  return m.size;
}

describe.skipIf(!(needGuest() && needTools("qemu-img")))("a QEMU guest on an nbdstack export", () => {
  beforeAll(() => {
    guest = buildGuest((s: string) => console.log(s));
  }, 180_000);

  it("keeps working through 10 moves between two nodes: no I/O error, clean ext4, every file intact", async () => {
    const dir = tempDir();
    const img = makeGuestDisk(guest, path.join(dir, "disk.img"));
    const a = await serve([img, "--name", "disk", "--node-id", "a", "--control", "127.0.0.1:0"], 2);
    const b = await serve([img, "--name", "disk", "--node-id", "b", "--control", "127.0.0.1:0"], 2);
    nodes.push(a, b);
    const vm = boot(a, { mode: "run", seconds: 60 });
    const booted = await vm.waitFor(/^GUEST-BOOTED /, "boot");
    await vm.waitFor(/^GUEST-WORKLOAD-START/, "the workload");

    const moves: Array<{ from: string; to: string; t0: number; t1: number; ms: number }> = [];
    let [from, to] = [a, b];
    await sleep(1000);
    for (let i = 0; i < 10; i++) {
      const t0 = Date.now();
      const r = await controlCall<{ ms: number; epoch: number }>(controlUrl(from), "POST", "v1/exports/disk/migrate", { to: controlUrl(to) });
      expect(r.epoch).toBe(i + 2);
      moves.push({ from: from === a ? "a" : "b", to: to === a ? "a" : "b", t0, t1: Date.now(), ms: r.ms });
      [from, to] = [to, from];
      await sleep(1200);
    }
    vm.stop();
    const exit = await vm.waitExit();
    const s = expectCleanRun(vm, exit);

    // What each move cost: the guest's longest operation between this move's start and the next,
    // next to how long the source node held requests (its log) and the move took (the migrate call).
    const held = [...logLines(a.stderr()), ...logLines(b.stderr())].filter((l) => l.msg === "move: now served through port B").sort((x, y) => x.time - y.time);
    expect(held).toHaveLength(10);
    const ops = vm.ops();
    const rows = moves.map((m, i) => {
      const g = longestIn(ops, m.t0, moves[i + 1]?.t0 ?? m.t1 + 1200);
      const d = longestDuring(ops, m.t0, m.t1);
      const gap = longestGapDuring(ops, m.t0, m.t1);
      return { move: `${m.from}→${m.to}`, hostHoldMs: held[i]!.holdMs, migrateMs: Math.round(m.ms), guestIoDuringMs: d?.ms ?? null, guestGapDuringMs: gap?.gapMs ?? null, guestIoUntilNextMs: g?.ms ?? null, guestOp: g?.op ?? null };
    });
    console.log(`boot: GUEST-BOOTED ${((booted.t - vm.startedAt) / 1000).toFixed(1)} s after QEMU started (${booted.text})`);
    console.table(rows);
    console.log(`guest: ${s.ops} operations, ${s.written} files written, ${s.deleted} deleted, ${s.reread} rereads, ${s.files} in the manifest; longest I/O ${s.maxio} ms (${s.maxop}), longest time between two operations ${s.maxgap} ms`);
    for (const r of rows) expect(r.guestIoUntilNextMs, "the guest did I/O after every move").not.toBeNull();

    await Promise.all([a.stop(), b.stop()]);
    const verified = await expectImageMatches(img, s.files);
    console.log(`host: e2fsck -fn clean; ${verified} files of the manifest match, read with nbdstack cat`);
  }, 150_000);

  it("keeps working while its disk is live-copied to a node with its own data directory and handed over", async () => {
    // Issue 19's test 2, its live-copy half (the qcow2 half is the next test).
    const dirA = tempDir();
    const dirB = tempDir();
    const img = makeGuestDisk(guest, path.join(dirA, "disk.img"));
    const a = await serve([img, "--name", "disk", "--node-id", "a", "--control", "127.0.0.1:0"], 2);
    const b = await serve(["--data-dir", dirB, "--node-id", "b", "--control", "127.0.0.1:0", "--listen", "127.0.0.1:0"], 1);
    nodes.push(a, b);
    const vm = boot(a, { mode: "run", seconds: 60 });
    await vm.waitFor(/^GUEST-WORKLOAD-START/, "the workload");
    await sleep(1500);
    const t0 = Date.now();
    const r = await controlCall<{ epoch: number; ms: number; copied: number; mode: string }>(controlUrl(a), "POST", "v1/exports/disk/migrate", { to: controlUrl(b), copy: true }, 60_000);
    const t1 = Date.now();
    expect(r.epoch).toBe(2);
    const before = vm.ops().length;
    await pollUntil("the guest works on through the new owner", () => vm.ops().length > before + 30, 30_000, 100);
    vm.stop();
    const exit = await vm.waitExit();
    const s = expectCleanRun(vm, exit);
    const held = logLines(a.stderr()).filter((l) => l.msg === "move: now served through port B");
    expect(held).toHaveLength(1);
    const ops = vm.ops();
    const io = longestDuring(ops, t0, t1);
    const wait = longestGapDuring(ops, t0, t1);
    console.log(
      `live copy a → b: ${(r.copied / 1048576).toFixed(1)} MiB copied in ${Math.round(r.ms)} ms (${r.mode} mode at the end), requests held ${held[0]!.holdMs} ms; ` +
        `during it the guest's longest I/O ${io?.ms} ms (${io?.op}), longest wait ${wait?.gapMs} ms; ${s.written} files written, ${s.files} verified`,
    );
    await Promise.all([a.stop(), b.stop()]);
    // b's copy is the disk now: clean, and every file of the manifest in it.
    const copy = path.join(dirB, "disk.img");
    expect(fs.existsSync(`${copy}.incomplete`)).toBe(false);
    await expectImageMatches(copy, s.files);
  }, 150_000);

  it("works on a qcow2 overlay over a raw base while it moves between two nodes: the overlay takes every write, qemu-img check and e2fsck clean", async () => {
    // Issue 19's test 2, its qcow2 half: the overlay is the nodes' shared image (moves on shared storage).
    const dir = tempDir();
    const base = makeGuestDisk(guest, path.join(dir, "base.raw"));
    const baseSum = sha256(fs.readFileSync(base));
    const overlay = path.join(dir, "disk.qcow2");
    await execFileP("qemu-img", ["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", overlay]);
    const a = await serve([overlay, "--name", "disk", "--node-id", "a", "--control", "127.0.0.1:0"], 2);
    const b = await serve([overlay, "--name", "disk", "--node-id", "b", "--control", "127.0.0.1:0"], 2);
    nodes.push(a, b);
    const vm = boot(a, { mode: "run", seconds: 60 });
    const booted = await vm.waitFor(/^GUEST-BOOTED /, "boot");
    await vm.waitFor(/^GUEST-WORKLOAD-START/, "the workload");
    let [from, to] = [a, b];
    for (let i = 0; i < 4; i++) {
      await sleep(1200);
      const r = await controlCall<{ epoch: number }>(controlUrl(from), "POST", "v1/exports/disk/migrate", { to: controlUrl(to) });
      expect(r.epoch).toBe(i + 2);
      [from, to] = [to, from];
    }
    await pollUntil("120 operations", () => vm.ops().length >= 120, 60_000, 100);
    vm.stop();
    const exit = await vm.waitExit();
    const s = expectCleanRun(vm, exit);
    await Promise.all([a.stop(), b.stop()]);
    expect(sha256(fs.readFileSync(base))).toBe(baseSum); // every write went to the overlay
    const check = await execFileP("qemu-img", ["check", "--output=json", overlay], { encoding: "utf8" });
    expect(JSON.parse(check.stdout)).toMatchObject({ "check-errors": 0 });
    expect(JSON.parse(check.stdout).leaks ?? 0).toBe(0);
    const flat = path.join(dir, "flat.img");
    await execFileP("qemu-img", ["convert", "-O", "raw", overlay, flat]);
    await expectImageMatches(flat, s.files);
    console.log(`qcow2 overlay, 4 moves: booted in ${((booted.t - vm.startedAt) / 1000).toFixed(1)} s, ${s.written} files written, ${s.files} verified; base untouched, qemu-img check clean`);
  }, 150_000);

  it("logs slowness, not errors, when a fault layer under it delays every request and stalls one flush", async () => {
    const dir = tempDir();
    const img = makeGuestDisk(guest, path.join(dir, "disk.img"));
    const n = await serve([img, "--name", "disk", "--fault", "--control", "127.0.0.1:0"], 2);
    nodes.push(n);
    const ctl = controlUrl(n);
    const faults = (body: unknown) => controlCall<{ counts: { stalled: number; delayed: number } }>(ctl, "POST", "v1/exports/disk/faults", body);
    const vm = boot(n, { mode: "run", seconds: 60, slow: 300 });
    await vm.waitFor(/^GUEST-WORKLOAD-START/, "the workload");
    await faults({ add: "op=any,delay=5ms..40ms" });
    await sleep(2500);
    await faults({ add: "op=flush,stall,once" });
    const tStall = Date.now();
    for (let i = 0; (await controlCall<{ counts: { stalled: number } }>(ctl, "GET", "v1/exports/disk/faults")).counts.stalled < 1; i++) {
      if (i > 200) throw vm.failure("no flush reached the stall rule");
      await sleep(50);
    }
    await sleep(4000);
    const released = await controlCall<{ released: number }>(ctl, "POST", "v1/exports/disk/faults", { release: true });
    const stallMs = Date.now() - tStall;
    expect(released.released).toBe(1);
    await sleep(2500);
    const counts = (await faults({ clear: true })).counts;
    await sleep(1000);
    vm.stop();
    const exit = await vm.waitExit();
    const s = expectCleanRun(vm, exit);
    const slow = vm.grep("GUEST-SLOW");
    console.log(`delays: ${counts.delayed} requests delayed 5..40 ms, 1 flush stalled for ${stallMs} ms; the guest saw ${slow.length} slow operations, the longest ${s.maxio} ms (${s.maxop}); ${s.written} files written`);
    expect(slow.length).toBeGreaterThan(0);
    // The stalled flush held an fsync for most of its 4 s: the operation that waited may have begun
    // a little after the stall did (when the stalled flush was the journal's own periodic commit).
    expect(s.maxio).toBeGreaterThanOrEqual(3000);
    await n.stop();
    await expectImageMatches(img, s.files);
  }, 150_000);

  it("boots again after a power cut: journal replayed, e2fsck clean, every fsynced file intact", async () => {
    const dir = tempDir();
    const img = makeGuestDisk(guest, path.join(dir, "disk.img"));
    const n = await serve([img, "--name", "disk", "--fault-powerloss", "--control", "127.0.0.1:0"], 2);
    nodes.push(n);
    const ctl = controlUrl(n);
    // A long commit interval, so the journal does not flush the unflushed writes before the cut.
    const vm = boot(n, { mode: "powerloss", files: 8, rootflags: "commit=60" });
    await vm.waitFor(/^GUEST-UNFLUSHED/, "the unflushed writes");
    const fsynced = new Map<string, string>(vm.grep("GUEST-FSYNCED ").map((l: string): [string, string] => { const [, f, sum] = l.split(" "); return [`/data/${f}`, sum!]; }));
    expect(fsynced.size).toBe(8);
    const { stdout: cut } = await execFileP(process.execPath, [CLI, "fault", "disk", "--control", ctl, "--powercut"], { encoding: "utf8" });
    vm.kill();
    const first = await vm.exited;
    expect(first.signal).toBe("SIGKILL");
    const lost = Number(/power cut: (\d+) unflushed writes lost/.exec(cut)?.[1]);
    expect(lost).toBeGreaterThan(0);
    await execFileP(process.execPath, [CLI, "fault", "disk", "--control", ctl, "--poweron"]);

    const again = boot(n, { mode: "verify" });
    const exit = await again.waitExit();
    const s = expectCleanRun(again, exit);
    const mount = again.grep("GUEST-KMSG").filter((l: string) => /EXT4-fs \(vda\)/.test(l));
    expect(mount.join("\n")).toMatch(/recovery complete/); // the journal was replayed
    expect(s.files).toBe(8);
    await n.stop();
    await expectImageMatches(img, 8);
    const wrong: string[] = [];
    for (const [file, sum] of fsynced) if (sha256(await catFile(img, file)) !== sum) wrong.push(file);
    expect(wrong).toEqual([]);
    console.log(`power cut: ${lost} unflushed writes lost; second boot replayed the journal (${mount.join(" | ")}); 8 of 8 fsynced files intact`);
  }, 150_000);
});
