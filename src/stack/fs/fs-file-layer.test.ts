import { execFileSync, spawnSync } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { needTools } from "../../../test/helpers/tools.js";
import { NbdError } from "../../errors.js";
import { State } from "../../protocol/constants.js";
import { checkRequest } from "../guard.js";
import { plainIo } from "../layer.js";
import { PartitionLayer } from "../partition/partition-layer.js";
import { readPartitionTable } from "../partition/partition-table.js";
import { createFilePort } from "../port/file-port.js";
import { createFsFileLayer } from "./fs-file-layer.js";
import { layerAllocationMap, layerReader } from "./fs-probe.js";

const MiB = 1024 * 1024;
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "fsfile-"));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

/** disk.img: 1 MiB of data, a 1 MiB hole, 2 MiB of data. */
function diskImage(dir: string): Buffer {
  fs.mkdirSync(dir, { recursive: true });
  const p = path.join(dir, "disk.img");
  const a = randomBytes(MiB);
  const b = randomBytes(2 * MiB);
  const fd = fs.openSync(p, "w");
  fs.writeSync(fd, a, 0, a.length, 0);
  fs.writeSync(fd, b, 0, b.length, 2 * MiB);
  fs.closeSync(fd);
  fs.writeFileSync(path.join(dir, "other.txt"), "other\n");
  return fs.readFileSync(p);
}

function mkext4(name: string, src: string, sizeMiB = 16): string {
  const img = path.join(tmp, name);
  fs.writeFileSync(img, "");
  fs.truncateSync(img, sizeMiB * MiB);
  execFileSync("mkfs.ext4", ["-q", "-F", "-b", "4096", "-d", src, img], { stdio: "ignore" });
  return img;
}

const sha = (b: Buffer) => createHash("sha256").update(b).digest("hex");

describe.skipIf(!needTools("mkfs.ext4", "e2fsck", "debugfs", "sgdisk", "mkfs.vfat", "mcopy"))("FsFileLayer: one file of a file system as a device", () => {
  it("reads disk.img through the layer, holes as zeroes; writes land in its blocks only", async () => {
    const src = path.join(tmp, "src1");
    const data = diskImage(src);
    const img = mkext4("outer.img", src);
    const before = fs.readFileSync(img);
    const port = createFilePort({ path: img });
    await port.open();
    const layer = await createFsFileLayer(port, "/disk.img");
    await layer.open();
    try {
      expect(layer.size()).toBe(4 * MiB);
      expect(layer.describe()).toBe(`file /disk.img (ext4) → file:${img}`);
      expect(layer.capabilities().trim).toBe(true); // passed to the file's blocks (holes left out)
      const all = Buffer.alloc(4 * MiB);
      await layer.pread(all, 0, plainIo);
      expect(all.equals(data)).toBe(true);
      const ext = await layer.extents(4 * MiB, 0, plainIo);
      expect(ext.reduce((n, e) => n + e.length, 0)).toBeLessThanOrEqual(4 * MiB);
      // The hole is reported as a hole; the first MiB is data.
      expect(ext[0]!.flags & State.NBD_STATE_HOLE).toBe(0);
      const at1M = await layer.extents(MiB, MiB, plainIo);
      expect(at1M).toEqual([{ length: MiB, flags: State.NBD_STATE_HOLE | State.NBD_STATE_ZERO }]);

      // A write across a block boundary inside the data, and one at the very end.
      const w1 = randomBytes(10_000);
      await layer.pwrite(w1, 4096 - 100, plainIo);
      const w2 = randomBytes(777);
      await layer.pwrite(w2, 4 * MiB - 777, plainIo);
      w1.copy(data, 4096 - 100);
      w2.copy(data, 4 * MiB - 777);
      // Writes into the hole, across data and hole, or past the end are refused and write nothing.
      const hole = await layer.pwrite(randomBytes(512), MiB + 4096, plainIo).catch((e) => e);
      expect(hole).toBeInstanceOf(NbdError);
      expect(hole.errno).toBe("EPERM");
      expect(hole.message).toMatch(/touches 512 bytes at 1052672 that \/disk.img has no blocks for \(a hole\)/);
      const across = await layer.pwrite(Buffer.alloc(8192, 0xaa), MiB - 4096, plainIo).catch((e) => e);
      expect(across.errno).toBe("EPERM");
      // Past the end: the guard at the top of the stack answers, as for any layer.
      expect(checkRequest("pwrite", 4 * MiB - 512, 1024, plainIo, layer.size(), layer.capabilities())?.errno).toBe("ENOSPC");
      // zero() over data and hole: the data becomes zero, the hole stays a hole.
      await layer.zero(8192, MiB - 4096, plainIo);
      data.fill(0, MiB - 4096, MiB);
      const back = Buffer.alloc(4 * MiB);
      await layer.pread(back, 0, plainIo);
      expect(back.equals(data)).toBe(true);
      await layer.flush(plainIo);
    } finally {
      await layer.close();
      await port.close();
    }
    // e2fsprogs agree: the file system is clean, and the file holds what was written.
    const fsck = spawnSync("e2fsck", ["-fn", img], { encoding: "utf8" });
    expect(fsck.status, fsck.stdout + fsck.stderr).toBe(0);
    const cat = execFileSync("debugfs", ["-R", "cat /disk.img", img], { maxBuffer: 64 * MiB, stdio: ["ignore", "pipe", "ignore"] });
    expect(sha(cat)).toBe(sha(data));
    // Only bytes inside disk.img's blocks changed.
    const after = fs.readFileSync(img);
    const check = createFilePort({ path: img, readOnly: true });
    await check.open();
    const runs = await (await createFsFileLayer(check, "/disk.img")).fileExtents();
    await check.close();
    const inFile = (o: number) => runs.some((r) => o >= r.deviceOffset && o < r.deviceOffset + r.length);
    let changedOutside = 0;
    for (let o = 0; o < after.length; o++) if (after[o] !== before[o] && !inFile(o)) changedOutside++;
    expect(changedOutside).toBe(0);
  });

  it("a disk image with a GPT inside an ext4 partition of another disk: partition → file → partition", async () => {
    const src = path.join(tmp, "src2");
    fs.mkdirSync(src, { recursive: true });
    const inner = path.join(src, "vm.img");
    fs.writeFileSync(inner, randomBytes(8 * MiB)); // fully allocated: every block can be written
    execFileSync("sgdisk", ["-n", "1:1M:+3M", "-c", "1:inner", "-n", "2:0:0", inner], { stdio: "ignore" });
    const innerBytes = fs.readFileSync(inner);
    // The outer disk: GPT, partition 1 holds an ext4 file system that holds vm.img.
    const fsimg = mkext4("p1.img", src, 20);
    const outer = path.join(tmp, "outer-gpt.img");
    fs.writeFileSync(outer, "");
    fs.truncateSync(outer, 24 * MiB);
    execFileSync("sgdisk", ["-n", "1:1M:+20M", outer], { stdio: "ignore" });
    const fd = fs.openSync(outer, "r+");
    fs.writeSync(fd, fs.readFileSync(fsimg), 0, 20 * MiB, MiB);
    fs.closeSync(fd);

    const port = createFilePort({ path: outer });
    await port.open();
    try {
      const t = (await readPartitionTable(layerReader(port), port.size()))!;
      const p1 = new PartitionLayer(port, t.partitions[0]!, t.scheme);
      expect((await layerAllocationMap(p1))!.some((r) => !r.used)).toBe(true);
      const file = await createFsFileLayer(p1, "/vm.img"); // the port belongs to the whole-disk export
      await file.open();
      expect(file.describe()).toMatch(/^file \/vm.img \(ext4\) → partition 1 \(gpt, 20971520 bytes at 1048576\) → file:/);
      const all = Buffer.alloc(file.size());
      await file.pread(all, 0, plainIo);
      expect(all.equals(innerBytes)).toBe(true);
      const it = (await readPartitionTable(layerReader(file), file.size()))!;
      expect(it.partitions.map((p) => [p.start, p.length, p.name])).toEqual([
        [MiB, 3 * MiB, "inner"],
        [4 * MiB, it.partitions[1]!.length, ""],
      ]);
      const ip1 = new PartitionLayer(file, it.partitions[0]!, it.scheme);
      const w = randomBytes(4096);
      await ip1.pwrite(w, 8192, plainIo);
      await file.close(); // does not close the port it does not own
      const again = Buffer.alloc(4096);
      await port.pread(again, 0, plainIo); // still open
      const back = Buffer.alloc(4096);
      await ip1.pread(back, 8192, plainIo);
      expect(back.equals(w)).toBe(true);
    } finally {
      await port.close();
    }
  });

  it("a file on FAT16; clear errors for a missing file, a directory, no file system", async () => {
    const img = path.join(tmp, "fat.img");
    fs.writeFileSync(img, "");
    fs.truncateSync(img, 16 * MiB);
    execFileSync("mkfs.vfat", ["-F", "16", img], { stdio: "ignore" });
    const data = randomBytes(300_000);
    fs.writeFileSync(path.join(tmp, "data.bin"), data);
    execFileSync("mmd", ["-i", img, "::/Images"], { env: { ...process.env, MTOOLS_SKIP_CHECK: "1" } });
    execFileSync("mcopy", ["-i", img, path.join(tmp, "data.bin"), "::/Images/Data File.bin"], { env: { ...process.env, MTOOLS_SKIP_CHECK: "1" } });
    const port = createFilePort({ path: img, readOnly: true });
    await port.open();
    try {
      const l = await createFsFileLayer(port, "/images/data file.bin");
      await l.open();
      expect(l.describe()).toMatch(/^file \/images\/data file.bin \(fat16\) → /);
      expect(l.capabilities().writable).toBe(false);
      const b = Buffer.alloc(data.length);
      await l.pread(b, 0, plainIo);
      expect(b.equals(data)).toBe(true);
      await expect(createFsFileLayer(port, "/nope.img")).rejects.toThrow(/file \/nope.img on file:.*: \/nope.img: no such file or directory/);
      await expect(createFsFileLayer(port, "/Images")).rejects.toThrow(/\/Images: is a directory/);
    } finally {
      await port.close();
    }
    const blank = path.join(tmp, "blank.img");
    fs.writeFileSync(blank, Buffer.alloc(MiB));
    const bp = createFilePort({ path: blank });
    await bp.open();
    await expect(createFsFileLayer(bp, "/x")).rejects.toThrow(/no ext2\/3\/4 or FAT file system on file:/);
    await bp.close();
  });

  it("unwritten (preallocated) extents read as zeroes and refuse writes", async () => {
    const src = path.join(tmp, "src3");
    fs.mkdirSync(src, { recursive: true });
    fs.writeFileSync(path.join(src, "pre.img"), randomBytes(8192));
    const img = mkext4("pre.img", src);
    // debugfs fallocate: blocks 2..99 of pre.img become unwritten extents; the size grows to 400 KiB.
    execFileSync("debugfs", ["-w", "-R", "fallocate /pre.img 2 99", img], { stdio: "ignore" });
    execFileSync("debugfs", ["-w", "-R", "sif /pre.img size 409600", img], { stdio: "ignore" });
    expect(execFileSync("debugfs", ["-R", "stat /pre.img", img], { encoding: "utf8", stdio: ["ignore", "pipe", "ignore"] })).toMatch(/\(2-99\[u\]\)/);
    const port = createFilePort({ path: img });
    await port.open();
    try {
      const l = await createFsFileLayer(port, "/pre.img");
      await l.open();
      expect(l.size()).toBe(409600);
      const b = Buffer.alloc(409600, 0xff);
      await l.pread(b, 0, plainIo);
      expect(b.subarray(8192).equals(Buffer.alloc(409600 - 8192))).toBe(true);
      expect((await l.pwrite(Buffer.alloc(4096, 1), 8192, plainIo).catch((e) => e)).errno).toBe("EPERM");
      expect(await l.extents(4096, 8192, plainIo)).toEqual([{ length: 4096, flags: State.NBD_STATE_HOLE | State.NBD_STATE_ZERO }]);
    } finally {
      await port.close();
    }
  });
});
