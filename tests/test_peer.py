"""Tests of `d7y_node.peer`: real aiohttp servers on 127.0.0.1, a real `TaskManager` and
`PieceStore` in a tmp dir, real gossip `Membership`s exchanging state over HTTP.

`MemoryPieces` is a real `PieceProvider` over a file it writes itself, holding only the pieces a
test adds (a partial task), optionally with bytes on disk that differ from the digests it reports
(a disk gone bad, the way to get a peer that serves corrupted pieces).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import aiohttp
import pytest
import xxhash
from aiohttp import web

from d7y_node.config import StoreConfig, TaskConfig
from d7y_node.errors import PeerBusy, PeerFailed, PieceCorrupt, UpstreamUnavailable
from d7y_node.gossip import (
    ClusterKey,
    GossipConfig,
    Load,
    LocalMember,
    LoopClock,
    Member,
    Membership,
    MemberState,
    UdpTransport,
)
from d7y_node.gossip.messages import Address
from d7y_node.metrics import Metrics
from d7y_node.peer import (
    AUTH_HEADER,
    PIECE_DIGEST_HEADER,
    PREFIX,
    HeldPiece,
    HttpStreamTransport,
    PeerAuth,
    PeerClient,
    PeerPieceSource,
    PeerServer,
    PeerServerConfig,
    TaskManagerPieces,
    TokenBucket,
    task_key_for,
)
from d7y_node.piece_store import MIB, PieceStore, piece_size_for
from d7y_node.scheduler import (
    AnnounceRequest,
    Bitmap,
    OriginRequest,
    Parent,
    PeerHealth,
    TaskState,
    Tracker,
    piece_count_for,
)
from d7y_node.tasks import Segment, TaskManager


def payload(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


class MemoryPieces:
    """A `PieceProvider` of one task whose bytes sit in a file; only `add`ed pieces are held."""

    def __init__(self, directory: Path, data: bytes, *, on_disk: bytes | None = None) -> None:
        self.data = data
        self.task_key = task_key_for(f"memory:{hashlib.sha256(data).hexdigest()}")
        self.piece_size = piece_size_for(len(data))
        self.piece_count = piece_count_for(len(data))
        self.held: set[int] = set()
        path = directory / f"{self.task_key}.data"
        path.write_bytes(on_disk if on_disk is not None else data)
        self._file = path.open("rb")
        self._changed = asyncio.Event()
        # When set, `piece` waits on it (holding the upload slot meanwhile).
        self.gate: asyncio.Event | None = None

    def close(self) -> None:
        self._file.close()

    def add(self, *indices: int) -> None:
        self.held.update(indices)
        self._changed.set()
        self._changed = asyncio.Event()

    def bitmap(self) -> Bitmap:
        return Bitmap.from_indices(self.piece_count, self.held)

    def state(self, task_key: str) -> TaskState | None:
        if task_key != self.task_key:
            return None
        return TaskState(len(self.data), self.piece_size, self.bitmap())

    @contextlib.asynccontextmanager
    async def piece(self, task_key: str, piece_index: int) -> AsyncIterator[HeldPiece | None]:
        if self.gate is not None:
            await self.gate.wait()
        if task_key != self.task_key or piece_index not in self.held:
            yield None
            return
        start = piece_index * self.piece_size
        size = min(self.piece_size, len(self.data) - start)
        digest = xxhash.xxh3_64_intdigest(self.data[start : start + size])
        yield HeldPiece((Segment(self._file.fileno(), start, size),), digest)

    async def wait_changed(self, task_key: str, fingerprint: str, wait: float) -> TaskState | None:
        deadline = asyncio.get_running_loop().time() + wait
        while (state := self.state(task_key)) is not None and (
            state.bitmap.fingerprint() == fingerprint
        ):
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._changed.wait()
        return self.state(task_key)

    async def read_range(
        self, task_key: str, offset: int, length: int, wait: float
    ) -> bytes | None:
        """Held bytes only: the range must lie in `add`ed pieces (no download to wait on)."""
        end = offset + length
        if task_key != self.task_key or end > len(self.data) or not all(
            index in self.held
            for index in range(offset // self.piece_size, (end - 1) // self.piece_size + 1)
        ):
            return None
        self._file.seek(offset)
        return self._file.read(length)


class MemorySource:
    """A `tasks.PieceSource` over bytes in memory (the origin of the seeded node)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def content_length(self) -> int:
        return len(self.data)

    async def read(self, offset: int, length: int) -> AsyncIterator[bytes]:
        for position in range(offset, offset + length, 256 * 1024):
            yield self.data[position : min(offset + length, position + 256 * 1024)]
            await asyncio.sleep(0)


class Node:
    """A store and a task manager in a directory, as node.py builds them."""

    def __init__(self, directory: Path) -> None:
        self.metrics = Metrics()
        self.store = PieceStore(StoreConfig(data_dir=directory, gc_quota=1 << 40), self.metrics)
        self.manager = TaskManager(self.store, TaskConfig(), self.metrics)

    async def __aenter__(self) -> Node:
        await self.store.open()
        await self.manager.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.manager.close()
        await self.store.close()


@contextlib.asynccontextmanager
async def serving(server: PeerServer) -> AsyncIterator[Address]:
    """`server`'s routes on a real aiohttp server on 127.0.0.1, at a free port."""
    app = web.Application()
    server.register(app)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield Address(str(host), int(port))
    finally:
        await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


@pytest.fixture
async def pieces(tmp_path: Path) -> AsyncIterator[MemoryPieces]:
    provider = MemoryPieces(tmp_path, payload(5 * MIB + 4321))
    yield provider
    provider.close()


class StaticFinder:
    """A `ParentFinder` with a fixed list of parents; counts the calls."""

    def __init__(self, parents: Sequence[Parent]) -> None:
        self.found = list(parents)
        self.calls = 0

    async def parents(self) -> Sequence[Parent]:
        self.calls += 1
        return self.found


def as_parent(peer_id: str, address: Address, bitmap: Bitmap, slots: int = 4) -> Parent:
    return Parent(peer_id, address.host, address.port, bitmap, slots, {})


# ---------------------------------------------------------------------------------------------
# Pieces of a real TaskManager


async def test_pieces_of_a_complete_task_are_served_and_verified(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    data = payload(3 * MIB + 77)
    sha = hashlib.sha256(data).hexdigest()
    task_id = f"sha256:{sha}"
    async with Node(tmp_path) as node:
        async with node.manager.open(task_id, MemorySource(data), sha256=sha) as handle:
            assert await handle.read(0, len(data)) == data
        provider = TaskManagerPieces(node.manager)
        task_key = task_key_for(task_id)
        assert task_key == hashlib.sha256(task_id.encode()).hexdigest()
        server = PeerServer(provider)
        async with serving(server) as address:
            client = PeerClient(session)
            state = await client.task_state(address, task_key)
            assert state is not None and state.complete
            assert (state.content_length, state.piece_size) == (len(data), MIB)
            got = [
                await client.fetch_piece(address, task_key, index) for index in range(4)
            ]
            assert b"".join(got) == data
            # Served again: the digest comes from the piece store, the bytes from disk.
            assert await client.fetch_piece(address, task_key, 3) == data[3 * MIB :]
            # (The server counts once its handler ends, which may be after the client is done.)
            await eventually(lambda: server.stats.pieces_served == 5, 2.0)
            assert server.stats.bytes_served == len(data) + len(data) - 3 * MIB
            with pytest.raises(PeerFailed, match="404"):
                await client.fetch_piece(address, task_key, 4)
            assert await client.task_state(address, "0" * 64) is None
            with pytest.raises(PeerFailed, match="404"):
                await client.fetch_piece(address, "0" * 64, 0)


async def test_adapter_serves_the_held_pieces_of_a_task_still_downloading(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """A downloader serves what it has at once (404 for the rest, without waiting), and a
    long poll on its state wakes when a piece arrives."""
    data = payload(3 * MIB)
    sha = hashlib.sha256(data).hexdigest()
    release = asyncio.Event()

    class StallingSource(MemorySource):
        async def read(self, offset: int, length: int) -> AsyncIterator[bytes]:
            if offset >= MIB:
                await release.wait()
            async for chunk in super().read(offset, length):
                yield chunk

    async with Node(tmp_path) as node:
        provider = TaskManagerPieces(node.manager)
        key = task_key_for("slow")
        async with node.manager.open("slow", StallingSource(data), sha256=sha) as handle:
            assert await handle.read(0, 100) == data[:100]
            async with serving(PeerServer(provider)) as address:
                client = PeerClient(session)
                state = await client.task_state(address, key)
                assert state is not None and state.bitmap.indices() == [0]
                async with asyncio.timeout(2):
                    assert await client.fetch_piece(address, key, 0) == data[:MIB]
                    with pytest.raises(PeerFailed, match="404"):
                        await client.fetch_piece(address, key, 2)
                waiting = asyncio.create_task(client.task_state(
                    address, key, wait=10, known=state.bitmap.fingerprint()
                ))
                await asyncio.sleep(0.1)
                assert not waiting.done()
                release.set()
                changed = await asyncio.wait_for(waiting, 5)
                assert changed is not None and changed.bitmap.count() > 1
            assert await handle.read(0, len(data)) == data


async def test_pieces_are_copied_where_the_loop_has_no_sendfile(
    pieces: MemoryPieces, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvloop has no `loop.sendfile`: the server falls back to pread + write."""
    calls = []

    async def no_sendfile(*args: object, **kwargs: object) -> int:
        calls.append(args)
        raise NotImplementedError

    monkeypatch.setattr(asyncio.get_running_loop(), "sendfile", no_sendfile)
    pieces.add(0, 5)
    async with serving(PeerServer(pieces)) as address:
        client = PeerClient(session)
        assert await client.fetch_piece(address, pieces.task_key, 0) == pieces.data[:MIB]
        assert await client.fetch_piece(address, pieces.task_key, 5) == pieces.data[5 * MIB :]
        async with session.head(
            f"http://{address}{PREFIX}/tasks/{pieces.task_key}/pieces/0"
        ) as got:
            assert got.status == 405
    assert len(calls) == 2


async def test_a_task_manager_downloads_through_peers(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """Node B's TaskManager uses a `PeerPieceSource` whose parents are a good peer and one
    serving corrupted pieces: the content arrives whole and verified, the bad peer is dropped."""
    data = payload(6 * MIB + 500)
    sha = hashlib.sha256(data).hexdigest()
    task_id = f"sha256:{sha}"
    corrupted = bytearray(data)
    for index in range(0, len(data), MIB):
        corrupted[index + 100] ^= 0xFF
    good = MemoryPieces(tmp_path, data)
    bad_directory = tmp_path / "bad"
    bad_directory.mkdir()
    bad = MemoryPieces(bad_directory, data, on_disk=bytes(corrupted))
    assert good.task_key == bad.task_key
    good.add(*range(good.piece_count))
    bad.add(*range(bad.piece_count))
    async with (
        serving(PeerServer(good)) as good_address,
        serving(PeerServer(bad)) as bad_address,
        Node(tmp_path / "b") as node,
    ):
        bitmap = Bitmap.full(good.piece_count)
        # The bad peer ranks first (more free slots), so it is asked first.
        finder = StaticFinder([
            as_parent("bad", bad_address, bitmap, slots=4),
            as_parent("good", good_address, bitmap, slots=1),
        ])
        client = PeerClient(session)
        source = PeerPieceSource(
            client, good.task_key, content_length=len(data), finder=finder,
            health=PeerHealth(time.monotonic), local_id="b",
        )
        async with node.manager.open(task_id, source, sha256=sha) as handle:
            assert await handle.read(0, len(data)) == data
        assert source.dropped == {"bad"}
        assert source.stats.corrupt_pieces >= 1
        assert client.stats.piece_digest_failures == source.stats.corrupt_pieces
        assert source.stats.bytes_from_peers == len(data)
    good.close()
    bad.close()


async def test_corrupted_piece_is_detected_by_the_client(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    data = payload(2 * MIB)
    wrong = bytearray(data)
    wrong[5] ^= 1
    bad = MemoryPieces(tmp_path, data, on_disk=bytes(wrong))
    bad.add(0, 1)
    async with serving(PeerServer(bad)) as address:
        client = PeerClient(session)
        with pytest.raises(PieceCorrupt, match="does not match"):
            await client.fetch_piece(address, bad.task_key, 0, peer="bad-peer")
        assert await client.fetch_piece(address, bad.task_key, 1) == data[MIB:]
        assert client.stats.piece_digest_failures == 1
    bad.close()


async def test_piece_without_digest_or_of_wrong_size_is_refused(
    session: aiohttp.ClientSession,
) -> None:
    """A test double answering like a broken peer: no digest header, or a short body."""
    body = b"x" * 100

    async def no_digest(request: web.Request) -> web.Response:
        return web.Response(body=body)

    async def short(request: web.Request) -> web.Response:
        digest = xxhash.xxh3_64_hexdigest(body)
        return web.Response(body=body, headers={PIECE_DIGEST_HEADER: digest})

    async def range_answer(request: web.Request) -> web.Response:
        digest = xxhash.xxh3_64_hexdigest(body if request.query["offset"] != "1" else b"other")
        return web.Response(body=body, headers={PIECE_DIGEST_HEADER: digest})

    app = web.Application()
    app.router.add_get(PREFIX + "/tasks/{task_key}/pieces/0", no_digest)
    app.router.add_get(PREFIX + "/tasks/{task_key}/pieces/1", short)
    app.router.add_get(PREFIX + "/tasks/{task_key}/range", range_answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    address = Address(str(host), int(port))
    try:
        client = PeerClient(session)
        with pytest.raises(PeerFailed, match="digest header"):
            await client.fetch_piece(address, "a" * 64, 0)
        with pytest.raises(PeerFailed, match="expected 200"):
            await client.fetch_piece(address, "a" * 64, 1, expected_size=200)
        with pytest.raises(PeerFailed, match="exceeds 50"):
            await client.fetch_piece(address, "a" * 64, 1, expected_size=50)
        assert await client.fetch_range(address, "a" * 64, 0, 100) == body
        with pytest.raises(PeerFailed, match="has 100 bytes, expected 2000"):
            await client.fetch_range(address, "a" * 64, 0, 2000)
        with pytest.raises(PieceCorrupt, match=r"range 1\+100 .* does not match"):
            await client.fetch_range(address, "a" * 64, 1, 100)
    finally:
        await runner.cleanup()
    # Nobody listens there any more.
    with pytest.raises(PeerFailed):
        await PeerClient(session).fetch_piece(address, "a" * 64, 0)


async def test_peer_source_reads_ranges_from_several_parents_at_once(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    data = payload(8 * MIB + 99)
    for index in range(3):
        (tmp_path / str(index)).mkdir()
    parents_pieces = [MemoryPieces(tmp_path / str(index), data) for index in range(3)]
    count = parents_pieces[0].piece_count
    # Each parent holds a different part; together, everything.
    parents_pieces[0].add(*range(0, count, 3))
    parents_pieces[1].add(*range(1, count, 3))
    parents_pieces[2].add(*range(2, count, 3))
    servers = [PeerServer(provider) for provider in parents_pieces]
    async with contextlib.AsyncExitStack() as stack:
        addresses = [await stack.enter_async_context(serving(server)) for server in servers]
        finder = StaticFinder([
            as_parent(f"p{i}", address, parents_pieces[i].bitmap())
            for i, address in enumerate(addresses)
        ])
        source = PeerPieceSource(
            PeerClient(session), parents_pieces[0].task_key, content_length=len(data),
            finder=finder, health=PeerHealth(time.monotonic), local_id="me",
        )
        assert await source.content_length() == len(data)
        got = b"".join([chunk async for chunk in source.read(0, len(data))])
        assert got == data
        # A range starting and ending inside pieces.
        part = b"".join([chunk async for chunk in source.read(MIB + 10, 3 * MIB)])
        assert part == data[MIB + 10 : 4 * MIB + 10]
        await eventually(lambda: all(server.stats.pieces_served >= 3 for server in servers), 2.0)
        assert finder.calls == 1
    for provider in parents_pieces:
        provider.close()


async def test_peer_source_gives_up_when_no_parent_has_a_piece(
    pieces: MemoryPieces, session: aiohttp.ClientSession
) -> None:
    pieces.add(0, 1)
    async with serving(PeerServer(pieces)) as address:
        finder = StaticFinder([as_parent("p", address, pieces.bitmap())])
        source = PeerPieceSource(
            PeerClient(session), pieces.task_key, content_length=len(pieces.data),
            finder=finder, health=PeerHealth(time.monotonic), local_id="me", max_refreshes=2,
        )
        received = bytearray()
        with pytest.raises(UpstreamUnavailable, match="no peer can give piece 2"):
            async for chunk in source.read(0, len(pieces.data)):
                received += chunk
        assert bytes(received) == pieces.data[: 2 * MIB]
        assert finder.calls == 3  # the first list and two refreshes


# ---------------------------------------------------------------------------------------------
# Task state and its long poll


async def test_state_long_poll_wakes_on_a_new_piece(
    pieces: MemoryPieces, session: aiohttp.ClientSession
) -> None:
    pieces.add(0)
    server = PeerServer(pieces)
    async with serving(server) as address:
        client = PeerClient(session)
        state = await client.task_state(address, pieces.task_key)
        assert state is not None and state.bitmap.indices() == [0]
        known = state.bitmap.fingerprint()
        loop = asyncio.get_running_loop()

        async def add_later() -> None:
            await asyncio.sleep(0.2)
            pieces.add(3)

        started = loop.time()
        adding = asyncio.create_task(add_later())
        changed = await client.task_state(address, pieces.task_key, wait=10, known=known)
        elapsed = loop.time() - started
        await adding
        assert changed is not None and changed.bitmap.indices() == [0, 3]
        assert 0.15 < elapsed < 2.0
        # Nothing changes: the answer comes after the wait, with the same bitmap.
        started = loop.time()
        same = await client.task_state(
            address, pieces.task_key, wait=0.3, known=changed.bitmap.fingerprint()
        )
        assert same is not None and same.bitmap == changed.bitmap
        assert loop.time() - started >= 0.29
        # An outdated `known` is answered at once.
        started = loop.time()
        await client.task_state(address, pieces.task_key, wait=10, known=known)
        assert loop.time() - started < 1.0
        assert server.stats.long_polls == 2


async def test_long_polls_are_bounded(
    pieces: MemoryPieces, session: aiohttp.ClientSession
) -> None:
    server = PeerServer(pieces, config=PeerServerConfig(max_long_polls=1))
    async with serving(server) as address:
        client = PeerClient(session)
        known = pieces.bitmap().fingerprint()
        waiting = asyncio.create_task(
            client.task_state(address, pieces.task_key, wait=10, known=known)
        )
        await eventually(lambda: server.waiting_polls == 1, 2.0)
        with pytest.raises(PeerBusy):
            await client.task_state(address, pieces.task_key, wait=10, known=known)
        pieces.add(1)
        state = await waiting
        assert state is not None and state.bitmap.indices() == [1]
        await eventually(lambda: server.waiting_polls == 0, 2.0)


async def test_task_manager_adapter_serves_content_stored_with_put(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    data = payload(MIB + 1)
    sha = hashlib.sha256(data).hexdigest()
    async with Node(tmp_path) as node:
        provider = TaskManagerPieces(node.manager)
        key = task_key_for("manifest")
        assert provider.state(key) is None
        await node.manager.put("manifest", data, sha256=sha, attributes={})
        state = provider.state(key)
        assert state is not None and state.complete and state.content_length == len(data)
        # Nothing changes: the long poll ends after its wait with the same state.
        same = await provider.wait_changed(key, state.bitmap.fingerprint(), 0.05)
        assert same == state


# ---------------------------------------------------------------------------------------------
# Limits and validation


async def test_no_free_upload_slot_gives_503_and_retry_after(
    pieces: MemoryPieces, session: aiohttp.ClientSession
) -> None:
    pieces.add(0, 1)
    gate = pieces.gate = asyncio.Event()
    server = PeerServer(pieces, config=PeerServerConfig(upload_slots=1, retry_after=2))
    async with serving(server) as address:
        client = PeerClient(session)
        first = asyncio.create_task(client.fetch_piece(address, pieces.task_key, 0))
        async with asyncio.timeout(5):
            while server.slots.free:  # noqa: ASYNC110 (the slot is taken inside the server)
                await asyncio.sleep(0.005)
        with pytest.raises(PeerBusy) as busy:
            await client.fetch_piece(address, pieces.task_key, 1)
        assert busy.value.retry_after == 2
        assert server.stats.busy == 1
        gate.set()
        assert await first == pieces.data[:MIB]
        await eventually(lambda: server.slots.free == 1, 2.0)
        assert await client.fetch_piece(address, pieces.task_key, 1) == pieces.data[MIB : 2 * MIB]


async def test_upload_rate_limit_paces_pieces(
    pieces: MemoryPieces, session: aiohttp.ClientSession
) -> None:
    pieces.add(0, 1)
    config = PeerServerConfig(upload_rate=4 * MIB, upload_burst=256 * 1024)
    async with serving(PeerServer(pieces, config=config)) as address:
        client = PeerClient(session)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.gather(
            client.fetch_piece(address, pieces.task_key, 0),
            client.fetch_piece(address, pieces.task_key, 1),
        )
        # 2 MiB at 4 MiB/s with a 256 KiB burst: at least (2 MiB - 256 KiB) / 4 MiB/s.
        assert loop.time() - started >= 0.43


async def test_token_bucket_shares_the_rate() -> None:
    now = [0.0]
    bucket = TokenBucket(1000, 100, clock=lambda: now[0])
    loop = asyncio.get_running_loop()
    started = loop.time()
    await bucket.take(100)  # the burst: no wait
    assert loop.time() - started < 0.05
    await bucket.take(50)  # 50 in debt at 1000/s: 50 ms
    assert loop.time() - started >= 0.045
    with pytest.raises(ValueError):
        TokenBucket(0, 1)


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/tasks/ABC/state", 400),  # not a task key
        ("/tasks/" + "a" * 63 + "/state", 400),
        ("/tasks/" + "a" * 64 + "/pieces/01", 400),  # leading zero
        ("/tasks/" + "a" * 64 + "/pieces/-1", 400),
        ("/tasks/" + "a" * 64 + "/pieces/65536", 400),  # beyond MAX_PIECES
        ("/tasks/" + "a" * 64 + "/pieces/65535", 404),  # valid, not held
        ("/tasks/" + "a" * 64 + "/state?wait=nan", 400),
        ("/tasks/" + "a" * 64 + "/state?wait=31", 400),
        ("/tasks/" + "a" * 64 + "/state?known=xyz", 400),
        ("/tasks/" + "a" * 64 + "/state?wait=0.1", 404),
        ("/tasks/" + "a" * 64 + "/range", 400),  # no offset, no length
        ("/tasks/" + "a" * 64 + "/range?offset=0", 400),
        ("/tasks/" + "a" * 64 + "/range?offset=-1&length=5", 400),
        ("/tasks/" + "a" * 64 + "/range?offset=01&length=5", 400),
        ("/tasks/" + "a" * 64 + "/range?offset=0&length=0", 400),
        ("/tasks/" + "a" * 64 + "/range?offset=0&length=16777217", 400),  # over a piece
        ("/tasks/" + "a" * 64 + "/range?offset=1" + "0" * 15 + "&length=5", 400),
        ("/tasks/" + "a" * 64 + "/range?offset=0&length=5&wait=31", 400),
        ("/tasks/" + "a" * 64 + "/range?offset=0&length=5&wait=-1", 400),
        ("/tasks/" + "a" * 64 + "/range?offset=0&length=16777216", 404),
        ("/tasks/" + "a" * 64 + "/range?offset=0&length=5&wait=0.1", 404),
    ],
)
async def test_path_and_query_are_validated(
    pieces: MemoryPieces, session: aiohttp.ClientSession, path: str, status: int
) -> None:
    server = PeerServer(pieces)
    async with serving(server) as address, session.get(f"http://{address}{PREFIX}{path}") as got:
        assert got.status == status
    assert server.stats.bad_requests == (1 if status == 400 else 0)


async def test_ranges_of_held_pieces_are_served_and_verified(
    pieces: MemoryPieces, session: aiohttp.ClientSession
) -> None:
    """A part of a piece (what a lazy reader asks for) comes with its own xxh3; bytes not held
    are 404, a body that does not match its digest is `PieceCorrupt`."""
    pieces.add(1, 2)
    server = PeerServer(pieces)
    client = PeerClient(session)
    async with serving(server) as address:
        offset, length = MIB + 12_345, 70_000
        got = await client.fetch_range(address, pieces.task_key, offset, length, wait=1.0)
        assert got == pieces.data[offset : offset + length]
        across = await client.fetch_range(address, pieces.task_key, 2 * MIB - 10, 20)
        assert across == pieces.data[2 * MIB - 10 : 2 * MIB + 10]
        with pytest.raises(PeerFailed, match=r"404.*RANGE_UNKNOWN"):
            await client.fetch_range(address, pieces.task_key, MIB - 1, 2)  # piece 0 not held
        with pytest.raises(ValueError):
            await client.fetch_range(address, pieces.task_key, 0, 0)
        await eventually(lambda: server.stats.ranges_served == 2, 2.0)
        assert server.stats.ranges_missing == 1


def flip_bytes(directory: Path, *offsets: int) -> None:
    """Invert bytes of the one task data file under `directory` (a disk gone bad)."""
    with open(next(directory.rglob("*.data")), "r+b") as file:
        for offset in offsets:
            file.seek(offset)
            value = file.read(1)[0]
            file.seek(offset)
            file.write(bytes([value ^ 0xFF]))


async def test_a_range_gone_bad_on_disk_is_not_served(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """The served range is checked against the digests recorded when its piece or blocks
    arrived: a byte changed on disk since gives 404, never the bad bytes under a new digest."""
    data = payload(3 * MIB)
    sha = hashlib.sha256(data).hexdigest()
    async with Node(tmp_path) as node:
        source = MemorySource(data)
        async with node.manager.open("blob", source, sha256=sha, whole=False) as handle:
            await handle.read(100, 10)  # piece 0: one block
            await handle.read(MIB, MIB)  # piece 1: whole
        server = PeerServer(TaskManagerPieces(node.manager))
        client = PeerClient(session)
        key = task_key_for("blob")
        async with serving(server) as address:
            assert await client.fetch_range(address, key, 50, 100) == data[50:150]
            assert await client.fetch_range(address, key, MIB + 7, 9) == data[MIB + 7 : MIB + 16]
            with pytest.raises(PeerFailed, match="404"):  # the next block is not held
                await client.fetch_range(address, key, 16 * 1024 - 5, 10)
            flip_bytes(tmp_path, 16 * 1024 - 1, 2 * MIB - 1)  # the block's last, piece 1's
            with pytest.raises(PeerFailed, match="404"):
                await client.fetch_range(address, key, 50, 100)
            with pytest.raises(PeerFailed, match="404"):
                await client.fetch_range(address, key, MIB + 7, 9)


# ---------------------------------------------------------------------------------------------
# Authentication


async def test_authentication_accepts_signed_and_rejects_missing_wrong_and_stale(
    pieces: MemoryPieces, session: aiohttp.ClientSession
) -> None:
    pieces.add(0)
    key = ClusterKey(b"cluster secret")
    server = PeerServer(pieces, auth=PeerAuth(key))
    async with serving(server) as address:
        signed = PeerClient(session, auth=PeerAuth(key))
        assert await signed.fetch_piece(address, pieces.task_key, 0) == pieces.data[:MIB]
        state = await signed.task_state(address, pieces.task_key, wait=0.1)
        assert state is not None
        with pytest.raises(PeerFailed, match=r"401.*missing"):
            await PeerClient(session).fetch_piece(address, pieces.task_key, 0)
        other = PeerClient(session, auth=PeerAuth(ClusterKey(b"another secret")))
        with pytest.raises(PeerFailed, match=r"401.*invalid"):
            await other.fetch_piece(address, pieces.task_key, 0)
        late = PeerClient(session, auth=PeerAuth(key, clock=lambda: time.time() - 120))
        with pytest.raises(PeerFailed, match=r"401.*stale"):
            await late.task_state(address, pieces.task_key)
        # A valid tag for one request does not open another path.
        header = PeerAuth(key).sign("GET", f"{PREFIX}/tasks/{pieces.task_key}/state")
        target = f"http://{address}{PREFIX}/tasks/{pieces.task_key}/pieces/0"
        async with session.get(target, headers={AUTH_HEADER: header}) as got:
            assert got.status == 401
        # Nor a body other than the one signed.
        announce = f"{PREFIX}/tracker/{pieces.task_key}/announce"
        header = PeerAuth(key).sign("POST", announce, b"one body")
        async with session.post(
            f"http://{address}{announce}", data=b"another", headers={AUTH_HEADER: header}
        ) as got:
            assert got.status == 401
        async with session.get(target, headers={AUTH_HEADER: "v1 12 zz"}) as got:
            assert got.status == 401
    assert server.stats.unauthenticated == {"missing": 1, "invalid": 4, "stale": 1}
    assert server.stats.pieces_served == 1  # counted by now: the server has shut down


def test_peer_key_differs_from_the_gossip_tags() -> None:
    """The peer HTTP key is derived under its own label: signing with it never yields a tag the
    gossip layer would accept for the same bytes, and two secrets give unrelated keys."""
    key = ClusterKey(b"secret")
    auth = PeerAuth(key, clock=lambda: 1000.0)
    header = auth.sign("GET", "/x")
    assert header.startswith("v1 1000 ") and len(header.split(" ")[2]) == 32
    assert PeerAuth(ClusterKey(b"secret"), clock=lambda: 1000.0).sign("GET", "/x") == header
    assert PeerAuth(ClusterKey(b"secreT"), clock=lambda: 1000.0).sign("GET", "/x") != header
    assert auth.check("GET", "/x", header, b"") is None
    assert auth.check("GET", "/y", header, b"") == "invalid"
    assert auth.check("GET", "/x", None, b"") == "missing"


# ---------------------------------------------------------------------------------------------
# Tracker


class Directory:
    """A `MemberDirectory` over a dict of gossip `Member`s."""

    def __init__(self) -> None:
        self.members: dict[str, Member] = {}

    def add(self, member_id: str, peer: Address, *, slots: int = 4,
            zone: str = "z1", state: MemberState = MemberState.ALIVE) -> None:
        self.members[member_id] = Member(
            member_id, Address(peer.host, 7946), peer.port, {"zone": zone},
            Load(free_upload_slots=slots), state, 1,
        )

    def member(self, member_id: str) -> Member | None:
        return self.members.get(member_id)


async def test_announce_returns_ranked_parents_and_forwards_to_home_1(
    pieces: MemoryPieces, session: aiohttp.ClientSession
) -> None:
    directory = Directory()
    directory.add("seed", Address("127.0.0.2", 65002), slots=1)
    directory.add("near", Address("127.0.0.3", 65002), slots=4)
    directory.add("far", Address("127.0.0.4", 65002), slots=4, zone="z2")
    directory.add("dead", Address("127.0.0.5", 65002), state=MemberState.DEAD)
    directory.add("new", Address("127.0.0.6", 65002))
    forwarded: list[tuple[str, AnnounceRequest]] = []
    tracker = Tracker(time.monotonic)
    server = PeerServer(
        pieces, tracker=tracker, directory=directory,
        replicate=lambda key, announce: forwarded.append((key, announce)),
    )
    length, count = len(pieces.data), pieces.piece_count
    key = pieces.task_key
    async with serving(server) as address:
        client = PeerClient(session)
        for peer_id, held in (("seed", range(count)), ("near", [0, 1]), ("far", [0, 1]),
                              ("dead", range(count)), ("unknown", range(count))):
            reply = await client.announce(
                address, key, AnnounceRequest(peer_id, length, Bitmap.from_indices(count, held))
            )
        reply = await client.announce(
            address, key, AnnounceRequest("new", length, Bitmap.from_indices(count, [0]))
        )
        # Dead and unknown members are not offered; the one with everything first, then the
        # same-zone one, then the other.
        assert [p.peer_id for p in reply.parents] == ["seed", "near", "far"]
        assert (reply.parents[0].host, reply.parents[0].port) == ("127.0.0.2", 65002)
        assert reply.parents[0].bitmap == Bitmap.full(count)
        assert len(forwarded) == 6 and forwarded[-1][0] == key
        # A forwarded announce (home 0 -> home 1) is recorded, not answered, not passed on.
        reply = await client.announce(
            address, key,
            AnnounceRequest("far", length, Bitmap.full(count), forwarded=True),
        )
        assert reply.parents == () and len(forwarded) == 6
        assert {p.peer_id: p.bitmap.count() for p in tracker.peers(key)}["far"] == count
        # Another cut of the content is refused; so is garbage and a body too large.
        with pytest.raises(PeerFailed, match="409"):
            await client.announce(
                address, key, AnnounceRequest("x", length + 2 * MIB,
                                              Bitmap.empty(piece_count_for(length + 2 * MIB)))
            )
        url = f"http://{address}{PREFIX}/tracker/{key}/announce"
        async with session.post(url, data=b"\x93\x01\x02") as got:
            assert got.status == 400
        async with session.post(url, data=b"\x00" * (300 * 1024)) as got:
            assert got.status == 413
    assert server.stats.announces == 8


async def test_an_announce_with_an_origin_request_goes_to_the_seed_hook_unless_forwarded(
    pieces: MemoryPieces, session: aiohttp.ClientSession
) -> None:
    seeded: list[tuple[str, AnnounceRequest]] = []

    def seed(task_key: str, announce: AnnounceRequest) -> str:
        seeded.append((task_key, announce))
        return "TaskFailed: origin answered 403"

    server = PeerServer(pieces, tracker=Tracker(time.monotonic), seed=seed)
    length, count, key = len(pieces.data), pieces.piece_count, pieces.task_key
    digest = "sha256:" + "ab" * 32
    origin = OriginRequest(digest, f"http://127.0.0.1:1/v2/a/blobs/{digest}",
                           (("Authorization", "Bearer t"),))
    async with serving(server) as address:
        client = PeerClient(session)
        # Without an origin request the hook is not asked.
        reply = await client.announce(address, key,
                                      AnnounceRequest("a", length, Bitmap.empty(count)))
        assert reply.origin_error == "" and seeded == []
        reply = await client.announce(
            address, key, AnnounceRequest("a", length, Bitmap.empty(count), origin=origin)
        )
        assert reply.origin_error == "TaskFailed: origin answered 403"
        assert seeded[0][0] == key and seeded[0][1].origin == origin
        # A copy from home 0 never makes home 1 fetch.
        await client.announce(address, key, AnnounceRequest(
            "b", length, Bitmap.empty(count), forwarded=True, origin=origin))
        assert len(seeded) == 1


async def test_announce_without_a_tracker_is_404(
    pieces: MemoryPieces, session: aiohttp.ClientSession
) -> None:
    async with serving(PeerServer(pieces)) as address:
        with pytest.raises(PeerFailed, match="404"):
            await PeerClient(session).announce(
                address, pieces.task_key,
                AnnounceRequest("a", len(pieces.data), Bitmap.empty(pieces.piece_count)),
            )


# ---------------------------------------------------------------------------------------------
# Gossip push-pull over HTTP


FAST = GossipConfig(
    probe_interval=0.1,
    probe_timeout=0.05,
    gossip_interval=0.02,
    reconnect_interval=0.5,
    push_pull_interval=0.3,
    stream_timeout=2.0,
)


async def eventually(condition: Callable[[], bool], within: float) -> None:
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110 (membership state has no awaitable event)
            await asyncio.sleep(0.01)


async def test_push_pull_between_two_memberships_over_http(
    pieces: MemoryPieces, session: aiohttp.ClientSession
) -> None:
    key = ClusterKey(b"push-pull secret")
    auth = PeerAuth(key)
    started: list[tuple[Membership, UdpTransport, HttpStreamTransport, PeerServer]] = []
    async with contextlib.AsyncExitStack() as stack:
        for index in range(2):
            stream = HttpStreamTransport(PeerClient(session, auth=auth))
            server = PeerServer(pieces, auth=auth, stream=stream)
            peer_address = await stack.enter_async_context(serving(server))
            transport = await UdpTransport.bind("127.0.0.1", 0)
            member = Membership(
                local=LocalMember(f"pp{index}", transport.local_address, peer_address.port),
                transport=transport,
                clock=LoopClock(),
                rng=random.Random(index),
                config=FAST,
                stream=stream,
                cluster_key=key,
            )
            member.start()
            started.append((member, transport, stream, server))
        (first, _, _, first_server), (second, _, second_stream, second_server) = started
        try:
            second.join([first.local.address])
            await eventually(
                lambda: first.state_of("pp1") is MemberState.ALIVE
                and second.state_of("pp0") is MemberState.ALIVE,
                5.0,
            )
            # The join's full sync and the periodic ones went over HTTP, both ways.
            await eventually(
                lambda: first_server.stats.push_pulls >= 1 and second_server.stats.push_pulls >= 1,
                5.0,
            )
            assert first.stats.push_pull_failures == 0 and second.stats.push_pull_failures == 0
            assert first.stats.streams_unauthenticated == 0
            # New metadata reaches the other side (by gossip or push-pull, both work).
            first.update(labels={"zone": "z9"})
            await eventually(
                lambda: (m := second.member("pp0")) is not None and m.labels.get("zone") == "z9",
                5.0,
            )
        finally:
            for member, transport, stream, _ in started:
                member.stop()
                transport.close()
                await stream.close()
    assert second_stream.handler is not None


async def test_http_stream_exchange_calls_back_exactly_once(
    pieces: MemoryPieces, session: aiohttp.ClientSession
) -> None:
    key = ClusterKey(b"s")
    server_stream = HttpStreamTransport(PeerClient(session))
    server_stream.set_handler(lambda request, source: request[::-1])
    server = PeerServer(pieces, auth=PeerAuth(key), stream=server_stream)
    replies: list[bytes | None] = []
    async with serving(server) as address:
        good = HttpStreamTransport(PeerClient(session, auth=PeerAuth(key)))
        good.exchange(address, b"hello", 2.0, replies.append)
        await eventually(lambda: len(replies) == 1, 3.0)
        assert replies == [b"olleh"]
        # Without the key: refused, the callback gets None.
        keyless = HttpStreamTransport(PeerClient(session))
        keyless.exchange(address, b"hello", 2.0, replies.append)
        await eventually(lambda: len(replies) == 2, 3.0)
        assert replies[1] is None
        # Too large a body: refused before the handler sees it.
        good.exchange(address, b"x" * (9 * MIB), 5.0, replies.append)
        await eventually(lambda: len(replies) == 3, 6.0)
        assert replies[2] is None
    # Cancelled in flight (nobody answers a closed port fast enough): still called once.
    stalled = HttpStreamTransport(PeerClient(session, auth=PeerAuth(key)))
    stalled.exchange(Address("127.0.0.1", 9), b"x", 5.0, replies.append)
    await stalled.close()
    await asyncio.sleep(0.05)
    assert len(replies) == 4 and replies[3] is None


async def test_peer_source_asks_its_finder_again_while_reading_and_survives_its_failure(
    pieces: MemoryPieces, session: aiohttp.ClientSession
) -> None:
    """With a refresh interval, a long read announces again now and then (the home learns what
    it holds); a home that stops answering meanwhile does not break the read."""
    pieces.add(*range(pieces.piece_count))
    pieces.gate = asyncio.Event()

    class FailingLater(StaticFinder):
        async def parents(self) -> Sequence[Parent]:
            found = await super().parents()
            if self.calls > 1:
                raise UpstreamUnavailable("home is gone")
            return found

    async with serving(PeerServer(pieces)) as address:
        finder = FailingLater([as_parent("p", address, pieces.bitmap())])
        source = PeerPieceSource(
            PeerClient(session), pieces.task_key, content_length=len(pieces.data),
            finder=finder, health=PeerHealth(time.monotonic), local_id="me",
            refresh_interval=0.05, read_ahead=1,
        )

        async def open_gate_slowly() -> None:
            # One piece every 30 ms (read_ahead=1: one in flight), so the read lasts several
            # refresh intervals.
            for _ in range(pieces.piece_count):
                await asyncio.sleep(0.03)
                gate, pieces.gate = pieces.gate, asyncio.Event()
                assert gate is not None
                gate.set()
            pieces.gate = None

        opener = asyncio.create_task(open_gate_slowly())
        got = b"".join([chunk async for chunk in source.read(0, len(pieces.data))])
        await opener
        assert got == pieces.data
        assert finder.calls >= 2
