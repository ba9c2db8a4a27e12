"""The gossip wire format: every message as a frozen dataclass, encoded with msgpack here only.

Owns the message types (ping, indirect ping, ack, nack, alive, suspect, dead; the push-pull state
exchange), their size bounds, and strict validation of everything decoded from the network: a
decoder either returns well-typed, in-bounds messages or raises `MalformedMessage`, whatever the
bytes. Does not own authentication (`auth.py`) or what the messages mean (`state.py`).

A packet body is one msgpack array of messages, each a msgpack `bin` holding the message's own
msgpack array (its first element is the type code). Messages are encoded one by one (the
broadcast queue keeps them as bytes and needs their sizes), so a compound packet is an array
header followed by the encoded messages. Wrapping each message in a `bin` costs 2-3 bytes and lets
a receiver recognise a message it already decoded: gossip delivers every broadcast to each member
about retransmit_mult * log10(n) times, so a small memo of decoded messages saves most of the
decoding work.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from d7y_node.errors import MalformedMessage

# Identifiers longer than this are refused: an id travels in most messages, and a member's alive
# message (id, host, labels, load) must always fit one packet with room left for a ping.
MEMBER_ID_MAX_BYTES = 128
# Advertised hosts are IP literals (45 chars for the longest IPv6 text) or short DNS names.
HOST_MAX_BYTES = 64
# Labels are a few scheduling hints (zone, rack, ...), not a key-value store.
LABELS_MAX_COUNT = 8
LABEL_KEY_MAX_BYTES = 32
LABEL_VALUE_MAX_BYTES = 64
# Incarnations and counters are unsigned 64-bit on the wire; sequences wrap at 32 bits.
UINT64_MAX = 2**64 - 1
SEQUENCE_MODULUS = 2**32
PORT_MAX = 65535
# An alive message at its bounds is about 1,050 bytes; anything above this is refused outright.
MESSAGE_MAX_BYTES = 1100
# Bytes the msgpack array header of a compound packet may take (0xdc + 16-bit count).
COMPOUND_HEADER_BYTES = 3
# A push-pull state exchange carries every member: 8 MiB is ~8,000 members at the maximum size.
STREAM_MAX_BYTES = 8 * 1024 * 1024


class MessageType(enum.IntEnum):
    """The first element of every encoded message."""

    PING = 1
    INDIRECT_PING = 2
    ACK = 3
    NACK = 4
    ALIVE = 5
    SUSPECT = 6
    DEAD = 7


class MemberState(enum.IntEnum):
    """What one member believes about another (the wire code is the value)."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


@dataclass(frozen=True, slots=True)
class Address:
    """Where a member's gossip socket listens (an IP literal and a UDP port)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Load:
    """A small load summary each member disseminates so the scheduler can pick parents."""

    free_upload_slots: int = 0
    upload_bytes_per_second: int = 0
    download_bytes_per_second: int = 0


@dataclass(frozen=True, slots=True)
class Ping:
    """Are you there? `target_id` empty means "whoever listens here" (used to join)."""

    sequence: int
    target_id: str
    source_id: str
    source_address: Address


@dataclass(frozen=True, slots=True)
class IndirectPing:
    """Please ping `target` for me and relay its ack (and a nack if it stays silent)."""

    sequence: int
    target_id: str
    target_address: Address
    source_id: str
    source_address: Address
    want_nack: bool


@dataclass(frozen=True, slots=True)
class Ack:
    """The answer to a ping with the same sequence number."""

    sequence: int


@dataclass(frozen=True, slots=True)
class Nack:
    """An indirect prober could not reach the target in time: proof the prober itself is fine."""

    sequence: int


@dataclass(frozen=True, slots=True)
class Alive:
    """A member is alive at `incarnation`, with this address and metadata."""

    incarnation: int
    member_id: str
    address: Address
    peer_port: int
    labels: Mapping[str, str] = field(default_factory=dict)
    load: Load = field(default_factory=Load)


@dataclass(frozen=True, slots=True)
class Suspect:
    """`from_id` suspects `member_id` (at `incarnation`) has failed."""

    incarnation: int
    member_id: str
    from_id: str


@dataclass(frozen=True, slots=True)
class Dead:
    """`member_id` is dead at `incarnation`; when `from_id == member_id` it left on purpose."""

    incarnation: int
    member_id: str
    from_id: str


Message = Ping | IndirectPing | Ack | Nack | Alive | Suspect | Dead


@dataclass(frozen=True, slots=True)
class MemberRecord:
    """One member's full state in a push-pull exchange."""

    member_id: str
    address: Address
    peer_port: int
    labels: Mapping[str, str]
    load: Load
    incarnation: int
    state: MemberState


@dataclass(frozen=True, slots=True)
class PushPull:
    """A full state exchange; `join` is set on the first exchange of a joining member."""

    join: bool
    members: tuple[MemberRecord, ...]


# ---------------------------------------------------------------------------------------------
# Encoding


def _load_fields(load: Load) -> list[int]:
    return [load.free_upload_slots, load.upload_bytes_per_second, load.download_bytes_per_second]


def _message_fields(message: Message) -> list[Any]:
    match message:
        case Ping():
            return [
                MessageType.PING.value,
                message.sequence,
                message.target_id,
                message.source_id,
                message.source_address.host,
                message.source_address.port,
            ]
        case IndirectPing():
            return [
                MessageType.INDIRECT_PING.value,
                message.sequence,
                message.target_id,
                message.target_address.host,
                message.target_address.port,
                message.source_id,
                message.source_address.host,
                message.source_address.port,
                message.want_nack,
            ]
        case Ack():
            return [MessageType.ACK.value, message.sequence]
        case Nack():
            return [MessageType.NACK.value, message.sequence]
        case Alive():
            return [
                MessageType.ALIVE.value,
                message.incarnation,
                message.member_id,
                message.address.host,
                message.address.port,
                message.peer_port,
                dict(message.labels),
                _load_fields(message.load),
            ]
        case Suspect():
            return [
                MessageType.SUSPECT.value,
                message.incarnation,
                message.member_id,
                message.from_id,
            ]
        case Dead():
            return [MessageType.DEAD.value, message.incarnation, message.member_id, message.from_id]


def encode_message(message: Message) -> bytes:
    """One message, ready for `compound`. Raises `MalformedMessage` if it breaks the bounds the
    decoder enforces (so a node never sends what its peers would drop)."""
    fields = _message_fields(message)
    # Round-trip through the validator: the bounds live in one place.
    _decode_message(fields)
    inner: bytes = msgpack.packb(fields, use_bin_type=True)
    if len(inner) > MESSAGE_MAX_BYTES:
        raise MalformedMessage(f"message of {len(inner)} bytes exceeds {MESSAGE_MAX_BYTES}")
    wrapped: bytes = msgpack.packb(inner, use_bin_type=True)
    return wrapped


def compound(encoded_messages: Sequence[bytes]) -> bytes:
    """A packet body: a msgpack array header followed by already encoded messages."""
    count = len(encoded_messages)
    if count < 16:
        header = bytes([0x90 | count])
    elif count <= 0xFFFF:
        header = b"\xdc" + struct.pack(">H", count)
    else:
        raise MalformedMessage(f"{count} messages do not fit one packet")
    return header + b"".join(encoded_messages)


def encode_packet(messages: Sequence[Message]) -> bytes:
    """A packet body holding `messages`, in order."""
    return compound([encode_message(message) for message in messages])


def encode_push_pull(exchange: PushPull) -> bytes:
    """A push-pull exchange as msgpack bytes."""
    records = [
        [
            record.member_id,
            record.address.host,
            record.address.port,
            record.peer_port,
            dict(record.labels),
            _load_fields(record.load),
            record.incarnation,
            int(record.state),
        ]
        for record in exchange.members
    ]
    encoded: bytes = msgpack.packb([exchange.join, records], use_bin_type=True)
    if len(encoded) > STREAM_MAX_BYTES:
        raise MalformedMessage(f"state of {len(encoded)} bytes exceeds {STREAM_MAX_BYTES}")
    return encoded


# ---------------------------------------------------------------------------------------------
# Decoding: every value from the network is checked for type and bounds before use.


def _unpack(data: bytes, limit: int) -> Any:
    if len(data) > limit:
        raise MalformedMessage(f"{len(data)} bytes exceed the limit of {limit}")
    try:
        # unpackb bounds every container and string by the input length already.
        return msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        # msgpack signals garbage with ValueError subclasses (ExtraData, FormatError,
        # StackError, UnicodeDecodeError) and UnpackException; nothing else is expected.
        raise MalformedMessage(f"not msgpack: {error}") from None


def _integer(value: Any, what: str, low: int, high: int) -> int:
    # `type(...) is int` refuses bools, which msgpack keeps distinct from integers.
    if type(value) is not int or not low <= value <= high:
        raise MalformedMessage(f"{what} must be an integer in [{low}, {high}]")
    return value


def _text(value: Any, what: str, max_bytes: int, *, allow_empty: bool = False) -> str:
    if type(value) is not str:
        raise MalformedMessage(f"{what} must be a string")
    if not allow_empty and not value:
        raise MalformedMessage(f"{what} must not be empty")
    if len(value) > max_bytes:
        raise MalformedMessage(f"{what} exceeds {max_bytes} bytes")
    # ASCII text is as long in bytes as in characters; only other text needs encoding to count.
    if not value.isascii():
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError:
            raise MalformedMessage(f"{what} is not valid text") from None
        if size > max_bytes:
            raise MalformedMessage(f"{what} exceeds {max_bytes} bytes")
    return value


def _boolean(value: Any, what: str) -> bool:
    if type(value) is not bool:
        raise MalformedMessage(f"{what} must be a boolean")
    return value


def _array(value: Any, what: str, length: int) -> list[Any]:
    if type(value) is not list or len(value) != length:
        raise MalformedMessage(f"{what} must be an array of {length}")
    return value


def _address(host: Any, port: Any, what: str) -> Address:
    return Address(
        _text(host, f"{what} host", HOST_MAX_BYTES), _integer(port, f"{what} port", 1, PORT_MAX)
    )


def _sequence(value: Any) -> int:
    return _integer(value, "sequence", 0, SEQUENCE_MODULUS - 1)


def _member_id(value: Any, what: str = "member id") -> str:
    return _text(value, what, MEMBER_ID_MAX_BYTES)


def _labels(value: Any) -> dict[str, str]:
    if type(value) is not dict or len(value) > LABELS_MAX_COUNT:
        raise MalformedMessage(f"labels must be a map of at most {LABELS_MAX_COUNT} entries")
    return {
        _text(key, "label key", LABEL_KEY_MAX_BYTES): _text(
            item, "label value", LABEL_VALUE_MAX_BYTES, allow_empty=True
        )
        for key, item in value.items()
    }


def _load(value: Any) -> Load:
    fields = _array(value, "load", 3)
    return Load(
        _integer(fields[0], "free upload slots", 0, UINT64_MAX),
        _integer(fields[1], "upload bytes per second", 0, UINT64_MAX),
        _integer(fields[2], "download bytes per second", 0, UINT64_MAX),
    )


def _incarnation(value: Any) -> int:
    return _integer(value, "incarnation", 0, UINT64_MAX)


def _peer_port(value: Any) -> int:
    # 0 means the member serves no stream (no push-pull with it).
    return _integer(value, "peer port", 0, PORT_MAX)


# Each type's name (for error messages) and its number of fields, type code included.
_SHAPES = {
    MessageType.PING.value: ("ping", 6),
    MessageType.INDIRECT_PING.value: ("indirect ping", 9),
    MessageType.ACK.value: ("ack", 2),
    MessageType.NACK.value: ("nack", 2),
    MessageType.ALIVE.value: ("alive", 8),
    MessageType.SUSPECT.value: ("suspect", 4),
    MessageType.DEAD.value: ("dead", 4),
}
_PING = MessageType.PING.value
_INDIRECT_PING = MessageType.INDIRECT_PING.value
_ACK = MessageType.ACK.value
_NACK = MessageType.NACK.value
_ALIVE = MessageType.ALIVE.value
_SUSPECT = MessageType.SUSPECT.value


def _decode_message(fields: Any) -> Message:
    if type(fields) is not list or not fields or type(fields[0]) is not int:
        raise MalformedMessage("a message must be an array starting with its type")
    kind = fields[0]
    shape = _SHAPES.get(kind)
    if shape is None:
        raise MalformedMessage(f"unknown message type {kind}")
    f = _array(fields, shape[0], shape[1])
    if kind == _PING:
        return Ping(
            _sequence(f[1]),
            _text(f[2], "target id", MEMBER_ID_MAX_BYTES, allow_empty=True),
            _member_id(f[3], "source id"),
            _address(f[4], f[5], "source"),
        )
    if kind == _INDIRECT_PING:
        return IndirectPing(
            _sequence(f[1]),
            _member_id(f[2], "target id"),
            _address(f[3], f[4], "target"),
            _member_id(f[5], "source id"),
            _address(f[6], f[7], "source"),
            _boolean(f[8], "want nack"),
        )
    if kind == _ACK:
        return Ack(_sequence(f[1]))
    if kind == _NACK:
        return Nack(_sequence(f[1]))
    if kind == _ALIVE:
        return Alive(
            _incarnation(f[1]),
            _member_id(f[2]),
            _address(f[3], f[4], "member"),
            _peer_port(f[5]),
            _labels(f[6]),
            _load(f[7]),
        )
    if kind == _SUSPECT:
        return Suspect(_incarnation(f[1]), _member_id(f[2]), _member_id(f[3], "from id"))
    return Dead(_incarnation(f[1]), _member_id(f[2]), _member_id(f[3], "from id"))


# A decoded message memo grows to at most this many entries before it is emptied: a few seconds
# of gossip in a large cluster, a few hundred kilobytes.
MEMO_MAX_ENTRIES = 4096


def decode_packet(
    body: bytes, limit: int, memo: dict[bytes, Message] | None = None
) -> list[Message]:
    """The messages of a packet body of at most `limit` bytes; `MalformedMessage` otherwise.
    With a `memo`, messages seen before are not decoded again (messages are immutable)."""
    decoded = _unpack(body, limit)
    if type(decoded) is not list or not decoded:
        raise MalformedMessage("a packet must be a non-empty array of messages")
    messages: list[Message] = []
    for item in decoded:
        if type(item) is not bytes:
            raise MalformedMessage("a message must be wrapped in a msgpack bin")
        message = memo.get(item) if memo is not None else None
        if message is None:
            message = _decode_message(_unpack(item, MESSAGE_MAX_BYTES))
            if memo is not None:
                if len(memo) >= MEMO_MAX_ENTRIES:
                    memo.clear()
                memo[item] = message
        messages.append(message)
    return messages


_MEMBER_STATES = {int(state): state for state in MemberState}


def decode_push_pull(data: bytes) -> PushPull:
    """A push-pull exchange; `MalformedMessage` for anything invalid."""
    decoded = _array(_unpack(data, STREAM_MAX_BYTES), "push-pull", 2)
    if type(decoded[1]) is not list:
        raise MalformedMessage("push-pull members must be an array")
    records = []
    for item in decoded[1]:
        f = _array(item, "member record", 8)
        state = _MEMBER_STATES.get(_integer(f[7], "member state", 0, 255))
        if state is None:
            raise MalformedMessage(f"unknown member state {f[7]}")
        records.append(
            MemberRecord(
                _member_id(f[0]),
                _address(f[1], f[2], "member"),
                _peer_port(f[3]),
                _labels(f[4]),
                _load(f[5]),
                _incarnation(f[6]),
                state,
            )
        )
    return PushPull(_boolean(decoded[0], "join"), tuple(records))
