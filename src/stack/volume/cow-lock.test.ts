import { describe, expect, it } from "vitest";
import { BlockLock } from "./cow-lock.js";

describe("BlockLock", () => {
  it("block locks: shared holders run together, an exclusive one waits for them and in turn", async () => {
    const l = new BlockLock();
    const order: string[] = [];
    const r1 = await l.acquire(0, 2, true);
    const r2 = await l.acquire(1, 1, true);
    const w = l.acquire(1, 3, false).then((rel) => (order.push("w"), rel));
    const r3 = l.acquire(1, 1, true).then((rel) => (order.push("r3"), rel));
    await new Promise((r) => setTimeout(r, 5));
    expect(order).toEqual([]);
    r1();
    r2();
    (await w)();
    (await r3)();
    expect(order).toEqual(["w", "r3"]);
    expect(l.busy).toBe(0);
  });
});
