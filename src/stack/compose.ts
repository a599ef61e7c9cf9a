import fs from "node:fs";
import path from "node:path";
import type { Logger } from "pino";
import { formatStack, parseStackItem } from "../config/stack-spec.js";
import { ConfigError } from "../config/values.js";
import { NbdError } from "../errors.js";
import { Export } from "./export.js";
import { createDiskLayer, DiskLayer, type DiscardMode, type DiskLayerOptions } from "./disk/disk-layer.js";
import type { FaultLayerOptions } from "./fault/fault-layer.js";
import { imageKind, kindNamed, kindOf, type LayerSpec, type StackSpec } from "./kinds.js";
import type { Layer } from "./layer.js";
import type { BuildContext } from "./layer-kind.js";
import { LazyLayer } from "./lazy-layer.js";
import { readerOf } from "./partition/partition-kind.js";
import { PartitionLayer } from "./partition/partition-layer.js";
import { PartitionTableError, readPartitionTable, type PartitionTable } from "./partition/partition-table.js";
import type { IoMode } from "./port/file-port.js";
import { StackHandles } from "./stack-handles.js";

export type { BuildContext } from "./layer-kind.js";
export { StackHandles } from "./stack-handles.js";

/**
 * An export from the command line: an image (or memory:SIZE) with optional shorthands, or a
 * declared stack (config file). Shorthands become stack items: source → file/memory,
 * overlay → cow, fault → fault directly above the port.
 */
export interface ExportSpec {
  /** An image path, or `memory:SIZE` for a sparse in-memory device. Ignored when `stack` is given. */
  source: string;
  name?: string;
  description?: string;
  readOnly?: boolean;
  /** How file ports call the kernel (see IoMode). */
  io?: IoMode;
  /** serve --discard: offer trim where the stack honours it (`unmap`, default) or never (`ignore`). */
  discard?: DiscardMode;
  disk?: DiskLayerOptions;
  /** Insert a fault layer (no rules yet) directly above the port. */
  fault?: FaultLayerOptions;
  /**
   * An overlay file above the image, which then stays unmodified: a qcow2 overlay whose backing
   * file is the image when its name ends in .qcow2 (or it is a qcow2 image already), else a cow overlay.
   */
  overlay?: string;
  /** The whole stack, bottom-up (from a config file). */
  stack?: StackSpec;
}

/** Default export name: the image's base name without extension; "memory" for memory devices. */
export function defaultExportName(source: string): string {
  if (source.startsWith("memory:")) return "memory";
  const base = path.basename(source);
  const dot = base.lastIndexOf(".");
  return dot > 0 ? base.slice(0, dot) : base;
}

/**
 * Whether the `--fault` shorthand adds a fault layer directly above the port of `spec`'s stack:
 * yes when asked for, unless a declared stack has a fault layer answering to the export's name.
 */
function faultAbovePort(spec: ExportSpec): boolean {
  if (!spec.fault) return false;
  const name = spec.name ?? defaultExportName(spec.source);
  return !spec.stack?.some((l) => l.kind === "fault" && (l.id ?? name) === name);
}

/**
 * The stack an ExportSpec declares, the shorthands becoming ordinary items parsed by their kinds:
 * the source → `memory:`, or the kind that claims the image (`qcow2:` by its magic, else `file:`),
 * --fault → `fault` directly above it, --overlay → `cow:` on top.
 */
export function stackOf(spec: ExportSpec): StackSpec {
  const here = { baseDir: process.cwd() };
  const f = spec.fault;
  const fault = faultAbovePort(spec) ? [parseStackItem({ fault: null, ...(f!.seed !== undefined ? { seed: f!.seed } : {}), ...(f!.powerloss ? { powerloss: true } : {}) }, 1, "--fault", here)] : [];
  if (spec.stack) return [spec.stack[0]!, ...fault, ...spec.stack.slice(1)];
  if (spec.overlay && isQcow2Overlay(spec.overlay)) {
    if (spec.source.startsWith("memory:")) throw new Error(`--overlay ${spec.overlay}: a qcow2 overlay needs an image file below it, not ${spec.source}`);
    const format = imageKind(spec.source).name === "qcow2" ? "qcow2" : "raw";
    const item = parseStackItem({ qcow2: spec.overlay }, 0, "--overlay", here);
    if (item.kind !== "qcow2") throw new Error("unreachable");
    return [{ ...item, overlayOf: { image: path.resolve(spec.source), format } }, ...fault];
  }
  const bottom = spec.source.startsWith("memory:")
    ? parseStackItem({ memory: spec.source.slice(7) }, 0, "source", here)
    : // The image under an overlay is only ever read.
      parseStackItem({ [imageKind(spec.source).name]: spec.source, ...(spec.overlay ? { "read-only": true } : {}) }, 0, "source", here);
  const stack: StackSpec = [bottom, ...fault];
  if (spec.overlay) stack.push(parseStackItem({ cow: spec.overlay }, stack.length, "--overlay", here));
  return stack;
}

/** An --overlay file that means a qcow2 overlay: named *.qcow2, or a qcow2 image already. */
function isQcow2Overlay(file: string): boolean {
  return /\.qcow2$/i.test(file) || (fs.existsSync(file) && imageKind(file).name === "qcow2");
}

/** The bottom device of a stack (a port, or a volume over stacks of their own). */
export function buildBottom(l: LayerSpec, ctx: BuildContext): Layer {
  const kind = kindOf(l);
  if (!kind.bottom) throw new ConfigError(l.kind, `"${l.kind}" cannot be at the bottom of a stack`);
  return kind.bottom(l, ctx, (s, readOnly) => buildStack(s, readOnly ? { ...ctx, readOnly: true } : ctx));
}

/**
 * One layer over `below`. A kind with a prepare hook is built when the stack opens: the lazy
 * layer opens `below`, runs the hook on it (the partition table read) and builds the layer then.
 */
export function buildLayer(l: LayerSpec, below: Layer, ctx: BuildContext): Layer {
  const kind = kindOf(l);
  if (!kind.above) throw new ConfigError(l.kind, `the ${l.kind} layer cannot be above another one`);
  if (!kind.prepare) return kind.above(l, below, ctx, undefined);
  const label = kind.format(l, formatStack).replace(":", " ");
  return new LazyLayer(below, label, async (dev) => {
    const prepared = await kind.prepare!(l, dev);
    return kind.above!(l, dev, ctx, prepared);
  });
}

/**
 * Loads the code of every kind `stack` names, in nested stacks too (a volume's devices, a qcow2
 * image's backing stack): see LayerKind.load. buildStack, buildLayer and composeNodeExport need it
 * done first (StorageNode.createExport does it before it takes the lease); composeExport does it itself.
 */
export async function loadKinds(stack: StackSpec): Promise<void> {
  const loads: Promise<void>[] = [];
  const walk = (x: unknown): void => {
    if (Array.isArray(x)) x.forEach(walk);
    else if (x !== null && typeof x === "object") {
      const kind = (x as { kind?: unknown }).kind;
      if (typeof kind === "string") {
        const k = kindNamed(kind);
        if (k?.load) loads.push(k.load());
      }
      Object.values(x).forEach(walk);
    }
  };
  walk(stack);
  await Promise.all(loads);
}

/** Builds a declared stack bottom-up (its kinds' code loaded: loadKinds); the result is not open yet. */
export function buildStack(stack: StackSpec, ctx: BuildContext): Layer {
  let layer = buildBottom(stack[0]!, ctx);
  for (const l of stack.slice(1)) layer = buildLayer(l, layer, ctx);
  return layer;
}

export function contextOf(spec: ExportSpec, name: string, handles: StackHandles, log?: Logger): BuildContext {
  return { exportName: name, readOnly: !!spec.readOnly, io: spec.io, discard: spec.discard, log: log ?? spec.fault?.log, handles };
}

export function exportOver(spec: ExportSpec, name: string, below: Layer, description?: string | (() => string)): Export {
  return new Export(name, createDiskLayer(below, { ...spec.disk, readOnly: spec.readOnly, discard: spec.discard }), description);
}

/**
 * Builds an export: the declared stack (or the shorthands) with the disk layer on top. Layers
 * that can be steered at run time go into `handles`.
 */
export async function composeExport(spec: ExportSpec, handles: StackHandles = new StackHandles(), log?: Logger): Promise<Export> {
  const name = spec.name ?? defaultExportName(spec.source);
  const stack = stackOf(spec);
  await loadKinds(stack);
  return exportOver(spec, name, buildStack(stack, contextOf(spec, name, handles, log)), spec.description);
}

export { formatStack };

/**
 * The exports NAME/p1, NAME/p2… of the partitions found on an opened whole-device export; they
 * share its stack below the disk layer. A missing or corrupt table gives no partition exports
 * and a reason, never an error: the whole-device export is served either way.
 */
export async function partitionExports(whole: Export, disk?: DiskLayerOptions): Promise<{ exports: Export[]; table: PartitionTable | null; reason?: string }> {
  if (!(whole.layer instanceof DiskLayer)) throw new Error(`${whole.name}: not built by the stack builder (no disk layer on top)`);
  const below = whole.layer.below();
  try {
    const table = await readPartitionTable(readerOf(below), below.size());
    if (!table) return { exports: [], table: null, reason: "no partition table" };
    // A partition of a read-only export is read-only too, whatever the layers below could do.
    const opts = { ...disk, readOnly: disk?.readOnly || !whole.capabilities().writable };
    const exports = table.partitions.map((p) => new Export(`${whole.name}/p${p.index}`, createDiskLayer(new PartitionLayer(below, p, table.scheme), opts)));
    return { exports, table };
  } catch (err) {
    // A table that cannot be read (an I/O error, a fault rule) is no reason to stop serving the whole device either.
    if (err instanceof PartitionTableError) return { exports: [], table: null, reason: err.message };
    if (err instanceof NbdError) return { exports: [], table: null, reason: `partition table unreadable: ${err.message}` };
    throw err;
  }
}
