#!/usr/bin/env node
import { Command, InvalidArgumentError, Option } from "commander";
import { serveCommand } from "./commands/serve.js";

const program = new Command();
program
  .name("nbdstack")
  .description("A block-storage node: serves disk images to NBD clients through a layered driver stack.")
  .version("0.1.0");

function collect(value: string, previous: string[]): string[] {
  return [...previous, value];
}

function positiveInt(value: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n <= 0) throw new InvalidArgumentError("expected a positive integer");
  return n;
}

program
  .command("serve")
  .description("serve disk images (files or memory:SIZE) over NBD until SIGINT/SIGTERM")
  .argument("[images...]", "image files, or memory:SIZE for a sparse in-memory disk (e.g. memory:1G)")
  .option("-l, --listen <host:port>", "TCP address to listen on, repeatable (default 127.0.0.1:10809 unless --socket is given)", collect, [])
  .option("-s, --socket <path>", "Unix socket to listen on, repeatable", collect, [])
  .option("-n, --name <name>", "export name of the image in the same position, repeatable (default: file name without extension)", collect, [])
  .option("-r, --read-only", "serve every export read-only", false)
  .option("--demo", "also serve the built-in demo disk (GPT, ext4 + FAT) as export \"demo\", on a temporary copy", false)
  .addOption(
    new Option("--io <mode>", "how file ports call the kernel: auto (small requests on the event loop while the page cache answers fast), sync, async (always the thread pool)")
      .choices(["auto", "sync", "async"])
      .default("auto"),
  )
  .option("--max-inflight <n>", "requests in flight per connection before the socket is paused", positiveInt, 128)
  .option("--max-inflight-bytes <size>", "payload bytes in flight per connection before the socket is paused", "128M")
  .addOption(new Option("--log-level <level>", "log level").choices(["trace", "debug", "info", "warn", "error", "silent"]).default("info"))
  .addOption(new Option("--log-format <format>", "log format (default: pretty when stdout is a terminal, else json)").choices(["json", "pretty"]))
  .action(serveCommand);

program.parseAsync(process.argv).catch((err: unknown) => {
  process.stderr.write(`nbdstack: ${err instanceof Error ? err.message : String(err)}\n`);
  process.exit(1);
});
