"""Nydus RAFS images: the bootstrap (filesystem metadata, v5 and v6) and the data blobs.

Owns the format, bytes in and bytes out; fetching blobs, mounting and converting live elsewhere
(`fuse_mount.py`, `convert.py`). Start with `open_bootstrap`, which gives a `Filesystem`
(`tree.py`) to ask for attributes, directories and the chunks behind a read; `blob.py` reads a
data blob's own metadata (ToC, chunk info table, digests, an inlined bootstrap) and
`Filesystem.decode_chunk` turns a chunk's stored bytes into verified file content.

Reading is lazy and indexed: opening parses the superblocks and the blob, device and prefetch
tables only. Inodes are addressed directly (v6: nid * 32 into the metadata area; v5: the inode
table), decoded when asked for and kept in bounded LRU caches, as are parsed directories; v6's
chunk table becomes a (blob, chunk index) -> record map on the first chunk lookup. A bootstrap
may be an mmap, so a 100k-inode image costs memory only for what is used.

Modules: `bounded` (checked reads), `chunks` (decompress, verify), `erofs` (EROFS structures),
`v6` and `v5` (the two bootstrap formats), `blob` (data blob trailers), `tree` (the model),
`inlined` (a bootstrap carried inside a data blob, and which blob table entry that blob is).
Writing: `builder` (the input tree) and `writer` (`write_image`: RAFS v6 bootstrap and blobs).
"""

from __future__ import annotations

from d7y_node.errors import RafsError
from d7y_node.rafs.blob import (
    BlobLayout,
    BlobMeta,
    BytesReader,
    FileReader,
    RangeReader,
    read_blob_layout,
)
from d7y_node.rafs.bounded import Buffer
from d7y_node.rafs.chunks import Compressor, Digester
from d7y_node.rafs.tree import (
    ROOT_INO,
    Attributes,
    BlobInfo,
    Chunk,
    ChunkRead,
    DirectoryEntry,
    Filesystem,
    FileType,
)
from d7y_node.rafs.v5 import RafsV5Filesystem, is_rafs_v5
from d7y_node.rafs.v6 import RafsV6Filesystem, is_rafs_v6


def open_bootstrap(data: Buffer, *, name: str = "bootstrap") -> Filesystem:
    """The filesystem a RAFS v5 or v6 bootstrap describes (`data` may be bytes or an mmap).

    Parses only the superblocks and tables up front; inodes and directories are decoded when
    first asked for. Raises `RafsError` for anything that is not a valid bootstrap.
    """
    if is_rafs_v6(data):
        return RafsV6Filesystem(data, name=name)
    if is_rafs_v5(data):
        return RafsV5Filesystem(data, name=name)
    raise RafsError(f"{name} is neither a RAFS v5 nor a RAFS v6 bootstrap")


__all__ = [
    "ROOT_INO",
    "Attributes",
    "BlobInfo",
    "BlobLayout",
    "BlobMeta",
    "BytesReader",
    "Chunk",
    "ChunkRead",
    "Compressor",
    "Digester",
    "DirectoryEntry",
    "FileReader",
    "FileType",
    "Filesystem",
    "RafsError",
    "RafsV5Filesystem",
    "RafsV6Filesystem",
    "RangeReader",
    "open_bootstrap",
    "read_blob_layout",
]
