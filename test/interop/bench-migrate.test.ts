import { spawn, spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { promisify } from "node:util";
import { execFile } from "node:child_process";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { exportStatus, finished, scrape, startCli } from "../helpers/migration.js";
import { decodePng } from "../helpers/png.js";
import { CLI, serve, tempDir, type Served, controlUrl } from "../helpers/serve.js";
import { debianEnv, needTools } from "../helpers/tools.js";

const MiB = 1024 * 1024;
const execFileP = promisify(execFile);

/** Requests and bytes of export disk a node's metrics count, by op (only ok results). */
async function served(control: string) {
  const m = await scrape(control);
  const n = (k: string) => m.get(k) ?? 0;
  return {
    reads: n('nbdstack_requests_total{export="disk",op="read",result="ok"}'),
    writes: n('nbdstack_requests_total{export="disk",op="write",result="ok"}'),
    readBytes: n('nbdstack_bytes_total{export="disk",op="read"}'),
    writeBytes: n('nbdstack_bytes_total{export="disk",op="write"}'),
    errors: [...m].filter(([k]) => k.startsWith("nbdstack_requests_total{") && k.includes('result="error"')).reduce((s, [, v]) => s + v, 0),
  };
}
/** A bench run that stops by --bytes long before its --duration of 60 s: it must end (exit) by then, well within 20 s. */
const bytesRun = (args: string[]) => finished(startCli(["bench", ...args, "--duration", "60s"]), `bench ${args.join(" ")}`, 20_000);
const delta = (after: Record<string, number>, before: Record<string, number>) => Object.fromEntries(Object.keys(after).map((k) => [k, after[k]! - before[k]!]));

/** The summary numbers every run must get right, whatever the machine's speed. */
function expectSane(s: { seconds: number; ops: number; iops: number; mibPerSec: number; errors: number; latencyUs: Record<string, number> }, bs: number) {
  expect(s.errors).toBe(0);
  expect(s.ops).toBeGreaterThan(0);
  // IOPS is ops over the exact time; the JSON's seconds is rounded to 10 ms.
  expect(s.iops).toBeGreaterThanOrEqual(Math.floor(s.ops / (s.seconds + 0.005)));
  if (s.seconds > 0.005) expect(s.iops).toBeLessThanOrEqual(Math.ceil(s.ops / (s.seconds - 0.005)));
  expect(s.mibPerSec).toBeCloseTo((s.iops * bs) / MiB, 0);
  const L = s.latencyUs;
  expect(L.p50).toBeGreaterThan(0);
  expect([L.p50, L.p90, L.p99, L.p999, L.max]).toEqual([L.p50, L.p90, L.p99, L.p999, L.max].sort((x, y) => x - y));
}

/** A minimal well-formedness check: every tag closes in order (no XML library needed). */
function balanced(svg: string): boolean {
  const stack: string[] = [];
  for (const m of svg.matchAll(/<(\/?)([a-zA-Z][\w-]*)[^>]*?(\/?)>/g)) {
    if (m[3] === "/") continue;
    if (m[1] === "/") {
      if (stack.pop() !== m[2]) return false;
    } else stack.push(m[2]!);
  }
  return stack.length === 0;
}

/**
 * Runs the CLI without blocking this process: the servers' logs come through pipes that this
 * process must keep reading (spawnSync would stall them once a pipe is full).
 */
function cli(args: string[]): Promise<{ status: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const p = spawn(process.execPath, [CLI, ...args], { stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    p.stdout.on("data", (d) => (stdout += d));
    p.stderr.on("data", (d) => (stderr += d));
    p.on("close", (status) => resolve({ status, stdout, stderr }));
  });
}

describe("nbdstack bench against two nodes with migrations", () => {
  let dir: string;
  let img: string;
  let a: Served;
  let b: Served;
  beforeAll(async () => {
    dir = tempDir();
    img = path.join(dir, "disk.img");
    fs.writeFileSync(img, "");
    fs.truncateSync(img, 64 * 1024 * 1024);
    a = await serve([img, "--name", "disk", "--node-id", "a", "--fault"], 2);
    b = await serve([img, "--name", "disk", "--node-id", "b", "--fault"], 2);
  });
  afterAll(async () => {
    await b?.stop();
    await a?.stop();
  });

  it("moves the export every second under verified load: zero errors, verify clean, JSON and an HTML report with the hand-overs marked", async () => {
    const json = path.join(dir, "run.json");
    const html = path.join(dir, "run.html");
    const before = await served(controlUrl(a));
    const movesBefore = (await exportStatus(controlUrl(a), "disk"))!.moves;
    const r = await cli(
      [
        "bench", a.uris[0]!, "--rw", "randrw", "--mix", "50", "--qd", "16", "--conns", "2", "--duration", "4s", "--verify",
        "--migrate-every", "1s", "--nodes", `${controlUrl(a)},${controlUrl(b)}`,
        "--fault", "op=pread,delay=2ms@500ms", "--fault-control", controlUrl(a), "--json", json, "--report", html,
      ],
    );
    expect(r.stderr).toBe("");
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(/errors 0 {3}verify ok/);
    expect(r.stdout).toMatch(/hand-overs/);

    const rep = JSON.parse(fs.readFileSync(json, "utf8"));
    expect(rep.summary.errors).toBe(0);
    expect(rep.summary.verify).toBe("ok");
    expectSane(rep.summary, 4096);
    // Counts, not speeds: every request the bench counted reached node a (the one it dialled),
    // plus the read-back of every block it wrote, none failed there; a request held by b during a
    // move back to a reaches a a second time (b forwards it), so at most the held ones on top.
    const d = delta(await served(controlUrl(a)), before);
    expect(rep.summary.verifyDetail.readBack).toBeGreaterThan(0);
    const bounced = d.reads + d.writes - (rep.summary.ops + rep.summary.verifyDetail.readBack);
    expect(bounced).toBeGreaterThanOrEqual(0);
    expect(bounced).toBeLessThanOrEqual(rep.summary.handovers.reduce((n: number, h: { held: number }) => n + h.held, 0));
    expect(d.errors).toBe(0);
    // Moves at 1 s, 2 s and 3 s; a move that starts late may push the next past the end, so at
    // least one, each after its planned time, and a's own count of moves agrees.
    const hs = rep.summary.handovers;
    expect(hs.length).toBeGreaterThanOrEqual(1);
    expect(hs.length).toBeLessThanOrEqual(3);
    expect((await exportStatus(controlUrl(a), "disk"))!.moves - movesBefore).toBe(hs.length);
    hs.forEach((h: { index: number; startMs: number; from: string; to: string; error?: string; longestStallMs: number }, i: number) => {
      expect(h.index).toBe(i + 1);
      expect(h.startMs).toBeGreaterThanOrEqual(1000 * (i + 1)); // never before its time (src/bench/sleeper.ts)
      expect(h.error).toBeUndefined();
      expect(h.longestStallMs).toBeGreaterThan(0);
      if (i > 0) expect(h.from).toBe(hs[i - 1].to);
    });
    expect(rep.summary.faults).toEqual([expect.objectContaining({ rule: "op=pread,delay=2ms" })]);
    expect(rep.summary.faults[0].error).toBeUndefined();
    // The rule stays on a's fault layer: clear it, so the tests after this one start from no rules.
    expect((await cli(["fault", "disk", "--control", controlUrl(a), "--clear"])).status).toBe(0);
    expect(rep.timeline.length).toBeGreaterThanOrEqual(40); // 100 ms buckets over the run of 4 s (seconds is rounded)
    expect(rep.timeline.length).toBeLessThanOrEqual(Math.ceil((rep.summary.seconds + 0.005) * 10));
    expect(rep.timeline.reduce((s: number, b: { iops: number }) => s + b.iops, 0) / 10).toBe(rep.summary.ops);

    const page = fs.readFileSync(html, "utf8");
    expect(page.startsWith("<!doctype html>")).toBe(true);
    expect(page).not.toMatch(/\b(src|href)=|@import|url\(/); // self-contained: nothing to fetch
    const svgs = [...page.matchAll(/<svg[\s\S]*?<\/svg>/g)].map((m) => m[0]);
    expect(svgs).toHaveLength(2);
    for (const svg of svgs) {
      expect(balanced(svg)).toBe(true);
      const marks = [...svg.matchAll(/<g class="handover" data-index="(\d+)" data-start-ms="(\d+)"/g)];
      expect(marks.map((m) => Number(m[1]))).toEqual(rep.summary.handovers.map((h: { index: number }) => h.index));
      expect(marks.map((m) => Number(m[2]))).toEqual(rep.summary.handovers.map((h: { startMs: number }) => h.startMs));
      expect(svg).toMatch(/<g class="fault">/);
      expect(svg).toMatch(/<path d="M[\d.]+,[\d.]+( L[\d.]+,[\d.]+){30,}/);
    }
    reportFile = html;
  });

  let reportFile = "";
  it.skipIf(!needTools("chromium"))("renders the report in headless Chromium: a page with the charts, not a blank one", () => {
    expect(reportFile, "the test before did not finish its report").not.toBe("");
    const png = path.join(dir, "report.png");
    const flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"];
    spawnSync("chromium", [...flags, `--user-data-dir=${path.join(dir, "chromium")}`, "--window-size=1000,800", `--screenshot=${png}`, `file://${reportFile}`], { timeout: 60_000 });
    const { width, height, rgba } = decodePng(fs.readFileSync(png));
    expect([width, height]).toEqual([1000, 800]);
    let ink = 0;
    let blue = 0;
    let orange = 0;
    for (let i = 0; i < rgba.length; i += 4) {
      const [r, g, b] = [rgba[i]!, rgba[i + 1]!, rgba[i + 2]!];
      if (r < 200 || g < 200 || b < 200) ink++;
      if (b > 150 && r < 80 && g < 140) blue++; // the series lines (#1565c0)
      if (r > 230 && g > 180 && g < 230 && b < 190) orange++; // the hand-over bands (#f80 at 35%)
    }
    expect(ink / (width * height)).toBeGreaterThan(0.01);
    expect(blue).toBeGreaterThan(500);
    expect(orange).toBeGreaterThan(2000);
  });

  it("fails the run and names the offset when the data is wrong", async () => {
    // The owner's fault layer (above its port A) flips a bit in every read: verify must catch it.
    const owner = JSON.parse(spawnSync(process.execPath, [CLI, "status", controlUrl(a), "--json"], { encoding: "utf8" }).stdout).exports[0].owner;
    const node = owner === "a" ? a : b;
    const set = spawnSync(process.execPath, [CLI, "fault", "disk", "--control", controlUrl(node), "--add", "op=pread,corrupt=1"], { encoding: "utf8" });
    expect(set.status).toBe(0);
    const r = await cli(["bench", node.uris[0]!, "--rw", "randrw", "--duration", "1s", "--verify", "--range", "0-4M"]);
    await cli(["fault", "disk", "--control", controlUrl(node), "--clear"]);
    expect(r.status).toBe(1);
    expect(r.stdout).toMatch(/verify FAILED/);
    expect(r.stdout).toMatch(/VERIFY FAILED at offset \d+: corrupted bytes/);
  });

  it.skipIf(!needTools("fio"))("drives the same run with fio's nbd engine and folds its latency logs into the report", async () => {
    const json = path.join(dir, "fio.json");
    const r = await cli([
      "bench", a.uris[0]!, "--engine", "fio", "--rw", "randwrite", "--qd", "16", "--duration", "4s", "--verify",
      "--migrate-every", "1s", "--nodes", `${controlUrl(a)},${controlUrl(b)}`, "--json", json,
    ]);
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(/errors 0 {3}verify ok/);
    const rep = JSON.parse(fs.readFileSync(json, "utf8"));
    expectSane(rep.summary, 4096);
    expect(rep.summary.handovers.length).toBeGreaterThanOrEqual(1);
    expect(rep.summary.handovers.length).toBeLessThanOrEqual(3);
    for (const h of rep.summary.handovers) expect(h.error).toBeUndefined();
    // The series sits on the run's clock: every completion fio logged falls in a bucket of the
    // run, in its first second as well as its last (fio ran all 4 s).
    const buckets = rep.timeline.map((b: { iops: number }) => b.iops / 10);
    expect(buckets.reduce((s: number, n: number) => s + n, 0)).toBe(rep.summary.ops);
    expect(buckets.slice(0, 10).some((n: number) => n > 0)).toBe(true);
    expect(buckets.slice(-10).some((n: number) => n > 0)).toBe(true);
  });

  /** The node that owns the export now, and the other one. */
  async function owner(): Promise<{ owner: Served; other: Served }> {
    const o = (await exportStatus(controlUrl(a), "disk"))!.owner;
    return o === "a" ? { owner: a, other: b } : { owner: b, other: a };
  }

  /** Zeroes the first `bytes` of the export (qemu-io, exit status checked). */
  async function zero(bytes: number) {
    const { stdout } = await execFileP("qemu-io", ["-f", "raw", "-c", `write -z 0 ${bytes}`, a.uris[0]!], { env: debianEnv });
    expect(stdout).toMatch(/^wrote \d+\/\d+ bytes at offset 0/m);
  }

  it("--rate-iops 100: the run starts at most about 100 requests a second, and node a counts each", async () => {
    const json = path.join(dir, "rate.json");
    const before = await served(controlUrl(a));
    const r = await cli(["bench", a.uris[0]!, "--rw", "randwrite", "--qd", "8", "--duration", "2s", "--rate-iops", "100", "--json", json]);
    expect(r.stderr).toBe("");
    expect(r.status).toBe(0);
    const s = JSON.parse(fs.readFileSync(json, "utf8")).summary;
    expectSane(s, 4096);
    // One start slot every 10 ms, no catching up: at most rate × time (+1 for the slot at 0); a wide bound.
    expect(s.ops).toBeLessThanOrEqual(Math.ceil(100 * s.seconds * 1.1) + 1);
    expect(delta(await served(controlUrl(a)), before)).toMatchObject({ writes: s.ops, reads: 0, errors: 0 });
  });

  it("--migrate-at 1s: exactly one move, at or after 1 s, and the owner changed once", async () => {
    const json = path.join(dir, "at.json");
    const { owner: from, other: to } = await owner();
    const moves = (await exportStatus(controlUrl(a), "disk"))!.moves;
    const r = await cli([
      "bench", a.uris[0]!, "--rw", "randrw", "--qd", "4", "--rate-iops", "500", "--duration", "2s", "--verify", "--range", "0-8M",
      "--migrate-at", "1s", "--nodes", `${controlUrl(a)},${controlUrl(b)}`, "--json", json,
    ]);
    expect(r.stderr).toBe("");
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(/errors 0 {3}verify ok/);
    const s = JSON.parse(fs.readFileSync(json, "utf8")).summary;
    expect(s.handovers).toHaveLength(1);
    expect(s.handovers[0]).toMatchObject({ index: 1, from: controlUrl(from), to: controlUrl(to) });
    expect(s.handovers[0].error).toBeUndefined();
    expect(s.handovers[0].startMs).toBeGreaterThanOrEqual(1000); // never before its time (src/bench/sleeper.ts)
    expect(s.handovers[0].startMs).toBeLessThan(s.seconds * 1000);
    expect((await exportStatus(controlUrl(a), "disk"))!.owner).toBe(to === a ? "a" : "b");
    expect((await exportStatus(controlUrl(a), "disk"))!.moves - moves).toBe(1);
  });

  it("--rw write --bytes 4M: sequential writes of that many bytes, counted by the server, each block read back", async () => {
    await zero(8 * MiB);
    const json = path.join(dir, "bytes.json");
    const before = await served(controlUrl(a));
    const bs = 64 * 1024;
    const r = await bytesRun([a.uris[0]!, "--rw", "write", "--bs", "64k", "--qd", "4", "--bytes", "4M", "--range", "0-8M", "--verify", "--json", json]);
    expect(r.stderr).toBe("");
    expect(r.status).toBe(0);
    const s = JSON.parse(fs.readFileSync(json, "utf8")).summary;
    expectSane(s, bs);
    expect(s.verify).toBe("ok");
    expect(s.seconds).toBeLessThan(20); // ended by --bytes, not by --duration
    // 4 MiB, plus what was already in flight when it was reached (under QD 4).
    expect(s.ops * bs).toBeGreaterThanOrEqual(4 * MiB);
    expect(s.ops * bs).toBeLessThan(4 * MiB + 4 * bs);
    expect(s.verifyDetail.readBack).toBe(s.ops); // every block written once: sequential, no wrap
    expect(delta(await served(controlUrl(a)), before)).toEqual({ writes: s.ops, writeBytes: s.ops * bs, reads: s.ops, readBytes: s.ops * bs, errors: 0 });
    // In order from the start of the range: exactly the first ops blocks hold bench data.
    const head = Buffer.alloc(8 * MiB);
    const fd = fs.openSync(img, "r");
    fs.readSync(fd, head, 0, head.length, 0);
    fs.closeSync(fd);
    const written = Array.from({ length: 128 }, (_, i) => head.readUInt32LE(i * bs) === 0x4e425356);
    expect(written).toEqual(Array.from({ length: 128 }, (_, i) => i < s.ops));
  });

  it("--bytes ends the run: a move and a fault planned after its end are neither waited for nor made", async () => {
    const json = path.join(dir, "early.json");
    const html = path.join(dir, "early.html");
    const { owner: o } = await owner();
    const moves = (await exportStatus(controlUrl(a), "disk"))!.moves;
    const r = await bytesRun([
      a.uris[0]!, "--rw", "write", "--bs", "64k", "--qd", "4", "--bytes", "1M", "--range", "0-8M",
      "--migrate-at", "30s", "--nodes", `${controlUrl(a)},${controlUrl(b)}`, "--fault", "op=pread,delay=1ms@30s", "--fault-control", controlUrl(o), "--json", json, "--report", html,
    ]);
    expect(r.stderr).toBe("");
    expect(r.status).toBe(0);
    const s = JSON.parse(fs.readFileSync(json, "utf8")).summary;
    expect(s.handovers).toEqual([]);
    expect(s.faults).toEqual([expect.objectContaining({ rule: "op=pread,delay=1ms", error: "the run ended first" })]);
    expect(r.stdout).toMatch(/fault at [\d.]+ s: op=pread,delay=1ms {2}\(not applied: the run ended first\)/);
    expect(fs.readFileSync(html, "utf8")).not.toMatch(/class="fault"/); // the charts mark faults applied only
    expect((await exportStatus(controlUrl(a), "disk"))!.moves).toBe(moves);
    const rules = await cli(["fault", "disk", "--control", controlUrl(o)]);
    expect(rules.stdout).not.toMatch(/^rule /m);
  });

  it("--rw read and --rw randread: reads only, counted by the server; read goes in order, randread all over the range", async () => {
    const { owner: o } = await owner();
    // A rule that only counts (delay 1 ms) the reads touching the last quarter of the range, on the owner's port A.
    const tail = "op=pread,delay=1ms,range=6291456-8388608";
    const seenInTail = async (rw: string) => {
      expect((await cli(["fault", "disk", "--control", controlUrl(o), "--add", tail])).status).toBe(0);
      const json = path.join(dir, `${rw}.json`);
      const before = await served(controlUrl(a));
      const r = await bytesRun([a.uris[0]!, "--rw", rw, "--bs", "64k", "--qd", "4", "--bytes", "2M", "--range", "0-8M", "--json", json]);
      const rules = await cli(["fault", "disk", "--control", controlUrl(o)]);
      expect((await cli(["fault", "disk", "--control", controlUrl(o), "--clear"])).status).toBe(0);
      expect(r.stderr).toBe("");
      expect(r.status).toBe(0);
      const s = JSON.parse(fs.readFileSync(json, "utf8")).summary;
      expectSane(s, 64 * 1024);
      expect(s.ops * 64 * 1024).toBeGreaterThanOrEqual(2 * MiB);
      expect(delta(await served(controlUrl(a)), before)).toEqual({ reads: s.ops, readBytes: s.ops * 64 * 1024, writes: 0, writeBytes: 0, errors: 0 });
      const m = /^rule \d+: op=pread,delay=1ms,range=6291456-8388608 {2}\(matched (\d+), fired \d+\)$/m.exec(rules.stdout);
      expect(m).not.toBeNull();
      return Number(m![1]);
    };
    expect(await seenInTail("read")).toBe(0); // 2 MiB from offset 0 never reach 6 MiB
    expect(await seenInTail("randread")).toBeGreaterThan(0);
  });

  it("--seed: two runs with the same seed write the same blocks with the same data; another seed writes others", async () => {
    const region = 4 * MiB;
    const runWith = async (seed: string) => {
      await zero(region);
      const r = await bytesRun([a.uris[0]!, "--rw", "randwrite", "--qd", "1", "--bytes", "256k", "--range", `0-${region}`, "--seed", seed]);
      expect(r.stderr).toBe("");
      expect(r.status).toBe(0);
      const buf = Buffer.alloc(region);
      const fd = fs.openSync(img, "r");
      fs.readSync(fd, buf, 0, region, 0);
      fs.closeSync(fd);
      const blocks = Array.from({ length: region / 4096 }, (_, i) => i).filter((i) => buf.readUInt32LE(i * 4096) !== 0);
      return { buf, blocks };
    };
    const first = await runWith("7");
    const again = await runWith("7");
    const other = await runWith("8");
    expect(first.blocks.length).toBeGreaterThan(32); // 64 writes, a few to the same block
    expect(again.blocks).toEqual(first.blocks);
    expect(again.buf.equals(first.buf)).toBe(true);
    expect(other.blocks).not.toEqual(first.blocks);
  });
});
