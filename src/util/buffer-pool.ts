/**
 * Reuses large I/O buffers (payloads and read replies of 64 KiB and more). Allocating a fresh
 * megabyte per request costs page faults and page clearing in the kernel on every request; a
 * pool keeps a bounded number of buffers per power-of-two size class instead.
 * A released buffer must no longer be referenced by anyone (the socket has written it, the layer
 * call that received it has resolved).
 */
export class BufferPool {
  private readonly free = new Map<number, Buffer[]>();
  private heldBytes = 0;

  constructor(
    private readonly minSize = 64 * 1024,
    private readonly maxHeldBytes = 64 * 1024 * 1024,
  ) {}

  /** A buffer of at least `size` bytes (its length is the size class). */
  acquire(size: number): Buffer {
    const cls = this.classOf(size);
    const list = this.free.get(cls);
    const b = list?.pop();
    if (b) {
      this.heldBytes -= cls;
      return b;
    }
    return Buffer.allocUnsafeSlow(cls);
  }

  release(buf: Buffer): void {
    const cls = buf.length;
    if (cls < this.minSize || (cls & (cls - 1)) !== 0 || this.heldBytes + cls > this.maxHeldBytes) return;
    let list = this.free.get(cls);
    if (!list) this.free.set(cls, (list = []));
    list.push(buf);
    this.heldBytes += cls;
  }

  /** Whether a request of `size` bytes is worth taking from the pool. */
  pools(size: number): boolean {
    return size >= this.minSize;
  }

  private classOf(size: number): number {
    let c = this.minSize;
    while (c < size) c *= 2;
    return c;
  }
}

/** One pool per process: connections to every export share it. */
export const ioBuffers = new BufferPool();
