// Shared by the bench scripts.
import { execFileSync } from "node:child_process";

/** Whether `cmd` is on the PATH (a peer server or client the bench can run). */
export function has(cmd) {
  try {
    execFileSync("sh", ["-c", `command -v ${cmd}`], { stdio: "ignore" });
    return true;
  } catch {
    return false;
  }
}
