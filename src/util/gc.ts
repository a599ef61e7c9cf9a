import v8 from "node:v8";
import vm from "node:vm";

let gc: ((opts?: { type?: "major" | "minor" }) => void) | null = null;
let last = 0;
let pending = false;

/**
 * Asks V8 for a full garbage collection soon (not on the caller's stack), at most every 250 ms.
 * For memory V8 does not see the cost of: big I/O buffers let go are freed only when collected.
 * The collector is reached through a context created after --expose-gc is set (the flag cannot be
 * given on Node's command line by a server started as `nbdstack serve`); without it, nothing happens.
 */
export function requestGc(): void {
  if (pending) return;
  if (!gc) {
    try {
      v8.setFlagsFromString("--expose-gc");
      gc = vm.runInNewContext("gc") as typeof gc;
    } catch {
      return;
    }
  }
  pending = true;
  const wait = Math.max(0, last + 250 - Date.now());
  setTimeout(() => {
    pending = false;
    last = Date.now();
    gc?.();
  }, wait).unref();
}
