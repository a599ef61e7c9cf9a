import { execFileSync } from "node:child_process";
import fs from "node:fs";

/** Under CI=true a missing client is a failure, never a skip. */
export const inCI = process.env.CI === "true";

export function haveTool(name: string): boolean {
  try {
    execFileSync("sh", ["-c", `command -v ${name}`], { stdio: "ignore" });
    return true;
  } catch {
    return false;
  }
}

/**
 * True when every tool is present. A missing tool skips the test locally (returns false)
 * and fails it under CI (throws), so CI can never pass with a client silently missing.
 */
export function needTools(...names: string[]): boolean {
  const missing = names.filter((n) => !haveTool(n));
  if (missing.length === 0) return true;
  if (inCI) throw new Error(`interop client(s) missing under CI: ${missing.join(", ")} (.ci/run must install them)`);
  console.warn(`skipping: ${missing.join(", ")} not installed`);
  return false;
}

/** True when a path (a device node, say) exists; same CI rule as needTools. */
export function needPath(path: string, what: string): boolean {
  if (fs.existsSync(path)) return true;
  if (inCI) throw new Error(`${what} (${path}) missing under CI`);
  console.warn(`skipping: ${what} (${path}) not present`);
  return false;
}

/** True when running as root (mounts, loop devices); same CI rule as needTools. */
export function needRoot(what: string): boolean {
  if (process.getuid?.() === 0) return true;
  if (inCI) throw new Error(`${what} needs root, and this CI run is not root: run .ci/run as root`);
  console.warn(`skipping: ${what} needs root`);
  return false;
}

/**
 * Environment for Debian's clients: /usr/bin first, so nbdsh runs Debian's python3 (which has
 * python3-libnbd) even when another python3 (pyenv, venv) comes first on PATH.
 */
export const debianEnv: NodeJS.ProcessEnv = { ...process.env, PATH: `/usr/bin:/bin:${process.env.PATH ?? ""}` };

/**
 * Runs an nbdsh script and returns what it printed. With a URI the handle `h` is connected
 * (asking for base:allocation); with null it is left unconnected for handshake tests.
 */
export function nbdsh(uri: string | null, script: string): string {
  const connect = uri === null ? [] : ["--base-allocation", "-u", uri];
  return execFileSync("nbdsh", [...connect, "-c", script], { encoding: "utf8", env: debianEnv });
}
