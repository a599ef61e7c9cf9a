import { execFileSync, spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it, vi } from "vitest";
import { needTools } from "../../../test/helpers/tools.js";
import { plainIo, type Io } from "../layer.js";
import { createQcow2Layer } from "./qcow2-layer.js";
import { prng } from "../../../test/helpers/prng.js";

const dir = fs.mkdtempSync(path.join(os.tmpdir(), "qcow2-layer-"));
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

// qemu-img check, when installed (required under CI=true), judges the images the layer wrote.
const hasQemuImg = needTools("qemu-img");

/**
 * A fresh qcow2 v3 image made by hand: header, refcount table, one refcount block, the L1 table;
 * every later cluster free. `refcountOrder` 0 to 6 (1- to 64-bit refcounts).
 */
function makeImage(name: string, size: number, clusterBits: number, refcountOrder = 4): string {
  const cs = 2 ** clusterBits;
  const l1Size = Math.ceil(size / (cs * (cs / 8)));
  const l1Clusters = Math.max(1, Math.ceil((l1Size * 8) / cs));
  const used = 3 + l1Clusters;
  const bits = 2 ** refcountOrder;
  if (used > (cs * 8) / bits) throw new Error("image too large for one refcount block");
  const buf = Buffer.alloc(used * cs);
  buf.write("QFI\xfb", 0, "latin1");
  buf.writeUInt32BE(3, 4);
  buf.writeUInt32BE(clusterBits, 20);
  buf.writeBigUInt64BE(BigInt(size), 24);
  buf.writeUInt32BE(l1Size, 36);
  buf.writeBigUInt64BE(BigInt(3 * cs), 40);
  buf.writeBigUInt64BE(BigInt(cs), 48);
  buf.writeUInt32BE(1, 56);
  buf.writeUInt32BE(refcountOrder, 96);
  buf.writeUInt32BE(104, 100);
  buf.writeBigUInt64BE(BigInt(2 * cs), cs); // refcount table entry 0 → block at cluster 2
  for (let c = 0; c < used; c++) {
    const bit = c * bits;
    if (bits >= 8) buf.writeUIntBE(1, 2 * cs + bit / 8 + bits / 8 - Math.min(bits / 8, 6), Math.min(bits / 8, 6));
    else buf[2 * cs + (bit >>> 3)]! |= 1 << (bit & 7);
  }
  const file = path.join(dir, name);
  fs.writeFileSync(file, buf);
  return file;
}

function check(file: string): void {
  if (hasQemuImg) execFileSync("qemu-img", ["check", "-q", file], { stdio: "pipe" });
}


const io: Io = plainIo;

describe("qcow2 layer on hand-made images", () => {
  for (const [bits, order] of [
    [9, 4],
    [12, 0],
    [16, 6],
  ] as const) {
    it(`takes concurrent allocating writes into shared clusters (${2 ** bits}-byte clusters, ${2 ** order}-bit refcounts, tiny caches); reopened, checked`, async () => {
      const size = 4 * 1024 * 1024;
      const file = makeImage(`c${bits}-${order}.qcow2`, size, bits, order);
      const model = Buffer.alloc(size);
      // Slots of 1500 bytes in random order: neighbours share clusters, no two writes overlap.
      const rnd = prng(bits * 7 + order);
      const slots = Array.from({ length: Math.floor(size / 1500) }, (_, i) => i).sort(() => rnd() - 0.5);
      const layer = createQcow2Layer({ path: file, l2Cache: 1, refcountCache: 1 });
      await layer.open();
      await Promise.all(
        slots.slice(0, 600).map(async (s, i) => {
          const data = Buffer.alloc(1500, (i % 250) + 1);
          data.copy(model, s * 1500);
          await layer.pwrite(data, s * 1500, io);
        }),
      );
      const back = Buffer.alloc(size);
      await layer.pread(back, 0, io);
      expect(back.equals(model)).toBe(true);
      await layer.close();
      check(file);
      const again = createQcow2Layer({ path: file, readOnly: true });
      await again.open();
      const b2 = Buffer.alloc(size);
      await again.pread(b2, 0, io);
      await again.close();
      expect(b2.equals(model)).toBe(true);
    });
  }

  it("allocating writes and zeroes sharing clusters, all at once, lose nothing; a flush then makes at most three fdatasyncs", async () => {
    const size = 2 * 1024 * 1024;
    const file = makeImage("race.qcow2", size, 12);
    const layer = createQcow2Layer({ path: file, l2Cache: 1, refcountCache: 1 });
    await layer.open();
    await layer.pwrite(Buffer.alloc(size, 0x11), 0, io);
    // Zero, allocated: every cluster stays ours, flagged zero, so each write below allocates again.
    await layer.zero(size, 0, { ...io, mayTrim: false });
    const syncs = vi.spyOn(fs, "fdatasync");
    const model = Buffer.alloc(size);
    const rnd = prng(99);
    const slots = Array.from({ length: Math.floor(size / 1500) }, (_, i) => i).sort(() => rnd() - 0.5);
    await Promise.all(
      slots.map(async (s, i) => {
        // Neighbouring slots share clusters; a zero of a slot (already zero) copies its clusters' other bytes.
        if (i % 3 === 0) return layer.zero(1500, s * 1500, { ...io, mayTrim: i % 2 === 0 });
        const data = Buffer.alloc(1500, (i % 250) + 1);
        data.copy(model, s * 1500);
        return layer.pwrite(data, s * 1500, io);
      }),
    );
    // Tiny caches: dirty tables past their size are written back (with their syncs) as they fill up.
    const written = syncs.mock.calls.length;
    const back = Buffer.alloc(size);
    await layer.pread(back, 0, io);
    expect(back.equals(model)).toBe(true);
    await layer.flush(io);
    expect(syncs.mock.calls.length - written).toBeLessThanOrEqual(3);
    syncs.mockRestore();
    await layer.close();
    check(file);
    const again = createQcow2Layer({ path: file, readOnly: true });
    await again.open();
    await again.pread(back, 0, io);
    await again.close();
    expect(back.equals(model)).toBe(true);
  });

  it("allocates without fdatasync until a flush", async () => {
    const file = makeImage("nosync.qcow2", 4 * 1024 * 1024, 16);
    const layer = createQcow2Layer({ path: file });
    await layer.open();
    const syncs = vi.spyOn(fs, "fdatasync");
    await Promise.all(Array.from({ length: 40 }, (_, i) => layer.pwrite(Buffer.alloc(4096, i + 1), i * 65536 + 512, io)));
    expect(syncs).not.toHaveBeenCalled();
    await layer.flush(io);
    expect(syncs.mock.calls.length).toBe(3); // refcounts | L2 table | L1, then the flush's own
    syncs.mockRestore();
    await layer.close();
    check(file);
  });

  it.skipIf(!hasQemuImg)("a crash after any write leaves an image qemu-img check finds free of corruption, and at each flush every write before it", { timeout: 120_000 }, async () => {
    // 4 KiB clusters: 8 L2 tables of 2 MiB, a tiny L2 cache (dirty tables written back to evict
    // them), refcount blocks all cached (their counts dirty until a flush); writes, zeroes and
    // trims between flushes, then concurrent writes.
    const cs = 4096;
    const size = 16 * 1024 * 1024;
    const file = makeImage("cuts.qcow2", size, 12);
    const initial = fs.readFileSync(file);
    const ino = fs.statSync(file).ino;
    type Rec = { pos: number; data: Buffer } | { flushed: Buffer };
    const log: Rec[] = [];
    const ours = (fd: number) => fd > 2 && fs.fstatSync(fd).ino === ino;
    const realWriteSync = fs.writeSync;
    const realWrite = fs.write;
    const ws = vi.spyOn(fs, "writeSync").mockImplementation(((fd: number, buf: Buffer, off: number, len: number, pos: number) => {
      if (ours(fd)) log.push({ pos, data: Buffer.from(buf.subarray(off, off + len)) });
      return realWriteSync(fd, buf, off, len, pos);
    }) as never);
    const wa = vi.spyOn(fs, "write").mockImplementation(((fd: number, buf: Buffer, off: number, len: number, pos: number, cb: never) => {
      if (ours(fd)) log.push({ pos, data: Buffer.from(buf.subarray(off, off + len)) });
      return realWrite(fd, buf, off, len, pos, cb);
    }) as never);
    const layer = createQcow2Layer({ path: file, l2Cache: 1, discard: false });
    await layer.open();
    const model = Buffer.alloc(size);
    const rnd = prng(7);
    const written: number[] = [];
    try {
      for (let batch = 0; batch < 12; batch++) {
        // Ops of a batch may overlap: one after another, so the model knows the order.
        for (let k = 0; k < 8; k++) {
          const r = rnd();
          let len = 1 + Math.floor(rnd() * 3000);
          let off = Math.floor(rnd() * (size - len));
          if (r < 0.25 && written.length) {
            // Zeroes and trims mostly over clusters written before: they free them.
            off = Math.max(0, written[Math.floor(rnd() * written.length)]! - 100);
            len = 2 * cs + 200;
          }
          if (r < 0.15) {
            model.fill(0, off, off + len);
            await layer.zero(len, off, { ...io, mayTrim: rnd() < 0.5 });
          } else if (r < 0.25) {
            // A trim leaves whole clusters reading as zeroes here (no backing file), parts as they were.
            model.fill(0, Math.ceil(off / cs) * cs, Math.max(Math.ceil(off / cs) * cs, Math.floor((off + len) / cs) * cs));
            await layer.trim(len, off, io);
          } else {
            const data = Buffer.alloc(len, (batch * 8 + k) % 255 + 1);
            data.copy(model, off);
            written.push(off);
            await layer.pwrite(data, off, io);
          }
        }
        await layer.flush(io);
        log.push({ flushed: Buffer.from(model) });
      }
      // Then concurrent writes, apart but sharing clusters.
      await Promise.all(
        Array.from({ length: 32 }, (_, i) => {
          const data = Buffer.alloc(700, 200 + (i % 50));
          data.copy(model, i * 1500 + 8 * 1024 * 1024);
          return layer.pwrite(data, i * 1500 + 8 * 1024 * 1024, io);
        }),
      );
      await layer.flush(io);
      log.push({ flushed: Buffer.from(model) });
      await layer.close();
    } finally {
      ws.mockRestore();
      wa.mockRestore();
    }
    // Replay every prefix of the writes (what SIGKILL after any write leaves) and check it.
    const img = Buffer.from(initial);
    let cur = img;
    const cut = path.join(dir, "cut.qcow2");
    const raw = path.join(dir, "cut.raw");
    let cuts = 0;
    let flushes = 0;
    const judge = (i: number): void => {
      fs.writeFileSync(cut, cur);
      const r = spawnSync("qemu-img", ["check", "--output=json", cut], { encoding: "utf8" });
      expect([0, 3], `after write ${i}: qemu-img check exited ${r.status}: ${r.stdout}${r.stderr}`).toContain(r.status);
      expect((JSON.parse(r.stdout) as { corruptions?: number }).corruptions ?? 0, `after write ${i}`).toBe(0);
      cuts++;
    };
    judge(0);
    for (let i = 0; i < log.length; i++) {
      const e = log[i]!;
      if ("flushed" in e) {
        fs.writeFileSync(cut, cur);
        execFileSync("qemu-img", ["convert", "-q", "-O", "raw", cut, raw]);
        expect(fs.readFileSync(raw).equals(e.flushed), `the image at flush ${flushes} holds every write before it`).toBe(true);
        flushes++;
        continue;
      }
      if (e.pos + e.data.length > cur.length) {
        const grown = Buffer.alloc(e.pos + e.data.length);
        cur.copy(grown);
        cur = grown;
      }
      e.data.copy(cur, e.pos);
      judge(i + 1);
    }
    expect(flushes).toBe(13);
    expect(cuts).toBeGreaterThan(100);
  });

  it("zeroes and trims: whole clusters by their flags, partial ones written; extents say so", async () => {
    const cs = 4096;
    const file = makeImage("zt.qcow2", 1024 * 1024, 12);
    const layer = createQcow2Layer({ path: file });
    await layer.open();
    await layer.pwrite(Buffer.alloc(256 * 1024, 0xee), 0, io);
    await layer.zero(3 * cs + 100, cs - 100, io); // partial head, 3 whole, partial tail
    await layer.trim(8 * cs, 16 * cs, io);
    await layer.zero(4 * cs, 32 * cs, { ...io, mayTrim: false }); // stays allocated, flagged zero
    const b = Buffer.alloc(256 * 1024);
    await layer.pread(b, 0, io);
    const expected = Buffer.alloc(256 * 1024, 0xee);
    expected.fill(0, cs - 100, 4 * cs);
    expected.fill(0, 16 * cs, 24 * cs);
    expected.fill(0, 32 * cs, 36 * cs);
    expect(b.equals(expected)).toBe(true);
    const ext = await layer.extents(64 * cs, 0, io);
    expect(ext.slice(0, 3)).toEqual([
      { length: cs, flags: 0 },
      { length: 3 * cs, flags: 3 },
      { length: 12 * cs, flags: 0 },
    ]);
    expect(ext.reduce((n, e) => n + e.length, 0)).toBe(64 * cs);
    await expect(layer.zero(cs, 100, { ...io, fast: true })).rejects.toMatchObject({ errno: "ENOTSUP" });
    await layer.flush(io);
    await layer.close();
    check(file);
  });

  it("serves a dirty image read-only", async () => {
    const file = makeImage("dirty.qcow2", 1024 * 1024, 16);
    const fd = fs.openSync(file, "r+");
    fs.writeSync(fd, Buffer.from([1]), 0, 1, 79);
    fs.closeSync(fd);
    const warnings: string[] = [];
    const log = { warn: (_o: unknown, msg: string) => warnings.push(msg) } as never;
    const layer = createQcow2Layer({ path: file, log });
    await layer.open();
    expect(layer.capabilities().writable).toBe(false);
    expect(warnings[0]).toContain(`repair it with: qemu-img check -r all ${file}`);
    await expect(layer.pwrite(Buffer.alloc(512), 0, io)).rejects.toMatchObject({ errno: "EPERM" });
    await layer.close();
  });
});

describe.skipIf(!hasQemuImg)("opened again (after an online snapshot or merge)", () => {
  it("forgets the compressed cluster it inflated last: the file under its name may be another", async () => {
    // Two images of the same layout whose cluster 0 is compressed alike but holds other bytes.
    const images = [0x11, 0x22].map((byte) => {
      const raw = path.join(dir, `c${byte}.raw`);
      fs.writeFileSync(raw, Buffer.alloc(65536, byte));
      const q = path.join(dir, `c${byte}.qcow2`);
      execFileSync("qemu-img", ["convert", "-q", "-c", "-f", "raw", "-O", "qcow2", raw, q]);
      return q;
    });
    const file = path.join(dir, "c.qcow2");
    fs.copyFileSync(images[0]!, file);
    const layer = createQcow2Layer({ path: file, readOnly: true });
    await layer.open();
    const buf = Buffer.alloc(4096);
    await layer.pread(buf, 0, plainIo);
    expect(buf[0]).toBe(0x11);
    await layer.close();
    fs.copyFileSync(images[1]!, file);
    await layer.open();
    await layer.pread(buf, 4096, plainIo);
    expect(buf.equals(Buffer.alloc(4096, 0x22))).toBe(true);
    await layer.close();
  });
});
