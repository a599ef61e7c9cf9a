import type { Command } from "commander";
import { FsError, type DirEntry, type FileStat, type FileSystem, type ReadAt } from "../fs/file-system.js";
import { readPartitionTable, type Partition, type PartitionTable } from "../stack/partition/partition-table.js";
import { buildStack, loadKinds, stackOf, StackHandles } from "../stack/compose.js";
import type { Layer } from "../stack/layer.js";

/** Where the commands write (process.stdout by default; tests pass a collector). */
export interface Out {
  write(chunk: string | Buffer): boolean;
  once?(event: "drain", listener: () => void): unknown;
}

export interface FsSummary {
  kind: string;
  label: string;
  uuid: string;
  blockSize: number;
  totalBytes: number;
  usedBytes: number;
  freeBytes: number;
  notes: string[];
}

export interface VolumeReport {
  /** "p1", "p2", … or "whole" for an image without a partition table. */
  name: string;
  start: number;
  length: number;
  partition?: { index: number; type: string; name?: string; uuid?: string };
  fs: FsSummary | null;
  /** Why the file system could not be read. */
  error?: string;
}

export interface InspectReport {
  image: string;
  size: number;
  table: { scheme: PartitionTable["scheme"]; note?: string } | null;
  tableError?: string;
  volumes: VolumeReport[];
}

/**
 * Opens an image read-only through the layer that claims it (see imageKind): a qcow2 image with its
 * backing chain through the qcow2 layer, anything else as a raw file.
 */
async function openImage<T>(image: string, use: (port: Layer, read: ReadAt) => Promise<T>): Promise<T> {
  const stack = stackOf({ source: image, readOnly: true });
  await loadKinds(stack);
  const port = buildStack(stack, { exportName: image, readOnly: true, handles: new StackHandles() });
  try {
    await port.open();
  } catch (err) {
    throw new Error(`cannot open ${image}: ${err instanceof Error ? err.message : String(err)}`, { cause: err });
  }
  try {
    return await use(port, (await import("../stack/fs/fs-probe.js")).layerReader(port));
  } finally {
    await port.close();
  }
}

// The file-system readers are imported when a command uses them: `serve` shares this module's
// process (cli.ts) and need not hold them.
const probeFileSystem = async (read: ReadAt, size: number) => (await import("../fs/probe.js")).probeFileSystem(read, size);

const sub = (read: ReadAt, start: number): ReadAt => (length, offset) => read(length, start + offset);

function summary(f: FileSystem): FsSummary {
  return { kind: f.kind, label: f.label, uuid: f.uuid, blockSize: f.blockSize, totalBytes: f.totalBytes, usedBytes: f.totalBytes - f.freeBytes, freeBytes: f.freeBytes, notes: f.notes };
}

async function volume(read: ReadAt, name: string, start: number, length: number, part?: Partition): Promise<VolumeReport> {
  const v: VolumeReport = { name, start, length, fs: null };
  if (part) v.partition = { index: part.index, type: part.type, ...(part.name ? { name: part.name } : {}), ...(part.uuid ? { uuid: part.uuid } : {}) };
  try {
    const f = await probeFileSystem(sub(read, start), length);
    v.fs = f ? summary(f) : null;
  } catch (err) {
    if (!(err instanceof FsError)) throw err;
    v.error = err.message;
  }
  return v;
}

/** Partitions and file systems of an image, read-only. */
export async function inspectImage(image: string): Promise<InspectReport> {
  return openImage(image, async (port, read) => {
    const size = port.size();
    const report: InspectReport = { image, size, table: null, volumes: [] };
    let table: PartitionTable | null = null;
    try {
      table = await readPartitionTable(read, size);
    } catch (err) {
      report.tableError = err instanceof Error ? err.message : String(err);
    }
    if (table) {
      report.table = { scheme: table.scheme, ...(table.note ? { note: table.note } : {}) };
      for (const p of table.partitions) report.volumes.push(await volume(read, `p${p.index}`, p.start, p.length, p));
    } else report.volumes.push(await volume(read, "whole", 0, size));
    return report;
  });
}

export function humanSize(n: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let u = 0;
  let v = n;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return u === 0 ? `${n} B` : `${v.toFixed(v < 10 && !Number.isInteger(v) ? 1 : 0)} ${units[u]}`;
}

function table(rows: string[][], right = new Set<number>()): string {
  const w = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)));
  return rows.map((r) => r.map((c, i) => (right.has(i) ? c.padStart(w[i]!) : c.padEnd(w[i]!))).join("  ").trimEnd() + "\n").join("");
}

export function renderInspect(r: InspectReport): string {
  let s = `${r.image}: ${humanSize(r.size)} (${r.size} bytes), `;
  s += r.table ? `${r.table.scheme.toUpperCase()} partition table\n` : r.tableError ? `unusable partition table: ${r.tableError}\n` : "no partition table\n";
  if (r.table?.note) s += `note: ${r.table.note}\n`;
  const rows = [["VOLUME", "START", "SIZE", "TYPE", "FS", "LABEL", "UUID", "USED", "FREE"]];
  const notes: string[] = [];
  for (const v of r.volumes) {
    const type = v.partition ? (v.partition.name ? `${v.partition.type.slice(0, 8)} "${v.partition.name}"` : v.partition.type.slice(0, 13)) : "-";
    const f = v.fs;
    rows.push([
      v.name,
      humanSize(v.start),
      humanSize(v.length),
      type,
      f ? f.kind : v.error ? "damaged" : "-",
      f?.label || "-",
      f?.uuid || "-",
      f ? `${humanSize(f.usedBytes)} (${Math.round((100 * f.usedBytes) / f.totalBytes)}%)` : "-",
      f ? humanSize(f.freeBytes) : "-",
    ]);
    if (v.error) notes.push(`${v.name}: ${v.error}`);
    for (const n of f?.notes ?? []) notes.push(`${v.name}: ${n}`);
  }
  return s + table(rows) + notes.map((n) => `${n}\n`).join("");
}

export async function inspectCommand(image: string, opts: { json?: boolean; free?: boolean }, out: Out = process.stdout): Promise<void> {
  if (opts.free) {
    // The free space of every file system on the image, in image offsets: what a copy may skip.
    const { freeRanges } = await import("../migration/free-space.js");
    const free = await openImage(image, (port) => freeRanges(port));
    if (opts.json) out.write(JSON.stringify(free) + "\n");
    else for (const r of free) out.write(`${r.offset} ${r.length}\n`);
    return;
  }
  const r = await inspectImage(image);
  out.write(opts.json ? JSON.stringify(r, null, 2) + "\n" : renderInspect(r));
}

/** IMAGE[:pN]:/path, split; the image name may itself hold colons. */
export function parseImagePath(spec: string): { image: string; part: number | null; path: string } {
  const m = /^(.+?)(?::p(\d+))?:(\/.*)$/.exec(spec);
  if (m) return { image: m[1]!, part: m[2] ? Number(m[2]) : null, path: m[3]! };
  const p = /^(.+?):p(\d+)$/.exec(spec);
  if (p) return { image: p[1]!, part: Number(p[2]), path: "/" };
  return { image: spec, part: null, path: "/" };
}

/** Opens the file system named by IMAGE[:pN] and runs `use` on it. */
async function withFileSystem<T>(spec: string, use: (f: FileSystem, path: string, where: string) => Promise<T>): Promise<T> {
  const { image, part, path } = parseImagePath(spec);
  return openImage(image, async (port, read) => {
    const size = port.size();
    const t = await readPartitionTable(read, size).catch((err) => {
      if (part !== null) throw new Error(`${image}: ${err instanceof Error ? err.message : String(err)}`, { cause: err });
      return null;
    });
    let start = 0;
    let length = size;
    let where = image;
    if (part !== null) {
      if (!t) throw new Error(`${image} has no partition table, so no partition p${part}: leave out :p${part}`);
      const p = t.partitions.find((x) => x.index === part);
      if (!p) throw new Error(`${image} has no partition p${part} (its ${t.scheme} table has ${t.partitions.map((x) => `p${x.index}`).join(", ") || "none"})`);
      start = p.start;
      length = p.length;
      where = `${image}:p${part}`;
    }
    let f: FileSystem | null;
    try {
      f = await probeFileSystem(sub(read, start), length);
    } catch (err) {
      if (err instanceof FsError) throw new Error(`${where}: ${err.message}`, { cause: err });
      throw err;
    }
    if (!f) {
      if (part === null && t) throw new Error(`${image} has a ${t.scheme} partition table: name a partition, e.g. ${image}:p${t.partitions[0]?.index ?? 1}:${path}`);
      throw new Error(`${where}: no ext2/3/4 or FAT file system found`);
    }
    try {
      return await use(f, path, where);
    } catch (err) {
      if (err instanceof FsError) throw new Error(`${where}: ${err.message}`, { cause: err });
      throw err;
    }
  });
}

const TYPE_CHAR: Record<FileStat["type"], string> = { file: "-", dir: "d", symlink: "l", chardev: "c", blockdev: "b", fifo: "p", socket: "s" };

export function modeString(st: FileStat): string {
  let s = TYPE_CHAR[st.type];
  for (let shift = 6; shift >= 0; shift -= 3) {
    const b = (st.mode >> shift) & 7;
    s += (b & 4 ? "r" : "-") + (b & 2 ? "w" : "-") + (b & 1 ? "x" : "-");
  }
  return s;
}

function longLine(e: DirEntry | (FileStat & { name: string })): string[] {
  const t = e.mtime.toISOString();
  return [modeString(e), String(e.nlink), String(e.uid), String(e.gid), String(e.size), `${t.slice(0, 10)} ${t.slice(11, 16)}`, e.type === "symlink" && e.target !== undefined ? `${e.name} -> ${e.target}` : e.name];
}

export async function lsCommand(spec: string, opts: { long?: boolean }, out: Out = process.stdout): Promise<void> {
  await withFileSystem(spec, async (f, path) => {
    const st = await f.stat(path);
    let entries: DirEntry[] | null = null;
    if (st.type === "dir" || st.type === "symlink") {
      entries = await f.readdir(path).catch((err) => {
        if (st.type === "symlink" && err instanceof FsError && (err.code === "ENOTDIR" || err.code === "ENOENT")) return null;
        throw err;
      });
    }
    const dir = entries !== null;
    entries = entries ? entries.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0)) : [{ ...st, name: path }];
    if (!opts.long) {
      out.write(entries.map((e) => `${e.name}\n`).join(""));
      return;
    }
    const base = path.replace(/\/+$/, "");
    for (const e of entries) if (e.type === "symlink") e.target = await f.readlink(dir ? `${base}/${e.name}` : path);
    if (entries.length) out.write(table(entries.map(longLine), new Set([1, 4])));
  });
}

export async function catCommand(spec: string, out: Out = process.stdout): Promise<void> {
  await withFileSystem(spec, async (f, path) => {
    const file = await f.open(path);
    const chunk = 1024 * 1024;
    for (let at = 0; at < file.size; at += chunk) {
      const b = await file.read(at, Math.min(chunk, file.size - at));
      if (!out.write(b) && out.once) await new Promise<void>((resolve) => out.once!("drain", resolve));
    }
  });
}

/** Adds `inspect`, `ls` and `cat` to the CLI. */
export function registerFsCommands(program: Command): void {
  program
    .command("inspect")
    .description("show an image's partitions and file systems (ext2/3/4, FAT): labels, UUIDs, used and free space")
    .argument("<image>", "image file or block device (opened read-only)")
    .option("--json", "print the report as JSON", false)
    .option("--free", "print the byte ranges file systems on the image report free (offset and length a line; with --json a list), for tools that skip free space", false)
    .action((image: string, opts: { json: boolean; free: boolean }) => inspectCommand(image, opts));
  program
    .command("ls")
    .description("list a directory inside an image's file system, without mounting it")
    .argument("<image-path>", "IMAGE[:pN]:/path, e.g. disk.img:p2:/etc (pN: partition N; leave out for an image without a partition table)")
    .option("-l, --long", "long listing: mode, links, owner, group, size, modification time (UTC)", false)
    .action((spec: string, opts: { long: boolean }) => lsCommand(spec, opts));
  program
    .command("cat")
    .description("write a file stored inside an image's file system to stdout, byte for byte")
    .argument("<image-path>", "IMAGE[:pN]:/path/file")
    .action((spec: string) => catCommand(spec));
}
