"""containerd's snapshots gRPC service (`containerd.services.snapshots.v1.Snapshots`).

Owns: the snapshot semantics of containerd's own overlayfs snapshotter (bind for a single layer,
`overlay` with lowerdir/upperdir/workdir otherwise), containerd's filter syntax for List, the
`RemoteLayers` hook that lets remote (Nydus) layers skip downloads and replace lower directories,
the gRPC service itself (grpclib on the node's loop, registered by hand: no generated stubs), the
mapping of our errors to the gRPC status codes containerd turns into its errdefs, and the unix
sockets it is served on (`SnapshotterServer`).

Does not own: the metadata and the snapshot directories (`snapshot_db.py`), remote mounts (an
implementation of `RemoteLayers`, e.g. `nydus_snapshots.py`), or containerd's configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import re
import sqlite3
import stat
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpclib.const
import grpclib.server
from google.protobuf import empty_pb2, timestamp_pb2
from google.protobuf.message import DecodeError
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from d7y_node.errors import (
    ConfigError,
    D7yError,
    SnapshotAlreadyExists,
    SnapshotError,
    SnapshotFailedPrecondition,
    SnapshotInvalidArgument,
    SnapshotNotFound,
    TaskFailed,
    UpstreamUnavailable,
)
from d7y_node.protos import mount_pb2, snapshots_pb2
from d7y_node.snapshot_db import (
    Kind,
    SnapshotDb,
    SnapshotInfo,
    Usage,
    disk_usage,
    remove_tree,
    validate_labels,
    validate_name,
)

__all__ = [
    "SERVICE_NAME",
    "Kind",
    "Mount",
    "NoRemoteLayers",
    "RemoteLayers",
    "SnapshotFilter",
    "SnapshotInfo",
    "SnapshotsService",
    "Snapshotter",
    "SnapshotterServer",
    "Usage",
    "parse_filters",
]

log = logging.getLogger(__name__)

SERVICE_NAME = "containerd.services.snapshots.v1.Snapshots"
# Under the data dir: the database and the snapshot directories.
SNAPSHOTTER_DIR = "snapshotter"
# The label containerd's metadata layer sets on Prepare to name the committed snapshot it wants
# (the layer's chain id): a remote snapshotter that has it answers ALREADY_EXISTS.
TARGET_REF_LABEL = "containerd.io/snapshot.ref"
# List answers in messages of this many snapshots (containerd's own service batches by 100).
LIST_BATCH = 100
# containerd's overlay snapshotter adds `index=off` when the kernel has the overlay index
# feature, so a lower dir shared by several mounts is never tied to one upper.
_OVERLAY_INDEX_PARAMETER = Path("/sys/module/overlay/parameters/index")
# The socket is root's (containerd runs as root); group members may talk to it too.
SOCKET_MODE = 0o660
# A connect to an existing socket file that takes longer than this is taken as "no one serves".
_PROBE_TIMEOUT_SECONDS = 1.0

_CHATTY_LOGGERS = ("hpack", "h2")

_KIND_NAMES = {Kind.VIEW: "view", Kind.ACTIVE: "active", Kind.COMMITTED: "committed"}

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# The hook for remote layers


class RemoteLayers(Protocol):
    """What the snapshotter asks of remote (lazily loaded) layers; `NoRemoteLayers` does nothing."""

    def skip(self, key: str, parent: str, labels: Mapping[str, str]) -> bool:
        """True for a layer containerd must not download (a Nydus data blob)."""
        ...

    async def committed(self, info: SnapshotInfo, fs: Path) -> Mapping[str, str]:
        """Called after a Commit; returns labels to add (e.g. marks a Nydus bootstrap)."""
        ...

    async def lower(self, info: SnapshotInfo, fs: Path) -> Path | None:
        """For a parent in a chain (walked from the top): a directory that replaces this
        snapshot's fs and everything below it as the lowest lowerdir (the RAFS mount), mounting
        it if needed; None = plain."""
        ...

    async def restore(
        self, snapshots: Sequence[SnapshotInfo], fs_of: Callable[[SnapshotInfo], Path]
    ) -> None:
        """At start, before the socket accepts calls: bring back every remote mount."""
        ...

    async def removing(self, info: SnapshotInfo, fs: Path) -> None:
        """Before a snapshot's directory is deleted (Remove/Cleanup): unmount what it holds."""
        ...

    async def close(self) -> None:
        """The node stops: release what the hook holds (mounts may stay for the next start)."""
        ...


class NoRemoteLayers:
    """The default hook: every layer is a plain one, downloaded and unpacked by containerd."""

    def skip(self, key: str, parent: str, labels: Mapping[str, str]) -> bool:
        return False

    async def committed(self, info: SnapshotInfo, fs: Path) -> Mapping[str, str]:
        return {}

    async def lower(self, info: SnapshotInfo, fs: Path) -> Path | None:
        return None

    async def restore(
        self, snapshots: Sequence[SnapshotInfo], fs_of: Callable[[SnapshotInfo], Path]
    ) -> None:
        return None

    async def removing(self, info: SnapshotInfo, fs: Path) -> None:
        return None

    async def close(self) -> None:
        return None


# ---------------------------------------------------------------------------------------------
# containerd's filter syntax (the `filters` package): `<fieldpath>[<op><value>]` joined by `,`


_QUOTES = "/|\""
_OPERATOR_RUNES = "=!~"
_FIELD = re.compile(r"[-_A-Za-z0-9]+")
_SIMPLE_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t",
                   "v": "\v", "\\": "\\"}


@dataclass(frozen=True)
class _Selector:
    fieldpath: tuple[str, ...]
    # "" (present), "==", "!=" or "~=".
    operator: str
    value: str
    pattern: re.Pattern[str] | None

    def match(self, info: SnapshotInfo) -> bool:
        value, present = _field(info, self.fieldpath)
        if self.operator == "":
            return present
        if self.operator == "==":
            return present and value == self.value
        if self.operator == "!=":
            return value != self.value
        assert self.pattern is not None
        return self.pattern.search(value) is not None


def _field(info: SnapshotInfo, fieldpath: tuple[str, ...]) -> tuple[str, bool]:
    """containerd's snapshot adaptor: kind, name, parent, labels.<key> (dots join the rest)."""
    head, rest = fieldpath[0], fieldpath[1:]
    if head == "kind" and info.kind in _KIND_NAMES:
        return _KIND_NAMES[info.kind], True
    if head == "name":
        return info.name, True
    if head == "parent":
        return info.parent, True
    if head == "labels" and rest:
        key = ".".join(rest)
        return (info.labels[key], True) if key in info.labels else ("", False)
    return "", False


@dataclass(frozen=True)
class SnapshotFilter:
    """Parsed filters: a snapshot is listed when it matches every selector of any one filter."""

    alternatives: tuple[tuple[_Selector, ...], ...]

    def match(self, info: SnapshotInfo) -> bool:
        if not self.alternatives:
            return True
        return any(all(s.match(info) for s in selectors) for selectors in self.alternatives)


def _unquote(quoted: str) -> str:
    """A Go string literal, with `/` and `|` allowed as the quote too (for regexps)."""
    quote, body = quoted[0], quoted[1:-1]
    out: list[str] = []
    index = 0
    while index < len(body):
        char = body[index]
        if char == quote:
            raise SnapshotInvalidArgument("unescaped quote inside a quoted string")
        if char != "\\":
            out.append(char)
            index += 1
            continue
        escape = body[index + 1:index + 2]
        if escape in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[escape])
            index += 2
        elif escape in ("'", '"', "|", "/"):
            if escape != quote:
                raise SnapshotInvalidArgument(f"escape \\{escape} inside {quote}-quotes")
            out.append(escape)
            index += 2
        elif escape and escape in "01234567":
            digits = body[index + 1:index + 4]
            if not re.fullmatch(r"[0-7]{3}", digits) or int(digits, 8) > 255:
                raise SnapshotInvalidArgument("bad octal escape")
            out.append(chr(int(digits, 8)))
            index += 4
        elif escape in ("x", "u", "U"):
            width = {"x": 2, "u": 4, "U": 8}[escape]
            digits = body[index + 2:index + 2 + width]
            if not re.fullmatch(rf"[0-9A-Fa-f]{{{width}}}", digits) or int(digits, 16) > 0x10FFFF:
                raise SnapshotInvalidArgument(f"bad \\{escape} escape")
            out.append(chr(int(digits, 16)))
            index += 2 + width
        else:
            raise SnapshotInvalidArgument(f"illegal escape sequence \\{escape}")
    return "".join(out)


def _tokens(text: str) -> list[tuple[str, str]]:
    """containerd's scanner: (kind, text) with kinds field, value, quoted, separator,
    operator; after an operator, the next unquoted run up to `,` or space is a value."""
    tokens: list[tuple[str, str]] = []
    index, expect_value = 0, False
    while index < len(text):
        char = text[index]
        if char.isspace():
            index += 1
        elif char in _QUOTES:
            end = index + 1
            while end < len(text) and text[end] != char:
                if text[end] == "\n":
                    break
                end += 2 if text[end] == "\\" else 1
            if end >= len(text) or text[end] != char:
                raise SnapshotInvalidArgument(f"filter {text!r}: quoted literal not terminated")
            tokens.append(("quoted", text[index:end + 1]))
            index = end + 1
            expect_value = False
        elif char in ",.":
            tokens.append(("separator", char))
            index += 1
            expect_value = False
        elif char in _OPERATOR_RUNES:
            end = index
            while end < len(text) and text[end] in _OPERATOR_RUNES:
                end += 1
            tokens.append(("operator", text[index:end]))
            index = end
            expect_value = True
        elif expect_value:
            end = index
            while end < len(text) and text[end] != "," and not text[end].isspace() \
                    and text[end].isprintable():
                end += 1
            if end == index:
                raise SnapshotInvalidArgument(f"filter {text!r}: unexpected {char!r}")
            tokens.append(("value", text[index:end]))
            index = end
            expect_value = False
        else:
            match = _FIELD.match(text, index)
            if match is None:
                raise SnapshotInvalidArgument(f"filter {text!r}: unexpected {char!r}")
            tokens.append(("field", match.group()))
            index = match.end()
    return tokens


def _parse_one(text: str) -> tuple[_Selector, ...]:
    tokens = _tokens(text)
    position = 0

    def take() -> tuple[str, str]:
        nonlocal position
        if position >= len(tokens):
            raise SnapshotInvalidArgument(f"filter {text!r}: unexpected end")
        token = tokens[position]
        position += 1
        return token

    def field() -> str:
        kind, value = take()
        if kind == "field":
            return value
        if kind == "quoted":
            return _unquote(value)
        raise SnapshotInvalidArgument(f"filter {text!r}: expected a field, got {value!r}")

    selectors: list[_Selector] = []
    while True:
        path = [field()]
        while position < len(tokens) and tokens[position] == ("separator", "."):
            position += 1
            path.append(field())
        operator, value, pattern = "", "", None
        if position < len(tokens) and tokens[position][0] == "operator":
            operator = take()[1]
            if operator not in ("==", "!=", "~="):
                raise SnapshotInvalidArgument(f"filter {text!r}: unsupported operator "
                                              f"{operator!r}")
            kind, raw = take()
            if kind in ("value", "field"):
                value = raw
            elif kind == "quoted":
                value = _unquote(raw)
            else:
                raise SnapshotInvalidArgument(f"filter {text!r}: expected a value, got {raw!r}")
            if operator == "~=":
                try:
                    pattern = re.compile(value)
                except re.error as error:
                    raise SnapshotInvalidArgument(
                        f"filter {text!r}: bad regular expression: {error}"
                    ) from None
        selectors.append(_Selector(tuple(path), operator, value, pattern))
        if position >= len(tokens):
            return tuple(selectors)
        if tokens[position] != ("separator", ","):
            raise SnapshotInvalidArgument(
                f"filter {text!r}: unexpected input {tokens[position][1]!r}"
            )
        position += 1


def parse_filters(filters: Sequence[str]) -> SnapshotFilter:
    """containerd's `filters.ParseAll`: any of the filters; an empty one matches everything.
    Malformed → SnapshotInvalidArgument."""
    alternatives: list[tuple[_Selector, ...]] = []
    for text in filters:
        if text == "":
            return SnapshotFilter(())
        alternatives.append(_parse_one(text))
    return SnapshotFilter(tuple(alternatives))


# ---------------------------------------------------------------------------------------------
# The snapshotter


@dataclass(frozen=True)
class Mount:
    """One mount containerd makes for a snapshot (`containerd.types.Mount`)."""

    type: str
    source: str
    options: tuple[str, ...]


class Snapshotter:
    """Overlay snapshots over `SnapshotDb`, with remote layers through a `RemoteLayers` hook.

    Calls that change state run one at a time (an asyncio lock), so checking a snapshot and then
    writing it is never interleaved with another call; the database runs on one worker thread.
    """

    def __init__(
        self, root: Path, *, remote: RemoteLayers | None = None,
        overlay_index_off: bool | None = None,
    ) -> None:
        # `root` is `<data_dir>/snapshotter`.
        self.db = SnapshotDb(root)
        self.remote: RemoteLayers = remote if remote is not None else NoRemoteLayers()
        self.index_off = (
            _OVERLAY_INDEX_PARAMETER.exists() if overlay_index_off is None else overlay_index_off
        )
        self._lock = asyncio.Lock()
        self._executor: ThreadPoolExecutor | None = None

    # -- life cycle ----------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the database, delete directories it does not know, restore remote mounts."""
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="snapshot-db")
        try:
            swept = await self._db(self.db.open)
        except (sqlite3.Error, OSError) as error:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise ConfigError(
                "data_dir", f"cannot open the snapshot database in {self.db.root}: {error}"
            ) from None
        if swept:
            log.info("snapshotter: deleted %d directories left by a crash", len(swept))
        snapshots = await self._db(self.db.snapshots)
        await self.remote.restore(snapshots, self.fs_of)

    async def close(self) -> None:
        try:
            await self.remote.close()
        finally:
            if self._executor is not None:
                async with self._lock:
                    await self._db(self.db.close)
                self._executor.shutdown(wait=True)
                self._executor = None

    async def _db(self, call: Callable[..., T], *arguments: Any) -> T:
        if self._executor is None:
            raise RuntimeError("snapshotter is not open")
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, call, *arguments
        )

    def fs_of(self, info: SnapshotInfo) -> Path:
        return self.db.fs_dir(info.id)

    # -- the calls -----------------------------------------------------------------------------

    async def prepare(
        self, key: str, parent: str, labels: Mapping[str, str]
    ) -> list[Mount]:
        """An active snapshot over `parent`; its mounts. A remote layer that is not to be
        downloaded is committed at once under its target name → SnapshotAlreadyExists."""
        return await self._create(key, parent, labels, Kind.ACTIVE)

    async def view(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        """A read-only view of `parent`; its mounts."""
        return await self._create(key, parent, labels, Kind.VIEW)

    async def _create(
        self, key: str, parent: str, labels: Mapping[str, str], kind: Kind
    ) -> list[Mount]:
        validate_name("key", key)
        if parent:
            validate_name("parent", parent)
        validate_labels(labels)
        target = labels.get(TARGET_REF_LABEL, "")
        async with self._lock:
            if kind is Kind.ACTIVE and target and self.remote.skip(key, parent, labels):
                await self._commit_remote(target, parent, labels)
            info = await self._db(self.db.create, key, kind, parent, labels)
        try:
            # Outside the lock: a remote lower may mount a filesystem first.
            return await self._mounts_of(info)
        except BaseException:
            # No mounts, no snapshot: containerd may try the same key again.
            async with self._lock:
                with contextlib.suppress(SnapshotError):
                    await self._remove_locked(key)
            raise

    async def _commit_remote(self, target: str, parent: str, labels: Mapping[str, str]) -> None:
        """containerd's remote-snapshot protocol: the committed snapshot `target` stands for a
        layer nobody downloads; ALREADY_EXISTS tells containerd's metadata layer to look it up
        (a List with `labels."containerd.io/snapshot.ref"==<target>,parent==<parent>`)."""
        validate_name("target", target)
        if await self._db(self.db.find, target) is None:
            info = await self._db(self.db.create, target, Kind.COMMITTED, parent, labels)
            try:
                extra = await self.remote.committed(info, self.fs_of(info))
                if extra:
                    await self._db(self.db.add_labels, target, dict(extra))
            except BaseException:
                with contextlib.suppress(SnapshotError):
                    await self._remove_locked(target)
                raise
            log.info("snapshot %s: remote layer committed without download", target)
        raise SnapshotAlreadyExists(f"target snapshot {target} exists (remote layer)")

    async def mounts(self, key: str) -> list[Mount]:
        """The mounts of an active snapshot or a view (a committed one → FailedPrecondition)."""
        validate_name("key", key)
        info = await self._db(self.db.get, key)
        return await self._mounts_of(info)

    async def _mounts_of(self, info: SnapshotInfo) -> list[Mount]:
        if info.kind not in (Kind.ACTIVE, Kind.VIEW):
            raise SnapshotFailedPrecondition(f"snapshot {info.name} is not active or a view")
        chain = await self._db(self.db.chain, info.name)
        lowers: list[str] = []
        for parent in chain[1:]:
            replaced = await self.remote.lower(parent, self.fs_of(parent))
            if replaced is not None:
                lowers.append(os.fspath(replaced))
                break
            lowers.append(os.fspath(self.fs_of(parent)))
        own = os.fspath(self.db.fs_dir(info.id))
        if not lowers:
            return [Mount("bind", own, ("rw" if info.kind is Kind.ACTIVE else "ro", "rbind"))]
        options: list[str] = ["index=off"] if self.index_off else []
        if info.kind is Kind.ACTIVE:
            options += [f"workdir={self.db.work_dir(info.id)}", f"upperdir={own}"]
        elif len(lowers) == 1:
            return [Mount("bind", lowers[0], ("ro", "rbind"))]
        options.append("lowerdir=" + ":".join(lowers))
        return [Mount("overlay", "overlay", tuple(options))]

    async def commit(self, name: str, key: str, labels: Mapping[str, str]) -> SnapshotInfo:
        """Active `key` becomes committed `name`, with these labels (and the hook's)."""
        validate_name("name", name)
        validate_name("key", key)
        validate_labels(labels)
        async with self._lock:
            info = await self._db(self.db.get, key)
            if await self._db(self.db.find, name) is not None:
                raise SnapshotAlreadyExists(f"committed snapshot {name} already exists")
            if info.kind is not Kind.ACTIVE:
                raise SnapshotFailedPrecondition(f"snapshot {key} is not active")
            fs = self.fs_of(info)
            usage = await asyncio.to_thread(disk_usage, fs)
            # The hook sees the snapshot as it will be; nothing is written if it refuses.
            committed = dataclasses.replace(
                info, name=name, kind=Kind.COMMITTED, labels=dict(labels)
            )
            extra = await self.remote.committed(committed, fs)
            return await self._db(self.db.commit, key, name, {**labels, **extra}, usage)

    async def remove(self, key: str) -> None:
        """Delete a snapshot without children, and its directory (after the hook let go)."""
        validate_name("key", key)
        async with self._lock:
            await self._remove_locked(key)

    async def _remove_locked(self, key: str) -> None:
        info = await self._db(self.db.remove, key)
        try:
            await self.remote.removing(info, self.fs_of(info))
        except (D7yError, OSError) as error:
            # The row is gone; its directory stays for Cleanup once it can be unmounted.
            log.warning("snapshot %s: remote layer did not let go: %s", key, error)
            return
        # Not on the database's thread: a big layer takes a while to delete. Its id is never
        # handed out again, so nothing can be made in its place meanwhile.
        if not await asyncio.to_thread(remove_tree, self.db.directory(info.id)):
            log.warning("snapshot %s: directory stays for a later Cleanup", key)

    async def stat(self, key: str) -> SnapshotInfo:
        validate_name("key", key)
        return await self._db(self.db.get, key)

    async def update(
        self, name: str, labels: Mapping[str, str], paths: Sequence[str]
    ) -> SnapshotInfo:
        """Only labels change ("labels", "labels.<key>", or no paths: all labels); any other
        field path → SnapshotInvalidArgument."""
        validate_name("key", name)
        async with self._lock:
            return await self._db(self.db.update_labels, name, labels, tuple(paths))

    async def snapshots(self, filters: Sequence[str]) -> list[SnapshotInfo]:
        match = parse_filters(filters)
        return [info for info in await self._db(self.db.snapshots) if match.match(info)]

    async def usage(self, key: str) -> Usage:
        """du of an active snapshot's layer now; what was counted at commit otherwise."""
        validate_name("key", key)
        info, stored = await self._db(self.db.stored_usage, key)
        if info.kind is Kind.ACTIVE:
            return await asyncio.to_thread(disk_usage, self.fs_of(info))
        return stored

    async def cleanup(self) -> list[Path]:
        """Delete the directories no snapshot owns (left by a crash, or by a Remove whose
        unmount failed), unmounting what is under them first."""
        async with self._lock:
            orphans = await self._db(self.db.orphans)
            removed = []
            for path in orphans:
                if await asyncio.to_thread(remove_tree, path):
                    removed.append(path)
            return removed


# ---------------------------------------------------------------------------------------------
# The gRPC service


_STATUS_OF: tuple[tuple[type[BaseException], Status], ...] = (
    (SnapshotNotFound, Status.NOT_FOUND),
    (SnapshotAlreadyExists, Status.ALREADY_EXISTS),
    (SnapshotFailedPrecondition, Status.FAILED_PRECONDITION),
    (SnapshotInvalidArgument, Status.INVALID_ARGUMENT),
    (UpstreamUnavailable, Status.UNAVAILABLE),
    (TaskFailed, Status.UNAVAILABLE),
    # Another part refusing (a malformed RAFS bootstrap, ...): the snapshot cannot be used.
    (D7yError, Status.FAILED_PRECONDITION),
)


def status_for(error: BaseException) -> tuple[Status, str]:
    """The gRPC status containerd expects for one of our errors (errdefs.FromGRPC maps it
    back: NotFound → ErrNotFound, ...)."""
    for kind, status in _STATUS_OF:
        if isinstance(error, kind):
            return status, str(error)
    if isinstance(error, OSError):
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            return Status.RESOURCE_EXHAUSTED, str(error)
        return Status.INTERNAL, str(error)
    return Status.UNKNOWN, f"{type(error).__name__}: {error}"


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    whole = int(seconds)
    return timestamp_pb2.Timestamp(seconds=whole, nanos=int((seconds - whole) * 1e9))


def info_message(info: SnapshotInfo) -> snapshots_pb2.Info:
    return snapshots_pb2.Info(
        name=info.name, parent=info.parent, kind=int(info.kind),  # type: ignore[arg-type]
        created_at=_timestamp(info.created), updated_at=_timestamp(info.updated),
        labels=dict(info.labels),
    )


def mount_messages(mounts: Sequence[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options))
            for m in mounts]


Handler = Callable[[Any], Awaitable[None]]


class SnapshotsService:
    """`containerd.services.snapshots.v1.Snapshots` over a `Snapshotter`, for grpclib.

    Each handler decodes (an undecodable request → INVALID_ARGUMENT), calls the snapshotter, and
    maps a `SnapshotError` to its status; anything else is logged as a bug (UNKNOWN)."""

    def __init__(self, snapshotter: Snapshotter) -> None:
        self.snapshotter = snapshotter

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        unary = grpclib.const.Cardinality.UNARY_UNARY
        stream = grpclib.const.Cardinality.UNARY_STREAM
        empty = empty_pb2.Empty
        pb = snapshots_pb2
        rows: list[tuple[str, Handler, grpclib.const.Cardinality, Any, Any]] = [
            ("Prepare", self.prepare, unary, pb.PrepareSnapshotRequest,
             pb.PrepareSnapshotResponse),
            ("View", self.view, unary, pb.ViewSnapshotRequest, pb.ViewSnapshotResponse),
            ("Mounts", self.mounts, unary, pb.MountsRequest, pb.MountsResponse),
            ("Commit", self.commit, unary, pb.CommitSnapshotRequest, empty),
            ("Remove", self.remove, unary, pb.RemoveSnapshotRequest, empty),
            ("Stat", self.stat, unary, pb.StatSnapshotRequest, pb.StatSnapshotResponse),
            ("Update", self.update, unary, pb.UpdateSnapshotRequest, pb.UpdateSnapshotResponse),
            ("List", self.list_snapshots, stream, pb.ListSnapshotsRequest,
             pb.ListSnapshotsResponse),
            ("Usage", self.usage, unary, pb.UsageRequest, pb.UsageResponse),
            ("Cleanup", self.cleanup, unary, pb.CleanupRequest, empty),
        ]
        return {
            f"/{SERVICE_NAME}/{name}": grpclib.const.Handler(
                self._guarded(name, handler), cardinality, request, reply
            )
            for name, handler, cardinality, request, reply in rows
        }

    def _guarded(self, name: str, handler: Handler) -> Handler:
        async def guarded(stream: Any) -> None:
            try:
                await handler(stream)
            except GRPCError:
                raise
            except (SnapshotError, D7yError, OSError) as error:
                status, message = status_for(error)
                log.debug("snapshots %s: %s %s", name, status.name, message)
                raise GRPCError(status, message) from None
            except DecodeError as error:
                raise GRPCError(Status.INVALID_ARGUMENT, f"malformed request: {error}") from None
            except Exception as error:
                log.exception("snapshots %s failed", name)
                raise GRPCError(*status_for(error)) from None

        return guarded

    @staticmethod
    async def _request(stream: Any) -> Any:
        message = await stream.recv_message()
        if message is None:
            raise GRPCError(Status.INVALID_ARGUMENT, "no request message")
        return message

    async def prepare(self, stream: Any) -> None:
        request = await self._request(stream)
        mounts = await self.snapshotter.prepare(request.key, request.parent, dict(request.labels))
        await stream.send_message(snapshots_pb2.PrepareSnapshotResponse(
            mounts=mount_messages(mounts)))

    async def view(self, stream: Any) -> None:
        request = await self._request(stream)
        mounts = await self.snapshotter.view(request.key, request.parent, dict(request.labels))
        await stream.send_message(snapshots_pb2.ViewSnapshotResponse(
            mounts=mount_messages(mounts)))

    async def mounts(self, stream: Any) -> None:
        request = await self._request(stream)
        mounts = await self.snapshotter.mounts(request.key)
        await stream.send_message(snapshots_pb2.MountsResponse(mounts=mount_messages(mounts)))

    async def commit(self, stream: Any) -> None:
        request = await self._request(stream)
        await self.snapshotter.commit(request.name, request.key, dict(request.labels))
        await stream.send_message(empty_pb2.Empty())

    async def remove(self, stream: Any) -> None:
        request = await self._request(stream)
        await self.snapshotter.remove(request.key)
        await stream.send_message(empty_pb2.Empty())

    async def stat(self, stream: Any) -> None:
        request = await self._request(stream)
        info = await self.snapshotter.stat(request.key)
        await stream.send_message(snapshots_pb2.StatSnapshotResponse(info=info_message(info)))

    async def update(self, stream: Any) -> None:
        request = await self._request(stream)
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        info = await self.snapshotter.update(
            request.info.name, dict(request.info.labels), paths
        )
        await stream.send_message(snapshots_pb2.UpdateSnapshotResponse(info=info_message(info)))

    async def list_snapshots(self, stream: Any) -> None:
        request = await self._request(stream)
        found = await self.snapshotter.snapshots(list(request.filters))
        for start in range(0, len(found), LIST_BATCH):
            batch = found[start:start + LIST_BATCH]
            await stream.send_message(snapshots_pb2.ListSnapshotsResponse(
                info=[info_message(info) for info in batch]))

    async def usage(self, stream: Any) -> None:
        request = await self._request(stream)
        usage = await self.snapshotter.usage(request.key)
        await stream.send_message(snapshots_pb2.UsageResponse(
            size=usage.size, inodes=usage.inodes))

    async def cleanup(self, stream: Any) -> None:
        await self._request(stream)
        await self.snapshotter.cleanup()
        await stream.send_message(empty_pb2.Empty())


# ---------------------------------------------------------------------------------------------
# The sockets


async def socket_in_use(path: Path) -> bool:
    """Whether a process accepts connections on the unix socket `path` (a stale file left by a
    dead one refuses them)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(mode):
        return True  # not a socket: never replaced
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(os.fspath(path)), _PROBE_TIMEOUT_SECONDS
        )
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except (TimeoutError, OSError):
        return True
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def _replace_stale(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


@dataclass
class _Listener:
    path: Path
    server: grpclib.server.Server
    inode: int


class SnapshotterServer:
    """The service on unix sockets: the configured one (must be free, a stale file is
    replaced), and best-effort extra ones (Nydus's path: skipped if another process serves it).

    Several listeners rather than symlinks: each path is a real socket with its own mode, and
    nothing breaks if the other path's directory is cleaned (a tmpfs `/run` at boot)."""

    def __init__(self, service: SnapshotsService) -> None:
        self.service = service
        self._listeners: list[_Listener] = []
        # grpclib's HTTP/2 libraries log every frame and header at DEBUG: a node run with
        # --log-level debug would drown in them.
        for name in _CHATTY_LOGGERS:
            chatty = logging.getLogger(name)
            if chatty.getEffectiveLevel() < logging.INFO:
                chatty.setLevel(logging.INFO)

    @property
    def paths(self) -> list[Path]:
        return [listener.path for listener in self._listeners]

    async def listen(self, path: Path, *, required: bool, key: str = "snapshotter_socket"
                     ) -> bool:
        """Serve on `path`. Taken by a live process: ConfigError if `required`, else a warning
        and False."""
        if await socket_in_use(path):
            message = f"{path} is served by another process"
            if required:
                raise ConfigError(key, message)
            log.warning("snapshotter: not serving %s: %s", path, message)
            return False
        try:
            await asyncio.to_thread(_replace_stale, path)
            server = grpclib.server.Server([self.service])
            await server.start(path=os.fspath(path))
            os.chmod(path, SOCKET_MODE)
            inode = os.lstat(path).st_ino
        except OSError as error:
            if required:
                raise ConfigError(key, f"cannot listen on {path}: {error.strerror}") from None
            log.warning("snapshotter: not serving %s: %s", path, error)
            return False
        self._listeners.append(_Listener(path, server, inode))
        log.info("snapshotter: serving containerd's snapshots API on %s", path)
        return True

    async def close(self) -> None:
        """Stop accepting, cancel calls under way, and remove our socket files."""
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            listener.server.close()
        for listener in listeners:
            with contextlib.suppress(Exception):
                await listener.server.wait_closed()
            with contextlib.suppress(OSError):
                if os.lstat(listener.path).st_ino == listener.inode:
                    listener.path.unlink()
