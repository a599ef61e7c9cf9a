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
    expect(l.flushed(l.flushSent(c))).toMatch(/may be lost/); // reported again to the next (see below)
    expect(l.flushed(l.flushSent(c))).toBeNull();
  });

  // Nemesis on the lab (seed 15): a client sent a FLUSH while a write's reply was on its way to it;
  // the server counted the write as covered (it had answered it before the FLUSH arrived), the
  // client did not. That FLUSH failed for the lost write, the client's next FLUSH — its first to
  // cover the write — succeeded, and the client took the lost write for durable.
  it("a lost write is reported twice: to the first FLUSH that covers it here and to the first one that arrives after that failure", () => {
    for (const port of ["A", "B"] as const) {
      const l = new FlushLedger();
      const c = client();
      if (port === "B") l.ackedB(c);
      else l.sentA(c);
      const crossing = l.flushSent(c); // the write's reply and this FLUSH crossed on the wire
      if (port === "B") l.ownerLost();
      else l.fenced();
      expect(l.flushed(crossing)).toMatch(/may be lost/);
      expect(l.flushed(l.flushSent(c))).toMatch(/may be lost/); // the client's first FLUSH that covers the write
      expect(l.flushed(l.flushSent(c))).toBeNull();
    }
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
