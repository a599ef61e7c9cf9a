import { describe, expect, it } from "vitest";
import { zeroRuns } from "./reply.js";

/** The definition, block by block: 4 KiB blocks (the last may be shorter) all zero, runs ≥ 16 KiB. */
function reference(data: Buffer): number[] {
  const runs: number[] = [];
  let start = -1;
  const blocks = Math.ceil(data.length / 4096);
  for (let i = 0, at = 0; i <= blocks; i++, at += 4096) {
    const zero = at < data.length && data.subarray(at, Math.min(at + 4096, data.length)).every((b) => b === 0);
    if (zero && start < 0) start = at;
    if (!zero && start >= 0) {
      const end = Math.min(at, data.length);
      if (end - start >= 16384) runs.push(start, end);
      start = -1;
    }
  }
  return runs;
}

/**
 * A buffer of `blocks` 4 KiB blocks (the last `tail` bytes long): "zero" blocks are all zeros,
 * "data" blocks start with a non-zero byte, "late" ones start with zeros and have data further in.
 */
function pattern(blocks: number, kind: (i: number) => "zero" | "data" | "late", tail = 4096): Buffer {
  const b = Buffer.alloc((blocks - 1) * 4096 + tail);
  for (let i = 0; i < blocks; i++) {
    const k = kind(i);
    if (k === "data") b[i * 4096] = 1 + (i % 255);
    if (k === "late") b[Math.min(i * 4096 + 1 + ((i * 997) % 4095), b.length - 1)] = 1 + (i % 255);
  }
  return b;
}

describe("zeroRuns", () => {
  it("finds no run in data, and the runs of zeros at any block alignment, as the definition says", () => {
    const zeroIn = (from: number, to: number) => (i: number) => (i >= from && i < to ? "zero" : "data");
    expect(zeroRuns(pattern(64, () => "data"))).toEqual([]);
    expect(zeroRuns(pattern(64, () => "zero"))).toEqual([0, 64 * 4096]);
    // Exactly four zero blocks at every alignment, among blocks of data that start with data.
    for (let k = 0; k < 12; k++) expect(zeroRuns(pattern(20, zeroIn(k, k + 4)))).toEqual([k * 4096, (k + 4) * 4096]);
    // Three are not enough; a zero run ending in a short last block counts its bytes.
    expect(zeroRuns(pattern(16, zeroIn(5, 8)))).toEqual([]);
    expect(zeroRuns(pattern(8, zeroIn(4, 8), 100))).toEqual([]);
    expect(zeroRuns(pattern(9, zeroIn(4, 9), 100))).toEqual([4 * 4096, 8 * 4096 + 100]);
    expect(zeroRuns(pattern(10, zeroIn(5, 10), 100))).toEqual([5 * 4096, 9 * 4096 + 100]);
    // Zero first bytes alone (data further in) are not a run.
    expect(zeroRuns(pattern(32, () => "late"))).toEqual([]);
  });

  it("agrees with the definition on random patterns of zero and data blocks and lengths", () => {
    let seed = 12345;
    const rand = () => ((seed = (seed * 1103515245 + 12345) >>> 0) >>> 8) / (1 << 24);
    for (let n = 0; n < 2000; n++) {
      const blocks = 1 + Math.floor(rand() * 40);
      const density = rand();
      const kinds = Array.from({ length: blocks }, (): "zero" | "data" | "late" => (rand() < density ? "zero" : rand() < 0.8 ? "data" : "late"));
      const tail = rand() < 0.3 ? 1 + Math.floor(rand() * 4096) : 4096;
      const data = pattern(blocks, (i) => kinds[i]!, tail);
      expect(zeroRuns(data), `blocks ${kinds.map((k) => k[0]).join("")} tail ${tail}`).toEqual(reference(data));
    }
  });
});
