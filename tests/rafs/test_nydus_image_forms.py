"""Forms real `nydus-image` output takes that our writer does not produce, made by patching images
our writer wrote the way nydus-image would have written them:

- a regular file whose chunks sit contiguously in one blob declares one big EROFS chunk in its
  inode (`inode.size().next_power_of_two()`, nydus `builder/src/core/v6.rs`, `v6_dump_file`) so
  the kernel sees a single chunk, while its chunk index array keeps one entry per RAFS chunk;
- a blob whose chunk info table (`blob.meta`) is compressed: nydus-image compresses it with the
  image's compressor and keeps the result when it is smaller (`builder/src/core/blob.rs`,
  `dump_meta_data`); the blob.meta header and the ToC entry then give the compressed size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import struct
from pathlib import Path

import lz4.block  # type: ignore[import-untyped]
import pytest
import zstandard

from d7y_node.errors import RafsError
from d7y_node.rafs import (
    BytesReader,
    Compressor,
    FileReader,
    RafsV6Filesystem,
    erofs,
    open_bootstrap,
    read_blob_layout,
)
from d7y_node.rafs.blob import (
    META_HEADER_SIZE,
    TAR_HEADER_SIZE,
    TOC_ENTRY_BLOB_DATA,
    TOC_ENTRY_DIGEST,
    TOC_ENTRY_META,
    TOC_ENTRY_META_HEADER,
    TOC_ENTRY_SIZE,
    TOC_NAME,
    BlobMeta,
    TocEntry,
    load_blob_meta,
    read_file_range,
    read_toc,
)
from d7y_node.rafs.bounded import BoundedBuffer
from d7y_node.rafs.builder import Inode, Tree, directory, regular_file
from d7y_node.rafs.writer import WriterOptions, WrittenImage, tar_header, write_image
from tests.rafs.test_kernel_erofs import erofs_available
from tests.rafs.test_v6 import lookup_path
from tests.rafs.test_writer import kernel_mount

MIB = 1 << 20
# i_u (the chunk format of a chunk-based inode) sits at byte 16 of compact and extended inodes.
INODE_UNION_OFFSET = 16
# The RAFS extended superblock's chunk table size field (`<QQIIQ` before it).
CHUNK_TABLE_SIZE_OFFSET = 1152 + 32
# blob.meta header fields: compressor code (u32 at 8) and the table's stored size (u64 at 24).
META_COMPRESSOR_OFFSET = 8
META_COMPRESSED_SIZE_OFFSET = 24
TOC_FLAG_OF = {Compressor.NONE: 0x1, Compressor.ZSTD: 0x2, Compressor.LZ4_BLOCK: 0x4}


# -- one big EROFS chunk per contiguous file --


def regular_inodes(filesystem: RafsV6Filesystem, bootstrap: bytes) -> dict[bytes, erofs.DiskInode]:
    buffer = BoundedBuffer(bootstrap, "bootstrap")
    superblock = erofs.parse_superblock(buffer)
    return {
        path: erofs.parse_inode(buffer, superblock, filesystem._nid_of(attributes.ino))
        for path, attributes in filesystem.walk()
        if attributes.is_regular
    }


def declare_chunks_as_nydus_image(bootstrap: bytes) -> tuple[bytes, set[bytes]]:
    """The bootstrap with each regular file's chunk format set as nydus-image sets it: when
    the file is larger than one chunk and each chunk follows the previous one in the same
    blob's uncompressed space, one chunk of the file size rounded up to a power of two.
    Returns the patched bootstrap and the paths patched."""
    filesystem = open_bootstrap(bootstrap)
    assert isinstance(filesystem, RafsV6Filesystem)
    chunk_size = filesystem.chunk_size
    patched = bytearray(bootstrap)
    paths = set()
    for path, inode in regular_inodes(filesystem, bootstrap).items():
        chunks = filesystem.chunks(lookup_path(filesystem, path))
        contiguous = all(
            after.blob_index == before.blob_index
            and after.uncompressed_offset == before.uncompressed_offset + chunk_size
            for before, after in itertools.pairwise(chunks)
        )
        if not (contiguous and inode.size > chunk_size):
            continue
        big_chunk = 1 << (inode.size - 1).bit_length()
        chunk_bits = big_chunk.bit_length() - 1 - erofs.BLOCK_BITS_4K
        struct.pack_into(
            "<I",
            patched,
            inode.offset + INODE_UNION_OFFSET,
            erofs.CHUNK_FORMAT_INDEXES | chunk_bits,
        )
        paths.add(path)
    return bytes(patched), paths


def set_chunk_format(bootstrap: bytes, path: bytes, chunk_size: int) -> bytes:
    filesystem = open_bootstrap(bootstrap)
    assert isinstance(filesystem, RafsV6Filesystem)
    inode = regular_inodes(filesystem, bootstrap)[path]
    patched = bytearray(bootstrap)
    chunk_bits = chunk_size.bit_length() - 1 - erofs.BLOCK_BITS_4K
    struct.pack_into(
        "<I", patched, inode.offset + INODE_UNION_OFFSET, erofs.CHUNK_FORMAT_INDEXES | chunk_bits
    )
    return bytes(patched)


def contiguous_files_tree() -> tuple[Inode, dict[bytes, bytes]]:
    big = os.urandom(3 * MIB + 5)
    contents = {
        b"/big": big,
        b"/exact": os.urandom(2 * MIB),
        b"/large": os.urandom(9 * MIB + 4097),
        b"/small": b"small file\n",
        # Its first chunk is big's second one (deduplicated), its second chunk is new: the two
        # do not follow each other, so it keeps the RAFS chunk size.
        b"/reuses": big[MIB : 2 * MIB] + os.urandom(MIB // 2),
    }
    root = directory({path[1:]: regular_file(data) for path, data in contents.items()})
    return root, contents


def read_all(filesystem: RafsV6Filesystem, image: WrittenImage, path: bytes) -> bytes:
    ino = lookup_path(filesystem, path)
    size = filesystem.getattr(ino).size
    with FileReader(image.blobs[0].path) as reader:
        return read_file_range(filesystem, ino, 0, size, [reader])


@pytest.mark.parametrize("compressor", [Compressor.ZSTD, Compressor.NONE])
def test_files_declaring_one_big_erofs_chunk_read_by_rafs_chunks(
    tmp_path: Path, compressor: Compressor
) -> None:
    root, contents = contiguous_files_tree()
    image = write_image(Tree(root), tmp_path, WriterOptions(compressor=compressor))
    bootstrap, patched = declare_chunks_as_nydus_image(image.bootstrap)
    assert patched == {b"/big", b"/exact", b"/large"}
    filesystem = open_bootstrap(bootstrap)
    assert isinstance(filesystem, RafsV6Filesystem)
    declared = {
        path: erofs.chunk_size_of(inode, erofs.BLOCK_BITS_4K)
        for path, inode in regular_inodes(filesystem, bootstrap).items()
    }
    assert declared[b"/big"] == 4 * MIB and declared[b"/exact"] == 2 * MIB
    assert declared[b"/large"] == 16 * MIB and declared[b"/reuses"] == MIB

    for path, data in contents.items():
        assert read_all(filesystem, image, path) == data, path
    big = lookup_path(filesystem, b"/big")
    # One chunk per RAFS chunk (the superblock's 1 MiB), as nydusd steps through the indexes.
    chunks = filesystem.chunks(big)
    assert [chunk.file_offset for chunk in chunks] == [0, MIB, 2 * MIB, 3 * MIB]
    assert [chunk.uncompressed_size for chunk in chunks] == [MIB, MIB, MIB, 5]
    with FileReader(image.blobs[0].path) as reader:
        middle = read_file_range(filesystem, big, MIB - 3, MIB + 6, [reader])
        tail = read_file_range(filesystem, big, 3 * MIB, 100, [reader])
    assert middle == contents[b"/big"][MIB - 3 : 2 * MIB + 3]
    assert tail == contents[b"/big"][3 * MIB :]


def test_a_big_chunk_whose_rafs_chunks_do_not_follow_each_other_is_refused(
    tmp_path: Path,
) -> None:
    root, _ = contiguous_files_tree()
    image = write_image(Tree(root), tmp_path)
    # The kernel would read reuses' 1.5 MiB from its first chunk's place on: not its content.
    bootstrap = set_chunk_format(image.bootstrap, b"/reuses", 2 * MIB)
    filesystem = open_bootstrap(bootstrap)
    assert isinstance(filesystem, RafsV6Filesystem)
    reuses = lookup_path(filesystem, b"/reuses")
    with pytest.raises(RafsError, match="one 2097152-byte chunk"):
        filesystem.chunks(reuses)
    with pytest.raises(RafsError, match="one 2097152-byte chunk"):
        filesystem.read_plan(reuses, MIB, 10)


def test_a_chunk_size_that_is_neither_rafs_nor_the_whole_file_is_refused(
    tmp_path: Path,
) -> None:
    root, contents = contiguous_files_tree()
    image = write_image(Tree(root), tmp_path)
    # 2 MiB chunks for a 3 MiB file: the kernel would step by 2 MiB, nydusd by 1 MiB.
    bootstrap = set_chunk_format(image.bootstrap, b"/big", 2 * MIB)
    filesystem = open_bootstrap(bootstrap)
    assert isinstance(filesystem, RafsV6Filesystem)
    with pytest.raises(RafsError, match="chunk size 2097152"):
        filesystem.chunks(lookup_path(filesystem, b"/big"))
    # A small file may declare any chunk that covers it: both views see one chunk.
    bootstrap = set_chunk_format(image.bootstrap, b"/small", 4096)
    filesystem = open_bootstrap(bootstrap)
    assert isinstance(filesystem, RafsV6Filesystem)
    assert read_all(filesystem, image, b"/small") == contents[b"/small"]


@pytest.mark.integration
def test_kernel_reads_files_declaring_one_big_chunk(tmp_path: Path) -> None:
    if not erofs_available():
        pytest.skip("needs root, losetup and EROFS support in the kernel")
    root, contents = contiguous_files_tree()
    image = write_image(Tree(root), tmp_path / "blobs", WriterOptions(compressor=Compressor.NONE))
    bootstrap, patched = declare_chunks_as_nydus_image(image.bootstrap)
    assert patched == {b"/big", b"/exact", b"/large"}
    with kernel_mount(dataclasses.replace(image, bootstrap=bootstrap), tmp_path) as mountpoint:
        kernel = {path: (mountpoint / path[1:].decode()).read_bytes() for path in contents}
    filesystem = open_bootstrap(bootstrap)
    assert isinstance(filesystem, RafsV6Filesystem)
    for path, data in contents.items():
        assert kernel[path] == data, path
        assert read_all(filesystem, image, path) == data, path


# -- compressed blob.meta --


def many_chunks_tree() -> Inode:
    """Enough distinct chunks that their chunk info table compresses (offsets grow steadily)."""
    return directory(
        {b"file-%03d" % index: regular_file(os.urandom(6000)) for index in range(300)}
        | {b"big": regular_file(os.urandom(2 * MIB + 1))}
    )


def compress_table(table: bytes, compressor: Compressor) -> bytes:
    if compressor is Compressor.ZSTD:
        return zstandard.ZstdCompressor().compress(table)
    assert compressor is Compressor.LZ4_BLOCK
    packed: bytes = lz4.block.compress(table, store_size=False)
    return packed


def toc_record(entry: TocEntry) -> bytes:
    return struct.pack(
        "<I4x16s32sQQQ48x",
        TOC_FLAG_OF[entry.compressor],
        entry.name.encode(),
        entry.digest,
        entry.compressed_offset,
        entry.compressed_size,
        entry.uncompressed_size,
    )


def with_compressed_blob_meta(
    blob: bytes, compressor: Compressor, *, header_compressor: Compressor | None = None
) -> tuple[bytes, int, int]:
    """The blob rewritten as nydus-image writes it when compressing the chunk info table pays:
    the table stored compressed, its header naming the compressor (`header_compressor` when
    given, to make it lie) and stored size, the ToC's `blob.meta` entry flagged with the
    compressor (its digest stays that of the plain table). Returns the blob, the table's offset
    and its stored size."""
    toc = read_toc(BytesReader(blob))
    assert toc is not None
    meta_entry, header_entry = toc.entry(TOC_ENTRY_META), toc.entry(TOC_ENTRY_META_HEADER)
    digest_entry = toc.entry(TOC_ENTRY_DIGEST)
    assert meta_entry and header_entry and digest_entry
    assert meta_entry.compressor is Compressor.NONE
    offset = meta_entry.compressed_offset
    table = blob[offset : offset + meta_entry.compressed_size]
    stored = compress_table(table, compressor)
    assert len(stored) < len(table)
    header = bytearray(blob[header_entry.compressed_offset :][:META_HEADER_SIZE])
    struct.pack_into("<I", header, META_COMPRESSOR_OFFSET, (header_compressor or compressor).code)
    struct.pack_into("<Q", header, META_COMPRESSED_SIZE_OFFSET, len(stored))
    digests = blob[digest_entry.compressed_offset :][: digest_entry.compressed_size]

    out = bytearray(blob[:offset])  # chunk data and its image.blob tar header, unchanged
    out += stored + header + tar_header(TOC_ENTRY_META, len(stored) + META_HEADER_SIZE)
    digests_offset = len(out)
    out += digests + tar_header(TOC_ENTRY_DIGEST, len(digests))
    toc_bytes = blob[len(blob) - toc.size :]
    # image.blob's record as written (it records where the chunk data ends), then the others.
    records = [
        toc_bytes[start : start + TOC_ENTRY_SIZE]
        for start in range(0, toc.size - TAR_HEADER_SIZE, TOC_ENTRY_SIZE)
        if toc_bytes[start + 8 : start + 24].rstrip(b"\0") == TOC_ENTRY_BLOB_DATA.encode()
    ]
    assert len(records) == 1
    records += [
        toc_record(
            dataclasses.replace(meta_entry, compressor=compressor, compressed_size=len(stored))
        ),
        toc_record(
            dataclasses.replace(
                header_entry,
                digest=hashlib.sha256(header).digest(),
                compressed_offset=offset + len(stored),
            )
        ),
        toc_record(dataclasses.replace(digest_entry, compressed_offset=digests_offset)),
    ]
    out += b"".join(records) + tar_header(TOC_NAME, TOC_ENTRY_SIZE * len(records))
    return bytes(out), offset, len(stored)


def same_chunks(left: BlobMeta, right: BlobMeta) -> bool:
    return left.chunk_count == right.chunk_count and all(
        left.chunk(index) == right.chunk(index) and left.digest(index) == right.digest(index)
        for index in range(left.chunk_count)
    )


def without_chunk_table(bootstrap: bytes) -> bytes:
    """The bootstrap without its chunk table: chunks then come from blob.meta (as nydusd does
    for blobs with inlined chunk digests)."""
    patched = bytearray(bootstrap)
    struct.pack_into("<Q", patched, CHUNK_TABLE_SIZE_OFFSET, 0)
    return bytes(patched)


@pytest.mark.parametrize("compressor", [Compressor.ZSTD, Compressor.LZ4_BLOCK])
def test_blob_with_a_compressed_chunk_info_table(tmp_path: Path, compressor: Compressor) -> None:
    root = many_chunks_tree()
    image = write_image(Tree(root), tmp_path, WriterOptions(compressor=compressor))
    original = image.blobs[0].path.read_bytes()
    plain = read_blob_layout(BytesReader(original)).meta
    assert plain is not None and plain.chunk_count == 303
    blob, table_offset, stored_size = with_compressed_blob_meta(original, compressor)

    layout = read_blob_layout(BytesReader(blob))
    assert layout.meta is not None and layout.meta.has_digests
    assert layout.meta.header.compressor is compressor
    assert layout.meta.header.table_compressed_size == stored_size
    assert same_chunks(layout.meta, plain)

    # The blob table entry nydus-image would write for this blob.
    filesystem = open_bootstrap(without_chunk_table(image.bootstrap))
    assert isinstance(filesystem, RafsV6Filesystem) and not filesystem.has_chunk_table
    toc = read_toc(BytesReader(blob))
    assert toc is not None
    info = dataclasses.replace(
        filesystem.blobs[0],
        compressed_size=len(blob),
        meta_compressor=compressor,
        meta_offset=table_offset,
        meta_compressed_size=stored_size,
        toc_size=toc.size,
        toc_digest=toc.digest,
    )
    layout = read_blob_layout(BytesReader(blob), info)
    assert layout.meta is not None and same_chunks(layout.meta, plain)
    filesystem.attach_blob_meta(0, layout.meta)
    for path, node in Tree(root).walk():
        if node.is_regular:
            ino = lookup_path(filesystem, path)
            data = read_file_range(filesystem, ino, 0, node.size, [BytesReader(blob)])
            with node.content.open() as stream:
                assert data == stream.read(), path
    assert all(chunk.digest is not None for chunk in filesystem.chunks(ino))

    # A blob table that disagrees with the header about the table is refused.
    wrong = dataclasses.replace(info, meta_compressed_size=stored_size + 1)
    with pytest.raises(RafsError, match="does not match the blob table"):
        read_blob_layout(BytesReader(blob), wrong)


def test_toc_and_header_must_agree_about_blob_meta(tmp_path: Path) -> None:
    image = write_image(Tree(many_chunks_tree()), tmp_path)
    original = image.blobs[0].path.read_bytes()
    # The ToC says zstd, the header says the table is stored as it is.
    blob, _, _ = with_compressed_blob_meta(
        original, Compressor.ZSTD, header_compressor=Compressor.NONE
    )
    with pytest.raises(RafsError, match=r"blob\.meta"):
        read_blob_layout(BytesReader(blob))
    # The ToC says lz4_block, the header zstd.
    blob, _, _ = with_compressed_blob_meta(
        original, Compressor.LZ4_BLOCK, header_compressor=Compressor.ZSTD
    )
    with pytest.raises(RafsError, match=r"blob\.meta"):
        read_blob_layout(BytesReader(blob))


def test_load_blob_meta_still_takes_the_table_as_stored(tmp_path: Path) -> None:
    """Blobs without a ToC: the blob table locates blob.meta; the table is read as stored and
    decompressed as its header says."""
    image = write_image(Tree(many_chunks_tree()), tmp_path)
    original = image.blobs[0].path.read_bytes()
    blob, table_offset, stored_size = with_compressed_blob_meta(original, Compressor.ZSTD)
    stored = blob[table_offset : table_offset + stored_size]
    header = blob[table_offset + stored_size :][:META_HEADER_SIZE]
    plain = read_blob_layout(BytesReader(original)).meta
    assert plain is not None
    meta = load_blob_meta(header, stored)
    assert meta.chunk_count == plain.chunk_count
    assert all(meta.chunk(i) == plain.chunk(i) for i in range(meta.chunk_count))
    with pytest.raises(RafsError, match="stored table size"):
        load_blob_meta(header, zstandard.ZstdDecompressor().decompress(stored))
