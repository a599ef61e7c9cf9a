import { Device } from "./base-fs.js";
import { ExtFs } from "./ext.js";
import { FatFs } from "./fat.js";
import type { FileSystem, ReadAt } from "./file-system.js";

export * from "./file-system.js";

/**
 * Finds the file system on a device of `size` bytes: ext2/3/4 (superblock magic at byte 1080),
 * then FAT12/16/32 (boot sector). Null when neither is there; an FsError when one is there but
 * its structures are damaged or use a feature this reader does not handle.
 */
export async function probeFileSystem(read: ReadAt, size: number): Promise<FileSystem | null> {
  const dev = new Device(read, size);
  return (await ExtFs.probe(dev)) ?? (await FatFs.probe(dev));
}
