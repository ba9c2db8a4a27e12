"""The format-independent view of a RAFS image that the FUSE mount and the converter use.

Owns the model (`Attributes`, `DirectoryEntry`, `Chunk`, `ChunkRead`, `BlobInfo`) and the
`Filesystem` base class with the questions a read-only filesystem asks: `getattr`, `lookup`,
`readdir`, `readlink`, `xattrs`, and for a read of `(ino, offset, length)` the chunk slices that
cover it (`read_plan`). `v5.py` and `v6.py` answer them from their on-disk layouts; nothing here
parses bytes. Does not fetch blob bytes: reading a chunk means asking for
`[chunk.compressed_offset, +compressed_size)` of blob `chunk.blob_index`, then `decode_chunk`.

Inode numbers are the model's own, stable for one image: the root is always 1 (the FUSE root id),
hard links share one number, and every other number is >= 2.
"""

from __future__ import annotations

import abc
import bisect
import stat
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from d7y_node.errors import RafsError
from d7y_node.rafs.chunks import Compressor, Digester, decode_chunk

ROOT_INO = 1

# Parsed directories and chunk lists are kept for the inodes used most recently: enough for the
# hot part of a large image (100k inodes) without holding all of it as Python objects.
DIRECTORY_CACHE_ENTRIES = 4096
CHUNK_LIST_CACHE_ENTRIES = 4096

# Linux NAME_MAX; EROFS_NAME_LEN and RAFS_MAX_NAME agree.
MAX_NAME_LENGTH = 255
# Linux PATH_MAX bounds a symlink target.
MAX_SYMLINK_LENGTH = 4096


class FileType:
    """The `S_IFMT` values a RAFS inode may carry, with their names."""

    REGULAR = stat.S_IFREG
    DIRECTORY = stat.S_IFDIR
    SYMLINK = stat.S_IFLNK
    CHARACTER_DEVICE = stat.S_IFCHR
    BLOCK_DEVICE = stat.S_IFBLK
    FIFO = stat.S_IFIFO
    SOCKET = stat.S_IFSOCK

    ALL = frozenset({REGULAR, DIRECTORY, SYMLINK, CHARACTER_DEVICE, BLOCK_DEVICE, FIFO, SOCKET})


class FileModeQueries:
    """File type questions answered from a `mode` (st_mode) attribute."""

    __slots__ = ()
    mode: int

    @property
    def file_type(self) -> int:
        return stat.S_IFMT(self.mode)

    @property
    def is_directory(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_regular(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)


@dataclass(frozen=True, slots=True)
class Attributes(FileModeQueries):
    """What `stat` shows for one inode."""

    ino: int
    mode: int  # file type and permission bits, as st_mode
    uid: int
    gid: int
    nlink: int
    size: int
    rdev: int  # device number (Linux encoding, as st_rdev) for device nodes, else 0
    mtime: int  # seconds since the epoch
    mtime_nanoseconds: int


@dataclass(frozen=True, slots=True)
class DirectoryEntry:
    """One name in a directory ("." and ".." are not listed)."""

    name: bytes
    ino: int
    file_type: int  # an S_IFMT value from FileType


@dataclass(frozen=True, slots=True)
class Chunk:
    """Where one piece of a regular file's content lives and how to check it."""

    blob_index: int  # into Filesystem.blobs
    chunk_index: int  # the chunk's index in its blob's chunk table (blob.meta)
    file_offset: int  # where the chunk's uncompressed bytes start in the file
    compressed_offset: int  # byte range in the data blob as stored
    compressed_size: int
    uncompressed_offset: int  # position in the blob's uncompressed address space
    uncompressed_size: int
    compressed: bool  # false: stored as it is (compression did not help)
    digest: bytes | None  # over the uncompressed bytes; None only when the image has none


@dataclass(frozen=True, slots=True)
class ChunkRead:
    """One slice of a read: `length` bytes at `offset` inside `chunk`'s uncompressed bytes.

    `chunk` None is a hole: `length` zero bytes.
    """

    file_offset: int
    chunk: Chunk | None
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """One data blob the image's chunks live in."""

    index: int
    blob_id: str  # the name the blob is stored under (a sha256 hex digest in practice)
    compressor: Compressor
    digester: Digester
    chunk_size: int
    chunk_count: int
    compressed_size: int
    uncompressed_size: int
    features: int  # BlobFeatures bits (blob.py names them)
    # Where the chunk info table (blob.meta) is in the blob: 0/0 when it is not known.
    meta_compressor: Compressor
    meta_offset: int
    meta_compressed_size: int
    meta_uncompressed_size: int
    # The ToC at the blob's end (size including its tar header, sha256 of those bytes);
    # 0 / all-zero when unknown.
    toc_size: int
    toc_digest: bytes


K = TypeVar("K")
V = TypeVar("V")


class LruCache(Generic[K, V]):
    """A bounded mapping that forgets the least recently used entry.

    Locked, so a filesystem may be asked from the event loop and from worker threads at once.
    """

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self._capacity:
                self._entries.popitem(last=False)


# A directory's entries in order, and its names mapped to inode numbers for lookup.
_ParsedDirectory = tuple[tuple[DirectoryEntry, ...], dict[bytes, int]]


class Filesystem(abc.ABC):
    """A read-only RAFS filesystem: answers by inode number, parses lazily.

    Subclasses fill `_attributes`, `_directory`, `_parent`, `readlink`, `xattrs` and
    `_chunk_list`; this class adds caching, lookup, read planning and a cycle-safe walk.
    """

    version: int
    chunk_size: int
    blobs: tuple[BlobInfo, ...]
    # False on images built without explicit uid/gid: nydusd then shows its own euid/egid.
    explicit_uid_gid: bool
    inode_count: int

    def __init__(self) -> None:
        self._directories: LruCache[int, _ParsedDirectory] = LruCache(DIRECTORY_CACHE_ENTRIES)
        self._chunk_lists: LruCache[int, tuple[Chunk, ...]] = LruCache(CHUNK_LIST_CACHE_ENTRIES)

    # -- what each format provides --

    @abc.abstractmethod
    def _attributes(self, ino: int) -> Attributes: ...

    @abc.abstractmethod
    def _directory(self, ino: int) -> list[DirectoryEntry]:
        """The entries of directory `ino` in on-disk order, without "." and ".."."""

    @abc.abstractmethod
    def _parent(self, ino: int) -> int: ...

    @abc.abstractmethod
    def readlink(self, ino: int) -> bytes:
        """The target of symlink `ino`."""

    @abc.abstractmethod
    def xattrs(self, ino: int) -> dict[bytes, bytes]:
        """The extended attributes of `ino`, full names (b"user.x") to values."""

    @abc.abstractmethod
    def _chunk_list(self, ino: int) -> list[Chunk]:
        """The chunks of regular file `ino` ordered by file offset (holes left out)."""

    @abc.abstractmethod
    def prefetch_inodes(self) -> tuple[int, ...]:
        """Inode numbers the image asks to be fetched first (its prefetch table)."""

    # -- the questions --

    def getattr(self, ino: int) -> Attributes:
        return self._attributes(ino)

    def readdir(self, ino: int) -> tuple[DirectoryEntry, ...]:
        return self._cached_directory(ino)[0]

    def lookup(self, parent: int, name: bytes) -> Attributes | None:
        """The attributes of `name` in directory `parent`, or None if there is no such name."""
        if name == b".":
            return self.getattr(parent)
        if name == b"..":
            return self.getattr(self.parent(parent))
        ino = self._cached_directory(parent)[1].get(name)
        return None if ino is None else self.getattr(ino)

    def parent(self, ino: int) -> int:
        """The directory holding directory `ino` (the root is its own parent)."""
        if not self.getattr(ino).is_directory:
            raise RafsError(f"inode {ino} is not a directory")
        return ROOT_INO if ino == ROOT_INO else self._parent(ino)

    def chunks(self, ino: int) -> tuple[Chunk, ...]:
        """All chunks of regular file `ino`, ordered by file offset."""
        cached = self._chunk_lists.get(ino)
        if cached is None:
            attributes = self.getattr(ino)
            if not attributes.is_regular:
                raise RafsError(f"inode {ino} is not a regular file")
            cached = tuple(self._chunk_list(ino))
            _check_chunk_layout(ino, cached, attributes.size)
            self._chunk_lists.put(ino, cached)
        return cached

    def read_plan(self, ino: int, offset: int, length: int) -> list[ChunkRead]:
        """The slices that make up `length` bytes of file `ino` from `offset` (short at EOF)."""
        if offset < 0 or length < 0:
            raise RafsError(f"invalid read of {length} bytes at {offset}")
        size = self.getattr(ino).size
        end = min(size, offset + length)
        plan: list[ChunkRead] = []
        position = offset
        for chunk in self._chunks_between(ino, offset, end):
            chunk_end = chunk.file_offset + chunk.uncompressed_size
            if chunk_end <= position:
                continue
            if chunk.file_offset >= end:
                break
            if chunk.file_offset > position:
                plan.append(ChunkRead(position, None, 0, chunk.file_offset - position))
                position = chunk.file_offset
            stop = min(chunk_end, end)
            plan.append(ChunkRead(position, chunk, position - chunk.file_offset, stop - position))
            position = stop
        if position < end:
            plan.append(ChunkRead(position, None, 0, end - position))
        return plan

    def decode_chunk(self, chunk: Chunk, stored: bytes) -> bytes:
        """The verified uncompressed bytes of `chunk` from its stored bytes."""
        blob = self.blobs[chunk.blob_index]
        return decode_chunk(
            stored,
            compressed=chunk.compressed,
            compressor=blob.compressor,
            digester=blob.digester,
            uncompressed_size=chunk.uncompressed_size,
            expected_digest=chunk.digest,
        )

    def walk(self) -> Iterator[tuple[bytes, Attributes]]:
        """Every path ("/" first) with its attributes, depth first in directory order.

        Raises `RafsError` when a directory is reachable twice (a cycle or a directory hard
        link), so a hostile image cannot make it loop. Directories are recognised by their
        inode's mode, not by what the directory entry claims.
        """
        seen_directories: set[int] = set()
        stack: list[tuple[bytes, int]] = [(b"/", ROOT_INO)]
        while stack:
            path, ino = stack.pop()
            attributes = self.getattr(ino)
            if attributes.is_directory:
                if ino in seen_directories:
                    raise RafsError(
                        f"directory inode {ino} is reachable twice (again at {path!r}): "
                        "a cycle or a directory hard link"
                    )
                seen_directories.add(ino)
            yield path, attributes
            if not attributes.is_directory:
                continue
            prefix = path if path.endswith(b"/") else path + b"/"
            children = [(prefix + entry.name, entry.ino) for entry in self.readdir(ino)]
            stack.extend(reversed(children))

    # -- helpers --

    def _chunks_between(self, ino: int, start: int, end: int) -> Sequence[Chunk]:
        """Chunks that may overlap `[start, end)`; formats with fixed-size chunks override this
        to avoid building the whole list."""
        chunks = self.chunks(ino)
        first = max(0, bisect.bisect_right([c.file_offset for c in chunks], start) - 1)
        return chunks[first:]

    def _cached_directory(self, ino: int) -> _ParsedDirectory:
        cached = self._directories.get(ino)
        if cached is None:
            if not self.getattr(ino).is_directory:
                raise RafsError(f"inode {ino} is not a directory")
            entries = tuple(self._directory(ino))
            by_name: dict[bytes, int] = {}
            for entry in entries:
                _check_name(entry.name, ino)
                if entry.name in by_name:
                    raise RafsError(f"directory {ino} lists {entry.name!r} twice")
                by_name[entry.name] = entry.ino
            cached = (entries, by_name)
            self._directories.put(ino, cached)
        return cached


def is_valid_name(name: bytes) -> bool:
    """Whether `name` may be a directory entry: 1..255 bytes, no "/" or NUL, not "." or ".."."""
    return (
        0 < len(name) <= MAX_NAME_LENGTH
        and b"/" not in name
        and b"\0" not in name
        and name not in (b".", b"..")
    )


def _check_name(name: bytes, directory: int) -> None:
    if not is_valid_name(name):
        raise RafsError(f"directory {directory} holds an invalid name {name[:300]!r}")


def _check_chunk_layout(ino: int, chunks: Sequence[Chunk], size: int) -> None:
    previous_end = 0
    for chunk in chunks:
        if chunk.file_offset < previous_end:
            raise RafsError(f"inode {ino}: chunks overlap or are out of order")
        previous_end = chunk.file_offset + chunk.uncompressed_size
        if previous_end > size:
            raise RafsError(
                f"inode {ino}: a chunk ends at {previous_end}, past the file size {size}"
            )


def xattr_mapping(pairs: Sequence[tuple[bytes, bytes]], ino: int) -> dict[bytes, bytes]:
    """Pairs as a mapping, rejecting duplicate or empty names."""
    result: dict[bytes, bytes] = {}
    for name, value in pairs:
        if not name or name in result:
            raise RafsError(f"inode {ino}: extended attribute {name!r} is empty or repeated")
        result[name] = value
    return result


__all__ = [
    "ROOT_INO",
    "Attributes",
    "BlobInfo",
    "Chunk",
    "ChunkRead",
    "DirectoryEntry",
    "FileType",
    "Filesystem",
]
