// Shared by the bench scripts.
import { execFileSync } from "node:child_process";
import fs, { readFileSync } from "node:fs";

/** Whether `cmd` is on the PATH (a peer server or client the bench can run). */
export function has(cmd) {
  try {
    execFileSync("sh", ["-c", `command -v ${cmd}`], { stdio: "ignore" });
    return true;
  } catch {
    return false;
  }
}

/**
 * How the `nbdstack` command starts Node.js (its shebang line, `#!/usr/bin/env -S [VAR=VALUE…] node
 * [OPTIONS]`), as the start of a command line that runs `cli` with this Node.js: a script starting
 * the server runs it as users run it. Environment settings go through /usr/bin/env, which execs
 * Node.js in the same process (the pid stays the server's).
 */
export function nodeCommandOf(cli) {
  const first = readFileSync(cli, "utf8").split("\n", 1)[0];
  const m = /^#!\/usr\/bin\/env -S (.*)$/.exec(first);
  const words = m ? m[1].trim().split(/\s+/) : [];
  const at = words.indexOf("node");
  if (at < 0) return [process.execPath, cli];
  const env = words.slice(0, at);
  return [...(env.length ? ["/usr/bin/env", ...env] : []), process.execPath, ...words.slice(at + 1), cli];
}

const TICK = Number(execFileSync("getconf", ["CLK_TCK"], { encoding: "utf8" })) || 100;

/** CPU seconds all CPUs of this machine were busy so far (user, nice, system, irq, softirq of /proc/stat). */
export function machineBusySeconds() {
  const f = readFileSync("/proc/stat", "utf8").split("\n")[0].trim().split(/\s+/).slice(1).map(Number);
  return (f[0] + f[1] + f[2] + f[5] + f[6]) / TICK;
}

/** CPU seconds of `pid` from /proc/PID/stat (fields 14–17 of stat(5)): its own (user, system) and its reaped children's. */
function statTimes(pid) {
  const f = readFileSync(`/proc/${pid}/stat`, "utf8");
  const x = f.slice(f.lastIndexOf(")") + 2).split(" "); // x[0] is field 3
  return { own: (Number(x[11]) + Number(x[12])) / TICK, reaped: (Number(x[13]) + Number(x[14])) / TICK };
}

/** CPU seconds this process's reaped children used so far (a child run with execFileSync counts once it returned). */
export function reapedChildrenSeconds() {
  return statTimes("self").reaped;
}

/** The live child processes of `pid` (serve --threads N: its worker loops). */
export function childrenOf(pid) {
  try {
    return fs.readdirSync(`/proc/${pid}/task`).flatMap((t) => fs.readFileSync(`/proc/${pid}/task/${t}/children`, "utf8").trim().split(/\s+/).filter(Boolean).map(Number));
  } catch {
    return [];
  }
}

/**
 * CPU seconds (user + system) process `pid` has used so far: its own, its reaped children's and
 * its live children's (worker loops); 0 once it is gone.
 */
export function cpuSeconds(pid) {
  let own = 0;
  try {
    const t = statTimes(pid);
    own = t.own + t.reaped;
  } catch {
    return 0;
  }
  return own + childrenOf(pid).reduce((t, c) => t + cpuSeconds(c), 0);
}

/**
 * The bench scripts take their settings from environment variables (their knobs), not arguments:
 * `--help` (or `-h`) prints the script's opening comment, which documents them, and exits 0; any
 * other argument is refused (exit 2) rather than ignored, so that a mistyped option does not start
 * a long run with the defaults. Called first thing by each script with its `import.meta.url` (and
 * its npm script's name, where that is not bench:FILE).
 */
export function knobsOnly(scriptUrl, name = `bench:${new URL(scriptUrl).pathname.split("/").pop().replace(/\.mjs$/, "")}`, argv = process.argv.slice(2)) {
  if (argv.length === 0) return;
  const file = new URL(scriptUrl).pathname;
  const lines = readFileSync(file, "utf8").split("\n");
  const header = lines.slice(lines[0].startsWith("#!") ? 1 : 0);
  const doc = header.slice(0, header.findIndex((l) => !l.startsWith("//"))).map((l) => l.replace(/^\/\/ ?/, ""));
  if (argv.length === 1 && (argv[0] === "--help" || argv[0] === "-h")) {
    process.stdout.write(`${doc.join("\n")}\n`);
    process.exit(0);
  }
  process.stderr.write(`${name}: takes no arguments (got ${argv.map((a) => JSON.stringify(a)).join(" ")}); its settings are environment variables, which npm run ${name} -- --help lists.\n`);
  process.exit(2);
}
