/** Percentile by nearest rank of an ascending array (p in 0..100). */
export function percentile(sorted: ArrayLike<number>, p: number): number {
  if (sorted.length === 0) return NaN;
  const rank = Math.ceil((p / 100) * sorted.length);
  return sorted[Math.min(sorted.length - 1, Math.max(0, rank - 1))]!;
}

/** Completion times (ms since start) and latencies (µs) of every request, kept exactly. */
export class Samples {
  private t = new Float64Array(1 << 16);
  private lat = new Float32Array(1 << 16);
  count = 0;

  add(tMs: number, latUs: number): void {
    if (this.count === this.t.length) {
      const t = new Float64Array(this.t.length * 2);
      t.set(this.t);
      this.t = t;
      const l = new Float32Array(this.lat.length * 2);
      l.set(this.lat);
      this.lat = l;
    }
    this.t[this.count] = tMs;
    this.lat[this.count] = latUs;
    this.count++;
  }

  /** Latencies in ascending order. */
  sortedLatencies(from = 0, to = Infinity): Float32Array {
    const out: number[] = [];
    for (let i = 0; i < this.count; i++) if (this.t[i]! >= from && this.t[i]! < to) out.push(this.lat[i]!);
    return Float32Array.from(out).sort();
  }

  /** Per bucket of `bucketMs`: completions per second and p99 latency (µs). */
  timeline(bucketMs: number, durationMs: number): Array<{ t: number; iops: number; p99: number }> {
    const n = Math.max(1, Math.ceil(durationMs / bucketMs));
    const lats: number[][] = Array.from({ length: n }, () => []);
    for (let i = 0; i < this.count; i++) {
      const b = Math.floor(this.t[i]! / bucketMs);
      if (b >= 0 && b < n) lats[b]!.push(this.lat[i]!);
    }
    return lats.map((l, b) => {
      const s = Float32Array.from(l).sort();
      return { t: b * bucketMs, iops: (l.length * 1000) / bucketMs, p99: l.length ? percentile(s, 99) : 0 };
    });
  }

  /** The longest time without any completion inside [from, to] (ms). */
  longestGap(from: number, to: number): number {
    const ts: number[] = [];
    for (let i = 0; i < this.count; i++) if (this.t[i]! >= from && this.t[i]! <= to) ts.push(this.t[i]!);
    ts.sort((a, b) => a - b);
    let gap = 0;
    let prev = from;
    for (const t of ts) {
      gap = Math.max(gap, t - prev);
      prev = t;
    }
    return Math.max(gap, to - prev);
  }
}
