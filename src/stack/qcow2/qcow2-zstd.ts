import { decompress } from "fzstd";

/**
 * zstd-compressed clusters (qcow2 compression type 1), decoded by fzstd (pure JavaScript; Node.js 20's
 * zlib has no zstd). QEMU writes each compressed cluster as one zstd frame; the bytes its L2 entry
 * spans run to the end of a 512-byte sector, so whatever follows the frame (padding, the next
 * cluster's bytes) is not part of it. The frame's length is therefore found first, from its header
 * and block headers (RFC 8878, section 3.1.1), and only the frame is decoded.
 */

const MAGIC = 0xfd2fb528;

/** The length of the zstd frame at the start of `buf`; throws if it is not one or is cut short. */
export function zstdFrameLength(buf: Uint8Array): number {
  if (buf.length < 6) throw new Error("too short for a zstd frame");
  const magic = (buf[0]! | (buf[1]! << 8) | (buf[2]! << 16) | (buf[3]! << 24)) >>> 0;
  if (magic !== MAGIC) throw new Error(`no zstd frame (magic ${magic.toString(16)})`);
  const fhd = buf[4]!;
  const fcsFlag = fhd >> 6;
  const singleSegment = (fhd >> 5) & 1;
  const checksum = (fhd >> 2) & 1;
  const dictIdSize = [0, 1, 2, 4][fhd & 3]!;
  const fcsSize = [singleSegment ? 1 : 0, 2, 4, 8][fcsFlag]!;
  let at = 5 + (singleSegment ? 0 : 1) + dictIdSize + fcsSize;
  for (;;) {
    if (at + 3 > buf.length) throw new Error("zstd frame cut short");
    const h = buf[at]! | (buf[at + 1]! << 8) | (buf[at + 2]! << 16);
    const last = h & 1;
    const type = (h >> 1) & 3;
    const size = h >>> 3;
    if (type === 3) throw new Error("reserved zstd block type");
    at += 3 + (type === 1 ? 1 : size);
    if (last) break;
  }
  at += checksum ? 4 : 0;
  if (at > buf.length) throw new Error("zstd frame cut short");
  return at;
}

/** Decodes the zstd frame at the start of `input` into `clusterSize` bytes; throws on bad data or another size. */
export function inflateZstd(input: Uint8Array, clusterSize: number): Buffer {
  // Decoded into a buffer of its own: given one, fzstd does not tell how much of it the frame filled.
  const got = decompress(input.subarray(0, zstdFrameLength(input)));
  if (got.length !== clusterSize) throw new Error(`decodes to ${got.length} bytes, not ${clusterSize}`);
  return Buffer.from(got.buffer, got.byteOffset, got.length);
}
