import { execFileSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import zlib from "node:zlib";
import { afterAll, describe, expect, it } from "vitest";
import { needTools } from "../../../test/helpers/tools.js";
import { PartitionTableError, readPartitionTable, type ReadAt } from "./partition-table.js";

const dir = fs.mkdtempSync(path.join(os.tmpdir(), "ptable-"));
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));
const MiB = 1024 * 1024;

function image(name: string, size: number): string {
  const p = path.join(dir, name);
  fs.writeFileSync(p, "");
  fs.truncateSync(p, size);
  return p;
}
const reader = (buf: Buffer): ReadAt => async (length, offset) => Buffer.from(buf.subarray(offset, offset + length));
/** What sfdisk --json says: [start, size] in bytes per partition node, in order. */
function sfdisk(file: string): Array<{ start: number; size: number; node: string }> {
  const t = JSON.parse(execFileSync("sfdisk", ["--json", file], { encoding: "utf8" })).partitiontable;
  return t.partitions.map((p: { start: number; size: number; node: string }) => ({ start: p.start * 512, size: p.size * 512, node: p.node }));
}

describe.skipIf(!needTools("sgdisk", "sfdisk"))("partition tables made by real tools", () => {
  it("reads a GPT made by sgdisk exactly as sfdisk does, with names and GUIDs", async () => {
    const img = image("gpt.img", 64 * MiB);
    execFileSync("sgdisk", ["-n", "1:1M:+10M", "-c", "1:boot", "-t", "1:ef00", "-n", "2:0:+20M", "-c", "2:root", "-n", "4:40M:+8M", "-c", "4:data", img], { stdio: "ignore" });
    const t = (await readPartitionTable(reader(fs.readFileSync(img)), 64 * MiB))!;
    expect(t.scheme).toBe("gpt");
    expect(t.note).toBeUndefined();
    const ref = sfdisk(img);
    expect(t.partitions.map((p) => ({ start: p.start, size: p.length }))).toEqual(ref.map((r) => ({ start: r.start, size: r.size })));
    expect(t.partitions.map((p) => p.index)).toEqual([1, 2, 4]);
    expect(t.partitions.map((p) => p.name)).toEqual(["boot", "root", "data"]);
    expect(t.partitions[0]!.type).toBe("C12A7328-F81F-11D2-BA4B-00A0C93EC93B"); // EFI system partition
    expect(t.partitions[1]!.uuid).toMatch(/^[0-9A-F]{8}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{12}$/);
  });

  it("uses the backup GPT when the primary is damaged, and says so; fails clearly when both are", async () => {
    const img = image("gpt2.img", 32 * MiB);
    execFileSync("sgdisk", ["-n", "1:1M:+4M", "-n", "2:0:+4M", img], { stdio: "ignore" });
    const good = fs.readFileSync(img);
    const bad = Buffer.from(good);
    bad[512 + 30] ^= 0xff; // inside the primary header: its CRC no longer matches
    const t = (await readPartitionTable(reader(bad), bad.length))!;
    expect(t.partitions.map((p) => p.start)).toEqual(sfdisk(img).map((r) => r.start));
    expect(t.note).toMatch(/primary GPT unusable \(primary GPT header at byte 528: header CRC32 mismatch\); using the backup/);
    const worse = Buffer.from(bad);
    worse[worse.length - 512 + 30] ^= 0xff;
    const err = await readPartitionTable(reader(worse), worse.length).catch((e) => e);
    expect(err).toBeInstanceOf(PartitionTableError);
    expect(err.message).toMatch(/primary: .*CRC32 mismatch; backup: backup GPT header at byte \d+: header CRC32 mismatch/);
    const entries = Buffer.from(good);
    entries[1024 + 40] ^= 0x01; // a partition entry: the entries CRC catches it
    expect((await readPartitionTable(reader(entries), entries.length))!.note).toMatch(/entries CRC32 mismatch/);
  });

  it("takes an LBA of 2^53 or more (with valid CRCs) for a damaged primary, not a rounded number", async () => {
    const img = image("gpt3.img", 32 * MiB);
    execFileSync("sgdisk", ["-n", "1:1M:+4M", img], { stdio: "ignore" });
    const b = fs.readFileSync(img);
    b.writeBigUInt64LE(2n ** 63n, 1024 + 40); // entry 1's EndingLBA
    b.writeUInt32LE(zlib.crc32(b.subarray(1024, 1024 + 128 * 128)), 512 + 88);
    b.writeUInt32LE(0, 512 + 16);
    b.writeUInt32LE(zlib.crc32(b.subarray(512, 512 + 92)), 512 + 16);
    const t = (await readPartitionTable(reader(b), b.length))!;
    expect(t.note).toBe("primary GPT unusable (GPT entry 1 at byte 1056: LBA 9223372036854775808 is not inside the device); using the backup");
    expect(t.partitions.map((p) => [p.start, p.length])).toEqual([[MiB, 4 * MiB]]);
  });

  it("reads an MBR with primary, extended and logical partitions as sfdisk does", async () => {
    const img = image("mbr.img", 64 * MiB);
    execFileSync("sfdisk", [img], { input: "label: dos\n,8M,L\n,8M,c\n,,E\n,10M,L\n,10M,S\n", stdio: ["pipe", "ignore", "ignore"] });
    const t = (await readPartitionTable(reader(fs.readFileSync(img)), 64 * MiB))!;
    expect(t.scheme).toBe("mbr");
    const ref = sfdisk(img).filter((r) => !r.node.endsWith("3")); // the extended container itself is not a device to serve
    expect(t.partitions.map((p) => [p.index, p.start, p.length])).toEqual(ref.map((r) => [Number(r.node.replace(/.*img/, "")), r.start, r.size]));
    expect(t.partitions.map((p) => p.type)).toEqual(["0x83", "0x0c", "0x83", "0x82"]);
  });
});

describe("partition table errors", () => {
  it("has no table on a blank device, and names the structure and offset of a broken one", async () => {
    expect(await readPartitionTable(reader(Buffer.alloc(MiB)), MiB)).toBeNull();
    const b = Buffer.alloc(MiB);
    b.writeUInt16LE(0xaa55, 510);
    b[446 + 4] = 0x83;
    b.writeUInt32LE(2048, 446 + 8);
    b.writeUInt32LE(100_000, 446 + 12); // far beyond 1 MiB
    await expect(readPartitionTable(reader(b), MiB)).rejects.toThrow(/MBR entry 1 at byte 446: partition ends at \d+, beyond the device/);
    b.writeUInt32LE(100, 446 + 8);
    b.writeUInt32LE(100, 446 + 12);
    b[462 + 4] = 0x83;
    b.writeUInt32LE(150, 462 + 8);
    b.writeUInt32LE(100, 462 + 12);
    await expect(readPartitionTable(reader(b), MiB)).rejects.toThrow(/overlaps partition 1/);
  });

  it("never crashes on random bytes: a table, no table, or a PartitionTableError", async () => {
    let x = 12345;
    const rnd = () => ((x = (Math.imul(x, 1103515245) + 12345) >>> 0) & 0xff);
    for (let run = 0; run < 300; run++) {
      const b = Buffer.alloc(256 * 1024);
      for (let i = 0; i < 2048; i++) b[i] = rnd();
      b.writeUInt16LE(0xaa55, 510);
      if (run % 3 === 0) b[446 + 4] = 0xee; // protective MBR: random GPT
      if (run % 3 === 1) b.write("EFI PART", 512, "latin1");
      const out = await readPartitionTable(reader(b), b.length).catch((e) => e);
      expect(out === null || out instanceof PartitionTableError || Array.isArray(out.partitions)).toBe(true);
    }
  });
});
