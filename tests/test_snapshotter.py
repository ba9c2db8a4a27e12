"""snapshotter: containerd's snapshots API over real gRPC on a real unix socket (a grpclib
client), overlayfs semantics (checked with the kernel's own overlayfs in integration tests),
containerd's status codes, filters, the remote-layer hook, and the node's sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import empty_pb2, field_mask_pb2
from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError
from hypothesis import given, settings
from hypothesis import strategies as st

from d7y_node.config import load_config
from d7y_node.errors import ConfigError, RafsError
from d7y_node.protos import snapshots_pb2 as pb
from d7y_node.snapshotter import (
    SERVICE_NAME,
    TARGET_REF_LABEL,
    Kind,
    SnapshotInfo,
    SnapshotsService,
    Snapshotter,
    SnapshotterServer,
    parse_filters,
    socket_in_use,
)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: a unix socket path must fit in 108 bytes."""
    directory = Path(tempfile.mkdtemp(prefix="d7y-snap-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


class Client:
    """A grpclib client of the snapshots service, as containerd's proxy snapshotter calls it."""

    def __init__(self, path: Path) -> None:
        self.channel = Channel(path=os.fspath(path))

    async def call(self, method: str, request: Any, reply: type[Any]) -> Any:
        async with self.channel.request(
            f"/{SERVICE_NAME}/{method}", Cardinality.UNARY_UNARY, type(request), reply,
            timeout=30,
        ) as stream:
            await stream.send_message(request, end=True)
            return await stream.recv_message()

    async def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] = {}
                      ) -> list[Any]:
        reply = await self.call("Prepare", pb.PrepareSnapshotRequest(
            snapshotter="d7y", key=key, parent=parent, labels=dict(labels)),
            pb.PrepareSnapshotResponse)
        return list(reply.mounts)

    async def view(self, key: str, parent: str = "") -> list[Any]:
        reply = await self.call("View", pb.ViewSnapshotRequest(key=key, parent=parent),
                                pb.ViewSnapshotResponse)
        return list(reply.mounts)

    async def mounts(self, key: str) -> list[Any]:
        return list((await self.call("Mounts", pb.MountsRequest(key=key),
                                     pb.MountsResponse)).mounts)

    async def commit(self, name: str, key: str, labels: Mapping[str, str] = {}) -> None:
        await self.call("Commit", pb.CommitSnapshotRequest(name=name, key=key,
                                                           labels=dict(labels)), empty_pb2.Empty)

    async def remove(self, key: str) -> None:
        await self.call("Remove", pb.RemoveSnapshotRequest(key=key), empty_pb2.Empty)

    async def stat(self, key: str) -> Any:
        return (await self.call("Stat", pb.StatSnapshotRequest(key=key),
                                pb.StatSnapshotResponse)).info

    async def update(self, name: str, labels: Mapping[str, str], paths: Sequence[str] = (),
                     **info: Any) -> Any:
        request = pb.UpdateSnapshotRequest(info=pb.Info(name=name, labels=dict(labels), **info))
        if paths:
            request.update_mask.CopyFrom(field_mask_pb2.FieldMask(paths=list(paths)))
        return (await self.call("Update", request, pb.UpdateSnapshotResponse)).info

    async def list(self, *filters: str) -> list[Any]:
        found: list[Any] = []
        async with self.channel.request(
            f"/{SERVICE_NAME}/List", Cardinality.UNARY_STREAM, pb.ListSnapshotsRequest,
            pb.ListSnapshotsResponse, timeout=30,
        ) as stream:
            await stream.send_message(pb.ListSnapshotsRequest(filters=list(filters)), end=True)
            async for reply in stream:
                found.extend(reply.info)
        return found

    async def names(self, *filters: str) -> set[str]:
        return {info.name for info in await self.list(*filters)}

    async def usage(self, key: str) -> tuple[int, int]:
        reply = await self.call("Usage", pb.UsageRequest(key=key), pb.UsageResponse)
        return reply.size, reply.inodes

    async def cleanup(self) -> None:
        await self.call("Cleanup", pb.CleanupRequest(), empty_pb2.Empty)

    def close(self) -> None:
        self.channel.close()


@dataclass
class Service:
    snapshotter: Snapshotter
    server: SnapshotterServer
    client: Client
    socket_path: Path
    root: Path


@contextlib.asynccontextmanager
async def serving(root: Path, socket_path: Path, remote: Any = None) -> AsyncIterator[Service]:
    snapshotter = Snapshotter(root, remote=remote, overlay_index_off=False)
    await snapshotter.open()
    server = SnapshotterServer(SnapshotsService(snapshotter))
    client: Client | None = None
    try:
        await server.listen(socket_path, required=True)
        client = Client(socket_path)
        yield Service(snapshotter, server, client, socket_path, root)
    finally:
        if client is not None:
            client.close()
        await server.close()
        await snapshotter.close()


@pytest.fixture
async def service(tmp_path: Path, short_dir: Path) -> AsyncIterator[Service]:
    async with serving(tmp_path / "snapshotter", short_dir / "snap.sock") as running:
        yield running


async def status_of(call: Any) -> Status:
    with pytest.raises(GRPCError) as caught:
        await call
    return caught.value.status


def fs(service: Service, name: str) -> str:
    return os.fspath(service.snapshotter.db.fs_dir(service.snapshotter.db.get(name).id))


def work(service: Service, name: str) -> str:
    return os.fspath(service.snapshotter.db.work_dir(service.snapshotter.db.get(name).id))


def as_tuple(mount: Any) -> tuple[str, str, list[str]]:
    return mount.type, mount.source, list(mount.options)


# -- overlay semantics -------------------------------------------------------------------------


async def test_mounts_follow_containerds_overlay_snapshotter(service: Service) -> None:
    client = service.client
    [base] = await client.prepare("k8s.io/1/extract-1 sha256:aa")
    assert as_tuple(base) == ("bind", fs(service, "k8s.io/1/extract-1 sha256:aa"), ["rw", "rbind"])
    base_fs = fs(service, "k8s.io/1/extract-1 sha256:aa")
    await client.commit("layer-1", "k8s.io/1/extract-1 sha256:aa")

    await client.prepare("extract-2", "layer-1")
    second_fs = fs(service, "extract-2")
    await client.commit("layer-2", "extract-2")

    [container] = await client.prepare("container", "layer-2")
    assert as_tuple(container) == ("overlay", "overlay", [
        f"workdir={work(service, 'container')}", f"upperdir={fs(service, 'container')}",
        f"lowerdir={second_fs}:{base_fs}",
    ])
    assert [as_tuple(m) for m in await client.mounts("container")] == [as_tuple(container)]

    # A view of one layer binds that layer read-only; of several, an overlay of lowers only.
    assert [as_tuple(m) for m in await client.view("view-1", "layer-1")] == [
        ("bind", base_fs, ["ro", "rbind"])]
    assert [as_tuple(m) for m in await client.view("view-2", "layer-2")] == [
        ("overlay", "overlay", [f"lowerdir={second_fs}:{base_fs}"])]
    [empty_view] = await client.view("view-0")
    assert as_tuple(empty_view) == ("bind", fs(service, "view-0"), ["ro", "rbind"])

    info = await client.stat("container")
    assert (info.name, info.parent, info.kind) == ("container", "layer-2", pb.ACTIVE)
    assert (await client.stat("view-2")).kind == pb.VIEW
    layer = await client.stat("layer-2")
    assert (layer.kind, layer.parent) == (pb.COMMITTED, "layer-1")
    assert layer.created_at.seconds > 0 and layer.updated_at.seconds > 0


async def test_index_off_is_added_when_the_kernel_has_the_overlay_index(tmp_path: Path) -> None:
    snapshotter = Snapshotter(tmp_path / "s", overlay_index_off=True)
    await snapshotter.open()
    try:
        await snapshotter.prepare("a", "", {})
        await snapshotter.commit("A", "a", {})
        [mount] = await snapshotter.prepare("b", "A", {})
        assert mount.options[0] == "index=off"
    finally:
        await snapshotter.close()


async def test_commit_replaces_labels_and_records_usage(service: Service) -> None:
    client = service.client
    await client.prepare("active", labels={"old": "1"})
    upper = Path(fs(service, "active"))
    (upper / "dir").mkdir()
    (upper / "dir" / "file").write_bytes(b"x" * 50000)
    os.link(upper / "dir" / "file", upper / "hardlink")  # one inode, counted once
    size, inodes = await client.usage("active")
    assert size >= 50000 and inodes == 2
    await client.commit("committed", "active", {"new": "2"})
    assert dict((await client.stat("committed")).labels) == {"new": "2"}
    # A committed snapshot's usage is what was counted at commit.
    (upper / "later").write_bytes(b"y" * 100000)
    assert await client.usage("committed") == (size, inodes)


# -- status codes containerd expects ----------------------------------------------------------


async def test_errors_map_to_containerds_status_codes(service: Service) -> None:
    client = service.client
    await client.prepare("base")
    await client.commit("layer", "base")
    await client.prepare("child", "layer")

    for call in (client.stat("nope"), client.mounts("nope"), client.remove("nope"),
                 client.usage("nope"), client.commit("x", "nope"),
                 client.update("nope", {"a": "b"}, ["labels.a"])):
        assert await status_of(call) == Status.NOT_FOUND
    # A parent that does not exist: not found (containerd's storage.CreateSnapshot).
    assert await status_of(client.prepare("orphan", "no-such-layer")) == Status.NOT_FOUND
    assert await status_of(client.view("orphan", "no-such-layer")) == Status.NOT_FOUND
    # A parent that is not committed: invalid argument.
    assert await status_of(client.prepare("orphan", "child")) == Status.INVALID_ARGUMENT
    assert await status_of(client.prepare("child", "layer")) == Status.ALREADY_EXISTS
    assert await status_of(client.prepare("layer")) == Status.ALREADY_EXISTS
    # Committing a committed snapshot: failed precondition; onto a taken name: already exists.
    assert await status_of(client.commit("again", "layer")) == Status.FAILED_PRECONDITION
    assert await status_of(client.commit("layer", "child")) == Status.ALREADY_EXISTS
    assert await status_of(client.remove("layer")) == Status.FAILED_PRECONDITION
    assert await status_of(client.mounts("layer")) == Status.FAILED_PRECONDITION
    for bad in ("", "a\x00b", "k" * 5000):
        assert await status_of(client.prepare(bad)) == Status.INVALID_ARGUMENT
        assert await status_of(client.stat(bad)) == Status.INVALID_ARGUMENT
    assert await status_of(client.prepare("big", labels={"k": "v" * 4096})) == \
        Status.INVALID_ARGUMENT
    for path in ("kind", "parent", "name", "created_at"):
        assert await status_of(client.update("child", {}, [path])) == Status.INVALID_ARGUMENT
    assert await status_of(client.list("name==")) == Status.INVALID_ARGUMENT
    assert await status_of(client.list("name~=(")) == Status.INVALID_ARGUMENT

    # Nothing of the failed calls stuck, and the children are intact.
    assert await client.names() == {"layer", "child"}
    await client.remove("child")
    await client.remove("layer")
    assert await client.names() == set()
    assert os.listdir(service.snapshotter.db.snapshots_dir) == []


class Garbage:
    """A "message" whose bytes are whatever the test says (grpclib's codec calls this)."""

    payload = b""

    def SerializeToString(self) -> bytes:
        return self.payload

    @classmethod
    def FromString(cls, data: bytes) -> Garbage:
        return cls()


@pytest.mark.parametrize("payload", [
    b"\xff\xff\xff\xff",  # a truncated varint
    b"\x12\x02\xff\xfe",  # key = invalid UTF-8
    b"\x12\x10abc",  # a length past the end
    os.urandom(64),
])
async def test_garbage_requests_get_invalid_argument_not_a_crash(
    service: Service, payload: bytes
) -> None:
    await service.client.prepare("alive")

    class Payload(Garbage):
        pass

    Payload.payload = payload
    status: Status | None = None
    try:
        async with service.client.channel.request(
            f"/{SERVICE_NAME}/Prepare", Cardinality.UNARY_UNARY, Payload,
            pb.PrepareSnapshotResponse, timeout=10,
        ) as stream:
            await stream.send_message(Payload(), end=True)
            await stream.recv_message()
    except GRPCError as error:
        status = error.status
    # Random bytes may happen to decode (unknown fields are legal protobuf): then the request
    # is an empty key, which is invalid too.
    assert status == Status.INVALID_ARGUMENT
    assert (await service.client.stat("alive")).name == "alive"


async def test_unknown_methods_and_raw_junk_do_not_hurt_the_server(service: Service) -> None:
    await service.client.prepare("alive")
    with pytest.raises(GRPCError) as caught:
        async with service.client.channel.request(
            f"/{SERVICE_NAME}/Explode", Cardinality.UNARY_UNARY, pb.StatSnapshotRequest,
            pb.StatSnapshotResponse, timeout=10,
        ) as stream:
            await stream.send_message(pb.StatSnapshotRequest(key="x"), end=True)
            await stream.recv_message()
    # grpclib answers grpc-status 12 in a trailers-only reply without a content-type, which its
    # own client reads as UNKNOWN.
    assert caught.value.status in (Status.UNIMPLEMENTED, Status.UNKNOWN)
    # Not HTTP/2 at all.
    for junk in (b"GET / HTTP/1.1\r\n\r\n", os.urandom(4096), b""):
        _, writer = await asyncio.open_unix_connection(os.fspath(service.socket_path))
        writer.write(junk)
        with contextlib.suppress(OSError):
            await writer.drain()
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    assert (await service.client.stat("alive")).name == "alive"


# -- update, list and filters -----------------------------------------------------------------


async def test_update_changes_labels_only(service: Service) -> None:
    client = service.client
    await client.prepare("s", labels={"a": "1", "b": "2"})
    before = await client.stat("s")
    info = await client.update("s", {"a": "9", "c": "3"}, ["labels.a"])
    assert dict(info.labels) == {"a": "9", "b": "2"}
    info = await client.update("s", {}, ["labels.b"])
    assert dict(info.labels) == {"a": "9"}
    info = await client.update("s", {"x": "y"}, [], kind=pb.COMMITTED, parent="p")
    # Without a mask every mutable field (the labels) is replaced; kind and parent are not.
    assert dict(info.labels) == {"x": "y"}
    assert (info.kind, info.parent) == (pb.ACTIVE, "")
    after = await client.stat("s")
    assert (after.updated_at.seconds, after.updated_at.nanos) >= (
        before.updated_at.seconds, before.updated_at.nanos)
    assert after.created_at == before.created_at


async def test_list_with_containerds_filters(service: Service) -> None:
    client = service.client
    await client.prepare("ns/1/base", labels={"containerd.io/snapshot.ref": "sha256:aa"})
    await client.commit("ns/2/sha256:aa", "ns/1/base",
                        {"containerd.io/snapshot.ref": "sha256:aa", "team": "blue"})
    await client.prepare("ns/3/top", "ns/2/sha256:aa")
    await client.commit("ns/4/sha256:bb", "ns/3/top", {"team": "red", "a.b": "dotted"})
    await client.prepare("ns/5/container", "ns/4/sha256:bb", {"team": "red"})
    await client.view("ns/6/view", "ns/4/sha256:bb")

    assert len(await client.list()) == 4
    assert await client.names("") == await client.names()
    assert await client.names("kind==committed") == {"ns/2/sha256:aa", "ns/4/sha256:bb"}
    assert await client.names("kind==active") == {"ns/5/container"}
    assert await client.names("kind==view") == {"ns/6/view"}
    assert await client.names('name=="ns/5/container"') == {"ns/5/container"}
    assert await client.names("parent==ns/4/sha256:bb") == {"ns/5/container", "ns/6/view"}
    assert await client.names("parent!=ns/4/sha256:bb") == {"ns/2/sha256:aa", "ns/4/sha256:bb"}
    assert await client.names("labels.team") == {"ns/2/sha256:aa", "ns/4/sha256:bb",
                                                 "ns/5/container"}
    assert await client.names("labels.team==red,kind==active") == {"ns/5/container"}
    assert await client.names('labels."a.b"==dotted') == {"ns/4/sha256:bb"}
    assert await client.names("labels.a.b==dotted") == {"ns/4/sha256:bb"}
    assert await client.names("name~=^ns/[24]/") == {"ns/2/sha256:aa", "ns/4/sha256:bb"}
    assert await client.names("name~=/container$/") == {"ns/5/container"}
    assert await client.names("labels.team!=red") == {"ns/2/sha256:aa", "ns/6/view"}
    # Several filters: any of them.
    assert await client.names("kind==view", "labels.team==blue") == {"ns/6/view",
                                                                     "ns/2/sha256:aa"}
    # The filter containerd's metadata layer sends after a remote snapshot's ALREADY_EXISTS.
    assert await client.names(
        'labels."containerd.io/snapshot.ref"==sha256:aa,parent==""'
    ) == {"ns/2/sha256:aa"}
    assert await client.names("labels.nothing==x") == set()


def info(name: str, kind: Kind = Kind.ACTIVE, parent: str = "",
         labels: Mapping[str, str] | None = None) -> SnapshotInfo:
    return SnapshotInfo(1, name, kind, parent, labels or {}, 0.0, 0.0)


@pytest.mark.parametrize(("text", "matches"), [
    ('name=="a\\"b"', True),
    ("name==a\"b", True),
    ("name~=|a\"b|", True),
    ('labels."x y"==z', True),
    ('labels."x y" == z', True),
    ("labels.missing!=z", True),
    ("labels.missing", False),
    ("name==b", False),
    ('name=="a\\u0022b"', True),
    ('name=="a\\042b"', True),
])
def test_filter_grammar(text: str, matches: bool) -> None:
    subject = info('a"b', labels={"x y": "z"})
    assert parse_filters([text]).match(subject) is matches


@pytest.mark.parametrize("text", [
    "name==", "name=", "name===a", "name<a", ",", "name==a,", ".name", 'name=="open',
    "name==a b", 'name=="\\q"', "labels.",
])
def test_malformed_filters_are_invalid(text: str) -> None:
    from d7y_node.errors import SnapshotInvalidArgument

    with pytest.raises(SnapshotInvalidArgument):
        parse_filters([text])


def go_quote(text: str) -> str:
    """A Go string literal (what containerd's `%q` writes): JSON's escapes are Go's."""
    return json.dumps(text, ensure_ascii=False)


@given(st.text(max_size=200))
@settings(max_examples=300, deadline=None)
def test_any_filter_text_parses_or_is_an_invalid_argument(text: str) -> None:
    from d7y_node.errors import SnapshotInvalidArgument

    with contextlib.suppress(SnapshotInvalidArgument):
        parse_filters([text]).match(info("x", labels={"a": "b"}))


_LABEL_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"),
                      min_size=1, max_size=40)


@given(key=_LABEL_TEXT, value=_LABEL_TEXT, other=_LABEL_TEXT)
@settings(max_examples=300, deadline=None)
def test_quoted_labels_match_exactly(key: str, value: str, other: str) -> None:
    subject = info("s", labels={key: value})
    text = f"labels.{go_quote(key)}=={go_quote(value)}"
    assert parse_filters([text]).match(subject)
    assert parse_filters([f"labels.{go_quote(key)}"]).match(subject)
    assert parse_filters([f"labels.{go_quote(key)}!={go_quote(value)}"]).match(subject) is False
    if other != value:
        assert not parse_filters([f"labels.{go_quote(key)}=={go_quote(other)}"]).match(subject)


# -- cleanup, restart, remote layers -----------------------------------------------------------


async def test_cleanup_removes_directories_no_snapshot_owns(service: Service) -> None:
    await service.client.prepare("keep")
    leftovers = service.snapshotter.db.snapshots_dir
    (leftovers / "12345" / "fs").mkdir(parents=True)
    (leftovers / "new-feedface" / "fs" / "x").mkdir(parents=True)
    await service.client.cleanup()
    assert sorted(os.listdir(leftovers)) == [str(service.snapshotter.db.get("keep").id)]
    assert (await service.client.stat("keep")).name == "keep"


async def test_snapshots_survive_a_restart(tmp_path: Path, short_dir: Path) -> None:
    root, path = tmp_path / "snapshotter", short_dir / "s.sock"
    async with serving(root, path) as first:
        await first.client.prepare("a", labels={"l": "v"})
        await first.client.commit("A", "a")
        await first.client.prepare("b", "A")
    async with serving(root, path) as second:
        assert await second.client.names() == {"A", "b"}
        assert (await second.client.stat("b")).parent == "A"
        [mount] = await second.client.mounts("b")
        assert mount.type == "overlay"


@dataclass
class FakeRemote:
    """Records the hook's calls; layers labelled `remote=blob` are skipped, a snapshot labelled
    `remote=boot` gets labels at commit and a remote lower dir."""

    lower_dir: Path
    calls: list[tuple[str, str]] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)
    fail_commit: bool = False
    fail_lower: bool = False

    def skip(self, key: str, parent: str, labels: Mapping[str, str]) -> bool:
        self.calls.append(("skip", key))
        return labels.get("remote") == "blob"

    async def committed(self, info: SnapshotInfo, fs: Path) -> Mapping[str, str]:
        self.calls.append(("committed", info.name))
        assert info.kind is Kind.COMMITTED and await asyncio.to_thread(fs.is_dir)
        if self.fail_commit:
            raise RafsError("not a bootstrap")
        return {"remote.checked": "yes"} if info.labels.get("remote") == "boot" else {}

    async def lower(self, info: SnapshotInfo, fs: Path) -> Path | None:
        self.calls.append(("lower", info.name))
        if self.fail_lower and info.labels.get("remote") == "boot":
            raise RafsError("cannot mount")
        return self.lower_dir if info.labels.get("remote") == "boot" else None

    async def restore(self, snapshots: Sequence[SnapshotInfo],
                      fs_of: Callable[[SnapshotInfo], Path]) -> None:
        self.restored = [info.name for info in snapshots]
        assert all(fs_of(info).is_dir() for info in snapshots)

    async def removing(self, info: SnapshotInfo, fs: Path) -> None:
        self.calls.append(("removing", info.name))
        # Still there: the hook unmounts before the directory goes.
        assert await asyncio.to_thread(fs.is_dir)

    async def close(self) -> None:
        self.calls.append(("close", ""))


async def test_remote_layers_are_committed_without_download(
    tmp_path: Path, short_dir: Path
) -> None:
    remote = FakeRemote(tmp_path / "rafs-mount")
    root, path = tmp_path / "snapshotter", short_dir / "s.sock"
    async with serving(root, path, remote) as running:
        client = running.client
        labels = {"remote": "blob", TARGET_REF_LABEL: "sha256:chain1"}
        # What containerd's metadata layer does: Prepare with the target label...
        assert await status_of(client.prepare("ns/1/extract-a sha256:chain1", "", labels)) == \
            Status.ALREADY_EXISTS
        # ...then looks the target up with this filter, and Stats it.
        [found] = await client.list(
            'labels."containerd.io/snapshot.ref"==sha256:chain1,parent==""')
        assert (found.name, found.kind, found.parent) == ("sha256:chain1", pb.COMMITTED, "")
        assert dict(found.labels) == labels
        assert await client.names() == {"sha256:chain1"}  # the extract key was never made
        # Again (another pull of the same image): ALREADY_EXISTS, nothing new.
        assert await status_of(client.prepare("ns/2/extract-b sha256:chain1", "", labels)) == \
            Status.ALREADY_EXISTS
        # The next layer on top of it, the same way.
        labels2 = {"remote": "blob", TARGET_REF_LABEL: "sha256:chain2"}
        assert await status_of(client.prepare("ns/3/extract", "sha256:chain1", labels2)) == \
            Status.ALREADY_EXISTS
        assert (await client.stat("sha256:chain2")).parent == "sha256:chain1"
        # A remote layer whose parent does not exist: not found, nothing made.
        bad = {"remote": "blob", TARGET_REF_LABEL: "sha256:lost"}
        assert await status_of(client.prepare("ns/4/x", "sha256:nope", bad)) == Status.NOT_FOUND
        # A remote layer without a target label is a plain one.
        [plain] = await client.prepare("ns/5/plain", "", {"remote": "blob"})
        assert plain.type == "bind"

        # The bootstrap layer: unpacked by containerd (a plain Prepare), committed; the hook
        # adds its labels.
        await client.prepare("ns/6/extract-boot", "sha256:chain2", {"remote": "boot"})
        await client.commit("sha256:boot", "ns/6/extract-boot", {"remote": "boot"})
        assert dict((await client.stat("sha256:boot")).labels) == {
            "remote": "boot", "remote.checked": "yes"}
        # A container over it: the remote mount replaces it and everything below.
        before = len(remote.calls)
        [rootfs] = await client.prepare("ns/7/container", "sha256:boot")
        assert list(rootfs.options)[-1] == f"lowerdir={remote.lower_dir}"
        assert remote.calls[before:] == [("lower", "sha256:boot")]
        # A layer over the bootstrap layer: the plain layer first, then the remote mount.
        await client.prepare("ns/8/extra", "sha256:boot")
        await client.commit("sha256:extra", "ns/8/extra")
        [rootfs2] = await client.prepare("ns/9/container", "sha256:extra")
        assert list(rootfs2.options)[-1] == \
            f"lowerdir={fs(running, 'sha256:extra')}:{remote.lower_dir}"

        await client.remove("ns/7/container")
        assert ("removing", "ns/7/container") in remote.calls

        # A remote lower that cannot be mounted: Prepare fails and leaves no snapshot.
        remote.fail_lower = True
        assert await status_of(client.prepare("ns/11/container", "sha256:boot")) == \
            Status.FAILED_PRECONDITION
        assert "ns/11/container" not in await client.names()
        remote.fail_lower = False

        # A hook that refuses a commit: the call fails, the active snapshot stays as it was.
        remote.fail_commit = True
        await client.prepare("ns/10/extract", "sha256:chain2")
        assert await status_of(client.commit("sha256:broken", "ns/10/extract")) == \
            Status.FAILED_PRECONDITION
        assert (await client.stat("ns/10/extract")).kind == pb.ACTIVE
        assert "sha256:broken" not in await client.names()
    assert remote.calls[-1] == ("close", "")

    # At the next start the hook is told every snapshot before the socket accepts calls.
    remote2 = FakeRemote(tmp_path / "rafs-mount")
    async with serving(root, path, remote2) as running:
        assert set(remote2.restored) == await running.client.names()


# -- sockets -----------------------------------------------------------------------------------


async def test_sockets_stale_live_and_mode(tmp_path: Path, short_dir: Path) -> None:
    snapshotter = Snapshotter(tmp_path / "s")
    await snapshotter.open()
    stale = short_dir / "stale.sock"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(os.fspath(stale))  # bound, never listening: what a killed process leaves
    assert not await socket_in_use(stale)
    first = SnapshotterServer(SnapshotsService(snapshotter))
    second = SnapshotterServer(SnapshotsService(snapshotter))
    try:
        assert await first.listen(stale, required=True)
        assert stat.S_IMODE(os.stat(stale).st_mode) == 0o660
        assert await socket_in_use(stale)
        # Served by another: an error for the configured path, a warning for an extra one.
        with pytest.raises(ConfigError):
            await second.listen(stale, required=True)
        assert not await second.listen(stale, required=False)
        regular = short_dir / "file"
        regular.write_text("not a socket")
        assert not await second.listen(regular, required=False)
        assert regular.read_text() == "not a socket"
        nested = short_dir / "run" / "nydus" / "n.sock"
        assert await second.listen(nested, required=False)
        client = Client(nested)
        try:
            await client.prepare("via-second-path")
        finally:
            client.close()
        assert (await Client(stale).stat("via-second-path")).name == "via-second-path"
    finally:
        await first.close()
        await second.close()
        await snapshotter.close()
    assert not stale.exists() and not (short_dir / "run" / "nydus" / "n.sock").exists()


async def test_a_corrupt_database_is_a_clear_error(tmp_path: Path) -> None:
    root = tmp_path / "s"
    root.mkdir()
    (root / "metadata.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ConfigError, match="snapshot database"):
        await Snapshotter(root).open()


def test_config_options(tmp_path: Path) -> None:
    config = load_config(environ={})
    assert config.snapshotter.socket == Path("/run/d7y-node/snapshotter.sock")
    assert config.snapshotter.nydus_socket == Path(
        "/run/containerd-nydus/containerd-nydus-grpc.sock")
    config = load_config(environ={"D7Y_SNAPSHOTTER_SOCKET": str(tmp_path / "x.sock")},
                         flags={"nydus_socket": "off"})
    assert config.snapshotter.socket == tmp_path / "x.sock"
    assert config.snapshotter.nydus_socket is None
    assert load_config(environ={}, flags={"snapshotter_socket": ""}).snapshotter.socket is None
    with pytest.raises(ConfigError, match="snapshotter-socket"):
        load_config(environ={}, flags={"snapshotter_socket": "/" + "x" * 200})


async def test_node_serves_the_snapshotter(tmp_path: Path, short_dir: Path) -> None:
    from d7y_node.config import (
        ClusterConfig,
        Listen,
        NodeConfig,
        ProxyConfig,
        SnapshotterConfig,
        StoreConfig,
    )
    from d7y_node.node import Node

    main, nydus = short_dir / "main.sock", short_dir / "nydus" / "grpc.sock"
    config = NodeConfig(
        store=StoreConfig(data_dir=tmp_path / "data"),
        proxy=ProxyConfig(listen=Listen("127.0.0.1", 0)),
        peer_listen=Listen("127.0.0.1", 0),
        cluster=ClusterConfig(gossip_listen=Listen("127.0.0.1", 0), node_id=f"n-{uuid.uuid4()}"),
        snapshotter=SnapshotterConfig(socket=main, nydus_socket=nydus),
    )
    remote = FakeRemote(tmp_path / "lower")
    node = Node(config, remote_layers=remote)
    await node.start()
    try:
        client = Client(main)
        await client.prepare("through-the-node")
        client.close()
        client = Client(nydus)
        assert (await client.stat("through-the-node")).kind == pb.ACTIVE
        client.close()
        assert (tmp_path / "data" / "snapshotter" / "metadata.db").exists()
    finally:
        await node.stop()
    assert remote.calls[-1] == ("close", "")
    assert not main.exists() and not nydus.exists()


# -- the kernel's overlayfs --------------------------------------------------------------------


def mount_all(mounts: Sequence[Any], target: Path) -> None:
    for mount in mounts:
        options = ",".join(mount.options)
        subprocess.run(["mount", "-t", mount.type, "-o", options, mount.source, str(target)],
                       check=True, capture_output=True)


def unmount(target: Path) -> None:
    subprocess.run(["umount", str(target)], check=False, capture_output=True)


@pytest.mark.integration
async def test_mounts_work_with_the_kernels_overlayfs(service: Service, tmp_path: Path) -> None:
    client = service.client
    target = tmp_path / "mnt"
    target.mkdir()
    mounted = False
    try:
        # Layer 1 through its bind mount, as containerd unpacks it.
        mount_all(await client.prepare("l1"), target)
        mounted = True
        (target / "etc").mkdir()
        (target / "etc" / "one").write_text("1")
        (target / "gone").write_text("deleted by layer 2")
        unmount(target)
        mounted = False
        await client.commit("L1", "l1")

        mount_all(await client.prepare("l2", "L1"), target)
        mounted = True
        assert (target / "etc" / "one").read_text() == "1"
        (target / "etc" / "two").write_text("2")
        (target / "gone").unlink()  # a whiteout in layer 2's upper dir
        unmount(target)
        mounted = False
        await client.commit("L2", "l2")
        assert not (Path(fs(service, "L1")) / "etc" / "two").exists()

        mount_all(await client.prepare("container", "L2"), target)
        mounted = True
        assert sorted(os.listdir(target / "etc")) == ["one", "two"]
        assert not (target / "gone").exists()
        (target / "written").write_text("by the container")
        assert (Path(fs(service, "container")) / "written").read_text() == "by the container"
        unmount(target)
        mounted = False

        # A view of two layers is a read-only overlay.
        mount_all(await client.view("view", "L2"), target)
        mounted = True
        assert sorted(os.listdir(target / "etc")) == ["one", "two"]
        with pytest.raises(OSError):
            (target / "nope").write_text("x")
        unmount(target)
        mounted = False
        # A view of one layer is a read-only bind of it.
        mount_all(await client.view("view1", "L1"), target)
        mounted = True
        assert (target / "gone").exists()
        with pytest.raises(OSError):
            (target / "nope").write_text("x")
    finally:
        if mounted:
            unmount(target)


# -- real containerd through proxy_plugins -----------------------------------------------------


@pytest.mark.integration
async def test_containerd_runs_a_container_on_this_snapshotter(
    service: Service, tmp_path: Path
) -> None:
    from tests.harness.containerd import Containerd, DaemonOptions
    from tests.harness.images import small_image

    image = small_image(tmp_path / "layout")
    archive = tmp_path / "image.tar"
    await asyncio.to_thread(
        subprocess.run, ["tar", "-C", str(image.layout_dir), "-cf", str(archive), "oci-layout",
                         "index.json", "blobs"], check=True)
    daemon = Containerd(tmp_path / "containerd",
                        DaemonOptions(proxy_snapshotters={"d7y": str(service.socket_path)}))

    def ctr(*arguments: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return daemon.ctr(list(arguments), check=check)

    await asyncio.to_thread(daemon.start)
    try:
        await asyncio.to_thread(ctr, "images", "import", "--snapshotter", "d7y",
                                "--index-name", "test/small:1", str(archive))
        layers = await service.client.list("kind==committed")
        assert len(layers) == len(image.layers)
        result = await asyncio.to_thread(
            ctr, "run", "--rm", "--snapshotter", "d7y", "test/small:1", "c-run",
            "/bin/sh", "-c", "cat /etc/d7y-test.txt; echo w > /tmp/w; cat /tmp/w")
        assert result.stdout.split() == ["small", "image", "w"]
        # containerd's own calls with bad arguments get containerd's own errors.
        snapshots = ("snapshots", "--snapshotter", "d7y")
        await asyncio.to_thread(ctr, *snapshots, "prepare", "p1")
        missing = await asyncio.to_thread(ctr, *snapshots, "prepare", "p2", "nope", check=False)
        assert "not found" in missing.stderr
        await asyncio.to_thread(ctr, *snapshots, "commit", "c1", "p1")
        again = await asyncio.to_thread(ctr, *snapshots, "commit", "c2", "c1", check=False)
        assert again.returncode != 0
        await asyncio.to_thread(ctr, *snapshots, "prepare", "p3", "c1")
        busy = await asyncio.to_thread(ctr, *snapshots, "rm", "c1", check=False)
        assert "failed precondition" in busy.stderr
        unknown = await asyncio.to_thread(ctr, *snapshots, "rm", "nope", check=False)
        assert "not found" in unknown.stderr
        listed = await asyncio.to_thread(ctr, *snapshots, "ls")
        assert "p3" in listed.stdout and "c1" in listed.stdout
    finally:
        await asyncio.to_thread(daemon.stop)


class SkipEverything(FakeRemote):
    """Every layer containerd unpacks is "remote": containerd must not apply any of them."""

    def skip(self, key: str, parent: str, labels: Mapping[str, str]) -> bool:
        self.calls.append(("skip", key))
        return True


@pytest.mark.integration
async def test_containerd_pulls_remote_layers_without_unpacking(
    tmp_path: Path, short_dir: Path
) -> None:
    """containerd 1.6's side of the remote-snapshot protocol, on a pull through the CRI image
    service (its unpacker; `ctr pull` applies layers itself and never asks): Prepare with the
    target label → ALREADY_EXISTS, then containerd's metadata layer finds the target with a
    filtered List and Stats it; the pull succeeds, nothing is written into the layers, and
    containerd's GC removes them again through Remove."""
    from tests.harness.containerd import (
        CRI_NAMESPACE,
        Containerd,
        CriSettings,
        DaemonOptions,
        write_mirror_hosts,
    )
    from tests.harness.cri import CriImageClient
    from tests.harness.images import small_image
    from tests.harness.registry import Registry

    image = small_image(tmp_path / "layout")
    registry = Registry(tmp_path / "registry")
    await asyncio.to_thread(registry.start)
    remote = SkipEverything(tmp_path / "unused")
    try:
        await asyncio.to_thread(image.push, registry.host, "test/remote:1")
        async with serving(tmp_path / "snapshotter", short_dir / "s.sock", remote) as running:
            daemon = Containerd(tmp_path / "containerd", DaemonOptions(
                cri=CriSettings(snapshotter="d7y"),
                proxy_snapshotters={"d7y": str(running.socket_path)},
            ))
            write_mirror_hosts(daemon.hosts_dir, registry.host, None)
            await asyncio.to_thread(daemon.start)
            try:
                reference = f"{registry.host}/test/remote:1"
                async with CriImageClient(daemon.cri_address) as cri:
                    await cri.pull(reference)
                    committed = await running.client.list("kind==committed")
                    assert len(committed) == len(image.layers)
                    # Named by their chain ids (the target), not by a namespaced key.
                    assert all(info.labels[TARGET_REF_LABEL] == info.name for info in committed)
                    for info in committed:
                        assert os.listdir(fs(running, info.name)) == []
                    listed = await asyncio.to_thread(
                        daemon.ctr, ["snapshots", "--snapshotter", "d7y", "ls"],
                        namespace=CRI_NAMESPACE)
                    assert listed.stdout.count("Committed") == len(image.layers)
                    # Pulled again: found at once.
                    await cri.pull(reference)
                    assert len(await running.client.list()) == len(image.layers)
                    # containerd's GC removes them when the image goes, through Remove.
                    await cri.remove(reference)
                for _ in range(100):
                    if not await running.client.names():
                        break
                    await asyncio.sleep(0.1)
                assert await running.client.names() == set()
                assert [call for call in remote.calls if call[0] == "removing"]
            finally:
                await asyncio.to_thread(daemon.stop)
    finally:
        await asyncio.to_thread(registry.stop)
