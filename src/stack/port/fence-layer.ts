import { PassthroughLayer, type Extent, type ExtentKind, type Io, type Layer } from "../layer.js";

/** Port A refused a write: this node no longer holds the resource's lease. */
export function fencedError(message: string): Error {
  return Object.assign(new Error(message), { code: "EFENCED" });
}

export function isFenced(err: unknown): boolean {
  return (err as { code?: string } | null)?.code === "EFENCED";
}

/**
 * Epoch fencing at port A: every write-type request (write, zero, trim, flush) asks `mayWrite()`
 * first, and again once it completed (see gate); reads ask first (a deposed owner answers nothing
 * from its own state) — a comparison with the lease's deadline while the lease is fresh, a check of the record
 * itself once it is not (a node that was paused longer than its lease); a request waits while
 * the record cannot be read. A refused request fails
 * with an EFENCED error, which the port redirector turns into a held request that goes, once the
 * fence has moved the export to port B, to the new owner: never into the image a second time.
 */
export class FenceLayer extends PassthroughLayer {
  /** `mayWrite` answers at once (true/false) or, when it cannot tell yet, with a promise. */
  constructor(
    next: Layer,
    private readonly mayWrite: () => boolean | Promise<boolean>,
    /** false: reads pass unasked (a fence on the image itself, below one that asks for them). */
    private readonly reads = true,
  ) {
    super(next);
  }
  /**
   * Asks before the request and again once it completed: the process may have been stopped while
   * the request ran (in a fault rule's delay, in the kernel) for longer than the lease. One that
   * completed after the lease was lost is not acknowledged here but refused like a late one: it
   * may have gone into state the fence then drops (a power-loss cache), and the new owner never
   * had it; the redirector sends it there.
   */
  private gate(op: string, go: () => Promise<void>): Promise<void> {
    const ok = this.mayWrite();
    if (ok === true) return go().then(() => this.after(op));
    if (ok === false) return this.refuse(op);
    return ok.then((yes) => (yes ? go().then(() => this.after(op)) : this.refuse(op)));
  }
  private after(op: string): Promise<void> | void {
    const ok = this.mayWrite();
    if (ok === true) return;
    if (ok === false) return this.refuse(op, "completed after");
    return ok.then((yes) => (yes ? undefined : this.refuse(op, "completed after")));
  }
  private refuse(op: string, when = "refused at"): Promise<never> {
    return Promise.reject(fencedError(`${op} ${when} port A: this node no longer owns the resource`));
  }
  /** Reads ask once, before: what they return was there while the lease held. */
  private gateRead<T>(op: string, go: () => Promise<T>): Promise<T> {
    if (!this.reads) return go();
    const ok = this.mayWrite();
    if (ok === true) return go();
    if (ok === false) return this.refuse(op);
    return ok.then((yes) => (yes ? go() : this.refuse(op)));
  }
  override pread(buf: Buffer, offset: number, io: Io): Promise<void> {
    // The hot path: a fresh lease answers true at once; no closure is made for it.
    if (!this.reads) return this.next.pread(buf, offset, io);
    const ok = this.mayWrite();
    if (ok === true) return this.next.pread(buf, offset, io);
    if (ok === false) return this.refuse("read");
    return ok.then((yes) => (yes ? this.next.pread(buf, offset, io) : this.refuse("read")));
  }
  override extents(length: number, offset: number, io: Io, kind?: ExtentKind): Promise<Extent[]> {
    return this.gateRead("block status", () => this.next.extents(length, offset, io, kind));
  }
  override cache(length: number, offset: number, io: Io): Promise<void> {
    return this.gateRead("cache", () => this.next.cache(length, offset, io));
  }
  override pwrite(buf: Buffer, offset: number, io: Io): Promise<void> {
    return this.gate("write", () => this.next.pwrite(buf, offset, io));
  }
  override zero(length: number, offset: number, io: Io): Promise<void> {
    return this.gate("zero", () => this.next.zero(length, offset, io));
  }
  override trim(length: number, offset: number, io: Io): Promise<void> {
    return this.gate("trim", () => this.next.trim(length, offset, io));
  }
  override flush(io: Io): Promise<void> {
    return this.gate("flush", () => this.next.flush(io));
  }
}
