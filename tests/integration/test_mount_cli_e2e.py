"""`d7y-node mount` / `d7y-node umount` end to end, with the real Nydus v6 fixture: a mount served
by a running `d7y-node start` (found through its data dir), unmounted by the command and by the
node's SIGTERM, cleaned after the node was killed with `kill -9` and restarted; and a mount
served by the command itself when no node runs.

Files are compared with what the RAFS reader gives for the same image.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from d7y_node.fuse_kernel import is_mount_point
from d7y_node.mounts import MOUNTS_PATH, MountRecords
from d7y_node.rafs import open_bootstrap
from d7y_node.rafs.blob import FileReader, read_file_range
from d7y_node.rafs.tree import ROOT_INO
from tests.harness.node import node_command
from tests.harness.process import run, wait_until
from tests.integration.conftest import NodeFactory, end_foreground_mount
from tests.rafs.fixture_paths import FIXTURES

V6 = FIXTURES / "v6"
BOOTSTRAP = V6 / "rafs-v6-2.2.boot"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                       reason="mounting FUSE needs root and /dev/fuse"),
    pytest.mark.skipif(not BOOTSTRAP.exists(), reason="the Nydus fixtures are absent"),
]

COMMAND_TIMEOUT_SECONDS = 60.0
MOUNT_WAIT_SECONDS = 15.0


def expected_files() -> dict[str, bytes]:
    """The root's regular files as the RAFS reader reads them from the fixture."""
    filesystem = open_bootstrap(BOOTSTRAP.read_bytes(), name=str(BOOTSTRAP))
    readers = [FileReader(V6 / blob.blob_id) for blob in filesystem.blobs]
    files: dict[str, bytes] = {}
    for entry in filesystem.readdir(ROOT_INO):
        attributes = filesystem.getattr(entry.ino)
        if attributes.is_regular:
            files[os.fsdecode(entry.name)] = read_file_range(
                filesystem, entry.ino, 0, attributes.size, readers
            )
    assert files, "the fixture's root holds regular files"
    return files


def mounted_files(mountpoint: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in mountpoint.iterdir() if path.is_file()}


def d7y(*arguments: object) -> subprocess.CompletedProcess[str]:
    return run([*node_command(), *map(str, arguments)], timeout=COMMAND_TIMEOUT_SECONDS)


def local_mount_arguments(data_dir: Path, mountpoint: Path) -> list[object]:
    return ["mount", "--data-dir", data_dir, "--bootstrap", BOOTSTRAP, "--blob-dir", V6,
            mountpoint]


def node_mounts(peer_url: str) -> list[str]:
    with urllib.request.urlopen(peer_url + MOUNTS_PATH, timeout=5.0) as response:
        return [entry["mountpoint"] for entry in json.loads(response.read())["mounts"]]


def test_the_node_serves_a_mount_until_umount(node_factory: NodeFactory, tmp_path: Path) -> None:
    node = node_factory()
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    answer = d7y(*local_mount_arguments(node.data_dir, mountpoint))
    assert "served by the node" in answer.stdout
    try:
        assert is_mount_point(str(mountpoint))
        assert mounted_files(mountpoint) == expected_files()
        assert node_mounts(node.peer_url) == [str(mountpoint)]
        assert [r.spec.mountpoint for r in MountRecords(node.data_dir).all()] == [str(mountpoint)]
        # A second mount at the same place is refused, the first stays.
        second = run([*node_command(), *map(str, local_mount_arguments(node.data_dir,
                                                                        mountpoint))],
                     timeout=COMMAND_TIMEOUT_SECONDS, check=False)
        assert second.returncode == 1 and "already mounted" in second.stderr
    finally:
        # `--node` names the node outright (this data dir has none).
        d7y("umount", "--data-dir", tmp_path / "elsewhere", "--node",
            f"127.0.0.1:{node.peer_port}", mountpoint)
    assert not is_mount_point(str(mountpoint))
    assert node_mounts(node.peer_url) == []
    assert MountRecords(node.data_dir).all() == []
    assert node.process.running


def test_sigterm_to_the_node_unmounts_its_mounts(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    node = node_factory()
    mountpoints = [tmp_path / "one", tmp_path / "two"]
    for mountpoint in mountpoints:
        mountpoint.mkdir()
        d7y(*local_mount_arguments(node.data_dir, mountpoint))
        assert is_mount_point(str(mountpoint))
    assert node.stop() == 0
    for mountpoint in mountpoints:
        assert not is_mount_point(str(mountpoint))
    assert MountRecords(node.data_dir).all() == []


def test_a_crashed_nodes_mounts_are_cleaned_at_restart(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    """The dead mount is cleaned and, as the node recorded it, mounted again (more in
    tests/integration/test_remount_e2e.py)."""
    node = node_factory()
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    d7y(*local_mount_arguments(node.data_dir, mountpoint))
    node.kill()
    assert is_mount_point(str(mountpoint))
    with pytest.raises(OSError):
        os.statvfs(mountpoint)  # the server is gone: ENOTCONN
    node.restart()
    assert is_mount_point(str(mountpoint))
    assert [r.spec.mountpoint for r in MountRecords(node.data_dir).all()] == [str(mountpoint)]
    assert mounted_files(mountpoint) == expected_files()
    d7y("umount", "--data-dir", node.data_dir, mountpoint)
    assert not is_mount_point(str(mountpoint))



def test_a_nydusd_config_applies_and_warns(node_factory: NodeFactory, tmp_path: Path) -> None:
    node = node_factory()
    config = tmp_path / "nydusd.json"
    config.write_text(json.dumps({
        "device": {
            "backend": {"type": "registry", "config": {"timeout": 5, "retry_limit": 2}},
            "cache": {"type": "blobcache", "config": {"work_dir": str(tmp_path / "cache")}},
        },
        "mode": "direct",
        "fs_prefetch": {"enable": False, "threads_count": 4},
    }))
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    answer = d7y(*local_mount_arguments(node.data_dir, mountpoint), "--nydusd-config", config)
    try:
        warnings = [line for line in answer.stderr.splitlines() if "warning" in line]
        for name in ("device.backend.config.timeout", "device.backend.config.retry_limit",
                     "device.cache.type", "device.cache.config", "mode",
                     "fs_prefetch.threads_count"):
            assert sum(f"`{name}`" in line for line in warnings) == 1, (name, warnings)
        assert len(warnings) == 6
        assert mounted_files(mountpoint) == expected_files()
        with urllib.request.urlopen(node.peer_url + MOUNTS_PATH, timeout=5.0) as response:
            (mount,) = json.loads(response.read())["mounts"]
        assert mount["prefetch_files"] is False
    finally:
        d7y("umount", "--data-dir", node.data_dir, mountpoint)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("foreground", [False, True], ids=["no-node", "foreground-flag"])
def test_without_a_node_the_command_serves_the_mount(tmp_path: Path, foreground: bool) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    data_dir = tmp_path / "data"
    arguments = local_mount_arguments(data_dir, mountpoint)
    if foreground:
        arguments.insert(1, "--foreground")
    process = subprocess.Popen(
        [*node_command(), *map(str, arguments)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: is_mount_point(str(mountpoint)), timeout=MOUNT_WAIT_SECONDS,
                   what="the foreground mount", alive=lambda: process.poll() is None)
        assert mounted_files(mountpoint) == expected_files()
        started = time.monotonic()
        d7y("umount", "--data-dir", data_dir, mountpoint)
        assert process.wait(timeout=10) == 0
        assert time.monotonic() - started < 10
    finally:
        end_foreground_mount(process, mountpoint)
    assert not is_mount_point(str(mountpoint))
    assert MountRecords(data_dir).all() == []


# -- a data blob with its bootstrap inlined (nydus-image --blob-inline-meta) ------------------

INLINED_BLOB = V6 / "2fa78cad554b75ac91a4a125ed148d0ddeb25efa4aaa8bd80e5dc292690a4dca"
# The id its bootstrap's blob table gives that blob (the sha256 of the blob before image.boot).
CARRIER_ID = "d788a0eac4ff9779bc2eae3842117a918d847d90fddbea1503f7c5296a4a7de3"


def expected_inlined_files() -> dict[str, bytes]:
    """The regular files of the fixture blob's inlined bootstrap, every chunk verified."""
    from d7y_node.rafs.inlined import read_inlined_bootstrap

    files: dict[str, bytes] = {}
    with FileReader(INLINED_BLOB) as reader:
        inlined = read_inlined_bootstrap(reader)
        assert inlined is not None
        filesystem = inlined.filesystem
        for entry in filesystem.readdir(ROOT_INO):
            attributes = filesystem.getattr(entry.ino)
            if attributes.is_regular:
                files[os.fsdecode(entry.name)] = read_file_range(
                    filesystem, entry.ino, 0, attributes.size, [reader]
                )
    assert sorted(files) == ["error.rs", "lib.rs", "logger.rs"]
    return files


@pytest.mark.parametrize("served_by", ["node", "foreground"])
def test_a_blob_with_its_bootstrap_inlined_mounts(
    node_factory: NodeFactory, tmp_path: Path, served_by: str
) -> None:
    """`--bootstrap BLOB`: the bootstrap comes out of the blob's ToC and the chunks out of the
    same file (the bootstrap names its carrier by another id than the file's: no blob dir holds
    it). Served by the node with an empty `--blob-dir`; in the foreground with none given (the
    default is the bootstrap's directory)."""
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    empty_blob_dir = tmp_path / "blobs"
    empty_blob_dir.mkdir()
    expected = expected_inlined_files()
    assert not (V6 / CARRIER_ID).exists()
    arguments: list[object] = ["--bootstrap", INLINED_BLOB, mountpoint]
    if served_by == "node":
        arguments[2:2] = ["--blob-dir", empty_blob_dir]
    process: subprocess.Popen[bytes] | None = None
    if served_by == "node":
        data_dir = node_factory().data_dir
        answer = d7y("mount", "--data-dir", data_dir, *arguments)
        assert "served by the node" in answer.stdout
    else:
        data_dir = tmp_path / "data"
        process = subprocess.Popen(
            [*node_command(), "mount", "--foreground", "--data-dir", str(data_dir),
             *map(str, arguments)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
    try:
        if process is not None:
            wait_until(lambda: is_mount_point(str(mountpoint)), timeout=MOUNT_WAIT_SECONDS,
                       what="the foreground mount", alive=lambda: process.poll() is None)
        assert mounted_files(mountpoint) == expected
        assert sorted((data_dir / "mounts" / "bootstraps").glob("inlined-*.boot"))
        d7y("umount", "--data-dir", data_dir, mountpoint)
        if process is not None:
            assert process.wait(timeout=10) == 0
    finally:
        end_foreground_mount(process, mountpoint)
    assert not is_mount_point(str(mountpoint))


def test_a_blob_without_a_bootstrap_is_refused_clearly(tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    blob = V6 / "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"
    result = run([*node_command(), "mount", "--foreground", "--data-dir",
                  str(tmp_path / "data"), "--bootstrap", str(blob), "--blob-dir", str(V6),
                  str(mountpoint)], timeout=COMMAND_TIMEOUT_SECONDS, check=False)
    assert result.returncode == 1
    assert "neither a RAFS v5 nor a RAFS v6 bootstrap" in result.stderr.splitlines()[-1]
    assert not is_mount_point(str(mountpoint))


def test_umount_of_nothing_fails_clearly(tmp_path: Path) -> None:
    result = run([*node_command(), "umount", "--data-dir", str(tmp_path / "data"),
                  str(tmp_path)], timeout=COMMAND_TIMEOUT_SECONDS, check=False)
    assert result.returncode == 1
    assert "is not mounted" in result.stderr


# -- an image reference, converted by `d7y-node convert` and pushed to a real registry ----------

NYDUS_REPOSITORY = "test/big-nydus"
# The text file in the big image's last layer, and what it holds (tests/harness/images.py).
SMALL_FILE = "etc/d7y-test.txt"
SMALL_FILE_CONTENT = b"layer three\n"
# Reading one small file needs the bootstrap layer and the chunk of that file; the big image
# holds 64 MiB + 4 MiB of random data besides. A margin for the piece size (a piece holds
# several chunks) and the bootstrap still keeps this far below the image.
LAZY_ORIGIN_BYTES_LIMIT = 16 * 1024 * 1024


@pytest.fixture(scope="module")
def nydus_image(registry: Any, images: Any) -> str:
    """The big image converted by `d7y-node convert` and pushed beside it: its reference."""
    target = f"{registry.host}/{NYDUS_REPOSITORY}:v1"
    converted = run([*node_command(), "convert", f"{registry.host}/test/big:v1", target],
                    timeout=600, check=False)
    if converted.returncode != 0:
        pytest.skip(f"`d7y-node convert` does not work yet: {converted.stderr[-500:]}")
    return target


def test_an_image_reference_mounts_lazily(
    node_factory: NodeFactory, nydus_image: str, images: Any, tmp_path: Path
) -> None:
    node = node_factory()
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    before = node.metric("d7y_origin_bytes")
    d7y("mount", "--data-dir", node.data_dir, "--no-prefetch", nydus_image, mountpoint)
    try:
        assert (mountpoint / SMALL_FILE).read_bytes() == SMALL_FILE_CONTENT
        fetched = node.metric("d7y_origin_bytes") - before
        whole = sum(layer.size for layer in images.big.layers)
        assert 0 < fetched < LAZY_ORIGIN_BYTES_LIMIT < whole, (fetched, whole)
        print(f"origin bytes to read {SMALL_FILE}: {fetched:.0f} of the image's {whole}")
        # The big file reads right too (fetched now, piece by piece).
        assert (mountpoint / "data" / "big.bin").stat().st_size == 64 * 1024 * 1024
        assert node.metric("d7y_origin_bytes") - before < LAZY_ORIGIN_BYTES_LIMIT
    finally:
        d7y("umount", "--data-dir", node.data_dir, mountpoint)
    assert not is_mount_point(str(mountpoint))


def test_an_image_reference_mounts_in_the_foreground_without_a_node(
    nydus_image: str, tmp_path: Path
) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    data_dir = tmp_path / "data"
    process = subprocess.Popen(
        [*node_command(), "mount", "--data-dir", str(data_dir), "--no-prefetch", nydus_image,
         str(mountpoint)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        wait_until(lambda: is_mount_point(str(mountpoint)), timeout=MOUNT_WAIT_SECONDS,
                   what="the foreground image mount", alive=lambda: process.poll() is None)
        assert (mountpoint / SMALL_FILE).read_bytes() == SMALL_FILE_CONTENT
        d7y("umount", "--data-dir", data_dir, mountpoint)
        assert process.wait(timeout=10) == 0
    finally:
        end_foreground_mount(process, mountpoint)
        assert process.stderr is not None
        process.stderr.close()
    assert not is_mount_point(str(mountpoint))
    # Its pieces went into the data dir's store (a node started there later has them).
    assert (data_dir / "mounts" / "bootstraps").is_dir()
