import zlib from "node:zlib";

/** One partition of a device, in bytes. `index` is the conventional number (MBR logicals start at 5). */
export interface Partition {
  index: number;
  start: number;
  length: number;
  /** MBR type byte as 0xNN, or the GPT type GUID. */
  type: string;
  name?: string;
  uuid?: string;
}

export interface PartitionTable {
  scheme: "gpt" | "mbr";
  partitions: Partition[];
  /** Set when the primary GPT header or entries were damaged and the backup was used. */
  note?: string;
}

/** A partition table that cannot be used, with the structure and byte offset at fault. */
export class PartitionTableError extends Error {
  constructor(
    readonly structure: string,
    readonly offset: number,
    reason: string,
  ) {
    super(`${structure} at byte ${offset}: ${reason}`);
    this.name = "PartitionTableError";
  }
}

export type ReadAt = (length: number, offset: number) => Promise<Buffer>;

const SECTOR = 512;
const EXTENDED = new Set([0x05, 0x0f, 0x85]);

function guid(b: Buffer, at: number): string {
  const h = (s: number, e: number, le: boolean) => {
    const part = b.subarray(at + s, at + e);
    return Buffer.from(le ? [...part].reverse() : part).toString("hex");
  };
  return `${h(0, 4, true)}-${h(4, 6, true)}-${h(6, 8, true)}-${h(8, 10, false)}-${h(10, 16, false)}`.toUpperCase();
}

/** Reads the MBR or GPT of a device of `size` bytes. Returns null when there is no table. */
export async function readPartitionTable(read: ReadAt, size: number): Promise<PartitionTable | null> {
  if (size < 2 * SECTOR) return null;
  const mbr = await read(SECTOR, 0);
  if (mbr.readUInt16LE(510) !== 0xaa55) return null;
  const entries = [0, 1, 2, 3].map((i) => {
    const at = 446 + i * 16;
    return { at, type: mbr[at + 4]!, start: mbr.readUInt32LE(at + 8) * SECTOR, length: mbr.readUInt32LE(at + 12) * SECTOR };
  });
  if (entries.some((e) => e.type === 0xee)) return readGpt(read, size);
  const parts: Partition[] = [];
  for (const [i, e] of entries.entries()) {
    if (e.type === 0 || e.length === 0) continue;
    if (e.start + e.length > size) throw new PartitionTableError(`MBR entry ${i + 1}`, e.at, `partition ends at ${e.start + e.length}, beyond the device (${size})`);
    if (EXTENDED.has(e.type)) parts.push(...(await readLogicals(read, size, e.start, e.length)));
    else parts.push({ index: i + 1, start: e.start, length: e.length, type: `0x${e.type.toString(16).padStart(2, "0")}` });
  }
  checkOverlaps(parts, "MBR");
  return { scheme: "mbr", partitions: parts.sort((a, b) => a.index - b.index) };
}

async function readLogicals(read: ReadAt, size: number, extStart: number, extLength: number): Promise<Partition[]> {
  const out: Partition[] = [];
  let ebr = extStart;
  const seen = new Set<number>();
  for (let n = 5; ; n++) {
    if (seen.has(ebr) || out.length > 128) throw new PartitionTableError("EBR chain", ebr, "loops or is too long");
    seen.add(ebr);
    if (ebr + SECTOR > size) throw new PartitionTableError("EBR", ebr, "beyond the device");
    const b = await read(SECTOR, ebr);
    if (b.readUInt16LE(510) !== 0xaa55) throw new PartitionTableError("EBR", ebr, "missing 0x55AA signature");
    const type = b[446 + 4]!;
    const start = ebr + b.readUInt32LE(446 + 8) * SECTOR;
    const length = b.readUInt32LE(446 + 12) * SECTOR;
    if (type !== 0 && length > 0) {
      if (start < extStart || start + length > extStart + extLength) throw new PartitionTableError(`EBR ${n} entry`, ebr + 446, "logical partition outside its extended partition");
      out.push({ index: n, start, length, type: `0x${type.toString(16).padStart(2, "0")}` });
    }
    const nextRel = b.readUInt32LE(462 + 8);
    if (b[462 + 4] === 0 || nextRel === 0) return out;
    ebr = extStart + nextRel * SECTOR;
  }
}

async function readGpt(read: ReadAt, size: number): Promise<PartitionTable> {
  const lastLba = Math.floor(size / SECTOR) - 1;
  let primaryError: PartitionTableError | null = null;
  try {
    return { scheme: "gpt", partitions: await readGptAt(read, size, 1) };
  } catch (err) {
    if (!(err instanceof PartitionTableError)) throw err;
    primaryError = err;
  }
  try {
    const partitions = await readGptAt(read, size, lastLba);
    return { scheme: "gpt", partitions, note: `primary GPT unusable (${primaryError.message}); using the backup` };
  } catch (err) {
    if (!(err instanceof PartitionTableError)) throw err;
    throw new PartitionTableError("GPT", SECTOR, `primary: ${primaryError.message}; backup: ${err.message}`);
  }
}

async function readGptAt(read: ReadAt, size: number, lba: number): Promise<Partition[]> {
  const at = lba * SECTOR;
  const h = await read(SECTOR, at);
  const where = lba === 1 ? "primary GPT header" : "backup GPT header";
  if (h.toString("latin1", 0, 8) !== "EFI PART") throw new PartitionTableError(where, at, 'no "EFI PART" signature');
  const headerSize = h.readUInt32LE(12);
  if (headerSize < 92 || headerSize > SECTOR) throw new PartitionTableError(where, at + 12, `header size ${headerSize}`);
  const copy = Buffer.from(h.subarray(0, headerSize));
  const crc = copy.readUInt32LE(16);
  copy.writeUInt32LE(0, 16);
  if (zlib.crc32(copy) !== crc) throw new PartitionTableError(where, at + 16, "header CRC32 mismatch");
  const entriesLba = Number(h.readBigUInt64LE(72));
  const count = h.readUInt32LE(80);
  const entrySize = h.readUInt32LE(84);
  const entriesCrc = h.readUInt32LE(88);
  if (entrySize < 128 || entrySize % 8 !== 0 || count > 4096) throw new PartitionTableError(where, at + 80, `${count} entries of ${entrySize} bytes`);
  const tableAt = entriesLba * SECTOR;
  if (tableAt + count * entrySize > size) throw new PartitionTableError(where, at + 72, "partition entries beyond the device");
  const table = await read(count * entrySize, tableAt);
  if (zlib.crc32(table) !== entriesCrc) throw new PartitionTableError("GPT partition entries", tableAt, "entries CRC32 mismatch");
  const parts: Partition[] = [];
  for (let i = 0; i < count; i++) {
    const e = i * entrySize;
    const type = guid(table, e);
    if (type === "00000000-0000-0000-0000-000000000000") continue;
    const first = Number(table.readBigUInt64LE(e + 32));
    const last = Number(table.readBigUInt64LE(e + 40));
    if (last < first || (last + 1) * SECTOR > size) throw new PartitionTableError(`GPT entry ${i + 1}`, tableAt + e + 32, `LBAs ${first}..${last} are not inside the device`);
    const name = table.toString("utf16le", e + 56, e + 128).replace(/\0.*$/s, "");
    parts.push({ index: i + 1, start: first * SECTOR, length: (last - first + 1) * SECTOR, type, name, uuid: guid(table, e + 16) });
  }
  checkOverlaps(parts, "GPT");
  return parts;
}

function checkOverlaps(parts: Partition[], scheme: string): void {
  const s = [...parts].sort((a, b) => a.start - b.start);
  for (let i = 1; i < s.length; i++) {
    if (s[i]!.start < s[i - 1]!.start + s[i - 1]!.length) throw new PartitionTableError(`${scheme} partition ${s[i]!.index}`, s[i]!.start, `overlaps partition ${s[i - 1]!.index}`);
  }
}
