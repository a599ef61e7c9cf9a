// Shared by the bench scripts.
import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";

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
 * The Node.js options the `nbdstack` command starts with (its shebang line: `#!/usr/bin/env -S node
 * OPTIONS`), so that a script starting `node CLI …` runs the server as users run it.
 */
export function nodeArgsOf(cli) {
  const first = readFileSync(cli, "utf8").split("\n", 1)[0];
  const m = /^#!\/usr\/bin\/env -S node(.*)$/.exec(first);
  return m ? m[1].trim().split(/\s+/).filter(Boolean) : [];
}
