import type { Logger } from "pino";
import { NbdClient, type ConnectOptions, type NbdAddress } from "../../client/nbd-client.js";
import { NbdError, ProtocolError } from "../../errors.js";
import { newPeerSession, peerExportName } from "../../internal-exports.js";
import { CmdFlag, TransmissionFlag as F } from "../../protocol/constants.js";
import type { Capabilities, Extent, Io, Layer } from "../layer.js";

export interface RemotePortOptions {
  /** The export's name on the owner node. */
  exportName: string;
  /**
   * Where the owner is now (asked again on every reconnect: the owner may have changed), and who it
   * is (`owner`: a name for that owner's process, e.g. node@epoch), when known.
   */
  locate: () => OwnerAddress | Promise<OwnerAddress>;
  /** Where to connect the first time, if not where locate() points (a peer about to become owner). */
  first?: OwnerAddress;
  log?: Logger;
  /** TLS towards the owner (NBD_OPT_STARTTLS first), when this node is configured with it. */
  tls?: ConnectOptions["tls"];
  /**
   * Size and capabilities to open with when the owner cannot be reached yet (a node starting while
   * its peer is down): requests then wait, retrying, until the owner answers or this node owns it.
   */
  offline?: () => Promise<{ size: number; caps: Capabilities }>;
  /**
   * Called when a link replaces an earlier one to another owner (or one that cannot be told apart:
   * no `owner` name): what the old owner acknowledged but no FLUSH covered may be gone with it
   * (see PortRedirector.ownerLost). A new link to the same owner process loses nothing, nor one to
   * an owner that the old one reached by hand-overs only (`handedFrom`): each flushed first.
   */
  onNewLink?: () => void;
  /**
   * Called when a link replaces one to an owner that the new owner vouches for (`handedFrom`):
   * that owner drained and flushed before handing over, and a peer's link is served at the epoch
   * it was made at only, so what it acknowledged on the old link is durable (see
   * PortRedirector.ownerHandedOver).
   */
  onHandedOver?: () => void;
  /**
   * A link on which requests wait this long with no reply at all is given up (default 30 s): the
   * owner may be stopped (a frozen process keeps its TCP connections alive) or unreachable. Its
   * requests are sent again on a new link, to wherever the owner is then.
   */
  requestTimeoutMs?: number;
}

/**
 * An owner's NBD address, with a name for the owner's process when known (see onNewLink), and the
 * owners it came from by hand-overs only (LeaseRecord.handedFrom).
 */
export type OwnerAddress = NbdAddress & { owner?: string; handedFrom?: string[] };

/**
 * How an owner names itself in its exports' descriptions (`[owner=NODE epoch=N]`, which nbdinfo
 * shows, then `; handed from A@1,B@2` when its record lists owners that handed the image on), so
 * that port B learns whom a link reaches, and whom that owner vouches for, from the owner itself
 * rather than from a record that may be stale (a live copy's own record names whoever owned the
 * image when the copy left). A node that does not own the export writes followerLabel instead.
 */
export function ownerLabel(nodeId: string, epoch: number, handedFrom?: string[]): string {
  return `[owner=${nodeId} epoch=${epoch}${handedFrom?.length ? `; handed from ${handedFrom.join(",")}` : ""}]`;
}

/**
 * How a node that does not own an export names the owner its record shows, and where it is
 * (`[owner=NODE epoch=N at HOST:PORT, through port B]`): a peer whose own record is older (a node
 * holding its own copy learns of moves among the nodes sharing the image from nobody else)
 * follows it (see followHints).
 */
export function followerLabel(owner: string | undefined, epoch: number | undefined, nbd: string | undefined): string {
  return `[owner=${owner ?? "?"} epoch=${epoch ?? "?"}${nbd ? ` at ${nbd}` : ""}, through port B]`;
}

/** The owner a non-owner's description names (see followerLabel), with its address, if any. */
export function ownerHintInDescription(description: string | undefined): { host: string; port: number; owner: string; epoch: number } | undefined {
  const m = description && /\[owner=([^\s\]]+) epoch=(\d+) at (\S+):(\d+), through port B\]/.exec(description);
  return m ? { host: m[3]!, port: Number(m[4]), owner: `${m[1]}@${m[2]}`, epoch: Number(m[2]) } : undefined;
}

const epochOf = (owner: string | undefined): number | undefined => {
  const e = owner && /@(\d+)$/.exec(owner);
  return e ? Number(e[1]) : undefined;
};

/** The owner (node@epoch) an export's description names as itself (see ownerLabel), and the owners it vouches for. */
export function ownerInDescription(description: string | undefined): { owner: string; handedFrom?: string[] } | undefined {
  const m = description && /\[owner=([^\s\]]+) epoch=(\d+)(?:; handed from ([^\s\]]+))?\]/.exec(description);
  return m ? { owner: `${m[1]}@${m[2]}`, ...(m[3] ? { handedFrom: m[3].split(",") } : {}) } : undefined;
}

/** The lease names this very node as the owner: the request belongs on port A, not on a peer. */
export function ownerIsHere(message: string): Error {
  return Object.assign(new Error(message), { code: "EOWNER" });
}

export function isOwnerHere(err: unknown): boolean {
  return (err as { code?: string } | null)?.code === "EOWNER";
}

/** How long a link made ahead to an announced owner (RemotePort.warm) waits unused before it is let go. */
const SPARE_MS = 10_000;

/** The node of an owner's name (node@epoch). */
function nodeOf(owner: string): string {
  const at = owner.lastIndexOf("@");
  return at > 0 ? owner.slice(0, at) : owner;
}

/** Errors that mean "this connection is gone", not "the device failed": the request is sent again. */
function isLinkError(err: unknown): boolean {
  if (err instanceof ProtocolError) return true;
  if (err instanceof NbdError) return err.errno === "ESHUTDOWN";
  const code = (err as { code?: string } | null)?.code;
  return typeof code === "string" && /^(ECONNREFUSED|ECONNRESET|EPIPE|ETIMEDOUT|ENOENT|EHOSTUNREACH|ENOTOWNER|EOWNERUNKNOWN)$/.test(code);
}

/**
 * Port B: the resource as seen through the NBD connection to the node that owns it. Sends only
 * generic NBD commands. If the connection breaks (or the owner shuts it down), it reconnects to
 * wherever the owner is now and sends the unanswered requests again (reads and writes of the
 * same bytes are idempotent), so a request through port B fails only with the owner's own error.
 */
export class RemotePort implements Layer {
  private client: NbdClient | null = null;
  private connecting: Promise<NbdClient> | null = null;
  private caps!: Capabilities;
  private bytes = 0;
  private closed = false;
  private where = "";
  /** Names this port B to owners across its links; its writes carry sequence numbers (see server/peer-writes.ts). */
  private readonly session = newPeerSession();
  private nextTag = 1;
  /** Links opened so far; every one after the first is a change of link. */
  private links = 0;
  /** The owner the current link reaches, when known. */
  private linkOwner: string | undefined;
  /** Requests in flight, and when (performance.now()) the link last answered one or got one. */
  private inflight = 0;
  private lastProgress = 0;
  private watchdog: NodeJS.Timeout | null = null;
  /**
   * A link made ahead to the node an owner announced it hands the resource to (see warm): idle until
   * the record names that node, then it replaces the current link at once. Let go after SPARE_MS.
   */
  private spare: { node: string; where: string; made: Promise<NbdClient>; client: NbdClient | null; taken: boolean; timer: NodeJS.Timeout } | null = null;

  constructor(private readonly opts: RemotePortOptions) {}

  describe(): string {
    return `nbd:${this.where}/${this.opts.exportName}`;
  }

  /** The owner (node@epoch) the current or last link reached, when known. */
  get owner(): string | undefined {
    return this.linkOwner;
  }

  async open(): Promise<void> {
    const limit = this.opts.requestTimeoutMs ?? 30_000;
    this.watchdog = setInterval(() => {
      if (this.inflight > 0 && this.client && performance.now() - this.lastProgress > limit) this.dropLink(`no reply for ${Math.round(limit / 1000)} s`);
    }, Math.min(1000, limit / 3));
    this.watchdog.unref();
    let c: NbdClient;
    try {
      c = await this.connection();
    } catch (err) {
      // The owner cannot be reached, or the record names this very node (it is about to take the
      // image over, e.g. a restart while its earlier process may still run): requests wait.
      if (!this.opts.offline || !(isLinkError(err) || isOwnerHere(err))) throw err;
      const o = await this.opts.offline();
      this.bytes = o.size;
      this.caps = o.caps;
      this.opts.log?.warn({ err: (err as Error).message }, "port B: the owner is unreachable; requests wait for it");
      return;
    }
    this.bytes = c.size;
    const f = c.flags;
    const writable = !(f & F.NBD_FLAG_READ_ONLY);
    this.caps = {
      writable,
      flush: !!(f & F.NBD_FLAG_SEND_FLUSH),
      fua: !!(f & F.NBD_FLAG_SEND_FUA),
      trim: !!(f & F.NBD_FLAG_SEND_TRIM),
      zero: !!(f & F.NBD_FLAG_SEND_WRITE_ZEROES),
      fastZero: !!(f & F.NBD_FLAG_SEND_FAST_ZERO),
      cache: !!(f & F.NBD_FLAG_SEND_CACHE),
      extents: c.allocationContext !== 0,
      depth: false, // the link asks for base:allocation only
      multiConn: !!(f & F.NBD_FLAG_CAN_MULTI_CONN),
      blockSize: { ...c.blockSize },
    };
  }

  /**
   * Gives up the current link (its owner stopped, or stopped answering): requests on it are sent
   * again on a new link, to wherever the owner is now (this node, if it took the resource over).
   */
  dropLink(reason: string, level: "warn" | "info" = "warn"): void {
    const c = this.client;
    if (!c) return;
    this.opts.log?.[level]({ owner: this.where, inflight: this.inflight, reason }, "port B: giving up the link to the owner");
    this.client = null;
    this.lastProgress = performance.now();
    c.destroy();
  }

  /**
   * Gives the current link up (see dropLink) and links again at once, to wherever the owner is now.
   * `to`: the owner (node@epoch) the record names now, and the owners it vouches for; with a spare
   * link to that node (see warm), that link takes over at once, with no connection or handshake
   * while requests wait: the requests in flight on the old link are sent again on it.
   */
  relink(reason: string, to?: { owner: string; handedFrom?: string[] }): void {
    if (this.closed || !this.client) return;
    const ahead = to ? this.takeSpare(to) : null;
    if (ahead) {
      this.dropLink(reason, "info");
      this.linking(ahead);
      return;
    }
    this.dropSpare();
    this.dropLink(reason, "info");
    this.connection().catch(() => undefined); // requests find the link, or retry, as after any drop
  }

  /**
   * The link made ahead (or still being made: it is further along than a new one), made the
   * current link to `to`, when it reaches `to`'s node; else null. Used when the record names that
   * node: by relink (the store's push came while the old link stood) and by connection() (the old
   * link had gone first, say the old owner closed it at the end of its hold).
   */
  private takeSpare(to: { owner?: string; handedFrom?: string[] }): Promise<NbdClient> | null {
    const spare = this.spare;
    if (!spare || to.owner === undefined || nodeOf(to.owner) !== spare.node || spare.client?.socket.destroyed) return null;
    spare.taken = true;
    this.dropSpare(false);
    const owner = to.owner;
    return (spare.client ? Promise.resolve(spare.client) : spare.made).then((c) => {
      if (this.closed) {
        c.destroy(); // closed while it was being made
        throw new NbdError("ESHUTDOWN", "port B is closed");
      }
      this.opts.log?.info({ to: owner, at: spare.where }, "port B: the link made ahead to the new owner takes over");
      this.install(c, spare.where, owner, to.handedFrom);
      return c;
    });
  }

  /**
   * An owner announced a move to `to` (node `node`): link to it now, so that when the record names
   * it, relink switches without a connection and handshake (MISSION.md's stall is the hold only).
   * The link carries nothing until then; the node it reaches takes its first request as made to
   * the owner it is then (see PortRedirector.linkCurrent). One spare at a time; let go when unused.
   */
  warm(to: NbdAddress & { node: string }): void {
    if (this.closed || (this.spare?.node === to.node && !this.spare.client?.socket.destroyed)) return;
    this.dropSpare();
    const where = "path" in to ? to.path : `${to.host}:${to.port}`;
    const timer = setTimeout(() => this.spare === s && this.dropSpare(), SPARE_MS);
    timer.unref();
    const timeoutMs = Math.min(this.opts.requestTimeoutMs ?? 30_000, 5000);
    const made = NbdClient.connect(to, { exportName: peerExportName(this.opts.exportName, this.session), tls: this.opts.tls, timeoutMs });
    const s: NonNullable<RemotePort["spare"]> = { node: to.node, where, made, client: null, taken: false, timer };
    this.spare = s;
    made.then(
      (c) => {
        if (this.spare === s) s.client = c;
        else if (!s.taken) c.destroy();
      },
      (err: Error) => {
        if (this.spare === s) this.dropSpare();
        this.opts.log?.debug({ to: where, err: err.message }, "port B: no link ahead to the announced owner");
      },
    );
  }

  /** Lets the spare link go (`destroy`: unless it was just made the current link). */
  private dropSpare(destroy = true): void {
    const s = this.spare;
    if (!s) return;
    this.spare = null;
    clearTimeout(s.timer);
    if (destroy) s.client?.destroy();
  }

  async close(): Promise<void> {
    this.closed = true;
    this.dropSpare();
    if (this.watchdog) clearInterval(this.watchdog);
    const c = this.client;
    this.client = null;
    if (c) await c.disconnect().catch(() => c.destroy());
  }

  size(): number {
    return this.bytes;
  }
  capabilities(): Capabilities {
    return this.caps;
  }

  private connection(): Promise<NbdClient> {
    if (this.client && !this.client.socket.destroyed) return Promise.resolve(this.client);
    if (this.connecting) return this.connecting;
    // Cleared once settled, never before it is set: locate() may throw at once (the record names
    // this node), and a promise kept after failing would fail every later connection the same way.
    const p: Promise<NbdClient> = (async () => {
      const first = this.opts.first;
      this.opts.first = undefined;
      let addr = first ?? (await this.opts.locate());
      const ahead = first ? null : this.takeSpare(addr);
      if (ahead) return ahead;
      // A stopped owner accepts the TCP connection and answers nothing: the handshake is bounded.
      const timeoutMs = Math.min(this.opts.requestTimeoutMs ?? 30_000, 5000);
      const connect = (to: OwnerAddress) => NbdClient.connect(to, { exportName: peerExportName(this.opts.exportName, this.session), tls: this.opts.tls, timeoutMs });
      let c = await connect(addr);
      // A node that does not own the export names the owner its record shows: follow it when it
      // is newer than the owner we were sent to (epochs only grow, so this ends).
      for (let hops = 0; hops < 8 && !ownerInDescription(c.description); hops++) {
        const hint = ownerHintInDescription(c.description);
        const known = epochOf(addr.owner);
        if (!hint || (known !== undefined && hint.epoch <= known)) break;
        this.opts.log?.debug({ from: addr.owner, to: hint.owner }, "port B: following the owner a non-owner names");
        const next: OwnerAddress = { host: hint.host, port: hint.port, owner: hint.owner, handedFrom: addr.handedFrom };
        const c2 = await connect(next).catch(() => null);
        if (!c2) break;
        c.destroy();
        c = c2;
        addr = next;
      }
      const where = "path" in addr ? addr.path : `${addr.host}:${addr.port}`;
      // Whom the link reaches, and whom it vouches for: the owner says so itself; the record is the fallback.
      const said = ownerInDescription(c.description);
      // A node that says it does not own the resource gets no request: it would refuse it, or —
      // taking the resource over while this link stands — answer under a name this link never
      // learnt. Asked again (the retry loop's backoff) until the node reached owns it. A peer about
      // to become the owner (`first`, a hand-over) is named by the hand-over itself.
      if (!said && !first && ownerHintInDescription(c.description)) {
        c.destroy();
        throw Object.assign(new Error(`${where} does not own ${this.opts.exportName} (yet)`), { code: "ENOTOWNER" });
      }
      this.install(c, where, said?.owner ?? addr.owner, said ? said.handedFrom : addr.handedFrom);
      return c;
    })();
    return this.linking(p);
  }

  /** `p` is the link being made: requests wait for it (connection()) until it settles. */
  private linking(p: Promise<NbdClient>): Promise<NbdClient> {
    this.connecting = p;
    const clear = () => {
      if (this.connecting === p) this.connecting = null;
    };
    p.then(clear, clear);
    return p;
  }

  /**
   * Makes `c` the current link, to `owner` (node@epoch, when known), who vouches for `vouched`: a
   * link to another owner who does not vouch for the last one may have lost what that one
   * acknowledged unflushed (onNewLink); one who does makes it durable (onHandedOver).
   */
  private install(c: NbdClient, where: string, owner: string | undefined, vouched: string[] | undefined): void {
    this.where = where;
    const sameOwner = owner !== undefined && owner === this.linkOwner;
    const handedOver = owner !== undefined && !sameOwner && this.linkOwner !== undefined && !!vouched?.includes(this.linkOwner);
    const replaces = this.links++ > 0;
    if (replaces && handedOver) this.opts.onHandedOver?.();
    else if (replaces && !sameOwner) {
      this.opts.log?.debug({ was: this.linkOwner ?? null, now: owner ?? null, vouchedFor: vouched ?? [], description: c.description ?? null }, "port B: a link to another owner, who does not vouch for the last one");
      this.opts.onNewLink?.();
    }
    this.linkOwner = owner;
    this.lastProgress = performance.now();
    this.client = c;
  }

  private call<T>(fn: (c: NbdClient) => Promise<T>): Promise<T> {
    if (this.inflight++ === 0) this.lastProgress = performance.now();
    // Fast path: connected, one reaction per request; only a broken link takes the retrying path.
    const c = this.client;
    if (!c || this.closed) return this.settled(this.retry(fn, null));
    return fn(c).then(
      (v) => {
        this.progress();
        return v;
      },
      (err) => (isLinkError(err) ? this.settled(this.retry(fn, c)) : (this.progress(), Promise.reject(err))),
    );
  }

  /** A request of the fast path ended: the link answered. */
  private progress(): void {
    this.inflight--;
    this.lastProgress = performance.now();
  }

  private settled<T>(p: Promise<T>): Promise<T> {
    p.then(
      () => this.progress(),
      () => this.progress(),
    );
    return p;
  }

  private async retry<T>(fn: (c: NbdClient) => Promise<T>, failed: NbdClient | null): Promise<T> {
    if (failed) {
      if (this.client === failed) this.client = null;
      failed.destroy();
    }
    // `again`: the wait before the next link after one that failed the request. The first is at
    // once (the owner moved); a node that answers ESHUTDOWN while the record still names it (a
    // hand-over not yet claimed) is asked less and less often.
    for (let delay = 5, again = 0; ; delay = Math.min(delay * 2, 500)) {
      if (this.closed) throw new NbdError("ESHUTDOWN", "port B is closed");
      let c: NbdClient;
      try {
        c = await this.connection();
      } catch (err) {
        if (!isLinkError(err)) throw err;
        this.opts.log?.debug({ err: (err as Error).message }, "port B: owner unreachable; retrying");
        // A node about to own the resource (adopting) does so within milliseconds: ask it again soon.
        await new Promise((r) => setTimeout(r, (err as { code?: string }).code === "ENOTOWNER" ? Math.min(delay, 40) : delay));
        continue;
      }
      try {
        return await fn(c);
      } catch (err) {
        if (!isLinkError(err)) throw err;
        if (this.client === c) this.client = null;
        c.destroy();
        this.opts.log?.debug({ err: (err as Error).message }, "port B: link lost; sending the request again");
        if (again) await new Promise((r) => setTimeout(r, again));
        again = Math.min(again * 2 || 2, 200);
      }
    }
  }

  private static flags(io: Io): number {
    return (io.fua ? CmdFlag.NBD_CMD_FLAG_FUA : 0) | (io.mayTrim ? 0 : CmdFlag.NBD_CMD_FLAG_NO_HOLE) | (io.fast ? CmdFlag.NBD_CMD_FLAG_FAST_ZERO : 0);
  }

  pread(buf: Buffer, offset: number, _io: Io): Promise<void> {
    return this.call((c) => c.preadInto(buf, offset));
  }
  /** The next write's tag: the same one however often the write is sent; never 0, 32 bits. */
  private tag(): number {
    const t = this.nextTag;
    this.nextTag = t === 0xffffffff ? 1 : t + 1;
    return t;
  }
  pwrite(buf: Buffer, offset: number, io: Io): Promise<void> {
    const tag = this.tag();
    return this.call((c) => c.pwrite(buf, offset, io.fua ? CmdFlag.NBD_CMD_FLAG_FUA : 0, tag));
  }
  zero(length: number, offset: number, io: Io): Promise<void> {
    const tag = this.tag();
    return this.call((c) => c.zero(length, offset, RemotePort.flags(io), tag));
  }
  trim(length: number, offset: number, io: Io): Promise<void> {
    const tag = this.tag();
    return this.call((c) => c.trim(length, offset, io.fua ? CmdFlag.NBD_CMD_FLAG_FUA : 0, tag));
  }
  flush(_io: Io): Promise<void> {
    return this.call((c) => c.flush());
  }
  cache(length: number, offset: number, _io: Io): Promise<void> {
    return this.call((c) => c.cache(length, offset));
  }
  extents(length: number, offset: number, _io: Io): Promise<Extent[]> {
    return this.call((c) => c.blockStatus(length, offset));
  }
  async quiesce(): Promise<void> {}
  resume(): void {}
}
