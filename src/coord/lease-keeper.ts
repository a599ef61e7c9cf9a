import { EtcdError } from "./etcd-errors.js";

const now = () => performance.now();

/** A lease as granted, with the monotonic time its grant was asked for. */
export interface LeaseGrant {
  /** etcd's lease id (decimal string: ids use all 63 bits). */
  id: string;
  /** Seconds etcd granted (it raises a TTL below its minimum, about 2 s with default settings). */
  ttl: number;
  /** performance.now() before the grant was sent: the lease lives at least until grantedAt + ttl s. */
  grantedAt: number;
}

/** One renewal: the TTL etcd reset the lease to, and when it was sent (null result: the lease is gone). */
export type Renewal = { ttl: number; sentAt: number } | null;

export interface KeepAliveOptions {
  /** Called once, when the lease is lost: etcd says it is gone, or no renewal came back before its deadline. */
  onLost?: (err: EtcdError) => void;
  /** Called after each renewal with the new deadline. */
  onRenewed?: (ttl: number, deadline: number) => void;
  /** Time between renewals (default: a third of the TTL). */
  intervalMs?: number;
}

/**
 * Keeps one lease alive: renews it every ttl/3 and knows until when it surely lives.
 *
 * `deadline` is a performance.now() time: the send time of the last renewal etcd confirmed, plus
 * the TTL it confirmed. etcd restarts a lease's TTL when its leader receives the renewal, which is
 * after it was sent, so the lease cannot end before `deadline` (as long as this host's clock
 * and the leader's run at the same rate; nothing compares their readings). An owner that must
 * stop writing before anyone else may take over stops at `deadline - margin`.
 *
 * A renewal that fails is tried again soon (a quarter of the time left, at least 100 ms) until
 * the deadline; then, or as soon as etcd answers that the lease is gone, the keeper reports the
 * loss once (`onLost`, `lost`) and stops.
 */
export class LeaseKeeper {
  readonly id: string;
  ttl: number;
  deadline: number;
  /** Why the lease was lost, once it was; null while kept. */
  lost: EtcdError | null = null;
  /** Resolves when the keeper stops: lost (with the error) or stopped (with null). */
  readonly done: Promise<EtcdError | null>;
  private stopped = false;
  private timer: NodeJS.Timeout | undefined;
  private deadlineTimer: NodeJS.Timeout | undefined;
  private lastError = "";
  private resolveDone!: (v: EtcdError | null) => void;

  constructor(
    grant: LeaseGrant,
    private readonly renew: (id: string, timeoutMs: number, onFailure: (error: string) => void) => Promise<Renewal>,
    private readonly o: KeepAliveOptions = {},
  ) {
    this.id = grant.id;
    this.ttl = grant.ttl;
    this.deadline = grant.grantedAt + grant.ttl * 1000;
    this.done = new Promise((r) => (this.resolveDone = r));
    this.armDeadline();
    this.schedule(Math.max(0, grant.grantedAt + this.interval() - now()));
  }

  /** Milliseconds the lease surely lives from now (negative once past the deadline). */
  remainingMs(): number {
    return this.deadline - now();
  }

  /** Stops renewing (the lease then expires after its TTL; revoke it to end it at once). */
  stop(): void {
    if (this.stopped) return;
    this.stopped = true;
    clearTimeout(this.timer);
    clearTimeout(this.deadlineTimer);
    this.resolveDone(null);
  }

  private interval(): number {
    return this.o.intervalMs ?? (this.ttl * 1000) / 3;
  }

  private schedule(ms: number): void {
    if (this.stopped) return;
    clearTimeout(this.timer);
    this.timer = setTimeout(() => void this.tick(), ms);
  }

  private armDeadline(): void {
    clearTimeout(this.deadlineTimer);
    this.deadlineTimer = setTimeout(() => {
      if (now() >= this.deadline) this.lose(new EtcdError("ETCD_UNAVAILABLE", `keep lease ${this.id} alive`, `no renewal succeeded before its ${this.ttl} s TTL ran out${this.lastError ? `: ${this.lastError}` : ""}`));
      else this.armDeadline();
    }, Math.max(1, this.deadline - now()));
  }

  private async tick(): Promise<void> {
    if (this.stopped) return;
    const sentAt = now();
    const left = this.deadline - sentAt;
    if (left <= 0) return; // the deadline timer reports it
    let r: Renewal;
    try {
      // A renewal may keep trying members until the deadline: note each failure as it comes.
      r = await this.renew(this.id, left, (error) => (this.lastError = error));
    } catch (err) {
      if (this.stopped) return;
      if (err instanceof EtcdError && err.code === "ETCD_LEASE_NOT_FOUND") return this.lose(err);
      this.lastError = err instanceof Error ? err.message : String(err);
      this.schedule(Math.max(100, Math.min(this.interval(), (this.deadline - now()) / 4)));
      return;
    }
    if (this.stopped) return;
    if (r === null || r.ttl <= 0) {
      return this.lose(new EtcdError("ETCD_LEASE_NOT_FOUND", `keep lease ${this.id} alive`, "etcd says the lease expired or was revoked"));
    }
    this.ttl = r.ttl;
    this.lastError = "";
    this.deadline = Math.max(this.deadline, sentAt + r.ttl * 1000);
    this.armDeadline();
    this.o.onRenewed?.(r.ttl, this.deadline);
    this.schedule(Math.max(0, sentAt + this.interval() - now()));
  }

  private lose(err: EtcdError): void {
    if (this.stopped) return;
    this.lost = err;
    this.stopped = true;
    clearTimeout(this.timer);
    clearTimeout(this.deadlineTimer);
    this.resolveDone(err);
    this.o.onLost?.(err);
  }
}
