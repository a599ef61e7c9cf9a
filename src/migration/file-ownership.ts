import { LeaseFile, type LeaseRecord, type NodeIdentity } from "./lease.js";
import type { Ownership } from "./ownership.js";

/**
 * Ownership kept in a LeaseFile beside the image: the embedded default, for nodes on one machine.
 * Each call runs the file's synchronous, lock-serialised change at once (so calls happen in the
 * order they were made) and answers with a promise, as every Ownership does. No push: a file has
 * no watch, so nodes learn of a new owner when they next read the record.
 */
export class FileOwnership implements Ownership {
  constructor(readonly file: LeaseFile) {}

  static of(image: string): FileOwnership {
    return new FileOwnership(new LeaseFile(image));
  }

  get where(): string {
    return this.file.file;
  }

  async read(): Promise<LeaseRecord | null> {
    return this.file.read();
  }
  async acquire(me: NodeIdentity, ttlMs: number): Promise<LeaseRecord> {
    return this.file.acquire(me, ttlMs);
  }
  async renew(me: NodeIdentity, epoch: number): Promise<LeaseRecord> {
    return this.file.renew(me, epoch);
  }
  async handedTo(me: NodeIdentity): Promise<number | null> {
    return this.file.handedTo(me);
  }
  async handOver(me: NodeIdentity, epoch: number, to: NodeIdentity, ttlMs: number, privateCopy?: boolean): Promise<LeaseRecord> {
    return this.file.handOver(me, epoch, to, ttlMs, privateCopy);
  }
  async takeOver(me: NodeIdentity, ttlMs: number): Promise<LeaseRecord | null> {
    return this.file.takeOver(me, ttlMs);
  }
  async reclaim(me: NodeIdentity, handed: LeaseRecord, ttlMs: number): Promise<LeaseRecord> {
    return this.file.reclaim(me, handed, ttlMs);
  }
  async release(me: NodeIdentity, epoch: number, clean?: boolean): Promise<void> {
    this.file.release(me, epoch, clean);
  }
  async assign(who: NodeIdentity, epoch: number, ttlMs: number, handedFrom?: string[]): Promise<LeaseRecord> {
    return this.file.assign(who, epoch, ttlMs, handedFrom);
  }
  watch(): null {
    return null;
  }
}
