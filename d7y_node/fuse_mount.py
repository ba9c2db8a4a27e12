"""The lazy mount: a RAFS image served read-only through FUSE, its chunks fetched when read.

Owns `RafsMount` (bootstrap + mount point + blob source, as an async context manager), the
filesystem operations over a `rafs.Filesystem` (`RafsOperations`: attributes, directories, links,
extended attributes, statistics, errno mapping), the read path (`ChunkReader`: a read becomes chunk
slices, chunks become blob ranges, ranges come from a `BlobSource`; every decompressed chunk is
verified against its digest, big ones in a thread pool, and kept in a small LRU), the prefetcher
(the bootstrap's prefetch table first, then optionally whole blobs under a bandwidth cap), and the
blob sources: a directory of blob files, and the `TaskManager` (the piece store is the cache, only
the pieces a read needs are fetched).

Does not speak the kernel protocol (`fuse_kernel.py`: the FUSE wire format, mounting, and why not
pyfuse3), parse RAFS (`rafs/`), or know registries (the caller hands `TaskBlobSource` a piece
source per blob). The CLI and the node decide when to mount.

Inode numbers are the image's own (`rafs.tree`: root 1, hard links share one); the image never
changes, so entries, attributes and pages are cached by the kernel for a long time.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import mmap
import os
import re
import stat
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

from d7y_node import fuse_kernel
from d7y_node.errors import D7yError, RafsError, TaskFailed
from d7y_node.fuse_kernel import (
    DirectoryItem,
    Entry,
    FileAttributes,
    FilesystemStatistics,
    FuseError,
    FuseSession,
    MountRequest,
    Opened,
)
from d7y_node.rafs import Attributes, Chunk, DirectoryEntry, Filesystem, open_bootstrap
from d7y_node.rafs.chunks import MAX_CHUNK_SIZE
from d7y_node.rafs.tree import MAX_NAME_LENGTH, ROOT_INO
from d7y_node.tasks import PieceSource, TaskHandle, TaskManager

if TYPE_CHECKING:
    from d7y_node.fuse_handover import Handover

log = logging.getLogger(__name__)

# The image never changes: the kernel may keep names, attributes (and, with keep_cache, pages)
# for as long as it likes. A day bounds how long a forgotten mount's dentries linger.
ENTRY_TIMEOUT = 24 * 3600.0
# Decoded chunks kept for reads that come back to them (the kernel reads 4 KiB..1 MiB at a time,
# a chunk is 1 MiB by default): room for the chunks of a few concurrent sequential readers.
CHUNK_CACHE_BYTES = 64 * 1024 * 1024
# Chunks at least this big are decompressed and hashed in the thread pool; smaller ones cost less
# than the thread hop.
THREAD_DECODE_BYTES = 64 * 1024
# Threads for decompressing and hashing: zstd, lz4, blake3 and sha256 release the GIL, so two use
# two cores without starving the loop.
DECODE_THREADS = 2
# A read that continues the previous one of its file also fetches the chunks of this many bytes
# after it (one default chunk), like nydusd's amplify_io: a sequential reader then finds the
# next chunk decoded, or on its way, instead of waiting a round trip per chunk.
READ_AHEAD_BYTES = 1024 * 1024
# Files whose last read position is remembered for that.
READ_AHEAD_FILES = 1024
# Adjacent chunks of one read are fetched with one blob read, up to this many bytes.
MAX_FETCH_RUN = 4 * 1024 * 1024
# Whole-blob prefetch asks for this much at a time (and takes this many tokens from the bucket).
PREFETCH_STEP = 1024 * 1024
# Prefetch-table entries may name directories; this many files at most are prefetched from them,
# so a table naming "/" cannot make a 100k-file walk hold everything.
MAX_PREFETCH_FILES = 100_000
# How long `RafsMount` waits for the kernel's INIT after mounting.
INIT_TIMEOUT = 10.0
# statfs block size (and st_blksize): the page size.
BLOCK_SIZE = 4096

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class BlobSource(Protocol):
    """Where a mount gets the bytes of its data blobs, by blob id (a sha256 hex digest)."""

    async def read(self, blob_id: str, offset: int, length: int) -> bytes:
        """Exactly `length` bytes of blob `blob_id` from `offset`; raises (any `D7yError` or
        `OSError`) when they cannot be had."""
        ...

    async def prefetch(self, blob_id: str, offset: int, length: int) -> None:
        """Make `[offset, offset + length)` of the blob local so that later reads are fast;
        need not return the bytes."""
        ...


@dataclass(frozen=True, slots=True)
class MountOptions:
    """How a mount behaves; the defaults suit a container's root filesystem."""

    entry_timeout: float = ENTRY_TIMEOUT
    chunk_cache_bytes: int = CHUNK_CACHE_BYTES
    # Sequential reads fetch this much further (0: only what is read).
    read_ahead_bytes: int = READ_AHEAD_BYTES
    decode_threads: int = DECODE_THREADS
    # Fetch the files of the bootstrap's prefetch table in the background once mounted.
    prefetch_files: bool = True
    # Then fetch every data blob whole, in the background.
    prefetch_blobs: bool = False
    # Bytes per second for the whole-blob prefetch; None is no cap.
    prefetch_bandwidth: int | None = None
    # Let users other than the mounting one use the mount (root only; needed by containers).
    allow_other: bool = True
    source_name: str = "d7y-node"


# -- decoded chunks -----------------------------------------------------------------------------

# A chunk's place in its blob: the same bytes under any file (deduplicated chunks share it).
ChunkKey = tuple[int, int, int]  # blob index, compressed offset, compressed size


def chunk_key(chunk: Chunk) -> ChunkKey:
    return (chunk.blob_index, chunk.compressed_offset, chunk.compressed_size)


class ChunkCache:
    """Decoded chunks, least recently used forgotten first, bounded in bytes."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.size = 0
        self._entries: OrderedDict[ChunkKey, bytes] = OrderedDict()

    def get(self, key: ChunkKey) -> bytes | None:
        data = self._entries.get(key)
        if data is not None:
            self._entries.move_to_end(key)
        return data

    def put(self, key: ChunkKey, data: bytes) -> None:
        if len(data) > self.capacity:
            return
        previous = self._entries.pop(key, None)
        if previous is not None:
            self.size -= len(previous)
        self._entries[key] = data
        self.size += len(data)
        while self.size > self.capacity:
            _key, evicted = self._entries.popitem(last=False)
            self.size -= len(evicted)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries


class ChunkReader:
    """Reads file ranges: plan → chunks → blob ranges → verified, decoded bytes.

    Concurrent reads of one chunk share one fetch; adjacent chunks of one read share one blob
    read. Fetches run as their own tasks, so a reader interrupted by the kernel does not cancel a
    fetch another reader waits for.
    """

    def __init__(
        self,
        filesystem: Filesystem,
        source: BlobSource,
        *,
        cache_bytes: int = CHUNK_CACHE_BYTES,
        read_ahead_bytes: int = READ_AHEAD_BYTES,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        self.filesystem = filesystem
        self.source = source
        self.cache = ChunkCache(cache_bytes)
        self._executor = executor
        self.read_ahead_bytes = read_ahead_bytes
        self._pending: dict[ChunkKey, asyncio.Future[bytes]] = {}
        self._fetches: set[asyncio.Task[None]] = set()
        # Where the last read of each recently read file ended, to tell sequential reads.
        self._read_ends: OrderedDict[int, int] = OrderedDict()
        # Counters for status output and tests.
        self.blob_reads = 0
        self.blob_bytes = 0
        self.chunks_decoded = 0

    @property
    def fetches_in_flight(self) -> int:
        return len(self._fetches)

    async def read(self, ino: int, offset: int, length: int) -> bytes:
        plan = self.filesystem.read_plan(ino, offset, length)
        chunks = [piece.chunk for piece in plan if piece.chunk is not None]
        decoded = await self.chunks(chunks, read_ahead=self._read_ahead(ino, offset, length))
        parts: list[bytes] = []
        for piece in plan:
            if piece.chunk is None:
                parts.append(bytes(piece.length))
            else:
                data = decoded[chunk_key(piece.chunk)]
                parts.append(data[piece.offset : piece.offset + piece.length])
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _read_ahead(self, ino: int, offset: int, length: int) -> list[Chunk]:
        """For a read that continues the previous read of the same file, the chunks of the
        next `READ_AHEAD_BYTES`: fetched alongside, so decoding overlaps the reader. Random
        reads fetch nothing extra."""
        sequential = self._read_ends.pop(ino, None) == offset and offset > 0
        self._read_ends[ino] = offset + length
        if len(self._read_ends) > READ_AHEAD_FILES:
            self._read_ends.popitem(last=False)
        if not sequential or self.read_ahead_bytes <= 0:
            return []
        start = offset + length
        ahead = self.filesystem.read_plan(ino, start, self.read_ahead_bytes)
        return [piece.chunk for piece in ahead if piece.chunk is not None]

    async def chunks(
        self, chunks: Sequence[Chunk], *, read_ahead: Sequence[Chunk] = ()
    ) -> dict[ChunkKey, bytes]:
        """The verified, decoded bytes of each chunk, by key; the `read_ahead` chunks are
        fetched too (in the same blob reads where adjacent) but not waited for."""
        result: dict[ChunkKey, bytes] = {}
        waiting: dict[ChunkKey, asyncio.Future[bytes]] = {}
        missing: dict[ChunkKey, Chunk] = {}
        for chunk in chunks:
            key = chunk_key(chunk)
            if key in result or key in waiting or key in missing:
                continue
            cached = self.cache.get(key)
            if cached is not None:
                result[key] = cached
            elif key in self._pending:
                waiting[key] = self._pending[key]
            else:
                missing[key] = chunk
        if missing:
            waiting.update(self._start_fetches(list(missing.values())))
        # In their own blob reads, so the chunks asked for do not wait for them.
        extra = {
            chunk_key(chunk): chunk for chunk in read_ahead
            if chunk_key(chunk) not in self._pending and chunk_key(chunk) not in self.cache
        }
        if extra:
            self._start_fetches(list(extra.values()))
        for key, future in waiting.items():
            result[key] = await asyncio.shield(future)
        return result

    def _start_fetches(self, chunks: list[Chunk]) -> dict[ChunkKey, asyncio.Future[bytes]]:
        for chunk in chunks:
            if chunk.compressed_size > MAX_CHUNK_SIZE:
                raise RafsError(
                    f"a chunk claims {chunk.compressed_size} stored bytes, more than "
                    f"{MAX_CHUNK_SIZE}"
                )
        loop = asyncio.get_running_loop()
        started: dict[ChunkKey, asyncio.Future[bytes]] = {}
        for run in _fetch_runs(chunks):
            futures = {}
            for chunk in run:
                future: asyncio.Future[bytes] = loop.create_future()
                # Read-ahead futures may never be awaited: a failure must not warn.
                future.add_done_callback(_consume_exception)
                self._pending[chunk_key(chunk)] = future
                futures[chunk_key(chunk)] = future
            started.update(futures)
            task = loop.create_task(self._fetch(run, futures))
            self._fetches.add(task)
            task.add_done_callback(self._fetches.discard)
        return started

    async def _fetch(
        self, run: list[Chunk], futures: dict[ChunkKey, asyncio.Future[bytes]]
    ) -> None:
        try:
            first = run[0]
            blob = self.filesystem.blobs[first.blob_index]
            start = first.compressed_offset
            end = run[-1].compressed_offset + run[-1].compressed_size
            stored = await self.source.read(blob.blob_id, start, end - start)
            self.blob_reads += 1
            self.blob_bytes += len(stored)
            if len(stored) != end - start:
                raise RafsError(
                    f"blob {blob.blob_id}: read of {end - start} bytes at {start} "
                    f"returned {len(stored)}"
                )
            for chunk in run:
                at = chunk.compressed_offset - start
                data = await self._decode(chunk, stored[at : at + chunk.compressed_size])
                self.cache.put(chunk_key(chunk), data)
                self._settle(chunk_key(chunk), futures, data, None)
        except BaseException as error:  # every waiter must hear of it, cancellation too
            for key in futures:
                self._settle(key, futures, None, error)
            if isinstance(error, asyncio.CancelledError):
                raise

    def _settle(
        self,
        key: ChunkKey,
        futures: dict[ChunkKey, asyncio.Future[bytes]],
        data: bytes | None,
        error: BaseException | None,
    ) -> None:
        future = futures[key]
        if self._pending.get(key) is future:
            del self._pending[key]
        if future.done():
            return
        if error is not None:
            if isinstance(error, asyncio.CancelledError):
                error = RafsError("the chunk fetch was cancelled")
            future.set_exception(error)
        else:
            assert data is not None
            future.set_result(data)

    async def _decode(self, chunk: Chunk, stored: bytes) -> bytes:
        self.chunks_decoded += 1
        if chunk.uncompressed_size < THREAD_DECODE_BYTES and len(stored) < THREAD_DECODE_BYTES:
            return self.filesystem.decode_chunk(chunk, stored)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, self.filesystem.decode_chunk, chunk, stored
        )

    async def close(self) -> None:
        fetches = list(self._fetches)
        for task in fetches:
            task.cancel()
        await asyncio.gather(*fetches, return_exceptions=True)


def _consume_exception(future: asyncio.Future[bytes]) -> None:
    if not future.cancelled():
        future.exception()


def _fetch_runs(chunks: list[Chunk]) -> list[list[Chunk]]:
    """Chunks grouped into runs of one blob that are contiguous in it (one read each)."""
    ordered = sorted(chunks, key=lambda chunk: (chunk.blob_index, chunk.compressed_offset))
    runs: list[list[Chunk]] = []
    for chunk in ordered:
        if runs:
            last = runs[-1][-1]
            run_start = runs[-1][0].compressed_offset
            if (
                chunk.blob_index == last.blob_index
                and chunk.compressed_offset == last.compressed_offset + last.compressed_size
                and chunk.compressed_offset + chunk.compressed_size - run_start <= MAX_FETCH_RUN
            ):
                runs[-1].append(chunk)
                continue
        runs.append([chunk])
    return runs


# -- the filesystem operations ------------------------------------------------------------------


class RafsOperations:
    """The answers of a read-only filesystem over one RAFS image (`fuse_kernel.Operations`)."""

    def __init__(
        self, filesystem: Filesystem, reader: ChunkReader, *, entry_timeout: float = ENTRY_TIMEOUT
    ) -> None:
        self.filesystem = filesystem
        self.reader = reader
        self.entry_timeout = entry_timeout
        self.attribute_timeout = entry_timeout
        # Images built without explicit owners show the serving process's (as nydusd does).
        self._owner = None if filesystem.explicit_uid_gid else (os.geteuid(), os.getegid())
        self._handles = itertools.count(1)
        self.open_files: dict[int, int] = {}  # handle -> inode

    # -- attributes and names --

    def attributes(self, ino: int) -> FileAttributes:
        return self._convert(self._getattr(ino))

    def _getattr(self, ino: int) -> Attributes:
        try:
            return self.filesystem.getattr(ino)
        except RafsError as error:
            log.warning("inode %d: %s", ino, error)
            raise FuseError(errno.EIO) from None

    def _convert(self, attributes: Attributes) -> FileAttributes:
        uid, gid = self._owner or (attributes.uid, attributes.gid)
        is_device = stat.S_ISCHR(attributes.mode) or stat.S_ISBLK(attributes.mode)
        return FileAttributes(
            ino=attributes.ino,
            mode=attributes.mode,
            nlink=attributes.nlink,
            uid=uid,
            gid=gid,
            size=attributes.size,
            rdev=attributes.rdev if is_device else 0,
            mtime=attributes.mtime,
            mtime_nanoseconds=attributes.mtime_nanoseconds,
            blocks=(attributes.size + 511) // 512,
            block_size=BLOCK_SIZE,
        )

    def getattr(self, ino: int) -> FileAttributes:
        return self.attributes(ino)

    def lookup(self, parent: int, name: bytes) -> Entry:
        if len(name) > MAX_NAME_LENGTH:
            raise FuseError(errno.ENAMETOOLONG)
        if not self._getattr(parent).is_directory:
            raise FuseError(errno.ENOTDIR)
        try:
            found = self.filesystem.lookup(parent, name)
        except RafsError as error:
            log.warning("lookup of %r in inode %d: %s", name, parent, error)
            raise FuseError(errno.EIO) from None
        return Entry(
            None if found is None else self._convert(found),
            self.entry_timeout,
            self.attribute_timeout,
        )

    def forget(self, ino: int, lookups: int) -> None:
        """Nothing to do: every inode stays answerable for the mount's life."""

    def readlink(self, ino: int) -> bytes:
        if not self._getattr(ino).is_symlink:
            raise FuseError(errno.EINVAL)
        try:
            return self.filesystem.readlink(ino)
        except RafsError as error:
            log.warning("readlink of inode %d: %s", ino, error)
            raise FuseError(errno.EIO) from None

    # -- directories --

    def opendir(self, ino: int, flags: int) -> Opened:
        if not self._getattr(ino).is_directory:
            raise FuseError(errno.ENOTDIR)
        return Opened(0, fuse_kernel.OPEN_KEEP_CACHE | fuse_kernel.OPEN_CACHE_DIR)

    def releasedir(self, ino: int, handle: int) -> None:
        """Directory handles hold nothing."""

    def readdir(self, ino: int, offset: int) -> Iterator[DirectoryItem]:
        """"." and ".." then the entries in on-disk order; item i's offset is i + 1, so a
        listing continued at any offset the kernel kept goes on exactly after it. Items are
        made as the reply takes them, so listing a huge directory page by page stays linear."""
        if not self._getattr(ino).is_directory:
            raise FuseError(errno.ENOTDIR)
        if offset < 0:
            raise FuseError(errno.EINVAL)
        try:
            entries = self.filesystem.readdir(ino)
            parent = self.filesystem.parent(ino)
        except RafsError as error:
            log.warning("readdir of inode %d: %s", ino, error)
            raise FuseError(errno.EIO) from None
        return _directory_items(ino, parent, entries, offset)

    # -- files --

    def open(self, ino: int, flags: int) -> Opened:
        attributes = self._getattr(ino)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise FuseError(errno.EROFS)
        if attributes.is_directory:
            raise FuseError(errno.EISDIR)
        if not attributes.is_regular:
            raise FuseError(errno.EINVAL)
        handle = next(self._handles)
        self.open_files[handle] = ino
        return Opened(handle, fuse_kernel.OPEN_KEEP_CACHE)

    def release(self, ino: int, handle: int) -> None:
        self.open_files.pop(handle, None)

    async def read(self, ino: int, handle: int, offset: int, size: int) -> bytes:
        if not self._getattr(ino).is_regular:
            raise FuseError(errno.EINVAL)
        try:
            return await self.reader.read(ino, offset, size)
        except (D7yError, OSError, ValueError) as error:
            log.warning("read of inode %d at %d (+%d): %s", ino, offset, size, error)
            raise FuseError(errno.EIO) from None

    # -- extended attributes --

    def _xattrs(self, ino: int) -> dict[bytes, bytes]:
        self._getattr(ino)
        try:
            return self.filesystem.xattrs(ino)
        except RafsError as error:
            log.warning("extended attributes of inode %d: %s", ino, error)
            raise FuseError(errno.EIO) from None

    def getxattr(self, ino: int, name: bytes) -> bytes:
        value = self._xattrs(ino).get(name)
        if value is None:
            raise FuseError(errno.ENODATA)
        return value

    def listxattr(self, ino: int) -> Sequence[bytes]:
        return list(self._xattrs(ino))

    # -- the whole filesystem --

    def statfs(self, ino: int) -> FilesystemStatistics:
        data_bytes = sum(blob.uncompressed_size for blob in self.filesystem.blobs)
        return FilesystemStatistics(
            blocks=(data_bytes + BLOCK_SIZE - 1) // BLOCK_SIZE,
            free_blocks=0,
            available_blocks=0,
            files=self.filesystem.inode_count,
            free_files=0,
            block_size=BLOCK_SIZE,
            name_length=MAX_NAME_LENGTH,
            fragment_size=BLOCK_SIZE,
        )


def _directory_items(
    ino: int, parent: int, entries: Sequence[DirectoryEntry], offset: int
) -> Iterator[DirectoryItem]:
    if offset == 0:
        yield DirectoryItem(b".", ino, stat.S_IFDIR, 1)
    if offset <= 1:
        yield DirectoryItem(b"..", parent, stat.S_IFDIR, 2)
    for index in range(max(0, offset - 2), len(entries)):
        entry = entries[index]
        yield DirectoryItem(entry.name, entry.ino, entry.file_type, index + 3)


# -- prefetch -----------------------------------------------------------------------------------


class TokenBucket:
    """A bandwidth cap: `take(n)` returns once n bytes fit in `rate` bytes per second, with
    bursts up to `burst` bytes."""

    def __init__(
        self,
        rate: float,
        burst: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("a token bucket needs a positive rate and burst")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._sleep = sleep
        self._tokens = burst
        self._updated = clock()

    async def take(self, amount: int) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now
        # Going into debt lets a request bigger than the burst through, at the average rate.
        self._tokens -= amount
        if self._tokens < 0:
            await self._sleep(-self._tokens / self.rate)


def merge_ranges(ranges: Sequence[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """(blob index, offset, length) ranges sorted, with touching or overlapping ones merged."""
    merged: list[tuple[int, int, int]] = []
    for blob_index, offset, length in sorted(ranges):
        if merged:
            last_blob, last_offset, last_length = merged[-1]
            if last_blob == blob_index and offset <= last_offset + last_length:
                end = max(last_offset + last_length, offset + length)
                merged[-1] = (last_blob, last_offset, end - last_offset)
                continue
        merged.append((blob_index, offset, length))
    return merged


class Prefetcher:
    """Warms the blob source: the prefetch table's files, then optionally whole blobs."""

    def __init__(self, filesystem: Filesystem, source: BlobSource, options: MountOptions) -> None:
        self.filesystem = filesystem
        self.source = source
        self.options = options
        self.files_prefetched = 0
        self.bytes_prefetched = 0
        # Set when prefetching has ended (done, failed or cancelled).
        self.finished = asyncio.Event()

    def table_files(self) -> list[int]:
        """Regular files named by the prefetch table, directories expanded, each once."""
        filesystem = self.filesystem
        files: list[int] = []
        seen: set[int] = set()
        stack = list(reversed(filesystem.prefetch_inodes()))
        while stack and len(files) < MAX_PREFETCH_FILES:
            ino = stack.pop()
            if ino in seen:
                continue
            seen.add(ino)
            attributes = filesystem.getattr(ino)
            if attributes.is_regular:
                files.append(ino)
            elif attributes.is_directory:
                stack.extend(entry.ino for entry in reversed(filesystem.readdir(ino)))
        return files

    async def run(self) -> None:
        try:
            if self.options.prefetch_files:
                await self._prefetch_table()
            if self.options.prefetch_blobs:
                await self._prefetch_blobs()
        except asyncio.CancelledError:
            raise
        except Exception as error:
            log.warning("prefetch stopped: %s", error)
        finally:
            self.finished.set()

    def _table_ranges(self) -> tuple[int, list[tuple[int, int, int]]]:
        files = self.table_files()
        ranges = [
            (chunk.blob_index, chunk.compressed_offset, chunk.compressed_size)
            for ino in files
            for chunk in self.filesystem.chunks(ino)
        ]
        return len(files), merge_ranges(ranges)

    async def _prefetch_table(self) -> None:
        # A table naming big directories means a walk: in a thread (the filesystem's caches are
        # locked), so the loop keeps answering the kernel meanwhile.
        self.files_prefetched, ranges = await asyncio.to_thread(self._table_ranges)
        for blob_index, offset, length in ranges:
            await self.source.prefetch(self.filesystem.blobs[blob_index].blob_id, offset, length)
            self.bytes_prefetched += length

    async def _prefetch_blobs(self) -> None:
        bandwidth = self.options.prefetch_bandwidth
        bucket = TokenBucket(bandwidth, max(bandwidth, PREFETCH_STEP)) if bandwidth else None
        for blob in self.filesystem.blobs:
            size = blob.compressed_size
            if size <= 0:
                log.info("blob %s: size unknown, not prefetched whole", blob.blob_id)
                continue
            for offset in range(0, size, PREFETCH_STEP):
                length = min(PREFETCH_STEP, size - offset)
                if bucket is not None:
                    await bucket.take(length)
                await self.source.prefetch(blob.blob_id, offset, length)
                self.bytes_prefetched += length


# -- blob sources -------------------------------------------------------------------------------


class DirectoryBlobSource:
    """Blobs as files in one directory, each named by its blob id (`--blob-dir`); `files`
    names blobs kept elsewhere (blob id -> path), e.g. the blob a bootstrap was inlined in."""

    def __init__(
        self, directory: str | os.PathLike[str],
        files: Mapping[str, str | os.PathLike[str]] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.paths = {blob_id: Path(path) for blob_id, path in (files or {}).items()}
        self._files: dict[str, int] = {}

    def _fd(self, blob_id: str) -> int:
        fd = self._files.get(blob_id)
        if fd is None:
            path = self.paths.get(blob_id)
            if path is None:
                if not blob_id or "/" in blob_id or blob_id in (".", ".."):
                    raise RafsError(f"invalid blob id {blob_id!r}")
                path = self.directory / blob_id
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            self._files[blob_id] = fd
        return fd

    async def read(self, blob_id: str, offset: int, length: int) -> bytes:
        fd = self._fd(blob_id)
        data = await asyncio.to_thread(os.pread, fd, length, offset)
        if len(data) != length:
            raise RafsError(
                f"blob {blob_id}: {length} bytes at {offset} asked, the file holds {len(data)}"
            )
        return data

    async def prefetch(self, blob_id: str, offset: int, length: int) -> None:
        os.posix_fadvise(self._fd(blob_id), offset, length, os.POSIX_FADV_WILLNEED)

    async def close(self) -> None:
        files, self._files = self._files, {}
        for fd in files.values():
            os.close(fd)

    async def __aenter__(self) -> DirectoryBlobSource:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()


class TaskBlobSource:
    """Blobs through the `TaskManager`: the task of a blob is its digest, its pieces are stored
    (and pinned) in the piece store, and only the pieces a read needs are fetched.

    `sources(blob_id)` gives the `PieceSource` a missing piece comes from (a registry blob, peers).
    One handle per blob stays open while the source is open, so the blob is never evicted under
    a mount; a handle whose download failed is replaced on the next read.
    """

    def __init__(
        self,
        tasks: TaskManager,
        sources: Callable[[str], PieceSource],
        *,
        content_lengths: Mapping[str, int] | None = None,
    ) -> None:
        self.tasks = tasks
        self.sources = sources
        self.content_lengths = dict(content_lengths or {})
        self._handles: dict[
            str, tuple[AbstractAsyncContextManager[TaskHandle], TaskHandle]
        ] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    @staticmethod
    def task_id(blob_id: str) -> str:
        if not _SHA256_HEX.fullmatch(blob_id):
            raise RafsError(f"blob id {blob_id!r} is not a sha256 hex digest")
        return f"sha256:{blob_id}"

    async def _handle(self, blob_id: str) -> TaskHandle:
        held = self._handles.get(blob_id)
        if held is not None:
            return held[1]
        lock = self._locks.setdefault(blob_id, asyncio.Lock())
        async with lock:
            held = self._handles.get(blob_id)
            if held is not None:
                return held[1]
            length = self.content_lengths.get(blob_id)
            context = self.tasks.open(
                self.task_id(blob_id),
                self.sources(blob_id),
                content_length=length if length else None,
                sha256=blob_id,
                whole=False,
            )
            handle = await context.__aenter__()
            self._handles[blob_id] = (context, handle)
            return handle

    async def _drop(self, blob_id: str, handle: TaskHandle) -> None:
        held = self._handles.get(blob_id)
        if held is not None and held[1] is handle:
            del self._handles[blob_id]
            with contextlib.suppress(Exception):
                await held[0].__aexit__(None, None, None)

    def _check_range(self, handle: TaskHandle, blob_id: str, offset: int, length: int) -> None:
        size = handle.info.content_length
        if offset < 0 or length < 0 or offset + length > size:
            raise RafsError(f"blob {blob_id}: range {offset}+{length} is outside its {size} bytes")

    async def read(self, blob_id: str, offset: int, length: int) -> bytes:
        for attempt in range(2):
            handle = await self._handle(blob_id)
            self._check_range(handle, blob_id, offset, length)
            try:
                return await handle.read(offset, length)
            except TaskFailed:
                await self._drop(blob_id, handle)
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def prefetch(self, blob_id: str, offset: int, length: int) -> None:
        handle = await self._handle(blob_id)
        self._check_range(handle, blob_id, offset, length)
        try:
            async for _segment in handle.segments(offset, length):
                pass
        except TaskFailed:
            await self._drop(blob_id, handle)
            raise

    async def close(self) -> None:
        held, self._handles = self._handles, {}
        for context, _handle in held.values():
            with contextlib.suppress(Exception):
                await context.__aexit__(None, None, None)

    async def __aenter__(self) -> TaskBlobSource:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()


# -- the mount ----------------------------------------------------------------------------------


def _map_bootstrap(path: Path) -> tuple[mmap.mmap | bytes, Filesystem]:
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        data: mmap.mmap | bytes = (
            mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        )
    return data, open_bootstrap(data, name=str(path))


class RafsMount:
    """A RAFS image mounted at `mountpoint`, served on the running loop.

    `async with RafsMount(...) as mount:` mounts (first cleaning a stale mount a dead server left
    there) and returns once the kernel has initialised the mount (it is usable); leaving
    unmounts. `await mount.serve()` waits until the mount ends
    (unmounted by anyone); `await mount.unmount()` ends it. The blob source is the caller's
    (it may serve several mounts) and is not closed here.

    Nothing on the loop's thread may touch the mount point's files while it is mounted (the
    loop answers for them): use threads, or other processes.
    """

    def __init__(
        self,
        bootstrap: str | os.PathLike[str],
        mountpoint: str | os.PathLike[str],
        blob_source: BlobSource,
        options: MountOptions | None = None,
        *,
        handover: Handover | None = None,
    ) -> None:
        self.bootstrap_path = Path(bootstrap)
        self.mountpoint = os.path.abspath(mountpoint)
        self.blob_source = blob_source
        self.options = options or MountOptions()
        # With a keeper (`fuse_handover.py`): a connection a killed process left there is
        # served again instead of mounting anew, and each new one is deposited with the keeper.
        self.handover = handover
        # Whether this mount took over a live connection (running users kept their files).
        self.adopted = False
        self._bootstrap: mmap.mmap | bytes | None = None
        self._filesystem: Filesystem | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._reader: ChunkReader | None = None
        self._session: FuseSession | None = None
        self._serving: asyncio.Task[None] | None = None
        self._prefetch: asyncio.Task[None] | None = None
        self._mounted = False
        self.prefetcher: Prefetcher | None = None

    @property
    def filesystem(self) -> Filesystem:
        if self._filesystem is None:
            raise RuntimeError("the mount is not open")
        return self._filesystem

    @property
    def reader(self) -> ChunkReader:
        if self._reader is None:
            raise RuntimeError("the mount is not open")
        return self._reader

    async def __aenter__(self) -> RafsMount:
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def _start(self) -> None:
        self._bootstrap, filesystem = await asyncio.to_thread(_map_bootstrap, self.bootstrap_path)
        self._filesystem = filesystem
        options = self.options
        self._executor = ThreadPoolExecutor(options.decode_threads, thread_name_prefix="d7y-rafs")
        self._reader = ChunkReader(
            filesystem, self.blob_source, cache_bytes=options.chunk_cache_bytes,
            read_ahead_bytes=options.read_ahead_bytes, executor=self._executor,
        )
        operations = RafsOperations(filesystem, self._reader, entry_timeout=options.entry_timeout)
        request = MountRequest(
            self.mountpoint, source=options.source_name, allow_other=options.allow_other
        )
        if self.handover is not None and await self._adopt(operations):
            self._start_prefetch(filesystem)
            log.info("took over the mount of %s at %s", self.bootstrap_path, self.mountpoint)
            return
        if self.handover is not None:
            cleaned = await self.handover.clean(self.mountpoint)
        else:
            cleaned = await fuse_kernel.clean_stale_mount(self.mountpoint)
        if cleaned:
            log.warning("%s: cleaned a mount left by a server that is gone", self.mountpoint)
        fd = await asyncio.to_thread(fuse_kernel.mount, request)
        self._mounted = True
        self._session = FuseSession(fd, operations, name=f"mount {self.mountpoint}")
        self._serving = asyncio.create_task(self._session.serve(), name=f"fuse {self.mountpoint}")
        initialized = asyncio.create_task(self._session.initialized.wait())
        done, _pending = await asyncio.wait(
            {initialized, self._serving}, timeout=INIT_TIMEOUT,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if initialized not in done:
            initialized.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await initialized
            raise RafsError(f"{self.mountpoint}: the kernel did not initialise the FUSE mount")
        if self.handover is not None:
            try:
                await self.handover.deposit(self.mountpoint, fd, self._session.protocol_minor)
            except D7yError as error:
                log.warning("%s: the mount will not outlive this process: %s", self.mountpoint,
                            error)
        self._start_prefetch(filesystem)
        log.info("mounted %s at %s", self.bootstrap_path, self.mountpoint)

    def _start_prefetch(self, filesystem: Filesystem) -> None:
        options = self.options
        if options.prefetch_files or options.prefetch_blobs:
            self.prefetcher = Prefetcher(filesystem, self.blob_source, options)
            self._prefetch = asyncio.create_task(self.prefetcher.run(), name="rafs prefetch")

    async def _adopt(self, operations: RafsOperations) -> bool:
        """Serve the connection the keeper holds for this mount point, if any and if it is still
        mounted there; True when this mount now serves it."""
        assert self.handover is not None
        held = await self.handover.withdraw(self.mountpoint)
        if held is None:
            return False
        session = FuseSession(held.fd, operations, name=f"mount {self.mountpoint}")
        session.adopt(held.protocol_minor)
        serving = asyncio.create_task(session.serve(), name=f"fuse {self.mountpoint}")
        # Served now, so looking at the mount point cannot wait for an absent server.
        if not await asyncio.to_thread(fuse_kernel.is_mount_point, self.mountpoint):
            session.close()
            with contextlib.suppress(Exception):
                await serving
            await self.handover.release(self.mountpoint)
            return False
        self._session, self._serving = session, serving
        self._mounted = True
        self.adopted = True
        return True

    async def serve(self) -> None:
        """Wait until the mount ends (unmounted here or from outside)."""
        if self._serving is not None:
            await asyncio.shield(self._serving)

    async def unmount(self) -> None:
        """Unmount and stop serving. Open files elsewhere keep the mount busy for at most
        `UNMOUNT_GRACE` seconds; then the connection is aborted."""
        if self._mounted:
            self._mounted = False
            if self.handover is not None:
                # Else the keeper's copy would keep the connection (and its waiters) alive.
                await self.handover.release(self.mountpoint)
            try:
                await asyncio.to_thread(fuse_kernel.unmount, self.mountpoint)
            except OSError as error:
                # EINVAL: unmounted meanwhile (from outside), which is fine.
                if error.errno != errno.EINVAL:
                    log.warning("unmounting %s: %s", self.mountpoint, error)
        serving = self._serving
        if serving is not None and not serving.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(serving), fuse_kernel.UNMOUNT_GRACE)
            if not serving.done() and self._session is not None:
                self._session.close()
            with contextlib.suppress(Exception):
                await serving

    async def close(self) -> None:
        if self._prefetch is not None:
            self._prefetch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prefetch
            self._prefetch = None
        await self.unmount()
        if self._reader is not None:
            await self._reader.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        if isinstance(self._bootstrap, mmap.mmap):
            with contextlib.suppress(BufferError):
                self._bootstrap.close()
        self._bootstrap = None


clean_stale_mount = fuse_kernel.clean_stale_mount

__all__ = [
    "ROOT_INO",
    "BlobSource",
    "ChunkCache",
    "ChunkReader",
    "DirectoryBlobSource",
    "MountOptions",
    "Prefetcher",
    "RafsMount",
    "RafsOperations",
    "TaskBlobSource",
    "TokenBucket",
    "clean_stale_mount",
]
