import { spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { emptyResult, finishStalls, parseNbdUri, startSchedule, type BenchOptions, type BenchResult } from "./run.js";

/**
 * `nbdstack bench --engine fio`: the same workload run by fio's nbd engine (one connection per
 * job), with moves and faults scheduled as usual; fio's per-request latency logs are folded into
 * the same samples, so the summary, JSON and report compare directly with the built-in client.
 * With --verify, write workloads use fio's crc32c verification (verify_backlog).
 */
export async function runFio(o: BenchOptions): Promise<BenchResult> {
  const { exportName } = parseNbdUri(o.uri);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "nbdstack-fio-"));
  const writes = o.rw === "write" || o.rw === "randwrite" || o.rw === "randrw";
  const args = [
    "--name=bench",
    "--ioengine=nbd",
    `--uri=${o.uri}`,
    `--rw=${o.rw}`,
    `--rwmixread=${o.mix}`,
    `--bs=${o.bs}`,
    `--iodepth=${o.qd}`,
    `--numjobs=${o.conns}`,
    "--group_reporting",
    `--randseed=${o.seed}`,
    "--norandommap",
    `--write_lat_log=${path.join(dir, "lat")}`,
    "--log_avg_msec=0",
    "--output-format=json",
    ...(o.range.start || o.range.end ? [`--offset=${o.range.start}`, ...(o.range.end ? [`--size=${o.range.end - o.range.start}`] : [])] : []),
    ...(o.bytes ? [`--io_size=${o.bytes}`] : ["--time_based", `--runtime=${Math.max(1, Math.round(o.durationMs / 1000))}`]),
    ...(o.rateIops ? [`--rate_iops=${o.rateIops}`] : []),
    ...(o.verify && writes ? ["--verify=crc32c", "--verify_backlog=1024", "--verify_fatal=1", "--verify_state_save=0"] : []),
  ];
  const r = emptyResult(o);
  const samples = r.samples;
  const t0 = performance.now();
  const epoch0 = Date.now();
  let running = true;
  const fio = spawn("fio", args, { stdio: ["ignore", "pipe", "pipe"] });
  let out = "";
  let err = "";
  fio.stdout.on("data", (d) => (out += d));
  fio.stderr.on("data", (d) => (err += d));
  const schedule = startSchedule(o, exportName, t0, r, () => running);
  const code = await new Promise<number | null>((resolve, reject) => {
    fio.once("error", reject);
    fio.once("exit", resolve);
  });
  running = false;
  schedule.end();
  r.durationMs = performance.now() - t0;
  await schedule.done;

  const json = out.indexOf("{");
  if (json < 0) throw new Error(`fio failed (exit ${code}): ${err.trim() || out.trim()}`);
  const report = JSON.parse(out.slice(json));
  const job = report.jobs[0];
  // fio's log times count from its job start; place them on this run's clock (the report's
  // timestamp is the end of the job, job_runtime its length).
  const shift = Math.max(0, report.timestamp_ms - job.job_runtime - epoch0);
  r.reads = job.read.total_ios;
  r.writes = job.write.total_ios;
  r.bytes = job.read.io_bytes + job.write.io_bytes;
  if (job.error) {
    r.errors = 1;
    r.errorSamples.push(`fio: ${job.error}: ${err.trim().split("\n").slice(-2).join(" ")}`);
  }
  // Per-request latency logs: "time ms, latency ns, direction, size, offset".
  for (const f of fs.readdirSync(dir).filter((n) => n.startsWith("lat_lat."))) {
    for (const line of fs.readFileSync(path.join(dir, f), "utf8").split("\n")) {
      const c = line.split(",");
      if (c.length < 4) continue;
      const ddir = Number(c[2]);
      if (ddir !== 0 && ddir !== 1) continue; // reads and writes (verify reads count as reads)
      samples.add(Number(c[0]) + shift, Number(c[1]) / 1000);
    }
  }
  r.ops = samples.count;
  if (r.verify) r.verify.checkedReads = o.verify && writes ? job.read.total_ios : 0;
  if (r.verify && job.error && /verify/i.test(err)) r.verify.failures.push({ offset: -1, reason: `fio verify failed: ${err.trim().split("\n").pop()}` });
  fs.rmSync(dir, { recursive: true, force: true });
  finishStalls(r);
  return r;
}
