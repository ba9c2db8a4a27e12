"""The real Nydus images in shared/fixtures/nydus: every one reads, every chunk verifies, and the
v5 trees equal what `tree -J` and `md5sum` saw when the images were made."""

from __future__ import annotations

import hashlib
import json
import mmap
import stat
from pathlib import Path
from typing import Any

import pytest

from d7y_node.errors import RafsError
from d7y_node.rafs import (
    BytesReader,
    Compressor,
    Digester,
    Filesystem,
    RafsV6Filesystem,
    open_bootstrap,
    read_blob_layout,
)
from d7y_node.rafs.blob import read_file_range

V6_BOOTSTRAP = "v6/rafs-v6-2.2.boot"
V6_BLOB = "v6/be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"
V6_INLINED_BLOB = "v6/2fa78cad554b75ac91a4a125ed148d0ddeb25efa4aaa8bd80e5dc292690a4dca"
V5_IMAGES = {
    "v5/sha256-nocompress-repeatable": (Compressor.NONE, Digester.SHA256),
    "v5/blake3-lz4_block-2019.boot": (Compressor.LZ4_BLOCK, Digester.BLAKE3),
}


def blob_readers(filesystem: Filesystem, directory: Path) -> list[BytesReader]:
    return [BytesReader((directory / blob.blob_id).read_bytes()) for blob in filesystem.blobs]


def read_all_files(filesystem: Filesystem, readers: list[BytesReader]) -> dict[bytes, bytes]:
    """Every regular file's content, each chunk decompressed and checked against its digest."""
    contents = {}
    for path, attributes in filesystem.walk():
        if attributes.is_regular:
            data = read_file_range(filesystem, attributes.ino, 0, attributes.size, readers)
            assert len(data) == attributes.size
            contents[path] = data
    return contents


def parse_result(text: str) -> tuple[dict[bytes, tuple[str, bytes | None]], dict[bytes, str]]:
    """(path -> (tree type, link target), path -> md5) from a `.result` file."""
    tree, end = json.JSONDecoder().raw_decode(text)
    entries: dict[bytes, tuple[str, bytes | None]] = {}

    def visit(node: dict[str, Any], prefix: bytes) -> None:
        for child in node.get("contents", []):
            path = prefix + b"/" + child["name"].encode()
            target = child.get("target")
            entries[path] = (child["type"], target.encode() if target is not None else None)
            if child["type"] == "directory":
                visit(child, path)

    root = tree[0]
    assert root["type"] == "directory"
    visit(root, b"")
    md5s = {}
    for line in text[end:].splitlines():
        if line.strip():
            digest, path = line.split(None, 1)
            md5s[path.encode()] = digest
    return entries, md5s


def resolves_to_directory(filesystem: Filesystem, link_path: bytes, target: bytes) -> bool:
    """Whether symlink `link_path` -> `target` names a directory of the image (one level)."""
    parts = (
        target.split(b"/")
        if target.startswith(b"/")
        else [
            *link_path.split(b"/")[:-1],
            *target.split(b"/"),
        ]
    )
    stack: list[int] = [1]
    for part in parts:
        if part in (b"", b"."):
            continue
        if part == b"..":
            if len(stack) > 1:
                stack.pop()
            continue
        found = filesystem.lookup(stack[-1], part)
        if found is None or not found.is_directory:
            return False
        stack.append(found.ino)
    return True


def tree_type(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISLNK(mode):
        return "link"
    return "file"


@pytest.mark.parametrize("image", sorted(V5_IMAGES))
def test_v5_tree_equals_result_file(nydus_fixtures: Path, image: str) -> None:
    filesystem = open_bootstrap((nydus_fixtures / image).read_bytes())
    assert filesystem.version == 5
    assert (filesystem.compressor, filesystem.digester) == V5_IMAGES[image]  # type: ignore[attr-defined]
    result = (nydus_fixtures / (image.removesuffix(".boot") + ".result")).read_text()
    expected_entries, expected_md5 = parse_result(result)

    actual_entries: dict[bytes, tuple[str, bytes | None]] = {}
    for path, attributes in filesystem.walk():
        if path == b"/":
            continue
        target = filesystem.readlink(attributes.ino) if attributes.is_symlink else None
        actual_entries[path] = (tree_type(attributes.mode), target)
    assert actual_entries == expected_entries

    contents = read_all_files(filesystem, blob_readers(filesystem, nydus_fixtures / "v5"))
    actual_md5 = {path: hashlib.md5(data).hexdigest() for path, data in contents.items()}
    assert actual_md5 == expected_md5
    # `tree` counted 26 directories and 27 files below the root; like `tree`, count a symlink
    # that resolves to a directory inside the image as a directory.
    report = json.JSONDecoder().raw_decode(result)[0][-1]
    directories = sum(
        kind == "directory"
        or (target is not None and resolves_to_directory(filesystem, path, target))
        for path, (kind, target) in actual_entries.items()
    )
    assert (report["directories"], report["files"]) == (
        directories,
        len(actual_entries) - directories,
    )


@pytest.mark.parametrize("image", sorted(V5_IMAGES))
def test_v5_hard_links_share_an_inode(nydus_fixtures: Path, image: str) -> None:
    filesystem = open_bootstrap((nydus_fixtures / image).read_bytes())
    links = [
        filesystem.lookup(filesystem.lookup(1, b"hardlink-test").ino, b"foo"),  # type: ignore[union-attr]
        filesystem.lookup(filesystem.lookup(1, b"hardlink-test").ino, b"test.sh"),  # type: ignore[union-attr]
        filesystem.lookup(filesystem.lookup(1, b"normal-file-test").ino, b"test.sh"),  # type: ignore[union-attr]
    ]
    assert all(link is not None for link in links)
    assert len({link.ino for link in links if link}) == 1
    assert all(link.nlink == 3 for link in links if link)
    assert filesystem.inode_count == 51  # 54 names, three of them one inode


def test_v5_lookup_parent_and_missing(nydus_fixtures: Path) -> None:
    filesystem = open_bootstrap((nydus_fixtures / "v5/sha256-nocompress-repeatable").read_bytes())
    etc = filesystem.lookup(1, b"normal-file-test")
    assert etc is not None and etc.is_directory
    assert filesystem.parent(etc.ino) == 1
    assert filesystem.parent(1) == 1
    assert filesystem.lookup(etc.ino, b"..") == filesystem.getattr(1)
    assert filesystem.lookup(etc.ino, b"no-such-name") is None
    assert not filesystem.explicit_uid_gid
    with pytest.raises(RafsError):
        filesystem.readlink(etc.ino)
    with pytest.raises(RafsError):
        filesystem.chunks(etc.ino)


def test_v6_bootstrap_reads_and_every_chunk_verifies(nydus_fixtures: Path) -> None:
    filesystem = open_bootstrap((nydus_fixtures / V6_BOOTSTRAP).read_bytes())
    assert isinstance(filesystem, RafsV6Filesystem)
    assert filesystem.inode_count == 3
    assert filesystem.chunk_size == 1 << 20
    (blob,) = filesystem.blobs
    assert blob.blob_id == V6_BLOB.removeprefix("v6/")
    assert (blob.compressor, blob.digester) == (Compressor.ZSTD, Digester.BLAKE3)
    assert [device.tag for device in filesystem.devices] == [blob.blob_id]
    readers = blob_readers(filesystem, nydus_fixtures / "v6")
    contents = read_all_files(filesystem, readers)
    assert sorted(contents) == [b"/lib.rs", b"/sync_io.rs"]
    assert [len(data) for _, data in sorted(contents.items())] == [16931, 13400]
    assert b"fn " in contents[b"/lib.rs"]
    root = filesystem.getattr(1)
    assert root.is_directory and root.nlink == 2


def test_v6_blob_meta_agrees_with_the_chunk_table(nydus_fixtures: Path) -> None:
    data = (nydus_fixtures / V6_BOOTSTRAP).read_bytes()
    filesystem = open_bootstrap(data)
    (blob,) = filesystem.blobs
    layout = read_blob_layout(BytesReader((nydus_fixtures / V6_BLOB).read_bytes()), blob)
    assert layout.toc is not None and layout.meta is not None and layout.meta.has_digests
    assert {entry.name for entry in layout.toc.entries} == {
        "image.blob",
        "blob.meta",
        "blob.meta.header",
        "blob.digest",
    }
    assert layout.bootstrap is None
    from_table = [c for _, a in filesystem.walk() if a.is_regular for c in filesystem.chunks(a.ino)]
    for chunk in from_table:
        info = layout.meta.chunk(chunk.chunk_index)
        assert (info.compressed_offset, info.compressed_size) == (
            chunk.compressed_offset,
            chunk.compressed_size,
        )
        assert (info.uncompressed_offset, info.uncompressed_size) == (
            chunk.uncompressed_offset,
            chunk.uncompressed_size,
        )
        assert layout.meta.digest(chunk.chunk_index) == chunk.digest


def test_v6_inlined_bootstrap_blob(nydus_fixtures: Path) -> None:
    blob_bytes = (nydus_fixtures / V6_INLINED_BLOB).read_bytes()
    layout = read_blob_layout(BytesReader(blob_bytes))
    assert layout.bootstrap is not None and layout.meta is not None
    assert not layout.meta.has_digests  # this older blob carries no blob.digest
    filesystem = open_bootstrap(layout.bootstrap)
    assert filesystem.version == 6
    (blob,) = filesystem.blobs
    assert blob.chunk_count == layout.meta.chunk_count == 3
    # The bootstrap travels inside the blob its chunks live in.
    contents = read_all_files(filesystem, [BytesReader(blob_bytes)])
    assert sorted(contents) == [b"/error.rs", b"/lib.rs", b"/logger.rs"]


def test_v6_without_chunk_table_uses_blob_meta(nydus_fixtures: Path) -> None:
    """The same image with its chunk table size zeroed: chunks come from blob.meta instead."""
    data = bytearray((nydus_fixtures / V6_BOOTSTRAP).read_bytes())
    chunk_table_size_offset = 1152 + 32  # s_chunk_table_size in the extended superblock
    data[chunk_table_size_offset : chunk_table_size_offset + 8] = bytes(8)
    filesystem = open_bootstrap(bytes(data))
    assert isinstance(filesystem, RafsV6Filesystem) and not filesystem.has_chunk_table
    lib = filesystem.lookup(1, b"lib.rs")
    assert lib is not None
    with pytest.raises(RafsError, match=r"no blob\.meta"):
        filesystem.chunks(lib.ino)
    blob_bytes = (nydus_fixtures / V6_BLOB).read_bytes()
    layout = read_blob_layout(BytesReader(blob_bytes), filesystem.blobs[0])
    assert layout.meta is not None
    filesystem.attach_blob_meta(0, layout.meta)
    contents = read_all_files(filesystem, [BytesReader(blob_bytes)])
    original = open_bootstrap((nydus_fixtures / V6_BOOTSTRAP).read_bytes())
    assert contents == read_all_files(original, [BytesReader(blob_bytes)])


def test_corrupt_chunk_is_caught(nydus_fixtures: Path) -> None:
    filesystem = open_bootstrap((nydus_fixtures / "v5/sha256-nocompress-repeatable").read_bytes())
    blob = bytearray((nydus_fixtures / "v5" / filesystem.blobs[0].blob_id).read_bytes())
    version = filesystem.lookup(1, b"normal-file-test")
    assert version is not None
    (chunk,) = filesystem.chunks(5)  # the hard-linked test.sh, stored at offset 0
    blob[chunk.compressed_offset] ^= 0xFF
    with pytest.raises(RafsError, match="digest mismatch"):
        read_file_range(filesystem, 5, 0, 10, [BytesReader(bytes(blob))])


def test_read_plan_slices(nydus_fixtures: Path) -> None:
    filesystem = open_bootstrap((nydus_fixtures / "v5/sha256-nocompress-repeatable").read_bytes())
    readers = blob_readers(filesystem, nydus_fixtures / "v5")
    holefiles = filesystem.lookup(filesystem.lookup(1, b"normal-file-test").ino, b"holefiles")  # type: ignore[union-attr]
    assert holefiles is not None
    head_hole = filesystem.lookup(holefiles.ino, b"head-hole-1")
    assert head_hole is not None and head_hole.size == 2 * (1 << 20) + 7
    whole = read_file_range(filesystem, head_hole.ino, 0, head_hole.size, readers)
    plan = filesystem.read_plan(head_hole.ino, (1 << 20) - 3, 10)
    assert [(piece.file_offset, piece.offset, piece.length) for piece in plan] == [
        ((1 << 20) - 3, (1 << 20) - 3, 3),
        (1 << 20, 0, 7),
    ]
    for offset, length in [(0, 1), ((1 << 20) - 3, 10), (2 << 20, 100), (head_hole.size, 5)]:
        part = read_file_range(filesystem, head_hole.ino, offset, length, readers)
        assert part == whole[offset : offset + length]


def test_fixture_summary(nydus_fixtures: Path) -> None:
    """What each fixture holds, as the reader sees it (printed with -s; checked loosely)."""
    summaries = []
    for image in [V6_BOOTSTRAP, *sorted(V5_IMAGES)]:
        filesystem = open_bootstrap((nydus_fixtures / image).read_bytes())
        files = [a for _, a in filesystem.walk() if a.is_regular]
        chunks = {
            (c.blob_index, c.compressed_offset, c.digest)
            for a in files
            for c in filesystem.chunks(a.ino)
        }
        blob = filesystem.blobs[0]
        summaries.append(
            f"{image}: v{filesystem.version}, {filesystem.inode_count} inodes, {len(files)} "
            f"file names, {len(chunks)} distinct chunks, {blob.compressor.value}, "
            f"{blob.digester.value}, chunk size {filesystem.chunk_size}"
        )
        assert chunks
    print("\n".join(summaries))


@pytest.mark.parametrize("image", [V6_BOOTSTRAP, *sorted(V5_IMAGES)])
def test_bootstrap_from_mmap(nydus_fixtures: Path, image: str) -> None:
    """A mounted image keeps its bootstrap mapped rather than read into memory."""
    with (
        (nydus_fixtures / image).open("rb") as file,
        mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped,
    ):
        from_map = open_bootstrap(mapped)
        from_bytes = open_bootstrap((nydus_fixtures / image).read_bytes())
        assert list(from_map.walk()) == list(from_bytes.walk())
        files = [a.ino for _, a in from_map.walk() if a.is_regular]
        assert [from_map.chunks(ino) for ino in files] == [from_bytes.chunks(ino) for ino in files]
        del from_map
