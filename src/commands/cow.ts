import type { Command } from "commander";
import { controlCall } from "../control/control-client.js";
import { useTokenFile } from "./token-option.js";
import type { CowInfo } from "../stack/volume/cow-layer.js";

const cowPath = (name: string) => `v1/exports/${encodeURIComponent(name)}/cow`;

function mib(n: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return i === 0 ? `${n} B` : `${n.toFixed(1)} ${units[i]}`;
}

function printChain(info: CowInfo): void {
  for (const e of info.chain) process.stdout.write(`${e.role.padEnd(8)}  ${mib(e.allocatedBytes).padStart(12)} data  ${mib(e.zeroedBytes).padStart(12)} zeroed  ${e.path}\n`);
  process.stdout.write(`base      ${info.base}\n`);
  const m = info.merge;
  if (m.state !== "idle") process.stdout.write(`merge     ${m.state}: ${mib(m.doneBytes)} of ${mib(m.totalBytes)} from ${m.from} into ${m.into}${m.error ? ` (${m.error})` : ""}\n`);
}

export async function snapshotCommand(name: string, o: { control: string; as?: string; json: boolean }): Promise<void> {
  const r = await controlCall<CowInfo & { snapshot: string }>(o.control, "POST", cowPath(name), { snapshot: o.as ?? true }, 120_000);
  if (o.json) process.stdout.write(JSON.stringify(r) + "\n");
  else process.stdout.write(`froze the overlay of ${name} as ${r.snapshot}; new writes go to ${r.overlay}\n`);
}

export async function mergeCommand(name: string, o: { control: string; intoBase: boolean; wait: boolean; json: boolean }): Promise<void> {
  let info = await controlCall<CowInfo>(o.control, "POST", cowPath(name), { merge: true, mergeIntoBase: o.intoBase });
  const started = info.merge.startedAt;
  if (o.wait) {
    const { CopyProgressBars } = await import("./progress-bar.js"); // cli-progress, loaded when a bar is drawn
    const bars = new CopyProgressBars({ enabled: !o.json });
    try {
      while (info.merge.state === "running" && info.merge.startedAt === started) {
        bars.update("merge", `merging ${name}`, info.merge);
        await new Promise((r) => setTimeout(r, 250));
        info = await controlCall<CowInfo>(o.control, "GET", cowPath(name));
      }
      if (info.merge.startedAt === started) bars.update("merge", `merging ${name}`, info.merge);
    } finally {
      bars.stop();
    }
    if (info.merge.state === "failed") throw new Error(`merge of ${name} failed: ${info.merge.error ?? "unknown error"}`);
  }
  if (o.json) process.stdout.write(JSON.stringify(info) + "\n");
  else if (o.wait) process.stdout.write(`merged ${mib(info.merge.doneBytes)} of ${name} into ${info.merge.into}; overlay is now ${info.overlay}\n`);
  else process.stdout.write(`merging ${name} into ${info.merge.into}; follow it with 'nbdstack cow ${name} --control ${o.control}'\n`);
}

export async function cowStatusCommand(name: string, o: { control: string; json: boolean }): Promise<void> {
  const info = await controlCall<CowInfo>(o.control, "GET", cowPath(name));
  if (o.json) process.stdout.write(JSON.stringify(info, null, 2) + "\n");
  else printChain(info);
}

/** `nbdstack snapshot`, `nbdstack merge` and `nbdstack cow` (status) against a node's control API. */
export function registerCowCommands(program: Command): void {
  const tokenOpt = ["--token-file <path>", "the control token (default ~/.config/nbdstack/token)"] as const;
  program
    .command("snapshot")
    .description("freeze the copy-on-write overlay of export NAME and start a new one above it, while clients keep writing")
    .argument("<name>", "export name")
    .requiredOption("--control <url>", "control URL of the server, e.g. http://127.0.0.1:9001")
    .option("--as <file>", "file name of the frozen overlay, beside it (default OVERLAY.snap-N)")
    .option("--json", "print the result as JSON", false)
    .option(...tokenOpt)
    .hook("preAction", useTokenFile)
    .action(snapshotCommand);
  program
    .command("merge")
    .description("fold the copy-on-write overlay of export NAME into the snapshot below it (or the base), while clients keep writing")
    .argument("<name>", "export name")
    .requiredOption("--control <url>", "control URL of the server, e.g. http://127.0.0.1:9001")
    .option("--into-base", "with no snapshot below the overlay, write it into the base image (which must be served writable)", false)
    .option("--wait", "wait until the merge has finished, with a progress bar on stderr", false)
    .option("--json", "print the result as JSON", false)
    .option(...tokenOpt)
    .hook("preAction", useTokenFile)
    .action(mergeCommand);
  program
    .command("cow")
    .description("show the copy-on-write chain of export NAME: overlay, snapshots, base, merge progress")
    .argument("<name>", "export name")
    .requiredOption("--control <url>", "control URL of the server, e.g. http://127.0.0.1:9001")
    .option("--json", "print the raw status as JSON", false)
    .option(...tokenOpt)
    .hook("preAction", useTokenFile)
    .action(cowStatusCommand);
}
