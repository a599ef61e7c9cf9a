import { spawn, spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { decodePng } from "../helpers/png.js";
import { CLI, serve, tempDir, type Served, controlUrl } from "../helpers/serve.js";
import { needTools } from "../helpers/tools.js";

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
  let a: Served;
  let b: Served;
  beforeAll(async () => {
    dir = tempDir();
    const img = path.join(dir, "disk.img");
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
    expect(rep.summary.verifyDetail.readBack).toBeGreaterThan(100);
    expect(rep.summary.ops).toBeGreaterThan(1000);
    expect(rep.summary.handovers.length).toBeGreaterThanOrEqual(2); // 3 planned; a slow machine may fit fewer
    for (const h of rep.summary.handovers) {
      expect(h.error).toBeUndefined();
      expect(h.longestStallMs).toBeGreaterThan(0);
    }
    expect(rep.summary.faults).toEqual([expect.objectContaining({ rule: "op=pread,delay=2ms" })]);
    expect(rep.summary.faults[0].error).toBeUndefined();
    expect(rep.timeline.length).toBeGreaterThanOrEqual(40); // 100 ms buckets over 4 s
    expect(rep.timeline.reduce((s: number, b: { iops: number }) => s + b.iops / 10, 0)).toBeCloseTo(rep.summary.ops, -2);

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
    expect(reportFile).not.toBe("");
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
    expect(rep.summary.ops).toBeGreaterThan(1000);
    expect(rep.summary.latencyUs.p50).toBeGreaterThan(0);
    expect(rep.summary.handovers.length).toBeGreaterThanOrEqual(2);
    for (const h of rep.summary.handovers) expect(h.error).toBeUndefined();
    // The series sits on the run's clock: completions in most 100 ms buckets of the run.
    const busy = rep.timeline.filter((b: { iops: number }) => b.iops > 0).length;
    expect(busy).toBeGreaterThan(rep.timeline.length * 0.6);
  });
});
