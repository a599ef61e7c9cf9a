import path from "node:path";
import { Export } from "../server/export.js";
import { parseSize } from "../util/size.js";
import { createDiskLayer, type DiskLayer, type DiskLayerOptions } from "./disk/disk-layer.js";
import { PartitionLayer } from "./partition/partition-layer.js";
import { PartitionTableError, readPartitionTable, type PartitionTable } from "./partition/partition-table.js";
import { FaultLayer, type FaultLayerOptions } from "./fault/fault-layer.js";
import { plainIo, type Layer } from "./layer.js";
import { createFilePort, type IoMode } from "./port/file-port.js";
import { createMemoryPort } from "./port/memory-port.js";

export interface ExportSpec {
  /** An image path, or `memory:SIZE` for a sparse in-memory device. */
  source: string;
  name?: string;
  description?: string;
  readOnly?: boolean;
  /** How a file port calls the kernel (see IoMode). */
  io?: IoMode;
  disk?: DiskLayerOptions;
  /** Insert a fault layer (no rules yet) directly above the port. */
  fault?: FaultLayerOptions;
}

/** The port at the bottom of a stack for `source`. */
export function createPort(source: string, readOnly: boolean, io?: IoMode): Layer {
  if (source.startsWith("memory:")) return createMemoryPort({ size: parseSize(source.slice(7)), readOnly });
  return createFilePort({ path: source, readOnly, io });
}

/** Default export name: the image's base name without extension; "memory" for memory devices. */
export function defaultExportName(source: string): string {
  if (source.startsWith("memory:")) return "memory";
  const base = path.basename(source);
  const dot = base.lastIndexOf(".");
  return dot > 0 ? base.slice(0, dot) : base;
}

/**
 * Builds an export's stack from the bottom up: port → (fault) → disk layer. A fault layer, if
 * asked for, is handed to `onFault` so it can be steered at run time.
 */
export function composeExport(spec: ExportSpec, onFault?: (name: string, f: FaultLayer) => void): Export {
  const name = spec.name ?? defaultExportName(spec.source);
  let below: Layer = createPort(spec.source, !!spec.readOnly, spec.io);
  if (spec.fault) {
    const f = new FaultLayer(below, spec.fault);
    onFault?.(name, f);
    below = f;
  }
  return new Export(name, createDiskLayer(below, spec.disk), spec.description);
}

/**
 * The exports NAME/p1, NAME/p2… of the partitions found on an opened whole-device export; they
 * share its stack below the disk layer. A missing or corrupt table gives no partition exports
 * and a reason, never an error: the whole-device export is served either way.
 */
export async function partitionExports(whole: Export, disk?: DiskLayerOptions): Promise<{ exports: Export[]; table: PartitionTable | null; reason?: string }> {
  const below = (whole.layer as DiskLayer).below();
  try {
    const table = await readPartitionTable(async (length, offset) => {
      const b = Buffer.alloc(length);
      await below.pread(b, offset, plainIo);
      return b;
    }, below.size());
    if (!table) return { exports: [], table: null, reason: "no partition table" };
    const exports = table.partitions.map((p) => new Export(`${whole.name}/p${p.index}`, createDiskLayer(new PartitionLayer(below, p, table.scheme), disk)));
    return { exports, table };
  } catch (err) {
    if (err instanceof PartitionTableError) return { exports: [], table: null, reason: err.message };
    throw err;
  }
}
