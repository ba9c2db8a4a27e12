"""Tests of `d7y_node.mounts`: the mount request and its records in the data dir, the Nydus
manifest and bootstrap layer forms, the manager's routes and access rules, and with a real FUSE
mount (root and /dev/fuse): mounts made and ended by the manager, and the cleanup of a stale
mount whose server was killed with `kill -9`.

Every file access to a mount served by the test's loop runs in a thread.
"""

from __future__ import annotations

import asyncio
import errno
import gzip
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from d7y_node.errors import InvalidRequest, RafsError
from d7y_node.fuse_kernel import is_mount_point
from d7y_node.gossip import ClusterKey
from d7y_node.mounts import (
    BLOB_MEDIA_TYPE,
    BOOTSTRAP_ANNOTATION,
    MOUNTS_PATH,
    SERVED_BY_FOREGROUND,
    SERVED_BY_NODE,
    ImageResolver,
    MountManager,
    MountRecord,
    MountRecords,
    MountSpec,
    extract_bootstrap,
    find_node,
    node_running,
)
from d7y_node.node import DataDirLock
from d7y_node.peer import AUTH_HEADER, PeerAuth
from tests.rafs.fixture_paths import FIXTURES

V6 = FIXTURES / "v6"
BOOTSTRAP = V6 / "rafs-v6-2.2.boot"
needs_fuse = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse") or not BOOTSTRAP.exists(),
    reason="mounting FUSE needs root, /dev/fuse and the Nydus fixtures",
)
# The fixture's files (their md5 sums are in the fixture README; here their sizes suffice).
FIXTURE_FILES = ("lib.rs", "sync_io.rs")
MOUNT_WAIT_SECONDS = 15.0


def local_spec(mountpoint: Path) -> MountSpec:
    return MountSpec(mountpoint=str(mountpoint), bootstrap=str(BOOTSTRAP), blob_dir=str(V6))


# -- the request and its records ----------------------------------------------------------------


def test_spec_round_trips_and_keeps_secrets_off_disk(tmp_path: Path) -> None:
    spec = MountSpec(mountpoint="/mnt/x", image="localhost:5000/app:v1",
                     authorization="Basic YTpi", prefetch_blobs=True, prefetch_bandwidth=1000)
    assert MountSpec.from_json(json.loads(json.dumps(spec.as_json()))) == spec
    records = MountRecords(tmp_path)
    records.save(MountRecord(spec, SERVED_BY_NODE, 1234))
    on_disk = "".join(path.read_text() for path in records.directory.iterdir())
    assert "YTpi" not in on_disk
    kept = records.get("/mnt/x")
    assert kept is not None and kept.pid == 1234 and kept.served_by == SERVED_BY_NODE
    assert kept.spec.authorization is None and kept.spec.image == spec.image


@pytest.mark.parametrize("value, message", [
    ({"mountpoint": "relative"}, "absolute"),
    ({"mountpoint": "/m"}, "image reference, or a bootstrap"),
    ({"mountpoint": "/m", "image": "a/b", "bootstrap": "/b", "blob_dir": "/d"},
     "image reference, or a bootstrap"),
    ({"mountpoint": "/m", "bootstrap": "/b"}, "needs a bootstrap and a blob dir"),
    ({"mountpoint": "/m", "image": "a/b", "prefetch_bandwidth": 0}, "positive"),
    ({"mountpoint": "/m", "image": 5}, "string"),
    ({"mountpoint": "/m", "image": "a", "prefetch_files": "yes"}, "true or false"),
    ([], "needs a mountpoint"),
])
def test_malformed_specs_are_refused(value: object, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        MountSpec.from_json(value)


def test_records_list_replace_and_forget(tmp_path: Path) -> None:
    records = MountRecords(tmp_path)
    assert records.all() == []
    first = MountRecord(local_spec(Path("/mnt/a")), SERVED_BY_NODE, 1)
    second = MountRecord(local_spec(Path("/mnt/b")), SERVED_BY_FOREGROUND, 2)
    records.save(first)
    records.save(second)
    records.save(MountRecord(first.spec, SERVED_BY_NODE, 3))  # replaces, does not add
    kept = {record.spec.mountpoint: record.pid for record in records.all()}
    assert kept == {"/mnt/a": 3, "/mnt/b": 2}
    # A damaged file is skipped (with a warning), not fatal.
    (records.directory / "junk.json").write_text("{not json")
    assert len(records.all()) == 2
    records.remove("/mnt/a")
    records.remove("/mnt/a")  # twice is fine
    assert [record.spec.mountpoint for record in records.all()] == ["/mnt/b"]


def test_find_node_uses_the_lock_and_the_noted_address(tmp_path: Path) -> None:
    assert not node_running(tmp_path)
    assert find_node(tmp_path, None, "127.0.0.1:9") is None
    assert find_node(tmp_path, "127.0.0.1:7", "127.0.0.1:9") == "http://127.0.0.1:7"
    lock = DataDirLock(tmp_path)
    lock.acquire()
    try:
        assert node_running(tmp_path)
        # Locked but no address noted: a foreground image mount holds it, no node to ask.
        assert find_node(tmp_path, None, "127.0.0.1:9") is None
        from d7y_node.config import Listen

        MountManager(tmp_path).advertise(Listen("0.0.0.0", 4242))
        assert find_node(tmp_path, None, "127.0.0.1:9") == "http://127.0.0.1:4242"
    finally:
        lock.release()
    assert not node_running(tmp_path)


# -- Nydus image forms --------------------------------------------------------------------------


def bootstrap_layer(members: dict[str, bytes], *, compress: bool = True) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return gzip.compress(buffer.getvalue()) if compress else buffer.getvalue()


def test_extract_bootstrap_from_the_layer() -> None:
    assert extract_bootstrap(bootstrap_layer({"image/image.boot": b"boot"})) == b"boot"
    assert extract_bootstrap(
        bootstrap_layer({"./image/image.boot": b"boot"}, compress=False)
    ) == b"boot"
    with pytest.raises(RafsError, match="holds no"):
        extract_bootstrap(bootstrap_layer({"image/other": b"x"}))
    with pytest.raises(RafsError, match="not a readable tar"):
        extract_bootstrap(b"\x1f\x8b garbage")


def test_nydus_manifest_gives_bootstrap_and_blobs() -> None:
    blob = "ab" * 32
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": "sha256:" + "cd" * 32, "size": 10},
        "layers": [
            {"mediaType": BLOB_MEDIA_TYPE, "digest": f"sha256:{blob}", "size": 4096,
             "annotations": {"containerd.io/snapshot/nydus-blob": "true"}},
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
             "digest": "sha256:" + "ef" * 32, "size": 300,
             "annotations": {BOOTSTRAP_ANNOTATION: "true",
                             "containerd.io/snapshot/nydus-fs-version": "6"}},
        ],
    }
    spec = MountSpec(mountpoint="/m", image="localhost/x:1")
    from d7y_node.registry import Upstream

    image = ImageResolver.nydus_image(manifest, Upstream("http", "localhost"), "x", spec)
    assert image.bootstrap_digest == "sha256:" + "ef" * 32 and image.bootstrap_size == 300
    assert dict(image.blob_sizes) == {blob: 4096}
    plain = {**manifest, "layers": manifest["layers"][:1]}
    with pytest.raises(InvalidRequest, match="not a Nydus image"):
        ImageResolver.nydus_image(plain, Upstream("http", "localhost"), "x", spec)


# -- routes -------------------------------------------------------------------------------------


async def test_routes_need_a_signature_when_there_is_a_cluster_key(tmp_path: Path) -> None:
    auth = PeerAuth(ClusterKey(b"k" * 32))
    manager = MountManager(tmp_path, auth=auth)
    app = web.Application()
    manager.register(app)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        body = json.dumps({"mountpoint": str(tmp_path / "m"), "image": "a/b"}).encode()
        unsigned = await client.post(MOUNTS_PATH, data=body)
        assert unsigned.status == 401
        signed_other = await client.post(
            MOUNTS_PATH, data=body, headers={AUTH_HEADER: auth.sign("POST", MOUNTS_PATH)}
        )
        assert signed_other.status == 401  # signed over another body
        listed = await client.get(
            MOUNTS_PATH, headers={AUTH_HEADER: auth.sign("GET", MOUNTS_PATH)}
        )
        assert listed.status == 200 and await listed.json() == {"mounts": []}
        # Signed and well formed: an image mount without a resolver fails cleanly.
        answer = await client.post(
            MOUNTS_PATH, data=body,
            headers={AUTH_HEADER: auth.sign("POST", MOUNTS_PATH, body)},
        )
        assert answer.status == 500
        assert "registry client" in (await answer.json())["message"]
        path = f"{MOUNTS_PATH}?mountpoint=/nowhere"  # as aiohttp sends it
        unknown = await client.delete(path, headers={AUTH_HEADER: auth.sign("DELETE", path)})
        assert unknown.status == 404


async def test_routes_refuse_bad_requests(tmp_path: Path) -> None:
    app = web.Application()
    MountManager(tmp_path).register(app)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        assert (await client.post(MOUNTS_PATH, data=b"{no")).status == 400
        relative = await client.post(MOUNTS_PATH, data=json.dumps({"mountpoint": "x"}))
        assert relative.status == 400
        missing = await client.post(MOUNTS_PATH, data=json.dumps({
            "mountpoint": str(tmp_path / "m"), "bootstrap": str(tmp_path / "none"),
            "blob_dir": str(tmp_path),
        }))
        assert missing.status == 400 and "no bootstrap" in (await missing.json())["message"]
        assert (await client.delete(f"{MOUNTS_PATH}?mountpoint=rel")).status == 400


# -- real mounts --------------------------------------------------------------------------------


def fixture_sizes(root: Path) -> dict[str, int]:
    return {name: len((root / name).read_bytes()) for name in FIXTURE_FILES}


@needs_fuse
async def test_manager_mounts_records_and_unmounts_on_close(tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    manager = MountManager(tmp_path / "data")
    active = await manager.mount(local_spec(mountpoint))
    try:
        sizes = await asyncio.to_thread(fixture_sizes, mountpoint)
        assert all(size > 0 for size in sizes.values())
        assert [record.spec.mountpoint for record in manager.records.all()] == [str(mountpoint)]
        assert manager.records.all()[0].pid == os.getpid()
        with pytest.raises(InvalidRequest, match="already mounted"):
            await manager.mount(local_spec(mountpoint))
    finally:
        await manager.close()
    assert active.watcher is not None and active.watcher.done()
    assert not is_mount_point(str(mountpoint))
    assert manager.records.all() == []
    assert manager.mounted() == []


@needs_fuse
async def test_unmount_from_outside_forgets_the_mount(tmp_path: Path) -> None:
    from d7y_node import fuse_kernel

    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    manager = MountManager(tmp_path / "data")
    active = await manager.mount(local_spec(mountpoint))
    await asyncio.to_thread(fuse_kernel.unmount, str(mountpoint))
    assert active.watcher is not None
    await asyncio.wait_for(active.watcher, 10)
    assert manager.mounted() == [] and manager.records.all() == []
    assert not await manager.unmount(str(mountpoint))


@pytest.fixture
def foreground_mount(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path]]:
    """`d7y-node mount --foreground` of the fixture in a child process."""
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    data_dir = tmp_path / "data"
    process = subprocess.Popen(
        [sys.executable, "-m", "d7y_node", "mount", "--foreground", "--data-dir", str(data_dir),
         "--bootstrap", str(BOOTSTRAP), "--blob-dir", str(V6), str(mountpoint)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + MOUNT_WAIT_SECONDS
        while not (is_mount_point(str(mountpoint)) and MountRecords(data_dir).all()):
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            assert time.monotonic() < deadline, "the foreground mount did not come up"
            time.sleep(0.05)
        yield process, mountpoint, data_dir
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        if process.stderr is not None:
            process.stderr.close()
        if is_mount_point(str(mountpoint)):
            from d7y_node import fuse_kernel

            fuse_kernel.unmount(str(mountpoint))


@needs_fuse
async def test_stale_mount_of_a_killed_server_is_cleaned_from_the_records(
    foreground_mount: tuple[subprocess.Popen[bytes], Path, Path],
) -> None:
    process, mountpoint, data_dir = foreground_mount
    record = MountRecords(data_dir).all()[0]
    assert record.served_by == SERVED_BY_FOREGROUND and record.pid == process.pid
    # A live foreground mount is not touched by a starting node.
    assert await MountManager(data_dir).clean_stale() == []
    assert is_mount_point(str(mountpoint)) and MountRecords(data_dir).all()

    process.send_signal(signal.SIGKILL)
    process.wait()
    # statfs always reaches the server (a stat may be answered from cached attributes).
    with pytest.raises(OSError) as stale:
        os.statvfs(mountpoint)
    assert stale.value.errno == errno.ENOTCONN
    assert MountRecords(data_dir).all()  # the crash left its record

    assert await MountManager(data_dir).clean_stale() == [str(mountpoint)]
    assert not is_mount_point(str(mountpoint))
    os.stat(mountpoint)  # usable again
    assert MountRecords(data_dir).all() == []


@needs_fuse
async def test_sigterm_ends_a_foreground_mount(
    foreground_mount: tuple[subprocess.Popen[bytes], Path, Path],
) -> None:
    process, mountpoint, data_dir = foreground_mount
    sizes = await asyncio.to_thread(fixture_sizes, mountpoint)
    assert all(size > 0 for size in sizes.values())
    process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(process.wait, 10) == 0
    assert not is_mount_point(str(mountpoint))
    assert MountRecords(data_dir).all() == []


async def test_close_keeps_another_nodes_address(tmp_path: Path) -> None:
    from d7y_node.config import Listen

    running = MountManager(tmp_path)
    running.advertise(Listen("127.0.0.1", 4242))
    await MountManager(tmp_path).close()  # a second node whose start found the dir locked
    assert find_node(tmp_path, None, "x") is None  # no lock held here, but:
    assert (tmp_path / "mounts" / "node-address").read_text().strip() == "127.0.0.1:4242"
    await running.close()
    assert not (tmp_path / "mounts" / "node-address").exists()
