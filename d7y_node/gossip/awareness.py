"""Local health awareness (Lifeguard): how much this member trusts its own timeliness.

Owns one score, 0 (healthy) to `max_multiplier - 1`: it rises when our probes fail without the
nacks that would prove the network path is fine, when we have to refute a suspicion of ourselves,
and falls with every successful probe. The probe interval and timeout are scaled by score + 1,
so a member that is slow itself (CPU starved, GC pause, saturated link) probes less eagerly and
accuses others less. Does not own the probes (`state.py`).
"""

from __future__ import annotations


class Awareness:
    """The local health score and the timeout scaling it implies."""

    def __init__(self, max_multiplier: int) -> None:
        # Timeouts grow to at most `max_multiplier` times their base value.
        self._max_multiplier = max(1, max_multiplier)
        self.score = 0

    def apply_delta(self, delta: int) -> None:
        """Move the score by `delta`, kept within [0, max_multiplier - 1]."""
        self.score = min(self._max_multiplier - 1, max(0, self.score + delta))

    def scale(self, timeout: float) -> float:
        """`timeout` stretched for our current health."""
        return timeout * (self.score + 1)
