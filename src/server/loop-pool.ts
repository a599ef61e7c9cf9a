import { fork, type ChildProcess } from "node:child_process";
import type { Socket } from "node:net";
import { fileURLToPath } from "node:url";
import type { Logger } from "pino";
import type { LoopCounts } from "../metrics/metrics.js";
import type { Negotiated } from "./handshake.js";
import type { FromWorker, LoopInit, ToWorker } from "./loop-messages.js";

const WORKER = fileURLToPath(new URL("./loop-worker.js", import.meta.url));
/** A worker that dies this soon after it started is restarted after a growing delay (up to RESTART_MAX_MS). */
const RESTART_MIN_MS = 500;
const RESTART_MAX_MS = 30_000;
const STABLE_MS = 10_000;
/**
 * A handed connection the worker has not confirmed by then is taken for lost (Node drops a handle
 * message the worker could not take, NODE_HANDLE_NACK, without telling the sender's callback).
 */
const ADOPT_MS = 5_000;
const EMPTY = Buffer.alloc(0);

/** One event loop as status and metrics show it: 0 is the primary. */
export interface LoopStats {
  loop: number;
  pid: number | null;
  /** It takes connections (a worker that is starting or restarting does not yet). */
  ready: boolean;
  /** Connections it serves now (the primary's: those it kept, handshakes under way included). */
  connections: number;
  /** Times the worker was restarted after it died. */
  restarts: number;
}

interface WorkerLoop {
  loop: number;
  child: ChildProcess | null;
  ready: boolean;
  exports: ReadonlySet<string>;
  /** Connections handed to it, by id: each resolves its connection's end in the primary. */
  open: Map<number, () => void>;
  /** Of those, the ones it has not confirmed yet, with their timers (see ADOPT_MS). */
  unconfirmed: Map<number, NodeJS.Timeout>;
  startedAt: number;
  restarts: number;
  delay: number;
}

/** The socket's libuv handle, which the primary stops reading and sends to a worker. */
interface StreamHandle {
  readStop(): number;
  reading?: boolean;
  close(): void;
}

/**
 * The primary's side of `serve --threads N` (see THREADS.md): forks N-1 worker loops, each of
 * which builds the shared exports (those whose stacks are coherent across processes) itself,
 * and hands them negotiated connections to those exports: the least busy loop serves each one,
 * the primary counting as loop 0. Restarts a worker that dies (its connections are lost: the
 * clients see the connection close). `close()` stops every worker, gracefully, then by force.
 */
export class LoopPool {
  private readonly workers: WorkerLoop[] = [];
  private closing = false;
  private nextId = 1;
  private nextRequest = 1;
  private turn = 0;
  private readonly pending = new Map<number, { left: number; counts: LoopCounts[]; done: (c: LoopCounts[]) => void }>();
  /** Connections the primary serves itself now. */
  private here: () => number = () => 0;

  constructor(
    private readonly loops: number,
    private readonly init: Omit<LoopInit, "type" | "loop">,
    private readonly log: Logger,
  ) {}

  /** The primary's own count of the connections it serves (for the choice of a loop). */
  countHere(count: () => number): void {
    this.here = count;
  }

  /** Forks the workers and waits until each serves its exports (a worker that fails to start fails this). */
  async start(): Promise<void> {
    for (let loop = 1; loop < this.loops; loop++) {
      const w: WorkerLoop = { loop, child: null, ready: false, exports: new Set(), open: new Map(), unconfirmed: new Map(), startedAt: 0, restarts: 0, delay: RESTART_MIN_MS };
      this.workers.push(w);
    }
    try {
      await Promise.all(this.workers.map((w) => this.spawn(w)));
    } catch (err) {
      await this.close();
      throw err;
    }
  }

  private spawn(w: WorkerLoop): Promise<void> {
    const child = fork(WORKER, [], { serialization: "advanced", stdio: ["ignore", "ignore", "inherit", "ipc"] });
    w.child = child;
    w.ready = false;
    w.startedAt = Date.now();
    child.send({ ...this.init, type: "init", loop: w.loop } satisfies ToWorker);
    return new Promise((resolve, reject) => {
      child.on("message", (m: FromWorker) => {
        if (m.type === "ready") {
          w.exports = new Set(m.exports);
          w.ready = true;
          this.log.debug({ loop: w.loop, pid: child.pid }, "event loop ready");
          resolve();
        } else if (m.type === "failed") reject(new Error(`event loop ${w.loop} failed to start: ${m.message}`));
        else if (m.type === "adopted") {
          clearTimeout(w.unconfirmed.get(m.id));
          w.unconfirmed.delete(m.id);
        } else if (m.type === "closed") this.ended(w, m.id);
        else if (m.type === "metrics") {
          const p = this.pending.get(m.request);
          if (!p) return;
          p.counts.push(m.counts);
          if (--p.left === 0) p.done(p.counts);
        }
      });
      child.on("error", (err) => this.log.error({ loop: w.loop, err }, "event loop process error"));
      child.once("exit", (code, signal) => {
        w.ready = false;
        w.child = null;
        const lost = w.open.size;
        for (const id of [...w.open.keys()]) this.ended(w, id);
        reject(new Error(`event loop ${w.loop} exited (${signal ?? code}) before it was ready`));
        if (this.closing) return;
        w.delay = Date.now() - w.startedAt < STABLE_MS ? Math.min(w.delay * 2, RESTART_MAX_MS) : RESTART_MIN_MS;
        // Exit 0: it was stopped (a signal sent to it alone, say), not a crash; replaced all the same.
        const what = { loop: w.loop, pid: child.pid, code, signal, connectionsLost: lost, restartInMs: w.delay };
        if (code === 0) this.log.warn(what, "event loop stopped by itself: starting another");
        else this.log.error(what, "event loop died: its connections are closed; starting another");
        setTimeout(() => {
          if (this.closing) return;
          w.restarts++;
          this.spawn(w).catch((err: Error) => this.log.error({ loop: w.loop, err: err.message }, "event loop restart failed"));
        }, w.delay).unref();
      });
    });
  }

  private ended(w: WorkerLoop, id: number): void {
    clearTimeout(w.unconfirmed.get(id));
    w.unconfirmed.delete(id);
    const done = w.open.get(id);
    w.open.delete(id);
    done?.();
  }

  /**
   * NbdServer's handOff: moves a negotiated connection to the least busy loop that serves its
   * export, unless that is the primary. Only plain connections whose client sent nothing past the
   * handshake move (a TLS session cannot leave its process; a peer's link is the owner's business).
   */
  handOff(n: Negotiated, log: Logger): Promise<void> | null {
    if (this.closing || n.tls || n.peer || n.ended || n.rest.length > 0 || n.socket.readableLength > 0) return null;
    const w = this.choose(n.exp.name);
    if (!w) return null;
    const socket = n.socket as Socket & { _handle?: StreamHandle | null };
    const handle = socket._handle;
    if (!handle || typeof handle.readStop !== "function") return null;
    // From here on the primary reads nothing more of this socket: the client's first request (sent
    // once it has the GO reply) stays in the kernel for the worker.
    handle.readStop();
    handle.reading = false;
    const id = this.nextId++;
    const peer = socket.remoteAddress ? `${socket.remoteAddress}:${socket.remotePort}` : "unix";
    return new Promise<void>((resolve) => {
      w.open.set(id, resolve);
      // The option replies must have reached the kernel before the handle leaves.
      socket.write(EMPTY, (err) => {
        const child = w.child;
        if (err || socket.destroyed || socket._handle !== handle || !child?.connected) {
          socket.destroy();
          this.ended(w, id);
          return;
        }
        socket._handle = null; // the socket lets go of it (its destroy() leaves it open)
        const timer = setTimeout(() => {
          log.warn({ loop: w.loop, id }, "the event loop never took the connection handed to it: counted as closed");
          this.ended(w, id);
        }, ADOPT_MS);
        w.unconfirmed.set(id, timer.unref());
        // Sent as a raw handle ('net.Native'): Node neither tracks it for the server nor closes it
        // here. Once the message is written the kernel holds the descriptor in flight, so the
        // primary's copy is closed then: the socket ends when the worker's copy closes.
        child.send({ type: "connection", id, export: n.exp.name, structured: n.structured, allocationContext: n.allocationContext, depthContext: n.depthContext, peer } satisfies ToWorker, handle as never, (sendErr) => {
          handle.close();
          socket.destroy();
          if (!sendErr) {
            log.debug({ loop: w.loop, id }, "connection handed to another event loop");
            return;
          }
          log.warn({ loop: w.loop, err: sendErr.message }, "closing connection: handing it to another event loop failed");
          this.ended(w, id);
        });
      });
    });
  }

  /** The least busy loop serving `name` (ties taken in turn): a worker, or null for the primary. */
  private choose(name: string): WorkerLoop | null {
    const loops: Array<WorkerLoop | null> = [null];
    const counts = [this.here() - this.handedOff() - 1]; // the primary's, less the connection being placed
    for (const w of this.workers) {
      if (!w.ready || !w.child?.connected || !w.exports.has(name)) continue;
      loops.push(w);
      counts.push(w.open.size);
    }
    const least = Math.min(...counts);
    const ties = loops.filter((_, i) => counts[i] === least);
    return ties[this.turn++ % ties.length]!;
  }

  private handedOff(): number {
    let n = 0;
    for (const w of this.workers) n += w.open.size;
    return n;
  }

  stats(): LoopStats[] {
    return [
      { loop: 0, pid: process.pid, ready: true, connections: this.here() - this.handedOff(), restarts: 0 },
      ...this.workers.map((w) => ({ loop: w.loop, pid: w.child?.pid ?? null, ready: w.ready, connections: w.open.size, restarts: w.restarts })),
    ];
  }

  /** The request counts of every ready worker (for GET /metrics); a worker that does not answer within a second is left out. */
  metrics(): Promise<LoopCounts[]> {
    const live = this.workers.filter((w) => w.ready && w.child?.connected);
    if (live.length === 0) return Promise.resolve([]);
    const request = this.nextRequest++;
    return new Promise((resolve) => {
      const timer = setTimeout(() => finish(this.pending.get(request)?.counts ?? []), 1000);
      const finish = (c: LoopCounts[]) => {
        clearTimeout(timer);
        this.pending.delete(request);
        resolve(c);
      };
      this.pending.set(request, { left: live.length, counts: [], done: finish });
      for (const w of live) w.child!.send({ type: "metrics", request } satisfies ToWorker);
    });
  }

  /**
   * Stops every worker: each finishes the requests in flight and closes its exports (as the
   * primary does on SIGTERM); one still running after `graceMs` is killed. Idempotent.
   */
  async close(graceMs = 15_000): Promise<void> {
    this.closing = true;
    await Promise.all(
      this.workers.map(async (w) => {
        const child = w.child;
        if (!child || child.exitCode !== null || child.signalCode !== null) return;
        const exited = new Promise<void>((r) => child.once("exit", () => r()));
        if (child.connected) child.send({ type: "stop" } satisfies ToWorker);
        else child.kill("SIGTERM");
        let timer: NodeJS.Timeout | undefined;
        const late = await Promise.race([exited.then(() => false), new Promise<boolean>((r) => (timer = setTimeout(() => r(true), graceMs)))]);
        clearTimeout(timer);
        if (late) {
          this.log.error({ loop: w.loop, pid: child.pid, ms: graceMs }, "event loop did not stop in time: killing it");
          child.kill("SIGKILL");
          await exited;
        }
      }),
    );
  }
}
