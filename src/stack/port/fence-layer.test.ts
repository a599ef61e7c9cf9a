import { describe, expect, it, vi } from "vitest";
import { PassthroughLayer, plainIo, type Io } from "../layer.js";
import { FenceLayer, isFenced } from "./fence-layer.js";
import { MemoryPort } from "./memory-port.js";

describe("FenceLayer", () => {
  const ops = {
    pwrite: (l: FenceLayer) => l.pwrite(Buffer.alloc(512, 1), 0, plainIo),
    zero: (l: FenceLayer) => l.zero(512, 0, plainIo),
    trim: (l: FenceLayer) => l.trim(512, 0, plainIo),
    flush: (l: FenceLayer) => l.flush(plainIo),
  };
  for (const [op, run] of Object.entries(ops)) {
    it(`asks before every ${op}: passes it down while allowed, refuses it with EFENCED (nothing below touched) once not`, async () => {
      const port = new MemoryPort({ size: 4096 });
      await port.open();
      const below = vi.spyOn(port, op as keyof typeof ops);
      let allowed = true;
      const asked = vi.fn(() => allowed);
      const fence = new FenceLayer(port, asked);
      await run(fence);
      expect(asked).toHaveBeenCalledTimes(2); // before, and again once it completed
      expect(below).toHaveBeenCalledTimes(1);
      allowed = false;
      const err = await run(fence).then(
        () => null,
        (e: unknown) => e,
      );
      expect(isFenced(err)).toBe(true);
      expect(asked).toHaveBeenCalledTimes(3);
      expect(below).toHaveBeenCalledTimes(1);
    });

    // Nemesis seed 8 (3 nodes, at 119 s): a write passed the fence, waited in a fault rule's delay
    // below it while its owner was frozen past the lease, went on once the owner continued and was
    // acknowledged — into a power-loss cache the fence then dropped: an acknowledged write that the
    // new owner never had. A write is acknowledged only if the lease still holds when it completed.
    it(`refuses a ${op} that completes after the lease was lost, though it was let through (EFENCED: the redirector sends it to the new owner)`, async () => {
      const port = new MemoryPort({ size: 4096 });
      await port.open();
      let allowed = true;
      const fence = new FenceLayer(
        new (class extends PassthroughLayer {
          override pwrite(b: Buffer, o: number, io: Io) {
            allowed = false; // the owner froze here; another node took the lease meanwhile
            return super.pwrite(b, o, io);
          }
          override zero(l: number, o: number, io: Io) {
            allowed = false;
            return super.zero(l, o, io);
          }
          override trim(l: number, o: number, io: Io) {
            allowed = false;
            return super.trim(l, o, io);
          }
          override flush(io: Io) {
            allowed = false;
            return super.flush(io);
          }
        })(port),
        () => allowed,
      );
      const err = await run(fence).then(
        () => null,
        (e: unknown) => e,
      );
      expect(isFenced(err)).toBe(true);
    });
  }

  // Nemesis seed 9 (at 294 s): an owner deposed while it was frozen answered reads from port A
  // after it continued — from its own state, behind the new owner's writes. Reads ask too (once,
  // before: what they return was there while the lease held).
  it("asks before reads: passes them while allowed, refuses them with EFENCED once not", async () => {
    const port = new MemoryPort({ size: 4096 });
    await port.open();
    await port.pwrite(Buffer.alloc(512, 7), 0, plainIo);
    let allowed = true;
    const asked = vi.fn(() => allowed);
    const fence = new FenceLayer(port, asked);
    const buf = Buffer.alloc(512);
    await fence.pread(buf, 0, plainIo);
    expect(buf.every((b) => b === 7)).toBe(true);
    expect(asked).toHaveBeenCalledTimes(1);
    allowed = false;
    expect(isFenced(await fence.pread(buf, 0, plainIo).then(() => null, (e: unknown) => e))).toBe(true);
    expect(isFenced(await fence.extents(512, 0, plainIo).then(() => null, (e: unknown) => e))).toBe(true);
  });
});
