"""Cluster-key tags: what verifies, and everything that must not."""

from __future__ import annotations

import pytest

from d7y_node.errors import AuthenticationFailed, ConfigError
from d7y_node.gossip.auth import TAG_BYTES, ClusterKey, NoKey, Purpose

BODY = b"\x91\x92\x03\x07"


def test_sealed_bytes_open_with_the_same_secret_only() -> None:
    key = ClusterKey(b"s3cret")
    sealed = key.seal(Purpose.PACKET, BODY)
    assert len(sealed) == len(BODY) + 1 + TAG_BYTES == len(BODY) + key.overhead
    assert ClusterKey(b"s3cret").open(Purpose.PACKET, sealed) == BODY
    with pytest.raises(AuthenticationFailed):
        ClusterKey(b"other").open(Purpose.PACKET, sealed)


def test_every_flipped_bit_and_every_truncation_is_caught() -> None:
    key = ClusterKey(b"s3cret")
    sealed = key.seal(Purpose.PACKET, BODY)
    for index in range(len(sealed)):
        for bit in range(8):
            tampered = bytearray(sealed)
            tampered[index] ^= 1 << bit
            with pytest.raises(AuthenticationFailed):
                key.open(Purpose.PACKET, bytes(tampered))
    for length in range(len(sealed)):
        with pytest.raises(AuthenticationFailed):
            key.open(Purpose.PACKET, sealed[:length])


def test_a_packet_tag_does_not_verify_as_a_stream_and_vice_versa() -> None:
    key = ClusterKey(b"s3cret")
    with pytest.raises(AuthenticationFailed):
        key.open(Purpose.STREAM, key.seal(Purpose.PACKET, BODY))
    with pytest.raises(AuthenticationFailed):
        key.open(Purpose.PACKET, key.seal(Purpose.STREAM, BODY))


def test_keyed_and_keyless_nodes_refuse_each_others_bytes() -> None:
    key, none = ClusterKey(b"s3cret"), NoKey()
    assert none.open(Purpose.PACKET, none.seal(Purpose.PACKET, BODY)) == BODY
    with pytest.raises(AuthenticationFailed):
        key.open(Purpose.PACKET, none.seal(Purpose.PACKET, BODY))
    with pytest.raises(AuthenticationFailed):
        none.open(Purpose.PACKET, key.seal(Purpose.PACKET, BODY))
    with pytest.raises(AuthenticationFailed):
        none.open(Purpose.PACKET, b"")


def test_an_empty_secret_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError):
        ClusterKey(b"")
