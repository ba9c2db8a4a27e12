"""A lazy mount fetches blocks, not pieces, from a real registry (issue 4, item 4 and 5), also
when another node of its cluster is the blob's home.

The big test image (tests/harness/images.py) is converted by `d7y-node convert` and pushed to a
real registry (Debian's `docker-registry`); a node mounts it with `--no-prefetch`, and the test
reads one small file, then 4 KiB in the middle of a 64 MiB file of random bytes. The registry's
access log says which bytes of each data blob left the origin: exactly the blocks
(`piece_store.BLOCK_SIZE`) around the chunks those reads need, far less than the pieces
(`piece_size_for` of the blob) that hold them. The node's `d7y_origin_bytes` agrees.

In a two-node cluster whose other node is the data blob's home 0, the mounting node gets the
blocks from that home (a peer range request: no byte from origin on the reader); the home fetches
them first, the rest of the blob once the reads went quiet, and the registry sends the blob once.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from d7y_node.fuse_kernel import READ_AHEAD_BYTES, is_mount_point, mount_device
from d7y_node.piece_store import BLOCK_SIZE, piece_size_for
from d7y_node.rafs import Chunk, Filesystem, open_bootstrap
from d7y_node.rafs.tree import ROOT_INO
from tests.harness.images import BIG_FILE as BIG_RANDOM_FILE
from tests.harness.images import MEDIA_TYPE_MANIFEST, random_file_bytes
from tests.harness.node import node_command
from tests.harness.process import run, wait_until
from tests.integration.conftest import NodeFactory, start_pair, two_node_ids

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                       reason="mounting FUSE needs root and /dev/fuse"),
]

COMMAND_TIMEOUT_SECONDS = 60.0
NYDUS_REPOSITORY = "test/lazy-blocks-nydus"
# Files of the big image (tests/harness/images.py): a small text file in its last layer, and
# 64 MiB of random bytes (incompressible: each 1 MiB chunk is stored at about its size).
SMALL_FILE = "etc/d7y-test.txt"
SMALL_FILE_CONTENT = b"layer three\n"
BIG_FILE = "data/big.bin"
# A read in the middle of a chunk of the big file: a first (random) read's readahead window
# is a few pages, so it stays inside that chunk.
BIG_READ_OFFSET = 10 * 1024 * 1024 + 256 * 1024
BIG_READ_LENGTH = 4096
KERNEL_READAHEAD = 128 * 1024
BOOTSTRAP_MEMBER = "image/image.boot"


@dataclass(frozen=True)
class NydusImage:
    reference: str
    filesystem: Filesystem
    # Data blob digest ("sha256:…") -> its size.
    blob_sizes: dict[str, int]


def _get(url: str, accept: str | None = None) -> bytes:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=30) as response:
        data: bytes = response.read()
    return data


@pytest.fixture(scope="module")
def nydus_image(registry: Any, images: Any) -> NydusImage:
    """The big image converted and pushed, with its bootstrap read from the registry."""
    reference = f"{registry.host}/{NYDUS_REPOSITORY}:v1"
    converted = run([*node_command(), "convert", f"{registry.host}/test/big:v1", reference],
                    timeout=600, check=False)
    assert converted.returncode == 0, converted.stderr[-2000:]
    base = f"{registry.url}/v2/{NYDUS_REPOSITORY}"
    manifest = json.loads(_get(f"{base}/manifests/v1", MEDIA_TYPE_MANIFEST))
    *data_layers, bootstrap_layer = manifest["layers"]
    archive = gzip.decompress(_get(f"{base}/blobs/{bootstrap_layer['digest']}"))
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        member = tar.extractfile(BOOTSTRAP_MEMBER)
        assert member is not None
        bootstrap = member.read()
    return NydusImage(reference, open_bootstrap(bootstrap),
                      {layer["digest"]: int(layer["size"]) for layer in data_layers})


def _ino(filesystem: Filesystem, path: str) -> int:
    ino = ROOT_INO
    for name in path.split("/"):
        attributes = filesystem.lookup(ino, name.encode())
        assert attributes is not None, path
        ino = attributes.ino
    return ino


def _chunks(filesystem: Filesystem, path: str, offset: int, length: int) -> list[Chunk]:
    plan = filesystem.read_plan(_ino(filesystem, path), offset, length)
    return [read.chunk for read in plan if read.chunk is not None]


def _blob_size(image: NydusImage, blob_index: int) -> int:
    return image.blob_sizes[f"sha256:{image.filesystem.blobs[blob_index].blob_id}"]


def _block_bytes(image: NydusImage, chunks: list[Chunk]) -> int:
    """Bytes of the blocks that hold these chunks (each block once; a blob's last block ends
    with the blob)."""
    blocks = {
        (chunk.blob_index, block)
        for chunk in chunks
        for block in range(chunk.compressed_offset // BLOCK_SIZE,
                           (chunk.compressed_offset + chunk.compressed_size - 1) // BLOCK_SIZE + 1)
    }
    return sum(min(BLOCK_SIZE, _blob_size(image, blob_index) - block * BLOCK_SIZE)
               for blob_index, block in blocks)


def _blob_bytes(registry: Any, image: NydusImage, since: int) -> int:
    registry.access_log.settle()
    return sum(registry.access_log.bytes_served(digest, since=since)
               for digest in image.blob_sizes)


def test_a_lazy_read_fetches_the_blocks_of_its_chunks(
    node_factory: NodeFactory, nydus_image: NydusImage, registry: Any, tmp_path: Path
) -> None:
    filesystem = nydus_image.filesystem
    node = node_factory()
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    run([*node_command(), "mount", "--data-dir", str(node.data_dir), "--no-prefetch",
         nydus_image.reference, str(mountpoint)], timeout=COMMAND_TIMEOUT_SECONDS)
    try:
        # The node raised the mount's readahead to a chunk (its bdi in sysfs).
        device = mount_device(str(mountpoint))
        read_ahead = Path(f"/sys/class/bdi/{device}/read_ahead_kb").read_text()
        assert int(read_ahead) * 1024 == READ_AHEAD_BYTES
        start = registry.access_log.mark()
        metric_start = node.metric("d7y_origin_bytes")

        # One small file: the blocks of its one chunk.
        assert (mountpoint / SMALL_FILE).read_bytes() == SMALL_FILE_CONTENT
        small_chunks = _chunks(filesystem, SMALL_FILE, 0, len(SMALL_FILE_CONTENT))
        assert len(small_chunks) == 1
        small = _blob_bytes(registry, nydus_image, start)
        assert small == _block_bytes(nydus_image, small_chunks) <= 2 * BLOCK_SIZE
        assert node.metric("d7y_origin_bytes") - metric_start == small

        # 4 KiB in the middle of a 1 MiB chunk of random bytes: that chunk's blocks.
        middle = registry.access_log.mark()
        expected = _chunks(filesystem, BIG_FILE, BIG_READ_OFFSET, BIG_READ_LENGTH)
        widest = _chunks(filesystem, BIG_FILE, BIG_READ_OFFSET, KERNEL_READAHEAD)
        assert [chunk.compressed_offset for chunk in widest] == [
            chunk.compressed_offset for chunk in expected
        ], "the readahead stays in one chunk"
        with open(mountpoint / BIG_FILE, "rb") as file:
            read = os.pread(file.fileno(), BIG_READ_LENGTH, BIG_READ_OFFSET)
        assert len(read) == BIG_READ_LENGTH
        big = _blob_bytes(registry, nydus_image, middle)
        (blob_index,) = {chunk.blob_index for chunk in expected}
        piece_size = piece_size_for(_blob_size(nydus_image, blob_index))
        assert big == _block_bytes(nydus_image, expected)
        # Whole pieces would have cost at least the piece that holds the chunk.
        assert big < piece_size, (big, piece_size)
        print(f"origin bytes: {small} for {SMALL_FILE}, {big} for {BIG_READ_LENGTH} bytes of "
              f"{BIG_FILE} (its chunk: {expected[0].compressed_size}; a piece: {piece_size})")
        assert node.metric("d7y_origin_bytes") - metric_start == small + big
    finally:
        run([*node_command(), "umount", "--data-dir", str(node.data_dir), str(mountpoint)],
            timeout=COMMAND_TIMEOUT_SECONDS, check=False)
    assert not is_mount_point(str(mountpoint))


def test_a_lazy_read_off_the_blobs_home_gets_its_blocks_from_the_home(
    node_factory: NodeFactory, nydus_image: NydusImage, registry: Any, tmp_path: Path
) -> None:
    filesystem = nydus_image.filesystem
    expected = _chunks(filesystem, BIG_FILE, BIG_READ_OFFSET, BIG_READ_LENGTH)
    (blob_index,) = {chunk.blob_index for chunk in expected}
    digest = f"sha256:{filesystem.blobs[blob_index].blob_id}"
    reader, home = start_pair(node_factory, *two_node_ids([digest], "lazy"))
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    start = registry.access_log.mark()
    run([*node_command(), "mount", "--data-dir", str(reader.data_dir), "--no-prefetch",
         nydus_image.reference, str(mountpoint)], timeout=COMMAND_TIMEOUT_SECONDS)
    try:
        with open(mountpoint / BIG_FILE, "rb") as file:
            read = os.pread(file.fileno(), BIG_READ_LENGTH, BIG_READ_OFFSET)
        assert read == random_file_bytes(BIG_RANDOM_FILE, BIG_READ_OFFSET, BIG_READ_LENGTH)
        # The reader asked the home for the blocks; nothing of the data blob from origin.
        assert reader.metric("d7y_p2p_range_bytes") >= _block_bytes(nydus_image, expected)
        assert home.metric("d7y_peer_ranges_served") >= 1
        # The home fetched them for the reader, then (reads quiet) the whole blob, once.
        blob_size = nydus_image.blob_sizes[digest]
        wait_until(lambda: registry.access_log.bytes_served(digest, since=start) >= blob_size,
                   timeout=60.0, what="the home fetched the whole blob")
        registry.access_log.settle()
        assert registry.access_log.bytes_served(digest, since=start) == blob_size
        assert "went quiet" in home.process.log_path.read_text()  # it started lazily
        assert reader.metric("d7y_p2p_origin_fallbacks") == 0
    finally:
        run([*node_command(), "umount", "--data-dir", str(reader.data_dir), str(mountpoint)],
            timeout=COMMAND_TIMEOUT_SECONDS, check=False)
    assert not is_mount_point(str(mountpoint))
