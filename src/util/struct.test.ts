import { describe, expect, expectTypeOf, it } from "vitest";
import { array, bytes, chars, cstring, struct, StructError, u16be, u16le, u32be, u32le, u64be, u64beBig, u64le, u64leBig, u8 } from "./struct.js";

const Sample = struct(
  "sample",
  {
    magic: chars(0, 4),
    flags: u8(4),
    count: u16le(6),
    total: u32le(8),
    lba: u64le(16),
    attributes: u64leBig(24),
    guid: bytes(32, 4),
    name: cstring(36, 8, "utf16le"),
    pointers: array(44, 3, u32le),
  },
  { size: 64 },
);

const value = {
  magic: "SAMP",
  flags: 0x81,
  count: 0xbeef,
  total: 0xdeadbeef,
  lba: 2 ** 53 - 1,
  attributes: 0x8000_0000_0000_0001n,
  guid: Buffer.from([1, 2, 3, 4]),
  name: "abc",
  pointers: [1, 0xffffffff, 3],
};

describe("struct", () => {
  it("reads what it writes, at the declared offsets, with types that follow the declaration", () => {
    const buf = Buffer.alloc(80, 0xaa);
    Sample.write(buf, value, 8);
    expect(Sample.read(buf, 8)).toEqual(value);
    expect(buf.readUInt16LE(8 + 6)).toBe(0xbeef);
    expect(buf.readBigUInt64LE(8 + 16)).toBe(BigInt(2 ** 53 - 1));
    expect(buf.toString("utf16le", 8 + 36, 8 + 44)).toBe("abc\0");
    expect(buf.readUInt32LE(8 + 48)).toBe(0xffffffff);
    expect(buf[8 + 5]).toBe(0xaa); // a gap between fields is left alone
    expect(Sample.size).toBe(64);
    expect(Sample.get(buf, "total", 8)).toBe(0xdeadbeef);
    Sample.set(buf, "count", 7, 8);
    expect(Sample.read(buf, 8).count).toBe(7);
    expectTypeOf(Sample.read(buf, 8)).toEqualTypeOf<{
      magic: string;
      flags: number;
      count: number;
      total: number;
      lba: number;
      attributes: bigint;
      guid: Buffer;
      name: string;
      pointers: number[];
    }>();
  });

  it("reads big-endian fields most significant byte first", () => {
    const Be = struct("be", { a: u16be(0), b: u32be(2), c: u64be(6), d: u64beBig(14) });
    const buf = Buffer.from("0102" + "03040506" + "000000000000070a" + "ff00000000000001", "hex");
    expect(Be.size).toBe(22);
    expect(Be.read(buf)).toEqual({ a: 0x0102, b: 0x03040506, c: 0x070a, d: 0xff00000000000001n });
    const out = Buffer.alloc(22);
    Be.write(out, Be.read(buf));
    expect(out).toEqual(buf);
  });

  it("refuses a u64 of 2^53 or more as a number, naming the field, and keeps the value", () => {
    const U = struct("GPT header", { entries: u64le(72) });
    const buf = Buffer.alloc(80);
    buf.writeBigUInt64LE(2n ** 53n, 72);
    const err = (() => {
      try {
        U.read(buf);
      } catch (e) {
        return e;
      }
    })() as StructError;
    expect(err).toBeInstanceOf(StructError);
    expect(err.message).toBe("GPT header field entries at byte 72: 9007199254740992 is 2^53 or more, beyond what a number holds exactly");
    expect([err.field, err.offset, err.value]).toEqual(["entries", 72, 2n ** 53n]);
    buf.writeBigUInt64LE(2n ** 53n - 1n, 72);
    expect(U.get(buf, "entries")).toBe(Number.MAX_SAFE_INTEGER);
    expect(() => U.write(buf, { entries: 2 ** 53 })).toThrow(/field entries at byte 72: 9007199254740992 is not an integer from 0 to 2\^53 - 1/);
  });

  it("says which structure and where when the buffer is too short, for the whole or one field", () => {
    expect(() => Sample.read(Buffer.alloc(100), 40)).toThrow(new StructError("sample", null, 40, "64 bytes there do not fit the 100-byte buffer"));
    expect(() => Sample.get(Buffer.alloc(20), "lba")).toThrow("sample field lba at byte 16: 8 bytes there do not fit the 20-byte buffer");
    expect(Sample.get(Buffer.alloc(20), "total")).toBe(0); // one field needs only its own bytes
    expect(() => Sample.read(Buffer.alloc(64), -1)).toThrow(StructError);
  });

  it("refuses values that do not fit their field, and fields beyond the declared size", () => {
    const buf = Buffer.alloc(64);
    expect(() => Sample.set(buf, "flags", 256)).toThrow("sample field flags at byte 4: 256 does not fit 8 bits");
    expect(() => Sample.set(buf, "guid", Buffer.alloc(5))).toThrow("5 bytes do not fit 4");
    expect(() => Sample.set(buf, "name", "toolong")).toThrow("14 bytes do not fit 8");
    expect(() => Sample.set(buf, "pointers", [1, 2])).toThrow("2 values for 3 places");
    expect(() => struct("small", { a: u32le(2) }, { size: 4 })).toThrow("small: fields end at byte 6, beyond its size 4");
  });

  it("pads short text and bytes with zeros, and cuts a C string at its first NUL", () => {
    const T = struct("t", { label: chars(0, 6), c: cstring(6, 6), raw: bytes(12, 4) });
    const buf = Buffer.alloc(16, 0xff);
    T.write(buf, { label: "ab", c: "x", raw: Buffer.from([9]) });
    expect(buf.toString("hex")).toBe("616200000000" + "780000000000" + "09000000");
    expect(T.read(buf)).toEqual({ label: "ab\0\0\0\0", c: "x", raw: Buffer.from([9, 0, 0, 0]) });
    buf.write("y\0z", 6, "latin1");
    expect(T.get(buf, "c")).toBe("y");
  });
});
