import { array, bytes, cstring, struct, u16le, u32le, u8 } from "../util/struct.js";

/**
 * The on-disk format of ext2/3/4 as ext.ts reads it: structures with the offsets and names of the
 * kernel's ext4 documentation (Documentation/filesystems/ext4/), and the flag values it tests.
 * Only the fields ext.ts reads are declared. All integers are little-endian.
 */

/** Byte offset of the superblock on the device. */
export const SB_OFFSET = 1024;
export const EXT_MAGIC = 0xef53;
export const ROOT_INO = 2;

export const COMPAT_HAS_JOURNAL = 0x4;
export const COMPAT_SPARSE_SUPER2 = 0x200;
export const INCOMPAT_COMPRESSION = 0x1;
export const INCOMPAT_FILETYPE = 0x2;
export const INCOMPAT_RECOVER = 0x4;
export const INCOMPAT_JOURNAL_DEV = 0x8;
export const INCOMPAT_META_BG = 0x10;
export const INCOMPAT_EXTENTS = 0x40;
export const INCOMPAT_64BIT = 0x80;
export const INCOMPAT_FLEX_BG = 0x200;
export const INCOMPAT_DIRDATA = 0x1000;
export const INCOMPAT_INLINE_DATA = 0x8000;
export const RO_COMPAT_SPARSE_SUPER = 0x1;
export const RO_COMPAT_HUGE_FILE = 0x8;
export const RO_COMPAT_GDT_CSUM = 0x10;
export const RO_COMPAT_DIR_NLINK = 0x20;
export const RO_COMPAT_EXTRA_ISIZE = 0x40;
export const RO_COMPAT_BIGALLOC = 0x200;
export const RO_COMPAT_METADATA_CSUM = 0x400;

/** s_state: cleanly unmounted (a read-write mount clears it until unmount). */
export const STATE_VALID_FS = 0x1;
export const STATE_ERROR_FS = 0x2;
export const BG_BLOCK_UNINIT = 0x2;
export const INODE_FL_EXTENTS = 0x80000;
export const INODE_FL_INLINE_DATA = 0x10000000;
export const EXTENT_MAGIC = 0xf30a;
export const EXTENT_MAX_DEPTH = 5;
export const EXTENT_INIT_MAX_LEN = 32768;
export const XATTR_MAGIC = 0xea020000;
/** e_name_index of the "system." attributes, where inline data keeps "system.data". */
export const XATTR_INDEX_SYSTEM = 7;

/** struct ext4_super_block, 1024 bytes at SB_OFFSET. */
export const Superblock = struct(
  "ext superblock",
  {
    inodesCount: u32le(0x00), // s_inodes_count
    blocksCountLo: u32le(0x04), // s_blocks_count_lo
    freeBlocksCountLo: u32le(0x0c), // s_free_blocks_count_lo
    firstDataBlock: u32le(0x14), // s_first_data_block
    logBlockSize: u32le(0x18), // s_log_block_size: block size 2^(10 + this)
    logClusterSize: u32le(0x1c), // s_log_cluster_size (bigalloc)
    blocksPerGroup: u32le(0x20), // s_blocks_per_group
    clustersPerGroup: u32le(0x24), // s_clusters_per_group (bigalloc)
    inodesPerGroup: u32le(0x28), // s_inodes_per_group
    magic: u16le(0x38), // s_magic, EXT_MAGIC
    state: u16le(0x3a), // s_state
    revLevel: u32le(0x4c), // s_rev_level
    inodeSize: u16le(0x58), // s_inode_size (revision 1 and later)
    featureCompat: u32le(0x5c), // s_feature_compat
    featureIncompat: u32le(0x60), // s_feature_incompat
    featureRoCompat: u32le(0x64), // s_feature_ro_compat
    uuid: bytes(0x68, 16), // s_uuid
    volumeName: cstring(0x78, 16), // s_volume_name
    reservedGdtBlocks: u16le(0xce), // s_reserved_gdt_blocks
    descSize: u16le(0xfe), // s_desc_size (64bit)
    firstMetaBg: u32le(0x104), // s_first_meta_bg
    blocksCountHi: u32le(0x150), // s_blocks_count_hi (64bit)
    freeBlocksCountHi: u32le(0x158), // s_free_blocks_count_hi (64bit)
    backupBgs: array(0x24c, 2, u32le), // s_backup_bgs (sparse_super2)
  },
  { size: 1024 },
);

/** struct ext4_group_desc, the first 32 bytes (all of it without the 64bit feature). */
export const GroupDesc = struct(
  "ext group descriptor",
  {
    blockBitmapLo: u32le(0x00), // bg_block_bitmap_lo
    inodeBitmapLo: u32le(0x04), // bg_inode_bitmap_lo
    inodeTableLo: u32le(0x08), // bg_inode_table_lo
    freeBlocksCountLo: u16le(0x0c), // bg_free_blocks_count_lo
    flags: u16le(0x12), // bg_flags
  },
  { size: 32 },
);

/** struct ext4_group_desc, the high halves that follow with the 64bit feature (s_desc_size >= 64). */
export const GroupDescHi = struct(
  "ext group descriptor (64bit)",
  {
    blockBitmapHi: u32le(0x20), // bg_block_bitmap_hi
    inodeBitmapHi: u32le(0x24), // bg_inode_bitmap_hi
    inodeTableHi: u32le(0x28), // bg_inode_table_hi
    freeBlocksCountHi: u16le(0x2c), // bg_free_blocks_count_hi
  },
  { size: 64 },
);

/** struct ext4_inode, its first 128 bytes (every inode has them). */
export const InodeCore = struct(
  "ext inode",
  {
    mode: u16le(0x00), // i_mode
    uid: u16le(0x02), // i_uid
    sizeLo: u32le(0x04), // i_size_lo
    mtime: u32le(0x10), // i_mtime
    gid: u16le(0x18), // i_gid
    linksCount: u16le(0x1a), // i_links_count
    flags: u32le(0x20), // i_flags
    block: bytes(0x28, 60), // i_block: block map, extent tree root, inline data or fast symlink
    sizeHigh: u32le(0x6c), // i_size_high
    uidHigh: u16le(0x78), // osd2.linux2.l_i_uid_high
    gidHigh: u16le(0x7a), // osd2.linux2.l_i_gid_high
  },
  { size: 128 },
);

/** The large inode's fields past byte 128 (s_inode_size > 128). */
export const InodeExtra = struct("ext inode (large)", {
  extraIsize: u16le(0x80), // i_extra_isize: bytes used past 128; in-inode xattrs follow them
});

/** i_block as a block map (no extents): 12 direct blocks, then single, double, triple indirect. */
export const BlockMap = struct("ext block map", {
  direct: array(0, 12, u32le), // i_block[0..11]
  indirect: array(48, 3, u32le), // i_block[12] (EXT4_IND_BLOCK), [13] DIND, [14] TIND
});

/** struct ext4_extent_header: the start of i_block or of an extent tree block. */
export const ExtentHeader = struct("ext extent header", {
  magic: u16le(0), // eh_magic, EXTENT_MAGIC
  entries: u16le(2), // eh_entries
  max: u16le(4), // eh_max
  depth: u16le(6), // eh_depth: 0 = leaves (ext4_extent) follow
  generation: u32le(8), // eh_generation
});

/** struct ext4_extent_idx: an entry of an interior node (depth > 0). */
export const ExtentIndex = struct(
  "ext extent index",
  {
    block: u32le(0), // ei_block
    leafLo: u32le(4), // ei_leaf_lo
    leafHi: u16le(8), // ei_leaf_hi
    // 10 ei_unused
  },
  { size: 12 },
);

/** struct ext4_extent: an entry of a leaf (depth 0). */
export const Extent = struct("ext extent", {
  block: u32le(0), // ee_block: first file block
  len: u16le(4), // ee_len: above EXTENT_INIT_MAX_LEN, unwritten (len - EXTENT_INIT_MAX_LEN)
  startHi: u16le(6), // ee_start_hi
  startLo: u32le(8), // ee_start_lo
});

/** struct ext4_dir_entry_2 (ext4_dir_entry without the filetype feature: name_len is 16 bits). */
export const DirEntry = struct("ext directory entry", {
  inode: u32le(0), // inode
  recLen: u16le(4), // rec_len
  nameLen: u8(6), // name_len (filetype feature)
  nameLen16: u16le(6), // name_len of ext4_dir_entry
  fileType: u8(7), // file_type (filetype feature)
  // name at 8, name_len bytes
});

/** struct ext4_xattr_ibody_header: at 128 + i_extra_isize, before the in-inode xattr entries. */
export const XattrIbodyHeader = struct("ext in-inode xattr header", {
  magic: u32le(0), // h_magic, XATTR_MAGIC
});

/** struct ext4_xattr_entry; a list of them ends with four zero bytes. */
export const XattrEntry = struct("ext xattr entry", {
  nameLen: u8(0), // e_name_len
  nameIndex: u8(1), // e_name_index
  valueOffs: u16le(2), // e_value_offs: from the first entry
  valueInum: u32le(4), // e_value_inum
  valueSize: u32le(8), // e_value_size
  hash: u32le(12), // e_hash
  // name at 16, e_name_len bytes
});
