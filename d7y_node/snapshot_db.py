"""The snapshotter's metadata (SQLite) and the snapshot directories it keeps in step with it.

Owns: the schema under `<data_dir>/snapshotter/metadata.db` (stdlib `sqlite3`, WAL, one
transaction per call), the snapshot directories `<data_dir>/snapshotter/snapshots/<id>/{fs,work}`,
and the rules that keep the two consistent across a `kill -9` at any moment:
- a new snapshot's directory is made under a temporary name and renamed to its id inside the
  transaction that inserts its row, just before COMMIT (a crash leaves at most a directory
  without a row);
- a removed snapshot's row is deleted first and its directory afterwards (the same);
- at open, and on `sweep()`, every directory without a row is deleted, unmounting what is
  mounted under it first and never crossing into a mount.
Also owns the containerd rules that are about stored state: which parent is valid, which kind may
be committed, which snapshot may be removed, label and name limits.

Does not own: the gRPC service, mount options, filters, or remote layers (`snapshotter.py`).
Synchronous: the snapshotter runs these calls on one worker thread, one at a time.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno
import logging
import os
import re
import secrets
import shutil
import sqlite3
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from d7y_node.errors import (
    SnapshotAlreadyExists,
    SnapshotFailedPrecondition,
    SnapshotInvalidArgument,
    SnapshotNotFound,
)

log = logging.getLogger(__name__)

DATABASE_FILE = "metadata.db"
SNAPSHOTS_DIR = "snapshots"
FS_DIR = "fs"
WORK_DIR = "work"
# Directories being made (renamed to their id on success) carry this prefix.
NEW_PREFIX = "new-"
# containerd's limit for one label (`labels.Validate`): key and value together.
MAX_LABEL_BYTES = 4096
# Keys and names are opaque to us (containerd's metadata layer sends `<ns>/<n>/<key>`); this
# bound only keeps a malicious caller from storing megabytes per row. containerd's own keys are
# a namespace, a number and a digest or a container id: far below it.
MAX_NAME_BYTES = 4096
# Labels per snapshot: containerd sets a handful (CRI and remote-snapshot labels); the bound
# keeps one row's labels in the tens of KB whatever a caller sends.
MAX_LABELS = 256
# A busy database (another connection in a transaction) is waited for this long.
BUSY_TIMEOUT_SECONDS = 30.0
# umount2(2) flag: detach now, clean up when the last user goes (a stale FUSE mount whose server
# died would otherwise refuse a plain unmount).
_MNT_DETACH = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    kind INTEGER NOT NULL,
    parent_id INTEGER REFERENCES snapshots(id),
    created REAL NOT NULL,
    updated REAL NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    inodes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
CREATE TABLE IF NOT EXISTS labels (
    snapshot_id INTEGER NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (snapshot_id, key)
);
"""
# AUTOINCREMENT: an id (a directory name) is never handed out twice, so a directory left by a
# crash can never be mistaken for a later snapshot's.


class Kind(enum.IntEnum):
    """A snapshot's kind, numbered as containerd's `snapshots.v1.Kind` enum."""

    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3


@dataclass(frozen=True)
class SnapshotInfo:
    """One snapshot as the database holds it."""

    # Row id: names the snapshot's directory, so a commit (new name) never moves files.
    id: int
    # The key of an active/view snapshot, or the name of a committed one.
    name: str
    kind: Kind
    # Name of the committed parent; "" for none.
    parent: str
    labels: Mapping[str, str]
    # Unix times (seconds).
    created: float
    updated: float


@dataclass(frozen=True)
class Usage:
    """Disk use of a snapshot's own layer, as containerd's `snapshots.Usage`."""

    size: int
    inodes: int


def validate_name(what: str, name: str) -> None:
    """A key or name: not empty, no NUL, at most `MAX_NAME_BYTES` of UTF-8."""
    if not name:
        raise SnapshotInvalidArgument(f"{what} must not be empty")
    if "\x00" in name:
        raise SnapshotInvalidArgument(f"{what} must not contain NUL")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise SnapshotInvalidArgument(f"{what} is longer than {MAX_NAME_BYTES} bytes")


def validate_labels(labels: Mapping[str, str]) -> None:
    """containerd's rule (key + value at most 4096 bytes), and no empty key or NUL."""
    if len(labels) > MAX_LABELS:
        raise SnapshotInvalidArgument(f"more than {MAX_LABELS} labels")
    for key, value in labels.items():
        if not key:
            raise SnapshotInvalidArgument("label key must not be empty")
        if "\x00" in key or "\x00" in value:
            raise SnapshotInvalidArgument(f"label {key[:64]!r} contains NUL")
        if len(key.encode()) + len(value.encode()) > MAX_LABEL_BYTES:
            raise SnapshotInvalidArgument(
                f"label {key[:64]!r}: key and value greater than maximum size "
                f"({MAX_LABEL_BYTES} bytes)"
            )


def disk_usage(path: Path) -> Usage:
    """Blocks and inodes under `path` (each inode once, not crossing into other filesystems),
    as containerd's `fs.DiskUsage` counts an upper dir."""
    seen: set[int] = set()
    size = 0
    try:
        device = os.lstat(path).st_dev
    except FileNotFoundError:
        return Usage(0, 0)
    stack = [os.fspath(path)]
    while stack:
        current = stack.pop()
        try:
            entries = list(os.scandir(current))
        except (NotADirectoryError, FileNotFoundError, PermissionError):
            continue
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if info.st_dev != device:
                continue
            if info.st_ino not in seen:
                seen.add(info.st_ino)
                size += info.st_blocks * 512
            if stat.S_ISDIR(info.st_mode):
                stack.append(entry.path)
    return Usage(size, len(seen))


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _unescape_mount_path(text: str) -> str:
    """/proc/self/mountinfo writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def mounts_under(path: Path) -> list[Path]:
    """Mount points at or below `path`, deepest first."""
    root = os.path.realpath(path)
    found: list[str] = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as table:
            for line in table:
                fields = line.split(" ")
                if len(fields) < 5:
                    continue
                point = _unescape_mount_path(fields[4])
                if point == root or point.startswith(root + "/"):
                    found.append(point)
    except OSError:
        return []
    found.sort(key=len, reverse=True)
    return [Path(point) for point in found]


def detach_mounts(path: Path) -> list[Path]:
    """Lazily unmount everything mounted at or below `path`; returns what is still mounted."""
    libc = ctypes.CDLL(None, use_errno=True)
    for point in mounts_under(path):
        if libc.umount2(os.fsencode(point), _MNT_DETACH) != 0:
            code = ctypes.get_errno()
            if code not in (errno.EINVAL, errno.ENOENT):
                log.warning("cannot unmount %s: %s", point, os.strerror(code))
    return mounts_under(path)


def remove_tree(path: Path) -> bool:
    """Delete a snapshot directory: unmount what is under it, then delete it without ever
    descending into a mount (if one could not be unmounted, nothing is deleted: False)."""
    if not os.path.lexists(path):
        return True
    still = detach_mounts(path)
    if still:
        log.error("not deleting %s: %s still mounted", path, ", ".join(map(str, still)))
        return False
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        log.error("cannot delete %s: %s", path, err)
        return False
    return True


class SnapshotDb:
    """The snapshot table, its labels, and the directories named by row id.

    Every public method is one transaction: it either fully happens or not at all, and a crash
    in the middle leaves at most a directory that `sweep()` deletes.
    """

    def __init__(self, root: Path, *, clock: Callable[[], float] = time.time) -> None:
        # `root` is `<data_dir>/snapshotter`.
        self.root = root
        self.snapshots_dir = root / SNAPSHOTS_DIR
        self._clock = clock
        self._connection: sqlite3.Connection | None = None
        # The directory `create` renamed into place in the transaction under way.
        self._made: Path | None = None

    # -- life cycle ----------------------------------------------------------------------------

    def open(self) -> list[Path]:
        """Open (creating) the database, then sweep: returns the directories deleted."""
        self.snapshots_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        connection = sqlite3.connect(
            self.root / DATABASE_FILE, timeout=BUSY_TIMEOUT_SECONDS,
            isolation_level=None, check_same_thread=False,
        )
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed call survives a power cut too, not only a process kill.
            connection.execute("PRAGMA synchronous=FULL")
            connection.execute("PRAGMA foreign_keys=ON")
            connection.executescript(_SCHEMA)
        except sqlite3.Error:
            connection.close()
            raise
        self._connection = connection
        return self.sweep()

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    @property
    def connection(self) -> sqlite3.Connection:
        if self._connection is None:
            raise RuntimeError("snapshot database is not open")
        return self._connection

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        connection = self.connection
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield connection
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise

    # -- paths ---------------------------------------------------------------------------------

    def directory(self, snapshot_id: int) -> Path:
        return self.snapshots_dir / str(snapshot_id)

    def fs_dir(self, snapshot_id: int) -> Path:
        """The snapshot's own layer: the upper dir of an active one, the lower of a committed."""
        return self.directory(snapshot_id) / FS_DIR

    def work_dir(self, snapshot_id: int) -> Path:
        """overlayfs's work dir for an active snapshot."""
        return self.directory(snapshot_id) / WORK_DIR

    # -- reads ---------------------------------------------------------------------------------

    def _info(self, connection: sqlite3.Connection, row: tuple[Any, ...]) -> SnapshotInfo:
        snapshot_id, name, kind, parent, created, updated = row[:6]
        labels = dict(connection.execute(
            "SELECT key, value FROM labels WHERE snapshot_id = ?", (snapshot_id,)
        ).fetchall())
        return SnapshotInfo(
            id=int(snapshot_id), name=str(name), kind=Kind(int(kind)), parent=str(parent or ""),
            labels=labels, created=float(created), updated=float(updated),
        )

    _SELECT = (
        "SELECT s.id, s.name, s.kind, p.name, s.created, s.updated, s.size, s.inodes "
        "FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id"
    )

    def _row(self, connection: sqlite3.Connection, name: str) -> tuple[Any, ...]:
        row = connection.execute(self._SELECT + " WHERE s.name = ?", (name,)).fetchone()
        if row is None:
            raise SnapshotNotFound(f"snapshot {name} does not exist")
        return tuple(row)

    def get(self, name: str) -> SnapshotInfo:
        """The snapshot with this key or name (SnapshotNotFound)."""
        connection = self.connection
        return self._info(connection, self._row(connection, name))

    def find(self, name: str) -> SnapshotInfo | None:
        try:
            return self.get(name)
        except SnapshotNotFound:
            return None

    def stored_usage(self, name: str) -> tuple[SnapshotInfo, Usage]:
        """The snapshot and the usage recorded at its commit (zero before)."""
        connection = self.connection
        row = self._row(connection, name)
        return self._info(connection, row), Usage(int(row[6]), int(row[7]))

    def chain(self, name: str) -> list[SnapshotInfo]:
        """The snapshot named `name` and its ancestors, nearest first (SnapshotNotFound)."""
        connection = self.connection
        chain = [self._info(connection, self._row(connection, name))]
        while chain[-1].parent:
            chain.append(self._info(connection, self._row(connection, chain[-1].parent)))
        return chain

    def snapshots(self) -> list[SnapshotInfo]:
        """Every snapshot, parents before their children (ids grow with creation)."""
        connection = self.connection
        rows = connection.execute(self._SELECT + " ORDER BY s.id").fetchall()
        return [self._info(connection, tuple(row)) for row in rows]

    def ids(self) -> set[int]:
        return {int(row[0]) for row in self.connection.execute("SELECT id FROM snapshots")}

    # -- writes --------------------------------------------------------------------------------

    def create(
        self, name: str, kind: Kind, parent: str, labels: Mapping[str, str],
        *, usage: Usage | None = None,
    ) -> SnapshotInfo:
        """A new snapshot (containerd's `storage.CreateSnapshot`): the key must be free
        (SnapshotAlreadyExists), the parent must exist (SnapshotNotFound) and be committed
        (SnapshotInvalidArgument). Its directory (`fs`, and `work` for an active one) is in
        place when this returns; `kind` COMMITTED makes a committed snapshot at once (remote
        layers), with `usage` recorded."""
        validate_name("key", name)
        if parent:
            validate_name("parent", parent)
        validate_labels(labels)
        if kind is Kind.UNKNOWN:
            raise SnapshotInvalidArgument("snapshot kind must be view, active or committed")
        try:
            return self._insert(name, kind, parent, labels, usage)
        except BaseException:
            # The directory was renamed into place but the row did not commit.
            if self._made is not None:
                remove_tree(self._made)
            raise
        finally:
            self._made = None

    def _insert(
        self, name: str, kind: Kind, parent: str, labels: Mapping[str, str],
        usage: Usage | None,
    ) -> SnapshotInfo:
        with self._transaction() as connection:
            if connection.execute("SELECT 1 FROM snapshots WHERE name = ?", (name,)).fetchone():
                raise SnapshotAlreadyExists(f"snapshot {name} already exists")
            parent_id: int | None = None
            if parent:
                found = connection.execute(
                    "SELECT id, kind FROM snapshots WHERE name = ?", (parent,)
                ).fetchone()
                if found is None:
                    raise SnapshotNotFound(f"parent snapshot {parent} does not exist")
                if Kind(found[1]) is not Kind.COMMITTED:
                    raise SnapshotInvalidArgument(f"parent {parent} is not a committed snapshot")
                parent_id = int(found[0])
            now = self._clock()
            counted = usage or Usage(0, 0)
            cursor = connection.execute(
                "INSERT INTO snapshots (name, kind, parent_id, created, updated, size, inodes) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (name, int(kind), parent_id, now, now, counted.size, counted.inodes),
            )
            snapshot_id = int(cursor.lastrowid or 0)
            connection.executemany(
                "INSERT INTO labels (snapshot_id, key, value) VALUES (?, ?, ?)",
                [(snapshot_id, key, value) for key, value in labels.items() if value != ""],
            )
            self._make_directory(snapshot_id, with_work=kind is Kind.ACTIVE,
                                 owner_of=None if parent_id is None else self.fs_dir(parent_id))
            info = self._info(connection, self._row(connection, name))
        return info

    def _make_directory(
        self, snapshot_id: int, *, with_work: bool, owner_of: Path | None
    ) -> None:
        """`<id>/fs` (and `<id>/work`), made under a temporary name and renamed into place
        last, so a crash never leaves a half-made directory under a real id. `fs` belongs to
        whoever owns the parent's (containerd's overlay does the same: an image whose root
        directory is not root's keeps it in its containers)."""
        temporary = self.snapshots_dir / f"{NEW_PREFIX}{secrets.token_hex(8)}"
        try:
            temporary.mkdir(mode=0o700)
            # The fs dir is the container's root when it is the top layer: 0755 like a rootfs.
            (temporary / FS_DIR).mkdir(mode=0o755)
            os.chmod(temporary / FS_DIR, 0o755)
            if owner_of is not None:
                parent = os.stat(owner_of)
                os.lchown(temporary / FS_DIR, parent.st_uid, parent.st_gid)
            if with_work:
                (temporary / WORK_DIR).mkdir(mode=0o711)
            os.rename(temporary, self.directory(snapshot_id))
            self._made = self.directory(snapshot_id)
            # The rename is on disk before the row commits (a power cut, not only a kill).
            _fsync_directory(self.snapshots_dir)
        except BaseException:
            remove_tree(temporary)
            raise

    def commit(
        self, key: str, name: str, labels: Mapping[str, str], usage: Usage
    ) -> SnapshotInfo:
        """Active `key` becomes committed `name` (containerd's `storage.CommitActive`): key
        missing → SnapshotNotFound, name taken → SnapshotAlreadyExists, key not active →
        SnapshotFailedPrecondition. The labels replace the active snapshot's (not inherited)."""
        validate_name("key", key)
        validate_name("name", name)
        validate_labels(labels)
        with self._transaction() as connection:
            found = connection.execute(
                "SELECT id, kind FROM snapshots WHERE name = ?", (key,)
            ).fetchone()
            if found is None:
                raise SnapshotNotFound(f"active snapshot {key} does not exist")
            if connection.execute("SELECT 1 FROM snapshots WHERE name = ?", (name,)).fetchone():
                raise SnapshotAlreadyExists(f"committed snapshot {name} already exists")
            if Kind(found[1]) is not Kind.ACTIVE:
                raise SnapshotFailedPrecondition(f"snapshot {key} is not active")
            snapshot_id = int(found[0])
            now = self._clock()
            connection.execute(
                "UPDATE snapshots SET name = ?, kind = ?, created = ?, updated = ?, size = ?, "
                "inodes = ? WHERE id = ?",
                (name, int(Kind.COMMITTED), now, now, usage.size, usage.inodes, snapshot_id),
            )
            connection.execute("DELETE FROM labels WHERE snapshot_id = ?", (snapshot_id,))
            connection.executemany(
                "INSERT INTO labels (snapshot_id, key, value) VALUES (?, ?, ?)",
                [(snapshot_id, k, v) for k, v in labels.items() if v != ""],
            )
            info = self._info(connection, self._row(connection, name))
        return info

    def update_labels(
        self, name: str, labels: Mapping[str, str], paths: tuple[str, ...]
    ) -> SnapshotInfo:
        """containerd's `storage.UpdateInfo`: no paths replaces every label; "labels" too;
        "labels.<key>" sets that one (an empty or absent value deletes it). Any other path is
        SnapshotInvalidArgument."""
        validate_name("key", name)
        validate_labels(labels)
        changes: dict[str, str | None] = {}
        replace_all = not paths
        for path in paths:
            if path == "labels":
                replace_all = True
            elif path.startswith("labels."):
                label = path[len("labels."):]
                if not label:
                    raise SnapshotInvalidArgument("field path labels. names no label")
                changes[label] = labels.get(label) or None
            else:
                raise SnapshotInvalidArgument(f"cannot update {path!r} field on snapshot {name}")
        with self._transaction() as connection:
            snapshot_id = int(self._row(connection, name)[0])
            if replace_all:
                connection.execute("DELETE FROM labels WHERE snapshot_id = ?", (snapshot_id,))
                changes = {**{k: (v or None) for k, v in labels.items()}, **changes}
            for label, value in changes.items():
                if value is None:
                    connection.execute(
                        "DELETE FROM labels WHERE snapshot_id = ? AND key = ?",
                        (snapshot_id, label),
                    )
                else:
                    connection.execute(
                        "INSERT OR REPLACE INTO labels (snapshot_id, key, value) VALUES (?, ?, ?)",
                        (snapshot_id, label, value),
                    )
            count = connection.execute(
                "SELECT COUNT(*) FROM labels WHERE snapshot_id = ?", (snapshot_id,)
            ).fetchone()[0]
            if count > MAX_LABELS:
                raise SnapshotInvalidArgument(f"more than {MAX_LABELS} labels")
            connection.execute(
                "UPDATE snapshots SET updated = ? WHERE id = ?", (self._clock(), snapshot_id)
            )
            info = self._info(connection, self._row(connection, name))
        return info

    def add_labels(self, name: str, labels: Mapping[str, str]) -> SnapshotInfo:
        """Set these labels (keeping the others)."""
        return self.update_labels(name, labels, tuple(f"labels.{key}" for key in labels))

    def remove(self, name: str) -> SnapshotInfo:
        """Delete the row (containerd's `storage.Remove`): missing → SnapshotNotFound, with
        children → SnapshotFailedPrecondition. The directory is left for `delete_directory`
        (after remote layers let go of it), or for the next `sweep()` after a crash."""
        validate_name("key", name)
        with self._transaction() as connection:
            row = self._row(connection, name)
            info = self._info(connection, row)
            if connection.execute(
                "SELECT 1 FROM snapshots WHERE parent_id = ? LIMIT 1", (info.id,)
            ).fetchone():
                raise SnapshotFailedPrecondition(f"cannot remove snapshot {name} with child")
            connection.execute("DELETE FROM snapshots WHERE id = ?", (info.id,))
        return info

    def delete_directory(self, snapshot_id: int) -> bool:
        """Delete a removed snapshot's directory (False: something stays mounted in it)."""
        if snapshot_id in self.ids():
            raise RuntimeError(f"snapshot {snapshot_id} still has a row")
        return remove_tree(self.directory(snapshot_id))

    # -- consistency ---------------------------------------------------------------------------

    def orphans(self) -> list[Path]:
        """Entries under `snapshots/` that no row names (crash leftovers, removed snapshots)."""
        ids = {str(snapshot_id) for snapshot_id in self.ids()}
        try:
            names = sorted(os.listdir(self.snapshots_dir))
        except FileNotFoundError:
            return []
        return [self.snapshots_dir / name for name in names if name not in ids]

    def sweep(self) -> list[Path]:
        """Delete every directory without a row; returns the ones deleted. Rows whose
        directory is missing (nothing of ours makes them) are logged."""
        deleted = [path for path in self.orphans() if remove_tree(path)]
        for path in deleted:
            log.info("deleted snapshot directory %s: not in the database", path)
        for snapshot_id in sorted(self.ids()):
            if not self.fs_dir(snapshot_id).is_dir():
                log.error("snapshot %d has no directory %s", snapshot_id, self.fs_dir(snapshot_id))
        return deleted
