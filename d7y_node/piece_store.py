"""Pieces on disk: durable, verified, collected.

Owns the files under `StoreConfig.tasks_dir`. A task is two files named by a hash of its id (never
the id itself, so no id can walk out of the directory):

- `<name>.data`: a sparse file as long as the content; pieces are written into it with `pwrite`.
- `<name>.meta`: msgpack metadata (length, piece size, bitmap of pieces held, per-piece xxh3_64
  digests, the expected sha256, attributes, complete flag, last access time), always replaced
  atomically (temp file + fsync + rename + fsync of the directory).

Durability rule: the data file is `fdatasync`ed before the metadata says *complete*, because
complete tasks are trusted on restart. Metadata that only claims pieces of a partial task is
written without syncing the data first: a reloaded partial task is verified against its xxh3
digests when it is next used (`verify`), so a claimed piece that did not reach the disk before a
power cut is caught and fetched again. Syncing on every progress save would bound downloads by the
disk's write-back speed instead of the page cache's. (A killed process loses nothing: its writes
are in the page cache.)

Partial pieces: a lazily read task (a Nydus blob a mount reads chunk by chunk) may hold parts of
a piece, in blocks of `BLOCK_SIZE` bytes, each with its own xxh3_64 (kept in the metadata too, and
verified like pieces after a restart). A piece is *held* only once all of its blocks are: then
its own xxh3_64 is recorded from the file (every block checked on the way) and the blocks are
forgotten. Pieces stay the unit of everything else: the bitmap peers see, the digest a peer
serves a piece with, the prefix sha256. Why blocks and not smaller pieces: the piece size is a
function of the content length alone, so every host cuts a blob the same way and peers can
exchange pieces; a mount must not change that geometry. Blocks refine a piece only locally.

Also owns garbage collection (quota or disk, high/low watermarks, TTL, least recently used first,
pinned tasks kept) and the bounded thread pool every blocking file operation runs in.

Does not download anything, schedule pieces or know readers: that is `tasks.py`, the only user of
everything here except `PieceStore(config, metrics)`, `open()` and `close()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import msgpack
import xxhash

from d7y_node.config import StoreConfig
from d7y_node.errors import StoreFull
from d7y_node.metrics import Metrics

log = logging.getLogger(__name__)

T = TypeVar("T")

MIB = 1024 * 1024

# Piece size is a pure function of the content length, so every host cuts a blob the same way.
# Nydus reads lazily in chunks of up to 1 MiB: small blobs keep 1 MiB pieces so such a read fetches
# little more than it needs.
MIN_PIECE_SIZE = 1 * MIB
# Above this, a piece is too much to lose on a broken connection and too much to buffer per worker.
MAX_PIECE_SIZE = 16 * MIB
# Pieces grow (by powers of two) once a blob would have more than this many: 64 pieces give enough
# parallel range requests to fill a link while keeping per-piece overhead (one HTTP request, one
# digest, one wakeup) negligible. With the 16 MiB cap, blobs up to 16 GiB have at most 1024 pieces.
PIECES_BEFORE_GROWING = 64

# Partial pieces of lazily read tasks are held in blocks of this size (a power of two, so it
# divides every piece size). A lazy read fetches the blocks that cover it: a RAFS chunk read costs
# its own compressed bytes plus at most two partial blocks, instead of whole 1-16 MiB pieces.
# Smaller blocks waste less around each chunk but cost 8 bytes of digest each in the metadata of
# a partial piece (16 KiB: 1 KiB for a 2 MiB piece), and a block is never fetched by itself
# (adjacent missing blocks are one range request), so their number costs no requests.
BLOCK_SIZE = 16 * 1024

# Metadata format version; a file with another version is dropped (its task fetched again).
# Partial pieces (key "blocks") were added without a new version: older readers ignore the key
# (they fetch those bytes again), and a file without it has none.
METADATA_VERSION = 1

# Blocking file work (pwrite, hashing, verification) runs in this many threads: enough to overlap
# a few downloads' writes with their hashing on a 2-core host.
IO_THREADS = 4
# Metadata saves (fdatasync of the data, then the metadata file) run in their own threads: a sync
# can take long on a busy disk and must not hold up the writes and hashes behind it.
SYNC_THREADS = 2
# Reads and writes this small are cheaper inline on the loop than a hop to a thread.
INLINE_IO_BYTES = 64 * 1024
# Verification and prefix hashing read the file in blocks of this size (bounded memory).
READ_BLOCK = 1 * MIB

DATA_SUFFIX = ".data"
META_SUFFIX = ".meta"
# Files with these suffixes are leftovers (a metadata temp, a discarded task) and are removed.
TEMP_SUFFIX = ".tmp"
TRASH_SUFFIX = ".trash"


def piece_size_for(content_length: int) -> int:
    """The piece size of content of this length (the same on every host)."""
    size = MIN_PIECE_SIZE
    while size < MAX_PIECE_SIZE and size * PIECES_BEFORE_GROWING < content_length:
        size *= 2
    return size


def file_name_for(task_id: str) -> str:
    """The base name of a task's files: a hash of its id, so ids never become paths."""
    return hashlib.sha256(task_id.encode()).hexdigest()


def _disk_error(err: OSError) -> bool:
    return err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def block_count(piece_length: int) -> int:
    """Blocks of a piece of `piece_length` bytes (the last one may be short)."""
    return (piece_length + BLOCK_SIZE - 1) // BLOCK_SIZE


@dataclass(eq=False)
class PartialPiece:
    """The blocks held of one piece that is not held whole (a lazily read task's)."""

    # One byte per block of the piece: 1 once the block is written and its digest recorded.
    held: bytearray
    # xxh3_64 of each block held (0 where not held).
    digests: list[int]

    @classmethod
    def empty(cls, piece_length: int) -> PartialPiece:
        count = block_count(piece_length)
        return cls(bytearray(count), [0] * count)

    @property
    def complete(self) -> bool:
        return self.held.find(0) < 0


@dataclass(eq=False)
class StoredTask:
    """One task's state in memory; the metadata file is a (possibly older) copy of it.

    Mutated only on the event loop. `tasks.py` reads it; only `PieceStore` changes it.
    """

    task_id: str
    name: str
    content_length: int
    piece_size: int
    sha256: str | None
    attributes: dict[str, str]
    # One byte per piece: 1 once the piece is written and its digest recorded.
    done: bytearray
    # xxh3_64 of each piece held (0 where not held).
    digests: list[int]
    complete: bool = False
    # Wall-clock seconds of the last open or read (persisted: TTL spans restarts).
    last_access: float = 0.0
    # Reloaded partial tasks: their pieces are checked against the digests before use.
    needs_verify: bool = False
    # Bytes the data file really occupies (st_blocks * 512).
    allocated: int = 0
    # Holders that must not see the task evicted (live tasks in tasks.py); the data fd is open
    # while pinned.
    pins: int = 0
    fd: int | None = None
    # Expected size of a running download, counted against the quota before it is written.
    reserve: bool = False
    # Discarded or evicted: the files are gone, nothing may be written about it any more.
    removed: bool = False
    # Pieces recorded in memory and not yet in the metadata file.
    unflushed: int = 0
    # Something other than pieces (access time, attributes) changed since the last flush.
    meta_dirty: bool = False
    # The data file has been fdatasync'ed since the task became complete.
    synced: bool = False
    # When the metadata was last written (monotonic), to space flushes.
    flushed_at: float = 0.0
    # sha256 state of the contiguous prefix [0, position) of held pieces, kept in memory between
    # downloads so a resumed download does not hash that prefix again.
    prefix: tuple[int, Any] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Pieces held only in part, by index (never a piece in `done`); see the module docstring.
    partial: dict[int, PartialPiece] = field(default_factory=dict)

    @property
    def piece_count(self) -> int:
        return (self.content_length + self.piece_size - 1) // self.piece_size

    @property
    def pieces_done(self) -> int:
        return self.piece_count if self.complete else self.done.count(1)

    def piece_range(self, index: int) -> tuple[int, int]:
        """(offset, length) of piece `index`."""
        start = index * self.piece_size
        return start, min(self.piece_size, self.content_length - start)

    def has_piece(self, index: int) -> bool:
        return bool(self.done[index])

    def holds(self, start: int, end: int) -> bool:
        """Whether every byte of [start, end) is on disk: in held pieces, or in held blocks of
        partial ones."""
        if self.complete or start >= end:
            return True
        size = self.piece_size
        for index in range(start // size, (end - 1) // size + 1):
            if self.done[index]:
                continue
            partial = self.partial.get(index)
            if partial is None:
                return False
            piece_start = index * size
            first = (max(start, piece_start) - piece_start) // BLOCK_SIZE
            last = (min(end, piece_start + size) - 1 - piece_start) // BLOCK_SIZE
            if partial.held.find(0, first, last + 1) >= 0:
                return False
        return True

    def missing_blocks(
        self, index: int, ranges: Sequence[tuple[int, int]]
    ) -> list[tuple[int, int]]:
        """The byte ranges, block-aligned and clipped to piece `index`, of the blocks of that
        piece that cover some of `ranges` (absolute [start, end) pairs) and are not held;
        adjacent blocks are merged into one range. Empty when the piece is held."""
        if self.done[index]:
            return []
        piece_start, piece_length = self.piece_range(index)
        wanted = bytearray(block_count(piece_length))
        for start, end in ranges:
            start, end = max(start, piece_start), min(end, piece_start + piece_length)
            if start >= end:
                continue
            first = (start - piece_start) // BLOCK_SIZE
            last = (end - 1 - piece_start) // BLOCK_SIZE
            wanted[first : last + 1] = b"\x01" * (last + 1 - first)
        partial = self.partial.get(index)
        missing: list[tuple[int, int]] = []
        for block, want in enumerate(wanted):
            if not want or (partial is not None and partial.held[block]):
                continue
            start = piece_start + block * BLOCK_SIZE
            end = min(start + BLOCK_SIZE, piece_start + piece_length)
            if missing and missing[-1][1] == start:
                missing[-1] = (missing[-1][0], end)
            else:
                missing.append((start, end))
        return missing

    def contiguous_end(self) -> int:
        """End offset of the run of held pieces that starts at 0."""
        first_missing = self.done.find(0)
        if first_missing < 0:
            return self.content_length
        return first_missing * self.piece_size


# ---------------------------------------------------------------------------------------------
# Metadata encoding: the one place the on-disk format lives.


def _encode_bitmap(done: bytearray) -> bytes:
    bits = bytearray((len(done) + 7) // 8)
    index = done.find(1)
    while index >= 0:
        bits[index >> 3] |= 1 << (index & 7)
        index = done.find(1, index + 1)
    return bytes(bits)


def _decode_bitmap(bits: bytes, count: int) -> bytearray:
    done = bytearray(count)
    for index in range(count):
        if bits[index >> 3] & (1 << (index & 7)):
            done[index] = 1
    return done


def encode_metadata(task: StoredTask) -> bytes:
    digests = b"".join(d.to_bytes(8, "big") for d in task.digests)
    encoded: bytes = msgpack.packb(
        {
            "version": METADATA_VERSION,
            "task_id": task.task_id,
            "content_length": task.content_length,
            "piece_size": task.piece_size,
            "bitmap": _encode_bitmap(task.done),
            "digests": digests,
            "sha256": task.sha256,
            "attributes": task.attributes,
            "complete": task.complete,
            "last_access": task.last_access,
            # [piece index, block bitmap, block digests] per partial piece (msgpack map keys
            # must be strings here, so a list).
            "blocks": [
                [index, _encode_bitmap(partial.held),
                 b"".join(d.to_bytes(8, "big") for d in partial.digests)]
                for index, partial in sorted(task.partial.items())
            ],
        },
        use_bin_type=True,
    )
    return encoded


def _decode_partial(
    blocks: object, done: bytearray, length: int, piece_size: int
) -> dict[int, PartialPiece]:
    if blocks is None:
        return {}
    if not isinstance(blocks, list):
        raise BadMetadata("bad blocks")
    partial: dict[int, PartialPiece] = {}
    for item in blocks:
        if not (isinstance(item, list) and len(item) == 3):
            raise BadMetadata("bad blocks")
        index, bitmap, digests = item
        if (
            not isinstance(index, int) or isinstance(index, bool)
            or not 0 <= index < len(done) or done[index] or index in partial
        ):
            raise BadMetadata("bad partial piece index")
        count = block_count(min(piece_size, length - index * piece_size))
        if not isinstance(bitmap, bytes) or len(bitmap) != (count + 7) // 8:
            raise BadMetadata("bad block bitmap")
        if not isinstance(digests, bytes) or len(digests) != 8 * count:
            raise BadMetadata("bad block digests")
        held = _decode_bitmap(bitmap, count)
        if held.find(1) < 0:
            continue
        partial[index] = PartialPiece(
            held, [int.from_bytes(digests[i : i + 8], "big") for i in range(0, len(digests), 8)]
        )
    return partial


class BadMetadata(ValueError):
    """A metadata file that cannot be trusted (torn, foreign, or from another version)."""


def decode_metadata(raw: bytes, name: str) -> StoredTask:
    """Parse and check one metadata file; `name` is the file's base name."""
    try:
        data = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as err:  # msgpack raises several unrelated types on garbage
        raise BadMetadata(f"not msgpack: {err}") from None
    if not isinstance(data, dict) or data.get("version") != METADATA_VERSION:
        raise BadMetadata("not a version 1 metadata map")
    task_id = data.get("task_id")
    length = data.get("content_length")
    piece_size = data.get("piece_size")
    bitmap = data.get("bitmap")
    digests = data.get("digests")
    sha256 = data.get("sha256")
    attributes = data.get("attributes")
    complete = data.get("complete")
    last_access = data.get("last_access")
    if not isinstance(task_id, str) or file_name_for(task_id) != name:
        raise BadMetadata("task id does not match the file name")
    if not isinstance(length, int) or isinstance(length, bool) or length < 0:
        raise BadMetadata("bad content length")
    if piece_size != piece_size_for(length):
        raise BadMetadata("piece size does not match the content length")
    count = (length + piece_size - 1) // piece_size
    if not isinstance(bitmap, bytes) or len(bitmap) != (count + 7) // 8:
        raise BadMetadata("bad bitmap")
    if not isinstance(digests, bytes) or len(digests) != 8 * count:
        raise BadMetadata("bad digests")
    if sha256 is not None and not (isinstance(sha256, str) and len(sha256) == 64):
        raise BadMetadata("bad sha256")
    if not isinstance(attributes, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in attributes.items()
    ):
        raise BadMetadata("bad attributes")
    if not isinstance(complete, bool) or not isinstance(last_access, int | float):
        raise BadMetadata("bad flags")
    done = _decode_bitmap(bitmap, count)
    if complete and done.count(1) != count:
        raise BadMetadata("complete but pieces missing")
    partial = {} if complete else _decode_partial(data.get("blocks"), done, length, piece_size)
    return StoredTask(
        task_id=task_id,
        name=name,
        content_length=length,
        piece_size=piece_size,
        sha256=sha256,
        attributes=dict(attributes),
        done=done,
        digests=[int.from_bytes(digests[i : i + 8], "big") for i in range(0, len(digests), 8)],
        complete=complete,
        last_access=float(last_access),
        needs_verify=not complete,
        partial=partial,
    )


# ---------------------------------------------------------------------------------------------
# Blocking helpers (run in the pool).


Chunk = bytes | bytearray | memoryview


def _write_all(fd: int, chunks: Sequence[Chunk], offset: int) -> None:
    """Write the chunks at `offset`, all of them (pwritev may write less than asked)."""
    views = [memoryview(c) for c in chunks if len(c)]
    while views:
        written = os.pwritev(fd, views[:1024], offset)  # IOV_MAX is 1024 on Linux
        if written <= 0:
            raise OSError(errno.EIO, "pwritev wrote nothing")
        offset += written
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if written:
            views[0] = views[0][written:]


def _write_and_digest(fd: int, chunks: Sequence[Chunk], offset: int, digest: Any) -> None:
    _write_all(fd, chunks, offset)
    for chunk in chunks:
        digest.update(chunk)


def _update_all(hasher: Any, chunks: Sequence[Chunk]) -> None:
    for chunk in chunks:
        hasher.update(chunk)


def _hash_file_range(fd: int, hasher: Any, start: int, end: int) -> None:
    block = bytearray(min(READ_BLOCK, max(end - start, 1)))
    view = memoryview(block)
    position = start
    while position < end:
        want = min(len(block), end - position)
        got = os.preadv(fd, [view[:want]], position)
        if got <= 0:
            raise OSError(errno.EIO, f"data file ends at {position}, expected {end}")
        hasher.update(view[:got])
        position += got


def _verify_pieces(task_view: tuple[int, int, int, bytes, list[int]]) -> tuple[list[int], int, Any]:
    """Check each held piece's xxh3; hash the contiguous good prefix with sha256.

    Returns (bad piece indices, prefix end, sha256 of the prefix)."""
    fd, length, piece_size, done, digests = task_view
    bad: list[int] = []
    prefix = hashlib.sha256()
    prefix_end = 0
    block = bytearray(piece_size)
    view = memoryview(block)
    for index, held in enumerate(done):
        if not held:
            continue
        start = index * piece_size
        size = min(piece_size, length - start)
        got = 0
        while got < size:
            n = os.preadv(fd, [view[got:size]], start + got)
            if n <= 0:
                break
            got += n
        if got != size or xxhash.xxh3_64_intdigest(view[:size]) != digests[index]:
            bad.append(index)
            continue
        if start == prefix_end:
            prefix.update(view[:size])
            prefix_end = start + size
    return bad, prefix_end, prefix


def _read_exactly(fd: int, view: memoryview, offset: int) -> bool:
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            return False
        got += n
    return True


def _verify_blocks(
    fd: int, piece_start: int, piece_length: int, held: bytes, digests: list[int]
) -> list[int]:
    """The held blocks of one partial piece whose bytes on disk do not match their xxh3."""
    bad: list[int] = []
    block = bytearray(BLOCK_SIZE)
    for index, is_held in enumerate(held):
        if not is_held:
            continue
        start = piece_start + index * BLOCK_SIZE
        view = memoryview(block)[: min(BLOCK_SIZE, piece_start + piece_length - start)]
        if not _read_exactly(fd, view, start) or xxhash.xxh3_64_intdigest(view) != digests[index]:
            bad.append(index)
    return bad


def _digest_assembled_piece(
    fd: int, piece_start: int, piece_length: int, digests: list[int]
) -> tuple[int, list[int]]:
    """Read a piece whose blocks are all written: (its xxh3_64, the blocks that do not match
    their digest). The piece digest counts only when no block is bad."""
    whole = xxhash.xxh3_64()
    bad: list[int] = []
    buffer = bytearray(piece_length)
    view = memoryview(buffer)
    if not _read_exactly(fd, view, piece_start):
        return 0, list(range(len(digests)))
    for index, expected in enumerate(digests):
        part = view[index * BLOCK_SIZE : (index + 1) * BLOCK_SIZE]
        if xxhash.xxh3_64_intdigest(part) != expected:
            bad.append(index)
    whole.update(view)
    return whole.intdigest(), bad


class BlockDigests:
    """A running digest (`update`) for a range that starts on a block boundary: the xxh3_64 of
    each block it covers, for `PieceStore.record_blocks`. A range may end inside its last block
    only at the end of the piece (a piece's last block may be short)."""

    def __init__(self) -> None:
        self.digests: list[int] = []
        self._current = xxhash.xxh3_64()
        self._filled = 0

    def update(self, data: Chunk) -> None:
        view = memoryview(data)
        while len(view):
            take = min(len(view), BLOCK_SIZE - self._filled)
            self._current.update(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == BLOCK_SIZE:
                self.digests.append(self._current.intdigest())
                self._current = xxhash.xxh3_64()
                self._filled = 0

    def finish(self) -> list[int]:
        """Every block's digest, a short last block's too."""
        if self._filled:
            self.digests.append(self._current.intdigest())
            self._current = xxhash.xxh3_64()
            self._filled = 0
        return self.digests


def _replace_file(
    directory: Path, name: str, payload: bytes, sync: int | Path | None
) -> None:
    """fdatasync `sync` (the data file, by fd or path), then atomically replace
    `directory/name` with `payload`."""
    if isinstance(sync, int):
        os.fdatasync(sync)
    elif sync is not None:
        data_fd = os.open(sync, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fdatasync(data_fd)
        finally:
            os.close(data_fd)
    final = directory / name
    temp = directory / f"{name}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        try:
            _write_all(fd, [payload], 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _allocated(fd: int) -> int:
    return os.fstat(fd).st_blocks * 512


def _scan_directory(directory: Path) -> tuple[list[StoredTask], list[str]]:
    """Load every task; remove leftovers. Returns (tasks, log lines)."""
    notes: list[str] = []
    names = {entry.name for entry in os.scandir(directory) if entry.is_file(follow_symlinks=False)}
    tasks: list[StoredTask] = []
    kept_data: set[str] = set()
    for file_name in sorted(names):
        path = directory / file_name
        if file_name.endswith((TEMP_SUFFIX, TRASH_SUFFIX)):
            path.unlink(missing_ok=True)
            continue
        if not file_name.endswith(META_SUFFIX):
            continue
        name = file_name[: -len(META_SUFFIX)]
        data_path = directory / (name + DATA_SUFFIX)
        try:
            task = decode_metadata(path.read_bytes(), name)
            stat = data_path.stat()
        except (BadMetadata, OSError) as err:
            notes.append(f"dropping task file {file_name}: {err}")
            path.unlink(missing_ok=True)
            data_path.unlink(missing_ok=True)
            continue
        if stat.st_size != task.content_length:
            notes.append(f"dropping task {task.task_id}: data file has the wrong size")
            path.unlink(missing_ok=True)
            data_path.unlink(missing_ok=True)
            continue
        task.allocated = stat.st_blocks * 512
        tasks.append(task)
        kept_data.add(name + DATA_SUFFIX)
    for file_name in names:
        if file_name.endswith(DATA_SUFFIX) and file_name not in kept_data:
            (directory / file_name).unlink(missing_ok=True)
    return tasks, notes


# ---------------------------------------------------------------------------------------------


class PieceStore:
    """Owns the task files under the data dir: writes, verification, metadata, reload and GC."""

    def __init__(
        self,
        config: StoreConfig,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.metrics = metrics
        # Wall clock for last-access times and TTL (injectable so tests can move time).
        self.clock = clock
        self.directory = config.tasks_dir
        self._tasks: dict[str, StoredTask] = {}
        # The same tasks by file name (the sha256 of the id: the peer protocol's task key).
        self._by_name: dict[str, StoredTask] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._sync_pool: ThreadPoolExecutor | None = None
        self._gc_task: asyncio.Task[None] | None = None
        self._gc_lock = asyncio.Lock()
        self._allocated_total = 0

    # -- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the directory, reload every task, remove leftovers, start GC."""
        self._pool = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="d7y-store")
        self._sync_pool = ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="d7y-sync")
        await self._run(self.directory.mkdir, 0o755, True, True)
        tasks, notes = await self._run(_scan_directory, self.directory)
        for note in notes:
            log.warning("%s", note)
        for task in tasks:
            self._tasks[task.task_id] = task
            self._by_name[task.name] = task
            self._allocated_total += task.allocated
        self._update_gauges()
        log.info("piece store at %s: %d tasks, %d bytes", self.directory, len(tasks),
                 self._allocated_total)
        self._gc_task = asyncio.create_task(self._gc_loop(), name="piece-store-gc")

    async def close(self) -> None:
        """Stop GC, flush every task's metadata, close files."""
        if self._gc_task is not None:
            self._gc_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._gc_task
            self._gc_task = None
        for task in list(self._tasks.values()):
            try:
                await self.flush(task)
            except OSError as err:
                log.warning("could not flush task %s: %s", task.task_id, err)
            if task.fd is not None:
                os.close(task.fd)
                task.fd = None
            task.pins = 0
        for pool in (self._pool, self._sync_pool):
            if pool is not None:
                pool.shutdown(wait=True)
        self._pool = self._sync_pool = None

    # -- running blocking work -----------------------------------------------------------------

    async def _run(
        self, function: Callable[..., T], *args: Any, pool: ThreadPoolExecutor | None = None
    ) -> T:
        """Run blocking `function` in the pool. A cancelled caller still waits for the thread to
        finish, so no write lands after the caller believes it stopped."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(pool or self._pool, function, *args)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            while not future.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait([future])
            if not future.cancelled():
                future.exception()  # the caller is gone; its error goes with it
            raise

    # -- tasks ---------------------------------------------------------------------------------

    def get(self, task_id: str) -> StoredTask | None:
        return self._tasks.get(task_id)

    def get_by_name(self, name: str) -> StoredTask | None:
        """The task whose files are named `name` (`file_name_for` of its id), if held."""
        return self._by_name.get(name)

    def tasks(self) -> list[StoredTask]:
        return list(self._tasks.values())

    def _path(self, task: StoredTask, suffix: str) -> Path:
        return self.directory / (task.name + suffix)

    async def create(
        self,
        task_id: str,
        content_length: int,
        *,
        sha256: str | None,
        attributes: Mapping[str, str],
        reserve: bool,
    ) -> StoredTask:
        """A new empty task (sparse data file, no metadata yet), pinned once for the caller.

        `reserve` counts the whole length against the quota now (a whole download will write it).
        Raises `StoreFull` if it cannot fit even after GC, or the file cannot be created."""
        if task_id in self._tasks:
            raise ValueError(f"task {task_id} already exists")
        if reserve:
            await self._make_room(content_length)
        piece_size = piece_size_for(content_length)
        count = (content_length + piece_size - 1) // piece_size
        task = StoredTask(
            task_id=task_id,
            name=file_name_for(task_id),
            content_length=content_length,
            piece_size=piece_size,
            sha256=sha256,
            attributes=dict(attributes),
            done=bytearray(count),
            digests=[0] * count,
            last_access=self.clock(),
            reserve=reserve,
            meta_dirty=True,
        )
        path = self._path(task, DATA_SUFFIX)
        future = asyncio.get_running_loop().run_in_executor(
            self._pool, _create_sparse, path, content_length
        )
        try:
            fd = await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(lambda done: _drop_created(done, path))
            raise
        except OSError as err:
            if _disk_error(err):
                raise StoreFull(
                    f"no room for task {task_id} ({content_length} bytes) in {self.directory}: "
                    f"{err.strerror}"
                ) from None
            raise
        task.fd = fd
        task.pins = 1
        self._tasks[task_id] = task
        self._by_name[task.name] = task
        self._update_gauges()
        return task

    def pin(self, task: StoredTask) -> None:
        """Keep `task` from eviction and its data fd open until `release`."""
        if task.fd is None:
            flags = os.O_RDONLY if task.complete else os.O_RDWR
            task.fd = os.open(self._path(task, DATA_SUFFIX), flags | os.O_CLOEXEC)
        task.pins += 1

    async def release(self, task: StoredTask) -> None:
        """Undo one `pin`; the last one saves unflushed pieces and closes the fd.

        A changed access time alone is saved later (by the GC loop or `close`), so a cache hit
        costs no metadata write."""
        if task.pins <= 0:
            return
        if task.pins == 1 and not task.removed and task.unflushed:
            try:
                await self.flush(task)
            except OSError as err:
                log.warning("could not flush task %s: %s", task.task_id, err)
        task.pins -= 1
        if task.pins == 0:
            task.reserve = False
            if task.fd is not None:
                os.close(task.fd)
                task.fd = None

    def touch(self, task: StoredTask) -> None:
        task.last_access = self.clock()
        task.meta_dirty = True

    async def write(
        self, task: StoredTask, offset: int, chunks: Sequence[Chunk], digest: Any
    ) -> None:
        """Write `chunks` at `offset` and feed them to `digest` (a running xxh3_64).

        Raises `StoreFull` when the disk is full."""
        assert task.fd is not None, "write to an unpinned task"
        size = sum(len(c) for c in chunks)
        try:
            if size <= INLINE_IO_BYTES:
                _write_and_digest(task.fd, chunks, offset, digest)
            else:
                await self._run(_write_and_digest, task.fd, chunks, offset, digest)
        except OSError as err:
            if _disk_error(err):
                raise StoreFull(
                    f"disk full while writing task {task.task_id} in {self.directory}: "
                    f"{err.strerror}"
                ) from None
            raise

    def record_piece(self, task: StoredTask, index: int, digest: int) -> None:
        """Piece `index` is written (pwrite returned) and its xxh3_64 is `digest`."""
        if task.done[index]:
            return
        task.done[index] = 1
        task.digests[index] = digest
        task.partial.pop(index, None)
        task.unflushed += 1
        self._account(task)

    def _account(self, task: StoredTask) -> None:
        if task.fd is not None:
            allocated = _allocated(task.fd)
            self._allocated_total += allocated - task.allocated
            task.allocated = allocated
            self.metrics.store_bytes.set(self._allocated_total)

    def record_blocks(self, task: StoredTask, start: int, digests: Sequence[int]) -> bool:
        """Blocks from offset `start` (a block boundary) on are written, with these xxh3_64
        digests, one per block, all in one piece. True when that piece now has every block (call
        `assemble_piece` to make it a held piece)."""
        index = start // task.piece_size
        if task.done[index]:
            return False
        piece_start, piece_length = task.piece_range(index)
        first = (start - piece_start) // BLOCK_SIZE
        partial = task.partial.get(index)
        if partial is None:
            partial = task.partial[index] = PartialPiece.empty(piece_length)
        if first < 0 or first + len(digests) > len(partial.held):
            raise ValueError(f"blocks {first}+{len(digests)} are outside piece {index}")
        for offset, digest in enumerate(digests, first):
            partial.held[offset] = 1
            partial.digests[offset] = digest
        task.unflushed += 1
        self._account(task)
        return partial.complete

    async def assemble_piece(self, task: StoredTask, index: int) -> bool:
        """Make piece `index`, whose blocks are all written, a held piece: read it back, check
        every block against its digest and record the piece's own digest. A block that does not
        match is dropped (it must be fetched again) and the piece stays partial: False."""
        partial = task.partial.get(index)
        if task.done[index]:
            return True
        if partial is None or not partial.complete:
            return False
        assert task.fd is not None, "assembly of an unpinned task"
        piece_start, piece_length = task.piece_range(index)
        digest, bad = await self._run(
            _digest_assembled_piece, task.fd, piece_start, piece_length, list(partial.digests)
        )
        if task.done[index] or task.partial.get(index) is not partial:
            return bool(task.done[index])  # changed meanwhile (discarded, or held another way)
        if bad:
            self._drop_blocks(task, index, bad)
            return False
        self.record_piece(task, index, digest)
        return True

    def _drop_blocks(self, task: StoredTask, index: int, blocks: Sequence[int]) -> None:
        partial = task.partial[index]
        for block in blocks:
            partial.held[block] = 0
            partial.digests[block] = 0
            self.metrics.piece_digest_failures.inc()
        if partial.held.find(1) < 0:
            del task.partial[index]
        task.meta_dirty = True
        log.warning("task %s: %d blocks of piece %d failed verification and will be fetched "
                    "again", task.task_id, len(blocks), index)

    def flush_due(self, task: StoredTask, interval: float, pieces: int) -> bool:
        """Whether pending pieces justify a metadata write now."""
        if not task.unflushed:
            return False
        return task.unflushed >= pieces or time.monotonic() - task.flushed_at >= interval

    async def flush(self, task: StoredTask) -> None:
        """Make the metadata match memory; a complete task's data is fdatasync'ed first."""
        async with task.lock:
            if task.removed or not (task.unflushed or task.meta_dirty):
                return
            # Snapshot before the sync: every piece in it was written before the sync starts.
            payload = encode_metadata(task)
            pending = task.unflushed
            sync: int | Path | None = None
            if task.complete and not task.synced:
                sync = task.fd if task.fd is not None else self._path(task, DATA_SUFFIX)
            task.meta_dirty = False
            try:
                await self._run(
                    _replace_file, self.directory, task.name + META_SUFFIX, payload, sync,
                    pool=self._sync_pool,
                )
            except OSError as err:
                task.meta_dirty = True
                if _disk_error(err):
                    raise StoreFull(
                        f"disk full while saving task {task.task_id} in {self.directory}: "
                        f"{err.strerror}"
                    ) from None
                raise
            task.unflushed -= pending
            task.flushed_at = time.monotonic()
            if sync is not None:
                task.synced = True

    def mark_complete(self, task: StoredTask) -> None:
        """The task's sha256 matched: serve it as complete now; `flush` makes that durable."""
        task.complete = True
        task.reserve = False
        task.partial.clear()
        task.meta_dirty = True

    async def complete(self, task: StoredTask) -> None:
        """Mark the task complete and make that durable."""
        self.mark_complete(task)
        await self.flush(task)

    async def hash_range(self, task: StoredTask, hasher: Any, start: int, end: int) -> None:
        """Feed bytes [start, end) of the data file to `hasher` (in the pool)."""
        assert task.fd is not None, "hash of an unpinned task"
        if end - start <= INLINE_IO_BYTES:
            _hash_file_range(task.fd, hasher, start, end)
        else:
            await self._run(_hash_file_range, task.fd, hasher, start, end)

    async def hash_buffers(self, hasher: Any, chunks: Sequence[Chunk], size: int) -> None:
        """Feed buffers already in memory to `hasher` (in the pool when big)."""
        if size <= INLINE_IO_BYTES:
            _update_all(hasher, chunks)
        else:
            await self._run(_update_all, hasher, chunks)

    async def read(self, task: StoredTask, offset: int, length: int) -> bytes:
        assert task.fd is not None, "read of an unpinned task"
        if length <= INLINE_IO_BYTES:
            return os.pread(task.fd, length, offset)
        return await self._run(os.pread, task.fd, length, offset)

    async def read_checked(self, task: StoredTask, offset: int, length: int) -> bytes | None:
        """[offset, offset+length) of a pinned task, for a peer: the held pieces (or held blocks
        of partial pieces) it lies in are read whole and checked against their recorded xxh3
        first, so bytes gone bad on disk are never sent on under a fresh digest. None when some
        byte is not held or a check fails (logged)."""
        end = offset + length
        if not task.holds(offset, end):
            return None
        parts: list[bytes] = []
        size = task.piece_size
        for index in range(offset // size, (end - 1) // size + 1):
            piece_start, piece_length = task.piece_range(index)
            start, stop = max(offset, piece_start), min(end, piece_start + piece_length)
            partial = None if task.complete or task.done[index] else task.partial.get(index)
            if partial is None:
                first, last = piece_start, piece_start + piece_length
                expected = [task.digests[index]]
                unit = piece_length
            else:
                first = piece_start + (start - piece_start) // BLOCK_SIZE * BLOCK_SIZE
                last = min(piece_start + piece_length,
                           piece_start + -(-(stop - piece_start) // BLOCK_SIZE) * BLOCK_SIZE)
                number = (first - piece_start) // BLOCK_SIZE
                expected = partial.digests[number : number + block_count(last - first)]
                unit = BLOCK_SIZE
            data = await self.read(task, first, last - first)
            view = memoryview(data)
            actual = [xxhash.xxh3_64_intdigest(view[at : at + unit])
                      for at in range(0, len(data), unit)]
            if len(data) != last - first or actual != expected:
                log.warning("task %s: bytes %d-%d on disk do not match their digests; not "
                            "served", task.task_id, first, last)
                return None
            parts.append(data[start - first : stop - first])
        return b"".join(parts)

    async def verify(self, task: StoredTask) -> int:
        """Check a reloaded partial task's pieces (and blocks of partial pieces) against their
        digests; drop bad ones.

        Also computes the sha256 of the contiguous prefix (kept in `task.prefix`). Returns how
        many pieces were dropped."""
        if not task.needs_verify:
            return 0
        assert task.fd is not None, "verify of an unpinned task"
        view = (task.fd, task.content_length, task.piece_size, bytes(task.done),
                list(task.digests))
        bad, prefix_end, prefix = await self._run(_verify_pieces, view)
        task.needs_verify = False
        for index in bad:
            task.done[index] = 0
            task.digests[index] = 0
            self.metrics.piece_digest_failures.inc()
        if bad:
            log.warning("task %s: %d pieces failed verification and will be fetched again",
                        task.task_id, len(bad))
            task.meta_dirty = True
        dropped_blocks = 0
        for index, partial in list(task.partial.items()):
            piece_start, piece_length = task.piece_range(index)
            bad_blocks = await self._run(
                _verify_blocks, task.fd, piece_start, piece_length, bytes(partial.held),
                list(partial.digests),
            )
            if bad_blocks:
                self._drop_blocks(task, index, bad_blocks)
                dropped_blocks += len(bad_blocks)
        if bad or dropped_blocks:
            await self.flush(task)
        task.prefix = (prefix_end, prefix)
        return len(bad)

    async def discard(self, task: StoredTask) -> None:
        """Remove the task and its files (a failed or mismatched download)."""
        async with task.lock:
            self._forget(task)

    def _forget(self, task: StoredTask) -> None:
        """Synchronously move the files out of the way and drop the task from the index; the
        files are unlinked later in the pool. An open fd (a reader) stays valid."""
        if task.removed:
            return
        task.removed = True
        if self._tasks.get(task.task_id) is task:
            del self._tasks[task.task_id]
        if self._by_name.get(task.name) is task:
            del self._by_name[task.name]
        self._allocated_total -= task.allocated
        trash: list[Path] = []
        for suffix in (DATA_SUFFIX, META_SUFFIX):
            path = self._path(task, suffix)
            target = path.with_name(f"{path.name}.{secrets.token_hex(4)}{TRASH_SUFFIX}")
            try:
                os.rename(path, target)
                trash.append(target)
            except FileNotFoundError:
                pass
        self._update_gauges()
        if trash:
            loop = asyncio.get_running_loop()
            loop.run_in_executor(self._pool, _unlink_all, trash)

    async def put(
        self, task_id: str, data: bytes, *, sha256: str, attributes: Mapping[str, str]
    ) -> StoredTask:
        """Store content already in memory (and already checked) as a complete task."""
        task = await self.create(
            task_id, len(data), sha256=sha256, attributes=attributes, reserve=True
        )
        try:
            view = memoryview(data)
            for index in range(task.piece_count):
                start, size = task.piece_range(index)
                digest = xxhash.xxh3_64()
                await self.write(task, start, [view[start : start + size]], digest)
                self.record_piece(task, index, digest.intdigest())
            await self.complete(task)
        except BaseException:
            await self.discard(task)
            raise
        finally:
            await self.release(task)
        return task

    # -- usage and GC --------------------------------------------------------------------------

    def _update_gauges(self) -> None:
        self.metrics.store_bytes.set(self._allocated_total)
        self.metrics.store_tasks.set(len(self._tasks))

    @property
    def allocated_bytes(self) -> int:
        return self._allocated_total

    def usage(self) -> tuple[int, int]:
        """(bytes used, capacity) the watermarks apply to.

        With a quota: the store's own allocated bytes against the quota. Without: the whole
        filesystem's used bytes against its size (other data on the disk counts too)."""
        if self.config.gc_quota is not None:
            return self._allocated_total, self.config.gc_quota
        stat = os.statvfs(self.directory)
        return (stat.f_blocks - stat.f_bfree) * stat.f_frsize, stat.f_blocks * stat.f_frsize

    def _reserved(self) -> int:
        """Bytes running whole downloads will still allocate."""
        return sum(
            max(0, t.content_length - t.allocated)
            for t in self._tasks.values()
            if t.reserve and t.pins > 0 and not t.complete
        )

    async def _make_room(self, need: int) -> None:
        used, capacity = self.usage()
        if need > capacity:
            raise StoreFull(
                f"content of {need} bytes is larger than the store's capacity of {capacity} bytes"
            )
        if used + self._reserved() + need > capacity * self.config.gc_high_watermark:
            await self.collect(need=need)
            used, capacity = self.usage()
        if (
            self.config.gc_quota is not None
            and used + self._reserved() + need > self.config.gc_quota
        ):
            raise StoreFull(
                f"store quota of {self.config.gc_quota} bytes reached: {used} used, "
                f"{self._reserved()} promised to running downloads, {need} more needed, and "
                f"every other task is in use"
            )

    async def collect(self, *, need: int = 0) -> int:
        """One GC run: evict expired tasks, then least recently used ones while usage (plus
        `need` bytes about to be written) is above the high watermark, down to the low one.
        Pinned tasks are never evicted. Returns how many tasks were evicted."""
        async with self._gc_lock:
            evicted = 0
            now = self.clock()
            ttl = self.config.gc_ttl
            candidates = sorted(
                (t for t in self._tasks.values() if t.pins == 0 and not t.lock.locked()),
                key=lambda t: t.last_access,
            )
            if ttl is not None:
                for task in candidates:
                    if task.last_access < now - ttl:
                        self._evict(task, "ttl")
                        evicted += 1
                candidates = [t for t in candidates if not t.removed]
            used, capacity = self.usage()
            used += self._reserved() + need
            if used > capacity * self.config.gc_high_watermark:
                target = capacity * self.config.gc_low_watermark
                for task in candidates:
                    if used <= target:
                        break
                    if task.pins or task.removed:
                        continue
                    used -= task.allocated
                    self._evict(task, "quota")
                    evicted += 1
            return evicted

    def _evict(self, task: StoredTask, reason: str) -> None:
        log.info("gc: evicting task %s (%d bytes, %s)", task.task_id, task.allocated, reason)
        self.metrics.gc_evictions.labels(reason=reason).inc()
        self.metrics.gc_evicted_bytes.inc(task.allocated)
        self._forget(task)

    async def _gc_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.gc_interval)
            try:
                await self.collect()
                await self._flush_access_times()
            except Exception:
                log.exception("gc run failed")

    async def _flush_access_times(self) -> None:
        """Persist last-access times of idle tasks now and then (pinned ones flush themselves)."""
        for task in list(self._tasks.values()):
            if task.meta_dirty and task.pins == 0 and not task.removed:
                await self.flush(task)


def _create_sparse(path: Path, length: int) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, length)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    return fd


def _drop_created(done: asyncio.Future[int], path: Path) -> None:
    """Close and remove a data file whose creator was cancelled meanwhile."""
    if done.cancelled() or done.exception() is not None:
        return
    os.close(done.result())
    path.unlink(missing_ok=True)


def _unlink_all(paths: list[Path]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink()
