import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { NbdError } from "../../errors.js";
import { State } from "../../protocol/constants.js";
import { FaultLayer } from "../fault/fault-layer.js";
import { PassthroughLayer, plainIo, type Capabilities, type Io, type Layer } from "../layer.js";
import { MemoryPort } from "../port/memory-port.js";
import { extentsCovering } from "./common.js";
import { ConcatLayer, createConcatLayer } from "./concat-layer.js";
import { createStripeLayer, StripeLayer } from "./stripe-layer.js";

type Op =
  | { kind: "write"; off: number; len: number; seed: number; fua: boolean }
  | { kind: "zero"; off: number; len: number; mayTrim: boolean }
  | { kind: "trim"; off: number; len: number }
  | { kind: "read"; off: number; len: number };

interface Config {
  name: string;
  sizes: number[];
  align: number;
  max?: number;
  /** Longest generated request. */
  maxLen: number;
  make: (children: Layer[]) => Layer;
  /** Independent model of the layout: volume offset → [child, offset in the child]. */
  map: (p: number, sizes: number[]) => [number, number];
}

const concatMap = (p: number, sizes: number[]): [number, number] => {
  let i = 0;
  while (p >= sizes[i]!) p -= sizes[i++]!;
  return [i, p];
};
const stripeMap =
  (chunk: number) =>
  (p: number, sizes: number[]): [number, number] => {
    const c = Math.floor(p / chunk);
    return [c % sizes.length, Math.floor(c / sizes.length) * chunk + (p % chunk)];
  };

const configs: Config[] = [
  { name: "concat, byte granular", sizes: [3 * 65536 + 4096, 8192, 100_001, 2 * 65536], align: 1, maxLen: 140_000, make: (c) => new ConcatLayer(c), map: concatMap },
  { name: "concat, 512-aligned, 8 KiB max", sizes: [65536 + 512, 4096, 3 * 65536], align: 512, max: 8192, maxLen: 80_000, make: (c) => new ConcatLayer(c), map: concatMap },
  { name: "stripe ×3, 4 KiB chunks", sizes: [200_000, 300_000, 250_000], align: 1, maxLen: 50_000, make: (c) => new StripeLayer(c, 4096), map: stripeMap(4096) },
  { name: "stripe ×2, 64 KiB chunks", sizes: [5 * 65536, 4 * 65536 + 7], align: 1, maxLen: 200_000, make: (c) => new StripeLayer(c, 65536), map: stripeMap(65536) },
  { name: "stripe ×4, 1536-byte chunks, 512-aligned, 4 KiB max", sizes: [50 * 1536, 60 * 1536 + 512, 51 * 1536, 70 * 1536], align: 512, max: 4096, maxLen: 40_000, make: (c) => new StripeLayer(c, 1536), map: stripeMap(1536) },
];

function pattern(len: number, seed: number, off: number): Buffer {
  const b = Buffer.allocUnsafe(len);
  for (let i = 0; i < len; i++) b[i] = (seed * 31 + (off + i) * 7) & 0xff || 1;
  return b;
}

function opArb(size: number, cfg: Config): fc.Arbitrary<Op> {
  const a = cfg.align;
  const blocks = size / a;
  const rw = cfg.max ?? cfg.maxLen;
  const range = (maxLen: number) =>
    fc.integer({ min: 0, max: blocks - 1 }).chain((b) => fc.record({ off: fc.constant(b * a), len: fc.integer({ min: 1, max: Math.max(1, Math.min(blocks - b, Math.floor(maxLen / a))) }).map((n) => n * a) }));
  return fc.oneof(
    range(rw).chain((r) => fc.record({ kind: fc.constant("write" as const), off: fc.constant(r.off), len: fc.constant(r.len), seed: fc.integer({ min: 1, max: 250 }), fua: fc.boolean() })),
    range(cfg.maxLen).chain((r) => fc.record({ kind: fc.constant("zero" as const), off: fc.constant(r.off), len: fc.constant(r.len), mayTrim: fc.boolean() })),
    range(cfg.maxLen).map((r) => ({ kind: "trim" as const, ...r })),
    range(rw).map((r) => ({ kind: "read" as const, ...r })),
  );
}

async function build(cfg: Config) {
  const ports = cfg.sizes.map((size) => new MemoryPort({ size, alignment: cfg.align === 1 ? undefined : cfg.align, maxRequest: cfg.max }));
  const vol = cfg.make(ports);
  await vol.open();
  return { ports, vol };
}

/** Per-byte NBD_STATE flags of a child, from its own extents. */
async function childFlags(port: MemoryPort): Promise<Uint8Array> {
  const f = new Uint8Array(port.size());
  const { maximum, minimum } = port.capabilities().blockSize;
  let at = 0;
  for (const e of await extentsCovering(port, port.size(), 0, plainIo, maximum, minimum)) {
    f.fill(e.flags, at, at + e.length);
    at += e.length;
  }
  return f;
}

async function readAll(vol: Layer, maxReq: number): Promise<Buffer> {
  const out = Buffer.alloc(vol.size());
  for (let at = 0; at < out.length; at += maxReq) await vol.pread(out.subarray(at, Math.min(out.length, at + maxReq)), at, plainIo);
  return out;
}

/** Checks extents of [off, off+len) cover exactly len bytes, match the children's flags byte for byte and ZERO means zero. */
async function checkExtents(cfg: Config, vol: Layer, ports: MemoryPort[], model: Buffer, off: number, len: number): Promise<void> {
  const flags = await Promise.all(ports.map(childFlags));
  const ext = await vol.extents(len, off, plainIo);
  expect(ext.reduce((s, e) => s + e.length, 0)).toBe(len);
  let p = off;
  for (const e of ext) {
    expect(e.length).toBeGreaterThan(0);
    for (let i = 0; i < e.length; i++, p++) {
      const [c, q] = cfg.map(p, cfg.sizes);
      if (flags[c]![q] !== e.flags) throw new Error(`extent flags ${e.flags} at ${p} but child ${c} has ${flags[c]![q]} at ${q}`);
      if (e.flags & State.NBD_STATE_ZERO && model[p] !== 0) throw new Error(`byte ${p} reported zero but holds ${model[p]}`);
    }
  }
}

for (const cfg of configs) {
  describe(cfg.name, () => {
    it("matches a flat-buffer model under random writes, zeroes, trims and reads", async () => {
      const { vol: probe } = await build(cfg);
      const size = probe.size();
      await fc.assert(
        fc.asyncProperty(
          fc.array(opArb(size, cfg), { minLength: 1, maxLength: 30 }),
          fc.integer({ min: 0, max: size - 1 }),
          async (ops, extOff) => {
            const { vol, ports } = await build(cfg);
            const model = Buffer.alloc(size);
            for (const op of ops) {
              if (op.kind === "write") {
                const data = pattern(op.len, op.seed, op.off);
                await vol.pwrite(data, op.off, { fua: op.fua, mayTrim: true, fast: false });
                data.copy(model, op.off);
              } else if (op.kind === "zero") {
                await vol.zero(op.len, op.off, { fua: false, mayTrim: op.mayTrim, fast: false });
                model.fill(0, op.off, op.off + op.len);
              } else if (op.kind === "trim") {
                await vol.trim(op.len, op.off, plainIo);
                model.fill(0, op.off, op.off + op.len); // the memory port reads trimmed bytes as zero
              } else {
                const buf = Buffer.alloc(op.len, 0xee);
                await vol.pread(buf, op.off, plainIo);
                expect(buf.equals(model.subarray(op.off, op.off + op.len))).toBe(true);
              }
            }
            expect((await readAll(vol, cfg.max ?? size)).equals(model)).toBe(true);
            // Every byte sits where the layout says, in the child.
            const kids = await Promise.all(ports.map((p) => readAll(p, cfg.max ?? p.size())));
            for (let p = 0; p < size; p++) {
              const [c, q] = cfg.map(p, cfg.sizes);
              if (kids[c]![q] !== model[p]) throw new Error(`byte ${p} should be at child ${c} offset ${q}`);
            }
            const off = extOff - (extOff % cfg.align);
            await checkExtents(cfg, vol, ports, model, off, size - off);
            await checkExtents(cfg, vol, ports, model, 0, size);
          },
        ),
        { numRuns: 25 },
      );
    });
  });
}

describe("ConcatLayer", () => {
  it("sums sizes and splits a request across every child it crosses", async () => {
    const ports = [10, 20, 30].map((size) => new MemoryPort({ size }));
    const vol = createConcatLayer(ports);
    await vol.open();
    expect(vol.size()).toBe(60);
    const data = Buffer.from(Array.from({ length: 40 }, (_, i) => i + 1));
    await vol.pwrite(data, 5, plainIo);
    const b = Buffer.alloc(20);
    await ports[1]!.pread(b, 0, plainIo);
    expect([...b]).toEqual([...data.subarray(5, 25)]);
    await ports[0]!.pread(b.subarray(0, 5), 5, plainIo);
    expect([...b.subarray(0, 5)]).toEqual([1, 2, 3, 4, 5]);
    await ports[2]!.pread(b.subarray(0, 15), 0, plainIo);
    expect([...b.subarray(0, 15)]).toEqual([...data.subarray(25, 40)]);
    // The last byte, and one beyond.
    await vol.pread(b.subarray(0, 1), 59, plainIo);
    await expect(vol.pread(Buffer.alloc(2), 59, plainIo)).rejects.toMatchObject({ errno: "EINVAL" });
  });

  it("reports holes of one child and data of the next as separate extents", async () => {
    const ports = [65536, 65536, 65536].map((size) => new MemoryPort({ size }));
    const vol = createConcatLayer(ports);
    await vol.open();
    await ports[1]!.pwrite(Buffer.from([1]), 100, plainIo);
    const hz = State.NBD_STATE_HOLE | State.NBD_STATE_ZERO;
    expect(await vol.extents(3 * 65536, 0, plainIo)).toEqual([
      { length: 65536, flags: hz },
      { length: 65536, flags: 0 },
      { length: 65536, flags: hz },
    ]);
    expect(await vol.extents(10, 65536 - 5, plainIo)).toEqual([
      { length: 5, flags: hz },
      { length: 5, flags: 0 },
    ]);
  });

  it("passes the allocation depth on to each child (a memory disk holds all its bytes: depth 1)", async () => {
    const ports = [65536, 65536].map((size) => new MemoryPort({ size }));
    const vol = createConcatLayer(ports);
    await vol.open();
    expect(vol.capabilities().depth).toBe(true);
    expect(await vol.extents(2 * 65536, 0, plainIo, "depth")).toEqual([{ length: 2 * 65536, flags: 1 }]);
    const striped = createStripeLayer([65536, 65536].map((size) => new MemoryPort({ size })), 4096);
    await striped.open();
    expect(await striped.extents(100_000, 7, plainIo, "depth")).toEqual([{ length: 100_000, flags: 1 }]);
  });

  it("ANDs the children's capabilities and block sizes", async () => {
    class Caps extends PassthroughLayer {
      constructor(next: Layer, private readonly c: Partial<Capabilities>) {
        super(next);
      }
      override capabilities(): Capabilities {
        return { ...this.next.capabilities(), ...this.c };
      }
    }
    const a = new MemoryPort({ size: 8192, alignment: 512, maxRequest: 65536 });
    const b = new Caps(new MemoryPort({ size: 8192, alignment: 4096, maxRequest: 1 << 20 }), { multiConn: false });
    const vol = createConcatLayer([a, b]);
    await vol.open();
    const c = vol.capabilities();
    expect(c.blockSize.minimum).toBe(4096);
    expect(c.blockSize.maximum).toBe(65536);
    expect(c.multiConn).toBe(false);
    expect(c.writable).toBe(true);
    const ro = createConcatLayer([new MemoryPort({ size: 4096 }), new MemoryPort({ size: 4096, readOnly: true })]);
    await ro.open();
    expect(ro.capabilities()).toMatchObject({ writable: false, trim: false, zero: false, fua: false, fastZero: false, cache: true, extents: true });
  });

  it("refuses children whose size breaks the block alignment", async () => {
    const vol = createConcatLayer([new MemoryPort({ size: 1000, alignment: 1 }), new MemoryPort({ size: 4096, alignment: 512 })]);
    await expect(vol.open()).rejects.toMatchObject({ errno: "EINVAL" });
  });

  it("reports a failing read at the volume's offset and flushes every child", async () => {
    const p0 = new MemoryPort({ size: 4096 });
    const f1 = new FaultLayer(new MemoryPort({ size: 4096 }));
    f1.addRule("op=pread,errno=EIO,range=100-200");
    const vol = createConcatLayer([p0, f1]);
    await vol.open();
    const err = await vol.pread(Buffer.alloc(4096), 2048, plainIo).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(NbdError);
    expect((err as NbdError).offset).toBe(4096 + 100);
    f1.addRule("op=flush,errno=EIO");
    await expect(vol.flush(plainIo)).rejects.toMatchObject({ errno: "EIO" });
  });
});

describe("StripeLayer", () => {
  it("places chunk i on child i % n at floor(i / n) × chunk, and rounds sizes down to chunks", async () => {
    const ports = [3 * 1024 + 100, 4 * 1024, 5 * 1024].map((size) => new MemoryPort({ size }));
    const vol = createStripeLayer(ports, 1024);
    await vol.open();
    expect(vol.size()).toBe(3 * 3 * 1024);
    const data = Buffer.alloc(vol.size());
    for (let i = 0; i < data.length; i++) data[i] = Math.floor(i / 1024) + 1;
    await vol.pwrite(data, 0, plainIo);
    const b = Buffer.alloc(1);
    for (let chunk = 0; chunk < 9; chunk++) {
      await ports[chunk % 3]!.pread(b, Math.floor(chunk / 3) * 1024 + 17, plainIo);
      expect(b[0]).toBe(chunk + 1);
    }
  });

  it("refuses a chunk size that is not a multiple of the block size", async () => {
    const vol = createStripeLayer([new MemoryPort({ size: 8192, alignment: 4096 }), new MemoryPort({ size: 8192 })], 1024);
    await expect(vol.open()).rejects.toMatchObject({ errno: "EINVAL" });
    expect(() => createStripeLayer([new MemoryPort({ size: 8192 })], 0)).toThrow(NbdError);
  });

  it("issues the parts of one request in parallel", async () => {
    let inflight = 0;
    let most = 0;
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    class Slow extends PassthroughLayer {
      override async pwrite(b: Buffer, o: number, io: Io) {
        inflight++;
        most = Math.max(most, inflight);
        await gate;
        await super.pwrite(b, o, io);
        inflight--;
      }
    }
    const vol = createStripeLayer([0, 1, 2, 3].map(() => new Slow(new MemoryPort({ size: 65536 }))), 4096);
    await vol.open();
    const w = vol.pwrite(Buffer.alloc(4 * 4096, 1), 0, plainIo);
    await new Promise((r) => setImmediate(r));
    expect(most).toBe(4);
    release();
    await w;
  });

  it("gives each child one contiguous range for zero, trim and extents", async () => {
    const calls: Array<[number, number, number]> = [];
    class Spy extends PassthroughLayer {
      constructor(next: Layer, private readonly id: number) {
        super(next);
      }
      override zero(l: number, o: number, io: Io) {
        calls.push([this.id, o, l]);
        return super.zero(l, o, io);
      }
    }
    const vol = createStripeLayer([0, 1, 2].map((i) => new Spy(new MemoryPort({ size: 1 << 20 }), i)), 4096);
    await vol.open();
    // Chunks 1 (from byte 100) .. 8 (to byte 200): child 1 gets chunks 1, 4, 7; child 2: 2, 5, 8; child 0: 3, 6.
    await vol.zero(7 * 4096 + 100, 4096 + 100, plainIo);
    expect(calls.sort((a, b) => a[0] - b[0])).toEqual([
      [0, 4096, 2 * 4096],
      [1, 100, 3 * 4096 - 100],
      [2, 0, 2 * 4096 + 200],
    ]);
  });
});
