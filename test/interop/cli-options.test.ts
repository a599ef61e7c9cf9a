import { execFileSync, spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { NbdClient } from "../../src/client/nbd-client.js";
import { CLI, randomImage, serve, sha256, tempDir } from "../helpers/serve.js";
import { inCI, debianEnv, nbdsh, needTools } from "../helpers/tools.js";
import { logLines, startServe, waitForLog, type RawServe } from "../helpers/limits.js";

const MiB = 1024 * 1024;

/** True when the loopback interface has ::1; under CI its absence is a failure, never a skip. */
function haveIpv6Loopback(): boolean {
  const lo = Object.values(os.networkInterfaces()).flat().some((a) => a?.family === "IPv6" && a.address === "::1");
  if (lo) return true;
  if (inCI) throw new Error("no ::1 on this machine (ip -6 addr): the IPv6 listener cannot be tested");
  console.warn("skipping: no ::1 on this machine");
  return false;
}

/** Sends a frame with a bad magic on a fresh connection, so the server logs a warning. */
async function provokeWarning(uri: string): Promise<void> {
  const u = new URL(uri);
  const c = await NbdClient.connect({ host: u.hostname, port: Number(u.port) }, { exportName: u.pathname.slice(1) });
  c.socket.write(Buffer.alloc(28, 0xee));
  await c.closed;
}

describe("serve options through the CLI", () => {
  it.skipIf(!needTools("nbdsh", "nbdinfo") || !haveIpv6Loopback())("listens on IPv6 ([::1]:0); nbdinfo and nbdsh work through it", async () => {
    const srv = await serve(["memory:4M", "--listen", "[::1]:0", "--name", "v6"]);
    try {
      expect(srv.uris).toHaveLength(1);
      expect(srv.uri).toMatch(/^nbd:\/\/\[::1\]:\d+\/v6$/);
      expect(execFileSync("nbdinfo", ["--size", srv.uri], { encoding: "utf8", env: debianEnv }).trim()).toBe(String(4 * MiB));
      const out = nbdsh(srv.uri, `h.pwrite(b"six" * 1000, 4096); print(h.pread(3000, 4096) == b"six" * 1000, bytes(h.pread(3, 0)))`).trim();
      expect(out).toBe("True b'\\x00\\x00\\x00'");
      // The server saw an IPv6 client.
      await waitForLog(srv.stderr, (l) => l.msg === "connection accepted" && /^::1:\d+$/.test(l.peer), "a connection from ::1");
    } finally {
      expect(await srv.stop()).toBe(0);
    }
  });

  it.skipIf(!needTools("qemu-io", "nbdcopy"))("serves the same bytes with --io auto, sync and async, and refuses another mode", async () => {
    const dir = tempDir();
    const img = path.join(dir, "disk.img");
    randomImage(img, 8 * MiB, 5);
    const patterns = { auto: 0x11, sync: 0x22, async: 0x33 } as const;
    for (const mode of ["auto", "sync", "async"] as const) {
      const before = sha256(img);
      const srv = await serve([img, "--io", mode, "--name", "disk", "--no-partitions"]);
      try {
        // The whole image through nbdcopy (256 KiB requests), byte for byte.
        const copy = path.join(dir, `copy-${mode}.img`);
        execFileSync("nbdcopy", [srv.uri, copy], { env: debianEnv });
        expect(sha256(copy)).toBe(before);
        // Writes and reads below and above 1 MiB per request (auto's threshold for the thread pool).
        const p = patterns[mode].toString(16);
        const r = spawnSync("qemu-io", ["-f", "raw", "-c", `write -P 0x${p} 4096 4096`, "-c", `write -P 0x${p} 1M 3M`, "-c", `read -P 0x${p} 4096 4096`, "-c", `read -P 0x${p} 1M 3M`, srv.uri], { encoding: "utf8" });
        expect(r.stderr).toBe("");
        expect(r.status).toBe(0);
        expect(r.stdout).not.toMatch(/fail|mismatch/i);
      } finally {
        expect(await srv.stop()).toBe(0);
      }
      const data = fs.readFileSync(img);
      expect(data.subarray(4096, 8192).every((b) => b === patterns[mode])).toBe(true);
      expect(data.subarray(MiB, 4 * MiB).every((b) => b === patterns[mode])).toBe(true);
    }
    const bad = spawnSync(process.execPath, [CLI, "serve", img, "--io", "turbo", "--listen", "127.0.0.1:0"], { encoding: "utf8", timeout: 20_000 });
    expect(bad.status).toBe(1);
    expect(bad.stderr).toMatch(/--io <mode>.*'turbo' is invalid.*auto, sync, async/s);
  });

  it("filters log lines by --log-level and NBDSTACK_LOG (the flag wins), and refuses a bad level", async () => {
    const levels = (s: RawServe) => new Set(logLines(s.stderr()).map((l) => l.level));
    const runWith = async (args: string[], env: NodeJS.ProcessEnv) => {
      const s = await startServe(["memory:1M", "--listen", "127.0.0.1:0", "--log-format", "json", ...args], env);
      try {
        await provokeWarning(s.uri);
        await waitForLog(s.stderr, (l) => l.msg === "closing connection: protocol violation", "the warning");
      } finally {
        expect(await s.stop()).toBe(0);
      }
      return s;
    };
    // warn: the warning, and nothing below it (no "serving" at info, no "connection accepted" at debug).
    for (const [args, env] of [
      [["--log-level", "warn"], {}],
      [[], { NBDSTACK_LOG: "warn" }],
    ] as const) {
      const s = await runWith([...args], env);
      expect([...levels(s)], `levels logged with ${JSON.stringify({ args, env })}`).toEqual([40]);
    }
    // The flag wins over the environment: debug lines are there.
    const both = await runWith(["--log-level", "debug"], { NBDSTACK_LOG: "error" });
    expect(levels(both)).toEqual(new Set([20, 30, 40]));
    expect(logLines(both.stderr()).some((l) => l.msg === "connection accepted")).toBe(true);
    // error: not even the warning.
    const quiet = await startServe(["memory:1M", "--listen", "127.0.0.1:0", "--log-format", "json"], { NBDSTACK_LOG: "error" });
    await provokeWarning(quiet.uri);
    expect(await quiet.stop()).toBe(0);
    expect(quiet.stderr()).toBe("");
    // A level that does not exist stops serve with a message naming the levels.
    for (const [args, env] of [
      [["--log-level", "loud"], {}],
      [[], { NBDSTACK_LOG: "loud" }],
    ] as const) {
      const r = spawnSync(process.execPath, [CLI, "serve", "memory:1M", "--listen", "127.0.0.1:0", ...args], { encoding: "utf8", env: { ...process.env, ...env }, timeout: 20_000 });
      expect(r.status).toBe(1);
      expect(r.stderr).toMatch(/loud.*trace, debug, info, warn, error, fatal, silent/s);
    }
  });

  it("writes readable lines, not JSON, with --log-format pretty", async () => {
    const s = await startServe(["memory:1M", "--listen", "127.0.0.1:0", "--log-format", "pretty"]);
    await provokeWarning(s.uri);
    expect(await s.stop()).toBe(0);
    // eslint-disable-next-line no-control-regex
    const lines = s.stderr().replace(/\x1b\[[0-9;]*m/g, "").split("\n").filter(Boolean);
    expect(lines.length).toBeGreaterThan(0);
    for (const l of lines) expect(() => JSON.parse(l), l).toThrow();
    // A time, the level as a word, the message; fields on indented lines below it.
    expect(lines.some((l) => /^\[\d\d:\d\d:\d\d\.\d{3}\] INFO: serving$/.test(l))).toBe(true);
    expect(lines.some((l) => /^\[\d\d:\d\d:\d\d\.\d{3}\] WARN: closing connection: protocol violation$/.test(l))).toBe(true);
    expect(lines.some((l) => /^\s+reason: "bad request magic 0xeeeeeeee"$/.test(l))).toBe(true);
  });
});
