"""Real FUSE mounts by the kernel: the real Nydus images and synthetic ones, compared with what
the RAFS reader says (and, for v5, with the `.result` files the Nydus project recorded), lazy
reads counted at the blob source, and the mount's life: unmount from outside, a stale mount left
by a dead server, a mount backed by the `TaskManager`.

Every file access to a mount runs in a thread: the test's loop is the one serving the mount.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from d7y_node import fuse_kernel
from d7y_node.fuse_kernel import is_mount_point
from d7y_node.fuse_mount import (
    BlobSource,
    ChunkReader,
    DirectoryBlobSource,
    MountOptions,
    RafsMount,
    RafsOperations,
    TaskBlobSource,
    clean_stale_mount,
)
from d7y_node.rafs import Filesystem, open_bootstrap
from d7y_node.rafs.blob import FileReader, read_file_range
from d7y_node.tasks import TaskManager
from tests.rafs.fixture_paths import FIXTURES
from tests.rafs.image_builder import BLOB_ID, build
from tests.rafs.test_fixtures import parse_result, tree_type
from tests.test_fuse_mount import BlobPieceSource, sample_tree

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                       reason="mounting FUSE needs root and /dev/fuse"),
]

NO_PREFETCH = MountOptions(prefetch_files=False)


@dataclass
class CountingSource:
    """A `BlobSource` that records the ranges asked of the one it wraps."""

    inner: BlobSource
    reads: list[tuple[str, int, int]]
    prefetches: list[tuple[str, int, int]] = field(default_factory=list)

    async def read(self, blob_id: str, offset: int, length: int) -> bytes:
        self.reads.append((blob_id, offset, length))
        return await self.inner.read(blob_id, offset, length)

    async def prefetch(self, blob_id: str, offset: int, length: int) -> None:
        self.prefetches.append((blob_id, offset, length))
        await self.inner.prefetch(blob_id, offset, length)


Snapshot = dict[str, dict[str, Any]]


def snapshot_mount(root: str) -> Snapshot:
    """What a program sees below `root`: every path's stat, link target, xattrs, content md5."""
    result: Snapshot = {}

    def record(path: str, relative: str) -> None:
        st = os.lstat(path)
        entry: dict[str, Any] = {
            "mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid, "nlink": st.st_nlink,
            "size": st.st_size if not stat.S_ISDIR(st.st_mode) else None,
            "rdev": st.st_rdev, "ino": st.st_ino, "mtime": st.st_mtime_ns,
            "xattrs": {name: os.getxattr(path, name, follow_symlinks=False)
                       for name in os.listxattr(path, follow_symlinks=False)},
        }
        if stat.S_ISLNK(st.st_mode):
            entry["target"] = os.readlink(path)
        if stat.S_ISREG(st.st_mode):
            with open(path, "rb") as file:
                entry["md5"] = hashlib.md5(file.read()).hexdigest()
        result[relative] = entry

    record(root, "/")
    for directory, names, files in os.walk(root):
        for name in names + files:
            path = os.path.join(directory, name)
            record(path, "/" + os.path.relpath(path, root))
    return result


def snapshot_reader(filesystem: Filesystem, blob_dir: Path) -> Snapshot:
    """The same, from the RAFS reader directly."""
    readers = [FileReader(blob_dir / blob.blob_id) for blob in filesystem.blobs]
    owner = None if filesystem.explicit_uid_gid else (os.geteuid(), os.getegid())
    result: Snapshot = {}
    try:
        for path, attributes in filesystem.walk():
            uid, gid = owner or (attributes.uid, attributes.gid)
            entry: dict[str, Any] = {
                "mode": attributes.mode, "uid": uid, "gid": gid, "nlink": attributes.nlink,
                "size": None if attributes.is_directory else attributes.size,
                "rdev": attributes.rdev, "ino": attributes.ino,
                "mtime": attributes.mtime * 1_000_000_000 + attributes.mtime_nanoseconds,
                "xattrs": {name.decode(): value
                           for name, value in filesystem.xattrs(attributes.ino).items()},
            }
            if attributes.is_symlink:
                entry["target"] = filesystem.readlink(attributes.ino).decode()
            if attributes.is_regular:
                data = read_file_range(filesystem, attributes.ino, 0, attributes.size, readers)
                entry["md5"] = hashlib.md5(data).hexdigest()
            result[path.decode()] = entry
    finally:
        for reader in readers:
            reader.close()
    return result


@pytest.fixture
def mountpoint(tmp_path: Path) -> Path:
    path = tmp_path / "mnt"
    path.mkdir()
    return path


async def in_thread(function: Any, *args: Any) -> Any:
    return await asyncio.wait_for(asyncio.to_thread(function, *args), 60)


FIXTURE_IMAGES = {
    "v6": ("v6/rafs-v6-2.2.boot", "v6"),
    "v5-sha256-none": ("v5/sha256-nocompress-repeatable", "v5"),
    "v5-blake3-lz4": ("v5/blake3-lz4_block-2019.boot", "v5"),
}


@pytest.mark.parametrize("image", sorted(FIXTURE_IMAGES))
async def test_real_nydus_images_mount_as_the_reader_sees_them(
    image: str, mountpoint: Path
) -> None:
    if not FIXTURES.is_dir():
        pytest.skip(f"Nydus fixtures not found at {FIXTURES} (shared/ is not beside the repo)")
    bootstrap, blobs = FIXTURE_IMAGES[image]
    filesystem = open_bootstrap((FIXTURES / bootstrap).read_bytes())
    expected = snapshot_reader(filesystem, FIXTURES / blobs)
    async with (
        DirectoryBlobSource(FIXTURES / blobs) as source,
        RafsMount(FIXTURES / bootstrap, mountpoint, source) as mount,
    ):
        seen = await in_thread(snapshot_mount, str(mountpoint))
        statistics = await in_thread(os.statvfs, str(mountpoint))
        assert is_mount_point(str(mountpoint))
        assert mount.filesystem.inode_count == statistics.f_files
    assert seen == expected
    assert not is_mount_point(str(mountpoint))
    result = FIXTURES / (bootstrap.removesuffix(".boot") + ".result")
    if result.is_file():
        entries, md5s = parse_result(result.read_text())
        assert {path.encode(): (tree_type(entry["mode"]), entry.get("target", "").encode() or None)
                for path, entry in seen.items() if path != "/"} == entries
        assert {path.encode(): entry["md5"] for path, entry in seen.items()
                if "md5" in entry} == md5s


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The sample tree of test_fuse_mount as bootstrap + blob files."""
    root, nodes = sample_tree()
    built = build(root, prefetch=(nodes["small"],))
    directory = tmp_path_factory.mktemp("synthetic")
    (directory / "image.boot").write_bytes(built.bootstrap)
    (directory / "blobs").mkdir()
    (directory / "blobs" / BLOB_ID).write_bytes(built.blob)
    return directory / "image.boot", directory / "blobs"


async def test_every_kind_of_inode_shows_through_the_kernel(
    synthetic: tuple[Path, Path], mountpoint: Path
) -> None:
    bootstrap, blobs = synthetic
    filesystem = open_bootstrap(bootstrap.read_bytes())
    expected = snapshot_reader(filesystem, blobs)

    def more_checks(root: str) -> None:
        # Hard links share an inode; a device node shows its numbers; "." and ".." are listed.
        one, two = os.lstat(f"{root}/link-one"), os.lstat(f"{root}/link-two")
        assert one.st_ino == two.st_ino and one.st_nlink == 2
        blockdev = os.lstat(f"{root}/blockdev").st_rdev
        assert (os.major(blockdev), os.minor(blockdev)) == (259, 70000)
        assert subprocess.run(["ls", "-a", f"{root}/sub"], capture_output=True, text=True,
                              check=True).stdout.split() == [".", "..", "inner"]
        assert len(os.listdir(f"{root}/many")) == 300
        with pytest.raises(OSError) as raised:
            os.getxattr(f"{root}/small", "user.none")
        assert raised.value.errno == errno.ENODATA
        with pytest.raises(OSError) as raised:
            os.open(f"{root}/small", os.O_RDWR)
        assert raised.value.errno == errno.EROFS
        with pytest.raises(OSError) as raised:
            os.setxattr(f"{root}/small", "user.x", b"1")
        assert raised.value.errno == errno.EROFS
        with pytest.raises(FileNotFoundError):
            os.lstat(f"{root}/no-such-file")
        with pytest.raises(NotADirectoryError):
            os.lstat(f"{root}/small/x")
        # Random reads across chunk boundaries and the hole.
        with open(f"{root}/big", "rb") as file:
            file.seek((1 << 20) - 3)
            chunk = file.read(8)
        assert chunk[3:] == bytes(5)

    async with (
        DirectoryBlobSource(blobs) as source,
        RafsMount(bootstrap, mountpoint, source) as mount,
    ):
        seen = await in_thread(snapshot_mount, str(mountpoint))
        await in_thread(more_checks, str(mountpoint))
        assert mount.prefetcher is not None
    assert seen == expected


async def test_reading_one_small_file_reads_only_its_chunks(
    synthetic: tuple[Path, Path], mountpoint: Path
) -> None:
    bootstrap, blobs = synthetic
    filesystem = open_bootstrap(bootstrap.read_bytes())
    small = filesystem.lookup(1, b"small")
    assert small is not None
    wanted = [(BLOB_ID, chunk.compressed_offset, chunk.compressed_size)
              for chunk in filesystem.chunks(small.ino)]
    async with DirectoryBlobSource(blobs) as inner:
        source = CountingSource(inner, [])
        async with RafsMount(bootstrap, mountpoint, source, NO_PREFETCH):
            await in_thread(snapshot_stat_only, str(mountpoint))
            assert source.reads == []  # metadata needs no blob bytes
            data = await in_thread((mountpoint / "small").read_bytes)
            assert data == b"small file\n" * 40
            await in_thread((mountpoint / "small").read_bytes)  # the page cache answers
    assert source.reads == wanted


async def test_the_prefetch_table_is_fetched_once_mounted(
    synthetic: tuple[Path, Path], mountpoint: Path
) -> None:
    bootstrap, blobs = synthetic
    filesystem = open_bootstrap(bootstrap.read_bytes())
    small = filesystem.lookup(1, b"small")
    assert small is not None
    wanted = [(BLOB_ID, chunk.compressed_offset, chunk.compressed_size)
              for chunk in filesystem.chunks(small.ino)]
    async with DirectoryBlobSource(blobs) as inner:
        source = CountingSource(inner, [])
        async with RafsMount(bootstrap, mountpoint, source) as mount:
            assert mount.prefetcher is not None
            await asyncio.wait_for(mount.prefetcher.finished.wait(), 10)
            assert mount.prefetcher.files_prefetched == 1
            assert source.prefetches == wanted  # the table names only /small
            assert source.reads == []


def snapshot_stat_only(root: str) -> int:
    count = 0
    for directory, names, files in os.walk(root):
        for name in names + files:
            os.lstat(os.path.join(directory, name))
            count += 1
    return count


@dataclass
class StuckSource:
    """A `BlobSource` whose reads never finish (an origin that hangs)."""

    asked: asyncio.Event

    async def read(self, blob_id: str, offset: int, length: int) -> bytes:
        self.asked.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def prefetch(self, blob_id: str, offset: int, length: int) -> None:
        pass


async def test_a_hung_fetch_traps_neither_its_reader_nor_the_unmount(
    synthetic: tuple[Path, Path], mountpoint: Path
) -> None:
    bootstrap, _blobs = synthetic
    source = StuckSource(asyncio.Event())
    mount = RafsMount(bootstrap, mountpoint, source, NO_PREFETCH)
    async with mount:
        reader = await asyncio.create_subprocess_exec(
            "cat", str(mountpoint / "small"), stdout=asyncio.subprocess.DEVNULL
        )
        await asyncio.wait_for(source.asked.wait(), 10)
        reader.kill()
        assert await asyncio.wait_for(reader.wait(), 10) == -9
        assert mount.reader.fetches_in_flight == 1  # still hanging
        exit_started = asyncio.get_running_loop().time()
    assert asyncio.get_running_loop().time() - exit_started < 5
    assert mount.reader.fetches_in_flight == 0
    assert not is_mount_point(str(mountpoint))


async def test_unmount_from_outside_ends_serving(
    synthetic: tuple[Path, Path], mountpoint: Path
) -> None:
    bootstrap, blobs = synthetic
    async with (
        DirectoryBlobSource(blobs) as source,
        RafsMount(bootstrap, mountpoint, source, NO_PREFETCH) as mount,
    ):
        await in_thread(lambda: subprocess.run(["umount", str(mountpoint)], check=True))
        await asyncio.wait_for(mount.serve(), 10)
        assert not is_mount_point(str(mountpoint))


async def test_a_stale_mount_is_cleaned(synthetic: tuple[Path, Path], mountpoint: Path) -> None:
    bootstrap, blobs = synthetic
    assert not await clean_stale_mount(str(mountpoint))  # nothing mounted: left alone
    underneath = (await in_thread(os.stat, str(mountpoint))).st_ino
    request = fuse_kernel.MountRequest(str(mountpoint))
    fd = await in_thread(fuse_kernel.mount, request)
    try:
        os.close(fd)  # the server dies: the mount stays, dead
        with pytest.raises(OSError) as raised:
            await in_thread(os.stat, str(mountpoint))
        assert raised.value.errno == errno.ENOTCONN
        assert await clean_stale_mount(str(mountpoint))
        assert not is_mount_point(str(mountpoint))
        assert (await in_thread(os.stat, str(mountpoint))).st_ino == underneath
    finally:
        if is_mount_point(str(mountpoint)):
            fuse_kernel.unmount(str(mountpoint))
    # A live mount is not touched.
    async with (
        DirectoryBlobSource(blobs) as source,
        RafsMount(bootstrap, mountpoint, source, NO_PREFETCH),
    ):
        assert not await clean_stale_mount(str(mountpoint))
        assert is_mount_point(str(mountpoint))
    # A mount over a stale one cleans it first (a node restarting after a crash).
    os.close(await in_thread(fuse_kernel.mount, request))
    async with (
        DirectoryBlobSource(blobs) as source,
        RafsMount(bootstrap, mountpoint, source, NO_PREFETCH),
    ):
        assert await in_thread((mountpoint / "sub" / "inner").read_bytes) == b"inner\n"
    assert not is_mount_point(str(mountpoint))


async def test_mount_backed_by_the_task_manager_fetches_only_needed_pieces(
    synthetic: tuple[Path, Path], mountpoint: Path, task_manager: TaskManager,
) -> None:
    bootstrap, blobs = synthetic
    blob = (blobs / BLOB_ID).read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    origin = BlobPieceSource(blob)
    # The builder names its blob BLOB_ID; the task manager knows blobs by their digest.
    source = TaskBlobSource(task_manager, lambda _blob_id: origin)

    @dataclass
    class ByDigest:
        async def read(self, blob_id: str, offset: int, length: int) -> bytes:
            return await source.read(digest, offset, length)

        async def prefetch(self, blob_id: str, offset: int, length: int) -> None:
            await source.prefetch(digest, offset, length)

    filesystem = open_bootstrap(bootstrap.read_bytes())
    small = filesystem.lookup(1, b"small")
    assert small is not None
    chunk = filesystem.chunks(small.ino)[0]
    async with source, RafsMount(bootstrap, mountpoint, ByDigest(), NO_PREFETCH):
        data = await in_thread((mountpoint / "small").read_bytes)
        assert data == b"small file\n" * 40
        info = task_manager.info(f"sha256:{digest}")
        assert info is not None and not info.complete
        pieces = {offset // info.piece_size for offset, _length in origin.reads}
        assert pieces == {
            index for index in range(info.piece_count)
            if index * info.piece_size < chunk.compressed_offset + chunk.compressed_size
            and (index + 1) * info.piece_size > chunk.compressed_offset
        }


async def test_mounting_through_fusermount3(
    synthetic: tuple[Path, Path], mountpoint: Path
) -> None:
    """The path a non-root node takes: fusermount3 mounts and hands over /dev/fuse."""
    if shutil.which("fusermount3") is None:
        pytest.skip("fusermount3 is not installed (Debian package fuse3)")
    bootstrap, blobs = synthetic
    filesystem = open_bootstrap(bootstrap.read_bytes())
    request = fuse_kernel.MountRequest(str(mountpoint), allow_other=False)
    fd = await in_thread(lambda: fuse_kernel.mount(request, use_fusermount=True))
    async with DirectoryBlobSource(blobs) as source:
        operations = RafsOperations(filesystem, ChunkReader(filesystem, source))
        session = fuse_kernel.FuseSession(fd, operations, name="fusermount3")
        serving = asyncio.create_task(session.serve())
        try:
            assert await in_thread((mountpoint / "sub" / "inner").read_bytes) == b"inner\n"
            mounts = await in_thread(Path("/proc/self/mounts").read_text)
            assert f"{mountpoint} fuse.rafs ro," in mounts
        finally:
            await in_thread(lambda: fuse_kernel.unmount(str(mountpoint), use_fusermount=True))
            await asyncio.wait_for(serving, 10)
    assert not is_mount_point(str(mountpoint))


async def test_many_mounts_in_one_process(
    synthetic: tuple[Path, Path], tmp_path: Path
) -> None:
    bootstrap, blobs = synthetic
    points = [tmp_path / f"mnt{index}" for index in range(3)]
    for point in points:
        point.mkdir()
    async with DirectoryBlobSource(blobs) as source:
        mounts = [RafsMount(bootstrap, point, source, NO_PREFETCH) for point in points]
        for mount in mounts:
            await mount.__aenter__()
        try:
            contents = await asyncio.gather(
                *(in_thread((point / "sub" / "inner").read_bytes) for point in points)
            )
            assert contents == [b"inner\n"] * 3
        finally:
            for mount in mounts:
                await mount.close()
    assert not any(is_mount_point(str(point)) for point in points)
