import fs from "node:fs";
import path from "node:path";
import type { Ownership } from "./ownership.js";

/**
 * The ownership record of one image, kept beside it as IMAGE.lease (JSON, written atomically by
 * rename). Every change of owner bumps `epoch`, the fencing token. A lease is valid for `ttlMs`
 * after `leaseStart`; only its owner renews it, and another node may break it only after expiry.
 */
export interface LeaseRecord {
  image: string;
  owner: string;
  /** The owner's NBD address (host:port) and control URL, so any node can find it. */
  nbd: string;
  control: string;
  epoch: number;
  leaseStart: number;
  ttlMs: number;
  /**
   * The image is not shared with the owner: it is this node's own copy (a live copy went to or
   * came from here). Its owner never renews this record, so its expiry means nothing: no node
   * takes such an image over.
   */
  private?: boolean;
}

export interface NodeIdentity {
  nodeId: string;
  nbd: string;
  control: string;
}

export class LeaseError extends Error {
  constructor(
    message: string,
    readonly current: LeaseRecord | null,
  ) {
    super(message);
    this.name = "LeaseError";
  }
}

export const DEFAULT_TTL_MS = 10_000;

/**
 * The ownership record kept in a file beside the image (IMAGE.lease): for nodes on one machine,
 * which share its file system. Read-modify-write is serialised by an O_EXCL lock file; expiry is
 * judged by this machine's wall clock, which all such nodes share.
 */
export class LeaseFile implements Ownership {
  readonly file: string;
  private readonly lockFile: string;

  constructor(
    readonly image: string,
    private readonly now: () => number = Date.now,
  ) {
    const abs = path.resolve(image);
    this.file = `${abs}.lease`;
    this.lockFile = `${abs}.lease.lock`;
  }

  get where(): string {
    return this.file;
  }

  read(): LeaseRecord | null {
    let text: string;
    try {
      text = fs.readFileSync(this.file, "utf8");
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ENOENT") return null;
      throw err;
    }
    const r = JSON.parse(text) as LeaseRecord;
    if (typeof r.owner !== "string" || !Number.isSafeInteger(r.epoch)) throw new Error(`${this.file}: not a lease record`);
    return r;
  }

  expired(r: LeaseRecord): boolean {
    return this.now() >= r.leaseStart + r.ttlMs;
  }

  /** Takes the lease for `me` if it is free, expired, or already mine. Bumps the epoch on a change of owner. */
  acquire(me: NodeIdentity, ttlMs = DEFAULT_TTL_MS): LeaseRecord {
    return this.update((cur) => {
      if (cur && cur.owner !== me.nodeId && cur.private) throw new LeaseError(`image is a copy; its data is owned by ${cur.owner} (epoch ${cur.epoch}), whose record here never expires`, cur);
      if (cur && cur.owner !== me.nodeId && !this.expired(cur))
        throw new LeaseError(`image is owned by ${cur.owner} (epoch ${cur.epoch}) until ${new Date(cur.leaseStart + cur.ttlMs).toISOString()}`, cur);
      const epoch = !cur ? 1 : cur.owner === me.nodeId ? cur.epoch : cur.epoch + 1;
      return { ...this.record(me, epoch, ttlMs), ...(cur?.owner === me.nodeId && cur.private ? { private: true } : {}) };
    });
  }

  /** Takes the image over once its owner's lease expired; null while it is valid, or for a node's own copy. */
  takeOver(me: NodeIdentity, ttlMs = DEFAULT_TTL_MS): LeaseRecord | null {
    const breakable = (r: LeaseRecord | null): r is LeaseRecord => !!r && !r.private && this.expired(r);
    if (!breakable(this.read())) return null; // the common case, without taking the lock
    let taken = false;
    const r = this.update((cur) => {
      if (!breakable(cur)) return null; // renewed or taken meanwhile
      taken = true;
      return this.record(me, cur.owner === me.nodeId ? cur.epoch : cur.epoch + 1, ttlMs);
    });
    return taken ? r : null;
  }

  /** Extends my lease; fails (LeaseError) if the record no longer names me at `epoch`. */
  renew(me: NodeIdentity, epoch: number): LeaseRecord {
    return this.update((cur) => {
      if (!cur || cur.owner !== me.nodeId || cur.epoch !== epoch) throw new LeaseError(`lease lost: record is ${describe(cur)}, expected ${me.nodeId}@${epoch}`, cur);
      return { ...cur, nbd: me.nbd, control: me.control, leaseStart: this.now() };
    });
  }

  /** Hands my lease (held at `epoch`) to `to` with epoch + 1. */
  handOver(me: NodeIdentity, epoch: number, to: NodeIdentity, ttlMs = DEFAULT_TTL_MS, privateCopy = false): LeaseRecord {
    return this.update((cur) => {
      if (!cur || cur.owner !== me.nodeId || cur.epoch !== epoch) throw new LeaseError(`cannot hand over: record is ${describe(cur)}, expected ${me.nodeId}@${epoch}`, cur);
      return { ...this.record(to, epoch + 1, ttlMs), ...(privateCopy ? { private: true } : {}) };
    });
  }

  /**
   * Takes the lease back after a hand-over that did not complete, if the record still shows the
   * hand-over (`to` at `epoch`) or an expired lease. Bumps the epoch so a late adopter is fenced.
   */
  reclaim(me: NodeIdentity, to: string, epoch: number, ttlMs = DEFAULT_TTL_MS): LeaseRecord {
    return this.update((cur) => {
      const ok = !cur || (cur.owner === to && cur.epoch === epoch) || cur.owner === me.nodeId || this.expired(cur);
      if (!ok) throw new LeaseError(`cannot reclaim: record is ${describe(cur)}`, cur);
      return this.record(me, (cur?.epoch ?? epoch) + 1, ttlMs);
    });
  }

  /** Gives up my lease (the record stays, expired, so the next owner bumps the epoch). */
  release(me: NodeIdentity, epoch: number): void {
    this.update((cur) => {
      if (!cur || cur.owner !== me.nodeId || cur.epoch !== epoch) return null;
      return { ...cur, leaseStart: 0 };
    });
  }

  /**
   * Writes a record naming `who` as owner at `epoch`, whatever the record said: only for an image
   * that is a node's own copy (a live copy's destination), where no other node keeps a record.
   */
  assign(who: NodeIdentity, epoch: number, ttlMs = DEFAULT_TTL_MS): LeaseRecord {
    return this.update(() => ({ ...this.record(who, epoch, ttlMs), private: true }));
  }

  private record(who: NodeIdentity, epoch: number, ttlMs: number): LeaseRecord {
    return { image: path.resolve(this.image), owner: who.nodeId, nbd: who.nbd, control: who.control, epoch, leaseStart: this.now(), ttlMs };
  }

  private update(fn: (cur: LeaseRecord | null) => LeaseRecord | null): LeaseRecord {
    const unlock = this.lock();
    try {
      const cur = this.read();
      const next = fn(cur);
      if (!next) return cur!;
      const tmp = `${this.file}.${process.pid}.tmp`;
      fs.writeFileSync(tmp, JSON.stringify(next, null, 2) + "\n");
      fs.renameSync(tmp, this.file);
      return next;
    } finally {
      unlock();
    }
  }

  /** A short exclusive lock around read-modify-write; a lock older than 5 s is stale and removed. */
  private lock(): () => void {
    const deadline = Date.now() + 5000;
    for (;;) {
      try {
        const fd = fs.openSync(this.lockFile, "wx");
        fs.closeSync(fd);
        return () => fs.rmSync(this.lockFile, { force: true });
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
        try {
          if (Date.now() - fs.statSync(this.lockFile).mtimeMs > 5000) fs.rmSync(this.lockFile, { force: true });
        } catch {
          /* gone meanwhile */
        }
        if (Date.now() > deadline) throw new Error(`${this.lockFile}: lock held for too long`);
        Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 2);
      }
    }
  }
}

function describe(r: LeaseRecord | null): string {
  return r ? `${r.owner}@${r.epoch}` : "absent";
}
