import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { NbdError } from "../../errors.js";
import { PassthroughLayer, plainIo, type Io, type Layer } from "../layer.js";
import { MemoryPort } from "../port/memory-port.js";
import { DiskLayer } from "./disk-layer.js";

const SIZE = 3 * 65536 + 1024;
const ALIGN = 512;
const MAX = 4096;

/** Records the largest request the port saw and checks alignment of every call. */
class Spy extends PassthroughLayer {
  largest = 0;
  calls = 0;
  constructor(next: Layer, private readonly align: number) {
    super(next);
  }
  private see(len: number, off: number): void {
    this.calls++;
    this.largest = Math.max(this.largest, len);
    if (off % this.align || len % this.align) throw new Error(`unaligned call reached the port: ${len}@${off}`);
  }
  override pread(b: Buffer, o: number, io: Io) {
    this.see(b.length, o);
    return super.pread(b, o, io);
  }
  override pwrite(b: Buffer, o: number, io: Io) {
    this.see(b.length, o);
    return super.pwrite(b, o, io);
  }
  override zero(l: number, o: number, io: Io) {
    this.see(l, o);
    return super.zero(l, o, io);
  }
  override trim(l: number, o: number, io: Io) {
    this.see(l, o);
    return super.trim(l, o, io);
  }
}

async function stack(align = ALIGN, max = MAX) {
  const port = new MemoryPort({ size: SIZE, alignment: align, maxRequest: max });
  const spy = new Spy(port, align);
  const disk = new DiskLayer(spy, { maxPayload: 1 << 20 });
  await disk.open();
  return { port, spy, disk };
}

type Op =
  | { kind: "write"; off: number; len: number; seed: number; fua: boolean }
  | { kind: "zero"; off: number; len: number; mayTrim: boolean }
  | { kind: "trim"; off: number; len: number }
  | { kind: "read"; off: number; len: number };

const range = fc.integer({ min: 0, max: SIZE - 1 }).chain((off) => fc.record({ off: fc.constant(off), len: fc.integer({ min: 1, max: Math.min(SIZE - off, 3 * MAX + 700) }) }));
const opArb: fc.Arbitrary<Op> = fc.oneof(
  range.chain((r) => fc.record({ kind: fc.constant("write" as const), off: fc.constant(r.off), len: fc.constant(r.len), seed: fc.integer({ min: 1, max: 250 }), fua: fc.boolean() })),
  range.chain((r) => fc.record({ kind: fc.constant("zero" as const), off: fc.constant(r.off), len: fc.constant(r.len), mayTrim: fc.boolean() })),
  range.map((r) => ({ kind: "trim" as const, ...r })),
  range.map((r) => ({ kind: "read" as const, ...r })),
);

function pattern(len: number, seed: number, off: number): Buffer {
  const b = Buffer.allocUnsafe(len);
  for (let i = 0; i < len; i++) b[i] = (seed * 31 + (off + i) * 7) & 0xff || 1;
  return b;
}

describe("DiskLayer", () => {
  it("advertises byte granularity and the payload maximum over an aligned port", async () => {
    const { disk } = await stack();
    expect(disk.capabilities().blockSize).toEqual({ minimum: 1, preferred: 4096, maximum: 1 << 20 });
  });

  it("matches a byte-array model under random operations (read-modify-write and splitting)", async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(opArb, { minLength: 1, maxLength: 40 }), async (ops) => {
        const { disk, spy } = await stack();
        const model = Buffer.alloc(SIZE);
        for (const op of ops) {
          switch (op.kind) {
            case "write": {
              const data = pattern(op.len, op.seed, op.off);
              await disk.pwrite(data, op.off, { ...plainIo, fua: op.fua });
              data.copy(model, op.off);
              break;
            }
            case "zero":
              await disk.zero(op.len, op.off, { ...plainIo, mayTrim: op.mayTrim });
              model.fill(0, op.off, op.off + op.len);
              break;
            case "trim": {
              await disk.trim(op.len, op.off, plainIo);
              // Trim drops only whole aligned blocks; the memory port reads them back as zero.
              const s = Math.ceil(op.off / ALIGN) * ALIGN;
              const e = Math.floor((op.off + op.len) / ALIGN) * ALIGN;
              if (e > s) model.fill(0, s, e);
              break;
            }
            case "read": {
              const got = Buffer.alloc(op.len);
              await disk.pread(got, op.off, plainIo);
              expect(got.equals(model.subarray(op.off, op.off + op.len))).toBe(true);
              break;
            }
          }
        }
        const all = Buffer.alloc(SIZE);
        await disk.pread(all, 0, plainIo);
        expect(all.equals(model)).toBe(true);
        expect(spy.largest).toBeLessThanOrEqual(MAX);
      }),
      { numRuns: 150, seed: 20261122 },
    );
  });

  it("never loses bytes when concurrent unaligned writes share blocks", async () => {
    const { disk } = await stack();
    const writes: Promise<void>[] = [];
    const model = Buffer.alloc(SIZE);
    // 200 writes of 37 bytes, packed next to each other: most blocks are shared by several writes.
    for (let i = 0; i < 200; i++) {
      const off = 100 + i * 37;
      const data = Buffer.alloc(37, (i % 254) + 1);
      data.copy(model, off);
      writes.push(disk.pwrite(data, off, plainIo));
    }
    await Promise.all(writes);
    const got = Buffer.alloc(SIZE);
    await disk.pread(got, 0, plainIo);
    expect(got.equals(model)).toBe(true);
  });

  it("splits large requests into pieces the port accepts, in order of offset", async () => {
    const { disk, spy } = await stack(1, 1000);
    const data = pattern(10_500, 3, 0);
    await disk.pwrite(data, 77, plainIo);
    const back = Buffer.alloc(10_500);
    await disk.pread(back, 77, plainIo);
    expect(back.equals(data)).toBe(true);
    expect(spy.largest).toBe(1000);
    expect(spy.calls).toBe(22);
  });

  it("reports the offset of the piece that failed", async () => {
    const port = new MemoryPort({ size: SIZE, maxRequest: 1024 });
    class Failing extends PassthroughLayer {
      override pread(b: Buffer, o: number, io: Io) {
        if (o === 3072) return Promise.reject(new NbdError("EIO", "bad sector"));
        return super.pread(b, o, io);
      }
    }
    const disk = new DiskLayer(new Failing(port) as Layer);
    await disk.open();
    const err = await disk.pread(Buffer.alloc(8192), 0, plainIo).catch((e) => e);
    expect(err).toBeInstanceOf(NbdError);
    expect(err.errno).toBe("EIO");
    expect(err.offset).toBe(3072);
  });

  it("refuses a fast zero that would need read-modify-write", async () => {
    const { disk } = await stack();
    await expect(disk.zero(100, 10, { ...plainIo, fast: true })).rejects.toMatchObject({ errno: "ENOTSUP" });
    await expect(disk.zero(1024, 512, { ...plainIo, fast: true })).resolves.toBeUndefined();
  });

  it("clips extents to the asked range on an aligned port", async () => {
    const { disk } = await stack();
    await disk.pwrite(Buffer.alloc(10, 1), 70000, plainIo);
    const ext = [];
    for (let at = 65000; at < 75000; ) {
      const part = await disk.extents(75000 - at, at, plainIo);
      expect(part.length).toBeGreaterThan(0);
      ext.push(...part);
      at += part.reduce((s, e) => s + e.length, 0);
    }
    expect(ext.reduce((s, e) => s + e.length, 0)).toBe(10000);
    expect(ext[0]).toEqual({ length: 65536 - 65000, flags: 3 });
    expect(ext[1]!.flags).toBe(0);
  });
});
