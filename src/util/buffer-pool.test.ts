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

  it("hands a released buffer out again, and only to its own class", () => {
    const pool = new BufferPool(4096, 1 << 20);
    const b = pool.acquire(5000);
    pool.release(b);
    expect(pool.acquire(4100)).not.toBe(b); // a smaller class
    expect(pool.acquire(5000)).toBe(b);
    expect(pool.acquire(5000)).not.toBe(b); // taken already
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
});
