import { NbdError } from "../../errors.js";
import type { Capabilities, Extent, ExtentKind, Io, Layer } from "../layer.js";

/**
 * A place for a port that comes and goes (port A of a node: opened when the node owns the
 * resource, closed when it hands it over), so that layers above it — a fault layer with its
 * rules — live on across hand-overs. `open()` opens a fresh port from the factory.
 */
export class PortSlot implements Layer {
  private port: Layer | null = null;
  private last: Layer | null = null;

  constructor(private readonly factory: () => Layer) {}

  /** Layer calls fail by rejecting, never by throwing: a closed slot answers with this. */
  private closed(): Promise<never> {
    return Promise.reject(new NbdError("ESHUTDOWN", "port is closed"));
  }
  describe(): string {
    return (this.port ?? this.last ?? this.factory()).describe();
  }
  async open(): Promise<void> {
    const p = this.factory();
    await p.open();
    this.port = this.last = p;
  }
  async close(): Promise<void> {
    const p = this.port;
    this.port = null;
    await p?.close();
  }
  size(): number {
    return (this.port ?? this.last)!.size();
  }
  capabilities(): Capabilities {
    return (this.port ?? this.last)!.capabilities();
  }
  pread(buf: Buffer, offset: number, io: Io): Promise<void> {
    return this.port ? this.port.pread(buf, offset, io) : this.closed();
  }
  pwrite(buf: Buffer, offset: number, io: Io): Promise<void> {
    return this.port ? this.port.pwrite(buf, offset, io) : this.closed();
  }
  zero(length: number, offset: number, io: Io): Promise<void> {
    return this.port ? this.port.zero(length, offset, io) : this.closed();
  }
  trim(length: number, offset: number, io: Io): Promise<void> {
    return this.port ? this.port.trim(length, offset, io) : this.closed();
  }
  flush(io: Io): Promise<void> {
    return this.port ? this.port.flush(io) : this.closed();
  }
  cache(length: number, offset: number, io: Io): Promise<void> {
    return this.port ? this.port.cache(length, offset, io) : this.closed();
  }
  extents(length: number, offset: number, io: Io, kind?: ExtentKind): Promise<Extent[]> {
    return this.port ? this.port.extents(length, offset, io, kind) : this.closed();
  }
  quiesce(): Promise<void> {
    return this.port ? this.port.quiesce() : Promise.resolve();
  }
  resume(): void {
    this.port?.resume();
  }
}
