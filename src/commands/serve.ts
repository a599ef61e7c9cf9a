import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { pipeline } from "node:stream/promises";
import { fileURLToPath } from "node:url";
import zlib from "node:zlib";
import { createLogger } from "../log.js";
import { DEFAULT_LIMITS, DEFAULT_MAX_MEMORY, NbdServer, type TcpAddress } from "../server/server.js";
import type { SharedExport } from "../server/loop-messages.js";
import type { Command } from "commander";
import { loadConfig } from "../config/config-file.js";
import { composeExport, defaultExportName, partitionExports, stackOf, StackHandles, type ExportSpec } from "../stack/compose.js";
import { coherentAcrossProcesses, kindOf } from "../stack/kinds.js";
import type { Export } from "../stack/export.js";
import type { EtcdNodeOptions } from "../coord/etcd-node.js";
import type { ControlServer } from "../control/control-server.js";
import { Metrics } from "../metrics/metrics.js";
import type { TlsFlags } from "../tls/tls-config.js";
import { parseSize } from "../util/size.js";
import type { IoMode } from "../stack/port/file-port.js";
import type { DiscardMode } from "../stack/disk/disk-layer.js";
// What only some servers use (a cluster node, etcd, TLS, the control API, --threads) is imported
// where it is used: a server of plain files does not hold that code in memory (see README,
// "Memory under hostile clients": the server's own memory).

export interface ServeOptions extends TlsFlags {
  listen: string[];
  socket: string[];
  name: string[];
  readOnly: boolean;
  demo: boolean;
  io: IoMode;
  discard: DiscardMode;
  maxInflight: number;
  maxInflightBytes: string;
  /** Absent: the config file's max-memory, else DEFAULT_MAX_MEMORY. */
  maxMemory?: string;
  maxConnections: number;
  maxConnectionsPerClient: number;
  /** Event loops serving connections (see server/THREADS.md); 1: the primary alone. */
  threads: number;
  handshakeTimeout: string;
  idleTimeout: string;
  /** Absent: $NBDSTACK_LOG, else info. */
  logLevel?: string;
  logFormat?: "json" | "pretty";
  nodeId?: string;
  dataDir?: string;
  control?: string;
  leaseTtl: string;
  partitions: boolean;
  fault: boolean;
  faultSeed: number;
  tokenFile?: string;
  faultPowerloss: boolean;
  overlay: string[];
  config?: string;
  etcd?: string;
  etcdPrefix?: string;
  etcdCacert?: string;
  etcdCert?: string;
  etcdKey?: string;
  etcdUser?: string;
  etcdPasswordFile?: string;
  writeAudit?: string;
}

export const DEFAULT_PORT = 10809;
export const DEMO_FIXTURE = fileURLToPath(new URL("../../fixtures/demo.img.gz", import.meta.url));

/** Parses HOST:PORT, [IPv6]:PORT, HOST or :PORT. */
export function parseListen(text: string): TcpAddress {
  const m = /^(?:\[([^\]]+)\]|([^:]*))(?::(\d+))?$/.exec(text);
  if (!m) throw new Error(`cannot read listen address "${text}" (expected HOST:PORT)`);
  const host = m[1] ?? (m[2] || "127.0.0.1");
  const port = m[3] === undefined ? DEFAULT_PORT : Number(m[3]);
  if (port > 65535) throw new Error(`bad port in "${text}"`);
  return { host, port };
}

/** Unpacks the demo disk into a temporary directory; the fixture itself is never written. */
async function demoCopy(): Promise<{ file: string; dir: string }> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "nbdstack-demo-"));
  const file = path.join(dir, "demo.img");
  await pipeline(fs.createReadStream(DEMO_FIXTURE), zlib.createGunzip(), fs.createWriteStream(file));
  return { file, dir };
}

/** A size that must be above zero (memory budgets, caps). */
function positiveSize(text: string, what: string): number {
  const n = parseSize(text);
  if (n <= 0) throw new Error(`${what} must be above zero (got "${text}")`);
  return n;
}

/** Parses "500ms", "10s", "2m" or a number of milliseconds. */
export function parseDuration(text: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*$/.exec(text);
  if (!m) throw new Error(`cannot read "${text}" as a duration (examples: 500ms, 10s, 1m)`);
  const n = Number(m[1]);
  return Math.round(m[2] === "s" ? n * 1000 : m[2] === "m" ? n * 60_000 : n);
}

/**
 * Sockets passed by systemd socket activation: LISTEN_FDS of them from fd 3, when LISTEN_PID is
 * this process. The variables are removed so that children do not take them too.
 */
export function activationFds(env: NodeJS.ProcessEnv = process.env): number[] {
  const pid = Number(env.LISTEN_PID);
  const n = Number(env.LISTEN_FDS);
  if (pid !== process.pid || !Number.isInteger(n) || n < 1) return [];
  delete env.LISTEN_PID;
  delete env.LISTEN_FDS;
  delete env.LISTEN_FDNAMES;
  return Array.from({ length: n }, (_, i) => 3 + i);
}

export function exportUri(addr: TcpAddress | { path: string }, name: string, tls = false): string {
  const enc = encodeURIComponent(name).replace(/%2F/g, "/");
  const scheme = tls ? "nbds" : "nbd";
  if ("path" in addr) return `${scheme}+unix:///${enc}?socket=${addr.path}`;
  const host = addr.host.includes(":") ? `[${addr.host}]` : addr.host;
  return `${scheme}://${host}:${addr.port}/${enc}`;
}

export async function serveCommand(images: string[], opts: ServeOptions, cmd?: Command): Promise<void> {
  const log = createLogger({ level: opts.logLevel, pretty: opts.logFormat === undefined ? undefined : opts.logFormat === "pretty" });
  const config = opts.config ? loadConfig(opts.config) : null;
  if (config) {
    // The config file's server settings apply where the command line says nothing.
    if (opts.listen.length === 0 && config.listen) opts.listen = config.listen;
    if (opts.socket.length === 0 && config.socket) opts.socket = config.socket;
    opts.control ??= config.control;
    opts.nodeId ??= config.nodeId;
    opts.etcd ??= config.etcd?.join(",");
    opts.etcdPrefix ??= config.etcdPrefix;
    opts.etcdCacert ??= config.etcdCacert;
    opts.etcdCert ??= config.etcdCert;
    opts.etcdKey ??= config.etcdKey;
    opts.etcdUser ??= config.etcdUser;
    if (config.io && cmd?.getOptionValueSource("io") !== "cli") opts.io = config.io;
    if (config.discard && cmd?.getOptionValueSource("discard") !== "cli") opts.discard = config.discard;
    opts.maxMemory ??= config.maxMemory;
    if (config.threads && cmd?.getOptionValueSource("threads") !== "cli") opts.threads = config.threads;
  }
  if (opts.dataDir && !opts.nodeId) throw new Error("--data-dir needs --node-id (it holds images a node receives from its peers)");
  if (opts.etcd && !opts.nodeId) throw new Error("--etcd needs --node-id (etcd keeps the ownership of a cluster node's exports)");
  if (images.length === 0 && !opts.demo && !config && !opts.dataDir) throw new Error("nothing to serve: give image files, memory:SIZE, --config FILE, --data-dir or --demo");
  if (opts.name.length > images.length) throw new Error(`${opts.name.length} --name options for ${images.length} images`);
  if (opts.overlay.length > images.length) throw new Error(`${opts.overlay.length} --overlay options for ${images.length} images`);

  const fault = opts.fault || opts.faultPowerloss ? { seed: opts.faultSeed, powerloss: opts.faultPowerloss, log } : undefined;
  const discard: DiscardMode = opts.discard ?? "unmap";
  const common = { readOnly: opts.readOnly, io: opts.io, discard, fault };
  const specs: Array<ExportSpec & { name: string; partitions?: boolean }> = images.map((source, i) => ({ source, name: opts.name[i] ?? defaultExportName(source), overlay: opts.overlay[i], ...common }));
  for (const e of config?.exports ?? []) {
    specs.push({ source: "", stack: e.stack, name: e.name, description: e.description, partitions: e.partitions ?? !e.stack.some((l) => kindOf(l).selectsPart), readOnly: opts.readOnly || !!e.readOnly, io: opts.io, discard: cmd?.getOptionValueSource("discard") === "cli" ? discard : (e.discard ?? discard), fault });
  }
  if (opts.dataDir) {
    // Images received by live copy earlier: served again, unless a copy into them never finished.
    fs.mkdirSync(opts.dataDir, { recursive: true });
    for (const f of fs.readdirSync(opts.dataDir).sort()) {
      if (!f.endsWith(".img")) continue;
      const image = path.join(opts.dataDir, f);
      if (fs.existsSync(`${image}.incomplete`)) {
        log.warn({ image }, "not serving an image whose live copy never finished");
        continue;
      }
      specs.push({ source: image, name: decodeURIComponent(f.slice(0, -4)), readOnly: opts.readOnly, io: opts.io, discard, fault });
    }
  }
  let demo: { file: string; dir: string } | null = null;
  if (opts.demo) {
    demo = await demoCopy();
    specs.push({ source: demo.file, name: "demo", ...common });
  }
  const seen = new Set<string>();
  for (const s of specs) {
    if (seen.has(s.name)) throw new Error(`export "${s.name}" is declared twice (use --name to tell images apart)`);
    seen.add(s.name);
  }
  const tlsModule = usesTls(opts) ? await import("../tls/tls-config.js") : null;
  const tlsConfig = tlsModule?.loadTlsConfig(opts) ?? null;
  const tcp = opts.listen.map(parseListen);
  const listenFds = activationFds();
  if (tcp.length === 0 && opts.socket.length === 0 && listenFds.length === 0) tcp.push({ host: "127.0.0.1", port: DEFAULT_PORT });

  const handles = new StackHandles();
  const ttlMs = parseDuration(opts.leaseTtl);
  const nbdAddr = tcp[0] ? `${tcp[0].host}:${tcp[0].port}` : "";
  const etcd = opts.etcd && opts.nodeId ? await (await import("../coord/etcd-node.js")).EtcdNode.start({ ...etcdOptions(opts), identity: { nodeId: opts.nodeId, nbd: nbdAddr, control: "" }, ttlMs, log }) : null;
  if (opts.writeAudit && !opts.nodeId) throw new Error("--write-audit needs --node-id (it records what a cluster node writes into its images)");
  const audit = opts.writeAudit ? new (await import("../stack/port/write-audit.js")).WriteAudit(path.resolve(opts.writeAudit)) : undefined;
  const node = opts.nodeId
    ? new (await import("../node/storage-node.js")).StorageNode({ nodeId: opts.nodeId, nbd: nbdAddr, log, ttlMs, audit, dataDir: opts.dataDir && path.resolve(opts.dataDir), io: opts.io, fault, handles, peerTls: tlsConfig ? tlsModule!.clientOptions(tlsConfig) : undefined, ...(etcd ? { ownership: (_image: string, name: string) => etcd.ownership(name), cluster: () => etcd.cluster() } : {}) })
    : null;
  // A lost etcd session ends every lease this node held: fence them now, not at the next renewal.
  if (node && etcd) etcd.onSessionLost((err) => node.storeLost(`this node's etcd session ended: ${err.message}`));
  const faults = handles.faults;
  const exports: Export[] = [];
  for (const s of specs) {
    const exp = node ? await node.createExport(s, handles) : await composeExport(s, handles, log);
    exports.push(exp);
    if (node || !opts.partitions || s.partitions === false) continue;
    // Each partition of the device is an export of its own: NAME/p1, NAME/p2, …
    await exp.open();
    const found = await partitionExports(exp, { discard: s.discard });
    if (found.table) log.info({ export: exp.name, scheme: found.table.scheme, partitions: found.exports.length, note: found.table.note }, "partitions found");
    else log.info({ export: exp.name, reason: found.reason }, "no partition exports");
    exports.push(...found.exports);
  }
  // serve --threads: exports whose stacks are coherent across processes are built by every event
  // loop too; the others (state in the process: cow, mirror, qcow2, fault, memory, a cluster
  // node's redirector) are served by this one, the primary.
  const threads = opts.threads ?? 1;
  const shared: SharedExport[] = threads > 1 && !node ? specs.filter((s) => coherentAcrossProcesses(stackOf(s))).map((s) => ({ spec: { ...s, fault: undefined }, partitions: opts.partitions && s.partitions !== false })) : [];
  if (threads > 1) {
    const names = new Set(shared.map((e) => e.spec.name));
    log.info({ threads, everyLoop: [...names], primaryOnly: specs.filter((s) => !names.has(s.name)).map((s) => s.name) }, "event loops");
    if (tlsConfig && shared.length) log.warn("with TLS every connection stays with the primary event loop (a TLS session cannot move between processes)");
  }
  const maxMemory = opts.maxMemory === undefined ? undefined : positiveSize(opts.maxMemory, "--max-memory");
  const limits = {
    ...DEFAULT_LIMITS,
    maxInflightRequests: opts.maxInflight,
    maxInflightBytes: parseSize(opts.maxInflightBytes),
    handshakeTimeoutMs: parseDuration(opts.handshakeTimeout),
    idleTimeoutMs: parseDuration(opts.idleTimeout),
  };
  // Metrics cost a little per request: collected only where a control API can serve them.
  // Layers steered at run time (fault, mirror, cow) need the control API.
  const steerable = handles.faults.size + handles.mirrors.size + handles.cows.size > 0;
  const metrics = node || opts.control || steerable ? new Metrics() : undefined;
  // Each event loop has its share of the memory budget: together they hold no more than --max-memory.
  const loopMemory = shared.length ? Math.floor((maxMemory ?? DEFAULT_MAX_MEMORY) / threads) : maxMemory;
  const pool = shared.length
    ? new (await import("../server/loop-pool.js")).LoopPool(threads, { exports: shared, limits, maxMemory: loopMemory!, metrics: !!metrics, logLevel: opts.logLevel, logPretty: opts.logFormat === undefined ? undefined : opts.logFormat === "pretty" }, log)
    : null;
  const server = new NbdServer({
    tls: tlsConfig ? tlsModule!.handshakeTls(tlsConfig) : null,
    metrics,
    exports,
    tcp,
    unixSockets: opts.socket,
    listenFds,
    log,
    limits,
    maxConnections: opts.maxConnections,
    maxConnectionsPerClient: opts.maxConnectionsPerClient,
    maxMemory: loopMemory,
    ...(pool ? { handOff: (n, l) => pool.handOff(n, l) } : {}),
  });
  pool?.countHere(() => server.connectionCount);
  const cleanup = () => {
    void pool?.close();
    if (demo) fs.rmSync(demo.dir, { recursive: true, force: true });
  };
  let controlUrl: string | null = null;
  let control: ControlServer | null = null;
  const routes = node || opts.control || steerable ? await controlModules() : null;
  if (routes) {
    const token = routes.loadOrCreateToken(opts.tokenFile);
    routes.setControlToken(token); // for the calls this node makes to its peers
    // With certificates the control API is HTTPS; with PSK alone it stays HTTP (bearer token, localhost).
    routes.setControlCa(tlsConfig?.ca ?? tlsConfig?.cert ?? null);
    control = new routes.ControlServer(log.child({ role: "control" }), token, tlsConfig?.cert && tlsConfig.key ? { cert: tlsConfig.cert, key: tlsConfig.key } : null);
  }
  try {
    await server.start();
    await pool?.start();
    if (control && routes) {
      const { attachNodeRoutes, attachFaultRoutes, attachMirrorRoutes, attachCowRoutes, REDIRECTOR_STATES } = routes;
      if (node) attachNodeRoutes(control, node);
      else control.route("GET", "/v1/status", async () => ({ body: { exports: server.list().map((e) => ({ name: e.name, size: e.size(), stack: e.description })), ...(pool ? { loops: pool.stats() } : {}) } }));
      attachFaultRoutes(control, faults);
      attachMirrorRoutes(control, handles.mirrors);
      attachCowRoutes(control, handles.cows, handles.qcow2s);
      const m = metrics!;
      if (pool) {
        m.addLoops(() => pool.metrics());
        m.gauge("nbdstack_loop_connections", "Connections each event loop serves (serve --threads; loop 0 is the primary)", ["loop"], (set) => {
          for (const l of pool.stats()) set({ loop: String(l.loop) }, l.connections);
        });
        m.gauge("nbdstack_loop_restarts_total", "Times a worker event loop was restarted after it died", ["loop"], (set) => {
          for (const l of pool.stats()) if (l.loop > 0) set({ loop: String(l.loop) }, l.restarts);
        });
      }
      control.route("GET", "/metrics", async () => ({ body: await m.text(), contentType: "text/plain; version=0.0.4" }));
      m.gauge("nbdstack_faults_injected_total", "Faults injected by fault layers, by kind", ["export", "kind"], (set) => {
        for (const [name, f] of faults) for (const [kind, n] of Object.entries(f.counts)) set({ export: name, kind }, n);
      });
      m.copyJobs(() => [
        ...(node?.statusNow().exports ?? []).flatMap((e) => (e.copy ? [{ export: e.name, job: "live-copy" as const, progress: e.copy }] : [])),
        ...[...handles.mirrors].flatMap(([name, mirror]) => mirror.status().legs.flatMap((l) => (l.resync ? [{ export: name, job: "resync" as const, leg: l.index, progress: l.resync }] : []))),
        ...[...handles.cows, ...handles.qcow2s].flatMap(([name, cow]) => ("refused" in cow || cow.progress.state === "idle" ? [] : [{ export: name, job: "merge" as const, progress: cow.progress }])),
      ]);
      if (node) {
        m.gauge("nbdstack_redirector_state", "1 for the port redirector's current state", ["export", "state"], (set) => {
          for (const r of node.redirectors()) for (const st of REDIRECTOR_STATES) set({ export: r.name, state: st }, r.stats.state === st ? 1 : 0);
        });
        m.gauge("nbdstack_held_requests", "Requests held by the port redirector during a move", ["export"], (set) => {
          for (const r of node.redirectors()) set({ export: r.name }, r.stats.held);
        });
        m.gauge("nbdstack_moves_total", "Moves of the export to or from this node", ["export"], (set) => {
          for (const r of node.redirectors()) set({ export: r.name }, r.stats.moves);
        });
        m.gauge("nbdstack_takeovers_total", "Take-overs of the export by this node after its owner's lease ended", ["export"], (set) => {
          for (const r of node.redirectors()) set({ export: r.name }, r.takeovers.count);
        });
        m.gauge("nbdstack_ownerless_seconds_total", "Time the export had no owner before this node's take-overs (from the old lease's end, as this node learnt it, to port A serving)", ["export"], (set) => {
          for (const r of node.redirectors()) set({ export: r.name }, r.takeovers.totalOwnerlessMs / 1000);
        });
        m.gauge("nbdstack_last_ownerless_seconds", "Time without an owner before this node's last take-over", ["export"], (set) => {
          for (const r of node.redirectors()) set({ export: r.name }, r.takeovers.lastOwnerlessMs / 1000);
        });
        m.gauge("nbdstack_inflight_requests", "Requests in flight through port A and port B", ["export", "port"], (set) => {
          for (const r of node.redirectors()) {
            set({ export: r.name, port: "A" }, r.stats.inflightA);
            set({ export: r.name, port: "B" }, r.stats.inflightB);
          }
        });
      }
      const c = parseListen(opts.control ?? "127.0.0.1:0");
      controlUrl = await control.listen(c.host, c.port);
    }
    if (node) {
      const nbd = server.addresses().find((a): a is TcpAddress => "port" in a && a.port > 0);
      if (!nbd) throw new Error("--node-id needs a TCP listener (peers reach the owner over TCP)");
      node.setNbdAddress(`${nbd.host}:${nbd.port}`);
      node.setPublisher({ add: (e) => server.add(e), remove: (n) => server.remove(n) });
      node.identity.control = controlUrl!;
      await etcd?.publish(node.identity);
      await node.start(controlUrl!);
    }
  } catch (err) {
    cleanup();
    throw err;
  }

  for (const e of server.list()) {
    for (const a of server.addresses()) process.stdout.write(`${exportUri(a, e.name, tlsConfig !== null)}\n`);
    log.info({ export: e.name, size: e.size(), stack: e.description, flags: e.transmissionFlags(true) }, "serving");
  }
  if (controlUrl) {
    process.stdout.write(`control ${controlUrl}\n`);
    log.info({ node: opts.nodeId ?? null, control: controlUrl }, "control API listening");
  }

  let signals = 0;
  const stop = (signal: string) => {
    if (++signals > 1) {
      log.warn({ signal }, "second signal: exiting without waiting");
      cleanup();
      process.exit(1);
    }
    log.info({ signal }, "shutting down: finishing requests in flight");
    // Worker loops stop beside the primary; the primary's connections handed to them end with them.
    Promise.all([pool?.close(), server.close()])
      .then(() => node?.close())
      .then(() => etcd?.close())
      .then(() => control?.close())
      .then(
        () => {
          audit?.close();
          cleanup();
          log.info("stopped");
          process.exit(0);
        },
        (err) => {
          log.error({ err }, "shutdown failed");
          cleanup();
          process.exit(1);
        },
      );
  };
  process.on("SIGINT", () => stop("SIGINT"));
  process.on("SIGTERM", () => stop("SIGTERM"));
}

/** Whether any --tls* flag is given (tls-config.ts, and node:tls with it, is loaded only then). */
function usesTls(opts: TlsFlags): boolean {
  return Object.entries(opts).some(([k, v]) => k.startsWith("tls") && v !== undefined && v !== false);
}

/** The control API's server, token and routes, loaded when a control API is served. */
async function controlModules() {
  const [server, client, token, faults, nodes, volumes, cows, redirector] = await Promise.all([
    import("../control/control-server.js"),
    import("../control/control-client.js"),
    import("../control/token.js"),
    import("../control/fault-routes.js"),
    import("../control/node-routes.js"),
    import("../control/volume-routes.js"),
    import("../control/cow-routes.js"),
    import("../stack/port/redirector.js"),
  ]);
  return {
    ControlServer: server.ControlServer,
    setControlToken: client.setControlToken,
    setControlCa: client.setControlCa,
    loadOrCreateToken: token.loadOrCreateToken,
    attachFaultRoutes: faults.attachFaultRoutes,
    attachNodeRoutes: nodes.attachNodeRoutes,
    attachMirrorRoutes: volumes.attachMirrorRoutes,
    attachCowRoutes: cows.attachCowRoutes,
    REDIRECTOR_STATES: redirector.REDIRECTOR_STATES,
  };
}

/** The etcd client settings of serve's --etcd* options (files read here, so a missing one fails at start). */
function etcdOptions(opts: ServeOptions): Pick<EtcdNodeOptions, "endpoints" | "prefix" | "tls" | "auth"> {
  const endpoints = opts.etcd!.split(",").map((u) => u.trim()).filter(Boolean);
  for (const u of endpoints) if (!/^https?:\/\/[^/]+\/?$/.test(u)) throw new Error(`--etcd: "${u}" is not an etcd client URL (http://HOST:PORT or https://HOST:PORT)`);
  const read = (flag: string, file: string | undefined) => {
    if (!file) return undefined;
    try {
      return fs.readFileSync(file, "utf8");
    } catch (err) {
      throw new Error(`${flag} ${file}: ${(err as Error).message}`);
    }
  };
  if (!!opts.etcdCert !== !!opts.etcdKey) throw new Error("--etcd-cert and --etcd-key go together");
  const ca = read("--etcd-cacert", opts.etcdCacert);
  const cert = read("--etcd-cert", opts.etcdCert);
  const key = read("--etcd-key", opts.etcdKey);
  const tls = ca || cert ? { ...(ca ? { ca } : {}), ...(cert ? { cert, key } : {}) } : undefined;
  let auth: EtcdNodeOptions["auth"];
  if (opts.etcdUser) {
    const password = process.env.NBDSTACK_ETCD_PASSWORD ?? read("--etcd-password-file", opts.etcdPasswordFile)?.split("\n")[0];
    if (password === undefined) throw new Error("--etcd-user needs a password: $NBDSTACK_ETCD_PASSWORD or --etcd-password-file");
    auth = { user: opts.etcdUser, password };
  }
  return { endpoints, prefix: opts.etcdPrefix, tls, auth };
}
