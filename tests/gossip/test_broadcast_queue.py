"""The transmit-limited broadcast queue."""

from __future__ import annotations

from d7y_node.gossip.broadcast_queue import BroadcastQueue, retransmit_limit


def test_the_retransmit_limit_is_mult_times_ceil_log10_of_n_plus_one() -> None:
    assert retransmit_limit(4, 1) == 4
    assert retransmit_limit(4, 9) == 4
    assert retransmit_limit(4, 10) == 8
    assert retransmit_limit(4, 100) == 12
    assert retransmit_limit(4, 0) == 0


def test_each_message_is_sent_its_limit_of_times_then_finished() -> None:
    finished: list[str] = []
    queue = BroadcastQueue(retransmit_mult=2, member_count=lambda: 5)  # limit 2
    queue.queue("a", b"alpha", on_finished=lambda: finished.append("a"))
    assert queue.take(100) == [b"alpha"]
    assert finished == []
    assert queue.take(100) == [b"alpha"]
    assert finished == ["a"]
    assert queue.take(100) == []
    assert len(queue) == 0


def test_a_newer_message_about_the_same_member_replaces_the_old_one() -> None:
    finished: list[str] = []
    queue = BroadcastQueue(retransmit_mult=4, member_count=lambda: 5)
    queue.queue("a", b"old", on_finished=lambda: finished.append("old"))
    queue.queue("a", b"new")
    assert finished == ["old"]
    assert queue.take(100) == [b"new"]


def test_least_sent_first_then_largest_and_only_what_fits() -> None:
    queue = BroadcastQueue(retransmit_mult=4, member_count=lambda: 5)
    queue.queue("a", b"a" * 10)
    assert queue.take(100) == [b"a" * 10]  # "a" has now been sent once
    queue.queue("b", b"b" * 4)
    queue.queue("c", b"c" * 6)
    # Fresh ones first (largest first), then "a" if room is left.
    assert queue.take(10) == [b"c" * 6, b"b" * 4]
    assert queue.take(16) == [b"a" * 10, b"c" * 6]
    # Nothing fits in 3 bytes; an overhead per message counts against the limit too.
    assert queue.take(3) == []
    # "b" (sent once) goes first and costs 6; neither 12-byte "a" nor 8-byte "c" fits after it.
    assert queue.take(12, overhead=2) == [b"b" * 4]


def test_clear_finishes_everything() -> None:
    finished: list[str] = []
    queue = BroadcastQueue(retransmit_mult=4, member_count=lambda: 5)
    queue.queue("a", b"x", on_finished=lambda: finished.append("a"))
    queue.queue("b", b"y", on_finished=lambda: finished.append("b"))
    queue.clear()
    assert sorted(finished) == ["a", "b"]
    assert queue.take(100) == []
