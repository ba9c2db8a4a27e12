"""Bounds-checked little-endian reads over a bootstrap or blob held in memory (or mmap).

Every offset, size and count the format parsers take from untrusted bytes goes through here, so a
lie in the metadata becomes one clear `RafsError` naming the structure, never an `IndexError`, a
short `struct` read, or a huge allocation. Does not know any RAFS structure itself.
"""

from __future__ import annotations

import mmap
import struct
from typing import Any

from d7y_node.errors import RafsError

Buffer = bytes | bytearray | memoryview | mmap.mmap


class BoundedBuffer:
    """A read-only view of `data` whose reads fail cleanly outside `[0, size)`."""

    def __init__(self, data: Buffer, name: str) -> None:
        self._data = data
        # The name goes into every error message ("bootstrap", "blob 7334a2…").
        self.name = name
        self.size = len(data)

    def check(self, offset: int, length: int, what: str) -> None:
        """Raise unless `[offset, offset + length)` lies inside the buffer."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise RafsError(
                f"{what}: bytes {offset}..{offset + length} lie outside the {self.name} "
                f"({self.size} bytes)"
            )

    def read(self, offset: int, length: int, what: str) -> bytes:
        self.check(offset, length, what)
        return bytes(self._data[offset : offset + length])

    def unpack(self, layout: struct.Struct, offset: int, what: str) -> tuple[Any, ...]:
        self.check(offset, layout.size, what)
        return layout.unpack_from(self._data, offset)

    def u32_array(self, offset: int, count: int, what: str) -> tuple[int, ...]:
        """`count` little-endian u32 values; the count is bounded by the buffer size first."""
        self.check(offset, count * 4, what)
        return struct.unpack_from(f"<{count}I", self._data, offset)

    def iter_unpack(self, layout: struct.Struct, offset: int, count: int, what: str) -> Any:
        """An iterator over `count` records of `layout` starting at `offset`."""
        self.check(offset, count * layout.size, what)
        view = memoryview(self._data)[offset : offset + count * layout.size]
        return layout.iter_unpack(view)


def checked_count(count: int, unit: int, available: int, what: str) -> int:
    """`count` if `count` records of `unit` bytes could fit in `available` bytes, else raise.

    Used before any loop or allocation driven by a count read from the image.
    """
    if count < 0 or count * unit > available:
        raise RafsError(f"{what}: count {count} cannot fit in {available} bytes")
    return count
