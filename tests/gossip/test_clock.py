"""The virtual clock that drives every simulation."""

from __future__ import annotations

from d7y_node.gossip.clock import VirtualClock


def test_callbacks_run_in_deadline_order_ties_in_scheduling_order() -> None:
    clock = VirtualClock()
    ran: list[tuple[str, float]] = []
    clock.call_later(2.0, lambda: ran.append(("c", clock.now())))
    clock.call_later(1.0, lambda: ran.append(("a", clock.now())))
    clock.call_later(1.0, lambda: ran.append(("b", clock.now())))
    cancelled = clock.call_later(1.5, lambda: ran.append(("x", clock.now())))
    cancelled.cancel()
    clock.advance(1.9)
    assert ran == [("a", 1.0), ("b", 1.0)]
    assert clock.now() == 1.9
    clock.advance(0.1)
    assert ran[-1] == ("c", 2.0)


def test_callbacks_scheduled_by_callbacks_run_within_the_same_advance() -> None:
    clock = VirtualClock()
    ran: list[float] = []

    def tick() -> None:
        ran.append(clock.now())
        clock.call_later(1.0, tick)

    clock.call_later(0.0, tick)
    clock.advance(3.5)
    assert ran == [0.0, 1.0, 2.0, 3.0]


def test_run_until_stops_when_the_condition_holds_or_at_the_timeout() -> None:
    clock = VirtualClock()
    flag: list[bool] = []
    clock.call_later(2.0, lambda: flag.append(True))
    assert clock.run_until(lambda: bool(flag), timeout=10.0, check_every=0.5)
    assert clock.now() == 2.0
    assert not clock.run_until(lambda: False, timeout=1.0)
    assert clock.now() == 3.0
