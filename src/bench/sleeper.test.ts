import { describe, expect, it } from "vitest";
import { sleeper } from "./sleeper.js";

describe("the bench's sleeps on its own clock", () => {
  it("never ends before the planned time by that clock, even when timers fire early against it", async () => {
    // A clock that runs at half the speed of the timers': each timer fires "early" by it.
    const t0 = performance.now();
    const now = () => (performance.now() - t0) / 2;
    const s = sleeper(now);
    await s.sleepUntil(40);
    expect(now()).toBeGreaterThanOrEqual(40);
    const late = performance.now() - t0;
    expect(late).toBeGreaterThanOrEqual(80);
    expect(late).toBeLessThan(2000);
  });

  it("ends at once for a time already past, and wakeAll ends every sleep", async () => {
    const t0 = performance.now();
    const s = sleeper(() => performance.now() - t0);
    await s.sleepUntil(-1);
    let ended = 0;
    const sleeps = [s.sleepUntil(60_000).then(() => ended++), s.sleepUntil(120_000).then(() => ended++)];
    s.wakeAll();
    await Promise.all(sleeps);
    expect(ended).toBe(2);
    expect(performance.now() - t0).toBeLessThan(1000);
  });
});
