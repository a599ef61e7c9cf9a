import { describe, expect, it } from "vitest";
import { RangeLock } from "./range-lock.js";

const tick = () => new Promise((r) => setImmediate(r));

describe("RangeLock", () => {
  it("shared holders run together; an exclusive one waits for them, and later readers wait for it (first come, first served)", async () => {
    const l = new RangeLock();
    const order: string[] = [];
    const r1 = await l.acquire(0, 3, true);
    const r2 = await l.acquire(1, 2, true);
    const w = l.acquire(1, 4).then((rel) => (order.push("w"), rel));
    const r3 = l.acquire(1, 2, true).then((rel) => (order.push("r3"), rel));
    await tick();
    expect(order).toEqual([]);
    r1();
    await tick();
    expect(order).toEqual([]); // r2 still holds
    r2();
    (await w)();
    (await r3)();
    expect(order).toEqual(["w", "r3"]);
    expect(l.busy).toBe(0);
  });

  it("disjoint ranges never wait; touching ends do not overlap", async () => {
    const l = new RangeLock();
    const a = await l.acquire(0, 10);
    const b = await l.acquire(10, 20);
    const order: string[] = [];
    const c = l.acquire(5, 15).then((rel) => (order.push("c"), rel));
    const d = await l.acquire(20, 30); // not behind c: no overlap with it
    await tick();
    expect(order).toEqual([]);
    a();
    await tick();
    expect(order).toEqual([]);
    b();
    (await c)();
    d();
    expect(l.busy).toBe(0);
  });

  it("a later request that conflicts only with a waiting one waits for it; a compatible one does not", async () => {
    const l = new RangeLock();
    const order: string[] = [];
    const hold = await l.acquire(0, 10, true);
    const w = l.acquire(5, 15).then((rel) => (order.push("w"), rel)); // waits for hold
    const x = l.acquire(12, 20).then((rel) => (order.push("x"), rel)); // conflicts only with waiting w
    const y = await l.acquire(20, 30); // conflicts with nobody
    await tick();
    expect(order).toEqual([]);
    hold();
    (await w)();
    (await x)();
    expect(order).toEqual(["w", "x"]);
    y();
    expect(l.busy).toBe(0);
  });

  it("releasing twice is harmless", async () => {
    const l = new RangeLock();
    const r = await l.acquire(0, 1);
    r();
    r();
    const again = await l.acquire(0, 1);
    again();
    expect(l.busy).toBe(0);
  });
});
