import { PassthroughLayer, type Capabilities, type Extent, type ExtentKind, type Io, type Layer } from "../layer.js";
import type { Partition, PartitionTable } from "./partition-table.js";

/**
 * Partition N of the device below as a device of its own: every offset is shifted by the
 * partition's start, and the size is the partition's length, so the guard at the top of the
 * partition's export keeps every request (and every write) inside the partition.
 * The device below belongs to the whole-device export: this layer neither opens nor closes it.
 */
export class PartitionLayer extends PassthroughLayer {
  constructor(
    next: Layer,
    readonly part: Partition,
    private readonly scheme: PartitionTable["scheme"],
  ) {
    super(next);
  }

  override describe(): string {
    const p = this.part;
    const label = p.name ? ` "${p.name}"` : "";
    return `partition ${p.index} (${this.scheme}${label}, ${p.length} bytes at ${p.start}) → ${this.next.describe()}`;
  }
  override async open(): Promise<void> {}
  override async close(): Promise<void> {}
  override size(): number {
    return this.part.length;
  }
  override capabilities(): Capabilities {
    return this.next.capabilities();
  }
  override pread(buf: Buffer, offset: number, io: Io): Promise<void> {
    return this.next.pread(buf, this.part.start + offset, io);
  }
  override pwrite(buf: Buffer, offset: number, io: Io): Promise<void> {
    return this.next.pwrite(buf, this.part.start + offset, io);
  }
  override zero(length: number, offset: number, io: Io): Promise<void> {
    return this.next.zero(length, this.part.start + offset, io);
  }
  override trim(length: number, offset: number, io: Io): Promise<void> {
    return this.next.trim(length, this.part.start + offset, io);
  }
  override cache(length: number, offset: number, io: Io): Promise<void> {
    return this.next.cache(length, this.part.start + offset, io);
  }
  override extents(length: number, offset: number, io: Io, kind?: ExtentKind): Promise<Extent[]> {
    return this.next.extents(length, this.part.start + offset, io, kind);
  }
}
