import path from "node:path";
import { parseSize } from "../util/size.js";

/**
 * The declaration of an export's stack, bottom-up: the first item is the device at the bottom
 * (an image file or memory, or a volume joining several stacks), each later item wraps the one
 * before it. The disk layer on top is implicit. Written in a config file as a list of one-key
 * maps, or in one line: "file:base.img → cow:overlay.img → partition:2 → fault".
 */
export type StackSpec = LayerSpec[];

export type LayerSpec =
  | { kind: "file"; path: string; readOnly?: boolean }
  | { kind: "memory"; size: number }
  | { kind: "concat"; devices: StackSpec[] }
  | { kind: "stripe"; devices: StackSpec[]; chunk: number }
  | { kind: "mirror"; devices: StackSpec[] }
  | { kind: "cow"; overlay: string; blockSize?: number }
  | { kind: "partition"; index: number }
  | { kind: "fault"; rules: string[]; seed?: number; powerloss?: boolean; id?: string }
  | { kind: "fs-file"; path: string };

/** A config error that names the key at fault, e.g. `exports[0].stack[2].partition`. */
export class ConfigError extends Error {
  constructor(
    readonly where: string,
    message: string,
  ) {
    super(where ? `${where}: ${message}` : message);
    this.name = "ConfigError";
  }
}

const BOTTOM = ["file", "memory", "concat", "stripe", "mirror"] as const;
const ABOVE = ["cow", "partition", "fault", "fs-file", "file"] as const;
/** Options each layer kind accepts beside its own key. */
const OPTIONS: Record<string, string[]> = {
  file: ["read-only"],
  memory: [],
  concat: [],
  stripe: ["chunk"],
  mirror: [],
  cow: ["block-size"],
  partition: [],
  fault: ["seed", "powerloss", "id"],
  "fs-file": [],
};

export interface SpecContext {
  /** Relative paths are resolved against this directory (the config file's). */
  baseDir: string;
}

function typeName(v: unknown): string {
  return v === null ? "null" : Array.isArray(v) ? "a list" : typeof v === "object" ? "a map" : `${typeof v} ${JSON.stringify(v)}`;
}

function str(v: unknown, where: string, what: string): string {
  if (typeof v !== "string" || v.trim() === "") throw new ConfigError(where, `expected ${what}, got ${typeName(v)}`);
  return v.trim();
}

function size(v: unknown, where: string): number {
  if (typeof v === "number" && Number.isSafeInteger(v) && v >= 0) return v;
  if (typeof v === "string") {
    try {
      return parseSize(v);
    } catch {
      /* fall through */
    }
  }
  throw new ConfigError(where, `expected a size such as 64k, 1M or 2G, got ${typeName(v)}`);
}

function bool(v: unknown, where: string): boolean {
  if (typeof v !== "boolean") throw new ConfigError(where, `expected true or false, got ${typeName(v)}`);
  return v;
}

/** Parses the one-line form of a stack: items joined by "→" or "->", each "kind:argument". */
export function parseStackLine(line: string, where: string, ctx: SpecContext): StackSpec {
  const items = line
    .split(/\s*(?:→|->)\s*/)
    .map((s) => s.trim())
    .filter((s) => s !== "");
  if (items.length === 0) throw new ConfigError(where, "empty stack");
  return items.map((item, i) => {
    const colon = item.indexOf(":");
    const kind = colon < 0 ? item : item.slice(0, colon);
    const arg = colon < 0 ? null : item.slice(colon + 1);
    return layerSpec(kind, arg, {}, i, `${where}[${i}]`, ctx);
  });
}

/** Validates a stack given as a config value: a one-line string or a list of one-key maps. */
export function parseStack(v: unknown, where: string, ctx: SpecContext): StackSpec {
  if (typeof v === "string") return parseStackLine(v, where, ctx);
  if (!Array.isArray(v) || v.length === 0) throw new ConfigError(where, `expected a non-empty list of layers (bottom first) or a line like "file:disk.img → partition:1", got ${typeName(v)}`);
  return v.map((item, i) => {
    const w = `${where}[${i}]`;
    if (typeof item === "string") {
      const colon = item.indexOf(":");
      return layerSpec(colon < 0 ? item : item.slice(0, colon), colon < 0 ? null : item.slice(colon + 1), {}, i, w, ctx);
    }
    if (item === null || typeof item !== "object" || Array.isArray(item)) throw new ConfigError(w, `expected a layer such as {partition: 1}, got ${typeName(item)}`);
    const keys = Object.keys(item);
    const kinds = keys.filter((k) => k in OPTIONS);
    if (kinds.length !== 1) {
      const unknown = keys.filter((k) => !(k in OPTIONS));
      throw new ConfigError(
        w,
        kinds.length === 0
          ? `no layer kind in {${keys.join(", ")}}; expected one of ${Object.keys(OPTIONS).join(", ")}${unknown.length ? ` (unknown key "${unknown[0]}")` : ""}`
          : `one layer per list item, found ${kinds.join(" and ")}`,
      );
    }
    const kind = kinds[0]!;
    const opts = item as Record<string, unknown>;
    for (const k of keys) if (k !== kind && !OPTIONS[kind]!.includes(k)) throw new ConfigError(`${w}.${k}`, `unknown option of ${kind}; ${OPTIONS[kind]!.length ? `expected ${OPTIONS[kind]!.join(", ")}` : "it takes none"}`);
    return layerSpec(kind, opts[kind], opts, i, w, ctx);
  });
}

function devices(v: unknown, where: string, ctx: SpecContext, min: number): StackSpec[] {
  if (!Array.isArray(v) || v.length < min) throw new ConfigError(where, `expected a list of at least ${min} devices (each an image like "file:a.img" or a stack), got ${typeName(v)}`);
  return v.map((d, i) => parseStack(typeof d === "string" || Array.isArray(d) ? d : [d], `${where}[${i}]`, ctx));
}

function layerSpec(kind: string, arg: unknown, opts: Record<string, unknown>, position: number, where: string, ctx: SpecContext): LayerSpec {
  const bottom = position === 0;
  if (!(kind in OPTIONS)) throw new ConfigError(where, `unknown layer "${kind}"; expected one of ${Object.keys(OPTIONS).join(", ")}`);
  if (bottom && !(BOTTOM as readonly string[]).includes(kind)) throw new ConfigError(where, `"${kind}" needs a device below it; a stack starts with ${BOTTOM.join(", ")}`);
  if (!bottom && !(ABOVE as readonly string[]).includes(kind)) throw new ConfigError(where, `"${kind}" can only be at the bottom of a stack`);
  const w = `${where}.${kind}`;
  const resolve = (p: string) => path.resolve(ctx.baseDir, p);
  switch (kind) {
    case "file": {
      const p = str(arg, w, bottom ? "an image path" : "the path of a file inside the file system below");
      if (!bottom) return { kind: "fs-file", path: p.startsWith("/") ? p : `/${p}` };
      return { kind: "file", path: resolve(p), ...(opts["read-only"] !== undefined ? { readOnly: bool(opts["read-only"], `${where}.read-only`) } : {}) };
    }
    case "fs-file": {
      const p = str(arg, w, "the path of a file inside the file system below");
      return { kind: "fs-file", path: p.startsWith("/") ? p : `/${p}` };
    }
    case "memory":
      return { kind: "memory", size: size(arg, w) };
    case "concat":
      return { kind: "concat", devices: devices(arg, w, ctx, 1) };
    case "mirror":
      return { kind: "mirror", devices: devices(arg, w, ctx, 1) };
    case "stripe":
      return { kind: "stripe", devices: devices(arg, w, ctx, 1), chunk: opts.chunk === undefined ? 65536 : size(opts.chunk, `${where}.chunk`) };
    case "cow":
      return { kind: "cow", overlay: resolve(str(arg, w, "an overlay file path")), ...(opts["block-size"] !== undefined ? { blockSize: size(opts["block-size"], `${where}.block-size`) } : {}) };
    case "partition": {
      const n = typeof arg === "string" ? Number(arg.replace(/^p/, "")) : arg;
      if (typeof n !== "number" || !Number.isInteger(n) || n < 1) throw new ConfigError(w, `expected a partition number ≥ 1, got ${typeName(arg)}`);
      return { kind: "partition", index: n };
    }
    case "fault": {
      let rules: string[];
      if (arg === null || arg === undefined || arg === "" || arg === true) rules = [];
      else if (typeof arg === "string") rules = [arg];
      else if (Array.isArray(arg) && arg.every((r) => typeof r === "string")) rules = arg as string[];
      else throw new ConfigError(w, `expected a rule, a list of rules or nothing, got ${typeName(arg)}`);
      const spec: LayerSpec = { kind: "fault", rules };
      if (opts.seed !== undefined) {
        if (typeof opts.seed !== "number" || !Number.isInteger(opts.seed)) throw new ConfigError(`${where}.seed`, `expected an integer, got ${typeName(opts.seed)}`);
        spec.seed = opts.seed;
      }
      if (opts.powerloss !== undefined) spec.powerloss = bool(opts.powerloss, `${where}.powerloss`);
      if (opts.id !== undefined) spec.id = str(opts.id, `${where}.id`, "a name for this fault layer");
      return spec;
    }
  }
  throw new ConfigError(where, `unknown layer "${kind}"`);
}

/** The one-line form of a stack, for logs and NBD descriptions. */
export function formatStack(stack: StackSpec): string {
  return stack
    .map((l) => {
      switch (l.kind) {
        case "file":
          return `file:${l.path}`;
        case "memory":
          return `memory:${l.size}`;
        case "concat":
        case "mirror":
          return `${l.kind}(${l.devices.map(formatStack).join(", ")})`;
        case "stripe":
          return `stripe[${l.chunk}](${l.devices.map(formatStack).join(", ")})`;
        case "cow":
          return `cow:${l.overlay}`;
        case "partition":
          return `partition:${l.index}`;
        case "fault":
          return l.rules.length ? `fault:${l.rules.join(";")}` : "fault";
        case "fs-file":
          return `file:${l.path}`;
      }
    })
    .join(" → ");
}
