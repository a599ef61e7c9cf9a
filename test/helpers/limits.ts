import { spawn, type ChildProcess } from "node:child_process";
import net from "node:net";
import { CLI } from "./serve.js";
import { logLines, pollUntil, type LogLine } from "./wait.js";

/** Resolves once `cond()` holds (polled every 5 ms); fails naming `what` after a generous deadline. */
export function until(cond: () => boolean | Promise<boolean>, what: string, ms = 20_000): Promise<true> {
  return pollUntil(what, cond, ms, 5) as Promise<true>;
}

export { logLines, type LogLine };

/** Waits until the server logged a line that matches; returns it. */
export async function waitForLog(stderr: () => string, match: (l: LogLine) => boolean, what: string): Promise<LogLine> {
  return pollUntil(`the log line: ${what}`, () => logLines(stderr()).find(match), 20_000, 5);
}

/** A plain TCP client that keeps every byte the server sends, and knows when the server closed. */
export interface RawClient {
  socket: net.Socket;
  /** Resolves when the socket closed (the test never destroys it unless it says so). */
  closed: Promise<void>;
  received(): Buffer;
  /** Waits until at least `n` bytes came in; returns all of them. */
  bytes(n: number): Promise<Buffer>;
}

export async function rawConnect(addr: { host: string; port: number; localAddress?: string }): Promise<RawClient> {
  const socket = net.connect({ port: addr.port, host: addr.host, localAddress: addr.localAddress });
  const rx: Buffer[] = [];
  let total = 0;
  socket.on("data", (d: Buffer) => {
    rx.push(d);
    total += d.length;
  });
  socket.on("error", () => undefined); // a reset is one way of being closed; 'close' is what counts
  const closed = new Promise<void>((r) => socket.once("close", () => r()));
  await new Promise<void>((resolve, reject) => {
    socket.once("connect", () => resolve());
    socket.once("error", reject);
  });
  const received = () => Buffer.concat(rx);
  return {
    socket,
    closed,
    received,
    bytes: async (n) => {
      await until(() => total >= n || socket.destroyed, `${n} bytes from the server`);
      if (total < n) throw new Error(`the server closed after ${total} of ${n} bytes`);
      return received();
    },
  };
}

/** Waits for `p`, failing with `what` after `ms`. */
export async function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([p, new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms)))]);
  } finally {
    clearTimeout(timer);
  }
}

/** An NBD option frame (IHAVEOPT, option, length, data); `len` may lie. */
export function optionFrame(opt: number, data: Buffer = Buffer.alloc(0), len = data.length): Buffer {
  const h = Buffer.alloc(16);
  h.write("IHAVEOPT", 0, "latin1");
  h.writeUInt32BE(opt >>> 0, 8);
  h.writeUInt32BE(len >>> 0, 12);
  return Buffer.concat([h, data]);
}

/** A `nbdstack serve` started by `startServe`. */
export interface RawServe {
  proc: ChildProcess;
  uri: string;
  stderr(): string;
  /** SIGTERM; resolves with the exit code. */
  stop(): Promise<number | null>;
}

/**
 * Starts `nbdstack serve ARGS` exactly as given (test/helpers/serve.ts adds --log-level debug and
 * --log-format json, which tests of those options cannot have) and waits for its first URI.
 */
export async function startServe(args: string[], env: NodeJS.ProcessEnv = {}): Promise<RawServe> {
  const proc = spawn(process.execPath, [CLI, "serve", ...args], { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, ...env } });
  let out = "";
  let err = "";
  proc.stderr!.on("data", (d) => (err += d));
  const exited = new Promise<number | null>((r) => proc.once("exit", (code) => r(code)));
  try {
    await within(
      new Promise<void>((resolve, reject) => {
        proc.stdout!.on("data", (d) => {
          out += d;
          if (out.includes("\n")) resolve();
        });
        void exited.then((code) => reject(new Error(`serve exited with ${code}: ${err}`)));
      }),
      20_000,
      "serve to print its URI",
    );
  } catch (e) {
    proc.kill("SIGKILL");
    throw e;
  }
  return {
    proc,
    uri: out.split("\n")[0]!,
    stderr: () => err,
    stop: async () => {
      if (proc.exitCode === null) proc.kill("SIGTERM");
      return exited;
    },
  };
}
