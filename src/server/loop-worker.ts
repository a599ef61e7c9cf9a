import net from "node:net";
import { createLogger, type Logger } from "../log.js";
import { Metrics } from "../metrics/metrics.js";
import { composeExport, partitionExports, StackHandles } from "../stack/compose.js";
import type { Export } from "../stack/export.js";
import type { FromWorker, LoopInit, ToWorker } from "./loop-messages.js";
import { NbdServer } from "./server.js";

/**
 * A worker event loop of `serve --threads N` (a child process the primary forks; see THREADS.md):
 * it builds its own stacks of the exports every loop may serve, then serves the connections the
 * primary hands it after their handshake. It stops when told, on SIGTERM/SIGINT, or when the
 * primary goes away (its IPC channel closes), so it never outlives the primary.
 */
function send(m: FromWorker): void {
  if (process.connected) process.send!(m);
}

let loop = 0;
let server: NbdServer | null = null;
let metrics: Metrics | undefined;
let log: Logger | null = null;
let stopping = false;

function stop(why: string): void {
  if (stopping) return;
  stopping = true;
  log?.info({ reason: why }, "event loop stopping: finishing requests in flight");
  const done = server ? server.close() : Promise.resolve();
  done.then(
    () => process.exit(0),
    (err) => {
      log?.error({ err }, "event loop shutdown failed");
      process.exit(1);
    },
  );
}

async function start(init: LoopInit): Promise<void> {
  log = createLogger({ level: init.logLevel, pretty: init.logPretty }).child({ loop: init.loop });
  const exports: Export[] = [];
  for (const { spec, partitions } of init.exports) {
    const exp = await composeExport(spec, new StackHandles(), log);
    exports.push(exp);
    if (!partitions) continue;
    await exp.open();
    exports.push(...(await partitionExports(exp, { discard: spec.discard })).exports);
  }
  metrics = init.metrics ? new Metrics() : undefined;
  server = new NbdServer({ exports, log, limits: init.limits, maxMemory: init.maxMemory, metrics });
  await server.start();
  send({ type: "ready", exports: server.list().map((e) => e.name) });
  log.info({ pid: process.pid, exports: exports.length }, "event loop serving");
}

process.on("disconnect", () => stop("the primary went away"));
process.on("SIGTERM", () => stop("SIGTERM"));
process.on("SIGINT", () => stop("SIGINT"));
process.on("message", (m: ToWorker, handle?: unknown) => {
  if (m.type === "init") {
    loop = m.loop;
    start(m).catch((err: Error) => {
      log?.error({ err }, "event loop failed to start");
      send({ type: "failed", message: err.message });
      process.exit(1);
    });
  } else if (m.type === "connection") {
    // Sent only once this loop said it is ready.
    const socket = new net.Socket({ handle: handle as never, readable: true, writable: true, allowHalfOpen: true } as net.SocketConstructorOpts);
    const connLog = log!.child({ conn: `${loop}.${m.id}`, peer: m.peer });
    send({ type: "adopted", id: m.id });
    void server!.adopt(socket, m.export, m.structured, m.allocationContext, m.depthContext, connLog).then(() => send({ type: "closed", id: m.id }));
  } else if (m.type === "metrics") send({ type: "metrics", request: m.request, counts: metrics?.snapshot() ?? { ops: [], budget: null } });
  else if (m.type === "stop") stop("asked by the primary");
});
