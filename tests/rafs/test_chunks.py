"""Chunk decompression and verification (`chunks.py`)."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os

import blake3
import lz4.block  # type: ignore[import-untyped]
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from d7y_node.errors import RafsError
from d7y_node.rafs.chunks import (
    MAX_CHUNK_SIZE,
    Compressor,
    Digester,
    decode_chunk,
    decompress,
    digest,
)

DATA = os.urandom(1000) + b"a" * 50_000


def compress(data: bytes, compressor: Compressor) -> bytes:
    if compressor is Compressor.LZ4_BLOCK:
        return bytes(lz4.block.compress(data, store_size=False))
    if compressor is Compressor.ZSTD:
        return zstandard.ZstdCompressor().compress(data)
    if compressor is Compressor.GZIP:
        return gzip.compress(data)
    return data


@pytest.mark.parametrize("compressor", list(Compressor))
def test_round_trip(compressor: Compressor) -> None:
    assert decompress(compress(DATA, compressor), compressor, len(DATA)) == DATA


@pytest.mark.parametrize("compressor", [Compressor.LZ4_BLOCK, Compressor.ZSTD, Compressor.GZIP])
def test_wrong_size_is_rejected(compressor: Compressor) -> None:
    stored = compress(DATA, compressor)
    with pytest.raises(RafsError, match=r"decompresses to|corrupt"):
        decompress(stored, compressor, len(DATA) - 1)
    with pytest.raises(RafsError, match=r"decompresses to|corrupt"):
        decompress(stored, compressor, len(DATA) + 1)


@pytest.mark.parametrize("compressor", [Compressor.LZ4_BLOCK, Compressor.ZSTD, Compressor.GZIP])
def test_garbage_is_rejected(compressor: Compressor) -> None:
    with pytest.raises(RafsError):
        decompress(b"\x00garbage" * 10, compressor, 100)


def test_bomb_is_cut_off_at_the_promised_size() -> None:
    bomb = zstandard.ZstdCompressor().compress(bytes(MAX_CHUNK_SIZE))
    with pytest.raises(RafsError, match="decompresses to"):
        decompress(bomb, Compressor.ZSTD, 4096)
    with pytest.raises(RafsError, match="exceeds"):
        decompress(bomb, Compressor.ZSTD, MAX_CHUNK_SIZE + 1)


def test_digests() -> None:
    assert digest(DATA, Digester.SHA256) == hashlib.sha256(DATA).digest()
    assert digest(DATA, Digester.BLAKE3) == blake3.blake3(DATA).digest()


def test_codes() -> None:
    assert [Compressor.from_code(code) for code in range(4)] == [
        Compressor.NONE,
        Compressor.LZ4_BLOCK,
        Compressor.GZIP,
        Compressor.ZSTD,
    ]
    assert Compressor.ZSTD.code == 3
    assert (Digester.from_code(0), Digester.from_code(1)) == (Digester.BLAKE3, Digester.SHA256)
    with pytest.raises(RafsError):
        Compressor.from_code(4)
    with pytest.raises(RafsError):
        Digester.from_code(2)


@pytest.mark.parametrize("digester", list(Digester))
def test_decode_chunk_verifies(digester: Digester) -> None:
    stored = compress(DATA, Compressor.ZSTD)
    expected = digest(DATA, digester)
    assert (
        decode_chunk(
            stored,
            compressed=True,
            compressor=Compressor.ZSTD,
            digester=digester,
            uncompressed_size=len(DATA),
            expected_digest=expected,
        )
        == DATA
    )
    with pytest.raises(RafsError, match="digest mismatch"):
        decode_chunk(
            stored,
            compressed=True,
            compressor=Compressor.ZSTD,
            digester=digester,
            uncompressed_size=len(DATA),
            expected_digest=bytes(32),
        )


def test_chunk_stored_uncompressed_in_a_compressed_blob() -> None:
    raw = os.urandom(4096)
    got = decode_chunk(
        raw,
        compressed=False,
        compressor=Compressor.LZ4_BLOCK,
        digester=Digester.BLAKE3,
        uncompressed_size=4096,
        expected_digest=digest(raw, Digester.BLAKE3),
    )
    assert got == raw
    with pytest.raises(RafsError, match="uncompressed chunk has"):
        decode_chunk(
            raw[:-1],
            compressed=False,
            compressor=Compressor.LZ4_BLOCK,
            digester=Digester.BLAKE3,
            uncompressed_size=4096,
            expected_digest=None,
        )


@settings(max_examples=200, deadline=None)
@given(
    stored=st.binary(max_size=2048),
    compressor=st.sampled_from(list(Compressor)),
    size=st.integers(0, 1 << 16),
)
def test_arbitrary_input_only_raises_rafs_error(
    stored: bytes, compressor: Compressor, size: int
) -> None:
    with contextlib.suppress(RafsError):
        assert len(decompress(stored, compressor, size)) == size
