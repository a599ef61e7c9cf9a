import { execFileSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { needTools } from "../../test/helpers/tools.js";
import { FsError, probeFileSystem, type FileSystem, type ReadAt } from "./probe.js";
import { expectFsError, reader } from "../../test/helpers/fs-images.js";
import { countingReader } from "../../test/helpers/volumes.js";

const MiB = 1024 * 1024;
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "fatfs-"));
const src = path.join(tmp, "src");
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));
const env = { ...process.env, MTOOLS_SKIP_CHECK: "1", MTOOLS_NO_VFAT: "" };
const mtool = (cmd: string, args: string[]) => execFileSync(cmd, args, { encoding: "utf8", env, stdio: ["ignore", "pipe", "pipe"] });

const files = new Map<string, Buffer>();
function put(rel: string, data: Buffer): void {
  const p = path.join(src, rel);
  fs.mkdirSync(path.dirname(p), { recursive: true });
  fs.writeFileSync(p, data);
  files.set("/" + rel, data);
}

function makeSource(): void {
  put("A long file name with spaces.txt", Buffer.from("long\n"));
  put("SHORT.TXT", Buffer.from("short\n"));
  put("lower.txt", Buffer.from("lower case 8.3\n"));
  put("Ünïcödé – naïve ✓.bin", randomBytes(3000));
  put("empty", Buffer.alloc(0));
  put("big.bin", randomBytes(300 * 1024 + 11));
  put("Sub Dir/nested/deeper/leaf file.txt", Buffer.from("deep\n"));
  put("Sub Dir/x.dat", randomBytes(5000));
  for (let i = 0; i < 150; i++) put(`many/entry number ${i}.txt`, Buffer.from(`file ${i}\n`));
}

interface Img {
  file: string;
  buf: Buffer;
  fs: FileSystem;
}

async function mkfat(name: string, bits: 12 | 16 | 32, sizeMiB: number, extra: string[] = []): Promise<Img> {
  const file = path.join(tmp, name);
  fs.writeFileSync(file, "");
  fs.truncateSync(file, sizeMiB * MiB);
  execFileSync("mkfs.vfat", ["-F", String(bits), "-n", `FAT${bits}VOL`, "-i", "1234abcd", ...extra, file], { stdio: "ignore" });
  mtool("mcopy", ["-s", "-i", file, ...fs.readdirSync(src).map((n) => path.join(src, n)), "::/"]);
  return reload(file);
}

async function reload(file: string): Promise<Img> {
  const buf = fs.readFileSync(file);
  const f = await probeFileSystem(reader(buf), buf.length);
  expect(f).not.toBeNull();
  return { file, buf, fs: f! };
}

/** Clusters of a file as mshowfat lists them, e.g. "<3-5><9>". */
function mshowfat(img: string, p: string): number[] {
  const out = mtool("mshowfat", ["-i", img, `::${p}`]);
  const clusters: number[] = [];
  for (const m of out.matchAll(/<(\d+)(?:-(\d+))?>/g)) for (let c = Number(m[1]); c <= Number(m[2] ?? m[1]); c++) clusters.push(c);
  return clusters;
}

async function walk(f: FileSystem, dir: string, out: string[]): Promise<void> {
  for (const e of await f.readdir(dir)) {
    const p = (dir === "/" ? "" : dir) + "/" + e.name;
    out.push(p);
    if (e.type === "dir") await walk(f, p, out);
  }
}

async function checkImage(img: Img, bits: 12 | 16 | 32): Promise<void> {
  const f = img.fs;
  expect(f.kind).toBe(`fat${bits}`);
  expect(f.label).toBe(`FAT${bits}VOL`);
  expect(f.uuid).toBe("1234-ABCD");
  const free = Number(/([\d ]+) bytes free/.exec(mtool("mdir", ["-i", img.file, "::/"]))![1]!.replace(/ /g, ""));
  expect(f.freeBytes).toBe(free);

  for (const [p, data] of files) expect((await f.readFile(p)).equals(data), p).toBe(true);
  const listed: string[] = [];
  await walk(f, "/", listed);
  const expected: string[] = [];
  const walkSrc = (rel: string) => {
    for (const n of fs.readdirSync(path.join(src, rel))) {
      expected.push(rel + "/" + n);
      if (fs.statSync(path.join(src, rel, n)).isDirectory()) walkSrc(rel + "/" + n);
    }
  };
  walkSrc("");
  expect(listed.sort()).toEqual(expected.sort());
  // FAT names are case-insensitive.
  expect((await f.readFile("/sub dir/NESTED/Deeper/LEAF FILE.TXT")).toString()).toBe("deep\n");
  const st = await f.stat("/big.bin");
  expect(st.type).toBe("file");
  expect(st.size).toBe(files.get("/big.bin")!.length);
  expect(Math.abs(st.mtime.getTime() - Date.now())).toBeLessThan(2 * 86400_000); // local time stored as UTC

  const map = await f.allocationMap();
  let pos = 0;
  for (const r of map) {
    expect(r.offset).toBe(pos);
    pos += r.length;
  }
  expect(pos).toBe(img.buf.length);
  expect(map.filter((r) => !r.used).reduce((n, r) => n + r.length, 0)).toBe(f.freeBytes);
  const usedAt = (off: number) => map.find((r) => r.offset <= off && off < r.offset + r.length)!.used;
  for (const p of ["/big.bin", "/Sub Dir/x.dat", "/SHORT.TXT", "/Ünïcödé – naïve ✓.bin"]) {
    const ext = await f.fileExtents(p);
    const data = files.get(p)!;
    expect(ext.reduce((n, e) => n + e.length, 0)).toBe(data.length);
    for (const e of ext) {
      expect(img.buf.subarray(e.deviceOffset, e.deviceOffset + e.length).equals(data.subarray(e.fileOffset, e.fileOffset + e.length))).toBe(true);
      expect(usedAt(e.deviceOffset)).toBe(true);
    }
    const clusterSize = f.blockSize;
    const first = ext[0]!.deviceOffset;
    const firstCluster = mshowfat(img.file, p)[0]!;
    const ours = ext.flatMap((e) => Array.from({ length: Math.ceil(e.length / clusterSize) }, (_, k) => (e.deviceOffset - first) / clusterSize + k + firstCluster));
    expect(ours, p).toEqual(mshowfat(img.file, p));
  }
}

const haveTools = needTools("mkfs.vfat", "mcopy", "mdir", "mshowfat", "mdel");

describe.skipIf(!haveTools)("FAT12/16/32 images made by mkfs.vfat and mtools", () => {
  beforeAll(() => makeSource());

  it("FAT12", async () => {
    await checkImage(await mkfat("fat12.img", 12, 4), 12);
  });

  it("FAT16", async () => {
    await checkImage(await mkfat("fat16.img", 16, 32), 16);
  });

  it("FAT32 with 512-byte clusters", async () => {
    await checkImage(await mkfat("fat32.img", 32, 40, ["-s", "1"]), 32);
  });

  it("a fragmented file: the chain jumps over clusters still in use", async () => {
    const img = await mkfat("frag.img", 16, 16, ["-s", "1"]);
    for (let i = 0; i < 150; i += 2) mtool("mdel", ["-i", img.file, `::/many/entry number ${i}.txt`]);
    const frag = randomBytes(60 * 1024);
    fs.writeFileSync(path.join(tmp, "frag.bin"), frag);
    mtool("mcopy", ["-i", img.file, path.join(tmp, "frag.bin"), "::/frag.bin"]);
    const again = await reload(img.file);
    expect((await again.fs.readFile("/frag.bin")).equals(frag)).toBe(true);
    const ext = await again.fs.fileExtents("/frag.bin");
    expect(ext.length).toBeGreaterThan(10);
    expect((await again.fs.readdir("/many")).length).toBe(75);
  });

  it("path errors are clear", async () => {
    const img = await mkfat("err.img", 12, 2);
    await expect(img.fs.readdir("/nope")).rejects.toThrow(/^\/nope: no such file or directory$/);
    await expect(img.fs.readdir("/SHORT.TXT")).rejects.toThrow(/^\/SHORT.TXT: not a directory$/);
    await expect(img.fs.readFile("/Sub Dir")).rejects.toThrow(/is a directory/);
    await expect(img.fs.readlink("/SHORT.TXT")).rejects.toThrow(/not a symbolic link/);
  });
});

describe.skipIf(!haveTools)("damaged FAT structures give a clear FsError", () => {
  const dir = path.join(tmp, "bad");
  fs.mkdirSync(dir, { recursive: true });
  const mk = (bits: 12 | 16 | 32, sizeMiB: number): string => {
    const s = path.join(dir, "s");
    fs.mkdirSync(path.join(s, "Some Directory"), { recursive: true });
    fs.writeFileSync(path.join(s, "file.bin"), randomBytes(20_000));
    for (let i = 0; i < 30; i++) fs.writeFileSync(path.join(s, "Some Directory", `a long name ${i}.txt`), randomBytes(i * 300));
    const file = path.join(dir, `f${bits}.img`);
    fs.writeFileSync(file, "");
    fs.truncateSync(file, sizeMiB * MiB);
    execFileSync("mkfs.vfat", ["-F", String(bits), ...(bits === 32 ? ["-s", "1"] : []), file], { stdio: "ignore" });
    mtool("mcopy", ["-s", "-i", file, path.join(s, "file.bin"), path.join(s, "Some Directory"), "::/"]);
    return file;
  };

  const fail = expectFsError;

  it("boot sector, FAT loops and holes, directory sizes", async () => {
    const file = mk(16, 16);
    const good = fs.readFileSync(file);
    const f = (await probeFileSystem(reader(good), good.length))!;
    let b = Buffer.from(good);
    b.writeUInt16LE(0, 19); // no total sector count
    b.writeUInt32LE(0, 32);
    await fail(b, null, /^FAT boot sector at byte 0: total sector count is 0$/);
    b = Buffer.from(good);
    b.writeUInt16LE(0, 19);
    b.writeUInt32LE(10_000_000, 32);
    await fail(b, null, /^FAT boot sector at byte 0: 10000000 sectors of 512 bytes do not fit the device/);
    expect((await f.readFile("/file.bin")).length).toBe(20_000);
    const clusters = mshowfat(file, "/file.bin");
    const fatStart = good.readUInt16LE(14) * 512;
    b = Buffer.from(good);
    b.writeUInt16LE(clusters[0]!, fatStart + clusters[1]! * 2); // second cluster points back to the first
    await fail(b, "/file.bin", new RegExp(`^FAT chain of /file.bin at byte ${fatStart}: loops back to cluster ${clusters[0]}`));
    b = Buffer.from(good);
    b.writeUInt16LE(0, fatStart + clusters[1]! * 2); // chain runs into a free cluster
    await fail(b, "/file.bin", /^FAT chain of \/file.bin at byte \d+: cluster 0 after 2 clusters is not a data cluster/);
    b = Buffer.from(good);
    b.writeUInt16LE(0xffff, fatStart + clusters[1]! * 2); // chain ends early
    await fail(b, "/file.bin", /^FAT chain of \/file.bin at byte \d+: ends after 2 clusters; the file's 20000 bytes need \d+/);
  });

  it("a seeded storm of random corruptions only ever gives FsError or a result, with bounded work", async () => {
    for (const [bits, size] of [[12, 2], [16, 16], [32, 34]] as const) {
      const file = mk(bits, size);
      const good = fs.readFileSync(file);
      // What the same walk costs on the clean image; a damaged one may cost at most 4 times that.
      // (Work is counted, not timed: a time bound flakes on a loaded machine.)
      const cleanRead = countingReader(reader(good));
      const clean = (await probeFileSystem(cleanRead, good.length))!;
      expect(clean.kind).toBe(`fat${bits}`);
      const cleanPaths: string[] = [];
      await walk(clean, "/", cleanPaths);
      for (const p of cleanPaths) await clean.readFile(p).catch((e) => {
        if (!(e instanceof FsError)) throw e;
      });
      await clean.allocationMap();
      expect(cleanPaths.length).toBeGreaterThan(30);
      const budget = { calls: 4 * cleanRead.count.calls, bytes: 4 * cleanRead.count.bytes };
      // Metadata is at the front: boot sector, FATs, root directory, first directory clusters.
      const meta = (await clean.allocationMap())[0]!.length + 64 * 1024;
      let seed: number = bits;
      const rnd = (n: number) => {
        seed = (seed * 1103515245 + 12345) & 0x7fffffff;
        return seed % n;
      };
      // A directory whose cluster chain loops back to its start: endless work for a reader that
      // does not notice. Laid into every 7th image on top of the random flips.
      const dirChain = mshowfat(file, "/Some Directory");
      expect(dirChain.length).toBeGreaterThan(1);
      const fatStart = good.readUInt16LE(14) * good.readUInt16LE(11);
      const loop = new Map<number, number>();
      const last = dirChain[dirChain.length - 1]!;
      const first = dirChain[0]!;
      if (bits === 12) {
        const at = fatStart + last + (last >> 1);
        const v = good.readUInt16LE(at);
        const nv = last & 1 ? (v & 0x000f) | (first << 4) : (v & 0xf000) | first;
        loop.set(at, nv & 0xff).set(at + 1, nv >> 8);
      } else {
        const at = fatStart + last * (bits / 8);
        const e = Buffer.alloc(4);
        e.writeUInt32LE(bits === 16 ? first : (good.readUInt32LE(at) & 0xf0000000) | first);
        for (let k = 0; k < bits / 8; k++) loop.set(at + k, e[k]!);
      }
      // The corrupted bytes are laid over the clean image as it is read (no 40 MiB copy each time).
      const patched =
        (patch: Map<number, number>): ReadAt =>
        async (length, offset) => {
          const out = Buffer.from(good.subarray(offset, offset + length));
          for (const [at, v] of patch) if (at >= offset && at < offset + length) out[at - offset] = v;
          return out;
        };
      const looped = (await probeFileSystem(countingReader(patched(loop), budget), good.length))!;
      await expect(walk(looped, "/", [])).rejects.toThrow(new RegExp(`^FAT chain of directory /Some Directory at byte ${fatStart}: loops back to cluster ${first}`));
      let failures = 0;
      let results = 0;
      for (let i = 0; i < 70; i++) {
        const patch = new Map<number, number>(i % 7 === 3 ? loop : []);
        const flips = 1 + rnd(12);
        for (let k = 0; k < flips; k++) patch.set(i % 5 === 0 && k === 0 ? rnd(90) : rnd(meta), rnd(256));
        const read = patched(patch);
        try {
          const f = await probeFileSystem(countingReader(read, budget), i % 10 === 9 ? rnd(good.length) : good.length);
          if (!f) continue;
          results++;
          const all: string[] = [];
          await walk(f, "/", all).catch((e) => {
            if (!(e instanceof FsError)) throw e;
          });
          for (const p of all) await f.readFile(p).catch((e) => {
            if (!(e instanceof FsError)) throw e;
          });
          await f.allocationMap();
        } catch (e) {
          if (!(e instanceof FsError)) throw new Error(`FAT${bits} iteration ${i}: not an FsError: ${String(e)}`, { cause: e });
          failures++;
        }
      }
      expect(failures).toBeGreaterThan(3);
      expect(results).toBeGreaterThan(10);
    }
  });
});
