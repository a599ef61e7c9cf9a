import fs from "node:fs";
import { htmlReport, jsonReport, summaryText } from "../bench/report.js";
import { runBench, type RwMode } from "../bench/run.js";
import { runFio } from "../bench/fio.js";
import { parseSize } from "../util/size.js";
import { parseDuration } from "./serve.js";

export interface BenchCliOptions {
  rw: RwMode;
  mix: string;
  bs: string;
  qd: string;
  conns: string;
  duration: string;
  bytes?: string;
  range?: string;
  verify: boolean;
  seed: string;
  migrateEvery?: string;
  migrateAt?: string;
  migrateCopy?: boolean;
  copyMode?: "background" | "write-blocking";
  copyMaxRate?: string;
  rateIops?: string;
  nodes?: string;
  fault: string[];
  faultControl?: string;
  json?: string;
  report?: string;
  engine: "builtin" | "fio";
}

export async function benchCommand(uri: string, o: BenchCliOptions): Promise<void> {
  const bs = parseSize(o.bs);
  if (bs < 512 || bs % 512) throw new Error(`--bs ${o.bs}: a multiple of 512 bytes is needed (the verify pattern works per sector)`);
  let range = { start: 0, end: 0 };
  if (o.range) {
    const m = /^([^-]+)-([^-]+)$/.exec(o.range);
    if (!m) throw new Error(`--range ${o.range}: expected START-END, e.g. 0-1G`);
    range = { start: parseSize(m[1]!), end: parseSize(m[2]!) };
  }
  const nodes = o.nodes ? o.nodes.split(",").map((s) => s.trim()).filter(Boolean) : [];
  const migrateEveryMs = o.migrateEvery ? parseDuration(o.migrateEvery) : 0;
  if (migrateEveryMs && nodes.length < 2) throw new Error("--migrate-every needs --nodes URL,URL (at least two control URLs)");
  const migrateAtMs = o.migrateAt ? parseDuration(o.migrateAt) : 0;
  if (o.migrateAt && !(migrateAtMs > 0)) throw new Error(`--migrate-at ${o.migrateAt}: a time after the start is needed, e.g. 5s`);
  if (migrateAtMs && migrateEveryMs) throw new Error("--migrate-at (one move) and --migrate-every (repeated moves) exclude each other");
  if (migrateAtMs && nodes.length < 2) throw new Error("--migrate-at needs --nodes URL,URL (at least two control URLs)");
  if ((o.copyMode || o.copyMaxRate) && !o.migrateCopy) throw new Error("--copy-mode and --copy-max-rate apply to --migrate-copy moves only");
  if (o.migrateCopy && !migrateAtMs && !migrateEveryMs) throw new Error("--migrate-copy needs --migrate-at or --migrate-every");
  const migrateCopy = o.migrateCopy ? { ...(o.copyMode ? { mode: o.copyMode } : {}), ...(o.copyMaxRate ? { maxRate: parseSize(o.copyMaxRate) } : {}) } : undefined;
  const rateIops = o.rateIops ? Number(o.rateIops) : 0;
  if (o.rateIops && !(rateIops > 0)) throw new Error(`--rate-iops ${o.rateIops}: a positive number of requests per second is needed`);
  const faults = o.fault.map((f) => {
    const at = f.lastIndexOf("@");
    if (at < 0) throw new Error(`--fault ${f}: expected RULE@TIME, e.g. op=pread,errno=EIO,rate=0.01@5s`);
    return { rule: f.slice(0, at), atMs: parseDuration(f.slice(at + 1)) };
  });
  const tty = process.stderr.isTTY === true;
  const durationMs = parseDuration(o.duration);
  const run = o.engine === "fio" ? runFio : runBench;
  const result = await run({
    uri,
    rw: o.rw,
    mix: Number(o.mix),
    bs,
    qd: Number(o.qd),
    conns: Number(o.conns),
    durationMs,
    bytes: o.bytes ? parseSize(o.bytes) : 0,
    range,
    verify: o.verify,
    seed: Number(o.seed),
    nodes,
    migrateEveryMs,
    migrateAtMs,
    migrateCopy,
    rateIops,
    faults,
    faultControl: o.faultControl ?? nodes[0],
    onProgress: tty
      ? (p) =>
          process.stderr.write(
            `\r${(p.elapsedMs / 1000).toFixed(1)}/${(durationMs / 1000).toFixed(0)} s  ${p.ops} requests  ${Math.round(p.ops / (p.elapsedMs / 1000))} IOPS  ${p.errors} errors  ${p.moves} moves   `,
          )
      : undefined,
  });
  if (tty) process.stderr.write("\r\x1b[K");
  process.stdout.write(summaryText(result) + "\n");
  for (const h of result.handovers) {
    const c = h.copy;
    if (!c || h.error) continue;
    const mib = (n: number) => (n / 1048576).toFixed(1);
    process.stdout.write(
      `  live copy #${h.index}: ${mib(c.total)} MiB to copy at the start, ${mib(c.copied)} MiB copied in ${c.passes} passes, ${c.mode} mode at the end; ` +
        `copy phase ${((c.handoverStartMs - h.startMs) / 1000).toFixed(2)} s at ${Math.round(c.iops)} IOPS (longest gap ${c.longestCopyGapMs.toFixed(1)} ms), ` +
        `hand-over ${(h.endMs - c.handoverStartMs).toFixed(0)} ms at most, stall ${h.longestStallMs.toFixed(1)} ms\n`,
    );
  }
  if (o.json) fs.writeFileSync(o.json, jsonReport(result));
  if (o.report) fs.writeFileSync(o.report, htmlReport(result));
  const failed = result.errors > 0 || (result.verify?.failures.length ?? 0) > 0 || result.handovers.some((h) => h.error);
  if (failed) process.exitCode = 1;
}
