import { execFile, spawnSync } from "node:child_process";
import fs from "node:fs";
import type { ReadAt } from "../../src/fs/probe.js";
import { CLI, type Served } from "./serve.js";
import { debianEnv } from "./tools.js";
import { logLines, pollUntil, type LogLine } from "./wait.js";

/** Work done through a reader: calls made and bytes returned. */
export interface ReadCount {
  calls: number;
  bytes: number;
}

/**
 * Wraps a file-system reader so that it counts its calls and bytes. With a `limit`, a read that
 * would go past it throws a plain Error (never an FsError), so runaway work on a damaged image fails
 * a test at once, with the numbers, instead of running into its timeout. Counting work instead of
 * timing it keeps such tests stable on a loaded machine.
 */
export function countingReader(read: ReadAt, limit?: ReadCount): ReadAt & { count: ReadCount } {
  const count: ReadCount = { calls: 0, bytes: 0 };
  const wrapped = async (length: number, offset: number): Promise<Buffer> => {
    count.calls++;
    count.bytes += length;
    if (limit && (count.calls > limit.calls || count.bytes > limit.bytes))
      throw new Error(`read budget exceeded: ${count.calls} reads of ${count.bytes} bytes, allowed ${limit.calls} reads of ${limit.bytes} bytes`);
    return read(length, offset);
  };
  return Object.assign(wrapped, { count });
}

/** What a client or the CLI did: its exit status and output. */
export interface Ran {
  status: number | null;
  stdout: string;
  stderr: string;
}

/** Runs `nbdstack ARGS` (the built CLI) to the end, without throwing on a failure. */
export async function nbdstack(...args: string[]): Promise<Ran> {
  return new Promise((resolve, reject) => {
    execFile(process.execPath, [CLI, ...args], { encoding: "utf8" }, (err, stdout, stderr) => {
      if (err && typeof err.code !== "number") return reject(err);
      resolve({ status: err ? (err.code as number) : 0, stdout, stderr });
    });
  });
}

/**
 * Runs qemu-io commands against an NBD URI and fails unless every command succeeded: exit status
 * 0, nothing on stderr, and no "failed" (a failed command or a pattern that did not verify).
 */
export function qemuIo(uri: string, ...cmds: string[]): string {
  const r = spawnSync("qemu-io", ["-f", "raw", ...cmds.flatMap((c) => ["-c", c]), uri], { encoding: "utf8", env: debianEnv });
  const what = `qemu-io ${cmds.join("; ")}: status ${r.status}\n${r.stdout}${r.stderr}`;
  if (r.status !== 0 || r.stderr !== "" || /failed/i.test(r.stdout)) throw new Error(what);
  return r.stdout;
}

/** The whole content of an export, copied out with nbdcopy (which must succeed). */
export function readExport(uri: string, scratch: string): Buffer {
  const r = spawnSync("nbdcopy", [uri, scratch], { encoding: "utf8", env: debianEnv });
  if (r.status !== 0) throw new Error(`nbdcopy ${uri}: status ${r.status}: ${r.stderr}`);
  const b = fs.readFileSync(scratch);
  fs.rmSync(scratch);
  return b;
}

/**
 * A device's expected content, kept next to the qemu-io commands that change it: `write(off, len,
 * byte)` and `zero(off, len)` return the qemu-io command and apply it to the model.
 */
export class DeviceModel {
  constructor(readonly data: Buffer) {}
  write(offset: number, length: number, byte: number): string {
    this.data.fill(byte, offset, offset + length);
    return `write -P 0x${byte.toString(16)} ${offset} ${length}`;
  }
  zero(offset: number, length: number): string {
    this.data.fill(0, offset, offset + length);
    return `write -z ${offset} ${length}`;
  }
  copy(): DeviceModel {
    return new DeviceModel(Buffer.from(this.data));
  }
}

/** The URI a server printed for export `name`. */
export function uriOf(s: Served, name: string): string {
  const u = s.uris.find((x) => x.startsWith("nbd") && new URL(x).pathname === `/${name}`);
  if (!u) throw new Error(`no export ${name} among ${s.uris.join(", ")}`);
  return u;
}

/** The JSON log lines of a server. */
export function serverLogLines(s: Served): LogLine[] {
  return logLines(s.stderr());
}

/** Polls `check` until it returns a value (not undefined), or fails after `ms` naming `what`. */
export function until<T>(what: string, check: () => T | undefined, ms = 20_000): Promise<T> {
  return pollUntil(what, check, ms);
}
