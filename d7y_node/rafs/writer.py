"""Writing RAFS v6: a bootstrap plus one data blob per layer, as `nydus-image create --fs-version 6`
lays them out, so that nydusd, our reader and (for uncompressed, block-aligned images) the Linux
kernel's EROFS driver all accept them.

Owns turning a `builder.Tree` into bytes: chunking, compression, chunk deduplication, the data blobs
with their trailer, and the bootstrap. Every on-disk structure is packed with the layouts the reader
parses (`erofs`, `v6`, `v5`, `blob`), so the reader stays the single description of the format.
Does not merge layers or resolve whiteouts (the converter does), nor upload anything. Blocking:
run `write_image` in a worker thread; it compresses chunks on a few threads of its own, and the
output does not depend on how many.

Data blobs. Regular files are cut into `chunk_size` chunks; a chunk is named by the digest of its
uncompressed bytes and stored once in the whole image: layers are processed in order, so a chunk
lives in the first layer's blob that has it and later layers refer to it. A chunk whose compressed
form is not smaller is stored as it is (flagged uncompressed). A blob holds its chunk data, then
(unless `blob_trailer` is off) the trailer nydus-image writes, each section followed by a 512-byte
GNU tar header naming it: `image.blob`, `blob.meta` (v1 chunk info table + 4 KiB header),
`blob.digest` (32 bytes per chunk), and the ToC (`rafs.blob.toc`). Each chunk has a 4 KiB aligned
place in the blob's uncompressed address space (nydus's aligned-chunk mode, always on for v6).

Block-aligned data (default with compressor `none`): each chunk is also *stored* at its
uncompressed offset and the chunk data is padded to whole blocks, so the blob is an EROFS block
device of its own. The bootstrap's chunk indexes name the blob as device `blob index + 1` and the
chunk's block in it, so `mount -t erofs -o device=<blob 0>,device=<blob 1>… bootstrap DIR` works.

Blob ids: the sha256 (hex) of the blob file exactly as written, trailer included, which is also its
OCI layer digest; the file is named by it. Blobs without any stored chunk (every chunk of the layer
was already in an earlier blob, or the layer has no file data) are not written and are not in the
blob table.

Bootstrap (all little-endian): EROFS superblock at 1024, RAFS extended superblock at 1152, device
table at 1408, blob table at the next block, prefetch table (u32 nids) right after it, then the
metadata area: its first block stays empty so that no inode has nid 0 (glibc skips d_ino 0), then
the inodes in nydus's order (a directory, its non-directory entries, then its subdirectories in
turn). Inodes are compact (32 bytes) unless a field does not fit: uid/gid/nlink > 65535, size >
4 GiB, or an mtime other than the build time, 0 (compact inodes carry no mtime; nydusd shows 0 for
them). Directory entries are sorted by name, packed into blocks; the last partial block of a
directory or symlink is stored inline after the inode when it fits in that block, full blocks go
after the metadata area. Then the chunk table (80-byte chunk info records, sorted by digest). The
bootstrap is a whole number of blocks and the same input always gives the same bytes.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import lz4.block  # type: ignore[import-untyped]
import zstandard

from d7y_node.errors import RafsError
from d7y_node.rafs import erofs
from d7y_node.rafs.blob import (
    CHUNK_INFO_V1_SIZE,
    MAX_CHUNKS_PER_BLOB,
    META_HEADER_LAYOUT,
    META_HEADER_SIZE,
    META_MAGIC,
    META_MAGIC2_OFFSET,
    TAR_HEADER_SIZE,
    TOC_COMPRESSION,
    TOC_ENTRY_BLOB_DATA,
    TOC_ENTRY_DIGEST,
    TOC_ENTRY_LAYOUT,
    TOC_ENTRY_META,
    TOC_ENTRY_META_HEADER,
    TOC_NAME,
    BlobFeature,
)
from d7y_node.rafs.builder import Inode, Tree
from d7y_node.rafs.chunks import DIGEST_SIZE, MAX_CHUNK_SIZE, Compressor, Digester, digest
from d7y_node.rafs.tree import MAX_NAME_LENGTH, MAX_SYMLINK_LENGTH, is_valid_name
from d7y_node.rafs.v5 import CHUNK_INFO, COMPRESSION_FLAGS, DIGEST_FLAGS, ChunkFlag, SuperFlag
from d7y_node.rafs.v6 import (
    BLOB_ENTRY_LAYOUT,
    DEVICE_TABLE_OFFSET,
    EXTENDED_SUPERBLOCK_LAYOUT,
    EXTENDED_SUPERBLOCK_OFFSET,
    FEATURE_COMPAT_RAFS_V6,
    MIN_CHUNK_SIZE,
)

BLOCK_BITS = erofs.BLOCK_BITS_4K
BLOCK_SIZE = 1 << BLOCK_BITS
DEFAULT_CHUNK_SIZE = 1024 * 1024  # nydus-image's default
# zstd's own default level: nydus-image's ratio at a speed that keeps conversion I/O bound.
ZSTD_LEVEL = 3
# nydus-image maps each blob into the EROFS block address space at a 512 KiB boundary after the
# bootstrap (`V6_BLOCK_SEG_ALIGNMENT`); only used by readers that address blobs without device ids.
DEVICE_MAPPING_ALIGNMENT = 512 * 1024
# A chunk index stores blob index + 1 in one byte, and nydus refuses index 255.
MAX_BLOBS = 254
# The chunk index keeps a blob's chunk number in 24 bits, and nydus stops one short of that.
MAX_CHUNKS_IN_BLOB = min(MAX_CHUNKS_PER_BLOB, 0xFF_FFFF) - 1
# Compact inodes hold 16-bit owners and link counts and a 32-bit size.
COMPACT_MAX_ID = 0xFFFF
COMPACT_MAX_SIZE = 0xFFFF_FFFF
U32_MAX = 0xFFFF_FFFF
U16_MAX = 0xFFFF
# The root's nid is a u16 in the superblock.
MAX_ROOT_NID = 0xFFFF
# Features of a blob written with the trailer, as nydus-image sets them with `blob-toc`.
TRAILER_FEATURES = (
    BlobFeature.ALIGNED
    | BlobFeature.INLINED_CHUNK_DIGEST
    | BlobFeature.HAS_TAR_HEADER
    | BlobFeature.HAS_TOC
    | BlobFeature.CAP_TAR_TOC
)
TOC_FLAGS_OF = {compressor: flag for flag, compressor in TOC_COMPRESSION.items()}
COMPRESSION_FLAG_OF = {compressor: flag for flag, compressor in COMPRESSION_FLAGS.items()}
DIGEST_FLAG_OF = {digester: flag for flag, digester in DIGEST_FLAGS.items()}
# Name prefixes of the xattr indexes nydus and the kernel use (lustre has no kernel handler).
XATTR_INDEX_OF_PREFIX = {
    prefix: index for index, prefix in erofs.XATTR_PREFIXES.items() if prefix != b"lustre."
}
XATTR_FULL_NAME_INDEXES = frozenset({2, 3})  # the POSIX ACL indexes name the whole attribute
MAX_XATTR_VALUE_SIZE = U16_MAX
# Bytes read from a file's content per chunk never exceed this (the largest chunk).
_READ_LIMIT = MAX_CHUNK_SIZE
# Compression threads by default: zstd runs at ~75 MB/s per core, so a few threads keep a
# conversion I/O bound without taking over a host that also serves containers.
DEFAULT_COMPRESSION_THREADS = min(4, os.cpu_count() or 1)
# Chunks compressed ahead of the blob writer per thread (bounds memory: 2 x 16 MiB each at most).
CHUNKS_IN_FLIGHT_PER_THREAD = 2


@dataclass(frozen=True, slots=True)
class WriterOptions:
    """How to write an image."""

    chunk_size: int = DEFAULT_CHUNK_SIZE
    compressor: Compressor = Compressor.ZSTD
    digester: Digester = Digester.BLAKE3
    # Write blob.meta, blob.digest and the ToC after the chunk data (what nydusd expects).
    blob_trailer: bool = True
    # Store chunks at their uncompressed offsets (kernel-mountable blobs); None: iff `none`.
    block_aligned: bool | None = None
    # Paths listed in the bootstrap's prefetch table, in this order.
    prefetch: tuple[bytes, ...] = ()
    # Threads compressing chunks (the output does not depend on it); 1 compresses inline.
    compression_threads: int = DEFAULT_COMPRESSION_THREADS

    def __post_init__(self) -> None:
        size = self.chunk_size
        if size & (size - 1) or not MIN_CHUNK_SIZE <= size <= MAX_CHUNK_SIZE:
            raise RafsError(
                f"chunk size {size} must be a power of two in {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}"
            )
        if self.compressor not in (Compressor.NONE, Compressor.LZ4_BLOCK, Compressor.ZSTD):
            raise RafsError(f"cannot write {self.compressor.value} chunks")
        if self.block_aligned and self.compressor is not Compressor.NONE:
            raise RafsError("block-aligned blobs need compressor none")
        if self.compression_threads < 1:
            raise RafsError("compression needs at least one thread")

    @property
    def aligned_data(self) -> bool:
        if self.block_aligned is None:
            return self.compressor is Compressor.NONE
        return self.block_aligned


@dataclass(frozen=True, slots=True)
class WrittenBlob:
    """One data blob as written."""

    blob_index: int  # in the bootstrap's blob table
    layer: int
    blob_id: str  # sha256 hex of the file, also its name
    path: Path
    size: int  # bytes in the file
    chunk_data_size: int  # bytes of chunk data at its start (the rest is the trailer)
    uncompressed_size: int  # the blob's uncompressed address space (4 KiB per chunk, rounded)
    chunk_count: int


@dataclass(frozen=True, slots=True)
class WrittenImage:
    """A written image: the bootstrap's bytes and the blobs in blob table order."""

    bootstrap: bytes
    blobs: tuple[WrittenBlob, ...]
    stored_chunks: int
    deduplicated_chunks: int  # chunk references served by a chunk stored before

    def blob_of_layer(self, layer: int) -> WrittenBlob | None:
        """The blob holding `layer`'s new chunks, None when it stored none."""
        for blob in self.blobs:
            if blob.layer == layer:
                return blob
        return None


def write_image(
    tree: Tree | Inode,
    blob_directory: str | os.PathLike[str],
    options: WriterOptions | None = None,
    *,
    progress: Callable[[int], None] | None = None,
) -> WrittenImage:
    """Write the data blobs of `tree` into `blob_directory` (named by their ids) and return them
    with the bootstrap. `progress` is called with the number of file bytes each step consumed."""
    options = options or WriterOptions()
    root = tree.root if isinstance(tree, Tree) else tree
    plan = _Plan(root, options)
    chunker = _Chunker(Path(blob_directory), options, progress)
    try:
        chunk_lists = chunker.store(plan.regular_files_by_layer())
    finally:
        chunker.close()
    bootstrap = _BootstrapLayout(plan, options, chunker, chunk_lists).render()
    return WrittenImage(
        bootstrap=bootstrap,
        blobs=tuple(chunker.written),
        stored_chunks=len(chunker.records),
        deduplicated_chunks=chunker.deduplicated,
    )


# -- the tree, checked and ordered --


class _Plan:
    """The unique inodes of the tree in layout order, with link counts and parents."""

    def __init__(self, root: Inode, options: WriterOptions) -> None:
        if not root.is_directory:
            raise RafsError("the root of an image must be a directory")
        self.root = root
        self.order: list[Inode] = []
        self.position: dict[int, int] = {}  # id(inode) -> index in order
        self.nlink: dict[int, int] = {}
        self.parent: dict[int, Inode] = {id(root): root}
        self.has_xattrs = False
        self._add(root, b"/")
        stack = [(root, b"/")]
        while stack:
            node, path = stack.pop()
            directories: list[tuple[Inode, bytes]] = []
            for name in sorted(node.children):
                child = node.children[name]
                child_path = path.rstrip(b"/") + b"/" + name
                _check_name(name, child_path)
                if child.is_directory:
                    self.parent[id(child)] = node
                    directories.append((child, child_path))
                elif id(child) in self.position:
                    self.nlink[id(child)] += 1
                else:
                    self._add(child, child_path)
            for child, child_path in directories:
                if id(child) in self.position:
                    raise RafsError(
                        f"{child_path!r}: a directory is reachable twice (hard link or cycle)"
                    )
                self._add(child, child_path)
            # Visit subdirectories in name order: the first one's subtree comes first.
            stack.extend(reversed(directories))
        for node in self.order:
            if node.is_directory:
                self.nlink[id(node)] = 2 + sum(c.is_directory for c in node.children.values())
            if self.nlink[id(node)] > U32_MAX:
                raise RafsError("an inode has more than 2^32 - 1 links")
        self.prefetch = self._prefetch(options.prefetch)

    def _add(self, node: Inode, path: bytes) -> None:
        _check_inode(node, path)
        self.position[id(node)] = len(self.order)
        self.order.append(node)
        self.nlink[id(node)] = 1
        self.has_xattrs = self.has_xattrs or bool(node.xattrs)

    def _prefetch(self, paths: Sequence[bytes]) -> list[Inode]:
        result: list[Inode] = []
        seen: set[int] = set()
        for path in paths:
            node = Tree(self.root).get(path)
            if node is None:
                raise RafsError(f"prefetch path {path!r} is not in the image")
            if id(node) not in seen:
                seen.add(id(node))
                result.append(node)
        return result

    def regular_files_by_layer(self) -> list[Inode]:
        files = [node for node in self.order if node.is_regular and node.content.size]
        return sorted(files, key=lambda node: (node.layer, self.position[id(node)]))


def _check_name(name: bytes, path: bytes) -> None:
    if not is_valid_name(name):
        raise RafsError(f"invalid file name {name[:300]!r} at {path[:300]!r}")


def _check_inode(node: Inode, path: bytes) -> None:
    where = f"{path[:300]!r}"
    if node.file_type not in erofs.DIRENT_CODE_OF:
        raise RafsError(f"{where}: unknown file type in mode {node.mode:#o}")
    if node.mode > U16_MAX:
        raise RafsError(f"{where}: mode {node.mode:#o} does not fit 16 bits")
    if not (0 <= node.uid <= U32_MAX and 0 <= node.gid <= U32_MAX):
        raise RafsError(f"{where}: uid/gid out of range")
    if not (0 <= node.mtime < 1 << 64 and 0 <= node.mtime_nanoseconds < 10**9):
        raise RafsError(f"{where}: invalid mtime")
    if node.is_symlink and not 0 < len(node.target) <= MAX_SYMLINK_LENGTH:
        raise RafsError(f"{where}: a symlink target must have 1..{MAX_SYMLINK_LENGTH} bytes")
    if node.is_symlink and b"\0" in node.target:
        raise RafsError(f"{where}: a symlink target may not hold a NUL byte")
    if not 0 <= node.rdev <= U32_MAX:
        raise RafsError(f"{where}: device number {node.rdev:#x} does not fit 32 bits")
    if node.is_regular and not (node.content.size >= 0 and node.layer >= 0):
        raise RafsError(f"{where}: invalid size or layer")
    if node.children and not node.is_directory:
        raise RafsError(f"{where}: only a directory may have entries")
    for name, value in node.xattrs.items():
        _xattr_index(name, where)
        if len(value) > MAX_XATTR_VALUE_SIZE:
            raise RafsError(f"{where}: xattr {name!r} value is larger than 64 KiB")


def _xattr_index(name: bytes, where: str) -> tuple[int, bytes]:
    """The EROFS name index and the stored suffix of the xattr `name`."""
    for prefix, index in XATTR_INDEX_OF_PREFIX.items():
        if name.startswith(prefix):
            suffix = name[len(prefix) :]
            if index in XATTR_FULL_NAME_INDEXES and suffix:
                continue
            if index not in XATTR_FULL_NAME_INDEXES and not suffix:
                break
            if len(suffix) > MAX_NAME_LENGTH:
                break
            return index, suffix
    raise RafsError(
        f"{where}: xattr {name[:300]!r} is not user.*, trusted.*, security.* or a POSIX ACL "
        "(the names EROFS can store)"
    )


# -- chunks and data blobs --


@dataclass(slots=True)
class _ChunkRecord:
    """One stored chunk."""

    digest: bytes
    blob_index: int
    index: int  # in its blob's chunk info table
    compressed_offset: int
    compressed_size: int
    uncompressed_offset: int
    uncompressed_size: int
    compressed: bool
    file_offset: int  # where it was first used (recorded in the chunk table as nydus does)


def compress_chunk(data: bytes, compressor: Compressor, zstd: zstandard.ZstdCompressor) -> bytes:
    """`data` compressed, or `data` itself when compressing does not make it smaller."""
    if compressor is Compressor.ZSTD:
        packed = zstd.compress(data)
    elif compressor is Compressor.LZ4_BLOCK:
        packed = lz4.block.compress(data, store_size=False)
    else:
        return data
    return packed if len(packed) < len(data) else data


class _HashingFile:
    """A blob file being written, with its sha256 and size kept up to date."""

    def __init__(self, directory: Path) -> None:
        descriptor, name = tempfile.mkstemp(prefix=".blob-", dir=directory)
        self.path = Path(name)
        self._file: BinaryIO = os.fdopen(descriptor, "wb")
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self._hash.update(data)
        self.size += len(data)

    def digest_with(self, suffix: bytes) -> bytes:
        """sha256 of everything written so far, followed by `suffix`."""
        state = self._hash.copy()
        state.update(suffix)
        return state.digest()

    def pad_to(self, offset: int) -> None:
        if offset > self.size:
            self.write(bytes(offset - self.size))

    def finish(self) -> str:
        self._file.close()
        return self._hash.hexdigest()

    def discard(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


@dataclass(slots=True)
class _OpenBlob:
    blob_index: int
    layer: int
    file: _HashingFile
    records: list[_ChunkRecord] = field(default_factory=list)
    uncompressed_size: int = 0
    # Chunks handed to the compressors, written in this order: (record, data, stored bytes).
    pending: deque[tuple[_ChunkRecord, bytes, Future[bytes]]] = field(default_factory=deque)


class _Chunker:
    """Cuts files into chunks, deduplicates them, and writes one blob per layer."""

    def __init__(
        self, directory: Path, options: WriterOptions, progress: Callable[[int], None] | None
    ) -> None:
        self._directory = directory
        self._options = options
        self._progress = progress
        threads = options.compression_threads if options.compressor is not Compressor.NONE else 1
        self._pool = ThreadPoolExecutor(threads, "rafs-compress") if threads > 1 else None
        self._in_flight = threads * CHUNKS_IN_FLIGHT_PER_THREAD
        # A zstd context may not be shared between threads: each compressing thread gets one.
        self._thread_state = threading.local()
        self._by_digest: dict[bytes, _ChunkRecord] = {}
        self._open: _OpenBlob | None = None
        self.records: list[_ChunkRecord] = []
        self.written: list[WrittenBlob] = []
        self.blob_features: list[int] = []
        self.blob_entries: list[bytes] = []  # packed blob table entries
        self.deduplicated = 0

    def store(self, files: list[Inode]) -> dict[int, list[_ChunkRecord]]:
        """Chunk every file (in layer order) and return each file's chunks by id(inode)."""
        chunk_lists: dict[int, list[_ChunkRecord]] = {}
        for node in files:
            if self._open is not None and self._open.layer != node.layer:
                self._finish()
            chunk_lists[id(node)] = list(self._file_chunks(node))
        self._finish()
        return chunk_lists

    def close(self) -> None:
        """Stop the compressors; remove a half-written blob after a failure."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
        if self._open is not None:
            self._open.file.discard()
            self._open = None

    def _file_chunks(self, node: Inode) -> Iterator[_ChunkRecord]:
        size = node.content.size
        chunk_size = self._options.chunk_size
        with node.content.open() as stream:
            for file_offset in range(0, size, chunk_size):
                length = min(chunk_size, size - file_offset)
                data = _read_exactly(stream, length)
                if self._progress is not None:
                    self._progress(length)
                chunk_digest = digest(data, self._options.digester)
                record = self._by_digest.get(chunk_digest)
                if record is None:
                    record = self._add_chunk(node.layer, data, chunk_digest, file_offset)
                else:
                    self.deduplicated += 1
                yield record
            if stream.read(1):
                raise RafsError(f"a file's content is longer than its size {size}")

    def _add_chunk(
        self, layer: int, data: bytes, chunk_digest: bytes, file_offset: int
    ) -> _ChunkRecord:
        blob = self._open
        if blob is None:
            if len(self.written) >= MAX_BLOBS:
                raise RafsError(f"an image may have at most {MAX_BLOBS} data blobs")
            self._directory.mkdir(parents=True, exist_ok=True)
            blob = self._open = _OpenBlob(len(self.written), layer, _HashingFile(self._directory))
        if len(blob.records) >= MAX_CHUNKS_IN_BLOB:
            raise RafsError(f"layer {layer} has more than {MAX_CHUNKS_IN_BLOB} chunks")
        # Where it is stored is known once the chunks before it are written (`_write_pending`).
        record = _ChunkRecord(
            digest=chunk_digest,
            blob_index=blob.blob_index,
            index=len(blob.records),
            compressed_offset=0,
            compressed_size=0,
            uncompressed_offset=blob.uncompressed_size,
            uncompressed_size=len(data),
            compressed=False,
            file_offset=file_offset,
        )
        blob.uncompressed_size += _round_up(len(data), BLOCK_SIZE)
        blob.records.append(record)
        self.records.append(record)
        self._by_digest[chunk_digest] = record
        if self._pool is None:
            stored: Future[bytes] = Future()
            stored.set_result(self._compress(data))
        else:
            stored = self._pool.submit(self._compress, data)
        blob.pending.append((record, data, stored))
        self._write_pending(blob, keep=self._in_flight)
        return record

    def _compress(self, data: bytes) -> bytes:
        zstd = getattr(self._thread_state, "zstd", None)
        if zstd is None:
            zstd = self._thread_state.zstd = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        return compress_chunk(data, self._options.compressor, zstd)

    def _write_pending(self, blob: _OpenBlob, keep: int) -> None:
        """Write compressed chunks in order until at most `keep` are still being compressed."""
        while len(blob.pending) > keep:
            record, data, future = blob.pending.popleft()
            stored = future.result()
            if self._options.aligned_data:
                blob.file.pad_to(record.uncompressed_offset)
            record.compressed_offset = blob.file.size
            record.compressed_size = len(stored)
            record.compressed = stored is not data
            blob.file.write(stored)

    def _finish(self) -> None:
        blob = self._open
        if blob is None:
            return
        options = self._options
        self._write_pending(blob, keep=0)
        if options.aligned_data:
            blob.file.pad_to(blob.uncompressed_size)
        data_size = blob.file.size
        meta_offset = toc_size = 0
        toc_digest = bytes(DIGEST_SIZE)
        features = BlobFeature.ALIGNED
        if options.blob_trailer:
            features = TRAILER_FEATURES
            meta_offset, toc_size, toc_digest = _write_trailer(blob, features, data_size)
        blob_id = blob.file.finish()
        path = self._directory / blob_id
        os.replace(blob.file.path, path)
        self._open = None
        table_size = len(blob.records) * CHUNK_INFO_V1_SIZE
        self.blob_entries.append(
            BLOB_ENTRY_LAYOUT.pack(
                blob_id.encode(),
                blob.blob_index,
                options.chunk_size,
                len(blob.records),
                options.compressor.code,
                options.digester.code,
                features,
                blob.file.size,
                blob.uncompressed_size,
                toc_size,
                Compressor.NONE.code,  # the chunk info table is stored as it is
                meta_offset,
                table_size if options.blob_trailer else 0,
                table_size if options.blob_trailer else 0,
                toc_digest,
                bytes(DIGEST_SIZE),  # blob meta digest: only for zran blobs
                0,  # blob meta size: only for zran blobs
                bytes(8),  # cipher iv
                0,  # cipher: none
            )
        )
        self.blob_features.append(features)
        self.written.append(
            WrittenBlob(
                blob_index=blob.blob_index,
                layer=blob.layer,
                blob_id=blob_id,
                path=path,
                size=blob.file.size,
                chunk_data_size=data_size,
                uncompressed_size=blob.uncompressed_size,
                chunk_count=len(blob.records),
            )
        )


def _read_exactly(stream: BinaryIO, length: int) -> bytes:
    parts: list[bytes] = []
    remaining = length
    while remaining:
        part = stream.read(min(remaining, _READ_LIMIT))
        if not part:
            raise RafsError(f"a file's content ended {remaining} bytes short of its size")
        parts.append(part)
        remaining -= len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _write_trailer(blob: _OpenBlob, features: int, data_size: int) -> tuple[int, int, bytes]:
    """blob.meta, blob.digest and the ToC after the chunk data, each behind its tar header.

    Returns (chunk info table offset, ToC size, ToC sha256)."""
    file = blob.file
    data_header = tar_header(TOC_ENTRY_BLOB_DATA, data_size)
    # nydus records the digest of the chunk data together with its tar header.
    data_digest = file.digest_with(data_header)
    file.write(data_header)

    # The chunk info table is stored uncompressed (ci_compressor none, which nydus-image also
    # writes when compressing does not help): readers then take it straight from the blob.
    table = b"".join(encode_chunk_info_v1(record) for record in blob.records)
    stored_table = table
    meta_compressor = Compressor.NONE
    meta_offset = file.size
    header = bytearray(META_HEADER_SIZE)
    META_HEADER_LAYOUT.pack_into(
        header,
        0,
        META_MAGIC,
        features,
        meta_compressor.code,
        len(blob.records),
        meta_offset,
        len(stored_table),
        len(table),
        0,
        0,
        0,
    )
    header[META_MAGIC2_OFFSET : META_MAGIC2_OFFSET + 4] = META_MAGIC.to_bytes(4, "little")
    file.write(stored_table)
    file.write(bytes(header))
    file.write(tar_header(TOC_ENTRY_META, len(stored_table) + META_HEADER_SIZE))

    digests = b"".join(record.digest for record in blob.records)
    digests_offset = file.size
    file.write(digests)
    file.write(tar_header(TOC_ENTRY_DIGEST, len(digests)))

    entries = [
        (TOC_ENTRY_BLOB_DATA, Compressor.NONE, data_digest, 0, data_size, blob.uncompressed_size),
        (
            TOC_ENTRY_META,
            meta_compressor,
            hashlib.sha256(table).digest(),
            meta_offset,
            len(stored_table),
            len(table),
        ),
        (
            TOC_ENTRY_META_HEADER,
            Compressor.NONE,
            hashlib.sha256(header).digest(),
            meta_offset + len(stored_table),
            META_HEADER_SIZE,
            META_HEADER_SIZE,
        ),
        (
            TOC_ENTRY_DIGEST,
            Compressor.NONE,
            hashlib.sha256(digests).digest(),
            digests_offset,
            len(digests),
            len(digests),
        ),
    ]
    toc = b"".join(
        TOC_ENTRY_LAYOUT.pack(TOC_FLAGS_OF[compressor], name.encode(), entry_digest, *sizes)
        for name, compressor, entry_digest, *sizes in entries
    )
    toc += tar_header(TOC_NAME, len(toc))
    file.write(toc)
    return meta_offset, len(toc), hashlib.sha256(toc).digest()


def tar_header(name: str, size: int) -> bytes:
    """The 512-byte GNU tar header nydus-image puts after each blob section (a regular file
    entry with only a name and a size, so the blob reads as a tar stream backwards)."""
    header = bytearray(TAR_HEADER_SIZE)
    encoded = name.encode()
    header[: len(encoded)] = encoded
    header[124:136] = b"%011o\0" % size  # size
    header[136:148] = b"%011o\0" % 0  # mtime
    header[148:156] = b" " * 8  # checksum field counts as spaces
    header[156:157] = b"0"  # regular file
    header[257:265] = b"ustar  \0"  # GNU magic and version
    header[148:156] = b"%07o\0" % sum(header)
    return bytes(header)


def encode_chunk_info_v1(record: _ChunkRecord) -> bytes:
    """A 16-byte v1 `blob.meta` entry: sizes minus one split into 20 low and 4 high bits."""
    uncompressed_size = record.uncompressed_size - 1
    compressed_size = record.compressed_size - 1
    uncompressed = (
        record.uncompressed_offset
        | (uncompressed_size & 0xF_FFFF) << 44
        | (uncompressed_size & 0xF0_0000) >> 12
    )
    compressed = (
        record.compressed_offset
        | (compressed_size & 0xF_FFFF) << 44
        | (compressed_size & 0xF0_0000) << 20
    )
    return uncompressed.to_bytes(8, "little") + compressed.to_bytes(8, "little")


def encode_chunk_index(blob_index: int, chunk_index: int, block_address: int) -> bytes:
    """An 8-byte EROFS chunk index as RAFS fills it: the kernel's device id is blob index + 1 in
    its low byte, and RAFS keeps the chunk's index in its blob in `advise` plus the high byte."""
    device_field = (blob_index + 1) | ((chunk_index >> 16) << 8)
    return erofs.CHUNK_INDEX_LAYOUT.pack(chunk_index & 0xFFFF, device_field, block_address)


# -- the bootstrap --


@dataclass(slots=True)
class _Placed:
    """Where one inode goes and what its on-disk form holds."""

    node: Inode
    ino: int
    extended: bool
    layout: int
    xattrs: bytes
    data: bytes = b""  # directory entries or symlink target (nids filled in later)
    offset: int = 0  # absolute position of the inode in the bootstrap
    data_block: int = 0  # first full data block (flat layouts)

    @property
    def header_size(self) -> int:
        inode_size = erofs.EXTENDED_INODE_SIZE if self.extended else erofs.COMPACT_INODE_SIZE
        return inode_size + len(self.xattrs)


class _BootstrapLayout:
    """Places every inode, directory block and table, then renders the bootstrap bytes."""

    def __init__(
        self,
        plan: _Plan,
        options: WriterOptions,
        chunker: _Chunker,
        chunk_lists: dict[int, list[_ChunkRecord]],
    ) -> None:
        self._plan = plan
        self._options = options
        self._chunker = chunker
        self._chunk_lists = chunk_lists
        blob_count = len(chunker.written)
        self._blob_table_offset = _round_up(
            DEVICE_TABLE_OFFSET + blob_count * erofs.DEVICE_SLOT_SIZE, BLOCK_SIZE
        )
        self._blob_table_size = blob_count * BLOB_ENTRY_LAYOUT.size
        self._prefetch_offset = self._blob_table_offset + self._blob_table_size
        # Like nydus-image, no prefetch table in an image without blobs: nothing to fetch.
        self._prefetch_size = 4 * len(plan.prefetch) if blob_count else 0
        self._meta_offset = _round_up(self._prefetch_offset + self._prefetch_size, BLOCK_SIZE)

    def render(self) -> bytes:
        placed = [self._describe(ino, node) for ino, node in enumerate(self._plan.order, 1)]
        by_id = {id(item.node): item for item in placed}
        meta_end = self._place_inodes(placed)
        next_block = meta_end // BLOCK_SIZE
        for item in placed:
            full = self._full_data_size(item)
            if full:
                item.data_block = next_block
                next_block += _round_up(full, BLOCK_SIZE) // BLOCK_SIZE
        chunk_table_offset = next_block * BLOCK_SIZE
        chunk_table = self._chunk_table()
        size = _round_up(chunk_table_offset + len(chunk_table), BLOCK_SIZE)
        image = bytearray(size)
        for item in placed:
            if item.node.is_directory:
                item.data = self._directory_data(item.node, by_id)
            self._render_inode(image, item)
        image[chunk_table_offset : chunk_table_offset + len(chunk_table)] = chunk_table
        self._render_tables(image, by_id, chunk_table_offset, len(chunk_table))
        return bytes(image)

    # -- inodes --

    def _describe(self, ino: int, node: Inode) -> _Placed:
        nlink = self._plan.nlink[id(node)]
        if node.is_directory:
            # Sizes only depend on names, so the real nids can come later.
            data = self._directory_data(node, None)
        elif node.is_symlink:
            data = node.target
        else:
            data = b""
        size = len(data) if (node.is_directory or node.is_symlink) else node.content.size
        extended = (
            node.uid > COMPACT_MAX_ID
            or node.gid > COMPACT_MAX_ID
            or nlink > COMPACT_MAX_ID
            or size > COMPACT_MAX_SIZE
            or node.mtime != 0
            or node.mtime_nanoseconds != 0
        )
        if ino > U32_MAX:
            raise RafsError("more than 2^32 - 1 inodes")
        item = _Placed(node, ino, extended, erofs.LAYOUT_FLAT_PLAIN, _xattr_body(node), data)
        if node.is_regular:
            item.layout = erofs.LAYOUT_CHUNK_BASED
        elif data:
            tail = len(data) % BLOCK_SIZE
            if tail and item.header_size + tail <= BLOCK_SIZE:
                item.layout = erofs.LAYOUT_FLAT_INLINE
        return item

    def _place_inodes(self, placed: list[_Placed]) -> int:
        """Give every inode its offset; the end of the metadata area (block aligned)."""
        # The first block of the metadata area stays empty: nid 0 would read as "no inode".
        cursor = self._meta_offset + BLOCK_SIZE
        for item in placed:
            footprint = item.header_size
            if item.layout == erofs.LAYOUT_FLAT_INLINE:
                footprint += len(item.data) % BLOCK_SIZE
                keep_together = footprint
            else:
                keep_together = min(footprint, BLOCK_SIZE)
            if item.layout == erofs.LAYOUT_CHUNK_BASED:
                count = len(self._chunk_lists.get(id(item.node), ()))
                footprint = _round_up(footprint, erofs.CHUNK_INDEX_SIZE)
                footprint += count * erofs.CHUNK_INDEX_SIZE
            # The inode with its xattrs (and inline tail) stays inside one block.
            if cursor % BLOCK_SIZE + keep_together > BLOCK_SIZE:
                cursor = _round_up(cursor, BLOCK_SIZE)
            item.offset = cursor
            cursor = _round_up(cursor + footprint, erofs.INODE_SLOT_SIZE)
        root_nid = self._nid(placed[0])
        if root_nid > MAX_ROOT_NID:
            raise RafsError("the root inode lies beyond what the superblock can address")
        return _round_up(cursor, BLOCK_SIZE)

    def _nid(self, item: _Placed) -> int:
        return (item.offset - self._meta_offset) // erofs.INODE_SLOT_SIZE

    @staticmethod
    def _full_data_size(item: _Placed) -> int:
        if item.layout == erofs.LAYOUT_FLAT_INLINE:
            return len(item.data) - len(item.data) % BLOCK_SIZE
        if item.layout == erofs.LAYOUT_FLAT_PLAIN:
            return len(item.data)
        return 0

    def _directory_data(self, node: Inode, by_id: dict[int, _Placed] | None) -> bytes:
        def nid_of(inode: Inode) -> int:
            return 0 if by_id is None else self._nid(by_id[id(inode)])

        directory_code = erofs.DIRENT_CODE_OF[stat.S_IFDIR]
        entries = [
            (b".", nid_of(node), directory_code),
            (b"..", nid_of(self._plan.parent[id(node)]), directory_code),
        ]
        entries.extend(
            (name, nid_of(child), erofs.DIRENT_CODE_OF[child.file_type])
            for name, child in node.children.items()
        )
        entries.sort()
        return pack_directory(entries)

    def _render_inode(self, image: bytearray, item: _Placed) -> None:
        node = item.node
        nlink = self._plan.nlink[id(node)]
        if node.is_regular:
            union = erofs.CHUNK_FORMAT_INDEXES | (
                self._options.chunk_size.bit_length() - 1 - BLOCK_BITS
            )
            size = node.content.size
        elif node.is_directory or node.is_symlink:
            union = item.data_block
            size = len(item.data)
        elif node.file_type in (stat.S_IFCHR, stat.S_IFBLK):
            union, size = node.rdev, 0
        else:
            union, size = 0, 0
        xattr_count = (
            0
            if not item.xattrs
            else 1 + (len(item.xattrs) - erofs.XATTR_IBODY_HEADER_SIZE) // erofs.XATTR_ENTRY_SIZE
        )
        if xattr_count > U16_MAX:
            raise RafsError("extended attributes of one inode exceed 256 KiB")
        layout_bits = item.layout << erofs.FORMAT_LAYOUT_SHIFT
        if item.extended:
            raw = erofs.EXTENDED_INODE_LAYOUT.pack(
                erofs.FORMAT_EXTENDED_BIT | layout_bits,
                xattr_count,
                node.mode,
                0,
                size,
                union,
                item.ino,
                node.uid,
                node.gid,
                node.mtime,
                node.mtime_nanoseconds,
                nlink,
            )
        else:
            raw = erofs.COMPACT_INODE_LAYOUT.pack(
                layout_bits,
                xattr_count,
                node.mode,
                nlink,
                size,
                0,
                union,
                item.ino,
                node.uid,
                node.gid,
                0,
            )
        body = raw + item.xattrs
        if item.layout == erofs.LAYOUT_CHUNK_BASED:
            body += bytes(-len(body) % erofs.CHUNK_INDEX_SIZE)
            body += b"".join(
                encode_chunk_index(r.blob_index, r.index, r.uncompressed_offset // BLOCK_SIZE)
                for r in self._chunk_lists.get(id(node), ())
            )
        elif item.layout == erofs.LAYOUT_FLAT_INLINE:
            body += item.data[len(item.data) - len(item.data) % BLOCK_SIZE :]
        image[item.offset : item.offset + len(body)] = body
        full = self._full_data_size(item)
        if full:
            start = item.data_block * BLOCK_SIZE
            image[start : start + full] = item.data[:full]

    # -- tables --

    def _chunk_table(self) -> bytes:
        records = sorted(self._chunker.records, key=lambda r: (r.digest, r.blob_index))
        return b"".join(
            CHUNK_INFO.pack(
                r.digest,
                r.blob_index,
                ChunkFlag.COMPRESSED if r.compressed else 0,
                r.compressed_size,
                r.uncompressed_size,
                r.compressed_offset,
                r.uncompressed_offset,
                r.file_offset,
                r.index,
                0,
            )
            for r in records
        )

    def _render_tables(
        self,
        image: bytearray,
        by_id: dict[int, _Placed],
        chunk_table_offset: int,
        chunk_table_size: int,
    ) -> None:
        options = self._options
        chunker = self._chunker
        # Device table: each blob's uncompressed space as blocks, mapped after the bootstrap.
        position = len(image)
        total_blocks = 0
        for index, blob in enumerate(chunker.written):
            blocks = blob.uncompressed_size // BLOCK_SIZE
            mapped = _round_up(position, DEVICE_MAPPING_ALIGNMENT) // BLOCK_SIZE
            position = (mapped + blocks) * BLOCK_SIZE
            total_blocks += blocks
            if total_blocks > U32_MAX or mapped + blocks > U32_MAX:
                raise RafsError("the blobs hold more than 2^32 blocks")
            erofs.DEVICE_SLOT_LAYOUT.pack_into(
                image,
                DEVICE_TABLE_OFFSET + index * erofs.DEVICE_SLOT_SIZE,
                blob.blob_id.encode(),
                blocks,
                mapped,
            )
        for index, entry in enumerate(chunker.blob_entries):
            start = self._blob_table_offset + index * BLOB_ENTRY_LAYOUT.size
            image[start : start + len(entry)] = entry
        prefetch_offset = 0
        if self._prefetch_size:
            prefetch_offset = self._prefetch_offset
            nids = [self._nid(by_id[id(node)]) for node in self._plan.prefetch]
            for position_in_table, nid in enumerate(nids):
                if nid > U32_MAX:
                    raise RafsError("a prefetched inode lies beyond a 32-bit nid")
                start = prefetch_offset + 4 * position_in_table
                image[start : start + 4] = nid.to_bytes(4, "little")

        flags = (
            COMPRESSION_FLAG_OF[options.compressor]
            | DIGEST_FLAG_OF[options.digester]
            | SuperFlag.EXPLICIT_UID_GID
        )
        if self._plan.has_xattrs:
            flags |= SuperFlag.HAS_XATTR
        if options.blob_trailer:
            flags |= SuperFlag.INLINED_CHUNK_DIGEST
        EXTENDED_SUPERBLOCK_LAYOUT.pack_into(
            image,
            EXTENDED_SUPERBLOCK_OFFSET,
            flags,
            self._blob_table_offset,
            self._blob_table_size,
            options.chunk_size,
            chunk_table_offset if chunk_table_size else 0,
            chunk_table_size,
            prefetch_offset,
            self._prefetch_size,
        )
        root = by_id[id(self._plan.root)]
        erofs.SUPERBLOCK_LAYOUT.pack_into(
            image,
            erofs.SUPERBLOCK_OFFSET,
            erofs.MAGIC,
            0,  # no superblock checksum
            FEATURE_COMPAT_RAFS_V6,
            BLOCK_BITS,
            0,  # no extra superblock slots
            self._nid(root),
            len(self._plan.order),
            0,  # build time: compact inodes show it as their mtime
            0,
            total_blocks,
            self._meta_offset // BLOCK_SIZE,
            0,  # no shared xattrs
            bytes(16),  # uuid
            bytes(16),  # volume name
            erofs.FEATURE_INCOMPAT_CHUNKED_FILE | erofs.FEATURE_INCOMPAT_DEVICE_TABLE,
            0,
            len(chunker.written),
            DEVICE_TABLE_OFFSET // erofs.DEVICE_SLOT_SIZE,
        )


def _xattr_body(node: Inode) -> bytes:
    """The inline xattr area: the 12-byte ibody header, then 4-byte aligned entries by name."""
    if not node.xattrs:
        return b""
    body = bytearray(erofs.XATTR_HEADER_LAYOUT.pack(0, 0))
    for name in sorted(node.xattrs):
        value = node.xattrs[name]
        index, suffix = _xattr_index(name, "xattr")
        body += erofs.XATTR_ENTRY_LAYOUT.pack(len(suffix), index, len(value)) + suffix + value
        body += bytes(-len(body) % erofs.XATTR_ENTRY_SIZE)
    return bytes(body)


def pack_directory(entries: Sequence[tuple[bytes, int, int]]) -> bytes:
    """Sorted (name, nid, file type code) entries as EROFS directory data: each block holds its
    dirents then their names; a full block is zero padded, the last one is not."""
    blocks: list[bytes] = []
    current: list[tuple[bytes, int, int]] = []
    used = 0

    def flush() -> None:
        head = erofs.DIRENT_SIZE * len(current)
        dirents = bytearray()
        names = bytearray()
        for name, nid, file_type in current:
            dirents += erofs.DIRENT_LAYOUT.pack(nid, head + len(names), file_type)
            names += name
        blocks.append(bytes(dirents + names))

    for entry in entries:
        length = erofs.DIRENT_SIZE + len(entry[0])
        if current and used + length > BLOCK_SIZE:
            flush()
            current, used = [], 0
        current.append(entry)
        used += length
    flush()
    padded = [block + bytes(BLOCK_SIZE - len(block)) for block in blocks[:-1]]
    return b"".join([*padded, blocks[-1]])


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "WriterOptions",
    "WrittenBlob",
    "WrittenImage",
    "write_image",
]
