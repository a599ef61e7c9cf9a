import { NBD_REPLY_FLAG_DONE, NBD_SIMPLE_REPLY_MAGIC, NBD_STRUCTURED_REPLY_MAGIC, ReplyType } from "./constants.js";

/** Serialisers of transmission-phase replies. Reads reserve room for the header in front of their data. */

export const SIMPLE_HEADER = 16;
export const CHUNK_HEADER = 20;
/** Structured OFFSET_DATA: chunk header + 64-bit offset. */
export const DATA_CHUNK_PREFIX = CHUNK_HEADER + 8;

export function writeSimpleHeader(b: Buffer, at: number, error: number, cookieHi: number, cookieLo: number): void {
  b.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, at);
  b.writeUInt32BE(error, at + 4);
  b.writeUInt32BE(cookieHi, at + 8);
  b.writeUInt32BE(cookieLo, at + 12);
}

export function writeChunkHeader(b: Buffer, at: number, flags: number, type: number, cookieHi: number, cookieLo: number, length: number): void {
  b.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, at);
  b.writeUInt16BE(flags, at + 4);
  b.writeUInt16BE(type, at + 6);
  b.writeUInt32BE(cookieHi, at + 8);
  b.writeUInt32BE(cookieLo, at + 12);
  b.writeUInt32BE(length, at + 16);
}

function writeU64(b: Buffer, at: number, v: number): void {
  b.writeUInt32BE(Math.floor(v / 0x100000000), at);
  b.writeUInt32BE(v >>> 0, at + 4);
}

export function simpleReply(error: number, cookieHi: number, cookieLo: number): Buffer {
  const b = Buffer.allocUnsafe(SIMPLE_HEADER);
  writeSimpleHeader(b, 0, error, cookieHi, cookieLo);
  return b;
}

/** The OFFSET_DATA header in front of `length` bytes of data at `offset` (written in place). */
export function writeDataChunkHeader(b: Buffer, at: number, done: boolean, cookieHi: number, cookieLo: number, offset: number, length: number): void {
  writeChunkHeader(b, at, done ? NBD_REPLY_FLAG_DONE : 0, ReplyType.NBD_REPLY_TYPE_OFFSET_DATA, cookieHi, cookieLo, 8 + length);
  writeU64(b, at + CHUNK_HEADER, offset);
}

export function holeChunk(cookieHi: number, cookieLo: number, offset: number, length: number, done: boolean): Buffer {
  const b = Buffer.allocUnsafe(CHUNK_HEADER + 12);
  writeChunkHeader(b, 0, done ? NBD_REPLY_FLAG_DONE : 0, ReplyType.NBD_REPLY_TYPE_OFFSET_HOLE, cookieHi, cookieLo, 12);
  writeU64(b, CHUNK_HEADER, offset);
  b.writeUInt32BE(length, CHUNK_HEADER + 8);
  return b;
}

export function noneChunk(cookieHi: number, cookieLo: number): Buffer {
  const b = Buffer.allocUnsafe(CHUNK_HEADER);
  writeChunkHeader(b, 0, NBD_REPLY_FLAG_DONE, ReplyType.NBD_REPLY_TYPE_NONE, cookieHi, cookieLo, 0);
  return b;
}

/** ERROR (or ERROR_OFFSET when `offset` is given) chunk with DONE set. */
export function errorChunk(cookieHi: number, cookieLo: number, error: number, message: string, offset?: number): Buffer {
  const msg = Buffer.from(message.length > 1000 ? message.slice(0, 1000) : message, "utf8");
  const extra = offset === undefined ? 0 : 8;
  const b = Buffer.allocUnsafe(CHUNK_HEADER + 6 + msg.length + extra);
  const type = offset === undefined ? ReplyType.NBD_REPLY_TYPE_ERROR : ReplyType.NBD_REPLY_TYPE_ERROR_OFFSET;
  writeChunkHeader(b, 0, NBD_REPLY_FLAG_DONE, type, cookieHi, cookieLo, 6 + msg.length + extra);
  b.writeUInt32BE(error, CHUNK_HEADER);
  b.writeUInt16BE(msg.length, CHUNK_HEADER + 4);
  msg.copy(b, CHUNK_HEADER + 6);
  if (offset !== undefined) writeU64(b, CHUNK_HEADER + 6 + msg.length, offset);
  return b;
}

/** BLOCK_STATUS chunk for one meta context: (length, flags) descriptors. */
export function blockStatusChunk(cookieHi: number, cookieLo: number, contextId: number, extents: ReadonlyArray<{ length: number; flags: number }>, done: boolean): Buffer {
  const b = Buffer.allocUnsafe(CHUNK_HEADER + 4 + 8 * extents.length);
  writeChunkHeader(b, 0, done ? NBD_REPLY_FLAG_DONE : 0, ReplyType.NBD_REPLY_TYPE_BLOCK_STATUS, cookieHi, cookieLo, 4 + 8 * extents.length);
  b.writeUInt32BE(contextId, CHUNK_HEADER);
  let at = CHUNK_HEADER + 4;
  for (const e of extents) {
    b.writeUInt32BE(e.length, at);
    b.writeUInt32BE(e.flags, at + 4);
    at += 8;
  }
  return b;
}

/** Zero runs shorter than this stay in a read's data chunks. */
const HOLE_MIN = 16 * 1024;
const ZERO_BLOCK = Buffer.alloc(4096);
const NO_RUNS: readonly number[] = Object.freeze([]);

/**
 * The runs of `data` that are all zeros, at 4 KiB granularity and at least 16 KiB long, as
 * alternating [start, end) offsets: what a structured read reply may send as OFFSET_HOLE chunks.
 */
export function zeroRuns(data: Buffer): readonly number[] {
  // A run of HOLE_MIN (four blocks) or more covers a whole block whose index is a multiple of four,
  // so that block starts with a zero byte: when none does, there is no run. One probe per 16 KiB
  // is what most reads (data, not zeros) cost.
  let probe = 0;
  while (probe < data.length && data[probe] !== 0) probe += HOLE_MIN;
  if (probe >= data.length) return NO_RUNS;
  const runs: number[] = [];
  let runStart = -1;
  for (let at = 0; at < data.length; at += 4096) {
    const end = Math.min(at + 4096, data.length);
    const zero = data[at] === 0 && data[end - 1] === 0 && data.subarray(at, end).equals(end - at === 4096 ? ZERO_BLOCK : ZERO_BLOCK.subarray(0, end - at));
    if (zero && runStart < 0) runStart = at;
    if (!zero && runStart >= 0) {
      if (at - runStart >= HOLE_MIN) runs.push(runStart, at);
      runStart = -1;
    }
  }
  if (runStart >= 0 && data.length - runStart >= HOLE_MIN) runs.push(runStart, data.length);
  return runs;
}
