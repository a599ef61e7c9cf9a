import { NbdError } from "../../errors.js";
import { State } from "../../protocol/constants.js";
import type { Capabilities, Extent, ExtentKind, Io, Layer } from "../layer.js";

export interface MemoryPortOptions {
  size: number;
  readOnly?: boolean;
  /** Alignment the port demands of every request (tests of the disk layer's read-modify-write). */
  alignment?: number;
  /** Largest request the port accepts (tests of the disk layer's splitting). */
  maxRequest?: number;
}

const PAGE = 64 * 1024;

/**
 * A sparse in-memory device: 64 KiB pages allocated on first write, freed by trim
 * and by zero without NO_HOLE. Like nbdkit's memory plugin; used for `memory:SIZE` exports and tests.
 */
export class MemoryPort implements Layer {
  private readonly pages = new Map<number, Buffer>();
  private readonly sizeBytes: number;
  private readonly caps: Capabilities;

  constructor(opts: MemoryPortOptions) {
    if (!Number.isSafeInteger(opts.size) || opts.size < 0) throw new NbdError("EINVAL", `bad memory size ${opts.size}`);
    this.sizeBytes = opts.size;
    const writable = !opts.readOnly;
    this.caps = {
      writable,
      flush: writable,
      fua: writable,
      trim: writable,
      zero: writable,
      fastZero: writable,
      cache: true,
      extents: true,
      depth: true,
      multiConn: true,
      blockSize: {
        minimum: opts.alignment ?? 1,
        preferred: Math.max(4096, opts.alignment ?? 1),
        maximum: opts.maxRequest ?? 0x7fffffff,
      },
    };
  }

  describe(): string {
    return `memory:${this.sizeBytes}`;
  }
  async open(): Promise<void> {}
  /** The contents live as long as the port object (a closed port can be opened again). */
  async close(): Promise<void> {}
  size(): number {
    return this.sizeBytes;
  }
  capabilities(): Capabilities {
    return this.caps;
  }

  /** Bytes of pages currently allocated (for tests of trim and zero). */
  allocatedBytes(): number {
    return this.pages.size * PAGE;
  }

  private check(offset: number, length: number): void {
    const a = this.caps.blockSize.minimum;
    if (offset % a !== 0 || length % a !== 0) throw new NbdError("EINVAL", `unaligned request to aligned port: ${length}@${offset}`);
    if (length > this.caps.blockSize.maximum) throw new NbdError("EINVAL", `request of ${length} over port maximum`);
    if (offset + length > this.sizeBytes) throw new NbdError("EINVAL", `request beyond end: ${length}@${offset}`);
  }

  async pread(buf: Buffer, offset: number, _io: Io): Promise<void> {
    this.check(offset, buf.length);
    let done = 0;
    while (done < buf.length) {
      const pos = offset + done;
      const pageNo = Math.floor(pos / PAGE);
      const inPage = pos - pageNo * PAGE;
      const n = Math.min(PAGE - inPage, buf.length - done);
      const page = this.pages.get(pageNo);
      if (page) page.copy(buf, done, inPage, inPage + n);
      else buf.fill(0, done, done + n);
      done += n;
    }
  }

  async pwrite(buf: Buffer, offset: number, _io: Io): Promise<void> {
    this.check(offset, buf.length);
    let done = 0;
    while (done < buf.length) {
      const pos = offset + done;
      const pageNo = Math.floor(pos / PAGE);
      const inPage = pos - pageNo * PAGE;
      const n = Math.min(PAGE - inPage, buf.length - done);
      let page = this.pages.get(pageNo);
      if (!page) {
        page = Buffer.alloc(PAGE);
        this.pages.set(pageNo, page);
      }
      buf.copy(page, inPage, done, done + n);
      done += n;
    }
  }

  private clear(length: number, offset: number, free: boolean): void {
    let done = 0;
    while (done < length) {
      const pos = offset + done;
      const pageNo = Math.floor(pos / PAGE);
      const inPage = pos - pageNo * PAGE;
      const n = Math.min(PAGE - inPage, length - done);
      const page = this.pages.get(pageNo);
      if (page) {
        if (free && n === PAGE) this.pages.delete(pageNo);
        else page.fill(0, inPage, inPage + n);
      }
      done += n;
    }
  }

  async zero(length: number, offset: number, io: Io): Promise<void> {
    this.check(offset, length);
    this.clear(length, offset, io.mayTrim);
  }

  async trim(length: number, offset: number, _io: Io): Promise<void> {
    this.check(offset, length);
    this.clear(length, offset, true);
  }

  async flush(_io: Io): Promise<void> {}

  async cache(length: number, offset: number, _io: Io): Promise<void> {
    this.check(offset, length);
  }

  async extents(length: number, offset: number, _io: Io, kind: ExtentKind = "allocation"): Promise<Extent[]> {
    this.check(offset, length);
    if (kind === "depth") return [{ length, flags: 1 }]; // like a raw file: every byte is its own
    const out: Extent[] = [];
    let done = 0;
    while (done < length) {
      const pos = offset + done;
      const pageNo = Math.floor(pos / PAGE);
      const n = Math.min(PAGE - (pos - pageNo * PAGE), length - done);
      const flags = this.pages.has(pageNo) ? 0 : State.NBD_STATE_HOLE | State.NBD_STATE_ZERO;
      const last = out[out.length - 1];
      if (last && last.flags === flags) last.length += n;
      else out.push({ length: n, flags });
      done += n;
    }
    return out;
  }

  async quiesce(): Promise<void> {}
  resume(): void {}
}

export function createMemoryPort(opts: MemoryPortOptions): MemoryPort {
  return new MemoryPort(opts);
}
