/** A reservation waiting for bytes of a MemoryBudget; pass it to cancel() to give up waiting. */
export interface BudgetWaiter {
  readonly bytes: number;
  readonly granted: () => void;
}

/** Memory kept for reuse (the I/O buffer pool) that counts against a budget. */
export interface BudgetCache {
  /** Bytes kept now. */
  readonly held: number;
}

/** What a MemoryBudget holds and has done, for logs, tests and metrics. */
export interface BudgetStats {
  limit: number;
  /** Everything held: reservations and buffered bytes. */
  used: number;
  /** Of `used`, bytes already read from sockets and not parsed yet (see buffer()). */
  buffered: number;
  /** Free buffers kept for reuse (the cache), besides `used`. */
  cached: number;
  /** Most bytes ever held at once. */
  peak: number;
  /** Reservations that had to wait, since the start. */
  waits: number;
  /** Reservations waiting now. */
  waiting: number;
}

/**
 * The process-wide budget of memory that clients make the server hold: request payloads in flight,
 * replies queued for clients that read slowly, handshake bytes not parsed yet. One per server,
 * shared by every connection.
 *
 * Rules:
 * - `take` reserves bytes a connection is about to hold (a request's payload, before reading or
 *   allocating it). It succeeds if the bytes fit and nobody waits, or if nothing at all is held (so a
 *   single request larger than the whole budget still proceeds, alone). Otherwise the caller stops
 *   reading its socket and calls `wait`.
 * - Waiters are granted strictly in arrival order (a big reservation is never starved by small
 *   ones); `granted` runs with the bytes already taken.
 * - `force` charges bytes that are held already and cannot wait (a reply longer than its request
 *   reserved, option replies): the reservations may then exceed `limit`, and nothing new is
 *   admitted until they are back under.
 * - `buffer` counts bytes a socket delivered that are not parsed yet (a paused connection's
 *   unparsed rest, handshake bytes). They are held by connections that may themselves be waiting
 *   for the budget, so they count in `used` but never hold up a reservation (else a reservation
 *   could wait for bytes that are only given back once it is granted). They are bounded per
 *   connection: one socket read.
 * - Every byte taken or forced is given back exactly once with `give`, every buffered byte with
 *   `unbuffer`, whatever happens to the connection (its close gives back everything it still holds).
 * - Free buffers kept for reuse (`setCache`) are shown in stats. A buffer given back is kept (the
 *   reservation it leaves goes to the next request, which takes it); before a new one is made, free
 *   ones beyond what the reservations leave (`roomForCache`) are given up, so reservations and cache
 *   together stay within the limit whenever memory is allocated. Reservations never wait for the
 *   cache.
 */
export class MemoryBudget {
  private held = 0; // reservations: taken, granted and forced
  private buffered = 0;
  private most = 0;
  private waitCount = 0;
  private readonly queue: BudgetWaiter[] = [];
  private head = 0;
  private cache: BudgetCache | null = null;

  constructor(readonly limit: number) {
    if (!(limit > 0)) throw new Error(`a memory budget must be positive (got ${limit})`);
  }

  get used(): number {
    return this.held + this.buffered;
  }

  /** Memory kept for reuse that counts against this budget (see the class comment). */
  setCache(cache: BudgetCache): void {
    this.cache = cache;
  }

  /** Bytes the cache may keep when it makes a new buffer: what the reservations leave of the limit. */
  roomForCache(): number {
    return Math.max(0, this.limit - this.held);
  }

  /** True when a new reservation would have to wait. */
  get exhausted(): boolean {
    return this.head < this.queue.length || (this.held >= this.limit && this.held > 0);
  }

  /** Reserves `bytes` at once if they fit and nobody waits; false if the caller must wait. */
  take(bytes: number): boolean {
    if (this.head < this.queue.length || !this.fits(bytes)) return false;
    this.charge(bytes);
    return true;
  }

  /** Queues a reservation; `granted` runs (once, from a later give) when the bytes were taken. */
  wait(bytes: number, granted: () => void): BudgetWaiter {
    const w = { bytes, granted };
    this.queue.push(w);
    this.waitCount++;
    return w;
  }

  /** Stops waiting (the connection closed). Harmless if `w` was granted already. */
  cancel(w: BudgetWaiter): void {
    const i = this.queue.indexOf(w, this.head);
    if (i < 0) return;
    this.queue.splice(i, 1);
    this.grant(); // the head may have changed
  }

  /** Charges bytes that are held already, fit or not. */
  force(bytes: number): void {
    this.charge(bytes);
  }

  /** Counts bytes read from a socket and not parsed yet (they never hold up a reservation). */
  buffer(bytes: number): void {
    this.buffered += bytes;
    if (this.used > this.most) this.most = this.used;
  }

  unbuffer(bytes: number): void {
    if (bytes > this.buffered) {
      const had = this.buffered;
      this.buffered = 0;
      throw new Error(`memory budget: ${bytes} buffered bytes given back while ${had} were counted`);
    }
    this.buffered -= bytes;
  }

  give(bytes: number): void {
    if (bytes === 0) return;
    if (bytes > this.held) {
      const held = this.held;
      this.held = 0;
      this.grant();
      throw new Error(`memory budget: ${bytes} bytes given back while ${held} were held`);
    }
    this.held -= bytes;
    this.grant();
  }

  stats(): BudgetStats {
    return { limit: this.limit, used: this.used, buffered: this.buffered, cached: this.cache?.held ?? 0, peak: this.most, waits: this.waitCount, waiting: this.queue.length - this.head };
  }

  private fits(bytes: number): boolean {
    return this.held + bytes <= this.limit || this.held === 0;
  }

  private charge(bytes: number): void {
    this.held += bytes;
    if (this.used > this.most) this.most = this.used;
  }

  private grant(): void {
    while (this.head < this.queue.length) {
      const w = this.queue[this.head]!;
      if (!this.fits(w.bytes)) break;
      this.queue[this.head++] = undefined as unknown as BudgetWaiter;
      this.charge(w.bytes);
      if (this.head > 64 && this.head * 2 > this.queue.length) {
        this.queue.splice(0, this.head);
        this.head = 0;
      }
      w.granted();
    }
  }
}
