"""Where a task's bytes come from in a cluster: the origin (on the task's home) or peers.

Owns `ClusterScheduler`, the `TaskManager`'s source policy: every origin source the proxy opens
a task with is wrapped in a `ClusterSource`, which decides per read:

- this host is the task's home 0 (rendezvous hashing over alive members), or the cluster is not
  running → read from the origin; the home's tracker (in `PeerServer`) lists it as a parent;
- else → announce to the task's homes in order (home 0, then home 1, …; this host's own tracker
  when it is one of them), get ranked parents and read the pieces from them (`PeerPieceSource`:
  several parents at once, each piece verified by its xxh3, a parent that sends a corrupt piece
  dropped for the task);
- a read of part of a piece (a lazy download's blocks: a Nydus mount's chunks) that no known
  parent holds → ask home 0 for just those bytes (`PeerClient.fetch_range`): home 0 holds the
  request until its own download has them, and fetches them from origin before anything else,
  so a container's first reads wait for their blocks, not for the home's whole download to
  reach them; a part of a piece a parent holds is asked of that parent, at once;
- no home answered and the swarm made no progress for `home_timeout` → fall back to the origin
  for the rest of this task (counted in `fallbacks`); likewise at once when home 0 answers that
  it could not fetch the task from origin (`AnnounceReply.origin_error`).

Home 0 fetches for the swarm: every announce carries the task's `OriginRequest` (its URL and the
client's `Authorization`, taken from the origin source: `origin_request_of`), and home 0, on an
announce for a task it neither holds nor fetches, starts its own whole download from origin
(`ClusterScheduler.seed`, building the source with `RegistryOrigins`), so the downloaders get it
as a parent within about a piece's time, and the blob leaves the origin once even when no client
asked home 0 itself. The credentials travel over the peer channel, which only a cluster key
authenticates: set `--secret-file` whenever registries need credentials. They are never logged
(`OriginRequest`'s repr leaves them out) and never copied on to home 1.

Home 0 passes every announce it gets on to the other homes (`replicate`), so when it dies home 1
already knows the swarm; once membership declares home 0 dead, home 1 ranks first and becomes
the origin fetcher. The whole content's sha256 still decides completion (`tasks.py`).

Also owns the per-task traffic record (`TaskTraffic`: origin and peer bytes, parents) that
`d7y-node status` shows. Does not speak HTTP itself (`peer.py`), rank parents (`scheduler.py`),
know liveness (`gossip`) or store bytes (`tasks.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from d7y_node.errors import (
    D7yError,
    InvalidRequest,
    PeerBusy,
    PeerFailed,
    PieceCorrupt,
    UpstreamUnavailable,
)
from d7y_node.gossip.members import Member
from d7y_node.gossip.messages import Address, MemberState
from d7y_node.peer import PeerClient, PeerPieceSource, PeerServer, task_key_for
from d7y_node.proxy import REPOSITORY_ATTRIBUTE, UPSTREAM_ATTRIBUTE
from d7y_node.registry import OriginBlob, RegistryClient, parse_upstream_url
from d7y_node.scheduler import (
    ORIGIN_ERROR_MAX_BYTES,
    AnnounceReply,
    AnnounceRequest,
    Bitmap,
    OriginRequest,
    Parent,
    PeerHealth,
    check_origin_request,
    piece_count_for,
    task_homes,
)
from d7y_node.tasks import PieceSource, TaskHandle, TaskInfo

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
# Home 0 fetching a task for lazy readers only (every announce said `lazy`) fetches just what
# they ask for until no read asked for missing bytes for this long, then the rest of the task:
# the rest would share the origin link with the reads a container's start is waiting on.
SEED_QUIET_SECONDS = 1.0
# How long home 0 may take to fetch a range a lazy reader asks it for (it fetches such ranges
# before the rest of its download; at 100 Mbit/s a 1 MiB chunk takes 0.1 s).
RANGE_WAIT = 10.0
# Announces copied to the other homes at once; beyond this many in flight, copies are dropped
# (counted): the next announce of the same peer carries the same news.
MAX_REPLICATIONS_IN_FLIGHT = 256
# Tasks whose traffic is remembered for `status` (least recently opened forgotten first).
MAX_TRAFFIC_RECORDS = 256
# Origin downloads a home runs for swarms at once: each is a whole blob from origin; beyond this
# many, announces wait (their downloaders fall back after `home_timeout` if nothing moves), so
# a flood of announces cannot make one host fetch the whole registry at once.
MAX_SEEDS = 64
# A home that could not fetch a task answers so for this long (downloaders go to origin
# themselves at once); after it, the next announce makes it try again.
SEED_FAILURE_MEMORY = 30.0
# Failures remembered at most (the oldest forgotten first).
MAX_SEED_FAILURES = 1024
# A registry blob URL as `RegistryClient.blob_url` builds it: scheme, host[:port], repository,
# sha256 digest; nothing else (no user info, query or fragment).
_REGISTRY_BLOB_URL = re.compile(
    r"(?P<scheme>https?)://(?P<host>[^/?#@]+)/v2/(?P<repository>[^?#]+)/blobs/"
    r"(?P<digest>sha256:[0-9a-f]{64})"
)
# The distribution spec's repository name grammar.
_REPOSITORY = re.compile(
    r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*"
)
# The distribution spec bounds a repository name to 255 characters.
MAX_REPOSITORY_LENGTH = 255


@runtime_checkable
class DescribedOrigin(Protocol):
    """A `PieceSource` that can say how another host would fetch it (a URL source of
    `d7y-node get` may implement it; registry blobs are described by `origin_request_of`)."""

    def origin_request(self, task_id: str) -> OriginRequest | None: ...


def origin_request_of(task_id: str, source: PieceSource) -> OriginRequest | None:
    """How the task's home could fetch `source` itself: its URL and the client's credentials;
    None for a source no other host can fetch (bytes in memory, a test double)."""
    request: OriginRequest | None
    if isinstance(source, OriginBlob):
        # `_headers` is the registry source's own request headers: the client's Authorization.
        headers = tuple(sorted(source._headers().items()))
        request = OriginRequest(task_id, str(source.url), headers)
    elif isinstance(source, DescribedOrigin):
        request = source.origin_request(task_id)
    else:
        return None
    if request is None:
        return None
    try:
        return check_origin_request(request)
    except InvalidRequest as error:
        log.debug("task %s: its origin cannot be described to its home: %s", task_id,
                  error.message)
        return None


@dataclass(frozen=True)
class OriginPlan:
    """What a home opens to fetch a task for the swarm: the source, the digest the content
    must hash to (hex sha256, if known) and the task's attributes (as its proxy would set
    them, so a later client request of the home itself finds the task its own)."""

    source: PieceSource
    sha256: str | None
    attributes: Mapping[str, str]


class OriginSources(Protocol):
    """Builds a home's origin source from a downloader's `OriginRequest`; raises
    `InvalidRequest` for a request it does not support."""

    def __call__(self, request: OriginRequest, content_length: int) -> OriginPlan: ...


class RegistryOrigins:
    """`OriginSources` for registry blobs: `scheme://host/v2/NAME/blobs/sha256:…` becomes the
    registry client's own `OriginBlob`, with the client's `Authorization`."""

    def __init__(self, registry: RegistryClient) -> None:
        self._registry = registry

    def __call__(self, request: OriginRequest, content_length: int) -> OriginPlan:
        match = _REGISTRY_BLOB_URL.fullmatch(request.url)
        repository = match.group("repository") if match is not None else ""
        if (
            match is None
            or len(repository) > MAX_REPOSITORY_LENGTH
            or not _REPOSITORY.fullmatch(repository)
        ):
            raise InvalidRequest("ORIGIN_UNSUPPORTED", "not a registry blob URL")
        digest = match.group("digest")
        if request.task_id != digest:
            raise InvalidRequest("ORIGIN_MISMATCH", "the task id is not the blob's digest")
        upstream = parse_upstream_url(
            f"{match.group('scheme')}://{match.group('host')}",
            self._registry.config.insecure_registries, "origin URL",
        )
        if upstream.host != match.group("host"):
            raise InvalidRequest("ORIGIN_UNSUPPORTED", "the origin host is not in normal form")
        authorization = next(
            (value for name, value in request.headers if name.lower() == "authorization"), None
        )
        source = self._registry.blob_source(
            upstream, repository, digest, authorization, content_length=content_length
        )
        return OriginPlan(
            source, digest.removeprefix("sha256:"),
            {UPSTREAM_ATTRIBUTE: str(upstream), REPOSITORY_ATTRIBUTE: repository},
        )


class OpenTask(Protocol):
    """`TaskManager.open`, as a home uses it to fetch a task for the swarm."""

    def __call__(
        self,
        task_id: str,
        source: PieceSource | None,
        *,
        content_length: int | None = None,
        sha256: str | None = None,
        attributes: Mapping[str, str] | None = None,
        whole: bool = True,
    ) -> AbstractAsyncContextManager[TaskHandle]: ...


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
    # Of the peer bytes, those read as parts of pieces (a lazy download's blocks).
    range_bytes: int = 0
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
    # Origin downloads this host started as home 0 on an announce (no client of its own):
    # started, completed, failed, and announces that found `MAX_SEEDS` running.
    seeds_started: int = 0
    seeds_completed: int = 0
    seeds_failed: int = 0
    seeds_refused: int = 0
    # Tasks that went to origin at once because their home could not fetch them.
    home_origin_failures: int = 0


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
        open_task: OpenTask | None = None,
        origins: OriginSources | None = None,
        last_read: Callable[[str], float | None] | None = None,
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
        # Home 0's origin downloads for swarms (`seed`): need both to run.
        self._open_task = open_task
        self._origins = origins
        self._seeds: dict[str, asyncio.Task[None]] = {}
        # Seeds fetching for lazy readers only, set once an announce wants the whole task.
        self._lazy_seeds: dict[str, asyncio.Event] = {}
        # `TaskManager.last_read`: when a read of a task last waited for missing bytes.
        self._last_read = last_read
        # task id → (clock time, why) of the latest failed origin download for a swarm.
        self._seed_failures: OrderedDict[str, tuple[float, str]] = OrderedDict()

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

    def _announce_of(
        self, task_id: str, content_length: int, origin: OriginRequest | None, lazy: bool
    ) -> AnnounceRequest:
        membership = self.membership
        assert membership is not None
        count = piece_count_for(content_length)
        flags = self._bitmap(task_id)
        bitmap = (
            Bitmap.from_flags(flags) if flags is not None and len(flags) == count
            else Bitmap.empty(count)
        )
        return AnnounceRequest(
            membership.member_id, content_length, bitmap, origin=origin, lazy=lazy
        )

    async def announce(
        self, task_id: str, content_length: int, origin: OriginRequest | None = None
    ) -> list[Parent]:
        """Tell the task's homes what we hold; the parents the first one to answer ranks for
        us. Raises `UpstreamUnavailable` when no home answers."""
        return list((await self.announce_to_homes(task_id, content_length, origin)).parents)

    async def announce_to_homes(
        self, task_id: str, content_length: int, origin: OriginRequest | None = None,
        *, lazy: bool = False,
    ) -> AnnounceReply:
        """Tell the task's homes what we hold (and, with `origin`, how home 0 can fetch the
        task; with `lazy`, that we read only parts of it); the answer of the first home that
        answers. Raises `UpstreamUnavailable` when no home answers."""
        membership = self.membership
        if membership is None:
            raise UpstreamUnavailable("the cluster is not running")
        task_key = task_key_for(task_id)
        announce = self._announce_of(task_id, content_length, origin, lazy)
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
                return AnnounceReply(tuple(self.server.parents_for(task_key, announce)))
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
            return reply
        raise UpstreamUnavailable(
            f"no home of task {task_key[:12]} answered: {'; '.join(errors) or 'no homes'}"
        )

    def replicate(self, task_key: str, announce: AnnounceRequest) -> None:
        """Copy an announce to the task's other homes (`PeerServer`'s replicate hook); never
        blocks, never raises."""
        membership = self.membership
        if membership is None or announce.forwarded:
            return
        # Without the origin request: home 1 fetches only once it is home 0, and then the
        # downloaders' own announces bring it; credentials go to no more hosts than needed.
        copy = dataclasses.replace(announce, forwarded=True, origin=None)
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

    # -- home 0 fetches for the swarm ----------------------------------------------------------

    def seed(self, task_key: str, announce: AnnounceRequest) -> str:
        """`PeerServer`'s seed hook: on an announce with an origin request for a task this host
        fetches from origin (home 0) and neither holds nor is fetching, start a whole download
        of it from origin (the tracker then offers this host as a parent as soon as it has a
        piece). Returns why this host could not fetch the task ("" if it can, is fetching, or
        is not the one to fetch it); raises `InvalidRequest` when the origin request names
        another task. Never blocks."""
        origin = announce.origin
        if origin is None or self._open_task is None or self._origins is None:
            return ""
        if task_key_for(origin.task_id) != task_key:
            raise InvalidRequest("ORIGIN_MISMATCH", "the origin request is for another task")
        if self.membership is None or not self.is_origin_fetcher(task_key):
            return ""
        task_id = origin.task_id
        if task_id in self._seeds:
            widen = self._lazy_seeds.get(task_id)
            if widen is not None and not announce.lazy:
                widen.set()  # someone wants all of it now
            return ""
        failure = self._seed_failures.get(task_id)
        if failure is not None:
            if self._clock() - failure[0] < SEED_FAILURE_MEMORY:
                return failure[1]
            del self._seed_failures[task_id]
        flags = self._bitmap(task_id)
        if flags is not None and flags and all(flags):
            return ""  # complete here: the tracker lists this host
        if len(self._seeds) >= MAX_SEEDS:
            self.stats.seeds_refused += 1
            return ""
        self.stats.seeds_started += 1
        log.info("task %s: fetching it from origin for the swarm (announced by %s)",
                 task_id, announce.peer_id)
        widen = asyncio.Event()
        if announce.lazy and self._last_read is not None:
            self._lazy_seeds[task_id] = widen
        else:
            widen.set()
        task = asyncio.get_running_loop().create_task(
            self._seed(origin, announce.content_length, widen), name=f"seed {task_id}"
        )
        self._seeds[task_id] = task

        def forget(_: asyncio.Task[None]) -> None:
            self._seeds.pop(task_id, None)
            self._lazy_seeds.pop(task_id, None)

        task.add_done_callback(forget)
        return ""

    async def _seed(
        self, origin: OriginRequest, content_length: int, widen: asyncio.Event
    ) -> None:
        assert self._open_task is not None and self._origins is not None
        task_id = origin.task_id
        try:
            plan = self._origins(origin, content_length)

            def open_task(whole: bool) -> AbstractAsyncContextManager[TaskHandle]:
                assert self._open_task is not None
                return self._open_task(
                    task_id, plan.source, content_length=content_length, sha256=plan.sha256,
                    attributes=plan.attributes, whole=whole,
                )

            async with open_task(whole=False):
                # Lazy readers only: their ranges (`PeerServer`'s range route) are all this
                # download fetches until they go quiet or someone wants the whole task.
                await self._until_quiet(task_id, widen)
                self._lazy_seeds.pop(task_id, None)
                async with open_task(whole=True) as handle:
                    # Waits for every piece (the last one after the sha256 matched) without
                    # copying any: segments are places in the data file.
                    async for _ in handle.segments(0, handle.info.content_length):
                        pass
        except D7yError as error:
            self._seed_failed(task_id, f"{type(error).__name__}: {error}")
        except Exception as error:  # a bug must not pass silently, nor kill the home
            log.exception("task %s: origin download for the swarm broke", task_id)
            self._seed_failed(task_id, f"{type(error).__name__}")
        else:
            self.stats.seeds_completed += 1

    async def _until_quiet(self, task_id: str, widen: asyncio.Event) -> None:
        """Return once `widen` is set, or no read of the task waited for missing bytes for
        `SEED_QUIET_SECONDS`."""
        started = time.monotonic()
        while not widen.is_set():
            last = self._last_read(task_id) if self._last_read is not None else None
            quiet = time.monotonic() - max(started, last or started)
            if quiet >= SEED_QUIET_SECONDS:
                log.info("task %s: its lazy readers went quiet; fetching the rest for the "
                         "swarm", task_id)
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SEED_QUIET_SECONDS - quiet):
                    await widen.wait()

    def _seed_failed(self, task_id: str, reason: str) -> None:
        self.stats.seeds_failed += 1
        reason = reason.splitlines()[0] if reason else "failed"
        reason = reason.encode()[: ORIGIN_ERROR_MAX_BYTES - 16].decode("utf-8", "ignore")
        log.warning("task %s: could not fetch it from origin for the swarm: %s", task_id, reason)
        self._seed_failures.pop(task_id, None)
        self._seed_failures[task_id] = (self._clock(), reason)
        while len(self._seed_failures) > MAX_SEED_FAILURES:
            self._seed_failures.popitem(last=False)

    def forget_member(self, member_id: str) -> None:
        """A member died or left: its pieces are gone from every swarm we track."""
        if self.server.tracker is not None:
            self.server.tracker.remove_member(member_id)

    async def close(self) -> None:
        tasks = [*self._replications, *self._completions.values(), *self._seeds.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


WaitPieces = Callable[[str, int, float], Awaitable[TaskInfo | None]]


def _part_of_one_piece(start: int, end: int, piece_size: int, content_length: int) -> bool:
    """Whether [start, end) lies in one piece and is not all of it."""
    piece_start = start - start % piece_size
    piece_end = min(content_length, piece_start + piece_size)
    return end <= piece_end and (start > piece_start or end < piece_end)


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
            await self._source.describe_origin()
            reply = await scheduler.announce_to_homes(
                self._source.task_id, self._content_length, self._source.origin_request,
                lazy=self._source.reading_lazily,
            )
            if reply.origin_error:
                self._source.home_cannot_fetch(reply.origin_error)
                raise UpstreamUnavailable(
                    f"the task's home could not fetch it from origin: {reply.origin_error}"
                )
            found = list(reply.parents)
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
        # How the task's home 0 can fetch it from origin (sent with every announce).
        self.origin_request = origin_request_of(task_id, origin)
        self._origin_described = False
        # Why the task's home could not fetch it from origin, once it said so.
        self._home_error: str | None = None
        # Loop time of the last sign of life from the swarm (a piece, a home's answer showing
        # more pieces); None until the first read.
        self._progress_at: float | None = None
        # Whether the latest read was of part of a piece (a lazy download's blocks): announces
        # say so, and home 0 then fetches what is asked first (`ClusterScheduler.seed`).
        self.reading_lazily = False
        # The home 0 that the latest range read announced to (see `_read_range`).
        self._range_home: str | None = None

    async def content_length(self) -> int:
        return await self.origin.content_length()

    async def describe_origin(self) -> None:
        """Before the first announce: a registry source with the node's own credentials gets
        its `Authorization` now, so home 0 can fetch with it (`origin_request`)."""
        if self._origin_described:
            return
        self._origin_described = True
        if isinstance(self.origin, OriginBlob) and await self.origin.authorize():
            self.origin_request = origin_request_of(self.task_id, self.origin)

    def reads_whole_pieces(self, index: int) -> bool:
        """Whether a read of piece `index` now moves the whole piece (`tasks.WholePieceSource`):
        when a known parent holds it (peers send pieces whole, so a lazy download takes the
        whole piece at once, and can pass it on). Else a lazy download reads its blocks, from
        home 0 (see `read`)."""
        if self._fallback or self.scheduler.is_origin_fetcher(self.task_key):
            return False
        return self._peers is not None and self._peers.holder_of(index) is not None

    def progressed(self) -> None:
        self._progress_at = self.scheduler._clock()

    def home_cannot_fetch(self, reason: str) -> None:
        self._home_error = reason

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
                length = await peers.content_length()
                self.reading_lazily = _part_of_one_piece(
                    position, end, peers.piece_size, length
                )
                if self.reading_lazily:
                    chunk = await self._read_range(peers, position, end - position)
                    position += len(chunk)
                    traffic.peer_bytes += len(chunk)
                    scheduler.stats.peer_bytes += len(chunk)
                    scheduler.stats.range_bytes += len(chunk)
                    self.progressed()
                    yield chunk
                    continue
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
                if self._home_error is not None:
                    self._fallback = True
                    traffic.fell_back = True
                    scheduler.stats.fallbacks += 1
                    scheduler.stats.home_origin_failures += 1
                    log.warning("task %s: its home could not fetch it from origin (%s); "
                                "fetching from origin", self.task_id, self._home_error)
                    continue
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

    async def _read_range(self, peers: PeerPieceSource, offset: int, length: int) -> bytes:
        """[offset, offset+length), part of one piece: from a parent that holds the piece, else
        from home 0, which fetches it for us first. Raises `UpstreamUnavailable` when neither
        gives it (the caller retries, and falls back to origin if that goes on)."""
        homes = self.scheduler.homes(self.task_key)
        # The first announce starts home 0's download; a new home 0 (the last one left or
        # died) hears from us before we ask it for bytes.
        await peers.parents(refresh=bool(homes) and homes[0] != self._range_home)
        self._range_home = homes[0] if homes else None
        holder = peers.holder_of(offset // peers.piece_size)
        wait = 0.0
        if holder is not None:
            address, peer_id = Address(holder.host, holder.port), holder.peer_id
        else:
            member = self.scheduler.membership.member(homes[0]) if (
                homes and self.scheduler.membership is not None
            ) else None
            if member is None or member.peer_address is None:
                raise UpstreamUnavailable(f"task {self.task_id}: its home has no peer address")
            address, peer_id, wait = member.peer_address, member.member_id, RANGE_WAIT
        try:
            return await self.scheduler.client.fetch_range(
                address, self.task_key, offset, length, wait=wait, peer=peer_id
            )
        except (PieceCorrupt, PeerBusy) as error:
            peers.failed(peer_id, error)
            raise UpstreamUnavailable(str(error)) from None
        except PeerFailed as error:
            raise UpstreamUnavailable(str(error)) from None

    def _note_parents(
        self, peers: PeerPieceSource, traffic: TaskTraffic, pieces_before: int
    ) -> None:
        new_drops = peers.dropped - traffic.dropped
        if new_drops:
            self.scheduler.stats.peers_dropped += len(new_drops)
            traffic.dropped |= new_drops
        if peers.stats.pieces_from_peers > pieces_before:
            traffic.parents.update(peers.served_by)
