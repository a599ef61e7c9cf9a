// The nemesis harness as a test (NEMESIS=1; .ci/run runs it alone after the suite, see README.md):
// NEMESIS_SECONDS (default 120) of migrations, pauses past the lease, kills and restarts, and fault
// rules against two nodes under a verifying load. NEMESIS_SEED picks the schedule (.ci/run fixes
// one; without it, a new one per run, printed: a failure prints it).
// Longer runs: `npm run nemesis -- --minutes 30 --seed N` (README.md beside this file).
import { expect, it } from "vitest";
// @ts-expect-error -- a plain ES module without types, shared with scripts run by node
import { describe as describeRun, runNemesis } from "./harness.mjs";

const seconds = Number(process.env.NEMESIS_SECONDS ?? 120);
const seed = process.env.NEMESIS_SEED ? Number(process.env.NEMESIS_SEED) : Math.floor(Math.random() * 2 ** 31);
const nodes = Number(process.env.NEMESIS_NODES ?? 2);
// The nodes keep unflushed writes in a power-loss cache (--fault-powerloss), so that a killed owner
// really loses them and the durability checks mean something; NEMESIS_POWERLOSS=0 turns it off.
const powerloss = process.env.NEMESIS_POWERLOSS !== "0";
// NEMESIS_LAB=1: the nodes on hosts of a lab (network namespaces, etcd), with its network and etcd faults.
const lab = process.env.NEMESIS_LAB === "1";

it(`survives ${seconds} s of faults (seed ${seed}, ${nodes} nodes${powerloss ? ", power-loss caches" : ""}${lab ? ", on a lab with etcd" : ""}): no lost write, no stale read, one owner per epoch, no failed request`, async () => {
  const lines: string[] = [];
  const result = await runNemesis({ seconds, seed, nodes, powerloss, lab, log: (l: string) => lines.push(l) });
  const report = describeRun(result);
  console.log(report);
  if (!result.ok) console.log(lines.slice(-80).join("\n"));
  expect(result.ok, report).toBe(true);
  // The run really injected faults of every kind and the load really ran through them.
  const n = result.summary.nemesis;
  expect(n.migrateOk + n.stormOk).toBeGreaterThan(0);
  if (seconds >= 60) expect(n.kill + n.pause).toBeGreaterThan(0);
  if (lab && seconds >= 60) expect(n.partition + n.cutetcd + n.cutpeers + n.cutpair + n.loss + n.etcdminority + n.etcdmajority).toBeGreaterThan(0);
  expect(result.summary.ops.acked).toBeGreaterThan(1000);
}, (seconds + 240) * 1000);
