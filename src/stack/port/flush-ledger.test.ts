import { describe, expect, it } from "vitest";
import { plainIo, type Io } from "../layer.js";
import { FlushLedger } from "./flush-ledger.js";

const client = (): Io => ({ ...plainIo, session: { ended: false } });

describe("FlushLedger", () => {
  // Nemesis seed 8 (3 nodes, at 40 s): a client's FLUSHes were in flight when it wrote once more
  // through port B; the owner died; the first FLUSH to complete reported the loss and cleared it
  // whole, so the next FLUSH — the first to cover the last write — succeeded over it.
  it("a loss reported to a FLUSH sent before the last lost write still fails the next FLUSH, which covers that write", () => {
    const l = new FlushLedger();
    const c = client();
    l.ackedB(c); // w1
    const early = l.flushSent(c); // covers w1
    l.ackedB(c); // w2, acknowledged while that FLUSH runs
    l.ownerLost(); // w1 and w2 may be lost
    expect(l.flushed(early)).toMatch(/may be lost/);
    expect(l.flushed(l.flushSent(c))).toMatch(/may be lost/); // covers w2: never vouched for
    expect(l.flushed(l.flushSent(c))).toBeNull(); // reported: the next one succeeds
  });

  it("a FLUSH sent before any lost write was acknowledged does not take the EIO", () => {
    const l = new FlushLedger();
    const c = client();
    const before = l.flushSent(c);
    l.ackedB(c);
    l.ownerLost();
    expect(l.flushed(before)).toBeNull();
    expect(l.flushed(l.flushSent(c))).toMatch(/may be lost/);
    expect(l.flushed(l.flushSent(c))).toBeNull();
  });

  it("a hand-over settles what port B acknowledged: nothing is lost", () => {
    const l = new FlushLedger();
    const c = client();
    l.ackedB(c);
    l.settled();
    l.ownerLost();
    expect(l.flushed(l.flushSent(c))).toBeNull();
  });
});
