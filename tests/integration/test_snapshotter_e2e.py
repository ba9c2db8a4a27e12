"""d7y-node as containerd's snapshotter, end to end (issue 5, "How to show it" items 1-3).

Real parts: Debian's containerd 1.6 with runc, the CRI plugin's image service on containerd's
socket (our small CRI client, `tests/harness/cri.py`, calls PullImage as the kubelet does), the
real registry and its access log, and `d7y-node start --snapshotter-socket` as a child process.
containerd reaches the node as `[proxy_plugins.nydus]` (the name `d7y-node setup containerd`
writes) and pulls through the node's mirror (hosts.toml).

1. A Nydus image (converted in the test by `d7y-node convert` from a busybox image with a 16 MiB
   file nobody reads) pulled by CRI PullImage takes the remote path: containerd never downloads
   the data blobs (they are not in its content store), the bootstrap layer's snapshot is a RAFS
   one, the registry has served the bootstrap and none of the data blobs; `ctr run` prints the
   right output, its rootfs is an overlay over the node's FUSE mount, and afterwards the registry
   has served only part of the data (the chunks read, never the unread file). A plain OCI image
   works through the same snapshotter. The files `d7y-node setup containerd --write` makes drive
   a real containerd the same way.
2. `kill -9` of the node: after a restart the FUSE mounts are back, the snapshot list (from the
   node and from containerd) is what it was, no snapshot directory is orphaned, and a new
   container of the image starts. A crash in the middle of an unpack (between Prepare and
   Commit) loses and orphans nothing either. A container running during the crash keeps
   running; with `--fuse-handover on` it still reads files it never read (the FUSE connection
   is handed to the new process), without it such a read fails with ENOTCONN.
3. Bad arguments: the same `ctr snapshots` calls against containerd's own overlayfs and against
   the node give the same errors; direct calls on the node's socket get the gRPC status codes
   containerd's own snapshotters answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.harness.containerd import (
    CRI_NAMESPACE,
    NAMESPACE,
    Containerd,
    CriSettings,
    DaemonOptions,
    write_mirror_hosts,
)
from tests.harness.cri import PULL_TIMEOUT_SECONDS, CriError, CriImages
from tests.harness.images import BuiltImage, LayerSpec, RandomFile, build_image
from tests.harness.node import Node, node_command
from tests.harness.process import wait_until
from tests.harness.registry import Registry

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                       reason="containerd, overlay and FUSE mounts need root and /dev/fuse"),
]

# The proxy plugin's name: what `d7y-node setup containerd` writes by default.
SNAPSHOTTER = "nydus"
REPOSITORY = "e2e/app"
MESSAGE = "hello from a lazy layer"
# A file the container never reads: if the registry serves all of it, the pull was not lazy.
# 16 MiB gives 1 MiB pieces (piece_store.piece_size_for), so a read fetches a small share.
UNREAD_BYTES = 16 * 1024 * 1024
CONVERT_TIMEOUT_SECONDS = 300.0
SOCKET_TIMEOUT_SECONDS = 30.0
# Reading the message file and starting busybox reads a few chunks: well under this share of
# the blob holding the unread file.
LAZY_SHARE = 0.25
SNAPSHOTS_SERVICE = "/containerd.services.snapshots.v1.Snapshots"
CONTAINER_STOP_SECONDS = 30.0
# containerd removes a deleted container's snapshot from the snapshotter in its garbage
# collection, which runs shortly after (its scheduler's pause threshold); this bounds a slow one.
GC_SECONDS = 30.0
# containerd's gRPC client to the proxy plugin backs off while the node is down (grpc-go: 1 s,
# growing 1.6x per failed attempt) and only then dials the restarted node again.
RECONNECT_SECONDS = 60.0
# How often the crash-during-unpack test looks for containerd's unpack snapshot: unpacking the
# 16 MiB layer takes a few hundred milliseconds, so a look every 10 ms sees it.
UNPACK_POLL_SECONDS = 0.01
ACTIVE = 2  # snapshots.v1.Kind
ERROR_KINDS = ("not found", "already exists", "failed precondition", "invalid argument",
               "unknown")


# ---------------------------------------------------------------------------------------------
# The images


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int


@dataclass(frozen=True)
class AppImages:
    """The OCI image and its Nydus conversion in one registry."""

    registry: Registry
    oci: BuiltImage
    data_blobs: tuple[Blob, ...]
    bootstrap: Blob

    @property
    def oci_ref(self) -> str:
        return f"{self.registry.host}/{REPOSITORY}:v1"

    @property
    def nydus_ref(self) -> str:
        return f"{self.registry.host}/{REPOSITORY}:nydus"

    @property
    def largest_data_blob(self) -> Blob:
        return max(self.data_blobs, key=lambda blob: blob.size)


def _manifest(registry: Registry, tag: str) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{registry.url}/v2/{REPOSITORY}/manifests/{tag}",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        manifest: dict[str, Any] = json.loads(response.read())
        return manifest


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppImages]:
    registry = Registry(tmp_path_factory.mktemp("snapshotter-registry"))
    registry.start()
    try:
        oci = build_image(
            tmp_path_factory.mktemp("snapshotter-image") / "layout",
            [LayerSpec(busybox=True),
             LayerSpec(text_files={"etc/msg": MESSAGE + "\n"},
                       random_files=(RandomFile("data/unread.bin", UNREAD_BYTES, seed=5),))],
            command=("/bin/cat", "/etc/msg"),
        )
        oci.push(registry.host, f"{REPOSITORY}:v1")
        converted = subprocess.run(
            [*node_command(), "convert", f"{registry.host}/{REPOSITORY}:v1",
             f"{registry.host}/{REPOSITORY}:nydus"],
            capture_output=True, text=True, timeout=CONVERT_TIMEOUT_SECONDS, check=False,
        )
        assert converted.returncode == 0, converted.stderr
        *blobs, boot = _manifest(registry, "nydus")["layers"]
        yield AppImages(
            registry, oci, tuple(Blob(layer["digest"], layer["size"]) for layer in blobs),
            Blob(boot["digest"], boot["size"]),
        )
    finally:
        registry.stop()


# ---------------------------------------------------------------------------------------------
# The node + containerd stack


def _mounts() -> list[tuple[str, str, str]]:
    """(mount point, fs type, super options) of every mount this process sees."""
    found = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            separator = fields.index("-")
            point = fields[4].encode().decode("unicode_escape")
            found.append((point, fields[separator + 1], fields[separator + 3]))
    return found


def _unmount_under(root: Path) -> None:
    for point, _kind, _options in sorted(_mounts(), key=lambda m: len(m[0]), reverse=True):
        if point == str(root) or point.startswith(str(root) + "/"):
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)


class Stack:
    """One node serving the snapshotter socket, one containerd using it (CRI on)."""

    def __init__(
        self, work_dir: Path, app: AppImages, *, containerd_options: DaemonOptions | None = None,
        handover: bool = False,
    ) -> None:
        self.app = app
        # A unix socket path must fit in 108 bytes; pytest's tmp paths can be longer.
        self.short_dir = Path(tempfile.mkdtemp(prefix="d7y-snap-"))
        self.socket = str(self.short_dir / "snapshotter.sock")
        self.node = Node(work_dir / "node", insecure_registries=[app.registry.host],
                         # Not nydus-snapshotter's global path: other tests run nodes too.
                         extra_arguments=["--snapshotter-socket", self.socket,
                                          "--nydus-socket", "off",
                                          "--fuse-handover", "on" if handover else "off"])
        if containerd_options is None:
            containerd_options = DaemonOptions(
                cri=CriSettings(snapshotter=SNAPSHOTTER),
                proxy_snapshotters={SNAPSHOTTER: self.socket},
            )
        self.containerd = Containerd(work_dir / "containerd", containerd_options)
        self.cri = CriImages(self.containerd.cri_address)

    def start_node(self) -> None:
        self.node.start()
        wait_until(lambda: _socket_answers(self.socket), timeout=SOCKET_TIMEOUT_SECONDS,
                   what="the node's snapshotter socket", alive=lambda: self.node.process.running)

    def start(self) -> None:
        self.start_node()
        self.containerd.start()
        write_mirror_hosts(self.containerd.hosts_dir, self.app.registry.host,
                           self.node.proxy_url)

    def stop(self) -> None:
        try:
            self.containerd.stop()
        finally:
            self.node.stop()
            _unmount_under(self.node.data_dir)
            shutil.rmtree(self.short_dir, ignore_errors=True)

    # --- containerd calls in the CRI namespace, on our snapshotter

    def ctr(self, *arguments: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.containerd.ctr(list(arguments), namespace=CRI_NAMESPACE, check=check,
                                   timeout=120.0)

    def run(self, reference: str, container_id: str, *command: str) -> str:
        return self.ctr("run", "--rm", "--snapshotter", SNAPSHOTTER, reference, container_id,
                        *command).stdout

    def restart_node_after_crash(self) -> float:
        """`kill -9` the node, start it again, and wait until containerd reaches it; returns the
        seconds from the restarted node's ready socket to containerd's first good call."""
        self.node.kill()
        self.start_node()
        ready = time.monotonic()
        wait_until(self.containerd_reaches_node, timeout=RECONNECT_SECONDS,
                   what="containerd to reach the restarted node")
        return time.monotonic() - ready

    def containerd_reaches_node(self) -> bool:
        """Whether calls containerd passes on to the node work: the snapshot list, and Usage of
        a snapshot in it (when there is one)."""
        listed = self.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls", check=False)
        if listed.returncode != 0:
            return False
        keys = [line.split()[0] for line in listed.stdout.splitlines()[1:] if line.strip()]
        if not keys:
            return True
        return self.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "usage", keys[0],
                        check=False).returncode == 0

    def pull_until_node_reachable(self, reference: str) -> str:
        """CRI PullImage, repeated while containerd cannot reach the node yet (UNAVAILABLE),
        as the kubelet retries a pull."""
        deadline = time.monotonic() + RECONNECT_SECONDS
        while True:
            try:
                return self.cri.pull(reference)
            except CriError as error:
                if error.status != "UNAVAILABLE" or time.monotonic() > deadline:
                    raise
            time.sleep(0.5)

    def remove_container(self, container_id: str) -> None:
        """Kill a detached container's task and delete it and its snapshot."""
        self.ctr("task", "kill", "--signal", "SIGKILL", container_id, check=False)
        deadline = time.monotonic() + CONTAINER_STOP_SECONDS
        while self.ctr("task", "delete", container_id, check=False).returncode != 0:
            if time.monotonic() > deadline or container_id not in self.ctr(
                    "task", "ls", check=False).stdout:
                break
            time.sleep(0.2)
        self.ctr("container", "rm", container_id, check=False)

    def content_digests(self) -> set[str]:
        return set(self.ctr("content", "ls", "--quiet").stdout.split())

    def ctr_snapshots(self) -> list[str]:
        """containerd's own list (key, parent, kind), sorted."""
        lines = self.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls").stdout.splitlines()
        return sorted(" ".join(line.split()) for line in lines[1:])

    def fuse_mounts(self) -> list[str]:
        root = str(self.node.data_dir)
        return sorted(point for point, kind, _options in _mounts()
                      if kind.startswith("fuse") and point.startswith(root + "/"))

    def log_tails(self) -> str:
        return (f"--- node log\n{self.node.log_tail()}\n"
                f"--- containerd log\n{self.containerd.process.log_tail()}")


def _socket_answers(path: str) -> bool:
    try:
        asyncio.run(_snapshot_call(path, "List", _pb().ListSnapshotsRequest(
            snapshotter=SNAPSHOTTER)))
    except Exception:  # not up yet, whatever the reason
        return False
    return True


@pytest.fixture
def stack(tmp_path: Path, app: AppImages, request: pytest.FixtureRequest) -> Iterator[Stack]:
    with _running_stack(Stack(tmp_path, app), request) as started:
        yield started


@contextlib.contextmanager
def _running_stack(started: Stack, request: pytest.FixtureRequest) -> Iterator[Stack]:
    try:
        started.start()
        yield started
    finally:
        failed = any(getattr(getattr(request.node, f"report_{when}", None), "failed", False)
                     for when in ("setup", "call"))
        if failed:
            print(started.log_tails())
        started.stop()


# ---------------------------------------------------------------------------------------------
# Direct calls on the node's socket (containerd's Snapshots service)


def _pb() -> Any:
    from d7y_node.protos import snapshots_pb2

    return snapshots_pb2


@dataclass(frozen=True)
class CallError(Exception):
    status: str
    message: str


async def _snapshot_call(socket_path: str, method: str, request: Any) -> Any:
    """One unary call (or the whole stream, for List) on the Snapshots service."""
    from google.protobuf import empty_pb2
    from grpclib.client import Channel, UnaryStreamMethod, UnaryUnaryMethod
    from grpclib.exceptions import GRPCError

    pb = _pb()
    replies = {
        "Prepare": pb.PrepareSnapshotResponse, "View": pb.ViewSnapshotResponse,
        "Mounts": pb.MountsResponse, "Commit": empty_pb2.Empty, "Remove": empty_pb2.Empty,
        "Stat": pb.StatSnapshotResponse, "Usage": pb.UsageResponse,
    }
    channel = Channel(path=socket_path)
    try:
        name = f"{SNAPSHOTS_SERVICE}/{method}"
        if method == "List":
            stream: Any = UnaryStreamMethod(channel, name, type(request),
                                            pb.ListSnapshotsResponse)
            return [info for reply in await stream(request, timeout=30) for info in reply.info]
        call: Any = UnaryUnaryMethod(channel, name, type(request), replies[method])
        return await call(request, timeout=30)
    except GRPCError as error:
        raise CallError(error.status.name, error.message or "") from None
    finally:
        channel.close()


def snapshot_call(socket_path: str, method: str, **fields: Any) -> Any:
    pb = _pb()
    request_types = {
        "Prepare": pb.PrepareSnapshotRequest, "View": pb.ViewSnapshotRequest,
        "Mounts": pb.MountsRequest, "Commit": pb.CommitSnapshotRequest,
        "Remove": pb.RemoveSnapshotRequest, "Stat": pb.StatSnapshotRequest,
        "Usage": pb.UsageRequest, "List": pb.ListSnapshotsRequest,
    }
    request = request_types[method](snapshotter=SNAPSHOTTER, **fields)
    return asyncio.run(_snapshot_call(socket_path, method, request))


def status_of(socket_path: str, method: str, **fields: Any) -> str:
    """The gRPC status name a call ends with ("OK" when it succeeds)."""
    try:
        snapshot_call(socket_path, method, **fields)
    except CallError as error:
        return error.status
    return "OK"


def node_snapshots(socket_path: str) -> list[tuple[str, str, int, tuple[tuple[str, str], ...]]]:
    """The node's own list: (name, parent, kind, labels), sorted."""
    infos = snapshot_call(socket_path, "List")
    return sorted((info.name, info.parent, int(info.kind), tuple(sorted(info.labels.items())))
                  for info in infos)


# ---------------------------------------------------------------------------------------------
# 1. The remote path, and plain images through the same snapshotter


def test_nydus_image_pulled_by_cri_starts_lazily(stack: Stack, app: AppImages) -> None:
    log = app.registry.access_log
    mark = log.mark()
    image_id = stack.cri.pull(app.nydus_ref)
    status = stack.cri.status(app.nydus_ref)
    assert status is not None and status.image_id == image_id

    # containerd itself fetched the bootstrap layer and never a data blob.
    content = stack.content_digests()
    assert app.bootstrap.digest in content
    assert not {blob.digest for blob in app.data_blobs} & content

    # The node holds a committed snapshot per data blob (marked as one) and a RAFS bootstrap.
    snapshots = node_snapshots(stack.socket)
    committed = [labels for _name, _parent, kind, labels in snapshots if kind == 3]
    blob_layers = [dict(labels) for labels in committed
                   if dict(labels).get("containerd.io/snapshot/nydus-blob") == "true"]
    assert {labels.get("containerd.io/snapshot/cri.layer-digest") for labels in blob_layers} == {
        blob.digest for blob in app.data_blobs}
    assert any("containerd.io/snapshot/d7y-node.rafs-version" in dict(labels)
               for labels in committed), snapshots

    print(f"bootstrap layer {app.bootstrap.size} B; data blobs "
          f"{[blob.size for blob in app.data_blobs]} B")
    # Nothing has read a file yet: the registry served the bootstrap and no data.
    log.settle()
    assert log.bytes_served(app.bootstrap.digest, since=mark) >= app.bootstrap.size
    for blob in app.data_blobs:
        assert log.bytes_served(blob.digest, since=mark) == 0, blob

    # A container runs; its rootfs is an overlay whose lowest layer is the node's FUSE mount.
    stack.ctr("run", "-d", "--snapshotter", SNAPSHOTTER, app.nydus_ref, "lazy-1",
              "/bin/sleep", "60")
    try:
        rootfs = [(point, options) for point, kind, options in _mounts()
                  if kind == "overlay" and point.endswith("/lazy-1/rootfs")]
        assert len(rootfs) == 1, _mounts()
        fuse = stack.fuse_mounts()
        assert fuse, "no FUSE mount under the node's data dir"
        lower = re.search(r"lowerdir=([^,]+)", rootfs[0][1])
        assert lower is not None and lower.group(1).split(":")[-1] in fuse, rootfs
        printed = stack.ctr("task", "exec", "--exec-id", "read", "lazy-1", "/bin/cat",
                            "/etc/msg").stdout
        assert printed == MESSAGE + "\n"
    finally:
        stack.remove_container("lazy-1")

    assert stack.run(app.nydus_ref, "lazy-2") == MESSAGE + "\n"

    # The registry served only the chunks read: the unread 16 MiB stayed where it was.
    log.settle()
    big = app.largest_data_blob
    served = log.bytes_served(big.digest, since=mark)
    served_each = [log.bytes_served(blob.digest, since=mark) for blob in app.data_blobs]
    print(f"after two containers: registry served {served_each} B of the data blobs")
    assert 0 < served < LAZY_SHARE * big.size, (served, big.size)
    assert sum(log.bytes_served(blob.digest, since=mark) for blob in app.data_blobs) < sum(
        blob.size for blob in app.data_blobs)


def test_plain_oci_image_runs_through_the_same_snapshotter(stack: Stack, app: AppImages) -> None:
    stack.cri.pull(app.oci_ref)
    # A plain image is downloaded by containerd and unpacked into the node's snapshots.
    content = stack.content_digests()
    assert {layer.digest for layer in app.oci.layers} <= content
    committed = [entry for entry in node_snapshots(stack.socket) if entry[2] == 3]
    assert len(committed) == len(app.oci.layers)
    assert not any(dict(labels).get("containerd.io/snapshot/nydus-blob") for *_, labels in
                   committed)
    assert stack.run(app.oci_ref, "plain-1") == MESSAGE + "\n"
    assert stack.run(app.oci_ref, "plain-2", "/bin/sh", "-c", "echo $((6 * 7))") == "42\n"
    assert stack.fuse_mounts() == []


def test_setup_command_configures_a_real_containerd(
    tmp_path: Path, app: AppImages, request: pytest.FixtureRequest,
) -> None:
    """`d7y-node setup containerd --write` on the test daemon's config (CRI off, as the harness
    writes it by default): with nothing else configured, CRI pulls the Nydus image lazily through
    the node and `ctr run` works."""
    # The harness's default daemon: CRI disabled, no proxy plugin, no hosts.
    stack = Stack(tmp_path, app, containerd_options=DaemonOptions())
    try:
        stack.start_node()
        config = stack.containerd.write_config()
        written = subprocess.run(
            [*node_command(), "setup", "containerd", "--write", "--config-path", str(config),
             "--hosts-dir", str(stack.containerd.hosts_dir), "--registry", app.registry.host,
             "--proxy-listen", stack.node.proxy_host, "--snapshotter-socket", stack.socket],
            capture_output=True, text=True, timeout=60, check=False,
        )
        assert written.returncode == 0, written.stderr
        assert "containerd must be restarted" in written.stdout
        stack.containerd.start(write_config=False)
        mark = app.registry.access_log.mark()
        stack.cri.pull(app.nydus_ref)
        assert not {blob.digest for blob in app.data_blobs} & stack.content_digests()
        assert stack.run(app.nydus_ref, "by-setup") == MESSAGE + "\n"
        # The pull went through the node's mirror: the registry saw the node, not containerd.
        agents = {entry.user_agent for entry in app.registry.access_log.entries()[mark:]}
        assert agents and all(agent.startswith("d7y-node/") for agent in agents), agents
    finally:
        if any(getattr(getattr(request.node, f"report_{when}", None), "failed", False)
               for when in ("setup", "call")):
            print(stack.log_tails())
        stack.stop()


# ---------------------------------------------------------------------------------------------
# 2. kill -9 and restart


def _settled_snapshots(stack: Stack) -> list[tuple[str, str, int, tuple[tuple[str, str], ...]]]:
    """The node's list once containerd's GC removed the snapshots of deleted containers (no
    container exists in these tests when this is called, so no active snapshot should)."""
    wait_until(lambda: all(kind != 2 for _n, _p, kind, _l in node_snapshots(stack.socket)),
               timeout=GC_SECONDS, what="containerd's GC to remove container snapshots")
    return node_snapshots(stack.socket)


def _snapshot_dirs(data_dir: Path) -> list[str]:
    root = data_dir / "snapshotter" / "snapshots"
    return sorted(entry.name for entry in root.iterdir()) if root.exists() else []


def test_kill_9_restart_restores_mounts_and_loses_nothing(stack: Stack, app: AppImages) -> None:
    stack.cri.pull(app.nydus_ref)
    stack.cri.pull(app.oci_ref)
    assert stack.run(app.nydus_ref, "before-crash") == MESSAGE + "\n"
    node_before = _settled_snapshots(stack)
    ctr_before = stack.ctr_snapshots()
    mounts_before = stack.fuse_mounts()
    dirs_before = _snapshot_dirs(stack.node.data_dir)
    # Each snapshot has at most one directory (a Nydus data-blob layer may need none).
    assert mounts_before and 0 < len(dirs_before) <= len(node_before)

    reconnect_seconds = stack.restart_node_after_crash()
    print(f"containerd reached the restarted node after {reconnect_seconds:.1f} s")

    mounts_after = stack.fuse_mounts()
    assert mounts_after == mounts_before
    for point in mounts_after:
        assert os.listdir(point), f"{point} is mounted but empty or dead"
    assert node_snapshots(stack.socket) == node_before
    assert stack.ctr_snapshots() == ctr_before
    assert _snapshot_dirs(stack.node.data_dir) == dirs_before
    nydus_dir = stack.node.data_dir / "nydus"
    assert len(list(nydus_dir.iterdir())) == len(mounts_after)

    assert stack.run(app.nydus_ref, "after-crash") == MESSAGE + "\n"
    assert stack.run(app.oci_ref, "plain-after-crash") == MESSAGE + "\n"
    # The containers are gone again, and so are their snapshots and directories.
    assert _settled_snapshots(stack) == node_before
    assert _snapshot_dirs(stack.node.data_dir) == dirs_before


def test_kill_9_during_an_unpack_leaves_nothing_orphaned(stack: Stack, app: AppImages) -> None:
    """`kill -9` while containerd unpacks a layer into one of the node's snapshots (after
    Prepare, before Commit): the pull fails, the same pull after the restart succeeds, and once
    containerd's garbage collection has run no active snapshot is left and every snapshot
    directory belongs to a snapshot."""
    outcome: dict[str, object] = {}

    def pull() -> None:
        try:
            outcome["image"] = stack.cri.pull(app.oci_ref)
        except CriError as error:
            outcome["error"] = error

    puller = threading.Thread(target=pull, name="cri-pull")
    puller.start()
    caught: list[str] = []
    try:
        deadline = time.monotonic() + PULL_TIMEOUT_SECONDS
        while puller.is_alive() and time.monotonic() < deadline:
            with contextlib.suppress(CallError):
                caught = [name for name, _parent, kind, _labels in node_snapshots(stack.socket)
                          if kind == ACTIVE]
            if caught:
                stack.node.kill()
                break
            time.sleep(UNPACK_POLL_SECONDS)
    finally:
        puller.join(timeout=PULL_TIMEOUT_SECONDS)
    assert caught, f"the pull ended before an unpack snapshot was seen: {outcome}"
    assert "error" in outcome, outcome  # containerd could not commit the layer

    stack.restart_node_after_crash()
    assert caught[0] in [name for name, *_ in node_snapshots(stack.socket)]  # not lost
    stack.pull_until_node_reachable(app.oci_ref)
    assert stack.run(app.oci_ref, "after-unpack-crash") == MESSAGE + "\n"
    settled = _settled_snapshots(stack)
    assert len([entry for entry in settled if entry[2] == 3]) == len(app.oci.layers)
    wait_until(lambda: len(_snapshot_dirs(stack.node.data_dir)) == len(settled),
               timeout=GC_SECONDS, what="no snapshot directory without a snapshot")


def _start_survivor(stack: Stack, app: AppImages) -> None:
    """A detached container of the Nydus image, up and having run a command (so its shell and
    busybox pages are in memory before the crash)."""
    stack.cri.pull(app.nydus_ref)
    stack.ctr("run", "-d", "--snapshotter", SNAPSHOTTER, app.nydus_ref, "survivor",
              "/bin/sleep", "300")
    wait_until(lambda: stack.ctr("task", "exec", "--exec-id", "warm", "survivor", "/bin/true",
                                 check=False).returncode == 0,
               timeout=CONTAINER_STOP_SECONDS, what="the container to run")


def test_container_running_through_a_crash_keeps_running(stack: Stack, app: AppImages) -> None:
    """What the README promises for a container running at the crash: it is not killed, and a
    new container of the same image starts at once on the restarted node."""
    _start_survivor(stack, app)
    try:
        stack.restart_node_after_crash()
        tasks = stack.ctr("task", "ls").stdout.split()
        assert tasks[tasks.index("survivor") + 2] == "RUNNING", tasks
        assert stack.run(app.nydus_ref, "next") == MESSAGE + "\n"
    finally:
        stack.remove_container("survivor")


@pytest.mark.parametrize("handover", [True, False], ids=["handover-on", "handover-off"])
def test_container_running_through_a_crash_reads_after_restart(
    tmp_path: Path, app: AppImages, request: pytest.FixtureRequest, handover: bool,
) -> None:
    """The goal of issue 5: a container started before `kill -9` reads a file it never read
    before, once the node is back. With `--fuse-handover on` the FUSE connection is handed to the
    new process and the read works; without it the read fails with ENOTCONN, as the README says."""
    with _running_stack(Stack(tmp_path, app, handover=handover), request) as stack:
        _start_survivor(stack, app)
        try:
            stack.restart_node_after_crash()
            result = stack.ctr("task", "exec", "--exec-id", "after", "survivor", "/bin/cat",
                               "/etc/msg", check=False)
            if handover:
                assert (result.returncode, result.stdout) == (0, MESSAGE + "\n"), result.stderr
            else:
                assert result.returncode != 0, result.stdout
                assert "not connected" in result.stdout + result.stderr, result
        finally:
            stack.remove_container("survivor")


# ---------------------------------------------------------------------------------------------
# 3. Bad arguments


# (arguments of `ctr snapshots`), in order; each step may depend on the ones before.
BAD_ARGUMENT_STEPS: tuple[tuple[str, ...], ...] = (
    ("prepare", "orphan", "missing-parent"),    # parent does not exist
    ("prepare", "a"),
    ("prepare", "a"),                           # key taken
    ("commit", "c1", "a"),
    ("commit", "c2", "a"),                      # the key is gone once committed
    ("commit", "c3", "c1"),                     # committing a committed snapshot
    ("prepare", "b"),
    ("commit", "c1", "b"),                      # name taken
    ("prepare", "child", "c1"),
    ("rm", "c1"),                               # has a child
    ("view", "v1", "missing"),                  # view of a missing parent
    ("rm", "unknown"),
    ("info", "unknown"),
    ("mounts", "/tmp/unused", "unknown"),
    ("usage", "unknown"),
    ("rm", "child"),
    ("rm", "c1"),                               # no child any more
)


def _outcome(result: subprocess.CompletedProcess[str]) -> str:
    if result.returncode == 0:
        return "ok"
    message = result.stderr.strip()
    return next((kind for kind in ERROR_KINDS if message.endswith(kind)), message)


def test_bad_ctr_calls_fail_as_with_containerds_own_snapshotter(stack: Stack) -> None:
    outcomes: dict[str, list[str]] = {}
    for snapshotter in ("overlayfs", SNAPSHOTTER):
        outcomes[snapshotter] = [
            _outcome(stack.containerd.ctr(["snapshots", "--snapshotter", snapshotter, *step],
                                          namespace=NAMESPACE, check=False))
            for step in BAD_ARGUMENT_STEPS
        ]
    assert outcomes[SNAPSHOTTER] == outcomes["overlayfs"]
    # The reference really had the failures it is meant to have.
    assert outcomes["overlayfs"].count("ok") == 6
    assert {"not found", "already exists", "failed precondition"} <= set(outcomes["overlayfs"])


def test_bad_calls_on_the_socket_get_containerds_status_codes(stack: Stack) -> None:
    socket = stack.socket
    assert status_of(socket, "Prepare", key="x", parent="missing") == "NOT_FOUND"
    assert status_of(socket, "View", key="v", parent="missing") == "NOT_FOUND"
    assert status_of(socket, "Prepare", key="a") == "OK"
    assert status_of(socket, "Prepare", key="a") == "ALREADY_EXISTS"
    assert status_of(socket, "Commit", name="c", key="a") == "OK"
    assert status_of(socket, "Commit", name="c2", key="a") == "NOT_FOUND"
    assert status_of(socket, "Commit", name="c3", key="c") == "FAILED_PRECONDITION"
    assert status_of(socket, "Prepare", key="b") == "OK"
    assert status_of(socket, "Commit", name="c", key="b") == "ALREADY_EXISTS"
    assert status_of(socket, "Prepare", key="child", parent="c") == "OK"
    assert status_of(socket, "Remove", key="c") == "FAILED_PRECONDITION"
    for method in ("Stat", "Remove", "Mounts", "Usage"):
        assert status_of(socket, method, key="unknown") == "NOT_FOUND", method
    assert status_of(socket, "List", filters=['labels."unterminated']) == "INVALID_ARGUMENT"
    # Nothing of that left a half-made snapshot behind.
    names = sorted(name for name, *_ in node_snapshots(socket))
    assert names == ["b", "c", "child"]
    assert status_of(socket, "Remove", key="child") == "OK"
    assert status_of(socket, "Remove", key="c") == "OK"

