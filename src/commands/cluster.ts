import { controlCall, getStatus, type ServerStatus } from "../control/control-client.js";
import { parseSize } from "../util/size.js";
import { CopyProgressBars } from "./progress-bar.js";

export interface MigrateOptions {
  from: string;
  to: string;
  json: boolean;
  copy?: boolean;
  mode?: "background" | "write-blocking";
  skipFree?: boolean;
  maxRate?: string;
  progress?: boolean;
}

interface MigrateResult {
  export: string;
  from: string;
  to: string;
  epoch: number;
  ms: number;
  copied?: number;
  mode?: string;
}

const MiB = 1024 * 1024;
const mib = (n: number) => (n / MiB).toFixed(1);

export async function migrateCommand(name: string, opts: MigrateOptions): Promise<void> {
  const path = `v1/exports/${encodeURIComponent(name)}/migrate`;
  if (!opts.copy) {
    const r = await controlCall<MigrateResult>(opts.from, "POST", path, { to: opts.to }, 120_000);
    if (opts.json) process.stdout.write(JSON.stringify(r) + "\n");
    else process.stdout.write(`moved ${r.export} from ${r.from} to ${r.to} (epoch ${r.epoch}) in ${r.ms.toFixed(1)} ms\n`);
    return;
  }
  const body = { to: opts.to, copy: true, mode: opts.mode, skipFree: !!opts.skipFree, maxRate: opts.maxRate ? parseSize(opts.maxRate) : undefined };
  // The call returns when the copy has converged and handed over; meanwhile, show its progress.
  const showBar = opts.progress !== false && !opts.json;
  const bars = new CopyProgressBars({ enabled: showBar });
  const show = () =>
    getStatus(opts.from)
      .then((s) => {
        const c = s.exports.find((e) => e.name === name)?.copy;
        if (c) bars.update("copy", c.phase, c, c.mode);
      })
      .catch(() => undefined);
  const poll = showBar ? setInterval(() => void show(), 500) : undefined;
  const cancel = () => {
    process.stderr.write("\ncancelling the live copy…\n");
    void controlCall(opts.from, "POST", `${path}/cancel`, {}).catch((err: Error) => process.stderr.write(`cancel failed: ${err.message}\n`));
  };
  process.once("SIGINT", cancel);
  try {
    const r = await controlCall<MigrateResult>(opts.from, "POST", path, body, 24 * 3600_000);
    clearInterval(poll);
    if (showBar) await show(); // the last state: nothing dirty
    bars.stop();
    if (opts.json) process.stdout.write(JSON.stringify(r) + "\n");
    else process.stdout.write(`moved ${r.export} from ${r.from} to ${r.to} (epoch ${r.epoch}) by live copy in ${(r.ms / 1000).toFixed(1)} s: ${mib(r.copied ?? 0)} MiB copied, ${r.mode} mode at the end\n`);
  } finally {
    bars.stop();
    clearInterval(poll);
    process.off("SIGINT", cancel);
  }
}

export async function statusCommand(url: string, opts: { json: boolean }): Promise<void> {
  const s = await getStatus(url);
  if (opts.json) {
    process.stdout.write(JSON.stringify(s, null, 2) + "\n");
    return;
  }
  if (!("nodeId" in s) || s.nodeId === undefined) return serverStatus(s as unknown as ServerStatus);
  process.stdout.write(`node ${s.nodeId}  nbd ${s.nbd}  control ${s.control}\n`);
  const rows = [["export", "owner", "epoch", "state", "in A", "in B", "held", "moves", "image"]];
  for (const e of s.exports) rows.push([e.name, e.owner ?? "-", String(e.epoch ?? "-"), e.state, String(e.inflightA), String(e.inflightB), String(e.held), String(e.moves), e.image ?? "-"]);
  table(rows);
  const c = s.cluster;
  if (!c) return;
  if ("error" in c) {
    process.stdout.write(`\ncluster: etcd cannot be read now: ${c.error}\n`);
    return;
  }
  process.stdout.write(`\ncluster (etcd ${c.etcd.endpoints.join(",")} ${c.etcd.prefix}): ${c.nodes.length} live node${c.nodes.length === 1 ? "" : "s"}\n`);
  table([["node", "nbd", "control", "host", "pid", "up"], ...c.nodes.map((n) => [n.nodeId, n.nbd, n.control, n.host, String(n.pid), `${Math.max(0, Math.round((Date.now() - n.started) / 1000))} s`])]);
  process.stdout.write("\n");
  table([["export", "owner", "epoch", "owner alive", "owner nbd"], ...c.exports.map((e) => [e.name, e.released ? `(released by ${e.owner})` : e.owner, String(e.epoch), e.live ? "yes" : "no (lease ended)", e.nbd])]);
}

/** A server started without --node-id: its exports (and event loops, with --threads). */
function serverStatus(s: ServerStatus): void {
  process.stdout.write("server (not a cluster node)\n");
  table([["export", "size", "stack"], ...s.exports.map((e) => [e.name === "" ? '""' : e.name, String(e.size), e.stack])]);
  if (!s.loops) return;
  process.stdout.write("\n");
  table([["loop", "pid", "ready", "connections", "restarts"], ...s.loops.map((l) => [String(l.loop), String(l.pid ?? "-"), l.ready ? "yes" : "no", String(l.connections), String(l.restarts)])]);
}

function table(rows: string[][]): void {
  const w = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)));
  for (const r of rows) process.stdout.write(r.map((c, i) => c.padEnd(w[i]!)).join("  ").trimEnd() + "\n");
}

export interface FaultOptions {
  control: string;
  add?: string;
  clear?: boolean;
  list?: boolean;
  release?: boolean;
  powercut?: boolean;
  keep?: number;
  torn?: boolean;
  poweron?: boolean;
}

interface FaultView {
  rules: Array<{ id: number; text: string; seen: number; fired: number }>;
  counts: Record<string, number>;
  lost?: number;
  kept?: number;
  released?: number;
}

export async function faultCommand(name: string, o: FaultOptions): Promise<void> {
  const path = `v1/exports/${encodeURIComponent(name)}/faults`;
  const body = o.add
    ? { add: o.add }
    : o.clear
      ? { clear: true }
      : o.release
        ? { release: true }
        : o.powercut
          ? { powercut: { keep: o.keep ?? 0, torn: !!o.torn } }
          : o.poweron
            ? { poweron: true }
            : null;
  const v = body ? await controlCall<FaultView>(o.control, "POST", path, body) : await controlCall<FaultView>(o.control, "GET", path);
  if (v.lost !== undefined) process.stdout.write(`power cut: ${v.lost} unflushed writes lost, ${v.kept} kept\n`);
  if (v.released !== undefined) process.stdout.write(`released ${v.released} stalled requests\n`);
  for (const r of v.rules) process.stdout.write(`rule ${r.id}: ${r.text}  (matched ${r.seen}, fired ${r.fired})\n`);
  process.stdout.write(`counts: ${Object.entries(v.counts).map(([k, n]) => `${k} ${n}`).join(", ")}\n`);
}
