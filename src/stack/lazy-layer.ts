import { NbdError } from "../errors.js";
import type { Capabilities, Extent, ExtentKind, Io, Layer } from "./layer.js";

/**
 * A layer that can only be built once the device below is open — partition N (the table must be
 * read first), a file inside a file system (it must be found first). `open()` opens the device
 * below, then builds the real layer over it and opens that; every call goes to the built layer.
 * The lazy layer owns the device below (opens and closes it); the built layer must not.
 */
export class LazyLayer implements Layer {
  private inner: Layer | null = null;

  constructor(
    private readonly below: Layer,
    private readonly label: string,
    private readonly build: (below: Layer) => Promise<Layer>,
  ) {}

  private get l(): Layer {
    if (!this.inner) throw new NbdError("ESHUTDOWN", `${this.label} is not open`);
    return this.inner;
  }
  describe(): string {
    return this.inner ? this.inner.describe() : `${this.label} → ${this.below.describe()}`;
  }
  async open(): Promise<void> {
    await this.below.open();
    try {
      const inner = await this.build(this.below);
      await inner.open();
      this.inner = inner;
    } catch (err) {
      await this.below.close().catch(() => {});
      throw err;
    }
  }
  async close(): Promise<void> {
    const inner = this.inner;
    this.inner = null;
    await inner?.close();
    await this.below.close();
  }
  size(): number {
    return this.l.size();
  }
  capabilities(): Capabilities {
    return this.l.capabilities();
  }
  pread(buf: Buffer, offset: number, io: Io): Promise<void> {
    return this.l.pread(buf, offset, io);
  }
  pwrite(buf: Buffer, offset: number, io: Io): Promise<void> {
    return this.l.pwrite(buf, offset, io);
  }
  zero(length: number, offset: number, io: Io): Promise<void> {
    return this.l.zero(length, offset, io);
  }
  trim(length: number, offset: number, io: Io): Promise<void> {
    return this.l.trim(length, offset, io);
  }
  flush(io: Io): Promise<void> {
    return this.l.flush(io);
  }
  cache(length: number, offset: number, io: Io): Promise<void> {
    return this.l.cache(length, offset, io);
  }
  extents(length: number, offset: number, io: Io, kind?: ExtentKind): Promise<Extent[]> {
    return this.l.extents(length, offset, io, kind);
  }
  quiesce(): Promise<void> {
    return this.inner ? this.inner.quiesce() : this.below.quiesce();
  }
  resume(): void {
    if (this.inner) this.inner.resume();
    else this.below.resume();
  }
}
