"""A bootstrap inlined in its data blob (`rafs.inlined`), with the real Nydus fixture `2fa78…`:
the bootstrap is found through the blob's ToC, the blob table entry of the carrier is told
apart from the file's own name, and every chunk of every file verifies against its digest."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import pytest

from d7y_node.errors import RafsError
from d7y_node.rafs import BytesReader, FileReader, open_bootstrap, read_blob_layout
from d7y_node.rafs.blob import TOC_ENTRY_BOOTSTRAP
from d7y_node.rafs.inlined import _carrier, is_bootstrap, read_inlined_bootstrap

INLINED = "v6/2fa78cad554b75ac91a4a125ed148d0ddeb25efa4aaa8bd80e5dc292690a4dca"
# What the fixture's bootstrap calls its blob: the sha256 of the blob before image.boot.
CARRIER_ID = "d788a0eac4ff9779bc2eae3842117a918d847d90fddbea1503f7c5296a4a7de3"


def test_the_fixtures_bootstrap_is_found_and_every_chunk_verifies(nydus_fixtures: Path) -> None:
    path = nydus_fixtures / INLINED
    with FileReader(path) as reader:
        assert not is_bootstrap(reader)
        inlined = read_inlined_bootstrap(reader, name=str(path))
        assert inlined is not None
        assert inlined.blob_id == CARRIER_ID != path.name
        data = path.read_bytes()
        layout = read_blob_layout(reader)
        assert layout.toc is not None
        boot = layout.toc.entry(TOC_ENTRY_BOOTSTRAP)
        assert boot is not None
        assert hashlib.sha256(data[: boot.compressed_offset]).hexdigest() == CARRIER_ID
        filesystem = inlined.filesystem
        assert filesystem.version == 6
        assert [blob.blob_id for blob in filesystem.blobs] == [CARRIER_ID]
        verified = 0
        names = []
        for name, attributes in filesystem.walk():
            if not attributes.is_regular:
                continue
            names.append(name)
            content = b""
            for chunk in filesystem.chunks(attributes.ino):
                stored = reader.read(chunk.compressed_offset, chunk.compressed_size)
                content += filesystem.decode_chunk(chunk, stored)  # checks the blake3 digest
                verified += 1
            assert len(content) == attributes.size
        assert sorted(names) == [b"/error.rs", b"/lib.rs", b"/logger.rs"]
        assert verified == filesystem.blobs[0].chunk_count == 3
        # The same bytes parse as the bootstrap they are.
        assert list(open_bootstrap(inlined.bootstrap).walk()) == list(filesystem.walk())


def test_bootstraps_and_blobs_without_one_are_not_inlined(nydus_fixtures: Path) -> None:
    with FileReader(nydus_fixtures / "v6/rafs-v6-2.2.boot") as reader:
        assert is_bootstrap(reader)
    blob = "v6/be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"
    with FileReader(nydus_fixtures / blob) as reader:
        assert not is_bootstrap(reader)
        assert read_inlined_bootstrap(reader) is None  # a ToC, but no image.boot in it
    assert read_inlined_bootstrap(BytesReader(b"no toc here" * 100)) is None


def test_a_corrupt_inlined_bootstrap_is_refused(nydus_fixtures: Path) -> None:
    data = bytearray((nydus_fixtures / INLINED).read_bytes())
    layout = read_blob_layout(BytesReader(bytes(data)))
    assert layout.toc is not None
    boot = layout.toc.entry(TOC_ENTRY_BOOTSTRAP)
    assert boot is not None
    data[boot.compressed_offset + boot.compressed_size // 2] ^= 0x40
    with pytest.raises(RafsError):
        read_inlined_bootstrap(BytesReader(bytes(data)))


class _Blobs:
    """A stand-in filesystem that only has a blob table."""

    def __init__(self, blobs: list[Any]) -> None:
        self.blobs = tuple(blobs)


def test_two_look_alike_blob_entries_are_told_apart_by_the_prefix_digest(
    nydus_fixtures: Path,
) -> None:
    data = (nydus_fixtures / INLINED).read_bytes()
    reader = BytesReader(data)
    layout = read_blob_layout(reader)
    inlined = read_inlined_bootstrap(reader)
    assert inlined is not None
    (carrier,) = inlined.filesystem.blobs
    twin = dataclasses.replace(carrier, index=0, blob_id="ab" * 32)
    shifted = dataclasses.replace(carrier, index=1)
    found = _carrier(_Blobs([twin, shifted]), reader, layout, "test")  # type: ignore[arg-type]
    assert found is shifted
    # No entry with the carrier's id: a clear error, not a guess.
    with pytest.raises(RafsError, match="does not list the blob that carries it"):
        _carrier(_Blobs([twin, dataclasses.replace(twin, index=1)]), reader, layout,  # type: ignore[arg-type]
                 "test")
