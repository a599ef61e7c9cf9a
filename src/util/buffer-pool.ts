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
  private droppedBytes = 0;
  private madeCount = 0;
  /** Bytes of buffers let go after which a garbage collection is asked for (see dropped). */
  private gcAfter = DROPPED_BEFORE_GC;
  /** How many free bytes may be kept when a new buffer is made (a memory budget's room; see setRoom). */
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
    // Made only when no free one fits: first the free ones give way to what the reservations need.
    if (this.heldBytes > this.room()) this.shrink(this.heldBytes - this.room());
    this.madeCount++;
    if (cls <= BufferPool.STEP || cls + BufferPool.HEADROOM > BIG_ALLOCATION) return Buffer.allocUnsafeSlow(cls + BufferPool.HEADROOM);
    // A big one sits in an allocation larger than glibc's largest mmap threshold (32 MiB), so it is
    // always mmapped: only the pages written are resident, and once dropped and collected its
    // memory goes back to the system at once. Big buffers of assorted sizes (hostile clients) would
    // otherwise come from the heap, whose freed middle is never returned: the resident set grew to
    // several times what was in use. V8 counts the whole allocation, so it collects them sooner.
    return Buffer.allocUnsafeSlow(BIG_ALLOCATION).subarray(0, cls + BufferPool.HEADROOM);
  }

  /**
   * Takes a buffer back: kept for reuse while the pool holds less than its cap, else let go. Kept
   * even when the room is short: the reservation its bytes go back to is usually the next request's
   * (a connection waiting for memory), which takes it; giving it up here made that request allocate
   * anew while this one waited for the garbage collector. The room is made when a buffer is made.
   */
  release(buf: Buffer): void {
    const cls = buf.length - BufferPool.HEADROOM;
    if (!this.isClass(cls)) return;
    if (this.heldBytes + buf.length > this.maxHeldBytes) {
      this.dropped(cls);
      return;
    }
    let list = this.free.get(cls);
    if (!list) this.free.set(cls, (list = []));
    list.push(buf);
    this.heldBytes += buf.length;
  }

  /** Asks for a garbage collection once `bytes` of buffers were let go (see dropped). */
  collectAfter(bytes: number): void {
    this.gcAfter = bytes;
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

  /**
   * Free buffers count against a memory budget: before a new buffer is made (its request has
   * reserved it already), free ones beyond what the reservations leave are given up.
   */
  setRoom(room: () => number): void {
    this.room = room;
  }

  /** Drops at least `bytes` of free buffers (or all of them), the biggest first. */
  private shrink(bytes: number): void {
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

  /** Buffers made so far (not taken from the free ones). */
  get made(): number {
    return this.madeCount;
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
   * A buffer was let go: it is resident until the garbage collector frees it, which V8 does late
   * when its own heap is small (up to ~100 MiB of big ones were seen resident at once), so a
   * collection is asked for once `gcAfter` bytes were dropped (at most 4 a second).
   */
  private dropped(cls: number): void {
    this.droppedBytes += cls;
    if (this.droppedBytes >= this.gcAfter) {
      this.droppedBytes = 0;
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
