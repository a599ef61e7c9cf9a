import {
  FsError,
  type AllocationRun,
  type DirEntry,
  type FileExtent,
  type FileStat,
  type FileSystem,
  type FsFile,
  type FsKind,
  type ReadAt,
} from "./file-system.js";

/** Largest file readFile() returns in one buffer, and largest directory read. */
export const READ_FILE_MAX = 1024 * 1024 * 1024;
const SYMLINK_MAX_FOLLOW = 40;

/** The device below a parser: every read is checked against the device size first. */
export class Device {
  constructor(
    private readonly readAt: ReadAt,
    readonly size: number,
  ) {}
  async read(length: number, offset: number, what: string): Promise<Buffer> {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.size)
      throw FsError.corrupt(what, offset, `${length} bytes there are beyond the end of the device (${this.size} bytes)`);
    if (length === 0) return Buffer.alloc(0);
    const b = await this.readAt(length, offset);
    if (b.length < length) throw FsError.corrupt(what, offset, `short read (${b.length} of ${length} bytes)`);
    return b.length === length ? b : b.subarray(0, length);
  }
}

/** A mapped piece of a file: data on the device, or zeroes (a hole or an unwritten extent). */
export interface Run {
  fileOffset: number;
  length: number;
  /** -1 for bytes that read as zero. */
  deviceOffset: number;
}

/** Merges adjacent runs and adds them in order. */
export function pushRun(out: Run[], fileOffset: number, deviceOffset: number, length: number): void {
  if (length <= 0) return;
  const last = out[out.length - 1];
  if (last && last.fileOffset + last.length === fileOffset && last.deviceOffset >= 0 && deviceOffset === last.deviceOffset + last.length) {
    last.length += length;
    return;
  }
  out.push({ fileOffset, deviceOffset, length });
}

/** Adds a run to an allocation map, merging with the previous one when it has the same state. */
export function pushAlloc(out: AllocationRun[], offset: number, length: number, used: boolean): void {
  if (length <= 0) return;
  const last = out[out.length - 1];
  if (last && last.used === used && last.offset + last.length === offset) last.length += length;
  else out.push({ offset, length, used });
}

/** Splits an absolute path into components, rejecting relative ones. */
export function splitPath(path: string): string[] {
  if (!path.startsWith("/")) throw new FsError("EINVAL", `${path}: not an absolute path`);
  return path.split("/").filter((c) => c !== "" && c !== ".");
}

/** A file system's nodes behind one path walker; each format supplies these few operations. */
export abstract class BaseFs<N> implements FileSystem {
  abstract readonly kind: FsKind;
  abstract readonly label: string;
  abstract readonly uuid: string;
  abstract readonly blockSize: number;
  abstract readonly totalBytes: number;
  abstract readonly freeBytes: number;
  readonly notes: string[] = [];
  inUse = false;

  constructor(protected readonly dev: Device) {}

  protected abstract root(): Promise<N>;
  protected abstract statNode(node: N): Promise<FileStat>;
  protected abstract list(dir: N, path: string): Promise<Array<{ name: string; node: N }>>;
  protected abstract lookup(dir: N, name: string, path: string): Promise<N | null>;
  protected abstract symlinkTarget(node: N, path: string): Promise<string>;
  /** Runs covering [0, size) of a regular file, in order; gaps read as zero. */
  protected abstract mapNode(node: N, path: string): Promise<Run[]>;
  abstract allocationMap(): Promise<AllocationRun[]>;
  /** True when some of the node's bytes live outside any device run (ext inline data). */
  protected dataInMetadata(_node: N): boolean {
    return false;
  }

  /** Reads a range of a node through its runs (a format with data outside runs overrides this). */
  protected async readNode(node: N, runs: Run[], offset: number, length: number, what: string): Promise<Buffer> {
    void node;
    const out = Buffer.alloc(length);
    const end = offset + length;
    let i = findRun(runs, offset);
    for (; i < runs.length; i++) {
      const r = runs[i]!;
      if (r.fileOffset >= end) break;
      const s = Math.max(offset, r.fileOffset);
      const e = Math.min(end, r.fileOffset + r.length);
      if (e <= s || r.deviceOffset < 0) continue;
      const b = await this.dev.read(e - s, r.deviceOffset + (s - r.fileOffset), what);
      b.copy(out, s - offset);
    }
    return out;
  }

  /** Walks a path to its node and the normalised path; symlinks followed as described on FileSystem. */
  protected async resolve(path: string, followLast: boolean): Promise<{ node: N; path: string; stat: FileStat }> {
    let follows = 0;
    let pending = splitPath(path);
    const stack: Array<{ node: N; name: string }> = [];
    let node: N = await this.root();
    let st = await this.statNode(node);
    const here = () => "/" + stack.map((s) => s.name).join("/");
    while (pending.length > 0) {
      const name = pending.shift()!;
      if (name === "..") {
        stack.pop();
        node = stack.length ? stack[stack.length - 1]!.node : await this.root();
        st = await this.statNode(node);
        continue;
      }
      if (st.type !== "dir") throw new FsError("ENOTDIR", `${here()}: not a directory`);
      const child = await this.lookup(node, name, here());
      const childPath = (stack.length ? here() + "/" : "/") + name;
      if (child === null) throw new FsError("ENOENT", `${childPath}: no such file or directory`);
      const cst = await this.statNode(child);
      if (cst.type === "symlink" && (pending.length > 0 || followLast)) {
        if (++follows > SYMLINK_MAX_FOLLOW) throw new FsError("ELOOP", `${path}: too many levels of symbolic links`);
        const target = await this.symlinkTarget(child, childPath);
        if (target === "") throw new FsError("ENOENT", `${childPath}: empty symbolic link`);
        if (target.startsWith("/")) {
          stack.length = 0;
          node = await this.root();
          st = await this.statNode(node);
        }
        pending = [...target.split("/").filter((c) => c !== "" && c !== "."), ...pending];
        continue;
      }
      stack.push({ node: child, name });
      node = child;
      st = cst;
    }
    return { node, path: here(), stat: st };
  }

  async stat(path: string): Promise<FileStat> {
    return (await this.resolve(path, false)).stat;
  }

  async readlink(path: string): Promise<string> {
    const r = await this.resolve(path, false);
    if (r.stat.type !== "symlink") throw new FsError("EINVAL", `${r.path}: not a symbolic link`);
    return this.symlinkTarget(r.node, r.path);
  }

  async readdir(path: string): Promise<DirEntry[]> {
    const r = await this.resolve(path, true);
    if (r.stat.type !== "dir") throw new FsError("ENOTDIR", `${r.path}: not a directory`);
    const out: DirEntry[] = [];
    for (const e of await this.list(r.node, r.path)) out.push({ name: e.name, ...(await this.statNode(e.node)) });
    return out;
  }

  async open(path: string): Promise<FsFile> {
    const r = await this.resolve(path, true);
    if (r.stat.type === "dir") throw new FsError("EISDIR", `${r.path}: is a directory`);
    if (r.stat.type !== "file") throw new FsError("EINVAL", `${r.path}: not a regular file (${r.stat.type})`);
    const runs = await this.mapNode(r.node, r.path);
    const size = r.stat.size;
    const what = `data of ${r.path}`;
    return {
      path: r.path,
      stat: r.stat,
      size,
      read: (offset: number, length: number) => {
        if (offset < 0 || length < 0 || offset + length > size) return Promise.reject(new FsError("EINVAL", `${r.path}: read of ${length} bytes at ${offset} is beyond the end (${size})`));
        return this.readNode(r.node, runs, offset, length, what);
      },
      extents: async () => {
        if (size > 0 && this.dataInMetadata(r.node))
          throw new FsError("unsupported", `${r.path}: its ${size} bytes are stored inside its inode (inline data), in no blocks of their own`);
        return runs.filter((x) => x.deviceOffset >= 0).map((x): FileExtent => ({ fileOffset: x.fileOffset, deviceOffset: x.deviceOffset, length: x.length }));
      },
    };
  }

  async readFile(path: string): Promise<Buffer> {
    const f = await this.open(path);
    if (f.size > READ_FILE_MAX) throw new FsError("EFBIG", `${f.path}: ${f.size} bytes is too big to read at once (limit ${READ_FILE_MAX})`);
    return f.read(0, f.size);
  }

  async fileExtents(path: string): Promise<FileExtent[]> {
    return (await this.open(path)).extents();
  }
}

/** Index of the first run that ends after `offset` (runs sorted by fileOffset). */
export function findRun(runs: Run[], offset: number): number {
  let lo = 0;
  let hi = runs.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    const r = runs[mid]!;
    if (r.fileOffset + r.length <= offset) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}
