import { execFileSync, spawnSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { needTools } from "../../test/helpers/tools.js";
import { FsError, probeFileSystem, type FileSystem } from "./probe.js";
import { expectFsError, reader } from "../../test/helpers/fs-images.js";
import { countingReader } from "../../test/helpers/volumes.js";

const MiB = 1024 * 1024;
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "extfs-"));
const src = path.join(tmp, "src");
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));
const sh = (cmd: string, args: string[]) => execFileSync(cmd, args, { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });

const LONG = "L".repeat(200) + "-long-name-ümlaut-✓.txt"; // 255 bytes in UTF-8 at most
const files = new Map<string, Buffer>();

function put(rel: string, data: Buffer): void {
  const p = path.join(src, rel);
  fs.mkdirSync(path.dirname(p), { recursive: true });
  fs.writeFileSync(p, data);
  files.set("/" + rel, data);
}

/** The source tree every image is made from (mkfs -d copies it, holes included). */
function makeSource(): void {
  put("hello.txt", Buffer.from("hello, world\n"));
  put("empty", Buffer.alloc(0));
  put("small-12-blocks.bin", randomBytes(13 * 1024 + 100)); // past the 12 direct blocks of a 1 KiB fs
  put("big.bin", randomBytes(1400 * 1024 + 7)); // past 12 + 256 blocks: double indirect at 1 KiB
  put("dir/sub/deeper/a/b/c/d/e/f/leaf.txt", Buffer.from("deep\n"));
  put(LONG, Buffer.from("long name\n"));
  for (let i = 0; i < 300; i++) put(`many/file-${String(i).padStart(4, "0")}.dat`, Buffer.from(`file ${i}\n`.repeat(i % 7)));
  // Sparse: data at 0, a hole, data at 3 MiB and beyond 70 MiB (triple indirect at 1 KiB blocks).
  const sparse = path.join(src, "sparse.bin");
  const fd = fs.openSync(sparse, "w");
  const a = randomBytes(5000);
  const b = randomBytes(3000);
  const c = randomBytes(2048);
  fs.writeSync(fd, a, 0, a.length, 0);
  fs.writeSync(fd, b, 0, b.length, 3 * MiB + 123);
  fs.writeSync(fd, c, 0, c.length, 70 * MiB);
  fs.ftruncateSync(fd, 72 * MiB);
  fs.closeSync(fd);
  files.set("/sparse.bin", fs.readFileSync(sparse));
  // 400 separate 1 KiB pieces: 400 extents, an extent tree of depth 2 with 1 KiB blocks.
  const holes = path.join(src, "holes.bin");
  const hd = fs.openSync(holes, "w");
  for (let i = 0; i < 400; i++) fs.writeSync(hd, randomBytes(1024), 0, 1024, i * 8192);
  fs.closeSync(hd);
  files.set("/holes.bin", fs.readFileSync(holes));
  fs.symlinkSync("hello.txt", path.join(src, "fast-link"));
  const longTarget = "dir/sub/deeper/a/b/c/d/e/f/../f/./leaf.txt" + "/".repeat(0);
  fs.symlinkSync(longTarget.padEnd(70, "/"), path.join(src, "slow-link"));
  fs.symlinkSync("/dir/sub", path.join(src, "abs-dir-link"));
}

interface Img {
  file: string;
  buf: Buffer;
  fs: FileSystem;
}

async function mkfs(name: string, tool: string, args: string[], sizeMiB = 32): Promise<Img> {
  const file = path.join(tmp, name);
  fs.writeFileSync(file, "");
  fs.truncateSync(file, sizeMiB * MiB);
  sh(tool, ["-q", "-F", ...args, "-d", src, file]);
  const buf = fs.readFileSync(file);
  const f = await probeFileSystem(reader(buf), buf.length);
  expect(f).not.toBeNull();
  return { file, buf, fs: f! };
}

/** Physical blocks of a file's data as debugfs lists them (indirect and index blocks left out). */
function debugfsBlocks(img: string, p: string): number[] {
  const out = sh("debugfs", ["-R", `stat "${p}"`, img]);
  const m = /(?:BLOCKS|EXTENTS):\n([\s\S]*?)\n(?:TOTAL|$)/.exec(out);
  if (!m) return [];
  const blocks: number[] = [];
  for (const part of m[1]!.split(/,\s*/)) {
    const pm = /^\((\d+)(?:-(\d+))?\):(\d+)(?:-(\d+))?/.exec(part.trim());
    if (!pm) continue; // (IND), (DIND), (ETB0) …
    const from = Number(pm[3]);
    const to = pm[4] ? Number(pm[4]) : from;
    for (let x = from; x <= to; x++) blocks.push(x);
  }
  return blocks;
}

/** Free block ranges from dumpe2fs, as [first, last] block pairs. */
function dumpe2fsFree(img: string): Array<[number, number]> {
  const out = sh("dumpe2fs", [img]);
  const ranges: Array<[number, number]> = [];
  for (const m of out.matchAll(/^\s+Free blocks: (.*)$/gm)) {
    for (const r of m[1]!.split(", ").filter(Boolean)) {
      const [a, b] = r.split("-").map(Number);
      ranges.push([a!, b ?? a!]);
    }
  }
  return ranges;
}

function dumpe2fsHeader(img: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of sh("dumpe2fs", ["-h", img]).split("\n")) {
    const m = /^([^:]+):\s+(.*)$/.exec(line);
    if (m) out[m[1]!] = m[2]!;
  }
  return out;
}

async function walk(f: FileSystem, dir: string, out: string[]): Promise<void> {
  for (const e of await f.readdir(dir)) {
    const p = (dir === "/" ? "" : dir) + "/" + e.name;
    out.push(p);
    if (e.type === "dir") await walk(f, p, out);
  }
}

/** Checks an image against the source tree and against e2fsprogs' view of it. */
async function checkImage(img: Img, opts: { sparseEndsAtData?: boolean; bigalloc?: boolean; inline?: boolean } = {}): Promise<void> {
  const f = img.fs;
  const h = dumpe2fsHeader(img.file);
  expect(f.uuid).toBe(h["Filesystem UUID"]);
  expect(f.label).toBe(h["Filesystem volume name"] === "<none>" ? "" : h["Filesystem volume name"]);
  const bs = Number(h["Block size"]);
  expect(f.blockSize).toBe(opts.bigalloc ? Number(h["Cluster size"]) : bs);
  expect(f.totalBytes).toBe(Number(h["Block count"]) * bs);
  expect(f.freeBytes).toBe(Number(h["Free blocks"]) * bs); // dumpe2fs counts free blocks, not clusters

  for (const [p, data] of files) {
    // mke2fs -d with inline_data sets a sparse file's size to the end of its last data block.
    const want = opts.sparseEndsAtData && p === "/sparse.bin" ? data.subarray(0, (await f.stat(p)).size) : data;
    expect((await f.readFile(p)).equals(want), p).toBe(true);
  }
  const listed: string[] = [];
  await walk(f, "/", listed);
  const expected: string[] = [];
  const walkSrc = (rel: string) => {
    for (const n of fs.readdirSync(path.join(src, rel))) {
      expected.push(rel + "/" + n);
      const st = fs.lstatSync(path.join(src, rel, n));
      if (st.isDirectory()) walkSrc(rel + "/" + n);
    }
  };
  walkSrc("");
  expect(listed.filter((p) => p !== "/lost+found").sort()).toEqual(expected.sort());

  expect(await f.readlink("/fast-link")).toBe("hello.txt");
  expect(await f.readlink("/slow-link")).toBe(fs.readlinkSync(path.join(src, "slow-link")));
  expect((await f.readFile("/fast-link")).toString()).toBe("hello, world\n");
  expect((await f.readFile("/slow-link")).toString()).toBe("deep\n");
  expect((await f.readFile("/abs-dir-link/deeper/a/b/c/d/e/f/leaf.txt")).toString()).toBe("deep\n");
  expect((await f.stat("/fast-link")).type).toBe("symlink");
  expect((await f.stat("/many")).type).toBe("dir");
  expect((await f.stat("/big.bin")).size).toBe(files.get("/big.bin")!.length);

  // File extents name exactly the blocks debugfs names, and read back the data.
  for (const p of ["/big.bin", "/sparse.bin", "/holes.bin", "/small-12-blocks.bin", ...(opts.inline ? [] : ["/hello.txt"])]) {
    const ext = await f.fileExtents(p);
    const ours: number[] = [];
    for (const e of ext) {
      expect(e.deviceOffset % bs).toBe(0);
      for (let o = 0; o < e.length; o += bs) ours.push(e.deviceOffset / bs + o / bs);
    }
    expect(ours, p).toEqual(debugfsBlocks(img.file, p));
    const data = files.get(p)!;
    for (const e of ext) expect(img.buf.subarray(e.deviceOffset, e.deviceOffset + e.length).equals(data.subarray(e.fileOffset, e.fileOffset + e.length))).toBe(true);
  }
  const sp = await f.fileExtents("/sparse.bin");
  expect(sp.reduce((n, e) => n + e.length, 0)).toBeLessThan(64 * 1024); // holes are left out

  // Allocation map: covers the device, and its free runs are dumpe2fs's free blocks exactly.
  const map = await f.allocationMap();
  let pos = 0;
  for (const r of map) {
    expect(r.offset).toBe(pos);
    pos += r.length;
  }
  expect(pos).toBe(img.buf.length);
  const free = map.filter((r) => !r.used).map((r): [number, number] => [r.offset / bs, (r.offset + r.length) / bs - 1]);
  // With bigalloc dumpe2fs ends a range at the first block of its last cluster.
  const ratio = f.blockSize / bs;
  const ref = dumpe2fsFree(img.file).map(([a, b]): [number, number] => [a, b + ratio - 1]);
  // dumpe2fs lists per group; merge ranges that touch.
  const merged: Array<[number, number]> = [];
  for (const r of ref) {
    const last = merged[merged.length - 1];
    if (last && last[1] + 1 === r[0]) last[1] = r[1];
    else merged.push([...r]);
  }
  expect(free).toEqual(merged);
  expect(map.filter((r) => !r.used).reduce((n, r) => n + r.length, 0)).toBe(f.freeBytes);
}

const haveTools = needTools("mkfs.ext4", "mkfs.ext2", "mkfs.ext3", "debugfs", "dumpe2fs");

describe.skipIf(!haveTools)("ext2/3/4 images made by mke2fs -d", () => {
  beforeAll(() => makeSource());

  it("ext4 with extents, flex_bg, 64bit and metadata_csum (4 KiB blocks)", async () => {
    const img = await mkfs("ext4.img", "mkfs.ext4", ["-b", "4096", "-L", "root-fs", "-O", "64bit,metadata_csum"]);
    expect(img.fs.kind).toBe("ext4");
    expect(img.fs.label).toBe("root-fs");
    await checkImage(img);
    // e2fsck -D builds hash-tree indexes; an indexed directory still reads linearly.
    spawnSync("e2fsck", ["-fyD", img.file], { stdio: "ignore" });
    expect(sh("debugfs", ["-R", "htree /many", img.file])).toMatch(/Root node dump/);
    const buf = fs.readFileSync(img.file);
    const again = (await probeFileSystem(reader(buf), buf.length))!;
    expect((await again.readdir("/many")).map((e) => e.name).sort()).toEqual(fs.readdirSync(path.join(src, "many")).sort());
    expect((await again.readFile("/many/file-0123.dat")).equals(files.get("/many/file-0123.dat")!)).toBe(true);
  });

  it("ext4 with 1 KiB blocks: an extent tree of depth 2, and a fragmented file written by debugfs", async () => {
    let img = await mkfs("ext4-1k.img", "mkfs.ext4", ["-b", "1024"]);
    expect(img.fs.kind).toBe("ext4");
    expect(sh("debugfs", ["-R", "stat /holes.bin", img.file])).toMatch(/\(ETB1\)/);
    await checkImage(img);
    // Free every other small file, then write a file that has to fill the gaps.
    const cmds = Array.from({ length: 150 }, (_, i) => `rm /many/file-${String(i * 2).padStart(4, "0")}.dat`);
    const frag = randomBytes(900 * 1024);
    fs.writeFileSync(path.join(tmp, "frag.bin"), frag);
    cmds.push(`write ${path.join(tmp, "frag.bin")} /frag.bin`);
    fs.writeFileSync(path.join(tmp, "cmds"), cmds.join("\n") + "\n");
    sh("debugfs", ["-w", "-f", path.join(tmp, "cmds"), img.file]);
    const buf = fs.readFileSync(img.file);
    img = { file: img.file, buf, fs: (await probeFileSystem(reader(buf), buf.length))! };
    expect((await img.fs.readFile("/frag.bin")).equals(frag)).toBe(true);
    const ext = await img.fs.fileExtents("/frag.bin");
    expect(ext.length).toBeGreaterThan(4);
    const ours = ext.flatMap((e) => Array.from({ length: e.length / 1024 }, (_, k) => e.deviceOffset / 1024 + k));
    expect(ours).toEqual(debugfsBlocks(img.file, "/frag.bin"));
    expect((await img.fs.readdir("/many")).length).toBe(150);
  });

  it("ext4 without extents: classic direct, indirect, double and triple indirect blocks", async () => {
    const img = await mkfs("ext4-noext.img", "mkfs.ext4", ["-b", "1024", "-O", "^extent,^64bit,^metadata_csum"]);
    await checkImage(img);
  });

  it("ext2 with 1 KiB blocks (triple indirect for the sparse file)", async () => {
    const img = await mkfs("ext2.img", "mkfs.ext2", ["-b", "1024", "-L", "old"]);
    expect(img.fs.kind).toBe("ext2");
    expect(img.fs.label).toBe("old");
    await checkImage(img);
  });

  it("ext3 with 2 KiB blocks", async () => {
    const img = await mkfs("ext3.img", "mkfs.ext3", ["-b", "2048"]);
    expect(img.fs.kind).toBe("ext3");
    await checkImage(img);
  });

  it("ext4 with meta_bg instead of a resize inode", async () => {
    const img = await mkfs("ext4-metabg.img", "mkfs.ext4", ["-b", "1024", "-O", "meta_bg,^resize_inode"]);
    await checkImage(img);
  });

  it("ext4 with bigalloc: 16 KiB clusters of 4 KiB blocks", async () => {
    const img = await mkfs("ext4-bigalloc.img", "mkfs.ext4", ["-b", "4096", "-O", "bigalloc", "-C", "16384"], 64);
    expect(img.fs.blockSize).toBe(16384);
    await checkImage(img, { bigalloc: true });
  });

  it("ext4 with inline data: small files and directories live in the inode", async () => {
    const img = await mkfs("ext4-inline.img", "mkfs.ext4", ["-O", "inline_data", "-I", "512"]);
    await checkImage(img, { sparseEndsAtData: true, inline: true });
    const ino = Number(/Inode: (\d+)/.exec(sh("debugfs", ["-R", "stat /hello.txt", img.file]))![1]);
    expect(sh("debugfs", ["-R", "stat /hello.txt", img.file])).toMatch(/Size of inline data: \d+/);
    expect((await img.fs.stat("/hello.txt")).ino).toBe(ino);
    await expect(img.fs.fileExtents("/hello.txt")).rejects.toThrow(/^\/hello.txt: its 13 bytes are stored inside its inode \(inline data\)/);
    await expect(img.fs.fileExtents("/empty")).resolves.toEqual([]);
  });

  it("reports path errors clearly", async () => {
    const img = await mkfs("errors.img", "mkfs.ext4", []);
    await expect(img.fs.readdir("/nope")).rejects.toThrow(/\/nope: no such file or directory/);
    await expect(img.fs.readdir("/hello.txt")).rejects.toThrow(/\/hello.txt: not a directory/);
    await expect(img.fs.readFile("/dir")).rejects.toThrow(/\/dir: is a directory/);
    await expect(img.fs.readFile("/hello.txt/x")).rejects.toThrow(/\/hello.txt: not a directory/);
    await expect(img.fs.readFile("relative")).rejects.toThrow(/not an absolute path/);
    const e = await img.fs.readFile("/nope").catch((x) => x);
    expect(e).toBeInstanceOf(FsError);
    expect(e.code).toBe("ENOENT");
  });
});

/** Byte offset of an inode on the device, from debugfs imap. */
function inodeOffset(img: string, p: string): number {
  const out = sh("debugfs", ["-R", `imap "${p}"`, img]);
  const m = /located at block (\d+), offset 0x([0-9a-f]+)/.exec(out)!;
  const bs = Number(dumpe2fsHeader(img)["Block size"]);
  return Number(m[1]) * bs + parseInt(m[2]!, 16);
}

describe.skipIf(!haveTools)("damaged ext structures give a clear FsError", () => {
  const dir = path.join(tmp, "bad");
  fs.mkdirSync(dir, { recursive: true });
  const mk = (name: string, args: string[]) => {
    const s = path.join(dir, "s");
    fs.mkdirSync(path.join(s, "d"), { recursive: true });
    fs.writeFileSync(path.join(s, "f.bin"), randomBytes(40_000));
    fs.writeFileSync(path.join(s, "d", "g.txt"), "g\n");
    for (let i = 0; i < 40; i++) fs.writeFileSync(path.join(s, "d", `n${i}`), randomBytes(i * 100));
    const file = path.join(dir, name);
    fs.writeFileSync(file, "");
    fs.truncateSync(file, 4 * MiB);
    sh("mkfs.ext4", ["-q", "-F", ...args, "-d", s, file]);
    return file;
  };

  const fail = expectFsError;

  it("superblock, group descriptor, inode, extent header, directory", async () => {
    const file = mk("bad.img", ["-b", "1024"]);
    const good = fs.readFileSync(file);
    let b = Buffer.from(good);
    b.writeUInt32LE(9, 1024 + 0x18);
    await fail(b, null, /^ext superblock at byte 1024: block size 2\^\(10\+9\)/);
    b = Buffer.from(good);
    b.writeUInt32LE(10_000_000, 1024 + 0x04);
    await fail(b, null, /^ext superblock at byte 1024: 10000000 blocks of 1024 bytes do not fit the device/);
    b = Buffer.from(good);
    b.writeUInt32LE(99_999, 2048 + 8); // group 0's inode table
    await fail(b, null, /^ext group descriptor 0 at byte 2048: inode table at block 99999/);
    const at = inodeOffset(file, "/f.bin");
    b = Buffer.from(good);
    b.writeUInt16LE(0x1234, at + 0x28);
    await fail(b, "/f.bin", new RegExp(`^ext inode \\d+ \\(/f.bin\\) extent root at byte ${at + 0x28}: bad extent header magic 0x1234`));
    b = Buffer.from(good);
    b.writeUInt32LE(50_000, at + 0x28 + 12 + 8); // first extent's physical block
    await fail(b, "/f.bin", /extent of \d+ blocks at block 50000 lies outside the file system/);
    const dirExt = { deviceOffset: Number(sh("debugfs", ["-R", "blocks /d", file]).trim().split(/\s+/)[0]) * 1024 };
    b = Buffer.from(good);
    b.writeUInt16LE(3, dirExt.deviceOffset + 4); // rec_len of "."
    await fail(b, "/d/g.txt", new RegExp(`^ext directory block at byte ${dirExt.deviceOffset}: bad directory entry \\(rec_len 3`));
  });

  it("classic indirect blocks: a pointer outside the file system, an indirect block used twice", async () => {
    const file = mk("bad2.img", ["-b", "1024", "-O", "^extent,^64bit"]);
    const good = fs.readFileSync(file);
    const at = inodeOffset(file, "/f.bin");
    let b = Buffer.from(good);
    b.writeUInt32LE(4_000_000, at + 0x28 + 4 * 3);
    await fail(b, "/f.bin", /data block pointer 4000000 is outside the file system/);
    b = Buffer.from(good);
    const ind = b.readUInt32LE(at + 0x28 + 12 * 4);
    b.writeUInt32LE(ind, at + 0x28 + 13 * 4); // double indirect = the indirect block
    b.writeUInt32LE(100 * 1024 * 1024, at + 4); // a size that reaches the double indirect range
    await fail(b, "/f.bin", /indirect block \d+ is used twice|outside the file system/);
  });

  it("a seeded storm of random corruptions only ever gives FsError or a result, with bounded work", async () => {
    const file = mk("fuzz.img", ["-b", "1024", "-N", "128"]);
    const good = fs.readFileSync(file);
    // What the same walk costs on the clean image; a damaged one may cost at most 4 times that.
    // (Work is counted, not timed: a time bound flakes on a loaded machine.)
    const cleanRead = countingReader(reader(good));
    const clean = (await probeFileSystem(cleanRead, good.length))!;
    const cleanPaths: string[] = [];
    await walk(clean, "/", cleanPaths);
    for (const p of cleanPaths.slice(0, 60)) await clean.readFile(p).catch((e) => {
      if (!(e instanceof FsError)) throw e;
    });
    await clean.allocationMap();
    expect(cleanPaths.length).toBeGreaterThan(40);
    const budget = { calls: 4 * cleanRead.count.calls, bytes: 4 * cleanRead.count.bytes };
    // Corrupt where metadata lives: the used runs of the allocation map below the first file data.
    const used = (await clean.allocationMap()).filter((r) => r.used && r.offset < good.length);
    let seed = 12345;
    const rnd = (n: number) => {
      seed = (seed * 1103515245 + 12345) & 0x7fffffff;
      return seed % n;
    };
    let failures = 0;
    let results = 0;
    for (let i = 0; i < 200; i++) {
      const b = Buffer.from(good);
      const flips = 1 + rnd(16);
      for (let k = 0; k < flips; k++) {
        const r = used[rnd(used.length)]!;
        const off = k === 0 && i % 4 === 0 ? 1024 + rnd(1024) : r.offset + rnd(Math.min(r.length, 256 * 1024));
        b[off] = rnd(256);
      }
      const size = i % 10 === 9 ? rnd(b.length) : b.length;
      try {
        const f = await probeFileSystem(countingReader(reader(b), budget), size);
        if (!f) continue;
        results++;
        const all: string[] = [];
        await walk(f, "/", all).catch((e) => {
          if (!(e instanceof FsError)) throw e;
        });
        for (const p of all.slice(0, 60)) await f.readFile(p).catch((e) => {
          if (!(e instanceof FsError)) throw e;
        });
        await f.allocationMap();
      } catch (e) {
        if (!(e instanceof FsError)) throw new Error(`iteration ${i}: not an FsError: ${String(e)}`, { cause: e });
        failures++;
      }
    }
    expect(failures).toBeGreaterThan(10);
    expect(results).toBeGreaterThan(10);
  });
});
