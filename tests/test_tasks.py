"""Tests of `d7y_node.tasks`: one download per task, streaming readers, verification, resume.

The piece source is `MemorySource`, a real `PieceSource` over bytes in memory that can also
misbehave (break off mid-piece, send wrong bytes, stall, answer an error status).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
import random
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from d7y_node.config import StoreConfig, TaskConfig
from d7y_node.errors import (
    DigestMismatch,
    StoreFull,
    TaskFailed,
    UpstreamStatus,
    UpstreamUnavailable,
)
from d7y_node.metrics import Metrics
from d7y_node.piece_store import (
    BLOCK_SIZE,
    MIB,
    PieceStore,
    StoredTask,
    decode_metadata,
    encode_metadata,
)
from d7y_node.tasks import PieceSource, TaskManager

# A hook the source awaits before yielding each chunk: (read offset, chunk offset, attempt).
Hook = Callable[[int, int, int], Awaitable[None]]


class MemorySource:
    """A `PieceSource` over bytes in memory, recording every request it gets."""

    def __init__(
        self,
        data: bytes,
        *,
        chunk_size: int = 256 * 1024,
        hook: Hook | None = None,
        length_status: int | None = None,
    ) -> None:
        self.data = data
        self.chunk_size = chunk_size
        self.hook = hook
        self.length_status = length_status
        self.length_calls = 0
        # (offset, length) of every read request, in the order they were made.
        self.reads: list[tuple[int, int]] = []
        # Bytes actually sent, per read offset.
        self.bytes_sent = 0

    async def content_length(self) -> int:
        self.length_calls += 1
        await asyncio.sleep(0)
        if self.length_status is not None:
            raise UpstreamStatus(self.length_status, {}, b"denied")
        return len(self.data)

    async def read(self, offset: int, length: int) -> AsyncIterator[bytes]:
        attempt = sum(1 for o, _ in self.reads if o <= offset < o + _)
        self.reads.append((offset, length))
        position = offset
        end = offset + length
        while position < end:
            if self.hook is not None:
                await self.hook(offset, position, attempt)
            chunk = self.data[position : min(end, position + self.chunk_size)]
            position += len(chunk)
            self.bytes_sent += len(chunk)
            yield chunk
            await asyncio.sleep(0)

    def pieces_read(self, piece_size: int) -> list[int]:
        """Piece indices of the read requests, in order."""
        return [offset // piece_size for offset, _ in self.reads]


def overwrite(path: Path, offset: int, data: bytes) -> None:
    """Corrupt a file in place, as a bad disk or a stray writer would."""
    with open(path, "r+b") as file:
        file.seek(offset)
        file.write(data)


def payload(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Node:
    """A store and a task manager on one directory, as node.py builds them."""

    def __init__(
        self,
        directory: Path,
        *,
        store_config: StoreConfig | None = None,
        task_config: TaskConfig | None = None,
    ) -> None:
        self.metrics = Metrics()
        self.store = PieceStore(
            store_config or StoreConfig(data_dir=directory, gc_quota=1 << 40), self.metrics
        )
        self.manager = TaskManager(self.store, task_config or TaskConfig(), self.metrics)

    async def __aenter__(self) -> Node:
        await self.store.open()
        await self.manager.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.manager.close()
        await self.store.close()

    def metric(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


async def fetch(manager: TaskManager, task_id: str, source: PieceSource | None, data: bytes,
                **kwargs: object) -> bytes:
    async with manager.open(task_id, source, sha256=sha(data), **kwargs) as handle:  # type: ignore[arg-type]
        return await handle.read(0, handle.info.content_length)


async def wait_for(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    """Wait until `condition()` holds (for state that changes in background tasks)."""
    async with asyncio.timeout(seconds):
        while not condition():  # noqa: ASYNC110 (test helper: the state has no event of its own)
            await asyncio.sleep(0.005)


# ---------------------------------------------------------------------------------------------


async def test_whole_download_reads_back_exact_bytes(tmp_path: Path) -> None:
    data = payload(5 * MIB + 123)
    source = MemorySource(data)
    async with Node(tmp_path) as node:
        assert await fetch(node.manager, "sha256:" + sha(data), source, data) == data
        await wait_for(lambda: (node.manager.info("sha256:" + sha(data)) or _none).complete)
        info = node.manager.info("sha256:" + sha(data))
        assert info is not None
        assert (info.piece_size, info.piece_count, info.pieces_done) == (MIB, 6, 6)
        # Every byte came from the source exactly once.
        assert source.bytes_sent == len(data)
        assert node.metric("d7y_store_tasks") == 1
        assert node.metric("d7y_store_bytes") >= len(data)
        await wait_for(lambda: node.metric("d7y_active_tasks") == 0)


class _NoInfo:
    complete = False


_none = _NoInfo()


async def test_hundred_concurrent_opens_share_one_download(tmp_path: Path) -> None:
    data = payload(3 * MIB + 7)

    async def slow(offset: int, position: int, attempt: int) -> None:
        await asyncio.sleep(0.001)

    source = MemorySource(data, chunk_size=64 * 1024, hook=slow)

    async def reader(manager: TaskManager) -> None:
        """Receive the whole content as segments, checking each one's edges (reading every
        byte 100 times would only test the page cache)."""
        async with manager.open("blob", source, sha256=sha(data)) as handle:
            position = 0
            async for segment in handle.segments(0, len(data)):
                assert segment.offset == position
                end = segment.offset + segment.count
                assert os.pread(segment.fd, 100, segment.offset) == data[position : position + 100]
                assert os.pread(segment.fd, 100, end - 100) == data[end - 100 : end]
                position = end
            assert position == len(data)

    async with Node(tmp_path) as node:
        whole, *_ = await asyncio.gather(
            fetch(node.manager, "blob", source, data), *(reader(node.manager) for _ in range(99))
        )
        assert whole == data
        assert source.length_calls == 1
        assert sorted(source.reads) == [(i * MIB, min(MIB, len(data) - i * MIB)) for i in range(4)]
        assert source.bytes_sent == len(data)


async def test_reader_gets_first_piece_before_last_arrives(tmp_path: Path) -> None:
    data = payload(4 * MIB)
    release_last = asyncio.Event()

    async def gate(offset: int, position: int, attempt: int) -> None:
        if offset >= 3 * MIB:
            await release_last.wait()

    source = MemorySource(data, hook=gate)
    async with Node(tmp_path) as node, node.manager.open(
        "blob", source, sha256=sha(data)
    ) as handle:
        segments = handle.segments(0, len(data))
        first = await anext(segments)
        assert first.offset == 0 and first.count >= MIB
        assert os.pread(first.fd, 100, 0) == data[:100]
        assert handle.info.pieces_done < 4 and not handle.info.complete
        release_last.set()
        rest = [first] + [segment async for segment in segments]
        assert b"".join(os.pread(s.fd, s.count, s.offset) for s in rest) == data
        assert [s.offset for s in rest] == sorted(s.offset for s in rest)
        assert sum(s.count for s in rest) == len(data)


async def test_download_keeps_going_after_the_last_reader_leaves(tmp_path: Path) -> None:
    data = payload(6 * MIB)
    source = MemorySource(data, chunk_size=64 * 1024)
    async with Node(tmp_path) as node:
        async with node.manager.open("blob", source, sha256=sha(data)) as handle:
            assert await handle.read(0, 10) == data[:10]
        await wait_for(lambda: (node.manager.info("blob") or _none).complete)
        async with node.manager.open("blob", None) as handle:
            assert await handle.read(0, len(data)) == data


async def test_cancelled_opener_still_fills_the_cache(tmp_path: Path) -> None:
    data = payload(2 * MIB)
    source = MemorySource(data)
    async with Node(tmp_path) as node:
        opener = asyncio.create_task(fetch(node.manager, "blob", source, data))
        await asyncio.sleep(0)
        opener.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opener
        await wait_for(lambda: (node.manager.info("blob") or _none).complete)


async def test_waiting_reader_piece_goes_first(tmp_path: Path) -> None:
    data = payload(8 * MIB)
    source = MemorySource(data, chunk_size=128 * 1024)
    config = TaskConfig(origin_concurrency=1)
    async with Node(tmp_path, task_config=config) as node, node.manager.open(
        "blob", source, sha256=sha(data)
    ) as handle:
        assert await handle.read(7 * MIB + 5, 10) == data[7 * MIB + 5 : 7 * MIB + 15]
        # Piece 0 was already on its way; the reader's piece 7 came right after it.
        assert source.pieces_read(MIB)[:2] == [0, 7]
        assert await handle.read(0, len(data)) == data


async def test_lazy_task_fetches_only_the_blocks_read(tmp_path: Path) -> None:
    data = payload(8 * MIB)
    source = MemorySource(data)
    async with Node(tmp_path) as node:
        async with node.manager.open("blob", source, sha256=sha(data), whole=False) as handle:
            assert await handle.read(3 * MIB + 10, 100) == data[3 * MIB + 10 : 3 * MIB + 110]
            # Two bytes across a piece boundary: the last block of one, the first of the next.
            assert await handle.read(5 * MIB - 1, 2) == data[5 * MIB - 1 : 5 * MIB + 1]
        assert source.reads == [
            (3 * MIB, BLOCK_SIZE), (5 * MIB - BLOCK_SIZE, BLOCK_SIZE), (5 * MIB, BLOCK_SIZE),
        ]
        info = node.manager.info("blob")
        assert info is not None and info.pieces_done == 0 and not info.complete
        # Peers are offered whole pieces only.
        assert node.manager.bitmap("blob") == bytes(8)
        # Reading the same bytes again needs nothing from the source.
        async with node.manager.open("blob", source, whole=False) as handle:
            assert await handle.read(3 * MIB + 100, 10) == data[3 * MIB + 100 : 3 * MIB + 110]
            assert len(source.reads) == 3
            # The rest of piece 3 in one read; then the piece is held whole.
            assert await handle.read(3 * MIB, MIB) == data[3 * MIB : 4 * MIB]
        assert source.reads[3:] == [(3 * MIB + BLOCK_SIZE, MIB - BLOCK_SIZE)]
        assert node.manager.bitmap("blob") == b"\0\0\0\x01\0\0\0\0"
        # A whole download of the same task fetches only the rest (blocks held are not fetched
        # again), then verifies it all.
        assert await fetch(node.manager, "blob", source, data) == data
        await wait_for(lambda: (node.manager.info("blob") or _none).complete)
        assert source.bytes_sent == len(data)


class PeerLikeSource(MemorySource):
    """A source that says when its reads move whole pieces (as peers do)."""

    whole_pieces = True

    def reads_whole_pieces(self, index: int) -> bool:
        return self.whole_pieces


async def test_a_lazy_download_takes_whole_pieces_from_a_source_that_moves_them(
    tmp_path: Path,
) -> None:
    data = payload(3 * MIB)
    source = PeerLikeSource(data)
    async with Node(tmp_path) as node, node.manager.open(
        "blob", source, sha256=sha(data), whole=False
    ) as handle:
        assert await handle.read(MIB + 10, 10) == data[MIB + 10 : MIB + 20]
        assert source.reads == [(MIB, MIB)]
        assert node.manager.bitmap("blob") == b"\0\x01\0"
        # The same source going to the origin again: blocks.
        source.whole_pieces = False
        assert await handle.read(2 * MIB + 10, 10) == data[2 * MIB + 10 : 2 * MIB + 20]
        assert source.reads[1:] == [(2 * MIB, BLOCK_SIZE)]
        # A piece held in part is then taken whole from peers (held blocks written again).
        source.whole_pieces = True
        assert await handle.read(2 * MIB, MIB) == data[2 * MIB :]
        assert source.reads[2:] == [(2 * MIB, MIB)]
        assert node.manager.bitmap("blob") == b"\0\x01\x01"


async def test_a_whole_download_fetches_the_blocks_a_peer_waits_for_first(tmp_path: Path) -> None:
    """`read_held` of part of a piece the download has not reached (a lazy peer asking the home):
    while the one worker is busy, an extra one fetches that part's blocks, then the rest of the
    piece; the download goes on in order and the content still ends verified."""
    data = payload(8 * MIB)

    async def slow_first_piece(offset: int, position: int, attempt: int) -> None:
        if offset == 0:
            await asyncio.sleep(0.01)

    source = MemorySource(data, chunk_size=64 * 1024, hook=slow_first_piece)
    async with Node(tmp_path, task_config=TaskConfig(origin_concurrency=1)) as node:
        async with node.manager.open("blob", source, sha256=sha(data)) as handle:
            await wait_for(lambda: bool(source.reads))
            wanted = (5 * MIB + 100, 3000)
            held = await node.manager.read_held("blob", *wanted, wait=10.0)
            assert held == data[wanted[0] : sum(wanted)]
            # The one worker was still in piece 0: the reader got a worker of its own.
            assert node.manager.bitmap("blob") == bytes(8)
            await handle.read(0, len(data))
        assert source.reads[:3] == [(0, MIB), (5 * MIB, BLOCK_SIZE),
                                    (5 * MIB + BLOCK_SIZE, MIB - BLOCK_SIZE)]
        assert source.pieces_read(MIB)[3:] == [1, 2, 3, 4, 6, 7]
        assert source.bytes_sent == len(data)
        info = node.manager.info("blob")
        assert info is not None and info.complete


async def test_read_held_answers_only_from_this_host(tmp_path: Path) -> None:
    """What `read_held` gives without a download to wait on: held bytes at once (blocks of a
    partial piece too), None for anything else; it never starts a download."""
    data = payload(3 * MIB)
    source = MemorySource(data)
    async with Node(tmp_path) as node:
        assert await node.manager.read_held("blob", 0, 10, wait=1.0) is None  # not stored
        async with node.manager.open("blob", source, sha256=sha(data), whole=False) as handle:
            assert await handle.read(MIB + 5, 10) == data[MIB + 5 : MIB + 15]
        reads = list(source.reads)
        # Held blocks of a partial piece, at once; bytes beside them are not held.
        assert await node.manager.read_held("blob", MIB, 100, wait=5.0) == data[MIB : MIB + 100]
        assert await node.manager.read_held("blob", 0, 100, wait=5.0) is None
        assert await node.manager.read_held("blob", MIB, BLOCK_SIZE + 1, wait=5.0) is None
        # Outside the content, or empty.
        assert await node.manager.read_held("blob", 3 * MIB - 1, 2, wait=1.0) is None
        assert await node.manager.read_held("blob", -1, 2, wait=1.0) is None
        assert await node.manager.read_held("blob", 0, 0, wait=1.0) is None
        assert source.reads == reads  # no download was started
        assert await fetch(node.manager, "blob", source, data) == data
        await wait_for(lambda: (node.manager.info("blob") or _none).complete)
        assert await node.manager.read_held("blob", 0, len(data), wait=0.0) == data


async def test_read_held_gives_up_after_its_wait(tmp_path: Path) -> None:
    data = payload(2 * MIB)
    release = asyncio.Event()

    async def stalled(offset: int, position: int, attempt: int) -> None:
        await release.wait()

    source = MemorySource(data, hook=stalled)
    async with Node(tmp_path) as node, node.manager.open("blob", source, sha256=sha(data)):
        assert await node.manager.read_held("blob", MIB, 10, wait=0.2) is None
        release.set()
        assert await node.manager.read_held("blob", MIB, 10, wait=10.0) == data[MIB : MIB + 10]


async def test_a_piece_with_all_its_blocks_is_recorded_even_when_its_readers_leave(
    tmp_path: Path,
) -> None:
    data = payload(2 * MIB)

    async def first_piece_late(offset: int, position: int, attempt: int) -> None:
        if offset < MIB and position == offset:
            await asyncio.sleep(0.1)

    async with Node(tmp_path, task_config=TaskConfig(origin_concurrency=2)) as node:
        assemble = node.store.assemble_piece

        async def slow_assembly(task: StoredTask, index: int) -> bool:
            if index == 1:
                await asyncio.sleep(1.0)
            return await assemble(task, index)

        node.store.assemble_piece = slow_assembly  # type: ignore[method-assign]
        source = MemorySource(data, hook=first_piece_late)
        async with node.manager.open("blob", source, sha256=sha(data), whole=False) as handle:
            # Piece 1's blocks are in (its assembly still running) when piece 0's arrive.
            assert await handle.read(0, 2 * MIB) == data
            assert node.manager.bitmap("blob") == b"\x01\x00"
        # The reader left, the download stopped, and still piece 1 was recorded (and saved).
        await wait_for(lambda: node.metric("d7y_active_tasks") == 0)
        assert node.manager.bitmap("blob") == b"\x01\x01"
    (meta,) = (tmp_path / "tasks").glob("*.meta")
    assert decode_metadata(meta.read_bytes(), meta.name[:-5]).done == bytearray([1, 1])


async def test_concurrent_lazy_readers_of_one_piece_get_their_blocks(tmp_path: Path) -> None:
    data = payload(2 * MIB)
    ranges = [(offset, 3000) for offset in range(0, 2 * MIB - 3000, 97 * 1024)]
    source = MemorySource(data, chunk_size=4096)
    async with Node(tmp_path) as node, node.manager.open(
        "blob", source, sha256=sha(data), whole=False
    ) as handle:
        results = await asyncio.gather(*(handle.read(o, n) for o, n in ranges))
        assert results == [data[o : o + n] for o, n in ranges]
        # Every block was fetched once, and only blocks some reader wanted.
        fetched = sorted(source.reads)
        assert all(a + n <= b for (a, n), (b, _) in itertools.pairwise(fetched))
        wanted = {o // BLOCK_SIZE for o, _ in ranges} | {
            (o + n - 1) // BLOCK_SIZE for o, n in ranges
        }
        assert source.bytes_sent == len(wanted) * BLOCK_SIZE


async def test_lazy_blocks_survive_a_restart_and_a_bad_one_is_fetched_again(
    tmp_path: Path,
) -> None:
    data = payload(3 * MIB)
    async with Node(tmp_path) as node, node.manager.open(
        "blob", MemorySource(data), sha256=sha(data), whole=False
    ) as handle:
        read = await handle.read(MIB + 5, 3 * BLOCK_SIZE)
        assert read == data[MIB + 5 : MIB + 5 + 3 * BLOCK_SIZE]
    (data_file,) = (tmp_path / "tasks").glob("*.data")
    overwrite(data_file, MIB + BLOCK_SIZE + 7, b"garbage")
    source = MemorySource(data)
    async with Node(tmp_path) as node, node.manager.open(
        "blob", source, sha256=sha(data), whole=False
    ) as handle:
        assert await handle.read(MIB, 4 * BLOCK_SIZE) == data[MIB : MIB + 4 * BLOCK_SIZE]
        # Only the corrupted block came again; the three others were verified on disk.
        assert source.reads == [(MIB + BLOCK_SIZE, BLOCK_SIZE)]
        assert node.metric("d7y_piece_digest_failures_total") == 1


async def test_a_lazy_reader_never_sees_a_block_that_failed(tmp_path: Path) -> None:
    data = payload(2 * MIB)
    source = MemorySource(data, length_status=None)

    async def broken(offset: int, position: int, attempt: int) -> None:
        raise UpstreamUnavailable("origin is down")

    source.hook = broken
    async with Node(tmp_path, task_config=TaskConfig(piece_retries=0)) as node:
        async with node.manager.open("blob", source, sha256=sha(data), whole=False) as handle:
            with pytest.raises(TaskFailed):
                await handle.read(10, 10)
        stored = node.store.get("blob")
        assert stored is not None and not stored.partial and not stored.holds(10, 20)


async def test_lazy_download_widens_when_a_whole_reader_comes(tmp_path: Path) -> None:
    data = payload(6 * MIB)
    source = MemorySource(data)
    async with Node(tmp_path) as node:
        async with node.manager.open("blob", source, sha256=sha(data), whole=False) as lazy:
            assert await lazy.read(2 * MIB, 10) == data[2 * MIB : 2 * MIB + 10]
            assert node.metric("d7y_active_tasks") == 1
            assert await fetch(node.manager, "blob", source, data) == data
            assert lazy.info.complete
        # The lazy read's block first, then the rest: no byte twice.
        assert source.reads[0] == (2 * MIB, BLOCK_SIZE)
        assert source.bytes_sent == len(data)
        await wait_for(lambda: node.metric("d7y_active_tasks") == 0)


async def test_lazy_download_stops_with_its_last_reader(tmp_path: Path) -> None:
    data = payload(4 * MIB)
    source = MemorySource(data)
    async with Node(tmp_path) as node:
        async with node.manager.open("blob", source, sha256=sha(data), whole=False) as lazy:
            assert await lazy.read(0, 10) == data[:10]
        await wait_for(lambda: node.metric("d7y_active_tasks") == 0)
        await asyncio.sleep(0.05)
        assert source.reads == [(0, BLOCK_SIZE)]
        stored = node.store.get("blob")
        assert stored is not None and stored.pieces_done == 0 and stored.holds(0, BLOCK_SIZE)


async def test_segments_merge_held_pieces(tmp_path: Path) -> None:
    data = payload(4 * MIB + 1)
    async with Node(tmp_path) as node:
        assert await fetch(node.manager, "blob", MemorySource(data), data) == data
        await wait_for(lambda: (node.manager.info("blob") or _none).complete)
        async with node.manager.open("blob", None) as handle:
            segments = [s async for s in handle.segments(100, len(data) - 200)]
            assert [(s.offset, s.count) for s in segments] == [(100, len(data) - 200)]
            assert [s async for s in handle.segments(5, 0)] == []
            with pytest.raises(ValueError):
                await handle.read(len(data), 1)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.integers(min_value=1, max_value=3 * MIB + 5),
    fractions=st.lists(
        st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=1, max_size=6
    ),
    lazy=st.booleans(),
)
def test_segments_of_random_ranges_reassemble(
    size: int, fractions: list[tuple[float, float]], lazy: bool
) -> None:
    data = payload(size, seed=size)
    ranges = []
    for a, b in fractions:
        start = min(int(a * size), size - 1)
        length = int(b * (size - start))
        ranges.append((start, length))

    async def scenario(directory: Path) -> None:
        source = MemorySource(data, chunk_size=100_000)
        async with Node(directory) as node, node.manager.open(
            "blob", source, sha256=sha(data), whole=not lazy
        ) as handle:
            for start, length in ranges:
                segments = [s async for s in handle.segments(start, length)]
                assert sum(s.count for s in segments) == length
                position = start
                for segment in segments:
                    assert segment.offset == position and segment.count > 0
                    position += segment.count
                joined = b"".join(os.pread(s.fd, s.count, s.offset) for s in segments)
                assert joined == data[start : start + length]

    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(scenario(Path(directory)))


# -- failures ----------------------------------------------------------------------------------


async def test_digest_mismatch_discards_the_task(tmp_path: Path) -> None:
    data = payload(3 * MIB)
    async with Node(tmp_path) as node:
        async with node.manager.open("blob", MemorySource(data), sha256="0" * 64) as handle:
            with pytest.raises(DigestMismatch, match="expected sha256:0000"):
                async for _ in handle.segments(0, len(data)):
                    pass
        await wait_for(lambda: node.manager.info("blob") is None)
        assert node.metric("d7y_digest_mismatches_total") == 1
        assert node.metric("d7y_task_failures_total", reason="digest_mismatch") == 1
        await wait_for(lambda: not list(node.store.directory.iterdir()))
        # A later open starts a new download, which can succeed.
        assert await fetch(node.manager, "blob", MemorySource(data), data) == data


async def test_wrong_bytes_from_source_fail_every_reader(tmp_path: Path) -> None:
    data = payload(3 * MIB)
    corrupt = bytearray(data)
    corrupt[2 * MIB + 17] ^= 0xFF
    source = MemorySource(bytes(corrupt))
    async with Node(tmp_path) as node:

        results = await asyncio.gather(
            *(fetch(node.manager, "blob", source, data) for _ in range(5)),
            return_exceptions=True,
        )
        assert all(isinstance(r, DigestMismatch) for r in results), results
        # A range that does not reach the end streams before the digest is known.
        await wait_for(lambda: node.manager.info("blob") is None)
        assert node.store.get("blob") is None


async def test_broken_reads_are_retried_from_where_they_broke(tmp_path: Path) -> None:
    data = payload(2 * MIB)

    async def flaky(offset: int, position: int, attempt: int) -> None:
        # The first read of piece 1 breaks after 512 KiB, its retry after 256 KiB more.
        if offset == MIB and position == MIB + 512 * 1024:
            raise UpstreamUnavailable("connection reset")
        if offset == MIB + 512 * 1024 and position == MIB + 768 * 1024:
            raise UpstreamUnavailable("connection reset")

    source = MemorySource(data, hook=flaky)
    async with Node(tmp_path, task_config=TaskConfig(piece_retries=1)) as node:
        assert await fetch(node.manager, "blob", source, data) == data
        assert sorted(source.reads) == [
            (0, MIB), (MIB, MIB), (MIB + 512 * 1024, 512 * 1024), (MIB + 768 * 1024, 256 * 1024)
        ]
        assert source.bytes_sent == len(data)


async def test_piece_fails_after_its_retries(tmp_path: Path) -> None:
    data = payload(2 * MIB)

    async def dead(offset: int, position: int, attempt: int) -> None:
        if offset >= MIB:
            raise UpstreamUnavailable("connection refused")

    source = MemorySource(data, hook=dead)
    async with Node(tmp_path, task_config=TaskConfig(piece_retries=2)) as node:
        with pytest.raises(TaskFailed, match="after 2 retries"):
            await fetch(node.manager, "blob", source, data)
        assert [o for o, _ in source.reads].count(MIB) == 3
        assert node.metric("d7y_task_failures_total", reason="upstream_unavailable") == 1
        # The good piece is kept; a later open with a working source fetches only the rest.
        await wait_for(lambda: node.manager.info("blob") is not None
                       and node.store.get("blob") is not None
                       and node.store.get("blob").pins == 0)  # type: ignore[union-attr]
        good = MemorySource(data)
        assert await fetch(node.manager, "blob", good, data) == data
        assert good.reads == [(MIB, MIB)]


async def test_upstream_status_fails_the_task(tmp_path: Path) -> None:
    data = payload(2 * MIB)

    async def forbidden(offset: int, position: int, attempt: int) -> None:
        if offset == MIB:
            raise UpstreamStatus(403, {}, b"")

    async with Node(tmp_path) as node:
        with pytest.raises(TaskFailed, match="answered 403"):
            await fetch(node.manager, "blob", MemorySource(data, hook=forbidden), data)
        assert node.metric("d7y_task_failures_total", reason="upstream_status") == 1
        # The status from a length request reaches the opener as it is.
        with pytest.raises(UpstreamStatus) as caught:
            await fetch(node.manager, "other", MemorySource(data, length_status=401), data)
        assert caught.value.status == 401
        assert node.manager.info("other") is None


async def test_stalled_source_times_out(tmp_path: Path) -> None:
    data = payload(MIB)

    async def stall(offset: int, position: int, attempt: int) -> None:
        if attempt == 0 and position > 0:
            await asyncio.sleep(60)

    config = TaskConfig(read_timeout=0.2, piece_retries=1)
    async with Node(tmp_path, task_config=config) as node:
        assert await fetch(node.manager, "blob", MemorySource(data, hook=stall), data) == data


async def test_open_without_source_needs_a_complete_task(tmp_path: Path) -> None:
    async with Node(tmp_path) as node:
        with pytest.raises(KeyError):
            async with node.manager.open("missing", None):
                pass
        assert node.manager.info("missing") is None


async def test_empty_content(tmp_path: Path) -> None:
    async with Node(tmp_path) as node:
        assert await fetch(node.manager, "empty", MemorySource(b""), b"") == b""
        await wait_for(lambda: (node.manager.info("empty") or _none).complete)


async def test_put_stores_small_content(tmp_path: Path) -> None:
    manifest = b'{"schemaVersion": 2}'
    attributes = {"content_type": "application/vnd.oci.image.manifest.v1+json"}
    async with Node(tmp_path) as node:
        with pytest.raises(DigestMismatch):
            await node.manager.put("m", manifest, sha256="1" * 64, attributes=attributes)
        await node.manager.put("m", manifest, sha256=sha(manifest), attributes=attributes)
        await node.manager.put("m", manifest, sha256=sha(manifest), attributes=attributes)
    async with Node(tmp_path) as node, node.manager.open("m", None) as handle:
        assert handle.info.attributes == attributes and handle.info.complete
        assert await handle.read(0, len(manifest)) == manifest


async def test_open_handles_pin_tasks_against_gc(tmp_path: Path) -> None:
    data = payload(2 * MIB)
    now = [1000.0]
    metrics = Metrics()
    store = PieceStore(
        StoreConfig(data_dir=tmp_path, gc_quota=1 << 30, gc_ttl=60.0), metrics,
        clock=lambda: now[0],
    )
    manager = TaskManager(store, TaskConfig(), metrics)
    await store.open()
    try:
        await manager.put("kept", data, sha256=sha(data), attributes={})
        await manager.put("other", data, sha256=sha(data), attributes={})
        async with manager.open("kept", None) as handle:
            now[0] += 120
            assert await store.collect() == 1
            assert await handle.read(0, 100) == data[:100]
            assert manager.info("other") is None
        now[0] += 120
        assert await store.collect() == 1
        assert manager.info("kept") is None
    finally:
        await manager.close()
        await store.close()


async def test_quota_too_small_fails_the_open_with_store_full(tmp_path: Path) -> None:
    data = payload(3 * MIB)
    config = StoreConfig(data_dir=tmp_path, gc_quota=2 * MIB)
    async with Node(tmp_path, store_config=config) as node:
        with pytest.raises(StoreFull, match="larger than"):
            await fetch(node.manager, "blob", MemorySource(data), data)
        assert node.metric("d7y_task_failures_total", reason="store_full") == 1
        small = payload(MIB // 2)
        assert await fetch(node.manager, "small", MemorySource(small), small) == small


# -- restart and crashes -----------------------------------------------------------------------


async def test_restart_serves_complete_task_without_source(tmp_path: Path) -> None:
    data = payload(3 * MIB + 3)
    async with Node(tmp_path) as node:
        assert await fetch(node.manager, "blob", MemorySource(data), data, attributes={"a": "b"})
    async with Node(tmp_path) as node:
        info = node.manager.info("blob")
        assert info is not None and info.complete and info.attributes == {"a": "b"}
        assert await fetch(node.manager, "blob", None, data) == data


def saved_complete_flags(directory: Path) -> list[bool]:
    """What the metadata files on disk say, not what memory says."""
    metas = sorted((directory / "tasks").glob("*.meta"))
    return [decode_metadata(meta.read_bytes(), meta.name[:-5]).complete for meta in metas]


async def test_whole_download_saves_complete_durably(tmp_path: Path) -> None:
    data = payload(3 * MIB + 1)
    async with Node(tmp_path) as node:
        assert await fetch(node.manager, "blob", MemorySource(data), data)
        await wait_for(lambda: saved_complete_flags(tmp_path) == [True])


async def test_task_with_every_piece_completes_from_disk_and_saves_it(tmp_path: Path) -> None:
    data = payload(3 * MIB)
    async with Node(tmp_path) as node, node.manager.open(
        "blob", MemorySource(data), sha256=sha(data), whole=False
    ) as handle:
        assert await handle.read(0, len(data)) == data
    # A lazy download may finish its digest check before it stops; what this test needs is a
    # task saved with every piece but not complete (a crash before the final save), so make it so.
    (meta,) = (tmp_path / "tasks").glob("*.meta")
    stored = decode_metadata(meta.read_bytes(), meta.name[:-5])
    stored.complete = False
    meta.write_bytes(encode_metadata(stored))
    assert saved_complete_flags(tmp_path) == [False]
    async with Node(tmp_path) as node:
        assert await fetch(node.manager, "blob", None, data) == data
        assert saved_complete_flags(tmp_path) == [True]


async def test_partial_task_resumes_with_only_missing_pieces(tmp_path: Path) -> None:
    data = payload(6 * MIB)
    async with Node(tmp_path) as node, node.manager.open(
        "blob", MemorySource(data), sha256=sha(data), whole=False
    ) as handle:
        await handle.read(0, MIB)
        await handle.read(4 * MIB, 10)
    source = MemorySource(data)
    async with Node(tmp_path) as node:
        info = node.manager.info("blob")
        assert info is not None and info.pieces_done == 1
        assert await fetch(node.manager, "blob", source, data) == data
        await wait_for(lambda: (node.manager.info("blob") or _none).complete)
        # Piece 0 was held, and the block of piece 4 read before the restart is not fetched
        # again.
        assert sorted(source.pieces_read(MIB)) == [1, 2, 3, 4, 5]
        assert (4 * MIB + BLOCK_SIZE, MIB - BLOCK_SIZE) in source.reads
        assert source.bytes_sent == len(data) - MIB - BLOCK_SIZE


async def test_corrupted_piece_on_disk_is_dropped_and_fetched_again(tmp_path: Path) -> None:
    data = payload(4 * MIB)
    async with Node(tmp_path) as node, node.manager.open(
        "blob", MemorySource(data), sha256=sha(data), whole=False
    ) as handle:
        await handle.read(0, 3 * MIB)
    (data_file,) = (tmp_path / "tasks").glob("*.data")
    overwrite(data_file, MIB + 1000, b"garbage")
    source = MemorySource(data)
    async with Node(tmp_path) as node:
        assert await fetch(node.manager, "blob", source, data) == data
        await wait_for(lambda: (node.manager.info("blob") or _none).complete)
        assert sorted(source.pieces_read(MIB)) == [1, 3]
        assert node.metric("d7y_piece_digest_failures_total") == 1


def crash_copy(source: Path, target: Path) -> None:
    """Copy a live tasks directory the way a crash would leave it: metadata first, then data
    (a crash keeps data at least as new as the metadata, which is written after an fsync)."""
    target.mkdir(parents=True)
    names = sorted(os.listdir(source), key=lambda name: not name.endswith(".meta"))
    for name in names:
        with contextlib.suppress(FileNotFoundError):  # a temp file renamed meanwhile
            shutil.copyfile(source / name, target / name)


async def test_crash_mid_download_never_serves_a_wrong_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Copy the directory at moments of a download (what a crash leaves, minus the page cache),
    add the garbage a crash can leave, and resume each copy."""
    monkeypatch.setattr("d7y_node.tasks.FLUSH_INTERVAL", 0.0)
    data = payload(12 * MIB)
    snapshots: list[Path] = []
    live = tmp_path / "live"

    def claimed_on_disk() -> int:
        counts = [decode_metadata(meta.read_bytes(), meta.name[:-5]).done.count(1)
                  for meta in (live / "tasks").glob("*.meta")]
        return max(counts, default=0)

    async def snapshot_now(offset: int, position: int, attempt: int) -> None:
        if position % (3 * MIB // 2) == 0 and position:
            # Metadata saves run in a thread; on a busy machine they lag the download. Hold the
            # source (a paused origin) until the pieces before `position` are claimed on disk,
            # so each copy is a distinct partial state rather than whatever the scheduler allows.
            await wait_for(lambda: claimed_on_disk() >= position // MIB, 10.0)
            snapshot = tmp_path / f"crash{len(snapshots)}"
            crash_copy(live / "tasks", snapshot / "tasks")
            snapshots.append(snapshot)
        await asyncio.sleep(0.001)

    source = MemorySource(data, chunk_size=128 * 1024, hook=snapshot_now)
    async with Node(live) as node, node.manager.open("blob", source, sha256=sha(data)) as handle:
        await handle.read(0, len(data))
    assert len(snapshots) >= 5
    claimed = set()
    for number, snapshot in enumerate(snapshots):
        tasks_dir = snapshot / "tasks"
        for meta in tasks_dir.glob("*.meta"):
            claimed.add(decode_metadata(meta.read_bytes(), meta.name[:-5]).done.count(1))
        (tasks_dir / "0123.meta.abcd.tmp").write_bytes(b"\x93torn")
        (tasks_dir / ("f" * 64 + ".data")).write_bytes(b"orphan")
        (tasks_dir / ("e" * 64 + ".meta")).write_bytes(os.urandom(50))
        again = MemorySource(data)
        async with Node(snapshot) as node:
            assert await fetch(node.manager, "blob", again, data) == data, number
            info = node.manager.info("blob")
            assert info is not None and info.complete
        names = sorted(p.name for p in tasks_dir.iterdir())
        assert len(names) == 2 and all(n.endswith((".data", ".meta")) for n in names), names
        assert again.bytes_sent <= len(data)
    # The snapshots caught several partial states.
    assert len(claimed - {0, 12}) >= 2, claimed


CRASHING_CHILD = """
import asyncio, hashlib, random, sys
from pathlib import Path
from d7y_node import tasks
from d7y_node.config import StoreConfig, TaskConfig
from d7y_node.metrics import Metrics
from d7y_node.piece_store import PieceStore

tasks.FLUSH_INTERVAL = 0.01

class Source:
    def __init__(self, data):
        self.data = data
    async def content_length(self):
        return len(self.data)
    async def read(self, offset, length):
        for position in range(offset, offset + length, 64 * 1024):
            await asyncio.sleep(0.003)
            yield self.data[position : min(offset + length, position + 64 * 1024)]

async def main():
    data = random.Random(1).randbytes(int(sys.argv[2]))
    metrics = Metrics()
    store = PieceStore(StoreConfig(data_dir=Path(sys.argv[1]), gc_quota=1 << 40), metrics)
    manager = tasks.TaskManager(store, TaskConfig(), metrics)
    await store.open()
    async with manager.open("blob", Source(data), sha256=hashlib.sha256(data).hexdigest()) as h:
        print("started", flush=True)
        await h.read(0, len(data))
    print("finished", flush=True)

asyncio.run(main())
"""


async def test_kill_9_at_random_moments_then_resume(tmp_path: Path) -> None:
    size = 10 * MIB
    data = payload(size)
    rng = random.Random(7)
    for _ in range(3):
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CRASHING_CHILD, str(tmp_path), str(size),
            cwd=Path(__file__).parent.parent, stdout=asyncio.subprocess.PIPE,
        )
        assert child.stdout is not None
        assert await child.stdout.readline() == b"started\n"
        await asyncio.sleep(rng.uniform(0.0, 0.25))
        with contextlib.suppress(ProcessLookupError):
            child.kill()
        await child.wait()
    source = MemorySource(data)
    async with Node(tmp_path) as node:
        assert await fetch(node.manager, "blob", source, data) == data
        info = node.manager.info("blob")
        assert info is not None and info.complete
    assert source.bytes_sent < size  # the killed runs' pieces were kept


# -- shutdown ----------------------------------------------------------------------------------


async def test_close_while_downloading(tmp_path: Path) -> None:
    data = payload(8 * MIB)

    async def slow(offset: int, position: int, attempt: int) -> None:
        await asyncio.sleep(0.005)

    node = Node(tmp_path)
    await node.store.open()
    source = MemorySource(data, chunk_size=128 * 1024, hook=slow)
    reader_got: list[BaseException] = []

    async def reader() -> None:
        try:
            await fetch(node.manager, "blob", source, data)
        except TaskFailed as err:
            reader_got.append(err)

    task = asyncio.create_task(reader())
    await wait_for(lambda: (node.manager.info("blob") or _none).__dict__ is not None
                   and node.store.get("blob") is not None
                   and node.store.get("blob").done.count(1) >= 2)  # type: ignore[union-attr]
    await node.manager.close()
    await node.store.close()
    await task
    assert reader_got and "shutting down" in str(reader_got[0])
    assert node.metric("d7y_active_tasks") == 0
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
    with pytest.raises(TaskFailed):
        async with node.manager.open("blob", source):
            pass
    # The pieces written before the close were saved and are not fetched again.
    again = MemorySource(data)
    async with Node(tmp_path) as node2:
        info = node2.manager.info("blob")
        assert info is not None and info.pieces_done >= 2
        assert await fetch(node2.manager, "blob", again, data) == data
        assert again.bytes_sent <= len(data) - 2 * MIB


# ---------------------------------------------------------------------------------------------
# Serving pieces to peers: open_piece, bitmap, wait_pieces, task keys, source_policy


async def test_open_piece_serves_held_pieces_of_a_partial_task_and_never_waits(
    tmp_path: Path,
) -> None:
    data = payload(4 * MIB)
    gate = asyncio.Event()

    async def hold_back(offset: int, position: int, attempt: int) -> None:
        if offset >= 2 * MIB:
            await gate.wait()

    source = MemorySource(data, hook=hold_back)
    async with Node(tmp_path) as node, node.manager.open(
        "blob", source, sha256=sha(data)
    ) as handle:
        key = hashlib.sha256(b"blob").hexdigest()
        assert node.manager.task_id_for_key(key) == "blob"
        assert node.manager.task_id_for_key("0" * 64) is None
        await handle.read(0, 2 * MIB)
        assert node.manager.bitmap("blob") == b"\x01\x01\x00\x00"
        async with node.manager.open_piece("blob", 1) as held:
            assert held is not None
            segment, digest = held
            assert (segment.offset, segment.count) == (MIB, MIB)
            assert os.pread(segment.fd, MIB, MIB) == data[MIB : 2 * MIB]
            assert digest == xxhash.xxh3_64_intdigest(data[MIB : 2 * MIB])
        async with asyncio.timeout(1):
            async with node.manager.open_piece("blob", 3) as missing:
                assert missing is None
            async with node.manager.open_piece("blob", 4) as outside:
                assert outside is None
            async with node.manager.open_piece("other", 0) as unknown:
                assert unknown is None
        # A long poll returns when the count of held pieces changes.
        waiting = asyncio.create_task(node.manager.wait_pieces("blob", 2, 5.0))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        gate.set()
        info = await asyncio.wait_for(waiting, 2.0)
        assert info is not None and info.pieces_done > 2
        assert await handle.read(0, len(data)) == data
        await wait_for(lambda: node.manager.bitmap("blob") == b"\x01" * 4)
        # Nothing changes any more: the poll ends after its wait.
        info = await node.manager.wait_pieces("blob", 4, 0.05)
        assert info is not None and info.complete
    assert source.bytes_sent == len(data)


async def test_reloaded_partial_pieces_are_not_offered_until_verified(tmp_path: Path) -> None:
    data = payload(3 * MIB)
    async with Node(tmp_path) as node, node.manager.open(
        "blob", MemorySource(data), sha256=sha(data), whole=False
    ) as handle:
        assert await handle.read(0, MIB) == data[:MIB]
    async with Node(tmp_path) as node:
        assert node.manager.bitmap("blob") == b"\x00\x00\x00"
        async with node.manager.open_piece("blob", 0) as held:
            assert held is None
        async with node.manager.open("blob", MemorySource(data), sha256=sha(data),
                                     whole=False) as handle:
            assert node.manager.bitmap("blob") == b"\x01\x00\x00"


async def test_source_policy_wraps_every_opened_source(tmp_path: Path) -> None:
    data = payload(2 * MIB)
    wrapped: list[str] = []

    def policy(task_id: str, source: PieceSource) -> PieceSource:
        wrapped.append(task_id)
        return source

    metrics = Metrics()
    store = PieceStore(StoreConfig(data_dir=tmp_path, gc_quota=1 << 40), metrics)
    manager = TaskManager(store, TaskConfig(), metrics, source_policy=policy)
    await store.open()
    try:
        assert await fetch(manager, "blob", MemorySource(data), data) == data
        assert await fetch(manager, "blob", None, data) == data
    finally:
        await manager.close()
        await store.close()
    assert wrapped == ["blob"]
