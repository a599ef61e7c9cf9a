import zlib from "node:zlib";
import { bytes, chars, cstring, struct, StructError, u16le, u32le, u64le, u8 } from "../../util/struct.js";

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
const BOOT_SIGNATURE = 0xaa55;

/** UEFI spec, Legacy MBR: the first sector of the device, and of each EBR in an extended partition's chain. */
const Mbr = struct(
  "MBR",
  {
    partitionEntries: bytes(446, 64), // PartitionRecord[4]: four MbrEntry; in an EBR: the logical one, then the link to the next EBR
    bootSignature: u16le(510), // Signature, 0xAA55
  },
  { size: SECTOR },
);

/** UEFI spec, Legacy MBR Partition Record: one of the MBR's four. */
const MbrEntry = struct(
  "MBR partition entry",
  {
    bootIndicator: u8(0),
    startingChs: bytes(1, 3),
    osType: u8(4), // 0 empty, 0x05/0x0F/0x85 extended, 0xEE protective (a GPT follows)
    endingChs: bytes(5, 3),
    startingLba: u32le(8), // in an EBR: relative to that EBR (logical) or to the extended partition (link)
    sizeInLba: u32le(12),
  },
  { size: 16 },
);

/** UEFI spec, GPT Header: at LBA 1 (primary) and the last LBA (backup). */
const GptHeader = struct(
  "GPT header",
  {
    signature: chars(0, 8), // "EFI PART"
    revision: u32le(8),
    headerSize: u32le(12),
    headerCrc32: u32le(16), // of HeaderSize bytes, this field taken as 0
    // 20 Reserved; 24 MyLBA, 32 AlternateLBA, 40 FirstUsableLBA, 48 LastUsableLBA: not read here
    diskGuid: bytes(56, 16),
    partitionEntryLba: u64le(72),
    numberOfPartitionEntries: u32le(80),
    sizeOfPartitionEntry: u32le(84), // 128 × 2^n
    partitionEntryArrayCrc32: u32le(88),
  },
  { size: 92 },
);

/** UEFI spec, GPT Partition Entry (SizeOfPartitionEntry bytes apart; 128 declared here). */
const GptEntry = struct(
  "GPT partition entry",
  {
    partitionTypeGuid: bytes(0, 16), // all zero: unused entry
    uniquePartitionGuid: bytes(16, 16),
    startingLba: u64le(32),
    endingLba: u64le(40), // inclusive
    // 48 Attributes (u64 flags): not read here
    partitionName: cstring(56, 72, "utf16le"),
  },
  { size: 128 },
);

/** A GUID as text: its first three groups are stored little-endian. */
function guid(b: Buffer): string {
  const h = (s: number, e: number, le: boolean) => {
    const part = b.subarray(s, e);
    return Buffer.from(le ? [...part].reverse() : part).toString("hex");
  };
  return `${h(0, 4, true)}-${h(4, 6, true)}-${h(6, 8, true)}-${h(8, 10, false)}-${h(10, 16, false)}`.toUpperCase();
}

const mbrType = (t: number) => `0x${t.toString(16).padStart(2, "0")}`;

/** Reads the MBR or GPT of a device of `size` bytes. Returns null when there is no table. */
export async function readPartitionTable(read: ReadAt, size: number): Promise<PartitionTable | null> {
  if (size < 2 * SECTOR) return null;
  const mbr = Mbr.read(await read(SECTOR, 0));
  if (mbr.bootSignature !== BOOT_SIGNATURE) return null;
  const entries = [0, 1, 2, 3].map((i) => {
    const e = MbrEntry.read(mbr.partitionEntries, i * MbrEntry.size);
    return { at: Mbr.fields.partitionEntries.offset + i * MbrEntry.size, type: e.osType, start: e.startingLba * SECTOR, length: e.sizeInLba * SECTOR };
  });
  if (entries.some((e) => e.type === 0xee)) return readGpt(read, size);
  const parts: Partition[] = [];
  for (const [i, e] of entries.entries()) {
    if (e.type === 0 || e.length === 0) continue;
    if (e.start + e.length > size) throw new PartitionTableError(`MBR entry ${i + 1}`, e.at, `partition ends at ${e.start + e.length}, beyond the device (${size})`);
    if (EXTENDED.has(e.type)) parts.push(...(await readLogicals(read, size, e.start, e.length)));
    else parts.push({ index: i + 1, start: e.start, length: e.length, type: mbrType(e.type) });
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
    const b = Mbr.read(await read(SECTOR, ebr));
    if (b.bootSignature !== BOOT_SIGNATURE) throw new PartitionTableError("EBR", ebr, "missing 0x55AA signature");
    const logical = MbrEntry.read(b.partitionEntries, 0);
    const link = MbrEntry.read(b.partitionEntries, MbrEntry.size);
    const start = ebr + logical.startingLba * SECTOR;
    const length = logical.sizeInLba * SECTOR;
    if (logical.osType !== 0 && length > 0) {
      if (start < extStart || start + length > extStart + extLength)
        throw new PartitionTableError(`EBR ${n} entry`, ebr + Mbr.fields.partitionEntries.offset, "logical partition outside its extended partition");
      out.push({ index: n, start, length, type: mbrType(logical.osType) });
    }
    if (link.osType === 0 || link.startingLba === 0) return out;
    ebr = extStart + link.startingLba * SECTOR;
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
  const b = await read(SECTOR, at);
  const where = lba === 1 ? "primary GPT header" : "backup GPT header";
  const field = (name: keyof typeof GptHeader.fields) => at + GptHeader.fields[name].offset;
  if (GptHeader.get(b, "signature") !== "EFI PART") throw new PartitionTableError(where, at, 'no "EFI PART" signature');
  const headerSize = GptHeader.get(b, "headerSize");
  if (headerSize < GptHeader.size || headerSize > SECTOR) throw new PartitionTableError(where, field("headerSize"), `header size ${headerSize}`);
  const copy = Buffer.from(b.subarray(0, headerSize));
  GptHeader.set(copy, "headerCrc32", 0);
  if (zlib.crc32(copy) !== GptHeader.get(b, "headerCrc32")) throw new PartitionTableError(where, field("headerCrc32"), "header CRC32 mismatch");
  const h = withLbas(() => GptHeader.read(b), () => new PartitionTableError(where, field("partitionEntryLba"), "partition entries beyond the device"));
  const count = h.numberOfPartitionEntries;
  const entrySize = h.sizeOfPartitionEntry;
  if (entrySize < GptEntry.size || entrySize % 8 !== 0 || count > 4096) throw new PartitionTableError(where, field("numberOfPartitionEntries"), `${count} entries of ${entrySize} bytes`);
  const tableAt = h.partitionEntryLba * SECTOR;
  if (tableAt + count * entrySize > size) throw new PartitionTableError(where, field("partitionEntryLba"), "partition entries beyond the device");
  const table = await read(count * entrySize, tableAt);
  if (zlib.crc32(table) !== h.partitionEntryArrayCrc32) throw new PartitionTableError("GPT partition entries", tableAt, "entries CRC32 mismatch");
  const parts: Partition[] = [];
  for (let i = 0; i < count; i++) {
    const e = i * entrySize;
    const type = guid(GptEntry.get(table, "partitionTypeGuid", e));
    if (type === "00000000-0000-0000-0000-000000000000") continue;
    const lbasAt = tableAt + e + GptEntry.fields.startingLba.offset;
    const entry = withLbas(() => GptEntry.read(table, e), (err) => new PartitionTableError(`GPT entry ${i + 1}`, lbasAt, `LBA ${err.value} is not inside the device`));
    const first = entry.startingLba;
    const last = entry.endingLba;
    if (last < first || (last + 1) * SECTOR > size) throw new PartitionTableError(`GPT entry ${i + 1}`, lbasAt, `LBAs ${first}..${last} are not inside the device`);
    parts.push({ index: i + 1, start: first * SECTOR, length: (last - first + 1) * SECTOR, type, name: entry.partitionName, uuid: guid(entry.uniquePartitionGuid) });
  }
  checkOverlaps(parts, "GPT");
  return parts;
}

/** Reads a GPT structure: an LBA of 2^53 or more is inside no device, and fails as `fail` says (so the backup is tried). */
function withLbas<T>(readIt: () => T, fail: (err: StructError) => PartitionTableError): T {
  try {
    return readIt();
  } catch (err) {
    throw err instanceof StructError ? fail(err) : err;
  }
}

function checkOverlaps(parts: Partition[], scheme: string): void {
  const s = [...parts].sort((a, b) => a.start - b.start);
  for (let i = 1; i < s.length; i++) {
    if (s[i]!.start < s[i - 1]!.start + s[i - 1]!.length) throw new PartitionTableError(`${scheme} partition ${s[i]!.index}`, s[i]!.start, `overlaps partition ${s[i - 1]!.index}`);
  }
}
