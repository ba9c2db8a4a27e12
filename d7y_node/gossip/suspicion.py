"""The suspicion timer of one suspected member (Lifeguard's dynamic suspicion timeout).

Owns the timeout after which a suspected member is declared dead: it starts at `maximum` and
shrinks towards `minimum`, logarithmically in the number of independent confirmations (other
members that also suspect it), reaching `minimum` at `expected_confirmations`. Also the formulas
that size those bounds from the cluster size. Does not own what "dead" then means (`state.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from d7y_node.gossip.clock import Clock, TimerHandle


def suspicion_timeout(suspicion_mult: int, member_count: int, probe_interval: float) -> float:
    """The minimum suspicion timeout: `mult * log10(n) * probe interval`, with log10 floored at 1
    so small clusters still give a suspect `mult` probe rounds to refute."""
    node_scale = max(1.0, math.log10(max(1, member_count)))
    return suspicion_mult * node_scale * probe_interval


def remaining_suspicion_time(
    confirmations: int, expected: int, elapsed: float, minimum: float, maximum: float
) -> float:
    """Seconds left before the suspect is declared dead (negative: overdue).

    The total timeout falls from `maximum` to `minimum` as log(confirmations + 1) /
    log(expected + 1): the first confirmations shorten it most, since each one is strong evidence
    that the failure is not our own local problem.
    """
    if expected < 1:
        return minimum - elapsed
    fraction = math.log(confirmations + 1) / math.log(expected + 1)
    total = max(minimum, maximum - fraction * (maximum - minimum))
    return total - elapsed


class Suspicion:
    """The running timer for one suspect, fed with confirmations from other members."""

    def __init__(
        self,
        clock: Clock,
        *,
        first_accuser: str,
        expected_confirmations: int,
        minimum: float,
        maximum: float,
        on_timeout: Callable[[int], None],
    ) -> None:
        self._clock = clock
        # How many confirmations drive the timeout down to its minimum; 0: start at the minimum.
        self._expected = expected_confirmations
        self._minimum = minimum
        self._maximum = maximum
        self._on_timeout = on_timeout
        self._start = clock.now()
        # Who already confirmed; the first accuser is excluded because our own suspicion can be
        # gossiped back to us and must not count as independent evidence.
        self._accusers = {first_accuser}
        self.confirmations = 0
        self._fired = False
        initial = maximum if expected_confirmations >= 1 else minimum
        self._timer: TimerHandle = clock.call_later(initial, self._fire)

    def confirm(self, accuser: str) -> bool:
        """Count an independent confirmation; True if it was new (worth gossiping on)."""
        if self._fired or self.confirmations >= self._expected or accuser in self._accusers:
            return False
        self._accusers.add(accuser)
        self.confirmations += 1
        remaining = remaining_suspicion_time(
            self.confirmations,
            self._expected,
            self._clock.now() - self._start,
            self._minimum,
            self._maximum,
        )
        self._timer.cancel()
        self._timer = self._clock.call_later(remaining, self._fire)
        return True

    def cancel(self) -> None:
        """Stop the timer (the suspect was refuted, or declared dead by someone else)."""
        self._fired = True
        self._timer.cancel()

    def _fire(self) -> None:
        if self._fired:
            return
        self._fired = True
        self._on_timeout(self.confirmations)
