"""Tests of `d7y_node.nydus_snapshots`: which layers containerd skips, the bootstrap check at commit
(real Nydus bootstraps from ../shared/fixtures/nydus, images written in the test with the RAFS
writer, and broken ones), and, with a kernel FUSE mount, the lazy mount of a bootstrap snapshot
whose blobs come through a real `TaskManager` from a registry double (only the pieces read), its
removal, and its return after a restart.

The containerd side (the gRPC service, overlay mounts) is `snapshotter.py`'s; full runs with
containerd are in tests/integration.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from d7y_node.config import RegistryConfig
from d7y_node.errors import InvalidRequest, RafsError
from d7y_node.fuse_kernel import is_mount_point
from d7y_node.fuse_mount import DirectoryBlobSource
from d7y_node.metrics import Metrics
from d7y_node.mounts import ImageResolver
from d7y_node.nydus_snapshots import (
    BLOB_LABEL,
    BOOTSTRAP_LABEL,
    BOOTSTRAP_PATH,
    IMAGE_REF_LABEL,
    LAYER_DIGEST_LABEL,
    RAFS_LABEL,
    ImageLocation,
    NydusLayers,
)
from d7y_node.rafs.builder import Tree, directory, regular_file, symlink
from d7y_node.rafs.writer import WriterOptions, write_image
from d7y_node.registry import RegistryClient
from d7y_node.snapshotter import Kind, SnapshotInfo
from d7y_node.tasks import TaskManager
from tests.rafs.fixture_paths import FIXTURES

MIB = 1 << 20
V6_BOOTSTRAP = FIXTURES / "v6" / "rafs-v6-2.2.boot"
V5_BOOTSTRAP = FIXTURES / "v5" / "sha256-nocompress-repeatable"

# The real Nydus images live in shared/ beside the repository; without them, tests of them skip.
needs_fixtures = pytest.mark.skipif(
    not V6_BOOTSTRAP.exists(), reason=f"Nydus fixtures not found at {FIXTURES}"
)
needs_fuse = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
    reason="mounting FUSE needs root and /dev/fuse",
)


def snapshot(
    snapshot_id: int, labels: Mapping[str, str], *, name: str | None = None
) -> SnapshotInfo:
    now = time.time()
    return SnapshotInfo(
        id=snapshot_id, name=name or f"sha256:{snapshot_id:064x}", kind=Kind.COMMITTED,
        parent="", labels=dict(labels), created=now, updated=now,
    )


def bootstrap_labels(image_ref: str = "127.0.0.1:5000/test/nydus:v1") -> dict[str, str]:
    return {BOOTSTRAP_LABEL: "true", IMAGE_REF_LABEL: image_ref,
            LAYER_DIGEST_LABEL: "sha256:" + "ab" * 32}


def unpacked(fs: Path, bootstrap: bytes) -> Path:
    """A snapshot directory as containerd leaves it after unpacking a bootstrap layer."""
    (fs / BOOTSTRAP_PATH).parent.mkdir(parents=True, exist_ok=True)
    (fs / BOOTSTRAP_PATH).write_bytes(bootstrap)
    return fs


def unused_sources(_location: ImageLocation) -> DirectoryBlobSource:
    raise AssertionError("no blob source is needed here")


# -- which layers, and the bootstrap check ------------------------------------------------------


def test_only_nydus_data_blobs_are_skipped(tmp_path: Path) -> None:
    layers = NydusLayers(tmp_path, unused_sources)
    assert layers.skip("extract-1 sha256:a", "", {BLOB_LABEL: "true"})
    assert layers.skip("extract-1 sha256:a", "sha256:b", {BLOB_LABEL: "True",
                                                           IMAGE_REF_LABEL: "x/y:1"})
    assert not layers.skip("extract-1 sha256:a", "", {BLOB_LABEL: "false"})
    assert not layers.skip("extract-1 sha256:a", "", {BOOTSTRAP_LABEL: "true"})
    assert not layers.skip("extract-1 sha256:a", "", {})


@needs_fixtures
@pytest.mark.parametrize(("fixture", "version"), [(V6_BOOTSTRAP, "6"), (V5_BOOTSTRAP, "5")])
async def test_a_committed_bootstrap_is_checked_and_marked(
    tmp_path: Path, fixture: Path, version: str
) -> None:
    layers = NydusLayers(tmp_path, unused_sources)
    fs = unpacked(tmp_path / "fs", await asyncio.to_thread(fixture.read_bytes))
    assert await layers.committed(snapshot(1, bootstrap_labels()), fs) == {RAFS_LABEL: version}
    # A plain layer (even one holding such a file) is none of this hook's business.
    assert await layers.committed(snapshot(2, {}), fs) == {}


async def test_a_bootstrap_written_here_is_marked(tmp_path: Path) -> None:
    tree = Tree()
    tree.put(b"/etc/hello", regular_file(b"hello\n"))
    image = write_image(tree, tmp_path / "blobs", WriterOptions(compression_threads=1))
    fs = unpacked(tmp_path / "fs", image.bootstrap)
    layers = NydusLayers(tmp_path, unused_sources)
    assert await layers.committed(snapshot(1, bootstrap_labels()), fs) == {RAFS_LABEL: "6"}


def _truncated() -> bytes:
    return V6_BOOTSTRAP.read_bytes()[:1500]


def _bad_magic() -> bytes:
    data = bytearray(V6_BOOTSTRAP.read_bytes())
    data[1024:1028] = b"\0\0\0\0"
    return bytes(data)


def _hostile_blob_table() -> bytes:
    """Every byte of the RAFS extended superblock (blob table place and size, chunk table,
    prefetch table) set to 0xff."""
    data = bytearray(V6_BOOTSTRAP.read_bytes())
    data[1152:1408] = b"\xff" * 256
    return bytes(data)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "holds no image/image.boot"),
        (lambda: b"", "neither a RAFS v5 nor a RAFS v6"),
        (lambda: b"not a bootstrap at all" * 100, "neither a RAFS v5 nor a RAFS v6"),
        pytest.param(_truncated, "snapshot 'broken'", marks=needs_fixtures),
        pytest.param(_bad_magic, "neither a RAFS v5 nor a RAFS v6", marks=needs_fixtures),
        pytest.param(_hostile_blob_table, "snapshot 'broken'", marks=needs_fixtures),
    ],
    ids=["missing", "empty", "garbage", "truncated", "bad-magic", "hostile-tables"],
)
async def test_a_malformed_bootstrap_is_a_clear_error(
    tmp_path: Path, content: Callable[[], bytes] | None, message: str
) -> None:
    layers = NydusLayers(tmp_path, unused_sources)
    fs = tmp_path / "fs"
    fs.mkdir()
    if content is not None:
        unpacked(fs, content())
    info = snapshot(1, bootstrap_labels(), name="broken")
    with pytest.raises(RafsError, match=message):
        await layers.committed(info, fs)
    # Nor is it ever mounted.
    with pytest.raises(RafsError):
        await layers.lower(info, fs)
    assert layers.mounted() == []


async def test_a_bootstrap_directory_is_a_clear_error(tmp_path: Path) -> None:
    fs = tmp_path / "fs"
    (fs / BOOTSTRAP_PATH).mkdir(parents=True)
    with pytest.raises(RafsError, match="is not a file"):
        await NydusLayers(tmp_path, unused_sources).committed(
            snapshot(1, bootstrap_labels()), fs)


async def test_plain_snapshots_have_no_remote_lower_dir(tmp_path: Path) -> None:
    layers = NydusLayers(tmp_path, unused_sources)
    assert await layers.lower(snapshot(1, {}), tmp_path) is None
    assert await layers.lower(snapshot(2, {BLOB_LABEL: "true"}), tmp_path) is None


@needs_fixtures
async def test_a_bootstrap_without_its_image_reference_cannot_be_mounted(tmp_path: Path) -> None:
    fs = unpacked(tmp_path / "fs", V6_BOOTSTRAP.read_bytes())
    layers = NydusLayers(tmp_path, unused_sources)
    labels = {BOOTSTRAP_LABEL: "true", RAFS_LABEL: "6"}
    with pytest.raises(InvalidRequest, match=IMAGE_REF_LABEL) as raised:
        await layers.lower(snapshot(1, labels), fs)
    assert "disable_snapshot_annotations" in raised.value.message
    bad_digest = {**bootstrap_labels(), LAYER_DIGEST_LABEL: "md5:123"}
    with pytest.raises(InvalidRequest, match="not a sha256 digest"):
        await layers.lower(snapshot(1, bad_digest), fs)
    assert layers.mounted() == []


# -- real mounts --------------------------------------------------------------------------------


@dataclass
class BlobRegistry:
    """A registry double serving blobs (GET with Range, HEAD) and counting the bytes it sends."""

    blobs: dict[str, bytes]
    repository: str = "test/nydus"
    bytes_served: dict[str, int] = field(default_factory=dict)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/v2/{name:.+}/blobs/{digest}", self._blob)
        return app

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        digest = request.match_info["digest"]
        data = self.blobs.get(digest.removeprefix("sha256:"))
        if request.match_info["name"] != self.repository or data is None:
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN"}]}, status=404)
        headers = {"Docker-Content-Digest": digest, "Content-Type": "application/octet-stream"}
        if request.method == "HEAD":
            return web.Response(headers={**headers, "Content-Length": str(len(data))})
        status, start, end = 200, 0, len(data)
        if request.http_range.start is not None:
            status = 206
            start = request.http_range.start
            end = min(len(data), request.http_range.stop or len(data))
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        self.bytes_served[digest] = self.bytes_served.get(digest, 0) + end - start
        return web.Response(status=status, body=data[start:end], headers=headers)


@dataclass
class Written:
    bootstrap: bytes
    blobs: dict[str, bytes]
    files: dict[str, bytes]


def written_image(blob_dir: Path) -> Written:
    """Two layers: many small files and a 6 MiB one, a symlink."""
    files = {f"/etc/file-{index}": os.urandom(100 + index) for index in range(20)}
    files["/usr/lib/big"] = os.urandom(6 * MIB)
    tree = Tree(directory())
    for index, (path, data) in enumerate(sorted(files.items())):
        tree.put(path.encode(), regular_file(data, layer=0 if index % 2 else 1))
    tree.put(b"/usr/lib/link", symlink(b"big"))
    image = write_image(tree, blob_dir, WriterOptions(compression_threads=1))
    blobs = {blob.blob_id: blob.path.read_bytes() for blob in image.blobs}
    return Written(image.bootstrap, blobs, files)


@pytest.fixture
def unmount_leftovers(tmp_path: Path) -> Iterator[None]:
    """Whatever a failing test left mounted under tmp_path is unmounted."""
    yield
    from d7y_node import fuse_kernel

    with open("/proc/self/mountinfo") as file:
        points = [line.split(" ")[4] for line in file]
    for point in points:
        if point.startswith(str(tmp_path)):
            fuse_kernel.unmount(point, lazy=True)


async def mounted(path: Path) -> bool:
    """Whether `path` is a mount point, asked off the loop: the loop serves the mount, and
    resolving the path stats its root."""
    return await asyncio.to_thread(is_mount_point, str(path))


def read_tree(root: Path, paths: list[str]) -> dict[str, bytes]:
    return {path: (root / path.lstrip("/")).read_bytes() for path in paths}


@needs_fuse
@pytest.mark.usefixtures("unmount_leftovers")
async def test_a_bootstrap_snapshot_mounts_lazily_through_the_task_manager(
    tmp_path: Path, task_manager: TaskManager
) -> None:
    written = written_image(tmp_path / "blobs")
    registry_double = BlobRegistry(written.blobs)
    server = TestServer(registry_double.app(), host="127.0.0.1")
    await server.start_server()
    metrics = Metrics()
    registry = RegistryClient(RegistryConfig(), metrics)
    try:
        data_dir = tmp_path / "data"
        resolver = ImageResolver(registry, task_manager, data_dir, ())
        layers = NydusLayers.for_node(data_dir, resolver)
        labels = bootstrap_labels(f"127.0.0.1:{server.port}/test/nydus:v1")
        fs = unpacked(tmp_path / "snapshots" / "7" / "fs", written.bootstrap)
        info = snapshot(7, labels)
        assert await layers.committed(info, fs) == {RAFS_LABEL: "6"}
        info = snapshot(7, {**labels, RAFS_LABEL: "6"})
        # Two containers starting at once share one mount.
        first, second = await asyncio.gather(layers.lower(info, fs), layers.lower(info, fs))
        assert first == second == layers.mountpoint(7)
        assert first is not None and await mounted(first)
        assert [mounted.id for mounted in layers.mounted()] == [7]
        # Nothing is fetched but what is read: one small file.
        small = await asyncio.to_thread(read_tree, first, ["/etc/file-3"])
        assert small == {"/etc/file-3": written.files["/etc/file-3"]}
        served = sum(registry_double.bytes_served.values())
        total = sum(len(blob) for blob in written.blobs.values())
        assert 0 < served < total // 2
        everything = await asyncio.to_thread(read_tree, first, sorted(written.files))
        assert everything == written.files
        assert await asyncio.to_thread(os.readlink, first / "usr/lib/link") == "big"
        # Removing the snapshot unmounts it and forgets its mount.
        await layers.removing(info, fs)
        assert not await mounted(first)
        assert not (data_dir / "nydus" / "7").exists()
        assert layers.mounted() == []
        await layers.close()
    finally:
        await registry.close()
        await server.close()


@needs_fixtures
@needs_fuse
@pytest.mark.usefixtures("unmount_leftovers")
async def test_mounts_come_back_at_the_next_start(tmp_path: Path) -> None:
    """`close` (the node stops) keeps the record; `restore` at the next start mounts the
    snapshots that still exist and forgets the rest, cleaning what they left."""
    fixture_blobs = FIXTURES / "v6"
    bootstrap = V6_BOOTSTRAP.read_bytes()
    data_dir = tmp_path / "data"

    def sources(location: ImageLocation) -> DirectoryBlobSource:
        assert location.image_ref == "127.0.0.1:5000/test/nydus:v1"
        return DirectoryBlobSource(fixture_blobs)

    def fs_of(info: SnapshotInfo) -> Path:
        return tmp_path / "snapshots" / str(info.id) / "fs"

    kept = snapshot(3, {**bootstrap_labels(), RAFS_LABEL: "6"})
    gone = snapshot(4, {**bootstrap_labels(), RAFS_LABEL: "6"})
    for info in (kept, gone):
        unpacked(fs_of(info), bootstrap)
    before = NydusLayers(data_dir, sources)
    for info in (kept, gone):
        mountpoint = await before.lower(info, fs_of(info))
        assert mountpoint is not None
    root = before.mountpoint(3)
    expected = await asyncio.to_thread(
        lambda: {path.name: path.read_bytes() for path in root.iterdir() if path.is_file()})
    assert expected
    await before.close()
    assert not await mounted(root)

    after = NydusLayers(data_dir, sources)
    await after.restore([kept], fs_of)  # snapshot 4 was removed meanwhile
    try:
        assert [info.id for info in after.mounted()] == [3]
        assert await mounted(after.mountpoint(3))
        again = await asyncio.to_thread(
            lambda: {path.name: path.read_bytes() for path in root.iterdir() if path.is_file()})
        assert again == expected
        assert not (data_dir / "nydus" / "4").exists()
        # A snapshot renamed under the same id (a reused row id) is not someone else's mount.
        await after.close()
        other = NydusLayers(data_dir, sources)
        await other.restore([snapshot(3, kept.labels, name="another")], fs_of)
        assert other.mounted() == [] and not (data_dir / "nydus" / "3").exists()
    finally:
        await after.close()
    shutil.rmtree(tmp_path / "snapshots")


def test_image_location_reads_the_cri_labels() -> None:
    digest = "sha256:" + hashlib.sha256(b"m").hexdigest()
    info = snapshot(1, {IMAGE_REF_LABEL: " r.example/a/b:1 ",
                        "containerd.io/snapshot/cri.manifest-digest": digest})
    location = ImageLocation.from_labels(info)
    assert location == ImageLocation("r.example/a/b:1", None, digest)


# -- a crash, with the FUSE connection handed over ----------------------------------------------


def _fs_of(root: Path, info: SnapshotInfo) -> Path:
    return root / "snapshots" / str(info.id) / "fs"


def _fixture_sources(_location: ImageLocation) -> DirectoryBlobSource:
    return DirectoryBlobSource(FIXTURES / "v6")


def serve_until_killed(root: str) -> None:
    """The crashing process: mounts snapshots 5 and 6 with a keeper, says so, and serves until
    killed."""
    from d7y_node.fuse_handover import Handover

    async def main() -> None:
        data_dir = Path(root) / "data"
        layers = NydusLayers(data_dir, _fixture_sources, handover=Handover(data_dir, "nydus"))
        for info in (crash_snapshot(), crash_snapshot(6)):
            await layers.lower(info, _fs_of(Path(root), info))
        print("mounted", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


REPOSITORY_ROOT = Path(__file__).resolve().parents[1]


def start_crashing_process(root: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c",
         f"from tests.test_nydus_snapshots import serve_until_killed; "
         f"serve_until_killed({str(root)!r})"],
        cwd=REPOSITORY_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )


def crash_snapshot(snapshot_id: int = 5) -> SnapshotInfo:
    return SnapshotInfo(id=snapshot_id, name="sha256:" + str(snapshot_id) * 64,
                        kind=Kind.COMMITTED, parent="",
                        labels={**bootstrap_labels(), RAFS_LABEL: "6"}, created=0.0, updated=0.0)


@needs_fixtures
@needs_fuse
@pytest.mark.usefixtures("unmount_leftovers")
async def test_a_file_open_across_a_crash_reads_on_after_the_handover(tmp_path: Path) -> None:
    """A process that mounted a snapshot with a keeper is killed (SIGKILL) while another holds a
    file of the mount open; the next `restore` takes the same FUSE connection over (no new
    mount), and the open file, and new lookups, read on. Reads made while nobody serves wait."""
    from d7y_node.fuse_handover import Handover

    info = crash_snapshot()
    for snapshot_info in (info, crash_snapshot(6)):
        unpacked(_fs_of(tmp_path, snapshot_info), V6_BOOTSTRAP.read_bytes())
    child = start_crashing_process(tmp_path)
    data_dir = tmp_path / "data"
    layers = NydusLayers(data_dir, _fixture_sources, handover=Handover(data_dir, "nydus"))
    mountpoint = layers.mountpoint(info.id)
    opened = None
    try:
        assert child.stdout is not None
        line = await asyncio.to_thread(child.stdout.readline)
        assert line == b"mounted\n", line + child.stdout.read()
        names = sorted(os.listdir(mountpoint))
        expected = {name: (mountpoint / name).read_bytes() for name in names}
        opened = await asyncio.to_thread(open, mountpoint / names[0], "rb")
        assert opened.read(10) == expected[names[0]][:10]
        mount_id = _mount_id(mountpoint)
        child.kill()
        child.wait()
        # Nobody serves now: a read waits (in a thread) instead of failing.
        waiting = asyncio.ensure_future(asyncio.to_thread(
            lambda: (mountpoint / names[1]).read_bytes()))
        await asyncio.sleep(0.5)
        assert not waiting.done()
        # Snapshot 6 was removed meanwhile: its kept connection is ended, its mount detached.
        await layers.restore([info], lambda snapshot_info: _fs_of(tmp_path, snapshot_info))
        assert await asyncio.wait_for(waiting, 10) == expected[names[1]]
        assert not await mounted(layers.mountpoint(6))
        assert not (data_dir / "nydus" / "6").exists()
        assert await Handover(data_dir, "nydus").held() == [str(mountpoint)]
        mount = layers.get(info.id)
        assert mount is not None and mount.adopted
        assert await asyncio.to_thread(_mount_id, mountpoint) == mount_id  # the same mount

        def read_rest() -> bytes:
            assert opened is not None
            os.posix_fadvise(opened.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            opened.seek(0)
            return opened.read()

        assert await asyncio.to_thread(read_rest) == expected[names[0]]
        statistics = await asyncio.to_thread(os.statvfs, mountpoint)
        assert statistics.f_bsize == 4096
    finally:
        if opened is not None:
            opened.close()
        if child.poll() is None:
            child.kill()
            child.wait()
        await layers.close()
    assert not await mounted(mountpoint)
    assert await Handover(data_dir, "nydus").held() == []


def _mount_id(path: Path) -> str:
    """The mount's id in /proc/self/mountinfo (a new mount gets a new one)."""
    with open("/proc/self/mountinfo") as file:
        for line in file:
            fields = line.split(" ")
            if fields[4] == str(path):
                return fields[0]
    raise AssertionError(f"{path} is not mounted")
