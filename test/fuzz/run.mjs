#!/usr/bin/env node
// npm run fuzz -- --help for the options.
// Runs the grammar-aware fuzzer (grammar-fuzzer.mjs) against the built CLI (dist/) and exits 1 on
// any hang, crash, corruption or reply against the spec; each failing conversation is printed and
// saved as JSON for --replay. Prints frames, connections and the server's peak RSS at the end.
import fs from "node:fs";
import path from "node:path";
import { scriptOptions } from "../helpers/script-options.mjs";
import { KINDS, conversationFromJSON, conversationToJSON, describeFailure, replay, runFuzz } from "./grammar-fuzzer.mjs";

const USAGE = `npm run fuzz -- [--minutes M | --seconds S | --conversations N] [--seed S] [--parallel P]
                [--out DIR] [--max-memory SIZE] [--kinds ${KINDS.map(([k]) => k).join(",")}]
                [--max-failures N] [--replay FILE] [--help]`;
const { values: v, refuse } = scriptOptions("fuzz", USAGE, {
  minutes: { type: "string" },
  seconds: { type: "string" },
  conversations: { type: "string" },
  seed: { type: "string" },
  parallel: { type: "string", default: "16" },
  out: { type: "string" },
  "max-memory": { type: "string" },
  replay: { type: "string" },
  kinds: { type: "string" },
  "max-failures": { type: "string", default: "10" },
});
const number = (name, min) => {
  if (v[name] === undefined) return undefined;
  const n = Number(v[name]);
  if (!Number.isFinite(n) || n < min) refuse(`--${name} needs a number of at least ${min}, not "${v[name]}"`);
  return n;
};
for (const [name, min] of [["minutes", 0], ["seconds", 0], ["conversations", 1], ["seed", 0], ["parallel", 1], ["max-failures", 1]]) number(name, min);
const unknownKinds = v.kinds ? v.kinds.split(",").filter((k) => !KINDS.some(([known]) => known === k)) : [];
if (unknownKinds.length) refuse(`--kinds: no such kind ${unknownKinds.map((k) => `"${k}"`).join(", ")}; the kinds are ${KINDS.map(([k]) => k).join(", ")}`);
const serverArgs = v["max-memory"] ? ["--max-memory", v["max-memory"]] : [];
const mib = (kib) => (kib / 1024).toFixed(1);

if (v.replay) {
  const conv = conversationFromJSON(JSON.parse(fs.readFileSync(v.replay, "utf8")));
  const r = await replay(conv, { serverArgs });
  process.stdout.write(`${describeFailure({ failure: r.ok ? "none: the conversation passes now" : r.failure, conversation: conv, trace: r.trace })}\n`);
  if (!r.ok) process.stdout.write(`server log (last lines):\n${r.serverLog}\n`);
  process.exit(r.ok ? 0 : 1);
}

const seconds = v.seconds ? Number(v.seconds) : v.minutes ? Number(v.minutes) * 60 : v.conversations ? Infinity : 60;
const conversations = v.conversations ? Number(v.conversations) : Infinity;
const seed = v.seed ? Number(v.seed) : Math.floor(Math.random() * 2 ** 31);
const out = v.out ?? fs.mkdtempSync("/tmp/nbdstack-fuzz-out-");
fs.mkdirSync(out, { recursive: true });
process.stdout.write(`fuzz: seed ${seed}, ${Number.isFinite(seconds) ? `${seconds} s` : `${conversations} conversations`}, ${v.parallel} at a time${serverArgs.length ? `, server ${serverArgs.join(" ")}` : ""}; failures go to ${out}\n`);
const line = (s) =>
  `${(s.elapsedMs / 1000).toFixed(0)} s: ${s.conversations} conversations, ${s.connections} connections, ${s.frames} frames (${s.mutatedFrames} mutated), ${s.requestsAnswered} requests and ${s.optionsAnswered} options answered; server RSS ${mib(s.rssKiB ?? 0)} MiB, peak ${mib(s.peakRssKiB)} MiB${s.budget ? `; budget peak ${mib(s.budget.peak / 1024)} MiB, ${s.budget.waits} waits` : ""}${s.failures ? `, ${s.failures} failures` : ""}`;
const { stats, failures } = await runFuzz({
  seed,
  durationMs: seconds * 1000,
  conversations,
  parallel: Number(v.parallel),
  serverArgs,
  kinds: v.kinds ? v.kinds.split(",") : null,
  maxFailures: Number(v["max-failures"]),
  onProgress: (s) => process.stdout.write(`${line(s)}\n`),
});
failures.slice(0, 20).forEach((f, i) => {
  let file;
  if (f.conversation) {
    file = path.join(out, `failure-${seed}-${f.conversation.index}.json`);
    fs.writeFileSync(file, `${JSON.stringify({ failure: f.failure, conversation: conversationToJSON(f.conversation), trace: f.trace }, null, 1)}\n`);
  }
  process.stdout.write(`\n#${i + 1} ${describeFailure(f, file)}\n`);
});
process.stdout.write(`\n${line(stats)}\n`);
process.stdout.write(`kinds: ${JSON.stringify(stats.kinds)}\nends: ${JSON.stringify(stats.ends)}\n`);
process.stdout.write(`verifier: ${stats.verifier.ops} write+read-back rounds (${mib(stats.verifier.bytes / 1024)} MiB), longest wait ${stats.verifier.longestMs} ms${stats.verifier.failure ? `, FAILED: ${stats.verifier.failure}` : ", no byte wrong"}\n`);
process.stdout.write(`server: peak RSS (VmHWM) ${mib(stats.peakRssKiB)} MiB; exit ${JSON.stringify(stats.serverExit)}\n`);
process.stdout.write(`${failures.length ? `FAILED: ${failures.length} failures` : "PASSED: no hang, crash, corruption or reply against the spec"}\n`);
process.exit(failures.length ? 1 : 0);
