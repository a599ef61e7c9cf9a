import path from "node:path";
import { Export } from "../server/export.js";
import { parseSize } from "../util/size.js";
import { createDiskLayer, type DiskLayerOptions } from "./disk/disk-layer.js";
import { FaultLayer, type FaultLayerOptions } from "./fault/fault-layer.js";
import type { Layer } from "./layer.js";
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
