"""The Lifeguard suspicion timer and memberlist's formulas that size it."""

from __future__ import annotations

import pytest

from d7y_node.gossip.clock import VirtualClock
from d7y_node.gossip.suspicion import Suspicion, remaining_suspicion_time, suspicion_timeout


def test_the_minimum_timeout_grows_with_log10_of_the_cluster_size() -> None:
    assert suspicion_timeout(4, 1, 1.0) == 4.0  # log10 is floored at 1 for small clusters
    assert suspicion_timeout(4, 10, 1.0) == 4.0
    assert suspicion_timeout(4, 100, 1.0) == pytest.approx(8.0)
    assert suspicion_timeout(4, 1000, 0.5) == pytest.approx(6.0)


def test_the_remaining_time_falls_logarithmically_with_confirmations() -> None:
    minimum, maximum = 8.0, 48.0
    assert remaining_suspicion_time(0, 2, 0.0, minimum, maximum) == 48.0
    # log(2)/log(3) of the way down: 48 - 0.631 * 40
    assert remaining_suspicion_time(1, 2, 0.0, minimum, maximum) == pytest.approx(22.76, abs=0.01)
    assert remaining_suspicion_time(2, 2, 0.0, minimum, maximum) == pytest.approx(8.0)
    assert remaining_suspicion_time(2, 2, 10.0, minimum, maximum) == pytest.approx(-2.0)
    assert remaining_suspicion_time(0, 0, 3.0, minimum, maximum) == pytest.approx(5.0)


def run(confirm_at: dict[float, str], expected: int = 2) -> tuple[float | None, Suspicion]:
    clock = VirtualClock()
    fired: list[float] = []
    suspicion = Suspicion(
        clock,
        first_accuser="a",
        expected_confirmations=expected,
        minimum=8.0,
        maximum=48.0,
        on_timeout=lambda _count: fired.append(clock.now()),
    )
    for at, accuser in sorted(confirm_at.items()):
        clock.advance(at - clock.now())
        suspicion.confirm(accuser)
    clock.advance(100.0)
    assert len(fired) <= 1
    return (fired[0] if fired else None), suspicion


def test_without_confirmations_the_timer_runs_to_its_maximum() -> None:
    assert run({})[0] == pytest.approx(48.0)


def test_confirmations_shorten_it_down_to_the_minimum() -> None:
    assert run({1.0: "b"})[0] == pytest.approx(22.76, abs=0.01)
    assert run({1.0: "b", 2.0: "c"})[0] == pytest.approx(8.0)
    # Confirmed after the minimum has passed: fires at once.
    assert run({1.0: "b", 9.0: "c"})[0] == pytest.approx(9.0)


def test_duplicate_accusers_and_the_first_accuser_do_not_count() -> None:
    fired, suspicion = run({1.0: "a", 2.0: "b", 3.0: "b"})
    assert suspicion.confirmations == 1
    assert fired == pytest.approx(22.76, abs=0.01)


def test_no_expected_confirmations_means_the_minimum_from_the_start() -> None:
    fired, suspicion = run({1.0: "b"}, expected=0)
    assert fired == pytest.approx(8.0)
    assert suspicion.confirmations == 0


def test_a_cancelled_suspicion_never_fires() -> None:
    clock = VirtualClock()
    fired: list[int] = []
    suspicion = Suspicion(
        clock,
        first_accuser="a",
        expected_confirmations=2,
        minimum=1.0,
        maximum=6.0,
        on_timeout=fired.append,
    )
    clock.advance(0.5)
    suspicion.cancel()
    assert not suspicion.confirm("b")
    clock.advance(10.0)
    assert fired == []
