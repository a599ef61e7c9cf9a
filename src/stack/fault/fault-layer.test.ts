import { describe, expect, it } from "vitest";
import { NbdError } from "../../errors.js";
import { fuaIo, plainIo } from "../layer.js";
import { MemoryPort } from "../port/memory-port.js";
import { FaultLayer } from "./fault-layer.js";
import { RuleSyntaxError, parseRule } from "./rules.js";

const MiB = 1024 * 1024;
async function stack(opts: ConstructorParameters<typeof FaultLayer>[1] = {}) {
  const port = new MemoryPort({ size: 4 * MiB });
  const fault = new FaultLayer(port, opts);
  await fault.open();
  return { port, fault };
}
const outcome = (p: Promise<unknown>) =>
  p.then(
    () => "ok",
    (e: NbdError) => e.errno,
  );

describe("fault rules", () => {
  it("parses every item and explains what is wrong", () => {
    const r = parseRule("op=pwrite,errno=ENOSPC,rate=0.01,after=1000,range=0-4096", 1, 0);
    expect(r).toMatchObject({ op: "pwrite", errno: "ENOSPC", rate: 0.01, afterCount: 1000, range: { start: 0, end: 4096 } });
    expect(parseRule("op=any,delay=5ms..20ms", 2, 0).delay).toEqual({ min: 5, max: 20 });
    expect(parseRule("errno=EIO,after=2s,once", 3, 0)).toMatchObject({ afterMs: 2000, once: true });
    expect(() => parseRule("op=read,errno=EIO", 4, 0)).toThrow(/op=read: expected one of pread/);
    expect(() => parseRule("errno=EBUSY", 4, 0)).toThrow(/errno=EBUSY/);
    expect(() => parseRule("op=pread", 4, 0)).toThrow(/needs an effect/);
    expect(() => parseRule("errno=EIO,rate=0.5,every=2", 4, 0)).toThrow(/at most one of rate, every, once/);
    expect(() => parseRule("errno=EIO,color=red", 4, 0)).toThrow(RuleSyntaxError);
  });
});

describe("FaultLayer", () => {
  it("fails requests in a bad range with ERROR_OFFSET at the range start, and nothing else", async () => {
    const { fault } = await stack();
    fault.addRule("op=pread,errno=EIO,range=1048576-2097152");
    expect(await outcome(fault.pread(Buffer.alloc(4096), 0, plainIo))).toBe("ok");
    const err = await fault.pread(Buffer.alloc(8192), 1048576 - 4096, plainIo).catch((e) => e);
    expect(err).toBeInstanceOf(NbdError);
    expect(err).toMatchObject({ errno: "EIO", offset: 1048576 });
    expect(await outcome(fault.pwrite(Buffer.alloc(512), 1048576, plainIo))).toBe("ok"); // only reads
    expect(await outcome(fault.pread(Buffer.alloc(512), 2097152, plainIo))).toBe("ok");
    expect(fault.counts.injected).toBe(1);
  });

  it("fires at a rate within binomial bounds, and exactly the same way for the same seed", async () => {
    const run = async (seed: number) => {
      const { fault } = await stack({ seed });
      fault.addRule("op=pwrite,errno=EIO,rate=0.1");
      const out: string[] = [];
      for (let i = 0; i < 2000; i++) out.push(await outcome(fault.pwrite(Buffer.alloc(1), i, plainIo)));
      return out;
    };
    const a = await run(42);
    const fails = a.filter((o) => o === "EIO").length;
    // n=2000, p=0.1: mean 200, sd 13.4; 5 sd either side.
    expect(fails).toBeGreaterThan(133);
    expect(fails).toBeLessThan(267);
    expect(await run(42)).toEqual(a);
    expect(await run(43)).not.toEqual(a);
  });

  it("fires every N-th request, once, and only after N requests", async () => {
    const { fault } = await stack();
    fault.addRule("op=flush,errno=EIO,every=3");
    const flushes: string[] = [];
    for (let i = 0; i < 7; i++) flushes.push(await outcome(fault.flush(plainIo)));
    expect(flushes).toEqual(["ok", "ok", "EIO", "ok", "ok", "EIO", "ok"]);
    fault.clearRules();
    fault.addRule("op=zero,errno=ENOSPC,once");
    expect(await outcome(fault.zero(10, 0, plainIo))).toBe("ENOSPC");
    expect(await outcome(fault.zero(10, 0, plainIo))).toBe("ok");
    fault.clearRules();
    fault.addRule("op=pwrite,errno=EPERM,after=5");
    const w: string[] = [];
    for (let i = 0; i < 7; i++) w.push(await outcome(fault.pwrite(Buffer.alloc(1), 0, plainIo)));
    expect(w).toEqual(["ok", "ok", "ok", "ok", "ok", "EPERM", "EPERM"]);
  });

  it("fires only after T seconds when after=Ts", async () => {
    const { fault } = await stack();
    fault.addRule("op=pread,errno=EIO,after=0.15s");
    expect(await outcome(fault.pread(Buffer.alloc(1), 0, plainIo))).toBe("ok");
    await new Promise((r) => setTimeout(r, 170));
    expect(await outcome(fault.pread(Buffer.alloc(1), 0, plainIo))).toBe("EIO");
  });

  it("delays requests, and stalls them until released", async () => {
    const { fault } = await stack();
    fault.addRule("op=pread,delay=30ms..40ms");
    const t0 = performance.now();
    await fault.pread(Buffer.alloc(1), 0, plainIo);
    expect(performance.now() - t0).toBeGreaterThanOrEqual(29);
    fault.clearRules();
    fault.addRule("op=pwrite,stall");
    let done = false;
    const w = fault.pwrite(Buffer.alloc(1, 9), 0, plainIo).then(() => (done = true));
    await new Promise((r) => setTimeout(r, 30));
    expect(done).toBe(false);
    expect(fault.releaseStalled()).toBe(1);
    await w;
    expect(done).toBe(true);
  });

  it("delays or fails opening the device with op=open rules; op=any leaves opening alone", async () => {
    const port = new MemoryPort({ size: 4 * MiB });
    const fault = new FaultLayer(port);
    fault.addRule("op=any,errno=EIO");
    await fault.open(); // `any` is about requests, not opening
    fault.clearRules();
    fault.addRule("op=open,errno=EPERM,once");
    await expect(fault.open()).rejects.toMatchObject({ errno: "EPERM" });
    await fault.open();
    fault.clearRules();
    fault.addRule("op=open,stall");
    let opened = false;
    const o = fault.open().then(() => (opened = true));
    await new Promise((r) => setImmediate(r));
    expect(opened).toBe(false);
    expect(fault.releaseStalled()).toBe(1);
    await o;
    expect(fault.listRules()[0]).toMatchObject({ fired: 1 });
  });

  it("drops its unflushed writes at close: a reopened layer never writes stale data over what another owner wrote meanwhile", async () => {
    const { fault, port } = await stack({ powerloss: true });
    await fault.pwrite(Buffer.alloc(4096, 0xaa), 0, plainIo); // acknowledged, unflushed
    await fault.close(); // port A closed without a flush: the lease was lost (a fence)
    await port.open();
    await port.pwrite(Buffer.alloc(4096, 0xbb), 0, plainIo); // the new owner's write
    await fault.open(); // this node owns the image again later
    await fault.flush(plainIo);
    const back = Buffer.alloc(4096);
    await port.pread(back, 0, plainIo);
    expect(back.every((b) => b === 0xbb)).toBe(true);
    expect(fault.counts.lostWrites).toBe(1);
  });

  it("never lets a delayed or stalled write land once its client is gone (it may have been sent again elsewhere)", async () => {
    const { fault, port } = await stack();
    fault.addRule("op=pwrite,stall");
    const client = { ended: false };
    const w = outcome(fault.pwrite(Buffer.alloc(512, 7), 0, { ...plainIo, session: client }));
    await new Promise((r) => setImmediate(r));
    client.ended = true; // the client's connection closed while the write was stalled
    fault.releaseStalled();
    expect(await w).toBe("ESHUTDOWN");
    const back = Buffer.alloc(512);
    await port.pread(back, 0, plainIo);
    expect(back.every((b) => b === 0)).toBe(true);
  });

  it("ends stalled requests with ESHUTDOWN when it closes, so a shutdown never waits on a stall", async () => {
    const { fault, port } = await stack();
    fault.addRule("op=pwrite,stall");
    const w = outcome(fault.pwrite(Buffer.alloc(512, 9), 0, plainIo));
    await fault.close();
    expect(await w).toBe("ESHUTDOWN");
    const back = Buffer.alloc(512);
    await port.pread(back, 0, plainIo);
    expect(back.every((b) => b === 0)).toBe(true); // the stalled write never went down
    expect(fault.releaseStalled()).toBe(0);
  });

  it("flips bits in read data at the given rate, reproducibly", async () => {
    const { fault, port } = await stack({ seed: 5 });
    await port.pwrite(Buffer.alloc(4096, 0xaa), 0, plainIo);
    fault.addRule("op=pread,corrupt=1");
    const b = Buffer.alloc(4096);
    await fault.pread(b, 0, plainIo);
    const diff = [...b].filter((v) => v !== 0xaa);
    expect(diff).toHaveLength(1);
    const x = diff[0]! ^ 0xaa;
    expect(x & (x - 1)).toBe(0); // exactly one bit
    expect(fault.counts.corrupted).toBe(1);
  });

  it("loses exactly the unflushed writes on a power cut, keeps flushed and FUA ones, then refuses until power on", async () => {
    const { fault, port } = await stack({ powerloss: true });
    await fault.pwrite(Buffer.alloc(512, 1), 0, plainIo);
    await fault.flush(plainIo);
    await fault.pwrite(Buffer.alloc(512, 2), 512, fuaIo);
    await fault.pwrite(Buffer.alloc(512, 3), 1024, plainIo);
    await fault.pwrite(Buffer.alloc(512, 4), 0, plainIo); // overwrites flushed data, unflushed
    const seen = Buffer.alloc(1536);
    await fault.pread(seen, 0, plainIo); // reads see the volatile cache
    expect([seen[0], seen[512], seen[1024]]).toEqual([4, 2, 3]);
    expect(await fault.powerCut()).toEqual({ lost: 2, kept: 0 });
    expect(await outcome(fault.pread(Buffer.alloc(1), 0, plainIo))).toBe("ESHUTDOWN");
    expect(await outcome(fault.pwrite(Buffer.alloc(1), 0, plainIo))).toBe("ESHUTDOWN");
    fault.powerOn();
    const after = Buffer.alloc(1536);
    await fault.pread(after, 0, plainIo);
    expect([after[0], after[512], after[1024]]).toEqual([1, 2, 0]);
    const dev = Buffer.alloc(1536);
    await port.pread(dev, 0, plainIo);
    expect(dev.equals(after)).toBe(true);
  });

  it("keeps a seeded subset of unflushed writes on a power cut, torn at sector boundaries", async () => {
    const cut = async (seed: number) => {
      const { fault, port } = await stack({ powerloss: true, seed });
      for (let i = 0; i < 40; i++) await fault.pwrite(Buffer.alloc(4096, i + 1), i * 4096, plainIo);
      const r = await fault.powerCut({ keep: 0.5, torn: true });
      const dev = Buffer.alloc(40 * 4096);
      await port.pread(dev, 0, plainIo);
      return { r, dev };
    };
    const a = await cut(9);
    expect(a.r.kept + a.r.lost).toBe(40);
    expect(a.r.kept).toBeGreaterThan(5);
    expect(a.r.lost).toBeGreaterThan(5);
    for (let i = 0; i < 40; i++) {
      const blk = a.dev.subarray(i * 4096, (i + 1) * 4096);
      // Each block is a prefix of whole sectors of its write, then zeroes.
      const firstZero = blk.indexOf(0);
      const n = firstZero < 0 ? 4096 : firstZero;
      expect(n % 512).toBe(0);
      expect(blk.subarray(0, n).every((v) => v === i + 1)).toBe(true);
      expect(blk.subarray(n).every((v) => v === 0)).toBe(true);
    }
    expect((await cut(9)).dev.equals(a.dev)).toBe(true);
  });
});

/**
 * Nemesis seed 23 (30 min, copy node): a live copy into a node was abandoned while one of its
 * 1 MiB writes waited in the node's fault layer (a delay rule); the layer closed, the write then
 * landed in the power-loss cache of the closed layer, and when the node owned the image again its
 * first FLUSH wrote that stale copy over thousands of newer, durable writes.
 */
describe("FaultLayer: a write still waiting for its fault when the layer closes never lands", () => {
  it("refuses it (ESHUTDOWN) and keeps it out of the device and of the next session's power-loss cache", async () => {
    const { port, fault } = await stack({ powerloss: true });
    fault.addRule("op=pwrite,delay=80ms..80ms");
    const late = outcome(fault.pwrite(Buffer.alloc(4096, 7), 0, plainIo));
    await new Promise((r) => setTimeout(r, 10));
    await fault.close();
    await fault.open();
    expect(await late).toBe("ESHUTDOWN");
    await fault.flush(plainIo); // the next session's first FLUSH writes nothing of it
    const back = Buffer.alloc(4096);
    await port.pread(back, 0, plainIo);
    expect(back.equals(Buffer.alloc(4096))).toBe(true);
  });
});
