import fs from "node:fs";
import path from "node:path";
import { NbdError } from "../../errors.js";
import type { Layer } from "../layer.js";
import { createFilePort } from "../port/file-port.js";
import { backingName, clusterSizeOf, isQcow2, parseHeader, refused } from "./qcow2-format.js";

/** Backing chains deeper than this are refused (a loop, or a mistake). */
export const MAX_CHAIN = 64;

/**
 * The file a backing name means, as QEMU resolves it: an absolute path as is, a relative one
 * against the directory of the image that names it. A name with a ":" before any "/" is a QEMU
 * protocol (nbd://…, json:{…}, file:…), which this layer does not open.
 */
export function backingPath(image: string, name: string): string {
  if (/^[^/]*:/.test(name)) throw refused(image, `backing file "${name}" (a QEMU protocol or json: name)`, `rebase it onto a local file (qemu-img rebase -u -b FILE -F FORMAT ${image}) or declare backing: none`);
  return path.isAbsolute(name) ? name : path.join(path.dirname(image), name);
}

/** The format of a backing file without a backing format extension: qcow2 by its magic, raw otherwise (QEMU probes too). */
export function probeFormat(file: string): "qcow2" | "raw" {
  const fd = fs.openSync(file, "r");
  try {
    const head = Buffer.alloc(4);
    fs.readSync(fd, head, 0, 4, 0);
    return isQcow2(head) ? "qcow2" : "raw";
  } finally {
    fs.closeSync(fd);
  }
}

/** The backing file a qcow2 image names (resolved), or null: not qcow2, or no backing file. */
export function qcow2BackingOf(file: string): string | null {
  const fd = fs.openSync(file, "r");
  try {
    const head = Buffer.alloc(104);
    fs.readSync(fd, head, 0, 104, 0);
    if (!isQcow2(head)) return null;
    const first = Buffer.alloc(clusterSizeOf(head, file));
    fs.readSync(fd, first, 0, first.length, 0);
    const name = backingName(first, parseHeader(first, file));
    return name === null ? null : backingPath(file, name);
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * Builds (does not open) the read-only layer of a backing file: a qcow2 layer (with its own backing
 * chain) or a raw file port. `qcow2` builds a qcow2 layer one level deeper.
 */
export function backingLayer(image: string, name: string, format: string | null, depth: number, qcow2: (file: string) => Layer): Layer {
  if (depth >= MAX_CHAIN) throw new NbdError("EINVAL", `${image}: backing chain deeper than ${MAX_CHAIN} images (a loop?)`);
  const file = backingPath(image, name);
  if (!fs.existsSync(file)) throw new NbdError("EINVAL", `${image}: backing file ${file} not found (the image names "${name}"); serve it with backing: none, or fix it with qemu-img rebase -u -b FILE -F FORMAT ${image}`);
  const fmt = format ?? probeFormat(file);
  if (fmt === "qcow2") return qcow2(file);
  if (fmt === "raw") return createFilePort({ path: file, readOnly: true });
  throw refused(image, `backing format ${fmt} (${file})`, `backing files may be qcow2 or raw: qemu-img convert -O qcow2 ${file} NEW.qcow2, then qemu-img rebase -u -b NEW.qcow2 -F qcow2 ${image}`);
}
