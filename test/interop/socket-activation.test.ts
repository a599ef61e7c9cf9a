import { spawn } from "node:child_process";
import fs from "node:fs";
import { describe, expect, it } from "vitest";
import { NbdClient } from "../../src/client/nbd-client.js";
import { CLI } from "../helpers/serve.js";
import { until } from "../helpers/limits.js";

/**
 * A small launcher does what systemd does for a socket unit: it binds and listens, puts the socket
 * on fd 3, sets LISTEN_FDS=1 and LISTEN_PID to its own pid, and execs the server (same pid).
 */
const LAUNCHER = `
import os, socket, sys
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(16)
os.dup2(s.fileno(), 3); os.set_inheritable(3, True)
env = dict(os.environ, LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
os.execvpe(sys.argv[1], sys.argv[1:], env)
`;

/**
 * TCP ports the process itself listens on: its socket inodes (/proc/PID/fd) that are in LISTEN
 * state in the kernel's tables. Another program listening on a port does not count.
 */
function listeningPorts(pid: number): Array<{ address: string; port: number }> {
  const inodes = new Set<string>();
  for (const fd of fs.readdirSync(`/proc/${pid}/fd`)) {
    try {
      const m = /^socket:\[(\d+)\]$/.exec(fs.readlinkSync(`/proc/${pid}/fd/${fd}`));
      if (m) inodes.add(m[1]!);
    } catch {
      // closed meanwhile
    }
  }
  const out: Array<{ address: string; port: number }> = [];
  for (const table of ["tcp", "tcp6"]) {
    for (const line of fs.readFileSync(`/proc/${pid}/net/${table}`, "utf8").trim().split("\n").slice(1)) {
      const c = line.trim().split(/\s+/);
      const [addr, port] = c[1]!.split(":");
      if (c[3] === "0A" && inodes.has(c[9]!)) out.push({ address: `${table}:${addr}`, port: parseInt(port!, 16) });
    }
  }
  return out;
}

describe("systemd socket activation", () => {
  it("serves on the socket it was handed (LISTEN_FDS/LISTEN_PID) and opens no listener of its own, not even 127.0.0.1:10809", async () => {
    const p = spawn("/usr/bin/python3", ["-c", LAUNCHER, process.execPath, CLI, "serve", "memory:2M", "--log-format", "json"], { stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    let err = "";
    p.stdout.on("data", (d) => (out += d));
    p.stderr.on("data", (d) => (err += d));
    try {
      await until(() => out.includes("\n") || p.exitCode !== null, "serve to print its URI");
      expect(p.exitCode, err).toBeNull();
      const uris = out.trim().split("\n");
      expect(uris).toHaveLength(1);
      const u = new URL(uris[0]!);
      expect(u.hostname).toBe("127.0.0.1");
      const handed = Number(u.port);
      // The only listening socket of the server process is the handed one (fd 3): no default
      // 127.0.0.1:10809 listener, and no other. (Its URIs are printed once it listens.)
      expect(listeningPorts(p.pid!)).toEqual([{ address: "tcp:0100007F", port: handed }]);
      expect(handed).not.toBe(10809);
      const c = await NbdClient.connect({ host: u.hostname, port: handed }, { exportName: "memory" });
      expect(c.size).toBe(2 * 1024 * 1024);
      await c.disconnect();
    } finally {
      p.kill("SIGTERM");
      if (p.exitCode === null) await new Promise((r) => p.once("exit", r));
    }
  });
});
