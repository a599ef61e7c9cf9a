import fs from "node:fs";
import path from "node:path";
import { NbdError } from "../../errors.js";
import { EXT } from "./qcow2-format.js";
import { fsyncDir } from "../../util/fsync-dir.js";

export interface Qcow2CreateOptions {
  /** The new image's path; it must not exist (unless `replace`). */
  path: string;
  /** Virtual size in bytes. */
  size: number;
  /** The backing file as it is written into the header (a name relative to the image's directory, or absolute). */
  backing?: string;
  backingFormat?: "raw" | "qcow2";
  /** log2 of the cluster size (default 16: 64 KiB, as qemu-img). */
  clusterBits?: number;
  /** Replace an existing file of that name (atomically: rename over it). Default: never replace. */
  replace?: boolean;
}

/**
 * Writes an empty qcow2 v3 image (no cluster allocated), as `qemu-img create -f qcow2 [-b B -F F]`
 * lays it out: the header with the backing format extension and the backing name in cluster 0,
 * the refcount table in cluster 1, its one refcount block (16-bit counts) in cluster 2, the L1
 * table from cluster 3. Written whole under a temporary name, synced, then renamed into place
 * (and the directory synced), so the name never shows a half-written image.
 */
export function createQcow2(o: Qcow2CreateOptions): void {
  const bits = o.clusterBits ?? 16;
  const cs = 2 ** bits;
  if (!Number.isSafeInteger(o.size) || o.size <= 0) throw new NbdError("EINVAL", `${o.path}: bad virtual size ${o.size}`);
  const l1Size = Math.max(1, Math.ceil(o.size / (cs * (cs / 8))));
  const l1Clusters = Math.ceil((l1Size * 8) / cs);
  const clusters = 3 + l1Clusters;
  if (clusters > cs / 2) throw new NbdError("EINVAL", `${o.path}: an L1 table of ${l1Size} entries does not fit one refcount block`);
  const img = Buffer.alloc(clusters * cs);
  img.write("QFI\xfb", 0, "latin1");
  img.writeUInt32BE(3, 4);
  img.writeUInt32BE(bits, 20);
  img.writeBigUInt64BE(BigInt(o.size), 24);
  img.writeUInt32BE(l1Size, 36);
  img.writeBigUInt64BE(BigInt(3 * cs), 40); // L1 table
  img.writeBigUInt64BE(BigInt(cs), 48); // refcount table
  img.writeUInt32BE(1, 56);
  img.writeUInt32BE(4, 96); // 16-bit refcounts
  img.writeUInt32BE(112, 100); // header length (with the compression type byte: 0, deflate)
  let at = 112;
  if (o.backing !== undefined) {
    const fmt = o.backingFormat ?? "raw";
    img.writeUInt32BE(EXT.backingFormat, at);
    img.writeUInt32BE(fmt.length, at + 4);
    img.write(fmt, at + 8, "latin1");
    at += 8 + Math.ceil(fmt.length / 8) * 8;
  }
  at += 8; // end of the extensions (zeroes)
  if (o.backing !== undefined) {
    const name = Buffer.from(o.backing, "utf8");
    if (name.length === 0 || name.length > 1023 || at + name.length > cs) throw new NbdError("EINVAL", `${o.path}: backing file name too long (${name.length} bytes)`);
    img.writeBigUInt64BE(BigInt(at), 8);
    img.writeUInt32BE(name.length, 16);
    name.copy(img, at);
  }
  img.writeBigUInt64BE(BigInt(2 * cs), cs); // refcount table entry 0: the refcount block
  for (let c = 0; c < clusters; c++) img.writeUInt16BE(1, 2 * cs + 2 * c);

  const tmp = path.join(path.dirname(o.path), `.${path.basename(o.path)}.${process.pid}.tmp`);
  const fd = fs.openSync(tmp, "wx");
  try {
    fs.writeSync(fd, img, 0, img.length, 0);
    fs.fsyncSync(fd);
  } catch (err) {
    fs.closeSync(fd);
    fs.rmSync(tmp, { force: true });
    throw err;
  }
  fs.closeSync(fd);
  try {
    if (o.replace) fs.renameSync(tmp, o.path);
    else fs.linkSync(tmp, o.path); // fails if the name exists: never replaces an image
  } finally {
    fs.rmSync(tmp, { force: true });
  }
  fsyncDir(path.dirname(o.path));
}

/**
 * The backing name an overlay at `overlay` writes for `image`: relative to the overlay's directory
 * when the image is in it or below (the pair can move together), else absolute.
 */
export function backingNameFor(overlay: string, image: string): string {
  const rel = path.relative(path.dirname(path.resolve(overlay)), path.resolve(image));
  return rel && !rel.startsWith("..") && !path.isAbsolute(rel) ? rel : path.resolve(image);
}
