"""Peer HTTP: the routes other hosts call on the peer port, and the client that calls them.

Owns, under `/peer/v1/`:
- `GET  tasks/{task_key}/pieces/{piece_index}`: one piece, sent with `sendfile`, its xxh3_64 in
  `X-D7y-Piece-Xxh3`; limited by upload slots (503 + Retry-After when none is free) and a shared
  token bucket (bytes/s);
- `GET  tasks/{task_key}/range?offset=O&length=L&wait=S`: bytes [O, O+L) (at most
  `MAX_RANGE_BYTES`), xxh3_64 in `X-D7y-Piece-Xxh3`, from pieces or blocks held here, or, when
  this host is downloading the task, as soon as its download has them (it fetches a waited-for
  range first), within `wait` seconds; else 404 `RANGE_UNKNOWN`. This is how a lazy reader (a
  Nydus mount) gets the chunks it needs from the task's home before any host holds their piece,
  without waiting for the home's whole download to reach them;
- `GET  tasks/{task_key}/state?wait=S&known=F`: content length, piece size and bitmap (msgpack
  `TaskState`), answered at once unless the bitmap's fingerprint is still `known`, then when it
  changes or after `wait` seconds (a long poll, no tight polling on either side);
- `POST tracker/{task_key}/announce`: a msgpack `AnnounceRequest` into this home's `Tracker`,
  answered with ranked parents (`AnnounceReply`); an announce that carries an `OriginRequest`
  is handed to the `seed` hook first (home 0 starts fetching the task from origin for the
  swarm; its answer says if that failed);
- `POST gossip/pushpull`: the server side of gossip's `StreamTransport` (`HttpStreamTransport`).

With a cluster key every request carries `X-D7y-Peer-Auth: v1 <unix seconds> <tag>`, the tag an
HMAC-SHA256 over the method, path with query, timestamp and the body's sha256, keyed by a key
derived from the gossip cluster key under its own label; a missing, wrong or stale one gets 401
and is counted. Every path parameter, query value and body is validated before use.

Also owns `PeerClient` (one shared aiohttp session; verifies each piece's xxh3) and
`PeerPieceSource`, a `tasks.PieceSource` that reads content from ranked parents, several at once.

Does not decide who is a home or how parents rank (`scheduler.py`), know liveness (`gossip`), or
store pieces: it serves them through a `PieceProvider` (`TaskManagerPieces` adapts the
`TaskManager`). Does not build the aiohttp application: `register(app)` adds routes to the node's.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import math
import os
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import aiohttp
import xxhash
from aiohttp import web

from d7y_node.errors import (
    InvalidRequest,
    PeerBusy,
    PeerFailed,
    PieceCorrupt,
    TaskFailed,
    UpstreamUnavailable,
)
from d7y_node.gossip.auth import ClusterKey
from d7y_node.gossip.members import Member
from d7y_node.gossip.messages import STREAM_MAX_BYTES, Address, MemberState
from d7y_node.gossip.transport import ReplyCallback, StreamHandler
from d7y_node.piece_store import MAX_PIECE_SIZE, file_name_for, piece_size_for
from d7y_node.scheduler import (
    DEFAULT_PER_PARENT_LIMIT,
    MAX_PIECES,
    WIRE_MAX_BYTES,
    AnnounceReply,
    AnnounceRequest,
    Bitmap,
    Parent,
    PeerHealth,
    TaskState,
    Tracker,
    decode,
    encode,
    rank_parents,
    select_pieces,
)
from d7y_node.tasks import Segment, TaskManager

log = logging.getLogger(__name__)

PREFIX = "/peer/v1"
AUTH_HEADER = "X-D7y-Peer-Auth"
PIECE_DIGEST_HEADER = "X-D7y-Piece-Xxh3"
FINGERPRINT_HEADER = "X-D7y-Bitmap-Fingerprint"
MESSAGE_TYPE = "application/vnd.d7y.peer.v1+msgpack"
AUTH_SCHEME = "v1"

# Task keys are the sha256 (hex) of the task id, as the piece store names its files: fixed length,
# safe in a path, and no id (a URL with credentials in its query) ever goes on the wire.
TASK_KEY = re.compile(r"[0-9a-f]{64}")
# A piece index in a path: digits only, no sign, no leading zeros (one spelling per piece).
PIECE_INDEX = re.compile(r"0|[1-9][0-9]{0,5}")
# A byte offset or length in a query: no sign, no leading zeros, at most 2^50.
QUERY_INTEGER = re.compile(r"0|[1-9][0-9]{0,14}")
FINGERPRINT = re.compile(r"[0-9a-f]{16}")
_TAG_HEX = re.compile(r"[0-9a-f]{32}")
_TIMESTAMP = re.compile(r"[0-9]{1,12}")

# The derivation label of the peer HTTP key (see `PeerAuth`); a new scheme gets a new label.
PEER_KEY_LABEL = b"d7y-node peer http key v1"
# A request signed more than this far from our clock is refused: wide enough for hosts without
# tight NTP, narrow enough that a captured request is soon useless. (Within the window a replay
# can only fetch a piece again or repeat an announce, both harmless.)
MAX_CLOCK_SKEW = 30.0
# A long poll waits at most this long, below common idle timeouts of proxies and load balancers.
MAX_LONG_POLL = 30.0
# Long polls waiting at once: each costs a coroutine and a connection; beyond this many, pollers
# are told to come back later (503 + Retry-After) instead of holding more connections.
MAX_LONG_POLLS = 1024
# Concurrent piece uploads: 8 pieces of up to 16 MiB in flight saturate a 10 Gbit/s link at LAN
# round trips, while each slot costs little (a pinned task, an open socket).
DEFAULT_UPLOAD_SLOTS = 8
# Seconds a refused downloader waits before asking again: an upload of a 4 MiB piece on a 1 Gbit/s
# link takes ~35 ms, so a slot frees well within a second.
RETRY_AFTER_SECONDS = 1
# With a rate limit, pieces go out in slices of this size, each paid for before it is sent: small
# enough for smooth pacing, large enough that the per-slice overhead is noise.
RATE_SLICE_BYTES = 256 * 1024
# Bytes read per pread when sendfile is not possible (uvloop, TLS).
COPY_CHUNK_BYTES = 1024 * 1024
# The largest range one request may ask for: a piece at most (ranges are read into memory).
MAX_RANGE_BYTES = MAX_PIECE_SIZE
# An error answer's text may be longer than a small range.
ERROR_BODY_LIMIT = 1024
# How long a range request may wait at most for the serving host's download (seconds).
MAX_RANGE_WAIT = 30.0
# How long a range request waits for the task to appear here (a seed the requester's announce
# has just started is still being prepared).
RANGE_TASK_APPEARS = 2.0
# A push-pull body: gossip's largest state exchange plus its authentication frame.
PUSH_PULL_MAX_BYTES = STREAM_MAX_BYTES + ClusterKey.overhead


def task_key_for(task_id: str) -> str:
    """The key of a task on the peer protocol (the sha256 hex of its id)."""
    return file_name_for(task_id)


def is_loopback(request: web.Request) -> bool:
    """Whether the request comes from this host (the routes that make the node act for a local
    user, such as `get` and `mount`, answer only such clients unless a cluster key signs them)."""
    peer = request.remote
    try:
        return peer is not None and ipaddress.ip_address(peer).is_loopback
    except ValueError:
        return False


def check_task_key(value: str) -> str:
    if not TASK_KEY.fullmatch(value):
        raise InvalidRequest("TASK_KEY_INVALID", "a task key is 64 lowercase hex digits")
    return value


def _check_piece_index(value: str) -> int:
    if not PIECE_INDEX.fullmatch(value) or int(value) >= MAX_PIECES:
        raise InvalidRequest("PIECE_INDEX_INVALID", f"a piece index is in [0, {MAX_PIECES})")
    return int(value)


# ---------------------------------------------------------------------------------------------
# Authentication


class PeerAuth:
    """Signs and checks peer HTTP requests with a key derived from the cluster key.

    The key is derived from the cluster key for this protocol alone (`ClusterKey.derive` of
    `PEER_KEY_LABEL`), so no tag of one protocol is valid in the other.
    """

    def __init__(
        self,
        cluster_key: ClusterKey,
        *,
        clock: Callable[[], float] = time.time,
        max_skew: float = MAX_CLOCK_SKEW,
    ) -> None:
        self._key = cluster_key.derive(PEER_KEY_LABEL)
        self._clock = clock
        self.max_skew = max_skew

    def _tag(self, method: str, target: str, timestamp: str, body: bytes) -> str:
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        for part in (method.upper().encode(), target.encode(), timestamp.encode()):
            mac.update(part)
            mac.update(b"\n")
        mac.update(hashlib.sha256(body).digest())
        return mac.hexdigest()[:32]

    def sign(self, method: str, target: str, body: bytes = b"") -> str:
        """The header value for a request to `target` (path and query, as sent)."""
        timestamp = str(int(self._clock()))
        return f"{AUTH_SCHEME} {timestamp} {self._tag(method, target, timestamp, body)}"

    def check(self, method: str, target: str, header: str | None, body: bytes) -> str | None:
        """None if the header is valid; else why not: "missing", "invalid" or "stale"."""
        if not header:
            return "missing"
        parts = header.split(" ")
        if (
            len(parts) != 3
            or parts[0] != AUTH_SCHEME
            or not _TIMESTAMP.fullmatch(parts[1])
            or not _TAG_HEX.fullmatch(parts[2])
        ):
            return "invalid"
        if not hmac.compare_digest(parts[2], self._tag(method, target, parts[1], body)):
            return "invalid"
        if abs(self._clock() - int(parts[1])) > self.max_skew:
            return "stale"
        return None


# ---------------------------------------------------------------------------------------------
# Upload limits


class TokenBucket:
    """A shared byte rate: `take(n)` returns once n bytes fit the rate (`burst` may be spent at
    once). Takers that overdraw wait for the debt, so concurrent uploads share the rate."""

    def __init__(
        self, rate: float, burst: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._at = clock()

    async def take(self, amount: int) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= amount
        if self._tokens < 0:
            await asyncio.sleep(-self._tokens / self.rate)


class UploadSlots:
    """How many piece uploads may run at once; a request finding none free is refused (503),
    not queued, so its downloader asks another parent at once."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("upload slots must be at least 1")
        self.capacity = capacity
        self.used = 0

    @property
    def free(self) -> int:
        return self.capacity - self.used

    def try_acquire(self) -> bool:
        if self.used >= self.capacity:
            return False
        self.used += 1
        return True

    def release(self) -> None:
        self.used -= 1


# ---------------------------------------------------------------------------------------------
# What the server serves


@dataclass(frozen=True)
class HeldPiece:
    """A piece held on disk: where its bytes are (valid while the provider's context is open)
    and its xxh3_64."""

    segments: tuple[Segment, ...]
    digest: int

    @property
    def size(self) -> int:
        return sum(segment.count for segment in self.segments)


class PieceProvider(Protocol):
    """The pieces this host can serve, by task key (the seam to the `TaskManager`)."""

    def state(self, task_key: str) -> TaskState | None:
        """What is held of the task now; None if nothing."""
        ...

    def piece(
        self, task_key: str, piece_index: int
    ) -> AbstractAsyncContextManager[HeldPiece | None]:
        """Hold piece `piece_index` (pinned, so it stays readable) if it is on disk and
        verified now; None otherwise. Never waits for a download and never starts one."""
        ...

    async def wait_changed(
        self, task_key: str, fingerprint: str, wait: float
    ) -> TaskState | None:
        """The task's state once its bitmap's fingerprint differs from `fingerprint`, or after
        `wait` seconds, whichever is first; None if the task is gone."""
        ...

    async def read_range(
        self, task_key: str, offset: int, length: int, wait: float
    ) -> bytes | None:
        """Bytes [offset, offset+length) of the task if held here (whole pieces or blocks), or
        once this host's own download of it has them, within `wait` seconds; None otherwise.
        Never starts a download."""
        ...


class TaskManagerPieces:
    """A `PieceProvider` over the `TaskManager`: every stored task, complete or partial, by its
    key; a piece is served as soon as it is on disk with its xxh3 recorded (a partial task's
    pieces too, so a downloader serves what it has while it downloads the rest)."""

    def __init__(self, manager: TaskManager) -> None:
        self._manager = manager

    def state(self, task_key: str) -> TaskState | None:
        task_id = self._manager.task_id_for_key(task_key)
        if task_id is None:
            return None
        info = self._manager.info(task_id)
        flags = self._manager.bitmap(task_id)
        if info is None or flags is None:
            return None
        bitmap = Bitmap.full(info.piece_count) if info.complete else Bitmap.from_flags(flags)
        return TaskState(info.content_length, info.piece_size, bitmap)

    @asynccontextmanager
    async def piece(self, task_key: str, piece_index: int) -> AsyncIterator[HeldPiece | None]:
        task_id = self._manager.task_id_for_key(task_key)
        if task_id is None:
            yield None
            return
        async with self._manager.open_piece(task_id, piece_index) as held:
            if held is None:
                yield None
                return
            segment, digest = held
            yield HeldPiece((segment,), digest)

    async def wait_changed(
        self, task_key: str, fingerprint: str, wait: float
    ) -> TaskState | None:
        deadline = asyncio.get_running_loop().time() + wait
        while True:
            current = self.state(task_key)
            task_id = self._manager.task_id_for_key(task_key)
            if current is None or task_id is None or current.bitmap.fingerprint() != fingerprint:
                return current
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return current
            await self._manager.wait_pieces(task_id, current.bitmap.count(), left)

    async def read_range(
        self, task_key: str, offset: int, length: int, wait: float
    ) -> bytes | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        task_id = self._manager.task_id_for_key(task_key)
        # A seed the asker's announce started a moment ago may still be preparing its task.
        for _ in range(int(min(wait, RANGE_TASK_APPEARS) / 0.05)):
            if task_id is not None:
                break
            await asyncio.sleep(0.05)
            task_id = self._manager.task_id_for_key(task_key)
        if task_id is None:
            return None
        return await self._manager.read_held(
            task_id, offset, length, wait=max(0.0, deadline - loop.time())
        )


class MemberDirectory(Protocol):
    """Where members are and how loaded they are (a gossip `Membership` is one)."""

    def member(self, member_id: str) -> Member | None: ...


# ---------------------------------------------------------------------------------------------
# The server


@dataclass(frozen=True)
class PeerServerConfig:
    """Upload limits and long-poll bounds of the peer routes."""

    upload_slots: int = DEFAULT_UPLOAD_SLOTS
    # All piece uploads together, bytes/s; None: no limit.
    upload_rate: int | None = None
    # Bytes the rate limit lets through at once: a quarter second at the rate, and at least
    # one slice.
    upload_burst: int | None = None
    max_long_poll: float = MAX_LONG_POLL
    max_long_polls: int = MAX_LONG_POLLS
    retry_after: int = RETRY_AFTER_SECONDS

    def __post_init__(self) -> None:
        if self.upload_slots < 1:
            raise ValueError("upload_slots must be at least 1")
        if self.upload_rate is not None and self.upload_rate <= 0:
            raise ValueError("upload_rate must be positive")
        if not self.max_long_poll > 0 or self.retry_after < 1 or self.max_long_polls < 1:
            raise ValueError("max_long_poll, max_long_polls and retry_after must be positive")


@dataclass
class PeerServerStats:
    """Counters of the peer routes; the node exports them as metrics."""

    pieces_served: int = 0
    bytes_served: int = 0
    # Pieces asked for that are not held (404).
    pieces_missing: int = 0
    # Ranges served, and ranges neither held nor fetched in time (404).
    ranges_served: int = 0
    ranges_missing: int = 0
    # Requests refused for want of an upload slot or of room for another long poll (503).
    busy: int = 0
    # Requests refused for bad authentication, by reason ("missing", "invalid", "stale").
    unauthenticated: Counter[str] = field(default_factory=Counter)
    # Requests refused as malformed (bad key, index, query or body).
    bad_requests: int = 0
    announces: int = 0
    push_pulls: int = 0
    long_polls: int = 0


Handler = Callable[[web.Request, bytes], Awaitable[web.StreamResponse]]
_Reply = TypeVar("_Reply", AnnounceReply, TaskState)
ReplicateAnnounce = Callable[[str, AnnounceRequest], None]
# Called with (task key, announce) for every announce carrying an origin request that did not
# come from another home; returns why this home cannot fetch the task from origin ("" if it
# can, is fetching, or is not the one to fetch it). Raises `InvalidRequest` for a request that
# does not belong to the task; must not block.
SeedAnnounce = Callable[[str, AnnounceRequest], str]


class PeerServer:
    """The `/peer/v1/` routes; `register(app)` adds them to the node's peer-port application."""

    def __init__(
        self,
        provider: PieceProvider,
        *,
        config: PeerServerConfig | None = None,
        auth: PeerAuth | None = None,
        tracker: Tracker | None = None,
        directory: MemberDirectory | None = None,
        stream: HttpStreamTransport | None = None,
        replicate: ReplicateAnnounce | None = None,
        seed: SeedAnnounce | None = None,
        local_id: str | None = None,
    ) -> None:
        self.provider = provider
        # Our member id: a home lists itself as a parent with what it holds now (its own
        # pieces are never announced over the network).
        self.local_id = local_id
        self.config = config or PeerServerConfig()
        self.auth = auth
        self.tracker = tracker
        self.directory = directory
        self.stream = stream
        # Called with every announce that did not come from another home (home 0 passes them
        # on to home 1); must not block.
        self.replicate = replicate
        # Home 0's origin fetch for the swarm (see `SeedAnnounce`).
        self.seed = seed
        self.stats = PeerServerStats()
        self.slots = UploadSlots(self.config.upload_slots)
        self.waiting_polls = 0
        self.bucket: TokenBucket | None = None
        if self.config.upload_rate is not None:
            burst = self.config.upload_burst or max(RATE_SLICE_BYTES, self.config.upload_rate // 4)
            self.bucket = TokenBucket(self.config.upload_rate, burst)

    def register(self, app: web.Application) -> None:
        router = app.router
        # No HEAD: a piece's bytes bypass aiohttp (sendfile), which could not suppress them.
        router.add_get(
            PREFIX + "/tasks/{task_key}/pieces/{piece_index}", self._guard(self._piece, 0),
            allow_head=False,
        )
        router.add_get(
            PREFIX + "/tasks/{task_key}/range", self._guard(self._range, 0), allow_head=False
        )
        router.add_get(
            PREFIX + "/tasks/{task_key}/state", self._guard(self._state, 0), allow_head=False
        )
        router.add_post(
            PREFIX + "/tracker/{task_key}/announce", self._guard(self._announce, WIRE_MAX_BYTES)
        )
        router.add_post(
            PREFIX + "/gossip/pushpull", self._guard(self._push_pull, PUSH_PULL_MAX_BYTES)
        )

    def _guard(
        self, handler: Handler, body_limit: int
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """Read the body (bounded), check authentication, map errors to status codes."""

        async def guarded(request: web.Request) -> web.StreamResponse:
            try:
                body = await _read_body(request, body_limit)
                if self.auth is not None:
                    reason = self.auth.check(
                        request.method, request.raw_path, request.headers.get(AUTH_HEADER), body
                    )
                    if reason is not None:
                        self.stats.unauthenticated[reason] += 1
                        return _error(401, "UNAUTHORIZED", f"authentication {reason}")
                return await handler(request, body)
            except InvalidRequest as error:
                if error.status == 400:
                    self.stats.bad_requests += 1
                response = _error(error.status, error.code, error.message)
                if error.status == 413:
                    # Send the answer, then close rather than read and discard the rest of a
                    # body we refused (aiohttp would linger on it for seconds).
                    await response.prepare(request)
                    await response.write_eof()
                    request.protocol.force_close()
                return response

        return guarded

    async def _piece(self, request: web.Request, body: bytes) -> web.StreamResponse:
        task_key = check_task_key(request.match_info["task_key"])
        piece_index = _check_piece_index(request.match_info["piece_index"])
        if not self.slots.try_acquire():
            return self._busy("no free upload slot")
        try:
            async with self.provider.piece(task_key, piece_index) as held:
                if held is None:
                    self.stats.pieces_missing += 1
                    return _error(404, "PIECE_UNKNOWN", "piece not held")
                response = _octets(held.digest, held.size)
                await response.prepare(request)
                for segment in held.segments:
                    await self._send(request, response, segment)
                await response.write_eof()
                self.stats.pieces_served += 1
                self.stats.bytes_served += held.size
                return response
        finally:
            self.slots.release()

    def _busy(self, why: str) -> web.Response:
        self.stats.busy += 1
        return _error(
            503, "BUSY", why, headers={"Retry-After": str(self.config.retry_after)}
        )

    async def _send(
        self, request: web.Request, response: web.StreamResponse, segment: Segment
    ) -> None:
        """Send a segment: with `sendfile` where the loop can, else pread + write; paced in
        slices when a rate limit is set."""
        slice_size = RATE_SLICE_BYTES if self.bucket is not None else segment.count
        offset, end = segment.offset, segment.offset + segment.count
        loop = asyncio.get_running_loop()
        while offset < end:
            count = min(slice_size, end - offset)
            if self.bucket is not None:
                await self.bucket.take(count)
            transport = request.transport
            if transport is None or transport.is_closing():
                raise ConnectionResetError("downloader went away")
            sent = 0
            with (
                open(segment.fd, "rb", buffering=0, closefd=False) as file,  # noqa: ASYNC230
                contextlib.suppress(NotImplementedError, asyncio.SendfileNotAvailableError),
            ):
                sent = await loop.sendfile(transport, file, offset, count, fallback=False)
            while sent < count:
                chunk = min(COPY_CHUNK_BYTES, count - sent)
                data = await loop.run_in_executor(None, os.pread, segment.fd, chunk, offset + sent)
                if not data:
                    raise TaskFailed("data file ended before its verified pieces")
                await response.write(data)
                sent += len(data)
            offset += count

    async def _range(self, request: web.Request, body: bytes) -> web.StreamResponse:
        task_key = check_task_key(request.match_info["task_key"])
        offset = _query_integer(request.query, "offset")
        length = _query_integer(request.query, "length")
        if not 0 < length <= MAX_RANGE_BYTES:
            raise InvalidRequest("QUERY_INVALID", f"length is in [1, {MAX_RANGE_BYTES}]")
        wait = _query_seconds(
            request.query.get("wait", "0"), min(self.config.max_long_poll, MAX_RANGE_WAIT)
        )
        if self.waiting_polls >= self.config.max_long_polls:
            return self._busy("too many waiting requests")
        self.waiting_polls += 1
        try:
            data = await self.provider.read_range(task_key, offset, length, wait)
        finally:
            self.waiting_polls -= 1
        if data is None:
            self.stats.ranges_missing += 1
            return _error(404, "RANGE_UNKNOWN", "range not held here, nor fetched in time")
        response = _octets(xxhash.xxh3_64_intdigest(data), len(data))
        await response.prepare(request)
        view = memoryview(data)
        for start in range(0, len(data), RATE_SLICE_BYTES):
            part = view[start : start + RATE_SLICE_BYTES]
            if self.bucket is not None:
                await self.bucket.take(len(part))
            await response.write(part)
        await response.write_eof()
        self.stats.ranges_served += 1
        self.stats.bytes_served += len(data)
        return response

    async def _state(self, request: web.Request, body: bytes) -> web.StreamResponse:
        task_key = check_task_key(request.match_info["task_key"])
        wait = _query_seconds(request.query.get("wait", "0"), self.config.max_long_poll)
        known = request.query.get("known")
        if known is not None and not FINGERPRINT.fullmatch(known):
            raise InvalidRequest("QUERY_INVALID", "known is a fingerprint of 16 hex digits")
        state = self.provider.state(task_key)
        if state is not None and known == state.bitmap.fingerprint() and wait > 0:
            if self.waiting_polls >= self.config.max_long_polls:
                return self._busy("too many waiting polls")
            self.stats.long_polls += 1
            self.waiting_polls += 1
            try:
                state = await self.provider.wait_changed(task_key, known, wait)
            finally:
                self.waiting_polls -= 1
        if state is None:
            return _error(404, "TASK_UNKNOWN", "task not held")
        return web.Response(
            body=encode(state),
            headers={
                "Content-Type": MESSAGE_TYPE,
                FINGERPRINT_HEADER: state.bitmap.fingerprint(),
            },
        )

    async def _announce(self, request: web.Request, body: bytes) -> web.StreamResponse:
        task_key = check_task_key(request.match_info["task_key"])
        if self.tracker is None:
            return _error(404, "NOT_A_TRACKER", "this host keeps no tracker")
        announce = decode(body, AnnounceRequest)
        self.stats.announces += 1
        origin_error = ""
        if announce.origin is not None and not announce.forwarded and self.seed is not None:
            origin_error = self.seed(task_key, announce)
        try:
            self.tracker.announce(task_key, announce.peer_id, announce.bitmap)
        except InvalidRequest as error:
            raise InvalidRequest(error.code, error.message, status=409) from None
        if announce.forwarded:
            return _message(AnnounceReply(()))
        if self.replicate is not None:
            self.replicate(task_key, announce)
        return _message(
            AnnounceReply(tuple(self.parents_for(task_key, announce)), origin_error)
        )

    def parents_for(self, task_key: str, announce: AnnounceRequest) -> list[Parent]:
        """The tracked peers of the task that can serve `announce`'s sender, ranked."""
        assert self.tracker is not None
        self._track_self(task_key)
        candidates: list[Parent] = []
        for peer in self.tracker.peers(task_key):
            if peer.peer_id == announce.peer_id:
                continue
            member = self.directory.member(peer.peer_id) if self.directory is not None else None
            address = member.peer_address if member is not None else None
            if member is None or member.state is not MemberState.ALIVE or address is None:
                continue
            candidates.append(
                Parent(
                    peer.peer_id, address.host, address.port, peer.bitmap,
                    member.load.free_upload_slots, dict(member.labels),
                )
            )
        count = announce.bitmap.piece_count
        needed = Bitmap.from_int(count, ((1 << count) - 1) & ~announce.bitmap.as_int())
        requester = self.directory.member(announce.peer_id) if self.directory else None
        labels = requester.labels if requester is not None else {}
        return rank_parents(candidates, needed, labels)

    def _track_self(self, task_key: str) -> None:
        """Put what this host holds of the task into its tracker, as of now."""
        if self.local_id is None or self.tracker is None:
            return
        state = self.provider.state(task_key)
        if state is None or not state.bitmap.count():
            return
        with contextlib.suppress(InvalidRequest):  # a swarm that cut the content differently
            self.tracker.announce(task_key, self.local_id, state.bitmap)

    async def _push_pull(self, request: web.Request, body: bytes) -> web.StreamResponse:
        handler = self.stream.handler if self.stream is not None else None
        if handler is None:
            return _error(503, "NO_GOSSIP", "gossip is not running")
        self.stats.push_pulls += 1
        peer = request.transport.get_extra_info("peername") if request.transport else None
        source = Address(str(peer[0]), int(peer[1])) if peer else Address("0.0.0.0", 1)
        reply = handler(body, source)
        return web.Response(body=reply, content_type="application/octet-stream")


async def _read_body(request: web.Request, limit: int) -> bytes:
    if not request.body_exists:
        return b""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise InvalidRequest("BODY_TOO_LARGE", f"body exceeds {limit} bytes", status=413)
    parts: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise InvalidRequest("BODY_TOO_LARGE", f"body exceeds {limit} bytes", status=413)
        parts.append(chunk)
    return b"".join(parts)


def _query_integer(query: Mapping[str, str], name: str) -> int:
    value = query.get(name)
    if value is None or not QUERY_INTEGER.fullmatch(value):
        raise InvalidRequest("QUERY_INVALID", f"{name} is a non-negative integer")
    return int(value)


def _query_seconds(value: str, maximum: float) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 <= seconds <= maximum:  # also refuses NaN
        raise InvalidRequest("QUERY_INVALID", f"wait is a number of seconds in [0, {maximum:g}]")
    return seconds


def _error(
    status: int, code: str, message: str, *, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(status=status, text=f"{code}: {message}\n", headers=headers)


def _octets(digest: int, size: int) -> web.StreamResponse:
    """The head of an answer of `size` bytes of content whose xxh3_64 is `digest`."""
    response = web.StreamResponse(
        headers={
            "Content-Type": "application/octet-stream",
            PIECE_DIGEST_HEADER: f"{digest:016x}",
        }
    )
    response.content_length = size
    return response


def _message(message: AnnounceReply | TaskState) -> web.Response:
    return web.Response(body=encode(message), headers={"Content-Type": MESSAGE_TYPE})


# ---------------------------------------------------------------------------------------------
# The client


@dataclass(frozen=True)
class PeerClientConfig:
    """Timeouts of peer requests (seconds)."""

    # A peer that does not accept a connection this fast is treated as gone.
    connect_timeout: float = 3.0
    # A piece (up to 16 MiB) must arrive within this; a slower parent is dropped for another.
    piece_timeout: float = 30.0
    # Announce and other small requests.
    request_timeout: float = 10.0


@dataclass
class PeerClientStats:
    """Counters of this host's peer requests."""

    pieces_fetched: int = 0
    ranges_fetched: int = 0
    bytes_fetched: int = 0
    # Pieces (and ranges) whose bytes did not match the xxh3 they came with.
    piece_digest_failures: int = 0
    # Requests that failed otherwise (unreachable, refused, malformed answer), by reason.
    failures: Counter[str] = field(default_factory=Counter)
    busy: int = 0


class PeerClient:
    """Calls other hosts' peer routes over one shared aiohttp session (owned by the caller)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        auth: PeerAuth | None = None,
        config: PeerClientConfig | None = None,
    ) -> None:
        self._session = session
        self.auth = auth
        self.config = config or PeerClientConfig()
        self.stats = PeerClientStats()

    async def _request(
        self,
        method: str,
        address: Address,
        target: str,
        body: bytes,
        *,
        within: float,
        limit: int,
        peer: str,
    ) -> tuple[int, Mapping[str, str], bytes]:
        """(status, headers, body) of one request; raises `PeerFailed` when it cannot be made,
        times out, or the answer is larger than `limit`."""
        headers = {"Content-Type": MESSAGE_TYPE} if body else {}
        if self.auth is not None:
            headers[AUTH_HEADER] = self.auth.sign(method, target, body)
        url = f"http://{address}{target}"
        timeouts = aiohttp.ClientTimeout(total=within, connect=self.config.connect_timeout)
        try:
            async with self._session.request(
                method, url, data=body or None, headers=headers, timeout=timeouts,
                allow_redirects=False, auto_decompress=False,
            ) as response:
                declared = response.content_length
                if declared is not None and declared > limit:
                    self.stats.failures["too_large"] += 1
                    raise PeerFailed(peer, f"answer of {declared} bytes exceeds {limit}")
                parts: list[bytes] = []
                size = 0
                async for chunk in response.content.iter_any():
                    size += len(chunk)
                    if size > limit:
                        self.stats.failures["too_large"] += 1
                        raise PeerFailed(peer, f"answer exceeds {limit} bytes")
                    parts.append(chunk)
                return response.status, response.headers, b"".join(parts)
        except (aiohttp.ClientError, OSError, TimeoutError) as error:
            self.stats.failures["unreachable"] += 1
            raise PeerFailed(peer, f"{method} {target}: {error or type(error).__name__}") from None

    def _status_error(
        self, peer: str, status: int, headers: Mapping[str, str], body: bytes
    ) -> PeerFailed:
        if status == 503:
            self.stats.busy += 1
            retry = headers.get("Retry-After", "")
            return PeerBusy(peer, float(retry) if retry.isdigit() else RETRY_AFTER_SECONDS)
        self.stats.failures[f"status_{status}"] += 1
        text = body[:200].decode("utf-8", "replace").strip()
        return PeerFailed(peer, f"answered {status}: {text}")

    async def fetch_piece(
        self,
        address: Address,
        task_key: str,
        piece_index: int,
        *,
        expected_size: int | None = None,
        peer: str | None = None,
    ) -> bytes:
        """Piece `piece_index` of the task from the peer at `address`, verified against the xxh3
        it came with. Raises `PieceCorrupt` on a mismatch, `PeerBusy` on 503, `PeerFailed` on
        anything else; `peer` (its id) names it in the error."""
        name = peer or str(address)
        target = f"{PREFIX}/tasks/{check_task_key(task_key)}/pieces/{piece_index}"
        status, headers, body = await self._request(
            "GET", address, target, b"", within=self.config.piece_timeout,
            limit=expected_size if expected_size is not None else MAX_PIECE_SIZE, peer=name,
        )
        self._check_content(
            name, f"piece {piece_index} of task {task_key}", status, headers, body, expected_size
        )
        self.stats.pieces_fetched += 1
        self.stats.bytes_fetched += len(body)
        return body

    def _check_content(
        self, name: str, what: str, status: int, headers: Mapping[str, str], body: bytes,
        expected_size: int | None,
    ) -> None:
        """Raise unless `body` is a 200 answer of `expected_size` bytes (when given) matching
        the xxh3 it came with (`PieceCorrupt` when it does not)."""
        if status != 200:
            raise self._status_error(name, status, headers, body)
        announced = headers.get(PIECE_DIGEST_HEADER, "")
        if not FINGERPRINT.fullmatch(announced):
            self.stats.failures["no_digest"] += 1
            raise PeerFailed(name, f"{what} came without a valid digest header")
        if expected_size is not None and len(body) != expected_size:
            self.stats.failures["short_piece"] += 1
            raise PeerFailed(name, f"{what} has {len(body)} bytes, expected {expected_size}")
        if xxhash.xxh3_64_intdigest(body) != int(announced, 16):
            self.stats.piece_digest_failures += 1
            raise PieceCorrupt(name, f"{what} does not match its xxh3 {announced}")

    async def fetch_range(
        self,
        address: Address,
        task_key: str,
        offset: int,
        length: int,
        *,
        wait: float = 0.0,
        peer: str | None = None,
    ) -> bytes:
        """Bytes [offset, offset+length) of the task from the peer at `address`, which may wait
        up to `wait` seconds for its own download to fetch them; verified against the xxh3 they
        came with. Raises `PieceCorrupt` on a mismatch, `PeerBusy` on 503, `PeerFailed` on
        anything else (404: the peer neither holds them nor fetched them in time)."""
        name = peer or str(address)
        if not 0 < length <= MAX_RANGE_BYTES or offset < 0:
            raise ValueError(f"range {offset}+{length} is not one a peer serves")
        target = (f"{PREFIX}/tasks/{check_task_key(task_key)}/range"
                  f"?offset={offset}&length={length}&wait={wait:g}")
        status, headers, body = await self._request(
            "GET", address, target, b"", within=wait + self.config.piece_timeout,
            limit=max(length, ERROR_BODY_LIMIT), peer=name,  # room for an error's text
        )
        self._check_content(
            name, f"range {offset}+{length} of task {task_key}", status, headers, body, length
        )
        self.stats.ranges_fetched += 1
        self.stats.bytes_fetched += len(body)
        return body

    async def task_state(
        self,
        address: Address,
        task_key: str,
        *,
        wait: float = 0.0,
        known: str | None = None,
        peer: str | None = None,
    ) -> TaskState | None:
        """The peer's state of the task (None if it holds nothing). With `known` (a previous
        state's fingerprint) and `wait`, the peer answers once its bitmap changed or after
        `wait` seconds."""
        name = peer or str(address)
        target = f"{PREFIX}/tasks/{check_task_key(task_key)}/state?wait={wait:g}"
        if known is not None:
            target += f"&known={known}"
        status, headers, body = await self._request(
            "GET", address, target, b"", within=wait + self.config.request_timeout,
            limit=WIRE_MAX_BYTES, peer=name,
        )
        if status == 404:
            return None
        if status != 200:
            raise self._status_error(name, status, headers, body)
        return self._decode(name, body, TaskState)

    async def announce(
        self,
        address: Address,
        task_key: str,
        announce: AnnounceRequest,
        *,
        peer: str | None = None,
    ) -> AnnounceReply:
        """Tell the home at `address` what we hold; returns the parents it ranks for us."""
        name = peer or str(address)
        target = f"{PREFIX}/tracker/{check_task_key(task_key)}/announce"
        status, headers, body = await self._request(
            "POST", address, target, encode(announce), within=self.config.request_timeout,
            limit=WIRE_MAX_BYTES, peer=name,
        )
        if status != 200:
            raise self._status_error(name, status, headers, body)
        return self._decode(name, body, AnnounceReply)

    def _decode(self, peer: str, body: bytes, kind: type[_Reply]) -> _Reply:
        try:
            return decode(body, kind)
        except InvalidRequest as error:
            self.stats.failures["malformed"] += 1
            raise PeerFailed(peer, f"malformed answer: {error.message}") from None

    async def push_pull(self, address: Address, payload: bytes, within: float) -> bytes:
        """One gossip push-pull exchange with the peer port at `address`."""
        name = str(address)
        status, headers, body = await self._request(
            "POST", address, f"{PREFIX}/gossip/pushpull", payload, within=within,
            limit=PUSH_PULL_MAX_BYTES, peer=name,
        )
        if status != 200:
            raise self._status_error(name, status, headers, body)
        return body


class HttpStreamTransport:
    """Gossip's `StreamTransport` over the peer port: `exchange` is one POST of the sealed bytes
    to `/peer/v1/gossip/pushpull`; the `PeerServer` route answers with the handler set here."""

    def __init__(self, client: PeerClient) -> None:
        self._client = client
        self.handler: StreamHandler | None = None
        self._exchanges: set[asyncio.Task[bytes | None]] = set()

    def set_handler(self, handler: StreamHandler) -> None:
        self.handler = handler

    def exchange(
        self, address: Address, request: bytes, timeout: float, on_reply: ReplyCallback
    ) -> None:
        task = asyncio.get_running_loop().create_task(
            self._exchange(address, request, timeout), name=f"push-pull {address}"
        )
        self._exchanges.add(task)

        def done(finished: asyncio.Task[bytes | None]) -> None:
            # Exactly once, also when cancelled (even before it ran) or broken: then with None.
            self._exchanges.discard(finished)
            failed = finished.cancelled() or finished.exception() is not None
            on_reply(None if failed else finished.result())

        task.add_done_callback(done)

    async def _exchange(self, address: Address, request: bytes, within: float) -> bytes | None:
        try:
            return await self._client.push_pull(address, request, within)
        except PeerFailed as error:
            log.debug("push-pull with %s failed: %s", address, error)
            return None

    async def close(self) -> None:
        """Cancel exchanges in flight (their callbacks get None)."""
        tasks = list(self._exchanges)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# ---------------------------------------------------------------------------------------------
# Peers as a piece source


class ParentFinder(Protocol):
    """Where a `PeerPieceSource` learns its parents (an announce to the task's home, usually).
    Called again when the parents it has cannot give what is needed."""

    async def parents(self) -> Sequence[Parent]: ...


# Pieces fetched ahead of the one a reader needs next: enough to keep several parents busy,
# bounded so one read holds at most this many pieces in memory.
READ_AHEAD_PIECES = 8
# A piece that failed this many times (on any parents) fails the read: the task manager retries
# or the node falls back to origin.
MAX_PIECE_ATTEMPTS = 4
# Busy answers (503) one piece may get before the read fails: at about a second each (their
# Retry-After), a swarm gets half a minute to free a slot.
MAX_BUSY_ANSWERS = 30
# How many times one read asks the finder for new parents when no parent can give a piece.
MAX_PARENT_REFRESHES = 3
# A parent that failed (not corrupt: unreachable, refused) is skipped this long.
FAILURE_COOLDOWN = 1.0
# Wait between parent refreshes: parents still downloading get time to get more pieces.
REFRESH_DELAY = 0.2


@dataclass
class PeerSourceStats:
    """What one `PeerPieceSource` got, and from whom."""

    bytes_from_peers: int = 0
    pieces_from_peers: int = 0
    corrupt_pieces: int = 0
    failed_pieces: int = 0


class PeerPieceSource:
    """A `tasks.PieceSource` that reads a task's bytes from peers: the covering pieces are
    fetched from ranked parents, several at once (at most `per_parent_limit` from each), the
    piece the read needs next first, then the rarest; each is verified. A parent that sends a
    corrupt piece is dropped for this task (`dropped`) and the piece fetched elsewhere."""

    def __init__(
        self,
        client: PeerClient,
        task_key: str,
        *,
        content_length: int,
        finder: ParentFinder,
        health: PeerHealth,
        local_id: str,
        local_labels: Mapping[str, str] | None = None,
        per_parent_limit: int = DEFAULT_PER_PARENT_LIMIT,
        read_ahead: int = READ_AHEAD_PIECES,
        max_refreshes: int = MAX_PARENT_REFRESHES,
        refresh_interval: float | None = None,
    ) -> None:
        self._client = client
        self.task_key = check_task_key(task_key)
        self._content_length = content_length
        self.piece_size = piece_size_for(content_length)
        self.piece_count = (content_length + self.piece_size - 1) // self.piece_size
        self._finder = finder
        self._health = health
        self._local_id = local_id
        self._local_labels = dict(local_labels or {})
        self._per_parent_limit = per_parent_limit
        self._read_ahead = read_ahead
        self._max_refreshes = max_refreshes
        # Ask the finder again this often while reading (None: only when stuck), so the home
        # learns what we hold (others may fetch it from us) and we learn who got more.
        self._refresh_interval = refresh_interval
        self._refreshed_at: float | None = None
        self._parents: list[Parent] | None = None
        # Parents that sent a corrupt piece of this task: never asked again for it.
        self.dropped: set[str] = set()
        # Parents that gave at least one good piece of this task.
        self.served_by: set[str] = set()
        # Parents skipped until this loop time (busy, or just failed).
        self._resting: dict[str, float] = {}
        self.stats = PeerSourceStats()

    async def content_length(self) -> int:
        return self._content_length

    async def parents(self, *, refresh: bool = False) -> list[Parent]:
        """The parents known now, asked of the finder first when `refresh`, when none were
        asked yet or when the refresh interval has passed (which also tells the home what we
        hold)."""
        if refresh or self._parents is None or (
            self._refresh_interval is not None
            and self._refreshed_at is not None
            and asyncio.get_running_loop().time() - self._refreshed_at >= self._refresh_interval
        ):
            return await self._refresh()
        return self._parents

    def holder_of(self, index: int) -> Parent | None:
        """The best-ranked known parent that holds piece `index` and may be asked now."""
        now = asyncio.get_running_loop().time()
        holders = [
            parent for parent in self._parents or []
            if parent.bitmap.has(index) and parent.peer_id not in self.dropped
            and self._resting.get(parent.peer_id, 0.0) <= now
        ]
        if not holders:
            return None
        needed = Bitmap.from_indices(self.piece_count, [index])
        return rank_parents(holders, needed, self._local_labels, self._health)[0]

    def failed(self, peer: str, error: BaseException) -> None:
        """A request to `peer` outside `read` failed: it rests (or is dropped) as if in `read`."""
        self._failed(peer, error, asyncio.get_running_loop().time())

    async def _refresh(self) -> list[Parent]:
        self._refreshed_at = asyncio.get_running_loop().time()
        found = await self._finder.parents()
        self._parents = [
            parent for parent in found
            if parent.bitmap.piece_count == self.piece_count and parent.peer_id != self._local_id
        ]
        return self._parents

    async def read(self, offset: int, length: int) -> AsyncIterator[bytes]:
        if offset < 0 or length < 0 or offset + length > self._content_length:
            raise ValueError(f"range {offset}+{length} is outside 0-{self._content_length}")
        if length == 0:
            return
        loop = asyncio.get_running_loop()
        size = self.piece_size
        end = offset + length
        first, last = offset // size, (end - 1) // size
        unassigned = set(range(first, last + 1))
        ready: dict[int, bytes] = {}
        attempts: Counter[int] = Counter()
        busy: Counter[int] = Counter()
        pending: dict[asyncio.Task[bytes], tuple[int, str, float]] = {}
        refreshes = 0
        parents = self._parents if self._parents is not None else await self._refresh()
        next_index = first
        try:
            while next_index <= last:
                while next_index in ready:
                    data = ready.pop(next_index)
                    start = next_index * size
                    yield data[max(0, offset - start) : min(len(data), end - start)]
                    next_index += 1
                if next_index > last:
                    break
                now = loop.time()
                if (
                    self._refresh_interval is not None
                    and self._refreshed_at is not None
                    and now - self._refreshed_at >= self._refresh_interval
                ):
                    with contextlib.suppress(UpstreamUnavailable):  # keep the parents we have
                        parents = await self._refresh()
                    now = loop.time()
                window = [
                    index
                    for index in range(next_index, min(last, next_index + self._read_ahead - 1) + 1)
                    if index in unassigned
                ]
                usable = [
                    parent for parent in parents
                    if parent.peer_id not in self.dropped
                    and self._resting.get(parent.peer_id, 0.0) <= now
                ]
                if window and usable:
                    needed = Bitmap.from_indices(self.piece_count, window)
                    ranked = rank_parents(usable, needed, self._local_labels, self._health)
                    in_flight = Counter(peer for _, peer, _ in pending.values())
                    for assignment in select_pieces(
                        window, ranked, urgent=[next_index], in_flight=in_flight,
                        per_parent_limit=self._per_parent_limit, salt=self._local_id,
                    ):
                        parent = next(p for p in ranked if p.peer_id == assignment.peer_id)
                        task = loop.create_task(self._fetch(parent, assignment.piece_index))
                        pending[task] = (assignment.piece_index, parent.peer_id, now)
                        unassigned.discard(assignment.piece_index)
                if not pending:
                    parents, refreshed = await self._no_parent_for(next_index, refreshes)
                    refreshes += refreshed
                    continue
                finished, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    index, peer, started = pending.pop(task)
                    error = task.exception()
                    if error is None:
                        data = task.result()
                        self._health.record_piece(peer, len(data), loop.time() - started)
                        self.stats.bytes_from_peers += len(data)
                        self.stats.pieces_from_peers += 1
                        self.served_by.add(peer)
                        ready[index] = data
                        continue
                    unassigned.add(index)
                    self._failed(peer, error, loop.time())
                    if isinstance(error, PeerBusy):
                        busy[index] += 1
                    else:
                        attempts[index] += 1
                    if attempts[index] >= MAX_PIECE_ATTEMPTS or busy[index] >= MAX_BUSY_ANSWERS:
                        raise UpstreamUnavailable(
                            f"piece {index} of task {self.task_key} failed "
                            f"{attempts[index] + busy[index]} times on peers; last: {error}"
                        )
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _fetch(self, parent: Parent, index: int) -> bytes:
        start = index * self.piece_size
        return await self._client.fetch_piece(
            Address(parent.host, parent.port), self.task_key, index,
            expected_size=min(self.piece_size, self._content_length - start),
            peer=parent.peer_id,
        )

    def _failed(self, peer: str, error: BaseException, now: float) -> None:
        if isinstance(error, PieceCorrupt):
            self.dropped.add(peer)
            self.stats.corrupt_pieces += 1
            self._health.record_failure(peer)
            log.warning("task %s: dropped peer %s: %s", self.task_key, peer, error)
        elif isinstance(error, PeerBusy):
            self._resting[peer] = now + error.retry_after
        else:
            self.stats.failed_pieces += 1
            self._health.record_failure(peer)
            self._resting[peer] = now + FAILURE_COOLDOWN
            if not isinstance(error, PeerFailed):
                log.error("task %s: fetch from %s failed", self.task_key, peer, exc_info=error)

    async def _no_parent_for(self, index: int, refreshes: int) -> tuple[list[Parent], bool]:
        """No usable parent could take a piece: wait for a resting one, or (after a short delay)
        ask for new parents; raise when refreshing has not helped `max_refreshes` times.
        Returns the parents and whether they were refreshed."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        known = {parent.peer_id for parent in self._parents or []}
        resting = [
            until for peer, until in self._resting.items()
            if until > now and peer in known and peer not in self.dropped
        ]
        if resting:
            await asyncio.sleep(min(resting) - now)
            return self._parents or [], False
        if refreshes >= self._max_refreshes:
            raise UpstreamUnavailable(
                f"no peer can give piece {index} of task {self.task_key} "
                f"({len(self.dropped)} dropped for corrupt pieces)"
            )
        await asyncio.sleep(REFRESH_DELAY)
        return await self._refresh(), True
