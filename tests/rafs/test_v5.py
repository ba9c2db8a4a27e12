"""RAFS v5 features the real fixtures do not show (xattrs, device nodes, hole chunks, explicit
uid/gid), on a small v5 image written here from the layout in `v5.py`'s docstring."""

from __future__ import annotations

import hashlib
import os
import stat
import struct

import pytest

from d7y_node.errors import RafsError
from d7y_node.rafs import BytesReader, RafsV5Filesystem, open_bootstrap
from d7y_node.rafs.blob import read_file_range
from tests.rafs.image_builder import Node, directory, regular, symlink

BLOB_ID = "cd" * 32
CHUNK = 1 << 20


def pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % 8)


def build_v5(root: Node, *, flags: int = 0x1 | 0x8 | 0x10 | 0x20) -> tuple[bytes, bytes]:
    """(bootstrap, blob): no compression, sha256 digests, 1 MiB chunks."""
    # Child indexes breadth first, as nydus assigns them; hard links get their own records.
    records: list[tuple[bytes, Node, int]] = [(b"/", root, 0)]  # name, node, parent index
    first_child: dict[int, int] = {}
    inode_of: dict[int, int] = {}  # id(node) -> inode number (its first record's index)
    position = 0
    while position < len(records):
        name, node, _parent = records[position]
        index = position + 1
        inode_of.setdefault(id(node), index)
        if stat.S_ISDIR(node.mode):
            first_child[index] = len(records) + 1
            records.extend((n, child, index) for n, child in sorted(node.children.items()))
        position += 1
    links: dict[int, int] = {}
    for _, node, _ in records:
        links[id(node)] = links.get(id(node), 0) + 1

    blob = bytearray()
    bodies: list[bytes] = []
    for index, (name, node, parent) in enumerate(records, 1):
        tail = bytearray()
        if stat.S_ISLNK(node.mode):
            tail += pad(node.target)
        inode_flags = 0x1 if stat.S_ISLNK(node.mode) else 0
        if node.xattrs:
            inode_flags |= 0x4
            pairs = b"".join(
                struct.pack("<I", len(k) + 1 + len(v)) + k + b"\0" + v
                for k, v in node.xattrs.items()
            )
            tail += struct.pack("<Q", len(pairs)) + pad(pairs)
        chunk_count = 0
        if stat.S_ISREG(node.mode):
            for number, start in enumerate(range(0, len(node.data), CHUNK)):
                piece = node.data[start : start + CHUNK]
                hole = number in node.holes
                tail += struct.pack(
                    "<32sIIIIQQQII",
                    hashlib.sha256(piece).digest(),
                    0,
                    0x2 if hole else 0,
                    len(piece),
                    len(piece),
                    len(blob),
                    len(blob),
                    start,
                    number,
                    0,
                )
                if not hole:
                    blob += piece
                chunk_count += 1
        is_dir = stat.S_ISDIR(node.mode)
        children = len(node.children) if is_dir else chunk_count
        head = struct.pack(
            "<32sQQIIIIQQQIIIHHIIQ8x",
            bytes(32),
            inode_of[id(records[parent - 1][1])] if parent else 0,
            inode_of[id(node)],
            node.uid,
            node.gid,
            0,
            node.mode,
            len(node.data) if stat.S_ISREG(node.mode) else len(node.target),
            0,
            inode_flags,
            links[id(node)]
            + (sum(stat.S_ISDIR(c.mode) for c in node.children.values()) + 1 if is_dir else 0),
            first_child.get(index, 0) if is_dir else 0,
            children,
            len(name),
            len(node.target),
            node.rdev,
            0,
            node.mtime,
        )
        bodies.append(head + pad(name) + bytes(tail))

    entries = len(records)
    inode_table_offset = 8192
    blob_table = pad(struct.pack("<II", 0, 0) + BLOB_ID.encode())
    blob_table_offset = inode_table_offset + len(pad(bytes(4 * entries)))
    records_offset = blob_table_offset + len(blob_table)
    offsets = []
    position = records_offset
    for body in bodies:
        offsets.append(position)
        position += len(body)
    superblock = struct.pack(
        "<IIIIQQQQQIIIIQ",
        0x52414653,
        0x500,
        8192,
        CHUNK,
        flags,
        len(inode_of),
        inode_table_offset,
        0,
        blob_table_offset,
        entries,
        0,
        len(blob_table),
        0,
        0,
    )
    table = pad(b"".join(struct.pack("<I", offset // 8) for offset in offsets))
    image = superblock + bytes(8192 - len(superblock)) + table + blob_table + b"".join(bodies)
    return image, bytes(blob)


def sample() -> tuple[RafsV5Filesystem, bytes, dict[str, Node]]:
    shared = regular(b"shared", xattrs={b"user.one": b"1", b"trusted.two": b""})
    nodes = {
        "big": regular(os.urandom(CHUNK) + b"end", holes=frozenset({0})),
        "dev": Node(mode=stat.S_IFBLK | 0o600, rdev=os.makedev(8, 1), uid=3, gid=4),
        "link": symlink(b"big"),
    }
    root = directory(
        {
            b"big": nodes["big"],
            b"dev": nodes["dev"],
            b"link": nodes["link"],
            b"a": shared,
            b"sub": directory({b"b": shared}),
        },
        xattrs={b"security.selinux": b"label"},
    )
    image, blob = build_v5(root)
    filesystem = open_bootstrap(image)
    assert isinstance(filesystem, RafsV5Filesystem)
    return filesystem, blob, nodes


def test_xattrs_devices_symlinks_and_links() -> None:
    filesystem, _, _ = sample()
    assert filesystem.explicit_uid_gid
    assert filesystem.xattrs(1) == {b"security.selinux": b"label"}
    shared = filesystem.lookup(1, b"a")
    sub = filesystem.lookup(1, b"sub")
    assert shared is not None and sub is not None
    assert filesystem.lookup(sub.ino, b"b") == shared
    assert shared.nlink == 2
    assert filesystem.xattrs(shared.ino) == {b"user.one": b"1", b"trusted.two": b""}
    device = filesystem.lookup(1, b"dev")
    assert device is not None
    assert (device.file_type, device.rdev, device.uid, device.gid) == (
        stat.S_IFBLK,
        os.makedev(8, 1),
        3,
        4,
    )
    link = filesystem.lookup(1, b"link")
    assert link is not None and filesystem.readlink(link.ino) == b"big"
    assert filesystem.parent(sub.ino) == 1


def test_hole_chunks_read_as_zeros() -> None:
    filesystem, blob, _nodes = sample()
    big = filesystem.lookup(1, b"big")
    assert big is not None
    assert [chunk.file_offset for chunk in filesystem.chunks(big.ino)] == [CHUNK]
    data = read_file_range(filesystem, big.ino, 0, big.size, [BytesReader(blob)])
    assert data == bytes(CHUNK) + b"end"


def test_secondary_link_record_is_not_an_inode() -> None:
    filesystem, _, _ = sample()
    # Records breadth first: / a big dev link sub, then sub/b, the second name of "a".
    sub = filesystem.lookup(1, b"sub")
    assert sub is not None
    assert [entry.ino for entry in filesystem.readdir(sub.ino)] == [2]
    with pytest.raises(RafsError, match="record of its own"):
        filesystem.getattr(7)


def test_superblock_validation() -> None:
    root = directory({b"f": regular(b"x")})
    image, _ = build_v5(root)
    with pytest.raises(RafsError, match="one compressor"):
        open_bootstrap(build_v5(root, flags=0x8)[0])
    with pytest.raises(RafsError, match="unknown flags"):
        open_bootstrap(build_v5(root, flags=0x1 | 0x8 | 0x1000)[0])
    broken = bytearray(image)
    struct.pack_into("<I", broken, 12, 12345)  # chunk size
    with pytest.raises(RafsError, match="chunk size"):
        open_bootstrap(bytes(broken))
    assert open_bootstrap(image).getattr(1).is_directory
