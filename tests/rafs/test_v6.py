"""RAFS v6 features the real fixtures do not show, on images made by `image_builder`."""

from __future__ import annotations

import os
import stat
import time

import pytest

from d7y_node.errors import RafsError
from d7y_node.rafs import BytesReader, RafsV6Filesystem, erofs, open_bootstrap, read_blob_layout
from d7y_node.rafs.blob import read_file_range
from tests.rafs.image_builder import Built, Node, build, directory, regular, symlink

MIB = 1 << 20


def sample_tree() -> tuple[Node, dict[str, Node]]:
    shared = regular(b"hello world\n" * 1000, xattrs={b"user.note": b"shared"})
    nodes = {
        "small": regular(b"x" * 5000, mode=0o4755, uid=1000, gid=100),
        "big": regular(os.urandom(3 * MIB) + b"tail", holes=frozenset({1})),
        "empty": regular(b""),
        "shared": shared,
        "symlink": symlink(b"../some/where", compact=True),
        "long_symlink": symlink(b"x/" * 1500, inline=False),
        "fifo": Node(mode=stat.S_IFIFO | 0o600),
        "socket": Node(mode=stat.S_IFSOCK | 0o600),
        "chardev": Node(mode=stat.S_IFCHR | 0o666, rdev=os.makedev(1, 3)),
        "blockdev": Node(mode=stat.S_IFBLK | 0o660, rdev=os.makedev(259, 70000), gid=6),
        "compact": regular(b"compact", compact=True, uid=7, gid=8),
        "many": directory({b"entry-%04d" % i: regular(b"") for i in range(700)}),
        "plain": directory({b"only": regular(b"1")}, inline=False),
    }
    root = directory(
        {
            b"small": nodes["small"],
            b"big": nodes["big"],
            b"empty": nodes["empty"],
            b"link-one": shared,
            b"link-two": shared,
            b"symlink": nodes["symlink"],
            b"long-symlink": nodes["long_symlink"],
            b"fifo": nodes["fifo"],
            b"socket": nodes["socket"],
            b"chardev": nodes["chardev"],
            b"blockdev": nodes["blockdev"],
            b"compact": nodes["compact"],
            b"many": nodes["many"],
            b"plain": nodes["plain"],
            b"dup-of-small": regular(b"x" * 5000),
        },
        xattrs={
            b"security.selinux": b"system_u:object_r:root_t:s0",
            b"system.posix_acl_default": b"\x02\x00\x00\x00",
            b"trusted.overlay.opaque": b"y",
        },
    )
    return root, nodes


@pytest.fixture
def sample() -> tuple[Built, dict[str, Node]]:
    root, nodes = sample_tree()
    return build(root, prefetch=(nodes["small"], nodes["shared"])), nodes


def lookup_path(filesystem: RafsV6Filesystem, path: bytes) -> int:
    ino = 1
    for part in path.strip(b"/").split(b"/"):
        found = filesystem.lookup(ino, part)
        assert found is not None, path
        ino = found.ino
    return ino


def test_attributes_of_every_kind(sample: tuple[Built, dict[str, Node]]) -> None:
    built, _ = sample
    filesystem = open_bootstrap(built.bootstrap)
    assert isinstance(filesystem, RafsV6Filesystem)
    assert filesystem.explicit_uid_gid
    attributes = {path: a for path, a in filesystem.walk()}
    small = attributes[b"/small"]
    assert (small.mode, small.uid, small.gid, small.size, small.nlink) == (
        stat.S_IFREG | 0o4755,
        1000,
        100,
        5000,
        1,
    )
    assert small.mtime == 1_700_000_000
    compact = attributes[b"/compact"]
    assert (compact.uid, compact.gid, compact.size) == (7, 8, 7)
    assert compact.mtime == 0  # compact inodes take the superblock's build time
    assert attributes[b"/fifo"].file_type == stat.S_IFIFO
    assert attributes[b"/socket"].file_type == stat.S_IFSOCK
    assert attributes[b"/chardev"].rdev == os.makedev(1, 3)
    assert attributes[b"/blockdev"].rdev == os.makedev(259, 70000)
    assert attributes[b"/fifo"].rdev == 0
    assert attributes[b"/"].nlink == 4  # ".", and ".." of many/ and plain/
    assert attributes[b"/many"].nlink == 2
    assert filesystem.readlink(attributes[b"/symlink"].ino) == b"../some/where"
    assert filesystem.readlink(attributes[b"/long-symlink"].ino) == b"x/" * 1500


def test_hard_links_share_one_inode(sample: tuple[Built, dict[str, Node]]) -> None:
    built, _ = sample
    filesystem = open_bootstrap(built.bootstrap)
    one = filesystem.lookup(1, b"link-one")
    two = filesystem.lookup(1, b"link-two")
    assert one is not None and one == two
    assert one.nlink == 2
    assert filesystem.xattrs(one.ino) == {b"user.note": b"shared"}


def test_xattrs(sample: tuple[Built, dict[str, Node]]) -> None:
    built, _ = sample
    filesystem = open_bootstrap(built.bootstrap)
    assert filesystem.xattrs(1) == {
        b"security.selinux": b"system_u:object_r:root_t:s0",
        b"system.posix_acl_default": b"\x02\x00\x00\x00",
        b"trusted.overlay.opaque": b"y",
    }
    assert filesystem.xattrs(lookup_path(filesystem, b"/small")) == {}  # type: ignore[arg-type]


def test_directories_spanning_blocks_and_plain_layout(
    sample: tuple[Built, dict[str, Node]],
) -> None:
    built, _ = sample
    filesystem = open_bootstrap(built.bootstrap)
    many = filesystem.lookup(1, b"many")
    assert many is not None and many.size > 2 * 4096
    names = [entry.name for entry in filesystem.readdir(many.ino)]
    assert names == [b"entry-%04d" % i for i in range(700)]
    for name in (b"entry-0000", b"entry-0350", b"entry-0699"):
        found = filesystem.lookup(many.ino, name)
        assert found is not None and found.is_regular
    assert filesystem.lookup(many.ino, b"entry-0700") is None
    assert filesystem.parent(many.ino) == 1
    plain = filesystem.lookup(1, b"plain")
    assert plain is not None
    assert [entry.name for entry in filesystem.readdir(plain.ino)] == [b"only"]
    root_names = [entry.name for entry in filesystem.readdir(1)]
    assert root_names == sorted(root_names) and b"." not in root_names


def test_file_content_across_chunks_holes_and_dedup(
    sample: tuple[Built, dict[str, Node]],
) -> None:
    built, nodes = sample
    filesystem = open_bootstrap(built.bootstrap)
    readers = [BytesReader(built.blob)]
    big = filesystem.lookup(1, b"big")
    assert big is not None
    expected = bytearray(nodes["big"].data)
    expected[MIB : 2 * MIB] = bytes(MIB)  # chunk 1 was written as a hole
    assert read_file_range(filesystem, big.ino, 0, big.size, readers) == expected
    for offset, length in [(MIB - 5, 10), (2 * MIB - 1, 2), (3 * MIB, 100), (0, 0)]:
        got = read_file_range(filesystem, big.ino, offset, length, readers)
        assert got == expected[offset : offset + length]
    plan = filesystem.read_plan(big.ino, MIB - 5, MIB + 10)
    assert [(piece.chunk is None, piece.length) for piece in plan] == [
        (False, 5),
        (True, MIB),
        (False, 5),
    ]
    assert [chunk.file_offset for chunk in filesystem.chunks(big.ino)] == [0, 2 * MIB, 3 * MIB]
    small = filesystem.lookup(1, b"small")
    duplicate = filesystem.lookup(1, b"dup-of-small")
    assert small is not None and duplicate is not None
    assert filesystem.chunks(small.ino) == filesystem.chunks(duplicate.ino)
    empty = filesystem.lookup(1, b"empty")
    assert empty is not None and filesystem.chunks(empty.ino) == ()
    assert filesystem.read_plan(empty.ino, 0, 100) == []


def test_prefetch_table(sample: tuple[Built, dict[str, Node]]) -> None:
    built, _ = sample
    filesystem = open_bootstrap(built.bootstrap)
    small = filesystem.lookup(1, b"small")
    shared = filesystem.lookup(1, b"link-one")
    assert small is not None and shared is not None
    assert filesystem.prefetch_inodes() == (small.ino, shared.ino)


def test_blob_meta_replaces_a_missing_chunk_table() -> None:
    root, nodes = sample_tree()
    built = build(root, chunk_table=False)
    filesystem = open_bootstrap(built.bootstrap)
    assert isinstance(filesystem, RafsV6Filesystem) and not filesystem.has_chunk_table
    big = filesystem.lookup(1, b"big")
    assert big is not None
    with pytest.raises(RafsError, match=r"no blob\.meta"):
        filesystem.read_plan(big.ino, 0, 10)
    layout = read_blob_layout(BytesReader(built.blob), filesystem.blobs[0])
    assert layout.toc is None and layout.meta is not None and not layout.meta.has_digests
    filesystem.attach_blob_meta(0, layout.meta)
    data = read_file_range(filesystem, big.ino, 0, big.size, [BytesReader(built.blob)])
    assert data[:MIB] == nodes["big"].data[:MIB]
    # Without a chunk table and without blob.digest there is nothing to verify against.
    assert all(chunk.digest is None for chunk in filesystem.chunks(big.ino))


def test_uncompressed_image() -> None:
    root, nodes = sample_tree()
    built = build(root, compress=False)
    filesystem = open_bootstrap(built.bootstrap)
    big = filesystem.lookup(1, b"big")
    assert big is not None
    chunks = filesystem.chunks(big.ino)
    assert all(not chunk.compressed for chunk in chunks)
    assert all(chunk.compressed_offset == chunk.uncompressed_offset for chunk in chunks)
    data = read_file_range(filesystem, big.ino, 2 * MIB, MIB + 4, [BytesReader(built.blob)])
    assert data == nodes["big"].data[2 * MIB :]


def test_directory_cycle_is_reported_not_followed() -> None:
    looping = directory({b"file": regular(b"1")})
    looping.children[b"again"] = looping
    built = build(directory({b"loop": looping}))
    filesystem = open_bootstrap(built.bootstrap)
    with pytest.raises(RafsError, match="reachable twice"):
        list(filesystem.walk())


def test_invalid_names_are_rejected() -> None:
    built = build(directory({b"a/b": regular(b"")}))
    filesystem = open_bootstrap(built.bootstrap)
    with pytest.raises(RafsError, match="invalid name"):
        filesystem.readdir(1)


def test_wrong_kind_of_inode_is_an_error(sample: tuple[Built, dict[str, Node]]) -> None:
    built, _ = sample
    filesystem = open_bootstrap(built.bootstrap)
    small = filesystem.lookup(1, b"small")
    assert small is not None
    with pytest.raises(RafsError):
        filesystem.readdir(small.ino)
    with pytest.raises(RafsError):
        filesystem.readlink(small.ino)
    with pytest.raises(RafsError):
        filesystem.chunks(1)
    with pytest.raises(RafsError):
        filesystem.getattr(10**9)
    with pytest.raises(RafsError):
        filesystem.read_plan(small.ino, -1, 5)


@pytest.fixture(scope="module")
def hundred_thousand_inodes() -> bytes:
    root = directory(
        {
            b"d%03d" % d: directory({b"f%04d" % f: regular(b"") for f in range(1000)})
            for d in range(100)
        }
    )
    return build(root).bootstrap


def test_hundred_thousand_inodes_open_lazily(
    hundred_thousand_inodes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening parses superblocks and tables only; a lookup decodes just the inodes on its path
    and the directories it reads, however big the image."""
    decoded: list[int] = []
    parse_inode = erofs.parse_inode

    def counting_parse_inode(*args: object) -> erofs.DiskInode:
        inode = parse_inode(*args)  # type: ignore[arg-type]
        decoded.append(inode.nid)
        return inode

    monkeypatch.setattr(erofs, "parse_inode", counting_parse_inode)
    started = time.perf_counter()
    filesystem = open_bootstrap(hundred_thousand_inodes)
    directory_attributes = filesystem.lookup(1, b"d042")
    assert directory_attributes is not None
    target = filesystem.lookup(directory_attributes.ino, b"f0999")
    elapsed = time.perf_counter() - started
    assert target is not None and target.is_regular
    assert filesystem.inode_count == 100 * 1000 + 100 + 1
    assert len(decoded) == 3  # root, d042, f0999
    assert elapsed < 1.0, f"open + two lookups took {elapsed:.3f}s"
    entries = filesystem.readdir(directory_attributes.ino)
    assert len(entries) == 1000
    assert len(decoded) == 3  # listing a directory does not decode its children
