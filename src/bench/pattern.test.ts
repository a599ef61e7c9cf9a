import { describe, expect, it } from "vitest";
import { makeBlock, verifyBlock } from "./pattern.js";

describe("verify pattern", () => {
  it("accepts the right generation and catches a corrupted byte at its exact offset", () => {
    const off = 1_048_576;
    const b = makeBlock(4096, off, 3, 42);
    expect(verifyBlock(b, off, 3, 42)).toBeNull();
    b[2000] ^= 0x10;
    expect(verifyBlock(b, off, 3, 42)).toEqual({ offset: off + 2000, reason: "corrupted bytes" });
  });

  it("names stale data (a lost write), misplaced data, zeroes, foreign data and other runs", () => {
    const off = 8192;
    // The offset is that of the first differing byte: the header field that tells them apart.
    expect(verifyBlock(makeBlock(4096, off, 2, 1), off, 3, 1)).toEqual({ offset: off + 12, reason: expect.stringMatching(/generation 2 instead of 3 \(stale/) });
    expect(verifyBlock(makeBlock(4096, off + 4096, 3, 1), off, 3, 1)).toEqual({ offset: off + 5, reason: "data of offset 12288 (misplaced)" });
    expect(verifyBlock(Buffer.alloc(4096), off, 3, 1)).toMatchObject({ offset: off, reason: "zeroes where data was written" });
    expect(verifyBlock(Buffer.alloc(4096, 7), off, 3, 1)).toMatchObject({ reason: "not written by this benchmark" });
    expect(verifyBlock(makeBlock(4096, off, 3, 2), off, 3, 1)).toEqual({ offset: off + 16, reason: "data of another run (seed)" });
  });

  it("checks every sector: a torn write is caught in its first bad sector", () => {
    const off = 0;
    const b = makeBlock(4096, off, 5, 9);
    makeBlock(4096, off, 4, 9).copy(b, 2048, 2048); // the second half is the previous generation
    expect(verifyBlock(b, off, 5, 9)).toMatchObject({ offset: 2048 + 12, reason: expect.stringMatching(/generation 4 instead of 5/) });
  });

  it("expects zeroes in a block never written", () => {
    expect(verifyBlock(Buffer.alloc(1024), 0, 0, 1)).toBeNull();
    const b = Buffer.alloc(1024);
    b[700] = 1;
    expect(verifyBlock(b, 4096, 0, 1)).toEqual({ offset: 4096 + 700, reason: "never written, but not zero" });
  });
});
