import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import zlib from "node:zlib";
import { describe, expect, it } from "vitest";
import { probeFileSystem } from "../fs/probe.js";
import { plainIo } from "../stack/layer.js";
import { createFilePort } from "../stack/port/file-port.js";
import { readPartitionTable } from "../stack/partition/partition-table.js";
import { freeRanges } from "./free-space.js";

describe("free space for --skip-free", () => {
  it("is the free blocks of every partition's file system, in device offsets, and nothing else", async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "nbdstack-free-"));
    try {
      const img = path.join(dir, "demo.img");
      fs.writeFileSync(img, zlib.gunzipSync(fs.readFileSync(new URL("../../fixtures/demo.img.gz", import.meta.url))));
      const port = createFilePort({ path: img, readOnly: true });
      await port.open();
      const read = async (n: number, off: number) => {
        const b = Buffer.alloc(n);
        await port.pread(b, off, plainIo);
        return b;
      };
      const free = await freeRanges(port);
      const table = (await readPartitionTable(read, port.size()))!;
      let want = 0;
      for (const p of table.partitions) {
        const f = (await probeFileSystem((n, off) => read(n, p.start + off), p.length))!;
        want += f.freeBytes;
        const inside = free.filter((r) => r.offset >= p.start && r.offset + r.length <= p.start + p.length);
        expect(inside.reduce((s, r) => s + r.length, 0)).toBe(f.freeBytes);
      }
      expect(free.reduce((s, r) => s + r.length, 0)).toBe(want);
      expect(want).toBeGreaterThan(40 * 1024 * 1024); // the demo disk is mostly empty
      // A free block really is unused: the superblock and the partition table are never in it.
      expect(free.every((r) => r.offset >= table.partitions[0]!.start + 4096)).toBe(true);
      await port.close();
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it("skip-free on a mounted file system: one whose superblock says in use (journal to recover, not cleanly unmounted) counts as used", async () => {
    // A mounted ext file system's on-disk bitmaps lag its journal: blocks written before the copy
    // began may still be free there. Such a file system gives no free ranges at all.
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "nbdstack-free-"));
    try {
      const img = path.join(dir, "demo.img");
      fs.writeFileSync(img, zlib.gunzipSync(fs.readFileSync(new URL("../../fixtures/demo.img.gz", import.meta.url))));
      let port = createFilePort({ path: img });
      await port.open();
      const read = async (n: number, off: number) => {
        const b = Buffer.alloc(n);
        await port.pread(b, off, plainIo);
        return b;
      };
      const table = (await readPartitionTable(read, port.size()))!;
      const exts: Array<{ start: number; length: number }> = [];
      for (const p of table.partitions) {
        const f = await probeFileSystem((n, off) => read(n, p.start + off), p.length);
        if (f?.kind.startsWith("ext")) exts.push(p);
      }
      expect(exts.length).toBeGreaterThan(0);
      const p = exts[0]!;
      const inside = (free: Array<{ offset: number; length: number }>) => free.filter((r) => r.offset >= p.start && r.offset < p.start + p.length).length;
      expect(inside(await freeRanges(port))).toBeGreaterThan(0);
      // As a read-write mount leaves it: s_state without VALID_FS, s_feature_incompat with RECOVER.
      const sb = await read(1024, p.start + 1024);
      sb.writeUInt16LE(sb.readUInt16LE(0x3a) & ~1, 0x3a);
      sb.writeUInt32LE(sb.readUInt32LE(0x60) | 0x4, 0x60);
      await port.pwrite(sb, p.start + 1024, plainIo);
      await port.close();
      port = createFilePort({ path: img, readOnly: true });
      await port.open();
      expect(inside(await freeRanges(port))).toBe(0);
      await port.close();
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
