"""EROFS structures (`erofs.py`) on hand-made bytes: the cases real images rarely show."""

from __future__ import annotations

import struct

import pytest

from d7y_node.errors import RafsError
from d7y_node.rafs import erofs
from d7y_node.rafs.bounded import BoundedBuffer

BLOCK = 4096


def superblock(**changes: int) -> erofs.Superblock:
    fields: dict[str, int] = dict(
        checksum=0,
        feature_compat=0,
        block_bits=12,
        extra_slots=0,
        root_nid=0,
        inode_count=1,
        build_time=1000,
        build_time_nanoseconds=5,
        blocks=3,
        meta_block_address=1,
        xattr_block_address=2,
        feature_incompat=0,
        extra_devices=0,
        device_table_slot_offset=0,
    )
    fields.update(changes)
    return erofs.Superblock(**fields)


def image_with_inode(inode: bytes, extra: bytes = b"", extra_at: int = 2 * BLOCK) -> bytes:
    data = bytearray(3 * BLOCK)
    data[BLOCK : BLOCK + len(inode)] = inode
    data[extra_at : extra_at + len(extra)] = extra
    return bytes(data)


def compact_inode(fmt: int = 0, xattr_count: int = 0, mode: int = 0o100644, size: int = 0) -> bytes:
    return struct.pack("<HHHHIIIIHHI", fmt, xattr_count, mode, 1, size, 0, 0, 1, 0, 0, 0)


def test_compact_inode_takes_the_superblock_time() -> None:
    buffer = BoundedBuffer(image_with_inode(compact_inode()), "test")
    inode = erofs.parse_inode(buffer, superblock(), 0)
    assert (inode.extended, inode.mtime, inode.mtime_nanoseconds) == (False, 1000, 5)


def test_unknown_format_bits_and_compressed_layouts_are_rejected() -> None:
    for fmt, message in [(0x10, "format bits"), (1 << 1, "compressed"), (6 << 1, "layout")]:
        buffer = BoundedBuffer(image_with_inode(compact_inode(fmt=fmt)), "test")
        with pytest.raises(RafsError, match=message):
            erofs.parse_inode(buffer, superblock(), 0)


def test_shared_and_inline_xattrs() -> None:
    # Body: 12-byte header with one shared id, then one inline entry "user.k" = "v".
    inline = struct.pack("<BBH", 1, 1, 1) + b"k" + b"v" + b"\0\0"  # padded to 4 bytes
    body = struct.pack("<IB7x", 0, 1) + struct.pack("<I", 3) + inline
    xattr_count = 1 + (len(body) - 12) // 4
    shared = struct.pack("<BBH", 4, 6, 5) + b"test" + b"value"
    data = image_with_inode(
        compact_inode(xattr_count=xattr_count) + body, shared, extra_at=2 * BLOCK + 3 * 4
    )
    buffer = BoundedBuffer(data, "test")
    inode = erofs.parse_inode(buffer, superblock(), 0)
    assert erofs.parse_xattrs(buffer, superblock(), inode) == [
        (b"security.test", b"value"),
        (b"user.k", b"v"),
    ]


def test_long_prefix_and_overflowing_xattrs_are_rejected() -> None:
    long_prefix = struct.pack("<IB7x", 0, 0) + struct.pack("<BBH", 1, 0x81, 0) + b"k\0\0\0"
    too_long = struct.pack("<IB7x", 0, 0) + struct.pack("<BBH", 200, 1, 0)
    for body, message in [(long_prefix, "long xattr"), (too_long, "overflows")]:
        xattr_count = 1 + (len(body) - 12) // 4
        buffer = BoundedBuffer(image_with_inode(compact_inode(xattr_count=xattr_count) + body), "t")
        inode = erofs.parse_inode(buffer, superblock(), 0)
        with pytest.raises(RafsError, match=message):
            erofs.parse_xattrs(buffer, superblock(), inode)


def dirent_block(entries: list[tuple[int, int, int]], names: bytes) -> bytes:
    return b"".join(struct.pack("<QHBx", *entry) for entry in entries) + names


def test_directory_block_parsing() -> None:
    block = dirent_block([(1, 24, 2), (2, 25, 1)], b".ab")
    assert erofs.parse_directory(block, BLOCK, 0) == [(b".", 1, 0o040000), (b"ab", 2, 0o100000)]
    padded = dirent_block([(1, 12, 1)], b"name") + bytes(20)
    assert erofs.parse_directory(padded, BLOCK, 0) == [(b"name", 1, 0o100000)]


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (dirent_block([(1, 13, 1)], b"x"), "first name offset"),
        (dirent_block([(1, 24, 1), (2, 24, 1)], b"ab"), "name offsets"),
        (dirent_block([(1, 24, 1), (2, 30, 1)], b"ab"), "name offsets"),
        (dirent_block([(1, 12, 9)], b"x"), "file type"),
        (dirent_block([(1, 12, 1)], b"\0"), "empty"),
        (b"short", "cannot hold"),
    ],
)
def test_bad_directory_blocks(block: bytes, message: str) -> None:
    with pytest.raises(RafsError, match=message):
        erofs.parse_directory(block, BLOCK, 7)


def test_inline_tail_must_not_cross_a_block() -> None:
    # A FLAT_INLINE inode at the end of a block whose 100-byte tail would spill over.
    data = bytearray(3 * BLOCK)
    offset = 2 * BLOCK - 32
    data[offset : offset + 32] = compact_inode(fmt=2 << 1, mode=0o040755, size=100)
    buffer = BoundedBuffer(bytes(data), "test")
    inode = erofs.parse_inode(buffer, superblock(), (offset - BLOCK) // 32)
    with pytest.raises(RafsError, match="crosses a block"):
        erofs.read_flat_data(buffer, inode, BLOCK)


def test_chunk_format() -> None:
    buffer = BoundedBuffer(image_with_inode(compact_inode(fmt=4 << 1, size=5)), "t")
    inode = erofs.parse_inode(buffer, superblock(), 0)._replace(union=0x20 | 8)
    assert erofs.chunk_size_of(inode, 12) == 1 << 20
    with pytest.raises(RafsError, match="block-map"):
        erofs.chunk_size_of(inode._replace(union=8), 12)
    with pytest.raises(RafsError, match="unknown chunk format"):
        erofs.chunk_size_of(inode._replace(union=0x120), 12)


def test_blob_ids_cannot_escape_a_directory() -> None:
    assert erofs.decode_id(b"ab" * 32, "t") == "ab" * 32
    for raw in [b"../x", b"a/b", b"..", b"", b"\xff" * 4, b"\0" * 64]:
        with pytest.raises(RafsError):
            erofs.decode_id(raw, "t")
