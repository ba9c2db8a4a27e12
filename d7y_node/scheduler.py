"""Decentralized scheduling: who fetches a task from origin, who has which pieces, who to ask.

Owns the pure logic of P2P scheduling, with no I/O and no clock of its own (time is handed in):

- `Bitmap`: which pieces of a task a peer holds (the piece store's bit order);
- rendezvous hashing (`rendezvous_score`, `rank_members`, `task_homes`): the homes of a task;
- `Tracker`: kept by a task's home, which peers hold which pieces, with expiry and size bounds;
- `PeerHealth`: a downloader's own view of its parents (throughput EWMA, decaying failures);
- `rank_parents` and `select_pieces`: which parents to ask, and which piece to ask each for;
- the peer protocol's wire messages (`AnnounceRequest`, `AnnounceReply`, `Parent`, `TaskState`,
  and `OriginRequest`, how a task's home fetches it from origin for the swarm) and their one
  msgpack encoding (`encode`, `decode`), validated and size-bounded.

Does not talk to the network (`peer.py`), know members' liveness (`gossip`), or store pieces
(`piece_store.py`, `tasks.py`): callers hand in member ids, bitmaps and times.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import msgpack
import xxhash

from d7y_node.errors import InvalidRequest
from d7y_node.gossip.messages import (
    HOST_MAX_BYTES,
    LABEL_KEY_MAX_BYTES,
    LABEL_VALUE_MAX_BYTES,
    LABELS_MAX_COUNT,
    MEMBER_ID_MAX_BYTES,
    PORT_MAX,
)
from d7y_node.piece_store import MAX_PIECE_SIZE, piece_size_for

# ---------------------------------------------------------------------------------------------
# Bounds

# 65,536 pieces of the store's largest piece size (16 MiB) is 1 TiB: beyond any image layer. The
# bitmap is then 8 KiB, so a reply naming every parent's bitmap stays small.
MAX_PIECES = 65536
MAX_CONTENT_LENGTH = MAX_PIECES * MAX_PIECE_SIZE
# A downloader needs a handful of good parents, not the swarm: 16 fill any link, and the reply
# (16 bitmaps of at most 8 KiB) stays far below `WIRE_MAX_BYTES`.
MAX_PARENTS = 16
# No wire message of the peer protocol is larger than this (an announce reply at its bounds is
# about 16 * (8 KiB + 1 KiB)).
WIRE_MAX_BYTES = 256 * 1024
# Wire messages have this version; another is refused (both ends come from one release).
WIRE_VERSION = 1
# An origin request's task id and URL: a registry blob URL is far shorter; a signed storage URL
# with its query stays well within 8 KiB (the common limit of HTTP servers on a request line).
TASK_ID_MAX_BYTES = 8192
ORIGIN_URL_MAX_BYTES = 8192
# Request headers an origin request may carry to the home: only the client's credentials
# (everything else the home's own client sets). Compared case-insensitively.
ORIGIN_HEADER_NAMES = ("authorization",)
# A header value (a bearer token, a JWT of a few KiB at most).
ORIGIN_HEADER_MAX_BYTES = 8192
# Why a home could not fetch a task: one line, for a log and a counter, not a document.
ORIGIN_ERROR_MAX_BYTES = 1024
# The path of a registry blob: its digest is the task id (validated when a home gets one).
REGISTRY_BLOB_PATH = re.compile(r"/v2/(?P<repository>.+)/blobs/(?P<digest>[^/]+)")

# ---------------------------------------------------------------------------------------------
# Defaults

# Two homes: home 0 fetches from origin and keeps the tracker, home 1 holds a copy to take over.
DEFAULT_HOME_REPLICAS = 2
# A peer that has not announced for this long is dropped from the tracker; downloaders announce
# at least every few seconds while they run, so a minute means the peer is gone or finished
# long ago (a complete peer re-announces when it serves).
PEER_TTL = 60.0
# A home tracks at most this many tasks (the least recently announced is forgotten first) ...
MAX_TRACKED_TASKS = 4096
# ... with at most this many peers each (the least recently announced is forgotten first):
# enough for a large cluster's swarm, bounded so that a flood of fake ids cannot grow memory.
MAX_PEERS_PER_TASK = 512
# Labels that place a host, from the widest to the narrowest; a narrower one counts only when the
# wider ones match too (racks are named alike in different zones).
LOCALITY_LABELS = ("zone", "rack")
# Free upload slots beyond this add nothing: a parent with 4 free slots is as good as one with 40
# for a single downloader.
SLOT_SATURATION = 4
# Scoring weights of `rank_parents`: holding what we need and being able to serve now matter
# most; measured throughput is as strong a signal; locality breaks near-ties.
WEIGHT_COVERAGE = 1.0
WEIGHT_SLOTS = 1.0
WEIGHT_THROUGHPUT = 1.0
WEIGHT_LOCALITY = 0.5
# A parent we have not measured scores as a middling one, so it gets tried (exploration).
UNKNOWN_THROUGHPUT_SCORE = 0.5
# Failures count half as much after this many seconds: a parent that failed a minute ago is
# forgiven soon, one that fails repeatedly stays at the end of the list.
FAILURE_HALF_LIFE = 30.0
# Weight of a new throughput sample in the moving average: the last ~4 pieces dominate.
THROUGHPUT_EWMA_ALPHA = 0.25
# A downloader keeps stats of at most this many peers (least recently updated forgotten first).
MAX_HEALTH_ENTRIES = 1024
# Pieces in flight from one parent at once: two keep its link busy across request round trips
# without one parent holding most of our pieces hostage.
DEFAULT_PER_PARENT_LIMIT = 2


# ---------------------------------------------------------------------------------------------
# Bitmaps


@dataclass(frozen=True)
class Bitmap:
    """Which of `piece_count` pieces are held: bit i is bit (i mod 8) of byte i div 8, the order
    of the piece store's metadata. Bits past `piece_count` are zero."""

    piece_count: int
    bits: bytes

    def __post_init__(self) -> None:
        if type(self.piece_count) is not int or not 0 <= self.piece_count <= MAX_PIECES:
            raise InvalidRequest("MESSAGE_INVALID", f"piece count must be in [0, {MAX_PIECES}]")
        if not isinstance(self.bits, bytes) or len(self.bits) != (self.piece_count + 7) // 8:
            raise InvalidRequest(
                "MESSAGE_INVALID", f"a bitmap of {self.piece_count} pieces has "
                f"{(self.piece_count + 7) // 8} bytes"
            )
        if self.piece_count % 8 and self.bits[-1] >> (self.piece_count % 8):
            raise InvalidRequest("MESSAGE_INVALID", "bitmap has bits past its last piece")

    @classmethod
    def empty(cls, piece_count: int) -> Bitmap:
        return cls(piece_count, bytes((piece_count + 7) // 8))

    @classmethod
    def full(cls, piece_count: int) -> Bitmap:
        return cls.from_int(piece_count, (1 << piece_count) - 1)

    @classmethod
    def from_int(cls, piece_count: int, value: int) -> Bitmap:
        return cls(piece_count, value.to_bytes((piece_count + 7) // 8, "little"))

    @classmethod
    def from_indices(cls, piece_count: int, indices: Iterable[int]) -> Bitmap:
        value = 0
        for index in indices:
            if not 0 <= index < piece_count:
                raise ValueError(f"piece {index} is outside 0-{piece_count - 1}")
            value |= 1 << index
        return cls.from_int(piece_count, value)

    @classmethod
    def from_flags(cls, flags: bytes | bytearray) -> Bitmap:
        """From one byte per piece, non-zero where held (the piece store's in-memory form)."""
        value = 0
        for index, flag in enumerate(flags):
            if flag:
                value |= 1 << index
        return cls.from_int(len(flags), value)

    def as_int(self) -> int:
        return int.from_bytes(self.bits, "little")

    def has(self, index: int) -> bool:
        if not 0 <= index < self.piece_count:
            return False
        return bool(self.bits[index >> 3] & (1 << (index & 7)))

    def count(self) -> int:
        return self.as_int().bit_count()

    def complete(self) -> bool:
        return self.count() == self.piece_count

    def indices(self) -> list[int]:
        value = self.as_int()
        found: list[int] = []
        while value:
            low = value & -value
            found.append(low.bit_length() - 1)
            value ^= low
        return found

    def with_piece(self, index: int) -> Bitmap:
        if not 0 <= index < self.piece_count:
            raise ValueError(f"piece {index} is outside 0-{self.piece_count - 1}")
        return Bitmap.from_int(self.piece_count, self.as_int() | (1 << index))

    def fingerprint(self) -> str:
        """16 hex digits that change whenever the bitmap does (a long-poll's `known`)."""
        digest = xxhash.xxh3_64(self.piece_count.to_bytes(4, "big"))
        digest.update(self.bits)
        return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Homes: rendezvous hashing


def rendezvous_score(task_key: str, member_id: str) -> int:
    """The weight of `member_id` for `task_key`: xxh3_64 of the task key's UTF-8 bytes, one 0x00
    byte, and the member id's UTF-8 bytes. Task keys are hex, so the encoding is unambiguous.

    The task key (not the task id) is hashed, so a home can tell from a request alone whether it
    is the home of the task it is asked about."""
    return xxhash.xxh3_64_intdigest(task_key.encode() + b"\x00" + member_id.encode())


def rank_members(task_key: str, member_ids: Iterable[str]) -> list[str]:
    """Every member id ranked for `task_key`, highest score first (ties: lower id first)."""
    return sorted(set(member_ids), key=lambda member: (-rendezvous_score(task_key, member), member))


def task_homes(
    task_key: str, member_ids: Iterable[str], replicas: int = DEFAULT_HOME_REPLICAS
) -> list[str]:
    """The first `replicas` members of the ranking: home 0 fetches from origin and tracks the
    swarm; home 1 keeps a copy of the tracker and takes over when home 0 dies."""
    if replicas < 1:
        raise ValueError("a task needs at least one home")
    return rank_members(task_key, member_ids)[:replicas]


# ---------------------------------------------------------------------------------------------
# The tracker


@dataclass(frozen=True)
class SwarmPeer:
    """A peer of a task's swarm as the tracker knows it."""

    peer_id: str
    bitmap: Bitmap
    # Clock time of its last announce (expired after `PEER_TTL` of silence).
    announced_at: float


@dataclass
class _Swarm:
    """One task's peers, least recently announced first."""

    piece_count: int
    peers: OrderedDict[str, SwarmPeer] = field(default_factory=OrderedDict)


class Tracker:
    """Who holds which pieces of each task, kept by the task's home (and copied to home 1).

    Bounded: at most `max_tasks` tasks of at most `max_peers` peers; the least recently announced
    is dropped first. Peers silent for `peer_ttl` seconds are expired. `clock` gives the time.
    """

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        peer_ttl: float = PEER_TTL,
        max_tasks: int = MAX_TRACKED_TASKS,
        max_peers: int = MAX_PEERS_PER_TASK,
    ) -> None:
        if peer_ttl <= 0 or max_tasks < 1 or max_peers < 1:
            raise ValueError("tracker bounds must be positive")
        self._clock = clock
        self.peer_ttl = peer_ttl
        self.max_tasks = max_tasks
        self.max_peers = max_peers
        self._swarms: OrderedDict[str, _Swarm] = OrderedDict()
        # Counters: peers dropped for silence, for the size bound, and tasks dropped for it.
        self.peers_expired = 0
        self.peers_evicted = 0
        self.tasks_evicted = 0

    def __len__(self) -> int:
        return len(self._swarms)

    def task_keys(self) -> list[str]:
        return list(self._swarms)

    def announce(
        self, task_key: str, peer_id: str, bitmap: Bitmap, *, at: float | None = None
    ) -> None:
        """Record that `peer_id` holds `bitmap` of the task. Raises `InvalidRequest` when the
        bitmap's piece count differs from the swarm's (the peer cut the content differently)."""
        now = self._clock() if at is None else at
        swarm = self._swarms.get(task_key)
        if swarm is not None and swarm.piece_count != bitmap.piece_count:
            if not self._live(swarm, now):
                del self._swarms[task_key]
                swarm = None
            else:
                raise InvalidRequest(
                    "PIECE_COUNT_MISMATCH",
                    f"task {task_key} has {swarm.piece_count} pieces, the announce "
                    f"{bitmap.piece_count}",
                )
        if swarm is None:
            swarm = self._swarms[task_key] = _Swarm(bitmap.piece_count)
            while len(self._swarms) > self.max_tasks:
                self._swarms.popitem(last=False)
                self.tasks_evicted += 1
        self._swarms.move_to_end(task_key)
        previous = swarm.peers.pop(peer_id, None)
        if previous is not None and previous.announced_at > now:
            now = previous.announced_at  # a replayed or reordered announce never goes back
        swarm.peers[peer_id] = SwarmPeer(peer_id, bitmap, now)
        while len(swarm.peers) > self.max_peers:
            swarm.peers.popitem(last=False)
            self.peers_evicted += 1

    def _live(self, swarm: _Swarm, now: float) -> bool:
        return any(now - peer.announced_at <= self.peer_ttl for peer in swarm.peers.values())

    def peers(self, task_key: str) -> list[SwarmPeer]:
        """The task's peers that announced within `peer_ttl`, most recent first."""
        swarm = self._swarms.get(task_key)
        if swarm is None:
            return []
        self._expire_swarm(task_key, swarm, self._clock())
        return list(reversed(swarm.peers.values()))

    def piece_count(self, task_key: str) -> int | None:
        swarm = self._swarms.get(task_key)
        return swarm.piece_count if swarm is not None else None

    def remove_peer(self, task_key: str, peer_id: str) -> None:
        swarm = self._swarms.get(task_key)
        if swarm is not None:
            swarm.peers.pop(peer_id, None)
            if not swarm.peers:
                del self._swarms[task_key]

    def remove_member(self, peer_id: str) -> None:
        """A member died or left: it holds nothing any more, in any task."""
        for task_key in list(self._swarms):
            self.remove_peer(task_key, peer_id)

    def expire(self) -> int:
        """Drop peers silent for longer than `peer_ttl` (and tasks left empty); returns how many
        peers were dropped. Call it now and then; `peers` also expires the task it reads."""
        now = self._clock()
        before = self.peers_expired
        for task_key, swarm in list(self._swarms.items()):
            self._expire_swarm(task_key, swarm, now)
        return self.peers_expired - before

    def _expire_swarm(self, task_key: str, swarm: _Swarm, now: float) -> None:
        # Oldest first: stop at the first peer still fresh.
        while swarm.peers:
            peer_id, peer = next(iter(swarm.peers.items()))
            if now - peer.announced_at <= self.peer_ttl:
                break
            del swarm.peers[peer_id]
            self.peers_expired += 1
        if not swarm.peers:
            self._swarms.pop(task_key, None)

    def merge(self, task_key: str, peers: Iterable[SwarmPeer]) -> None:
        """Take over records from another tracker (home 0's copy), keeping the newer of each."""
        for peer in sorted(peers, key=lambda p: p.announced_at):
            swarm = self._swarms.get(task_key)
            current = swarm.peers.get(peer.peer_id) if swarm is not None else None
            if current is None or current.announced_at < peer.announced_at:
                self.announce(task_key, peer.peer_id, peer.bitmap, at=peer.announced_at)


# ---------------------------------------------------------------------------------------------
# A downloader's view of its parents


@dataclass
class _Health:
    throughput: float | None = None
    failures: float = 0.0
    # Clock time the failure count was last decayed to.
    failures_at: float = 0.0


class PeerHealth:
    """A downloader's record of each parent: recent piece throughput (an EWMA, bytes/s) and
    recent failures (a count that halves every `failure_half_life` seconds). Bounded."""

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        failure_half_life: float = FAILURE_HALF_LIFE,
        alpha: float = THROUGHPUT_EWMA_ALPHA,
        max_entries: int = MAX_HEALTH_ENTRIES,
    ) -> None:
        self._clock = clock
        self.failure_half_life = failure_half_life
        self.alpha = alpha
        self.max_entries = max_entries
        self._peers: OrderedDict[str, _Health] = OrderedDict()

    def _entry(self, peer_id: str) -> _Health:
        entry = self._peers.pop(peer_id, None)
        if entry is None:
            entry = _Health(failures_at=self._clock())
        self._peers[peer_id] = entry
        while len(self._peers) > self.max_entries:
            self._peers.popitem(last=False)
        return entry

    def record_piece(self, peer_id: str, size: int, seconds: float) -> None:
        """A piece of `size` bytes came from `peer_id` in `seconds`."""
        rate = size / max(seconds, 1e-6)
        entry = self._entry(peer_id)
        if entry.throughput is None:
            entry.throughput = rate
        else:
            entry.throughput += self.alpha * (rate - entry.throughput)

    def record_failure(self, peer_id: str, weight: float = 1.0) -> None:
        entry = self._entry(peer_id)
        entry.failures = self._decayed(entry) + weight
        entry.failures_at = self._clock()

    def _decayed(self, entry: _Health) -> float:
        elapsed = max(0.0, self._clock() - entry.failures_at)
        return entry.failures * math.pow(0.5, elapsed / self.failure_half_life)

    def throughput(self, peer_id: str) -> float | None:
        entry = self._peers.get(peer_id)
        return entry.throughput if entry is not None else None

    def failures(self, peer_id: str) -> float:
        entry = self._peers.get(peer_id)
        return self._decayed(entry) if entry is not None else 0.0


# ---------------------------------------------------------------------------------------------
# Parent ranking and piece selection


@dataclass(frozen=True)
class Parent:
    """A peer that may serve pieces of a task, as a tracker reports it (also on the wire)."""

    peer_id: str
    # Its peer HTTP address.
    host: str
    port: int
    bitmap: Bitmap
    # From its gossiped load: how many more uploads it accepts now.
    free_upload_slots: int
    labels: Mapping[str, str] = field(default_factory=dict)


def locality(local_labels: Mapping[str, str], labels: Mapping[str, str]) -> float:
    """0..1: the share of `LOCALITY_LABELS`, widest first, that match before the first that
    does not (a same-rack host in another zone is not local)."""
    matched = 0
    for key in LOCALITY_LABELS:
        value = local_labels.get(key)
        if value is None or labels.get(key) != value:
            break
        matched += 1
    return matched / len(LOCALITY_LABELS)


def parent_scores(
    parents: Sequence[Parent],
    needed: Bitmap,
    local_labels: Mapping[str, str],
    health: PeerHealth | None = None,
) -> dict[str, float]:
    """The score of each parent holding at least one needed piece (others are left out)."""
    wanted = needed.as_int()
    total = max(1, wanted.bit_count())
    measured = [
        rate for parent in parents
        if health is not None and (rate := health.throughput(parent.peer_id)) is not None
    ]
    fastest = max(measured, default=0.0)
    scores: dict[str, float] = {}
    for parent in parents:
        useful = (parent.bitmap.as_int() & wanted).bit_count() if wanted else 0
        if wanted and not useful:
            continue
        coverage = useful / total if wanted else 0.0
        slots = min(parent.free_upload_slots, SLOT_SATURATION) / SLOT_SATURATION
        rate = health.throughput(parent.peer_id) if health is not None else None
        speed = UNKNOWN_THROUGHPUT_SCORE if rate is None or fastest <= 0 else rate / fastest
        failures = health.failures(parent.peer_id) if health is not None else 0.0
        score = (
            WEIGHT_COVERAGE * coverage
            + WEIGHT_SLOTS * slots
            + WEIGHT_THROUGHPUT * speed
            + WEIGHT_LOCALITY * locality(local_labels, parent.labels)
        ) / (1.0 + failures)
        scores[parent.peer_id] = score
    return scores


def rank_parents(
    parents: Sequence[Parent],
    needed: Bitmap,
    local_labels: Mapping[str, str],
    health: PeerHealth | None = None,
    *,
    limit: int = MAX_PARENTS,
) -> list[Parent]:
    """The parents worth asking, best first: those holding needed pieces, ranked by how much of
    what we need they hold, free upload slots, measured throughput, locality, divided by
    (1 + recent failures). Ties go to the lower peer id, so the ranking is deterministic."""
    if any(parent.bitmap.piece_count != needed.piece_count for parent in parents):
        raise ValueError("parents' bitmaps and the needed pieces differ in piece count")
    scores = parent_scores(parents, needed, local_labels, health)
    ranked = sorted(
        (parent for parent in parents if parent.peer_id in scores),
        key=lambda parent: (-scores[parent.peer_id], parent.peer_id),
    )
    return ranked[:limit]


@dataclass(frozen=True)
class PieceAssignment:
    """Fetch `piece_index` from `peer_id`."""

    piece_index: int
    peer_id: str


def select_pieces(
    needed: Iterable[int],
    parents: Sequence[Parent],
    *,
    urgent: Sequence[int] = (),
    in_flight: Mapping[str, int] | None = None,
    per_parent_limit: int = DEFAULT_PER_PARENT_LIMIT,
    salt: str = "",
) -> list[PieceAssignment]:
    """Assign needed pieces to ranked parents, as many as their free concurrency allows.

    Order: the `urgent` pieces first, in their order (the next piece a waiting reader needs),
    then the rest rarest first (fewest parents holding it); ties are broken by a hash of `salt`
    (the downloader's id) and the piece, so different downloaders spread over different pieces
    instead of all asking for the same one. Each piece goes to the best-ranked parent that holds
    it and has fewer than `per_parent_limit` pieces in flight (counting `in_flight`). Pieces no
    parent holds, or whose holders are all busy, are left for a later call."""
    if per_parent_limit < 1:
        raise ValueError("per_parent_limit must be at least 1")
    load = {parent.peer_id: (in_flight or {}).get(parent.peer_id, 0) for parent in parents}
    wanted = list(dict.fromkeys(needed))
    wanted_set = set(wanted)
    holders: dict[int, list[Parent]] = {
        index: [parent for parent in parents if parent.bitmap.has(index)] for index in wanted
    }
    salt_bytes = salt.encode() + b"\x00"

    def rarity(index: int) -> tuple[int, int, int]:
        spread = xxhash.xxh3_64_intdigest(salt_bytes + index.to_bytes(8, "big"))
        return (len(holders[index]), spread, index)

    first = [index for index in dict.fromkeys(urgent) if index in wanted_set]
    first_set = set(first)
    rest = sorted((index for index in wanted if index not in first_set), key=rarity)
    assignments: list[PieceAssignment] = []
    for index in [*first, *rest]:
        if all(count >= per_parent_limit for count in load.values()):
            break
        for parent in holders[index]:
            if load[parent.peer_id] < per_parent_limit:
                load[parent.peer_id] += 1
                assignments.append(PieceAssignment(index, parent.peer_id))
                break
    return assignments


# ---------------------------------------------------------------------------------------------
# Wire messages of the peer protocol


@dataclass(frozen=True)
class OriginRequest:
    """How to fetch a task from its origin: the task's id, an http(s) URL and the request
    headers it needs (only `ORIGIN_HEADER_NAMES`: the client's `Authorization`).

    A downloader sends it with its announce so that the task's home 0 can fetch the task for
    the swarm even when no client asked the home itself. The headers are credentials: they
    travel only over the peer channel (which a cluster key authenticates), are never logged
    (`repr` leaves them out) and are not copied on to other homes."""

    task_id: str
    url: str
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)


@dataclass(frozen=True)
class AnnounceRequest:
    """A peer tells a task's home what it holds, and asks for parents (unless `forwarded`:
    home 0 passes every announce on to home 1 so that it keeps a copy of the swarm). `origin`,
    when the peer knows it, lets home 0 fetch the task from origin for everyone. `lazy` says the
    peer reads only parts of the task, as its readers ask (a Nydus mount): home 0 then fetches
    what is asked of it first and the rest once the asking goes quiet (`p2p.ClusterScheduler`).
    """

    peer_id: str
    content_length: int
    bitmap: Bitmap
    forwarded: bool = False
    origin: OriginRequest | None = None
    lazy: bool = False


@dataclass(frozen=True)
class AnnounceReply:
    """Parents for the announcing peer, best first (at most `MAX_PARENTS`). `origin_error` is
    set when the home (home 0) could not fetch the task from origin: why, in one line."""

    parents: tuple[Parent, ...]
    origin_error: str = ""


@dataclass(frozen=True)
class TaskState:
    """What a peer holds of a task: the content's length and piece size, and its bitmap."""

    content_length: int
    piece_size: int
    bitmap: Bitmap

    @property
    def complete(self) -> bool:
        return self.bitmap.complete()


WireMessage = AnnounceRequest | AnnounceReply | TaskState
_M = TypeVar("_M", AnnounceRequest, AnnounceReply, TaskState)

# Message type tags (the first field of every message).
_TAGS: dict[type[Any], int] = {AnnounceRequest: 1, AnnounceReply: 2, TaskState: 3}


def piece_count_for(content_length: int) -> int:
    """How many pieces content of this length has (the piece store's cut)."""
    size = piece_size_for(content_length)
    return (content_length + size - 1) // size


def _bad(message: str) -> InvalidRequest:
    return InvalidRequest("MESSAGE_INVALID", message)


def _check_text(value: Any, what: str, max_bytes: int, *, allow_empty: bool = False) -> str:
    if type(value) is not str or (not value and not allow_empty):
        raise _bad(f"{what} must be a non-empty string")
    try:
        size = len(value.encode())
    except UnicodeEncodeError:
        raise _bad(f"{what} is not valid text") from None
    if size > max_bytes:
        raise _bad(f"{what} exceeds {max_bytes} bytes")
    return value


def _check_int(value: Any, what: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise _bad(f"{what} must be an integer in [{low}, {high}]")
    return value


def _check_labels(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping) or len(value) > LABELS_MAX_COUNT:
        raise _bad(f"labels must be a map of at most {LABELS_MAX_COUNT} entries")
    return {
        _check_text(key, "label key", LABEL_KEY_MAX_BYTES): _check_text(
            item, "label value", LABEL_VALUE_MAX_BYTES, allow_empty=True
        )
        for key, item in value.items()
    }


def _check_length(value: Any) -> int:
    return _check_int(value, "content length", 0, MAX_CONTENT_LENGTH)


def _check_bitmap(bits: Any, content_length: int) -> Bitmap:
    if type(bits) is not bytes:
        raise _bad("bitmap must be bytes")
    return Bitmap(piece_count_for(content_length), bits)


def check_origin_request(request: OriginRequest) -> OriginRequest:
    """`request` if it is well formed, else `InvalidRequest`: a bounded task id; an http or
    https URL with a host and no user info; only `ORIGIN_HEADER_NAMES` headers, bounded, one
    line each; and for a registry blob URL (`/v2/NAME/blobs/DIGEST`), a task id equal to the
    digest (a home never stores content under an id another host chose freely)."""
    _check_text(request.task_id, "task id", TASK_ID_MAX_BYTES)
    url = _check_text(request.url, "origin URL", ORIGIN_URL_MAX_BYTES)
    if any(ord(character) < 0x21 or ord(character) == 0x7F for character in url):
        raise _bad("origin URL has spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise _bad("origin URL does not parse") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _bad("origin URL must be http:// or https:// with a host")
    if "@" in parts.netloc or (port is not None and not 0 < port <= PORT_MAX):
        raise _bad("origin URL must not carry user info or a bad port")
    blob = REGISTRY_BLOB_PATH.fullmatch(parts.path)
    if blob is not None and request.task_id != blob.group("digest"):
        raise _bad("the task id of a registry blob must be the digest its URL names")
    if type(request.headers) is not tuple or len(request.headers) > len(ORIGIN_HEADER_NAMES):
        raise _bad(f"at most {len(ORIGIN_HEADER_NAMES)} origin headers")
    names: set[str] = set()
    for item in request.headers:
        if type(item) is not tuple or len(item) != 2:
            raise _bad("an origin header is a (name, value) pair")
        name = _check_text(item[0], "origin header name", 64).lower()
        value = _check_text(item[1], "origin header value", ORIGIN_HEADER_MAX_BYTES)
        if name not in ORIGIN_HEADER_NAMES or name in names:
            raise _bad("origin headers may only be " + ", ".join(ORIGIN_HEADER_NAMES))
        if any(character in value for character in "\r\n\x00"):
            raise _bad("an origin header value is one line")
        names.add(name)
    return request


def _check_parent(parent: Parent) -> None:
    _check_text(parent.peer_id, "peer id", MEMBER_ID_MAX_BYTES)
    _check_text(parent.host, "host", HOST_MAX_BYTES)
    _check_int(parent.port, "port", 1, PORT_MAX)
    _check_int(parent.free_upload_slots, "free upload slots", 0, 2**32 - 1)
    _check_labels(parent.labels)


def _fields(message: WireMessage) -> list[Any]:
    if isinstance(message, AnnounceRequest):
        _check_text(message.peer_id, "peer id", MEMBER_ID_MAX_BYTES)
        _check_length(message.content_length)
        if message.bitmap.piece_count != piece_count_for(message.content_length):
            raise _bad("bitmap does not match the content length")
        fields: list[Any] = [
            message.peer_id, message.content_length, message.bitmap.bits, message.forwarded
        ]
        if message.origin is not None:
            origin = check_origin_request(message.origin)
            fields.append([origin.task_id, origin.url, [list(item) for item in origin.headers]])
        elif message.lazy:
            fields.append(None)
        if message.lazy:
            fields.append(True)
        return fields
    if isinstance(message, AnnounceReply):
        _check_text(message.origin_error, "origin error", ORIGIN_ERROR_MAX_BYTES,
                    allow_empty=True)
        if len(message.parents) > MAX_PARENTS:
            raise _bad(f"at most {MAX_PARENTS} parents")
        counts = {parent.bitmap.piece_count for parent in message.parents}
        if len(counts) > 1:
            raise _bad("parents' bitmaps differ in piece count")
        parents = []
        for parent in message.parents:
            _check_parent(parent)
            parents.append([
                parent.peer_id, parent.host, parent.port, parent.bitmap.piece_count,
                parent.bitmap.bits, parent.free_upload_slots, dict(parent.labels),
            ])
        return [parents, message.origin_error] if message.origin_error else [parents]
    _check_length(message.content_length)
    if message.piece_size != piece_size_for(message.content_length):
        raise _bad("piece size does not match the content length")
    if message.bitmap.piece_count != piece_count_for(message.content_length):
        raise _bad("bitmap does not match the content length")
    return [message.content_length, message.piece_size, message.bitmap.bits]


def encode(message: WireMessage) -> bytes:
    """The msgpack bytes of a peer-protocol message; raises `InvalidRequest` if it is out of
    bounds (so a node never sends what a peer would refuse)."""
    data: bytes = msgpack.packb(
        [WIRE_VERSION, _TAGS[type(message)], *_fields(message)], use_bin_type=True
    )
    if len(data) > WIRE_MAX_BYTES:
        raise _bad(f"message of {len(data)} bytes exceeds {WIRE_MAX_BYTES}")
    return data


def decode(data: bytes, kind: type[_M]) -> _M:
    """Parse and check a message of type `kind`; raises `InvalidRequest` on anything else."""
    if len(data) > WIRE_MAX_BYTES:
        raise _bad(f"message of {len(data)} bytes exceeds {WIRE_MAX_BYTES}")
    try:
        fields = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        raise _bad(f"not msgpack: {error}") from None
    if type(fields) is not list or len(fields) < 2:
        raise _bad("not a peer-protocol message")
    if fields[0] != WIRE_VERSION or type(fields[0]) is not int:
        raise _bad(f"message version {fields[0]!r} is not {WIRE_VERSION}")
    if fields[1] != _TAGS[kind] or type(fields[1]) is not int:
        raise _bad(f"expected a {kind.__name__} message")
    body = fields[2:]
    message: WireMessage
    if kind is AnnounceRequest:
        if len(body) not in (4, 5, 6):
            raise _bad("an announce has 4 to 6 fields")
        length = _check_length(body[1])
        if type(body[3]) is not bool:
            raise _bad("forwarded must be a boolean")
        if len(body) == 6 and type(body[5]) is not bool:
            raise _bad("lazy must be a boolean")
        message = AnnounceRequest(
            _check_text(body[0], "peer id", MEMBER_ID_MAX_BYTES),
            length,
            _check_bitmap(body[2], length),
            body[3],
            # A lazy announce without an origin request keeps its place with nil.
            _decode_origin(body[4]) if len(body) == 5 or (
                len(body) == 6 and body[4] is not None
            ) else None,
            len(body) == 6 and body[5],
        )
    elif kind is AnnounceReply:
        if len(body) not in (1, 2) or type(body[0]) is not list or len(body[0]) > MAX_PARENTS:
            raise _bad(f"an announce reply is a list of at most {MAX_PARENTS} parents")
        parents = []
        for item in body[0]:
            if type(item) is not list or len(item) != 7:
                raise _bad("a parent has 7 fields")
            peer_id, host, port, count, bits, slots, labels = item
            if type(bits) is not bytes:
                raise _bad("bitmap must be bytes")
            parent = Parent(
                _check_text(peer_id, "peer id", MEMBER_ID_MAX_BYTES),
                _check_text(host, "host", HOST_MAX_BYTES),
                _check_int(port, "port", 1, PORT_MAX),
                Bitmap(_check_int(count, "piece count", 0, MAX_PIECES), bits),
                _check_int(slots, "free upload slots", 0, 2**32 - 1),
                _check_labels(labels),
            )
            parents.append(parent)
        if len({parent.bitmap.piece_count for parent in parents}) > 1:
            raise _bad("parents' bitmaps differ in piece count")
        origin_error = (
            _check_text(body[1], "origin error", ORIGIN_ERROR_MAX_BYTES, allow_empty=True)
            if len(body) == 2 else ""
        )
        message = AnnounceReply(tuple(parents), origin_error)
    else:
        if len(body) != 3:
            raise _bad("a task state has 3 fields")
        length = _check_length(body[0])
        if body[1] != piece_size_for(length) or type(body[1]) is not int:
            raise _bad("piece size does not match the content length")
        message = TaskState(length, body[1], _check_bitmap(body[2], length))
    assert isinstance(message, kind)
    return message


def _decode_origin(value: Any) -> OriginRequest:
    if type(value) is not list or len(value) != 3 or type(value[2]) is not list:
        raise _bad("an origin request is [task id, URL, headers]")
    headers: list[tuple[str, str]] = []
    for item in value[2][: len(ORIGIN_HEADER_NAMES) + 1]:  # more is refused by the check
        if type(item) is not list or len(item) != 2:
            raise _bad("an origin header is a (name, value) pair")
        headers.append((item[0], item[1]))
    if len(value[2]) > len(ORIGIN_HEADER_NAMES):
        raise _bad(f"at most {len(ORIGIN_HEADER_NAMES)} origin headers")
    return check_origin_request(OriginRequest(value[0], value[1], tuple(headers)))
