import { collectNow, collections, requestGc } from "./gc.js";

/**
 * Reuses I/O buffers: write payloads and read replies of 4 KiB and more. A fresh buffer per
 * request costs an ArrayBuffer, its backing store and, for big ones, page faults and page
 * clearing in the kernel; Node's own 8 KiB slab only serves requests under 4 KiB, so a 4 KiB
 * read reply (payload + header) would get a fresh ArrayBuffer every time. The pool keeps a
 * bounded number of buffers per size class (powers of two up to 1 MiB, then whole MiB). Every
 * buffer has HEADROOM spare bytes past its class, so a class-sized payload plus its reply header
 * still fits in it. Buffers that are dropped are freed only when the garbage collector gets to
 * them, so reusing them also keeps the resident set down.
 * Buffers over 1 MiB ("big") are cut from allocations of BIG_ALLOCATION bytes and kept apart as
 * spares: whole allocations, any of which serves any big size (only the pages written are resident,
 * and those stay resident whether the buffer is in use or free). Spares are kept up to
 * BIG_ALLOCATION bytes written (one 32 MiB request's worth) and given up, all of them, once no big
 * buffer was asked for in `spareIdleMs` (10 s). Without them, each big request made a new allocation while
 * the last one waited for the collector: two or three were resident at once.
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
  /** Free big allocations (whole), and how many of their bytes were ever handed out. */
  private readonly spares: Spare[] = [];
  private spareBytes = 0;
  /** Bytes of each big allocation ever handed out (its resident high-water mark), by allocation. */
  private readonly touched = new WeakMap<ArrayBuffer, number>();
  private lastBigUse = 0;
  private spareTimer: NodeJS.Timeout | null = null;
  /** collections() when a big allocation was last let go: garbage waits until that count moves on. */
  private bigGarbageAt = -1;

  constructor(
    private readonly minSize = 4096,
    private maxHeldBytes = 64 * 1024 * 1024,
    private readonly spareIdleMs = SPARE_IDLE_MS,
  ) {}

  /**
   * A buffer of at least `size` bytes: a free one of its class; for classes up to 1 MiB, else the
   * smallest free one of a bigger class up to twice its size (mixed sizes reuse what is there
   * rather than allocate). A big buffer is never handed out for a smaller class: all of it may be
   * resident, and the memory budget counts the class.
   */
  acquire(size: number): Buffer {
    const cls = this.classOf(size);
    if (cls > BufferPool.STEP && cls + BufferPool.HEADROOM <= BIG_ALLOCATION) return this.acquireBig(cls + BufferPool.HEADROOM);
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
    return Buffer.allocUnsafeSlow(cls + BufferPool.HEADROOM);
  }

  /**
   * A big buffer of `bytes`: from the spare written that far already with the fewest bytes written,
   * else from the one written furthest, else cut from a new allocation. Requests over the memory
   * budget come in alone, so the biggest spare is free for them. A big allocation is larger
   * than glibc's largest mmap threshold (32 MiB), so it is always mmapped: only the pages written
   * are resident, and once dropped and collected its memory goes back to the system at once. From
   * the heap, big buffers of assorted sizes (hostile clients) left freed middles that were never
   * returned: the resident set grew to several times what was in use.
   */
  private acquireBig(bytes: number): Buffer {
    this.lastBigUse = Date.now();
    let pick = -1;
    for (let i = 0; i < this.spares.length; i++) {
      const t = this.spares[i]!.touched;
      const best = pick < 0 ? -1 : this.spares[pick]!.touched;
      if (pick < 0 || (t >= bytes ? best < bytes || t < best : best < bytes && t > best)) pick = i;
    }
    let whole: ArrayBuffer;
    if (pick >= 0) {
      const s = this.spares.splice(pick, 1)[0]!;
      this.spareBytes -= s.touched;
      whole = s.whole;
      if (bytes > s.touched) this.touched.set(whole, bytes);
    } else {
      if (this.heldBytes > this.room()) this.shrink(this.heldBytes - this.room());
      // A big allocation let go and not collected yet may have as many pages resident as this one
      // will: collected first (V8 unmaps it a little later: the two overlap for tens of ms, not
      // until the next collection; the fuzzer's peaks were two or three of them).
      if (this.bigGarbageAt === collections()) collectNow();
      this.madeCount++;
      whole = Buffer.allocUnsafeSlow(BIG_ALLOCATION).buffer as ArrayBuffer;
      this.touched.set(whole, bytes);
    }
    return Buffer.from(whole, 0, bytes);
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
    if (cls > BufferPool.STEP) {
      this.releaseBig(buf);
      return;
    }
    if (this.heldBytes + buf.length > this.maxHeldBytes) {
      this.dropped(cls);
      return;
    }
    let list = this.free.get(cls);
    if (!list) this.free.set(cls, (list = []));
    list.push(buf);
    this.heldBytes += buf.length;
  }

  /**
   * Keeps a big buffer's allocation as a spare. The spares' written bytes stay within one
   * allocation: the ones written furthest are kept, the others let go (a 32 MiB one dropped for
   * small ones made the next 32 MiB request write a new one while it waited for the collector).
   */
  private releaseBig(buf: Buffer): void {
    const whole = buf.buffer as ArrayBuffer;
    const touched = this.touched.get(whole);
    if (touched === undefined || buf.byteOffset !== 0) return; // not one of ours
    this.spares.push({ whole, touched });
    this.spareBytes += touched;
    if (this.spareBytes > BIG_ALLOCATION) {
      this.spares.sort((a, b) => b.touched - a.touched);
      while (this.spareBytes > BIG_ALLOCATION) {
        const s = this.spares.pop()!;
        this.spareBytes -= s.touched;
        this.dropped(s.touched);
      }
    }
    this.lastBigUse = Date.now();
    if (!this.spareTimer && this.spares.length > 0) this.armSpareTimer(this.spareIdleMs);
  }

  /** Gives the spares up once no big buffer was asked for or given back in spareIdleMs. */
  private armSpareTimer(ms: number): void {
    this.spareTimer = setTimeout(() => {
      this.spareTimer = null;
      if (this.spares.length === 0) return;
      const idle = Date.now() - this.lastBigUse;
      if (idle < this.spareIdleMs) {
        this.armSpareTimer(this.spareIdleMs - idle);
        return;
      }
      this.spares.length = 0;
      this.spareBytes = 0;
      this.droppedBytes = 0;
      // Collected now, off any request's path: V8 unmaps a collected buffer tens of ms after the
      // collection, so collecting only when the next big one is made let the two be resident at once.
      collectNow();
    }, ms);
    this.spareTimer.unref?.();
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

  /** Bytes of free buffers kept for reuse: the small ones', and the bytes of spare big allocations ever written. */
  get held(): number {
    return this.heldBytes + this.spareBytes;
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
    if (cls > BufferPool.STEP) this.bigGarbageAt = collections();
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

interface Spare {
  whole: ArrayBuffer;
  /** Bytes of it ever handed out: resident. */
  touched: number;
}

/** What a big buffer is cut from (see acquireBig): over glibc's largest mmap threshold, 32 MiB. */
const BIG_ALLOCATION = 33 * 1024 * 1024;
const DROPPED_BEFORE_GC = 32 * 1024 * 1024;
/**
 * Spares are let go after this long without a big request. Short (1 s) made the fuzzer's bursts of
 * big requests meet a spare just let go and not yet unmapped: two 32 MiB buffers resident at once.
 */
const SPARE_IDLE_MS = 10_000;

/** One pool per process: connections to every export share it. */
export const ioBuffers = new BufferPool();
