import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { NbdError } from "../../errors.js";
import { plainIo } from "../layer.js";
import { createQcow2Layer } from "./qcow2-layer.js";
import { prng } from "../../../test/helpers/prng.js";

const dir = fs.mkdtempSync(path.join(os.tmpdir(), "qcow2-fuzz-"));
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

const SIZE = 2 * 1024 * 1024;
const ROUNDS = Number(process.env.QCOW2_FUZZ_ROUNDS ?? 300);


/**
 * A v3 image with `CS`-byte clusters (extended L2 entries: subclusters): header, refcount table,
 * refcount block, L1; then data written by the layer.
 */
async function seedImage(file: string, CS: number, extendedL2: boolean): Promise<void> {
  const buf = Buffer.alloc(4 * CS);
  buf.write("QFI\xfb", 0, "latin1");
  buf.writeUInt32BE(3, 4);
  buf.writeUInt32BE(Math.log2(CS), 20);
  buf.writeBigUInt64BE(BigInt(SIZE), 24);
  buf.writeUInt32BE(1, 36);
  buf.writeBigUInt64BE(BigInt(3 * CS), 40);
  buf.writeBigUInt64BE(BigInt(CS), 48);
  buf.writeUInt32BE(1, 56);
  buf.writeUInt32BE(4, 96);
  buf.writeUInt32BE(104, 100);
  if (extendedL2) buf[79] = 0x10;
  buf.writeBigUInt64BE(BigInt(2 * CS), CS);
  for (let c = 0; c < 4; c++) buf.writeUInt16BE(1, 2 * CS + c * 2);
  fs.writeFileSync(file, buf);
  const l = createQcow2Layer({ path: file });
  await l.open();
  await l.pwrite(Buffer.alloc(300 * 1024, 0x5a), 100 * 1024, plainIo);
  await l.zero(64 * 1024, 1024 * 1024, plainIo);
  if (extendedL2) {
    await l.zero(2048, 100 * 1024 + 1024, plainIo); // zero subclusters in clusters of data
    await l.pwrite(Buffer.alloc(700, 0x3c), 1200 * 1024 + 300, plainIo); // a partial subcluster
  }
  await l.close();
}

/** Runs `p`, failing the test if it takes longer than `ms` (a hang). */
async function bounded<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`hang: ${what} took over ${ms} ms`)), ms)));
  try {
    return await Promise.race([p, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

describe("qcow2 layer under seeded corruption of headers and tables", () => {
  for (const [CS, extendedL2] of [
    [4096, false],
    [16384, true],
  ] as const) {
    it(`gives only clear errors (NbdError), never a crash, a hang or a file grown past reason (${ROUNDS} images, ${CS}-byte clusters${extendedL2 ? ", extended L2 entries" : ""})`, { timeout: 120_000 }, async () => {
      const seed = path.join(dir, `seed-${CS}.qcow2`);
      await seedImage(seed, CS, extendedL2);
      const pristine = fs.readFileSync(seed);
      const metaEnd = Math.min(pristine.length, 8 * CS); // header, tables, and the first L2 table
      const rnd = prng(1234);
      const outcomes = new Map<string, number>();
      for (let round = 0; round < ROUNDS; round++) {
        const img = Buffer.from(pristine);
        const flips = 1 + Math.floor(rnd() * 6);
        for (let i = 0; i < flips; i++) {
          const at = rnd() < 0.4 ? Math.floor(rnd() * 112) : Math.floor(rnd() * metaEnd);
          img[at] = rnd() < 0.5 ? Math.floor(rnd() * 256) : img[at]! ^ (1 << Math.floor(rnd() * 8));
        }
        const file = path.join(dir, "fuzzed.qcow2");
        fs.writeFileSync(file, img);
        const layer = createQcow2Layer({ path: file, l2Cache: 1, refcountCache: 1 });
        const note = (err: unknown) => {
          if (!(err instanceof NbdError)) throw new Error(`round ${round}: not a clear error: ${(err as Error)?.stack ?? String(err)}`, { cause: err });
          expect(["EIO", "ENOTSUP", "EINVAL", "ENOSPC", "EPERM"], `round ${round}: ${err.message}`).toContain(err.errno);
          const key = `${err.errno} ${err.message.replace(/^[^:]*: /, "").replace(/\d+/g, "N")}`;
          outcomes.set(key, (outcomes.get(key) ?? 0) + 1);
        };
        try {
          await bounded(layer.open(), 5000, "open");
        } catch (err) {
          note(err);
          continue;
        }
        const size = Math.min(layer.size(), 64 * 1024 * 1024);
        const ops: Array<() => Promise<unknown>> = [
          () => layer.pread(Buffer.alloc(Math.min(size, SIZE)), 0, plainIo),
          () => layer.extents(Math.min(size, SIZE), 0, plainIo),
          () => layer.pwrite(Buffer.alloc(5000, 1), Math.floor(rnd() * Math.max(1, Math.min(size, SIZE) - 5000)), plainIo),
          () => layer.zero(3 * CS, CS, plainIo),
          () => layer.trim(2 * CS, 8 * CS, plainIo),
          ...(extendedL2 ? [() => layer.zero(1536, CS + 512, plainIo)] : []),
          () => layer.flush(plainIo),
        ];
        for (const op of ops) {
          if (!layer.capabilities().writable && ops.indexOf(op) >= 2) break;
          try {
            await bounded(op(), 5000, `op ${ops.indexOf(op)}`);
          } catch (err) {
            note(err);
          }
        }
        try {
          await bounded(layer.close(), 5000, "close");
        } catch (err) {
          note(err);
        }
        // Writes stay within what the image could address: no file grown to terabytes.
        expect(fs.statSync(file).size, `round ${round}`).toBeLessThan(64 * 1024 * 1024);
      }
      if (process.env.QCOW2_FUZZ_SHOW) console.log([...outcomes].sort((a, b) => b[1] - a[1]).map(([k, n]) => `${n}\t${k}`).join("\n"));
      expect(outcomes.size).toBeGreaterThan(0);
    });
  }
});
