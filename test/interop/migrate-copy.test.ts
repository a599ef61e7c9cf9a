import { execFile } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { promisify } from "node:util";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { NbdClient } from "../../src/client/nbd-client.js";
import { controlCall } from "../../src/control/control-client.js";
import { cli, exportStatus, finished, fioLoad, fioOutcome, killLeftovers, listedExports, logLines, nbdBase, pollUntil, scrape, startCli, type LiveCopyView } from "../helpers/migration.js";
import { controlUrl, serve, tempDir, type Served, nbdAddress as addrOf } from "../helpers/serve.js";
import { debianEnv, needTools } from "../helpers/tools.js";

const MiB = 1024 * 1024;
const run = promisify(execFile);

/** The copy of `name` a node reports, once it is in the phase `phase` and has sent at least `copied` bytes. */
async function copyAt(control: string, phase: string, copied = 0): Promise<LiveCopyView> {
  return pollUntil(`a copy of disk in phase ${phase} with ${copied} bytes sent`, async () => {
    const c = (await exportStatus(control, "disk"))?.copy;
    return c?.phase === phase && c.copied >= copied ? c : undefined;
  });
}

/**
 * `nbdstack migrate --copy` from the command line between two nodes without shared storage: a
 * serves an image of 16 MiB (8 MiB of data, 8 MiB hole), b has only a data directory. Both put
 * a fault layer above their ports (--fault): a's is above the image the copy reads, b's is above
 * the image the copy writes into (it exists while b is a copy target). The cases run in order on
 * this one pair; each says who owns the export when it starts.
 */
describe.skipIf(!needTools("fio", "nbdinfo", "qemu-img"))("migrate --copy from the command line: cancel, flags, retries and aborts", () => {
  let dirA: string;
  let dirB: string;
  let img: string;
  let a: Served;
  let b: Served;
  let A: string;
  let B: string;
  const bArgs = () => ["--data-dir", dirB, "--node-id", "b", "--control", "127.0.0.1:0", "--listen", "127.0.0.1:0", "--fault"];
  beforeAll(async () => {
    dirA = tempDir();
    dirB = tempDir();
    img = path.join(dirA, "disk.img");
    const data = Buffer.alloc(8 * MiB);
    for (let i = 0; i < data.length; i += 4) data.writeUInt32LE((i * 2654435761) >>> 0, i);
    fs.writeFileSync(img, data);
    fs.truncateSync(img, 16 * MiB);
    a = await serve([img, "--name", "disk", "--node-id", "a", "--control", "127.0.0.1:0", "--fault"], 2);
    b = await serve(bArgs(), 1);
    A = controlUrl(a);
    B = controlUrl(b);
  });
  afterEach(() => killLeftovers());
  afterAll(async () => {
    await b?.stop();
    await a?.stop();
  });

  it("Ctrl-C cancels the copy: a keeps the export, no request fails, b's target is never listed and its image stays incomplete", async () => {
    const load = fioLoad(a.uris[0]!);
    const m = startCli(["migrate", "disk", "--from", A, "--to", B, "--copy", "--max-rate", "1M"]);
    await copyAt(A, "copying", MiB);
    await pollUntil("the progress bar on stderr", () => /^copying \[/m.test(m.stderr()));
    // b serves the export through port B and holds the copy target, an export nbdinfo does not list.
    expect(await exportStatus(B, "disk")).toMatchObject({ owner: "a", state: "REMOTE", copyTarget: true });
    const listed = await listedExports(await nbdBase(B));
    expect(listed.map((e) => e.name)).toEqual(["disk"]);
    expect(listed[0]!.description).toMatch(/redirector\(REMOTE\)/);
    // The target's secret name is not in b's metrics either (GET /metrics needs no token), yet its writes are counted.
    const metrics = await scrape(B);
    for (const k of metrics.keys()) expect(k).not.toMatch(/@copy-target\/[0-9a-f]{32}/);
    expect(metrics.get('nbdstack_requests_total{export="@copy-target/disk",op="write",result="ok"}')).toBeGreaterThan(0);

    m.proc.kill("SIGINT");
    const r = await finished(m, "migrate --copy after Ctrl-C");
    expect(r.status).toBe(1);
    expect(r.stdout).toBe("");
    expect(r.stderr).toMatch(/cancelling the live copy/);
    expect(r.stderr).toMatch(/^nbdstack: POST \/v1\/exports\/disk\/migrate: 502 live copy of disk aborted: cancelled by request$/m);
    // The progress bar was drawn (stderr is not a terminal: a line at a time) and never ran ahead of the bytes copied.
    const bars = [...r.stderr.matchAll(/^(\w+) \[[█░]+\] (\d+)% \| ([\d.]+)\/([\d.]+) MiB/gm)];
    expect(bars.length).toBeGreaterThan(0);
    for (const [, , pct, copied, total] of bars) expect(Number(pct)).toBeLessThanOrEqual((100 * Number(copied)) / Number(total) + 2);

    const st = (await exportStatus(A, "disk"))!;
    expect(st).toMatchObject({ owner: "a", epoch: 1, state: "LOCAL", held: 0, copy: { phase: "aborted", error: "cancelled by request" } });
    expect(st.copy!.copied).toBeLessThan(st.copy!.total); // it stopped there, copies waiting for their turn did not go on
    // The same numbers in the one family of copy metrics.
    const after = await scrape(A);
    expect(after.get('nbdstack_copy_state{export="disk",job="live-copy",state="failed"}')).toBe(1);
    expect(after.get('nbdstack_copy_done_bytes{export="disk",job="live-copy"}')).toBe(st.copy!.copied);
    expect(after.get('nbdstack_copy_total_bytes{export="disk",job="live-copy"}')).toBe(st.copy!.total);
    expect(await exportStatus(B, "disk")).toEqual(expect.not.objectContaining({ copyTarget: true }));
    expect(await exportStatus(B, "disk")).toMatchObject({ owner: "a", state: "REMOTE" });
    expect(fs.existsSync(path.join(dirB, "disk.img.incomplete"))).toBe(true);
    expect((await listedExports(await nbdBase(B))).map((e) => e.name)).toEqual(["disk"]);
    const f = await load.stop();
    expect(fioOutcome(f)).toEqual({ exit: "stopped", error: 0, complaints: [] });
    expect(f.job.write.io_bytes).toBeGreaterThan(0);
    expect(f.job.read.io_bytes).toBeGreaterThan(0); // fio read back and verified what it wrote
  });

  it("POST /v1/exports/disk/migrate/cancel cancels the same way; a second cancel finds nothing to cancel", async () => {
    const load = fioLoad(a.uris[0]!);
    const m = startCli(["migrate", "disk", "--from", A, "--to", B, "--copy", "--max-rate", "1M", "--json"]);
    await copyAt(A, "copying", MiB);
    expect(await controlCall(A, "POST", "v1/exports/disk/migrate/cancel", {})).toEqual({ cancelled: "disk" });
    const r = await finished(m, "migrate --copy after the cancel call");
    expect(r.status).toBe(1);
    expect(r.stdout).toBe("");
    // --json: no progress bar, only the error.
    expect(r.stderr).toBe("nbdstack: POST /v1/exports/disk/migrate: 502 live copy of disk aborted: cancelled by request\n");
    await expect(controlCall(A, "POST", "v1/exports/disk/migrate/cancel", {})).rejects.toMatchObject({ status: 409, message: expect.stringMatching(/no live copy to cancel/) });
    const st = (await exportStatus(A, "disk"))!;
    expect(st).toMatchObject({ owner: "a", epoch: 1, state: "LOCAL", held: 0, copy: { phase: "aborted", error: "cancelled by request" } });
    expect(st.copy!.copied).toBeLessThan(st.copy!.total);
    expect(fs.existsSync(path.join(dirB, "disk.img.incomplete"))).toBe(true);
    expect((await listedExports(await nbdBase(B))).map((e) => e.name)).toEqual(["disk"]);
    const f = await load.stop();
    expect(fioOutcome(f)).toEqual({ exit: "stopped", error: 0, complaints: [] });
  });

  it("a restarted destination does not serve the image whose copy never finished", async () => {
    await b.stop();
    b = await serve(bArgs(), 1);
    B = controlUrl(b);
    expect((await exportStatus(B, "disk"))).toBeUndefined();
    expect(b.stderr()).toMatch(/not serving an image whose live copy never finished/);
    expect(await listedExports(await nbdBase(B))).toEqual([]);
    // The next copy starts afresh.
    for (const f of ["disk.img", "disk.img.incomplete", "disk.img.lease"]) fs.rmSync(path.join(dirB, f), { force: true });
  });

  it("retries a copy read and a copy write that fail once: the copy completes byte-exact, both failures counted and logged", async () => {
    // a's fault layer is above the image the copy reads; the rule is set before the move starts.
    const add = await cli(["fault", "disk", "--control", A, "--add", "op=pread,errno=EIO,once,range=4194304-5242880"]);
    expect(add).toMatchObject({ status: 0, stderr: "" });
    expect(add.stdout).toMatch(/^rule 1: op=pread,errno=EIO,once,range=4194304-5242880 {2}\(matched 0, fired 0\)$/m);
    const aLog = a.stderr().length;
    const m = startCli(["migrate", "disk", "--from", A, "--to", B, "--copy", "--max-rate", "4M", "--json"]);
    // b's fault layer above the image the copy writes into exists once b is the copy target.
    await pollUntil("b to become the copy target", async () => (await exportStatus(B, "disk"))?.copyTarget);
    await controlCall(B, "POST", "v1/exports/disk/faults", { add: "op=pwrite,errno=EIO,once" });
    const r = await finished(m, "migrate --copy with two failing copies");
    expect(r.stderr).toBe("");
    expect(r.status).toBe(0);
    expect(JSON.parse(r.stdout)).toMatchObject({ export: "disk", from: "a", to: "b", epoch: 2 });
    expect((await exportStatus(A, "disk"))!.copy).toMatchObject({ phase: "done", failures: 2 });
    const fa = await controlCall<{ counts: { injected: number }; rules: Array<{ fired: number }> }>(A, "GET", "v1/exports/disk/faults");
    const fb = await controlCall<{ counts: { injected: number }; rules: Array<{ fired: number }> }>(B, "GET", "v1/exports/disk/faults");
    expect([fa.counts.injected, fa.rules[0]!.fired, fb.counts.injected, fb.rules[0]!.fired]).toEqual([1, 1, 1, 1]);
    const retries = await pollUntil("two retries in a's log", () => {
      const l = logLines(a.stderr().slice(aLog), "copy failed: range marked dirty again");
      return l.length >= 2 && l;
    });
    expect(retries).toHaveLength(2);
    for (const l of retries) expect(l.retryInMs).toBeGreaterThanOrEqual(100);
    // Nothing wrote meanwhile: the retried ranges made it, the copy is the image.
    await run("qemu-img", ["compare", "-f", "raw", "-F", "raw", img, path.join(dirB, "disk.img")], { env: debianEnv });
    expect(fs.existsSync(path.join(dirB, "disk.img.incomplete"))).toBe(false);
    expect((await cli(["fault", "disk", "--control", A, "--clear"])).status).toBe(0);
  });

  it("gives up after six failures in a row, with backoff between them: b keeps the export, no request fails, a's target is never listed", async () => {
    // b owns the export now; a receives the copy, and its copy target fails every write.
    const load = fioLoad(a.uris[0]!); // a client of the destination, served through its port B
    const bLog = b.stderr().length;
    const m = startCli(["migrate", "disk", "--from", B, "--to", A, "--copy", "--max-rate", "2M", "--json"]);
    await pollUntil("a to become the copy target", async () => (await exportStatus(A, "disk"))?.copyTarget);
    await controlCall(A, "POST", "v1/exports/disk/faults", { add: "op=pwrite,errno=EIO" });
    expect((await listedExports(await nbdBase(A))).map((e) => e.name)).toEqual(["disk"]);
    const r = await finished(m, "migrate --copy into a dead target");
    expect(r.status).toBe(1);
    expect(r.stdout).toBe("");
    expect(r.stderr).toMatch(/^nbdstack: POST \/v1\/exports\/disk\/migrate: 502 live copy of disk aborted: copy failed 6 times in a row: /);
    const st = (await exportStatus(B, "disk"))!;
    expect(st).toMatchObject({ owner: "b", epoch: 2, state: "LOCAL", held: 0, copy: { phase: "aborted" } });
    expect(st.copy!.failures).toBeGreaterThanOrEqual(6);
    // On b's clock: the five failures before the sixth were each followed by their backoff, doubling.
    await pollUntil("b's log of the abort", () => logLines(b.stderr().slice(bLog), "live copy aborted: this node stays the owner").length > 0);
    const streak = logLines(b.stderr().slice(bLog), "copy failed: range marked dirty again").slice(-5);
    expect(streak.map((l) => [l.failuresInRow, l.retryInMs])).toEqual([[1, 100], [2, 200], [3, 400], [4, 800], [5, 1600]]);
    const gaveUp = logLines(b.stderr().slice(bLog), "live copy aborted: this node stays the owner");
    expect(gaveUp).toHaveLength(1);
    const times = [...streak.map((l) => l.time), gaveUp[0]!.time];
    for (let i = 0; i < 5; i++) expect(times[i + 1]! - times[i]!).toBeGreaterThanOrEqual((streak[i]!.retryInMs as number) - 2);
    const fa = await controlCall<{ counts: { injected: number } }>(A, "GET", "v1/exports/disk/faults");
    expect(fa.counts.injected).toBeGreaterThanOrEqual(6);
    expect(await exportStatus(A, "disk")).toMatchObject({ owner: "b", state: "REMOTE" });
    expect(await exportStatus(A, "disk")).toEqual(expect.not.objectContaining({ copyTarget: true }));
    expect(fs.existsSync(`${img}.incomplete`)).toBe(true);
    expect((await listedExports(await nbdBase(A))).map((e) => e.name)).toEqual(["disk"]);
    const f = await load.stop();
    expect(fioOutcome(f)).toEqual({ exit: "stopped", error: 0, complaints: [] });
    expect(f.job.read.io_bytes).toBeGreaterThan(0);
    // The rule stays with a's fault layer (the name leads to a's own layer once the target is gone).
    expect((await controlCall<{ rules: Array<{ text: string }> }>(A, "GET", "v1/exports/disk/faults")).rules.map((r) => r.text)).toEqual(["op=pwrite,errno=EIO"]);
    expect((await cli(["fault", "disk", "--control", A, "--clear"])).status).toBe(0);
  });

  it("--mode write-blocking --max-rate 8M --json: the copy starts and ends write-blocking and takes at least its size over the rate", async () => {
    const load = fioLoad(a.uris[0]!);
    const m = startCli(["migrate", "disk", "--from", B, "--to", A, "--copy", "--mode", "write-blocking", "--max-rate", "8M", "--json"]);
    const seen: LiveCopyView[] = [];
    const stacks: string[] = [];
    while (m.proc.exitCode === null) {
      const c = (await exportStatus(B, "disk").catch(() => undefined))?.copy;
      if (c && (c.phase === "starting" || c.phase === "copying")) {
        seen.push(c);
        // What the source's stack says while copying (nbdinfo): whether its dirty tracker writes through.
        if (c.phase === "copying" && stacks.length < 3) {
          const d = (await listedExports(await nbdBase(B)))[0]!.description ?? "";
          if (d.includes("dirty-tracker(")) stacks.push(d);
        }
      }
      await new Promise((res) => setTimeout(res, 50)); // sampling the status, not waiting for an event
    }
    const r = await finished(m, "migrate --copy --mode write-blocking");
    expect(r.stderr).toBe(""); // --json: no progress bar
    expect(r.status).toBe(0);
    expect(r.stdout.trim().split("\n")).toHaveLength(1);
    const res = JSON.parse(r.stdout) as { export: string; from: string; to: string; epoch: number; ms: number; copied: number; mode: string };
    expect(res).toMatchObject({ export: "disk", from: "b", to: "a", epoch: 3, mode: "write-blocking" });
    expect(seen.length).toBeGreaterThan(0);
    expect(seen.map((c) => c.mode)).toEqual(seen.map(() => "write-blocking"));
    expect(stacks.length).toBeGreaterThan(0);
    for (const d of stacks) expect(d).toMatch(/dirty-tracker\(write-blocking\)/);
    // a's image was not fresh: all 16 MiB travel, at 8 MiB/s at most (a lower bound only).
    expect(res.copied).toBeGreaterThanOrEqual(16 * MiB);
    expect(res.ms).toBeGreaterThanOrEqual(0.9 * (res.copied / (8 * MiB)) * 1000);
    expect(await exportStatus(A, "disk")).toMatchObject({ owner: "a", epoch: 3, state: "LOCAL" });
    expect(fs.existsSync(`${img}.incomplete`)).toBe(false);
    const f = await load.stop();
    expect(fioOutcome(f)).toEqual({ exit: "stopped", error: 0, complaints: [] });
  });

  it("--no-progress: only the result line, no progress bar, for a copy long enough to draw one", async () => {
    const r = await finished(startCli(["migrate", "disk", "--from", A, "--to", B, "--copy", "--max-rate", "16M", "--no-progress"]), "migrate --copy --no-progress");
    expect(r.stderr).toBe("");
    expect(r.status).toBe(0);
    const line = /^moved disk from a to b \(epoch 4\) by live copy in ([\d.]+) s: ([\d.]+) MiB copied, background mode at the end\n$/.exec(r.stdout);
    expect(line).not.toBeNull();
    // 16 MiB at 16 MiB/s: over the half second after which the bar would first have been drawn.
    expect(Number(line![2])).toBeGreaterThanOrEqual(16);
    expect(Number(line![1])).toBeGreaterThanOrEqual(0.9);
  });

  it("bench --migrate-at --migrate-copy: exactly one move, a live copy, with its copy phase and hand-over apart", async () => {
    const json = path.join(dirA, "bench.json");
    const r = await cli([
      "bench", a.uris[0]!, "--rw", "randwrite", "--qd", "4", "--rate-iops", "300", "--duration", "2s", "--verify", "--range", "0-4M",
      "--migrate-at", "500ms", "--migrate-copy", "--copy-max-rate", "16M", "--nodes", `${A},${B}`, "--json", json,
    ]);
    expect(r.stderr).toBe("");
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(/errors 0 {3}verify ok/);
    expect(r.stdout).toMatch(/^ {2}live copy #1: 16\.0 MiB to copy at the start, [\d.]+ MiB copied in \d+ passes, background mode at the end; copy phase [\d.]+ s at \d+ IOPS \(longest gap [\d.]+ ms\), hand-over \d+ ms at most, stall [\d.]+ ms$/m);
    const rep = JSON.parse(fs.readFileSync(json, "utf8"));
    expect(rep.summary.handovers).toHaveLength(1);
    const h = rep.summary.handovers[0];
    expect(h).toMatchObject({ index: 1, from: B, to: A, copy: { total: 16 * MiB, mode: "background" } });
    expect(h.error).toBeUndefined();
    expect(h.startMs).toBeGreaterThanOrEqual(500); // never before its time (src/bench/sleeper.ts)
    expect(h.copy.copied).toBeGreaterThanOrEqual(16 * MiB);
    expect(h.copy.passes).toBeGreaterThanOrEqual(1);
    // The copy phase comes first, then the hand-over; the copy took at least 16 MiB over 16 MiB/s.
    expect(h.copy.handoverStartMs).toBeGreaterThan(h.startMs);
    expect(h.copy.handoverStartMs).toBeLessThanOrEqual(h.endMs);
    expect(h.ms).toBeGreaterThanOrEqual(0.9 * (h.copy.copied / (16 * MiB)) * 1000);
    expect(await exportStatus(A, "disk")).toMatchObject({ owner: "a", epoch: 5, state: "LOCAL" });
  });

  it("after copies into a, `fault disk` steers a's own fault layer again: its rules fire on a's image", async () => {
    // a received the image by live copy (twice); each copy target had a fault layer of its own under the
    // export's name while the copy ran. Once the copy ended, the name must lead back to the layer above port A.
    const add = await cli(["fault", "disk", "--control", A, "--add", "op=pread,errno=EIO,range=0-4096"]);
    expect(add.status).toBe(0);
    const c = await NbdClient.connect(addrOf(a.uris[0]!), { exportName: "disk" });
    try {
      await expect(c.pread(512, 0)).rejects.toMatchObject({ errno: "EIO" });
      expect((await c.pread(512, 8192)).length).toBe(512);
    } finally {
      await c.disconnect();
    }
    const f = await controlCall<{ counts: { injected: number }; rules: Array<{ fired: number }> }>(A, "GET", "v1/exports/disk/faults");
    expect(f.rules[0]!.fired).toBe(1);
    expect((await cli(["fault", "disk", "--control", A, "--clear"])).status).toBe(0);
  });
});

