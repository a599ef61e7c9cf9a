import cliProgress from "cli-progress";
import type { CopyProgress } from "../copy/progress.js";

const MiB = 1024 * 1024;
const mib = (n: number) => (n / MiB).toFixed(1);
const WIDTH = 40;

/**
 * One line of a copy's progress: `LABEL [████░░░░] 42% | 6.7/16.0 MiB | 2.0 MiB/s | dirty 9.3 MiB | NOTE | ETA 4.7s`.
 * The bar and the percentage show what is no longer dirty of what the copy was given, so they
 * never run ahead of the bytes copied.
 */
export function progressLine(label: string, p: CopyProgress, note?: string): string {
  const total = Math.max(p.totalBytes, 1);
  const value = Math.min(total, Math.max(0, p.totalBytes - p.dirtyBytes));
  const full = Math.round((value / total) * WIDTH);
  const eta = p.etaSeconds === null ? "-" : `${p.etaSeconds}s`;
  const parts = [`${label} [${"█".repeat(full)}${"░".repeat(WIDTH - full)}] ${Math.floor((100 * value) / total)}%`, `${mib(p.doneBytes)}/${mib(p.totalBytes)} MiB`, `${mib(p.rate)} MiB/s`, `dirty ${mib(p.dirtyBytes)} MiB`];
  if (note) parts.push(note);
  return [...parts, `ETA ${eta}`].join(" | ");
}

interface Shown {
  label: string;
  p: CopyProgress;
  note?: string;
  bar?: cliProgress.SingleBar;
  line?: string;
  at: number;
}

/**
 * The progress bars of the CLI's copies (`migrate --copy`, `mirror --wait`, `merge --wait`), one
 * per key, on stderr. On a terminal they are redrawn in place (cli-progress); otherwise each is a
 * line: at its first update, then at most one every `lineEveryMs` (default 2 s), and its last
 * state at stop().
 */
export class CopyProgressBars {
  private readonly stream: NodeJS.WriteStream;
  private readonly shown = new Map<string, Shown>();
  private multi: cliProgress.MultiBar | null = null;
  private stopped = false;

  constructor(private readonly o: { enabled?: boolean; stream?: NodeJS.WriteStream; lineEveryMs?: number } = {}) {
    this.stream = o.stream ?? process.stderr;
  }

  update(key: string, label: string, p: CopyProgress, note?: string): void {
    if (this.o.enabled === false || this.stopped) return;
    let s = this.shown.get(key);
    if (!s) this.shown.set(key, (s = { label, p, note, at: -Infinity }));
    Object.assign(s, { label, p, note });
    if (this.stream.isTTY) {
      this.multi ??= new cliProgress.MultiBar({ format: (_o, _params, payload: { s: Shown }) => progressLine(payload.s.label, payload.s.p, payload.s.note), hideCursor: true, stream: this.stream });
      if (!s.bar) s.bar = this.multi.create(1, 0, { s });
      else s.bar.update(0, { s });
      return;
    }
    const now = performance.now();
    if (now - s.at >= (this.o.lineEveryMs ?? 2000)) this.write(s, now);
  }

  private write(s: Shown, now: number): void {
    const line = progressLine(s.label, s.p, s.note);
    s.at = now;
    s.line = line;
    this.stream.write(line + "\n");
  }

  /** Draws the last state of every bar and lets go of the terminal; later updates are ignored. */
  stop(): void {
    if (this.stopped) return;
    this.stopped = true;
    if (this.multi) {
      this.multi.stop();
      this.multi = null;
    } else for (const s of this.shown.values()) if (progressLine(s.label, s.p, s.note) !== s.line) this.write(s, performance.now());
    this.shown.clear();
  }
}
