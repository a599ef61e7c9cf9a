import type { Socket } from "node:net";
import type { Logger } from "pino";
import { NbdError, ProtocolError, errnoOf, errorMessage, wireErrno } from "../errors.js";
import { Cmd, CmdFlag, Errno } from "../protocol/constants.js";
import {
  DATA_CHUNK_PREFIX,
  SIMPLE_HEADER,
  blockStatusChunk,
  errorChunk,
  holeChunk,
  simpleReply,
  writeDataChunkHeader,
  writeSimpleHeader,
  zeroRuns,
} from "../protocol/reply.js";
import { flagError } from "../protocol/command-flags.js";
import { Request, RequestParser } from "../protocol/request-parser.js";
import { checkRequest, type Op } from "../stack/guard.js";
import { InflightTracker, type Extent } from "../stack/layer.js";
import { ioBuffers } from "../util/buffer-pool.js";
import type { Export } from "../stack/export.js";
import { negotiate, type ExportDirectory, type HandshakeTls, type Negotiated } from "./handshake.js";
import { applyOnce } from "./peer-writes.js";
import { readIntoUserBuffers } from "./user-buffer-reader.js";
import type { BudgetWaiter, MemoryBudget } from "./memory-budget.js";
import { metricOpOf, type Metrics, type MetricOp, type OpMetrics } from "../metrics/metrics.js";

/** What stops a connection from taking more requests: see Connection.capReached. */
type Cap = "memory" | "replies" | "requests" | "bytes" | "pieces";

export interface ConnectionLimits {
  /** Requests in flight before the socket is paused. */
  maxInflightRequests: number;
  /** Payload bytes (reads and writes) in flight before the socket is paused. */
  maxInflightBytes: number;
  /** Reply bytes queued in the socket (not yet taken by the kernel) before the socket is paused. */
  maxQueuedReplyBytes: number;
  /** Time a client has to finish the handshake (0: no limit). */
  handshakeTimeoutMs: number;
  /** A connection with nothing in flight for this long is closed (0: never). */
  idleTimeoutMs: number;
}


/** Structured reads at least this long are scanned for zero runs, sent as OFFSET_HOLE. */
const SPARSE_READ_MIN = 64 * 1024;
const SETTLED = Promise.resolve();
/** Size of the buffer sockets read requests into (reused; payloads are copied out of it). */
const READ_CHUNK = 256 * 1024;
/**
 * The one buffer every plain socket reads requests into: what a read leaves unparsed is copied out
 * before the callback returns (see consume), and reads happen one at a time on this thread.
 */
let sharedScratch: Buffer | null = null;
/**
 * The part of it a socket reads into while the memory budget has less than a whole chunk to spare:
 * what a read brings in and the connection cannot take yet is copied and held (and counted), so
 * reads stay small when memory is short.
 */
const SMALL_READ = 16 * 1024;
/**
 * What a request costs the memory budget besides its payload: the request and its promise, the
 * reply buffer and the socket's bookkeeping while the reply waits for a client that reads slowly.
 */
export const REQUEST_COST = 512;
/**
 * What a CACHE or BLOCK_STATUS request may make a layer read to answer it, besides the request:
 * the file port warms the page cache and looks for zero blocks 1 MiB at a time.
 */
export const SCAN_COST = 1024 * 1024;
/**
 * Replies queued on one socket before no further request is read: each costs the socket's
 * bookkeeping (some 200 bytes of heap), however short it is.
 */
const MAX_QUEUED_REPLIES = 2048;
/** Missing payload bytes from which the socket reads straight into the payload buffer. */
const DIRECT_PAYLOAD_MIN = 32 * 1024;
/**
 * Reads and writes longer than this are served in pieces of this size, two at a time: a request of
 * any length (up to 32 MiB) holds two pool buffers of 1 MiB, never one of its own length (see
 * readInPieces, onPiece).
 */
export const PIECE = 1024 * 1024;

/** How long a stopping connection waits for a client that takes none of its replies (see finish). */
const LINGER_MS = 5000;

/** One of a streamed read's two buffers (see Connection.readInPieces). */
class PieceSlot {
  /** The socket has not taken what was last sent from it. */
  busy = false;
  private wake: (() => void) | null = null;
  private orphan = false;
  constructor(readonly buf: Buffer) {}
  /** The socket's callback for what is sent from it. */
  readonly written = (): void => {
    this.busy = false;
    if (this.orphan) ioBuffers.release(this.buf);
    const w = this.wake;
    this.wake = null;
    w?.();
  };
  free(): Promise<void> {
    return new Promise((r) => (this.wake = r));
  }
  /** The read is done with it: back to the pool now, or once the socket has it. */
  letGo(): void {
    this.orphan = true;
    if (!this.busy) ioBuffers.release(this.buf);
  }
}

/** A write streamed in pieces (see Connection.onPiece): what became of them. */
class PieceWrites {
  /** Why the write is not applied (set before its first piece: flags, range, shutdown); its pieces are only read. */
  refused: unknown = null;
  /** The first error of a piece; later pieces are only read. */
  failed: unknown = null;
  /** Pieces inside the stack. */
  running = 0;
  /** The whole payload was read (or the connection is gone). */
  arrived = false;
  /** The payload was cut short (the client's end, or the socket closed): a request never made whole, never answered. */
  cut = false;
  private resolveDone!: () => void;
  /** Resolves once the payload arrived and no piece is inside the stack. */
  readonly done = new Promise<void>((r) => (this.resolveDone = r));
  settle(): void {
    if (this.arrived && this.running === 0) this.resolveDone();
  }
}

/**
 * One client socket: handshake, then the request stream. Requests run concurrently and are
 * answered as they complete (out of order). Replies finished in one event-loop turn go out in
 * one corked write. Once the in-flight caps are reached or the socket's write buffer is full, no
 * further request is started: the parser stops where it is (the unparsed rest of the chunk waits
 * in `backlog`) and the socket is paused, so neither a fast client nor a slow reader grows memory.
 */
export class Connection {
  private exp!: Export;
  private structured = false;
  private allocationContext = 0;
  private depthContext = 0;
  private peer = false;
  /** See ClientSession.peerEpoch. */
  peerEpoch?: number | null;
  private peerSession: string | null = null;
  private opMetrics: Record<MetricOp, OpMetrics> | null = null;
  private parser!: RequestParser;
  private readonly requests = new InflightTracker();
  private inflightBytes = 0;
  private paused = false;
  private pausedBy: Cap | null = null;
  /** Budget bytes taken for the request the parser is reading or about to emit. */
  private nextCharge = 0;
  /** The reservation this connection waits for (the parser holds a request until it is granted). */
  private budgetWaiter: BudgetWaiter | null = null;
  /** Budget bytes held by `backlog`. */
  private backlogCharge = 0;
  /**
   * Replies queued on the socket, oldest first, with what each gives back once written: budget
   * bytes and an optional callback. Socket write callbacks run in write order, so one shared
   * callback (onWritten) pops them.
   */
  private readonly queuedCharges: number[] = [];
  private readonly queuedCallbacks: Array<(() => void) | undefined> = [];
  private queuedHead = 0;
  /** A read whose reply goes out in pieces with nothing between them (see readInPieces), and the replies that wait for it. */
  private holder: Request | null = null;
  /** Resolves when `holder` lets go (another read that goes out contiguously waits for it). */
  private holderGone: Promise<void> | null = null;
  private resolveHolderGone: (() => void) | null = null;
  private readonly deferred: Array<{ buf: Buffer; written: (() => void) | undefined; charge: number }> = [];
  private released = false;
  /** Received bytes not parsed yet because a cap was reached; parsed before the socket is read again. */
  private backlog: Buffer | null = null;
  /** The client's end arrived while `backlog` was waiting: acted on once the backlog is parsed. */
  private eof = false;
  private writeBlocked = false;
  /** Resolved by abort(): a shutdown stops waiting for requests that will never end. */
  private resolveAborted!: () => void;
  private readonly aborted = new Promise<void>((r) => (this.resolveAborted = r));
  private corked = false;
  private stopping = false; // DISC received or server shutting down: execute no more requests
  private finished = false; // our side is closed: incoming bytes are dropped
  /** Whether this connection ended, or its socket closed (layers drop its state, and never run its held requests late). */
  get ended(): boolean {
    return this.finished || this.socket.destroyed;
  }
  private tls = false;
  /** Direct reads: asks again which buffer the next read goes into. */
  private rearm: (() => void) | null = null;
  readonly closed: Promise<void>;
  private resolveClosed!: () => void;
  /**
   * serve --threads: offered every negotiated connection; it either moves the socket to another
   * event loop and returns a promise of the connection's end there, or returns null (served here).
   */
  handOff: ((n: Negotiated) => Promise<void> | null) | null = null;
  /** The connection's end in the event loop it was handed to (see handOff). */
  private elsewhere: Promise<void> | null = null;

  constructor(
    private socket: Socket,
    private readonly exports: ExportDirectory,
    private readonly log: Logger,
    private readonly limits: ConnectionLimits,
    private readonly budget: MemoryBudget,
    private readonly maxPayload: number,
    private readonly directReads = true,
    private readonly metrics: Metrics | null = null,
    private readonly tlsConfig: HandshakeTls | null = null,
  ) {
    socket.setNoDelay(true);
    this.closed = new Promise((resolve) => (this.resolveClosed = resolve));
    this.watch(socket);
  }

  private watch(s: Socket): void {
    s.once("close", () => {
      this.releaseBudget();
      if (this.elsewhere) void this.elsewhere.then(this.resolveClosed);
      else this.resolveClosed();
    });
    s.on("error", (err) => this.log.debug({ err: errorMessage(err) }, "socket error"));
    s.on("drain", this.onDrain);
  }

  /** After NBD_OPT_STARTTLS everything goes through the TLS socket (which owns the TCP one). */
  private readonly onUpgrade = (t: Socket): void => {
    this.socket.off("drain", this.onDrain);
    this.socket = t;
    this.tls = true;
    this.watch(t);
  };

  async start(): Promise<void> {
    let negotiated;
    const limit = this.limits.handshakeTimeoutMs;
    let timedOut = false;
    const timer = limit
      ? setTimeout(() => {
          timedOut = true;
          this.log.warn({ reason: `handshake not finished within ${limit} ms` }, "closing connection: handshake failed");
          this.socket.destroy();
        }, limit)
      : null;
    try {
      negotiated = await negotiate(this.socket, this.exports, this.log, this.tlsConfig, this.onUpgrade, this.budget);
    } catch (err) {
      if (timedOut) return;
      if (err instanceof ProtocolError) this.log.warn({ reason: err.message }, "closing connection: handshake failed");
      else this.log.error({ err }, "closing connection: handshake error");
      this.socket.destroy();
      return;
    } finally {
      if (timer) clearTimeout(timer);
    }
    if (!negotiated) {
      this.socket.end();
      return;
    }
    if (this.handOff) {
      this.elsewhere = this.handOff(negotiated);
      if (this.elsewhere) return;
    }
    this.begin(negotiated);
  }

  /**
   * Starts transmission on a socket whose handshake another event loop made (serve --threads):
   * `exportName` as that loop resolved it, and what the client negotiated. False (and the socket
   * closed) if this loop does not serve that export.
   */
  adopt(exportName: string, structured: boolean, allocationContext: number, depthContext: number): boolean {
    const exp = this.exports.find(exportName);
    if (!exp || exp.name !== exportName) {
      this.log.error({ export: exportName }, "closing connection: handed an export this event loop does not serve");
      this.socket.destroy();
      return false;
    }
    this.begin({ exp, peer: false, peerSession: null, structured, allocationContext, depthContext, rest: Buffer.alloc(0), socket: this.socket, tls: false, ended: false });
    return true;
  }

  /** From the end of the handshake: the request stream. */
  private begin(negotiated: Negotiated): void {
    this.exp = negotiated.exp;
    this.structured = negotiated.structured;
    this.allocationContext = negotiated.allocationContext;
    this.depthContext = negotiated.depthContext;
    this.peer = negotiated.peer;
    this.peerSession = negotiated.peerSession;
    // A link to the owner at one epoch: its requests are served at that epoch only (see ClientSession).
    if (this.peer) this.peerEpoch = this.exp.ownerEpoch?.();
    this.opMetrics = this.metrics?.forExport(this.exp.name) ?? null;
    this.log.info({ export: this.exp.name, portB: this.peer, structured: this.structured, allocation: this.allocationContext !== 0, depth: this.depthContext !== 0, tls: this.tls }, "transmission started");
    // Requests are read into one reused buffer, big write payloads straight into their own
    // buffer; where this Node.js cannot do that, and on TLS sockets (whose plaintext comes out
    // of OpenSSL, not out of the kernel), 'data' events (fresh chunks) are used.
    const scratch = (sharedScratch ??= Buffer.allocUnsafeSlow(READ_CHUNK));
    // Port B's writes are applied once each, whole (see peer-writes.ts): never in pieces.
    const piece = this.peer ? 0 : PIECE;
    const parser = new RequestParser(this.onRequest, this.maxPayload, true, this.admit, piece, this.onPiece);
    const small = scratch.subarray(0, SMALL_READ);
    const budget = this.budget;
    this.rearm = this.directReads && !this.tls
      ? readIntoUserBuffers(
          this.socket,
          () => parser.payloadTarget(DIRECT_PAYLOAD_MIN) ?? (budget.used + READ_CHUNK <= budget.limit ? scratch : small),
          (buf, n) => {
            if (this.finished) return;
            if (buf.buffer === scratch.buffer) this.consume(buf.subarray(0, n), true);
            else {
              parser.payloadFilled(n);
              this.updateFlow();
            }
          },
        )
      : null;
    const direct = this.rearm !== null;
    this.parser = direct ? parser : new RequestParser(this.onRequest, this.maxPayload, false, this.admit, piece, this.onPiece);
    if (!direct) this.socket.on("data", this.onData);
    this.socket.on("end", this.onEnd);
    if (this.limits.idleTimeoutMs > 0) {
      this.socket.setTimeout(this.limits.idleTimeoutMs);
      this.socket.on("timeout", () => {
        if (this.requests.inflight > 0 || this.finished) return;
        this.log.info({ idleMs: this.limits.idleTimeoutMs }, "closing idle connection");
        this.stopping = true;
        this.finish();
      });
    }
    if (negotiated.rest.length) this.consume(negotiated.rest, false);
    if (negotiated.ended) this.onEnd(); // the client's end came during the handshake: 'end' will not come again
  }

  /**
   * Graceful stop: finish the requests in flight, answer any that arrive meanwhile with
   * ESHUTDOWN (as the spec asks), then close.
   */
  async shutdown(): Promise<void> {
    this.stopping = true;
    // A client that hangs up does not end this wait: its requests are still inside the stack. Only
    // abort() (requests that never end) does.
    await Promise.race([this.idle(), this.aborted]);
    this.finish();
    await this.closed;
  }

  /**
   * Ends the connection without waiting for the requests in flight (they go unanswered): for
   * requests that never finish, say on a peer that is gone. Replies already queued still go out.
   */
  abort(): void {
    this.stopping = true;
    this.finish();
    this.resolveAborted();
  }

  private idle(): Promise<void> {
    return this.requests.idle();
  }

  private finish(): void {
    if (this.finished) return;
    this.finished = true;
    this.uncork();
    if (this.socket.destroyed) return;
    this.socket.end();
    this.socket.resume(); // read on to see the client's end, so the socket can close
    setTimeout(() => this.socket.destroy(), LINGER_MS).unref();
  }

  private readonly onData = (chunk: Buffer): void => this.consume(chunk, false);

  /** Parses received bytes as far as the caps allow; `reused`: the buffer is read into again later. */
  private consume(chunk: Buffer, reused: boolean): void {
    if (this.finished) return;
    if (this.backlog) {
      // Not expected (the socket is paused while a backlog waits), but order must hold.
      this.backlog = Buffer.concat([this.backlog, chunk]);
      this.chargeBacklog();
      return;
    }
    let used: number;
    try {
      used = this.parser.feed(chunk);
    } catch (err) {
      this.log.warn({ reason: errorMessage(err) }, "closing connection: protocol violation");
      this.socket.destroy();
      return;
    }
    if (used < chunk.length) {
      this.backlog = reused ? Buffer.from(chunk.subarray(used)) : chunk.subarray(used);
      this.chargeBacklog();
    }
    this.updateFlow();
  }

  /** Bytes already read but not parsed are held: they count (as buffered bytes), whether they fit or not. */
  private chargeBacklog(): void {
    const n = this.backlog ? this.backlog.length : 0;
    if (n > this.backlogCharge) this.budget.buffer(n - this.backlogCharge);
    else this.budget.unbuffer(this.backlogCharge - n);
    this.backlogCharge = n;
  }

  private readonly onEnd = (): void => {
    this.eof = true;
    if (!this.backlog && !this.parser.blocked) this.endOfInput();
  };

  /**
   * No more bytes will come: a write payload being read goes back to the pool, and a streamed
   * write waiting for the rest of its payload ends (it is in flight: the connection waits for it).
   */
  private cutPayload(): void {
    const cut = this.parser?.discard();
    if (!cut?.stream) return;
    const s = cut.stream as PieceWrites;
    s.cut = s.arrived = true;
    s.settle();
  }

  private endOfInput(): void {
    this.eof = false;
    if (this.parser.midFrame) {
      this.log.warn("closing connection: truncated request frame");
      this.cutPayload();
    } else if (!this.stopping) this.log.debug("client closed the connection without NBD_CMD_DISC");
    this.stopping = true;
    void this.idle().then(() => this.finish());
  }

  private readonly onDrain = (): void => {
    this.writeBlocked = false;
    this.updateFlow();
  };

  /** Which cap stops new requests now, if any. */
  private capReached(): Cap | null {
    const l = this.limits;
    // Inside a streamed write's payload only its pieces may stop the parser: the rest of a request
    // already in flight is never held up behind caps that requests after it (or it) hold.
    if (this.parser?.stalled) return "pieces";
    if (this.parser?.streaming) return null;
    if (this.budgetWaiter) return "memory";
    if (this.writeBlocked) return "replies";
    if (this.requests.inflight >= l.maxInflightRequests) return "requests";
    if (this.inflightBytes >= l.maxInflightBytes) return "bytes";
    return null;
  }

  /** Parses the backlog once the caps allow, and pauses or resumes the socket. */
  private updateFlow(): void {
    if (this.finished) return;
    const cap = this.capReached();
    if (this.backlog && !cap) {
      const rest = this.backlog;
      this.backlog = null;
      this.chargeBacklog();
      this.consume(rest, false); // comes back here
      return;
    }
    if (this.eof && !this.backlog && !this.parser.blocked) this.endOfInput();
    if (cap !== null) {
      if (!this.paused) {
        this.paused = true;
        this.socket.pause();
      }
      // Logged again when another cap takes over (say, replies pile up while requests are capped).
      if (cap !== this.pausedBy) this.log.trace({ cap, inflight: this.requests.inflight, inflightBytes: this.inflightBytes, queuedReplyBytes: this.socket.writableLength, budgetUsed: this.budget.used }, "pausing the socket");
      this.pausedBy = cap;
    } else if (this.paused) {
      this.paused = false;
      this.pausedBy = null;
      this.rearm?.(); // the budget may have changed while paused
      this.socket.resume();
      if (this.log.isLevelEnabled("trace")) this.log.trace({ inflight: this.requests.inflight, inflightBytes: this.inflightBytes }, "resuming the socket");
    }
  }

  /**
   * Queues a reply; `written`, if given, runs once the socket is done with `buf` (or failed), and
   * `charge` budget bytes are given back then.
   */
  private send(buf: Buffer, written?: () => void, charge = 0, holder: Request | null = null): void {
    if (this.holder !== holder) {
      // Another request's reply is going out in pieces that nothing may come between: after it.
      this.deferred.push({ buf, written, charge });
      return;
    }
    const s = this.socket;
    if (s.destroyed || s.writableEnded || this.released) {
      written?.();
      this.budget.give(charge);
      return;
    }
    // Batch replies finished in one event-loop turn into one write, unless this is the only
    // request in flight: then nothing else can join it and waiting for the batch only adds latency.
    if (!this.corked && this.requests.inflight > 1) {
      this.corked = true;
      s.cork();
      setImmediate(this.uncork);
    }
    this.queuedCharges.push(charge);
    this.queuedCallbacks.push(written);
    s.write(buf, this.onWritten);
    if (s.writableLength > this.limits.maxQueuedReplyBytes || this.queuedCharges.length - this.queuedHead > MAX_QUEUED_REPLIES) this.writeBlocked = true;
  }

  /** The socket is done with the oldest queued reply. */
  private readonly onWritten = (): void => {
    const i = this.queuedHead;
    if (i >= this.queuedCharges.length) return; // given back already (the socket closed)
    const charge = this.queuedCharges[i]!;
    const written = this.queuedCallbacks[i];
    if (++this.queuedHead === this.queuedCharges.length) {
      this.queuedCharges.length = 0;
      this.queuedCallbacks.length = 0;
      this.queuedHead = 0;
    } else this.queuedCallbacks[i] = undefined;
    // The buffer goes back to the pool first: giving the bytes back may let a waiting request in
    // at once (synchronously), and it should take this buffer rather than make a new one.
    written?.();
    if (charge) this.budget.give(charge);
    // 'drain' comes only once everything is written; a client that reads again is served sooner.
    if (this.writeBlocked && this.queuedCharges.length - this.queuedHead <= MAX_QUEUED_REPLIES / 2 && this.socket.writableLength <= this.limits.maxQueuedReplyBytes / 2) {
      this.writeBlocked = false;
      this.updateFlow();
    }
  };

  /** Sends the last reply of `req`, which gives back the request's budget bytes once written. */
  private finalSend(req: Request, buf: Buffer, written?: () => void, holder: Request | null = null): void {
    // Replies longer than the request paid for (long block status lists, error messages) count too.
    const excess = buf.length - req.charge;
    if (excess > 0) {
      this.budget.force(excess);
      req.charge += excess;
    }
    const charge = req.charge;
    req.charge = 0;
    this.send(buf, written, charge, holder);
  }

  /**
   * Lets a request in once its payload fits the process-wide budget; otherwise the parser holds it,
   * the socket is paused, and it comes in when the budget grants the bytes.
   */
  private readonly admit = (type: number, length: number): boolean => {
    const bytes = REQUEST_COST + payloadCost(type, length, this.maxPayload, this.parser.streams(length));
    if (this.budget.take(bytes)) {
      this.nextCharge = bytes;
      return true;
    }
    this.budgetWaiter = this.budget.wait(bytes, () =>
      // Not on the stack of whoever gave the bytes back. (A settled promise rather than
      // queueMicrotask, which makes an AsyncResource for every call.)
      void SETTLED.then(() => {
        this.budgetWaiter = null;
        if (this.released) {
          this.budget.give(bytes);
          return;
        }
        this.nextCharge = bytes;
        this.parser.resume();
        this.updateFlow();
      }),
    );
    return false;
  };

  /** The socket closed: everything this connection holds goes back, but what requests in flight hold (they give it back as they end). */
  private releaseBudget(): void {
    if (this.released) return;
    this.released = true;
    if (this.budgetWaiter) this.budget.cancel(this.budgetWaiter);
    this.budgetWaiter = null;
    this.cutPayload();
    this.budget.give(this.nextCharge);
    this.nextCharge = 0;
    this.backlog = null;
    this.chargeBacklog();
    const charges = this.queuedCharges.splice(this.queuedHead);
    const callbacks = this.queuedCallbacks.splice(this.queuedHead);
    this.queuedCharges.length = this.queuedCallbacks.length = this.queuedHead = 0;
    for (const w of callbacks) w?.();
    for (const c of charges) this.budget.give(c);
  }

  private readonly uncork = (): void => {
    if (!this.corked) return;
    this.corked = false;
    this.socket.uncork();
  };

  /** Starts one request; returns false when a cap is reached, so the parser stops after it. */
  private readonly onRequest = (req: Request): boolean => {
    req.charge = this.nextCharge;
    this.nextCharge = 0;
    // A write streamed in pieces: its payload is still to come, so whatever the answer it is given
    // once that is read; whether it may be applied is decided now, before its first piece.
    if (req.type === Cmd.NBD_CMD_WRITE && req.data === null) {
      const s = new PieceWrites();
      req.stream = s;
      const wrongFlags = flagError(req.type, req.flags, this.structured);
      if (this.stopping) s.refused = new NbdError("ESHUTDOWN", "the connection is shutting down");
      else if (wrongFlags) s.refused = new NbdError("EINVAL", wrongFlags);
      else s.refused = checkRequest("pwrite", req.offset, req.length, req, this.exp.size(), this.exp.capabilities());
    } else if (this.stopping) {
      if (req.type !== Cmd.NBD_CMD_DISC) this.replyError(req, new NbdError("ESHUTDOWN", "the connection is shutting down"));
      else this.budget.give(req.charge);
      if (req.backing) ioBuffers.release(req.backing);
      return true;
    }
    if (req.type === Cmd.NBD_CMD_DISC) {
      this.budget.give(req.charge);
      this.log.debug("NBD_CMD_DISC");
      this.stopping = true;
      void this.idle().then(() => this.finish());
      return true;
    }
    const bytes = req.type === Cmd.NBD_CMD_READ || req.type === Cmd.NBD_CMD_WRITE ? req.length : 0;
    if (this.peer) req.peer = true;
    req.session = this;
    this.requests.enter();
    this.inflightBytes += bytes;
    void this.run(req, bytes);
    return this.capReached() === null;
  };

  /** Executes one request, then counts it (metrics) and lets the next ones in. */
  private async run(req: Request, bytes: number): Promise<void> {
    const m = this.opMetrics ? this.opMetrics[metricOpOf(req.type)] : null;
    const t0 = m ? performance.now() : 0;
    try {
      const failed = await this.execute(req);
      if (m) m.record(failed, bytes, (performance.now() - t0) / 1000);
    } catch (err) {
      this.log.error({ err }, "internal error while answering a request");
    } finally {
      // Given back here only if no reply took it (an internal error), or the write was refused
      // before the stack saw it (flags on the wrong command).
      if (req.backing) ioBuffers.release(req.backing);
      req.data = req.backing = null;
      this.budget.give(req.charge);
      req.charge = 0;
      this.done(bytes);
    }
  }

  private done(bytes: number): void {
    this.requests.leave();
    this.inflightBytes -= bytes;
    this.updateFlow();
  }

  /** Answers one request; resolves true if the answer was an error. */
  private async execute(req: Request): Promise<boolean> {
    if (req.stream) return this.writeInPieces(req, req.stream as PieceWrites);
    const wrongFlags = flagError(req.type, req.flags, this.structured);
    if (wrongFlags) return this.replyError(req, new NbdError("EINVAL", wrongFlags));
    const layer = this.exp.layer;
    try {
      switch (req.type) {
        case Cmd.NBD_CMD_READ:
          return await this.read(req);
        case Cmd.NBD_CMD_WRITE:
          try {
            if (this.reject(req, "pwrite")) return true;
            await this.once(req, () => layer.pwrite(req.data!, req.offset, req));
          } finally {
            if (req.backing) ioBuffers.release(req.backing);
            req.data = req.backing = null;
            this.payloadDone(req); // its reply is short
          }
          break;
        case Cmd.NBD_CMD_FLUSH:
          if (this.reject(req, "flush")) return true;
          await layer.flush(req);
          break;
        case Cmd.NBD_CMD_TRIM:
          if (this.reject(req, "trim")) return true;
          await this.once(req, () => layer.trim(req.length, req.offset, req));
          break;
        case Cmd.NBD_CMD_CACHE:
          if (this.reject(req, "cache")) return true;
          try {
            await layer.cache(req.length, req.offset, req);
          } finally {
            this.payloadDone(req);
          }
          break;
        case Cmd.NBD_CMD_WRITE_ZEROES:
          if (this.reject(req, "zero")) return true;
          await this.once(req, () => layer.zero(req.length, req.offset, req));
          break;
        case Cmd.NBD_CMD_BLOCK_STATUS:
          return await this.blockStatus(req);
        default:
          return this.replyError(req, new NbdError("EINVAL", `unknown command ${req.type}`));
      }
    } catch (err) {
      return this.replyError(req, err);
    }
    this.finalSend(req, simpleReply(0, req.cookieHi, req.cookieLo));
    return false;
  }

  /**
   * A piece of a streamed write's payload arrived (the parser's onPiece): it goes down the stack at
   * once, beside the one before it. Returns false to stop the parser until a piece is done, so a
   * write holds at most two pieces; for the last piece, whether the parser may go on (the caps).
   */
  private readonly onPiece = (req: Request, piece: Buffer, backing: Buffer, at: number, last: boolean): boolean => {
    const s = req.stream as PieceWrites;
    if (s.refused === null && s.failed === null && !s.cut && !this.ended) {
      s.running++;
      void this.writePiece(req, s, piece, backing, at);
    } else ioBuffers.release(backing);
    if (!last) return s.running < 2;
    s.arrived = true;
    s.settle();
    return this.capReached() === null;
  };

  private async writePiece(req: Request, s: PieceWrites, piece: Buffer, backing: Buffer, at: number): Promise<void> {
    try {
      await this.exp.layer.pwrite(piece, req.offset + at, req);
    } catch (err) {
      s.failed ??= err;
    } finally {
      ioBuffers.release(backing);
      s.running--;
      s.settle();
      if (this.parser.stalled) {
        this.parser.unstall();
        this.updateFlow();
      }
    }
  }

  /** Answers a streamed write once its payload is read and its pieces are done. */
  private async writeInPieces(req: Request, s: PieceWrites): Promise<boolean> {
    try {
      await s.done;
    } finally {
      this.payloadDone(req);
    }
    // Like a crash in the middle of a write: its first pieces may be applied, and no reply says so.
    if (s.cut) return true;
    if (s.refused !== null || s.failed !== null) return this.replyError(req, s.refused ?? s.failed);
    this.finalSend(req, simpleReply(0, req.cookieHi, req.cookieLo));
    return false;
  }

  /** The layer is done with what the request reserved besides itself (a write's payload, a scan): given back now. */
  private payloadDone(req: Request): void {
    const extra = req.charge - REQUEST_COST;
    if (extra > 0) {
      this.budget.give(extra);
      req.charge -= extra;
    }
  }

  /** A write of a port B session is applied once however often it is sent (see peer-writes.ts). */
  private once(req: Request, run: () => Promise<void>): Promise<void> {
    return this.peerSession && req.cookieHi !== 0 ? applyOnce(this.peerSession, req.cookieHi, run) : run();
  }

  /** Runs the guard; answers the request with its error and returns true if it may not go down. */
  private reject(req: Request, op: Op): boolean {
    const err = checkRequest(op, req.offset, req.length, req, this.exp.size(), this.exp.capabilities());
    if (!err) return false;
    this.replyError(req, err);
    return true;
  }

  private replyError(req: Request, err: unknown): true {
    const errno = wireErrno(err);
    if (errno === Errno.EIO || !(err instanceof NbdError)) this.log.debug({ err: errorMessage(err), type: req.type, offset: req.offset }, "request failed");
    else this.log.trace({ errno: errnoOf(err), reason: err.message }, "request refused");
    if (this.structured) {
      const offset = err instanceof NbdError && req.type === Cmd.NBD_CMD_READ ? err.offset : undefined;
      this.finalSend(req, errorChunk(req.cookieHi, req.cookieLo, errno, errorMessage(err), offset));
    } else {
      this.finalSend(req, simpleReply(errno, req.cookieHi, req.cookieLo));
    }
    return true;
  }

  private async read(req: Request): Promise<boolean> {
    if (this.reject(req, "pread")) return true;
    if (req.length > PIECE) return this.readInPieces(req);
    const prefix = this.structured ? DATA_CHUNK_PREFIX : SIMPLE_HEADER;
    const size = prefix + req.length;
    const backing = ioBuffers.pools(size) ? ioBuffers.acquire(size) : null;
    const buf = backing ? backing.subarray(0, size) : Buffer.allocUnsafe(size);
    const release = backing ? () => ioBuffers.release(backing) : undefined;
    const data = buf.subarray(prefix);
    try {
      await this.exp.layer.pread(data, req.offset, req);
    } catch (err) {
      release?.();
      return this.replyError(req, err);
    }
    if (!this.structured) {
      writeSimpleHeader(buf, 0, 0, req.cookieHi, req.cookieLo);
      this.finalSend(req, buf, release);
      return false;
    }
    if (req.length >= SPARSE_READ_MIN && !(req.flags & CmdFlag.NBD_CMD_FLAG_DF) && this.sendSparse(req, data, 0, true, release)) return false;
    writeDataChunkHeader(buf, 0, true, req.cookieHi, req.cookieLo, req.offset, req.length);
    this.finalSend(req, buf, release);
    return false;
  }

  /**
   * Sends the part of a read at `at` (its `data`) as OFFSET_DATA and OFFSET_HOLE chunks if it holds
   * zero runs; false if it holds none. Its last chunk carries `written`, and if the part is the
   * read's `last`, the done flag and the request's budget bytes (they cover every chunk).
   */
  private sendSparse(req: Request, data: Buffer, at: number, last: boolean, written?: () => void): boolean {
    const runs = zeroRuns(data); // alternating [start, end) of zero runs
    if (runs.length === 0) return false;
    const { cookieHi: hi, cookieLo: lo } = req;
    const offset = req.offset + at;
    let pos = 0;
    const end = (b: Buffer) => (last ? this.finalSend(req, b, written) : this.send(b, written));
    const sendData = (from: number, to: number, final: boolean) => {
      const h = Buffer.allocUnsafe(DATA_CHUNK_PREFIX);
      writeDataChunkHeader(h, 0, final && last, hi, lo, offset + from, to - from);
      this.send(h);
      if (final) end(data.subarray(from, to));
      else this.send(data.subarray(from, to));
    };
    for (let i = 0; i < runs.length; i += 2) {
      const zs = runs[i]!;
      const ze = runs[i + 1]!;
      if (zs > pos) sendData(pos, zs, false);
      const final = ze === data.length;
      const hole = holeChunk(hi, lo, offset + zs, ze - zs, final && last);
      if (final) end(hole);
      else this.send(hole);
      pos = ze;
    }
    if (pos < data.length) sendData(pos, data.length, true);
    return true;
  }

  /**
   * A read longer than PIECE, read and sent one piece at a time through two pool buffers (the next
   * piece is read while the last one goes out). With structured replies each piece is its own
   * chunk(s), and an error ends the reply with an error chunk. A simple reply, or a structured one
   * with DF (one chunk asked for), is one header and then every byte: nothing may come between the
   * pieces, so other replies wait (`holder`), and a piece failing after the header went out can
   * only close the connection (the spec's rule for simple replies).
   */
  private async readInPieces(req: Request): Promise<boolean> {
    const contiguous = !this.structured || (req.flags & CmdFlag.NBD_CMD_FLAG_DF) !== 0;
    const prefix = this.structured ? DATA_CHUNK_PREFIX : SIMPLE_HEADER;
    const { cookieHi: hi, cookieLo: lo } = req;
    const slots: PieceSlot[] = [];
    let started = false;
    try {
      for (let at = 0, k = 0; at < req.length; at += PIECE, k++) {
        const n = Math.min(PIECE, req.length - at);
        const last = at + n === req.length;
        const slot = (slots[k & 1] ??= new PieceSlot(ioBuffers.acquire(PIECE + prefix)));
        if (slot.busy && !(await this.taken(slot))) return true;
        if (this.ended) return true; // nobody to answer: read no further
        const buf = slot.buf;
        const data = buf.subarray(prefix, prefix + n);
        try {
          await this.exp.layer.pread(data, req.offset + at, req);
        } catch (err) {
          if (!contiguous || !started) return this.replyError(req, err);
          this.log.warn({ err: errorMessage(err), offset: req.offset + at }, "closing connection: a read failed after its reply's header went out");
          this.socket.destroy();
          return true;
        }
        slot.busy = true;
        if (!contiguous) {
          if (n >= SPARSE_READ_MIN && this.sendSparse(req, data, at, last, slot.written)) continue;
          writeDataChunkHeader(buf, 0, last, hi, lo, req.offset + at, n);
          const chunk = buf.subarray(0, prefix + n);
          if (last) this.finalSend(req, chunk, slot.written);
          else this.send(chunk, slot.written);
          continue;
        }
        let out = data;
        if (!started) {
          while (this.holder) await this.holderGone;
          if (this.ended) {
            slot.busy = false;
            return true;
          }
          if (this.structured) writeDataChunkHeader(buf, 0, true, hi, lo, req.offset, req.length);
          else writeSimpleHeader(buf, 0, 0, hi, lo);
          out = buf.subarray(0, prefix + n);
          started = true;
          this.holder = req;
          this.holderGone = new Promise<void>((r) => (this.resolveHolderGone = r));
        }
        if (last) this.finalSend(req, out, slot.written, req);
        else this.send(out, slot.written, 0, req);
      }
      return false;
    } finally {
      if (this.holder === req) {
        this.holder = null;
        for (const d of this.deferred.splice(0)) this.send(d.buf, d.written, d.charge);
        this.resolveHolderGone!();
      }
      // The request ends now; buffers still in the socket go back to the pool once it has them.
      for (const slot of slots) slot.letGo();
    }
  }

  /**
   * Waits for the socket to take a piece's buffer. A client that takes nothing while the connection
   * stops (its end came, NBD_CMD_DISC, a shutdown) is given LINGER_MS, as finish() gives queued
   * replies; then the connection is closed and false returned.
   */
  private async taken(slot: PieceSlot): Promise<boolean> {
    let waited = 0;
    while (slot.busy) {
      let timer!: NodeJS.Timeout;
      await Promise.race([slot.free(), new Promise<void>((r) => (timer = setTimeout(r, 1000)))]);
      clearTimeout(timer);
      if (!slot.busy) break;
      if (!this.stopping) waited = 0;
      else if ((waited += 1000) >= LINGER_MS) {
        this.log.warn({ lingerMs: LINGER_MS }, "closing connection: the client takes no reply while the connection stops");
        this.socket.destroy();
        return false;
      }
    }
    return true;
  }


  private async blockStatus(req: Request): Promise<boolean> {
    if (!this.structured || (this.allocationContext === 0 && this.depthContext === 0))
      return this.replyError(req, new NbdError("EINVAL", "block status needs structured replies and a selected meta context"));
    if (this.reject(req, "extents")) return true;
    // One chunk per selected context, each with its own extents (their lengths may differ).
    const chunks: Array<[number, Extent[]]> = [];
    try {
      if (this.allocationContext) chunks.push([this.allocationContext, await this.exp.layer.extents(req.length, req.offset, req)]);
      if (this.depthContext) chunks.push([this.depthContext, await this.exp.layer.extents(req.length, req.offset, req, "depth")]);
    } catch (err) {
      return this.replyError(req, err);
    } finally {
      this.payloadDone(req);
    }
    const one = (req.flags & CmdFlag.NBD_CMD_FLAG_REQ_ONE) !== 0;
    chunks.forEach(([id, extents], i) => {
      const chunk = blockStatusChunk(req.cookieHi, req.cookieLo, id, one ? extents.slice(0, 1) : extents, i === chunks.length - 1);
      if (i === chunks.length - 1) this.finalSend(req, chunk);
      else this.send(chunk);
    });
    return false;
  }
}

/**
 * What a request reserves besides REQUEST_COST: the buffer of its payload (its pool class, not just
 * its length), or what a layer may read to answer it.
 */
function payloadCost(type: number, length: number, maxPayload: number, streamedWrite: boolean): number {
  switch (type) {
    case Cmd.NBD_CMD_WRITE:
      return streamedWrite ? 2 * ioBuffers.footprint(PIECE) : ioBuffers.footprint(length);
    case Cmd.NBD_CMD_READ:
      // With its reply header; longer ones are refused before anything is allocated.
      if (length > maxPayload) return 0;
      return length > PIECE ? 2 * ioBuffers.footprint(PIECE + DATA_CHUNK_PREFIX) : ioBuffers.footprint(length + DATA_CHUNK_PREFIX);
    case Cmd.NBD_CMD_CACHE:
    case Cmd.NBD_CMD_BLOCK_STATUS:
      return ioBuffers.footprint(Math.min(length, SCAN_COST));
    default:
      return 0;
  }
}
