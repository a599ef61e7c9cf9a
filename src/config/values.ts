import { parseSize } from "../util/size.js";

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

/** How a value is named in errors: `null`, `a list`, `a map`, `string "x"`, `number 3`. */
export function typeName(v: unknown): string {
  return v === null ? "null" : Array.isArray(v) ? "a list" : typeof v === "object" ? "a map" : `${typeof v} ${JSON.stringify(v)}`;
}

/** A non-empty string, trimmed; `what` says what it should be ("an image path"). */
export function str(v: unknown, where: string, what: string): string {
  if (typeof v !== "string" || v.trim() === "") throw new ConfigError(where, `expected ${what}, got ${typeName(v)}`);
  return v.trim();
}

/** A byte count: a non-negative integer or a size such as 64k, 1M, 2G. */
export function size(v: unknown, where: string): number {
  if (typeof v === "number" && Number.isSafeInteger(v) && v >= 0) return v;
  if (typeof v === "string") {
    try {
      return parseSize(v);
    } catch {
      throw new ConfigError(where, `expected a size such as 64k, 1M or 2G: cannot read ${JSON.stringify(v)} as a size`);
    }
  }
  throw new ConfigError(where, `expected a size such as 64k, 1M or 2G, got ${typeName(v)}`);
}

export function bool(v: unknown, where: string): boolean {
  if (typeof v !== "boolean") throw new ConfigError(where, `expected true or false, got ${typeName(v)}`);
  return v;
}
