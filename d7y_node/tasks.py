"""Downloads: one per content, many readers.

Owns the `TaskManager`, which finds or starts the single download of a task (a blob digest),
schedules its pieces from a `PieceSource`, writes them into the `PieceStore`, and lets readers
stream bytes as soon as the pieces they need are on disk. Does not speak HTTP (that is
`proxy.py`) and does not know where an origin is (that is the `PieceSource` it is handed).
The public names below (`PieceSource`, `Segment`, `TaskInfo`, `TaskHandle`, `TaskManager`) are
a contract other modules are written against; their signatures do not change.

How one download runs (`_LiveTask`):
- `origin_concurrency` workers each take the next piece to fetch: first a piece a reader is
  blocked on, then a piece in some reader's range, then (whole downloads) the next missing one.
  A reader blocked on a piece while every worker is busy with another gets an extra worker at
  once (at most `origin_concurrency` extra), instead of waiting for a worker to finish.
- A worker streams its piece from the source into the data file in batches (two in flight, so
  the socket keeps flowing while the previous batch is written), feeding the piece's xxh3 as it
  goes. A broken read is retried from where it broke, so a byte is written only once.
- One hasher follows the written prefix of the content with sha256, reading it back from the
  file (the page cache, just written) in the store's thread pool. When the prefix reaches the end
  it compares the digest: a match makes the task complete, a mismatch discards it.
- Metadata is flushed about once a second while pieces arrive, and at the end.
- Readers get a piece as soon as it is written and its xxh3 recorded, except the content's last
  piece during a whole download: that one waits for the sha256 check, so a reader of the whole
  content always ends with the bytes or an error (`DigestMismatch`), never with bad bytes.
- A lazy download (`whole=False`: a Nydus mount reading chunks, a `Range` request at the mirror)
  fetches only the blocks (`piece_store.BLOCK_SIZE`) of a piece that its readers' ranges cover,
  each run of missing blocks with one source read, and readers get their range as soon as its
  blocks are written. Why not whole pieces: a RAFS chunk is often a few KiB to a few hundred
  KiB, and a 2 MiB piece per chunk read multiplied the origin bytes of a container's start
  several times (bench/README.md). What keeps it sound:
  - verification is what it was: a piece fresh from the origin was never checked against
    anything but the whole content's sha256 (its xxh3 is taken as it arrives, for the disk and
    for peers), and a reader of part of a blob can never have that; a block gets its own xxh3
    as it arrives, and a piece assembled from blocks gets its xxh3 only after every block was
    read back and matched. The mount checks each chunk against the image's digest before use,
    and a whole download still ends with the sha256 of everything;
  - the piece store stays the only cache: blocks are written into the task's data file and
    recorded (with an xxh3 each, verified after a restart) in its metadata;
  - P2P: a piece is offered to peers (bitmap, `open_piece`) only once it is held whole, its
    blocks checked and its own xxh3 recorded, so the bitmaps and the piece geometry do not
    change. Part of a piece is served only when asked for by range (`read_held`, the peer
    range route): from held pieces or held blocks, each checked against its recorded xxh3
    first, or, on the host whose download can fetch them (the task's home), as soon as it has.
    A source that says a piece's reads go to peers now (`WholePieceSource`, because some peer
    holds that piece) gets whole-piece fetches from a lazy download: one transfer per piece,
    not one per block run. A piece no peer holds yet is read in blocks from the task's home
    (`p2p.ClusterSource`); the origin sees only what the home fetches.
  When a whole download widens a lazy one, a partly held piece is completed from its missing
  blocks, not fetched again.
- A whole download with a reader of part of a piece it has not started (`read_held`: the home
  of a task answering a lazy peer) fetches that part's blocks first and then the rest of the
  piece, so the reader waits for its blocks, not for the piece or the download's order.
- A `_LiveTask` exists while handles are open or a download runs; it holds one pin on the stored
  task (GC keeps it, its fd stays open for `Segment`s). A failed or stopped one is retired: new
  opens start a fresh one once it has torn down.

For peers (`peer.py`), the manager also hands out single held pieces and held ranges without
joining a download (`open_piece`, `read_held`, `bitmap`, `wait_pieces`, `task_id_for_key`), and
takes a `source_policy` that wraps every source an opener hands in (the cluster decides origin
or peers, `p2p.py`), so this module holds no cluster logic.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, TypeVar, runtime_checkable

import xxhash

from d7y_node.config import TaskConfig
from d7y_node.errors import (
    DigestMismatch,
    StoreFull,
    TaskFailed,
    UpstreamStatus,
    UpstreamUnavailable,
)
from d7y_node.metrics import Metrics
from d7y_node.piece_store import MIB, BlockDigests, PieceStore, StoredTask

log = logging.getLogger(__name__)

T = TypeVar("T")

# A worker writes what it received in batches of this size: big enough that the thread hop is
# negligible, small enough that a worker holds little memory (two batches at most).
WRITE_BATCH = 1 * MIB
# The hasher reads back at most this much per step, so it keeps up with the written prefix.
HASH_STEP = 16 * MIB
# Metadata is written at most this often while pieces arrive (each write costs an fdatasync);
# pieces written since the last one are simply fetched again after a crash.
FLUSH_INTERVAL = 1.0
# ... or after this many new pieces, whichever comes first.
FLUSH_PIECES = 64
# First wait before retrying a piece; doubles each retry, up to RETRY_DELAY_MAX.
RETRY_DELAY = 0.1
RETRY_DELAY_MAX = 2.0
# On close, a download whose pieces are all in gets this long to finish its digest check.
CLOSE_GRACE = 5.0

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class PieceSource(Protocol):
    """Where a task's bytes come from: the origin now, peers in a later issue."""

    async def content_length(self) -> int:
        """The content's total length in bytes. May raise `UpstreamStatus` (401, 404, ...) or
        `UpstreamUnavailable`."""
        ...

    def read(self, offset: int, length: int) -> AsyncIterator[bytes]:
        """Yield exactly `length` bytes starting at `offset`, in order, in any chunking.
        Raises `UpstreamUnavailable` when the source breaks off (the caller may retry)."""
        ...


@runtime_checkable
class WholePieceSource(Protocol):
    """A `PieceSource` whose reads may move whole pieces whatever range is asked (peers serve
    pieces whole): a lazy download then fetches whole pieces from it while it says so."""

    def reads_whole_pieces(self, index: int) -> bool:
        """Whether a read of piece `index` made now would move the whole piece."""
        ...


@dataclass(frozen=True)
class Segment:
    """A run of verified bytes on disk, ready for `sendfile`.

    `fd` is an open descriptor of the task's data file; it stays valid while the `TaskHandle`
    that produced it is open.
    """

    fd: int
    offset: int
    count: int


@dataclass(frozen=True)
class TaskInfo:
    """What is known of one task, for HTTP headers and status output."""

    task_id: str
    content_length: int
    piece_size: int
    piece_count: int
    pieces_done: int
    complete: bool
    attributes: Mapping[str, str]


class TaskHandle(Protocol):
    """A reader's hold on a task: the task is pinned (never evicted) while a handle is open."""

    @property
    def info(self) -> TaskInfo: ...

    def segments(self, offset: int, length: int) -> AsyncIterator[Segment]:
        """Yield the range [offset, offset+length) as segments, in order, each as soon as its
        pieces are on disk and verified. Raises `TaskFailed` (or a subclass) if the download
        fails before the range is covered. The caller must have validated the range.

        During a whole download, the piece holding the content's last byte is yielded only
        after the whole content's sha256 matched, so a reader of the whole content never
        receives all of a blob that turns out wrong (`DigestMismatch` instead)."""
        ...

    async def read(self, offset: int, length: int) -> bytes:
        """The bytes of [offset, offset+length), waiting for their pieces."""
        ...


def _task_info(stored: StoredTask) -> TaskInfo:
    return TaskInfo(
        task_id=stored.task_id,
        content_length=stored.content_length,
        piece_size=stored.piece_size,
        piece_count=stored.piece_count,
        pieces_done=stored.pieces_done,
        complete=stored.complete,
        attributes=dict(stored.attributes),
    )


async def _finish_even_if_cancelled(work: Awaitable[T]) -> T:
    """Await `work` to its end even when the caller is cancelled meanwhile (the cancellation is
    raised afterwards)."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        while not task.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([task])
        raise


class _PieceProgress:
    """A piece being fetched: how much of it is written (contiguously from its start). For a
    lazy download's run of blocks (`whole_piece` False) the range is the run's and `digest`
    keeps one xxh3 per block."""

    __slots__ = ("digest", "index", "size", "start", "whole_piece", "written")

    def __init__(
        self, index: int, start: int, size: int, *, blocks: BlockDigests | None = None
    ) -> None:
        self.index = index
        self.start = start
        self.size = size
        self.written = 0
        self.whole_piece = blocks is None
        self.digest: Any = xxhash.xxh3_64() if blocks is None else blocks


class _LiveTask:
    """One task opened in this process: its readers, and its download if one runs.

    Holds one pin on the stored task from preparation until the last handle is closed and the
    download has stopped, so neither GC nor a fd close pulls the data from under a reader.
    """

    def __init__(self, manager: TaskManager, task_id: str) -> None:
        self.manager = manager
        self.store = manager.store
        self.config = manager.config
        self.metrics = manager.metrics
        self.task_id = task_id
        self.stored: StoredTask | None = None
        # Set once the stored task exists (or preparation failed); openers wait on it.
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.handles = 0
        self.pinned = False
        self.disposed = False
        # The reason readers get for missing pieces once the download has failed or stopped.
        self.failure: TaskFailed | None = None
        self.source: PieceSource | None = None
        self.whole = False
        # The download: a supervisor task that owns the workers and the hasher.
        self.supervisor: asyncio.Task[None] | None = None
        # Set when the download must end (complete, failed, stopped); the supervisor wakes.
        self.finished = asyncio.Event()
        # Set once no download runs (never started, or its supervisor has torn down).
        self.stopped = asyncio.Event()
        self.stopped.set()
        self.workers: list[asyncio.Task[None]] = []
        # Of the workers, those started for a blocked reader (`_serve_blocked`).
        self.urgent_workers = 0
        self.in_flight: dict[int, _PieceProgress] = {}
        # Readers blocked on a piece (index -> how many), and pieces in readers' ranges.
        self.waiting: dict[int, int] = {}
        self.wanted: dict[int, int] = {}
        # The byte ranges readers want, by piece (a lazy download fetches their blocks).
        self.wanted_ranges: dict[int, list[tuple[int, int]]] = {}
        # `time.monotonic()` of the latest read of part of the task not yet held (None: none).
        self.read_at: float | None = None
        self.piece_events: dict[int, asyncio.Event] = {}
        self.work_available = asyncio.Event()
        # Whole downloads: lowest index that may still be missing and unassigned.
        self.scan = 0
        self.hasher: Any = None
        self.hash_position = 0
        self.hash_task: asyncio.Task[None] | None = None
        # The batch just written at `hash_position`, handed to the hasher so it need not read
        # those bytes back: (offset, chunks, size). At most one is held.
        self.fresh_batch: tuple[int, list[bytes], int] | None = None
        # (position, sha256 copy) at the last point where the prefix ended on a held piece.
        self.hash_checkpoint: tuple[int, Any] | None = None
        self.flush_task: asyncio.Task[None] | None = None
        self.discard_on_stop = False

    # -- preparation ---------------------------------------------------------------------------

    async def prepare(
        self,
        previous: _LiveTask | None,
        source: PieceSource | None,
        content_length: int | None,
        sha256: str | None,
        attributes: Mapping[str, str],
        whole: bool,
    ) -> None:
        """Find or create the stored task; start the download if `whole` (so it runs even if
        every opener goes away)."""
        if previous is not None:
            await previous.stopped.wait()
        stored = self.store.get(self.task_id)
        if stored is not None and not stored.complete and source is not None and (
            (content_length is not None and content_length != stored.content_length)
            or (sha256 is not None and stored.sha256 is not None and sha256 != stored.sha256)
        ):
            log.warning("task %s: stored partial task does not match the request; dropping it",
                        self.task_id)
            await self.store.discard(stored)
            stored = None
        if stored is None:
            if source is None:
                raise KeyError(self.task_id)
            if content_length is None:
                content_length = await source.content_length()
                if content_length < 0:
                    raise TaskFailed(f"source of {self.task_id} reports a negative length")
            stored = self.store.get(self.task_id)  # put() may have stored it meanwhile
            if stored is None:
                stored = await self.store.create(
                    self.task_id, content_length, sha256=sha256, attributes=attributes,
                    reserve=whole,
                )
                self.pinned = True
        if not self.pinned:
            self.store.pin(stored)
            self.pinned = True
        self.stored = stored
        self.store.touch(stored)
        if stored.complete:
            return
        if source is None and stored.done.count(0):
            raise KeyError(self.task_id)
        stored.reserve = stored.reserve or whole
        if stored.sha256 is None and sha256 is not None:
            stored.sha256 = sha256
        await self.store.verify(stored)
        if not stored.done.count(0):
            # Every piece is held (a shutdown came between the last piece and the digest
            # check): finish from disk, no source needed.
            await self._complete_from_disk()
            return
        if source is None:
            raise KeyError(self.task_id)
        self.start_download(source, whole)

    async def _complete_from_disk(self) -> None:
        stored = self.stored
        assert stored is not None
        position, prefix = stored.prefix if stored.prefix is not None else (0, None)
        hasher = prefix.copy() if prefix is not None else hashlib.sha256()
        while position < stored.content_length:
            step_end = min(stored.content_length, position + HASH_STEP)
            await self.store.hash_range(stored, hasher, position, step_end)
            position = step_end
        self.hasher = hasher
        self.hash_position = position
        await self._finish()
        if self.failure is not None:
            if self.discard_on_stop:
                await self.store.discard(stored)
            raise self.failure
        try:
            await self.store.flush(stored)
        except (OSError, StoreFull) as err:
            log.warning("task %s: complete, but saving that failed: %s", self.task_id, err)

    # -- download ------------------------------------------------------------------------------

    def start_download(self, source: PieceSource, whole: bool) -> None:
        """Start the download, or widen a running lazy one to the whole content."""
        stored = self.stored
        assert stored is not None
        if stored.complete or self.failure is not None or self.disposed:
            return
        if self.supervisor is not None:
            if whole and not self.whole:
                self.whole = True
                stored.reserve = True
                self.work_available.set()
            return
        self.source = source
        self.whole = whole
        position, prefix = stored.prefix if stored.prefix is not None else (0, None)
        if prefix is None or position > stored.contiguous_end():
            position, prefix = 0, hashlib.sha256()
        self.hash_position = position
        self.hasher = prefix.copy()
        self.hash_checkpoint = (position, prefix.copy())
        self.stopped.clear()
        self.finished.clear()
        self.supervisor = asyncio.create_task(self._supervise(), name=f"download {self.task_id}")

    async def _supervise(self) -> None:
        stored = self.stored
        assert stored is not None
        self.metrics.active_tasks.inc()
        try:
            self.workers = [
                asyncio.create_task(self._worker(), name=f"piece worker {self.task_id}")
                for _ in range(self.config.origin_concurrency)
            ]
            self._kick_hasher()
            await self.finished.wait()
        finally:
            pending = [t for t in (*self.workers, self.hash_task, self.flush_task) if t]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            self.workers = []
            self.in_flight.clear()
            try:
                if self.discard_on_stop:
                    await self.store.discard(stored)
                else:
                    if self.hash_checkpoint is not None and not stored.complete:
                        stored.prefix = self.hash_checkpoint
                    await self.store.flush(stored)
            except Exception as err:
                log.warning("task %s: could not save state: %s", self.task_id, err)
            self.metrics.active_tasks.dec()
            self.supervisor = None
            self.stopped.set()
            await self.manager._settle(self)

    def _is_free(self, index: int) -> bool:
        stored = self.stored
        assert stored is not None
        if stored.done[index] or index in self.in_flight:
            return False
        # A lazy download has work in a piece only where readers want blocks it lacks.
        return self.whole or bool(stored.missing_blocks(index, self.wanted_ranges.get(index, ())))

    def _wants_part(self, index: int) -> bool:
        """Whether readers want only part of piece `index` (in a whole download: fetch their
        blocks first)."""
        ranges = self.wanted_ranges.get(index)
        if not ranges:
            return False
        stored = self.stored
        assert stored is not None
        start, length = stored.piece_range(index)
        return stored.missing_blocks(index, ranges) != stored.missing_blocks(
            index, [(start, start + length)]
        )

    def _next_piece(self) -> int | None:
        stored = self.stored
        assert stored is not None
        blocked = [i for i in self.waiting if self._is_free(i)]
        if blocked:
            return min(blocked)
        wanted = [i for i in self.wanted if self._is_free(i)]
        if wanted:
            return min(wanted)
        if self.whole:
            count = stored.piece_count
            while self.scan < count and not self._is_free(self.scan):
                self.scan += 1
            if self.scan < count:
                return self.scan
        return None

    async def _worker(self) -> None:
        stored = self.stored
        assert stored is not None
        while not self.finished.is_set():
            index = self._next_piece()
            if index is None:
                if self.whole:
                    return  # every missing piece is being fetched by some worker
                self.work_available.clear()
                await self.work_available.wait()
                continue
            if not await self._fetch_one(index):
                return

    async def _urgent_worker(self) -> None:
        """Fetch pieces readers are blocked on while no regular worker is free, then end."""
        while not self.finished.is_set():
            blocked = [i for i in self.waiting if self._is_free(i)]
            if not blocked or not await self._fetch_one(min(blocked)):
                return

    def _serve_blocked(self, index: int) -> None:
        """A reader is blocked on piece `index`: when every worker is busy with another piece
        (a whole download's workers can be deep in pieces nobody waits for), give it a worker
        of its own at once, up to `origin_concurrency` such extra workers."""
        if (
            self.supervisor is None
            or self.finished.is_set()
            or not self._is_free(index)
            or len(self.in_flight) < sum(1 for worker in self.workers if not worker.done())
            or self.urgent_workers >= self.config.origin_concurrency
        ):
            return
        self.urgent_workers += 1
        task = asyncio.create_task(self._urgent_worker(), name=f"urgent worker {self.task_id}")
        self.workers.append(task)

        def done(finished: asyncio.Task[None]) -> None:
            self.urgent_workers -= 1
            with contextlib.suppress(ValueError):
                self.workers.remove(finished)

        task.add_done_callback(done)

    async def _fetch_one(self, index: int) -> bool:
        """Fetch piece `index` (or the blocks of it that are wanted); False when the download
        failed and the worker must stop."""
        stored = self.stored
        assert stored is not None
        start, size = stored.piece_range(index)
        progress = _PieceProgress(index, start, size)
        self.in_flight[index] = progress
        by_blocks = (
            not self.whole or index in stored.partial or self._wants_part(index)
        ) and not (
            isinstance(self.source, WholePieceSource)
            and self.source.reads_whole_pieces(index)
        )
        try:
            if by_blocks:
                held = await self._fetch_blocks(index)
            else:
                await self._fetch_piece(progress)
                held = True
        except asyncio.CancelledError:
            raise
        except UpstreamStatus as err:
            self._fail(
                TaskFailed(f"task {self.task_id}: origin answered {err.status} for piece "
                           f"{index}"),
                "upstream_status",
            )
            return False
        except UpstreamUnavailable as err:
            self._fail(
                TaskFailed(f"task {self.task_id}: piece {index} failed after "
                           f"{self.config.piece_retries} retries: {err}"),
                "upstream_unavailable",
            )
            return False
        except StoreFull as err:
            self._fail(err, "store_full", discard=True)
            return False
        except Exception as err:
            log.exception("task %s: piece %d failed", self.task_id, index)
            self._fail(TaskFailed(f"task {self.task_id}: piece {index}: {err}"), "internal")
            return False
        finally:
            self.in_flight.pop(index, None)
        if not by_blocks:
            self.store.record_piece(stored, index, progress.digest.intdigest())
        if held:
            self.manager._notify_progress(self.task_id)
        self._wake_piece(index)
        self._kick_hasher()
        self._maybe_flush()
        return True

    def _wake_piece(self, index: int) -> None:
        """Readers waiting on piece `index` look again (it, or some of its blocks, arrived)."""
        event = self.piece_events.pop(index, None)
        if event is not None:
            event.set()

    async def _fetch_blocks(self, index: int) -> bool:
        """Fetch the blocks of piece `index` that are missing and wanted by readers (then, in a
        whole download, all the others), one source read per run of adjacent blocks; readers
        are woken after each run. Returns whether the piece ended up held whole."""
        stored = self.stored
        assert stored is not None
        piece_start, piece_length = stored.piece_range(index)
        while not self.finished.is_set() and not stored.done[index]:
            missing = stored.missing_blocks(index, self.wanted_ranges.get(index, []))
            if not missing and self.whole:
                missing = stored.missing_blocks(index, [(piece_start, piece_start + piece_length)])
            if not missing:
                break
            start, end = missing[0]
            blocks = BlockDigests()
            await self._fetch_piece(_PieceProgress(index, start, end - start, blocks=blocks))
            if self.store.record_blocks(stored, start, blocks.finish()):
                # Readers may already have their bytes and leave, stopping the download: the
                # piece is still recorded before the stop saves the task's state.
                await _finish_even_if_cancelled(self.store.assemble_piece(stored, index))
            self._wake_piece(index)
            self._maybe_flush()
        return bool(stored.done[index])

    async def _fetch_piece(self, progress: _PieceProgress) -> None:
        """Fetch the rest of a piece, retrying broken reads from where they broke."""
        failures = 0
        while progress.written < progress.size:
            before = progress.written
            try:
                await self._fetch_rest(progress)
            except UpstreamUnavailable as err:
                if progress.written > before:
                    failures = 0  # it progressed: a flaky link, not a dead origin
                failures += 1
                if failures > self.config.piece_retries:
                    raise
                delay = min(RETRY_DELAY * 2 ** (failures - 1), RETRY_DELAY_MAX)
                log.info("task %s: piece %d broke at %d (%s); retry %d in %.1fs", self.task_id,
                         progress.index, progress.written, err, failures, delay)
                await asyncio.sleep(delay)

    async def _fetch_rest(self, progress: _PieceProgress) -> None:
        """One read of the rest of a piece; what arrived before a break is kept."""
        source = self.source
        assert source is not None
        remaining = progress.size - progress.written
        stream = source.read(progress.start + progress.written, remaining)
        batch: list[bytes] = []
        batch_size = 0
        received = 0
        pending: asyncio.Task[None] | None = None
        loop = asyncio.get_running_loop()
        timeout = self.config.read_timeout
        try:
            try:
                try:
                    # One deadline for the read, pushed back as bytes arrive (only once less
                    # than half of it is left, to keep timers off the per-chunk path): a stall
                    # is noticed between timeout/2 and timeout after the last byte.
                    async with asyncio.timeout(timeout) as deadline:
                        while True:
                            chunk = await anext(stream, None)
                            if chunk is None:
                                break
                            now = loop.time()
                            when = deadline.when()
                            if when is not None and when - now < timeout / 2:
                                deadline.reschedule(now + timeout)
                            received += len(chunk)
                            if received > remaining:
                                raise UpstreamUnavailable("source sent more bytes than asked")
                            batch.append(chunk)
                            batch_size += len(chunk)
                            if batch_size >= WRITE_BATCH:
                                # Write this batch while the next arrives (two in flight).
                                if pending is not None:
                                    await pending
                                pending = asyncio.create_task(
                                    self._write(progress, batch, batch_size)
                                )
                                batch, batch_size = [], 0
                except TimeoutError:
                    raise UpstreamUnavailable(f"no byte for {timeout:g}s") from None
                if received < remaining:
                    raise UpstreamUnavailable(f"source ended {remaining - received} bytes early")
            except UpstreamUnavailable:
                # Keep what arrived, so the retry asks only for the rest.
                if pending is not None:
                    await pending
                    pending = None
                if batch:
                    await self._write(progress, batch, batch_size)
                raise
            if pending is not None:
                await pending
                pending = None
            if batch:
                await self._write(progress, batch, batch_size)
        finally:
            if pending is not None:
                # Let a write already handed to a thread land (or fail) before giving up.
                with contextlib.suppress(Exception):
                    await pending
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    async def _write(self, progress: _PieceProgress, chunks: list[bytes], size: int) -> None:
        stored = self.stored
        assert stored is not None
        offset = progress.start + progress.written
        await self.store.write(stored, offset, chunks, progress.digest)
        progress.written += size
        if not progress.whole_piece:
            return  # blocks join the hashed prefix only once their piece is held
        if offset == self.hash_position:
            self.fresh_batch = (offset, chunks, size)
        if progress.start <= self.hash_position < progress.start + progress.written:
            self._kick_hasher()

    # -- prefix hashing and completion ---------------------------------------------------------

    def _hash_frontier(self) -> tuple[int, bool]:
        """How far the written prefix reaches from `hash_position`, and whether that end is the
        end of a held piece (a safe checkpoint)."""
        stored = self.stored
        assert stored is not None
        end = self.hash_position
        index = end // stored.piece_size
        while index < stored.piece_count:
            start, size = stored.piece_range(index)
            if stored.done[index]:
                end = start + size
                index += 1
                continue
            progress = self.in_flight.get(index)
            if progress is not None and progress.written:
                return max(end, start + progress.written), False
            break
        return end, True

    def _kick_hasher(self) -> None:
        if self.hash_task is None or self.hash_task.done():
            self.hash_task = asyncio.create_task(self._hash(), name=f"hash {self.task_id}")

    async def _hash(self) -> None:
        stored = self.stored
        assert stored is not None
        try:
            while not self.finished.is_set():
                frontier, at_piece_end = self._hash_frontier()
                if frontier <= self.hash_position:
                    break
                fresh, self.fresh_batch = self.fresh_batch, None
                if fresh is not None and fresh[0] == self.hash_position:
                    step_end = fresh[0] + fresh[2]
                    await self.store.hash_buffers(self.hasher, fresh[1], fresh[2])
                else:
                    step_end = min(frontier, self.hash_position + HASH_STEP)
                    await self.store.hash_range(
                        stored, self.hasher, self.hash_position, step_end
                    )
                self.hash_position = step_end
                if at_piece_end and step_end == frontier:
                    self.hash_checkpoint = (step_end, self.hasher.copy())
            if (
                not self.finished.is_set()
                and self.hash_position == stored.content_length
                and stored.done.count(0) == 0
            ):
                await self._finish()
        except asyncio.CancelledError:
            raise
        except StoreFull as err:
            self._fail(err, "store_full", discard=True)
        except Exception as err:
            log.exception("task %s: hashing failed", self.task_id)
            self._fail(TaskFailed(f"task {self.task_id}: {err}"), "internal")

    async def _finish(self) -> None:
        stored = self.stored
        assert stored is not None
        digest = self.hasher.hexdigest()
        if stored.sha256 is not None and digest != stored.sha256:
            self.metrics.digest_mismatches.inc()
            self._fail(
                DigestMismatch(
                    f"task {self.task_id}: content hashes to sha256:{digest}, expected "
                    f"sha256:{stored.sha256}; discarded"
                ),
                "digest_mismatch",
                discard=True,
            )
            return
        # Readers get the last bytes now; the supervisor's final flush syncs the data and saves
        # the complete flag afterwards (if that fails, a restart verifies the task again).
        self.store.mark_complete(stored)
        stored.prefix = None
        log.info("task %s complete (%d bytes)", self.task_id, stored.content_length)
        self.manager._notify_progress(self.task_id)
        self._wake_all()
        self.finished.set()

    # -- flushing ------------------------------------------------------------------------------

    def _maybe_flush(self) -> None:
        stored = self.stored
        assert stored is not None
        if self.flush_task is not None and not self.flush_task.done():
            return
        if stored.unflushed:
            self.flush_task = asyncio.create_task(self._flush_soon())

    async def _flush_soon(self) -> None:
        stored = self.stored
        assert stored is not None
        try:
            while stored.unflushed and not self.finished.is_set():
                if self.store.flush_due(stored, FLUSH_INTERVAL, FLUSH_PIECES):
                    await self.store.flush(stored)
                else:
                    wait = FLUSH_INTERVAL - (time.monotonic() - stored.flushed_at)
                    await asyncio.sleep(max(0.01, min(wait, FLUSH_INTERVAL)))
        except asyncio.CancelledError:
            raise
        except StoreFull as err:
            self._fail(err, "store_full", discard=True)
        except Exception as err:
            log.exception("task %s: saving metadata failed", self.task_id)
            self._fail(TaskFailed(f"task {self.task_id}: cannot save metadata: {err}"),
                       "internal")

    # -- failure and stop ----------------------------------------------------------------------

    def _wake_all(self) -> None:
        for event in self.piece_events.values():
            event.set()
        self.piece_events.clear()
        self.work_available.set()

    def _fail(self, error: TaskFailed, reason: str | None, *, discard: bool = False) -> None:
        """End the download with `error`: readers get it, new opens start afresh."""
        if self.failure is not None or (self.stored is not None and self.stored.complete):
            return
        if reason is not None:
            log.warning("%s", error)
            self.metrics.task_failures.labels(reason=reason).inc()
        self.failure = error
        self.discard_on_stop = discard
        self.manager._notify_progress(self.task_id)
        self.manager._retire(self)
        self._wake_all()
        self.finished.set()

    def stop(self) -> None:
        """End a lazy download whose last reader left; its pieces stay in the store."""
        self.failure = self.failure or TaskFailed(f"task {self.task_id}: download stopped")
        self._wake_all()
        self.finished.set()

    # -- readers -------------------------------------------------------------------------------

    async def wait_piece(self, index: int) -> None:
        stored = self.stored
        assert stored is not None
        await self._wait(index, lambda: bool(stored.done[index]))

    async def wait_range(self, index: int, start: int, end: int) -> None:
        """Wait until [start, end), within piece `index`, is on disk (whole or in blocks)."""
        stored = self.stored
        assert stored is not None
        await self._wait(index, lambda: stored.holds(start, end))

    async def _wait(self, index: int, ready: Callable[[], bool]) -> None:
        while True:
            if self.failure is not None:
                raise self.failure
            if ready():
                return
            if self.supervisor is None:
                raise TaskFailed(f"task {self.task_id}: piece {index} is not stored and no "
                                 f"download is running")
            event = self.piece_events.get(index)
            if event is None:
                event = self.piece_events[index] = asyncio.Event()
            self.waiting[index] = self.waiting.get(index, 0) + 1
            self.work_available.set()
            self._serve_blocked(index)
            try:
                await event.wait()
            finally:
                left = self.waiting[index] - 1
                if left:
                    self.waiting[index] = left
                else:
                    del self.waiting[index]

    async def wait_complete(self) -> None:
        """Wait until the content's digest has been checked."""
        stored = self.stored
        assert stored is not None
        while not stored.complete:
            if self.failure is not None:
                raise self.failure
            if self.supervisor is None:
                raise TaskFailed(f"task {self.task_id}: no download is running")
            await self.finished.wait()

    def want(self, start: int, end: int, delta: int) -> None:
        """A reader starts (`delta` 1) or stops (-1) wanting bytes [start, end)."""
        stored = self.stored
        assert stored is not None
        size = stored.piece_size
        for index in range(start // size, (end - 1) // size + 1):
            count = self.wanted.get(index, 0) + delta
            if count > 0:
                self.wanted[index] = count
            else:
                self.wanted.pop(index, None)
            piece_range = (max(start, index * size), min(end, (index + 1) * size))
            ranges = self.wanted_ranges.setdefault(index, [])
            if delta > 0:
                ranges.append(piece_range)
            else:
                with contextlib.suppress(ValueError):
                    ranges.remove(piece_range)
                if not ranges:
                    del self.wanted_ranges[index]
        if delta > 0:
            self.read_at = time.monotonic()
            self.work_available.set()


class _Handle:
    """A `TaskHandle`: reads of one opened task."""

    def __init__(self, live: _LiveTask) -> None:
        self._live = live

    @property
    def info(self) -> TaskInfo:
        stored = self._live.stored
        assert stored is not None
        return _task_info(stored)

    async def segments(self, offset: int, length: int) -> AsyncIterator[Segment]:
        live = self._live
        stored = live.stored
        assert stored is not None
        if offset < 0 or length < 0 or offset + length > stored.content_length:
            raise ValueError(f"range {offset}+{length} is outside 0-{stored.content_length}")
        if length == 0:
            return
        live.store.touch(stored)
        end = offset + length
        size = stored.piece_size
        lazy = not stored.complete
        if lazy:
            live.want(offset, end, 1)
        try:
            position = offset
            while position < end:
                index = position // size
                if live.failure is not None and not stored.complete:
                    raise live.failure
                if not stored.complete and not stored.done[index] and not live.whole:
                    # A lazy download: the range's blocks may be all this piece ever holds.
                    stop = min(end, (index + 1) * size)
                    await live.wait_range(index, position, stop)
                    if not stored.done[index]:
                        fd = stored.fd
                        if fd is None:
                            raise TaskFailed(f"task {stored.task_id} is closed")
                        yield Segment(fd, position, stop - position)
                        position = stop
                        continue
                if not stored.complete and not stored.done[index]:
                    await live.wait_piece(index)
                # Extend over the following pieces already held.
                stop = min(end, (index + 1) * size)
                while stop < end and (stored.complete or stored.done[stop // size]):
                    stop = min(end, stop + size)
                if stop == stored.content_length and not stored.complete and live.whole:
                    # A reader never gets the content's last bytes before its digest matched,
                    # so a whole read of bad content always ends in an error, never silently.
                    last_piece_start = (stored.piece_count - 1) * size
                    if position < last_piece_start:
                        stop = last_piece_start
                    else:
                        await live.wait_complete()
                fd = stored.fd
                if fd is None:
                    raise TaskFailed(f"task {stored.task_id} is closed")
                yield Segment(fd, position, stop - position)
                position = stop
        finally:
            if lazy:
                live.want(offset, end, -1)

    async def read(self, offset: int, length: int) -> bytes:
        stored = self._live.stored
        assert stored is not None
        parts = [
            await self._live.store.read(stored, segment.offset, segment.count)
            async for segment in self.segments(offset, length)
        ]
        return b"".join(parts)


class _OpenContext:
    """What `TaskManager.open` returns: enters by finding or starting the task."""

    def __init__(self, manager: TaskManager, task_id: str, arguments: dict[str, Any]) -> None:
        self._manager = manager
        self._task_id = task_id
        self._arguments = arguments
        self._live: _LiveTask | None = None

    async def __aenter__(self) -> TaskHandle:
        live = self._manager._acquire(self._task_id, self._arguments)
        self._live = live
        try:
            await asyncio.shield(live.ready)
            if live.failure is not None and not (live.stored and live.stored.complete):
                raise live.failure
            source = self._arguments["source"]
            if source is not None:
                live.start_download(source, self._arguments["whole"])
        except BaseException:
            self._live = None
            await self._manager._release(live)
            raise
        return _Handle(live)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        live, self._live = self._live, None
        if live is not None:
            await self._manager._release(live)


# Wraps the source an opener hands in (task id, source) -> the source the download uses.
SourcePolicy = Callable[[str, PieceSource], PieceSource]


class _ProgressWaiters:
    """Long polls on one task's progress: one event, set (and replaced) on each change."""

    __slots__ = ("count", "event")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.count = 0


class TaskManager:
    """Finds or starts the one download of each task and hands out readers."""

    def __init__(
        self,
        store: PieceStore,
        config: TaskConfig,
        metrics: Metrics,
        *,
        source_policy: SourcePolicy | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.metrics = metrics
        # Wraps every source handed to `open` (the cluster decides origin or peers); None: the
        # source is used as it is.
        self.source_policy = source_policy
        # Long polls waiting for a task's pieces to change (`wait_pieces`), by task id.
        self._progress: dict[str, _ProgressWaiters] = {}
        # Live tasks new opens join.
        self._active: dict[str, _LiveTask] = {}
        # Live tasks that failed or stopped and may still be tearing down (new ones wait).
        self._retired: dict[str, _LiveTask] = {}
        self._preparing: set[asyncio.Task[None]] = set()
        self._closed = False

    async def start(self) -> None:
        """Resume nothing eagerly; partial tasks resume when they are next opened."""
        self._closed = False

    async def close(self) -> None:
        """Stop every download cleanly (cancel, flush metadata); readers get `TaskFailed`."""
        self._closed = True
        for task in list(self._preparing):
            task.cancel()
        await asyncio.gather(*self._preparing, return_exceptions=True)
        lives = [*self._active.values(), *self._retired.values()]
        # Downloads that only lack their digest check get a moment to finish it.
        finishing = [
            live.hash_task for live in lives
            if live.hash_task is not None and not live.hash_task.done()
            and live.stored is not None and not live.stored.done.count(0)
        ]
        if finishing:
            await asyncio.wait(finishing, timeout=CLOSE_GRACE)
        shutdown = TaskFailed("the node is shutting down")
        for live in lives:
            live.failure = live.failure or shutdown
            live._wake_all()
            live.finished.set()
        supervisors = [live.supervisor for live in lives if live.supervisor is not None]
        await asyncio.gather(*supervisors, return_exceptions=True)
        for live in lives:
            await self._dispose(live)
        self._active.clear()
        self._retired.clear()

    def info(self, task_id: str) -> TaskInfo | None:
        """The task if the store or a running download knows it."""
        live = self._active.get(task_id)
        if live is not None and live.stored is not None:
            return _task_info(live.stored)
        stored = self.store.get(task_id)
        return _task_info(stored) if stored is not None else None

    def open(
        self,
        task_id: str,
        source: PieceSource | None,
        *,
        content_length: int | None = None,
        sha256: str | None = None,
        attributes: Mapping[str, str] | None = None,
        whole: bool = True,
    ) -> AbstractAsyncContextManager[TaskHandle]:
        """Find or start the one download of `task_id` and return a pinned handle.

        - If the task is complete in the store, no download happens and `source` is not used.
        - `source=None` opens only a complete stored task; otherwise raises `KeyError`.
        - `content_length` saves a request to the source when the caller already knows it.
        - `sha256` (hex) is the digest the whole content must hash to; the task becomes complete
          only when it matches, else it is discarded and readers get `DigestMismatch`.
        - `attributes` are small strings kept with the task (e.g. a manifest's content type).
        - `whole=True` downloads every piece (and keeps going after the last reader leaves);
          `whole=False` fetches only the pieces readers ask for.
        Concurrent opens of one task share one download.
        """
        if sha256 is not None:
            sha256 = sha256.lower()
            if not _SHA256_HEX.fullmatch(sha256):
                raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
        if content_length is not None and content_length < 0:
            raise ValueError("content_length must not be negative")
        if source is not None and self.source_policy is not None:
            source = self.source_policy(task_id, source)
        arguments: dict[str, Any] = {
            "source": source,
            "content_length": content_length,
            "sha256": sha256,
            "attributes": dict(attributes or {}),
            "whole": whole,
        }
        return _OpenContext(self, task_id, arguments)

    async def put(
        self, task_id: str, data: bytes, *, sha256: str, attributes: Mapping[str, str]
    ) -> None:
        """Store small content already in memory (a manifest) as a complete task, after checking
        `sha256`; raises `DigestMismatch` if it does not match."""
        expected = sha256.lower()
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            self.metrics.digest_mismatches.inc()
            raise DigestMismatch(
                f"task {task_id}: content hashes to sha256:{actual}, expected sha256:{expected}"
            )
        stored = self.store.get(task_id)
        if stored is not None and stored.complete:
            self.store.touch(stored)
            return
        if task_id in self._active:
            return  # a download of the same content is running and will store it
        if stored is not None:
            await self.store.discard(stored)
        await self.store.put(task_id, data, sha256=expected, attributes=attributes)
        self._notify_progress(task_id)

    # -- serving pieces to peers ----------------------------------------------------------------

    def task_id_for_key(self, task_key: str) -> str | None:
        """The id of the stored task whose key (`piece_store.file_name_for`, the sha256 of its
        id) is `task_key`; None if no such task is stored."""
        stored = self.store.get_by_name(task_key)
        return stored.task_id if stored is not None else None

    def bitmap(self, task_id: str) -> bytes | None:
        """One byte per piece, 1 where the piece is on disk and verified now (all of them for a
        complete task); None if the task is not stored. Pieces of a task reloaded after a
        restart count only once they have been verified (when the task is next opened)."""
        stored = self.store.get(task_id)
        if stored is None or stored.removed:
            return None
        if stored.complete:
            return b"\x01" * stored.piece_count
        if stored.needs_verify:
            return bytes(stored.piece_count)
        return bytes(stored.done)

    @asynccontextmanager
    async def open_piece(
        self, task_id: str, piece_index: int
    ) -> AsyncIterator[tuple[Segment, int] | None]:
        """Hold piece `piece_index` of `task_id` for a peer: (its segment, its xxh3_64) if it is
        on disk and verified now, else None. The task is pinned while the context is open, so
        the segment's fd stays valid. Never starts a download and never waits for one."""
        stored = self.store.get(task_id)
        if (
            stored is None
            or stored.removed
            or not 0 <= piece_index < stored.piece_count
            or not (stored.complete or (not stored.needs_verify and stored.done[piece_index]))
        ):
            yield None
            return
        try:
            self.store.pin(stored)
        except OSError as err:
            log.warning("task %s: cannot open its data to serve a piece: %s", task_id, err)
            yield None
            return
        try:
            start, size = stored.piece_range(piece_index)
            assert stored.fd is not None
            yield Segment(stored.fd, start, size), stored.digests[piece_index]
        finally:
            await self.store.release(stored)

    def last_read(self, task_id: str) -> float | None:
        """`time.monotonic()` of the latest read of the task that had to wait for bytes not yet
        held (a reader's or a peer's `read_held`) while it is open here; None otherwise."""
        live = self._active.get(task_id)
        return live.read_at if live is not None else None

    async def read_held(
        self, task_id: str, offset: int, length: int, *, wait: float
    ) -> bytes | None:
        """Bytes [offset, offset+length) of `task_id` for a peer: at once when they are on disk
        (in held pieces or in held blocks of partial ones), else as soon as the download running
        here has them (a reader's blocks are fetched before anything else), waiting at most
        `wait` seconds. None when the task is not stored, the range is not inside it, or the
        bytes are neither here nor fetched in time, or fail their check on disk
        (`PieceStore.read_checked`). Never starts a download."""
        stored = self.store.get(task_id)
        if (
            stored is None
            or stored.removed
            or offset < 0
            or length <= 0
            or offset + length > stored.content_length
        ):
            return None
        end = offset + length
        live = self._active.get(task_id)
        downloading = (
            live is not None and live.stored is stored and live.supervisor is not None
            and live.failure is None
        )
        if stored.needs_verify or not (downloading or stored.holds(offset, end)):
            return None
        try:
            self.store.pin(stored)
        except OSError as err:
            log.warning("task %s: cannot open its data to serve a range: %s", task_id, err)
            return None
        try:
            if not stored.holds(offset, end):
                assert live is not None
                live.want(offset, end, 1)
                try:
                    async with asyncio.timeout(wait):
                        size = stored.piece_size
                        position = offset
                        while position < end:
                            stop = min(end, (position // size + 1) * size)
                            await live.wait_range(position // size, position, stop)
                            position = stop
                except (TimeoutError, TaskFailed):
                    return None
                finally:
                    live.want(offset, end, -1)
            return await self.store.read_checked(stored, offset, length)
        finally:
            await self.store.release(stored)

    async def wait_pieces(self, task_id: str, pieces_done: int, wait: float) -> TaskInfo | None:
        """The task's info once its count of held pieces differs from `pieces_done` (or it
        completed, failed or was discarded), or after `wait` seconds; None if not stored."""
        info = self.info(task_id)
        if info is None or info.pieces_done != pieces_done or wait <= 0:
            return info
        waiters = self._progress.get(task_id)
        if waiters is None:
            waiters = self._progress[task_id] = _ProgressWaiters()
        waiters.count += 1
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await waiters.event.wait()
        finally:
            waiters.count -= 1
            if not waiters.count and self._progress.get(task_id) is waiters:
                del self._progress[task_id]
        return self.info(task_id)

    def _notify_progress(self, task_id: str) -> None:
        waiters = self._progress.pop(task_id, None)
        if waiters is not None:
            waiters.event.set()

    # -- live task bookkeeping (used by _OpenContext and _LiveTask) -----------------------------

    def _acquire(self, task_id: str, arguments: dict[str, Any]) -> _LiveTask:
        """The live task of `task_id` with one more handle, created (and prepared) if needed."""
        if self._closed:
            raise TaskFailed("the node is shutting down")
        live = self._active.get(task_id)
        if live is None:
            live = _LiveTask(self, task_id)
            self._active[task_id] = live
            previous = self._retired.get(task_id)
            preparing = asyncio.create_task(
                self._prepare(live, previous, arguments), name=f"prepare {task_id}"
            )
            self._preparing.add(preparing)
            preparing.add_done_callback(self._preparing.discard)
        live.handles += 1
        return live

    async def _prepare(
        self, live: _LiveTask, previous: _LiveTask | None, arguments: dict[str, Any]
    ) -> None:
        try:
            await live.prepare(
                previous,
                arguments["source"],
                arguments["content_length"],
                arguments["sha256"],
                arguments["attributes"],
                arguments["whole"],
            )
        except BaseException as err:
            if self._active.get(live.task_id) is live:
                del self._active[live.task_id]
            if live.pinned and live.stored is not None:
                live.pinned = False
                await self.store.release(live.stored)
            if not live.ready.done():
                if isinstance(err, asyncio.CancelledError):
                    live.ready.set_exception(TaskFailed("the node is shutting down"))
                else:
                    live.ready.set_exception(err)
                live.ready.exception()  # retrieved here so no "never retrieved" warning
            live.disposed = True
            if isinstance(err, StoreFull):
                self.metrics.task_failures.labels(reason="store_full").inc()
            if isinstance(err, asyncio.CancelledError):
                raise
            return
        live.ready.set_result(None)
        if live.handles == 0:
            await self._settle(live)

    def _retire(self, live: _LiveTask) -> None:
        """`live` failed or stopped: new opens must start a new one (after it tears down)."""
        if self._active.get(live.task_id) is live:
            del self._active[live.task_id]
        if live.supervisor is not None:
            self._retired[live.task_id] = live

    async def _release(self, live: _LiveTask) -> None:
        live.handles -= 1
        if live.handles == 0 and live.ready.done() and live.ready.exception() is None:
            await self._settle(live)

    async def _settle(self, live: _LiveTask) -> None:
        """Called when handles or the download change: stop a lazy download without readers,
        and let go of a task nobody uses."""
        if live.handles > 0:
            return
        if live.supervisor is not None:
            if not live.whole and not live.finished.is_set():
                self._retire(live)
                live.stop()
            return
        if self._retired.get(live.task_id) is live:
            del self._retired[live.task_id]
        if self._active.get(live.task_id) is live:
            del self._active[live.task_id]
        await self._dispose(live)

    async def _dispose(self, live: _LiveTask) -> None:
        live.disposed = True
        if live.pinned and live.stored is not None:
            live.pinned = False
            await self.store.release(live.stored)
