"""Blob trailers (`blob.py`): tar headers, the ToC, blob.meta tables, blob.digest."""

from __future__ import annotations

import hashlib
import struct
import tarfile

import pytest
import zstandard

from d7y_node.errors import RafsError
from d7y_node.rafs import BytesReader, Compressor, FileReader, read_blob_layout
from d7y_node.rafs.blob import (
    META_MAGIC,
    BlobFeature,
    BlobMeta,
    TocEntry,
    extract_toc_entry,
    load_blob_meta,
    parse_blob_meta_header,
    parse_tar_header,
    parse_toc,
)


def tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    return info.tobuf(format=tarfile.GNU_FORMAT)


def toc_entry(name: str, flags: int, data: bytes, offset: int, uncompressed: bytes) -> bytes:
    return struct.pack(
        "<I4x16s32sQQQ48x",
        flags,
        name.encode(),
        hashlib.sha256(uncompressed).digest(),
        offset,
        len(data),
        len(uncompressed),
    )


def make_blob() -> tuple[bytes, bytes]:
    """A blob holding chunk data, a zstd-compressed `image.boot` section and a ToC."""
    chunk_data = b"chunks" * 100
    boot = b"bootstrap bytes " * 200
    packed_boot = zstandard.ZstdCompressor().compress(boot)
    blob = bytearray(chunk_data + tar_header("image.blob", len(chunk_data)))
    boot_offset = len(blob)
    blob += packed_boot + tar_header("image.boot", len(packed_boot))
    entries = toc_entry("image.boot", 0x2, packed_boot, boot_offset, boot)
    blob += entries + tar_header("rafs.blob.toc", len(entries))
    return bytes(blob), boot


def test_tar_header_round_trip_and_checksum() -> None:
    header = tar_header("blob.digest", 64)
    assert parse_tar_header(header, "test") == ("blob.digest", 64)
    broken = bytearray(header)
    broken[0] ^= 1
    with pytest.raises(RafsError, match="checksum"):
        parse_tar_header(bytes(broken), "test")


def test_toc_and_inlined_bootstrap() -> None:
    blob, boot = make_blob()
    toc = parse_toc(blob[-1024:], len(blob))
    assert toc is not None
    (entry,) = toc.entries
    assert (entry.name, entry.compressor) == ("image.boot", Compressor.ZSTD)
    assert toc.digest == hashlib.sha256(blob[-(128 + 512) :]).digest()
    layout = read_blob_layout(BytesReader(blob))
    assert layout.bootstrap == boot and layout.meta is None


def test_toc_digest_must_match_when_given() -> None:
    blob, _ = make_blob()
    with pytest.raises(RafsError, match="sha256"):
        parse_toc(blob[-640:], len(blob), expected_digest=b"\x01" * 32)


def test_blob_without_toc() -> None:
    assert parse_toc(b"\0" * 1024, 4096) is None
    assert read_blob_layout(BytesReader(b"plain chunk data" * 10)).toc is None


def test_toc_entry_verification() -> None:
    data = b"content"
    entry = TocEntry("blob.digest", Compressor.NONE, hashlib.sha256(data).digest(), 0, 7, 7)
    assert extract_toc_entry(entry, data) == data
    with pytest.raises(RafsError, match="sha256"):
        extract_toc_entry(entry, b"CONTENT")
    with pytest.raises(RafsError, match="expected 7"):
        extract_toc_entry(entry, b"short")


def test_toc_entries_outside_the_blob_are_rejected() -> None:
    entries = toc_entry("blob.meta", 0x1, b"x" * 10, 10_000, b"x" * 10)
    tail = entries + tar_header("rafs.blob.toc", len(entries))
    with pytest.raises(RafsError, match="outside"):
        parse_toc(tail, len(tail) + 100)


def meta_header(entries: int, features: int, size: int, compressor: int = 0) -> bytes:
    header = bytearray(4096)
    struct.pack_into(
        "<IIIIQQQ", header, 0, META_MAGIC, features, compressor, entries, 0, size, size
    )
    struct.pack_into("<I", header, 4092, META_MAGIC)
    return bytes(header)


def test_chunk_info_v2_decoding() -> None:
    # Chunk 0: 4 KiB at uncompressed 8 KiB, compressed 100 bytes at 0.
    uncompressed = (8192 >> 12) | (4095 << 32) | (0x01 << 56)
    compressed = 0 | (100 << 40)
    table = struct.pack("<QQQ", uncompressed, compressed, 0)
    header = meta_header(1, BlobFeature.CHUNK_INFO_V2 | BlobFeature.ALIGNED, 24)
    meta = load_blob_meta(header, table)
    info = meta.chunk(0)
    assert (info.compressed_offset, info.compressed_size) == (0, 100)
    assert (info.uncompressed_offset, info.uncompressed_size, info.compressed) == (8192, 4096, True)
    with pytest.raises(RafsError):
        meta.chunk(1)
    zran = struct.pack("<QQQ", uncompressed | (0x02 << 56), compressed, 0)
    with pytest.raises(RafsError, match="zran"):
        load_blob_meta(header, zran).chunk(0)


def test_chunk_info_v1_decoding_of_large_sizes() -> None:
    # 16 MiB - 1 bytes uncompressed (needs the high size bits), 3 MiB compressed at 1 TiB - 1.
    usize, csize, coffset, uoffset = (1 << 24) - 1, 3 << 20, (1 << 40) - 1, 5 << 12
    uncompressed = ((usize - 1) & 0xFFFFF) << 44 | uoffset | (((usize - 1) >> 20) & 0xF) << 8
    compressed = ((csize - 1) & 0xFFFFF) << 44 | coffset | (((csize - 1) >> 20) & 0xF) << 40
    meta = BlobMeta(
        parse_blob_meta_header(meta_header(1, BlobFeature.ALIGNED, 16)),
        struct.pack("<QQ", uncompressed, compressed),
        b"\xaa" * 32,
    )
    info = meta.chunk(0)
    assert (info.uncompressed_size, info.uncompressed_offset) == (usize, uoffset)
    assert (info.compressed_size, info.compressed_offset, info.compressed) == (csize, coffset, True)
    assert meta.digest(0) == b"\xaa" * 32


def test_blob_meta_header_validation() -> None:
    with pytest.raises(RafsError, match="magic"):
        parse_blob_meta_header(bytes(4096))
    with pytest.raises(RafsError, match="table of"):
        parse_blob_meta_header(meta_header(2, 0, 16))
    with pytest.raises(RafsError, match="unsupported"):
        parse_blob_meta_header(meta_header(1, BlobFeature.ENCRYPTED, 16))
    with pytest.raises(RafsError, match=r"blob\.digest"):
        BlobMeta(parse_blob_meta_header(meta_header(1, 0, 16)), bytes(16), b"short")


def test_file_reader(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "blob"
    blob, boot = make_blob()
    path.write_bytes(blob)
    with FileReader(path) as reader:
        assert reader.size == len(blob)
        assert reader.read(0, 6) == b"chunks"
        assert read_blob_layout(reader).bootstrap == boot
        with pytest.raises(RafsError):
            reader.read(len(blob) - 1, 2)
