import { describe, expect, it } from "vitest";
import { BufferPool } from "./buffer-pool.js";

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
    const MiB = 1 << 20;
    expect(pool.acquire(MiB + 28).length).toBe(MiB + BufferPool.HEADROOM); // fits the headroom
    expect(pool.acquire(MiB + 100).length).toBe(2 * MiB + BufferPool.HEADROOM);
    expect(pool.acquire(17 * MiB).length).toBe(17 * MiB + BufferPool.HEADROOM);
    expect(pool.footprint(17 * MiB - 5)).toBe(17 * MiB + BufferPool.HEADROOM);
    expect(pool.footprint(300)).toBe(300); // not pooled
    const b = pool.acquire(3 * MiB);
    expect(b.buffer.byteLength).toBeGreaterThan(32 * MiB); // cut from an always-mmapped allocation
    pool.release(b);
    expect(pool.held).toBe(3 * MiB + BufferPool.HEADROOM);
    expect(pool.acquire(2 * MiB)).not.toBe(b); // never for a smaller class: all of it may be resident
    expect(pool.acquire(3 * MiB - 100)).toBe(b);
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
    const MiB = 1 << 20;
    let room = 0; // a full budget: what is given back goes to the next request
    pool.setRoom(() => room);
    const a = pool.acquire(2 * MiB);
    const b = pool.acquire(2 * MiB);
    const c = pool.acquire(MiB);
    pool.release(a);
    pool.release(b);
    pool.release(c);
    expect(pool.held).toBe(5 * MiB + 3 * BufferPool.HEADROOM);
    const made = pool.made;
    expect(pool.acquire(2 * MiB)).toBe(b); // reused, nothing made
    expect(pool.made).toBe(made);
    pool.release(b);
    room = MiB + 64; // the reservations leave this much
    pool.acquire(5 * MiB); // none free of its class: first the pool gives up what no longer fits
    expect(pool.made).toBe(made + 1);
    expect(pool.held).toBe(MiB + BufferPool.HEADROOM); // the 2 MiB ones went, the 1 MiB one stays
    expect(pool.acquire(MiB)).toBe(c);
  });
});
