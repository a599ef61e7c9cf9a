/**
 * On-disk structures, each declared once with the byte offsets its spec gives, read and written
 * through that one declaration:
 *
 *   const GptEntry = struct("GPT partition entry", {
 *     partitionTypeGuid: bytes(0, 16),   // PartitionTypeGUID
 *     startingLba: u64le(32),            // StartingLBA
 *     partitionName: cstring(56, 72, "utf16le"),
 *   }, { size: 128 });
 *   GptEntry.read(table, i * GptEntry.size)   // { partitionTypeGuid: Buffer; startingLba: number; partitionName: string }
 *
 * Why ours and not buffer-layout (DESIGN.md's suggestion for cold structures): buffer-layout is plain
 * JavaScript whose decoded values TypeScript cannot see (its typed forks make you write the type
 * by hand), it places fields by sequence rather than at the offsets a spec lists, and its 64-bit
 * fields are Numbers silently rounded above 2^53, with no bigint. Here the type of `read` follows
 * from the declaration, every field states its offset (so a declaration can be checked line by
 * line against the spec), a u64 is a number that refuses 2^53 and above with a clear error, or a
 * bigint where asked, and every read is bounds-checked with the structure's name in the error.
 */

/** One field: where it lies in its structure, and how its bytes become a value and back. */
export interface Field<T> {
  readonly offset: number;
  readonly size: number;
  read(buf: Buffer, at: number): T;
  write(buf: Buffer, value: T, at: number): void;
}

type Fields = Record<string, Field<unknown>>;
/** The value a declaration reads: one property per field, typed by its kind. */
export type StructValue<F extends Fields> = { -readonly [K in keyof F]: F[K] extends Field<infer T> ? T : never };

/** A read or write that does not fit the buffer or the field. `offset` is the byte in the buffer. */
export class StructError extends Error {
  constructor(
    readonly structure: string,
    readonly field: string | null,
    readonly offset: number,
    readonly reason: string,
    /** The value that was out of range, for a u64 read as a number. */
    readonly value?: bigint,
  ) {
    super(`${structure}${field ? ` field ${field}` : ""} at byte ${offset}: ${reason}`);
    this.name = "StructError";
  }
}

class TooLarge extends Error {
  constructor(readonly value: bigint) {
    super(`${value} is 2^53 or more, beyond what a number holds exactly`);
  }
}

const field = <T>(offset: number, size: number, read: Field<T>["read"], write: Field<T>["write"]): Field<T> => {
  if (!Number.isSafeInteger(offset) || offset < 0) throw new Error(`field offset ${offset} is not a byte offset`);
  return { offset, size, read, write };
};

function uint(size: 1 | 2 | 4, read: (b: Buffer, at: number) => number, write: (b: Buffer, v: number, at: number) => unknown) {
  const max = 2 ** (8 * size) - 1;
  return (offset: number): Field<number> =>
    field(offset, size, read, (b, v, at) => {
      if (!Number.isInteger(v) || v < 0 || v > max) throw new Error(`${v} does not fit ${size * 8} bits`);
      write(b, v, at);
    });
}

export const u8 = uint(1, (b, at) => b.readUInt8(at), (b, v, at) => b.writeUInt8(v, at));
export const u16le = uint(2, (b, at) => b.readUInt16LE(at), (b, v, at) => b.writeUInt16LE(v, at));
export const u16be = uint(2, (b, at) => b.readUInt16BE(at), (b, v, at) => b.writeUInt16BE(v, at));
export const u32le = uint(4, (b, at) => b.readUInt32LE(at), (b, v, at) => b.writeUInt32LE(v, at));
export const u32be = uint(4, (b, at) => b.readUInt32BE(at), (b, v, at) => b.writeUInt32BE(v, at));

function u64(le: boolean) {
  return (offset: number): Field<number> =>
    field(offset, 8, (b, at) => {
      const hi = le ? b.readUInt32LE(at + 4) : b.readUInt32BE(at);
      const lo = le ? b.readUInt32LE(at) : b.readUInt32BE(at + 4);
      if (hi >= 2 ** 21) throw new TooLarge(le ? b.readBigUInt64LE(at) : b.readBigUInt64BE(at));
      return hi * 2 ** 32 + lo;
    }, (b, v, at) => {
      if (!Number.isSafeInteger(v) || v < 0) throw new Error(`${v} is not an integer from 0 to 2^53 - 1`);
      if (le) b.writeBigUInt64LE(BigInt(v), at);
      else b.writeBigUInt64BE(BigInt(v), at);
    });
}

/** A u64 as a number; reading 2^53 or more throws a StructError carrying the value. */
export const u64le = u64(true);
export const u64be = u64(false);

function u64Big(le: boolean) {
  return (offset: number): Field<bigint> =>
    field(offset, 8, (b, at) => (le ? b.readBigUInt64LE(at) : b.readBigUInt64BE(at)), (b, v, at) => {
      if (v < 0n || v >= 2n ** 64n) throw new Error(`${v} does not fit 64 bits`);
      if (le) b.writeBigUInt64LE(v, at);
      else b.writeBigUInt64BE(v, at);
    });
}

/** A u64 as a bigint, for flags and values that may use all 64 bits. */
export const u64leBig = u64Big(true);
export const u64beBig = u64Big(false);

function fill(b: Buffer, src: Buffer, at: number, length: number): void {
  if (src.length > length) throw new Error(`${src.length} bytes do not fit ${length}`);
  src.copy(b, at);
  b.fill(0, at + src.length, at + length);
}

/** Raw bytes: a view into the buffer (not a copy). A shorter value is written zero-padded. */
export const bytes = (offset: number, length: number): Field<Buffer> =>
  field(offset, length, (b, at) => b.subarray(at, at + length), (b, v, at) => fill(b, v, at, length));

type Encoding = "latin1" | "utf8" | "utf16le";

/** Text filling the whole field, as decoded (padding included). */
export const chars = (offset: number, length: number, encoding: Encoding = "latin1"): Field<string> =>
  field(offset, length, (b, at) => b.toString(encoding, at, at + length), (b, v, at) => fill(b, Buffer.from(v, encoding), at, length));

/** Text ending at its first NUL character, or at the end of the field. */
export const cstring = (offset: number, length: number, encoding: Encoding = "utf8"): Field<string> =>
  field(offset, length, (b, at) => b.toString(encoding, at, at + length).replace(/\0.*$/s, ""), (b, v, at) => fill(b, Buffer.from(v, encoding), at, length));

/** `count` fields of one kind, one after the other from `offset`. */
export function array<T>(offset: number, count: number, kind: (offset: number) => Field<T>): Field<T[]> {
  const one = kind(0);
  return field(offset, one.size * count, (b, at) => Array.from({ length: count }, (_, i) => one.read(b, at + i * one.size)), (b, v, at) => {
    if (v.length !== count) throw new Error(`${v.length} values for ${count} places`);
    v.forEach((x, i) => one.write(b, x, at + i * one.size));
  });
}

export interface Struct<F extends Fields> {
  readonly name: string;
  /** Bytes the structure spans: the declared size, or the end of its last field. */
  readonly size: number;
  readonly fields: F;
  /** Every field, decoded now, of the structure starting at `offset`. */
  read(buf: Buffer, offset?: number): StructValue<F>;
  write(buf: Buffer, value: StructValue<F>, offset?: number): void;
  /** One field only: the others are neither checked nor read. */
  get<K extends keyof F & string>(buf: Buffer, key: K, offset?: number): StructValue<F>[K];
  set<K extends keyof F & string>(buf: Buffer, key: K, value: StructValue<F>[K], offset?: number): void;
}

export function struct<F extends Fields>(name: string, fields: F, opts: { size?: number } = {}): Struct<F> {
  const list = Object.entries(fields);
  const end = Math.max(0, ...list.map(([, f]) => f.offset + f.size));
  if (opts.size !== undefined && opts.size < end) throw new Error(`${name}: fields end at byte ${end}, beyond its size ${opts.size}`);
  const size = opts.size ?? end;
  const fits = (buf: Buffer, offset: number, length: number, key: string | null) => {
    if (!Number.isSafeInteger(offset) || offset < 0 || offset + length > buf.length)
      throw new StructError(name, key, offset, `${length} bytes there do not fit the ${buf.length}-byte buffer`);
  };
  const readField = (buf: Buffer, key: string, f: Field<unknown>, at: number) => {
    try {
      return f.read(buf, at);
    } catch (err) {
      throw err instanceof TooLarge ? new StructError(name, key, at, err.message, err.value) : err;
    }
  };
  const writeField = (buf: Buffer, key: string, f: Field<unknown>, value: unknown, at: number) => {
    try {
      f.write(buf, value, at);
    } catch (err) {
      throw new StructError(name, key, at, (err as Error).message);
    }
  };
  return {
    name,
    size,
    fields,
    read(buf, offset = 0) {
      fits(buf, offset, size, null);
      const out: Record<string, unknown> = {};
      for (const [k, f] of list) out[k] = readField(buf, k, f, offset + f.offset);
      return out as StructValue<F>;
    },
    write(buf, value, offset = 0) {
      fits(buf, offset, size, null);
      for (const [k, f] of list) writeField(buf, k, f, (value as Record<string, unknown>)[k], offset + f.offset);
    },
    get(buf, key, offset = 0) {
      const f = fields[key]!;
      fits(buf, offset + f.offset, f.size, key);
      return readField(buf, key, f, offset + f.offset) as StructValue<F>[typeof key];
    },
    set(buf, key, value, offset = 0) {
      const f = fields[key]!;
      fits(buf, offset + f.offset, f.size, key);
      writeField(buf, key, f, value, offset + f.offset);
    },
  };
}
