import { describe, expect, it } from "vitest";
import { applyOnce, PEER_WRITE_WINDOW } from "./peer-writes.js";

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

describe("applyOnce: the window of remembered tags", () => {
  it("remembers the last PEER_WRITE_WINDOW tags of a session and forgets older ones", async () => {
    const session = `window-${Math.random()}`;
    let runs = 0;
    const ok = () => (runs++, Promise.resolve());
    for (let t = 1; t <= PEER_WRITE_WINDOW + 10; t++) await applyOnce(session, t, ok);
    expect(runs).toBe(PEER_WRITE_WINDOW + 10);
    await applyOnce(session, PEER_WRITE_WINDOW + 10, ok); // the newest: remembered
    await applyOnce(session, 11, ok); // the oldest still in the window
    expect(runs).toBe(PEER_WRITE_WINDOW + 10);
    await applyOnce(session, 10, ok); // fell out of the window: applied again
    expect(runs).toBe(PEER_WRITE_WINDOW + 11);
  });
});
