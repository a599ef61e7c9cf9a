// The checker's rules on hand-made histories: what it must accept and what it must report.
import { describe, expect, it } from "vitest";
// @ts-expect-error -- a plain ES module without types, shared with scripts run by node
import { BLOCK, Checker, decodeBlock, encodeBlock } from "./checker.mjs";

const conn = () => ({ unflushed: [] as Array<[number, number]> });
const mk = () => new Checker({ blocks: 4, writerOf: () => 1 });
const image = (versions: number[]) => Buffer.concat(versions.map((v, b) => (v ? encodeBlock(b, v, 1) : Buffer.alloc(BLOCK))));

describe("nemesis checker", () => {
  it("encodes and decodes payloads; a torn or misplaced block is corrupt", () => {
    expect(decodeBlock(encodeBlock(3, 7, 2), 3)).toEqual({ version: 7, writer: 2 });
    expect(decodeBlock(Buffer.alloc(BLOCK), 0)).toEqual({ version: 0 });
    const torn = Buffer.concat([encodeBlock(1, 2, 1).subarray(0, 2048), encodeBlock(1, 1, 1).subarray(2048)]);
    expect(decodeBlock(torn, 1).corrupt).toMatch(/differs from byte 2048/);
    expect(decodeBlock(encodeBlock(2, 1, 1), 1).corrupt).toMatch(/payload of block 2/);
  });

  it("accepts the last acknowledged version or one in flight; reports an older one", () => {
    const c = mk();
    const k = conn();
    const w1 = c.writeSent(k, 0, 1, false, 0);
    c.writeAcked(w1, 1);
    const w2 = c.writeSent(k, 0, 2, false, 2);
    expect(c.readDone(c.readSent(0, 1, 3), encodeBlock(0, 1, 1), 4, "t")).toEqual([]); // w2 in flight: 1 or 2
    expect(c.readDone(c.readSent(0, 1, 3), encodeBlock(0, 2, 1), 4, "t")).toEqual([]);
    c.writeAcked(w2, 5);
    expect(c.readDone(c.readSent(0, 1, 6), encodeBlock(0, 1, 1), 7, "t")[0]).toMatchObject({ kind: "stale read (non-linearizable)", got: 1, floor: 2 });
    expect(c.readDone(c.readSent(0, 1, 6), encodeBlock(0, 3, 1), 7, "t")[0]).toMatchObject({ kind: "read of a version never written" });
  });

  it("reads never go back: after a read returned an in-flight version, later reads need it", () => {
    const c = mk();
    const w1 = c.writeSent(conn(), 1, 1, false, 0);
    expect(c.readDone(c.readSent(1, 1, 1), encodeBlock(1, 1, 1), 2, "t")).toEqual([]);
    expect(c.readDone(c.readSent(1, 1, 3), Buffer.alloc(BLOCK), 4, "t")[0]).toMatchObject({ kind: "stale read (non-linearizable)" });
    c.writeIndeterminate(w1, 5);
  });

  it("after a loss event, only what a FLUSH or FUA made durable is owed", () => {
    const c = mk();
    const k = conn();
    c.writeAcked(c.writeSent(k, 0, 1, false, 0), 1);
    const f = c.flushSent(k, 2);
    c.flushAcked(f, 3);
    c.writeAcked(c.writeSent(k, 0, 2, false, 4), 5); // never flushed
    c.writeAcked(c.writeSent(k, 1, 1, true, 4), 5); // FUA
    c.writeAcked(c.writeSent(k, 2, 1, false, 4), 5); // flushed by a FLUSH sent before it was acknowledged: not covered
    c.loss(6, "SIGKILL a");
    expect(c.readDone(c.readSent(0, 3, 7), image([1, 1, 0]), 8, "t")).toEqual([]);
    expect(c.readDone(c.readSent(1, 1, 7), Buffer.alloc(BLOCK), 8, "t")[0]).toMatchObject({ kind: "lost durable write (read)", block: 1 });
  });

  it("a write answered just after a loss event may be lost with it; answered after a later event, it is owed", () => {
    // Seed 303: the owner answered a write and was frozen; the reply arrived after the nemesis had
    // declared the loss. Seed 8 (finding 12): a write answered after its frozen owner continued.
    const c = mk();
    const k = conn();
    c.writeAcked(c.writeSent(k, 0, 1, true, 0), 1); // durable (FUA)
    const w2 = c.writeSent(k, 0, 2, false, 2);
    c.loss(3, "b frozen");
    c.writeAcked(w2, 4); // the reply was already on its way
    expect(c.readDone(c.readSent(0, 1, 5), encodeBlock(0, 1, 1), 6, "t")).toEqual([]);
    const w3 = c.writeSent(k, 0, 3, false, 7);
    c.loss(8, "a frozen");
    c.loss(9, "a frozen (end)");
    c.writeAcked(w3, 10); // answered after a continued: owed
    expect(c.readDone(c.readSent(0, 1, 11), encodeBlock(0, 1, 1), 12, "t")[0]).toMatchObject({ kind: "stale read (non-linearizable)", floor: 3 });
  });

  it("a network fault's loss events: a write in flight across them and answered within `until` may be lost; a later one is owed", () => {
    // Lab seed 1212: the owner b applied v19 (volatile cache) before its deadline, during 50 %
    // packet loss; b lost etcd and was fenced (its cache dropped), c took the image over after the
    // fault healed; b's reply, retransmitted, reached the client 79 ms after the fault ended (every
    // loss event already declared). A read then served by c returned v18.
    const c = mk();
    const k = conn();
    c.writeAcked(c.writeSent(k, 0, 1, true, 0), 1); // durable (FUA)
    c.loss(2, "loss b", { until: 2 + 5000 });
    const w2 = c.writeSent(k, 0, 2, false, 3);
    c.loss(100, "loss b (during)", { until: 100 + 5000 });
    c.loss(200, "loss b (end)", { until: 200 + 5000 });
    c.writeAcked(w2, 300); // late reply of a write the fenced owner lost
    expect(c.readDone(c.readSent(0, 1, 400), encodeBlock(0, 1, 1), 401, "t")).toEqual([]);
    // A write sent after the fault ended is owed as usual.
    const w3 = c.writeSent(k, 0, 3, false, 500);
    c.writeAcked(w3, 501);
    expect(c.readDone(c.readSent(0, 1, 502), encodeBlock(0, 1, 1), 503, "t")[0]).toMatchObject({ kind: "stale read (non-linearizable)", floor: 3 });
    // One in flight across them but answered after `until`: owed.
    const w4 = c.writeSent(k, 0, 4, false, 600);
    c.loss(700, "loss b again", { until: 800 });
    c.loss(750, "loss b again (end)", { until: 800 });
    c.writeAcked(w4, 900);
    expect(c.readDone(c.readSent(0, 1, 901), encodeBlock(0, 3, 1), 902, "t")[0]).toMatchObject({ kind: "stale read (non-linearizable)", floor: 4 });
  });

  it("a read in flight across a loss event may see the loss", () => {
    const c = mk();
    c.writeAcked(c.writeSent(conn(), 3, 1, false, 0), 1);
    const r = c.readSent(3, 1, 2);
    c.loss(3, "SIGSTOP a");
    expect(c.readDone(r, Buffer.alloc(BLOCK), 4, "t")).toEqual([]);
  });

  it("an EIO'd FLUSH vouches for nothing, now or later", () => {
    const c = mk();
    const k = conn();
    c.writeAcked(c.writeSent(k, 0, 1, false, 0), 1);
    c.flushEio(c.flushSent(k, 2), 3);
    c.flushAcked(c.flushSent(k, 4), 5);
    expect(c.durable[0]).toBe(0);
  });

  it("checks the image: durable versions present, nothing invented, nothing torn", () => {
    const c = mk();
    const k = conn();
    c.writeAcked(c.writeSent(k, 0, 1, true, 0), 1);
    c.writeAcked(c.writeSent(k, 1, 1, false, 0), 1);
    c.writeAcked(c.writeSent(k, 1, 2, true, 2), 3);
    expect(c.checkImage(image([1, 2, 0, 0])).found).toEqual([]);
    expect(c.checkImage(image([0, 2, 0, 0])).found[0]).toMatchObject({ kind: "lost durable write (image)", block: 0 });
    expect(c.checkImage(image([1, 1, 0, 0])).found[0]).toMatchObject({ kind: "lost durable write (image)", block: 1 });
    expect(c.checkImage(image([1, 2, 1, 0])).found[0]).toMatchObject({ kind: "image holds a version never written", block: 2 });
  });
});
