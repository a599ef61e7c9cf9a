#!/usr/bin/env node
// Prints, per workload and metric, SERVER's median next to every peer's and the ratio SERVER/peer
// (for latencies the ratio is peer/SERVER, so above 1.0 always means SERVER is better).
// usage: node bench/ratios.mjs RESULTS/summary.tsv [SERVER]
import fs from "node:fs";

const [file, me = "nbdstack"] = process.argv.slice(2);
const rows = fs.readFileSync(file, "utf8").trim().split("\n").slice(1).map((l) => l.split("\t"));
const primary = new Set(["read_MiBs", "write_MiBs", "read_iops", "write_iops", "lat_p50_us", "lat_p99_us", "srv_cost"]);
const table = new Map(); // workload|metric -> server -> median
for (const [server, workload, metric, median] of rows) {
  if (!primary.has(metric) || median === "") continue;
  if (workload.startsWith("seq") && metric.endsWith("iops")) continue;
  const key = `${workload}|${metric}`;
  if (!table.has(key)) table.set(key, new Map());
  table.get(key).set(server, Number(median));
}
const lowerIsBetter = (m) => m.startsWith("lat_") || m === "srv_cost";
const peers = [...new Set(rows.map((r) => r[0]))].filter((s) => s !== me);
const head = ["workload", "metric", me, ...peers, ...peers.map((p) => `vs ${p}`), "vs best"];
const out = [head];
for (const [key, byServer] of table) {
  const [workload, metric] = key.split("|");
  const mine = byServer.get(me);
  if (mine === undefined) continue;
  const ratio = (p) => (p === undefined ? undefined : lowerIsBetter(metric) ? p / mine : mine / p);
  const ratios = peers.map((p) => ratio(byServer.get(p)));
  const known = ratios.filter((r) => r !== undefined);
  const fmt = (v) => (v === undefined ? "-" : v >= 100 ? v.toFixed(0) : v.toFixed(1));
  out.push([workload, metric, fmt(mine), ...peers.map((p) => fmt(byServer.get(p))), ...ratios.map((r) => (r === undefined ? "-" : r.toFixed(2))), known.length ? Math.min(...known).toFixed(2) : "-"]);
}
const widths = head.map((_, i) => Math.max(...out.map((r) => String(r[i]).length)));
console.log(`\n${me} vs peers (ratio > 1.00: ${me} better; srv_cost = server CPU µs per I/O, lower is better)`);
for (const r of out) console.log(r.map((c, i) => String(c).padEnd(widths[i])).join("  "));
