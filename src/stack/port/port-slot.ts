import { NbdError } from "../../errors.js";
import type { Capabilities, Extent, Io, Layer } from "../layer.js";

/**
 * A place for a port that comes and goes (port A of a node: opened when the node owns the
 * resource, closed when it hands it over), so that layers above it — a fault layer with its
 * rules — live on across hand-overs. `open()` opens a fresh port from the factory.
 */
export class PortSlot implements Layer {
  private port: Layer | null = null;
  private last: Layer | null = null;

  constructor(private readonly factory: () => Layer) {}

  private get p(): Layer {
    if (!this.port) throw new NbdError("ESHUTDOWN", "port is closed");
    return this.port;
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
    return this.p.pread(buf, offset, io);
  }
  pwrite(buf: Buffer, offset: number, io: Io): Promise<void> {
    return this.p.pwrite(buf, offset, io);
  }
  zero(length: number, offset: number, io: Io): Promise<void> {
    return this.p.zero(length, offset, io);
  }
  trim(length: number, offset: number, io: Io): Promise<void> {
    return this.p.trim(length, offset, io);
  }
  flush(io: Io): Promise<void> {
    return this.p.flush(io);
  }
  cache(length: number, offset: number, io: Io): Promise<void> {
    return this.p.cache(length, offset, io);
  }
  extents(length: number, offset: number, io: Io): Promise<Extent[]> {
    return this.p.extents(length, offset, io);
  }
  quiesce(): Promise<void> {
    return this.port ? this.port.quiesce() : Promise.resolve();
  }
  resume(): void {
    this.port?.resume();
  }
}
