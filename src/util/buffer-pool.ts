import { requestGc } from "./gc.js";

/**
 * Reuses I/O buffers: write payloads and read replies of 4 KiB and more. A fresh buffer per
 * request costs an ArrayBuffer, its backing store and, for big ones, page faults and page
 * clearing in the kernel; Node's own 8 KiB slab only serves requests under 4 KiB, so a 4 KiB
 * read reply (payload + header) would get a fresh ArrayBuffer every time. The pool keeps a
 * bounded number of buffers per size class (powers of two up to 1 MiB, then whole MiB). Every
 * buffer has HEADROOM spare bytes past its class, so a class-sized payload plus its reply header
 * still fits in it. Buffers that are dropped are freed only when the garbage collector gets to
 * them, so reusing them also keeps the resident set down.
 * A released buffer must no longer be referenced by anyone (the socket has written it, the layer
 * call that received it has resolved).
 */
export class BufferPool {
  /** Extra bytes each buffer carries beyond its size class (room for a reply header). */
  static readonly HEADROOM = 64;
  /** Classes are powers of two up to this, then multiples of it: a big buffer wastes at most 1 MiB. */
  static readonly STEP = 1024 * 1024;
  private readonly free = new Map<number, Buffer[]>();
  private heldBytes = 0;
  private droppedBig = 0;
  /** How many free bytes may be kept now (a memory budget's room; see setRoom). */
  private room: () => number = () => Infinity;

  constructor(
    private readonly minSize = 4096,
    private maxHeldBytes = 64 * 1024 * 1024,
  ) {}

  /**
   * A buffer of at least `size` bytes: a free one of its class; for classes up to 1 MiB, else the
   * smallest free one of a bigger class up to twice its size (mixed sizes reuse what is there
   * rather than allocate). A big buffer is never handed out for a smaller class: all of it may be
   * resident, and the memory budget counts the class.
   */
  acquire(size: number): Buffer {
    const cls = this.classOf(size);
    let list = this.free.get(cls);
    if (!list?.length && this.free.size > 0 && cls <= BufferPool.STEP) {
      let best = Infinity;
      for (const [c, l] of this.free) if (c > cls && c <= 2 * cls && c < best && l.length) best = c;
      if (best !== Infinity) list = this.free.get(best);
    }
    const b = list?.pop();
    if (b) {
      this.heldBytes -= b.length;
      return b;
    }
    if (this.heldBytes > this.room()) this.shrink(this.heldBytes - this.room());
    if (cls <= BufferPool.STEP || cls + BufferPool.HEADROOM > BIG_ALLOCATION) return Buffer.allocUnsafeSlow(cls + BufferPool.HEADROOM);
    // A big one sits in an allocation larger than glibc's largest mmap threshold (32 MiB), so it is
    // always mmapped: only the pages written are resident, and once dropped and collected its
    // memory goes back to the system at once. Big buffers of assorted sizes (hostile clients) would
    // otherwise come from the heap, whose freed middle is never returned: the resident set grew to
    // several times what was in use. V8 counts the whole allocation, so it collects them sooner.
    return Buffer.allocUnsafeSlow(BIG_ALLOCATION).subarray(0, cls + BufferPool.HEADROOM);
  }

  release(buf: Buffer): void {
    const cls = buf.length - BufferPool.HEADROOM;
    if (!this.isClass(cls)) return;
    if (this.heldBytes + buf.length > Math.min(this.maxHeldBytes, this.room())) {
      this.dropped(cls);
      return;
    }
    let list = this.free.get(cls);
    if (!list) this.free.set(cls, (list = []));
    list.push(buf);
    this.heldBytes += buf.length;
  }

  /**
   * Free buffers count against a memory budget: keep one only while `room()` allows, and make
   * room before allocating (the new buffer's request has reserved it already).
   */
  setRoom(room: () => number): void {
    this.room = room;
  }

  /** Keeps at most `bytes` of free buffers from now on (never raises the limit); drops the excess. */
  limitHeld(bytes: number): void {
    if (bytes >= this.maxHeldBytes) return;
    this.maxHeldBytes = bytes;
    for (const [cls, list] of [...this.free].sort((a, b) => b[0] - a[0])) {
      while (this.heldBytes > bytes && list.length > 0) this.heldBytes -= list.pop()!.length;
      if (list.length === 0) this.free.delete(cls);
    }
  }

  /** Bytes of free buffers kept for reuse. */
  get held(): number {
    return this.heldBytes;
  }

  /** Drops at least `bytes` of free buffers (or all of them), the biggest first. */
  shrink(bytes: number): void {
    const goal = Math.max(0, this.heldBytes - bytes);
    for (const [cls, list] of [...this.free].sort((a, b) => b[0] - a[0])) {
      while (this.heldBytes > goal && list.length > 0) {
        this.heldBytes -= list.pop()!.length;
        this.dropped(cls);
      }
      if (list.length === 0) this.free.delete(cls);
      if (this.heldBytes <= goal) break;
    }
  }

  /** Whether a request of `size` bytes is worth taking from the pool. */
  pools(size: number): boolean {
    return size >= this.minSize;
  }

  /** The bytes a buffer for `size` bytes takes: its class and headroom when pooled, else `size`. */
  footprint(size: number): number {
    return this.pools(size) ? this.classOf(size) + BufferPool.HEADROOM : size;
  }

  /** The smallest class (at least minSize) whose buffers hold `size` bytes. */
  private classOf(size: number): number {
    const need = size - BufferPool.HEADROOM;
    if (need > BufferPool.STEP) return Math.ceil(need / BufferPool.STEP) * BufferPool.STEP;
    let c = this.minSize;
    while (c + BufferPool.HEADROOM < size) c *= 2;
    return c;
  }

  /**
   * A buffer was let go: a big one is resident until the garbage collector frees it, which V8 does
   * late when its own heap is small (up to ~100 MiB of them were seen resident at once), so a
   * collection is asked for once 32 MiB of them were dropped (at most 4 a second).
   */
  private dropped(cls: number): void {
    if (cls <= BufferPool.STEP) return;
    this.droppedBig += cls;
    if (this.droppedBig >= DROPPED_BEFORE_GC) {
      this.droppedBig = 0;
      requestGc();
    }
  }

  private isClass(cls: number): boolean {
    if (cls < this.minSize) return false;
    return cls > BufferPool.STEP ? cls % BufferPool.STEP === 0 : (cls & (cls - 1)) === 0;
  }
}

/** What a big buffer is cut from (see acquire): over glibc's largest mmap threshold, 32 MiB. */
const BIG_ALLOCATION = 33 * 1024 * 1024;
const DROPPED_BEFORE_GC = 32 * 1024 * 1024;

/** One pool per process: connections to every export share it. */
export const ioBuffers = new BufferPool();
