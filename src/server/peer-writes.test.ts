import { describe, expect, it } from "vitest";
import { applyOnce } from "./peer-writes.js";

describe("applyOnce: each tagged write of a port B session runs once", () => {
  it("skips a tag that ran, waits for one that runs, runs again one that failed, and keeps sessions apart", async () => {
    let runs = 0;
    const ok = () => (runs++, Promise.resolve());
    await applyOnce("s1", 1, ok);
    await applyOnce("s1", 1, ok);
    expect(runs).toBe(1);
    await applyOnce("s2", 1, ok); // another session's tag 1
    expect(runs).toBe(2);

    let release!: () => void;
    const slow = () => (runs++, new Promise<void>((r) => (release = r)));
    const first = applyOnce("s1", 2, slow);
    const again = applyOnce("s1", 2, ok); // sent again while the first still runs
    await new Promise((r) => setTimeout(r, 10));
    expect(runs).toBe(3);
    release();
    await Promise.all([first, again]);
    expect(runs).toBe(3);

    const failing = () => (runs++, Promise.reject(new Error("EIO")));
    await expect(applyOnce("s1", 3, failing)).rejects.toThrow("EIO");
    await applyOnce("s1", 3, ok); // the failed one never took effect: the resend runs
    expect(runs).toBe(5);
  });
});
