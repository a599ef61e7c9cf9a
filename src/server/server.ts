import fs from "node:fs";
import net from "node:net";
import type { Logger } from "pino";
import { Connection, type ConnectionLimits } from "./connection.js";
import type { Export } from "../stack/export.js";
import type { ExportDirectory, HandshakeTls, Negotiated } from "./handshake.js";
import { DEFAULT_MAX_PAYLOAD } from "../stack/disk/disk-layer.js";
import { exportOfPeerName, isInternalExport } from "../internal-exports.js";
import type { Metrics } from "../metrics/metrics.js";
import { MemoryBudget } from "./memory-budget.js";
import { ioBuffers } from "../util/buffer-pool.js";

export interface TcpAddress {
  host: string;
  port: number;
}

export interface ServerOptions {
  exports: Export[];
  tcp?: TcpAddress[];
  unixSockets?: string[];
  /** Listening sockets handed over by the service manager (systemd socket activation). */
  listenFds?: number[];
  log: Logger;
  limits?: Partial<ConnectionLimits>;
  /** Largest write payload accepted before the connection is closed. */
  maxPayload?: number;
  /** Read requests into reused buffers and big payloads straight into place (default true). */
  directReads?: boolean;
  /** Connections open at once, in all and per client address; more are closed at once, with a log line. */
  maxConnections?: number;
  maxConnectionsPerClient?: number;
  metrics?: Metrics;
  /** NBD_OPT_STARTTLS offered ("on") or required ("require"); absent: TLS off (NBD_REP_ERR_POLICY). */
  tls?: HandshakeTls | null;
  /**
   * The process-wide memory budget, in bytes, for what clients make the server hold: request
   * payloads in flight, replies not yet taken by slow readers, handshake bytes (see memory-budget.ts).
   */
  maxMemory?: number;
  /**
   * serve --threads: offered each connection once its handshake chose an export; moves it to
   * another event loop (returning a promise of its end there) or returns null to serve it here.
   * A connection handed off still counts here (limits, nbdstack_connections) until it ends there.
   */
  handOff?: (n: Negotiated, log: Logger) => Promise<void> | null;
}

/**
 * Default of --max-memory: four 1 MiB buffers. Measured on two machines (README, "Memory under
 * hostile clients"): on one, 1 MiB reads at QD8 lost 6 % against 6 MiB; on the other, 6 MiB lost
 * 6 % of 1 MiB reads and writes and of nbdcopy against 4 (why is not measured; fewer 1 MiB
 * buffers in turn is the difference). With the 54 MiB a server is at rest, it peaks at ~65 MiB
 * under bench:memory.
 */
export const DEFAULT_MAX_MEMORY = 4 * 1024 * 1024;

export const DEFAULT_LIMITS: ConnectionLimits = {
  maxInflightRequests: 128,
  maxInflightBytes: 128 * 1024 * 1024,
  maxQueuedReplyBytes: 32 * 1024 * 1024,
  handshakeTimeoutMs: 10_000,
  idleTimeoutMs: 0,
};

/** Listeners and the export directory; one Connection per accepted socket. */
export class NbdServer implements ExportDirectory {
  private readonly servers: net.Server[] = [];
  private readonly connections = new Set<Connection>();
  private readonly perClient = new Map<string, number>();
  private readonly limits: ConnectionLimits;
  private readonly maxPayload: number;
  /** Shared by every connection. */
  readonly memoryBudget: MemoryBudget;
  private nextId = 1;
  private closing: Promise<void> | null = null;

  constructor(private readonly opts: ServerOptions) {
    this.limits = { ...DEFAULT_LIMITS, ...opts.limits };
    this.maxPayload = opts.maxPayload ?? DEFAULT_MAX_PAYLOAD;
    this.memoryBudget = new MemoryBudget(opts.maxMemory ?? DEFAULT_MAX_MEMORY);
    opts.metrics?.memoryBudget(() => this.memoryBudget.stats());
    // Free I/O buffers kept for reuse count against the budget: a new buffer is made only once the
    // free ones leave room for it. Buffers let go ask for a collection once a quarter of the budget
    // waits for it: when the sizes clients ask for change (nbdcopy's 256 KiB reads, then 1 MiB
    // ones, then 4 KiB writes) the free buffers of the old size are let go while the new ones are
    // made, and with a whole budget's worth waiting the peak RSS of `npm run bench:memory`'s steps
    // plus 4 KiB writes was 77 MiB against 71 (a mixed-size fio run: same IOPS and CPU).
    ioBuffers.limitHeld(this.memoryBudget.limit);
    ioBuffers.setRoom(() => this.memoryBudget.roomForCache());
    ioBuffers.collectAfter(this.memoryBudget.limit / 4);
    this.memoryBudget.setCache(ioBuffers);
    const names = new Set<string>();
    for (const e of opts.exports) {
      if (names.has(e.name)) throw new Error(`two exports are named "${e.name}"`);
      names.add(e.name);
    }
  }

  /**
   * Export by name; "" is the default export (the first one) unless an export is named "".
   * peerExportName(name) is the same export as seen by another node's port B.
   */
  find(name: string): Export | undefined {
    const peerOf = exportOfPeerName(name);
    if (peerOf !== null) return this.find(peerOf);
    const exact = this.opts.exports.find((e) => e.name === name);
    if (exact || name !== "") return exact;
    return this.opts.exports[0];
  }

  /** Exports clients may see (NBD_OPT_LIST); names starting with "@" (live-copy targets) are never listed. */
  list(): Export[] {
    return this.opts.exports.filter((e) => !isInternalExport(e.name));
  }

  /** Opens an export and serves it from now on (exports created at run time: live-copy targets). */
  async add(exp: Export): Promise<void> {
    if (this.opts.exports.some((e) => e.name === exp.name)) throw new Error(`two exports are named "${exp.name}"`);
    await exp.open();
    this.opts.exports.push(exp);
  }

  /** Stops offering an export to new connections; connections using it keep it. */
  async remove(name: string): Promise<void> {
    const i = this.opts.exports.findIndex((e) => e.name === name);
    if (i >= 0) this.opts.exports.splice(i, 1);
  }

  /** Opens every export, then starts listening. */
  async start(): Promise<void> {
    for (const e of this.opts.exports) await e.open();
    for (const fd of this.opts.listenFds ?? []) await this.listen((s) => s.listen({ fd }));
    for (const a of this.opts.tcp ?? []) await this.listen((s) => s.listen(a.port, a.host));
    for (const path of this.opts.unixSockets ?? []) {
      if (fs.existsSync(path) && fs.statSync(path).isSocket()) fs.unlinkSync(path);
      await this.listen((s) => s.listen(path));
    }
  }

  private listen(bind: (s: net.Server) => void): Promise<void> {
    // Half-open: a client that shuts its write side down (libnbd does after NBD_CMD_DISC) still gets
    // the replies of what it sent; the connection ends its side itself once they are out.
    const server = net.createServer({ noDelay: true, allowHalfOpen: true }, (socket) => this.accept(socket));
    this.servers.push(server);
    return new Promise((resolve, reject) => {
      server.once("error", reject);
      server.once("listening", () => {
        server.off("error", reject);
        server.on("error", (err) => this.opts.log.error({ err }, "listener error"));
        resolve();
      });
      bind(server);
    });
  }

  /** Bound addresses: TCP host/port (the real port when 0 was asked) and Unix socket paths. */
  addresses(): Array<TcpAddress | { path: string }> {
    return this.servers.map((s) => {
      const a = s.address();
      if (typeof a === "string") return { path: a };
      return { host: a!.address, port: a!.port };
    });
  }

  private accept(socket: net.Socket): void {
    if (this.closing) {
      socket.destroy();
      return;
    }
    const id = this.nextId++;
    const peer = socket.remoteAddress ? `${socket.remoteAddress}:${socket.remotePort}` : "unix";
    const client = socket.remoteAddress ?? "unix";
    const max = this.opts.maxConnections ?? 1024;
    const maxPer = this.opts.maxConnectionsPerClient ?? 256;
    const fromClient = this.perClient.get(client) ?? 0;
    if (this.connections.size >= max || fromClient >= maxPer) {
      const why = this.connections.size >= max ? `${this.connections.size} connections open (max ${max})` : `${fromClient} connections from ${client} (max ${maxPer})`;
      this.opts.log.warn({ peer, reason: why }, "refusing connection: limit reached");
      socket.destroy();
      return;
    }
    this.perClient.set(client, fromClient + 1);
    const log = this.opts.log.child({ conn: id, peer });
    log.debug("connection accepted");
    const conn = new Connection(socket, this, log, this.limits, this.memoryBudget, this.maxPayload, this.opts.directReads ?? true, this.opts.metrics ?? null, this.opts.tls ?? null);
    const handOff = this.opts.handOff;
    if (handOff) conn.handOff = (n) => handOff(n, log);
    this.opts.metrics?.connections.inc();
    this.connections.add(conn);
    void conn.closed.then(() => {
      this.connections.delete(conn);
      this.opts.metrics?.connections.dec();
      const n = (this.perClient.get(client) ?? 1) - 1;
      if (n > 0) this.perClient.set(client, n);
      else this.perClient.delete(client);
      log.debug("connection closed");
    });
    void conn.start();
  }

  /**
   * Serves a socket whose handshake another event loop made (serve --threads; see
   * Connection.adopt). The limits were applied where it was accepted. Resolves when it closes.
   */
  adopt(socket: net.Socket, exportName: string, structured: boolean, allocationContext: number, depthContext: number, log: Logger): Promise<void> {
    if (this.closing) {
      socket.destroy();
      return Promise.resolve();
    }
    const conn = new Connection(socket, this, log, this.limits, this.memoryBudget, this.maxPayload, this.opts.directReads ?? true, this.opts.metrics ?? null, null);
    this.opts.metrics?.connections.inc();
    this.connections.add(conn);
    conn.adopt(exportName, structured, allocationContext, depthContext);
    return conn.closed.then(() => {
      this.connections.delete(conn);
      this.opts.metrics?.connections.dec();
      log.debug("connection closed");
    });
  }

  get connectionCount(): number {
    return this.connections.size;
  }

  /**
   * Graceful shutdown: stop accepting, let every connection finish the requests it has (new ones
   * get ESHUTDOWN), then flush every export (bounded) and close it (ports make their state durable when they close).
   * Requests still waiting after `graceMs` (say, on a peer that is gone) are ended by closing the
   * exports under them; connections whose requests still do not end within a second after that
   * (a layer that never settles them) are closed with those requests unanswered. Idempotent.
   */
  close(graceMs = 10_000): Promise<void> {
    this.closing ??= (async () => {
      const stopped = this.servers.map((s) => new Promise<void>((r) => s.close(() => r())));
      // The connections open now: each is drained, or aborted below, even if its client hangs up meanwhile.
      const draining = [...this.connections];
      const drained = Promise.all(draining.map((c) => c.shutdown()));
      const late = !(await settlesWithin(drained, graceMs));
      if (late) this.opts.log.warn({ graceMs }, "requests still in flight after the grace period: closing the exports under them");
      // A FLUSH through each whole stack first: layers with a cache of their own (a power-loss
      // cache, say) are only made durable by a flush, not by their port closing. All exports at
      // once, bounded (shorter when requests are already stuck), so that a flush that cannot reach
      // a peer does not keep the process from stopping; each export is closed whatever its flush did.
      const flushes = this.opts.exports.map((e) => e.flush().catch((err) => this.opts.log.error({ err, export: e.name }, "flush at shutdown failed")));
      const flushMs = late ? Math.min(graceMs, 1000) : graceMs;
      if (!(await settlesWithin(Promise.all(flushes), flushMs))) this.opts.log.error({ ms: flushMs }, "flush at shutdown did not finish in time: closing the exports anyway");
      // One at a time (partition exports share their stack with the whole device's), bounded: a
      // layer that waits for a flush that cannot finish must not keep the process from stopping.
      const closed = (async () => {
        for (const e of this.opts.exports) await e.close().catch((err) => this.opts.log.error({ err, export: e.name }, "closing export failed"));
      })();
      if (!(await settlesWithin(closed, graceMs))) this.opts.log.error({ ms: graceMs }, "closing the exports did not finish in time");
      if (!(await settlesWithin(drained, Math.min(graceMs, 1000)))) {
        this.opts.log.warn({ connections: draining.length }, "requests never ended: closing their connections unanswered");
        for (const c of draining) c.abort();
      }
      await drained;
      await Promise.all(stopped);
    })();
    return this.closing;
  }
}

/** True if `p` settles within `ms`. */
async function settlesWithin(p: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([p.then(() => true), new Promise<boolean>((r) => (timer = setTimeout(() => r(false), ms)))]);
  } finally {
    clearTimeout(timer);
  }
}
