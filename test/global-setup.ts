import { execFileSync } from "node:child_process";

/** Interop tests drive the built CLI: build it once so they test the current sources. */
export default function setup(): void {
  execFileSync("npx", ["tsc", "-p", "tsconfig.json"], { stdio: "inherit" });
}
