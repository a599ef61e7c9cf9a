// etcd members as child processes, for tests and the lab: each with its data dir in a directory
// the caller owns, its log in a file, and its pid tracked so that it is stopped on exit, whatever
// happened. A member may run inside a network namespace (`netns`): `ip netns exec` enters it and
// then execs etcd, so the pid we hold is etcd's own.
import { spawn } from "node:child_process";
import fs from "node:fs";
import http from "node:http";
import https from "node:https";
import net from "node:net";
import path from "node:path";

export const ETCD_BIN = process.env.ETCD_BIN || "/usr/bin/etcd";

/** True when the etcd binary is there. */
export function haveEtcd() {
  try {
    fs.accessSync(ETCD_BIN, fs.constants.X_OK);
    return true;
  } catch {
    return false;
  }
}

/**
 * True when etcd can be run; else false locally (the caller skips) and a thrown error under
 * CI=true, where a missing etcd is a failure, never a skip.
 */
export function needEtcd() {
  if (haveEtcd()) return true;
  if (process.env.CI === "true") throw new Error(`${ETCD_BIN} is missing under CI: .ci/run must install the Debian package etcd-server`);
  console.warn(`skipping: ${ETCD_BIN} not installed (apt-get install etcd-server)`);
  return false;
}

/** A free TCP port on `host` (asked of the kernel, then released for etcd to take). */
export function freePort(host = "127.0.0.1") {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once("error", reject);
    s.listen(0, host, () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/** Every member process started here that may still run: killed on exit. */
const live = new Set();
process.on("exit", () => {
  for (const m of live) m.killNow();
});

export class EtcdMember {
  /**
   * @param {{
   *   name: string, dir: string, dataDir?: string, host?: string, clientPort: number, peerPort: number,
   *   initialCluster: string, clusterToken: string, state?: "new" | "existing",
   *   tls?: { cert: string, key: string, ca: string, clientCertAuth?: boolean },
   *   netns?: string, runAs?: { uid: number, gid: number }, extraArgs?: string[], detached?: boolean,
   * }} o
   */
  constructor(o) {
    this.name = o.name;
    this.dir = o.dir;
    this.host = o.host ?? "127.0.0.1";
    this.clientPort = o.clientPort;
    this.peerPort = o.peerPort;
    this.initialCluster = o.initialCluster;
    this.clusterToken = o.clusterToken;
    this.state = o.state ?? "new";
    this.tls = o.tls;
    this.netns = o.netns;
    this.runAs = o.runAs;
    this.extraArgs = o.extraArgs ?? [];
    this.detached = o.detached ?? false;
    this.dataDir = o.dataDir ?? path.join(o.dir, `${o.name}.data`);
    this.logFile = path.join(o.dir, `${o.name}.log`);
    const scheme = o.tls ? "https" : "http";
    this.clientUrl = `${scheme}://${this.host}:${this.clientPort}`;
    this.peerUrl = `http://${this.host}:${this.peerPort}`;
    /** @type {import("node:child_process").ChildProcess | null} */
    this.proc = null;
    this.pid = 0;
    /** @type {Promise<number | null> | null} */
    this.exited = null;
  }

  args() {
    const a = [
      "--name", this.name,
      "--data-dir", this.dataDir,
      "--listen-client-urls", this.clientUrl,
      "--advertise-client-urls", this.clientUrl,
      "--listen-peer-urls", this.peerUrl,
      "--initial-advertise-peer-urls", this.peerUrl,
      "--initial-cluster", this.initialCluster,
      "--initial-cluster-token", this.clusterToken,
      "--initial-cluster-state", this.state,
      "--logger", "zap",
      "--log-outputs", "stderr",
    ];
    if (this.tls) {
      a.push("--cert-file", this.tls.cert, "--key-file", this.tls.key, "--trusted-ca-file", this.tls.ca);
      if (this.tls.clientCertAuth) a.push("--client-cert-auth");
    }
    return [...a, ...this.extraArgs];
  }

  /** Starts the process (after a kill, with the same data dir: a restart). */
  start() {
    if (this.proc && this.proc.exitCode === null && this.proc.signalCode === null) throw new Error(`etcd member ${this.name} runs already (pid ${this.pid})`);
    fs.mkdirSync(this.dir, { recursive: true });
    const log = fs.openSync(this.logFile, "a");
    // Every wrapper execs the next (no fork), so the pid is etcd's.
    let argv = [ETCD_BIN, ...this.args()];
    if (this.runAs) {
      fs.mkdirSync(this.dataDir, { recursive: true, mode: 0o700 });
      fs.chownSync(this.dataDir, this.runAs.uid, this.runAs.gid);
      argv = ["setpriv", `--reuid=${this.runAs.uid}`, `--regid=${this.runAs.gid}`, "--clear-groups", "--", ...argv];
    }
    if (this.netns) argv = ["ip", "netns", "exec", this.netns, ...argv];
    const [cmd, ...args] = argv;
    const proc = spawn(cmd, args, { stdio: ["ignore", log, log], detached: this.detached });
    fs.closeSync(log);
    this.proc = proc;
    this.pid = proc.pid ?? 0;
    if (this.detached) proc.unref();
    else live.add(this);
    this.exited = new Promise((resolve) => {
      proc.once("exit", (code, signal) => {
        live.delete(this);
        resolve(code ?? (signal ? -1 : null));
      });
      proc.once("error", () => resolve(null));
    });
    return this;
  }

  running() {
    return this.proc !== null && this.proc.exitCode === null && this.proc.signalCode === null;
  }

  /** Sends a signal (SIGKILL by default) and waits for the process to be gone. */
  async kill(signal = "SIGKILL") {
    if (!this.running()) return;
    try {
      process.kill(this.pid, signal);
    } catch {
      /* gone already */
    }
    if (signal === "SIGSTOP" || signal === "SIGCONT") return;
    await this.exited;
  }

  /** SIGTERM, then SIGKILL after `graceMs`. */
  async stop(graceMs = 3000) {
    if (!this.running()) return;
    try {
      process.kill(this.pid, "SIGCONT");
      process.kill(this.pid, "SIGTERM");
    } catch {
      return;
    }
    const t = setTimeout(() => this.killNow(), graceMs);
    await this.exited;
    clearTimeout(t);
  }

  killNow() {
    if (!this.running()) return;
    try {
      process.kill(this.pid, "SIGCONT");
      process.kill(this.pid, "SIGKILL");
    } catch {
      /* gone */
    }
  }

  /** The last lines of its log, for failure messages. */
  logTail(lines = 20) {
    try {
      return fs.readFileSync(this.logFile, "utf8").trimEnd().split("\n").slice(-lines).join("\n");
    } catch {
      return "(no log)";
    }
  }
}

/** GET /health of a member: true when it has a leader and answers a quorum read. */
export function health(url, tls, timeoutMs = 1000) {
  return new Promise((resolve) => {
    const mod = url.startsWith("https:") ? https : http;
    const opts = tls ? { ca: fs.readFileSync(tls.ca), cert: tls.clientCert ? fs.readFileSync(tls.clientCert) : undefined, key: tls.clientKey ? fs.readFileSync(tls.clientKey) : undefined } : {};
    const req = mod.get(`${url}/health`, { ...opts, timeout: timeoutMs }, (res) => {
      let body = "";
      res.setEncoding("utf8");
      res.on("data", (d) => (body += d));
      res.on("end", () => {
        try {
          resolve(JSON.parse(body).health === "true");
        } catch {
          resolve(false);
        }
      });
    });
    req.on("timeout", () => req.destroy());
    req.on("error", () => resolve(false));
  });
}

/** Waits until every member in `members` reports healthy (or throws with their logs). */
export async function waitHealthy(members, { timeoutMs = 30_000, tls } = {}) {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const ok = await Promise.all(members.map((m) => health(m.clientUrl, tls)));
    if (ok.every(Boolean)) return;
    const dead = members.find((m) => !m.running());
    if (dead) throw new Error(`etcd member ${dead.name} exited (code ${dead.proc?.exitCode}, signal ${dead.proc?.signalCode}):\n${dead.logTail()}`);
    if (Date.now() > end) throw new Error(`etcd members not healthy after ${timeoutMs} ms:\n${members.map((m) => `--- ${m.name}\n${m.logTail(8)}`).join("\n")}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/**
 * A cluster of `size` members on 127.0.0.1 with random free ports, data dirs under `dir`.
 * @param {{ size?: number, dir: string, tls?: { cert: string, key: string, ca: string, clientCertAuth?: boolean, clientCert?: string, clientKey?: string }, extraArgs?: string[] }} o
 */
export async function startLocalCluster(o) {
  const size = o.size ?? 1;
  const token = `t${process.pid}-${Math.random().toString(36).slice(2, 8)}`;
  const ports = [];
  for (let i = 0; i < size; i++) ports.push({ client: await freePort(), peer: await freePort() });
  const names = ports.map((_, i) => `m${i + 1}`);
  const initialCluster = names.map((n, i) => `${n}=http://127.0.0.1:${ports[i].peer}`).join(",");
  const members = names.map(
    (name, i) =>
      new EtcdMember({ name, dir: o.dir, clientPort: ports[i].client, peerPort: ports[i].peer, initialCluster, clusterToken: token, tls: o.tls, extraArgs: o.extraArgs }),
  );
  for (const m of members) m.start();
  try {
    await waitHealthy(members, { tls: o.tls });
  } catch (err) {
    await Promise.all(members.map((m) => m.stop(500)));
    throw err;
  }
  return {
    members,
    endpoints: members.map((m) => m.clientUrl),
    async stop() {
      await Promise.all(members.map((m) => m.stop()));
    },
  };
}
