import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { imageKind } from "../kinds.js";
import { backingPath } from "./qcow2-backing.js";
import { compressedExtent, entryOffset, hasExtendedL2, l2EntrySize, onesFrom, ownedEntry, parseHeader, refcountAt, setRefcount, subclusterMask } from "./qcow2-format.js";

/** A v3 header with 64 KiB clusters in a cluster-sized buffer; `edit` changes it. */
function header(edit: (b: Buffer) => void = () => undefined): Buffer {
  const b = Buffer.alloc(65536);
  b.write("QFI\xfb", 0, "latin1");
  b.writeUInt32BE(3, 4);
  b.writeUInt32BE(16, 20);
  b.writeBigUInt64BE(1n << 30n, 24);
  b.writeUInt32BE(2, 36); // L1 entries: 2 × 512 MiB
  b.writeBigUInt64BE(3n * 65536n, 40);
  b.writeBigUInt64BE(65536n, 48);
  b.writeUInt32BE(1, 56);
  b.writeUInt32BE(4, 96);
  b.writeUInt32BE(104, 100);
  edit(b);
  return b;
}

describe("qcow2 header", () => {
  it("reads the fields and extensions", () => {
    const h = parseHeader(
      header((b) => {
        b.writeUInt32BE(0xe2792aca, 104);
        b.writeUInt32BE(3, 108);
        b.write("raw", 112);
        b.writeBigUInt64BE(1024n, 8);
        b.writeUInt32BE(8, 16);
      }),
      "x.qcow2",
    );
    expect(h).toMatchObject({ version: 3, clusterBits: 16, size: 1 << 30, l1Size: 2, refcountOrder: 4, backingFormat: "raw", backingFileOffset: 1024 });
  });

  it("reads extended L2 entries (bit 4): 16-byte entries, so an L1 entry maps half as much", () => {
    const h = parseHeader(header((b) => (b[79] = 0x10) && b.writeUInt32BE(4, 36)), "x.qcow2"); // 4 × 256 MiB
    expect(hasExtendedL2(h)).toBe(true);
    expect(l2EntrySize(h)).toBe(16);
    expect(l2EntrySize(parseHeader(header(), "x.qcow2"))).toBe(8);
    expect(() => parseHeader(header((b) => (b[79] = 0x10)), "x.qcow2")).toThrow(/L1 table of 2 entries is too small/);
    expect(parseHeader(header((b) => (b[79] = 0x10) && b.writeUInt32BE(14, 20) && b.writeUInt32BE(1024, 36)), "x.qcow2").clusterBits).toBe(14);
  });

  it("subcluster masks", () => {
    expect(subclusterMask(0, 32)).toBe(0xffffffff);
    expect(subclusterMask(31, 1)).toBe(0x80000000);
    expect(subclusterMask(3, 2)).toBe(0b11000);
    expect(subclusterMask(5, 0)).toBe(0);
    expect(onesFrom(0xffffffff, 0)).toBe(32);
    expect(onesFrom(0xffffffff, 31)).toBe(1);
    expect(onesFrom(0x80000000, 31)).toBe(1);
    expect(onesFrom(0b11100, 2)).toBe(3);
    expect(onesFrom(0b11100, 1)).toBe(0);
    expect(onesFrom(~0b100, 3)).toBe(29);
    expect(onesFrom(0, 0)).toBe(0);
  });

  it("refuses what it does not implement, naming the feature", () => {
    const bad = (edit: (b: Buffer) => void) => () => parseHeader(header(edit), "x.qcow2");
    expect(bad((b) => b.writeUInt32BE(1, 32))).toThrow(/"encryption \(AES\)" is not supported/);
    expect(bad((b) => (b[79] = 0x10) && b.writeUInt32BE(13, 20))).toThrow(/"extended L2 entries with 8192-byte clusters" is not supported; subclusters .* at least 512 bytes/);
    expect(bad((b) => (b[79] = 0x04))).toThrow(/"external data file"/);
    expect(bad((b) => (b[79] = 0x02))).toThrow(/marked corrupt.*qemu-img check -r all x\.qcow2/);
    expect(bad((b) => b.writeUInt32BE(5, 4))).toThrow(/"version 5"/);
    expect(bad((b) => b.writeUInt32BE(22, 20))).toThrow(/cluster size 2\^22/);
    expect(bad((b) => b.writeUInt32BE(1, 36))).toThrow(/L1 table of 1 entries is too small/);
    // An unknown incompatible bit, named by the image's feature name table.
    expect(
      bad((b) => {
        b[78] = 0x01; // bit 8
        b.writeUInt32BE(0x6803f857, 104);
        b.writeUInt32BE(48, 108);
        b[112] = 0;
        b[113] = 8;
        b.write("time travel", 114);
      }),
    ).toThrow(/"time travel" is not supported; this layer does not know it/);
    // The dirty bit alone opens (read-only, decided by the layer).
    expect(parseHeader(header((b) => (b[79] = 0x01)), "x.qcow2").incompatible).toEqual([0, 1]);
  });
});

describe("qcow2 entries", () => {
  it("keeps host offsets up to 2^56 in L2 entries", () => {
    for (const off of [0, 65536, 2 ** 40 + 65536, 2 ** 55]) {
      const [hi, lo] = ownedEntry(off);
      expect(entryOffset(hi, lo)).toBe(off);
      expect(hi & 0x80000000).not.toBe(0);
    }
  });

  it("decodes compressed cluster descriptors", () => {
    // 64 KiB clusters: 54 offset bits, then the number of additional sectors.
    const off = 0x123456789;
    const sectors = 3;
    const desc = (BigInt(sectors) << 54n) | BigInt(off) | (1n << 62n);
    const hi = Number(desc >> 32n);
    const lo = Number(desc & 0xffffffffn);
    expect(compressedExtent(hi, lo, 16)).toEqual({ offset: off, length: 4 * 512 - (off % 512) });
  });

  it("reads and writes refcounts of every width", () => {
    for (const bits of [1, 2, 4, 8, 16, 32, 64]) {
      const block = Buffer.alloc(512);
      const n = (512 * 8) / bits;
      const max = 2 ** Math.min(bits, 20) - 1;
      for (let i = 0; i < n; i += 3) setRefcount(block, i, bits, i % (max + 1));
      for (let i = 0; i < n; i++) expect(refcountAt(block, i, bits)).toBe(i % 3 === 0 ? i % (max + 1) : 0);
    }
    expect(() => setRefcount(Buffer.alloc(8), 0, 1, 2)).toThrow(/does not fit 1 bits/);
  });
});

describe("backing files and image kinds", () => {
  it("resolve backing names as QEMU does", () => {
    expect(backingPath("/img/vm/top.qcow2", "base.raw")).toBe("/img/vm/base.raw");
    expect(backingPath("/img/vm/top.qcow2", "../b/base.qcow2")).toBe("/img/b/base.qcow2");
    expect(backingPath("/img/vm/top.qcow2", "/abs/base.raw")).toBe("/abs/base.raw");
    expect(() => backingPath("/img/top.qcow2", "nbd://h:10809/x")).toThrow(/a QEMU protocol/);
    expect(() => backingPath("/img/top.qcow2", "json:{}")).toThrow(/a QEMU protocol/);
  });

  it("serve picks the qcow2 kind by the magic, raw otherwise", () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "qcow2-kind-"));
    try {
      fs.writeFileSync(path.join(dir, "a.qcow2"), header());
      fs.writeFileSync(path.join(dir, "b.qcow2"), Buffer.alloc(4096));
      expect(imageKind(path.join(dir, "a.qcow2")).name).toBe("qcow2");
      expect(imageKind(path.join(dir, "b.qcow2")).name).toBe("file");
      expect(imageKind(path.join(dir, "missing")).name).toBe("file");
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe("createQcow2", () => {
  it("makes an empty v3 overlay that the layer opens, with the backing name and format written", async () => {
    const { createQcow2, backingNameFor } = await import("./qcow2-create.js");
    const { createQcow2Layer } = await import("./qcow2-layer.js");
    const { plainIo } = await import("../layer.js");
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "qcow2-create-"));
    try {
      const base = path.join(dir, "base.raw");
      fs.writeFileSync(base, Buffer.alloc(3 * 65536 + 512, 0x5a));
      const ov = path.join(dir, "ov.qcow2");
      expect(backingNameFor(ov, base)).toBe("base.raw");
      expect(backingNameFor(ov, "/elsewhere/b.raw")).toBe("/elsewhere/b.raw");
      createQcow2({ path: ov, size: 3 * 65536 + 512, backing: "base.raw", backingFormat: "raw" });
      expect(() => createQcow2({ path: ov, size: 4096 })).toThrow(/EEXIST/); // never replaces an image
      expect(fs.readdirSync(dir).sort()).toEqual(["base.raw", "ov.qcow2"]);
      const l = createQcow2Layer({ path: ov });
      await l.open();
      expect(l.size()).toBe(3 * 65536 + 512);
      const b = Buffer.alloc(4096);
      await l.pread(b, 65536, plainIo);
      expect(b.every((x) => x === 0x5a)).toBe(true);
      await l.pwrite(Buffer.alloc(4096, 1), 65536, plainIo);
      await l.pread(b, 65536, plainIo);
      expect(b.every((x) => x === 1)).toBe(true);
      await l.close();
      expect(fs.statSync(ov).size).toBeGreaterThan(4 * 65536);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
