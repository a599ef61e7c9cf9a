import { describe, expect, it, vi } from "vitest";
import { plainIo } from "../layer.js";
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
      expect(asked).toHaveBeenCalledTimes(1);
      expect(below).toHaveBeenCalledTimes(1);
      allowed = false;
      const err = await run(fence).then(
        () => null,
        (e: unknown) => e,
      );
      expect(isFenced(err)).toBe(true);
      expect(asked).toHaveBeenCalledTimes(2);
      expect(below).toHaveBeenCalledTimes(1);
    });
  }

  it("never asks for reads", async () => {
    const port = new MemoryPort({ size: 4096 });
    await port.open();
    await port.pwrite(Buffer.alloc(512, 7), 0, plainIo);
    const asked = vi.fn(() => false);
    const buf = Buffer.alloc(512);
    await new FenceLayer(port, asked).pread(buf, 0, plainIo);
    expect(buf.every((b) => b === 7)).toBe(true);
    expect(asked).not.toHaveBeenCalled();
  });
});
