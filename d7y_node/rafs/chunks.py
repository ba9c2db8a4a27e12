"""Chunk data: decompression and digest verification.

Owns the algorithms a RAFS image names for its chunks (`none`, `lz4_block`, `gzip`, `zstd`;
`blake3`, `sha256`), their numeric codes in the on-disk formats, and turning the stored bytes of one
chunk into its verified uncompressed bytes. Does not know where a chunk lives (that is the
bootstrap: `v5.py`, `v6.py`, `blob.py`) nor how its bytes are fetched (the caller's business).

Every failure (corrupt stream, wrong length, digest mismatch) is a `RafsError`; output is never
larger than the size the metadata promised, so a hostile stream cannot blow up memory.
"""

from __future__ import annotations

import enum
import hashlib
import io
import zlib

import blake3
import lz4.block  # type: ignore[import-untyped]
import zstandard

from d7y_node.errors import RafsError

# Nydus refuses chunks bigger than 16 MiB (`RAFS_MAX_CHUNK_SIZE`); so do we, which also caps the
# memory one decompression may take.
MAX_CHUNK_SIZE = 16 * 1024 * 1024

DIGEST_SIZE = 32

# Bounded decompression reads this much at a time (big enough to be fast, small enough that a
# lying size costs little).
_DECOMPRESS_STEP = 1024 * 1024


class Compressor(enum.Enum):
    """How chunk bytes are stored in a data blob."""

    NONE = "none"
    LZ4_BLOCK = "lz4_block"
    GZIP = "gzip"
    ZSTD = "zstd"

    @classmethod
    def from_code(cls, code: int) -> Compressor:
        """The algorithm for Nydus's numeric code (blob table, blob.meta header)."""
        try:
            return _COMPRESSOR_CODES[code]
        except KeyError:
            raise RafsError(f"unknown compression algorithm code {code}") from None

    @property
    def code(self) -> int:
        return _COMPRESSOR_CODE_OF[self]


class Digester(enum.Enum):
    """How a chunk's identity is computed from its uncompressed bytes."""

    BLAKE3 = "blake3"
    SHA256 = "sha256"

    @classmethod
    def from_code(cls, code: int) -> Digester:
        try:
            return _DIGESTER_CODES[code]
        except KeyError:
            raise RafsError(f"unknown digest algorithm code {code}") from None

    @property
    def code(self) -> int:
        return 0 if self is Digester.BLAKE3 else 1


# nydus-utils `compress::Algorithm` and `digest::Algorithm` discriminants.
_COMPRESSOR_CODES = {
    0: Compressor.NONE,
    1: Compressor.LZ4_BLOCK,
    2: Compressor.GZIP,
    3: Compressor.ZSTD,
}
_COMPRESSOR_CODE_OF = {value: key for key, value in _COMPRESSOR_CODES.items()}
_DIGESTER_CODES = {0: Digester.BLAKE3, 1: Digester.SHA256}


def digest(data: bytes, digester: Digester) -> bytes:
    """The 32-byte digest of `data`."""
    if digester is Digester.BLAKE3:
        return blake3.blake3(data).digest()
    return hashlib.sha256(data).digest()


def decompress(data: bytes, compressor: Compressor, uncompressed_size: int) -> bytes:
    """Exactly `uncompressed_size` bytes out of `data`, or a `RafsError`."""
    if not 0 <= uncompressed_size <= MAX_CHUNK_SIZE:
        raise RafsError(f"uncompressed size {uncompressed_size} exceeds {MAX_CHUNK_SIZE}")
    try:
        if compressor is Compressor.NONE:
            output = bytes(data)
        elif compressor is Compressor.LZ4_BLOCK:
            # A raw LZ4 block without a size prefix; the size comes from the metadata.
            output = lz4.block.decompress(bytes(data), uncompressed_size=uncompressed_size)
        elif compressor is Compressor.ZSTD:
            # A bounded read: a frame that expands beyond what was promised is cut off here
            # and rejected below, without ever holding more than size + 1 bytes.
            output = zstd_decompress_bounded(data, uncompressed_size)
        else:
            inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            output = inflater.decompress(bytes(data), uncompressed_size + 1)
    except (lz4.block.LZ4BlockError, zstandard.ZstdError, zlib.error, ValueError) as error:
        raise RafsError(f"{compressor.value} data is corrupt: {error}") from None
    if len(output) != uncompressed_size:
        raise RafsError(
            f"{compressor.value} data decompresses to {len(output)} bytes, "
            f"expected {uncompressed_size}"
        )
    return output


def zstd_decompress_bounded(data: bytes, limit: int) -> bytes:
    """At most `limit + 1` bytes of one zstd frame, read in steps so that a lying size or a
    decompression bomb never makes us allocate more than the data really holds (plus a step)."""
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=False)
    parts: list[bytes] = []
    remaining = limit + 1
    while remaining > 0:
        part = reader.read(min(remaining, _DECOMPRESS_STEP))
        if not part:
            break
        parts.append(part)
        remaining -= len(part)
    return b"".join(parts)


def decode_chunk(
    stored: bytes,
    *,
    compressed: bool,
    compressor: Compressor,
    digester: Digester,
    uncompressed_size: int,
    expected_digest: bytes | None,
) -> bytes:
    """The verified uncompressed bytes of one chunk, from the bytes stored in its blob.

    A chunk whose compressed form was not smaller is stored as it is (`compressed` false).
    `expected_digest` None skips verification (only for images that carry no chunk digests).
    """
    if compressed and compressor is not Compressor.NONE:
        data = decompress(stored, compressor, uncompressed_size)
    else:
        if len(stored) != uncompressed_size:
            raise RafsError(
                f"uncompressed chunk has {len(stored)} bytes, expected {uncompressed_size}"
            )
        data = bytes(stored)
    if expected_digest is not None:
        actual = digest(data, digester)
        if actual != expected_digest:
            raise RafsError(
                f"chunk digest mismatch: {digester.value} {actual.hex()}, "
                f"expected {expected_digest.hex()}"
            )
    return data
