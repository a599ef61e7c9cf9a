/**
 * Self-describing write patterns: every 512-byte sector of a written block starts with a header
 * (magic, the sector's own byte offset, the write's generation and the run's seed) followed by
 * bytes derived from those, so a read can tell whether it got the right data, stale data, or
 * data from elsewhere — and say at which offset it went wrong.
 */
export const SECTOR = 512;
const MAGIC = 0x4e425356; // "NBSV"
const HEADER = 20;

function fillSector(buf: Buffer, at: number, offset: number, gen: number, seed: number): void {
  buf.writeUInt32LE(MAGIC, at);
  buf.writeUInt32LE(offset % 0x100000000, at + 4);
  buf.writeUInt32LE(Math.floor(offset / 0x100000000), at + 8);
  buf.writeUInt32LE(gen, at + 12);
  buf.writeUInt32LE(seed, at + 16);
  let x = (offset / SECTOR) ^ Math.imul(gen, 0x9e3779b1) ^ seed ^ 0x5bd1e995 || 1;
  for (let i = HEADER; i < SECTOR; i += 4) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    buf.writeInt32LE(x | 0, at + i);
  }
}

/** The data of write generation `gen` to the block at `offset` (length a multiple of 512). */
export function makeBlock(length: number, offset: number, gen: number, seed: number): Buffer {
  const buf = Buffer.allocUnsafe(length);
  for (let s = 0; s < length; s += SECTOR) fillSector(buf, s, offset + s, gen, seed);
  return buf;
}

export interface VerifyError {
  /** Device offset of the first byte that is not what it should be. */
  offset: number;
  reason: string;
}

const scratch = Buffer.alloc(SECTOR);

/**
 * Checks a block read at `offset`: it must hold generation `gen` of this run (or zeroes when
 * `gen` is 0, a block never written). Returns the first mismatch, or null.
 */
export function verifyBlock(buf: Buffer, offset: number, gen: number, seed: number): VerifyError | null {
  for (let s = 0; s < buf.length; s += SECTOR) {
    const sector = buf.subarray(s, s + SECTOR);
    if (gen === 0) {
      const nz = sector.findIndex((b) => b !== 0);
      if (nz >= 0) return { offset: offset + s + nz, reason: "never written, but not zero" };
      continue;
    }
    fillSector(scratch, 0, offset + s, gen, seed);
    if (sector.equals(scratch)) continue;
    let i = 0;
    while (i < SECTOR && sector[i] === scratch[i]) i++;
    let reason: string;
    if (sector.readUInt32LE(0) !== MAGIC) reason = sector.every((b) => b === 0) ? "zeroes where data was written" : "not written by this benchmark";
    else {
      const at = sector.readUInt32LE(4) + sector.readUInt32LE(8) * 0x100000000;
      const g = sector.readUInt32LE(12);
      if (at !== offset + s) reason = `data of offset ${at} (misplaced)`;
      else if (sector.readUInt32LE(16) !== seed) reason = "data of another run (seed)";
      else if (g !== gen) reason = `generation ${g} instead of ${gen} (${g < gen ? "stale: an acknowledged write is lost" : "newer than expected"})`;
      else reason = "corrupted bytes";
    }
    return { offset: offset + s + i, reason };
  }
  return null;
}
