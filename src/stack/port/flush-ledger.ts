import type { ClientSession, Io } from "../layer.js";

/** The client of requests that carry no session (internal calls). */
const ANONYMOUS: ClientSession = { ended: false };

/**
 * One client's writes through port B, counted: `acked` so far; the first `flushed` of them are
 * durable (a FLUSH covered them, or the old owner flushed at a hand-over); those numbered
 * (lostAbove, lostUpTo] may have been lost with an owner or a link, until a FLUSH reports it.
 */
interface PortBWrites {
  acked: number;
  flushed: number;
  lostAbove: number;
  lostUpTo: number;
  /** The client's FLUSH count when a FLUSH first failed for these losses (0: none yet); see `flushed`. */
  reportedAt: number;
}

/** What a FLUSH covered when it was sent; handed back to `flushed` when it succeeded. */
export interface FlushTicket {
  client: ClientSession;
  coversB: number;
  coversA: number;
  seq: number;
}

/**
 * The port redirector's account of what each client's FLUSH may vouch for
 * (src/migration/README.md, "What a FLUSH promises across an owner change"). Per client
 * connection it counts the writes acknowledged without FUA that no FLUSH covered yet, through
 * port B and through port A, and the changes that may lose them: an owner that stopped or a port B
 * link to another owner (`ownerLost`), a fence of port A (`fenced`). A FLUSH that covers a write
 * that may be lost fails — the first to complete, and every FLUSH of that client sent by then;
 * a hand-over (`settled`) loses nothing.
 */
export class FlushLedger {
  private readonly portB = new Map<ClientSession, PortBWrites>();
  /** Per client: the first and last of its writes through port A (numbered by `seqA`) that no FLUSH covered yet. */
  private readonly portA = new WeakMap<ClientSession, { first: number; last: number; reportedAt?: number }>();
  private seqA = 0;
  /** `seqA` when port A was last fenced: writes through it before then that no FLUSH covered may be lost. */
  private fencedAt = 0;
  /** Per client: FLUSHes sent so far, and up to which of them a reported loss fails them. */
  private readonly flushes = new WeakMap<ClientSession, { sent: number; failUpTo: number }>();

  /** A write through port A was sent (counted at once: no promise hop on the fast path). */
  sentA(io: Io): void {
    const client = io.session ?? ANONYMOUS;
    const s = ++this.seqA;
    const a = this.portA.get(client);
    if (!a) this.portA.set(client, { first: s, last: s });
    else {
      if (!a.first) a.first = s;
      a.last = s;
    }
  }

  /** The fence refused a write sent through port A: it never reached the device. */
  refusedA(io: Io): void {
    const a = this.portA.get(io.session ?? ANONYMOUS);
    if (a && a.first === a.last) a.first = 0;
  }

  /** A write through port B was acknowledged. */
  ackedB(io: Io): void {
    const client = io.session ?? ANONYMOUS;
    let w = this.portB.get(client);
    if (!w) {
      if (this.portB.size >= 256) for (const c of this.portB.keys()) if (c.ended) this.portB.delete(c);
      this.portB.set(client, (w = { acked: 0, flushed: 0, lostAbove: 0, lostUpTo: 0, reportedAt: 0 }));
    }
    w.acked++;
  }

  /** Port A closes without a flush (its lease is gone): what it never flushed may be lost. */
  fenced(): void {
    this.fencedAt = this.seqA;
  }

  /** The old owner drained and flushed before handing over: what port B wrote is durable. */
  settled(): void {
    for (const w of this.portB.values()) w.flushed = w.acked;
  }

  /**
   * What port B acknowledged without a FLUSH may be gone: its owner stopped (this node takes the
   * resource over) or the link to it moved to another owner. Returns how many clients it concerns.
   */
  ownerLost(): number {
    let clients = 0;
    for (const [c, w] of this.portB) {
      if (c.ended) {
        this.portB.delete(c);
        continue;
      }
      if (w.acked <= w.flushed) continue;
      // Writes (lostAbove, lostUpTo] may be lost; one earlier loss not reported yet stretches the range.
      w.lostAbove = w.lostUpTo > w.lostAbove ? Math.min(w.lostAbove, w.flushed) : w.flushed;
      w.lostUpTo = w.acked;
      clients++;
    }
    return clients;
  }

  /** A FLUSH is sent: what it covers. */
  flushSent(io: Io): FlushTicket {
    const client = io.session ?? ANONYMOUS;
    let f = this.flushes.get(client);
    if (!f) this.flushes.set(client, (f = { sent: 0, failUpTo: 0 }));
    return { client, coversB: this.portB.get(client)?.acked ?? 0, coversA: this.seqA, seq: ++f.sent };
  }

  /**
   * The FLUSH of `t` succeeded below: null if it may say so, else why it must fail (EIO).
   *
   * A lost write is reported twice: to the first FLUSH that covers it here, and again to the
   * first one that arrives after that failure was answered. The server counts as covered what it
   * acknowledged before the FLUSH arrived (as the NBD spec says), but a client counts only what it
   * saw acknowledged before it sent the FLUSH: a write's reply and a FLUSH may cross on the wire,
   * and that client then sends another FLUSH for the write — which must not succeed over it.
   * Replies keep their order on a connection, so the client has seen the write's reply by the
   * time it reads the first failure: the FLUSH it sends after that covers the write for both.
   */
  flushed(t: FlushTicket): string | null {
    let lost: string | null = null;
    const f = this.flushes.get(t.client)!;
    const a = this.portA.get(t.client);
    if (a?.first && a.first <= t.coversA) {
      const consume = () => (a.first = a.last > t.coversA ? t.coversA + 1 : 0);
      if (a.first <= this.fencedAt) {
        lost = "writes acknowledged before this node lost the resource were never flushed and may be lost";
        if (!a.reportedAt) a.reportedAt = f.sent;
        else if (t.seq > a.reportedAt) {
          consume();
          a.reportedAt = 0;
        }
      } else consume();
    }
    const w = this.portB.get(t.client);
    if (w) {
      if (w.lostUpTo > w.lostAbove && t.coversB > w.lostAbove) {
        lost = "writes acknowledged by an earlier owner were never flushed and may be lost (its link or the owner itself is gone)";
        if (!w.reportedAt) w.reportedAt = f.sent;
        else if (t.seq > w.reportedAt) {
          // Reported for what this FLUSH covers; lost writes acknowledged after it was sent are
          // not, and fail the next FLUSHes, the first to cover them.
          if (w.lostUpTo > t.coversB) w.lostAbove = t.coversB;
          else w.lostAbove = w.lostUpTo = 0;
          w.reportedAt = 0;
        }
      }
      w.flushed = Math.max(w.flushed, t.coversB);
      if (w.flushed >= w.acked && w.lostUpTo === 0) this.portB.delete(t.client);
    }
    // Every FLUSH this client sent before the loss was reported covers the lost writes too.
    if (lost) f.failUpTo = f.sent;
    else if (t.seq <= f.failUpTo) lost = "writes this FLUSH covers were never flushed and may be lost (reported to an earlier FLUSH too)";
    return lost;
  }
}
