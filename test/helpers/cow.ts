import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll } from "vitest";
import { PassthroughLayer, plainIo, type Capabilities, type Io, type Layer } from "../../src/stack/layer.js";
import { MemoryPort } from "../../src/stack/port/memory-port.js";
import { createCowLayer, type CowLayer, type CowLayerOptions } from "../../src/stack/volume/cow-layer.js";

/** What the cow unit tests share: a small device (its last block short) and a base that counts writes. */
export const BS = 8192;
export const SIZE = 13 * BS + 1024; // the last block is short
export const fua: Io = { ...plainIo, fua: true };

const dirs: string[] = [];
/** A fresh temporary directory, removed after the test file. */
export function tmpdir(): string {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), "nbdstack-cow-"));
  dirs.push(d);
  return d;
}
afterAll(() => {
  for (const d of dirs) fs.rmSync(d, { recursive: true, force: true });
});

export function pattern(len: number, seed: number, off: number): Buffer {
  const b = Buffer.allocUnsafe(len);
  for (let i = 0; i < len; i++) b[i] = (seed * 31 + (off + i) * 7) & 0xff || 1;
  return b;
}

/** A memory port seen as a read-only (or writable) base; counts write attempts. */
export class Base extends PassthroughLayer {
  writes = 0;
  constructor(
    readonly port: MemoryPort,
    private readonly writable = false,
  ) {
    super(port);
  }
  override capabilities(): Capabilities {
    const c = this.port.capabilities();
    return this.writable ? c : { ...c, writable: false, flush: false, fua: false, trim: false, zero: false, fastZero: false };
  }
  private w(): void {
    this.writes++;
    if (!this.writable) throw new Error("the base was written");
  }
  override pwrite(b: Buffer, o: number, io: Io) {
    this.w();
    return super.pwrite(b, o, io);
  }
  override zero(l: number, o: number, io: Io) {
    this.w();
    return super.zero(l, o, io);
  }
  override trim(l: number, o: number, io: Io) {
    this.w();
    return super.trim(l, o, io);
  }
}

/** A base filled with a pattern (its first 48 KiB; the rest is unallocated zeroes). */
export async function makeBase(opts: { writable?: boolean; alignment?: number; maxRequest?: number; size?: number } = {}) {
  const size = opts.size ?? SIZE;
  const port = new MemoryPort({ size, alignment: opts.alignment, maxRequest: opts.maxRequest });
  const filled = Math.min(size, 48 * 1024);
  const fill = pattern(filled, 99, 0);
  for (let at = 0; at < filled; at += 4096) await port.pwrite(fill.subarray(at, Math.min(filled, at + 4096)), at, plainIo);
  const initial = await readAll(port);
  return { base: new Base(port, opts.writable), initial };
}

export async function readAll(l: Layer): Promise<Buffer> {
  const b = Buffer.alloc(l.size());
  for (let at = 0; at < b.length; at += 4096) await l.pread(b.subarray(at, Math.min(b.length, at + 4096)), at, plainIo);
  return b;
}

/** A cow layer over `base`, opened. */
export async function openCow(base: Layer, overlay: string, opts: CowLayerOptions = { blockSize: BS }): Promise<CowLayer> {
  const cow = createCowLayer(base, overlay, opts);
  await cow.open();
  return cow;
}
