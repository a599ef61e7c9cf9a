import { describe, expect, it } from "vitest";
import { inflateZstd, zstdFrameLength } from "./qcow2-zstd.js";

/** A zstd frame of raw blocks (RFC 8878): single segment, 2-byte content size, optional checksum. */
function rawFrame(data: Buffer, blocks: number, checksum = false): Buffer {
  const head = Buffer.from([0x28, 0xb5, 0x2f, 0xfd, (1 << 6) | (1 << 5) | (checksum ? 4 : 0), 0, 0]);
  head.writeUInt16LE(data.length - 256, 5); // FCS_Field_Size 2 stores size - 256
  const parts: Buffer[] = [head];
  const per = Math.ceil(data.length / blocks);
  for (let i = 0; i < blocks; i++) {
    const piece = data.subarray(i * per, Math.min(data.length, (i + 1) * per));
    const h = ((piece.length << 3) | (0 << 1) | (i === blocks - 1 ? 1 : 0)) >>> 0;
    parts.push(Buffer.from([h & 0xff, (h >> 8) & 0xff, (h >> 16) & 0xff]), piece);
  }
  if (checksum) parts.push(Buffer.alloc(4)); // not checked by the decoder unless asked
  return Buffer.concat(parts);
}

describe("qcow2 zstd clusters", () => {
  const data = Buffer.from(Array.from({ length: 4096 }, (_, i) => (i * 7) & 0xff));

  it("finds where a frame ends, so the sector padding after it is not decoded", () => {
    const frame = rawFrame(data, 3, true);
    expect(zstdFrameLength(Buffer.concat([frame, Buffer.alloc(300, 0xee)]))).toBe(frame.length);
    expect(inflateZstd(Buffer.concat([frame, Buffer.alloc(300, 0xee)]), 4096).equals(data)).toBe(true);
  });

  it("refuses what is not a whole frame of the cluster's size", () => {
    const frame = rawFrame(data, 2);
    expect(() => inflateZstd(frame.subarray(0, frame.length - 10), 4096)).toThrow(/cut short/);
    expect(() => inflateZstd(Buffer.alloc(64), 4096)).toThrow(/no zstd frame/);
    expect(() => inflateZstd(frame, 8192)).toThrow(/4096 bytes, not 8192/);
  });
});
