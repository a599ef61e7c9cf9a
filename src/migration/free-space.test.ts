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
});
