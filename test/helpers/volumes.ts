import type { ReadAt } from "../../src/fs/probe.js";

/** Work done through a reader: calls made and bytes returned. */
export interface ReadCount {
  calls: number;
  bytes: number;
}

/**
 * Wraps a file-system reader so that it counts its calls and bytes. With a `limit`, a read that
 * would go past it throws a plain Error (never an FsError), so runaway work on a damaged image fails
 * a test at once, with the numbers, instead of running into its timeout. Counting work instead of
 * timing it keeps such tests stable on a loaded machine.
 */
export function countingReader(read: ReadAt, limit?: ReadCount): ReadAt & { count: ReadCount } {
  const count: ReadCount = { calls: 0, bytes: 0 };
  const wrapped = async (length: number, offset: number): Promise<Buffer> => {
    count.calls++;
    count.bytes += length;
    if (limit && (count.calls > limit.calls || count.bytes > limit.bytes))
      throw new Error(`read budget exceeded: ${count.calls} reads of ${count.bytes} bytes, allowed ${limit.calls} reads of ${limit.bytes} bytes`);
    return read(length, offset);
  };
  return Object.assign(wrapped, { count });
}
