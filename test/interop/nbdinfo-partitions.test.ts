import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { NbdClient } from "../../src/client/nbd-client.js";
import { randomImage, serve, tempDir, type Served } from "../helpers/serve.js";
import { debianEnv, needTools } from "../helpers/tools.js";
import { until } from "../helpers/volumes.js";

const MiB = 1024 * 1024;

describe.skipIf(!needTools("nbdinfo", "nbdcopy", "sgdisk", "sfdisk"))("partition exports", () => {
  let dir: string;
  let img: string;
  let srv: Served;
  let parts: Array<{ start: number; size: number }>;
  beforeAll(async () => {
    dir = tempDir();
    img = path.join(dir, "disk.img");
    randomImage(img, 32 * MiB, 5);
    execFileSync("sgdisk", ["-Z", img], { stdio: "ignore" });
    execFileSync("sgdisk", ["-n", "1:1M:+8M", "-c", "1:alpha", "-n", "2:0:+12M", "-c", "2:beta", img], { stdio: "ignore" });
    parts = JSON.parse(execFileSync("sfdisk", ["--json", img], { encoding: "utf8" })).partitiontable.partitions.map((p: { start: number; size: number }) => ({
      start: p.start * 512,
      size: p.size * 512,
    }));
    srv = await serve([img], 3);
  });
  afterAll(() => srv?.stop());

  it("exports each partition as NAME/pN with its size and a description of its stack", () => {
    expect(srv.uris.map((u) => new URL(u).pathname)).toEqual(["/disk", "/disk/p1", "/disk/p2"]);
    const list = JSON.parse(execFileSync("nbdinfo", ["--json", "--list", srv.uris[0]!], { encoding: "utf8", env: debianEnv })).exports;
    expect(list.map((e: { "export-name": string }) => e["export-name"])).toEqual(["disk", "disk/p1", "disk/p2"]);
    expect(list[1]["export-size"]).toBe(parts[0]!.size);
    expect(list[2]["export-size"]).toBe(parts[1]!.size);
    expect(list[1].description).toMatch(/^disk → partition 1 \(gpt "alpha", \d+ bytes at 1048576\) → file:/);
  });

  it("serves a partition's bytes exactly", () => {
    const out = path.join(dir, "p2.img");
    execFileSync("nbdcopy", [srv.uris[2]!, out]);
    const whole = fs.readFileSync(img);
    expect(fs.readFileSync(out).equals(whole.subarray(parts[1]!.start, parts[1]!.start + parts[1]!.size))).toBe(true);
  });

  it("keeps writes inside the partition: offsets are relative, the end is the partition's end", async () => {
    const p = parts[0]!;
    const end = p.start + p.size; // where p1 ends on the disk (and p2 begins)
    const fd = fs.openSync(img, "r");
    const at = (offset: number, length: number) => {
      const b = Buffer.alloc(length);
      fs.readSync(fd, b, 0, length, offset);
      return b;
    };
    try {
      // The disk around p1's end before the writes: its last 4 KiB and the 64 KiB after it.
      const tail = at(end - 4096, 4096);
      const beyond = at(end, 65536);
      const u = new URL(srv.uris[1]!);
      const c = await NbdClient.connect({ host: u.hostname, port: Number(u.port) }, { exportName: "disk/p1" });
      expect(c.size).toBe(p.size);
      await c.pwrite(Buffer.alloc(4096, 0xab), 0);
      // Across the end (by 2 KiB, by one byte, zeroes) and wholly past it: refused, nothing written.
      await expect(c.pwrite(Buffer.alloc(4096, 0xcd), p.size - 2048)).rejects.toMatchObject({ errno: "ENOSPC" });
      await expect(c.pwrite(Buffer.alloc(512, 0xcd), p.size - 511)).rejects.toMatchObject({ errno: "ENOSPC" });
      await expect(c.zero(8192, p.size - 4096)).rejects.toMatchObject({ errno: "ENOSPC" });
      await expect(c.pwrite(Buffer.alloc(512, 0xcd), p.size)).rejects.toMatchObject({ errno: "ENOSPC" });
      // Up to the partition's last byte: accepted.
      await c.pwrite(Buffer.alloc(1024, 0xef), p.size - 1024);
      await c.flush();
      await c.disconnect();
      expect(at(p.start, 4096).equals(Buffer.alloc(4096, 0xab))).toBe(true);
      // Byte for byte: the refused writes left p1's tail as it was (but for the accepted last
      // 1 KiB) and the disk beyond the end untouched.
      expect(at(end - 4096, 3072).equals(tail.subarray(0, 3072))).toBe(true);
      expect(at(end - 1024, 1024).equals(Buffer.alloc(1024, 0xef))).toBe(true);
      expect(at(end, 65536).equals(beyond)).toBe(true);
    } finally {
      fs.closeSync(fd);
    }
  });

  it("serves the whole disk and says why when the table is corrupt", async () => {
    const bad = path.join(dir, "bad.img");
    const whole = fs.readFileSync(img);
    whole[512 + 30] ^= 0xff; // primary header
    whole[whole.length - 512 + 30] ^= 0xff; // backup header
    fs.writeFileSync(bad, whole);
    const s = await serve([bad]);
    try {
      expect(s.uris).toHaveLength(1);
      expect(execFileSync("nbdinfo", ["--size", s.uri], { encoding: "utf8", env: debianEnv }).trim()).toBe(String(32 * MiB));
      await until("the log line saying why no partition is offered", () => (/no partition exports/.test(s.stderr()) ? true : undefined));
      expect(s.stderr()).toMatch(/"reason":"GPT at byte 512: primary: primary GPT header at byte 528: header CRC32 mismatch; backup: .*","msg":"no partition exports"/);
    } finally {
      await s.stop();
    }
  });
});
