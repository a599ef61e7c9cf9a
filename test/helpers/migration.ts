import { execFile, spawn, type ChildProcess } from "node:child_process";
import { promisify } from "node:util";
import { getStatus, type ExportStatus } from "../../src/control/control-client.js";
import { CLI } from "./serve.js";
import { debianEnv } from "./tools.js";
import { logLines as allLogLines, pollUntil, type LogLine } from "./wait.js";

const execFileP = promisify(execFile);

/** Processes started here that have not exited yet (a failed test may leave some behind). */
const live = new Set<ChildProcess>();
function track(p: ChildProcess): void {
  live.add(p);
  p.once("exit", () => live.delete(p));
}

/** Kills (SIGKILL, by pid) what a test started here and left running; for afterEach. */
export function killLeftovers(): void {
  for (const p of live) p.kill("SIGKILL");
  live.clear();
}

export interface CliRun {
  proc: ChildProcess;
  stdout(): string;
  stderr(): string;
  /** Resolves with the exit status once the process has exited and its pipes are drained. */
  done: Promise<{ status: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string }>;
}

/**
 * Starts `nbdstack ARGS` (the built CLI) without blocking this process, so that it can be signalled
 * while it runs and its pipes are read as it writes them.
 */
export function startCli(args: string[]): CliRun {
  const proc = spawn(process.execPath, [CLI, ...args], { stdio: ["ignore", "pipe", "pipe"] });
  track(proc);
  let stdout = "";
  let stderr = "";
  proc.stdout!.on("data", (d) => (stdout += d));
  proc.stderr!.on("data", (d) => (stderr += d));
  const done = new Promise<{ status: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string }>((resolve) =>
    proc.on("close", (status, signal) => resolve({ status, signal, stdout, stderr })),
  );
  return { proc, stdout: () => stdout, stderr: () => stderr, done };
}

/** Runs `nbdstack ARGS` to the end. */
export function cli(args: string[]) {
  return startCli(args).done;
}

export { pollUntil };

/** Waits for a CLI run to end, failing the test (instead of hanging it) past a generous deadline. */
export async function finished(run: CliRun, what: string, deadlineMs = 30_000) {
  let timer: NodeJS.Timeout | undefined;
  const deadline = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      run.proc.kill("SIGKILL");
      reject(new Error(`${what} did not end within ${deadlineMs} ms; stderr: ${run.stderr()}`));
    }, deadlineMs);
  });
  try {
    return await Promise.race([run.done, deadline]);
  } finally {
    clearTimeout(timer);
  }
}

/** The live copy a node reports for an export (`copy` in `nbdstack status --json`): its CopyProgress with phase, mode and passes. */
export type LiveCopyView = NonNullable<ExportStatus["copy"]>;

export interface ExportView {
  name: string;
  owner: string | null;
  epoch: number | null;
  state: string;
  held: number;
  moves: number;
  inflightA: number;
  inflightB: number;
  copy?: LiveCopyView;
  copyTarget?: boolean;
}

/** One export of a node's status. */
export async function exportStatus(control: string, name: string): Promise<ExportView | undefined> {
  return (await getStatus(control)).exports.find((e) => e.name === name) as ExportView | undefined;
}

/** The NBD address a node's status gives (host:port), as an nbd:// URI base. */
export async function nbdBase(control: string): Promise<string> {
  return `nbd://${(await getStatus(control)).nbd}`;
}

/** Export names `nbdinfo --list` shows on a server (nbd://HOST:PORT), checking its exit status. */
export async function listedExports(base: string): Promise<Array<{ name: string; description?: string }>> {
  const { stdout } = await execFileP("nbdinfo", ["--list", "--json", base], { env: debianEnv });
  const j = JSON.parse(stdout) as { exports: Array<{ "export-name": string; description?: string }> };
  return j.exports.map((e) => ({ name: e["export-name"], description: e.description }));
}

/** Prometheus text of a node's GET /metrics as "name{labels}" → value. */
export async function scrape(control: string): Promise<Map<string, number>> {
  const res = await fetch(`${control}/metrics`);
  if (res.status !== 200) throw new Error(`GET /metrics: ${res.status}`);
  const m = new Map<string, number>();
  for (const line of (await res.text()).split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const i = line.lastIndexOf(" ");
    m.set(line.slice(0, i), Number(line.slice(i + 1)));
  }
  return m;
}

/** Lines of a pino JSON log (a server's stderr) with message `msg`. */
export function logLines(stderr: string, msg: string): LogLine[] {
  return allLogLines(stderr).filter((l) => l.msg === msg);
}

export interface FioJob {
  error: number;
  write: { io_bytes: number };
  read: { io_bytes: number };
}

/**
 * fio random writes with crc32c verification (every write is read back and checked) against
 * `uri` until stopped; rate-limited so it leaves CPU to the nodes on a small machine. `launch`
 * starts it elsewhere (inside a lab host's network namespace: `(cmd, args) => lab.spawn(h, cmd, args)`).
 */
export function fioLoad(uri: string, o: { size?: string; rateIops?: number; launch?: (cmd: string, args: string[]) => ChildProcess } = {}) {
  const args = [
    "--name=load", "--ioengine=nbd", `--uri=${uri}`, "--rw=randwrite", "--bs=4k", "--iodepth=8", `--size=${o.size ?? "4m"}`,
    "--time_based", "--runtime=300", "--verify=crc32c", "--verify_state_save=0", "--verify_backlog=128", "--verify_fatal=1",
    `--rate_iops=${o.rateIops ?? 400}`, "--output-format=json",
  ];
  const p = o.launch ? o.launch("fio", args) : spawn("fio", args, { stdio: ["ignore", "pipe", "pipe"], env: debianEnv });
  track(p);
  let out = "";
  let err = "";
  p.stdout!.on("data", (d) => (out += d));
  p.stderr!.on("data", (d) => (err += d));
  const done = new Promise<number | null>((r) => p.once("close", r));
  return {
    /** Stops fio (SIGINT: it finishes, verifies what is in flight and reports) and returns its job. */
    async stop(): Promise<{ code: number | null; stderr: string; job: FioJob }> {
      p.kill("SIGINT");
      const code = await done;
      const i = out.indexOf("{");
      if (i < 0) throw new Error(`fio printed no JSON (exit ${code}): ${err}`);
      return { code, stderr: err, job: (JSON.parse(out.slice(i)) as { jobs: FioJob[] }).jobs[0]! };
    },
    kill() {
      p.kill("SIGKILL");
    },
  };
}

/**
 * What matters of a stopped fio run, for one toEqual: its exit (fio exits 0 or 128 after the
 * SIGINT that stops it), its job's error, and any verify complaint or I/O error it printed.
 */
export function fioOutcome(f: { code: number | null; stderr: string; job: FioJob }) {
  return {
    exit: f.code === 0 || f.code === 128 ? "stopped" : f.code,
    error: f.job.error,
    complaints: f.stderr.split("\n").filter((l) => /verify|bad |error|fail/i.test(l)),
  };
}
