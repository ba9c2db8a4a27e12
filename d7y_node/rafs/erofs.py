"""The EROFS part of RAFS v6: superblock, compact and extended inodes, directory blocks, inline
(and shared) xattrs, chunk indexes — as laid out in the Linux kernel's `fs/erofs/erofs_fs.h`.

Owns decoding and validating those structures from a `BoundedBuffer`. Does not know RAFS's own
additions (extended superblock, blob and chunk tables: `v6.py`) nor the filesystem model
(`tree.py`). All integers are little-endian.
"""

from __future__ import annotations

import re
import stat
import struct
from dataclasses import dataclass
from typing import NamedTuple

from d7y_node.errors import RafsError
from d7y_node.rafs.bounded import BoundedBuffer
from d7y_node.rafs.tree import MAX_NAME_LENGTH, FileType

SUPERBLOCK_OFFSET = 1024  # room for an x86 boot sector before it
SUPERBLOCK_SIZE = 128
MAGIC = 0xE0F5E1E2

INODE_SLOT_SIZE = 32  # nid * 32 + meta area start = inode position
COMPACT_INODE_SIZE = 32
EXTENDED_INODE_SIZE = 64
DIRENT_SIZE = 12
XATTR_IBODY_HEADER_SIZE = 12
XATTR_ENTRY_SIZE = 4
CHUNK_INDEX_SIZE = 8
DEVICE_SLOT_SIZE = 128

# i_format: bit 0 is the inode version, bits 1-3 the data layout, the rest must be zero.
FORMAT_EXTENDED_BIT = 0x1
FORMAT_LAYOUT_SHIFT = 1
FORMAT_LAYOUT_MASK = 0x7
FORMAT_VALID_BITS = 0xF

LAYOUT_FLAT_PLAIN = 0
LAYOUT_COMPRESSED_FULL = 1
LAYOUT_FLAT_INLINE = 2
LAYOUT_COMPRESSED_COMPACT = 3
LAYOUT_CHUNK_BASED = 4

# The i_u of a chunk-based inode: chunk size as block-size shift, and whether 8-byte chunk
# indexes (with a device id) follow instead of a plain 4-byte block address array.
CHUNK_FORMAT_BLOCK_BITS_MASK = 0x1F
CHUNK_FORMAT_INDEXES = 0x20

NULL_ADDRESS = 0xFFFFFFFF  # a chunk index with this block address is a hole

FEATURE_COMPAT_SUPERBLOCK_CHECKSUM = 0x1
FEATURE_COMPAT_MTIME = 0x2  # compact inodes carry an mtime relative to build_time
FEATURE_INCOMPAT_CHUNKED_FILE = 0x4
FEATURE_INCOMPAT_DEVICE_TABLE = 0x8

BLOCK_BITS_4K = 12
BLOCK_BITS_512 = 9

# Directory entry file types (the generic FT_* values).
DIRENT_FILE_TYPES = {
    1: FileType.REGULAR,
    2: FileType.DIRECTORY,
    3: FileType.CHARACTER_DEVICE,
    4: FileType.BLOCK_DEVICE,
    5: FileType.FIFO,
    6: FileType.SOCKET,
    7: FileType.SYMLINK,
}
DIRENT_CODE_OF = {value: key for key, value in DIRENT_FILE_TYPES.items()}

# Short xattr name prefixes by index; for the two ACL indexes the prefix is the whole name.
XATTR_PREFIXES = {
    1: b"user.",
    2: b"system.posix_acl_access",
    3: b"system.posix_acl_default",
    4: b"trusted.",
    5: b"lustre.",
    6: b"security.",
}
XATTR_LONG_PREFIX_FLAG = 0x80

# Blob ids name files and registry blobs: keep them to characters that cannot escape a path.
_BLOB_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")

SUPERBLOCK_LAYOUT = struct.Struct("<IIIBBHQQIIII16s16sIHHH")
COMPACT_INODE_LAYOUT = struct.Struct("<HHHHIIIIHHI")
EXTENDED_INODE_LAYOUT = struct.Struct("<HHHHQIIIIQII16x")
DIRENT_LAYOUT = struct.Struct("<QHBx")
XATTR_HEADER_LAYOUT = struct.Struct("<IB7x")
XATTR_ENTRY_LAYOUT = struct.Struct("<BBH")
CHUNK_INDEX_LAYOUT = struct.Struct("<HHI")
DEVICE_SLOT_LAYOUT = struct.Struct("<64sII56x")


@dataclass(frozen=True, slots=True)
class Superblock:
    """The EROFS superblock fields RAFS v6 uses."""

    checksum: int
    feature_compat: int
    block_bits: int
    extra_slots: int
    root_nid: int
    inode_count: int
    build_time: int
    build_time_nanoseconds: int
    blocks: int
    meta_block_address: int
    xattr_block_address: int
    feature_incompat: int
    extra_devices: int
    device_table_slot_offset: int

    @property
    def block_size(self) -> int:
        return 1 << self.block_bits

    @property
    def meta_offset(self) -> int:
        return self.meta_block_address << self.block_bits


def parse_superblock(buffer: BoundedBuffer) -> Superblock:
    """Decode and sanity-check the superblock at byte 1024."""
    fields = buffer.unpack(SUPERBLOCK_LAYOUT, SUPERBLOCK_OFFSET, "EROFS superblock")
    (
        magic,
        checksum,
        feature_compat,
        block_bits,
        extra_slots,
        root_nid,
        inode_count,
        build_time,
        build_time_nanoseconds,
        blocks,
        meta_block_address,
        xattr_block_address,
        _uuid,
        _volume_name,
        feature_incompat,
        _union,
        extra_devices,
        device_table_slot_offset,
    ) = fields
    if magic != MAGIC:
        raise RafsError(f"not an EROFS superblock: magic {magic:#x}, expected {MAGIC:#x}")
    if block_bits not in (BLOCK_BITS_4K, BLOCK_BITS_512):
        raise RafsError(f"unsupported EROFS block size 2^{block_bits}")
    superblock = Superblock(
        checksum=checksum,
        feature_compat=feature_compat,
        block_bits=block_bits,
        extra_slots=extra_slots,
        root_nid=root_nid,
        inode_count=inode_count,
        build_time=build_time,
        build_time_nanoseconds=build_time_nanoseconds,
        blocks=blocks,
        meta_block_address=meta_block_address,
        xattr_block_address=xattr_block_address,
        feature_incompat=feature_incompat,
        extra_devices=extra_devices,
        device_table_slot_offset=device_table_slot_offset,
    )
    if superblock.meta_offset >= buffer.size:
        raise RafsError(
            f"EROFS metadata area starts at {superblock.meta_offset}, "
            f"past the end of the {buffer.size}-byte bootstrap"
        )
    return superblock


class DiskInode(NamedTuple):
    """One on-disk inode, compact (32 bytes) or extended (64 bytes), and where it is.

    A named tuple rather than a dataclass: walking 100k inodes creates 100k of these.
    """

    nid: int
    offset: int  # byte position in the bootstrap
    extended: bool
    layout: int
    xattr_count: int  # i_xattr_icount: 0, or 1 header + (n - 1) 4-byte units
    mode: int
    nlink: int
    size: int
    union: int  # i_u: raw block address, rdev, or chunk format
    uid: int
    gid: int
    mtime: int
    mtime_nanoseconds: int

    @property
    def inode_size(self) -> int:
        return EXTENDED_INODE_SIZE if self.extended else COMPACT_INODE_SIZE

    @property
    def xattr_size(self) -> int:
        if self.xattr_count == 0:
            return 0
        return XATTR_IBODY_HEADER_SIZE + (self.xattr_count - 1) * XATTR_ENTRY_SIZE

    @property
    def inline_data_offset(self) -> int:
        """Where tail-packed inline data starts: right after the inode and its xattrs."""
        return self.offset + self.inode_size + self.xattr_size


def parse_inode(buffer: BoundedBuffer, superblock: Superblock, nid: int) -> DiskInode:
    """Decode inode `nid` of the metadata area."""
    if nid < 0:
        raise RafsError(f"invalid inode nid {nid}")
    offset = superblock.meta_offset + nid * INODE_SLOT_SIZE
    compact = buffer.unpack(COMPACT_INODE_LAYOUT, offset, f"inode nid {nid}")
    raw_format = compact[0]
    if raw_format & ~FORMAT_VALID_BITS:
        raise RafsError(f"inode nid {nid}: unknown format bits {raw_format:#x}")
    layout = (raw_format >> FORMAT_LAYOUT_SHIFT) & FORMAT_LAYOUT_MASK
    if raw_format & FORMAT_EXTENDED_BIT:
        (
            _format,
            xattr_count,
            mode,
            _reserved,
            size,
            union,
            _ino,
            uid,
            gid,
            mtime,
            mtime_nanoseconds,
            nlink,
        ) = buffer.unpack(EXTENDED_INODE_LAYOUT, offset, f"extended inode nid {nid}")
        inode = DiskInode(
            nid,
            offset,
            True,
            layout,
            xattr_count,
            mode,
            nlink,
            size,
            union,
            uid,
            gid,
            mtime,
            mtime_nanoseconds,
        )
    else:
        (_format, xattr_count, mode, nlink, size, mtime_delta, union, _ino, uid, gid, _r) = compact
        # Compact inodes take their time from the superblock (plus a delta when the image
        # says so).
        mtime = superblock.build_time
        if superblock.feature_compat & FEATURE_COMPAT_MTIME:
            mtime += mtime_delta
        inode = DiskInode(
            nid,
            offset,
            False,
            layout,
            xattr_count,
            mode,
            nlink,
            size,
            union,
            uid,
            gid,
            mtime,
            superblock.build_time_nanoseconds,
        )
    _validate_inode(buffer, inode)
    return inode


def _validate_inode(buffer: BoundedBuffer, inode: DiskInode) -> None:
    where = f"inode nid {inode.nid}"
    file_type = stat.S_IFMT(inode.mode)
    if file_type not in FileType.ALL:
        raise RafsError(f"{where}: unknown file type in mode {inode.mode:#o}")
    if inode.nlink == 0:
        raise RafsError(f"{where}: link count is zero")
    if inode.layout in (LAYOUT_COMPRESSED_FULL, LAYOUT_COMPRESSED_COMPACT):
        raise RafsError(f"{where}: EROFS-compressed inodes are not used by RAFS")
    if inode.layout not in (LAYOUT_FLAT_PLAIN, LAYOUT_FLAT_INLINE, LAYOUT_CHUNK_BASED):
        raise RafsError(f"{where}: unknown data layout {inode.layout}")
    if inode.layout == LAYOUT_CHUNK_BASED and file_type != FileType.REGULAR:
        raise RafsError(f"{where}: only regular files may be chunk-based")
    # The inode and its inline xattrs must lie inside the bootstrap.
    buffer.check(inode.offset, inode.inode_size + inode.xattr_size, f"{where} with xattrs")


def read_flat_data(buffer: BoundedBuffer, inode: DiskInode, block_size: int) -> bytes:
    """The whole data of a flat (plain or tail-inline) inode: directory blocks or a symlink."""
    where = f"inode nid {inode.nid} data"
    if inode.layout not in (LAYOUT_FLAT_PLAIN, LAYOUT_FLAT_INLINE):
        raise RafsError(f"{where}: layout {inode.layout} holds no flat data")
    size = inode.size
    # Flat data lives in the bootstrap itself, so it can never be bigger than it.
    if size > buffer.size:
        raise RafsError(f"{where}: size {size} exceeds the {buffer.size}-byte {buffer.name}")
    if size == 0:
        return b""
    full_blocks, tail = divmod(size, block_size)
    if inode.layout == LAYOUT_FLAT_INLINE:
        if tail == 0:
            full_blocks, tail = full_blocks - 1, block_size
        # Tail-packed data must sit in the same block as its inode (the kernel reads one).
        tail_offset = inode.inline_data_offset
        inode_block_start = inode.offset - inode.offset % block_size
        if tail_offset - inode_block_start + tail > block_size:
            raise RafsError(f"{where}: inline tail of {tail} bytes crosses a block boundary")
    else:
        tail_offset = 0
    parts: list[bytes] = []
    if full_blocks or inode.layout == LAYOUT_FLAT_PLAIN:
        start = inode.union * block_size
        plain_length = full_blocks * block_size if inode.layout == LAYOUT_FLAT_INLINE else size
        parts.append(buffer.read(start, plain_length, where))
    if inode.layout == LAYOUT_FLAT_INLINE:
        parts.append(buffer.read(tail_offset, tail, f"{where} (inline tail)"))
    return b"".join(parts)


def parse_directory(data: bytes, block_size: int, nid: int) -> list[tuple[bytes, int, int]]:
    """(name, nid, file type) of every entry in a directory's data, "." and ".." included."""
    entries: list[tuple[bytes, int, int]] = []
    for block_start in range(0, len(data), block_size):
        block = data[block_start : block_start + block_size]
        entries.extend(_parse_directory_block(block, nid, block_start // block_size))
    return entries


def _parse_directory_block(block: bytes, nid: int, index: int) -> list[tuple[bytes, int, int]]:
    where = f"directory nid {nid} block {index}"
    if len(block) < DIRENT_SIZE:
        raise RafsError(f"{where}: {len(block)} bytes cannot hold a directory entry")
    first_name_offset = DIRENT_LAYOUT.unpack_from(block, 0)[1]
    if (
        first_name_offset < DIRENT_SIZE
        or first_name_offset % DIRENT_SIZE
        or first_name_offset > len(block)
    ):
        raise RafsError(f"{where}: invalid first name offset {first_name_offset}")
    count = first_name_offset // DIRENT_SIZE
    raw = [DIRENT_LAYOUT.unpack_from(block, position * DIRENT_SIZE) for position in range(count)]
    entries: list[tuple[bytes, int, int]] = []
    for position, (child_nid, name_offset, type_code) in enumerate(raw):
        name_end = raw[position + 1][1] if position + 1 < count else len(block)
        if not first_name_offset <= name_offset < name_end <= len(block):
            raise RafsError(f"{where}: entry {position} has invalid name offsets")
        name = block[name_offset:name_end]
        if position + 1 == count:
            # The last name runs to the end of the block unless a NUL ends it sooner.
            name = name.split(b"\0", 1)[0]
        if not name or len(name) > MAX_NAME_LENGTH:
            raise RafsError(f"{where}: entry {position} has an empty or too long name")
        file_type = DIRENT_FILE_TYPES.get(type_code)
        if file_type is None:
            raise RafsError(f"{where}: entry {name!r} has unknown file type {type_code}")
        entries.append((name, child_nid, file_type))
    return entries


def parse_xattrs(
    buffer: BoundedBuffer, superblock: Superblock, inode: DiskInode
) -> list[tuple[bytes, bytes]]:
    """The inline (and shared) extended attributes of `inode` as (full name, value)."""
    if inode.xattr_count == 0:
        return []
    where = f"inode nid {inode.nid} xattrs"
    start = inode.offset + inode.inode_size
    end = start + inode.xattr_size
    _filter, shared_count = buffer.unpack(XATTR_HEADER_LAYOUT, start, where)
    position = start + XATTR_IBODY_HEADER_SIZE
    if position + shared_count * 4 > end:
        raise RafsError(f"{where}: {shared_count} shared xattr ids overflow the xattr area")
    pairs: list[tuple[bytes, bytes]] = []
    for shared_id in buffer.u32_array(position, shared_count, where):
        shared_offset = (superblock.xattr_block_address << superblock.block_bits) + shared_id * 4
        pair, _ = _parse_xattr_entry(buffer, shared_offset, buffer.size, f"{where} (shared)")
        pairs.append(pair)
    position += shared_count * 4
    while position < end:
        pair, position = _parse_xattr_entry(buffer, position, end, where)
        pairs.append(pair)
    return pairs


def _parse_xattr_entry(
    buffer: BoundedBuffer, offset: int, limit: int, where: str
) -> tuple[tuple[bytes, bytes], int]:
    name_length, name_index, value_size = buffer.unpack(XATTR_ENTRY_LAYOUT, offset, where)
    entry_end = offset + XATTR_ENTRY_SIZE + name_length + value_size
    aligned_end = (entry_end + XATTR_ENTRY_SIZE - 1) // XATTR_ENTRY_SIZE * XATTR_ENTRY_SIZE
    if aligned_end > limit:
        raise RafsError(f"{where}: an entry overflows the xattr area")
    if name_index & XATTR_LONG_PREFIX_FLAG:
        raise RafsError(f"{where}: long xattr name prefixes are not supported")
    prefix = XATTR_PREFIXES.get(name_index)
    if prefix is None:
        raise RafsError(f"{where}: unknown xattr name index {name_index}")
    suffix = buffer.read(offset + XATTR_ENTRY_SIZE, name_length, where)
    value = buffer.read(offset + XATTR_ENTRY_SIZE + name_length, value_size, where)
    return (prefix + suffix, value), aligned_end


def chunk_size_of(inode: DiskInode, block_bits: int) -> int:
    """The chunk size a chunk-based inode declares in its i_u."""
    if not inode.union & CHUNK_FORMAT_INDEXES:
        raise RafsError(
            f"inode nid {inode.nid}: block-map chunk format (no chunk indexes) is not supported"
        )
    if inode.union & ~(CHUNK_FORMAT_INDEXES | CHUNK_FORMAT_BLOCK_BITS_MASK):
        raise RafsError(f"inode nid {inode.nid}: unknown chunk format bits {inode.union:#x}")
    return 1 << (block_bits + (inode.union & CHUNK_FORMAT_BLOCK_BITS_MASK))


def chunk_indexes_offset(inode: DiskInode) -> int:
    """Where the 8-byte chunk indexes of a chunk-based inode start (8-byte aligned)."""
    end = inode.offset + inode.inode_size + inode.xattr_size
    return (end + CHUNK_INDEX_SIZE - 1) // CHUNK_INDEX_SIZE * CHUNK_INDEX_SIZE


def read_chunk_indexes(
    buffer: BoundedBuffer, inode: DiskInode, first: int, count: int
) -> list[tuple[int, int, int]]:
    """Chunk indexes `first .. first + count` of a chunk-based inode as
    (device id, RAFS chunk-info index, block address).

    RAFS packs the blob's chunk-info index into the kernel's `advise` field (low 16 bits) and
    the high byte of `device_id` (bits 16-23); the low byte of `device_id` is blob index + 1.
    """
    offset = chunk_indexes_offset(inode) + first * CHUNK_INDEX_SIZE
    result = []
    for low, device_field, block_address in buffer.iter_unpack(
        CHUNK_INDEX_LAYOUT, offset, count, f"inode nid {inode.nid} chunk indexes"
    ):
        device_id = device_field & 0xFF
        chunk_info_index = ((device_field >> 8) << 16) | low
        result.append((device_id, chunk_info_index, block_address))
    return result


@dataclass(frozen=True, slots=True)
class DeviceSlot:
    """One extra device (a RAFS data blob) in the EROFS device table."""

    tag: str  # the blob id
    blocks: int
    mapped_block_address: int


def parse_device_table(buffer: BoundedBuffer, offset: int, count: int) -> list[DeviceSlot]:
    slots = []
    for tag, blocks, mapped in buffer.iter_unpack(
        DEVICE_SLOT_LAYOUT, offset, count, "device table"
    ):
        slots.append(DeviceSlot(decode_id(tag, "device table"), blocks, mapped))
    return slots


def decode_id(raw: bytes, where: str) -> str:
    """A blob id from a NUL-padded field: printable, no path separators."""
    text = raw.rstrip(b"\0")
    if not _BLOB_ID.fullmatch(text) or not text.strip(b"."):
        raise RafsError(f"{where}: invalid blob id {raw[:80]!r}")
    return text.decode("ascii")
