"""The wire format: round trips, bounds, and a fuzzed decoder that only ever says "malformed"."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from d7y_node.errors import MalformedMessage
from d7y_node.gossip.messages import (
    LABELS_MAX_COUNT,
    MEMBER_ID_MAX_BYTES,
    STREAM_MAX_BYTES,
    Ack,
    Address,
    Alive,
    Dead,
    IndirectPing,
    Load,
    MemberRecord,
    MemberState,
    Message,
    Nack,
    Ping,
    PushPull,
    Suspect,
    compound,
    decode_packet,
    decode_push_pull,
    encode_message,
    encode_packet,
    encode_push_pull,
)

LIMIT = 1400
HERE = Address("10.0.0.1", 7946)
THERE = Address("fd00::2", 7946)

EXAMPLES: list[Message] = [
    Ping(1, "", "a", HERE),
    Ping(2**32 - 1, "b", "a", THERE),
    IndirectPing(7, "b", THERE, "a", HERE, want_nack=True),
    Ack(0),
    Nack(9),
    Alive(3, "a", HERE, 65002, {"zone": "eu-1", "rack": "r7"}, Load(4, 10_000_000, 0)),
    Alive(2**64 - 1, "ünïcode-id", THERE, 0, {}, Load()),
    Suspect(3, "b", "a"),
    Dead(3, "b", "b"),
]


def test_every_message_type_round_trips_alone_and_in_one_compound_packet() -> None:
    for message in EXAMPLES:
        assert decode_packet(encode_packet([message]), LIMIT) == [message]
    assert decode_packet(encode_packet(EXAMPLES), LIMIT) == EXAMPLES
    # More than 15 messages need the 3-byte array header.
    many = [Ack(index) for index in range(40)]
    assert decode_packet(compound([encode_message(m) for m in many]), LIMIT) == many


def test_a_memo_returns_the_same_messages_without_decoding_them_again() -> None:
    memo: dict[bytes, Message] = {}
    body = encode_packet(EXAMPLES)
    first = decode_packet(body, LIMIT, memo)
    assert len(memo) == len(EXAMPLES)
    again = decode_packet(body, LIMIT, memo)
    assert again == first and all(a is b for a, b in zip(again, first, strict=True))


def test_an_alive_message_at_every_bound_still_fits_a_packet_with_a_ping() -> None:
    largest = Alive(
        2**64 - 1,
        "i" * MEMBER_ID_MAX_BYTES,
        Address("h" * 64, 65535),
        65535,
        {f"k{index:031}": "v" * 64 for index in range(LABELS_MAX_COUNT)},
        Load(2**64 - 1, 2**64 - 1, 2**64 - 1),
    )
    packet = encode_packet(
        [
            Ping(1, "i" * MEMBER_ID_MAX_BYTES, "j" * MEMBER_ID_MAX_BYTES, Address("h" * 64, 1)),
            largest,
        ]
    )
    assert len(packet) + 17 <= LIMIT
    assert decode_packet(packet, LIMIT)[1] == largest


@pytest.mark.parametrize(
    "message",
    [
        Alive(1, "x" * (MEMBER_ID_MAX_BYTES + 1), HERE, 0),
        Alive(1, "", HERE, 0),
        Alive(1, "a", Address("h", 0), 0),
        Alive(1, "a", HERE, 70000),
        Alive(-1, "a", HERE, 0),
        Alive(1, "a", HERE, 0, {f"k{index}": "v" for index in range(LABELS_MAX_COUNT + 1)}),
        Alive(1, "a", HERE, 0, {"k" * 33: "v"}),
        Alive(1, "a", HERE, 0, {"k": "é" * 33}),  # 66 bytes of UTF-8 in 33 characters
        Alive(1, "a\ud800", HERE, 0),  # a lone surrogate cannot be encoded
        Alive(1, "a", HERE, 0, {}, Load(-1, 0, 0)),
        Ping(2**32, "", "a", HERE),
    ],
)
def test_a_message_out_of_bounds_is_refused_when_encoding(message: Message) -> None:
    with pytest.raises(MalformedMessage):
        encode_message(message)


def packet(*messages: object) -> bytes:
    """A packet body of hand-made message fields, each wrapped in its bin as on the wire."""
    return msgpack.packb([msgpack.packb(fields) for fields in messages])


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\x90",  # an empty packet
        packet([99, 1]),  # unknown type
        packet([3]),  # ack without its sequence
        packet([3, 1, 2]),  # one field too many
        packet([3, True]),  # a bool is not a sequence number
        packet([3, -1]),
        packet([3, 1.0]),
        packet([6, 1, "a", b"bytes"]),  # bytes where text belongs
        packet([5, 1, "a", "h", 1, 0, {"k": 1}, [0, 0, 0]]),
        packet([5, 1, "a", "h", 1, 0, {}, [0, 0]]),
        packet([2, 1, "b", "h", 1, "a", "h", 1, 1]),  # want_nack must be a bool
        packet([3, 1], "not a message"),
        msgpack.packb([[3, 1]]),  # a message not wrapped in its bin
        msgpack.packb({"not": "a list"}),
        msgpack.packb([msgpack.packb([3, 1]) + b"\x00"]),  # trailing bytes inside the bin
        packet([3, 1]) + b"\x00",  # trailing bytes after the packet
        msgpack.packb([msgpack.ExtType(1, b"x")]),
        packet([msgpack.ExtType(1, b"x")]),
        b"\xc1",  # a byte msgpack never uses
        b"\x91\xdd\xff\xff\xff\xff",  # claims 4 billion elements
        b"\x91" * 5000,  # deep nesting
        msgpack.packb([b"\x91" * 1000]),
    ],
)
def test_a_malformed_packet_raises_only_malformed_message(body: bytes) -> None:
    with pytest.raises(MalformedMessage):
        decode_packet(body, LIMIT)


def test_a_packet_over_the_limit_is_refused_before_decoding() -> None:
    body = encode_packet([Ack(index) for index in range(300)])
    assert len(body) > 600
    with pytest.raises(MalformedMessage, match="limit"):
        decode_packet(body, 600)


def test_push_pull_round_trips_and_rejects_bad_records() -> None:
    exchange = PushPull(
        True,
        tuple(
            MemberRecord(f"m{index}", HERE, 65002, {"zone": "a"}, Load(1, 2, 3), index, state)
            for index, state in enumerate(MemberState)
        ),
    )
    assert decode_push_pull(encode_push_pull(exchange)) == exchange
    for bad in (
        msgpack.packb([True, [["m", "h", 1, 0, {}, [0, 0, 0], 1, 9]]]),  # unknown state
        msgpack.packb([True, [["m", "h", 1, 0, {}, [0, 0, 0], 1]]]),
        msgpack.packb([1, []]),
        msgpack.packb([True, {}]),
        b"\xda",
    ):
        with pytest.raises(MalformedMessage):
            decode_push_pull(bad)
    with pytest.raises(MalformedMessage):
        decode_push_pull(b"\x00" * (STREAM_MAX_BYTES + 1))


# ---------------------------------------------------------------------------------------------
# Fuzzing: whatever the bytes, the decoders return valid messages or raise MalformedMessage.

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.sampled_from([0, 1, 65535, 65536, 2**32, 2**64 - 1])
    | st.floats(allow_nan=False)
    | st.text(max_size=12)
    | st.binary(max_size=12)
)
# A field is a scalar, or one level of array or map (labels and loads are both).
fields_strategy = (
    scalars
    | st.lists(scalars, max_size=4)
    | st.dictionaries(st.text(max_size=8), scalars, max_size=3)
)
VALID_PACKET = encode_packet(EXAMPLES)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=LIMIT))
def test_fuzz_random_bytes(data: bytes) -> None:
    try:
        messages = decode_packet(data, LIMIT)
    except MalformedMessage:
        return
    assert messages and all(isinstance(message, Message) for message in messages)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(fields_strategy, max_size=10), max_size=4))
def test_fuzz_well_formed_msgpack_of_the_wrong_shape(value: list[list[object]]) -> None:
    # Shapes that look like messages (arrays of arrays), with a real type code first half the
    # time, reach the field validators rather than the msgpack parser.
    for index, fields in enumerate(value):
        if fields and index % 2 == 0:
            fields[0] = index % 8
    try:
        messages = decode_packet(packet(*value), LIMIT)
    except MalformedMessage:
        return
    for message in messages:
        assert decode_packet(encode_packet([message]), LIMIT) == [message]


@settings(max_examples=400, deadline=None)
@given(st.integers(0, len(VALID_PACKET) - 1), st.integers(0, 255), st.booleans())
def test_fuzz_mutated_valid_packets(position: int, value: int, truncate: bool) -> None:
    data = (
        VALID_PACKET[:position]
        if truncate
        else (VALID_PACKET[:position] + bytes([value]) + VALID_PACKET[position + 1 :])
    )
    try:
        messages = decode_packet(data, LIMIT)
    except MalformedMessage:
        return
    for message in messages:
        encode_message(message)  # anything accepted is within bounds


VALID_PUSH_PULL = encode_push_pull(
    PushPull(False, (MemberRecord("m", HERE, 1, {"zone": "a"}, Load(), 1, MemberState.DEAD),))
)


@settings(max_examples=150, deadline=None)
@given(
    st.binary(max_size=400)
    | st.lists(st.lists(fields_strategy, max_size=9), max_size=3).map(
        lambda records: msgpack.packb([False, records])
    )
    | st.tuples(st.integers(0, len(VALID_PUSH_PULL) - 1), st.integers(0, 255)).map(
        lambda change: (
            VALID_PUSH_PULL[: change[0]] + bytes([change[1]]) + VALID_PUSH_PULL[change[0] + 1 :]
        )
    )
)
def test_fuzz_push_pull_decoder(data: bytes) -> None:
    try:
        exchange = decode_push_pull(data)
    except MalformedMessage:
        return
    assert decode_push_pull(encode_push_pull(exchange)) == exchange
