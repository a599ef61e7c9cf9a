#!/usr/bin/env -S MALLOC_MMAP_THRESHOLD_=131072 node --max-semi-space-size=1
import { Command, InvalidArgumentError, Option } from "commander";
import { serveCommand } from "./commands/serve.js";
import { stackHelp } from "./config/stack-spec.js";
import { useTokenFile } from "./commands/token-option.js";
import { registerCowCommands } from "./commands/cow.js";
import { registerVolumeCommands } from "./commands/volume.js";
import { registerFsCommands } from "./commands/fs.js";
import { LOG_LEVELS } from "./log.js";

/**
 * A command whose code is imported when it runs: `serve` keeps no other command's code (the NBD
 * client and fio driver of `bench`, the control client of `migrate`) in its memory.
 */
function lazyAction<A extends unknown[]>(load: () => Promise<(...args: A) => unknown>): (...args: A) => Promise<void> {
  return async (...args) => void (await (await load())(...args));
}

const program = new Command();
program
  .name("nbdstack")
  .description("A block-storage node: serves disk images to NBD clients through a layered driver stack.")
  .version("0.1.0");

// A reader of stdout that goes away (`nbdstack status URL | head -1`, `fault … --list | grep -q rule`)
// ends the command quietly, as it ends a Unix tool: no stack trace, and the exit status the command
// has set so far (0 unless it failed). `serve` is the exception: the URIs it prints are a courtesy,
// its work is the exports, so it stops printing and serves on (and still shuts down cleanly).
// A closed stderr loses only diagnostics (progress bars, messages): the command goes on with its
// work — a `migrate --copy` whose progress nobody reads still moves the export, and exits with the
// move's status.
let keepRunningOnClosedPipe = false;
program.hook("preAction", (_program, command) => {
  keepRunningOnClosedPipe = command.name() === "serve";
});
for (const stream of [process.stdout, process.stderr]) {
  stream.on("error", (err: NodeJS.ErrnoException) => {
    if (err.code !== "EPIPE" && err.code !== "ERR_STREAM_DESTROYED") throw err;
    if (stream === process.stdout && !keepRunningOnClosedPipe) process.exit();
  });
}

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
  .option("-c, --config <file>", "YAML file declaring exports and their stacks bottom-up (syntax in the README); its server keys apply where flags are not given")
  .option("--overlay <file>", "copy-on-write overlay of the image in the same position: writes go to this file (created if missing), the image is only read; FILE.qcow2 (or an existing qcow2 image): a qcow2 overlay whose backing file is the image, as qemu-img create -f qcow2 -b IMAGE -F FMT makes; any other name: nbdstack's cow format; repeatable", collect, [])
  .option("--demo", "also serve the built-in demo disk (GPT, ext4 + FAT) as export \"demo\", on a temporary copy", false)
  .addOption(
    new Option("--io <mode>", "how file ports call the kernel: auto (small requests on the event loop while the page cache answers fast), sync, async (always the thread pool)")
      .choices(["auto", "sync", "async"])
      .default("auto"),
  )
  .addOption(
    new Option("--discard <mode>", "TRIM: unmap (offered wherever the stack can honour it: files get holes punched, qcow2 clusters are freed, memory freed) or ignore (not offered: nbdinfo shows can_trim false)")
      .choices(["unmap", "ignore"])
      .default("unmap"),
  )
  .option("--max-inflight <n>", "requests in flight per connection before the socket is paused", positiveInt, 128)
  .option("--max-inflight-bytes <size>", "payload bytes in flight per connection before the socket is paused", "128M")
  .option("--max-memory <size>", "memory all clients together may make the server hold (payloads in flight, replies not yet read, handshake bytes); when it is used up, sockets are paused until it is given back (default 8M)")
  .option("--threads <n>", "event loops serving connections: worker processes beside the primary share the exports whose stacks are coherent across processes (file, partition, concat, stripe, fs-file); the others stay with the primary (see src/server/THREADS.md)", positiveInt, 1)
  .option("--max-connections <n>", "connections open at once; more are closed at once with a log line", positiveInt, 1024)
  .option("--max-connections-per-client <n>", "connections open at once from one client address", positiveInt, 256)
  .option("--handshake-timeout <time>", "time a client has to finish the handshake (0: no limit)", "10s")
  .option("--idle-timeout <time>", "close a connection with nothing in flight for this long (0: never)", "0")
  .option("--node-id <id>", "run as a cluster node with this id: image exports get a port redirector and a lease record beside the image, and can move between nodes")
  .option("--data-dir <dir>", "with --node-id: where images received by live copy ('nbdstack migrate --copy') are created and served from")
  .option("--control <host:port>", "address of the control API (HTTP/JSON; started with --node-id or --fault, on 127.0.0.1 and a free port unless given)")
  .option("--token-file <path>", "bearer token that mutating control calls need; created (mode 0600) if missing (default ~/.config/nbdstack/token, or $NBDSTACK_TOKEN_FILE)")
  .addOption(new Option("--tls <mode>", "NBD_OPT_STARTTLS: off, on (offered), require (nothing but STARTTLS/ABORT before TLS); default require when credentials are given, else off").choices(["off", "on", "require"]))
  .option("--tls-cert <file>", "PEM certificate (chain) of this server; also served by the control API (HTTPS) and shown to peers")
  .option("--tls-key <file>", "PEM private key of --tls-cert")
  .option("--tls-ca <file>", "PEM CA bundle that client certificates (--tls-verify-peer) and peers' certificates are checked against")
  .option("--tls-certificates <dir>", "directory in the nbdkit/qemu layout: ca-cert.pem, server-cert.pem, server-key.pem (client-cert.pem, client-key.pem for port B)")
  .option("--tls-verify-peer", "require a client certificate signed by the CA", false)
  .option("--tls-psk <file>", "TLS-PSK keys in psktool's format (identity:hexkey a line); port B uses the first identity")
  .option("--lease-ttl <duration>", "how long a node's lease on an image lasts without renewal", "5s")
  .option("--etcd <urls>", "with --node-id: keep ownership, membership and the export directory in etcd at these client URLs (comma-separated; nodes on several hosts) instead of lease files beside the images")
  .option("--etcd-prefix <prefix>", "key prefix in etcd of this cluster (default /nbdstack)")
  .option("--etcd-cacert <file>", "PEM CA bundle that etcd's certificates are checked against (https:// endpoints)")
  .option("--etcd-cert <file>", "PEM client certificate for etcd members run with --client-cert-auth")
  .option("--etcd-key <file>", "PEM private key of --etcd-cert")
  .option("--etcd-user <name>", "etcd user (auth enabled); the password comes from $NBDSTACK_ETCD_PASSWORD or --etcd-password-file")
  .option("--etcd-password-file <file>", "file holding the password of --etcd-user (first line)")
  .option("--write-audit <file>", "with --node-id: append a JSON line {t, mono, node, export, epoch, op, offset, length} for every write, zero, trim and flush that reaches an image (after the image-level fence)")
  .option("--no-partitions", "do not export the partitions of each image as NAME/p1, NAME/p2, …")
  .option("--fault", "put a fault layer (no rules yet) directly above each export's port; steer it with 'nbdstack fault'", false)
  .option("--fault-seed <n>", "seed of the fault layers' random decisions", (v: string) => Number(v), 1)
  .option("--fault-powerloss", "fault layer keeps unflushed writes in a volatile cache that 'nbdstack fault --powercut' loses (implies --fault)", false)
  .addOption(new Option("--log-level <level>", "log level (default: $NBDSTACK_LOG, else info)").choices(LOG_LEVELS))
  .addOption(new Option("--log-format <format>", "log format (default: pretty when stdout is a terminal, else json)").choices(["json", "pretty"]))
  .addHelpText("after", () => `\n${stackHelp()}`)
  .action(serveCommand);

program
  .command("migrate")
  .description("move export NAME from the node that owns it to another node, while clients keep doing I/O")
  .argument("<name>", "export name")
  .requiredOption("--from <url>", "control URL of the node that owns the export now, e.g. http://127.0.0.1:9001")
  .requiredOption("--to <url>", "control URL of the node that takes it over")
  .option("--copy", "the nodes do not share storage: copy the image to the destination while clients keep writing (live mirror), then hand over")
  .addOption(new Option("--mode <mode>", "with --copy: background (switches to write-blocking if writes outpace the copy) or write-blocking from the start").choices(["background", "write-blocking"]))
  .option("--skip-free", "with --copy: do not copy blocks the file systems on the image report free (their content is not copied)")
  .option("--max-rate <rate>", "with --copy: copy at most this many bytes per second, e.g. 200M")
  .option("--no-progress", "with --copy: no progress bar")
  .option("--wait", "wait until the move has completed (the default: the command returns when clients are served by the new owner)", true)
  .option("--json", "print the result as JSON", false)
  .option("--token-file <path>", "the cluster's control token (default ~/.config/nbdstack/token)")
  .hook("preAction", useTokenFile)
  .action(lazyAction(async () => (await import("./commands/cluster.js")).migrateCommand));

program
  .command("bench")
  .description("drive I/O at an NBD export, optionally moving it between nodes and injecting faults; report what clients saw")
  .argument("<uri>", "nbd://HOST:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH")
  .addOption(new Option("--rw <mode>", "workload").choices(["read", "write", "randread", "randwrite", "randrw"]).default("randrw"))
  .option("--mix <percent>", "reads in percent for randrw", "70")
  .option("--bs <size>", "request size (a multiple of 512)", "4k")
  .option("--qd <n>", "requests in flight per connection", "32")
  .option("--conns <n>", "connections (multi-conn)", "1")
  .option("--duration <time>", "how long to run, e.g. 30s", "30s")
  .option("--bytes <size>", "stop after this many bytes instead")
  .option("--range <start-end>", "part of the export to use, e.g. 0-1G")
  .option("--verify", "write self-describing data, check every read, read everything back at the end (fails the run on a mismatch)", false)
  .option("--seed <n>", "seed of the random offsets and of the verify pattern", "1")
  .option("--migrate-every <time>", "move the export between --nodes round robin this often")
  .option("--migrate-at <time>", "move the export once, at this time (instead of --migrate-every)")
  .option("--migrate-copy", "moves are live copies (nodes without shared storage): the image travels, then the hand-over", false)
  .addOption(new Option("--copy-mode <mode>", "with --migrate-copy: how the copy starts").choices(["background", "write-blocking"]))
  .option("--copy-max-rate <size>", "with --migrate-copy: copy at most this many bytes per second, e.g. 200M")
  .option("--rate-iops <n>", "start at most this many requests per second (all connections; fio: --rate_iops)")
  .option("--nodes <urls>", "control URLs of the nodes serving the export, comma-separated")
  .option("--fault <rule@time>", "apply a fault rule at a time, e.g. op=pwrite,errno=EIO,rate=0.01@10s; repeatable", collect, [])
  .option("--fault-control <url>", "control URL to apply --fault rules on (default: the first of --nodes)")
  .addOption(new Option("--engine <engine>", "who drives the load: the built-in NBD client, or fio's nbd engine (its latency logs go into the same report)").choices(["builtin", "fio"]).default("builtin"))
  .option("--json <file>", "write the summary and the 100 ms series as JSON")
  .option("--report <file>", "write a self-contained HTML page with IOPS and p99 charts")
  .option("--token-file <path>", "the control token for moves and faults (default ~/.config/nbdstack/token)")
  .hook("preAction", useTokenFile)
  .action(lazyAction(async () => (await import("./commands/bench.js")).benchCommand));

program
  .command("fault")
  .description("steer the fault layer of export NAME at run time (serve it with --fault)")
  .argument("<name>", "export name")
  .requiredOption("--control <url>", "control URL of the server, e.g. http://127.0.0.1:9001")
  .option("--add <rule>", "add a rule, e.g. op=pread,errno=EIO,range=1048576-2097152 (syntax in the README)")
  .option("--clear", "remove every rule (and release stalled requests)")
  .option("--list", "list rules and counters (the default)")
  .option("--release", "let requests stalled by a 'stall' rule go on")
  .option("--powercut", "lose the writes not yet flushed, then fail every request with ESHUTDOWN (needs --fault-powerloss)")
  .option("--keep <fraction>", "with --powercut: fraction of unflushed writes that reach the disk anyway (seeded)", Number)
  .option("--torn", "with --powercut: kept writes may be torn at 512-byte sectors")
  .option("--poweron", "serve requests again after a power cut")
  .option("--token-file <path>", "the control token (default ~/.config/nbdstack/token)")
  .hook("preAction", useTokenFile)
  .action(lazyAction(async () => (await import("./commands/cluster.js")).faultCommand));

program
  .command("status")
  .description("show a node's exports: owner, epoch, redirector state, requests in flight and held (a server without --node-id: its exports and event loops)")
  .argument("<url>", "control URL of a node, e.g. http://127.0.0.1:9001")
  .option("--json", "print the raw status as JSON", false)
  .action(lazyAction(async () => (await import("./commands/cluster.js")).statusCommand));

registerVolumeCommands(program);
registerFsCommands(program);
registerCowCommands(program);

program.parseAsync(process.argv).catch((err: unknown) => {
  process.stderr.write(`nbdstack: ${err instanceof Error ? err.message : String(err)}\n`);
  process.exit(1);
});
