import crypto from "node:crypto";
import { spawn, type ChildProcess } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll } from "vitest";

export const ROOT = fileURLToPath(new URL("../..", import.meta.url));
export const CLI = path.join(ROOT, "dist/cli.js");

export interface Served {
  proc: ChildProcess;
  /** Every URI the server printed, in order. */
  uris: string[];
  uri: string;
  stderr(): string;
  /** Everything printed on stdout so far (the URIs, and V8's traces when nodeFlags ask for them). */
  stdout(): string;
  /** Sends a signal (SIGTERM by default) and resolves with the exit code, once its output is read. */
  stop(signal?: NodeJS.Signals): Promise<number | null>;
}

const running = new Set<ChildProcess>();
process.on("exit", () => {
  for (const p of running) p.kill("SIGKILL");
});

/**
 * Starts `nbdstack serve ARGS` on an ephemeral port and waits until it printed `exports` URIs.
 * Adds `--listen 127.0.0.1:0` unless ARGS has --listen or --socket. `nodeFlags` go to Node.js itself.
 */
export async function serve(args: string[], exports = 1, env: NodeJS.ProcessEnv = {}, nodeFlags: string[] = []): Promise<Served> {
  const listen = args.includes("--listen") || args.includes("--socket") ? [] : ["--listen", "127.0.0.1:0"];
  const proc = spawn(process.execPath, [...nodeFlags, CLI, "serve", ...listen, "--log-format", "json", "--log-level", "debug", ...args], {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, ...env },
  });
  running.add(proc);
  let out = "";
  let err = "";
  proc.stderr!.on("data", (d) => (err += d));
  const exited = new Promise<number | null>((resolve) =>
    proc.once("exit", (code) => {
      running.delete(proc);
      resolve(code);
    }),
  );
  // "exit" can come before the last of stdout and stderr is read (V8's traces are flushed as the
  // process exits); "close" comes after both pipes ended.
  const closed = new Promise<void>((resolve) => proc.once("close", () => resolve()));
  const uris = await new Promise<string[]>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`server did not start: ${err}`)), 15000);
    proc.stdout!.on("data", (d) => {
      out += d;
      // (V8's traces, when nodeFlags ask for them, print lines that start with "[" or a space.)
      const lines = out.split("\n").filter((l) => l && !/^[[ ]/.test(l));
      if (lines.length >= exports) {
        clearTimeout(timer);
        resolve(lines);
      }
    });
    void exited.then((code) => reject(new Error(`server exited with ${code}: ${err}`)));
  });
  return {
    proc,
    uris,
    uri: uris[0]!,
    stderr: () => err,
    stdout: () => out,
    stop: async (signal = "SIGTERM") => {
      if (proc.exitCode === null) proc.kill(signal);
      const code = await exited;
      // A child that inherited the pipes could hold them open: wait for them a bounded time.
      await Promise.race([closed, new Promise((resolve) => setTimeout(resolve, 2000).unref())]);
      return code;
    },
  };
}

/** The control URL a server printed ("control http://…"), when it runs a control API. */
export function controlUrl(s: Served): string {
  const line = s.uris.find((l) => l.startsWith("control "));
  if (!line) throw new Error("this server printed no control URL");
  return line.slice("control ".length);
}

const tempDirs: string[] = [];
// Registered when a test file imports this module, so it runs after that file's own teardown
// (after-hooks run last-registered first). Vitest's workers do not reliably emit "exit", and
// directories left behind by every run once filled /tmp with gigabytes of images.
afterAll(() => {
  for (const dir of tempDirs.splice(0)) fs.rmSync(dir, { recursive: true, force: true });
});

/** A fresh temporary directory, removed when the test file that made it is done. */
export function tempDir(prefix = "nbdstack-test-"): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  tempDirs.push(dir);
  return dir;
}

/** An empty (sparse) image file of `size` bytes; returns its path. */
export function blankImage(file: string, size: number): string {
  fs.writeFileSync(file, "");
  fs.truncateSync(file, size);
  return file;
}

/** The TCP address of an `nbd://HOST:PORT/…` URI, for the project's own NBD client. */
export function nbdAddress(uri: string): { host: string; port: number } {
  const u = new URL(uri);
  return { host: u.hostname, port: Number(u.port) };
}

/** A file of `size` bytes of deterministic pseudo-random data (xorshift), for checksums. */
export function randomImage(file: string, size: number, seed = 1): void {
  const buf = Buffer.allocUnsafe(size);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < size; i += 4) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    buf.writeUInt32LE(x >>> 0, i);
  }
  fs.writeFileSync(file, buf);
}

export function sha256(file: string): string {
  return crypto.createHash("sha256").update(fs.readFileSync(file)).digest("hex");
}

