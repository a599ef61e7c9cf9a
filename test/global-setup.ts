import { execFileSync } from "node:child_process";

/**
 * Interop tests drive the built CLI: build it once so they test the current sources.
 * NBDSTACK_SKIP_BUILD=1 skips it for unit-only runs (which import the sources directly).
 */
export default function setup(): void {
  if (process.env.NBDSTACK_SKIP_BUILD === "1") return;
  execFileSync("npx", ["tsc", "-p", "tsconfig.json"], { stdio: "inherit" });
}
