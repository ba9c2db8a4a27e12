"""Time for the gossip layer: a `Clock` protocol, the asyncio one, and a virtual one.

Owns how membership reads the time and schedules callbacks. Every timer in the gossip package
goes through a `Clock`, so a test can run a 100-member cluster on `VirtualClock` for minutes of
simulated time in a few real seconds, deterministically. Does not own what the callbacks do.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from typing import Protocol


class TimerHandle(Protocol):
    """A scheduled callback that can be cancelled before it runs."""

    def cancel(self) -> None: ...


class Clock(Protocol):
    """Monotonic seconds and one-shot timers."""

    def now(self) -> float:
        """Monotonic time in seconds (only differences mean anything)."""
        ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        """Run `callback` once, `delay` seconds from now (0 or less: as soon as possible)."""
        ...


class LoopClock:
    """The real clock: the running asyncio loop's `time()` and `call_later`."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()

    def now(self) -> float:
        return self._loop.time()

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        return self._loop.call_later(max(0.0, delay), callback)


class _VirtualTimer:
    """One entry of the virtual clock's heap; cancelling only marks it (lazy deletion)."""

    __slots__ = ("callback", "cancelled")

    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class VirtualClock:
    """Simulated time that moves only when a test calls `advance` or `run_until`.

    Callbacks run in deadline order; ties run in the order they were scheduled, so a run is a pure
    function of its inputs and seeds.
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        # (deadline, scheduling order, timer): the order breaks ties deterministically.
        self._heap: list[tuple[float, int, _VirtualTimer]] = []
        self._order = itertools.count()
        self.callbacks_run = 0

    def now(self) -> float:
        return self._now

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        timer = _VirtualTimer(callback)
        heapq.heappush(self._heap, (self._now + max(0.0, delay), next(self._order), timer))
        return timer

    def advance(self, seconds: float) -> None:
        """Run every callback due within the next `seconds`, then set the time to that point."""
        self._run_until_time(self._now + seconds)

    def run_until(
        self, condition: Callable[[], bool], timeout: float, *, check_every: float = 0.05
    ) -> bool:
        """Advance in steps of `check_every` until `condition()` holds (True) or `timeout`
        simulated seconds have passed (False)."""
        deadline = self._now + timeout
        while not condition():
            if self._now >= deadline:
                return False
            self._run_until_time(min(deadline, self._now + check_every))
        return True

    def _run_until_time(self, target: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= target:
            deadline, _, timer = heapq.heappop(heap)
            if timer.cancelled:
                continue
            self._now = deadline
            self.callbacks_run += 1
            timer.callback()
        self._now = max(self._now, target)
