import { afterEach, describe, expect, it, vi } from "vitest";
import { idleProgress, type CopyProgress } from "../copy/progress.js";
import { CopyProgressBars, progressLine } from "./progress-bar.js";

const MiB = 1024 * 1024;
const at = (done: number, dirty: number, extra: Partial<CopyProgress> = {}): CopyProgress => ({ ...idleProgress(), state: "running", totalBytes: 16 * MiB, doneBytes: done, dirtyBytes: dirty, rate: 2 * MiB, etaSeconds: 4.5, ...extra });

/** A stream that records what is written; a terminal or not. */
function stream(isTTY: boolean) {
  const out: string[] = [];
  return { out, s: { isTTY, columns: 200, write: (c: string) => (out.push(c), true), on: () => undefined, removeListener: () => undefined, cursorTo: () => true, moveCursor: () => true, clearLine: () => true, clearScreenDown: () => true } as unknown as NodeJS.WriteStream };
}

describe("progress bar", () => {
  afterEach(() => vi.useRealTimers());

  it("draws a copy's progress as one line: what is no longer dirty, never ahead of the bytes copied", () => {
    expect(progressLine("copying", at(6 * MiB, 12 * MiB), "background")).toBe(`copying [${"█".repeat(10)}${"░".repeat(30)}] 25% | 6.0/16.0 MiB | 2.0 MiB/s | dirty 12.0 MiB | background | ETA 4.5s`);
    expect(progressLine("leg 1 resync", at(16 * MiB, 0, { state: "done", etaSeconds: null }))).toBe(`leg 1 resync [${"█".repeat(40)}] 100% | 16.0/16.0 MiB | 2.0 MiB/s | dirty 0.0 MiB | ETA -`);
    expect(progressLine("x", { ...idleProgress() })).toMatch(/^x \[░{40}\] 0% \| 0\.0\/0\.0 MiB/);
  });

  it("off a terminal: a line at the first update, then at most one every lineEveryMs, and the last state at stop", () => {
    vi.useFakeTimers({ toFake: ["performance"] });
    const { out, s } = stream(false);
    const bars = new CopyProgressBars({ stream: s, lineEveryMs: 1000 });
    bars.update("a", "copying", at(0, 16 * MiB));
    bars.update("a", "copying", at(1 * MiB, 15 * MiB)); // too soon
    bars.update("b", "leg 2 resync", at(0, 16 * MiB)); // another bar: its own first line
    vi.advanceTimersByTime(1000);
    bars.update("a", "copying", at(2 * MiB, 14 * MiB));
    bars.update("a", "final", at(16 * MiB, 0));
    bars.stop();
    bars.update("a", "copying", at(0, 16 * MiB)); // after stop: ignored
    expect(out.map((l) => l.split(" | ")[0])).toEqual([
      `copying [${"░".repeat(40)}] 0%`,
      `leg 2 resync [${"░".repeat(40)}] 0%`,
      `copying [${"█".repeat(5)}${"░".repeat(35)}] 12%`,
      `final [${"█".repeat(40)}] 100%`,
    ]);
    expect(out.every((l) => l.endsWith("\n"))).toBe(true);
  });

  it("disabled (--json, --no-progress): writes nothing; on a terminal: redraws in place", () => {
    const off = stream(false);
    const bars = new CopyProgressBars({ enabled: false, stream: off.s });
    bars.update("a", "copying", at(0, 16 * MiB));
    bars.stop();
    expect(off.out).toEqual([]);
    const tty = stream(true);
    const live = new CopyProgressBars({ stream: tty.s });
    live.update("a", "copying", at(8 * MiB, 8 * MiB));
    live.stop();
    expect(tty.out.join("")).toContain(progressLine("copying", at(8 * MiB, 8 * MiB)));
  });
});
