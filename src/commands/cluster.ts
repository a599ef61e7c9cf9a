import { controlCall, getStatus } from "../control/control-client.js";

export async function migrateCommand(name: string, opts: { from: string; to: string; json: boolean }): Promise<void> {
  const r = await controlCall<{ export: string; from: string; to: string; epoch: number; ms: number }>(
    opts.from,
    "POST",
    `v1/exports/${encodeURIComponent(name)}/migrate`,
    { to: opts.to },
    120_000,
  );
  if (opts.json) process.stdout.write(JSON.stringify(r) + "\n");
  else process.stdout.write(`moved ${r.export} from ${r.from} to ${r.to} (epoch ${r.epoch}) in ${r.ms.toFixed(1)} ms\n`);
}

export async function statusCommand(url: string, opts: { json: boolean }): Promise<void> {
  const s = await getStatus(url);
  if (opts.json) {
    process.stdout.write(JSON.stringify(s, null, 2) + "\n");
    return;
  }
  process.stdout.write(`node ${s.nodeId}  nbd ${s.nbd}  control ${s.control}\n`);
  const rows = [["export", "owner", "epoch", "state", "in A", "in B", "held", "moves", "image"]];
  for (const e of s.exports) rows.push([e.name, e.owner ?? "-", String(e.epoch ?? "-"), e.state, String(e.inflightA), String(e.inflightB), String(e.held), String(e.moves), e.image ?? "-"]);
  const w = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)));
  for (const r of rows) process.stdout.write(r.map((c, i) => c.padEnd(w[i]!)).join("  ").trimEnd() + "\n");
}
