"""A RAFS image whose bootstrap travels inside one of its data blobs.

`nydus-image create --blob-inline-meta` appends the bootstrap to the data blob as a ToC section
named `image.boot` (see `blob.py` for the blob's layout):

    chunk data | hdr | blob.meta | hdr | blob.meta.header | hdr | image.boot | hdr | ToC | hdr

The bootstrap names its blobs by id, and the blob carrying it is listed under the id it had
before the bootstrap was appended: the sha256 of every byte in front of the `image.boot` section
(the bootstrap cannot hold the digest of a file that contains it). So the file's own name (the
sha256 of the whole file, as a registry stores it) is not the id the bootstrap looks for.

Owns finding such a bootstrap (via the ToC at the blob's end), checking it, and telling which
entry of its blob table is the blob that carries it: the one entry whose chunk data size, chunk
count and chunk-table offset are those of the carrier's own ToC and `blob.meta` header; when more
than one entry fits, the one whose id is the sha256 of the carrier's prefix. Every chunk is still
checked against its digest when read, so a wrong guess could not serve wrong bytes.

Does not write anything or know where the blobs of a mount come from (`mounts.py`, `fuse_mount.py`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from d7y_node.errors import RafsError
from d7y_node.rafs.blob import (
    TOC_ENTRY_BLOB_DATA,
    TOC_ENTRY_BOOTSTRAP,
    TOC_ENTRY_META,
    BlobLayout,
    RangeReader,
    read_blob_layout,
)
from d7y_node.rafs.tree import BlobInfo, Filesystem
from d7y_node.rafs.v5 import RafsV5Filesystem, is_rafs_v5
from d7y_node.rafs.v6 import RafsV6Filesystem, is_rafs_v6

# Enough of a file's head to tell a bootstrap by its magic (the EROFS superblock is at 1024).
BOOTSTRAP_PROBE_BYTES = 2048
# The carrier's prefix is hashed in pieces of this size (never held whole in memory).
HASH_BLOCK_BYTES = 4 << 20


@dataclass(frozen=True)
class InlinedBootstrap:
    """A bootstrap found in a data blob, parsed, and the blob table entry of that blob."""

    bootstrap: bytes
    filesystem: Filesystem
    # The id the bootstrap's blob table gives the blob that carries it.
    blob_id: str


def is_bootstrap(reader: RangeReader) -> bool:
    """Whether the bytes start as a RAFS v5 or v6 bootstrap (by their magic numbers only)."""
    head = reader.read(0, min(reader.size, BOOTSTRAP_PROBE_BYTES))
    return is_rafs_v6(head) or is_rafs_v5(head)


def read_inlined_bootstrap(
    reader: RangeReader, *, name: str = "blob"
) -> InlinedBootstrap | None:
    """The bootstrap inlined in the blob `reader` reads, with the id of the blob itself; None
    when the blob ends in no ToC or its ToC lists no `image.boot`. `RafsError` when there is
    one but it (or the ToC, or the blob's chunk table) is malformed, or the bootstrap does not
    list the blob that carries it."""
    layout = read_blob_layout(reader)
    if layout.bootstrap is None:
        return None
    bootstrap = layout.bootstrap
    where = f"{name}: the inlined bootstrap"
    if is_rafs_v6(bootstrap):
        filesystem: Filesystem = RafsV6Filesystem(bootstrap, name=where)
    elif is_rafs_v5(bootstrap):
        filesystem = RafsV5Filesystem(bootstrap, name=where)
    else:
        raise RafsError(f"{where} is neither a RAFS v5 nor a RAFS v6 bootstrap")
    carrier = _carrier(filesystem, reader, layout, name)
    return InlinedBootstrap(bootstrap, filesystem, carrier.blob_id)


def _carrier(
    filesystem: Filesystem, reader: RangeReader, layout: BlobLayout, name: str
) -> BlobInfo:
    assert layout.toc is not None
    data = layout.toc.entry(TOC_ENTRY_BLOB_DATA)
    meta = layout.toc.entry(TOC_ENTRY_META)
    boot = layout.toc.entry(TOC_ENTRY_BOOTSTRAP)
    assert boot is not None

    def fits(blob: BlobInfo) -> bool:
        if data is not None and blob.compressed_size != data.compressed_size:
            return False
        if layout.meta is not None and blob.chunk_count != layout.meta.chunk_count:
            return False
        return not (
            meta is not None and blob.meta_compressed_size
            and blob.meta_offset != meta.compressed_offset
        )

    candidates = [blob for blob in filesystem.blobs if fits(blob)]
    if len(candidates) == 1:
        return candidates[0]
    prefix_id = _prefix_sha256(reader, boot.compressed_offset)
    for blob in candidates or filesystem.blobs:
        if blob.blob_id == prefix_id:
            return blob
    raise RafsError(
        f"{name}: its inlined bootstrap does not list the blob that carries it "
        f"(no blob table entry is {prefix_id})"
    )


def _prefix_sha256(reader: RangeReader, length: int) -> str:
    hasher = hashlib.sha256()
    offset = 0
    while offset < length:
        step = min(HASH_BLOCK_BYTES, length - offset)
        hasher.update(reader.read(offset, step))
        offset += step
    return hasher.hexdigest()


__all__ = ["InlinedBootstrap", "is_bootstrap", "read_inlined_bootstrap"]
