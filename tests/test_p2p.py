"""Tests of `d7y_node.p2p` with real nodes in one process: each `Node` has its own piece store,
peer port and gossip socket on 127.0.0.1; they join each other over real UDP and HTTP. The
origin is `CountingSource`, a real `PieceSource` over bytes in memory that counts what it sends
(the registry's access log, in the integration test)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import random
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from d7y_node.config import (
    ClusterConfig,
    Listen,
    NodeConfig,
    ProxyConfig,
    RegistryConfig,
    SnapshotterConfig,
    StoreConfig,
)
from d7y_node.errors import InvalidRequest, PeerFailed
from d7y_node.gossip.members import Member
from d7y_node.gossip.messages import Address, Load, MemberState
from d7y_node.metrics import Metrics
from d7y_node.node import Node
from d7y_node.p2p import ClusterScheduler, RegistryOrigins
from d7y_node.peer import AUTH_HEADER, PeerClient, PeerServer, TaskManagerPieces, task_key_for
from d7y_node.piece_store import MIB, PieceStore
from d7y_node.proxy import REPOSITORY_ATTRIBUTE, UPSTREAM_ATTRIBUTE
from d7y_node.registry import OriginBlob, RegistryClient, Upstream
from d7y_node.scheduler import AnnounceRequest, Bitmap, OriginRequest, Tracker, task_homes
from d7y_node.tasks import TaskHandle, TaskManager
from tests.harness.background import serve_in_loop


class CountingSource:
    """The origin: bytes in memory, counting every byte it sends (over all its copies)."""

    def __init__(self, data: bytes, sent: list[int], *, delay: float = 0.0) -> None:
        self.data = data
        self.sent = sent
        self.delay = delay

    async def content_length(self) -> int:
        return len(self.data)

    async def read(self, offset: int, length: int) -> AsyncIterator[bytes]:
        step = 256 * 1024
        for position in range(offset, offset + length, step):
            chunk = self.data[position : min(offset + length, position + step)]
            self.sent[0] += len(chunk)
            await asyncio.sleep(self.delay)
            yield chunk


def config_for(directory: Path, *, join: tuple[str, ...] = (), node_id: str,
               home_timeout: float = 5.0, secret_file: Path | None = None) -> NodeConfig:
    return NodeConfig(
        store=StoreConfig(data_dir=directory, gc_quota=1 << 40),
        proxy=ProxyConfig(listen=Listen("127.0.0.1", 0)),
        peer_listen=Listen("127.0.0.1", 0),
        snapshotter=SnapshotterConfig(socket=None, nydus_socket=None),
        cluster=ClusterConfig(
            gossip_listen=Listen("127.0.0.1", 0), join=join, node_id=node_id,
            home_timeout=home_timeout, secret_file=secret_file,
        ),
    )


async def eventually(condition: Callable[[], bool], seconds: float) -> None:
    async with asyncio.timeout(seconds):
        while not condition():  # noqa: ASYNC110 (membership has no event for "all converged")
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def cluster(tmp_path: Path, count: int, **options: float) -> AsyncIterator[list[Node]]:
    nodes: list[Node] = []
    try:
        for index in range(count):
            join = (str(nodes[0].gossip_address),) if nodes else ()
            node = Node(config_for(tmp_path / f"n{index}", join=join, node_id=f"n{index}",
                                   **options))
            await node.start()
            nodes.append(node)
        await converged(nodes)
        yield nodes
    finally:
        for node in reversed(nodes):
            await node.stop()


async def converged(nodes: list[Node]) -> None:
    await eventually(
        lambda: all(
            node.membership is not None
            and len(node.membership.member_ids(MemberState.ALIVE)) == len(nodes)
            for node in nodes
        ),
        10.0,
    )


async def fetch(node: Node, task_id: str, source: CountingSource) -> bytes:
    sha = task_id.removeprefix("sha256:")
    async with node.tasks.open(task_id, source, sha256=sha) as handle:
        return await handle.read(0, handle.info.content_length)


def blob(size: int, seed: int = 7) -> tuple[bytes, str]:
    data = random.Random(seed).randbytes(size)
    return data, "sha256:" + hashlib.sha256(data).hexdigest()


async def test_concurrent_downloads_leave_the_origin_once(tmp_path: Path) -> None:
    data, task_id = blob(12 * MIB + 5)
    sent = [0]
    async with cluster(tmp_path, 4) as nodes:
        # A slow origin, so the others really download while the home does.
        results = await asyncio.gather(*(
            fetch(node, task_id, CountingSource(data, sent, delay=0.002)) for node in nodes
        ))
        assert all(result == data for result in results)
        assert sent[0] == len(data)
        home = task_homes(task_key_for(task_id), [n.member_id or "" for n in nodes])[0]
        for node in nodes:
            assert node.scheduler is not None
            record = node.scheduler.traffic[task_id]
            if node.member_id == home:
                assert (record.origin_bytes, node.scheduler.stats.home_tasks) == (len(data), 1)
            else:
                assert (record.origin_bytes, record.peer_bytes) == (0, len(data))
                assert record.parents
            assert node.scheduler.stats.fallbacks == 0
            info = node.tasks.info(task_id)
            assert info is not None and info.complete
        # A late joiner gets everything from peers.
        late = Node(config_for(tmp_path / "late", join=(str(nodes[0].gossip_address),),
                               node_id="late"))
        await late.start()
        try:
            await converged([*nodes, late])
            if task_homes(task_key_for(task_id), [*(n.member_id or "" for n in nodes),
                                                  "late"])[0] != "late":
                assert await fetch(late, task_id, CountingSource(data, sent)) == data
                assert sent[0] == len(data)
                assert late.scheduler is not None
                assert late.scheduler.traffic[task_id].peer_bytes == len(data)
            status = late.status()
            assert {m["id"] for m in status["members"]} == {"n0", "n1", "n2", "n3", "late"}
        finally:
            await late.stop()


async def test_home_that_stops_is_replaced_and_every_host_completes(tmp_path: Path) -> None:
    data, task_id = blob(16 * MIB, seed=3)
    sent = [0]
    async with cluster(tmp_path, 4) as nodes:
        key = task_key_for(task_id)
        home = task_homes(key, [n.member_id or "" for n in nodes])[0]
        (home_node,) = [n for n in nodes if n.member_id == home]
        others = [n for n in nodes if n is not home_node]
        fetches = [
            asyncio.create_task(fetch(node, task_id, CountingSource(data, sent, delay=0.01)))
            for node in nodes
        ]
        await eventually(lambda: sent[0] >= 4 * MIB, 10.0)
        await home_node.stop()
        fetches[nodes.index(home_node)].cancel()
        results = await asyncio.gather(*(fetches[nodes.index(n)] for n in others))
        assert all(result == data for result in results)
        # The new home fetched what the old one had not passed on; at most twice the blob.
        assert len(data) <= sent[0] <= 2 * len(data)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class StaticMembers:
    """A `MemberView` of fixed members (a home that never answers)."""

    def __init__(self, member_id: str, members: list[Member]) -> None:
        self.member_id = member_id
        self._members = {member.member_id: member for member in members}

    def member_ids(self, *states: MemberState) -> set[str]:
        return set(self._members)

    def member(self, member_id: str) -> Member | None:
        return self._members.get(member_id)


async def test_no_answer_from_any_home_falls_back_to_origin_and_is_counted(
    tmp_path: Path,
) -> None:
    data, task_id = blob(3 * MIB)
    key = task_key_for(task_id)
    # A ghost that ranks first for this task, at a port where nothing listens.
    ghost = next(f"ghost{i}" for i in range(1000) if task_homes(key, [f"ghost{i}", "me"])[0]
                 == f"ghost{i}")
    dead_port = closed_port()
    members = [
        Member(member_id, Address("127.0.0.1", 1), port, {}, Load(), MemberState.ALIVE, 1)
        for member_id, port in ((ghost, dead_port), ("me", dead_port))
    ]
    sent = [0]
    config = config_for(tmp_path, node_id="me")
    metrics = Metrics()
    store = PieceStore(config.store, metrics)
    scheduler_box: list[ClusterScheduler] = []
    manager = TaskManager(store, config.tasks, metrics,
                          source_policy=lambda t, s: scheduler_box[0].source_policy(t, s))
    await store.open()
    async with aiohttp.ClientSession() as session:
        server = PeerServer(TaskManagerPieces(manager), tracker=Tracker(lambda: 0.0),
                            local_id="me")
        scheduler = ClusterScheduler(
            client=PeerClient(session), server=server, bitmap=manager.bitmap, homes=2,
            home_timeout=0.5,
        )
        scheduler.membership = StaticMembers("me", members)
        scheduler_box.append(scheduler)
        try:
            assert not scheduler.is_origin_fetcher(key)
            started = asyncio.get_running_loop().time()
            assert await fetch_manager(manager, task_id, CountingSource(data, sent)) == data
            assert asyncio.get_running_loop().time() - started >= 0.5
            assert sent[0] == len(data)
            assert scheduler.stats.fallbacks == 1 and scheduler.traffic[task_id].fell_back
            assert scheduler.stats.announces_failed >= 1
        finally:
            await manager.close()
            await scheduler.close()
            await store.close()


async def fetch_manager(manager: TaskManager, task_id: str, source: CountingSource) -> bytes:
    async with manager.open(task_id, source, sha256=task_id.removeprefix("sha256:")) as handle:
        return await handle.read(0, handle.info.content_length)


async def test_a_lone_node_is_every_task_s_home(tmp_path: Path) -> None:
    data, task_id = blob(2 * MIB + 1)
    sent = [0]
    async with cluster(tmp_path, 1) as nodes:
        assert await fetch(nodes[0], task_id, CountingSource(data, sent)) == data
        assert sent[0] == len(data)
        assert nodes[0].scheduler is not None
        assert nodes[0].scheduler.stats.home_tasks == 1


async def test_a_node_with_another_cluster_key_is_never_admitted(tmp_path: Path) -> None:
    key, other = tmp_path / "key", tmp_path / "other"
    key.write_text("the cluster's secret\n")
    other.write_text("another secret\n")
    first = Node(config_for(tmp_path / "a", node_id="a", secret_file=key))
    await first.start()
    nodes = [first]
    try:
        seed = (str(first.gossip_address),)
        for node_id, secret in (("b", key), ("intruder", other)):
            node = Node(config_for(tmp_path / node_id, join=seed, node_id=node_id,
                                   secret_file=secret))
            await node.start()
            nodes.append(node)
        await converged(nodes[:2])
        await asyncio.sleep(1.0)
        for node in nodes[:2]:
            assert node.membership is not None
            assert node.membership.member_ids() == {"a", "b"}
        # The seed got the intruder's join packets and dropped every one.
        assert first.membership is not None
        assert first.membership.stats.dropped_unauthenticated > 0
        intruder = nodes[2].membership
        assert intruder is not None and intruder.member_ids() == {"intruder"}
        # Peer HTTP is keyed too: the intruder's client is refused by a member's peer port.
        assert nodes[2].peer_client is not None and nodes[0].peer_address is not None
        address = Address(nodes[0].peer_address.host, nodes[0].peer_address.port)
        with pytest.raises(PeerFailed, match="401"):
            await nodes[2].peer_client.task_state(address, "0" * 64)
        assert nodes[0].peer_server.stats.unauthenticated["invalid"] == 1
        # /status is keyed as well: unsigned or wrongly signed asks are refused.
        status_url = f"http://{nodes[0].peer_address}/status"
        async with aiohttp.ClientSession() as session:
            async with session.get(status_url) as response:
                assert response.status == 401
            assert nodes[2].peer_auth is not None and nodes[1].peer_auth is not None
            wrong = {AUTH_HEADER: nodes[2].peer_auth.sign("GET", "/status")}
            async with session.get(status_url, headers=wrong) as response:
                assert response.status == 401
            right = {AUTH_HEADER: nodes[1].peer_auth.sign("GET", "/status")}
            async with session.get(status_url, headers=right) as response:
                assert response.status == 200
                assert {m["id"] for m in (await response.json())["members"]} >= {"a", "b"}
    finally:
        for node in reversed(nodes):
            await node.stop()


async def test_peers_serving_corrupt_pieces_are_dropped_and_the_download_still_verifies(
    tmp_path: Path,
) -> None:
    """Two peers whose disks went bad (bytes no longer match the digests they recorded): a third
    host detects every bad piece, drops both for the task, and completes with correct bytes."""
    data, task_id = blob(6 * MIB, seed=11)
    sent = [0]
    async with cluster(tmp_path, 3, home_timeout=0.5) as nodes:
        key = task_key_for(task_id)
        ranked = task_homes(key, [n.member_id or "" for n in nodes], 3)
        by_id = {node.member_id: node for node in nodes}
        holders, downloader = [by_id[ranked[0]], by_id[ranked[1]]], by_id[ranked[2]]
        for node in holders:
            assert await fetch(node, task_id, CountingSource(data, sent)) == data
        # The second holder told the home it is complete (so it is offered as a parent).
        await eventually(lambda: any(
            peer.peer_id == ranked[1] and peer.bitmap.complete()
            for peer in holders[0].tracker.peers(key)
        ), 5.0)
        for node in holders:
            path = node.config.store.tasks_dir / f"{key}.data"
            path.write_bytes(bytes(len(data)))  # zeros where the blob was
        before = sent[0]
        assert await fetch(downloader, task_id, CountingSource(data, sent)) == data
        scheduler = downloader.scheduler
        assert scheduler is not None and downloader.peer_client is not None
        assert scheduler.stats.peers_dropped == 2
        assert scheduler.traffic[task_id].dropped == {ranked[0], ranked[1]}
        assert downloader.peer_client.stats.piece_digest_failures >= 2
        # With no good peer left it went to origin (counted), and the blob still verified.
        assert scheduler.stats.fallbacks == 1
        assert sent[0] - before == len(data) - scheduler.traffic[task_id].peer_bytes


# ---------------------------------------------------------------------------------------------
# Home 0 fetches for the swarm


REPOSITORY = "library/app"
TOKEN = "Bearer the-client-token-0123456789"


class BlobOrigin:
    """A real HTTP origin on 127.0.0.1 serving one blob at `/v2/library/app/blobs/DIGEST` with
    range requests, only to requests that carry `TOKEN`; counts the body bytes it sends and
    the bearer of each request (its access log)."""

    def __init__(self, data: bytes, digest: str, *, delay: float = 0.0) -> None:
        self.data = data
        self.digest = digest
        self.delay = delay
        self.sent = 0
        self.refused = 0
        # GETs still to refuse with 403 (an origin that turns one request away).
        self.refuse_gets = 0
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != TOKEN:
            self.refused += 1
            return web.Response(status=401, headers={"WWW-Authenticate": 'Bearer realm="x"'})
        if request.match_info["digest"] != self.digest:
            return web.Response(status=404)
        if request.method == "GET" and self.refuse_gets > 0:
            self.refuse_gets -= 1
            self.refused += 1
            return web.Response(status=403)
        start, end = 0, len(self.data) - 1
        status = 200
        spec = request.headers.get("Range")
        if spec is not None:
            first, _, last = spec.removeprefix("bytes=").partition("-")
            start, end, status = int(first), min(end, int(last)), 206
        headers = {"Content-Length": str(end - start + 1)}
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end}/{len(self.data)}"
        response = web.StreamResponse(status=status, headers=headers)
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        step = 256 * 1024
        for position in range(start, end + 1, step):
            chunk = self.data[position : min(end + 1, position + step)]
            self.sent += len(chunk)
            await asyncio.sleep(self.delay)
            await response.write(chunk)
        await response.write_eof()
        return response

    async def __aenter__(self) -> BlobOrigin:
        app = web.Application()
        app.router.add_route("*", "/v2/library/app/blobs/{digest}", self._blob)
        self._runner, self.port = await serve_in_loop(app)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    @property
    def upstream(self) -> Upstream:
        return Upstream("http", f"127.0.0.1:{self.port}")


def open_blob(
    node: Node, origin: BlobOrigin, authorization: str, *, whole: bool = True
) -> contextlib.AbstractAsyncContextManager[TaskHandle]:
    """The task the proxy opens for a client's blob GET (`whole=False`: as a Range request or
    a Nydus mount reads it): the registry source, the blob's digest."""
    source = node.registry.blob_source(origin.upstream, REPOSITORY, origin.digest, authorization)
    return node.tasks.open(
        origin.digest, source, sha256=origin.digest.removeprefix("sha256:"), whole=whole,
        attributes={UPSTREAM_ATTRIBUTE: str(origin.upstream), REPOSITORY_ATTRIBUTE: REPOSITORY},
    )


async def pull(node: Node, origin: BlobOrigin, authorization: str) -> bytes:
    """What the proxy does for a client's blob GET."""
    async with open_blob(node, origin, authorization) as handle:
        return await handle.read(0, handle.info.content_length)


def blob_homed_on(member_ids: list[str], home: str, size: int) -> tuple[bytes, str]:
    """A blob whose home 0 among `member_ids` is `home`."""
    for seed in range(1000):
        data, digest = blob(size, seed=seed)
        if task_homes(task_key_for(digest), member_ids)[0] == home:
            return data, digest
    raise AssertionError("no blob found")


async def test_home_without_a_client_fetches_for_the_swarm_and_origin_serves_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Hosts A and B pull a blob whose home C gets no client request: C fetches it from origin
    (with the client's credentials, carried by the announce), A and B get it from peers within
    about a second, the origin sends it once, and C holds the verified blob."""
    caplog.set_level("DEBUG")
    async with cluster(tmp_path, 3, home_timeout=5.0) as nodes:
        ids = [node.member_id or "" for node in nodes]
        data, digest = blob_homed_on(ids, "n2", 10 * MIB + 3)
        home, downloaders = nodes[2], nodes[:2]
        async with BlobOrigin(data, digest, delay=0.002) as origin:
            started = asyncio.get_running_loop().time()
            results = await asyncio.gather(*(pull(node, origin, TOKEN) for node in downloaders))
            elapsed = asyncio.get_running_loop().time() - started
            assert results == [data, data]
            assert origin.sent == len(data) and origin.refused == 0
            assert elapsed < 5.0  # well before the home timeout: nobody fell back
            for node in downloaders:
                assert node.scheduler is not None
                record = node.scheduler.traffic[digest]
                assert (record.origin_bytes, record.peer_bytes) == (0, len(data))
                assert node.scheduler.stats.fallbacks == 0
            assert home.scheduler is not None
            await eventually(lambda: home.scheduler is not None
                             and home.scheduler.stats.seeds_completed == 1, 5.0)
            assert home.scheduler.stats.seeds_started == 1
            assert home.scheduler.stats.home_tasks == 1
            info = home.tasks.info(digest)
            assert info is not None and info.complete
            assert info.attributes[REPOSITORY_ATTRIBUTE] == REPOSITORY
            # The home's own client, later, is served from its store (nothing from origin).
            assert await pull(home, origin, TOKEN) == data
            assert origin.sent == len(data)
    token = TOKEN.split()[1]
    assert not [record for record in caplog.records if token in record.getMessage()]


async def test_a_lazy_read_off_home_gets_its_blocks_from_the_home_before_its_download_does(
    tmp_path: Path,
) -> None:
    """A lazy reader (a Nydus mount's chunk) on a host that is not the blob's home, of part of
    the last piece while no host holds it: home 0 is asked for just those bytes, fetches their
    blocks from origin first, and answers long before its whole download reaches that piece;
    the origin still sends the blob exactly once."""
    async with cluster(tmp_path, 3, home_timeout=30.0) as nodes:
        ids = [node.member_id or "" for node in nodes]
        data, digest = blob_homed_on(ids, "n2", 16 * MIB)
        home, reader = nodes[2], nodes[0]
        assert home.scheduler is not None and reader.scheduler is not None
        async with BlobOrigin(data, digest, delay=0.05) as origin:
            wanted = (15 * MIB + 100_000, 5000)
            async with open_blob(reader, origin, TOKEN, whole=False) as handle:
                assert await handle.read(*wanted) == data[wanted[0] : sum(wanted)]
                home_info = home.tasks.info(digest)
                assert home_info is not None and home_info.pieces_done < home_info.piece_count
            assert home.peer_server.stats.ranges_served >= 1
            assert reader.scheduler.stats.range_bytes >= wanted[1]
            assert reader.scheduler.stats.origin_bytes == 0
            info = reader.tasks.info(digest)
            assert info is not None and info.pieces_done == 0  # blocks only, no whole piece
            # Then, its lazy reader quiet, the home fetches the rest for the swarm.
            await eventually(lambda: home.scheduler is not None
                             and home.scheduler.stats.seeds_completed == 1, 20.0)
            assert origin.sent == len(data)


async def test_a_lazy_seed_fetches_all_at_once_when_a_whole_download_announces(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Home 0 fetching only what a lazy reader asks for goes on to the whole blob as soon as a
    host downloading all of it announces, without waiting for the lazy reader to go quiet."""
    caplog.set_level("INFO")
    async with cluster(tmp_path, 3, home_timeout=30.0) as nodes:
        ids = [node.member_id or "" for node in nodes]
        data, digest = blob_homed_on(ids, "n2", 8 * MIB + 1)
        home, lazy_reader, puller = nodes[2], nodes[0], nodes[1]
        assert home.scheduler is not None
        async with BlobOrigin(data, digest) as origin:
            async with open_blob(lazy_reader, origin, TOKEN, whole=False) as handle:
                assert await handle.read(3 * MIB + 5, 10) == data[3 * MIB + 5 : 3 * MIB + 15]
                assert origin.sent < MIB  # the home fetched a block, not the blob
                # The lazy reader keeps asking (never quiet) while another host pulls it all.
                keep_reading = asyncio.create_task(read_every_block(handle, len(data)))
                try:
                    assert await pull(puller, origin, TOKEN) == data
                finally:
                    keep_reading.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await keep_reading
            await eventually(lambda: home.scheduler is not None
                             and home.scheduler.stats.seeds_completed == 1, 10.0)
            assert origin.sent == len(data)
    assert "went quiet" not in caplog.text


async def test_a_lazy_reader_whose_home_leaves_reads_on_through_the_next_home(
    tmp_path: Path,
) -> None:
    """A Nydus mount keeps reading while its blob's home 0 stops: the next read goes to the new
    home 0 (home 1 until then), which fetches the range from origin; no fallback to origin on
    the reader, and the bytes are right."""
    async with cluster(tmp_path, 3, home_timeout=30.0) as nodes:
        ids = [node.member_id or "" for node in nodes]
        data, digest = blob_homed_on(ids, "n2", 8 * MIB)
        reader = nodes[0]
        successor = task_homes(task_key_for(digest), ids[:2])[0]
        assert successor == "n1"  # not the reader itself (that would read from origin)
        assert reader.scheduler is not None
        async with BlobOrigin(data, digest) as origin:
            async with open_blob(reader, origin, TOKEN, whole=False) as handle:
                assert await handle.read(MIB + 5, 10) == data[MIB + 5 : MIB + 15]
                await nodes[2].stop()
                await eventually(lambda: reader.scheduler is not None
                                 and reader.scheduler.homes(task_key_for(digest))[0]
                                 == successor, 10.0)
                assert await handle.read(6 * MIB + 5, 10) == data[6 * MIB + 5 : 6 * MIB + 15]
            assert reader.scheduler.stats.origin_bytes == 0
            assert reader.scheduler.stats.fallbacks == 0
            new_home = nodes[ids.index(successor)]
            assert new_home.scheduler is not None
            assert new_home.scheduler.stats.seeds_started == 1
            assert new_home.peer_server.stats.ranges_served >= 1


async def read_every_block(handle: TaskHandle, length: int) -> None:
    """A lazy reader that never goes quiet: one small read every 0.1 s, across the content."""
    for offset in itertools.cycle(range(0, length, 64 * 1024)):
        await handle.read(offset, min(100, length - offset))
        await asyncio.sleep(0.1)


async def test_a_home_that_cannot_fetch_says_so_and_the_downloader_goes_to_origin_at_once(
    tmp_path: Path,
) -> None:
    """The origin refuses the home's GET (403): home 0 answers that its origin fetch failed,
    and the downloader goes to origin itself at once (counted), not after the home timeout."""
    async with cluster(tmp_path, 2, home_timeout=5.0) as nodes:
        data, digest = blob_homed_on([node.member_id or "" for node in nodes], "n1", 3 * MIB)
        async with BlobOrigin(data, digest) as origin:
            origin.refuse_gets = 1
            started = asyncio.get_running_loop().time()
            assert await pull(nodes[0], origin, TOKEN) == data
            assert asyncio.get_running_loop().time() - started < 4.0
            assert nodes[1].scheduler is not None and nodes[0].scheduler is not None
            assert nodes[1].scheduler.stats.seeds_failed == 1
            assert nodes[0].scheduler.stats.home_origin_failures == 1
            assert nodes[0].scheduler.stats.fallbacks == 1
            # The host's own copy, plus what the home's other piece workers got before the
            # refusal failed its task.
            assert origin.refused == 1 and len(data) <= origin.sent <= 2 * len(data)


async def test_an_announce_whose_origin_names_another_task_is_refused(tmp_path: Path) -> None:
    async with cluster(tmp_path, 2) as nodes:
        _, digest = blob(MIB, seed=5)
        _, other = blob(MIB, seed=6)
        client, address = nodes[0].peer_client, nodes[1].peer_address
        assert client is not None and address is not None
        origin = OriginRequest(other, f"http://127.0.0.1:1/v2/{REPOSITORY}/blobs/{other}",
                               (("Authorization", TOKEN),))
        announce = AnnounceRequest("n0", MIB, Bitmap.empty(1), origin=origin)
        with pytest.raises(PeerFailed, match="400"):
            await client.announce(Address(address.host, address.port), task_key_for(digest),
                                  announce)
        assert nodes[1].peer_server.stats.bad_requests == 1
        assert nodes[1].scheduler is not None
        assert nodes[1].scheduler.stats.seeds_started == 0


def test_registry_origins_build_the_registry_source_and_refuse_anything_else() -> None:
    origins = RegistryOrigins(RegistryClient(RegistryConfig(), Metrics()))
    digest = "sha256:" + "ab" * 32
    url = f"http://127.0.0.1:5000/v2/{REPOSITORY}/blobs/{digest}"
    plan = origins(OriginRequest(digest, url, (("Authorization", TOKEN),)), 42)
    assert isinstance(plan.source, OriginBlob) and str(plan.source.url) == url
    assert plan.source._headers() == {"Authorization": TOKEN}
    assert plan.sha256 == "ab" * 32
    assert plan.attributes == {UPSTREAM_ATTRIBUTE: "http://127.0.0.1:5000",
                               REPOSITORY_ATTRIBUTE: REPOSITORY}
    for bad_url in (
        "http://127.0.0.1:5000/files/a.tar",  # not a registry blob
        f"http://127.0.0.1:5000/v2/Bad..Name/blobs/{digest}",  # not a repository name
        f"http://REGISTRY.example/v2/{REPOSITORY}/blobs/{digest}",  # host not in normal form
        f"http://127.0.0.1:5000/v2/{REPOSITORY}/blobs/{digest}?x=1",
    ):
        with pytest.raises(InvalidRequest):
            origins(OriginRequest(digest, bad_url), 42)
    with pytest.raises(InvalidRequest):  # the task id is not the blob's digest
        origins(OriginRequest("sha256:" + "cd" * 32, url), 42)
