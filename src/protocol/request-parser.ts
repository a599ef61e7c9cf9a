import { ProtocolError } from "../errors.js";
import { Cmd, CmdFlag, NBD_REQUEST_MAGIC, REQUEST_HEADER_SIZE } from "./constants.js";
import type { ClientSession, Io } from "../stack/layer.js";
import { ioBuffers } from "../util/buffer-pool.js";

/**
 * One transmission-phase request. It doubles as the `Io` that travels down the stack,
 * so a request costs one object. The cookie is kept as two 32-bit halves (lossless, no bigint).
 * `offset` is Infinity when the client sent one above 2^53 (it fails the range check).
 */
export class Request implements Io {
  fua: boolean;
  mayTrim: boolean;
  fast: boolean;
  peer = false;
  session: ClientSession | null = null;
  /** Pool buffer holding `data` when the payload had to be assembled; released by the consumer. */
  backing: Buffer | null = null;
  /** Bytes of the server's memory budget this request holds (see server/memory-budget.ts). */
  charge = 0;
  /**
   * A write whose payload comes in pieces (see RequestParser's `pieceSize`): set by the consumer
   * when the request is emitted, before its first piece; `data` stays null.
   */
  stream: unknown = null;
  constructor(
    readonly type: number,
    readonly flags: number,
    readonly cookieHi: number,
    readonly cookieLo: number,
    readonly offset: number,
    readonly length: number,
    public data: Buffer | null,
  ) {
    this.fua = (flags & CmdFlag.NBD_CMD_FLAG_FUA) !== 0;
    this.mayTrim = (flags & CmdFlag.NBD_CMD_FLAG_NO_HOLE) === 0;
    this.fast = (flags & CmdFlag.NBD_CMD_FLAG_FAST_ZERO) !== 0;
  }
}

/**
 * One request that lives as long as the process, so that V8 keeps Request's hidden classes (maps).
 * Without it, once the last client's requests were gone a full collection (the buffer pool asks
 * for them) gave Request new maps, and V8 dropped all optimized code compiled against the old ones
 * (`--trace-deopt`, "reason: weak objects": Request, feed, onRequest, run, execute, reject, read,
 * checkRequest, finalSend): the next client ran the request path unoptimized until it was compiled
 * again. In bench:peers (WORKLOADS="seqread-1m-qd8 nbdcopy-1g") an nbdcopy after the 1 MiB reads
 * cost the server 2.0–2.4 × nbdkit-file's CPU per MiB before, 1.4–1.7 × with the maps kept.
 * test/interop/warm-code.test.ts checks it with V8's trace.
 */
export const KEEPS_REQUEST_MAPS = new Request(0, 0, 0, 0, 0, 0, null);

/**
 * Resumable parser of the request stream. Feed it chunks as they arrive; it calls `onRequest`
 * for each whole request. Write payloads are slices of the received chunk when they lie whole in
 * it and are copied only when split across chunks (into a pooled buffer: see Request.backing). Throws ProtocolError on a bad magic or a write
 * payload larger than `maxPayload`; after that the stream cannot be resynchronised.
 * When `onRequest` returns false (its in-flight caps are reached) the parser stops right after that
 * request; `feed` returns how many bytes it used, and the caller feeds the rest later.
 * Before a request is emitted — before a write's payload is allocated or read — `admit(type, length)`
 * is asked whether it may come in. If not, the parser keeps the decoded header and stops right after
 * it (`blocked`); the caller calls `resume()` once it may, then feeds the rest.
 *
 * With a `pieceSize`, a write longer than it is streamed: the request is emitted as soon as it is
 * admitted (its `data` null, the return value of `onRequest` ignored), then its payload is handed
 * to `onPiece` in pieces of `pieceSize` bytes, each in its own pooled buffer (`backing`) that the
 * consumer owns and releases. When `onPiece` returns false the parser stops after that piece (`stalled`,
 * like `blocked`) until `unstall()`; for the last piece, false means what onRequest's false means.
 * So a write of any length holds a bounded number of pieces, and the consumer can apply them as
 * they come.
 */
export class RequestParser {
  private readonly header = Buffer.alloc(REQUEST_HEADER_SIZE);
  private headerFill = 0;
  private pending: Request | null = null; // a write waiting for its payload
  private payloadFill = 0;
  private held: Request | null = null; // a decoded request that admit() did not let in yet
  /** Streamed write: the piece being filled, and where the payload it holds starts. */
  private piece: Buffer | null = null;
  private pieceBacking: Buffer | null = null;
  private pieceAt = 0;
  private stalledOn = false;

  /**
   * @param volatileChunks the caller reuses the chunk buffers it feeds, so whole payloads are
   * copied out of them too (big payloads avoid that by being read straight into their buffer:
   * see payloadTarget).
   */
  constructor(
    private readonly onRequest: (req: Request) => unknown,
    private readonly maxPayload: number,
    private readonly volatileChunks = false,
    private readonly admit: (type: number, length: number) => boolean = () => true,
    private readonly pieceSize = 0,
    private readonly onPiece: (req: Request, piece: Buffer, backing: Buffer, at: number, last: boolean) => boolean = () => true,
  ) {}

  /** A decoded request waits for admit(), or a streamed write's piece for unstall(): the caller must call resume()/unstall() before feeding more. */
  get blocked(): boolean {
    return this.held !== null || this.stalledOn;
  }

  /** A streamed write's payload waits for its consumer (onPiece said stop); unstall() lets it go on. */
  get stalled(): boolean {
    return this.stalledOn;
  }

  /** Inside a streamed write's payload: what comes next belongs to a request already in flight. */
  get streaming(): boolean {
    return this.pending !== null && this.pending.data === null;
  }

  /** The consumer took in the pieces it had: the payload may go on. */
  unstall(): void {
    if (!this.stalledOn) return;
    this.stalledOn = false;
    this.nextPiece(); // so payloadTarget() has somewhere to read into
  }

  /** Whether a write of `length` bytes is streamed in pieces. */
  streams(length: number): boolean {
    return this.pieceSize > 0 && length > this.pieceSize;
  }

  /** Lets in the request that admit() held back: emits it, or starts reading its write payload. */
  resume(): void {
    const req = this.held;
    if (!req) return;
    this.held = null;
    this.start(req);
  }

  /** A request that may come in; returns what onRequest said (false: stop after it). */
  private start(req: Request): unknown {
    if (req.type !== Cmd.NBD_CMD_WRITE || req.length === 0) return this.onRequest(req);
    if (this.streams(req.length)) {
      req.data = null;
      this.pending = req;
      this.pieceAt = 0;
      this.onRequest(req);
      if (this.pending === req) this.nextPiece(); // (a consumer may discard() from onRequest)
      return true;
    }
    let backing: Buffer | null = null;
    if (ioBuffers.pools(req.length)) {
      backing = ioBuffers.acquire(req.length);
      req.data = backing.subarray(0, req.length);
    } else req.data = Buffer.allocUnsafe(req.length);
    req.backing = backing;
    this.pending = req;
    this.payloadFill = 0;
    return true;
  }

  /**
   * The unfilled rest of the payload being assembled, when at least `min` bytes are missing:
   * the caller may read from the socket straight into it and then call payloadFilled().
   */
  payloadTarget(min: number): Buffer | null {
    const target = this.target();
    if (!target || target.length - this.payloadFill < min) return null;
    return target.subarray(this.payloadFill);
  }

  /** `n` bytes were written into the buffer given by payloadTarget(); completing it calls onRequest. */
  payloadFilled(n: number): void {
    this.payloadFill += n;
    if (this.payloadFill === this.target()!.length) this.filled();
  }

  /** What the payload being assembled is read into: the write's buffer, or a streamed write's piece (null while stalled). */
  private target(): Buffer | null {
    const req = this.pending;
    if (!req) return null;
    return req.data ?? this.piece;
  }

  /** The target is full: the write is emitted, or the piece handed over. Returns what the consumer said. */
  private filled(): unknown {
    const req = this.pending!;
    if (req.data) {
      this.pending = null;
      return this.onRequest(req);
    }
    const piece = this.piece!;
    const backing = this.pieceBacking!;
    const at = this.pieceAt;
    const last = at + piece.length === req.length;
    this.piece = this.pieceBacking = null;
    if (last) this.pending = null;
    const go = this.onPiece(req, piece, backing, at, last);
    if (last) return go;
    this.pieceAt += piece.length;
    if (go === false) this.stalledOn = true;
    else this.nextPiece();
    return true;
  }

  /** Takes the buffer of a streamed write's next piece. */
  private nextPiece(): void {
    const req = this.pending!;
    if (this.piece === null && !this.stalledOn) {
      const n = Math.min(this.pieceSize, req.length - this.pieceAt);
      this.pieceBacking = ioBuffers.acquire(n);
      this.piece = this.pieceBacking.subarray(0, n);
      this.payloadFill = 0;
    }
  }

  /** The connection is gone: a write payload being assembled goes back to the pool. Returns the write whose payload was cut short, if any. */
  discard(): Request | null {
    const req = this.pending;
    this.pending = null;
    this.held = null;
    this.stalledOn = false;
    if (req?.backing) ioBuffers.release(req.backing);
    if (req) req.data = req.backing = null;
    if (this.pieceBacking) ioBuffers.release(this.pieceBacking);
    this.piece = this.pieceBacking = null;
    return req;
  }

  /** True when a frame has started but not finished (a close now truncates it). */
  get midFrame(): boolean {
    return this.headerFill > 0 || this.pending !== null || (this.held !== null && this.held.type === Cmd.NBD_CMD_WRITE && this.held.length > 0);
  }

  /** Parses what it can of `chunk`; returns the bytes used (all of them unless onRequest said stop). */
  feed(chunk: Buffer): number {
    if (this.held) return 0;
    let pos = 0;
    const end = chunk.length;
    while (pos < end) {
      if (this.stalledOn) return pos;
      if (this.pending) {
        if (this.pending.data === null) this.nextPiece(); // unstalled since
        const target = this.target()!;
        const n = Math.min(end - pos, target.length - this.payloadFill);
        chunk.copy(target, this.payloadFill, pos, pos + n);
        this.payloadFill += n;
        pos += n;
        if (this.payloadFill === target.length && this.filled() === false) return pos;
        continue;
      }
      let src: Buffer;
      let at: number;
      if (this.headerFill === 0 && end - pos >= REQUEST_HEADER_SIZE) {
        src = chunk;
        at = pos;
        pos += REQUEST_HEADER_SIZE;
      } else {
        const n = Math.min(end - pos, REQUEST_HEADER_SIZE - this.headerFill);
        chunk.copy(this.header, this.headerFill, pos, pos + n);
        this.headerFill += n;
        pos += n;
        if (this.headerFill < REQUEST_HEADER_SIZE) return pos;
        this.headerFill = 0;
        src = this.header;
        at = 0;
      }
      const magic = src.readUInt32BE(at);
      if (magic !== NBD_REQUEST_MAGIC) throw new ProtocolError(`bad request magic 0x${magic.toString(16).padStart(8, "0")}`);
      const flags = src.readUInt16BE(at + 4);
      const type = src.readUInt16BE(at + 6);
      const cookieHi = src.readUInt32BE(at + 8);
      const cookieLo = src.readUInt32BE(at + 12);
      const offHi = src.readUInt32BE(at + 16);
      const offLo = src.readUInt32BE(at + 20);
      const length = src.readUInt32BE(at + 24);
      const offset = offHi < 0x200000 ? offHi * 0x100000000 + offLo : Infinity;
      if (type === Cmd.NBD_CMD_WRITE && length > this.maxPayload) throw new ProtocolError(`write payload of ${length} bytes exceeds the maximum of ${this.maxPayload}`);
      const wholeWrite = type === Cmd.NBD_CMD_WRITE && length > 0 && end - pos >= length && !this.volatileChunks;
      const req = new Request(type, flags, cookieHi, cookieLo, offset, length, wholeWrite || (type === Cmd.NBD_CMD_WRITE && length === 0) ? chunk.subarray(pos, pos + length) : null);
      if (!this.admit(type, length)) {
        if (wholeWrite) req.data = null; // read again from the stream once admitted
        this.held = req;
        return pos;
      }
      if (wholeWrite) {
        // The payload lies whole in this chunk: a slice, no copy.
        pos += length;
        if (this.onRequest(req) === false) return pos;
        continue;
      }
      // A zero-length write has nothing to wait for (left pending, it was answered only when more bytes came).
      if (this.start(req) === false) return pos;
    }
    return pos;
  }
}

