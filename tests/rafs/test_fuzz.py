"""Hostile input: real images with bytes flipped, cut short or spliced must give `RafsError` (or
still read), quickly — never another exception, a hang, or a huge allocation."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from d7y_node.errors import RafsError
from d7y_node.rafs import BytesReader, Filesystem, open_bootstrap, read_blob_layout
from d7y_node.rafs.blob import read_file_range, read_toc
from d7y_node.rafs.inlined import read_inlined_bootstrap
from tests.rafs.fixture_paths import FIXTURES
from tests.rafs.image_builder import Node, build, directory, regular, symlink

# Each example must finish well within this; a hang or quadratic blow-up shows as a failure.
EXAMPLE_SECONDS = 2.0
# Enough of every file to decompress and verify its first chunks without reading megabytes of
# zeros when a mutated size claims a huge sparse file.
READ_LIMIT = 256 * 1024
FUZZ_SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# Blob mutations mostly land in chunk data (a digest mismatch); fewer examples keep the suite
# fast while still reaching the trailers (ToC, blob.meta, inlined bootstrap).
BLOB_FUZZ_SETTINGS = settings(FUZZ_SETTINGS, max_examples=100)


def synthetic_image() -> tuple[bytes, bytes]:
    shared = regular(b"shared content " * 300, xattrs={b"user.k": b"v"})
    root = directory(
        {
            b"file": regular(bytes(range(256)) * 40, uid=5, compact=True),
            b"one": shared,
            b"two": shared,
            b"link": symlink(b"file"),
            b"sub": directory({b"x%02d" % i: regular(b"%d" % i) for i in range(40)}),
            b"dev": Node(mode=0o20644, rdev=0x0103),
        },
        xattrs={b"trusted.a": b"b", b"security.c": b"d"},
    )
    built = build(root)
    return built.bootstrap, built.blob


def load_images() -> list[tuple[str, bytes, list[bytes]]]:
    """(name, bootstrap, blobs) for every image; real fixtures when present."""
    bootstrap, blob = synthetic_image()
    images = [("synthetic", bootstrap, [blob])]
    if FIXTURES.is_dir():
        for name, blob_dir in [
            ("v6/rafs-v6-2.2.boot", "v6"),
            ("v5/sha256-nocompress-repeatable", "v5"),
            ("v5/blake3-lz4_block-2019.boot", "v5"),
        ]:
            data = (FIXTURES / name).read_bytes()
            filesystem = open_bootstrap(data)
            blobs = [(FIXTURES / blob_dir / b.blob_id).read_bytes() for b in filesystem.blobs]
            images.append((name, data, blobs))
    return images


IMAGES = load_images()


def exercise(filesystem: Filesystem, blobs: list[bytes]) -> None:
    """Everything the FUSE mount will ask, over the whole tree."""
    readers = [BytesReader(blob) for blob in blobs]
    filesystem.prefetch_inodes()
    for _path, attributes in filesystem.walk():
        filesystem.xattrs(attributes.ino)
        if attributes.is_directory:
            filesystem.parent(attributes.ino)
            for entry in filesystem.readdir(attributes.ino)[:5]:
                filesystem.lookup(attributes.ino, entry.name)
        elif attributes.is_symlink:
            filesystem.readlink(attributes.ino)
        elif attributes.is_regular:
            filesystem.read_plan(attributes.ino, 0, READ_LIMIT)
            if len(readers) == len(filesystem.blobs):
                read_file_range(filesystem, attributes.ino, 0, READ_LIMIT, readers)


def mutate(data: bytes, source: st.DataObject) -> bytes:
    draw = source.draw
    kind = draw(st.sampled_from(["flip", "truncate", "splice", "overwrite"]))
    buffer = bytearray(data)
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            position = draw(st.integers(0, len(buffer) - 1))
            buffer[position] ^= draw(st.integers(1, 255))
    elif kind == "truncate":
        del buffer[draw(st.integers(0, len(buffer) - 1)) :]
    elif kind == "splice":
        start = draw(st.integers(0, len(buffer) - 1))
        length = draw(st.integers(1, 256))
        target = draw(st.integers(0, len(buffer) - 1))
        piece = bytes(buffer[start : start + length])
        buffer[target : target + len(piece)] = piece
    else:
        # Large values where offsets, sizes and counts live.
        position = draw(st.integers(0, len(buffer) - 1))
        value = draw(st.sampled_from([0, 1, 0x7F, 0xFF, 0xFFFF, 0xFFFF_FFFF, 2**63]))
        width = draw(st.sampled_from([1, 2, 4, 8]))
        encoded = (value % (1 << (8 * width))).to_bytes(width, "little")
        buffer[position : position + width] = encoded
    return bytes(buffer)


def run_bounded(action: Callable[[], object]) -> None:
    started = time.perf_counter()
    with contextlib.suppress(RafsError):
        action()
    elapsed = time.perf_counter() - started
    assert elapsed < EXAMPLE_SECONDS, f"took {elapsed:.2f}s"


@pytest.mark.parametrize("image", range(len(IMAGES)), ids=[name for name, _, _ in IMAGES])
@FUZZ_SETTINGS
@given(data=st.data())
def test_mutated_bootstrap(image: int, data: st.DataObject) -> None:
    _name, bootstrap, blobs = IMAGES[image]
    mutated = mutate(bootstrap, data)
    run_bounded(lambda: exercise(open_bootstrap(mutated), blobs))


@pytest.mark.parametrize("image", range(len(IMAGES)), ids=[name for name, _, _ in IMAGES])
@BLOB_FUZZ_SETTINGS
@given(data=st.data())
def test_mutated_blob(image: int, data: st.DataObject) -> None:
    _name, bootstrap, blobs = IMAGES[image]
    filesystem = open_bootstrap(bootstrap)
    mutated = [mutate(blobs[0], data), *blobs[1:]]

    def read() -> None:
        reader = BytesReader(mutated[0])
        layout = read_blob_layout(reader, filesystem.blobs[0])
        if layout.bootstrap is not None:
            exercise(open_bootstrap(layout.bootstrap), mutated)
        exercise(filesystem, mutated)

    run_bounded(read)


@pytest.mark.skipif(not FIXTURES.is_dir(), reason="Nydus fixtures not found beside the repo")
@BLOB_FUZZ_SETTINGS
@given(data=st.data())
def test_mutated_blob_with_inlined_bootstrap(data: st.DataObject) -> None:
    blob = (
        Path(FIXTURES) / "v6" / "2fa78cad554b75ac91a4a125ed148d0ddeb25efa4aaa8bd80e5dc292690a4dca"
    ).read_bytes()
    mutated = mutate(blob, data)

    def read() -> None:
        reader = BytesReader(mutated)
        read_toc(reader)
        layout = read_blob_layout(reader)
        if layout.bootstrap is not None:
            exercise(open_bootstrap(layout.bootstrap), [mutated])
        # What a mount of the blob does: the bootstrap and the blob table entry of its carrier.
        inlined = read_inlined_bootstrap(reader)
        if inlined is not None:
            exercise(inlined.filesystem, [mutated])

    run_bounded(read)


def test_random_bytes_are_not_a_bootstrap() -> None:
    for data in [b"", b"\0" * 10, b"\0" * 8192, bytes(range(256)) * 64]:
        with pytest.raises(RafsError):
            open_bootstrap(data)
