import fs from "node:fs";
import { NbdError } from "../../errors.js";
import { State } from "../../protocol/constants.js";
import { ioBuffers } from "../../util/buffer-pool.js";
import { InflightTracker, type Capabilities, type Extent, type ExtentKind, type Io, type Layer } from "../layer.js";
import { filePathOf, HolePuncher, type PunchRunner } from "./hole-puncher.js";

/**
 * How the port calls the kernel. `async`: every read and write goes through libuv's thread pool.
 * `sync`: reads and writes up to `syncMax` bytes are made on the event loop (pread/pwrite that
 * hit the page cache cost a memory copy, less than a thread-pool round trip), larger ones go to
 * the pool so big copies run in parallel. `auto` (default) is `sync` until synchronous calls
 * take longer than `slowCallMs` (the data was not cached: a real disk is working), then `async`
 * for `asyncHoldMs` before trying again, so a cold or slow disk never stalls the event loop for long.
 * It takes three slow calls in a row, or about as many in a short run (see FilePort.timed): a single
 * one is, on a busy machine, as likely a preempted thread as a slow disk.
 */
export type IoMode = "auto" | "sync" | "async";

export interface FilePortOptions {
  path: string;
  readOnly?: boolean;
  io?: IoMode;
  /**
   * Largest request made synchronously in `sync`/`auto` mode. Default 1 MiB: a page-cache copy of
   * 1 MiB takes a few hundred microseconds, and making it on the event loop measured 14 % less
   * server CPU per 1 MiB read and 26 % less per 1 MiB write than a thread-pool round trip (the
   * data stays in the cache of the CPU that then sends it).
   */
  syncMax?: number;
  slowCallMs?: number;
  asyncHoldMs?: number;
  /**
   * Offer trim, punching holes (`serve --discard unmap`, the default): true unless false. Only a
   * writable regular file offers it (a block device does not).
   */
  discard?: boolean;
  /** How holes are punched (tests put a slow or failing one here); default util-linux fallocate. */
  punchRunner?: PunchRunner;
  /** Told once when punching holes fails (trims are then acknowledged without punching). */
  onPunchFailure?: (err: Error) => void;
}

const ZERO_CHUNK = Buffer.alloc(1024 * 1024);
const DONE: Promise<void> = Promise.resolve();
/** Score of recent slow calls (see FilePort.timed) at which `auto` turns to the thread pool. */
const SLOW_SCORE = 2.5;
const ZERO_BLOCK = ZERO_CHUNK.subarray(0, 4096);
/** The most bytes one extents() call scans for zeroes; the client asks again for the rest. */
const EXTENTS_SCAN_MAX = 8 * 1024 * 1024;
/**
 * The most bytes extents() and cache() read at a time (into one pooled buffer): what a request
 * costs the server's memory budget besides itself (see server/connection.ts, SCAN_COST).
 */
export const SCAN_PIECE = 1024 * 1024;

function readAt(fd: number, buf: Buffer, pos: number, offset: number, length: number): Promise<number> {
  return new Promise((resolve, reject) => {
    fs.read(fd, buf, pos, length, offset, (err, n) => (err ? reject(err) : resolve(n)));
  });
}

function writeAt(fd: number, buf: Buffer, pos: number, offset: number, length: number): Promise<number> {
  return new Promise((resolve, reject) => {
    fs.write(fd, buf, pos, length, offset, (err, n) => (err ? reject(err) : resolve(n)));
  });
}

function fdatasync(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fs.fdatasync(fd, (err) => (err ? reject(err) : resolve())));
}

/** Size of a block device from sysfs (Node has no BLKGETSIZE64 ioctl). */
function blockDeviceSize(rdev: number): number {
  const major = (rdev >> 8) & 0xfff;
  const minor = (rdev & 0xff) | ((rdev >> 12) & 0xfff00);
  const sectors = Number(fs.readFileSync(`/sys/dev/block/${major}:${minor}/size`, "utf8").trim());
  return sectors * 512;
}

/**
 * Port A of a local image: a raw file (or block device) opened by this node.
 * FLUSH is fdatasync; FUA is the write followed by fdatasync. Node.js offers neither fallocate
 * nor lseek(SEEK_DATA): trim punches holes with util-linux `fallocate --punch-hole --keep-size`
 * run as a child process, batched and ordered against writes (see hole-puncher.ts; a trim costs
 * a process, about 1-3 ms, and is acknowledged once the hole is punched); zero writes zeroes
 * (never "fast"); the allocation map reports everything as allocated, with all-zero 4 KiB blocks
 * marked ZERO where it looks for them (see extents()).
 */
export class FilePort implements Layer {
  private fd = -1;
  private bytes = 0;
  private readonly tracker = new InflightTracker();
  private caps!: Capabilities;
  private readonly syncMax: number;
  private readonly slowMs: number;
  private readonly holdMs: number;
  /** This port has written zeroes (zero()): block status looks for zero blocks even in a fully allocated file. */
  private zeroed = false;
  /** Recent slow synchronous calls (see timed()). */
  private slowScore = 0;
  /** Time (ms, performance.now) before which every call goes to the thread pool. */
  private asyncUntil: number;
  /** Hole punching for trim (null: trim not offered). */
  private puncher: HolePuncher | null = null;
  /**
   * Writes and zeroes in flight on the thread pool: a punch waits for those over its range, and so
   * does settled() (a qcow2 image frees a cluster only once no write to it is in flight).
   */
  private readonly inflightWrites = new Set<{ offset: number; end: number; done: Promise<unknown> }>();

  constructor(private readonly opts: FilePortOptions) {
    const mode = opts.io ?? "auto";
    this.syncMax = mode === "async" ? -1 : (opts.syncMax ?? 1024 * 1024);
    this.slowMs = mode === "auto" ? (opts.slowCallMs ?? 2) : -1;
    this.holdMs = opts.asyncHoldMs ?? 1000;
    this.asyncUntil = 0;
  }

  /** True when a call of `length` bytes should be made on the event loop now. */
  private syncOk(length: number): boolean {
    return length <= this.syncMax && (this.asyncUntil === 0 || this.asyncUntil <= performance.now());
  }

  /**
   * Notes how long a synchronous call begun at `start` (performance.now) took. Slow calls send the
   * calls of the next `holdMs` to the pool once they are not a fluke: each adds 1 to a score that
   * decays by 1/16 per call, and SLOW_SCORE switches. A call the scheduler merely preempted (one in
   * thousands when the client shares the CPUs) never gets there; a disk that is slow on every call
   * does on its third.
   */
  private timed(start: number): void {
    if (this.slowMs < 0) return;
    const slow = performance.now() - start >= this.slowMs;
    this.slowScore = this.slowScore * (15 / 16) + (slow ? 1 : 0);
    if (this.slowScore >= SLOW_SCORE) {
      this.slowScore = 0;
      this.asyncUntil = performance.now() + this.holdMs;
    }
  }

  private readChunk(fd: number, buf: Buffer, pos: number, offset: number, length: number): Promise<number> | number {
    if (!this.syncOk(length)) return readAt(fd, buf, pos, offset, length);
    const start = performance.now();
    const n = fs.readSync(fd, buf, pos, length, offset);
    this.timed(start);
    return n;
  }

  private writeChunk(fd: number, buf: Buffer, pos: number, offset: number, length: number): Promise<number> | number {
    if (!this.syncOk(length)) return writeAt(fd, buf, pos, offset, length);
    const start = performance.now();
    const n = fs.writeSync(fd, buf, pos, length, offset);
    this.timed(start);
    return n;
  }

  describe(): string {
    return `file:${this.opts.path}`;
  }

  async open(): Promise<void> {
    const readOnly = !!this.opts.readOnly;
    this.fd = fs.openSync(this.opts.path, readOnly ? "r" : "r+");
    const st = fs.fstatSync(this.fd);
    if (st.isFile()) this.bytes = st.size;
    else if (st.isBlockDevice()) this.bytes = blockDeviceSize(st.rdev);
    else {
      fs.closeSync(this.fd);
      this.fd = -1;
      throw new NbdError("EINVAL", `${this.opts.path}: not a regular file or block device`);
    }
    const writable = !readOnly;
    const trim = writable && st.isFile() && this.opts.discard !== false;
    this.puncher = trim
      ? new HolePuncher({ file: filePathOf(this.fd, this.opts.path), runner: this.opts.punchRunner, onFailure: this.opts.onPunchFailure })
      : null;
    this.caps = {
      writable,
      flush: writable,
      fua: writable,
      trim,
      zero: writable,
      fastZero: false,
      cache: true,
      extents: true,
      depth: true,
      multiConn: true,
      blockSize: { minimum: 1, preferred: 4096, maximum: 0x7fffffff },
    };
  }

  async close(): Promise<void> {
    if (this.fd < 0) return;
    await this.tracker.idle();
    const fd = this.fd;
    this.fd = -1;
    if (this.caps.writable) await fdatasync(fd).catch(() => undefined);
    fs.closeSync(fd);
  }

  size(): number {
    return this.bytes;
  }
  capabilities(): Capabilities {
    return this.caps;
  }

  private live(): number {
    if (this.fd < 0) throw new NbdError("ESHUTDOWN", `${this.opts.path} is closed`);
    return this.fd;
  }

  // pread and pwrite: a call that may run on the event loop (see IoMode) is made before they
  // return, which then hand back an already settled promise; nothing can interleave with it, so it
  // skips the in-flight tracker. Other calls go to the async versions.
  pread(buf: Buffer, offset: number, _io: Io): Promise<void> {
    if (this.fd >= 0 && this.syncOk(buf.length)) {
      try {
        this.readNow(this.fd, buf, offset);
        return DONE;
      } catch (err) {
        return Promise.reject(err);
      }
    }
    return this.preadAsync(buf, offset);
  }

  pwrite(buf: Buffer, offset: number, io: Io): Promise<void> {
    if (this.fd >= 0 && !io.fua && this.syncOk(buf.length) && !this.puncher?.busy) {
      try {
        const start = performance.now();
        for (let done = 0; done < buf.length; ) done += fs.writeSync(this.fd, buf, done, buf.length - done, offset + done);
        this.timed(start);
        return DONE;
      } catch (err) {
        return Promise.reject(err);
      }
    }
    return this.pwriteAsync(buf, offset, io);
  }

  private readNow(fd: number, buf: Buffer, offset: number): void {
    const start = performance.now();
    for (let done = 0; done < buf.length; ) {
      const n = fs.readSync(fd, buf, done, buf.length - done, offset + done);
      if (n === 0) {
        buf.fill(0, done); // the file shrank under us: never leak stale memory
        break;
      }
      done += n;
    }
    this.timed(start);
  }

  private async preadAsync(buf: Buffer, offset: number): Promise<void> {
    const fd = this.live();
    this.tracker.enter();
    try {
      let done = 0;
      while (done < buf.length) {
        const n = await this.readChunk(fd, buf, done, offset + done, buf.length - done);
        if (n === 0) {
          buf.fill(0, done); // the file shrank under us: never leak stale memory
          break;
        }
        done += n;
      }
    } finally {
      this.tracker.leave();
    }
  }

  private async writeAll(fd: number, buf: Buffer, offset: number): Promise<void> {
    let done = 0;
    while (done < buf.length) done += await this.writeChunk(fd, buf, done, offset + done, buf.length - done);
  }

  private async pwriteAsync(buf: Buffer, offset: number, io: Io): Promise<void> {
    const fd = this.live();
    this.tracker.enter();
    try {
      await this.ordered(offset, buf.length, () => this.writeAll(fd, buf, offset));
      if (io.fua) await fdatasync(fd);
    } finally {
      this.tracker.leave();
    }
  }

  /**
   * Runs a write of [offset, offset + length) in order with trims (when trim is offered): after any
   * punch over the range queued before it, and known to punches queued while it runs.
   */
  private async ordered(offset: number, length: number, write: () => Promise<void>): Promise<void> {
    const p = this.puncher;
    const end = offset + length;
    if (p?.busy) await p.waitFor(offset, end);
    const entry = { offset, end, done: write() };
    this.inflightWrites.add(entry);
    try {
      await entry.done;
    } finally {
      this.inflightWrites.delete(entry);
    }
  }

  async zero(length: number, offset: number, io: Io): Promise<void> {
    if (io.fast) throw new NbdError("ENOTSUP", "fast zero is not possible on a file port");
    const fd = this.live();
    this.zeroed = true;
    this.tracker.enter();
    try {
      await this.ordered(offset, length, async () => {
        let done = 0;
        while (done < length) {
          const n = Math.min(ZERO_CHUNK.length, length - done);
          await this.writeAll(fd, ZERO_CHUNK.subarray(0, n), offset + done);
          done += n;
        }
      });
      if (io.fua) await fdatasync(fd);
    } finally {
      this.tracker.leave();
    }
  }

  /**
   * Punches a hole (see hole-puncher.ts): resolves once it is punched; after it the range reads as
   * zeroes. With FUA, fdatasync follows.
   */
  async trim(length: number, offset: number, io: Io): Promise<void> {
    const p = this.puncher;
    if (!p) throw new NbdError("ENOTSUP", `trim is not offered on ${this.opts.path}`);
    const fd = this.live();
    this.tracker.enter();
    try {
      const end = offset + length;
      const before: Promise<unknown>[] = [];
      for (const w of this.inflightWrites) if (w.offset < end && offset < w.end) before.push(w.done);
      this.zeroed = true; // a punched hole reads as zeroes: block status looks for them
      await p.punch(offset, length, before.length ? Promise.allSettled(before) : null);
      if (io.fua) await fdatasync(fd);
    } finally {
      this.tracker.leave();
    }
  }

  /**
   * Resolves once the writes and zeroes in flight now over [offset, offset + length) are done
   * (failed or not). Writes made on the event loop are done when pwrite returns.
   */
  settled(length: number, offset: number): Promise<void> {
    const end = offset + length;
    const before: Promise<unknown>[] = [];
    for (const w of this.inflightWrites) if (w.offset < end && offset < w.end) before.push(w.done);
    return before.length ? Promise.allSettled(before).then(() => undefined) : DONE;
  }

  /** Punches done so far (ranges after coalescing, and processes run), when trim is offered. */
  punchStats(): { ranges: number; processes: number } | null {
    return this.puncher ? { ...this.puncher.stats } : null;
  }

  async flush(_io: Io): Promise<void> {
    const fd = this.live();
    this.tracker.enter();
    try {
      await fdatasync(fd);
    } finally {
      this.tracker.leave();
    }
  }

  /** Reads the range so it sits in the page cache (Node.js has no posix_fadvise). */
  async cache(length: number, offset: number, _io: Io): Promise<void> {
    const fd = this.live();
    this.tracker.enter();
    const backing = ioBuffers.acquire(Math.min(length, SCAN_PIECE));
    try {
      const scratch = backing.subarray(0, Math.min(length, SCAN_PIECE));
      for (let done = 0; done < length; ) {
        const n = await readAt(fd, scratch, 0, offset + done, Math.min(scratch.length, length - done));
        if (n === 0) break;
        done += n;
      }
    } finally {
      ioBuffers.release(backing);
      this.tracker.leave();
    }
  }

  /**
   * Node.js has no lseek(SEEK_DATA), so zero blocks are found by reading. That costs a second read of
   * everything a copying client reads, so it is done only where it can find something: in a sparse
   * file (fewer blocks allocated than its size), or once this port has written zeroes. A fully
   * allocated file that was never zeroed is reported as data without reading, as nbdkit's file
   * plugin reports allocated ranges.
   */
  async extents(length: number, offset: number, io: Io, kind: ExtentKind = "allocation"): Promise<Extent[]> {
    const fd = this.live();
    if (kind === "depth") return [{ length, flags: 1 }]; // a raw file holds every byte it has
    if (!this.zeroed) {
      const st = fs.fstatSync(fd);
      if (st.isFile() && st.blocks * 512 >= st.size) return [{ length, flags: 0 }];
    }
    const end = offset + Math.min(length, EXTENTS_SCAN_MAX);
    const backing = ioBuffers.acquire(Math.min(end - offset, SCAN_PIECE));
    try {
      const out: Extent[] = [];
      // Pieces of at most SCAN_PIECE that end on 4 KiB boundaries of the device (or at the end), so
      // no block spans two of them.
      for (let at = offset; at < end; ) {
        let stop = Math.min(end, at + SCAN_PIECE);
        if (stop < end) stop -= stop % 4096;
        const buf = backing.subarray(0, stop - at);
        await this.pread(buf, at, io);
        // 4 KiB granularity, aligned to the device (the first block may be partial). A block with a
        // non-zero first, middle or last byte is data without comparing the rest (most data blocks).
        let pos = 0;
        while (pos < buf.length) {
          const blockEnd = Math.min(buf.length, (Math.floor((at + pos) / 4096) + 1) * 4096 - at);
          const n = blockEnd - pos;
          const isZero =
            buf[pos] === 0 && buf[blockEnd - 1] === 0 && buf[(pos + blockEnd) >>> 1] === 0 && buf.subarray(pos, blockEnd).equals(n === 4096 ? ZERO_BLOCK : ZERO_BLOCK.subarray(0, n));
          const flags = isZero ? State.NBD_STATE_ZERO : 0;
          const last = out[out.length - 1];
          if (last && last.flags === flags) last.length += n;
          else out.push({ length: n, flags });
          pos = blockEnd;
        }
        at = stop;
      }
      return out;
    } finally {
      ioBuffers.release(backing);
    }
  }

  quiesce(): Promise<void> {
    return this.tracker.idle();
  }
  resume(): void {}
}

export function createFilePort(opts: FilePortOptions): FilePort {
  return new FilePort(opts);
}
