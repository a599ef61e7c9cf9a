import { spawn } from "node:child_process";
import { describe, expect, it } from "vitest";
import { NbdClient } from "../../src/client/nbd-client.js";
import { CLI } from "../helpers/serve.js";

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

describe("systemd socket activation", () => {
  it("serves on the socket it was handed (LISTEN_FDS/LISTEN_PID) and opens no default listener", async () => {
    const p = spawn("/usr/bin/python3", ["-c", LAUNCHER, process.execPath, CLI, "serve", "memory:2M", "--log-format", "json"], { stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    p.stdout.on("data", (d) => (out += d));
    try {
      for (let i = 0; i < 100 && !out.includes("\n"); i++) await new Promise((r) => setTimeout(r, 50));
      const uris = out.trim().split("\n");
      expect(uris).toHaveLength(1); // the handed socket only: no 127.0.0.1:10809 listener
      const u = new URL(uris[0]!);
      expect(u.hostname).toBe("127.0.0.1");
      expect(Number(u.port)).not.toBe(10809);
      const c = await NbdClient.connect({ host: u.hostname, port: Number(u.port) }, { exportName: "memory" });
      expect(c.size).toBe(2 * 1024 * 1024);
      await c.disconnect();
    } finally {
      p.kill("SIGTERM");
      await new Promise((r) => p.once("exit", r));
    }
  });
});
