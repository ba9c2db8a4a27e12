"""Tests of `d7y_node.piece_store`: piece sizes, the metadata format, reload, GC, disk full."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from d7y_node.config import StoreConfig, TaskConfig
from d7y_node.errors import StoreFull
from d7y_node.metrics import Metrics
from d7y_node.piece_store import (
    BLOCK_SIZE,
    MAX_PIECE_SIZE,
    MIB,
    MIN_PIECE_SIZE,
    BadMetadata,
    BlockDigests,
    PartialPiece,
    PieceStore,
    StoredTask,
    decode_metadata,
    encode_metadata,
    file_name_for,
    piece_size_for,
)
from d7y_node.tasks import TaskManager
from tests.test_tasks import MemorySource, overwrite, payload, wait_for


class Clock:
    """A wall clock tests move by hand."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def sample(store: Metrics, name: str, **labels: str) -> float:
    value = store.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@contextlib.asynccontextmanager
async def opened(
    directory: Path, clock: Clock | None = None, **config: object
) -> AsyncIterator[PieceStore]:
    settings = {"gc_quota": 1 << 40, **config}
    store = PieceStore(
        StoreConfig(data_dir=directory, **settings),  # type: ignore[arg-type]
        Metrics(),
        clock=clock or Clock(),
    )
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def store_content(store: PieceStore, task_id: str, data: bytes) -> StoredTask:
    return await store.put(
        task_id, data, sha256=hashlib.sha256(data).hexdigest(), attributes={}
    )


# -- piece size --------------------------------------------------------------------------------


def test_piece_sizes() -> None:
    assert piece_size_for(0) == MIN_PIECE_SIZE
    assert piece_size_for(64 * MIB) == MIB
    assert piece_size_for(64 * MIB + 1) == 2 * MIB
    assert piece_size_for(1024 * MIB) == 16 * MIB
    assert piece_size_for(100 * 1024 * MIB) == MAX_PIECE_SIZE


@given(st.integers(min_value=0, max_value=1 << 50))
def test_piece_size_is_a_bounded_power_of_two(length: int) -> None:
    size = piece_size_for(length)
    assert MIN_PIECE_SIZE <= size <= MAX_PIECE_SIZE
    assert size & (size - 1) == 0
    assert size % BLOCK_SIZE == 0  # blocks of partial pieces never straddle two pieces
    count = -(-length // size)
    if size < MAX_PIECE_SIZE:
        assert count <= 64
    if length <= 16 * 1024 * MIB:
        assert count <= 1024


# -- metadata format ---------------------------------------------------------------------------


@given(
    task_id=st.text(min_size=1, max_size=80),
    length=st.integers(min_value=0, max_value=1 << 36),
    held=st.data(),
    attributes=st.dictionaries(st.text(max_size=10), st.text(max_size=20), max_size=3),
    sha=st.one_of(st.none(), st.binary(min_size=32, max_size=32).map(bytes.hex)),
)
def test_metadata_round_trip(
    task_id: str, length: int, held: st.DataObject, attributes: dict[str, str], sha: str | None
) -> None:
    size = piece_size_for(length)
    count = -(-length // size)
    done = bytearray(held.draw(st.lists(st.sampled_from([0, 1]), min_size=count, max_size=count)))
    task = StoredTask(
        task_id=task_id, name=file_name_for(task_id), content_length=length, piece_size=size,
        sha256=sha, attributes=attributes, done=done,
        digests=[(i * 2654435761) % (1 << 64) if d else 0 for i, d in enumerate(done)],
        last_access=123.5,
    )
    back = decode_metadata(encode_metadata(task), task.name)
    assert (back.task_id, back.content_length, back.piece_size, back.sha256) == (
        task_id, length, size, sha
    )
    assert (back.done, back.digests, back.attributes) == (done, task.digests, attributes)
    assert back.needs_verify and not back.complete and back.last_access == 123.5


@given(st.binary(max_size=300))
def test_garbage_metadata_is_rejected(raw: bytes) -> None:
    with pytest.raises(BadMetadata):
        decode_metadata(raw, "0" * 64)


def test_metadata_of_another_task_is_rejected() -> None:
    task = StoredTask(task_id="a", name=file_name_for("a"), content_length=0,
                      piece_size=MIB, sha256=None, attributes={}, done=bytearray(),
                      digests=[])
    with pytest.raises(BadMetadata, match="file name"):
        decode_metadata(encode_metadata(task), file_name_for("b"))


def _partial_task(length: int) -> StoredTask:
    size = piece_size_for(length)
    count = -(-length // size)
    return StoredTask(task_id="t", name=file_name_for("t"), content_length=length,
                      piece_size=size, sha256=None, attributes={}, done=bytearray(count),
                      digests=[0] * count)


def test_partial_pieces_round_trip_and_bad_ones_are_rejected() -> None:
    task = _partial_task(3 * MIB + 100)
    task.done[0] = 1
    task.digests[0] = 99
    last = PartialPiece.empty(100)  # the short last piece: one short block
    last.held[0], last.digests[0] = 1, 7
    middle = PartialPiece.empty(MIB)
    middle.held[3], middle.digests[3] = 1, 1 << 63
    middle.held[63], middle.digests[63] = 1, 5
    task.partial = {3: last, 1: middle, 2: PartialPiece.empty(MIB)}  # 2 holds nothing
    back = decode_metadata(encode_metadata(task), task.name)
    assert set(back.partial) == {1, 3}
    assert (back.partial[1].held, back.partial[1].digests) == (middle.held, middle.digests)
    assert (back.partial[3].held, back.partial[3].digests) == (last.held, last.digests)
    # A partial piece that is also held, or a bitmap of the wrong size, is not trusted.
    task.partial = {0: middle}
    with pytest.raises(BadMetadata, match="partial piece"):
        decode_metadata(encode_metadata(task), task.name)
    task.partial = {3: middle}
    with pytest.raises(BadMetadata, match="block"):
        decode_metadata(encode_metadata(task), task.name)


def test_held_ranges_and_missing_blocks() -> None:
    task = _partial_task(2 * MIB)
    task.done[1] = 1
    assert task.holds(MIB, 2 * MIB) and not task.holds(MIB - 1, MIB + 1)
    partial = task.partial[0] = PartialPiece.empty(MIB)
    partial.held[1] = partial.held[2] = partial.held[-1] = 1
    assert task.holds(BLOCK_SIZE, 3 * BLOCK_SIZE) and task.holds(2 * BLOCK_SIZE + 5, 3 * BLOCK_SIZE)
    assert task.holds(MIB - 5, MIB + 9)  # the last block of piece 0, then the held piece 1
    assert not task.holds(BLOCK_SIZE - 1, 2 * BLOCK_SIZE)
    assert not task.holds(2 * BLOCK_SIZE, MIB)
    # Missing blocks covering the ranges, adjacent ones merged, held ones left out.
    assert task.missing_blocks(0, [(5, 10), (3 * BLOCK_SIZE - 1, 5 * BLOCK_SIZE + 1)]) == [
        (0, BLOCK_SIZE), (3 * BLOCK_SIZE, 6 * BLOCK_SIZE),
    ]
    assert task.missing_blocks(0, [(MIB - BLOCK_SIZE - 1, MIB + 5)]) == [
        (MIB - 2 * BLOCK_SIZE, MIB - BLOCK_SIZE)
    ]
    assert task.missing_blocks(1, [(0, 2 * MIB)]) == []


@given(st.lists(st.binary(max_size=3 * BLOCK_SIZE), max_size=6))
def test_block_digests_split_any_stream_at_block_edges(parts: list[bytes]) -> None:
    data = b"".join(parts)
    digests = BlockDigests()
    for part in parts:
        digests.update(part)
    expected = [xxhash.xxh3_64_intdigest(data[i : i + BLOCK_SIZE])
                for i in range(0, len(data), BLOCK_SIZE)]
    assert digests.finish() == expected


async def _write_blocks(store: PieceStore, task: StoredTask, start: int, data: bytes) -> bool:
    digests = BlockDigests()
    await store.write(task, start, [data], digests)
    return store.record_blocks(task, start, digests.finish())


async def test_blocks_that_fill_a_piece_make_it_held(tmp_path: Path) -> None:
    data = os.urandom(MIB)
    async with opened(tmp_path) as store:
        task = await store.create("t", 2 * MIB, sha256=None, attributes={}, reserve=False)
        assert not await _write_blocks(store, task, BLOCK_SIZE, data[BLOCK_SIZE:])
        assert not await store.assemble_piece(task, 0) and not task.done[0]
        assert await _write_blocks(store, task, 0, data[:BLOCK_SIZE])
        assert await store.assemble_piece(task, 0)
        assert task.done[0] and 0 not in task.partial
        assert task.digests[0] == xxhash.xxh3_64_intdigest(data)
        await store.release(task)


async def test_a_bad_block_keeps_its_piece_partial(tmp_path: Path) -> None:
    data = os.urandom(MIB)
    async with opened(tmp_path) as store:
        task = await store.create("t", MIB, sha256=None, attributes={}, reserve=False)
        assert await _write_blocks(store, task, 0, data)
        overwrite(tmp_path / "tasks" / (task.name + ".data"), 5 * BLOCK_SIZE + 3, b"!")
        assert not await store.assemble_piece(task, 0)
        assert not task.done[0] and task.partial[0].held.count(0) == 1
        assert task.missing_blocks(0, [(0, MIB)]) == [(5 * BLOCK_SIZE, 6 * BLOCK_SIZE)]
        assert sample(store.metrics, "d7y_piece_digest_failures_total") == 1
        await store.release(task)


async def test_verify_drops_blocks_whose_digest_does_not_match(tmp_path: Path) -> None:
    async with opened(tmp_path) as store:
        task = await store.create("t", 2 * MIB, sha256=None, attributes={}, reserve=False)
        await _write_blocks(store, task, MIB, os.urandom(4 * BLOCK_SIZE))
        await store.release(task)
    overwrite(tmp_path / "tasks" / (task.name + ".data"), MIB + 2 * BLOCK_SIZE, b"!")
    async with opened(tmp_path) as store:
        task2 = store.get("t")
        assert task2 is not None and task2.holds(MIB, MIB + 4 * BLOCK_SIZE)
        store.pin(task2)
        await store.verify(task2)
        assert task2.holds(MIB, MIB + 2 * BLOCK_SIZE)
        assert not task2.holds(MIB + 2 * BLOCK_SIZE, MIB + 3 * BLOCK_SIZE)
        assert task2.holds(MIB + 3 * BLOCK_SIZE, MIB + 4 * BLOCK_SIZE)
        await store.release(task2)
    async with opened(tmp_path) as store:
        task3 = store.get("t")  # the drop was saved
        assert task3 is not None and task3.partial[1].held.count(1) == 3


# -- files -------------------------------------------------------------------------------------


async def test_task_ids_never_become_paths(tmp_path: Path) -> None:
    async with opened(tmp_path) as store:
        await store_content(store, "../../escape", b"x" * 10)
        await store_content(store, "/etc/passwd", b"y" * 10)
        names = sorted(p.name for p in store.directory.iterdir())
    assert names == sorted(
        file_name_for(i) + s for i in ("../../escape", "/etc/passwd") for s in (".data", ".meta")
    )
    assert os.listdir(tmp_path) == ["tasks"]


async def test_reload_keeps_good_tasks_and_removes_leftovers(tmp_path: Path) -> None:
    async with opened(tmp_path) as store:
        good = await store_content(store, "good", b"g" * (3 * MIB))
        bad = await store_content(store, "torn", b"t" * 100)
    tasks_dir = tmp_path / "tasks"
    (tasks_dir / f"{good.name}.meta.1234.tmp").write_bytes(b"half a metadata file")
    (tasks_dir / f"{good.name}.data.99.trash").write_bytes(b"discarded")
    (tasks_dir / ("a" * 64 + ".data")).write_bytes(b"data without metadata")
    (tasks_dir / f"{bad.name}.meta").write_bytes(b"\x85garbage")
    async with opened(tmp_path) as store:
        assert store.get("torn") is None
        task = store.get("good")
        assert task is not None and task.complete and not task.needs_verify
        assert store.metrics.store_tasks._value.get() == 1
    assert sorted(p.name for p in tasks_dir.iterdir()) == [
        good.name + ".data", good.name + ".meta"
    ]


async def test_data_file_of_wrong_size_is_dropped(tmp_path: Path) -> None:
    async with opened(tmp_path) as store:
        task = await store_content(store, "t", b"t" * 5000)
    os.truncate(tmp_path / "tasks" / (task.name + ".data"), 4000)
    async with opened(tmp_path) as store:
        assert store.get("t") is None


async def test_flush_claims_pieces_only_after_they_are_written(tmp_path: Path) -> None:
    async with opened(tmp_path) as store:
        task = await store.create("t", 3 * MIB, sha256=None, attributes={"k": "v"},
                                  reserve=True)
        digest = xxhash.xxh3_64()
        await store.write(task, MIB, [b"a" * MIB], digest)
        store.record_piece(task, 1, digest.intdigest())
        await store.flush(task)
        await store.write(task, 0, [b"b" * MIB], xxhash.xxh3_64())  # written, not recorded
        meta = decode_metadata((store.directory / (task.name + ".meta")).read_bytes(), task.name)
        assert meta.done == bytearray([0, 1, 0]) and meta.attributes == {"k": "v"}
        assert meta.digests[1] == xxhash.xxh3_64_intdigest(b"a" * MIB)
        await store.release(task)
    async with opened(tmp_path) as store:
        task2 = store.get("t")
        assert task2 is not None and task2.needs_verify and task2.done == bytearray([0, 1, 0])
        store.pin(task2)
        assert await store.verify(task2) == 0
        await store.release(task2)


async def test_verify_drops_pieces_whose_digest_does_not_match(tmp_path: Path) -> None:
    async with opened(tmp_path) as store:
        task = await store.create("t", 2 * MIB, sha256=None, attributes={}, reserve=True)
        for index in range(2):
            digest = xxhash.xxh3_64()
            await store.write(task, index * MIB, [bytes([index]) * MIB], digest)
            store.record_piece(task, index, digest.intdigest())
        await store.release(task)
    overwrite(tmp_path / "tasks" / (task.name + ".data"), MIB + 5, b"!")
    async with opened(tmp_path) as store:
        task2 = store.get("t")
        assert task2 is not None
        store.pin(task2)
        assert await store.verify(task2) == 1
        assert task2.done == bytearray([1, 0])
        assert task2.prefix is not None and task2.prefix[0] == MIB
        assert task2.prefix[1].digest() == hashlib.sha256(b"\x00" * MIB).digest()
        assert sample(store.metrics, "d7y_piece_digest_failures_total") == 1
        await store.release(task2)
    async with opened(tmp_path) as store:
        task3 = store.get("t")
        assert task3 is not None and task3.done == bytearray([1, 0])  # the drop was saved


async def test_store_bytes_count_what_sparse_files_really_use(tmp_path: Path) -> None:
    async with opened(tmp_path) as store:
        task = await store.create("big", 64 * MIB, sha256=None, attributes={}, reserve=False)
        assert store.allocated_bytes < MIB
        digest = xxhash.xxh3_64()
        await store.write(task, 0, [b"z" * MIB], digest)
        store.record_piece(task, 0, digest.intdigest())
        assert MIB <= store.allocated_bytes < 2 * MIB
        assert store.metrics.store_bytes._value.get() == store.allocated_bytes
        await store.release(task)


# -- GC ----------------------------------------------------------------------------------------


async def test_gc_evicts_least_recently_used_down_to_the_low_watermark(tmp_path: Path) -> None:
    clock = Clock()
    async with opened(tmp_path, clock, gc_quota=10 * MIB, gc_high_watermark=0.8,
                      gc_low_watermark=0.5) as store:
        for number in range(4):
            clock.now += 10
            await store_content(store, f"t{number}", bytes([number]) * (2 * MIB))
        store.touch(store.get("t0"))  # type: ignore[arg-type]
        assert await store.collect() == 0  # 8 MiB: not above 80% of 10 MiB
        clock.now += 10
        # A lazy task announces nothing; it grows as its pieces arrive.
        lazy = await store.create("lazy", 4 * MIB, sha256=None, attributes={}, reserve=False)
        digest = xxhash.xxh3_64()
        await store.write(lazy, 0, [b"l" * (MIB // 2)], digest)
        store.record_piece(lazy, 0, digest.intdigest())
        # 8.5 MiB > 8 MiB: evict the least recently used until at most 5 MiB is left.
        assert await store.collect() == 2
        assert sorted(t.task_id for t in store.tasks()) == ["lazy", "t0", "t3"]
        assert sample(store.metrics, "d7y_gc_evictions_total", reason="quota") == 2
        assert sample(store.metrics, "d7y_gc_evicted_bytes_total") >= 4 * MIB
        assert store.metrics.store_tasks._value.get() == 3
        await store.release(lazy)


async def test_gc_runs_when_a_new_task_needs_room(tmp_path: Path) -> None:
    clock = Clock()
    async with opened(tmp_path, clock, gc_quota=10 * MIB, gc_high_watermark=0.8,
                      gc_low_watermark=0.5) as store:
        for number in range(3):
            clock.now += 10
            await store_content(store, f"t{number}", b"x" * (2 * MIB))
        task = await store.create("new", 3 * MIB, sha256=None, attributes={}, reserve=True)
        # 6 + 3 > 8: room made for the new task down to 5 MiB.
        assert sorted(t.task_id for t in store.tasks()) == ["new", "t2"]
        assert sample(store.metrics, "d7y_gc_evictions_total", reason="quota") == 2
        # The running download's 3 MiB count before they are written: 3 + 8 > 10 even once
        # t2 is gone.
        with pytest.raises(StoreFull, match="quota"):
            await store.create("huge", 8 * MIB, sha256=None, attributes={}, reserve=True)
        with pytest.raises(StoreFull, match="larger than"):
            await store.create("too-big", 11 * MIB, sha256=None, attributes={}, reserve=True)
        await store.release(task)


async def test_gc_never_evicts_pinned_tasks(tmp_path: Path) -> None:
    clock = Clock()
    async with opened(tmp_path, clock, gc_quota=100 * MIB, gc_ttl=100.0) as store:
        old = await store_content(store, "old", b"o" * (2 * MIB))
        await store_content(store, "other", b"p" * (2 * MIB))
        store.pin(old)
        clock.now += 1000
        assert await store.collect() == 1
        assert [t.task_id for t in store.tasks()] == ["old"]
        await store.release(old)
        assert await store.collect() == 1
        assert store.tasks() == []


async def test_gc_evicts_by_ttl(tmp_path: Path) -> None:
    clock = Clock()
    async with opened(tmp_path, clock, gc_ttl=3600.0) as store:
        await store_content(store, "stale", b"s" * 100)
        clock.now += 3000
        await store_content(store, "fresh", b"f" * 100)
        assert await store.collect() == 0
        clock.now += 601
        assert await store.collect() == 1
        assert [t.task_id for t in store.tasks()] == ["fresh"]
        assert sample(store.metrics, "d7y_gc_evictions_total", reason="ttl") == 1
    # Access times survive a restart.
    async with opened(tmp_path, clock, gc_ttl=3600.0) as store:
        assert [t.task_id for t in store.tasks()] == ["fresh"]
        clock.now += 3000
        assert await store.collect() == 1


async def test_gc_loop_runs_periodically(tmp_path: Path) -> None:
    clock = Clock()
    async with opened(tmp_path, clock, gc_ttl=10.0, gc_interval=0.05) as store:
        await store_content(store, "t", b"t")
        clock.now += 11
        await wait_for(lambda: not store.tasks())


# -- disk full ---------------------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount_point)],
        capture_output=True, check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {result.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.mark.integration
async def test_disk_full_fails_only_that_task(small_tmpfs: Path) -> None:
    metrics = Metrics()
    # A quota far above the disk, so the disk itself runs out.
    store = PieceStore(StoreConfig(data_dir=small_tmpfs, gc_quota=1 << 30), metrics)
    manager = TaskManager(store, TaskConfig(), metrics)
    await store.open()
    await manager.start()
    try:
        small = payload(MIB, seed=3)
        await manager.put("small", small, sha256=hashlib.sha256(small).hexdigest(),
                          attributes={})
        big = payload(12 * MIB)
        with pytest.raises(StoreFull, match="disk full"):
            async with manager.open("big", MemorySource(big),
                                    sha256=hashlib.sha256(big).hexdigest()) as handle:
                await handle.read(0, len(big))
        assert sample(metrics, "d7y_task_failures_total", reason="store_full") == 1
        # The failed task's files are gone, and the node keeps serving the rest.
        await wait_for(
            lambda: store.get("big") is None and len(os.listdir(store.directory)) == 2
        )
        async with manager.open("small", None) as handle:
            assert await handle.read(0, len(small)) == small
        medium = payload(3 * MIB, seed=4)
        async with manager.open("medium", MemorySource(medium),
                                sha256=hashlib.sha256(medium).hexdigest()) as handle:
            assert await handle.read(0, len(medium)) == medium
        with pytest.raises(KeyError):
            async with manager.open("big", None):
                pass
    finally:
        await manager.close()
        await store.close()


@pytest.mark.integration
async def test_without_quota_the_watermarks_apply_to_the_disk(small_tmpfs: Path) -> None:
    clock = Clock()
    store = PieceStore(
        StoreConfig(data_dir=small_tmpfs, gc_quota=None, gc_high_watermark=0.8,
                    gc_low_watermark=0.55),
        Metrics(),
        clock=clock,
    )
    await store.open()
    try:
        for number in range(3):
            clock.now += 10
            await store_content(store, f"t{number}", bytes([number]) * (2 * MIB))
        used, capacity = store.usage()
        assert capacity == 8 * MIB and used >= 6 * MIB
        # A fourth 2 MiB task would pass 80% of the disk: the oldest go first, down to 55%.
        clock.now += 10
        await store_content(store, "t3", b"3" * (2 * MIB))
        assert sorted(t.task_id for t in store.tasks()) == ["t2", "t3"]
        with pytest.raises(StoreFull, match="larger than"):
            await store.create("huge", 9 * MIB, sha256=None, attributes={}, reserve=True)
    finally:
        await store.close()
