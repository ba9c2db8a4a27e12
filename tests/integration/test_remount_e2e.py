"""Mounts that come back after a restart, end to end with a real `d7y-node start` process.

- A mount the node served (`d7y-node mount`, a local RAFS image or a Nydus image converted in the
  test and pulled through the node) is mounted again when the node is killed with `kill -9` and
  started again on the same data dir; its files read as before.
- A graceful stop (SIGTERM) unmounts and forgets: the next start mounts nothing.

The snapshotter's own remote mounts come back through `NydusLayers.restore` (unit tests in
tests/test_nydus_snapshots.py; containerd end to end elsewhere).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from d7y_node import fuse_kernel
from d7y_node.fuse_kernel import is_mount_point
from d7y_node.mounts import MOUNTS_PATH, MountRecords
from tests.harness.node import node_command
from tests.harness.process import run
from tests.harness.registry import Registry
from tests.integration.conftest import SMALL_REPOSITORY, TAG, NodeFactory
from tests.rafs.fixture_paths import FIXTURES

V6 = FIXTURES / "v6"
BOOTSTRAP = V6 / "rafs-v6-2.2.boot"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                       reason="mounting FUSE needs root and /dev/fuse"),
    pytest.mark.skipif(not BOOTSTRAP.exists(), reason="the Nydus fixtures are absent"),
]

COMMAND_TIMEOUT_SECONDS = 120.0


def d7y(*arguments: object) -> subprocess.CompletedProcess[str]:
    return run([*node_command(), *map(str, arguments)], timeout=COMMAND_TIMEOUT_SECONDS)


def files_of(root: Path) -> dict[str, bytes]:
    """Every regular file under `root` by relative path."""
    found: dict[str, bytes] = {}
    for directory, _names, files in os.walk(root):
        for name in files:
            path = Path(directory) / name
            if path.is_file() and not path.is_symlink():
                found[str(path.relative_to(root))] = path.read_bytes()
    return found


def node_mounts(peer_url: str) -> list[str]:
    with urllib.request.urlopen(peer_url + MOUNTS_PATH, timeout=5.0) as response:
        return [entry["mountpoint"] for entry in json.loads(response.read())["mounts"]]


@pytest.fixture
def mountpoints(tmp_path: Path) -> Iterator[list[Path]]:
    """Mount points under tmp_path; whatever a failing test left mounted there is unmounted."""
    made: list[Path] = []
    yield made
    for mountpoint in made:
        # Not `is_mount_point`: resolving the path would stat a mount that may have no server.
        with contextlib.suppress(OSError):
            fuse_kernel.unmount(str(mountpoint), lazy=True)


def new_mountpoint(tmp_path: Path, made: list[Path], name: str) -> Path:
    mountpoint = tmp_path / name
    mountpoint.mkdir()
    made.append(mountpoint)
    return mountpoint


def test_a_killed_nodes_local_mount_comes_back(
    node_factory: NodeFactory, tmp_path: Path, mountpoints: list[Path]
) -> None:
    node = node_factory()
    mountpoint = new_mountpoint(tmp_path, mountpoints, "local")
    d7y("mount", "--data-dir", node.data_dir, "--bootstrap", BOOTSTRAP, "--blob-dir", V6,
        mountpoint)
    before = files_of(mountpoint)
    assert before
    node.kill()
    assert is_mount_point(str(mountpoint))
    with pytest.raises(OSError):  # the server is gone: ENOTCONN
        os.statvfs(mountpoint)
    node.start()
    assert is_mount_point(str(mountpoint))
    assert files_of(mountpoint) == before
    assert node_mounts(node.peer_url) == [str(mountpoint)]
    [record] = MountRecords(node.data_dir).all()
    assert record.spec.mountpoint == str(mountpoint) and record.pid != 0
    # The restarted node owns it: `umount` through it ends it and forgets it.
    d7y("umount", "--data-dir", node.data_dir, mountpoint)
    assert not is_mount_point(str(mountpoint))
    assert MountRecords(node.data_dir).all() == []


def test_a_graceful_stop_forgets_its_mounts(
    node_factory: NodeFactory, tmp_path: Path, mountpoints: list[Path]
) -> None:
    node = node_factory()
    mountpoint = new_mountpoint(tmp_path, mountpoints, "local")
    d7y("mount", "--data-dir", node.data_dir, "--bootstrap", BOOTSTRAP, "--blob-dir", V6,
        mountpoint)
    assert node.stop() == 0
    assert not is_mount_point(str(mountpoint))
    node.start()
    assert not is_mount_point(str(mountpoint))
    assert node_mounts(node.peer_url) == []


NYDUS_TAG = "nydus-remount"


@pytest.fixture(scope="module")
def nydus_small(registry: Registry) -> str:
    """`test/small:v1` converted to Nydus in the registry; its reference."""
    target = f"{registry.host}/{SMALL_REPOSITORY}:{NYDUS_TAG}"
    converted = subprocess.run(
        [sys.executable, "-m", "d7y_node", "convert",
         f"{registry.host}/{SMALL_REPOSITORY}:{TAG}", target],
        capture_output=True, text=True, timeout=COMMAND_TIMEOUT_SECONDS,
    )
    assert converted.returncode == 0, converted.stderr
    return target


def test_a_killed_nodes_image_mount_comes_back(
    node_factory: NodeFactory, nydus_small: str, tmp_path: Path, mountpoints: list[Path]
) -> None:
    """A Nydus image (converted here from `test/small:v1`) mounted through the node: after
    `kill -9` and a start, the mount is back with the same files, its bootstrap from the data
    dir and its chunks from the piece store."""
    target = nydus_small
    node = node_factory()
    mountpoint = new_mountpoint(tmp_path, mountpoints, "image")
    d7y("mount", "--data-dir", node.data_dir, target, mountpoint)
    before = files_of(mountpoint)
    assert before["etc/d7y-test.txt"] == b"small image\n"
    node.kill()
    node.start()
    assert is_mount_point(str(mountpoint))
    assert files_of(mountpoint) == before
    assert node_mounts(node.peer_url) == [str(mountpoint)]
    d7y("umount", "--data-dir", node.data_dir, mountpoint)
    assert not is_mount_point(str(mountpoint))


# -- with the FUSE connection handed over (`--fuse-handover on`) ---------------------------------

READER = """
import hashlib, os, sys
mountpoint, held_name, other_name = sys.argv[1:4]
held = open(os.path.join(mountpoint, held_name), "rb")
held.read(10)
print("opened", flush=True)
sys.stdin.readline()  # the node is killed and started again meanwhile
os.posix_fadvise(held.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # read it from the server again
held.seek(0)
print(hashlib.sha256(held.read()).hexdigest(), flush=True)
with open(os.path.join(mountpoint, other_name), "rb") as other:
    print(hashlib.sha256(other.read()).hexdigest(), flush=True)
print(os.statvfs(mountpoint).f_bsize, flush=True)
"""


def test_with_handover_a_reader_keeps_reading_across_kill_9(
    node_factory: NodeFactory, tmp_path: Path, mountpoints: list[Path]
) -> None:
    """A process holding a file of the mount open before `kill -9` of the node reads it, and a
    file it never opened, once the node is started again: the new process serves the same FUSE
    connection (no new mount). Its reads while no node runs wait instead of failing."""
    import hashlib

    node = node_factory(extra_arguments=["--fuse-handover", "on"])
    mountpoint = new_mountpoint(tmp_path, mountpoints, "handover")
    d7y("mount", "--data-dir", node.data_dir, "--bootstrap", BOOTSTRAP, "--blob-dir", V6,
        mountpoint)
    expected = files_of(mountpoint)
    held_name, other_name = sorted(expected)[:2]
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(mountpoint), held_name, other_name],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert reader.stdin is not None and reader.stdout is not None
        assert reader.stdout.readline() == "opened\n"
        mount_line = _mount_line(mountpoint)
        node.kill()
        reader.stdin.write("go\n")
        reader.stdin.flush()
        with pytest.raises(subprocess.TimeoutExpired):
            reader.wait(timeout=1.0)  # waiting for a server, not failing
        node.start()
        output, _ = reader.communicate(timeout=COMMAND_TIMEOUT_SECONDS)
        assert reader.returncode == 0
        assert output.split() == [hashlib.sha256(expected[held_name]).hexdigest(),
                                  hashlib.sha256(expected[other_name]).hexdigest(), "4096"]
        assert _mount_line(mountpoint) == mount_line  # the same mount, not a new one
        assert "took over the mount" in node.log_tail()
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    d7y("umount", "--data-dir", node.data_dir, mountpoint)
    assert not is_mount_point(str(mountpoint))


def _mount_line(mountpoint: Path) -> str:
    with open("/proc/self/mountinfo") as file:
        for line in file:
            if line.split(" ")[4] == str(mountpoint):
                return line
    raise AssertionError(f"{mountpoint} is not mounted")


SLOW_READER = """
import hashlib, sys
print("reading", flush=True)
with open(sys.argv[1], "rb") as file:
    print(hashlib.sha256(file.read()).hexdigest(), flush=True)
"""
# The relay's pace: busybox (about 1 MiB of zstd chunks) takes seconds, so the node is killed
# while the reader's requests wait for chunks.
SLOW_BYTES_PER_SECOND = 150_000


def test_with_handover_a_read_in_flight_at_kill_9_completes(
    node_factory: NodeFactory, registry: Registry, nydus_small: str, tmp_path: Path,
    mountpoints: list[Path],
) -> None:
    """The node is killed while it fetches the chunks of a read (the registry behind a slow
    relay): the kernel sends the unanswered requests again to the next node
    (FUSE_NOTIFY_RESEND), and the reader gets the right bytes, without an error."""
    import hashlib
    import time

    from tests.harness.origins import ThrottledRelay

    relay = ThrottledRelay(registry.port, SLOW_BYTES_PER_SECOND)
    relay.start()
    try:
        node = node_factory(extra_arguments=["--fuse-handover", "on"])
        mountpoint = new_mountpoint(tmp_path, mountpoints, "slow")
        reference = nydus_small.replace(registry.host, relay.host)
        d7y("mount", "--data-dir", node.data_dir, reference, mountpoint)
        reader = subprocess.Popen(
            [sys.executable, "-c", SLOW_READER, str(mountpoint / "bin" / "busybox")],
            stdout=subprocess.PIPE, text=True,
        )
        try:
            assert reader.stdout is not None
            assert reader.stdout.readline() == "reading\n"
            started = relay.downstream_bytes
            deadline = time.monotonic() + 30
            while relay.downstream_bytes - started < 100_000 and time.monotonic() < deadline:
                time.sleep(0.05)  # chunks are on their way: the read is in flight
            assert reader.poll() is None, "the read ended before the crash"
            node.kill()
            node.start()
            output, _ = reader.communicate(timeout=COMMAND_TIMEOUT_SECONDS)
        finally:
            if reader.poll() is None:
                reader.kill()
                reader.wait()
        assert reader.returncode == 0
        expected = hashlib.sha256(Path("/bin/busybox").read_bytes()).hexdigest()
        assert output.strip() == expected
        d7y("umount", "--data-dir", node.data_dir, mountpoint)
    finally:
        relay.stop()


def test_a_start_without_handover_ends_what_a_keeper_kept(
    node_factory: NodeFactory, tmp_path: Path, mountpoints: list[Path]
) -> None:
    """A node killed with the handover on, started again with it off: the kept connection is
    ended (a process still holding a file of it gets an error, never a hang) and the mount is
    made anew."""
    from tests.harness.node import Node

    first = node_factory(extra_arguments=["--fuse-handover", "on"])
    mountpoint = new_mountpoint(tmp_path, mountpoints, "switched")
    d7y("mount", "--data-dir", first.data_dir, "--bootstrap", BOOTSTRAP, "--blob-dir", V6,
        mountpoint)
    expected = files_of(mountpoint)
    held_name, other_name = sorted(expected)[:2]
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(mountpoint), held_name, other_name],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    second = Node(first.work_dir)  # the same data dir, default settings (no handover)
    try:
        assert reader.stdin is not None and reader.stdout is not None
        assert reader.stdout.readline() == "opened\n"
        first.kill()
        second.start()
        reader.stdin.write("go\n")
        reader.stdin.flush()
        _output, errors = reader.communicate(timeout=COMMAND_TIMEOUT_SECONDS)
        assert reader.returncode != 0
        assert "Transport endpoint is not connected" in errors or "aborted" in errors, errors
        assert files_of(mountpoint) == expected
        log = second.log_tail()
        assert "kept for a handover that is off now" in log
        assert "mounted again after the restart" in log and "took over the mount" not in log
        d7y("umount", "--data-dir", second.data_dir, mountpoint)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
        second.stop()
