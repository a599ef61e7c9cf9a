/** Reads `length` bytes at byte `offset` of a device (partition-table.ts has the same shape). */
export type ReadAt = (length: number, offset: number) => Promise<Buffer>;

export type FsKind = "ext2" | "ext3" | "ext4" | "fat12" | "fat16" | "fat32";
export type FileType = "file" | "dir" | "symlink" | "chardev" | "blockdev" | "fifo" | "socket";

/**
 * Why a file-system call failed. `corrupt`: a structure on the device is damaged (the message
 * names it and its byte offset); `unsupported`: a feature this reader does not handle; the rest
 * are the usual path errors.
 */
export type FsErrorCode = "corrupt" | "unsupported" | "ENOENT" | "ENOTDIR" | "EISDIR" | "ELOOP" | "EFBIG" | "EINVAL";

/** The one error the file-system readers throw. */
export class FsError extends Error {
  constructor(
    readonly code: FsErrorCode,
    message: string,
    /** Byte offset on the device of the structure at fault, when there is one. */
    readonly offset?: number,
  ) {
    super(message);
    this.name = "FsError";
  }
  /** A damaged structure: "<structure> at byte <offset>: <reason>". */
  static corrupt(structure: string, offset: number, reason: string): FsError {
    return new FsError("corrupt", `${structure} at byte ${offset}: ${reason}`, offset);
  }
}

export interface FileStat {
  type: FileType;
  size: number;
  /** Permission bits and type, as st_mode (FAT: synthesised, 0755 for dirs, 0644 or 0444 for files). */
  mode: number;
  uid: number;
  gid: number;
  nlink: number;
  mtime: Date;
  /** Inode number (ext) or first cluster (FAT; 0 for empty files and the FAT12/16 root). */
  ino: number;
  /** Target of a symlink. */
  target?: string;
}

export interface DirEntry extends FileStat {
  name: string;
}

/** A run of the device holding bytes [fileOffset, fileOffset + length) of a file. */
export interface FileExtent {
  fileOffset: number;
  deviceOffset: number;
  length: number;
}

/** One run of the device's allocation map; runs are sorted, adjacent and cover the whole device. */
export interface AllocationRun {
  offset: number;
  length: number;
  used: boolean;
}

/** An open regular file: the mapping is read once. */
export interface FsFile {
  readonly path: string;
  readonly stat: FileStat;
  readonly size: number;
  /** Reads bytes of the file; holes and unwritten (preallocated) ranges read as zeroes. */
  read(offset: number, length: number): Promise<Buffer>;
  /** Device runs holding the file's data in file order; holes and unwritten extents are omitted. */
  extents(): Promise<FileExtent[]>;
}

/**
 * A read-only view of a file system on a device. Paths are absolute, "/"-separated; symlinks in
 * the middle of a path are followed (absolute targets from this file system's root), a final
 * symlink is followed by readFile/open/readdir but not by stat.
 */
export interface FileSystem {
  readonly kind: FsKind;
  readonly label: string;
  readonly uuid: string;
  /** Allocation unit: ext block (cluster with bigalloc) or FAT cluster. */
  readonly blockSize: number;
  /** Bytes the file system spans on the device. */
  readonly totalBytes: number;
  readonly freeBytes: number;
  /** Things worth knowing that did not stop reading (e.g. "journal needs recovery"). */
  readonly notes: string[];
  /**
   * The file system says it is mounted read-write or was not cleanly unmounted (ext: journal to
   * recover or state not clean; FAT: the dirty flag Linux sets while mounted): its maps on the
   * device may lag what it has written (journal, caches), so they cannot tell free space.
   */
  readonly inUse: boolean;
  readdir(path: string): Promise<DirEntry[]>;
  stat(path: string): Promise<FileStat>;
  readlink(path: string): Promise<string>;
  open(path: string): Promise<FsFile>;
  /** The whole file; files over 1 GiB are refused (EFBIG): use open() and read ranges. */
  readFile(path: string): Promise<Buffer>;
  fileExtents(path: string): Promise<FileExtent[]>;
  /**
   * Which bytes of the device hold something: file-system metadata and allocated blocks are used,
   * free blocks are not. Bytes of the device outside the file system count as used (they may
   * hold anything).
   */
  allocationMap(): Promise<AllocationRun[]>;
}
