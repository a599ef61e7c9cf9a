#!/usr/bin/env node
// npm run nemesis -- [--minutes M | --seconds S] [--seed N] [--nodes 2|3] [--lease-ttl MS] [--ops N]
//                    [--every MS] [--weights kind=W,…] [--exclude RULE-PART]… [--no-powerloss]
//                    [--copy-node] [--lab] [--self-test] [--keep] [--dir DIR] [--json FILE] [--quiet] [--help]
// Runs the nemesis harness (README.md beside this file) against the built CLI (dist/) and exits 1
// when the checker saw anything; the seed and the history around each failure are printed.
import fs from "node:fs";
import { scriptOptions } from "../helpers/script-options.mjs";
import { describe, runNemesis } from "./harness.mjs";

const USAGE = fs.readFileSync(new URL(import.meta.url), "utf8").split("\n").slice(1, 4).map((l) => l.replace(/^\/\/ ?/, "")).join("\n");
const { values: v } = scriptOptions("nemesis", USAGE, {
  minutes: { type: "string" },
  seconds: { type: "string" },
  seed: { type: "string" },
  nodes: { type: "string", default: "2" },
  "lease-ttl": { type: "string", default: "2000" },
  ops: { type: "string", default: "600" },
  every: { type: "string", default: "1500" },
  "no-powerloss": { type: "boolean", default: false },
  keep: { type: "boolean", default: false },
  dir: { type: "string" },
  json: { type: "string" },
  quiet: { type: "boolean", default: false },
  "self-test": { type: "boolean", default: false },
  weights: { type: "string" },
  exclude: { type: "string", multiple: true, default: [] },
  "copy-node": { type: "boolean", default: false },
  lab: { type: "boolean", default: false },
});
const seconds = v.seconds ? Number(v.seconds) : v.minutes ? Number(v.minutes) * 60 : 120;
const seed = v.seed ? Number(v.seed) : Math.floor(Math.random() * 2 ** 31);
process.stdout.write(`nemesis: seed ${seed}, ${seconds} s\n`);
// Ctrl-C once: stop the nemesis, heal and check what ran so far; twice: stop at once (every
// node is killed by its pid on exit).
const stop = new AbortController();
process.on("SIGINT", () => {
  if (stop.signal.aborted) process.exit(130);
  process.stdout.write("\nnemesis: interrupted; healing and checking (Ctrl-C again to stop at once)\n");
  stop.abort();
});
const result = await runNemesis({
  signal: stop.signal,
  seconds,
  seed,
  nodes: Number(v.nodes),
  leaseTtlMs: Number(v["lease-ttl"]),
  opsPerSecond: Number(v.ops),
  every: Number(v.every),
  powerloss: !v["no-powerloss"],
  keep: v.keep,
  dir: v.dir,
  trustUnflushed: v["self-test"],
  excludeRules: v.exclude,
  copyNode: v["copy-node"],
  lab: v.lab,
  weights: v.weights ? Object.fromEntries(v.weights.split(",").map((kv) => { const [k, w] = kv.split("="); return [k, Number(w)]; })) : undefined,
  log: v.quiet ? () => {} : (l) => process.stdout.write(`${l}\n`),
});
process.stdout.write(`\n${describe(result)}\n`);
if (v.json) fs.writeFileSync(v.json, JSON.stringify({ ok: result.ok, summary: result.summary, failures: result.failures }, null, 2));
process.exit(result.ok ? 0 : 1);
