"""The transmit-limited broadcast queue: gossip waiting to be piggybacked on outgoing packets.

Owns which encoded messages go out next and how often each is sent: every message is sent at most
`retransmit_mult * ceil(log10(n + 1))` times (enough for epidemic spread to reach all n members
with high probability), the least-sent first, so news overtakes old gossip. A newer message about
a member replaces the queued one about the same member. Does not own what the messages say or
where they go.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass


def retransmit_limit(retransmit_mult: int, member_count: int) -> int:
    """How many times one broadcast is sent before it is dropped."""
    return retransmit_mult * math.ceil(math.log10(member_count + 1))


@dataclass
class _Broadcast:
    """One queued message and how often it has been sent."""

    key: str
    message: bytes
    order: int
    transmits: int = 0
    # Called once when the message stops being sent (limit reached or replaced); a leaving
    # member waits on this before it shuts down.
    on_finished: Callable[[], None] | None = None

    def finish(self) -> None:
        if self.on_finished is not None:
            callback, self.on_finished = self.on_finished, None
            callback()


class BroadcastQueue:
    """Messages to piggyback, keyed by the member they are about."""

    def __init__(self, retransmit_mult: int, member_count: Callable[[], int]) -> None:
        self._retransmit_mult = retransmit_mult
        # The current cluster size, read at every take (the limit follows the cluster).
        self._member_count = member_count
        self._queued: dict[str, _Broadcast] = {}
        self._order = itertools.count()

    def __len__(self) -> int:
        return len(self._queued)

    def queue(
        self, key: str, message: bytes, on_finished: Callable[[], None] | None = None
    ) -> None:
        """Queue `message` about `key`, replacing any queued message about the same key."""
        previous = self._queued.pop(key, None)
        if previous is not None:
            previous.finish()
        self._queued[key] = _Broadcast(key, message, next(self._order), on_finished=on_finished)

    def take(self, byte_limit: int, overhead: int = 0) -> list[bytes]:
        """Messages that fit in `byte_limit` bytes (each costing `overhead` more), least sent
        first, then largest first (packs better), then newest; each counts as sent once."""
        if not self._queued or byte_limit <= overhead:
            return []
        limit = retransmit_limit(self._retransmit_mult, self._member_count())
        candidates = sorted(
            self._queued.values(),
            key=lambda item: (item.transmits, -len(item.message), -item.order),
        )
        taken: list[bytes] = []
        free = byte_limit
        for item in candidates:
            cost = len(item.message) + overhead
            if cost > free:
                continue
            free -= cost
            taken.append(item.message)
            item.transmits += 1
            if item.transmits >= limit:
                del self._queued[item.key]
                item.finish()
            if free <= overhead:
                break
        return taken

    def clear(self) -> None:
        """Drop everything (finishing each message)."""
        queued, self._queued = self._queued, {}
        for item in queued.values():
            item.finish()
