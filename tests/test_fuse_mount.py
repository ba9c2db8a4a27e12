"""Tests of `d7y_node.fuse_mount` without a kernel mount: the operations over a RAFS image
(attributes, names, directory offsets, links, extended attributes, errno), the read path (which
blob ranges a read needs, verification, the decoded-chunk cache, shared fetches), prefetch, the
bandwidth cap, and the `TaskManager` blob source with a real `TaskManager`.

Images come from `tests/rafs/image_builder.py`; real mounts are in
tests/integration/test_fuse_mount_e2e.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import hashlib
import os
import stat
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from d7y_node.errors import RafsError, UpstreamUnavailable
from d7y_node.fuse_kernel import (
    OPEN_KEEP_CACHE,
    FuseError,
    encode_dirents,
)
from d7y_node.fuse_mount import (
    ChunkCache,
    ChunkReader,
    DirectoryBlobSource,
    MountOptions,
    Prefetcher,
    RafsOperations,
    TaskBlobSource,
    TokenBucket,
    merge_ranges,
)
from d7y_node.piece_store import BLOCK_SIZE
from d7y_node.rafs import Filesystem, open_bootstrap
from d7y_node.tasks import TaskManager
from tests.rafs.fixture_paths import FIXTURES
from tests.rafs.image_builder import BLOB_ID, Built, Node, build, directory, regular, symlink

MIB = 1 << 20


def sample_tree() -> tuple[Node, dict[str, Node]]:
    """Every kind of inode, hard links, xattrs, a file with a hole, a big directory."""
    shared = regular(b"hello world\n" * 1000, xattrs={b"user.note": b"shared"})
    big = os.urandom(3 * MIB) + b"tail"
    nodes = {
        "small": regular(b"small file\n" * 40, mode=0o4755, uid=1000, gid=100),
        "big": regular(big, holes=frozenset({1})),
        "sequential": regular(os.urandom(2 * MIB + 5)),
        "empty": regular(b""),
        "shared": shared,
        "symlink": symlink(b"../some/where"),
        "fifo": Node(mode=stat.S_IFIFO | 0o600),
        "socket": Node(mode=stat.S_IFSOCK | 0o600),
        "chardev": Node(mode=stat.S_IFCHR | 0o666, rdev=os.makedev(1, 3)),
        "blockdev": Node(mode=stat.S_IFBLK | 0o660, rdev=os.makedev(259, 70000), gid=6),
        "many": directory({b"entry-%04d" % i: regular(b"%d" % i) for i in range(300)}),
        "sub": directory({b"inner": regular(b"inner\n")}, uid=5, gid=6),
    }
    root = directory(
        {
            b"small": nodes["small"],
            b"big": nodes["big"],
            b"sequential": nodes["sequential"],
            b"empty": nodes["empty"],
            b"link-one": shared,
            b"link-two": shared,
            b"symlink": nodes["symlink"],
            b"fifo": nodes["fifo"],
            b"socket": nodes["socket"],
            b"chardev": nodes["chardev"],
            b"blockdev": nodes["blockdev"],
            b"many": nodes["many"],
            b"sub": nodes["sub"],
        },
        xattrs={b"security.selinux": b"system_u:object_r:root_t:s0",
                b"trusted.overlay.opaque": b"y"},
    )
    return root, nodes


@pytest.fixture(scope="module")
def sample() -> tuple[Built, dict[str, Node]]:
    root, nodes = sample_tree()
    return build(root, prefetch=(nodes["small"], nodes["sub"])), nodes


@dataclass
class MemoryBlobSource:
    """A `BlobSource` over blobs in memory that records what it is asked for."""

    blobs: dict[str, bytes]
    reads: list[tuple[str, int, int]] = field(default_factory=list)
    prefetches: list[tuple[str, int, int]] = field(default_factory=list)
    gate: asyncio.Event | None = None
    failure: Exception | None = None

    async def read(self, blob_id: str, offset: int, length: int) -> bytes:
        self.reads.append((blob_id, offset, length))
        if self.gate is not None:
            await self.gate.wait()
        if self.failure is not None:
            raise self.failure
        return self.blobs[blob_id][offset : offset + length]

    async def prefetch(self, blob_id: str, offset: int, length: int) -> None:
        self.prefetches.append((blob_id, offset, length))


def operations_for(built: Built, source: MemoryBlobSource | None = None,
                   **reader_options: int) -> tuple[RafsOperations, MemoryBlobSource]:
    source = source or MemoryBlobSource({BLOB_ID: built.blob})
    filesystem = open_bootstrap(built.bootstrap)
    reader = ChunkReader(filesystem, source, **reader_options)  # type: ignore[arg-type]
    return RafsOperations(filesystem, reader, entry_timeout=100.0), source


def ino_of(operations: RafsOperations, path: bytes) -> int:
    ino = 1
    for part in path.strip(b"/").split(b"/"):
        if part:
            entry = operations.lookup(ino, part)
            assert entry.attributes is not None, path
            ino = entry.attributes.ino
    return ino


def fuse_errno(call: Callable[..., object], *args: object) -> int:
    """The errno a (synchronous) operation fails with."""
    with pytest.raises(FuseError) as raised:
        call(*args)
    return raised.value.errno


# -- attributes and names -----------------------------------------------------------------------


def test_attributes_show_modes_owners_devices_and_links(
    sample: tuple[Built, dict[str, Node]],
) -> None:
    built, nodes = sample
    operations, _ = operations_for(built)
    root = operations.getattr(1)
    assert root.ino == 1 and stat.S_ISDIR(root.mode) and root.mode & 0o7777 == 0o755
    assert root.nlink == 2 + 2  # ".", its name, and the ".." of two subdirectories
    small = operations.getattr(ino_of(operations, b"/small"))
    assert (small.mode, small.uid, small.gid, small.size) == (stat.S_IFREG | 0o4755, 1000, 100,
                                                               len(nodes["small"].data))
    assert (small.mtime, small.blocks, small.block_size) == (1_700_000_000, 1, 4096)
    one, two = ino_of(operations, b"/link-one"), ino_of(operations, b"/link-two")
    assert one == two and operations.getattr(one).nlink == 2
    chardev = operations.getattr(ino_of(operations, b"/chardev"))
    blockdev = operations.getattr(ino_of(operations, b"/blockdev"))
    assert stat.S_ISCHR(chardev.mode) and chardev.rdev == os.makedev(1, 3)
    assert stat.S_ISBLK(blockdev.mode) and blockdev.rdev == os.makedev(259, 70000)
    assert blockdev.gid == 6
    for name, kind in ((b"fifo", stat.S_IFIFO), (b"socket", stat.S_IFSOCK),
                       (b"symlink", stat.S_IFLNK)):
        attributes = operations.getattr(ino_of(operations, b"/" + name))
        assert stat.S_IFMT(attributes.mode) == kind and attributes.rdev == 0
    sub = operations.getattr(ino_of(operations, b"/sub"))
    assert (sub.uid, sub.gid, sub.nlink) == (5, 6, 2)


def test_owners_are_the_servers_when_the_image_has_none() -> None:
    bootstrap = FIXTURES / "v5" / "sha256-nocompress-repeatable"
    if not bootstrap.is_file():
        pytest.skip(f"Nydus fixtures not found at {FIXTURES}")
    filesystem = open_bootstrap(bootstrap.read_bytes())
    assert not filesystem.explicit_uid_gid
    operations = RafsOperations(filesystem, ChunkReader(filesystem, MemoryBlobSource({})))
    attributes = operations.getattr(1)
    assert (attributes.uid, attributes.gid) == (os.geteuid(), os.getegid())


def test_lookup_answers_and_errors(sample: tuple[Built, dict[str, Node]]) -> None:
    built, _ = sample
    operations, _ = operations_for(built)
    missing = operations.lookup(1, b"no-such-name")
    assert missing.attributes is None and missing.entry_timeout == 100.0
    sub = ino_of(operations, b"/sub")
    parent = operations.lookup(sub, b"..").attributes
    assert parent is not None and parent.ino == 1
    small = ino_of(operations, b"/small")
    assert fuse_errno(operations.lookup, small, b"x") == errno.ENOTDIR
    assert fuse_errno(operations.lookup, 1, b"n" * 256) == errno.ENAMETOOLONG
    assert fuse_errno(operations.getattr, 10**9) == errno.EIO  # not an inode of the image


def test_readdir_offsets_resume_exactly(sample: tuple[Built, dict[str, Node]]) -> None:
    built, _ = sample
    operations, _ = operations_for(built)
    many = ino_of(operations, b"/many")
    full = list(operations.readdir(many, 0))
    assert [item.name for item in full[:2]] == [b".", b".."]
    assert full[0].ino == many and full[1].ino == 1
    assert sorted(item.name for item in full[2:]) == [b"entry-%04d" % i for i in range(300)]
    assert [item.next_offset for item in full] == list(range(1, len(full) + 1))
    for offset in range(len(full) + 1):
        assert list(operations.readdir(many, offset)) == full[offset:]
    # As the kernel lists it: small buffers, each continuing at the last entry's offset.
    names: list[bytes] = []
    offset = 0
    while True:
        items = operations.readdir(many, offset)
        packed = encode_dirents(items, 200)
        if not packed:
            break
        position = 0
        while position < len(packed):
            next_offset = int.from_bytes(packed[position + 8 : position + 16], "little")
            length = int.from_bytes(packed[position + 16 : position + 20], "little")
            names.append(packed[position + 24 : position + 24 + length])
            position += (24 + length + 7) & ~7
            offset = next_offset
    assert names == [item.name for item in full]
    assert fuse_errno(operations.readdir, ino_of(operations, b"/small"), 0) == errno.ENOTDIR
    assert fuse_errno(operations.readdir, many, -1) == errno.EINVAL
    assert fuse_errno(operations.opendir, ino_of(operations, b"/small"), 0) == errno.ENOTDIR


def test_links_xattrs_and_open_errors(sample: tuple[Built, dict[str, Node]]) -> None:
    built, _ = sample
    operations, _ = operations_for(built)
    assert operations.readlink(ino_of(operations, b"/symlink")) == b"../some/where"
    small = ino_of(operations, b"/small")
    assert fuse_errno(operations.readlink, small) == errno.EINVAL
    assert sorted(operations.listxattr(1)) == [b"security.selinux", b"trusted.overlay.opaque"]
    assert operations.getxattr(1, b"trusted.overlay.opaque") == b"y"
    assert operations.getxattr(ino_of(operations, b"/link-two"), b"user.note") == b"shared"
    assert fuse_errno(operations.getxattr, small, b"user.none") == errno.ENODATA
    assert operations.listxattr(small) == []
    opened = operations.open(small, os.O_RDONLY)
    assert opened.flags & OPEN_KEEP_CACHE and opened.handle in operations.open_files
    operations.release(small, opened.handle)
    assert operations.open_files == {}
    assert fuse_errno(operations.open, small, os.O_WRONLY) == errno.EROFS
    assert fuse_errno(operations.open, small, os.O_RDWR) == errno.EROFS
    assert fuse_errno(operations.open, 1, os.O_RDONLY) == errno.EISDIR
    statistics = operations.statfs(1)
    assert statistics.files == operations.filesystem.inode_count
    assert statistics.block_size == 4096 and statistics.name_length == 255


# -- reads --------------------------------------------------------------------------------------


def chunk_ranges(filesystem: Filesystem, ino: int) -> list[tuple[str, int, int]]:
    return [(BLOB_ID, chunk.compressed_offset, chunk.compressed_size)
            for chunk in filesystem.chunks(ino)]


async def test_a_read_asks_only_for_the_chunks_it_covers(
    sample: tuple[Built, dict[str, Node]],
) -> None:
    built, nodes = sample
    operations, source = operations_for(built)
    filesystem = operations.filesystem
    small = ino_of(operations, b"/small")
    assert await operations.read(small, 1, 0, 1 << 20) == nodes["small"].data
    assert source.reads == chunk_ranges(filesystem, small)

    big = ino_of(operations, b"/big")
    data = nodes["big"].data
    source.reads.clear()
    # The middle of chunk 0 only.
    assert await operations.read(big, 1, 5000, 4096) == data[5000:9096]
    assert source.reads == chunk_ranges(filesystem, big)[:1]
    # Chunk 1 is a hole: zeros, no blob read.
    source.reads.clear()
    assert await operations.read(big, 1, MIB + 10, 100) == bytes(100)
    assert source.reads == []
    # Across the hole into chunk 2, and a short read at the end of the file.
    expected = bytes(MIB - 100) + data[2 * MIB : 2 * MIB + 100]
    assert await operations.read(big, 1, MIB + 100, MIB) == expected
    assert source.reads == chunk_ranges(filesystem, big)[1:2]
    assert await operations.read(big, 1, len(data) - 4, 100) == b"tail"
    assert await operations.read(big, 1, len(data) + 10, 100) == b""
    assert await operations.read(ino_of(operations, b"/empty"), 1, 0, 4096) == b""


async def test_sequential_kernel_reads_decode_each_chunk_once(
    sample: tuple[Built, dict[str, Node]],
) -> None:
    built, nodes = sample
    operations, source = operations_for(built)
    ino = ino_of(operations, b"/sequential")
    data = nodes["sequential"].data
    parts = [await operations.read(ino, 1, offset, 128 * 1024)
             for offset in range(0, len(data), 128 * 1024)]
    assert b"".join(parts) == data
    assert len(source.reads) == 3  # two whole chunks and the 5-byte tail
    assert operations.reader.chunks_decoded == 3


async def test_sequential_reads_fetch_the_next_chunk_ahead_random_reads_do_not(
    sample: tuple[Built, dict[str, Node]],
) -> None:
    built, nodes = sample
    operations, source = operations_for(built)
    ino = ino_of(operations, b"/sequential")
    first, second, _tail = chunk_ranges(operations.filesystem, ino)
    data = nodes["sequential"].data
    assert await operations.read(ino, 1, 0, 4096) == data[:4096]
    assert await operations.read(ino, 1, 500_000, 4096) == data[500_000:504_096]  # a jump
    await asyncio.sleep(0.01)
    assert source.reads == [first]
    assert await operations.read(ino, 1, 504_096, 4096) == data[504_096:508_192]  # continues
    await asyncio.sleep(0.01)
    assert source.reads == [first, second]  # the next chunk, before anyone asked for it
    assert await operations.read(ino, 1, MIB, 4096) == data[MIB : MIB + 4096]
    assert source.reads == [first, second]
    assert operations.reader.fetches_in_flight == 0


async def test_adjacent_chunks_come_in_one_blob_read(
    sample: tuple[Built, dict[str, Node]],
) -> None:
    built, nodes = sample
    operations, source = operations_for(built)
    ino = ino_of(operations, b"/sequential")
    chunks = operations.filesystem.chunks(ino)
    data = nodes["sequential"].data
    assert await operations.read(ino, 1, MIB - 10, 20) == data[MIB - 10 : MIB + 10]
    first, second = chunks[0], chunks[1]
    assert source.reads == [(BLOB_ID, first.compressed_offset,
                             first.compressed_size + second.compressed_size)]


async def test_concurrent_reads_of_a_chunk_share_one_fetch(
    sample: tuple[Built, dict[str, Node]],
) -> None:
    built, nodes = sample
    source = MemoryBlobSource({BLOB_ID: built.blob}, gate=asyncio.Event())
    operations, _ = operations_for(built, source, read_ahead_bytes=0)
    ino = ino_of(operations, b"/sequential")
    reads = [asyncio.create_task(operations.read(ino, 1, offset, 4096))
             for offset in range(0, 64 * 4096, 4096)]
    await asyncio.sleep(0.01)
    assert source.gate is not None
    source.gate.set()
    results = await asyncio.gather(*reads)
    assert b"".join(results) == nodes["sequential"].data[: 64 * 4096]
    assert len(source.reads) == 1


async def test_an_interrupted_reader_does_not_fail_the_other(
    sample: tuple[Built, dict[str, Node]],
) -> None:
    built, nodes = sample
    source = MemoryBlobSource({BLOB_ID: built.blob}, gate=asyncio.Event())
    operations, _ = operations_for(built)
    operations.reader.source = source
    ino = ino_of(operations, b"/small")
    first = asyncio.create_task(operations.read(ino, 1, 0, 10))
    second = asyncio.create_task(operations.read(ino, 1, 10, 10))
    await asyncio.sleep(0.01)
    first.cancel()
    assert source.gate is not None
    source.gate.set()
    assert await second == nodes["small"].data[10:20]
    assert first.cancelled()


async def test_a_chunk_that_does_not_verify_is_eio_and_not_kept(
    sample: tuple[Built, dict[str, Node]],
) -> None:
    built, nodes = sample
    operations, source = operations_for(built)
    small = ino_of(operations, b"/small")
    chunk = operations.filesystem.chunks(small)[0]
    corrupt = bytearray(built.blob)
    corrupt[chunk.compressed_offset + chunk.compressed_size // 2] ^= 0xFF
    source.blobs[BLOB_ID] = bytes(corrupt)
    with pytest.raises(FuseError) as raised:
        await operations.read(small, 1, 0, 100)
    assert raised.value.errno == errno.EIO
    source.blobs[BLOB_ID] = built.blob  # the next read fetches again and succeeds
    assert await operations.read(small, 1, 0, 100) == nodes["small"].data[:100]
    assert len(source.reads) == 2


async def test_fetch_failures_and_short_blobs_are_eio(
    sample: tuple[Built, dict[str, Node]],
) -> None:
    built, _ = sample
    source = MemoryBlobSource({BLOB_ID: built.blob}, failure=UpstreamUnavailable("gone"))
    operations, _ = operations_for(built, source)
    small = ino_of(operations, b"/small")
    for failure in (UpstreamUnavailable("gone"), OSError(errno.ENOENT, "no blob file")):
        source.failure = failure
        with pytest.raises(FuseError) as raised:
            await operations.read(small, 1, 0, 100)
        assert raised.value.errno == errno.EIO
    source.failure = None
    source.blobs[BLOB_ID] = built.blob[:100]  # truncated blob
    with pytest.raises(FuseError) as raised:
        await operations.read(small, 1, 0, 100)
    assert raised.value.errno == errno.EIO
    with pytest.raises(FuseError) as raised:
        await operations.read(1, 1, 0, 100)  # a directory
    assert raised.value.errno == errno.EINVAL


async def test_a_chunk_claiming_a_huge_stored_size_is_refused(
    sample: tuple[Built, dict[str, Node]],
) -> None:
    built, _ = sample
    operations, source = operations_for(built)
    small = ino_of(operations, b"/small")
    chunk = operations.filesystem.chunks(small)[0]
    hostile = dataclasses.replace(chunk, compressed_size=1 << 40)
    with pytest.raises(RafsError):
        await operations.reader.chunks([hostile])
    assert source.reads == []  # nothing was asked of the source, nothing allocated


def test_chunk_cache_is_bounded_in_bytes() -> None:
    cache = ChunkCache(100)
    for index in range(5):
        cache.put((0, index, 1), bytes(30))
    assert cache.size == 90 and len(cache) == 3
    assert cache.get((0, 0, 1)) is None and cache.get((0, 4, 1)) is not None
    cache.get((0, 2, 1))  # recently used: survives the next insert
    cache.put((0, 9, 1), bytes(30))
    assert cache.get((0, 2, 1)) is not None and cache.get((0, 3, 1)) is None
    cache.put((0, 10, 1), bytes(101))  # bigger than the whole cache: not kept
    assert cache.get((0, 10, 1)) is None and cache.size <= 100


# -- prefetch -----------------------------------------------------------------------------------


def test_merge_ranges() -> None:
    assert merge_ranges([(0, 10, 5), (0, 0, 10), (1, 0, 4), (0, 20, 1), (0, 12, 2)]) == [
        (0, 0, 15), (0, 20, 1), (1, 0, 4)]


async def test_token_bucket_holds_the_average_rate() -> None:
    now = [0.0]
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    bucket = TokenBucket(1000, 500, clock=lambda: now[0], sleep=sleep)
    await bucket.take(500)  # the burst
    assert slept == []
    for _ in range(10):
        await bucket.take(250)
    assert now[0] == pytest.approx(2.5)  # 2500 bytes beyond the burst at 1000/s
    now[0] += 100  # idle: refills to the burst, no more
    await bucket.take(500)
    await bucket.take(100)
    assert now[0] == pytest.approx(102.6)
    with pytest.raises(ValueError):
        TokenBucket(0, 1)


async def test_prefetch_fetches_the_table_files_then_whole_blobs(
    sample: tuple[Built, dict[str, Node]],
) -> None:
    built, _ = sample
    filesystem = open_bootstrap(built.bootstrap)
    source = MemoryBlobSource({BLOB_ID: built.blob})
    operations = RafsOperations(filesystem, ChunkReader(filesystem, source))
    small, inner = ino_of(operations, b"/small"), ino_of(operations, b"/sub/inner")
    prefetcher = Prefetcher(filesystem, source, MountOptions())
    assert sorted(prefetcher.table_files()) == sorted([small, inner])  # "sub" expanded
    await prefetcher.run()
    wanted = merge_ranges([(0, offset, length) for _blob, offset, length in
                           chunk_ranges(filesystem, small) + chunk_ranges(filesystem, inner)])
    assert source.prefetches == [(BLOB_ID, offset, length) for _i, offset, length in wanted]
    assert prefetcher.files_prefetched == 2 and source.reads == []

    source.prefetches.clear()
    blob_size = filesystem.blobs[0].compressed_size
    whole = Prefetcher(filesystem, source, MountOptions(prefetch_files=False, prefetch_blobs=True,
                                                        prefetch_bandwidth=1 << 40))
    await whole.run()
    assert sum(length for _blob, _offset, length in source.prefetches) == blob_size
    assert source.prefetches[0][:2] == (BLOB_ID, 0)


# -- blob sources -------------------------------------------------------------------------------


async def test_directory_blob_source(tmp_path: Path) -> None:
    (tmp_path / BLOB_ID).write_bytes(b"0123456789")
    async with DirectoryBlobSource(tmp_path) as source:
        assert await source.read(BLOB_ID, 2, 5) == b"23456"
        await source.prefetch(BLOB_ID, 0, 10)
        with pytest.raises(RafsError):
            await source.read(BLOB_ID, 8, 5)  # past the end
        with pytest.raises(RafsError):
            await source.read("../etc", 0, 1)
        with pytest.raises(FileNotFoundError):
            await source.read("cd" * 32, 0, 1)


class BlobPieceSource:
    """A `PieceSource` over one blob in memory, recording the ranges asked for."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.reads: list[tuple[int, int]] = []
        self.broken = False

    async def content_length(self) -> int:
        return len(self.data)

    async def read(self, offset: int, length: int) -> AsyncIterator[bytes]:
        self.reads.append((offset, length))
        if self.broken:
            raise UpstreamUnavailable("origin is down")
        for start in range(offset, offset + length, 64 * 1024):
            yield self.data[start : min(offset + length, start + 64 * 1024)]
            await asyncio.sleep(0)


async def test_task_blob_source_fetches_only_the_pieces_a_read_needs(
    task_manager: TaskManager,
) -> None:
    blob = os.urandom(9 * MIB + 123)
    blob_id = hashlib.sha256(blob).hexdigest()
    origin = BlobPieceSource(blob)
    async with TaskBlobSource(task_manager, lambda _blob_id: origin) as source:
        assert await source.read(blob_id, 5 * MIB + 7, 100) == blob[5 * MIB + 7 : 5 * MIB + 107]
        info = task_manager.info(f"sha256:{blob_id}")
        assert info is not None and not info.complete
        piece = info.piece_size
        assert {offset // piece for offset, _length in origin.reads} == {(5 * MIB + 7) // piece}
        # Only the block holding those bytes came (a lazy task fetches blocks, not pieces).
        assert [length for _offset, length in origin.reads] == [BLOCK_SIZE]
        assert info.pieces_done == 0
        # The piece store is the cache: the same bytes again need nothing from the origin.
        reads = len(origin.reads)
        assert await source.read(blob_id, 5 * MIB + 7, 10) == blob[5 * MIB + 7 : 5 * MIB + 17]
        assert len(origin.reads) == reads
        await source.prefetch(blob_id, 0, piece + 1)
        # Piece 0 whole (held), and one block of piece 1.
        assert task_manager.info(f"sha256:{blob_id}").pieces_done == 1  # type: ignore[union-attr]
        with pytest.raises(RafsError):
            await source.read(blob_id, len(blob) - 1, 2)
        with pytest.raises(RafsError):
            await source.read("not-a-digest", 0, 1)


async def test_a_read_through_task_manager_after_a_failed_download_retries(
    task_manager: TaskManager, sample: tuple[Built, dict[str, Node]],
) -> None:
    built, nodes = sample
    blob_id = hashlib.sha256(built.blob).hexdigest()
    origin = BlobPieceSource(built.blob)
    origin.broken = True
    filesystem = open_bootstrap(built.bootstrap)
    async with TaskBlobSource(task_manager, lambda _blob_id: origin) as source:
        renamed = _RenamedSource(source, {BLOB_ID: blob_id})
        operations = RafsOperations(filesystem, ChunkReader(filesystem, renamed))
        small = ino_of(operations, b"/small")
        with pytest.raises(FuseError) as raised:
            await operations.read(small, 1, 0, 100)
        assert raised.value.errno == errno.EIO
        origin.broken = False  # the origin is back: the next read opens a fresh download
        assert await operations.read(small, 1, 0, 100) == nodes["small"].data[:100]


@dataclass
class _RenamedSource:
    """The builder names its blob `BLOB_ID`; the task manager needs the blob's real digest."""

    inner: TaskBlobSource
    names: dict[str, str]

    async def read(self, blob_id: str, offset: int, length: int) -> bytes:
        return await self.inner.read(self.names[blob_id], offset, length)

    async def prefetch(self, blob_id: str, offset: int, length: int) -> None:
        await self.inner.prefetch(self.names[blob_id], offset, length)
