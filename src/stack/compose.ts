import path from "node:path";
import { Export } from "../server/export.js";
import { parseSize } from "../util/size.js";
import { createDiskLayer, type DiskLayerOptions } from "./disk/disk-layer.js";
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

/** Builds an export's stack from the bottom up: port → disk layer. */
export function composeExport(spec: ExportSpec): Export {
  const port = createPort(spec.source, !!spec.readOnly, spec.io);
  const top = createDiskLayer(port, spec.disk);
  return new Export(spec.name ?? defaultExportName(spec.source), top, spec.description);
}
