"""RAFS v5 bootstraps (read only), and the v5 structures RAFS v6 still uses.

A v5 bootstrap is: an 8 KiB superblock (magic "RAFS" 0x52414653, version 0x500), an inode table
(u32 per child index: the record's offset / 8), a prefetch table (u32 inode numbers), a blob
table (readahead offset, readahead size, NUL-separated blob ids), an optional extended blob
table (64 bytes per blob), then inode records. A record is 128 bytes, then the name and the
symlink target (each padded to 8 bytes), then xattrs (u64 size + (u32 pair size, name NUL value)
pairs, padded), then for regular files one 80-byte chunk info per chunk.

A directory's children are the records at child indexes `child_index .. + child_count`; each
hard link has its own record (with its own name) carrying the shared inode number, and the inode
table entry at that number points to the primary record.

Owns those layouts, the superblock flag bits (shared with v6) and the 80-byte chunk info record
(which v6's chunk table reuses). Does not know EROFS (`erofs.py`, `v6.py`).
"""

from __future__ import annotations

import stat
import struct
from dataclasses import dataclass

from d7y_node.errors import RafsError
from d7y_node.rafs.bounded import BoundedBuffer, Buffer, checked_count
from d7y_node.rafs.chunks import DIGEST_SIZE, MAX_CHUNK_SIZE, Compressor, Digester
from d7y_node.rafs.erofs import decode_id
from d7y_node.rafs.tree import (
    MAX_NAME_LENGTH,
    MAX_SYMLINK_LENGTH,
    ROOT_INO,
    Attributes,
    BlobInfo,
    Chunk,
    DirectoryEntry,
    Filesystem,
    FileType,
    LruCache,
    xattr_mapping,
)

MAGIC = 0x52414653
VERSION = 0x500
SUPERBLOCK_SIZE = 8192
ALIGNMENT = 8
INODE_SIZE = 128
CHUNK_INFO_SIZE = 80
EXTENDED_BLOB_ENTRY_SIZE = 64
MIN_CHUNK_SIZE = 4096
# Stargz-converted v5 images use 4 MiB chunks; nydus accepts that and anything up to 16 MiB.
MAX_V5_CHUNK_SIZE = MAX_CHUNK_SIZE
# Parsed inode records kept around (a record is a few hundred bytes of Python objects).
RECORD_CACHE_ENTRIES = 16384


class SuperFlag:
    """`RafsSuperFlags`: superblock flags of v5 and of v6's extended superblock."""

    COMPRESSION_NONE = 0x0000_0001
    COMPRESSION_LZ4 = 0x0000_0002
    HASH_BLAKE3 = 0x0000_0004
    HASH_SHA256 = 0x0000_0008
    EXPLICIT_UID_GID = 0x0000_0010
    HAS_XATTR = 0x0000_0020
    COMPRESSION_GZIP = 0x0000_0040
    COMPRESSION_ZSTD = 0x0000_0080
    INLINED_CHUNK_DIGEST = 0x0000_0100
    TARFS_MODE = 0x0000_0200
    ENCRYPTION_NONE = 0x0100_0000
    ENCRYPTION_AES_128_XTS = 0x0200_0000
    RESERVED_COMPAT = 0xFC00_0000

    KNOWN = 0x3FF | ENCRYPTION_NONE | ENCRYPTION_AES_128_XTS | RESERVED_COMPAT


COMPRESSION_FLAGS = {
    SuperFlag.COMPRESSION_NONE: Compressor.NONE,
    SuperFlag.COMPRESSION_LZ4: Compressor.LZ4_BLOCK,
    SuperFlag.COMPRESSION_GZIP: Compressor.GZIP,
    SuperFlag.COMPRESSION_ZSTD: Compressor.ZSTD,
}
DIGEST_FLAGS = {SuperFlag.HASH_BLAKE3: Digester.BLAKE3, SuperFlag.HASH_SHA256: Digester.SHA256}


def check_super_flags(flags: int, where: str) -> tuple[Compressor, Digester]:
    """The compressor and digester the flags name; exactly one of each, nothing unsupported."""
    if flags & ~SuperFlag.KNOWN:
        raise RafsError(f"{where}: unknown flags {flags & ~SuperFlag.KNOWN:#x}")
    if flags & (SuperFlag.TARFS_MODE | SuperFlag.ENCRYPTION_AES_128_XTS):
        raise RafsError(f"{where}: tarfs mode and encrypted images are not supported")
    compressors = [value for bit, value in COMPRESSION_FLAGS.items() if flags & bit]
    digesters = [value for bit, value in DIGEST_FLAGS.items() if flags & bit]
    if len(compressors) != 1 or len(digesters) != 1:
        raise RafsError(f"{where}: flags {flags:#x} must name one compressor and one digester")
    return compressors[0], digesters[0]


class ChunkFlag:
    """`BlobChunkFlags` in an 80-byte chunk info record."""

    COMPRESSED = 0x01
    HOLE = 0x02
    ENCRYPTED = 0x04
    BATCH = 0x08
    HAS_CRC32 = 0x10
    KNOWN = 0x1F


CHUNK_INFO = struct.Struct("<32sIIIIQQQII")


@dataclass(frozen=True, slots=True)
class ChunkInfoRecord:
    """One 80-byte `RafsV5ChunkInfo` record (v5 inodes, v6 chunk table)."""

    digest: bytes
    blob_index: int
    flags: int
    compressed_size: int
    uncompressed_size: int
    compressed_offset: int
    uncompressed_offset: int
    file_offset: int
    index: int  # the chunk's index in its blob's chunk info table

    @property
    def is_hole(self) -> bool:
        return bool(self.flags & ChunkFlag.HOLE)


def parse_chunk_info(
    fields: tuple[int | bytes, ...], blobs: tuple[BlobInfo, ...]
) -> ChunkInfoRecord:
    """Validate the fields of one chunk info record (as `CHUNK_INFO` unpacks them)."""
    digest, blob_index, flags, compressed_size, uncompressed_size = fields[:5]
    compressed_offset, uncompressed_offset, file_offset, index, _crc32 = fields[5:]
    assert isinstance(digest, bytes)
    record = ChunkInfoRecord(
        digest=digest,
        blob_index=int(blob_index),
        flags=int(flags),
        compressed_size=int(compressed_size),
        uncompressed_size=int(uncompressed_size),
        compressed_offset=int(compressed_offset),
        uncompressed_offset=int(uncompressed_offset),
        file_offset=int(file_offset),
        index=int(index),
    )
    where = f"chunk {record.index} of blob {record.blob_index}"
    if record.blob_index >= len(blobs):
        raise RafsError(f"{where}: blob index beyond the {len(blobs)}-entry blob table")
    if record.flags & ~ChunkFlag.KNOWN:
        raise RafsError(f"{where}: unknown flags {record.flags:#x}")
    if record.flags & (ChunkFlag.ENCRYPTED | ChunkFlag.BATCH):
        raise RafsError(f"{where}: encrypted or batched chunks are not supported")
    if not 0 < record.uncompressed_size <= MAX_CHUNK_SIZE:
        raise RafsError(f"{where}: invalid uncompressed size {record.uncompressed_size}")
    compressed = bool(record.flags & ChunkFlag.COMPRESSED)
    if record.compressed_size == 0 or (
        not compressed and record.compressed_size != record.uncompressed_size
    ):
        raise RafsError(f"{where}: invalid compressed size {record.compressed_size}")
    blob = blobs[record.blob_index]
    if blob.compressed_size and record.compressed_offset + record.compressed_size > (
        blob.compressed_size
    ):
        raise RafsError(f"{where}: lies past the end of blob {blob.blob_id}")
    return record


def chunk_from_record(record: ChunkInfoRecord, file_offset: int) -> Chunk:
    return Chunk(
        blob_index=record.blob_index,
        chunk_index=record.index,
        file_offset=file_offset,
        compressed_offset=record.compressed_offset,
        compressed_size=record.compressed_size,
        uncompressed_offset=record.uncompressed_offset,
        uncompressed_size=record.uncompressed_size,
        compressed=bool(record.flags & ChunkFlag.COMPRESSED),
        digest=record.digest,
    )


def _align(size: int) -> int:
    return (size + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


SUPERBLOCK_LAYOUT = struct.Struct("<IIIIQQQQQIIIIQ")
INODE_LAYOUT = struct.Struct("<32sQQIIIIQQQIIIHHIIQ8x")
EXTENDED_BLOB_LAYOUT = struct.Struct("<IIQQ40x")
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


class InodeFlag:
    SYMLINK = 0x1
    HARDLINK = 0x2
    XATTR = 0x4
    HAS_HOLE = 0x8
    KNOWN = 0xF


@dataclass(frozen=True, slots=True)
class _Record:
    """One parsed inode record and where its variable parts are."""

    offset: int
    parent: int
    ino: int
    uid: int
    gid: int
    mode: int
    size: int
    flags: int
    nlink: int
    child_index: int
    child_count: int
    name: bytes
    symlink_size: int
    rdev: int
    mtime: int
    mtime_nanoseconds: int

    @property
    def symlink_offset(self) -> int:
        return self.offset + INODE_SIZE + _align(len(self.name))

    @property
    def tail_offset(self) -> int:
        """Where xattrs (then chunk infos) start."""
        return self.symlink_offset + _align(self.symlink_size)


def is_rafs_v5(data: Buffer) -> bool:
    return len(data) >= 8 and struct.unpack_from("<II", data, 0) == (MAGIC, VERSION)


class RafsV5Filesystem(Filesystem):
    """A RAFS v5 bootstrap, parsed lazily: records are decoded when first asked for."""

    version = 5

    def __init__(self, data: Buffer, *, name: str = "bootstrap") -> None:
        super().__init__()
        self._buffer = buffer = BoundedBuffer(data, name)
        (
            magic,
            version,
            superblock_size,
            chunk_size,
            flags,
            inode_count,
            inode_table_offset,
            prefetch_table_offset,
            blob_table_offset,
            inode_table_entries,
            prefetch_table_entries,
            blob_table_size,
            extended_blob_entries,
            extended_blob_table_offset,
        ) = buffer.unpack(SUPERBLOCK_LAYOUT, 0, "RAFS v5 superblock")
        if (magic, version) != (MAGIC, VERSION):
            raise RafsError(f"not a RAFS v5 superblock (magic {magic:#x}, version {version:#x})")
        if superblock_size != SUPERBLOCK_SIZE or buffer.size <= SUPERBLOCK_SIZE:
            raise RafsError(f"RAFS v5: invalid superblock size {superblock_size}")
        if chunk_size & (chunk_size - 1) or not MIN_CHUNK_SIZE <= chunk_size <= MAX_V5_CHUNK_SIZE:
            raise RafsError(f"RAFS v5: invalid chunk size {chunk_size}")
        self.compressor, self.digester = check_super_flags(flags, "RAFS v5 superblock")
        self.flags = flags
        self.chunk_size = chunk_size
        self.explicit_uid_gid = bool(flags & SuperFlag.EXPLICIT_UID_GID)
        self._entries = checked_count(inode_table_entries, 4, buffer.size, "RAFS v5 inode table")
        if inode_count > inode_table_entries or inode_count == 0:
            raise RafsError(
                f"RAFS v5: {inode_count} inodes for a {inode_table_entries}-entry table"
            )
        self.inode_count = inode_count
        self._inode_table_offset = inode_table_offset
        buffer.check(inode_table_offset, inode_table_entries * 4, "RAFS v5 inode table")
        if inode_table_offset < SUPERBLOCK_SIZE:
            raise RafsError("RAFS v5: inode table overlaps the superblock")
        self.blobs = self._parse_blob_table(
            blob_table_offset, blob_table_size, extended_blob_table_offset, extended_blob_entries
        )
        checked_count(prefetch_table_entries, 4, buffer.size, "RAFS v5 prefetch table")
        self._prefetch = buffer.u32_array(
            prefetch_table_offset, prefetch_table_entries, "RAFS v5 prefetch table"
        )
        self._records: LruCache[int, _Record] = LruCache(RECORD_CACHE_ENTRIES)
        if not self.getattr(ROOT_INO).is_directory:
            raise RafsError("RAFS v5: the root inode is not a directory")

    # -- tables --

    def _parse_blob_table(
        self, offset: int, size: int, extended_offset: int, extended_count: int
    ) -> tuple[BlobInfo, ...]:
        raw = self._buffer.read(offset, size, "RAFS v5 blob table")
        checked_count(extended_count, EXTENDED_BLOB_ENTRY_SIZE, self._buffer.size, "blob table")
        extended = list(
            self._buffer.iter_unpack(
                EXTENDED_BLOB_LAYOUT, extended_offset, extended_count, "RAFS v5 extended blob table"
            )
        )
        blobs: list[BlobInfo] = []
        position = 0
        # Each entry: u32 readahead offset, u32 readahead size, the id; entries split by NUL.
        while len(raw) - position > 8:
            end = raw.find(b"\0", position + 8)
            if end < 0:
                end = len(raw)
            blob_id = decode_id(raw[position + 8 : end], "RAFS v5 blob table")
            position = end + 1
            index = len(blobs)
            if extended:
                if index >= len(extended):
                    raise RafsError("RAFS v5: extended blob table is shorter than the blob table")
                chunk_count, features, uncompressed_size, compressed_size = extended[index]
            else:
                chunk_count = features = uncompressed_size = compressed_size = 0
            blobs.append(
                BlobInfo(
                    index=index,
                    blob_id=blob_id,
                    compressor=self.compressor,
                    digester=self.digester,
                    chunk_size=self.chunk_size,
                    chunk_count=chunk_count,
                    compressed_size=compressed_size,
                    uncompressed_size=uncompressed_size,
                    features=features,
                    meta_compressor=Compressor.NONE,
                    meta_offset=0,
                    meta_compressed_size=0,
                    meta_uncompressed_size=0,
                    toc_size=0,
                    toc_digest=bytes(DIGEST_SIZE),
                )
            )
        if len(set(blob.blob_id for blob in blobs)) != len(blobs):
            raise RafsError("RAFS v5: a blob id appears twice in the blob table")
        return tuple(blobs)

    # -- records --

    def _record_at(self, child_index: int) -> _Record:
        """The record the inode table names for `child_index` (1-based)."""
        if not 1 <= child_index <= self._entries:
            raise RafsError(f"RAFS v5: inode index {child_index} outside 1..{self._entries}")
        cached = self._records.get(child_index)
        if cached is not None:
            return cached
        (slot,) = self._buffer.unpack(
            _U32, self._inode_table_offset + (child_index - 1) * 4, "RAFS v5 inode table"
        )
        offset = slot * ALIGNMENT
        where = f"RAFS v5 inode record {child_index}"
        if offset < SUPERBLOCK_SIZE:
            raise RafsError(f"{where}: offset {offset} points into the superblock")
        fields = self._buffer.unpack(INODE_LAYOUT, offset, where)
        (
            _digest,
            parent,
            ino,
            uid,
            gid,
            _projid,
            mode,
            size,
            _blocks,
            flags,
            nlink,
            child_index_field,
            child_count,
            name_size,
            symlink_size,
            rdev,
            mtime_nanoseconds,
            mtime,
        ) = fields
        if not 0 < name_size <= MAX_NAME_LENGTH:
            raise RafsError(f"{where}: invalid name size {name_size}")
        name = self._buffer.read(offset + INODE_SIZE, name_size, where)
        if stat.S_IFMT(mode) not in FileType.ALL:
            raise RafsError(f"{where}: unknown file type in mode {mode:#o}")
        if nlink == 0 or flags & ~InodeFlag.KNOWN:
            raise RafsError(f"{where}: invalid link count {nlink} or flags {flags:#x}")
        if stat.S_ISLNK(mode) and not 0 < symlink_size <= MAX_SYMLINK_LENGTH:
            raise RafsError(f"{where}: invalid symlink size {symlink_size}")
        if not stat.S_ISLNK(mode):
            symlink_size = 0
        record = _Record(
            offset=offset,
            parent=parent,
            ino=ino,
            uid=uid,
            gid=gid,
            mode=mode,
            size=size,
            flags=flags,
            nlink=nlink,
            child_index=child_index_field,
            child_count=child_count,
            name=name,
            symlink_size=symlink_size,
            rdev=rdev,
            mtime=mtime,
            mtime_nanoseconds=mtime_nanoseconds,
        )
        self._buffer.check(offset, record.tail_offset - offset, where)
        self._records.put(child_index, record)
        return record

    def _record(self, ino: int) -> _Record:
        record = self._record_at(ino)
        if record.ino != ino:
            raise RafsError(f"RAFS v5: inode {ino} has no record of its own")
        return record

    # -- Filesystem --

    def _attributes(self, ino: int) -> Attributes:
        record = self._record(ino)
        special = stat.S_ISCHR(record.mode) or stat.S_ISBLK(record.mode)
        return Attributes(
            ino=ino,
            mode=record.mode,
            uid=record.uid,
            gid=record.gid,
            nlink=record.nlink,
            size=record.size,
            rdev=record.rdev if special else 0,
            mtime=record.mtime,
            mtime_nanoseconds=record.mtime_nanoseconds,
        )

    def _directory(self, ino: int) -> list[DirectoryEntry]:
        record = self._record(ino)
        if record.child_count == 0:
            return []
        first = record.child_index
        last = first + record.child_count - 1
        if first <= ino or last > self._entries:
            raise RafsError(
                f"RAFS v5: directory {ino} has children {first}..{last} "
                f"outside {ino + 1}..{self._entries}"
            )
        entries = []
        for child_index in range(first, last + 1):
            child = self._record_at(child_index)
            if child.parent != ino:
                raise RafsError(f"RAFS v5: inode record {child_index} names another parent")
            if child.ino < 2 or child.ino > self._entries:
                raise RafsError(f"RAFS v5: inode record {child_index} has inode number {child.ino}")
            entries.append(DirectoryEntry(child.name, child.ino, stat.S_IFMT(child.mode)))
        return entries

    def _parent(self, ino: int) -> int:
        return self._record(ino).parent

    def readlink(self, ino: int) -> bytes:
        record = self._record(ino)
        if not stat.S_ISLNK(record.mode):
            raise RafsError(f"inode {ino} is not a symlink")
        target = self._buffer.read(record.symlink_offset, record.symlink_size, "symlink")
        if b"\0" in target:
            raise RafsError(f"inode {ino}: symlink target holds a NUL byte")
        return target

    def _xattr_area(self, record: _Record) -> tuple[int, int]:
        """(offset, size) of the xattr pairs; (tail, 0) when there are none."""
        if not record.flags & InodeFlag.XATTR:
            return record.tail_offset, 0
        (size,) = self._buffer.unpack(_U64, record.tail_offset, "RAFS v5 xattrs")
        self._buffer.check(record.tail_offset + 8, size, "RAFS v5 xattrs")
        return record.tail_offset + 8, size

    def xattrs(self, ino: int) -> dict[bytes, bytes]:
        record = self._record(ino)
        offset, size = self._xattr_area(record)
        data = self._buffer.read(offset, size, "RAFS v5 xattrs")
        pairs: list[tuple[bytes, bytes]] = []
        position = 0
        while position < size:
            if position + 4 > size:
                raise RafsError(f"inode {ino}: truncated xattr pair size")
            (pair_size,) = _U32.unpack_from(data, position)
            position += 4
            if position + pair_size > size:
                raise RafsError(f"inode {ino}: xattr pair overflows the xattr area")
            pair = data[position : position + pair_size]
            position += pair_size
            name, separator, value = pair.partition(b"\0")
            if not separator:
                raise RafsError(f"inode {ino}: xattr pair without a name terminator")
            pairs.append((name, value))
        return xattr_mapping(pairs, ino)

    def _chunk_list(self, ino: int) -> list[Chunk]:
        record = self._record(ino)
        offset, xattr_size = self._xattr_area(record)
        if record.flags & InodeFlag.XATTR:
            offset += _align(xattr_size)
        count = checked_count(
            record.child_count, CHUNK_INFO_SIZE, self._buffer.size, f"inode {ino} chunks"
        )
        chunks = []
        for fields in self._buffer.iter_unpack(CHUNK_INFO, offset, count, f"inode {ino} chunks"):
            chunk_record = parse_chunk_info(fields, self.blobs)
            if chunk_record.is_hole:
                continue
            chunks.append(chunk_from_record(chunk_record, chunk_record.file_offset))
        return chunks

    def prefetch_inodes(self) -> tuple[int, ...]:
        for ino in self._prefetch:
            self._record(ino)
        return tuple(self._prefetch)
