import type { Logger } from "pino";
import { plainIo, type Layer } from "../stack/layer.js";
import { PartitionTableError, readPartitionTable } from "../stack/partition/partition-table.js";

/**
 * Byte ranges of a device that file systems on it report free (the free blocks of each partition's
 * ext2/3/4 or FAT file system, or of the whole device when it has no partition table). A live copy
 * with --skip-free does not send them: their content is not copied. Anything not understood —
 * no table, an unknown or damaged file system — counts as used, and so does a file system that
 * says it is in use (mounted read-write, or not cleanly unmounted): its maps on the device may lag.
 */
export async function freeRanges(dev: Layer, log?: Logger): Promise<Array<{ offset: number; length: number }>> {
  // Imported here: the file-system readers cost a node about 1 MiB, and only --skip-free uses them.
  const { FsError, probeFileSystem } = await import("../fs/probe.js");
  const read = async (length: number, offset: number) => {
    const b = Buffer.alloc(length);
    await dev.pread(b, offset, plainIo);
    return b;
  };
  let areas: Array<{ start: number; length: number }> = [{ start: 0, length: dev.size() }];
  try {
    const table = await readPartitionTable(read, dev.size());
    if (table) areas = table.partitions.map((p) => ({ start: p.start, length: p.length }));
  } catch (err) {
    if (!(err instanceof PartitionTableError)) throw err;
  }
  const free: Array<{ offset: number; length: number }> = [];
  for (const a of areas) {
    try {
      const fs = await probeFileSystem((length, offset) => read(length, a.start + offset), a.length);
      if (!fs) continue;
      if (fs.inUse) {
        // Mounted (or not cleanly unmounted): its on-disk maps may call blocks free that hold data
        // written before the copy began (the allocation still in the journal or a cache).
        log?.warn({ offset: a.start, fs: fs.kind }, "--skip-free: the file system is in use (mounted or not cleanly unmounted); copying all of it");
        continue;
      }
      for (const r of await fs.allocationMap()) if (!r.used) free.push({ offset: a.start + r.offset, length: r.length });
    } catch (err) {
      if (!(err instanceof FsError)) throw err;
    }
  }
  return free;
}
