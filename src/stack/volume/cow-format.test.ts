import { describe, expect, it } from "vitest";
import { crc32, decodeHeader, decodeMap, encodeHeader, encodeMap, HEADER_SIZE, newHeader } from "./cow-format.js";

// The offsets here are read by hand, apart from the declaration in cow-format.ts, so that a
// change to the declaration that would make existing overlay files unreadable fails here.
describe("overlay file bytes", () => {
  const h = newHeader(10 * 65536 + 100, 65536, "../base.cow", "file:/images/base.img");

  it("puts each header field at the offset cow-format.ts documents", () => {
    const b = encodeHeader(h);
    expect(b.length).toBe(HEADER_SIZE);
    expect(b.toString("latin1", 0, 8)).toBe("NBDSCOW1");
    expect([b.readUInt32LE(8), b.readUInt32LE(12), b.readUInt32LE(16), b.readUInt32LE(20)]).toEqual([1, 4096, 65536, 0]);
    expect([24, 32, 40, 48, 56].map((at) => Number(b.readBigUInt64LE(at)))).toEqual([h.virtualSize, h.baseSize, 4096, 11, h.dataOffset]);
    expect(b.readUInt16LE(64)).toBe(11);
    expect(b.toString("utf8", 66, 66 + 11)).toBe("../base.cow");
    expect(b.readUInt16LE(1090)).toBe(21);
    expect(b.toString("utf8", 1092, 1092 + 21)).toBe("file:/images/base.img");
    expect(b.readUInt32LE(4092)).toBe(crc32(b.subarray(0, 4092)));
    expect(decodeHeader(b, "x.cow")).toEqual(h);
  });

  it("refuses a u64 field of 2^53 or more by its name, once magic, checksum and version are good", () => {
    const b = encodeHeader(h);
    b.writeBigUInt64LE(2n ** 60n, 40);
    b.writeUInt32LE(crc32(b.subarray(0, 4092)), 4092);
    expect(() => decodeHeader(b, "x.cow")).toThrow(`x.cow: overlay header field map offset is out of range (${2n ** 60n})`);
    b.write("NOTACOW!", 0, "latin1");
    expect(() => decodeHeader(b, "x.cow")).toThrow(/not an nbdstack copy-on-write overlay/);
  });

  it("stores the map as one little-endian u32 per block", () => {
    const map = Uint32Array.from([0, 1, 2, 0xfffffffe]);
    const raw = encodeMap(map, 1, 4);
    expect(raw.toString("hex")).toBe("01000000" + "02000000" + "feffffff");
    expect(decodeMap(raw)).toEqual(Uint32Array.from([1, 2, 0xfffffffe]));
  });
});
