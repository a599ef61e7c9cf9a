/**
 * Polls `probe` until it returns a value other than undefined or false, and returns that value. A
 * probe that throws is tried again; its last error is in the failure. The generous deadline only
 * turns a hang into a failure that names `what`: it is never what a test measures.
 */
export async function pollUntil<T>(what: string, probe: () => Promise<T | undefined | false> | T | undefined | false, deadlineMs = 30_000, everyMs = 20): Promise<T> {
  const end = performance.now() + deadlineMs;
  let last: unknown;
  for (;;) {
    try {
      const v = await probe();
      if (v !== undefined && v !== false) return v;
    } catch (err) {
      last = err;
    }
    if (performance.now() > end) throw new Error(`timed out after ${deadlineMs} ms waiting for ${what}${last ? ` (last error: ${(last as Error).message})` : ""}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

/** One JSON log line of a server. */
export type LogLine = Record<string, any> & { msg: string; time: number; level: number };

/** The JSON log lines in a server's stderr; other lines, and a line still being written, are skipped. */
export function logLines(stderr: string): LogLine[] {
  const out: LogLine[] = [];
  for (const line of stderr.split("\n")) {
    if (!line.startsWith("{")) continue;
    try {
      out.push(JSON.parse(line) as LogLine);
    } catch {
      /* a line still being written */
    }
  }
  return out;
}
