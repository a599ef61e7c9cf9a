import path from "node:path";
import { aboveKind, bottomKind, kindNamed, kindOf, LAYER_KINDS, type LayerSpec, type StackSpec } from "../stack/kinds.js";
import type { ParseAt } from "../stack/layer-kind.js";
import { ConfigError, typeName } from "./values.js";

export type { LayerSpec, StackSpec } from "../stack/kinds.js";
export { ConfigError } from "./values.js";

/**
 * The stack declaration syntax. What each item may be (its kind's name, value, options, where it
 * may stand) comes from the kinds' declarations in stack/kinds.ts; this file knows only the forms:
 * one line ("file:a.img → partition:1"), or a list whose items are such strings or one-key maps.
 */

export interface SpecContext {
  /** Relative paths are resolved against this directory (the config file's). */
  baseDir: string;
}

const names = (): string => LAYER_KINDS.map((k) => k.name).join(", ");

/** Parses the one-line form of a stack: items joined by "→" or "->", each "kind:argument". */
export function parseStackLine(line: string, where: string, ctx: SpecContext): StackSpec {
  const items = line
    .split(/\s*(?:→|->)\s*/)
    .map((s) => s.trim())
    .filter((s) => s !== "");
  if (items.length === 0) throw new ConfigError(where, "empty stack");
  return items.map((item, i) => lineItem(item, i, `${where}[${i}]`, ctx));
}

function lineItem(item: string, position: number, where: string, ctx: SpecContext): LayerSpec {
  const colon = item.indexOf(":");
  return layerSpec(colon < 0 ? item : item.slice(0, colon), colon < 0 ? null : item.slice(colon + 1), {}, position, where, ctx);
}

/** Validates a stack given as a config value: a one-line string or a list of one-key maps. */
export function parseStack(v: unknown, where: string, ctx: SpecContext): StackSpec {
  if (typeof v === "string") return parseStackLine(v, where, ctx);
  if (!Array.isArray(v) || v.length === 0) throw new ConfigError(where, `expected a non-empty list of layers (bottom first) or a line like "file:disk.img → partition:1", got ${typeName(v)}`);
  return v.map((item: unknown, i) => parseStackItem(item, i, `${where}[${i}]`, ctx));
}

/**
 * One item of the list form at `position` in its stack (0: the bottom): a one-line string such as
 * "partition:1" or a one-key map with the kind's options, e.g. {fault: null, seed: 3}. The CLI's
 * shorthands (--fault, --overlay) become stack items through this too.
 */
export function parseStackItem(item: unknown, position: number, w: string, ctx: SpecContext): LayerSpec {
  if (typeof item === "string") return lineItem(item, position, w, ctx);
  if (item === null || typeof item !== "object" || Array.isArray(item)) throw new ConfigError(w, `expected a layer such as {partition: 1}, got ${typeName(item)}`);
  const opts = item as Record<string, unknown>;
  const keys = Object.keys(opts);
  const kinds = keys.filter((k) => kindNamed(k));
  if (kinds.length !== 1) {
    const unknown = keys.filter((k) => !kindNamed(k));
    throw new ConfigError(
      w,
      kinds.length === 0
        ? `no layer kind in {${keys.join(", ")}}; expected one of ${names()}${unknown.length ? ` (unknown key "${unknown[0]}")` : ""}`
        : `one layer per list item, found ${kinds.join(" and ")}`,
    );
  }
  const kind = kinds[0]!;
  const allowed = Object.keys(kindNamed(kind)!.options);
  for (const k of keys) if (k !== kind && !allowed.includes(k)) throw new ConfigError(`${w}.${k}`, `unknown option of ${kind}; ${allowed.length ? `expected ${allowed.join(", ")}` : "it takes none"}`);
  return layerSpec(kind, opts[kind], opts, position, w, ctx);
}

/** One item: `written` is the kind's name as written, `arg` its value, `opts` the item's other keys. */
function layerSpec(written: string, arg: unknown, opts: Record<string, unknown>, position: number, where: string, ctx: SpecContext): LayerSpec {
  if (!kindNamed(written)) throw new ConfigError(where, `unknown layer "${written}"; expected one of ${names()}`);
  const kind = position === 0 ? bottomKind(written) : aboveKind(written);
  if (!kind) {
    if (position === 0) throw new ConfigError(where, `"${written}" needs a device below it; a stack starts with ${LAYER_KINDS.filter((k) => k.bottom).map((k) => k.name).join(", ")}`);
    throw new ConfigError(where, `"${written}" can only be at the bottom of a stack`);
  }
  const at: ParseAt = {
    key: `${where}.${written}`,
    option: (name) => `${where}.${name}`,
    resolve: (p) => path.resolve(ctx.baseDir, p),
    devices: (v, min) => {
      const w = `${where}.${written}`;
      if (!Array.isArray(v) || v.length < min) throw new ConfigError(w, `expected a list of at least ${min} devices (each an image like "file:a.img" or a stack), got ${typeName(v)}`);
      return v.map((d: unknown, i) => parseStack(typeof d === "string" || Array.isArray(d) ? d : [d], `${w}[${i}]`, ctx));
    },
  };
  return kind.parse(arg, opts, at);
}

/** The one-line form of a stack, for logs and NBD descriptions. */
export function formatStack(stack: StackSpec): string {
  return stack.map((l) => kindOf(l).format(l, formatStack)).join(" → ");
}

/** Help on the stack syntax, from the kinds' declarations (`nbdstack serve --help`). */
export function stackHelp(): string {
  const out = ["Layers of a stack in a --config file, bottom first: \"file:disk.img → partition:1\", or a list of {kind: value, option: …}:"];
  for (const k of LAYER_KINDS) {
    const where = [k.bottom ? "bottom" : "", k.above ? "above" : ""].filter(Boolean).join(", ");
    out.push(`  ${k.name} ${k.argument}`, `      ${k.summary} [${where}]`);
    for (const [key, help] of Object.entries<string>(k.options)) out.push(`      ${key}: ${help}`);
  }
  return out.join("\n");
}
