import { execFileSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { catCommand, inspectCommand, inspectImage, lsCommand, parseImagePath, type InspectReport, type Out } from "../../src/commands/fs.js";
import zlib from "node:zlib";
import { CLI, ROOT, tempDir } from "../helpers/serve.js";
import { needTools } from "../helpers/tools.js";

// The command functions, called directly (the lead wires registerFsCommands into cli.ts and adds
// a test of the built CLI). Images are made by sgdisk, mkfs.ext4 -d and mkfs.vfat + mcopy.

const MiB = 1024 * 1024;
const env = { ...process.env, MTOOLS_SKIP_CHECK: "1" };

class Collect implements Out {
  chunks: Buffer[] = [];
  write(c: string | Buffer): boolean {
    this.chunks.push(Buffer.isBuffer(c) ? Buffer.from(c) : Buffer.from(c, "utf8"));
    return true;
  }
  get bytes(): Buffer {
    return Buffer.concat(this.chunks);
  }
  get text(): string {
    return this.bytes.toString("utf8");
  }
}

async function run(f: (out: Out) => Promise<void>): Promise<string> {
  const c = new Collect();
  await f(c);
  return c.text;
}

const blkid = (file: string, offset: number): Record<string, string> => {
  const out = execFileSync("blkid", ["-p", "-O", String(offset), "-o", "export", file], { encoding: "utf8" });
  return Object.fromEntries(out.trim().split("\n").map((l) => l.split("=", 2) as [string, string]));
};

describe.skipIf(!needTools("sgdisk", "mkfs.ext4", "mkfs.vfat", "mcopy", "mmd", "blkid"))("inspect, ls and cat on images", () => {
  let dir: string;
  let disk: string;
  let whole: string;
  const big = randomBytes(3 * MiB + 17);
  beforeAll(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "cli-inspect-"));
    // p1: FAT16 "BOOT", p2: ext4 "root" with files, p3: nothing.
    const src = path.join(dir, "src");
    fs.mkdirSync(path.join(src, "etc", "conf.d"), { recursive: true });
    fs.writeFileSync(path.join(src, "etc", "hostname"), "node-1\n");
    fs.writeFileSync(path.join(src, "etc", "conf.d", "net"), "dhcp\n");
    fs.writeFileSync(path.join(src, "big.bin"), big);
    fs.symlinkSync("etc/hostname", path.join(src, "link"));
    const ext = path.join(dir, "ext.img");
    fs.writeFileSync(ext, "");
    fs.truncateSync(ext, 24 * MiB);
    execFileSync("mkfs.ext4", ["-q", "-F", "-L", "root", "-d", src, ext], { stdio: "ignore" });
    const fat = path.join(dir, "fat.img");
    fs.writeFileSync(fat, "");
    fs.truncateSync(fat, 16 * MiB);
    execFileSync("mkfs.vfat", ["-F", "16", "-n", "BOOT", fat], { stdio: "ignore" });
    execFileSync("mmd", ["-i", fat, "::/EFI", "::/EFI/Boot Loader"], { env });
    fs.writeFileSync(path.join(dir, "grub.cfg"), "set timeout=5\n");
    execFileSync("mcopy", ["-i", fat, path.join(dir, "grub.cfg"), "::/EFI/Boot Loader/grub configuration.cfg"], { env });
    disk = path.join(dir, "disk.img");
    fs.writeFileSync(disk, "");
    fs.truncateSync(disk, 48 * MiB);
    execFileSync("sgdisk", ["-n", "1:1M:+16M", "-t", "1:ef00", "-c", "1:esp", "-n", "2:0:+24M", "-c", "2:root", "-n", "3:0:0", disk], { stdio: "ignore" });
    const fd = fs.openSync(disk, "r+");
    fs.writeSync(fd, fs.readFileSync(fat), 0, 16 * MiB, MiB);
    fs.writeSync(fd, fs.readFileSync(ext), 0, 24 * MiB, 17 * MiB);
    fs.closeSync(fd);
    whole = ext;
  });
  afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

  it("parses IMAGE[:pN]:/path", () => {
    expect(parseImagePath("disk.img:p2:/etc")).toEqual({ image: "disk.img", part: 2, path: "/etc" });
    expect(parseImagePath("disk.img:/")).toEqual({ image: "disk.img", part: null, path: "/" });
    expect(parseImagePath("dir:x/disk.img:p1:/a:b")).toEqual({ image: "dir:x/disk.img", part: 1, path: "/a:b" });
    expect(parseImagePath("disk.img")).toEqual({ image: "disk.img", part: null, path: "/" });
    expect(parseImagePath("disk.img:p3")).toEqual({ image: "disk.img", part: 3, path: "/" });
  });

  it("inspect --json: partitions, file systems, labels and UUIDs as blkid sees them, used and free", async () => {
    const r = JSON.parse(await run((o) => inspectCommand(disk, { json: true }, o))) as InspectReport;
    expect(r.table).toEqual({ scheme: "gpt" });
    expect(r.volumes.map((v) => [v.name, v.start, v.fs?.kind ?? null, v.fs?.label ?? null])).toEqual([
      ["p1", MiB, "fat16", "BOOT"],
      ["p2", 17 * MiB, "ext4", "root"],
      ["p3", 41 * MiB, null, null],
    ]);
    expect(r.volumes[0]!.fs!.uuid).toBe(blkid(disk, MiB).UUID);
    expect(r.volumes[1]!.fs!.uuid).toBe(blkid(disk, 17 * MiB).UUID);
    expect(r.volumes[0]!.partition).toMatchObject({ index: 1, type: "C12A7328-F81F-11D2-BA4B-00A0C93EC93B", name: "esp" });
    const ext = r.volumes[1]!.fs!;
    expect(ext.usedBytes + ext.freeBytes).toBe(ext.totalBytes);
    expect(ext.usedBytes).toBeGreaterThan(big.length);
    const free = Number(/Free blocks:\s+(\d+)/.exec(execFileSync("dumpe2fs", ["-h", whole], { encoding: "utf8", stdio: ["ignore", "pipe", "ignore"] }))![1]);
    expect(ext.freeBytes).toBe(free * ext.blockSize);
  });

  it("inspect: a table for people, and an image without a partition table", async () => {
    const text = await run((o) => inspectCommand(disk, {}, o));
    expect(text).toMatch(/^.*disk\.img: 48 MiB \(50331648 bytes\), GPT partition table\n/);
    expect(text).toMatch(/\np1\s+1 MiB\s+16 MiB\s+C12A7328 "esp"\s+fat16\s+BOOT\s+[0-9A-F]{4}-[0-9A-F]{4}\s+/);
    expect(text).toMatch(/\np2\s+17 MiB\s+24 MiB\s+.*ext4\s+root\s+[0-9a-f-]{36}\s+\d/);
    expect(text).toMatch(/\np3\s+41 MiB\s+.*\s-\s+-\s+-\s+-\s+-\n/);
    const r = await inspectImage(whole);
    expect(r.table).toBeNull();
    expect(r.volumes).toHaveLength(1);
    expect(r.volumes[0]).toMatchObject({ name: "whole", start: 0, fs: { kind: "ext4", label: "root" } });
  });

  it("ls and ls -l inside partitions and whole images", async () => {
    expect(await run((o) => lsCommand(`${disk}:p2:/`, {}, o))).toBe("big.bin\netc\nlink\nlost+found\n");
    expect(await run((o) => lsCommand(`${disk}:p2:/etc`, {}, o))).toBe("conf.d\nhostname\n");
    expect(await run((o) => lsCommand(`${whole}:/etc/conf.d`, {}, o))).toBe("net\n");
    expect(await run((o) => lsCommand(`${disk}:p1:/EFI/boot loader`, {}, o))).toBe("grub configuration.cfg\n");
    const long = await run((o) => lsCommand(`${disk}:p2:/`, { long: true }, o));
    expect(long).toMatch(new RegExp(`^-rw-r--r--\\s+1\\s+\\d+\\s+\\d+\\s+${big.length}\\s+\\d{4}-\\d\\d-\\d\\d \\d\\d:\\d\\d\\s+big\\.bin$`, "m"));
    expect(long).toMatch(/^drwxr-xr-x\s+\d+\s+\d+\s+\d+\s+\d+\s+.*\setc$/m);
    expect(long).toMatch(/^lrwxrwxrwx\s+.*\slink -> etc\/hostname$/m);
    expect(await run((o) => lsCommand(`${disk}:p2:/etc/hostname`, {}, o))).toBe("/etc/hostname\n");
  });

  it("cat writes the file's raw bytes, following symlinks", async () => {
    const c = new Collect();
    await catCommand(`${disk}:p2:/big.bin`, c);
    expect(c.bytes.equals(big)).toBe(true);
    expect(await run((o) => catCommand(`${disk}:p2:/link`, o))).toBe("node-1\n");
    expect(await run((o) => catCommand(`${disk}:p1:/efi/BOOT LOADER/grub configuration.cfg`, o))).toBe("set timeout=5\n");
  });

  it("reads qcow2 images through the qcow2 layer: a compressed image and an overlay over it, as the raw disk", async () => {
    if (!needTools("qemu-img")) return;
    const packed = path.join(dir, "disk.qcow2");
    const top = path.join(dir, "top.qcow2");
    execFileSync("qemu-img", ["convert", "-c", "-O", "qcow2", disk, packed]);
    execFileSync("qemu-img", ["create", "-q", "-f", "qcow2", "-b", "disk.qcow2", "-F", "qcow2", top]);
    for (const img of [packed, top]) {
      const r = await inspectImage(img);
      expect(r.size).toBe(48 * MiB);
      expect(r.table).toEqual({ scheme: "gpt" });
      expect(r.volumes.map((v) => [v.name, v.fs?.kind ?? null, v.fs?.label ?? null])).toEqual([
        ["p1", "fat16", "BOOT"],
        ["p2", "ext4", "root"],
        ["p3", null, null],
      ]);
      expect(await run((o) => lsCommand(`${img}:p2:/etc`, {}, o))).toBe("conf.d\nhostname\n");
      const c = new Collect();
      await catCommand(`${img}:p2:/big.bin`, c);
      expect(c.bytes.equals(big)).toBe(true);
      expect(await run((o) => catCommand(`${img}:p1:/efi/BOOT LOADER/grub configuration.cfg`, o))).toBe("set timeout=5\n");
    }
    // Read-only: the images are not changed (no autoclear bits cleared, nothing allocated).
    expect(execFileSync("qemu-img", ["check", top], { encoding: "utf8" })).toMatch(/No errors were found/);
  });

  it("clear errors: missing path, not a directory, a directory to cat, unknown partition, no partition named", async () => {
    const sink = new Collect();
    await expect(lsCommand(`${disk}:p2:/nope`, {}, sink)).rejects.toThrow(`${disk}:p2: /nope: no such file or directory`);
    await expect(lsCommand(`${disk}:p2:/etc/hostname/x`, {}, sink)).rejects.toThrow(`${disk}:p2: /etc/hostname: not a directory`);
    await expect(catCommand(`${disk}:p2:/etc`, sink)).rejects.toThrow(`${disk}:p2: /etc: is a directory`);
    await expect(catCommand(`${disk}:p7:/etc`, sink)).rejects.toThrow(`${disk} has no partition p7 (its gpt table has p1, p2, p3)`);
    await expect(lsCommand(`${disk}:p3:/`, {}, sink)).rejects.toThrow(`${disk}:p3: no ext2/3/4 or FAT file system found`);
    await expect(lsCommand(`${disk}:/`, {}, sink)).rejects.toThrow(`${disk} has a gpt partition table: name a partition, e.g. ${disk}:p1:/`);
    await expect(lsCommand(`${whole}:p1:/`, {}, sink)).rejects.toThrow(`${whole} has no partition table, so no partition p1`);
    await expect(inspectCommand(path.join(dir, "missing.img"), {}, sink)).rejects.toThrow(/cannot open .*missing\.img: ENOENT/);
    expect(sink.bytes.length).toBe(0);
  });
});

describe("inspect / ls / cat through the built CLI, on the demo disk", () => {
  it("lists the partitions and file systems and reads a file without mounting anything", () => {
    const img = path.join(tempDir(), "demo.img");
    fs.writeFileSync(img, zlib.gunzipSync(fs.readFileSync(path.join(ROOT, "fixtures/demo.img.gz"))));
    const cli = (...args: string[]) => execFileSync(process.execPath, [CLI, ...args], { encoding: "utf8" });
    const report = cli("inspect", img, "--json");
    expect(report).toMatch(/demo-ext4/);
    expect(report).toMatch(/fat16/);
    expect(cli("ls", `${img}:p1:/`)).toMatch(/hello\.txt/);
    expect(cli("cat", `${img}:p1:/hello.txt`)).toBe("Hello from the nbdstack demo disk!\n");
    // The free space of both file systems, in image offsets, for tools that skip it.
    const free = JSON.parse(cli("inspect", img, "--free", "--json")) as Array<{ offset: number; length: number }>;
    const vols = JSON.parse(report).volumes as Array<{ fs: { freeBytes: number } }>;
    expect(free.reduce((n, r) => n + r.length, 0)).toBe(vols.reduce((n, v) => n + v.fs.freeBytes, 0));
  });
});
