/**
 * Reuses I/O buffers: write payloads and read replies of 4 KiB and more. A fresh buffer per
 * request costs an ArrayBuffer, its backing store and, for big ones, page faults and page
 * clearing in the kernel; Node's own 8 KiB slab only serves requests under 4 KiB, so a 4 KiB
 * read reply (payload + header) would get a fresh ArrayBuffer every time. The pool keeps a
 * bounded number of buffers per power-of-two size class. Every buffer has HEADROOM spare bytes
 * past its class, so a class-sized payload plus its reply header still fits in it.
 * A released buffer must no longer be referenced by anyone (the socket has written it, the layer
 * call that received it has resolved).
 */
export class BufferPool {
  /** Extra bytes each buffer carries beyond its size class (room for a reply header). */
  static readonly HEADROOM = 64;
  private readonly free = new Map<number, Buffer[]>();
  private heldBytes = 0;

  constructor(
    private readonly minSize = 4096,
    private readonly maxHeldBytes = 64 * 1024 * 1024,
  ) {}

  /** A buffer of at least `size` bytes. */
  acquire(size: number): Buffer {
    const cls = this.classOf(size);
    const b = this.free.get(cls)?.pop();
    if (b) {
      this.heldBytes -= b.length;
      return b;
    }
    return Buffer.allocUnsafeSlow(cls + BufferPool.HEADROOM);
  }

  release(buf: Buffer): void {
    const cls = buf.length - BufferPool.HEADROOM;
    if (cls < this.minSize || (cls & (cls - 1)) !== 0 || this.heldBytes + buf.length > this.maxHeldBytes) return;
    let list = this.free.get(cls);
    if (!list) this.free.set(cls, (list = []));
    list.push(buf);
    this.heldBytes += buf.length;
  }

  /** Whether a request of `size` bytes is worth taking from the pool. */
  pools(size: number): boolean {
    return size >= this.minSize;
  }

  /** The smallest power-of-two class (at least minSize) whose buffers hold `size` bytes. */
  private classOf(size: number): number {
    let c = this.minSize;
    while (c + BufferPool.HEADROOM < size) c *= 2;
    return c;
  }
}

/** One pool per process: connections to every export share it. */
export const ioBuffers = new BufferPool();
