import { describe, expect, it, vi } from "vitest";

const MiB = 1 << 20;
import { BufferPool } from "./buffer-pool.js";
import { collections } from "./gc.js";

describe("BufferPool", () => {
  it("serves a class-sized payload plus a reply header from one class", () => {
    const pool = new BufferPool(4096, 1 << 20);
    const b = pool.acquire(4096 + 28);
    expect(b.length).toBe(4096 + BufferPool.HEADROOM);
    expect(pool.acquire(256 * 1024 + 28).length).toBe(256 * 1024 + BufferPool.HEADROOM);
    expect(pool.acquire(4096 + BufferPool.HEADROOM + 1).length).toBe(8192 + BufferPool.HEADROOM);
  });

  it("hands a released buffer out again: to its own class, or to one up to half its size when that has none", () => {
    const pool = new BufferPool(4096, 1 << 24);
    const b = pool.acquire(10000); // class 16 KiB
    pool.release(b);
    expect(pool.acquire(4100)).not.toBe(b); // 4 KiB class: 16 KiB is more than twice its size
    expect(pool.acquire(8000)).toBe(b); // 8 KiB class, none free: the 16 KiB one
    pool.release(b);
    expect(pool.acquire(10000)).toBe(b);
    expect(pool.acquire(10000)).not.toBe(b); // taken already
  });

  it("has whole-MiB classes above 1 MiB, so a big buffer wastes at most 1 MiB", () => {
    const pool = new BufferPool(4096, 1 << 30);
    expect(pool.acquire(MiB + 28).length).toBe(MiB + BufferPool.HEADROOM); // fits the headroom
    expect(pool.acquire(MiB + 100).length).toBe(2 * MiB + BufferPool.HEADROOM);
    expect(pool.acquire(17 * MiB).length).toBe(17 * MiB + BufferPool.HEADROOM);
    expect(pool.footprint(17 * MiB - 5)).toBe(17 * MiB + BufferPool.HEADROOM);
    expect(pool.footprint(300)).toBe(300); // not pooled
    const b = pool.acquire(3 * MiB);
    expect(b.buffer.byteLength).toBeGreaterThan(32 * MiB); // cut from an always-mmapped allocation
    pool.release(b);
    expect(pool.held).toBe(3 * MiB + BufferPool.HEADROOM);
  });

  // The fuzzer's peak RSS: each 32 MiB request (let in alone) made a new 33 MiB allocation while the
  // last one, let go, waited for the collector: two or three of them were resident at once.
  it("keeps a spare big allocation and serves any big size from it, so big requests one after another make one", () => {
    const pool = new BufferPool(4096, 8 * MiB);
    const a = pool.acquire(32 * MiB);
    const made = pool.made;
    pool.release(a);
    expect(pool.held).toBe(32 * MiB + BufferPool.HEADROOM); // its touched bytes
    const b = pool.acquire(2 * MiB);
    expect(b.buffer).toBe(a.buffer);
    expect(b.length).toBe(2 * MiB + BufferPool.HEADROOM);
    pool.release(b);
    const c = pool.acquire(17 * MiB);
    expect(c.buffer).toBe(a.buffer);
    expect(pool.made).toBe(made);
    expect(pool.acquire(17 * MiB).buffer).not.toBe(a.buffer); // in use: another one is made
    pool.release(c);
    expect(pool.held).toBe(32 * MiB + BufferPool.HEADROOM); // touched once, resident still
  });

  it("keeps spares up to one big allocation's worth of written bytes, the most written ones first, and serves from one written far enough already", () => {
    const pool = new BufferPool(4096, 8 * MiB);
    const big = [pool.acquire(32 * MiB), pool.acquire(32 * MiB)];
    for (const b of big) pool.release(b);
    expect(pool.held).toBe(32 * MiB + BufferPool.HEADROOM); // one kept, one let go
    const other = new BufferPool(4096, 8 * MiB);
    const four = other.acquire(4 * MiB);
    const two = other.acquire(2 * MiB);
    other.release(four);
    other.release(two);
    expect(other.held).toBe(6 * MiB + 2 * BufferPool.HEADROOM); // both fit
    expect(other.acquire(3 * MiB).buffer).toBe(four.buffer); // touched enough: no new pages
    expect(other.acquire(3 * MiB).buffer).toBe(two.buffer); // else the most touched one
    expect(other.made).toBe(2);

    const third = new BufferPool(4096, 8 * MiB);
    const small = third.acquire(4 * MiB);
    const large = third.acquire(32 * MiB);
    third.release(small);
    third.release(large); // over one allocation's worth: the small one goes, not the 32 MiB one
    expect(third.held).toBe(32 * MiB + BufferPool.HEADROOM);
    expect(third.acquire(4 * MiB).buffer).toBe(large.buffer);
  });

  it("collects garbage before it makes a big allocation while one it let go may still be resident", () => {
    const pool = new BufferPool(4096, 8 * MiB);
    const a = pool.acquire(32 * MiB);
    const b = pool.acquire(32 * MiB);
    pool.release(a);
    pool.release(b); // one is kept, one let go: garbage
    const before = collections();
    pool.acquire(32 * MiB); // the spare
    expect(collections()).toBe(before);
    pool.acquire(32 * MiB); // a new one: the garbage is collected first
    expect(collections()).toBe(before + 1);
    pool.acquire(32 * MiB); // nothing let go since
    expect(collections()).toBe(before + 1);
  });

  it("gives its spare big allocations up once unused for a while, and collects them at once", () => {
    vi.useFakeTimers();
    try {
      const pool = new BufferPool(4096, 8 * MiB, 1000);
      const a = pool.acquire(20 * MiB);
      pool.release(pool.acquire(MiB)); // small ones stay
      pool.release(a);
      vi.advanceTimersByTime(600);
      pool.release(pool.acquire(5 * MiB)); // used again: another second
      vi.advanceTimersByTime(600);
      expect(pool.held).toBe(20 * MiB + MiB + 2 * BufferPool.HEADROOM);
      const before = collections();
      vi.advanceTimersByTime(1000);
      expect(pool.held).toBe(MiB + BufferPool.HEADROOM);
      expect(collections()).toBe(before + 1); // collected at once: unmapped before the next burst
      expect(pool.acquire(5 * MiB).buffer).not.toBe(a.buffer);
    } finally {
      vi.useRealTimers();
    }
  });

  it("keeps no more than its byte cap and ignores foreign buffers", () => {
    const pool = new BufferPool(4096, 2 * (4096 + BufferPool.HEADROOM));
    const bufs = [pool.acquire(4096), pool.acquire(4096), pool.acquire(4096)];
    for (const b of bufs) pool.release(b);
    const again = [pool.acquire(4096), pool.acquire(4096), pool.acquire(4096)];
    expect(again.filter((b) => bufs.includes(b))).toHaveLength(2);
    pool.release(Buffer.alloc(5000)); // not a pool size: dropped
    expect(pool.acquire(4096).length).toBe(4096 + BufferPool.HEADROOM);
  });

  it("keeps what is given back whatever its room, and makes room only when it makes a new buffer", () => {
    const pool = new BufferPool(4096, 1 << 30);
    const KiB = 1024;
    let room = 0; // a full budget: what is given back goes to the next request
    pool.setRoom(() => room);
    const a = pool.acquire(512 * KiB);
    const b = pool.acquire(512 * KiB);
    const c = pool.acquire(256 * KiB);
    pool.release(a);
    pool.release(b);
    pool.release(c);
    expect(pool.held).toBe(1280 * KiB + 3 * BufferPool.HEADROOM);
    const made = pool.made;
    expect(pool.acquire(512 * KiB)).toBe(b); // reused, nothing made
    expect(pool.made).toBe(made);
    pool.release(b);
    room = 256 * KiB + 64; // the reservations leave this much
    pool.acquire(MiB); // none free of its class: first the pool gives up what no longer fits
    expect(pool.made).toBe(made + 1);
    expect(pool.held).toBe(256 * KiB + BufferPool.HEADROOM); // the 512 KiB ones went, the 256 KiB one stays
    expect(pool.acquire(256 * KiB)).toBe(c);
  });
});
