import { execFileSync, spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it, vi } from "vitest";
import { needTools } from "../../../test/helpers/tools.js";
import { plainIo, type Io } from "../layer.js";
import { createFilePort } from "../port/file-port.js";
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
function makeImage(name: string, size: number, clusterBits: number, refcountOrder = 4, extendedL2 = false): string {
  const cs = 2 ** clusterBits;
  const l1Size = Math.ceil(size / (cs * (cs / (extendedL2 ? 16 : 8))));
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
  if (extendedL2) buf[79] = 0x10; // incompatible bit 4: extended L2 entries
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

  for (const { bits, extendedL2 } of [
    { bits: 12, extendedL2: false },
    { bits: 14, extendedL2: true },
  ]) {
    it.skipIf(!hasQemuImg)(`a crash after any write leaves an image qemu-img check finds free of corruption, and at each flush every write before it (${2 ** bits}-byte clusters${extendedL2 ? ", extended L2 entries" : ""})`, { timeout: 120_000 }, async () => {
      // 4 KiB clusters: 8 L2 tables of 2 MiB, a tiny L2 cache (dirty tables written back to evict
      // them), refcount blocks all cached (their counts dirty until a flush); writes, zeroes and
      // trims between flushes, then concurrent writes. With subclusters, 16 KiB clusters: two
      // tables of 16 MiB (eight would make every image to judge 128 MiB; the caches are the same code).
      const cs = 2 ** bits;
      const size = extendedL2 ? 32 * 1024 * 1024 : 16 * 1024 * 1024;
      const file = makeImage(`cuts-${bits}.qcow2`, size, bits, 4, extendedL2);
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
  }

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

  // A write into a cluster of ours goes to the file without the metadata lock; a trim that frees
  // the cluster and the flush that makes it free again do not wait for it. The file port's punch
  // does (it waits for writes over its range), but with discard off nothing is punched: a write
  // still in flight in the thread pool then landed in the cluster after another guest cluster got
  // it, and overwrote an acknowledged write there.
  for (const discard of [false, true]) {
    it(`a write still in flight to a cluster a trim freed never lands in the cluster's next owner (discard ${discard ? "on" : "off"})`, async () => {
      const cs = 65536;
      const file = makeImage(`late-${discard}.qcow2`, 4 * 1024 * 1024, 16);
      const layer = createQcow2Layer({ path: file, io: "async", discard });
      await layer.open();
      try {
        await layer.pwrite(Buffer.alloc(cs, 0xa1), 0, io);
        await layer.flush(io);
        // Hold the next write into guest cluster 0's host cluster in the file port.
        const data = (layer as unknown as { data: { writeChunk: (...a: unknown[]) => unknown } }).data;
        const real = data.writeChunk.bind(data);
        let release!: () => void;
        const held = new Promise<void>((r) => (release = r));
        let first = true;
        data.writeChunk = (...a: unknown[]) => {
          if (!first) return real(...a);
          first = false;
          return held.then(() => real(...a));
        };
        const late = layer.pwrite(Buffer.alloc(4096, 0xbb), 0, io); // in place, lock-free, held
        await new Promise((r) => setTimeout(r, 10));
        await layer.trim(cs, 0, { ...io, mayTrim: true });
        const flushed = layer.flush(io);
        // The cluster may become free only once the late write is done: let it go after a while.
        setTimeout(release, 100);
        await flushed;
        // Every other guest cluster allocated: one of them gets the freed cluster once it is free.
        for (let gc = 1; gc < 64; gc++) await layer.pwrite(Buffer.alloc(cs, gc), gc * cs, io);
        await layer.flush(io);
        await late;
        const got = Buffer.alloc(cs);
        for (let gc = 1; gc < 64; gc++) {
          await layer.pread(got, gc * cs, io);
          expect(got.equals(Buffer.alloc(cs, gc)), `guest cluster ${gc}`).toBe(true);
        }
      } finally {
        await layer.close();
      }
      check(file);
    });
  }

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

describe("qcow2 layer with extended L2 entries (subclusters)", () => {
  const SC = 32; // subclusters per cluster

  /** A raw backing file of `size` random bytes, and a file port over it (what `backing: STACK` gives). */
  function backingFile(name: string, size: number, seed: number): { path: string; bytes: Buffer } {
    const rnd = prng(seed);
    const bytes = Buffer.alloc(size);
    for (let i = 0; i < size; i += 4) bytes.writeUInt32LE(Math.floor(rnd() * 2 ** 32), i);
    const p = path.join(dir, name);
    fs.writeFileSync(p, bytes);
    return { path: p, bytes };
  }

  for (const bits of [14, 16]) {
    it(`keeps a model under writes, zeroes and trims of whole and partial subclusters over a backing file (${2 ** bits}-byte clusters); reopened, checked`, async () => {
      const cs = 2 ** bits;
      const scs = cs / SC;
      const size = 4 * 1024 * 1024;
      const file = makeImage(`x${bits}.qcow2`, size, bits, 4, true);
      const below = backingFile(`x${bits}.raw`, size - 3 * cs - 1000, bits); // shorter: zeroes past its end
      const model = Buffer.alloc(size);
      below.bytes.copy(model);
      const open = async (readOnly = false) => {
        const l = createQcow2Layer({ path: file, readOnly, backing: createFilePort({ path: below.path, readOnly: true }), l2Cache: 1, refcountCache: 1 });
        await l.open();
        return l;
      };
      const layer = await open();
      const rnd = prng(bits * 31);
      const pick = (n: number) => Math.floor(rnd() * n);
      /** A range: whole subclusters, or any bytes; up to three clusters long, sometimes at the disk's end. */
      const range = (): [number, number] => {
        if (rnd() < 0.5) {
          const first = pick(size / scs - 1);
          const n = 1 + pick(Math.min(3 * SC, size / scs - first));
          return [first * scs, n * scs];
        }
        const off = pick(size - 1);
        return [off, 1 + pick(Math.min(3 * cs, size - off))];
      };
      const apply = async (l: typeof layer, op: number): Promise<void> => {
        const [off, len] = range();
        if (op < 0.55) {
          const data = Buffer.alloc(len, 1 + pick(250));
          data.copy(model, off);
          await l.pwrite(data, off, io);
        } else if (op < 0.85) {
          model.fill(0, off, off + len);
          await l.zero(len, off, { ...io, mayTrim: rnd() < 0.5 });
        } else {
          // trim: whole clusters read as zeroes (a backing file is below), partial ones are left
          const first = Math.ceil(off / cs);
          const last = off + len === size ? Math.ceil(size / cs) : Math.floor((off + len) / cs);
          if (last > first) model.fill(0, first * cs, Math.min(last * cs, size));
          await l.trim(len, off, io);
        }
      };
      for (let i = 0; i < 300; i++) {
        await apply(layer, rnd());
        if (i % 50 === 49) await layer.flush(io);
      }
      // Concurrent, on distinct clusters' subclusters: writes only (their ranges may share clusters).
      const slots = Array.from({ length: size / scs }, (_, i) => i).sort(() => rnd() - 0.5).slice(0, 400);
      await Promise.all(
        slots.map(async (sc, i) => {
          const off = sc * scs + (i % 3 === 0 ? 100 : 0);
          const len = i % 3 === 0 ? scs - 200 : scs;
          const data = Buffer.alloc(len, (i % 250) + 1);
          data.copy(model, off);
          await layer.pwrite(data, off, io);
        }),
      );
      const back = Buffer.alloc(size);
      await layer.pread(back, 0, io);
      expect(back.equals(model)).toBe(true);
      // Extents: every byte said to read as zeroes does.
      for (let at = 0; at < size; ) {
        const ext = await layer.extents(size - at, at, io);
        for (const e of ext) {
          if (e.flags & 2) expect(model.subarray(at, at + e.length).every((x) => x === 0)).toBe(true);
          at += e.length;
        }
      }
      await layer.close();
      check(file);
      const again = await open(true);
      await again.pread(back, 0, io);
      await again.close();
      expect(back.equals(model)).toBe(true);
    });
  }

  it("a whole-subcluster write allocates that subcluster only: the backing file shows through the others", async () => {
    const cs = 16384;
    const scs = cs / SC;
    const size = 1024 * 1024;
    const file = makeImage("xs.qcow2", size, 14, 4, true);
    const below = backingFile("xs.raw", size, 7);
    const layer = createQcow2Layer({ path: file, backing: createFilePort({ path: below.path, readOnly: true }) });
    await layer.open();
    const at = 5 * cs + 3 * scs;
    await layer.pwrite(Buffer.alloc(scs, 0xab), at, io);
    await layer.pwrite(Buffer.alloc(100, 0xcd), 5 * cs + 7 * scs + 200, io); // partial: subcluster 7 gets the backing file's bytes around it
    expect(await layer.extents(size, 0, io, "depth")).toEqual([
      { length: at, flags: 2 },
      { length: scs, flags: 1 },
      { length: 3 * scs, flags: 2 },
      { length: scs, flags: 1 },
      { length: size - at - 5 * scs, flags: 2 },
    ]);
    await layer.zero(2 * scs, 5 * cs + 10 * scs, io); // whole subclusters of a partly zeroed cluster
    // Data (the image's and the backing file's) but for the zero subclusters 10-11.
    expect((await layer.extents(2 * cs, 5 * cs, io)).map((e) => [e.length / scs, e.flags])).toEqual([
      [10, 0],
      [2, 3],
      [52, 0],
    ]);
    // The backing file changes under subclusters 4-6 of that cluster: the image shows it, as QEMU would.
    const fd = fs.openSync(below.path, "r+");
    fs.writeSync(fd, Buffer.alloc(3 * scs, 0x77), 0, 3 * scs, 5 * cs + 4 * scs);
    fs.closeSync(fd);
    const b = Buffer.alloc(cs);
    await layer.pread(b, 5 * cs, io);
    const expected = below.bytes.subarray(5 * cs, 6 * cs);
    expected.fill(0xab, 3 * scs, 4 * scs);
    expected.fill(0x77, 4 * scs, 7 * scs);
    expected.fill(0xcd, 7 * scs + 200, 7 * scs + 300);
    expected.fill(0, 10 * scs, 12 * scs);
    expect(b.equals(expected)).toBe(true);
    await expect(layer.zero(100, 0, { ...io, fast: true })).rejects.toMatchObject({ errno: "ENOTSUP" });
    await layer.zero(scs, 0, { ...io, fast: true }); // whole subclusters need no write
    await layer.close();
    check(file);
  });

  it("refuses an entry with a subcluster both allocated and zero, and allocated subclusters without a cluster", async () => {
    const cs = 16384;
    const file = makeImage("xbad.qcow2", 1024 * 1024, 14, 4, true);
    const layer = createQcow2Layer({ path: file });
    await layer.open();
    await layer.pwrite(Buffer.alloc(cs, 1), 0, io);
    await layer.close();
    const l1 = Buffer.alloc(8);
    const fd = fs.openSync(file, "r+");
    fs.readSync(fd, l1, 0, 8, 3 * cs);
    const l2 = Number(l1.readBigUInt64BE(0) & 0x00fffffffffffe00n);
    fs.writeSync(fd, Buffer.from([0, 0, 0, 1]), 0, 4, l2 + 8); // entry 0: subcluster 0 zero and allocated
    fs.writeSync(fd, Buffer.from([0, 0, 0, 1]), 0, 4, l2 + 16 + 12); // entry 1: allocated, no cluster
    fs.closeSync(fd);
    const again = createQcow2Layer({ path: file, readOnly: true });
    await again.open();
    await expect(again.pread(Buffer.alloc(512), 0, io)).rejects.toThrow(/both allocated and zero/);
    await expect(again.pread(Buffer.alloc(512), cs, io)).rejects.toThrow(/allocated subclusters but no host cluster/);
    await again.close();
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
