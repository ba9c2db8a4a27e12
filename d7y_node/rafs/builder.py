"""The input of the RAFS writer: a merged filesystem tree, as the converter leaves it after applying
every OCI layer (whiteouts and opaque directories already resolved).

Owns the model only: `Inode` (one file of any type, with its attributes, and for a directory its
named children), `Content` (where a regular file's bytes come from: bytes, a range of a local file,
or any callable that opens a stream), and `Tree` (path operations on a root directory). The same
`Inode` object under two names is a hard link; directories may not be hard-linked. Each regular
file names the layer whose data blob its chunks go to. Does not validate against the on-disk
limits (the writer does, with the format's constants) and writes nothing (`writer.py`).
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from d7y_node.errors import RafsError
from d7y_node.rafs.tree import FileModeQueries


@dataclass(frozen=True, slots=True)
class Content:
    """The bytes of a regular file: `size` bytes read from the stream `open()` returns."""

    size: int
    open: Callable[[], BinaryIO]

    @classmethod
    def from_bytes(cls, data: bytes) -> Content:
        return cls(len(data), lambda: io.BytesIO(data))

    @classmethod
    def from_path(
        cls, path: str | os.PathLike[str], *, offset: int = 0, size: int | None = None
    ) -> Content:
        """`size` bytes of the local file `path` from `offset` (to its end when `size` is None),
        e.g. one member of an uncompressed layer tar."""
        if size is None:
            size = os.stat(path).st_size - offset
        if offset < 0 or size < 0:
            raise RafsError(f"invalid range {offset}+{size} of {os.fspath(path)!r}")

        length = size
        return cls(size, lambda: io.BufferedReader(_FileRange(path, offset, length)))


class _FileRange(io.RawIOBase):
    """A read-only stream over `length` bytes of a file from `offset`: it ends where the range
    does (or sooner, when the file is shorter, which the writer reports)."""

    def __init__(self, path: str | os.PathLike[str], offset: int, length: int) -> None:
        super().__init__()
        self._file = open(path, "rb", buffering=0)  # noqa: SIM115 (closed with this stream)
        self._file.seek(offset)
        self._remaining = length

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer)[: self._remaining]
        count = self._file.readinto(view) or 0
        self._remaining -= count
        return count

    def close(self) -> None:
        self._file.close()
        super().close()


EMPTY = Content.from_bytes(b"")


@dataclass(eq=False)
class Inode(FileModeQueries):
    """One file of the tree. Identity matters: the same object under two names is a hard link.

    `mode` holds the file type and permission bits as `st_mode` does; `rdev` the device number of
    a device node as `st_rdev` encodes it; `target` a symlink's target; `content` a regular
    file's bytes and `layer` the index of the layer (data blob) its chunks are stored in;
    `children` a directory's entries by name.
    """

    mode: int
    uid: int = 0
    gid: int = 0
    mtime: int = 0  # seconds since the epoch
    mtime_nanoseconds: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    rdev: int = 0
    target: bytes = b""
    content: Content = EMPTY
    layer: int = 0
    children: dict[bytes, Inode] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """What `stat` shows as the size (directories get theirs from the writer's layout)."""
        if self.is_regular:
            return self.content.size
        if self.is_symlink:
            return len(self.target)
        return 0


def directory(
    children: dict[bytes, Inode] | None = None, *, mode: int = 0o755, **attributes: object
) -> Inode:
    return Inode(mode=stat.S_IFDIR | mode, children=children or {}, **attributes)  # type: ignore[arg-type]


def regular_file(
    content: bytes | Content = b"", *, mode: int = 0o644, layer: int = 0, **attributes: object
) -> Inode:
    if isinstance(content, bytes):
        content = Content.from_bytes(content)
    return Inode(mode=stat.S_IFREG | mode, content=content, layer=layer, **attributes)  # type: ignore[arg-type]


def symlink(target: bytes, **attributes: object) -> Inode:
    return Inode(mode=stat.S_IFLNK | 0o777, target=target, **attributes)  # type: ignore[arg-type]


def special_file(
    file_type: int, *, mode: int = 0o644, rdev: int = 0, **attributes: object
) -> Inode:
    """A character or block device (with `rdev`), a fifo or a socket."""
    if file_type not in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK):
        raise RafsError(f"{file_type:#o} is not a special file type")
    return Inode(mode=file_type | mode, rdev=rdev, **attributes)  # type: ignore[arg-type]


class Tree:
    """A filesystem tree addressed by absolute paths (b"/etc/passwd"); the root is a directory."""

    def __init__(self, root: Inode | None = None) -> None:
        self.root = root if root is not None else directory()
        if not self.root.is_directory:
            raise RafsError("the root of a tree must be a directory")

    def get(self, path: bytes) -> Inode | None:
        """The inode at `path` (symlinks are not followed), or None."""
        node = self.root
        for name in _components(path):
            if not node.is_directory:
                return None
            child = node.children.get(name)
            if child is None:
                return None
            node = child
        return node

    def put(
        self, path: bytes, inode: Inode, *, parent_factory: Callable[[], Inode] = directory
    ) -> None:
        """Place `inode` at `path`, replacing what was there; missing parent directories are made
        with `parent_factory` (a non-directory in the way is replaced by one)."""
        names = _components(path)
        if not names:
            if not inode.is_directory:
                raise RafsError("the root of a tree must be a directory")
            self.root = inode
            return
        self._parent(names, parent_factory).children[names[-1]] = inode

    def remove(self, path: bytes) -> Inode | None:
        """Remove the entry at `path` (and everything under it); the removed inode or None."""
        names = _components(path)
        if not names:
            raise RafsError("cannot remove the root")
        parent = self.get(b"/" + b"/".join(names[:-1]))
        if parent is None or not parent.is_directory:
            return None
        return parent.children.pop(names[-1], None)

    def walk(self) -> Iterator[tuple[bytes, Inode]]:
        """Every (path, inode), the root first, directories before their entries, names sorted."""
        stack: list[tuple[bytes, Inode]] = [(b"/", self.root)]
        while stack:
            path, node = stack.pop()
            yield path, node
            if node.is_directory:
                prefix = path if path.endswith(b"/") else path + b"/"
                for name in sorted(node.children, reverse=True):
                    stack.append((prefix + name, node.children[name]))

    def _parent(self, names: list[bytes], parent_factory: Callable[[], Inode]) -> Inode:
        node = self.root
        for name in names[:-1]:
            child = node.children.get(name)
            if child is None or not child.is_directory:
                child = parent_factory()
                node.children[name] = child
            node = child
        return node


def _components(path: bytes) -> list[bytes]:
    return [name for name in path.split(b"/") if name and name != b"."]


__all__ = [
    "Content",
    "Inode",
    "Tree",
    "directory",
    "regular_file",
    "special_file",
    "symlink",
]
