import net from "node:net";
import type tls from "node:tls";
import { NbdError, ProtocolError } from "../errors.js";
import {
  BASE_ALLOCATION,
  ClientFlag,
  Cmd,
  Errno,
  type ErrnoName,
  HandshakeFlag,
  Info,
  NBD_IHAVEOPT,
  NBD_MAGIC,
  NBD_OPT_REPLY_MAGIC,
  NBD_REPLY_FLAG_DONE,
  NBD_REQUEST_MAGIC,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
  Opt,
  Rep,
  ReplyType,
} from "../protocol/constants.js";
import type { Extent } from "../stack/layer.js";

export type NbdAddress = { host: string; port: number } | { path: string };

export interface ConnectOptions {
  exportName?: string;
  structured?: boolean;
  /** Select base:allocation (needs structured replies). */
  allocation?: boolean;
  /**
   * Upgrade with NBD_OPT_STARTTLS before any other option, with these options of tls.connect
   * (the socket and host are filled in). A server that refuses is an error, never a plain session.
   */
  tls?: Omit<tls.ConnectionOptions, "socket">;
  /** The connection and handshake must be done within this time (default: no limit): a stopped server accepts TCP but answers nothing. */
  timeoutMs?: number;
}

/** Size of the buffer a plain connection's socket reads into. */
const READ_BUFFER = 1024 * 1024;
/**
 * Requests of one turn are packed into chunks of this size (see NbdClient.out). Below glibc's mmap
 * threshold as `nbdstack` sets it (MALLOC_MMAP_THRESHOLD_=131072, its shebang): a bigger chunk was
 * an mmap, 64 page faults and an munmap (by a GC thread: a TLB shootdown) every ~60 requests, and
 * doubled a forwarding node's CPU per 4 KiB write (bench:cluster, proxied).
 */
const OUT_CHUNK = 96 * 1024;
/** Write payloads up to this size are copied next to their header; bigger ones are sent as they are. */
const SMALL_PAYLOAD = 16 * 1024;

const ERRNO_NAME = new Map<number, ErrnoName>(Object.entries(Errno).map(([k, v]) => [v, k as ErrnoName]));

interface Pending {
  type: number;
  offset: number;
  length: number;
  data: Buffer | null;
  extents: Extent[] | null;
  error: NbdError | null;
  resolve: (p: Pending) => void;
  reject: (e: Error) => void;
}

/** Pulls exact byte counts out of a socket (handshake), then hands over to the reply parser. */
class Bytes {
  buf: Buffer = Buffer.alloc(0);
  waiter: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void } | null = null;
  err: Error | null = null;
  push(c: Buffer): void {
    this.buf = this.buf.length ? Buffer.concat([this.buf, c]) : c;
    this.wake();
  }
  fail(e: Error): void {
    this.err = e;
    this.waiter?.reject(e);
    this.waiter = null;
  }
  read(n: number): Promise<Buffer> {
    if (this.err) return Promise.reject(this.err);
    return new Promise((resolve, reject) => {
      this.waiter = { n, resolve, reject };
      this.wake();
    });
  }
  private wake(): void {
    const w = this.waiter;
    if (!w || this.buf.length < w.n) return;
    this.waiter = null;
    const out = this.buf.subarray(0, w.n);
    this.buf = this.buf.subarray(w.n);
    w.resolve(out);
  }
}

/**
 * A small NBD client: fixed newstyle, NBD_OPT_GO, structured replies, base:allocation,
 * many requests in flight. Used by tests and tools; errors come back as NbdError with the errno name.
 */
export class NbdClient {
  size = 0;
  flags = 0;
  /** The export's description, when the server sent one (NBD_INFO_DESCRIPTION). */
  description: string | undefined;
  structured = false;
  allocationContext = 0;
  blockSize = { minimum: 1, preferred: 4096, maximum: 32 * 1024 * 1024 };
  private pending = new Map<number, Pending>();
  private nextCookie = 1;
  private rx: Buffer = Buffer.alloc(0);
  /** Received bytes not yet parsed, kept as pieces until the frame they start is complete. */
  private parts: Buffer[] = [];
  private partsLen = 0;
  /** Bytes the frame at the start of `parts` needs before it can be parsed. */
  private need = 0;
  /** Input buffers are reused after onData returns (onread): copy what is kept. */
  private volatileInput = false;
  /** Where the rest of a read payload goes as it arrives. */
  private sink: { buf: Buffer; at: number; left: number; done: () => void } | null = null;
  private closedErr: Error | null = null;
  /**
   * Requests made in one event-loop turn leave in one write: their headers, and payloads up to
   * SMALL_PAYLOAD bytes, are packed into `out` (from `outFrom` to `outAt`); bigger payloads are
   * queued beside it as they are. `out` is never written into again below `outAt`: the socket may
   * still hold what was handed to it.
   */
  private out: Buffer = Buffer.allocUnsafe(OUT_CHUNK);
  private outFrom = 0;
  private outAt = 0;
  private outQueue: Buffer[] = [];
  private sendScheduled = false;
  private readonly sendBatch = (): void => {
    this.sendScheduled = false;
    this.cutOut();
    const q = this.outQueue;
    this.outQueue = [];
    if (q.length === 0 || this.socket.destroyed) return;
    if (q.length === 1) {
      this.socket.write(q[0]!);
      return;
    }
    this.socket.cork();
    for (const b of q) this.socket.write(b);
    this.socket.uncork();
  };
  readonly closed: Promise<void>;

  private constructor(public socket: net.Socket) {
    socket.setNoDelay(true);
    this.closed = new Promise((r) => socket.once("close", () => r()));
  }

  static async connect(addr: NbdAddress, opts: ConnectOptions = {}): Promise<NbdClient> {
    // Without TLS the kernel reads straight into one reused 1 MiB buffer (net.connect's onread):
    // a third of the cost of 'data' events with their fresh 64 KiB chunks on big replies.
    // Whatever the parser keeps beyond the callback it copies.
    let deliver: (d: Buffer) => void = () => undefined;
    const onread: net.OnReadOpts | undefined = opts.tls
      ? undefined
      : {
          buffer: Buffer.allocUnsafe(READ_BUFFER),
          callback: (n: number, buf: Uint8Array) => {
            deliver(Buffer.from(buf.buffer, buf.byteOffset, n));
            return true;
          },
        };
    const socket = "path" in addr ? net.connect({ path: addr.path, onread }) : net.connect({ port: addr.port, host: addr.host, onread });
    const timer = opts.timeoutMs ? setTimeout(() => socket.destroy(new ProtocolError(`no NBD handshake within ${opts.timeoutMs} ms`)), opts.timeoutMs) : null;
    try {
      return await NbdClient.handshakeOn(socket, addr, opts, onread, (d) => (deliver = d));
    } finally {
      if (timer) clearTimeout(timer);
    }
  }

  private static async handshakeOn(socket: net.Socket, addr: NbdAddress, opts: ConnectOptions, onread: net.OnReadOpts | undefined, setDeliver: (d: (b: Buffer) => void) => void): Promise<NbdClient> {
    await new Promise<void>((resolve, reject) => {
      socket.once("connect", resolve);
      socket.once("error", reject);
    });
    const c = new NbdClient(socket);
    c.volatileInput = !!onread;
    const bytes = new Bytes();
    const onData = (d: Buffer) => bytes.push(onread ? Buffer.from(d) : d);
    setDeliver(onData);
    const onClose = () => bytes.fail(new ProtocolError("server closed the connection during the handshake"));
    const onError = (e: Error) => bytes.fail(new ProtocolError(`${c.socket === socket ? "" : "TLS: "}${e.message.trim()}`));
    const attach = (s: net.Socket) => {
      s.on("data", onData);
      s.on("close", onClose);
      s.on("error", onError);
    };
    const detach = (s: net.Socket) => {
      s.off("data", onData);
      s.off("close", onClose);
      s.off("error", onError);
    };
    attach(socket);
    const upgrade = async (): Promise<void> => {
      const { connect } = await import("node:tls"); // loaded only where TLS is used
      if (bytes.buf.length) throw new ProtocolError("server sent bytes after its NBD_OPT_STARTTLS reply");
      detach(socket);
      const host = "host" in addr ? addr.host : undefined;
      const t = connect({ ...opts.tls, socket, host: opts.tls?.host ?? host });
      c.socket = t;
      attach(t);
      await new Promise<void>((resolve, reject) => {
        t.once("secureConnect", resolve);
        t.once("error", reject);
        t.once("close", () => reject(new ProtocolError("server closed the connection during the TLS handshake")));
      });
    };
    try {
      await c.handshake(bytes, opts, upgrade);
    } catch (e) {
      c.socket.destroy();
      throw e;
    } finally {
      detach(c.socket);
    }
    const early = bytes.buf; // bytes that came after the handshake (none, in practice: nothing was asked yet)
    if (onread) setDeliver((d) => c.onData(d));
    else c.socket.on("data", (d: Buffer) => c.onData(d));
    c.socket.on("error", () => undefined);
    c.socket.on("close", () => c.failAll(new NbdError("ESHUTDOWN", "connection closed")));
    if (early.length) {
      const v = c.volatileInput;
      c.volatileInput = false; // `early` is ours to keep
      c.onData(early);
      c.volatileInput = v;
    }
    return c;
  }

  private async handshake(bytes: Bytes, opts: ConnectOptions, upgrade: () => Promise<void>): Promise<void> {
    const g = await bytes.read(18);
    if (g.readBigUInt64BE(0) !== NBD_MAGIC || g.readBigUInt64BE(8) !== NBD_IHAVEOPT) throw new ProtocolError("not a fixed-newstyle NBD server");
    const hflags = g.readUInt16BE(16);
    const noZeroes = (hflags & HandshakeFlag.NBD_FLAG_NO_ZEROES) !== 0;
    const cf = Buffer.alloc(4);
    cf.writeUInt32BE(ClientFlag.NBD_FLAG_C_FIXED_NEWSTYLE | (noZeroes ? ClientFlag.NBD_FLAG_C_NO_ZEROES : 0));
    this.socket.write(cf);

    const option = async (opt: number, data: Buffer, onReply: (type: number, d: Buffer) => void): Promise<number> => {
      const h = Buffer.alloc(16);
      h.writeBigUInt64BE(NBD_IHAVEOPT, 0);
      h.writeUInt32BE(opt, 8);
      h.writeUInt32BE(data.length, 12);
      this.socket.write(Buffer.concat([h, data]));
      for (;;) {
        const r = await bytes.read(20);
        if (r.readBigUInt64BE(0) !== NBD_OPT_REPLY_MAGIC) throw new ProtocolError("bad option reply magic");
        const type = r.readUInt32BE(12);
        const len = r.readUInt32BE(16);
        const d = len ? Buffer.from(await bytes.read(len)) : Buffer.alloc(0);
        if (type === Rep.NBD_REP_ACK || type >= 0x80000000) return type;
        onReply(type, d);
      }
    };

    if (opts.tls) {
      const r = await option(Opt.NBD_OPT_STARTTLS, Buffer.alloc(0), () => undefined);
      if (r !== Rep.NBD_REP_ACK) throw new ProtocolError(`server refused NBD_OPT_STARTTLS (reply 0x${r.toString(16)}): is TLS enabled on it?`);
      await upgrade();
    }
    const name = Buffer.from(opts.exportName ?? "", "utf8");
    if (opts.structured ?? true) {
      this.structured = (await option(Opt.NBD_OPT_STRUCTURED_REPLY, Buffer.alloc(0), () => undefined)) === Rep.NBD_REP_ACK;
    }
    if (this.structured && (opts.allocation ?? true)) {
      const q = Buffer.from(BASE_ALLOCATION);
      const d = Buffer.alloc(4 + name.length + 4 + 4 + q.length);
      d.writeUInt32BE(name.length, 0);
      name.copy(d, 4);
      d.writeUInt32BE(1, 4 + name.length);
      d.writeUInt32BE(q.length, 8 + name.length);
      q.copy(d, 12 + name.length);
      await option(Opt.NBD_OPT_SET_META_CONTEXT, d, (type, r) => {
        if (type === Rep.NBD_REP_META_CONTEXT && r.toString("utf8", 4) === BASE_ALLOCATION) this.allocationContext = r.readUInt32BE(0);
      });
    }
    const go = Buffer.alloc(4 + name.length + 2 + 4);
    go.writeUInt32BE(name.length, 0);
    name.copy(go, 4);
    go.writeUInt16BE(2, 4 + name.length);
    go.writeUInt16BE(Info.NBD_INFO_BLOCK_SIZE, 6 + name.length);
    go.writeUInt16BE(Info.NBD_INFO_DESCRIPTION, 8 + name.length);
    const res = await option(Opt.NBD_OPT_GO, go, (type, r) => {
      if (type !== Rep.NBD_REP_INFO) return;
      const info = r.readUInt16BE(0);
      if (info === Info.NBD_INFO_EXPORT) {
        this.size = Number(r.readBigUInt64BE(2));
        this.flags = r.readUInt16BE(10);
      } else if (info === Info.NBD_INFO_BLOCK_SIZE) {
        this.blockSize = { minimum: r.readUInt32BE(2), preferred: r.readUInt32BE(6), maximum: r.readUInt32BE(10) };
      } else if (info === Info.NBD_INFO_DESCRIPTION) {
        this.description = r.toString("utf8", 2);
      }
    });
    if (res !== Rep.NBD_REP_ACK) throw new NbdError("EINVAL", `server refused NBD_OPT_GO for "${opts.exportName ?? ""}" (reply 0x${res.toString(16)})`);
  }

  /**
   * Sends one request and resolves with its outcome (rejects with NbdError on an error reply).
   * `tag` goes into the cookie's high word (a port B's sequence number; 0 otherwise).
   */
  request(type: number, flags: number, offset: number, length: number, payload?: Buffer, into?: Buffer, tag = 0): Promise<Pending> {
    if (this.closedErr) return Promise.reject(this.closedErr);
    const cookie = this.nextCookie++;
    const inline = payload && payload.length <= SMALL_PAYLOAD ? payload.length : 0;
    if (this.outAt + 28 + inline > this.out.length) {
      this.cutOut();
      this.out = Buffer.allocUnsafe(Math.max(OUT_CHUNK, 28 + inline));
      this.outFrom = this.outAt = 0;
    }
    const h = this.out;
    const at = this.outAt;
    h.writeUInt32BE(NBD_REQUEST_MAGIC, at);
    h.writeUInt16BE(flags, at + 4);
    h.writeUInt16BE(type, at + 6);
    h.writeUInt32BE(tag, at + 8);
    h.writeUInt32BE(cookie, at + 12);
    h.writeUInt32BE(Math.floor(offset / 0x100000000), at + 16);
    h.writeUInt32BE(offset >>> 0, at + 20);
    h.writeUInt32BE(length, at + 24);
    this.outAt = at + 28;
    if (inline) {
      payload!.copy(h, this.outAt);
      this.outAt += inline;
    } else if (payload) {
      this.cutOut();
      this.outQueue.push(payload);
    }
    if (!this.sendScheduled) {
      this.sendScheduled = true;
      setImmediate(this.sendBatch);
    }
    if (type === Cmd.NBD_CMD_DISC) {
      this.sendBatch(); // now: the caller ends the socket next
      return Promise.resolve({} as Pending);
    }
    return new Promise((resolve, reject) => {
      const data = type === Cmd.NBD_CMD_READ ? (into ?? Buffer.alloc(length)) : null;
      this.pending.set(cookie, { type, offset, length, data, extents: null, error: null, resolve, reject });
    });
  }

  /** Queues what was packed into `out` since the last cut. */
  private cutOut(): void {
    if (this.outAt === this.outFrom) return;
    this.outQueue.push(this.out.subarray(this.outFrom, this.outAt));
    this.outFrom = this.outAt;
  }

  async pread(length: number, offset: number, flags = 0): Promise<Buffer> {
    return (await this.request(Cmd.NBD_CMD_READ, flags, offset, length)).data!;
  }
  // The calls below resolve with the request's record, which callers ignore (typed void): one
  // promise per request on port B's path, not two.
  /** Reads `into.length` bytes at `offset` straight into `into` (no copy of the reply). */
  preadInto(into: Buffer, offset: number, flags = 0): Promise<void> {
    return this.request(Cmd.NBD_CMD_READ, flags, offset, into.length, undefined, into) as Promise<unknown> as Promise<void>;
  }
  pwrite(buf: Buffer, offset: number, flags = 0, tag = 0): Promise<void> {
    return this.request(Cmd.NBD_CMD_WRITE, flags, offset, buf.length, buf, undefined, tag) as Promise<unknown> as Promise<void>;
  }
  zero(length: number, offset: number, flags = 0, tag = 0): Promise<void> {
    return this.request(Cmd.NBD_CMD_WRITE_ZEROES, flags, offset, length, undefined, undefined, tag) as Promise<unknown> as Promise<void>;
  }
  trim(length: number, offset: number, flags = 0, tag = 0): Promise<void> {
    return this.request(Cmd.NBD_CMD_TRIM, flags, offset, length, undefined, undefined, tag) as Promise<unknown> as Promise<void>;
  }
  flush(): Promise<void> {
    return this.request(Cmd.NBD_CMD_FLUSH, 0, 0, 0) as Promise<unknown> as Promise<void>;
  }
  cache(length: number, offset: number): Promise<void> {
    return this.request(Cmd.NBD_CMD_CACHE, 0, offset, length) as Promise<unknown> as Promise<void>;
  }
  async blockStatus(length: number, offset: number, flags = 0): Promise<Extent[]> {
    return (await this.request(Cmd.NBD_CMD_BLOCK_STATUS, flags, offset, length)).extents ?? [];
  }

  /** Soft disconnect: NBD_CMD_DISC, then wait for the server to close. */
  async disconnect(): Promise<void> {
    if (!this.closedErr) await this.request(Cmd.NBD_CMD_DISC, 0, 0, 0);
    this.socket.end();
    await this.closed;
  }

  /** Half-closes: sends the requests made so far, then FIN (close_notify first over TLS). Replies still come. */
  end(): void {
    this.sendBatch();
    this.socket.end();
  }

  destroy(): void {
    this.socket.destroy();
  }

  private failAll(err: Error): void {
    this.closedErr = err;
    this.sink = null;
    for (const p of this.pending.values()) p.reject(err);
    this.pending.clear();
  }

  private protocolFailure(msg: string): void {
    this.failAll(new ProtocolError(msg));
    this.socket.destroy();
  }

  /**
   * Keeps an incomplete frame's bytes as pieces and joins them once, when the whole frame is there
   * (joining at every chunk would copy a 1 MiB read reply dozens of times).
   */
  private onData(d: Buffer): void {
    const sink = this.sink;
    if (sink) {
      // The payload of a big read reply goes straight into the caller's buffer.
      const n = Math.min(d.length, sink.left);
      d.copy(sink.buf, sink.at, 0, n);
      sink.at += n;
      sink.left -= n;
      if (sink.left > 0) return;
      this.sink = null;
      sink.done();
      if (n === d.length) return;
      d = d.subarray(n);
    }
    let owned = !this.volatileInput;
    if (this.partsLen > 0) {
      this.parts.push(owned ? d : Buffer.from(d));
      this.partsLen += d.length;
      if (this.partsLen < this.need) return;
      d = Buffer.concat(this.parts, this.partsLen);
      owned = true;
      this.parts = [];
      this.partsLen = 0;
    }
    this.rx = d;
    this.parse();
    if (this.rx.length > 0 && !this.closedErr) {
      this.parts = [owned ? this.rx : Buffer.from(this.rx)];
      this.partsLen = this.rx.length;
      this.rx = Buffer.alloc(0);
    }
  }

  /** Starts streaming the rest of a read payload into `buf` from `at`; `b` holds what came already. */
  private stream(b: Buffer, from: number, buf: Buffer, at: number, length: number, done: () => void): void {
    const have = b.length - from;
    b.copy(buf, at, from, b.length);
    this.sink = { buf, at: at + have, left: length - have, done };
    this.rx = Buffer.alloc(0);
  }

  private parse(): void {
    for (;;) {
      const b = this.rx;
      if (b.length === 0) return;
      if (b.length < 4) {
        this.need = 4;
        return;
      }
      const magic = b.readUInt32BE(0);
      if (magic === NBD_SIMPLE_REPLY_MAGIC) {
        if (b.length < 16) {
          this.need = 16;
          return;
        }
        const cookie = b.readUInt32BE(12);
        const p = this.pending.get(cookie);
        if (!p) return this.protocolFailure(`reply for unknown cookie ${cookie}`);
        const error = b.readUInt32BE(4);
        const dataLen = p.type === Cmd.NBD_CMD_READ && error === 0 ? p.length : 0;
        const finish = () => {
          this.pending.delete(cookie);
          if (error) p.reject(new NbdError(ERRNO_NAME.get(error) ?? "EIO", `server error ${error}`));
          else p.resolve(p);
        };
        if (b.length < 16 + dataLen) return this.stream(b, 16, p.data!, 0, dataLen, finish);
        if (dataLen) b.copy(p.data!, 0, 16, 16 + dataLen);
        this.rx = b.subarray(16 + dataLen);
        finish();
      } else if (magic === NBD_STRUCTURED_REPLY_MAGIC) {
        if (b.length < 20) {
          this.need = 20;
          return;
        }
        const flags = b.readUInt16BE(4);
        const type = b.readUInt16BE(6);
        const cookie = b.readUInt32BE(12);
        const len = b.readUInt32BE(16);
        const p = this.pending.get(cookie);
        if (!p) return this.protocolFailure(`chunk for unknown cookie ${cookie}`);
        const finish = () => {
          if (!(flags & NBD_REPLY_FLAG_DONE)) return;
          this.pending.delete(cookie);
          if (p.error) p.reject(p.error);
          else p.resolve(p);
        };
        if (b.length < 20 + len) {
          // A data chunk arriving in pieces is streamed into place once its offset is known.
          if (type !== ReplyType.NBD_REPLY_TYPE_OFFSET_DATA || len < 8 || !p.data) {
            this.need = 20 + len;
            return;
          }
          if (b.length < 28) {
            this.need = 28;
            return;
          }
          const off = Number(b.readBigUInt64BE(20)) - p.offset;
          if (off < 0 || off + len - 8 > p.data.length) return this.protocolFailure(`data chunk outside the request (cookie ${cookie})`);
          return this.stream(b, 28, p.data, off, len - 8, finish);
        }
        const body = b.subarray(20, 20 + len);
        this.rx = b.subarray(20 + len);
        this.chunk(p, type, body);
        finish();
      } else {
        return this.protocolFailure(`bad reply magic 0x${magic.toString(16)}`);
      }
    }
  }

  private chunk(p: Pending, type: number, body: Buffer): void {
    switch (type) {
      case ReplyType.NBD_REPLY_TYPE_NONE:
        return;
      case ReplyType.NBD_REPLY_TYPE_OFFSET_DATA: {
        const off = Number(body.readBigUInt64BE(0)) - p.offset;
        body.copy(p.data!, off, 8);
        return;
      }
      case ReplyType.NBD_REPLY_TYPE_OFFSET_HOLE: {
        const off = Number(body.readBigUInt64BE(0)) - p.offset;
        p.data!.fill(0, off, off + body.readUInt32BE(8));
        return;
      }
      case ReplyType.NBD_REPLY_TYPE_BLOCK_STATUS: {
        const ext: Extent[] = [];
        for (let at = 4; at + 8 <= body.length; at += 8) ext.push({ length: body.readUInt32BE(at), flags: body.readUInt32BE(at + 4) });
        p.extents = ext;
        return;
      }
      case ReplyType.NBD_REPLY_TYPE_ERROR:
      case ReplyType.NBD_REPLY_TYPE_ERROR_OFFSET: {
        const errno = body.readUInt32BE(0);
        const mlen = body.readUInt16BE(4);
        const msg = body.toString("utf8", 6, 6 + mlen);
        const off = type === ReplyType.NBD_REPLY_TYPE_ERROR_OFFSET ? Number(body.readBigUInt64BE(6 + mlen)) : undefined;
        p.error = new NbdError(ERRNO_NAME.get(errno) ?? "EIO", msg, off);
        return;
      }
      default:
        p.error = new NbdError("EIO", `unknown structured reply type ${type}`);
    }
  }
}
