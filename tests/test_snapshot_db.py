"""snapshot_db: containerd's storage rules, one transaction per call, and directories that always
match the rows (orphans swept, a crash at any moment — simulated, and real `kill -9` — leaving
nothing lost and nothing orphaned)."""

from __future__ import annotations

import json
import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from d7y_node.errors import (
    SnapshotAlreadyExists,
    SnapshotFailedPrecondition,
    SnapshotInvalidArgument,
    SnapshotNotFound,
)
from d7y_node.snapshot_db import (
    MAX_LABEL_BYTES,
    MAX_NAME_BYTES,
    Kind,
    SnapshotDb,
    Usage,
    disk_usage,
    mounts_under,
)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[SnapshotDb]:
    database = SnapshotDb(tmp_path / "snapshotter")
    database.open()
    yield database
    database.close()


def directories(db: SnapshotDb) -> set[str]:
    return set(os.listdir(db.snapshots_dir))


def test_create_commit_remove_keep_rows_and_directories_together(db: SnapshotDb) -> None:
    base = db.create("k/1/extract", Kind.ACTIVE, "", {"a": "1"})
    assert base.kind is Kind.ACTIVE and base.parent == "" and base.labels == {"a": "1"}
    assert db.fs_dir(base.id).is_dir() and db.work_dir(base.id).is_dir()
    (db.fs_dir(base.id) / "file").write_text("x" * 10000)

    committed = db.commit("k/1/extract", "layer-1", {"b": "2"}, disk_usage(db.fs_dir(base.id)))
    # Same row and directory; labels replaced, not inherited (containerd's CommitActive).
    assert committed.id == base.id and committed.kind is Kind.COMMITTED
    assert committed.labels == {"b": "2"}
    _, usage = db.stored_usage("layer-1")
    assert usage.size >= 10000 and usage.inodes == 1
    with pytest.raises(SnapshotNotFound):
        db.get("k/1/extract")

    view = db.create("view", Kind.VIEW, "layer-1", {})
    assert view.parent == "layer-1"
    assert db.fs_dir(view.id).is_dir() and not db.work_dir(view.id).exists()
    assert [i.name for i in db.chain("view")] == ["view", "layer-1"]
    assert directories(db) == {str(base.id), str(view.id)}

    removed = db.remove("view")
    assert removed.id == view.id
    assert db.delete_directory(view.id)
    assert directories(db) == {str(base.id)}
    assert [i.name for i in db.snapshots()] == ["layer-1"]


def test_storage_errors_are_containerds(db: SnapshotDb) -> None:
    db.create("active", Kind.ACTIVE, "", {})
    with pytest.raises(SnapshotAlreadyExists):
        db.create("active", Kind.ACTIVE, "", {})
    with pytest.raises(SnapshotNotFound):
        db.create("child", Kind.ACTIVE, "no-such-parent", {})
    # A parent must be committed (containerd: invalid argument).
    with pytest.raises(SnapshotInvalidArgument):
        db.create("child", Kind.ACTIVE, "active", {})
    with pytest.raises(SnapshotNotFound):
        db.commit("missing", "name", {}, Usage(0, 0))
    db.commit("active", "committed", {}, Usage(0, 0))
    # Committing a committed snapshot: failed precondition; onto a taken name: already exists.
    with pytest.raises(SnapshotFailedPrecondition):
        db.commit("committed", "other", {}, Usage(0, 0))
    db.create("second", Kind.ACTIVE, "committed", {})
    with pytest.raises(SnapshotAlreadyExists):
        db.commit("second", "committed", {}, Usage(0, 0))
    with pytest.raises(SnapshotFailedPrecondition):
        db.remove("committed")
    with pytest.raises(SnapshotNotFound):
        db.remove("missing")
    # None of the failed calls left a row or a directory behind.
    assert {i.name for i in db.snapshots()} == {"committed", "second"}
    assert directories(db) == {str(i.id) for i in db.snapshots()}


@pytest.mark.parametrize("name", ["", "a\x00b", "x" * (MAX_NAME_BYTES + 1)])
def test_bad_keys_are_invalid_arguments(db: SnapshotDb, name: str) -> None:
    with pytest.raises(SnapshotInvalidArgument):
        db.create(name, Kind.ACTIVE, "", {})
    with pytest.raises(SnapshotInvalidArgument):
        db.remove(name)
    with pytest.raises(SnapshotInvalidArgument):
        db.commit(name, "x", {}, Usage(0, 0))
    assert directories(db) == set()


def test_keys_are_opaque_strings(db: SnapshotDb) -> None:
    for key in ("k8s.io/12/extract-123 sha256:ab", "../../etc/passwd", "ünïcode/ключ", "a" * 4096):
        info = db.create(key, Kind.ACTIVE, "", {})
        assert db.get(key).id == info.id
        assert db.fs_dir(info.id).parent.parent == db.snapshots_dir


def test_labels_are_validated_like_containerd(db: SnapshotDb) -> None:
    fits = {"k": "v" * (MAX_LABEL_BYTES - 1)}
    db.create("ok", Kind.ACTIVE, "", fits)
    for labels in ({"k": "v" * MAX_LABEL_BYTES}, {"": "v"}, {"k": "a\x00"}):
        with pytest.raises(SnapshotInvalidArgument):
            db.create("bad", Kind.ACTIVE, "", labels)
    with pytest.raises(SnapshotInvalidArgument):
        db.update_labels("ok", {"k": "v" * MAX_LABEL_BYTES}, ("labels.k",))
    assert db.get("ok").labels == fits


def test_update_labels_by_field_path(db: SnapshotDb) -> None:
    db.create("s", Kind.ACTIVE, "", {"a": "1", "b": "2"})
    assert db.update_labels("s", {"a": "9", "z": "x"}, ("labels.a",)).labels == {"a": "9", "b": "2"}
    # An absent or empty value deletes the label.
    assert db.update_labels("s", {}, ("labels.b",)).labels == {"a": "9"}
    assert db.update_labels("s", {"c": "3"}, ("labels",)).labels == {"c": "3"}
    assert db.update_labels("s", {"d": "4"}, ()).labels == {"d": "4"}
    for path in ("kind", "name", "parent", "created_at", "labels."):
        with pytest.raises(SnapshotInvalidArgument):
            db.update_labels("s", {"d": "5"}, (path,))
    assert db.get("s").labels == {"d": "4"}
    before = db.get("s").updated
    time.sleep(0.01)
    assert db.add_labels("s", {"e": "5"}).updated > before
    with pytest.raises(SnapshotNotFound):
        db.update_labels("missing", {}, ())


def test_a_failure_inside_create_leaves_no_row_and_no_directory(
    db: SnapshotDb, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = db._row

    def fail_after_rename(connection: object, name: str) -> object:
        # Runs after the directory was renamed into place, before COMMIT: a crash there.
        if name == "doomed":
            raise RuntimeError("simulated crash before commit")
        return original(connection, name)  # type: ignore[arg-type]

    monkeypatch.setattr(db, "_row", fail_after_rename)
    with pytest.raises(RuntimeError):
        db.create("doomed", Kind.ACTIVE, "", {"a": "b"})
    monkeypatch.undo()
    assert db.find("doomed") is None
    assert directories(db) == set()
    # The database is usable afterwards (no transaction left open).
    assert db.create("next", Kind.ACTIVE, "", {}).name == "next"


def test_a_failure_making_the_directory_rolls_the_row_back(
    db: SnapshotDb, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_space(source: object, target: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "rename", no_space)
    with pytest.raises(OSError):
        db.create("full", Kind.ACTIVE, "", {})
    monkeypatch.undo()
    assert db.find("full") is None and directories(db) == set()


def test_open_sweeps_directories_without_rows(tmp_path: Path) -> None:
    root = tmp_path / "snapshotter"
    db = SnapshotDb(root)
    db.open()
    keep = db.create("keep", Kind.ACTIVE, "", {})
    (db.fs_dir(keep.id) / "data").write_text("keep me")
    gone = db.create("gone", Kind.ACTIVE, "", {})
    db.remove("gone")  # the crash came before its directory was deleted
    half = db.snapshots_dir / "new-0123456789abcdef"  # the crash came while making one
    (half / "fs").mkdir(parents=True)
    stray = db.snapshots_dir / "999"
    (stray / "fs" / "deep").mkdir(parents=True)
    (stray / "fs" / "deep" / "file").write_text("x")
    db.close()

    again = SnapshotDb(root)
    swept = again.open()
    assert {path.name for path in swept} == {str(gone.id), half.name, "999"}
    assert directories(again) == {str(keep.id)}
    assert (again.fs_dir(keep.id) / "data").read_text() == "keep me"
    assert again.orphans() == []
    again.close()


def test_a_childs_fs_belongs_to_the_owner_of_its_parents(db: SnapshotDb) -> None:
    base = db.create("base", Kind.ACTIVE, "", {})
    os.chown(db.fs_dir(base.id), 1234, 5678)
    db.commit("base", "layer", {}, Usage(0, 0))
    child = db.fs_dir(db.create("child", Kind.ACTIVE, "layer", {}).id)
    assert (child.stat().st_uid, child.stat().st_gid) == (1234, 5678)
    assert stat.S_IMODE(child.stat().st_mode) == 0o755


def test_ids_are_never_reused(db: SnapshotDb) -> None:
    first = db.create("a", Kind.ACTIVE, "", {})
    db.remove("a")
    db.delete_directory(first.id)
    assert db.create("a", Kind.ACTIVE, "", {}).id > first.id


@pytest.mark.integration
def test_removing_a_directory_unmounts_and_never_deletes_through_a_mount(
    db: SnapshotDb, tmp_path: Path
) -> None:
    """A mount left inside a snapshot directory (a remote layer's, from a crashed process) is
    detached first; the mounted directory's own files are untouched."""
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "file").write_text("must survive")
    info = db.create("s", Kind.ACTIVE, "", {})
    target = db.fs_dir(info.id) / "mnt"
    target.mkdir()
    subprocess.run(["mount", "--bind", str(precious), str(target)], check=True)
    try:
        assert mounts_under(db.directory(info.id)) == [target]
        db.remove("s")
        assert db.delete_directory(info.id)
        assert not db.directory(info.id).exists()
        assert (precious / "file").read_text() == "must survive"
        assert mounts_under(tmp_path) == []
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False, capture_output=True)


# A child process does snapshot calls in a loop and prints one JSON line after each call
# returns (the call is then durable); the test kills it with SIGKILL at a random moment.
_WORKER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from d7y_node.snapshot_db import Kind, SnapshotDb, Usage
    db = SnapshotDb(Path(sys.argv[1]))
    db.open()
    round = int(sys.argv[2])
    parent = ""
    for step in range(100000):
        key = f"r{round}/s{step}"
        db.create(key, Kind.ACTIVE, parent, {"step": str(step)})
        print(json.dumps(["create", key]), flush=True)
        (db.fs_dir(db.get(key).id) / "f").write_text("x")
        name = f"r{round}/c{step}"
        db.commit(key, name, {"n": str(step)}, Usage(1, 1))
        print(json.dumps(["commit", key, name]), flush=True)
        if step % 3 == 2:
            victim = db.create(f"{name}/view", Kind.VIEW, name, {})
            print(json.dumps(["create", victim.name]), flush=True)
            db.remove(victim.name)
            db.delete_directory(victim.id)
            print(json.dumps(["remove", victim.name]), flush=True)
        parent = name
""")


def test_kill_9_at_any_moment_loses_nothing_and_orphans_nothing(tmp_path: Path) -> None:
    root = tmp_path / "snapshotter"
    rng = random.Random(5)
    expected: dict[str, bool] = {}  # name → exists, from calls that returned
    last: list[str] = []
    for round_number in range(5):
        worker = subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(root), str(round_number)],
            stdout=subprocess.PIPE, text=True,
        )
        assert worker.stdout is not None
        # Let it get going (imports take a moment), then kill it mid-stream.
        first = worker.stdout.readline()
        time.sleep(rng.uniform(0.05, 0.4))
        worker.send_signal(signal.SIGKILL)
        rest = worker.stdout.read()
        worker.wait()
        for line in [first, *rest.splitlines()]:
            if not line.strip():
                continue
            event = json.loads(line)
            last = event[1:]
            if event[0] == "create":
                expected[event[1]] = True
            elif event[0] == "commit":
                expected[event[1]] = False
                expected[event[2]] = True
            else:
                expected[event[1]] = False

        db = SnapshotDb(root)
        db.open()
        try:
            names = {info.name for info in db.snapshots()}
            # Nothing lost: every call that returned is there (or gone, for removals); only
            # the call the kill interrupted may have landed without being reported (a commit
            # of the last key, or the removal of the last view).
            differing = {name for name, exists in expected.items() if (name in names) != exists}
            assert differing <= set(last), differing
            assert len(differing) <= 1
            # From here on, what the interrupted call did is what is expected.
            expected.update({name: name in names for name in differing})
            expected.update({name: True for name in names - set(expected)})
            # Nothing orphaned: exactly one directory per row, each complete.
            assert directories(db) == {str(info.id) for info in db.snapshots()}
            for info in db.snapshots():
                assert db.fs_dir(info.id).is_dir()
                # An active snapshot has its overlay work dir (a committed one keeps it, as in
                # containerd); a view never has one.
                assert db.work_dir(info.id).is_dir() == (info.kind is not Kind.VIEW)
                if info.parent:
                    assert info.parent in names
        finally:
            db.close()
    assert sum(expected.values()) > 5
