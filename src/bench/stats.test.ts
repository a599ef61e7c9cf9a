import { describe, expect, it } from "vitest";
import { Samples, percentile } from "./stats.js";

describe("percentiles and series", () => {
  it("uses the nearest rank", () => {
    const d = Float64Array.from({ length: 100 }, (_, i) => i + 1); // 1..100
    expect(percentile(d, 50)).toBe(50);
    expect(percentile(d, 90)).toBe(90);
    expect(percentile(d, 99)).toBe(99);
    expect(percentile(d, 99.9)).toBe(100);
    expect(percentile(d, 100)).toBe(100);
    expect(percentile(d, 0)).toBe(1);
    expect(percentile([15, 20, 35, 40, 50], 30)).toBe(20); // the textbook example
    expect(percentile([15, 20, 35, 40, 50], 40)).toBe(20);
    expect(percentile([15, 20, 35, 40, 50], 50)).toBe(35);
    expect(Number.isNaN(percentile([], 50))).toBe(true);
  });

  it("buckets completions into IOPS and p99 per 100 ms, and finds the longest gap", () => {
    const s = new Samples();
    for (let i = 0; i < 100; i++) s.add(i, 100 + i); // 100 completions in the first 100 ms
    for (let i = 0; i < 50; i++) s.add(250 + i, 1000); // a 150 ms gap, then 50 more
    const tl = s.timeline(100, 300);
    expect(tl.map((b) => b.iops)).toEqual([1000, 0, 500]);
    expect(tl[0]!.p99).toBe(198);
    expect(tl[2]!.p99).toBe(1000);
    expect(s.longestGap(0, 300)).toBe(151);
    expect(s.sortedLatencies().length).toBe(150);
    expect(s.sortedLatencies(250, 300)[0]).toBe(1000);
  });

  it("grows past its first allocation", () => {
    const s = new Samples();
    for (let i = 0; i < 200_000; i++) s.add(i / 100, i % 1000);
    expect(s.count).toBe(200_000);
    expect(percentile(s.sortedLatencies(), 50)).toBe(499);
  });
});
