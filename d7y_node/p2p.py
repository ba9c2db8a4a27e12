"""Where a task's bytes come from in a cluster: the origin (on the task's home) or peers.

Owns `ClusterScheduler`, the `TaskManager`'s source policy: every origin source the proxy opens
a task with is wrapped in a `ClusterSource`, which decides per read:

- this host is the task's home 0 (rendezvous hashing over alive members), or the cluster is not
  running → read from the origin; the home's tracker (in `PeerServer`) lists it as a parent;
- else → announce to the task's homes in order (home 0, then home 1, …; this host's own tracker
  when it is one of them), get ranked parents and read the pieces from them (`PeerPieceSource`:
  several parents at once, each piece verified by its xxh3, a parent that sends a corrupt piece
  dropped for the task);
- no home answered and the swarm made no progress for `home_timeout` → fall back to the origin
  for the rest of this task (counted in `fallbacks`).

Home 0 passes every announce it gets on to the other homes (`replicate`), so when it dies home 1
already knows the swarm; once membership declares home 0 dead, home 1 ranks first and becomes
the origin fetcher. The whole content's sha256 still decides completion (`tasks.py`).

Also owns the per-task traffic record (`TaskTraffic`: origin and peer bytes, parents) that
`d7y-node status` shows. Does not speak HTTP itself (`peer.py`), rank parents (`scheduler.py`),
know liveness (`gossip`) or store bytes (`tasks.py`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from d7y_node.errors import InvalidRequest, PeerFailed, UpstreamUnavailable
from d7y_node.gossip.members import Member
from d7y_node.gossip.messages import Address, MemberState
from d7y_node.peer import PeerClient, PeerPieceSource, PeerServer, task_key_for
from d7y_node.scheduler import (
    AnnounceReply,
    AnnounceRequest,
    Bitmap,
    Parent,
    PeerHealth,
    piece_count_for,
    task_homes,
)
from d7y_node.tasks import PieceSource, TaskInfo

log = logging.getLogger(__name__)

# Members that count when ranking homes: a suspect member is still alive until declared dead
# (moving homes on every suspicion would send hosts to origin for nothing).
HOME_STATES = (MemberState.ALIVE, MemberState.SUSPECT)
# A downloader's parents are asked for again at most this often per task (several piece
# workers ask at once when they run out of parents; one announce answers them all).
ANNOUNCE_MIN_INTERVAL = 0.2
# While a download runs from peers, its home hears from it this often: the home learns which
# pieces it can pass on (so later downloaders spread over the swarm, not all on the home), and
# it learns which parents got more.
REANNOUNCE_INTERVAL = 1.0
# A host that got a task from peers tells its home once the task is complete, so later
# downloaders find it as a parent; it waits for that at most this long per poll.
COMPLETION_POLL_SECONDS = 30.0
# Wait before trying peers again after none could give a piece (they are still downloading).
PEER_RETRY_DELAY = 0.25
# Announces copied to the other homes at once; beyond this many in flight, copies are dropped
# (counted): the next announce of the same peer carries the same news.
MAX_REPLICATIONS_IN_FLIGHT = 256
# Tasks whose traffic is remembered for `status` (least recently opened forgotten first).
MAX_TRAFFIC_RECORDS = 256


class MemberView(Protocol):
    """What the scheduler reads of membership (a gossip `Membership` is one)."""

    member_id: str

    def member_ids(self, *states: MemberState) -> set[str]: ...

    def member(self, member_id: str) -> Member | None: ...


@dataclass
class TaskTraffic:
    """Where one task's bytes came from on this host."""

    task_id: str
    origin_bytes: int = 0
    peer_bytes: int = 0
    # Parents that gave at least one piece.
    parents: set[str] = field(default_factory=set)
    # Parents dropped for a corrupt piece.
    dropped: set[str] = field(default_factory=set)
    # True once this host went to origin because no home answered in time.
    fell_back: bool = False


@dataclass
class ClusterStats:
    """Counters of the scheduling path; the node exports them as metrics."""

    origin_bytes: int = 0
    peer_bytes: int = 0
    # Tasks this host fetched from origin as their home 0.
    home_tasks: int = 0
    # Tasks that went to origin because no home answered (and the swarm stalled) in time.
    fallbacks: int = 0
    announces_sent: int = 0
    announces_failed: int = 0
    replications: int = 0
    replications_dropped: int = 0
    # Parents dropped for a task because a piece did not match its xxh3.
    peers_dropped: int = 0


class ClusterScheduler:
    """The cluster's side of every download on this host (see the module docstring)."""

    def __init__(
        self,
        *,
        client: PeerClient,
        server: PeerServer,
        bitmap: Callable[[str], bytes | None],
        homes: int,
        home_timeout: float,
        labels: Mapping[str, str] | None = None,
        health: PeerHealth | None = None,
        clock: Callable[[], float] | None = None,
        wait_pieces: WaitPieces | None = None,
    ) -> None:
        self.client = client
        self.server = server
        # The held-pieces flags of a task by id (`TaskManager.bitmap`).
        self._bitmap = bitmap
        # `TaskManager.wait_pieces`: lets a downloader announce once its task is complete.
        self._wait_pieces = wait_pieces
        self._completions: dict[str, asyncio.Task[None]] = {}
        self.homes_count = homes
        self.home_timeout = home_timeout
        self.labels = dict(labels or {})
        self.health = health or PeerHealth(clock or _loop_time)
        self._clock = clock or _loop_time
        # Set once gossip runs; until then (and after it stops) every task goes to origin.
        self.membership: MemberView | None = None
        self.stats = ClusterStats()
        self.traffic: OrderedDict[str, TaskTraffic] = OrderedDict()
        self._replications: set[asyncio.Task[None]] = set()

    # -- the policy --------------------------------------------------------------------------

    def source_policy(self, task_id: str, origin: PieceSource) -> PieceSource:
        """`TaskManager`'s source policy: wrap the origin source of `task_id`."""
        return ClusterSource(self, task_id, origin)

    def record(self, task_id: str) -> TaskTraffic:
        traffic = self.traffic.pop(task_id, None) or TaskTraffic(task_id)
        self.traffic[task_id] = traffic
        while len(self.traffic) > MAX_TRAFFIC_RECORDS:
            self.traffic.popitem(last=False)
        return traffic

    # -- homes -------------------------------------------------------------------------------

    def homes(self, task_key: str) -> list[str]:
        """The task's homes among the live members, home 0 first; [] without a cluster."""
        membership = self.membership
        if membership is None:
            return []
        return task_homes(task_key, membership.member_ids(*HOME_STATES), self.homes_count)

    def is_origin_fetcher(self, task_key: str) -> bool:
        """Whether this host fetches the task from origin itself (it is home 0, or alone)."""
        membership = self.membership
        homes = self.homes(task_key)
        return membership is None or not homes or homes[0] == membership.member_id

    # -- announces ---------------------------------------------------------------------------

    def _announce_of(self, task_id: str, content_length: int) -> AnnounceRequest:
        membership = self.membership
        assert membership is not None
        count = piece_count_for(content_length)
        flags = self._bitmap(task_id)
        bitmap = (
            Bitmap.from_flags(flags) if flags is not None and len(flags) == count
            else Bitmap.empty(count)
        )
        return AnnounceRequest(membership.member_id, content_length, bitmap)

    async def announce(self, task_id: str, content_length: int) -> list[Parent]:
        """Tell the task's homes what we hold; the parents the first one to answer ranks for
        us. Raises `UpstreamUnavailable` when no home answers."""
        membership = self.membership
        if membership is None:
            raise UpstreamUnavailable("the cluster is not running")
        task_key = task_key_for(task_id)
        announce = self._announce_of(task_id, content_length)
        errors: list[str] = []
        for home in self.homes(task_key):
            if home == membership.member_id:
                if self.server.tracker is None:
                    continue
                try:
                    self.server.tracker.announce(task_key, home, announce.bitmap)
                except InvalidRequest as error:
                    errors.append(f"own tracker: {error.message}")
                    continue
                self.replicate(task_key, announce)
                return self.server.parents_for(task_key, announce)
            member = membership.member(home)
            address = member.peer_address if member is not None else None
            if address is None:
                errors.append(f"{home}: no peer address")
                continue
            self.stats.announces_sent += 1
            try:
                reply: AnnounceReply = await self.client.announce(
                    address, task_key, announce, peer=home
                )
            except PeerFailed as error:
                self.stats.announces_failed += 1
                errors.append(str(error))
                continue
            return list(reply.parents)
        raise UpstreamUnavailable(
            f"no home of task {task_key[:12]} answered: {'; '.join(errors) or 'no homes'}"
        )

    def replicate(self, task_key: str, announce: AnnounceRequest) -> None:
        """Copy an announce to the task's other homes (`PeerServer`'s replicate hook); never
        blocks, never raises."""
        membership = self.membership
        if membership is None or announce.forwarded:
            return
        copy = dataclasses.replace(announce, forwarded=True)
        for home in self.homes(task_key)[1:]:
            if home == membership.member_id:
                continue
            member = membership.member(home)
            address = member.peer_address if member is not None else None
            if address is None:
                continue
            if len(self._replications) >= MAX_REPLICATIONS_IN_FLIGHT:
                self.stats.replications_dropped += 1
                continue
            self.stats.replications += 1
            task = asyncio.get_running_loop().create_task(
                self._replicate_to(address, home, task_key, copy)
            )
            self._replications.add(task)
            task.add_done_callback(self._replications.discard)

    async def _replicate_to(
        self, address: Address, home: str, task_key: str, announce: AnnounceRequest
    ) -> None:
        try:
            await self.client.announce(address, task_key, announce, peer=home)
        except PeerFailed as error:
            self.stats.replications_dropped += 1
            log.debug("copy of an announce to %s failed: %s", home, error)

    def announce_when_complete(self, task_id: str, content_length: int) -> None:
        """Once the task is complete here, announce it to its homes (once per task)."""
        if self._wait_pieces is None or task_id in self._completions:
            return
        task = asyncio.get_running_loop().create_task(
            self._announce_completion(task_id, content_length),
            name=f"announce completion {task_id}",
        )
        self._completions[task_id] = task
        task.add_done_callback(lambda _: self._completions.pop(task_id, None))

    async def _announce_completion(self, task_id: str, content_length: int) -> None:
        assert self._wait_pieces is not None
        pieces_done = -1
        while True:
            info = await self._wait_pieces(task_id, pieces_done, COMPLETION_POLL_SECONDS)
            if info is None or info.complete:
                break
            if info.pieces_done == pieces_done:
                return  # no piece for a whole poll: a stopped or lazy download
            pieces_done = info.pieces_done
        if info is None or self.membership is None or self.is_origin_fetcher(
            task_key_for(task_id)
        ):
            return
        try:
            await self.announce(task_id, content_length)
        except UpstreamUnavailable as error:
            log.debug("task %s: could not announce its completion: %s", task_id, error)

    def forget_member(self, member_id: str) -> None:
        """A member died or left: its pieces are gone from every swarm we track."""
        if self.server.tracker is not None:
            self.server.tracker.remove_member(member_id)

    async def close(self) -> None:
        tasks = [*self._replications, *self._completions.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


WaitPieces = Callable[[str, int, float], Awaitable[TaskInfo | None]]


def _loop_time() -> float:
    return asyncio.get_running_loop().time()


class _HomeFinder:
    """A `ParentFinder` for one task: announces to its homes (at most every
    `ANNOUNCE_MIN_INTERVAL`, concurrent callers sharing one announce) and notes progress of the
    swarm (more pieces held by the parents than before) for the stall clock."""

    def __init__(self, source: ClusterSource, content_length: int) -> None:
        self._source = source
        self._content_length = content_length
        self._last: list[Parent] = []
        self._last_at: float | None = None
        self._pending: asyncio.Future[list[Parent]] | None = None
        self._swarm_pieces = -1

    async def parents(self) -> Sequence[Parent]:
        scheduler = self._source.scheduler
        now = scheduler._clock()
        if self._last_at is not None and now - self._last_at < ANNOUNCE_MIN_INTERVAL:
            return self._last
        if self._pending is not None:
            return await asyncio.shield(self._pending)
        self._pending = asyncio.get_running_loop().create_future()
        pending = self._pending
        try:
            found = await scheduler.announce(self._source.task_id, self._content_length)
        except BaseException as error:
            self._pending = None
            # Callers sharing this announce were not cancelled themselves: they get a failure
            # they retry, not a cancellation that would end their piece worker.
            shared = (
                UpstreamUnavailable("the announce was cancelled")
                if isinstance(error, asyncio.CancelledError) else error
            )
            pending.set_exception(shared)
            pending.exception()  # retrieved: callers that wait on it re-raise it themselves
            raise
        self._pending = None
        pending.set_result(found)
        self._last, self._last_at = found, scheduler._clock()
        union = 0
        for parent in found:
            union |= parent.bitmap.as_int()
        pieces = union.bit_count()
        if pieces > self._swarm_pieces:
            self._swarm_pieces = pieces
            self._source.progressed()
        return found


class ClusterSource:
    """A `tasks.PieceSource` for one task in a cluster: origin on its home 0 (or after a
    fallback), peers everywhere else (see the module docstring)."""

    def __init__(self, scheduler: ClusterScheduler, task_id: str, origin: PieceSource) -> None:
        self.scheduler = scheduler
        self.task_id = task_id
        self.task_key = task_key_for(task_id)
        self.origin = origin
        self._peers: PeerPieceSource | None = None
        self._fallback = False
        self._counted_home = False
        # Loop time of the last sign of life from the swarm (a piece, a home's answer showing
        # more pieces); None until the first read.
        self._progress_at: float | None = None

    async def content_length(self) -> int:
        return await self.origin.content_length()

    def progressed(self) -> None:
        self._progress_at = self.scheduler._clock()

    def _stalled(self) -> bool:
        if self._progress_at is None:
            self.progressed()
            return False
        return self.scheduler._clock() - self._progress_at >= self.scheduler.home_timeout

    async def _peer_source(self) -> PeerPieceSource:
        if self._peers is None:
            scheduler = self.scheduler
            membership = scheduler.membership
            assert membership is not None
            length = await self.origin.content_length()
            self._peers = PeerPieceSource(
                scheduler.client, self.task_key, content_length=length,
                finder=_HomeFinder(self, length), health=scheduler.health,
                local_id=membership.member_id, local_labels=scheduler.labels,
                refresh_interval=REANNOUNCE_INTERVAL,
            )
        return self._peers

    async def read(self, offset: int, length: int) -> AsyncIterator[bytes]:
        scheduler = self.scheduler
        traffic = scheduler.record(self.task_id)
        position, end = offset, offset + length
        if self._progress_at is None:
            self.progressed()
        while position < end:
            if self._fallback or scheduler.is_origin_fetcher(self.task_key):
                if not self._fallback and not self._counted_home:
                    self._counted_home = True
                    scheduler.stats.home_tasks += 1
                async for chunk in self.origin.read(position, end - position):
                    position += len(chunk)
                    traffic.origin_bytes += len(chunk)
                    scheduler.stats.origin_bytes += len(chunk)
                    yield chunk
                return
            peers = await self._peer_source()
            scheduler.announce_when_complete(self.task_id, await self.origin.content_length())
            pieces_before = peers.stats.pieces_from_peers
            try:
                async for chunk in peers.read(position, end - position):
                    position += len(chunk)
                    traffic.peer_bytes += len(chunk)
                    scheduler.stats.peer_bytes += len(chunk)
                    self.progressed()
                    yield chunk
            except UpstreamUnavailable as error:
                self._note_parents(peers, traffic, pieces_before)
                if self._fallback:
                    continue  # another piece's read decided it meanwhile
                if self._stalled():
                    self._fallback = True
                    traffic.fell_back = True
                    scheduler.stats.fallbacks += 1
                    log.warning("task %s: no home answered and no peer progressed for %gs; "
                                "fetching from origin (%s)", self.task_id,
                                scheduler.home_timeout, error)
                    continue
                log.debug("task %s: peers cannot give bytes %d+ yet: %s", self.task_id,
                          position, error)
                await asyncio.sleep(PEER_RETRY_DELAY)
                continue
            self._note_parents(peers, traffic, pieces_before)

    def _note_parents(
        self, peers: PeerPieceSource, traffic: TaskTraffic, pieces_before: int
    ) -> None:
        new_drops = peers.dropped - traffic.dropped
        if new_drops:
            self.scheduler.stats.peers_dropped += len(new_drops)
            traffic.dropped |= new_drops
        if peers.stats.pieces_from_peers > pieces_before:
            traffic.parents.update(peers.served_by)
