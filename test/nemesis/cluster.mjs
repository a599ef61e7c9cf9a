// The nodes of a nemesis run: `nbdstack serve` processes on fixed ports (so a restarted node has the
// same addresses, as its peers and the lease record know them), each one's log in a file, and
// every process tracked by its pid so that it is stopped at the end whatever happened.
import { spawn } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
export const CLI = path.join(ROOT, "dist/cli.js");

/** Every process started here that may still run: stopped on exit, whatever happened. */
const live = new Set();
process.on("exit", () => {
  for (const p of live) {
    try {
      process.kill(p.pid, "SIGCONT");
      process.kill(p.pid, "SIGKILL");
    } catch {
      /* already gone */
    }
  }
});

// A run stopped by SIGTERM (a timeout, vitest ending a worker) still kills its nodes.
if (process.listenerCount("SIGTERM") === 0) process.once("SIGTERM", () => process.exit(143));

/** A free TCP port on 127.0.0.1 (asked of the kernel, then released for the node to take). */
export function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

export class Node {
  /**
   * @param {{id: string, args: string[], nbdPort: number, controlPort: number, dir: string, env?: object, host?: string, launch?: Function}} o
   *   host: the address its ports listen on (default 127.0.0.1); launch: starts the process, like
   *   child_process.spawn (the lab's starts it inside a host's network namespace).
   */
  constructor(o) {
    this.id = o.id;
    this.args = o.args;
    this.nbdPort = o.nbdPort;
    this.controlPort = o.controlPort;
    this.dir = o.dir;
    this.env = o.env ?? {};
    this.launch = o.launch ?? spawn;
    const host = o.host ?? "127.0.0.1";
    this.control = `http://${host}:${o.controlPort}`;
    this.addr = { host, port: o.nbdPort };
    /** Cut from this process by a network fault (lab): its clients' connects may time out. */
    this.cut = false;
    /** How many processes of this node were started; a client knows which one it dialled. */
    this.gen = 0;
    this.proc = null;
    /** "up", "stopped" (SIGSTOP), "down" (killed, not restarted yet), "starting". */
    this.state = "down";
    this.logFile = path.join(o.dir, `node-${o.id}.log`);
    this.exits = [];
  }

  /** Starts a process of this node with its arguments and waits until it printed its control URL. */
  async start() {
    this.gen++;
    this.state = "starting";
    const gen = this.gen;
    const log = fs.openSync(this.logFile, "a");
    fs.writeSync(log, `${JSON.stringify({ nemesis: "start", node: this.id, gen, time: Date.now() })}\n`);
    const proc = this.launch(process.execPath, [CLI, "serve", ...this.args], {
      stdio: ["ignore", "pipe", log],
      env: { ...process.env, ...this.env },
    });
    fs.closeSync(log);
    live.add(proc);
    this.proc = proc;
    proc.once("exit", (code, signal) => {
      live.delete(proc);
      this.exits.push({ gen, code, signal, time: Date.now() });
      if (this.proc === proc) {
        this.proc = null;
        this.state = "down";
      }
    });
    let out = "";
    await new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`node ${this.id} did not start within 20 s; see ${this.logFile}`)), 20_000);
      proc.stdout.on("data", (d) => {
        out += d;
        // The control URL comes last (a node with only a --data-dir prints no export yet).
        if (out.split("\n").some((l) => l.startsWith("control "))) {
          clearTimeout(timer);
          resolve();
        }
      });
      proc.once("exit", (code, signal) => {
        clearTimeout(timer);
        reject(new Error(`node ${this.id} exited at start (${code ?? signal}); see ${this.logFile}`));
      });
    });
    proc.stdout.resume();
    if (this.proc === proc) this.state = "up";
  }

  signal(sig) {
    if (!this.proc) return false;
    try {
      process.kill(this.proc.pid, sig);
      return true;
    } catch {
      return false;
    }
  }

  pause() {
    if (this.signal("SIGSTOP")) this.state = "stopped";
  }

  resume() {
    if (this.signal("SIGCONT") && this.state === "stopped") this.state = "up";
  }

  /** SIGKILL (after SIGCONT, so that a frozen process dies too) and wait for the exit. */
  async kill() {
    const proc = this.proc;
    if (!proc) return;
    const exited = new Promise((r) => proc.once("exit", r));
    this.signal("SIGCONT");
    this.signal("SIGKILL");
    this.state = "down";
    await exited;
  }
}

/** Lines of the node's log file (pino JSON), with the nemesis' own start markers. */
export function readLog(node) {
  const out = [];
  let gen = 0;
  let text = "";
  try {
    text = fs.readFileSync(node.logFile, "utf8");
  } catch {
    return out;
  }
  for (const line of text.split("\n")) {
    if (!line.startsWith("{")) continue;
    try {
      const j = JSON.parse(line);
      if (j.nemesis === "start") gen = j.gen;
      out.push({ ...j, node: node.id, gen });
    } catch {
      /* a line cut by SIGKILL */
    }
  }
  return out;
}
