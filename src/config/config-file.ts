import fs from "node:fs";
import path from "node:path";
import { createRequire } from "node:module";
import type YAML from "yaml";
import { ConfigError, parseStack, type StackSpec } from "./stack-spec.js";
import { size } from "./values.js";

/** One export of a config file: a name and its stack, bottom-up. */
export interface ExportConfig {
  name: string;
  stack: StackSpec;
  description?: string;
  readOnly?: boolean;
  /** Also export each partition of this export as NAME/pN (default true). */
  partitions?: boolean;
  /** What the export does with TRIM (as serve --discard); the top-level `discard` where absent. */
  discard?: "unmap" | "ignore";
}

/** What `serve --config FILE` reads. Server keys are used where the command line says nothing. */
export interface ServeConfig {
  exports: ExportConfig[];
  listen?: string[];
  socket?: string[];
  control?: string;
  nodeId?: string;
  io?: "auto" | "sync" | "async";
  /** serve --discard for every export that does not say. */
  discard?: "unmap" | "ignore";
  /** etcd client URLs (serve --etcd), and the keys of --etcd-prefix/-cacert/-cert/-key/-user. */
  etcd?: string[];
  etcdPrefix?: string;
  etcdCacert?: string;
  etcdCert?: string;
  etcdKey?: string;
  etcdUser?: string;
  /** The process-wide memory budget (a size such as 32M), as --max-memory. */
  maxMemory?: string;
  /** Event loops serving connections, as --threads. */
  threads?: number;
}

const TOP = ["exports", "listen", "socket", "control", "node-id", "io", "discard", "max-memory", "threads", "etcd", "etcd-prefix", "etcd-cacert", "etcd-cert", "etcd-key", "etcd-user"];
const EXPORT = ["name", "stack", "description", "read-only", "partitions", "discard"];

function discardMode(v: unknown, where: string): "unmap" | "ignore" {
  if (v !== "unmap" && v !== "ignore") throw new ConfigError(where, "expected unmap or ignore");
  return v;
}

function isMap(v: unknown): v is Record<string, unknown> {
  return v !== null && typeof v === "object" && !Array.isArray(v);
}

function unknownKeys(m: Record<string, unknown>, allowed: string[], where: string): void {
  for (const k of Object.keys(m)) {
    if (!allowed.includes(k)) throw new ConfigError(where ? `${where}.${k}` : k, `unknown key; expected one of ${allowed.join(", ")}`);
  }
}

function strings(v: unknown, where: string): string[] {
  const list = typeof v === "string" ? [v] : v;
  if (!Array.isArray(list) || !list.every((s) => typeof s === "string")) throw new ConfigError(where, "expected an address or a list of addresses");
  return list as string[];
}

/** Validates a parsed config document; every error names the key at fault. */
export function validateConfig(doc: unknown, baseDir: string): ServeConfig {
  if (!isMap(doc)) throw new ConfigError("", "the config must be a map with an \"exports\" list");
  unknownKeys(doc, TOP, "");
  if (!Array.isArray(doc.exports) || doc.exports.length === 0) throw new ConfigError("exports", "expected a non-empty list of exports");
  const names = new Set<string>();
  const exports = doc.exports.map((e, i): ExportConfig => {
    const w = `exports[${i}]`;
    if (!isMap(e)) throw new ConfigError(w, "expected a map with name and stack");
    unknownKeys(e, EXPORT, w);
    if (typeof e.name !== "string" || Buffer.byteLength(e.name) > 4096) throw new ConfigError(`${w}.name`, "expected an export name (up to 4096 bytes; \"\" is the default export)");
    if (names.has(e.name)) throw new ConfigError(`${w}.name`, `export "${e.name}" is declared twice`);
    names.add(e.name);
    if (e.stack === undefined) throw new ConfigError(`${w}.stack`, "missing: declare the stack bottom-up, e.g. \"file:disk.img → partition:1\"");
    const out: ExportConfig = { name: e.name, stack: parseStack(e.stack, `${w}.stack`, { baseDir }) };
    if (e.description !== undefined) {
      if (typeof e.description !== "string") throw new ConfigError(`${w}.description`, "expected text");
      out.description = e.description;
    }
    for (const [key, prop] of [
      ["read-only", "readOnly"],
      ["partitions", "partitions"],
    ] as const) {
      if (e[key] === undefined) continue;
      if (typeof e[key] !== "boolean") throw new ConfigError(`${w}.${key}`, "expected true or false");
      out[prop] = e[key] as boolean;
    }
    if (e.discard !== undefined) out.discard = discardMode(e.discard, `${w}.discard`);
    return out;
  });
  const cfg: ServeConfig = { exports };
  if (doc.listen !== undefined) cfg.listen = strings(doc.listen, "listen");
  if (doc.socket !== undefined) cfg.socket = strings(doc.socket, "socket").map((s) => path.resolve(baseDir, s));
  if (doc.control !== undefined) {
    if (typeof doc.control !== "string") throw new ConfigError("control", "expected HOST:PORT");
    cfg.control = doc.control;
  }
  if (doc["node-id"] !== undefined) {
    if (typeof doc["node-id"] !== "string" || !doc["node-id"]) throw new ConfigError("node-id", "expected a node id");
    cfg.nodeId = doc["node-id"];
  }
  if (doc["max-memory"] !== undefined) {
    const v = doc["max-memory"];
    if (size(v, "max-memory") <= 0) throw new ConfigError("max-memory", "expected a size above zero, such as 32M");
    cfg.maxMemory = String(v);
  }
  if (doc.threads !== undefined) {
    const v = doc.threads;
    if (typeof v !== "number" || !Number.isInteger(v) || v < 1) throw new ConfigError("threads", "expected a positive integer (event loops serving connections)");
    cfg.threads = v;
  }
  if (doc.io !== undefined) {
    if (doc.io !== "auto" && doc.io !== "sync" && doc.io !== "async") throw new ConfigError("io", "expected auto, sync or async");
    cfg.io = doc.io;
  }
  if (doc.discard !== undefined) cfg.discard = discardMode(doc.discard, "discard");
  if (doc.etcd !== undefined) cfg.etcd = typeof doc.etcd === "string" ? doc.etcd.split(",") : strings(doc.etcd, "etcd");
  for (const [key, prop, isPath] of [
    ["etcd-prefix", "etcdPrefix", false],
    ["etcd-cacert", "etcdCacert", true],
    ["etcd-cert", "etcdCert", true],
    ["etcd-key", "etcdKey", true],
    ["etcd-user", "etcdUser", false],
  ] as const) {
    const v = doc[key];
    if (v === undefined) continue;
    if (typeof v !== "string" || !v) throw new ConfigError(key, isPath ? "expected a file path" : "expected text");
    cfg[prop] = isPath ? path.resolve(baseDir, v) : v;
  }
  return cfg;
}

/** Reads and validates a YAML (or JSON) config file. Paths in it are relative to its directory. */
export function loadConfig(file: string): ServeConfig {
  let text: string;
  try {
    text = fs.readFileSync(file, "utf8");
  } catch (err) {
    throw new Error(`cannot read config ${file}: ${(err as Error).message}`);
  }
  let doc: unknown;
  try {
    doc = yaml().parse(text, { prettyErrors: true });
  } catch (err) {
    if (err instanceof yaml().YAMLParseError) throw new Error(`${file}: ${err.message}`);
    throw err;
  }
  try {
    return validateConfig(doc, path.dirname(path.resolve(file)));
  } catch (err) {
    if (err instanceof ConfigError) err.message = `${file}: ${err.message}`;
    throw err;
  }
}

/** The yaml module, loaded when a config file is read (a server without one never needs it). */
let yamlModule: typeof YAML | null = null;
function yaml(): typeof YAML {
  return (yamlModule ??= createRequire(import.meta.url)("yaml") as typeof YAML);
}
