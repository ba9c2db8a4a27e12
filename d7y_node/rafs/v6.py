"""RAFS v6 bootstraps (read only): an EROFS image plus RAFS's own tables.

Layout: EROFS superblock at 1024 (feature bit 0x40000000 marks RAFS v6), the RAFS extended
superblock at 1152 (flags, blob table, chunk size, chunk table, prefetch table), the EROFS device
table at 1408 (one 128-byte slot per data blob), the blob table (256 bytes per blob), then the
EROFS metadata area (inodes addressed by nid) and directory blocks, the chunk table (80-byte
`RafsV5ChunkInfo` records) and the prefetch table (u32 nids).

A regular file is a chunk-based EROFS inode: one 8-byte index per RAFS chunk (the superblock's
chunk size) naming the blob (device id - 1), the chunk's index in that blob's chunk info table,
and its block address in the blob's uncompressed space. The chunk size the inode declares is for
the kernel: nydus-image declares the file size rounded up to a power of two when the file's
chunks follow each other in one blob (the kernel then maps one big chunk), while nydusd, and this
reader, still step through the indexes by the RAFS chunk size.

Where a chunk is stored (offset, sizes, compressed or not) and its digest come from the
bootstrap's chunk table or, when the bootstrap has none, from the blob's own `blob.meta` (attach
it with `attach_blob_meta`).

Inode numbers of the model: nid + 1, with the root's and nid 0's numbers swapped so that the root
is 1. Owns RAFS v6 parsing and validation on top of `erofs.py`; does not fetch blobs.
"""

from __future__ import annotations

import stat
import struct
from collections.abc import Sequence

from d7y_node.errors import RafsError
from d7y_node.rafs import erofs
from d7y_node.rafs.blob import MAX_CHUNKS_PER_BLOB, BlobMeta, check_blob_features
from d7y_node.rafs.bounded import BoundedBuffer, Buffer, checked_count
from d7y_node.rafs.chunks import MAX_CHUNK_SIZE, Compressor, Digester
from d7y_node.rafs.tree import (
    CHUNK_LIST_CACHE_ENTRIES,
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
from d7y_node.rafs.v5 import (
    CHUNK_INFO,
    CHUNK_INFO_SIZE,
    SuperFlag,
    check_super_flags,
    chunk_from_record,
    parse_chunk_info,
)

FEATURE_COMPAT_RAFS_V6 = 0x4000_0000
EXTENDED_SUPERBLOCK_OFFSET = erofs.SUPERBLOCK_OFFSET + erofs.SUPERBLOCK_SIZE
EXTENDED_SUPERBLOCK_SIZE = 256
DEVICE_TABLE_OFFSET = EXTENDED_SUPERBLOCK_OFFSET + EXTENDED_SUPERBLOCK_SIZE
BLOB_ENTRY_SIZE = 256
MIN_CHUNK_SIZE = 4096
# Limits nydus puts on a blob table entry (BLOB_MAX_SIZE_*).
MAX_BLOB_COMPRESSED_SIZE = 1 << 40
MAX_BLOB_UNCOMPRESSED_SIZE = 1 << 44
# Parsed inodes kept around; each is a small named tuple.
INODE_CACHE_ENTRIES = 16384

EXTENDED_SUPERBLOCK_LAYOUT = struct.Struct("<QQIIQQQI")
BLOB_ENTRY_LAYOUT = struct.Struct("<64sIIIIIIQQIIQQQ32s32sQ8sI36x")
_INCOMPAT_SUPPORTED = erofs.FEATURE_INCOMPAT_CHUNKED_FILE | erofs.FEATURE_INCOMPAT_DEVICE_TABLE


def is_rafs_v6(data: Buffer) -> bool:
    offset = erofs.SUPERBLOCK_OFFSET
    if len(data) < offset + 12:
        return False
    magic, _checksum, compat = struct.unpack_from("<III", data, offset)
    return magic == erofs.MAGIC and bool(compat & FEATURE_COMPAT_RAFS_V6)


class RafsV6Filesystem(Filesystem):
    """A RAFS v6 bootstrap, parsed lazily: inodes and directories are decoded when asked for."""

    version = 6

    def __init__(self, data: Buffer, *, name: str = "bootstrap") -> None:
        super().__init__()
        self._buffer = buffer = BoundedBuffer(data, name)
        self._superblock = superblock = erofs.parse_superblock(buffer)
        self._check_superblock(superblock)
        self._block_size = superblock.block_size
        (
            flags,
            blob_table_offset,
            blob_table_size,
            chunk_size,
            chunk_table_offset,
            chunk_table_size,
            prefetch_table_offset,
            prefetch_table_size,
        ) = buffer.unpack(
            EXTENDED_SUPERBLOCK_LAYOUT, EXTENDED_SUPERBLOCK_OFFSET, "RAFS v6 superblock"
        )
        self.flags = flags
        self.compressor, self.digester = check_super_flags(flags, "RAFS v6 superblock")
        self.explicit_uid_gid = bool(flags & SuperFlag.EXPLICIT_UID_GID)
        if chunk_size & (chunk_size - 1) or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise RafsError(f"RAFS v6: invalid chunk size {chunk_size}")
        self.chunk_size = chunk_size
        self.inode_count = superblock.inode_count

        device_table_end = DEVICE_TABLE_OFFSET + superblock.extra_devices * erofs.DEVICE_SLOT_SIZE
        self.devices = tuple(
            erofs.parse_device_table(buffer, DEVICE_TABLE_OFFSET, superblock.extra_devices)
        )
        self._check_table(
            blob_table_offset, blob_table_size, BLOB_ENTRY_SIZE, device_table_end, "blob table"
        )
        self.blobs = self._parse_blob_table(blob_table_offset, blob_table_size // BLOB_ENTRY_SIZE)
        if len({device.tag for device in self.devices}) != len(self.devices):
            raise RafsError("RAFS v6: a blob appears twice in the device table")

        self._check_table(
            chunk_table_offset, chunk_table_size, CHUNK_INFO_SIZE, device_table_end, "chunk table"
        )
        self._chunk_table_offset = chunk_table_offset
        self._chunk_table_count: int = chunk_table_size // CHUNK_INFO_SIZE
        self._chunk_table: dict[tuple[int, int], int] | None = None
        # Legacy images may record a prefetch size with a zero offset: no table then.
        if prefetch_table_offset == 0:
            prefetch_table_size = 0
        self._check_table(
            prefetch_table_offset, prefetch_table_size, 4, device_table_end, "prefetch table"
        )
        self._prefetch = (
            buffer.u32_array(
                prefetch_table_offset, prefetch_table_size // 4, "RAFS v6 prefetch table"
            )
            if prefetch_table_size
            else ()
        )

        self._root_nid = superblock.root_nid
        # Every nid must address a full compact inode inside the bootstrap.
        self._nid_limit = (buffer.size - superblock.meta_offset) // erofs.INODE_SLOT_SIZE
        self._inodes: LruCache[int, erofs.DiskInode] = LruCache(INODE_CACHE_ENTRIES)
        self._parents: LruCache[int, int] = LruCache(INODE_CACHE_ENTRIES)
        self._blob_metas: dict[int, BlobMeta] = {}
        if not stat.S_ISDIR(self._inode(self._root_nid).mode):
            raise RafsError("RAFS v6: the root inode is not a directory")

    # -- superblock and tables --

    def _check_superblock(self, superblock: erofs.Superblock) -> None:
        if not superblock.feature_compat & FEATURE_COMPAT_RAFS_V6:
            raise RafsError("EROFS image without RAFS v6 metadata")
        if superblock.block_bits != erofs.BLOCK_BITS_4K:
            raise RafsError("RAFS v6: only 4 KiB blocks are supported (512 is tarfs mode)")
        if superblock.feature_incompat & ~_INCOMPAT_SUPPORTED:
            raise RafsError(f"RAFS v6: unsupported EROFS features {superblock.feature_incompat:#x}")
        if superblock.extra_slots:
            raise RafsError("RAFS v6: extended superblock slots are not supported")
        if superblock.extra_devices and (
            superblock.device_table_slot_offset * erofs.DEVICE_SLOT_SIZE != DEVICE_TABLE_OFFSET
        ):
            raise RafsError("RAFS v6: the device table is not where RAFS puts it")
        if superblock.meta_offset < DEVICE_TABLE_OFFSET:
            raise RafsError("RAFS v6: the metadata area overlaps the superblocks")

    def _check_table(self, offset: int, size: int, unit: int, header_end: int, what: str) -> None:
        if size == 0:
            return
        if size % unit:
            raise RafsError(f"RAFS v6: {what} size {size} is not a multiple of {unit}")
        if offset < header_end:
            raise RafsError(f"RAFS v6: {what} at {offset} overlaps the superblocks")
        self._buffer.check(offset, size, f"RAFS v6 {what}")

    def _parse_blob_table(self, offset: int, count: int) -> tuple[BlobInfo, ...]:
        blobs = []
        for index, fields in enumerate(
            self._buffer.iter_unpack(BLOB_ENTRY_LAYOUT, offset, count, "RAFS v6 blob table")
        ):
            (
                raw_id,
                blob_index,
                chunk_size,
                chunk_count,
                compressor_code,
                digester_code,
                features,
                compressed_size,
                uncompressed_size,
                toc_size,
                meta_compressor_code,
                meta_offset,
                meta_compressed_size,
                meta_uncompressed_size,
                toc_digest,
                _meta_digest,
                _meta_size,
                _cipher_iv,
                cipher_code,
            ) = fields
            where = f"RAFS v6 blob table entry {index}"
            blob_id = erofs.decode_id(raw_id, where)
            if blob_index != index:
                raise RafsError(f"{where}: records index {blob_index}")
            if chunk_size != self.chunk_size:
                raise RafsError(f"{where}: chunk size {chunk_size} != {self.chunk_size}")
            if chunk_count > MAX_CHUNKS_PER_BLOB:
                raise RafsError(f"{where}: {chunk_count} chunks")
            if cipher_code != 0:
                raise RafsError(f"{where}: encrypted blobs are not supported")
            if (
                compressed_size > MAX_BLOB_COMPRESSED_SIZE
                or uncompressed_size > MAX_BLOB_UNCOMPRESSED_SIZE
                or meta_compressed_size > meta_uncompressed_size
            ):
                raise RafsError(f"{where}: invalid sizes")
            check_blob_features(features, where)
            blobs.append(
                BlobInfo(
                    index=index,
                    blob_id=blob_id,
                    compressor=Compressor.from_code(compressor_code),
                    digester=Digester.from_code(digester_code),
                    chunk_size=chunk_size,
                    chunk_count=chunk_count,
                    compressed_size=compressed_size,
                    uncompressed_size=uncompressed_size,
                    features=features,
                    meta_compressor=Compressor.from_code(meta_compressor_code),
                    meta_offset=meta_offset,
                    meta_compressed_size=meta_compressed_size,
                    meta_uncompressed_size=meta_uncompressed_size,
                    toc_size=toc_size,
                    toc_digest=toc_digest,
                )
            )
        if len({blob.blob_id for blob in blobs}) != len(blobs):
            raise RafsError("RAFS v6: a blob id appears twice in the blob table")
        return tuple(blobs)

    def attach_blob_meta(self, blob_index: int, meta: BlobMeta) -> None:
        """Use a blob's own chunk info table (and digests) for chunks the bootstrap's chunk
        table does not describe (images built without one)."""
        if not 0 <= blob_index < len(self.blobs):
            raise RafsError(f"no blob {blob_index} in this image")
        blob = self.blobs[blob_index]
        if blob.chunk_count and meta.chunk_count != blob.chunk_count:
            raise RafsError(
                f"blob.meta of {blob.blob_id} has {meta.chunk_count} chunks, "
                f"the bootstrap says {blob.chunk_count}"
            )
        self._blob_metas[blob_index] = meta
        # Chunk lists resolved before may have failed or differ now: forget them.
        self._chunk_lists = LruCache(CHUNK_LIST_CACHE_ENTRIES)

    @property
    def has_chunk_table(self) -> bool:
        return bool(self._chunk_table_count)

    # -- inode numbers --

    def _ino_of(self, nid: int) -> int:
        ino = nid + 1
        if ino == self._root_nid + 1:
            return ROOT_INO
        if ino == ROOT_INO:
            return self._root_nid + 1
        return ino

    def _nid_of(self, ino: int) -> int:
        if ino == ROOT_INO:
            return self._root_nid
        if ino == self._root_nid + 1:
            return 0
        return ino - 1

    def _inode(self, nid: int) -> erofs.DiskInode:
        if not 0 <= nid < self._nid_limit:
            raise RafsError(f"RAFS v6: nid {nid} lies outside the metadata area")
        inode = self._inodes.get(nid)
        if inode is None:
            inode = erofs.parse_inode(self._buffer, self._superblock, nid)
            self._check_inode(inode)
            self._inodes.put(nid, inode)
        return inode

    def _check_inode(self, inode: erofs.DiskInode) -> None:
        where = f"RAFS v6 inode nid {inode.nid}"
        file_type = stat.S_IFMT(inode.mode)
        flat = inode.layout in (erofs.LAYOUT_FLAT_PLAIN, erofs.LAYOUT_FLAT_INLINE)
        if file_type == FileType.DIRECTORY and not flat:
            raise RafsError(f"{where}: a directory must have flat data")
        if file_type == FileType.SYMLINK and not (flat and 0 < inode.size <= MAX_SYMLINK_LENGTH):
            raise RafsError(f"{where}: invalid symlink (size {inode.size})")
        chunked = inode.layout == erofs.LAYOUT_CHUNK_BASED
        if file_type == FileType.REGULAR and not chunked and inode.size:
            raise RafsError(f"{where}: regular file data must be chunk-based")

    def _file_inode(self, ino: int, file_type: int) -> erofs.DiskInode:
        inode = self._inode(self._nid_of(ino))
        if stat.S_IFMT(inode.mode) != file_type:
            raise RafsError(f"inode {ino} is not of type {file_type:#o}")
        return inode

    # -- Filesystem --

    def _attributes(self, ino: int) -> Attributes:
        inode = self._inode(self._nid_of(ino))
        special = stat.S_ISCHR(inode.mode) or stat.S_ISBLK(inode.mode)
        return Attributes(
            ino=ino,
            mode=inode.mode,
            uid=inode.uid,
            gid=inode.gid,
            nlink=inode.nlink,
            size=inode.size,
            rdev=inode.union if special else 0,
            mtime=inode.mtime,
            mtime_nanoseconds=inode.mtime_nanoseconds,
        )

    def _directory(self, ino: int) -> list[DirectoryEntry]:
        inode = self._file_inode(ino, FileType.DIRECTORY)
        data = erofs.read_flat_data(self._buffer, inode, self._block_size)
        entries = []
        parent: int | None = None
        for name, nid, file_type in erofs.parse_directory(data, self._block_size, inode.nid):
            if not 0 <= nid < self._nid_limit:
                raise RafsError(f"directory {ino}: entry {name!r} has nid {nid} out of range")
            if name == b".":
                if nid != inode.nid:
                    raise RafsError(f"directory {ino}: '.' does not point to itself")
            elif name == b"..":
                parent = self._ino_of(nid)
            else:
                entries.append(DirectoryEntry(name, self._ino_of(nid), file_type))
        if parent is None:
            raise RafsError(f"directory {ino} has no '..' entry")
        self._parents.put(ino, parent)
        return entries

    def _parent(self, ino: int) -> int:
        parent = self._parents.get(ino)
        if parent is None:
            self._directory(ino)
            parent = self._parents.get(ino)
            assert parent is not None
        return parent

    def readlink(self, ino: int) -> bytes:
        inode = self._file_inode(ino, FileType.SYMLINK)
        target = erofs.read_flat_data(self._buffer, inode, self._block_size)
        if b"\0" in target:
            raise RafsError(f"inode {ino}: symlink target holds a NUL byte")
        return target

    def xattrs(self, ino: int) -> dict[bytes, bytes]:
        inode = self._inode(self._nid_of(ino))
        return xattr_mapping(erofs.parse_xattrs(self._buffer, self._superblock, inode), ino)

    def _chunk_list(self, ino: int) -> list[Chunk]:
        inode = self._file_inode(ino, FileType.REGULAR)
        return self._resolve_range(inode, 0, inode.size)

    def _chunks_between(self, ino: int, start: int, end: int) -> Sequence[Chunk]:
        inode = self._file_inode(ino, FileType.REGULAR)
        return self._resolve_range(inode, start, end)

    def _resolve_range(self, inode: erofs.DiskInode, start: int, end: int) -> list[Chunk]:
        """The chunks of `inode` overlapping `[start, end)` (holes left out).

        As nydusd does, the chunk index array is stepped through by the image's (RAFS) chunk
        size, one index per RAFS chunk, whatever chunk size the inode declares to the kernel
        (see `_declares_one_kernel_chunk`)."""
        if inode.layout != erofs.LAYOUT_CHUNK_BASED or end <= start:
            return []
        chunk_size = self.chunk_size
        one_kernel_chunk = self._declares_one_kernel_chunk(inode)
        total = -(-inode.size // chunk_size)
        checked_count(total, erofs.CHUNK_INDEX_SIZE, self._buffer.size, "chunk indexes")
        first = start // chunk_size
        last = min(total, -(-end // chunk_size))
        if last <= first:
            return []
        indexes = erofs.read_chunk_indexes(self._buffer, inode, first, last - first)
        if one_kernel_chunk and total > 1:
            base = (
                indexes[0] if first == 0 else erofs.read_chunk_indexes(self._buffer, inode, 0, 1)[0]
            )
            self._check_contiguous(inode, base, indexes, first)
        chunks = []
        for position, (device_id, chunk_index, block_address) in enumerate(indexes, first):
            if block_address == erofs.NULL_ADDRESS:
                continue
            file_offset = position * chunk_size
            expected_size = min(chunk_size, inode.size - file_offset)
            chunks.append(
                self._resolve_chunk(
                    device_id, chunk_index, block_address, file_offset, expected_size
                )
            )
        return chunks

    def _declares_one_kernel_chunk(self, inode: erofs.DiskInode) -> bool:
        """Whether the inode declares a chunk size other than the image's, which nydus-image
        does for a file larger than one chunk whose chunks follow each other in one blob: it
        declares the file size rounded up to a power of two, so that the kernel maps the file
        as one chunk (at the first index's block) while nydusd still reads one index per RAFS
        chunk. Any other chunk size would make the kernel and nydusd see different files."""
        declared = erofs.chunk_size_of(inode, self._superblock.block_bits)
        if declared == self.chunk_size:
            return False
        if declared < inode.size:
            raise RafsError(
                f"inode nid {inode.nid}: chunk size {declared} is neither the image's "
                f"{self.chunk_size} nor one chunk covering its {inode.size} bytes"
            )
        return True

    def _check_contiguous(
        self,
        inode: erofs.DiskInode,
        base: tuple[int, int, int],
        indexes: Sequence[tuple[int, int, int]],
        first: int,
    ) -> None:
        """For a file the kernel sees as one chunk: each RAFS chunk must sit right after the
        previous one in the same blob, else the kernel would read other bytes than nydusd."""
        base_device, _, base_block = base
        blocks_per_chunk = self.chunk_size // self._block_size
        for position, (device_id, _, block_address) in enumerate(indexes, first):
            if (
                block_address == erofs.NULL_ADDRESS
                or device_id != base_device
                or block_address != base_block + position * blocks_per_chunk
            ):
                declared = erofs.chunk_size_of(inode, self._superblock.block_bits)
                raise RafsError(
                    f"inode nid {inode.nid}: declares one {declared}-byte chunk but its RAFS "
                    f"chunk {position} does not follow chunk 0 in the same blob"
                )

    def _resolve_chunk(
        self,
        device_id: int,
        chunk_index: int,
        block_address: int,
        file_offset: int,
        expected_size: int,
    ) -> Chunk:
        if not 1 <= device_id <= len(self.blobs):
            raise RafsError(f"chunk index names device {device_id} of {len(self.blobs)}")
        blob_index = device_id - 1
        where = f"chunk {chunk_index} of blob {self.blobs[blob_index].blob_id}"
        table_offset = self._chunk_table_map().get((blob_index, chunk_index))
        if table_offset is not None:
            fields = self._buffer.unpack(CHUNK_INFO, table_offset, "RAFS v6 chunk table")
            record = parse_chunk_info(fields, self.blobs)
            chunk = chunk_from_record(record, file_offset)
        elif blob_index in self._blob_metas:
            meta = self._blob_metas[blob_index]
            info = meta.chunk(chunk_index)
            chunk = Chunk(
                blob_index=blob_index,
                chunk_index=chunk_index,
                file_offset=file_offset,
                compressed_offset=info.compressed_offset,
                compressed_size=info.compressed_size,
                uncompressed_offset=info.uncompressed_offset,
                uncompressed_size=info.uncompressed_size,
                compressed=info.compressed,
                digest=meta.digest(chunk_index),
            )
        else:
            raise RafsError(f"{where}: not in the chunk table and no blob.meta attached")
        if chunk.uncompressed_offset != block_address * self._block_size:
            raise RafsError(f"{where}: block address does not match its uncompressed offset")
        if chunk.uncompressed_size != expected_size:
            raise RafsError(
                f"{where}: {chunk.uncompressed_size} bytes where the file needs {expected_size}"
            )
        return chunk

    def _chunk_table_map(self) -> dict[tuple[int, int], int]:
        """(blob index, chunk index) -> offset of its record in the chunk table, built once."""
        if self._chunk_table is None:
            table: dict[tuple[int, int], int] = {}
            offset = self._chunk_table_offset
            for fields in self._buffer.iter_unpack(
                CHUNK_INFO, offset, self._chunk_table_count, "RAFS v6 chunk table"
            ):
                table.setdefault((fields[1], fields[8]), offset)
                offset += CHUNK_INFO_SIZE
            self._chunk_table = table
        return self._chunk_table

    def prefetch_inodes(self) -> tuple[int, ...]:
        inos = []
        for nid in self._prefetch:
            self._inode(nid)
            inos.append(self._ino_of(nid))
        return tuple(inos)
