import { InvalidArgumentError, type Command } from "commander";
import { controlCall } from "../control/control-client.js";
import { useTokenFile } from "./token-option.js";
import type { MirrorStatus } from "../stack/volume/mirror-layer.js";
import type { CopyProgressBars } from "./progress-bar.js";

export interface MirrorCommandOptions {
  control: string;
  resync?: number;
  wait?: boolean;
  json?: boolean;
  interval: number;
}

function mib(n: number): string {
  return (n / (1 << 20)).toFixed(1);
}

function percent(done: number, total: number): string {
  return total === 0 ? "100%" : `${Math.floor((100 * done) / total)}%`;
}

/** The mirror's legs as a table: index, state, errors, resync progress, last error, what the leg is. */
export function formatMirrorStatus(s: MirrorStatus): string {
  const rows = [["leg", "state", "errors", "resync", "last error", "device"]];
  for (const l of s.legs) {
    const r = l.resync ? `${percent(l.resync.doneBytes, l.resync.totalBytes)} (${mib(l.resync.doneBytes)}/${mib(l.resync.totalBytes)} MiB)` : "-";
    rows.push([String(l.index), l.state, String(l.errors), r, l.lastError ?? "-", l.describe]);
  }
  const w = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)));
  const lines = rows.map((r) => r.map((c, i) => c.padEnd(w[i]!)).join("  ").trimEnd());
  return `mirror of ${s.legs.length} legs, ${s.size} bytes, ${s.healthy} healthy\n${lines.join("\n")}\n`;
}

/** Polls until no leg (or leg `only`) is resyncing, showing a progress bar per resyncing leg (to its end). */
async function waitForResync(control: string, path: string, only: number | undefined, interval: number, bars: CopyProgressBars): Promise<MirrorStatus> {
  const shown = new Set<number>();
  for (;;) {
    const s = await controlCall<MirrorStatus>(control, "GET", path);
    const watched = s.legs.filter((l) => only === undefined || l.index === only);
    for (const l of watched) {
      if (!l.resync || (l.state !== "resyncing" && !shown.has(l.index))) continue;
      shown.add(l.index);
      bars.update(`leg ${l.index}`, `leg ${l.index} resync`, l.resync);
    }
    if (!watched.some((l) => l.state === "resyncing")) return s;
    await new Promise((r) => setTimeout(r, interval));
  }
}

export async function mirrorCommand(name: string, o: MirrorCommandOptions): Promise<void> {
  const path = `v1/exports/${encodeURIComponent(name)}/mirror`;
  if (o.resync !== undefined) {
    await controlCall<MirrorStatus>(o.control, "POST", path, { resync: o.resync });
    if (!o.json) process.stdout.write(`resync of leg ${o.resync} started\n`);
  }
  let s: MirrorStatus;
  if (o.wait) {
    const { CopyProgressBars } = await import("./progress-bar.js"); // cli-progress, loaded when a bar is drawn
    const bars = new CopyProgressBars({ enabled: !o.json });
    try {
      s = await waitForResync(o.control, path, o.resync, o.interval, bars);
    } finally {
      bars.stop();
    }
    const failed = s.legs.filter((l) => (o.resync === undefined ? l.resync !== null : l.index === o.resync) && l.state !== "ok");
    if (o.json) process.stdout.write(JSON.stringify(s, null, 2) + "\n");
    else process.stdout.write(formatMirrorStatus(s));
    if (failed.length) throw new Error(`resync of leg ${failed.map((l) => l.index).join(", ")} did not complete: ${failed.map((l) => l.lastError ?? l.state).join("; ")}`);
    return;
  }
  s = await controlCall<MirrorStatus>(o.control, "GET", path);
  if (o.json) process.stdout.write(JSON.stringify(s, null, 2) + "\n");
  else process.stdout.write(formatMirrorStatus(s));
}

function legIndex(value: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 0) throw new InvalidArgumentError("expected a leg index (0, 1, …)");
  return n;
}

function positive(value: string): number {
  const n = Number(value);
  if (!Number.isFinite(n) || n <= 0) throw new InvalidArgumentError("expected a positive number");
  return n;
}

/** Adds `nbdstack mirror NAME --control URL [--resync N] [--wait] [--json]`. */
export function registerVolumeCommands(program: Command): void {
  program
    .command("mirror")
    .description("show the legs of mirror volume NAME (state, errors, resync progress); rebuild a degraded leg online with --resync")
    .argument("<name>", "export name")
    .requiredOption("--control <url>", "control URL of the server, e.g. http://127.0.0.1:9001")
    .option("--resync <leg>", "start rebuilding degraded leg LEG (0-based) from the healthy legs; clients keep being served", legIndex)
    .option("--wait", "wait until the resync (of --resync LEG, or of every resyncing leg) ends, with a progress bar on stderr; exit 1 if it failed", false)
    .option("--interval <ms>", "with --wait: how often to poll the status", positive, 500)
    .option("--json", "print the status as JSON", false)
    .option("--token-file <path>", "the control token (default ~/.config/nbdstack/token)")
    .hook("preAction", useTokenFile)
    .action(mirrorCommand);
}
