import fs from "node:fs";
import os from "node:os";
import path from "node:path";

/**
 * The ownership record of one image, kept beside it as IMAGE.lease (JSON, written atomically by
 * rename). Every change of owner bumps `epoch`, the fencing token. Only its owner renews it (each
 * renewal bumps `serial`); another node may break it only once it saw the same record, unrenewed,
 * for `ttlMs` of its own monotonic clock, or once the owner's process is gone.
 */
export interface LeaseRecord {
  image: string;
  owner: string;
  /** The owner's NBD address (host:port) and control URL, so any node can find it. */
  nbd: string;
  control: string;
  epoch: number;
  /** Wall-clock time of the last renewal, for people reading the record; never compared by nodes. 0: released. */
  leaseStart: number;
  ttlMs: number;
  /** Bumped by every renewal: what an observer watches to tell a live lease from a dead one. */
  serial?: number;
  /** The owner's process and host: on this host, a record whose process is gone is free at once. */
  pid?: number;
  host?: string;
  /**
   * etcd only (`EtcdOwnership`): the etcd lease id of the owner's process (its session), which
   * tells this process from an earlier one of the same node. Absent until the owner claims a
   * hand-over, like `pid`.
   */
  holder?: string;
  /**
   * The image is not shared with the owner: it is this node's own copy (a live copy went to or
   * came from here). Its owner never renews this record, so its expiry means nothing: no node
   * takes such an image over.
   */
  private?: boolean;
  /**
   * The owners (node@epoch, newest last, at most 8) that handed the image on since the last change
   * of owner that was not a hand-over: each drained and flushed port A before it handed over, so
   * whatever it acknowledged is on the image. A peer whose link reached one of them loses nothing
   * by following the record to the current owner (see RemotePortOptions.onNewLink).
   */
  handedFrom?: string[];
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

export const DEFAULT_TTL_MS = 5_000;

export interface LeaseFileOptions {
  /** Monotonic milliseconds (default performance.now): how long this process watched a record. */
  monotonic?: () => number;
  /** Wall-clock milliseconds written into records for people to read (default Date.now). */
  wall?: () => number;
  /** Whether process `pid` of this host runs (default: kill(pid, 0)). */
  alive?: (pid: number) => boolean;
  /** This process (default process.pid) and host (default os.hostname()). */
  pid?: number;
  host?: string;
}

function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
}

/**
 * The ownership record kept in a file beside the image (IMAGE.lease): for nodes on one machine,
 * which share its file system. Read-modify-write is serialised by a lock file that names its
 * holder's process; a lock is broken only when that process is gone. No two clocks are compared:
 * a lease expires for an observer when the record went unrenewed for its ttl on the observer's own
 * monotonic clock (a node skewed by hours sees the same), or at once when the owner's process on
 * this host is gone. Each node keeps one LeaseFile per image (it remembers what it observed).
 */
export class LeaseFile {
  readonly file: string;
  private readonly lockFile: string;
  private readonly monotonic: () => number;
  private readonly wall: () => number;
  private readonly alive: (pid: number) => boolean;
  private readonly pid: number;
  private readonly host: string;
  /** The foreign record last seen, and when (monotonic) it was first seen as it is. */
  private seen: { key: string; at: number } | null = null;
  /** An empty lock file last seen (inode and mtime), and when (monotonic) it was first seen so. */
  private emptyLockSeen: { key: string; at: number } | null = null;

  constructor(
    readonly image: string,
    opts: LeaseFileOptions = {},
  ) {
    // One record per image file, however it is named: a symlink leads to the file's own record.
    // (Two hard links to one file are still two names; serve an image by one name.)
    let abs = path.resolve(image);
    try {
      abs = fs.realpathSync(abs);
    } catch {
      /* not there yet */
    }
    this.file = `${abs}.lease`;
    this.lockFile = `${abs}.lease.lock`;
    this.monotonic = opts.monotonic ?? (() => performance.now());
    this.wall = opts.wall ?? Date.now;
    this.alive = opts.alive ?? processAlive;
    this.pid = opts.pid ?? process.pid;
    this.host = opts.host ?? os.hostname();
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

  /** The record was written by this very process (not an earlier one of the same node id). */
  private mine(r: LeaseRecord, me: NodeIdentity): boolean {
    return r.owner === me.nodeId && (r.pid === undefined || (r.pid === this.pid && r.host === this.host));
  }

  /** The process that owns `r` ran on this host and is gone: nothing of it can write any more. */
  private ownerGone(r: LeaseRecord): boolean {
    return r.host === this.host && r.pid !== undefined && r.pid !== this.pid && !this.alive(r.pid);
  }

  /**
   * Whether `r` may be broken by this process: released, its owner's process gone, or unchanged
   * (same owner, epoch and renewal) for its whole ttl since this process first saw it so.
   */
  expired(r: LeaseRecord): boolean {
    if (r.leaseStart === 0 || this.ownerGone(r)) return true;
    const key = `${r.owner}@${r.epoch}#${r.serial ?? r.leaseStart}`;
    const now = this.monotonic();
    if (this.seen?.key !== key) {
      this.seen = { key, at: now };
      return false;
    }
    return now - this.seen.at >= r.ttlMs;
  }

  /** Takes the lease for `me` if it is free, expired, or already mine. Bumps the epoch on a change of owner or process. */
  acquire(me: NodeIdentity, ttlMs = DEFAULT_TTL_MS): LeaseRecord {
    return this.update((cur) => {
      const same = !!cur && this.mine(cur, me);
      if (cur && cur.owner !== me.nodeId && cur.private) throw new LeaseError(`image is a copy; its data is owned by ${cur.owner} (epoch ${cur.epoch}), whose record here never expires`, cur);
      // Another node's lease, or an earlier process of this node (a private copy's too): it may be
      // frozen, not dead, so it must have expired (or its process be gone).
      if (cur && !same && !this.expired(cur))
        throw new LeaseError(`image is owned by ${cur.owner} (epoch ${cur.epoch}${cur.owner === me.nodeId ? `, an earlier process ${cur.pid}` : ""}); its lease has not expired`, cur);
      // A new owner, or a new process of the same node: a new epoch, which fences the old one.
      const epoch = !cur ? 1 : same ? cur.epoch : cur.epoch + 1;
      return { ...this.record(me, epoch, ttlMs), ...(cur?.owner === me.nodeId && cur.private ? { private: true } : {}), ...(same && cur.handedFrom ? { handedFrom: cur.handedFrom } : handedOn(cur)) };
    });
  }

  /** Takes the image over once its owner's lease expired; null while it is valid, or for a node's own copy. */
  takeOver(me: NodeIdentity, ttlMs = DEFAULT_TTL_MS): LeaseRecord | null {
    // No record at all is free too (a node that could not write one when it started). A private
    // record (a node's own copy) can be taken only by its own node: by a later process of it.
    const breakable = (r: LeaseRecord | null) => !r || ((!r.private || r.owner === me.nodeId) && this.expired(r));
    if (!breakable(this.read())) return null; // the common case, without taking the lock
    let taken = false;
    const r = this.update((cur) => {
      if (!breakable(cur)) return null; // renewed or taken meanwhile
      taken = true;
      return { ...this.record(me, (cur?.epoch ?? 0) + 1, ttlMs), ...(cur?.private ? { private: true } : {}), ...handedOn(cur) };
    });
    return taken ? r : null;
  }

  /** Extends my lease; fails (LeaseError) if the record no longer names me (this process) at `epoch`. */
  renew(me: NodeIdentity, epoch: number): LeaseRecord {
    // A record that names someone else already says the lease is lost, lock or no lock (a full
    // disk or a held lock must not hide it): epochs only grow, so it can never come back.
    const seen = this.read();
    if (!seen || !this.mine(seen, me) || seen.epoch !== epoch) throw new LeaseError(`lease lost: record is ${describeRecord(seen)}, expected ${me.nodeId}@${epoch}`, seen);
    return this.update((cur) => {
      if (!cur || !this.mine(cur, me) || cur.epoch !== epoch) throw new LeaseError(`lease lost: record is ${describeRecord(cur)}, expected ${me.nodeId}@${epoch}`, cur);
      return { ...cur, nbd: me.nbd, control: me.control, leaseStart: this.wall(), serial: (cur.serial ?? 0) + 1, pid: this.pid, host: this.host };
    });
  }

  handedTo(me: NodeIdentity): number | null {
    const r = this.read();
    return r && r.owner === me.nodeId && r.pid === undefined && !r.private && r.leaseStart !== 0 ? r.epoch : null;
  }

  /** Hands my lease (held at `epoch`) to `to` with epoch + 1. */
  handOver(me: NodeIdentity, epoch: number, to: NodeIdentity, ttlMs = DEFAULT_TTL_MS, privateCopy = false): LeaseRecord {
    return this.update((cur) => {
      if (!cur || !this.mine(cur, me) || cur.epoch !== epoch) throw new LeaseError(`cannot hand over: record is ${describeRecord(cur)}, expected ${me.nodeId}@${epoch}`, cur);
      // The peer's process is not known here: the record names no process until the peer renews it.
      const { pid: _pid, host: _host, ...rec } = this.record(to, epoch + 1, ttlMs);
      const handedFrom = handedFromAfter(cur);
      return { ...rec, handedFrom, ...(privateCopy ? { private: true } : {}) };
    });
  }

  /**
   * Takes the lease back after a hand-over that did not complete: only while the record still
   * shows that very hand-over (`handed`, never renewed by the peer, which would mean it adopted),
   * or names me, or expired. Bumps the epoch so a late adopter is fenced.
   */
  reclaim(me: NodeIdentity, handed: LeaseRecord, ttlMs = DEFAULT_TTL_MS): LeaseRecord {
    return this.update((cur) => {
      const untouched = !!cur && cur.owner === handed.owner && cur.epoch === handed.epoch && (cur.serial ?? 0) === (handed.serial ?? 0) && cur.pid === undefined;
      const ok = !cur || untouched || this.mine(cur, me) || this.expired(cur);
      if (!ok) throw new LeaseError(`cannot reclaim: record is ${describeRecord(cur)}${cur?.owner === handed.owner && cur.epoch === handed.epoch ? ", renewed by it" : ""}`, cur);
      // Unclaimed, the hand-over wrote nothing: what the owners before it flushed still stands.
      // Claimed and then expired, the peer may have acknowledged writes that are gone now.
      const handedFrom = untouched || (cur && this.mine(cur, me)) ? cur!.handedFrom : handedOn(cur).handedFrom;
      return { ...this.record(me, (cur?.epoch ?? handed.epoch) + 1, ttlMs), ...(handedFrom ? { handedFrom } : {}) };
    });
  }

  /**
   * Gives up my lease (the record stays, released, so the next owner bumps the epoch). `clean`:
   * port A never opened, so this owner acknowledged nothing: like a hand-over, the release vouches
   * for it (`handedFrom`), and the list goes on to whoever takes the lease next.
   */
  release(me: NodeIdentity, epoch: number, clean = false): void {
    this.update((cur) => {
      if (!cur || !this.mine(cur, me) || cur.epoch !== epoch) return null;
      const handedFrom = clean ? handedFromAfter(cur) : undefined;
      const { handedFrom: _was, ...rest } = cur;
      return { ...rest, leaseStart: 0, ...(handedFrom ? { handedFrom } : {}) };
    });
  }

  /**
   * Writes a record naming `who` as owner at `epoch`, whatever the record said: only for an image
   * that is a node's own copy (a live copy's destination), where no other node keeps a record.
   * `handedFrom`: the source's list (a live copy hands on like a hand-over; nodes sharing this
   * image, which follow the owner through port B, read it when they relink).
   */
  assign(who: NodeIdentity, epoch: number, ttlMs = DEFAULT_TTL_MS, handedFrom?: string[]): LeaseRecord {
    return this.update(() => ({ ...this.record(who, epoch, ttlMs), private: true, ...(handedFrom?.length ? { handedFrom: handedFrom.slice(-HANDED_FROM_MAX) } : {}) }));
  }

  private record(who: NodeIdentity, epoch: number, ttlMs: number): LeaseRecord {
    return { image: path.resolve(this.image), owner: who.nodeId, nbd: who.nbd, control: who.control, epoch, leaseStart: this.wall(), ttlMs, serial: 0, pid: this.pid, host: this.host };
  }

  private update(fn: (cur: LeaseRecord | null) => LeaseRecord | null): LeaseRecord {
    const unlock = this.lock();
    try {
      const cur = this.read();
      const next = fn(cur);
      if (!next) return cur!;
      const tmp = `${this.file}.${this.pid}.tmp`;
      fs.writeFileSync(tmp, JSON.stringify(next, null, 2) + "\n");
      fs.renameSync(tmp, this.file);
      return next;
    } finally {
      unlock();
    }
  }

  /**
   * A short exclusive lock around read-modify-write: a lock file holding this process's id. It is
   * broken only when the process it names is gone (a paused holder keeps it, so its late rename can
   * never overwrite a newer record), and removed only by its holder. Waiting blocks the event loop,
   * so it is short (50 ms): a holder that keeps it longer is stopped, and the caller tries again
   * later (a write waits; the renewal loop tries at its next tick).
   */
  private lock(): () => void {
    const token = `${this.host} ${this.pid} ${Math.random().toString(36).slice(2)}`;
    // The lock appears whole or not at all: its token is written to a file of its own first, then
    // linked into place (fails if a lock exists). A lock created empty and then not written (a full
    // disk, a stop between the two calls) would block every renewal until broken — or, broken
    // while its holder is stopped, let two processes in.
    const tmp = `${this.lockFile}.${this.pid}.${token.slice(-8)}`;
    try {
      fs.writeFileSync(tmp, token);
    } catch (err) {
      fs.rmSync(tmp, { force: true });
      throw err;
    }
    const deadline = Date.now() + 50;
    try {
      for (;;) {
        try {
          fs.linkSync(tmp, this.lockFile);
          return () => {
            try {
              if (fs.readFileSync(this.lockFile, "utf8") === token) fs.rmSync(this.lockFile, { force: true });
            } catch {
              /* gone */
            }
          };
        } catch (err) {
          if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
          this.breakDeadLock();
          if (Date.now() > deadline) throw Object.assign(new Error(`${this.lockFile}: lock held by another process (${this.holder()}); try again later`), { code: "EBUSY" });
          Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 2);
        }
      }
    } finally {
      fs.rmSync(tmp, { force: true });
    }
  }

  private holder(): string {
    try {
      return fs.readFileSync(this.lockFile, "utf8").split(" ").slice(0, 2).join(" pid ");
    } catch {
      return "gone";
    }
  }

  /**
   * Removes the lock file if the process that holds it is gone. An empty one (written by an
   * earlier version that created it before writing) is broken once this process saw it unchanged
   * for 5 s of its own monotonic clock: its mtime would compare another clock with this one's.
   */
  private breakDeadLock(): void {
    try {
      const text = fs.readFileSync(this.lockFile, "utf8");
      const [host, pid] = text.split(" ");
      let dead: boolean;
      if (text === "") {
        const st = fs.statSync(this.lockFile);
        const key = `${st.ino}:${st.mtimeMs}`;
        const now = this.monotonic();
        if (this.emptyLockSeen?.key !== key) this.emptyLockSeen = { key, at: now };
        dead = now - this.emptyLockSeen.at >= 5000;
      } else dead = host === this.host && !this.alive(Number(pid));
      if (dead && fs.readFileSync(this.lockFile, "utf8") === text) fs.rmSync(this.lockFile, { force: true });
    } catch {
      /* gone meanwhile */
    }
  }
}

/** Owners a record lists in `handedFrom`, newest last. */
export const HANDED_FROM_MAX = 8;

/** `cur`'s handedFrom with `cur`'s owner appended: what the record says once that owner handed on (or released cleanly). */
export function handedFromAfter(cur: LeaseRecord): string[] {
  return [...(cur.handedFrom ?? []), `${cur.owner}@${cur.epoch}`].slice(-HANDED_FROM_MAX);
}

/** What a new owner keeps of `cur`'s handedFrom: all of it after a release (a clean give-up), nothing after an expiry. */
export function handedOn(cur: LeaseRecord | null): { handedFrom?: string[] } {
  return cur?.leaseStart === 0 && cur.handedFrom ? { handedFrom: cur.handedFrom } : {};
}

/** A record for messages: owner@epoch, and whether it was released. */
export function describeRecord(r: LeaseRecord | null): string {
  return r ? `${r.owner}@${r.epoch}${r.leaseStart === 0 ? " (released)" : ""}` : "absent";
}
