"""A small RAFS v6 image builder for tests: only what the reader tests need, written from the
format description (not the project's writer, which comes later), so it can make images with
features the real fixtures lack (xattrs, devices, multi-block directories, holes, 100k inodes).

`build(root)` returns (bootstrap bytes, data blob bytes, blob.meta table, blob.meta header,
chunk digests). Nodes form a tree; the same `Node` object under two names is a hard link.
"""

from __future__ import annotations

import hashlib
import stat
import struct
from dataclasses import dataclass, field

import zstandard

BLOCK = 4096
META_BLOCK = 2  # block 0: superblocks and device table; block 1: blob table
CHUNK_SIZE_BITS = 20 - 12  # 1 MiB chunks
BLOB_ID = "ab" * 32

XATTR_INDEXES = [
    (b"system.posix_acl_access", 2),
    (b"system.posix_acl_default", 3),
    (b"user.", 1),
    (b"trusted.", 4),
    (b"security.", 6),
]
DIRENT_TYPES = {
    stat.S_IFREG: 1,
    stat.S_IFDIR: 2,
    stat.S_IFCHR: 3,
    stat.S_IFBLK: 4,
    stat.S_IFIFO: 5,
    stat.S_IFSOCK: 6,
    stat.S_IFLNK: 7,
}


@dataclass(eq=False)
class Node:
    mode: int
    uid: int = 0
    gid: int = 0
    mtime: int = 1_700_000_000
    rdev: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    target: bytes = b""  # symlink
    data: bytes = b""  # regular file
    holes: frozenset[int] = frozenset()  # chunk positions written as holes
    children: dict[bytes, Node] = field(default_factory=dict)
    compact: bool = False
    inline: bool = True  # tail-pack directory / symlink data after the inode
    # filled by the builder
    nid: int = -1
    nlink: int = 0
    parent: Node | None = None


def directory(children: dict[bytes, Node] | None = None, **kwargs: object) -> Node:
    return Node(mode=stat.S_IFDIR | 0o755, children=children or {}, **kwargs)  # type: ignore[arg-type]


def regular(data: bytes, mode: int = 0o644, **kwargs: object) -> Node:
    return Node(mode=stat.S_IFREG | mode, data=data, **kwargs)  # type: ignore[arg-type]


def symlink(target: bytes, **kwargs: object) -> Node:
    return Node(mode=stat.S_IFLNK | 0o777, target=target, **kwargs)  # type: ignore[arg-type]


@dataclass
class Built:
    bootstrap: bytes
    blob: bytes
    meta_table: bytes
    meta_header: bytes
    digests: bytes


def _xattr_body(xattrs: dict[bytes, bytes]) -> bytes:
    if not xattrs:
        return b""
    body = bytearray(12)  # ibody header: name filter, shared count 0, reserved
    for name, value in xattrs.items():
        prefix, index = next((p, i) for p, i in XATTR_INDEXES if name.startswith(p))
        suffix = name[len(prefix) :]
        entry = struct.pack("<BBH", len(suffix), index, len(value)) + suffix + value
        entry += bytes(-len(entry) % 4)
        body += entry
    return bytes(body)


def _directory_blocks(entries: list[tuple[bytes, int, int]]) -> list[bytes]:
    """Pack sorted (name, nid, type) entries into EROFS directory blocks."""
    blocks: list[bytes] = []
    current: list[tuple[bytes, int, int]] = []
    used = 0

    def flush() -> None:
        head = 12 * len(current)
        dirents = bytearray()
        names = bytearray()
        for name, nid, file_type in current:
            dirents += struct.pack("<QHBx", nid, head + len(names), file_type)
            names += name
        blocks.append(bytes(dirents + names))

    for entry in entries:
        if current and used + 12 + len(entry[0]) > BLOCK:
            flush()
            current, used = [], 0
        current.append(entry)
        used += 12 + len(entry[0])
    flush()
    return blocks


def build(
    root: Node,
    *,
    chunk_table: bool = True,
    extended_all: bool = False,
    compress: bool = True,
    prefetch: tuple[Node, ...] = (),
) -> Built:
    """The bootstrap and blob for the tree under `root`.

    `compress` False stores every chunk as it is, 4 KiB aligned at its uncompressed offset, so
    the kernel's EROFS driver can mount the bootstrap with the blob as its device."""
    # Unique inodes in tree order, link counts, parents.
    order: list[Node] = []
    stack = [root]
    root.parent = root
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        node.nlink += 1
        if id(node) in seen:
            continue
        seen.add(id(node))
        order.append(node)
        for name in sorted(node.children, reverse=True):
            child = node.children[name]
            if stat.S_ISDIR(child.mode):
                child.parent = node
                node.nlink += 1
            stack.append(child)
    for node in order:
        if stat.S_ISDIR(node.mode):
            node.nlink += 1  # "."

    # Chunks of the blob, deduplicated by content.
    compressor = zstandard.ZstdCompressor()
    blob = bytearray()
    chunk_records: list[tuple[bytes, int, int, int, int, bool]] = []
    chunk_by_digest: dict[bytes, int] = {}
    file_chunks: dict[int, list[int | None]] = {}
    for node in order:
        if not stat.S_ISREG(node.mode) or not node.data:
            continue
        positions: list[int | None] = []
        for position, start in enumerate(range(0, len(node.data), 1 << 20)):
            if position in node.holes:
                positions.append(None)
                continue
            piece = node.data[start : start + (1 << 20)]
            digest = hashlib.sha256(piece).digest()
            if digest not in chunk_by_digest:
                packed = compressor.compress(piece) if compress else piece
                compressed = len(packed) < len(piece)
                stored = packed if compressed else piece
                uncompressed_offset = sum(-(-r[4] // BLOCK) * BLOCK for r in chunk_records)
                if not compress:
                    blob += bytes(uncompressed_offset - len(blob))
                chunk_by_digest[digest] = len(chunk_records)
                chunk_records.append(
                    (digest, len(blob), len(stored), uncompressed_offset, len(piece), compressed)
                )
                blob += stored
            positions.append(chunk_by_digest[digest])
        file_chunks[id(node)] = positions
    if not compress:
        blob += bytes(-len(blob) % BLOCK)  # whole blocks, for a loop device

    # Inode sizes, then nids: inode + xattrs (+ inline tail | chunk indexes), 32-byte slots.
    meta_start = META_BLOCK * BLOCK
    position = 0
    plain_data: list[tuple[Node, bytes]] = []
    tails: dict[int, bytes] = {}
    layouts: dict[int, int] = {}
    dir_sizes: dict[int, int] = {}
    # Directory data needs the children's nids, so nids come first from sizes that do not
    # depend on them (entry names only).
    for node in order:
        extended = extended_all or not node.compact
        inode_size = 64 if extended else 32
        xattr_size = len(_xattr_body(node.xattrs))
        if stat.S_ISDIR(node.mode):
            names = [(b".", 0, 2), (b"..", 0, 2)] + [(n, 0, 1) for n in node.children]
            blocks = _directory_blocks(sorted(names))
            data_size = BLOCK * (len(blocks) - 1) + len(blocks[-1])
            dir_sizes[id(node)] = data_size
        elif stat.S_ISLNK(node.mode):
            data_size = len(node.target)
        else:
            data_size = 0
        tail = data_size % BLOCK if node.inline else 0
        if stat.S_ISREG(node.mode) and node.data:
            count = len(file_chunks[id(node)])
            header = -(-(inode_size + xattr_size) // 8) * 8
            footprint = header + 8 * count
        else:
            footprint = inode_size + xattr_size + tail
        if tail and position % BLOCK + footprint > BLOCK:
            position = -(-position // BLOCK) * BLOCK  # keep the inline tail in one block
        node.nid = position // 32
        position += -(-footprint // 32) * 32
    meta_end = meta_start + -(-position // BLOCK) * BLOCK

    # Directory and symlink data now that nids are known; full blocks go after the meta area.
    data_blocks_start = meta_end // BLOCK
    next_block = data_blocks_start
    raw_blocks: dict[int, int] = {}
    for node in order:
        if stat.S_ISDIR(node.mode):
            assert node.parent is not None
            entries = [(b".", node.nid, 2), (b"..", node.parent.nid, 2)] + [
                (name, child.nid, DIRENT_TYPES[stat.S_IFMT(child.mode)])
                for name, child in node.children.items()
            ]
            content = b"".join(
                block + bytes(BLOCK - len(block)) if index < len(blocks) - 1 else block
                for blocks in [_directory_blocks(sorted(entries))]
                for index, block in enumerate(blocks)
            )
            assert len(content) == dir_sizes[id(node)]
        elif stat.S_ISLNK(node.mode):
            content = node.target
        else:
            continue
        # Tail packing only for a partial last block (the kernel would read a whole block).
        tail_size = len(content) % BLOCK if node.inline else 0
        full = content[: len(content) - tail_size]
        tails[id(node)] = content[len(content) - tail_size :]
        layouts[id(node)] = 2 if tail_size else 0
        raw_blocks[id(node)] = next_block
        if full:
            plain_data.append((node, full))
            next_block += -(-len(full) // BLOCK)

    image = bytearray(next_block * BLOCK)
    for node, full in plain_data:
        start = raw_blocks[id(node)] * BLOCK
        image[start : start + len(full)] = full

    for node in order:
        extended = extended_all or not node.compact
        offset = meta_start + node.nid * 32
        file_type = stat.S_IFMT(node.mode)
        if file_type == stat.S_IFREG and node.data:
            layout = 4
            union = 0x20 | CHUNK_SIZE_BITS
        elif file_type in (stat.S_IFDIR, stat.S_IFLNK):
            layout = layouts[id(node)]
            union = raw_blocks[id(node)]
        elif file_type in (stat.S_IFCHR, stat.S_IFBLK):
            layout, union = 0, node.rdev
        else:
            layout, union = 0, 0
        size = (
            len(node.data)
            if file_type == stat.S_IFREG
            else dir_sizes.get(id(node), len(node.target))
        )
        xattr = _xattr_body(node.xattrs)
        xattr_count = 0 if not xattr else 1 + (len(xattr) - 12) // 4
        if extended:
            raw = struct.pack(
                "<HHHHQIIIIQII16x",
                1 | layout << 1,
                xattr_count,
                node.mode,
                0,
                size,
                union,
                node.nid,
                node.uid,
                node.gid,
                node.mtime,
                0,
                node.nlink,
            )
        else:
            raw = struct.pack(
                "<HHHHIIIIHHI",
                layout << 1,
                xattr_count,
                node.mode,
                node.nlink,
                size,
                0,
                union,
                node.nid,
                node.uid,
                node.gid,
                0,
            )
        body = raw + xattr
        if layout == 4:
            body += bytes(-len(body) % 8)
            for chunk in file_chunks[id(node)]:
                if chunk is None:
                    body += struct.pack("<HHI", 0, 0, 0xFFFFFFFF)
                    continue
                uncompressed_offset = chunk_records[chunk][3]
                body += struct.pack(
                    "<HHI",
                    chunk & 0xFFFF,
                    1 | ((chunk >> 16) << 8),
                    uncompressed_offset // BLOCK,
                )
        elif id(node) in tails:
            body += tails[id(node)]
        image[offset : offset + len(body)] = body

    # Chunk table (80-byte records), then the tables go at the end.
    table = bytearray()
    for index, (digest, c_offset, c_size, u_offset, u_size, compressed) in enumerate(chunk_records):
        table += struct.pack(
            "<32sIIIIQQQII",
            digest,
            0,
            int(compressed),
            c_size,
            u_size,
            c_offset,
            u_offset,
            0,
            index,
            0,
        )
    chunk_table_offset = len(image)
    if chunk_table:
        image += table
    prefetch_offset = len(image)
    image += b"".join(struct.pack("<I", node.nid) for node in prefetch)
    image += bytes(-len(image) % BLOCK)

    uncompressed_size = sum(-(-r[4] // BLOCK) * BLOCK for r in chunk_records)
    meta_table = b"".join(
        struct.pack(
            "<QQ",
            ((u_size - 1) & 0xFFFFF) << 44 | u_offset | (((u_size - 1) >> 20) & 0xF) << 8,
            ((c_size - 1) & 0xFFFFF) << 44 | c_offset | (((c_size - 1) >> 20) & 0xF) << 40,
        )
        for _, c_offset, c_size, u_offset, u_size, _ in chunk_records
    )
    meta_header = bytearray(BLOCK)
    struct.pack_into(
        "<IIIIQQQ",
        meta_header,
        0,
        0xB10BB10B,
        1,
        0,
        len(chunk_records),
        len(blob),
        len(meta_table),
        len(meta_table),
    )
    struct.pack_into("<I", meta_header, BLOCK - 4, 0xB10BB10B)

    # Superblock, extended superblock, device table, blob table.
    struct.pack_into(
        "<IIIBBHQQIIII16s16sIHHH",
        image,
        1024,
        0xE0F5E1E2,
        0,
        0x4000_0000,
        12,
        0,
        root.nid,
        len(order),
        0,
        0,
        len(image) // BLOCK,
        META_BLOCK,
        0,
        bytes(16),
        bytes(16),
        0x4 | 0x8,
        0,
        1,
        1408 // 128,
    )
    flags = 0x80 | 0x8 | 0x10 | 0x20  # zstd, sha256, explicit uid/gid, has xattr
    struct.pack_into(
        "<QQIIQQQI",
        image,
        1152,
        flags,
        BLOCK,
        256,
        1 << 20,
        chunk_table_offset if chunk_table else 0,
        len(table) if chunk_table else 0,
        prefetch_offset if prefetch else 0,
        4 * len(prefetch),
    )
    struct.pack_into("<64sII", image, 1408, BLOB_ID.encode(), max(1, uncompressed_size // BLOCK), 0)
    struct.pack_into(
        "<64sIIIIIIQQIIQQQ",
        image,
        BLOCK,
        BLOB_ID.encode(),
        0,
        1 << 20,
        len(chunk_records),
        3,  # zstd
        1,  # sha256
        0x1,  # aligned
        len(blob),
        uncompressed_size,
        0,
        0,
        len(blob),
        len(meta_table),
        len(meta_table),
    )
    digests = b"".join(record[0] for record in chunk_records)
    blob_bytes = bytes(blob) + meta_table + bytes(meta_header)
    return Built(bytes(image), blob_bytes, meta_table, bytes(meta_header), digests)
