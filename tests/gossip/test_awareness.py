"""Lifeguard's local health score."""

from __future__ import annotations

from d7y_node.gossip.awareness import Awareness


def test_the_score_stays_within_zero_and_the_maximum_multiplier_minus_one() -> None:
    awareness = Awareness(max_multiplier=8)
    assert awareness.scale(0.5) == 0.5
    awareness.apply_delta(-3)
    assert awareness.score == 0
    awareness.apply_delta(3)
    assert awareness.scale(1.0) == 4.0
    awareness.apply_delta(100)
    assert awareness.score == 7
    assert awareness.scale(1.0) == 8.0
    awareness.apply_delta(-1)
    assert awareness.scale(1.0) == 7.0
