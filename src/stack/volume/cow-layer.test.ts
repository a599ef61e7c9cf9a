import fc from "fast-check";
import crypto from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import pino from "pino";
import { afterAll, describe, expect, it, vi } from "vitest";
import { NbdError } from "../../errors.js";
import { Command } from "commander";
import { registerCowCommands } from "../../commands/cow.js";
import { setControlToken } from "../../control/control-client.js";
import { ControlServer } from "../../control/control-server.js";
import { attachCowRoutes } from "../../control/cow-routes.js";
import { PassthroughLayer, plainIo, type Capabilities, type Extent, type Io, type Layer } from "../layer.js";
import { createFilePort } from "../port/file-port.js";
import { MemoryPort } from "../port/memory-port.js";
import { CowLayer, createCowLayer, type CowLayerOptions } from "./cow-layer.js";
import { HEADER_SIZE } from "./cow-format.js";
import { BlockLock } from "./cow-lock.js";

const BS = 8192;
const origWriteSync = fs.writeSync;
const origFdatasync = fs.fdatasync;
const SIZE = 13 * BS + 1024; // the last block is short
const fua: Io = { ...plainIo, fua: true };

const dirs: string[] = [];
function tmpdir(): string {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), "nbdstack-cow-"));
  dirs.push(d);
  return d;
}
afterAll(() => {
  for (const d of dirs) fs.rmSync(d, { recursive: true, force: true });
});

function pattern(len: number, seed: number, off: number): Buffer {
  const b = Buffer.allocUnsafe(len);
  for (let i = 0; i < len; i++) b[i] = (seed * 31 + (off + i) * 7) & 0xff || 1;
  return b;
}

/** A memory port seen as a read-only (or writable) base; counts write attempts. */
class Base extends PassthroughLayer {
  writes = 0;
  constructor(
    readonly port: MemoryPort,
    private readonly writable = false,
  ) {
    super(port);
  }
  override capabilities(): Capabilities {
    const c = this.port.capabilities();
    return this.writable ? c : { ...c, writable: false, flush: false, fua: false, trim: false, zero: false, fastZero: false };
  }
  private w(): void {
    this.writes++;
    if (!this.writable) throw new Error("the base was written");
  }
  override pwrite(b: Buffer, o: number, io: Io) {
    this.w();
    return super.pwrite(b, o, io);
  }
  override zero(l: number, o: number, io: Io) {
    this.w();
    return super.zero(l, o, io);
  }
  override trim(l: number, o: number, io: Io) {
    this.w();
    return super.trim(l, o, io);
  }
}

/** A base filled with a pattern (its first 48 KiB; the rest is unallocated zeroes). */
async function makeBase(opts: { writable?: boolean; alignment?: number; maxRequest?: number; size?: number } = {}) {
  const size = opts.size ?? SIZE;
  const port = new MemoryPort({ size, alignment: opts.alignment, maxRequest: opts.maxRequest });
  const filled = Math.min(size, 48 * 1024);
  const fill = pattern(filled, 99, 0);
  for (let at = 0; at < filled; at += 4096) await port.pwrite(fill.subarray(at, Math.min(filled, at + 4096)), at, plainIo);
  const initial = await readAll(port);
  return { base: new Base(port, opts.writable), initial };
}

async function readAll(l: Layer): Promise<Buffer> {
  const b = Buffer.alloc(l.size());
  for (let at = 0; at < b.length; at += 4096) await l.pread(b.subarray(at, Math.min(b.length, at + 4096)), at, plainIo);
  return b;
}

async function open(base: Layer, overlay: string, opts: CowLayerOptions = { blockSize: BS }): Promise<CowLayer> {
  const cow = createCowLayer(base, overlay, opts);
  await cow.open();
  return cow;
}

async function allExtents(l: Layer): Promise<Extent[]> {
  const out: Extent[] = [];
  for (let at = 0; at < l.size(); ) {
    const part = await l.extents(l.size() - at, at, plainIo);
    expect(part.length).toBeGreaterThan(0);
    for (const e of part) {
      const last = out[out.length - 1];
      if (last && last.flags === e.flags) last.length += e.length;
      else out.push({ ...e });
      at += e.length;
    }
  }
  return out;
}

type Op =
  | { kind: "write"; off: number; len: number; seed: number; fua: boolean }
  | { kind: "zero"; off: number; len: number; mayTrim: boolean }
  | { kind: "trim"; off: number; len: number }
  | { kind: "read"; off: number; len: number }
  | { kind: "flush" }
  | { kind: "restart" }
  | { kind: "crash" }
  | { kind: "snapshot" }
  | { kind: "merge" };

const range = fc.integer({ min: 0, max: SIZE - 1 }).chain((off) => fc.record({ off: fc.constant(off), len: fc.integer({ min: 1, max: Math.min(SIZE - off, 3 * BS + 700) }) }));
const opArb: fc.Arbitrary<Op> = fc.oneof(
  { weight: 6, arbitrary: range.chain((r) => fc.record({ kind: fc.constant("write" as const), off: fc.constant(r.off), len: fc.constant(r.len), seed: fc.integer({ min: 1, max: 250 }), fua: fc.boolean() })) },
  { weight: 2, arbitrary: range.chain((r) => fc.record({ kind: fc.constant("zero" as const), off: fc.constant(r.off), len: fc.constant(r.len), mayTrim: fc.boolean() })) },
  { weight: 1, arbitrary: range.map((r) => ({ kind: "trim" as const, ...r })) },
  { weight: 4, arbitrary: range.map((r) => ({ kind: "read" as const, ...r })) },
  { weight: 1, arbitrary: fc.constant({ kind: "flush" as const }) },
  { weight: 1, arbitrary: fc.constant({ kind: "restart" as const }) },
  { weight: 1, arbitrary: fc.constant({ kind: "crash" as const }) },
  { weight: 1, arbitrary: fc.constant({ kind: "snapshot" as const }) },
  { weight: 1, arbitrary: fc.constant({ kind: "merge" as const }) },
);

describe("CowLayer", () => {
  it("matches a flat-buffer model under random writes, zeroes, trims, restarts, crashes after flush, snapshots and merges; the base is never written", async () => {
    for (const variant of [{}, { alignment: 512, maxRequest: 4096 }]) {
      await fc.assert(
        fc.asyncProperty(fc.array(opArb, { minLength: 1, maxLength: 40 }), async (ops) => {
          const { base, initial } = await makeBase(variant);
          const overlay = path.join(tmpdir(), "overlay.cow");
          let cow = await open(base, overlay);
          const model = Buffer.from(initial);
          for (const op of ops) {
            switch (op.kind) {
              case "write": {
                const data = pattern(op.len, op.seed, op.off);
                await cow.pwrite(data, op.off, { ...plainIo, fua: op.fua });
                data.copy(model, op.off);
                break;
              }
              case "zero":
                await cow.zero(op.len, op.off, { ...plainIo, mayTrim: op.mayTrim });
                model.fill(0, op.off, op.off + op.len);
                break;
              case "trim":
                await cow.trim(op.len, op.off, plainIo);
                model.fill(0, op.off, op.off + op.len);
                break;
              case "read": {
                const got = Buffer.alloc(op.len);
                await cow.pread(got, op.off, plainIo);
                expect(got.equals(model.subarray(op.off, op.off + op.len))).toBe(true);
                break;
              }
              case "flush":
                await cow.flush(plainIo);
                break;
              case "restart":
                await cow.close();
                cow = await open(base, overlay, {});
                break;
              case "crash":
                // Flushed, then the process "dies": the layer is abandoned and the files reopened.
                await cow.flush(plainIo);
                cow = await open(base, overlay, {});
                break;
              case "snapshot":
                await cow.snapshot();
                break;
              case "merge":
                if (cow.info().chain.length > 1) await cow.merge();
                else await expect(cow.merge()).rejects.toThrow(/mergeIntoBase/);
                break;
            }
          }
          expect((await readAll(cow)).equals(model)).toBe(true);
          const chain = cow.info().chain.length;
          await cow.close();
          const again = await open(base, overlay, {});
          expect(again.info().chain.length).toBe(chain);
          expect((await readAll(again)).equals(model)).toBe(true);
          await again.close();
          expect(base.writes).toBe(0);
          expect((await readAll(base.port)).equals(initial)).toBe(true);
        }),
        { numRuns: 40, seed: 20261123 },
      );
    }
  }, 120_000);

  it("over a read-only image file: the image's checksum never changes, the overlay survives restart", async () => {
    const dir = tmpdir();
    const image = path.join(dir, "base.img");
    fs.writeFileSync(image, crypto.randomBytes(1024 * 1024 + 512));
    const sum = () => crypto.createHash("sha256").update(fs.readFileSync(image)).digest("hex");
    const before = sum();
    const model = fs.readFileSync(image);
    const overlay = path.join(dir, "base.cow");
    const cow = await open(createFilePort({ path: image, readOnly: true }), overlay, {});
    for (let i = 0; i < 50; i++) {
      const off = (i * 104_729) % (model.length - 70_000);
      const data = pattern(1 + ((i * 7919) % 70_000), i, off);
      data.copy(model, off);
      await cow.pwrite(data, off, plainIo);
    }
    await cow.zero(200_000, 300_001, plainIo);
    model.fill(0, 300_001, 500_001);
    await cow.close();
    const again = await open(createFilePort({ path: image, readOnly: true }), overlay, {});
    expect((await readAll(again)).equals(model)).toBe(true);
    await again.close();
    expect(sum()).toBe(before);
  });

  it("never loses bytes when concurrent unaligned writes share blocks", async () => {
    const { base, initial } = await makeBase();
    const cow = await open(base, path.join(tmpdir(), "o.cow"), { blockSize: BS, io: "async" });
    const model = Buffer.from(initial);
    const writes: Promise<void>[] = [];
    for (let i = 0; i < 400; i++) {
      const off = 100 + i * 37;
      const data = Buffer.alloc(37, (i % 254) + 1);
      data.copy(model, off);
      writes.push(cow.pwrite(data, off, plainIo));
      if (i % 50 === 0) writes.push(cow.zero(5, off + 10, plainIo).then(() => undefined));
    }
    // The zeroes race the writes around them; apply them to the model after the fact.
    await Promise.all(writes);
    for (let i = 0; i < 400; i += 50) {
      const off = 100 + i * 37;
      model.fill(0, off + 10, off + 15);
      // …unless a later write covered those bytes after the zero: rewrite them to make the test exact.
      await cow.pwrite(Buffer.alloc(5), off + 10, plainIo);
    }
    expect((await readAll(cow)).equals(model)).toBe(true);
    await cow.close();
  });

  it("keeps every flushed write across a restart and a crash; unflushed new blocks are not half-visible", async () => {
    const { base, initial } = await makeBase();
    const overlay = path.join(tmpdir(), "o.cow");
    const model = Buffer.from(initial);
    const cow = await open(base, overlay);
    const a = pattern(3 * BS + 333, 7, 5000);
    await cow.pwrite(a, 5000, plainIo);
    a.copy(model, 5000);
    await cow.zero(BS, 8 * BS, plainIo);
    model.fill(0, 8 * BS, 9 * BS);
    await cow.flush(plainIo);
    // Not flushed: a write to blocks the overlay does not hold yet.
    await cow.pwrite(pattern(1000, 9, 10 * BS + 50), 10 * BS + 50, plainIo);
    const crashed = await open(base, overlay, {});
    expect((await readAll(crashed)).equals(model)).toBe(true);
    // A FUA write is durable at once.
    const f = pattern(2000, 11, 11 * BS + 10);
    await crashed.pwrite(f, 11 * BS + 10, fua);
    f.copy(model, 11 * BS + 10);
    const crashed2 = await open(base, overlay, {});
    expect((await readAll(crashed2)).equals(model)).toBe(true);
    await crashed2.close();
    const restarted = await open(base, overlay, {});
    expect((await readAll(restarted)).equals(model)).toBe(true);
    expect(restarted.info().allocatedBytes).toBe(5 * BS);
    await restarted.close();
  });

  it("flush makes the data durable before the map names it, then the map", async () => {
    const { base } = await makeBase();
    const overlay = path.join(tmpdir(), "o.cow");
    const cow = await open(base, overlay, { blockSize: BS, io: "sync" });
    const dataOffset = 8192; // header 4 KiB + one 4 KiB map page, rounded up to the block size
    const events: string[] = [];
    const where = (pos: number | null | undefined) => (pos === null || pos === undefined ? "?" : pos >= dataOffset ? "data" : pos >= HEADER_SIZE ? "map" : "header");
    const spies = [
      vi.spyOn(fs, "writeSync").mockImplementation(function (...a: unknown[]) {
        events.push(`write ${where(a[4] as number)}`);
        return Reflect.apply(origWriteSync, fs, a) as number;
      }),
      vi.spyOn(fs, "fdatasync").mockImplementation(function (...a: unknown[]) {
        events.push("sync");
        return Reflect.apply(origFdatasync, fs, a) as void;
      }),
    ];
    try {
      await cow.pwrite(Buffer.alloc(100, 1), 3 * BS + 5, plainIo); // a new block: read-modify-write into a new slot
      await cow.pwrite(Buffer.alloc(100, 2), 3 * BS + 500, plainIo); // the same block again, in place
      expect(events).toEqual(["write data", "write data"]);
      await cow.flush(plainIo);
      expect(events).toEqual(["write data", "write data", "sync", "write map", "sync"]);
      events.length = 0;
      await cow.flush(plainIo); // nothing new: nothing to do
      await cow.zero(BS, 3 * BS, fua); // a map-only change, made durable by FUA
      expect(events).toEqual(["sync", "write map", "sync"]);
    } finally {
      for (const s of spies) s.mockRestore();
    }
    await cow.close();
  });

  it("reports blocks held by the overlay, zeroed in it, and the base's own map elsewhere", async () => {
    // Base: data in its first 64 KiB page (flags 0), holes after it (HOLE|ZERO).
    const { base } = await makeBase({ size: 16 * BS });
    const cow = await open(base, path.join(tmpdir(), "o.cow"));
    await cow.zero(BS, 2 * BS, plainIo); // inside the base's data
    await cow.pwrite(Buffer.alloc(100, 1), 10 * BS + 7, plainIo); // inside the base's hole
    expect(await allExtents(cow)).toEqual([
      { length: 2 * BS, flags: 0 },
      { length: BS, flags: 3 },
      { length: 5 * BS, flags: 0 },
      { length: 2 * BS, flags: 3 },
      { length: BS, flags: 0 },
      { length: 5 * BS, flags: 3 },
    ]);
    // A query that starts and ends inside blocks.
    expect(await cow.extents(BS, 2 * BS - 100, plainIo)).toEqual([
      { length: 100, flags: 0 },
      { length: BS - 100, flags: 3 },
    ]);
    await cow.close();
  });

  it("takes snapshots while clients write; the chain reopens after a restart", async () => {
    const { base, initial } = await makeBase();
    const overlay = path.join(tmpdir(), "vm.cow");
    const cow = await open(base, overlay, { blockSize: BS, io: "async" });
    const model = Buffer.from(initial);
    const frozen: string[] = [];
    /** The device as each snapshot froze it (index 0: snap-1). */
    const atSnapshot: Buffer[] = [];
    const below = (l: Layer) => (l as unknown as { below: Layer }).below;
    // Each round: 60 concurrent writes into disjoint 1500-byte slots (so the model is exact), a snapshot among them.
    // Writes 0..30 of a round entered the layer before the snapshot was asked for, so it holds
    // them; writes 31..59 wait for it and land in the new overlay.
    let seed = 1;
    for (let round = 0; round < 3; round++) {
      const jobs: Promise<unknown>[] = [];
      for (let i = 0; i < 60; i++) {
        const slot = (i * 7 + round * 3) % Math.floor(SIZE / 1500);
        const off = slot * 1500 + ((seed * 13) % 700);
        const len = 1 + ((seed * 101) % 800);
        const data = pattern(len, seed++, off);
        data.copy(model, off);
        jobs.push(cow.pwrite(data, off, plainIo));
        if (i === 30) {
          atSnapshot.push(Buffer.from(model));
          jobs.push(cow.snapshot().then((p) => frozen.push(p)));
        }
      }
      await Promise.all(jobs);
      expect((await readAll(cow)).equals(model)).toBe(true);
      // The writes after the snapshot changed the device (so the check below can tell)...
      expect(model.equals(atSnapshot[round]!)).toBe(false);
      // ...but not the frozen overlay just below the live one.
      expect((await readAll(below(cow))).equals(atSnapshot[round]!)).toBe(true);
    }
    expect(frozen).toEqual([1, 2, 3].map((n) => `${overlay}.snap-${n}`));
    expect(cow.info().chain.map((e) => e.path)).toEqual([overlay, ...frozen.slice().reverse()]);
    expect(cow.describe()).toBe(`cow:${overlay} → cow-snapshot:${overlay}.snap-3 → cow-snapshot:${overlay}.snap-2 → cow-snapshot:${overlay}.snap-1 → memory:${SIZE}`);
    // A snapshot freezes: its bytes stay as they were when it was taken, at every depth of the
    // chain, while the live overlay moves on; and so after a restart.
    for (let depth = 1, l = below(cow); depth <= 3; depth++, l = below(l)) expect((await readAll(l)).equals(atSnapshot[3 - depth]!), `snap-${4 - depth}`).toBe(true);
    await cow.close();
    const again = await open(base, overlay, {});
    expect(again.info().chain.length).toBe(4);
    expect((await readAll(again)).equals(model)).toBe(true);
    for (let depth = 1, l = below(again); depth <= 3; depth++, l = below(l)) expect((await readAll(l)).equals(atSnapshot[3 - depth]!), `snap-${4 - depth} reopened`).toBe(true);
    // Each .snap-N file, opened as the overlay over the base, is the device as that snapshot froze it.
    for (let n = 1; n <= 3; n++) {
      const view = await open(base, `${overlay}.snap-${n}`, { create: false });
      expect(view.info().chain.length).toBe(n);
      expect((await readAll(view)).equals(atSnapshot[n - 1]!), `${overlay}.snap-${n} opened alone`).toBe(true);
      await view.close();
    }
    await expect(again.snapshot("../elsewhere")).rejects.toThrow(/file name/);
    expect(await again.snapshot("named")).toBe(path.join(path.dirname(overlay), "named"));
    await again.close();
    expect(base.writes).toBe(0);
  });

  it("a snapshot interrupted after linking its name leaves nothing in the way of the next", async () => {
    const { base } = await makeBase();
    const overlay = path.join(tmpdir(), "o.cow");
    const cow = await open(base, overlay);
    await cow.pwrite(Buffer.alloc(10, 5), 0, plainIo);
    await cow.flush(plainIo);
    fs.linkSync(overlay, `${overlay}.snap-1`); // as if the process died right after link()
    expect(await cow.snapshot()).toBe(`${overlay}.snap-1`);
    const b = Buffer.alloc(10);
    await cow.pread(b, 0, plainIo);
    expect(b.equals(Buffer.alloc(10, 5))).toBe(true);
    await cow.close();
  });

  it("merges a snapshot chain while clients write to blocks not yet merged; the emptied overlay is dropped", async () => {
    const { base, initial } = await makeBase();
    const overlay = path.join(tmpdir(), "vm.cow");
    const cow = await open(base, overlay, { blockSize: BS, io: "async" });
    const model = Buffer.from(initial);
    const put = async (off: number, len: number, seed: number) => {
      const data = pattern(len, seed, off);
      data.copy(model, off);
      await cow.pwrite(data, off, plainIo);
    };
    await put(0, SIZE, 1);
    const snap1 = await cow.snapshot();
    await put(100, SIZE - 200, 2); // every block in the top overlay
    await cow.zero(BS, 4 * BS, plainIo);
    model.fill(0, 4 * BS, 5 * BS);
    expect(cow.info().chain.length).toBe(2);

    // While the merge runs, write into blocks it has not reached yet (and some it has).
    const writes: Promise<void>[] = [];
    let seed = 10;
    const progress: number[] = [];
    const { done } = cow.startMerge({
      onProgress: (p) => {
        progress.push(p.doneBytes);
        if (p.state !== "running") return;
        const b = (seed * 5) % 14;
        const off = b * BS + ((seed * 37) % (BS - 300));
        writes.push(put(off, 1 + ((seed * 53) % 250), seed++));
      },
    });
    expect(() => cow.startMerge()).toThrow(/merge is running/);
    await expect(cow.snapshot()).rejects.toThrow(/merge is running/);
    await done;
    await Promise.all(writes);
    expect(writes.length).toBeGreaterThan(5);
    expect(progress[progress.length - 1]).toBe(cow.progress.totalBytes);
    expect(cow.progress.state).toBe("done");
    expect((await readAll(cow)).equals(model)).toBe(true);
    // The snapshot took the overlay's name; its own name is gone.
    expect(cow.info().chain.map((e) => e.path)).toEqual([overlay]);
    expect(fs.existsSync(snap1)).toBe(false);
    await cow.close();
    const again = await open(base, overlay, {});
    expect((await readAll(again)).equals(model)).toBe(true);
    expect(again.info().chain.length).toBe(1);
    await again.close();
    expect(base.writes).toBe(0);
  });

  it("merges into the base only when asked and the base is writable", async () => {
    const ro = await makeBase();
    const cow = await open(ro.base, path.join(tmpdir(), "o.cow"));
    await cow.pwrite(Buffer.alloc(100, 1), 0, plainIo);
    await expect(cow.merge()).rejects.toThrow(/no snapshot below .* mergeIntoBase/);
    await expect(cow.merge({ mergeIntoBase: true })).rejects.toThrow(/read-only/);
    await cow.close();

    const rw = await makeBase({ writable: true, alignment: 512, maxRequest: 4096 });
    const overlay = path.join(tmpdir(), "o.cow");
    const c2 = await open(rw.base, overlay, { blockSize: BS, io: "async" });
    const model = Buffer.from(rw.initial);
    const put = async (off: number, len: number, seed: number) => {
      const data = pattern(len, seed, off);
      data.copy(model, off);
      await c2.pwrite(data, off, plainIo);
    };
    for (let i = 0; i < 20; i++) await put((i * 5077) % (SIZE - 3000), 2999, i + 1);
    await c2.trim(BS * 2 + 10, 7 * BS - 5, plainIo);
    model.fill(0, 7 * BS - 5, 9 * BS + 5);
    const writes: Promise<void>[] = [];
    let seed = 50;
    await c2.merge({
      mergeIntoBase: true,
      onProgress: (p) => {
        if (p.state === "running") writes.push(put((seed * 4099) % (SIZE - 400), 1 + (seed % 300), seed++));
      },
    });
    await Promise.all(writes);
    expect((await readAll(c2)).equals(model)).toBe(true);
    // Everything went to the base; the overlay is a fresh, empty file.
    expect(c2.info().allocatedBytes + c2.info().chain[0]!.zeroedBytes).toBe(0);
    expect((await readAll(rw.base.port)).equals(model)).toBe(true);
    expect(fs.statSync(overlay).size).toBeLessThanOrEqual(BS);
    await c2.close();
  });

  it("refuses mismatched, damaged or missing overlays with an error naming the file", async () => {
    const { base } = await makeBase();
    const dir = tmpdir();
    const overlay = path.join(dir, "o.cow");
    const cow = await open(base, overlay);
    await cow.pwrite(Buffer.alloc(BS, 1), 0, plainIo);
    await cow.snapshot();
    await cow.pwrite(Buffer.alloc(BS, 2), BS, plainIo);
    await cow.close();
    const fails = async (l: Layer, re: RegExp) => {
      const err = await l.open().catch((e: unknown) => e);
      expect(err).toBeInstanceOf(NbdError);
      expect((err as Error).message).toMatch(re);
    };
    const other = await makeBase({ size: SIZE + 512 });
    await fails(createCowLayer(other.base, overlay), new RegExp(`${overlay}: the overlay was made for a ${SIZE}-byte device, but the base memory:${SIZE + 512} has ${SIZE + 512} bytes`));
    await fails(createCowLayer(base, overlay, { blockSize: 4096 }), new RegExp(`${overlay}: the overlay's block size is ${BS}, not 4096`));
    await fails(createCowLayer(base, path.join(dir, "missing.cow"), { create: false }), /missing\.cow: the overlay does not exist/);

    const copy = (name: string) => {
      const p = path.join(dir, name);
      fs.copyFileSync(overlay, p);
      return p;
    };
    const garbage = path.join(dir, "garbage.cow");
    fs.writeFileSync(garbage, Buffer.alloc(8192, 0x41));
    await fails(createCowLayer(base, garbage), /garbage\.cow: not an nbdstack copy-on-write overlay/);
    const short = path.join(dir, "short.cow");
    fs.writeFileSync(short, "NBDSCOW1");
    await fails(createCowLayer(base, short), /short\.cow: too short/);
    const bad = copy("bad.cow");
    const fd = fs.openSync(bad, "r+");
    fs.writeSync(fd, Buffer.from([0xff]), 0, 1, 30);
    fs.closeSync(fd);
    await fails(createCowLayer(base, bad), /bad\.cow: overlay header checksum mismatch/);
    const cut = copy("cut.cow");
    fs.truncateSync(cut, HEADER_SIZE + 8);
    await fails(createCowLayer(base, cut), /cut\.cow: truncated/);
    const wild = copy("wild.cow");
    const wfd = fs.openSync(wild, "r+");
    const e = Buffer.alloc(4);
    e.writeUInt32LE(1_000_000);
    fs.writeSync(wfd, e, 0, 4, HEADER_SIZE + 4 * 3);
    fs.closeSync(wfd);
    await fails(createCowLayer(base, wild), /wild\.cow: allocation map entry of block 3 .* past the end of the file/);
    fs.rmSync(`${overlay}.snap-1`);
    await fails(createCowLayer(base, overlay), new RegExp(`${overlay}: its backing overlay ${overlay}\\.snap-1 is missing`));
    expect(base.writes).toBe(0);
  });

  it("refuses writes to a frozen snapshot and fast zeroes of partial blocks", async () => {
    const { base } = await makeBase();
    const cow = await open(base, path.join(tmpdir(), "o.cow"));
    expect(cow.capabilities()).toMatchObject({ writable: true, flush: true, fua: true, trim: true, zero: true, multiConn: true, cache: true });
    await expect(cow.zero(100, 10, { ...plainIo, fast: true })).rejects.toMatchObject({ errno: "ENOTSUP" });
    await expect(cow.zero(2 * BS, BS, { ...plainIo, fast: true })).resolves.toBeUndefined();
    await cow.snapshot();
    const below = (cow as unknown as { below: Layer }).below;
    expect(below.capabilities().writable).toBe(false);
    await expect(below.pwrite(Buffer.alloc(1), 0, plainIo)).rejects.toMatchObject({ errno: "EPERM" });
    await cow.close();
  });

  it("serves snapshot, merge and status on the control API", async () => {
    const { base } = await makeBase();
    const overlay = path.join(tmpdir(), "vm.cow");
    const cow = await open(base, overlay);
    await cow.pwrite(Buffer.alloc(3 * BS, 3), 0, plainIo);
    const server = new ControlServer(pino({ level: "silent" }), "t".repeat(32));
    attachCowRoutes(server, new Map([["vm", cow]]));
    const url = await server.listen("127.0.0.1", 0);
    const call = async (method: string, p: string, body?: unknown) => {
      const res = await fetch(`${url}${p}`, {
        method,
        headers: { authorization: `Bearer ${"t".repeat(32)}`, "content-type": "application/json" },
        body: body === undefined ? undefined : JSON.stringify(body),
      });
      return { status: res.status, body: (await res.json()) as Record<string, unknown> };
    };
    try {
      const st = await call("GET", "/v1/exports/vm/cow");
      expect(st.status).toBe(200);
      expect(st.body).toMatchObject({ overlay, allocatedBytes: 3 * BS, blockSize: BS, merge: { state: "idle" } });
      expect((await call("GET", "/v1/exports/nope/cow")).status).toBe(404);
      expect((await call("POST", "/v1/exports/vm/cow", { merge: true })).status).toBe(409);
      const snap = await call("POST", "/v1/exports/vm/cow", { snapshot: true });
      expect(snap.body.snapshot).toBe(`${overlay}.snap-1`);
      expect((snap.body.chain as unknown[]).length).toBe(2);
      await cow.pwrite(Buffer.alloc(2 * BS, 4), BS, plainIo);
      const m = await call("POST", "/v1/exports/vm/cow", { merge: true, wait: true });
      expect(m.status).toBe(200);
      expect(m.body).toMatchObject({ merge: { state: "done", doneBytes: 2 * BS, totalBytes: 2 * BS } });
      expect((m.body.chain as unknown[]).length).toBe(1);
      expect((await call("POST", "/v1/exports/vm/cow", { other: 1 })).status).toBe(400);

      // The same through the commands.
      setControlToken("t".repeat(32));
      const out: string[] = [];
      const spy = vi.spyOn(process.stdout, "write").mockImplementation((chunk: string | Uint8Array) => (out.push(String(chunk)), true));
      try {
        const cli = () => {
          const program = new Command().exitOverride();
          registerCowCommands(program);
          return program;
        };
        await cli().parseAsync(["snapshot", "vm", "--control", url, "--as", "before-upgrade"], { from: "user" });
        await cow.pwrite(Buffer.alloc(BS, 5), 0, plainIo);
        await cli().parseAsync(["merge", "vm", "--control", url, "--wait"], { from: "user" });
        await cli().parseAsync(["cow", "vm", "--control", url], { from: "user" });
      } finally {
        spy.mockRestore();
      }
      const text = out.join("");
      expect(text).toContain(`froze the overlay of vm as ${path.join(path.dirname(overlay), "before-upgrade")}`);
      expect(text).toContain(`merged 8.0 KiB of vm into ${path.join(path.dirname(overlay), "before-upgrade")}`);
      expect(text).toMatch(/overlay +24\.0 KiB data +0 B zeroed  .*vm\.cow\n/);
      expect(text).toMatch(/merge +done/);
    } finally {
      await server.close();
      await cow.close();
    }
  });

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
