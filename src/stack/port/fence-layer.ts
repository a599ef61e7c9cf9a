import { PassthroughLayer, type Io, type Layer } from "../layer.js";

/** Port A refused a write: this node no longer holds the resource's lease. */
export function fencedError(message: string): Error {
  return Object.assign(new Error(message), { code: "EFENCED" });
}

export function isFenced(err: unknown): boolean {
  return (err as { code?: string } | null)?.code === "EFENCED";
}

/**
 * Epoch fencing at port A: every write-type request (write, zero, trim, flush) asks `mayWrite()`
 * first — a comparison with the lease's deadline while the lease is fresh, a check of the record
 * itself once it is not (a node that was paused longer than its lease). A refused request fails
 * with an EFENCED error, which the port redirector turns into a held request that goes, once the
 * fence has moved the export to port B, to the new owner: never into the image a second time.
 */
export class FenceLayer extends PassthroughLayer {
  constructor(
    next: Layer,
    private readonly mayWrite: () => boolean,
  ) {
    super(next);
  }
  private refuse(op: string): Promise<never> {
    return Promise.reject(fencedError(`${op} refused at port A: this node no longer owns the resource`));
  }
  override pwrite(buf: Buffer, offset: number, io: Io): Promise<void> {
    return this.mayWrite() ? this.next.pwrite(buf, offset, io) : this.refuse("write");
  }
  override zero(length: number, offset: number, io: Io): Promise<void> {
    return this.mayWrite() ? this.next.zero(length, offset, io) : this.refuse("zero");
  }
  override trim(length: number, offset: number, io: Io): Promise<void> {
    return this.mayWrite() ? this.next.trim(length, offset, io) : this.refuse("trim");
  }
  override flush(io: Io): Promise<void> {
    return this.mayWrite() ? this.next.flush(io) : this.refuse("flush");
  }
}
