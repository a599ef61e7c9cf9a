import v8 from "node:v8";
import vm from "node:vm";

let gc: ((opts?: { type?: "major" | "minor" }) => void) | null = null;
let last = 0;
let pending = false;
let count = 0;
let unavailable = false;

/** The collector, reached through a context created after --expose-gc is set; null if it cannot be. */
function collector(): typeof gc {
  if (gc || unavailable) return gc;
  try {
    v8.setFlagsFromString("--expose-gc");
    gc = vm.runInNewContext("gc") as typeof gc;
  } catch {
    unavailable = true;
  }
  return gc;
}

/** Collections asked for and made so far (by requestGc or collectNow). */
export function collections(): number {
  return count;
}

/**
 * A full garbage collection now, on the caller's stack: for a caller about to allocate memory that
 * garbage already waiting would otherwise sit beside (a few ms with this server's small heap).
 */
export function collectNow(): void {
  const collect = collector();
  if (!collect) return;
  last = Date.now();
  count++;
  collect();
}

/**
 * Asks V8 for a full garbage collection soon (not on the caller's stack), at most every 250 ms.
 * For memory V8 does not see the cost of: big I/O buffers let go are freed only when collected.
 * The collector is reached through a context created after --expose-gc is set (the flag cannot be
 * given on Node's command line by a server started as `nbdstack serve`); without it, nothing happens.
 */
export function requestGc(): void {
  if (pending || !collector()) return;
  pending = true;
  const wait = Math.max(0, last + 250 - Date.now());
  setTimeout(() => {
    pending = false;
    last = Date.now();
    count++;
    gc?.();
  }, wait).unref();
}
