"""Tests of `d7y_node.scheduler`: homes by rendezvous hashing, the tracker, parent ranking,
piece selection and the peer protocol's wire messages. Pure logic: time is a number we set."""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections import Counter

import msgpack
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from d7y_node.errors import InvalidRequest
from d7y_node.piece_store import MIB, piece_size_for
from d7y_node.scheduler import (
    MAX_PARENTS,
    WIRE_MAX_BYTES,
    AnnounceReply,
    AnnounceRequest,
    Bitmap,
    OriginRequest,
    Parent,
    PeerHealth,
    SwarmPeer,
    TaskState,
    Tracker,
    decode,
    encode,
    locality,
    piece_count_for,
    rank_members,
    rank_parents,
    rendezvous_score,
    select_pieces,
    task_homes,
)


class Time:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def key(index: int) -> str:
    return xxhash.xxh3_128_hexdigest(index.to_bytes(8, "big")) * 2


def members(count: int) -> list[str]:
    return [f"host-{index:03}" for index in range(count)]


# ---------------------------------------------------------------------------------------------
# Homes


def test_rendezvous_score_is_xxh3_of_key_zero_byte_member() -> None:
    assert rendezvous_score("ab12", "node-1") == xxhash.xxh3_64_intdigest(b"ab12\x00node-1")
    assert rendezvous_score("ab12", "nöde") == xxhash.xxh3_64_intdigest("ab12\x00nöde".encode())


def test_homes_are_the_top_ranked_members_in_any_input_order() -> None:
    ids = members(10)
    task = key(1)
    ranked = rank_members(task, ids)
    assert sorted(ranked) == sorted(ids)
    scores = [rendezvous_score(task, member) for member in ranked]
    assert scores == sorted(scores, reverse=True)
    assert task_homes(task, reversed(ids)) == ranked[:2]
    assert task_homes(task, ids, replicas=3) == ranked[:3]
    assert task_homes(task, ["only"]) == ["only"]
    with pytest.raises(ValueError):
        task_homes(task, ids, replicas=0)


def test_a_membership_change_moves_only_tasks_whose_top_member_changed() -> None:
    count, tasks = 50, 4000
    ids = members(count)
    keys = [key(index) for index in range(tasks)]
    before = {task: task_homes(task, ids) for task in keys}

    # A member dies: exactly its tasks move, each to its old home 1 (which has the swarm).
    dead = ids[17]
    after = {task: task_homes(task, [m for m in ids if m != dead]) for task in keys}
    moved = [task for task in keys if after[task][0] != before[task][0]]
    assert set(moved) == {task for task in keys if before[task][0] == dead}
    assert all(after[task][0] == before[task][1] for task in moved)
    assert 0.5 / count < len(moved) / tasks < 1.5 / count

    # A member joins: the tasks that move all move to it, about 1/(n+1) of them.
    joined = {task: task_homes(task, [*ids, "host-new"]) for task in keys}
    moved = [task for task in keys if joined[task][0] != before[task][0]]
    assert all(joined[task][0] == "host-new" for task in moved)
    assert 0.5 / (count + 1) < len(moved) / tasks < 1.5 / (count + 1)


def test_homes_spread_evenly_over_members() -> None:
    # 100 members, 20,000 tasks (100,000 take ~6 s of hashing on this 2-core host): 200 tasks
    # per member expected, a standard deviation of ~14; max/min below 1.6 is ~3.5 sigma each side.
    ids = members(100)
    homes = Counter(rank_members(key(index), ids)[0] for index in range(20000))
    assert len(homes) == 100
    assert max(homes.values()) / min(homes.values()) < 1.6


# ---------------------------------------------------------------------------------------------
# Bitmaps


def test_bitmap_bit_order_and_operations() -> None:
    bitmap = Bitmap.from_indices(10, [0, 3, 9])
    assert bitmap.bits == bytes([0b00001001, 0b00000010])
    assert bitmap.indices() == [0, 3, 9]
    assert (bitmap.has(3), bitmap.has(4), bitmap.has(10), bitmap.has(-1)) == (
        True, False, False, False
    )
    assert bitmap.count() == 3 and not bitmap.complete()
    assert Bitmap.from_flags(bytearray([1, 0, 0, 1, 0, 0, 0, 0, 0, 1])) == bitmap
    assert Bitmap.full(10).complete() and Bitmap.full(10).count() == 10
    assert Bitmap.empty(0).complete()
    grown = bitmap.with_piece(4)
    assert grown.indices() == [0, 3, 4, 9]
    assert grown.fingerprint() != bitmap.fingerprint()
    assert Bitmap.from_indices(10, [9, 0, 3]).fingerprint() == bitmap.fingerprint()
    # Same bits, another piece count: another fingerprint.
    assert Bitmap.from_indices(16, [0, 3, 9]).fingerprint() != bitmap.fingerprint()


def test_bitmap_refuses_bad_shapes() -> None:
    with pytest.raises(InvalidRequest):
        Bitmap(10, b"\x00")  # one byte short
    with pytest.raises(InvalidRequest):
        Bitmap(10, b"\x00\x04")  # bit 10 set, past the last piece
    with pytest.raises(InvalidRequest):
        Bitmap(-1, b"")
    with pytest.raises(ValueError):
        Bitmap.from_indices(4, [4])


# ---------------------------------------------------------------------------------------------
# Tracker


def test_tracker_records_and_expires_silent_peers() -> None:
    time = Time()
    tracker = Tracker(time, peer_ttl=60)
    task = key(1)
    tracker.announce(task, "a", Bitmap.from_indices(4, [0]))
    time.now += 30
    tracker.announce(task, "b", Bitmap.from_indices(4, [1]))
    tracker.announce(task, "a", Bitmap.from_indices(4, [0, 2]))
    assert [(p.peer_id, p.bitmap.indices()) for p in tracker.peers(task)] == [
        ("a", [0, 2]), ("b", [1])
    ]
    time.now += 45  # b is 45 s old, a 45 s: both fresh
    assert len(tracker.peers(task)) == 2
    time.now += 20  # 65 s: both silent too long
    assert tracker.expire() == 2
    assert tracker.peers(task) == [] and len(tracker) == 0
    assert tracker.peers_expired == 2


def test_tracker_is_bounded_in_peers_and_tasks() -> None:
    time = Time()
    tracker = Tracker(time, max_tasks=3, max_peers=4)
    for index in range(10):
        time.now += 1
        tracker.announce(key(0), f"p{index}", Bitmap.empty(2))
    assert [p.peer_id for p in tracker.peers(key(0))] == ["p9", "p8", "p7", "p6"]
    assert tracker.peers_evicted == 6
    for index in range(1, 5):
        time.now += 1
        tracker.announce(key(index), "p", Bitmap.empty(2))
    # The least recently announced tasks went first.
    assert tracker.task_keys() == [key(2), key(3), key(4)]
    assert tracker.tasks_evicted == 2


def test_tracker_refuses_another_piece_count_and_forgets_members() -> None:
    time = Time()
    tracker = Tracker(time, peer_ttl=10)
    tracker.announce(key(1), "a", Bitmap.empty(4))
    tracker.announce(key(2), "a", Bitmap.empty(4))
    tracker.announce(key(2), "b", Bitmap.empty(4))
    with pytest.raises(InvalidRequest):
        tracker.announce(key(1), "b", Bitmap.empty(5))
    tracker.remove_member("a")
    assert tracker.peers(key(1)) == [] and [p.peer_id for p in tracker.peers(key(2))] == ["b"]
    # Once the swarm has gone silent, the task may start over with another cut.
    time.now += 11
    tracker.announce(key(2), "c", Bitmap.empty(5))
    assert tracker.piece_count(key(2)) == 5


def test_tracker_merge_keeps_the_newer_record() -> None:
    time = Time()
    home0, home1 = Tracker(time), Tracker(time)
    home1.announce(key(1), "a", Bitmap.from_indices(4, [0, 1]))  # newer than home 0's
    time.now -= 5
    home0.announce(key(1), "a", Bitmap.from_indices(4, [0]))
    home0.announce(key(1), "b", Bitmap.from_indices(4, [3]))
    time.now += 5
    home1.merge(key(1), home0.peers(key(1)))
    records = {p.peer_id: p for p in home1.peers(key(1))}
    assert records["a"].bitmap.indices() == [0, 1]
    assert records["b"] == SwarmPeer("b", Bitmap.from_indices(4, [3]), time.now - 5)


# ---------------------------------------------------------------------------------------------
# Health, ranking, selection


def test_peer_health_throughput_average_and_failure_decay() -> None:
    time = Time()
    health = PeerHealth(time, failure_half_life=30, alpha=0.5)
    assert health.throughput("a") is None and health.failures("a") == 0
    health.record_piece("a", 100, 1.0)
    health.record_piece("a", 300, 1.0)
    assert health.throughput("a") == pytest.approx(200)
    health.record_failure("a")
    health.record_failure("a")
    assert health.failures("a") == pytest.approx(2)
    time.now += 30
    assert health.failures("a") == pytest.approx(1)
    time.now += 60
    assert health.failures("a") == pytest.approx(0.25)


def parent(peer_id: str, pieces: list[int], count: int = 8, *, slots: int = 4,
           labels: dict[str, str] | None = None) -> Parent:
    return Parent(peer_id, "10.0.0.1", 65002, Bitmap.from_indices(count, pieces), slots,
                  labels or {})


def test_locality_needs_the_wider_labels_to_match() -> None:
    here = {"zone": "z1", "rack": "r1"}
    assert locality(here, {"zone": "z1", "rack": "r1"}) == 1.0
    assert locality(here, {"zone": "z1", "rack": "r2"}) == 0.5
    assert locality(here, {"zone": "z2", "rack": "r1"}) == 0.0
    assert locality({}, {"zone": "z1"}) == 0.0


def test_rank_parents_by_pieces_slots_locality_throughput_and_failures() -> None:
    time = Time()
    needed = Bitmap.from_indices(8, range(8))
    here = {"zone": "z1", "rack": "r1"}
    # More of what we need wins, all else equal; a parent with nothing we need is left out.
    ranked = rank_parents(
        [parent("few", [0]), parent("many", list(range(6))), parent("none", [], slots=8)],
        Bitmap.from_indices(8, [0, 1, 2, 3, 4, 5]), here,
    )
    assert [p.peer_id for p in ranked] == ["many", "few"]
    # Free slots: a busy parent goes last.
    ranked = rank_parents(
        [parent("busy", list(range(8)), slots=0), parent("free", list(range(8)), slots=4)],
        needed, here,
    )
    assert [p.peer_id for p in ranked] == ["free", "busy"]
    # Locality breaks a tie: same rack, then same zone, then elsewhere.
    ranked = rank_parents(
        [
            parent("far", [0], labels={"zone": "z2", "rack": "r1"}),
            parent("zone", [0], labels={"zone": "z1", "rack": "r9"}),
            parent("rack", [0], labels={"zone": "z1", "rack": "r1"}),
        ],
        needed, here,
    )
    assert [p.peer_id for p in ranked] == ["rack", "zone", "far"]
    # Measured throughput, and failures.
    health = PeerHealth(time)
    health.record_piece("fast", 100 * MIB, 1.0)
    health.record_piece("slow", 10 * MIB, 1.0)
    candidates = [parent(name, [0]) for name in ("slow", "fast", "new")]
    ranked = rank_parents(candidates, needed, {}, health)
    assert [p.peer_id for p in ranked] == ["fast", "new", "slow"]
    for _ in range(3):
        health.record_failure("fast")
    assert [p.peer_id for p in rank_parents(candidates, needed, {}, health)][-1] == "fast"
    # Ties: by id; and at most `limit`.
    tied = [parent(f"p{index}", [0]) for index in (3, 1, 2)]
    assert [p.peer_id for p in rank_parents(tied, needed, {}, limit=2)] == ["p1", "p2"]
    with pytest.raises(ValueError):
        rank_parents([parent("x", [0], count=9)], needed, {})


def test_select_pieces_urgent_first_then_rarest_within_limits() -> None:
    parents = [
        parent("a", [0, 1, 2, 3, 4, 5]),
        parent("b", [0, 1, 2, 3, 4]),
        parent("c", [0, 1, 2, 3]),
    ]
    # Availability: 0-3 three holders, 4 two, 5 one. Piece 2 is what a reader waits for.
    picks = select_pieces(range(6), parents, urgent=[2], per_parent_limit=1)
    assert picks[0].piece_index == 2 and picks[0].peer_id == "a"
    # Then the rarest: 5 (only a, which is full), 4 (a full -> b), then one of 0,1,3 to c.
    assert [(p.piece_index, p.peer_id) for p in picks[1:2]] == [(4, "b")]
    assert len(picks) == 3 and picks[2].peer_id == "c" and picks[2].piece_index in (0, 1, 3)
    # Per-parent limits count pieces already in flight.
    picks = select_pieces(range(6), parents, in_flight={"a": 2, "b": 1}, per_parent_limit=2)
    assert Counter(p.peer_id for p in picks) == {"b": 1, "c": 2}
    # Pieces nobody holds are left out; an urgent piece not needed is ignored.
    picks = select_pieces([6, 7], [*parents, parent("d", [6])], urgent=[1])
    assert [(p.piece_index, p.peer_id) for p in picks] == [(6, "d")]
    with pytest.raises(ValueError):
        select_pieces([0], parents, per_parent_limit=0)


def test_select_pieces_spreads_downloaders_over_equally_rare_pieces() -> None:
    parents = [parent("a", list(range(8)))]
    firsts = {
        select_pieces(range(8), parents, per_parent_limit=1, salt=f"d{index}")[0].piece_index
        for index in range(20)
    }
    assert len(firsts) >= 4


# ---------------------------------------------------------------------------------------------
# Wire messages


def test_wire_messages_round_trip() -> None:
    length = 5 * MIB + 1
    count = piece_count_for(length)
    announce = AnnounceRequest("host-1", length, Bitmap.from_indices(count, [0, 5]), False)
    assert decode(encode(announce), AnnounceRequest) == announce
    reply = AnnounceReply(tuple(
        parent(f"p{index}", [index], count=count, labels={"zone": "z"}) for index in range(3)
    ))
    assert decode(encode(reply), AnnounceReply) == reply
    assert decode(encode(AnnounceReply(())), AnnounceReply) == AnnounceReply(())
    state = TaskState(length, piece_size_for(length), Bitmap.full(count))
    assert decode(encode(state), TaskState) == state and state.complete


def test_wire_decode_refuses_what_is_wrong() -> None:
    length = 3 * MIB
    state = TaskState(length, MIB, Bitmap.empty(3))
    data = encode(state)
    with pytest.raises(InvalidRequest):
        decode(data, AnnounceRequest)  # another message type
    bad_bodies = [
        b"\xc1",  # not msgpack
        msgpack.packb([2, 3, length, MIB, b"\x00"]),  # another version
        msgpack.packb([1, 3, length, 2 * MIB, b"\x00"]),  # wrong piece size
        msgpack.packb([1, 3, length, MIB, b"\x00\x00"]),  # bitmap of the wrong size
        msgpack.packb([1, 3, length, MIB, b"\x08"]),  # bit past the end
        msgpack.packb([1, 3, -1, MIB, b""]),  # negative length
        msgpack.packb([1, 3, True, MIB, b""]),  # a bool is not a length
        msgpack.packb([1, 1, "", length, b"\x00", False]),  # empty peer id
        msgpack.packb([1, 1, "p", length, b"\x00", 0]),  # forwarded not a bool
        msgpack.packb([1, 2, [[ "p", "h", 0, 3, b"\x00", 1, {}]]]),  # port 0
        msgpack.packb([1, 2, [["p", "h", 1, 3, b"\x00", 1, {"k": 1}]]]),  # label not text
        msgpack.packb([1, 2, [["p", "h", 1, 3, b"\x00", 1, {}]] * (MAX_PARENTS + 1)]),
        b"\x00" * (WIRE_MAX_BYTES + 1),
    ]
    kinds = [TaskState] * 7 + [AnnounceRequest] * 2 + [AnnounceReply] * 4
    for body, kind in zip(bad_bodies, kinds, strict=True):
        with pytest.raises(InvalidRequest):
            decode(body, kind)  # type: ignore[type-var]
    with pytest.raises(InvalidRequest):
        encode(AnnounceRequest("p", length, Bitmap.empty(4)))  # bitmap vs length
    with pytest.raises(InvalidRequest):
        encode(AnnounceReply(tuple(parent(f"p{i}", [0]) for i in range(MAX_PARENTS + 1))))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_wire_decode_of_garbage_raises_only_invalid_request(data: bytes) -> None:
    for kind in (AnnounceRequest, AnnounceReply, TaskState):
        with contextlib.suppress(InvalidRequest):
            decode(data, kind)  # type: ignore[type-var]


@settings(max_examples=100, deadline=None)
@given(
    st.text(min_size=1, max_size=40),
    st.integers(min_value=0, max_value=300 * MIB),
    st.randoms(use_true_random=False),
    st.booleans(),
)
def test_wire_announce_round_trips_any_valid_input(
    peer_id: str, length: int, rng: random.Random, forwarded: bool
) -> None:
    count = piece_count_for(length)
    bitmap = Bitmap.from_indices(count, [i for i in range(count) if rng.random() < 0.5])
    try:
        announce = AnnounceRequest(peer_id, length, bitmap, forwarded)
        data = encode(announce)
    except InvalidRequest:
        # Only ids that are not valid UTF-8 text (lone surrogates) may be refused.
        with pytest.raises(UnicodeEncodeError):
            peer_id.encode()
        return
    assert decode(data, AnnounceRequest) == announce


DIGEST = "sha256:" + "ab" * 32


def test_an_announce_carries_the_origin_request_and_a_reply_the_home_s_origin_error() -> None:
    url = f"https://registry.example:5000/v2/library/app/blobs/{DIGEST}"
    origin = OriginRequest(DIGEST, url, (("Authorization", "Bearer secret-token"),))
    announce = AnnounceRequest("host-1", 3 * MIB, Bitmap.empty(3), origin=origin)
    assert decode(encode(announce), AnnounceRequest) == announce
    # Credentials stay out of every repr (and so out of logs and assertion messages).
    assert "secret-token" not in repr(origin) and "secret-token" not in repr(announce)
    reply = AnnounceReply((), "TaskFailed: origin answered 403")
    assert decode(encode(reply), AnnounceReply) == reply
    # A lazy announce, with and without an origin request; nil in the origin's place only
    # when the lazy flag follows.
    for lazy in (dataclasses.replace(announce, lazy=True),
                 AnnounceRequest("host-1", 3 * MIB, Bitmap.empty(3), lazy=True)):
        assert decode(encode(lazy), AnnounceRequest) == lazy
    for body in ([1, 1, "p", MIB, b"\x00", False, None],
                 [1, 1, "p", MIB, b"\x00", False, None, 1],
                 [1, 1, "p", MIB, b"\x00", False, None, True, True]):
        with pytest.raises(InvalidRequest):
            decode(msgpack.packb(body), AnnounceRequest)
    # A plain URL source (not a registry blob) may name its task freely.
    plain = OriginRequest("https://files.example/a.tar", "https://files.example/a.tar")
    assert decode(encode(AnnounceRequest("h", 0, Bitmap.empty(0), origin=plain)),
                  AnnounceRequest).origin == plain


@pytest.mark.parametrize(
    ("task_id", "url", "headers"),
    [
        (DIGEST, f"ftp://r.example/v2/a/blobs/{DIGEST}", ()),  # not http(s)
        (DIGEST, f"file:///v2/a/blobs/{DIGEST}", ()),
        (DIGEST, f"http:///v2/a/blobs/{DIGEST}", ()),  # no host
        (DIGEST, f"http://user:pw@r.example/v2/a/blobs/{DIGEST}", ()),  # user info
        (DIGEST, f"http://r.example:99999/v2/a/blobs/{DIGEST}", ()),  # bad port
        (DIGEST, f"http://r.example/v2/a/blobs/{DIGEST} x", ()),  # a space
        ("sha256:" + "cd" * 32, f"http://r.example/v2/a/blobs/{DIGEST}", ()),  # another digest
        (DIGEST, f"http://r.example/v2/a/blobs/{DIGEST}", (("Cookie", "c"),)),  # not allowed
        (DIGEST, f"http://r.example/v2/a/blobs/{DIGEST}", (("Authorization", "a\r\nX: y"),)),
        (DIGEST, f"http://r.example/v2/a/blobs/{DIGEST}",
         (("Authorization", "a"), ("authorization", "b"))),
        (DIGEST, "http://r.example/" + "a" * 9000, ()),  # too long
        ("", f"http://r.example/v2/a/blobs/{DIGEST}", ()),  # no task id
    ],
)
def test_a_malformed_origin_request_is_refused_on_both_ends(
    task_id: str, url: str, headers: tuple[tuple[str, str], ...]
) -> None:
    origin = OriginRequest(task_id, url, headers)
    with pytest.raises(InvalidRequest):
        encode(AnnounceRequest("p", MIB, Bitmap.empty(1), origin=origin))
    body = msgpack.packb([1, 1, "p", MIB, b"\x00", False,
                          [task_id, url, [list(item) for item in headers]]])
    with pytest.raises(InvalidRequest):
        decode(body, AnnounceRequest)
