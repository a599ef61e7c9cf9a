// The nemesis checker: an online model of every block's versions, fed by the load as requests are
// sent and answered, and by the nemesis when it kills or freezes a node. Pure: no I/O, no clocks
// (every call carries its time), so it is tested on its own (checker.test.ts).
//
// Each block has one writer, and that writer has at most one write of it in flight; its versions
// are 1, 2, 3… in the order they were sent (0: never written, all zeros). For each block the model
// keeps
//   ceiling  the highest version sent so far (no read may return more: that would be invented data);
//   floor    the lowest version a read sent now may return: the last acknowledged version, or the
//            last version a completed read returned (linearizability: reads never go back);
//   durable  the highest version a FLUSH (sent on the writer's connection after the write's reply)
//            or a FUA write made durable.
// A loss event (an owner killed or frozen past its lease) lowers every floor to `durable`: writes
// no FLUSH or FUA covered may be gone. The next acknowledged write or read raises it again.

export const BLOCK = 4096;
const MAGIC = 0x4e454d53; // "NEMS"

/** The 4 KiB payload of version `version` of block `block` by writer `writer`: self-describing. */
export function encodeBlock(block, version, writer) {
  const buf = Buffer.allocUnsafe(BLOCK);
  buf.writeUInt32LE(MAGIC, 0);
  buf.writeUInt32LE(block, 4);
  buf.writeUInt32LE(version, 8);
  buf.writeUInt32LE(writer, 12);
  let x = (block * 2654435761 + version * 40503 + 1) >>> 0 || 1;
  for (let i = 16; i < BLOCK; i += 4) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    buf.writeUInt32LE(x >>> 0, i);
  }
  return buf;
}

/**
 * What a 4 KiB block holds: {version: 0} for zeros, {version, writer} for a whole payload of
 * `block`, or {corrupt: why}.
 */
export function decodeBlock(buf, block) {
  if (buf.length !== BLOCK) return { corrupt: `length ${buf.length}` };
  const magic = buf.readUInt32LE(0);
  if (magic === 0) {
    for (let i = 0; i < BLOCK; i += 4) if (buf.readUInt32LE(i) !== 0) return { corrupt: `zero header but non-zero data at byte ${i}` };
    return { version: 0 };
  }
  if (magic !== MAGIC) return { corrupt: `bad magic 0x${magic.toString(16)}` };
  const b = buf.readUInt32LE(4);
  const version = buf.readUInt32LE(8);
  const writer = buf.readUInt32LE(12);
  if (b !== block) return { corrupt: `payload of block ${b} found at block ${block} (version ${version})` };
  const want = encodeBlock(block, version, writer);
  if (!want.equals(buf)) {
    let i = 16;
    while (i < BLOCK && want[i] === buf[i]) i++;
    return { corrupt: `version ${version}: data differs from byte ${i} (torn or mixed write)` };
  }
  return { version, writer };
}

export class Checker {
  /**
   * @param {{blocks: number, writerOf: (block: number) => number, onFailure?: (f: object) => void}} o
   */
  constructor(o) {
    this.blocks = o.blocks;
    this.writerOf = o.writerOf;
    this.onFailure = o.onFailure ?? (() => {});
    /** Self-test of the checker: count every acknowledged write as durable, as a broken FLUSH would let a client believe. */
    this.trustUnflushed = !!o.trustUnflushed;
    this.ceiling = new Int32Array(o.blocks);
    this.floor = new Int32Array(o.blocks);
    this.durable = new Int32Array(o.blocks);
    this.acked = new Int32Array(o.blocks);
    /** Writes sent but not answered, by block: the version. */
    this.inflight = new Map();
    /** Reads sent but not answered. */
    this.pendingReads = new Set();
    this.failures = [];
    this.notes = [];
    this.lossEvents = [];
    this.counts = { writes: 0, fua: 0, acked: 0, indeterminate: 0, reads: 0, blocksRead: 0, flushes: 0, flushOk: 0, flushEio: 0, lossEvents: 0 };
  }

  fail(kind, detail) {
    const f = { kind, ...detail };
    this.failures.push(f);
    this.onFailure(f);
    return f;
  }

  /** The next version of `block`, for a write about to be sent. */
  nextVersion(block) {
    return this.ceiling[block] + 1;
  }

  /** A write of `version` to `block` is sent on connection `conn` (an object with `unflushed: []`). */
  writeSent(conn, block, version, fua, t) {
    if (this.inflight.has(block)) throw new Error(`harness bug: two writes of block ${block} in flight`);
    if (version !== this.ceiling[block] + 1) throw new Error(`harness bug: version ${version} of block ${block} after ${this.ceiling[block]}`);
    this.ceiling[block] = version;
    this.inflight.set(block, version);
    this.counts.writes++;
    if (fua) this.counts.fua++;
    return { conn, block, version, fua, t, lossesAtSend: this.lossEvents.length };
  }

  /**
   * A write's reply came. One in flight when a loss event was declared, answered before the next
   * one, may have been done and answered by the node just before it was frozen or killed (the
   * nemesis declares the event when it sends the signal; a reply already on its way arrives
   * after): like a write acknowledged before the event, it is owed only once durable. Answered
   * after a later event too (the node continued), it is owed.
   */
  writeAcked(w, t) {
    this.inflight.delete(w.block);
    this.counts.acked++;
    this.acked[w.block] = Math.max(this.acked[w.block], w.version);
    // A network fault's events carry `until`: the owner may have done the write before it was
    // fenced and its reply crossed a lossy link for a while (TCP retransmits): answered by then,
    // it is owed only once durable however many events came in between.
    let late = this.lossEvents.length - w.lossesAtSend === 1;
    for (let i = w.lossesAtSend; !late && i < this.lossEvents.length; i++) late = t <= (this.lossEvents[i].until ?? -Infinity);
    const acrossLoss = !w.fua && late;
    if (!acrossLoss) this.floor[w.block] = Math.max(this.floor[w.block], w.version);
    if (w.fua || this.trustUnflushed) this.durable[w.block] = Math.max(this.durable[w.block], w.version);
    else w.conn.unflushed.push([w.block, w.version]);
  }

  /** The write's connection died with it (its node was killed): it may or may not have happened. */
  writeIndeterminate(w, t) {
    this.inflight.delete(w.block);
    this.counts.indeterminate++;
  }

  /** A FLUSH is sent on `conn`: it covers the writes acknowledged on `conn` before now. */
  flushSent(conn, t) {
    this.counts.flushes++;
    return { conn, covers: conn.unflushed.splice(0), t };
  }

  flushAcked(f, t) {
    this.counts.flushOk++;
    for (const [b, v] of f.covers) this.durable[b] = Math.max(this.durable[b], v);
  }

  /** A FLUSH answered EIO: what it covered is not durable (and is never vouched for later). */
  flushEio(f, t) {
    this.counts.flushEio++;
  }

  /** A read of `count` blocks from `first` is sent. */
  readSent(first, count, t) {
    const r = { first, count, t, floors: Array.from(this.floor.subarray(first, first + count)), loss: null };
    this.pendingReads.add(r);
    this.counts.reads++;
    return r;
  }

  /** The read could not complete (its connection died with its node): nothing to check. */
  readAbandoned(r) {
    this.pendingReads.delete(r);
  }

  /**
   * The read's data arrived: every block must hold a whole payload whose version lies between the
   * floor when the read was sent (lowered by any loss event while it ran) and the ceiling now.
   * Returns the failures it found.
   */
  readDone(r, buf, t, who) {
    this.pendingReads.delete(r);
    const found = [];
    for (let i = 0; i < r.count; i++) {
      const b = r.first + i;
      this.counts.blocksRead++;
      const d = decodeBlock(buf.subarray(i * BLOCK, (i + 1) * BLOCK), b);
      if (d.corrupt) {
        found.push(this.fail("corrupt read", { block: b, why: d.corrupt, sent: r.t, done: t, who }));
        continue;
      }
      const lo = r.loss ? Math.min(r.floors[i], r.loss[i]) : r.floors[i];
      const hi = this.ceiling[b];
      if (d.version < lo) {
        found.push(
          this.fail(d.version < this.durable[b] ? "lost durable write (read)" : "stale read (non-linearizable)", {
            block: b, got: d.version, floor: lo, acked: this.acked[b], durable: this.durable[b], ceiling: hi, sent: r.t, done: t, who,
          }),
        );
        continue;
      }
      if (d.version > hi) {
        found.push(this.fail("read of a version never written", { block: b, got: d.version, ceiling: hi, sent: r.t, done: t, who }));
        continue;
      }
      if (d.version > 0 && d.writer !== this.writerOf(b)) {
        found.push(this.fail("payload from the wrong writer", { block: b, got: d.version, writer: d.writer, sent: r.t, done: t, who }));
        continue;
      }
      // Later reads must not go back behind what this one returned.
      if (d.version > this.floor[b]) this.floor[b] = d.version;
    }
    return found;
  }

  /**
   * A node that may have owned the image was killed or frozen past its lease: writes no FLUSH or FUA
   * made durable may be gone, on every block. Reads in flight may see that too. `until` (a network
   * fault): a write sent before this event and answered by then may be gone too (see writeAcked).
   */
  loss(t, why, o = {}) {
    this.counts.lossEvents++;
    this.lossEvents.push({ t, why, ...(o.until !== undefined ? { until: o.until } : {}) });
    for (const r of this.pendingReads) {
      const d = Array.from(this.durable.subarray(r.first, r.first + r.count));
      r.loss = r.loss ? r.loss.map((v, i) => Math.min(v, d[i])) : d;
    }
    for (let b = 0; b < this.blocks; b++) this.floor[b] = this.durable[b];
  }

  /**
   * The image file after every node was killed: each block must hold a whole payload at least as
   * new as its durable version and no newer than anything sent.
   */
  checkImage(image) {
    const found = [];
    const summary = { blocks: this.blocks, written: 0, durable: 0, newerThanDurable: 0 };
    for (let b = 0; b < this.blocks; b++) {
      const d = decodeBlock(image.subarray(b * BLOCK, (b + 1) * BLOCK), b);
      if (this.ceiling[b] > 0) summary.written++;
      if (this.durable[b] > 0) summary.durable++;
      if (d.corrupt) {
        found.push(this.fail("corrupt block in the image", { block: b, why: d.corrupt, durable: this.durable[b] }));
        continue;
      }
      if (d.version < this.durable[b]) {
        found.push(this.fail("lost durable write (image)", { block: b, got: d.version, durable: this.durable[b], acked: this.acked[b], ceiling: this.ceiling[b] }));
        continue;
      }
      if (d.version > this.ceiling[b]) {
        found.push(this.fail("image holds a version never written", { block: b, got: d.version, ceiling: this.ceiling[b] }));
        continue;
      }
      if (d.version > this.durable[b]) summary.newerThanDurable++;
    }
    return { found, summary };
  }
}
