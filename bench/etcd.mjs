#!/usr/bin/env node
// npm run bench:etcd — what one etcd call costs here, the unit of a move's hold on etcd (the
// hand-over is one transaction, the claim another: src/coord/README.md). Starts a local
// 3-member etcd cluster (test/cluster/etcd.mjs, data in a temporary directory, stopped at the
// end) and times N calls of each kind through our client (src/coord/etcd-client.ts), one at a
// time. Knobs (environment): N (200), MEMBERS (3). Needs etcd (Debian: etcd-server) and a build.
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { EtcdClient, compare, op } from "../dist/coord/etcd-client.js";
import { ETCD_BIN, needEtcd, startLocalCluster } from "../test/cluster/etcd.mjs";
import { knobsOnly } from "./tools.mjs";

knobsOnly(import.meta.url);

const N = Number(process.env.N ?? 200);
const MEMBERS = Number(process.env.MEMBERS ?? 3);
if (!needEtcd()) {
  console.error("bench:etcd needs etcd (Debian: apt-get install etcd-server)");
  process.exit(1);
}
const dir = fs.mkdtempSync(path.join(os.tmpdir(), "nbdstack-bench-etcd-"));
const cluster = await startLocalCluster({ size: MEMBERS, dir });
const c = new EtcdClient({ endpoints: cluster.endpoints });
const pct = (xs, p) => xs[Math.min(xs.length - 1, Math.floor((xs.length * p) / 100))];
async function time(name, f) {
  for (let i = 0; i < 10; i++) await f(i); // warm the connection and etcd
  const xs = [];
  for (let i = 0; i < N; i++) {
    const t0 = performance.now();
    await f(i);
    xs.push(performance.now() - t0);
  }
  xs.sort((a, b) => a - b);
  console.log(`  ${name.padEnd(52)} ${pct(xs, 50).toFixed(2).padStart(7)} ${pct(xs, 90).toFixed(2).padStart(7)} ${pct(xs, 99).toFixed(2).padStart(7)}`);
}
try {
  const lease = await c.grantLease(10);
  const record = JSON.stringify({ image: "disk", owner: "h2", nbd: "10.77.0.2:10809", control: "http://10.77.0.2:9000", epoch: 5, leaseStart: Date.now(), ttlMs: 5000, serial: 1, handedFrom: ["h1@4"], holder: lease.id });
  await c.put("/b/record", record);
  const version = execFileSync(ETCD_BIN, ["--version"]).toString().match(/etcd Version: (\S+)/)?.[1] ?? "?";
  console.log(`\nbench:etcd — ${MEMBERS} local members (etcd ${version}), ${N} calls each, one at a time; ms\n`);
  console.log(`  ${"call".padEnd(52)} ${"p50".padStart(7)} ${"p90".padStart(7)} ${"p99".padStart(7)}`);
  await time("get (linearizable)", () => c.get("/b/record"));
  await time("get (serializable)", () => c.get("/b/record", { serializable: true }));
  await time("put", () => c.put("/b/k", "v"));
  await time("lease keep-alive", () => c.keepAliveOnce(lease.id));
  let rev = (await c.getOne("/b/record")).modRevision;
  await time("txn: compare, 2 puts (one bound to a lease), 2 gets", async () => {
    const r = await c.txn({
      compare: [compare.modRevision("/b/record", "==", rev)],
      success: [op.put("/b/record", record), op.put("/b/owner", "x", { lease: lease.id }), op.get("/b/record"), op.get("/b/owner")],
      failure: [op.get("/b/record")],
    });
    rev = r.header.revision;
  });
} finally {
  c.close();
  await cluster.stop();
  fs.rmSync(dir, { recursive: true, force: true });
}
