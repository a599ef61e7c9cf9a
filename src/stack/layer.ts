import type { Logger } from "pino";

/**
 * Per-request details that travel with a request through the stack (never stored in a layer).
 * - `fua`: the data must be durable when the call resolves (NBD_CMD_FLAG_FUA).
 * - `mayTrim`: zero() may deallocate instead of writing zeros (NBD_CMD_FLAG_NO_HOLE not set).
 * - `fast`: zero() must fail with ENOTSUP rather than fall back to a slow write (NBD_CMD_FLAG_FAST_ZERO).
 * - `peer`: the request was forwarded by another node's port B; it is older than anything a port
 *   redirector holds here, so it is never held behind newer requests.
 */
export interface Io {
  fua: boolean;
  mayTrim: boolean;
  fast: boolean;
  peer?: boolean;
  /** The client connection the request came on, for state kept per client (unflushed writes). */
  session?: ClientSession | null;
  signal?: AbortSignal;
  log?: Logger;
}

/** A client connection as layers see it: an identity, and whether it has closed (its state can go). */
export interface ClientSession {
  readonly ended: boolean;
  /**
   * A peer's connection (another node's port B): the epoch at which this node owned the export
   * when the link was made (null: it owned nothing then; undefined: not a peer, or no owner
   * epochs here). The port redirector serves the link's requests only at that epoch; a link made
   * to a non-owner (a hand-over's first link) takes the first epoch it reaches.
   */
  peerEpoch?: number | null;
}

/** Io for internal calls (copies, flushes at shutdown, tests). */
export const plainIo: Io = Object.freeze({ fua: false, mayTrim: true, fast: false });
export const fuaIo: Io = Object.freeze({ fua: true, mayTrim: true, fast: false });

/**
 * Block-size limits of a layer, in bytes.
 * `minimum`: required alignment of offset and length; `preferred`: best I/O size;
 * `maximum`: the largest request the layer accepts in one call.
 */
export interface BlockSize {
  minimum: number;
  preferred: number;
  maximum: number;
}

/**
 * What a layer can do, computed once after open: a layer's own abilities ANDed with its child's.
 * `fastZero`: zero() understands `io.fast` (answers ENOTSUP at once when it would be slow).
 * `multiConn`: flush and FUA through any connection cover writes made through every connection.
 */
export interface Capabilities {
  writable: boolean;
  flush: boolean;
  fua: boolean;
  trim: boolean;
  zero: boolean;
  fastZero: boolean;
  cache: boolean;
  extents: boolean;
  /**
   * extents(…, "depth") is answered (the qemu:allocation-depth meta context): only where every
   * layer down to the bottom knows which layer of a chain holds the bytes. Implies `extents`.
   */
  depth: boolean;
  multiConn: boolean;
  blockSize: BlockSize;
}

/**
 * What extents() describes:
 * - `allocation` (base:allocation): flags are NBD_STATE_* bits, HOLE = 1, ZERO = 2;
 * - `depth` (qemu:allocation-depth, as qemu-nbd answers it): flags are the depth of the layer of a
 *   backing chain that holds the bytes — 1 the top image, 2 its backing file, …; 0 no layer does
 *   (they read as zeroes). A raw file holds all its bytes (depth 1); past the end of a backing file
 *   shorter than the image, the bytes count as that file's.
 */
export type ExtentKind = "allocation" | "depth";

/** One run of the device's allocation map (or depth map), starting where the previous one ended. */
export interface Extent {
  length: number;
  /** NBD_STATE_* bits of base:allocation (HOLE = 1, ZERO = 2), or the depth (see ExtentKind). */
  flags: number;
}

/**
 * The one interface every layer implements (method names follow nbdkit's).
 *
 * Rules every caller keeps, checked once by the guard at the top of the stack
 * (see guard.ts) and kept by every layer that remaps offsets:
 * - offsets and lengths are byte counts, `offset + length <= size()`, `length > 0`;
 * - requests respect `capabilities().blockSize`: aligned to `minimum`, at most `maximum`;
 * - write-type calls (pwrite, zero, trim, and fua) are made only if the capability is there.
 * `pread` fills all of `buf`; `extents` returns at least one extent and never more than `length`
 * bytes in total (it may return fewer: the caller asks again for the rest). `extents` of kind
 * `depth` is asked only of a layer whose capabilities say `depth`; a layer that remaps offsets
 * passes the kind on with them.
 */
export interface Layer {
  /** Short description of this layer and what is below, e.g. "disk → file:/img". */
  describe(): string;
  open(): Promise<void>;
  close(): Promise<void>;
  size(): number;
  capabilities(): Capabilities;
  pread(buf: Buffer, offset: number, io: Io): Promise<void>;
  pwrite(buf: Buffer, offset: number, io: Io): Promise<void>;
  zero(length: number, offset: number, io: Io): Promise<void>;
  trim(length: number, offset: number, io: Io): Promise<void>;
  flush(io: Io): Promise<void>;
  cache(length: number, offset: number, io: Io): Promise<void>;
  extents(length: number, offset: number, io: Io, kind?: ExtentKind): Promise<Extent[]>;
  /** Resolves once every request handed to this layer (and below) has completed. */
  quiesce(): Promise<void>;
  resume(): void;
}

/** Base of every filter and data layer: forwards everything to `next`. Override what you change. */
export class PassthroughLayer implements Layer {
  constructor(protected readonly next: Layer) {}
  describe(): string {
    return this.next.describe();
  }
  open(): Promise<void> {
    return this.next.open();
  }
  close(): Promise<void> {
    return this.next.close();
  }
  size(): number {
    return this.next.size();
  }
  capabilities(): Capabilities {
    return this.next.capabilities();
  }
  pread(buf: Buffer, offset: number, io: Io): Promise<void> {
    return this.next.pread(buf, offset, io);
  }
  pwrite(buf: Buffer, offset: number, io: Io): Promise<void> {
    return this.next.pwrite(buf, offset, io);
  }
  zero(length: number, offset: number, io: Io): Promise<void> {
    return this.next.zero(length, offset, io);
  }
  trim(length: number, offset: number, io: Io): Promise<void> {
    return this.next.trim(length, offset, io);
  }
  flush(io: Io): Promise<void> {
    return this.next.flush(io);
  }
  cache(length: number, offset: number, io: Io): Promise<void> {
    return this.next.cache(length, offset, io);
  }
  extents(length: number, offset: number, io: Io, kind: ExtentKind = "allocation"): Promise<Extent[]> {
    return this.next.extents(length, offset, io, kind);
  }
  quiesce(): Promise<void> {
    return this.next.quiesce();
  }
  resume(): void {
    this.next.resume();
  }
}

/** Counts requests in flight in a port so quiesce() can wait for them. */
/** Depth extents of a layer below, seen from one layer up: depth n there is n + 1 here (0 stays 0). */
export function deeper(extents: Extent[]): Extent[] {
  return extents.map((e) => ({ length: e.length, flags: e.flags === 0 ? 0 : e.flags + 1 }));
}

export class InflightTracker {
  private count = 0;
  private waiters: Array<() => void> = [];
  enter(): void {
    this.count++;
  }
  leave(): void {
    if (--this.count === 0 && this.waiters.length > 0) {
      const w = this.waiters;
      this.waiters = [];
      for (const f of w) f();
    }
  }
  get inflight(): number {
    return this.count;
  }
  idle(): Promise<void> {
    if (this.count === 0) return Promise.resolve();
    return new Promise((resolve) => this.waiters.push(resolve));
  }
}
