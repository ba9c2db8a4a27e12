"""The RAFS data blob: chunk data followed by its own metadata.

A blob made by `nydus-image` 2.2 or newer is a sequence of sections, each followed by a 512-byte
tar header naming it (so the blob is also a valid tar stream read backwards):

    chunk data | image.blob hdr | blob.meta (chunk info table) + its 4 KiB header | hdr |
    blob.digest (32 bytes per chunk) | hdr | [image.boot (the bootstrap, inlined)] | hdr |
    ToC entries (128 bytes each) | rafs.blob.toc hdr

The ToC at the very end lists every section with its offset, sizes, compression and sha256. The
chunk info table may be stored compressed (nydus-image compresses it with the image's compressor
when that makes it smaller): its header and its ToC entry then both give the compressor and the
stored and plain sizes.
Older blobs carry only the chunk info table and its header at `BlobInfo.meta_offset`.

Owns parsing those trailing structures: the ToC, the `blob.meta` header and chunk info table (v1
16-byte and v2 24-byte entries), the `blob.digest` array, and extracting an inlined bootstrap.
Parsers take bytes; `read_blob_layout` drives them over any `RangeReader` (a local file here, the
piece store later). Does not interpret chunk data (`chunks.py`) or the bootstrap (`v5`/`v6`).
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import lz4.block  # type: ignore[import-untyped]
import zstandard

from d7y_node.errors import RafsError
from d7y_node.rafs.bounded import checked_count
from d7y_node.rafs.chunks import (
    DIGEST_SIZE,
    MAX_CHUNK_SIZE,
    Compressor,
    zstd_decompress_bounded,
)
from d7y_node.rafs.tree import BlobInfo, Filesystem

TAR_HEADER_SIZE = 512
TOC_ENTRY_SIZE = 128
# Without a size from the blob table, nydus looks for the ToC in the last 4 KiB of a blob.
TOC_PROBE_SIZE = 0x1000
META_HEADER_SIZE = 0x1000
META_MAGIC = 0xB10BB10B
CHUNK_INFO_V1_SIZE = 16
CHUNK_INFO_V2_SIZE = 24
# Nydus's RAFS_MAX_CHUNKS_PER_BLOB: a blob never has more chunks than this.
MAX_CHUNKS_PER_BLOB = 1 << 24
# The largest metadata section (bootstrap, chunk table) we agree to decompress. Bootstraps of
# images with a million files stay well below it; a lying size cannot make us allocate more.
MAX_METADATA_SIZE = 512 * 1024 * 1024

TOC_NAME = "rafs.blob.toc"
TOC_ENTRY_BLOB_DATA = "image.blob"
TOC_ENTRY_BOOTSTRAP = "image.boot"
TOC_ENTRY_META = "blob.meta"
TOC_ENTRY_META_HEADER = "blob.meta.header"
TOC_ENTRY_DIGEST = "blob.digest"


class BlobFeature:
    """`BlobFeatures` bits of nydus-storage (blob table entry and blob.meta header)."""

    ALIGNED = 0x0000_0001
    INLINED_FS_META = 0x0000_0002
    CHUNK_INFO_V2 = 0x0000_0004
    ZRAN = 0x0000_0008
    SEPARATE = 0x0000_0010
    INLINED_CHUNK_DIGEST = 0x0000_0020
    TARFS = 0x0000_0040
    BATCH = 0x0000_0080
    ENCRYPTED = 0x0000_0100
    IS_CHUNKDICT_GENERATED = 0x0000_0200
    IS_SEPARATED_WITH_PREFETCH_FILES = 0x0000_0400
    EXTERNAL = 0x0000_0800
    HAS_TAR_HEADER = 0x1000_0000
    HAS_TOC = 0x2000_0000
    CAP_TAR_TOC = 0x4000_0000
    V5_NO_EXT_BLOB_TABLE = 0x8000_0000

    # Features whose chunks this reader cannot serve (gzip random access, batched small
    # chunks, encryption, tar streams as blobs, data outside the blob).
    UNSUPPORTED = ZRAN | BATCH | ENCRYPTED | TARFS | EXTERNAL | SEPARATE
    KNOWN = (
        ALIGNED
        | INLINED_FS_META
        | CHUNK_INFO_V2
        | ZRAN
        | SEPARATE
        | INLINED_CHUNK_DIGEST
        | TARFS
        | BATCH
        | ENCRYPTED
        | IS_CHUNKDICT_GENERATED
        | IS_SEPARATED_WITH_PREFETCH_FILES
        | EXTERNAL
        | HAS_TAR_HEADER
        | HAS_TOC
        | CAP_TAR_TOC
    )


def check_blob_features(features: int, where: str) -> None:
    if features & ~BlobFeature.KNOWN:
        raise RafsError(f"{where}: unknown blob feature bits {features & ~BlobFeature.KNOWN:#x}")
    if features & BlobFeature.UNSUPPORTED:
        raise RafsError(
            f"{where}: unsupported blob features {features & BlobFeature.UNSUPPORTED:#x} "
            "(zran, batch, encrypted, tarfs, external or separate blobs)"
        )


# -- ToC --

TOC_ENTRY_LAYOUT = struct.Struct("<I4x16s32sQQQ48x")
TOC_COMPRESSION = {0x1: Compressor.NONE, 0x2: Compressor.ZSTD, 0x4: Compressor.LZ4_BLOCK}
_TOC_NAME_PATTERN = re.compile(rb"[A-Za-z0-9._-]{1,16}")


@dataclass(frozen=True, slots=True)
class TocEntry:
    """One section of a blob, as its ToC lists it."""

    name: str
    compressor: Compressor
    digest: bytes  # sha256 of the uncompressed section; all zero when not recorded
    compressed_offset: int
    compressed_size: int
    uncompressed_size: int


@dataclass(frozen=True, slots=True)
class BlobToc:
    """The ToC at a blob's end."""

    entries: tuple[TocEntry, ...]
    size: int  # bytes at the blob's end, tar header included
    digest: bytes  # sha256 of those bytes (what the blob table records)

    def entry(self, name: str) -> TocEntry | None:
        for entry in self.entries:
            if entry.name == name:
                return entry
        return None


def parse_tar_header(header: bytes, where: str) -> tuple[str, int]:
    """(name, size) of a 512-byte ustar/GNU header describing a regular file."""
    if len(header) != TAR_HEADER_SIZE:
        raise RafsError(f"{where}: a tar header needs {TAR_HEADER_SIZE} bytes")
    try:
        stored_checksum = int(header[148:156].strip(b" \0") or b"-1", 8)
    except ValueError:
        raise RafsError(f"{where}: tar header checksum is not octal") from None
    actual_checksum = sum(header[:148]) + 8 * ord(" ") + sum(header[156:])
    if stored_checksum != actual_checksum:
        raise RafsError(f"{where}: tar header checksum mismatch")
    if header[156:157] not in (b"0", b"\0"):
        raise RafsError(f"{where}: tar entry is not a regular file")
    raw_name = header[:100].split(b"\0", 1)[0]
    try:
        name = raw_name.decode("ascii")
        size = int(header[124:136].strip(b" \0") or b"0", 8)
    except (UnicodeDecodeError, ValueError):
        raise RafsError(f"{where}: tar header name or size is malformed") from None
    return name, size


def parse_toc(
    tail: bytes, blob_size: int, *, expected_digest: bytes | None = None
) -> BlobToc | None:
    """The ToC from the last bytes of a blob (`tail`, at least the ToC and its header).

    None when the blob ends in no ToC at all; `RafsError` when it ends in a broken one.
    """
    if len(tail) < TAR_HEADER_SIZE or len(tail) > blob_size:
        return None
    header = tail[-TAR_HEADER_SIZE:]
    if header[:100].split(b"\0", 1)[0] != TOC_NAME.encode():
        return None
    _name, entries_size = parse_tar_header(header, "blob ToC")
    if entries_size % TOC_ENTRY_SIZE or entries_size + TAR_HEADER_SIZE > len(tail):
        raise RafsError(f"blob ToC: invalid size {entries_size}")
    toc_bytes = tail[len(tail) - TAR_HEADER_SIZE - entries_size :]
    digest = hashlib.sha256(toc_bytes).digest()
    if expected_digest and any(expected_digest) and digest != expected_digest:
        raise RafsError("blob ToC: sha256 does not match the blob table")
    data_end = blob_size - len(toc_bytes)
    entries = []
    for (
        flags,
        raw_name,
        entry_digest,
        offset,
        compressed,
        uncompressed,
    ) in TOC_ENTRY_LAYOUT.iter_unpack(toc_bytes[:entries_size]):
        name_bytes = raw_name.rstrip(b"\0")
        if not _TOC_NAME_PATTERN.fullmatch(name_bytes):
            raise RafsError(f"blob ToC: invalid entry name {raw_name!r}")
        name = name_bytes.decode("ascii")
        compressor = TOC_COMPRESSION.get(flags)
        if compressor is None:
            raise RafsError(f"blob ToC: entry {name} has unknown flags {flags:#x}")
        # nydus records image.blob's offset as where the chunk data ends; the data itself
        # always starts at 0.
        start = 0 if name == TOC_ENTRY_BLOB_DATA else offset
        if start + compressed > data_end:
            raise RafsError(f"blob ToC: entry {name} lies outside the blob")
        # image.blob's "uncompressed size" is that of the chunk data, not of the section.
        if (
            compressor is Compressor.NONE
            and compressed != uncompressed
            and name != TOC_ENTRY_BLOB_DATA
        ):
            raise RafsError(f"blob ToC: uncompressed entry {name} has two sizes")
        entries.append(TocEntry(name, compressor, entry_digest, start, compressed, uncompressed))
    return BlobToc(tuple(entries), len(toc_bytes), digest)


def decompress_section(
    stored: bytes, compressor: Compressor, uncompressed_size: int, where: str
) -> bytes:
    """A metadata section (ToC entry, chunk info table) decompressed into at most
    `uncompressed_size` bytes; the caller checks the size it got."""
    if compressor is Compressor.NONE:
        return bytes(stored)
    if compressor is Compressor.ZSTD:
        try:
            return zstd_decompress_bounded(stored, uncompressed_size)
        except (zstandard.ZstdError, ValueError) as error:
            raise RafsError(f"{where}: zstd data is corrupt: {error}") from None
    if compressor is Compressor.LZ4_BLOCK:
        try:
            data: bytes = lz4.block.decompress(stored, uncompressed_size=uncompressed_size)
        except lz4.block.LZ4BlockError as error:
            raise RafsError(f"{where}: lz4_block data is corrupt: {error}") from None
        return data
    raise RafsError(f"{where}: {compressor.value} sections are not supported")


def extract_toc_entry(entry: TocEntry, stored: bytes) -> bytes:
    """The verified uncompressed content of a ToC section from its stored bytes."""
    where = f"blob section {entry.name}"
    if len(stored) != entry.compressed_size:
        raise RafsError(f"{where}: got {len(stored)} bytes, expected {entry.compressed_size}")
    if entry.uncompressed_size > MAX_METADATA_SIZE:
        raise RafsError(f"{where}: {entry.uncompressed_size} bytes is more than we accept")
    data = decompress_section(stored, entry.compressor, entry.uncompressed_size, where)
    if len(data) != entry.uncompressed_size:
        raise RafsError(f"{where}: decompresses to {len(data)}, expected {entry.uncompressed_size}")
    if any(entry.digest) and hashlib.sha256(data).digest() != entry.digest:
        raise RafsError(f"{where}: sha256 mismatch")
    return data


# -- blob.meta: the chunk info table --

META_HEADER_LAYOUT = struct.Struct("<IIIIQQQQQI")
META_MAGIC2_OFFSET = META_HEADER_SIZE - 4


@dataclass(frozen=True, slots=True)
class BlobMetaHeader:
    """The 4 KiB header that follows a blob's chunk info table."""

    features: int
    compressor: Compressor  # of the chunk info table itself
    entry_count: int
    table_offset: int
    table_compressed_size: int
    table_uncompressed_size: int


def parse_blob_meta_header(data: bytes) -> BlobMetaHeader:
    if len(data) != META_HEADER_SIZE:
        raise RafsError(f"blob.meta header: {len(data)} bytes, expected {META_HEADER_SIZE}")
    (
        magic,
        features,
        compressor_code,
        entry_count,
        table_offset,
        compressed_size,
        uncompressed_size,
        _zran_offset,
        _zran_size,
        _zran_count,
    ) = META_HEADER_LAYOUT.unpack_from(data, 0)
    (magic2,) = struct.unpack_from("<I", data, META_MAGIC2_OFFSET)
    if magic != META_MAGIC or magic2 != META_MAGIC:
        raise RafsError("blob.meta header: bad magic")
    check_blob_features(features, "blob.meta header")
    if not 0 < entry_count <= MAX_CHUNKS_PER_BLOB:
        raise RafsError(f"blob.meta header: invalid chunk count {entry_count}")
    entry_size = CHUNK_INFO_V2_SIZE if features & BlobFeature.CHUNK_INFO_V2 else CHUNK_INFO_V1_SIZE
    if uncompressed_size != entry_count * entry_size:
        raise RafsError(
            f"blob.meta header: table of {uncompressed_size} bytes for {entry_count} chunks"
        )
    return BlobMetaHeader(
        features=features,
        compressor=Compressor.from_code(compressor_code),
        entry_count=entry_count,
        table_offset=table_offset,
        table_compressed_size=compressed_size,
        table_uncompressed_size=uncompressed_size,
    )


@dataclass(frozen=True, slots=True)
class BlobChunkInfo:
    """Where one chunk is in its blob, from the blob's own chunk info table."""

    compressed_offset: int
    compressed_size: int
    uncompressed_offset: int
    uncompressed_size: int
    compressed: bool


# v1 (16 bytes): uncompressed info = size-1 low 20 bits at 44.., offset bits 12..43,
# size-1 high 4 bits at 8..11; compressed info = offset bits 0..39, size-1 high 4 bits at
# 40..43, size-1 low 20 bits at 44..
# v2 (24 bytes): uncompressed info = offset/4096 in bits 0..31, size-1 in 32..55, flags
# in 56..63; compressed info = offset bits 0..39, size in 40..63; then 8 bytes of data.
_V2_FLAG_COMPRESSED = 0x01
_V2_FLAG_ZRAN = 0x02
_V2_FLAG_BATCH = 0x04
_V2_FLAG_ENCRYPTED = 0x08
_V2_FLAG_HAS_CRC32 = 0x10
_V2_FLAGS_KNOWN = 0x1F


class BlobMeta:
    """A blob's chunk info table (and its chunk digests, when the blob carries them)."""

    def __init__(
        self,
        header: BlobMetaHeader,
        table: bytes,
        digests: bytes | None,
        *,
        compressed_limit: int = 0,
        uncompressed_limit: int = 0,
    ) -> None:
        self.header = header
        self.chunk_count = header.entry_count
        if len(table) != header.table_uncompressed_size:
            raise RafsError("blob.meta: table size does not match its header")
        if digests is not None and len(digests) != DIGEST_SIZE * self.chunk_count:
            raise RafsError(
                f"blob.digest: {len(digests)} bytes for {self.chunk_count} chunks, "
                f"expected {DIGEST_SIZE * self.chunk_count}"
            )
        self._table = table
        self._digests = digests
        self._v2 = bool(header.features & BlobFeature.CHUNK_INFO_V2)
        # Chunk ranges are checked against the blob's sizes when those are known (> 0).
        self._compressed_limit = compressed_limit
        self._uncompressed_limit = uncompressed_limit

    @property
    def has_digests(self) -> bool:
        return self._digests is not None

    def chunk(self, index: int) -> BlobChunkInfo:
        if not 0 <= index < self.chunk_count:
            raise RafsError(f"blob.meta: chunk {index} of {self.chunk_count} does not exist")
        info = self._chunk_v2(index) if self._v2 else self._chunk_v1(index)
        self._check(index, info)
        return info

    def digest(self, index: int) -> bytes | None:
        if self._digests is None:
            return None
        if not 0 <= index < self.chunk_count:
            raise RafsError(f"blob.digest: chunk {index} of {self.chunk_count} does not exist")
        return self._digests[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE]

    def _chunk_v1(self, index: int) -> BlobChunkInfo:
        uncompressed, compressed = struct.unpack_from("<QQ", self._table, index * 16)
        uncompressed_size = ((uncompressed >> 44) | ((uncompressed & 0xF00) << 12)) + 1
        compressed_size = ((compressed >> 44) | ((compressed >> 20) & 0xF0_0000)) + 1
        return BlobChunkInfo(
            compressed_offset=compressed & 0xFF_FFFF_FFFF,
            compressed_size=compressed_size,
            uncompressed_offset=uncompressed & 0xFFF_FFFF_F000,
            uncompressed_size=uncompressed_size,
            compressed=compressed_size != uncompressed_size,
        )

    def _chunk_v2(self, index: int) -> BlobChunkInfo:
        uncompressed, compressed, _data = struct.unpack_from("<QQQ", self._table, index * 24)
        flags = uncompressed >> 56
        if flags & (_V2_FLAG_ZRAN | _V2_FLAG_BATCH | _V2_FLAG_ENCRYPTED):
            raise RafsError(f"blob.meta: chunk {index} is zran, batched or encrypted")
        if flags & ~_V2_FLAGS_KNOWN:
            raise RafsError(f"blob.meta: chunk {index} has unknown flags {flags:#x}")
        return BlobChunkInfo(
            compressed_offset=compressed & 0xFF_FFFF_FFFF,
            compressed_size=compressed >> 40,
            uncompressed_offset=(uncompressed & 0xFFFF_FFFF) << 12,
            uncompressed_size=((uncompressed >> 32) & 0xFF_FFFF) + 1,
            compressed=bool(flags & _V2_FLAG_COMPRESSED),
        )

    def _check(self, index: int, info: BlobChunkInfo) -> None:
        if (
            info.compressed_size == 0
            or info.uncompressed_size > MAX_CHUNK_SIZE
            or (not info.compressed and info.compressed_size != info.uncompressed_size)
            or (
                self._compressed_limit
                and info.compressed_offset + info.compressed_size > self._compressed_limit
            )
            or (
                self._uncompressed_limit
                and info.uncompressed_offset + info.uncompressed_size > self._uncompressed_limit
            )
        ):
            raise RafsError(f"blob.meta: chunk {index} has an invalid range")


def load_blob_meta(
    header_bytes: bytes,
    stored_table: bytes,
    digests: bytes | None = None,
    blob: BlobInfo | None = None,
) -> BlobMeta:
    """A `BlobMeta` from the header, the table as stored in the blob (compressed when its
    header names a compressor) and the digests."""
    header = parse_blob_meta_header(header_bytes)
    if len(stored_table) != header.table_compressed_size:
        raise RafsError("blob.meta: stored table size does not match its header")
    # parse_blob_meta_header bounds the table's size (entries x entry size).
    table = decompress_section(
        stored_table, header.compressor, header.table_uncompressed_size, "blob.meta table"
    )
    return blob_meta_from_table(header, table, digests, blob)


def blob_meta_from_table(
    header: BlobMetaHeader,
    table: bytes,
    digests: bytes | None = None,
    blob: BlobInfo | None = None,
) -> BlobMeta:
    """A `BlobMeta` from the parsed header and the table already decompressed (as a ToC entry
    gives it), checked against the blob table entry when there is one."""
    if len(table) != header.table_uncompressed_size:
        raise RafsError("blob.meta: table decompresses to the wrong size")
    # nydus checks the same fields of the blob table against the header (validate_header).
    if blob is not None and (
        header.entry_count != blob.chunk_count
        or (
            blob.meta_compressed_size
            and (
                header.table_offset != blob.meta_offset
                or header.compressor is not blob.meta_compressor
                or header.table_compressed_size != blob.meta_compressed_size
                or header.table_uncompressed_size != blob.meta_uncompressed_size
            )
        )
    ):
        raise RafsError(f"blob.meta of blob {blob.blob_id} does not match the blob table")
    return BlobMeta(
        header,
        table,
        digests,
        compressed_limit=blob.compressed_size if blob else 0,
        uncompressed_limit=blob.uncompressed_size if blob else 0,
    )


def check_meta_toc_entry(entry: TocEntry, header: BlobMetaHeader) -> None:
    """The ToC's `blob.meta` entry and the blob.meta header describe the same stored table:
    nydus-image writes both from one compression of it."""
    if (
        entry.compressor is not header.compressor
        or entry.compressed_offset != header.table_offset
        or entry.compressed_size != header.table_compressed_size
        or entry.uncompressed_size != header.table_uncompressed_size
    ):
        raise RafsError(
            "blob.meta: the ToC and the blob.meta header disagree about the chunk info table "
            f"({entry.compressor.value} {entry.compressed_size}/{entry.uncompressed_size} bytes "
            f"at {entry.compressed_offset} vs {header.compressor.value} "
            f"{header.table_compressed_size}/{header.table_uncompressed_size} bytes "
            f"at {header.table_offset})"
        )


# -- reading a blob's trailing metadata --


class RangeReader(Protocol):
    """Random access to a blob's bytes."""

    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes:
        """Exactly `length` bytes at `offset` (the caller keeps within `size`)."""
        ...


class BytesReader:
    """A blob held in memory."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    @property
    def size(self) -> int:
        return len(self._data)

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > len(self._data):
            raise RafsError(f"blob read {offset}+{length} past its end ({len(self._data)})")
        return self._data[offset : offset + length]


class FileReader:
    """A blob in a local file, read with `pread` (no second copy in memory)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._size = os.fstat(self._fd).st_size

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise RafsError(f"blob read {offset}+{length} past its end ({self._size})")
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise RafsError(f"blob file shrank: read {len(data)} of {length} bytes")
        return data

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> FileReader:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class BlobLayout:
    """What a blob carries besides chunk data."""

    toc: BlobToc | None
    meta: BlobMeta | None
    bootstrap: bytes | None  # the inlined bootstrap (image.boot), verified


def read_toc(reader: RangeReader, blob: BlobInfo | None = None) -> BlobToc | None:
    """The blob's ToC: where the blob table says, else probed in the last 4 KiB."""
    size = reader.size
    if blob is not None and blob.toc_size:
        if blob.toc_size > size:
            raise RafsError(f"blob {blob.blob_id}: ToC of {blob.toc_size} bytes > blob size")
        tail = reader.read(size - blob.toc_size, blob.toc_size)
        toc = parse_toc(tail, size, expected_digest=blob.toc_digest)
        if toc is None:
            raise RafsError(f"blob {blob.blob_id}: no ToC where the blob table says")
        return toc
    probe = TOC_PROBE_SIZE if size > TOC_PROBE_SIZE else size // TOC_ENTRY_SIZE * TOC_ENTRY_SIZE
    if probe < TAR_HEADER_SIZE:
        return None
    return parse_toc(reader.read(size - probe, probe), size)


def read_toc_entry(reader: RangeReader, entry: TocEntry) -> bytes:
    return extract_toc_entry(entry, reader.read(entry.compressed_offset, entry.compressed_size))


def read_blob_layout(reader: RangeReader, blob: BlobInfo | None = None) -> BlobLayout:
    """The ToC, chunk info table, chunk digests and inlined bootstrap of a blob, verified."""
    toc = read_toc(reader, blob)
    meta_entry = toc.entry(TOC_ENTRY_META) if toc else None
    header_entry = toc.entry(TOC_ENTRY_META_HEADER) if toc else None
    digest_entry = toc.entry(TOC_ENTRY_DIGEST) if toc else None
    boot_entry = toc.entry(TOC_ENTRY_BOOTSTRAP) if toc else None

    digests = read_toc_entry(reader, digest_entry) if digest_entry else None
    meta: BlobMeta | None = None
    if meta_entry is not None and header_entry is not None:
        header = parse_blob_meta_header(read_toc_entry(reader, header_entry))
        check_meta_toc_entry(meta_entry, header)
        # The ToC entry decompresses the table and checks its sha256 (of the plain table).
        table = read_toc_entry(reader, meta_entry)
        meta = blob_meta_from_table(header, table, digests, blob)
    elif blob is not None and blob.meta_compressed_size:
        checked_count(blob.meta_compressed_size, 1, reader.size, "blob.meta size")
        end = blob.meta_offset + blob.meta_compressed_size + META_HEADER_SIZE
        if end > reader.size:
            raise RafsError(f"blob {blob.blob_id}: blob.meta lies past the blob's end")
        stored_table = reader.read(blob.meta_offset, blob.meta_compressed_size)
        header_bytes = reader.read(blob.meta_offset + blob.meta_compressed_size, META_HEADER_SIZE)
        meta = load_blob_meta(header_bytes, stored_table, digests, blob)
    bootstrap = read_toc_entry(reader, boot_entry) if boot_entry else None
    return BlobLayout(toc=toc, meta=meta, bootstrap=bootstrap)


def read_file_range(
    filesystem: Filesystem,
    ino: int,
    offset: int,
    length: int,
    readers: Sequence[RangeReader],
) -> bytes:
    """`length` bytes of file `ino` from `offset` (short at EOF), fetched synchronously from
    `readers[blob_index]` and verified chunk by chunk. For local blobs and tests; the FUSE
    mount does the same asynchronously through the task manager."""
    if len(readers) != len(filesystem.blobs):
        raise RafsError(f"{len(readers)} blob readers for {len(filesystem.blobs)} blobs")
    parts: list[bytes] = []
    for piece in filesystem.read_plan(ino, offset, length):
        if piece.chunk is None:
            parts.append(bytes(piece.length))
            continue
        chunk = piece.chunk
        reader = readers[chunk.blob_index]
        if chunk.compressed_offset + chunk.compressed_size > reader.size:
            raise RafsError(
                f"chunk {chunk.chunk_index} lies past the end of blob "
                f"{filesystem.blobs[chunk.blob_index].blob_id}"
            )
        stored = reader.read(chunk.compressed_offset, chunk.compressed_size)
        data = filesystem.decode_chunk(chunk, stored)
        parts.append(data[piece.offset : piece.offset + piece.length])
    return b"".join(parts)
