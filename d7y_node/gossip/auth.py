"""Cluster-key authentication of gossip packets and push-pull streams.

Owns the framing byte that says whether bytes are authenticated, the key derivation from the
cluster secret, and the HMAC-SHA256 tag. Does not encrypt (membership is not secret, only its
integrity matters) and does not protect against replay of a captured packet: a replayed message
carries an old incarnation or sequence number, which the membership state machine already ignores.

Framing: `0x01 | body` without a key; `0x02 | tag | body` with one, where the tag is the first
`TAG_BYTES` of HMAC-SHA256(derived key, purpose | 0x02 | body). A node with a key drops unframed or
badly tagged bytes; a node without a key drops tagged ones (it cannot check them).
"""

from __future__ import annotations

import enum
import hashlib
import hmac

from d7y_node.errors import AuthenticationFailed, ConfigError

FRAME_PLAIN = 0x01
FRAME_AUTHENTICATED = 0x02
# 128 bits of tag: a forger's chance per try is 2^-128, far beyond any online attack, and a UDP
# packet keeps 16 more bytes for piggybacked gossip than with the full 32 (truncating HMAC output
# to at least half the hash length is what RFC 2104 section 5 and NIST SP 800-107 allow).
TAG_BYTES = 16
# Distinct derivation labels, so a key leaked from one use says nothing about the other and a
# tag computed for one purpose never verifies for the other.
_KEY_LABEL = b"d7y-node gossip cluster key v1"
# Keys derived for other protocols are HMACs of labels with this prefix; gossip tags are HMACs of
# inputs starting with a purpose name (lowercase letters), so the two never share an input.
_DERIVE_PREFIX = b"\x00derive:"


class Purpose(enum.Enum):
    """What the authenticated bytes are; part of the tagged input."""

    PACKET = b"packet"
    STREAM = b"stream"


class ClusterKey:
    """A key derived from the cluster secret; seals and opens gossip bytes."""

    overhead = 1 + TAG_BYTES

    def __init__(self, secret: bytes) -> None:
        if not secret:
            raise ConfigError("secret_file", "the cluster secret is empty")
        # HMAC as a key-derivation function (HKDF-extract with a fixed label): a secret of any
        # length and quality becomes a uniform 32-byte key.
        self._key = hmac.new(_KEY_LABEL, secret, hashlib.sha256).digest()

    def derive(self, label: bytes) -> bytes:
        """A 32-byte key for another protocol (peer HTTP), independent of the gossip tags:
        HMAC of a label that starts with a byte no gossip purpose starts with."""
        return hmac.new(self._key, _DERIVE_PREFIX + label, hashlib.sha256).digest()

    def _tag(self, purpose: Purpose, body: bytes) -> bytes:
        mac = hmac.new(self._key, purpose.value, hashlib.sha256)
        mac.update(bytes([FRAME_AUTHENTICATED]))
        mac.update(body)
        return mac.digest()[:TAG_BYTES]

    def seal(self, purpose: Purpose, body: bytes) -> bytes:
        return bytes([FRAME_AUTHENTICATED]) + self._tag(purpose, body) + body

    def open(self, purpose: Purpose, data: bytes) -> bytes:
        if len(data) < self.overhead or data[0] != FRAME_AUTHENTICATED:
            raise AuthenticationFailed("bytes carry no cluster-key tag")
        body = data[self.overhead :]
        if not hmac.compare_digest(data[1 : self.overhead], self._tag(purpose, body)):
            raise AuthenticationFailed("cluster-key tag does not match")
        return body


class NoKey:
    """No cluster key: bytes are framed but not authenticated."""

    overhead = 1

    def seal(self, purpose: Purpose, body: bytes) -> bytes:
        return bytes([FRAME_PLAIN]) + body

    def open(self, purpose: Purpose, data: bytes) -> bytes:
        if not data or data[0] != FRAME_PLAIN:
            raise AuthenticationFailed("bytes are not plain gossip (another cluster's key?)")
        return data[1:]


Sealer = ClusterKey | NoKey
