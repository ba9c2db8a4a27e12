"""Real UDP sockets on 127.0.0.1 and the real asyncio clock: a few members converge, one leaves,
one dies, garbage datagrams are counted, all in real time with short intervals."""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import AsyncIterator, Callable

import pytest

from d7y_node.gossip import (
    ClusterKey,
    GossipConfig,
    LocalMember,
    LoopClock,
    Membership,
    MemberState,
    UdpTransport,
    resolve,
)

# Ten times faster than the LAN defaults, still far above loopback round trips.
FAST = GossipConfig(
    probe_interval=0.1,
    probe_timeout=0.05,
    gossip_interval=0.02,
    reconnect_interval=0.5,
    push_pull_interval=1.0,
)
SIZE = 4


async def eventually(condition: Callable[[], bool], within: float) -> float:
    """Seconds until `condition()` holds; fails the test after `within` seconds."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not condition():
        if loop.time() - started > within:
            pytest.fail(f"not within {within} s")
        await asyncio.sleep(0.01)
    return loop.time() - started


@pytest.fixture
async def members() -> AsyncIterator[list[tuple[Membership, UdpTransport]]]:
    started: list[tuple[Membership, UdpTransport]] = []
    key = ClusterKey(b"udp test secret")
    for index in range(SIZE):
        transport = await UdpTransport.bind("127.0.0.1", 0)
        member = Membership(
            local=LocalMember(f"udp{index}", transport.local_address, labels={"zone": "z"}),
            transport=transport,
            clock=LoopClock(),
            rng=random.Random(index),
            config=FAST,
            cluster_key=key,
        )
        member.start()
        started.append((member, transport))
    yield started
    for member, transport in started:
        member.stop()
        transport.close()


def all_see(observers: list[Membership], member_id: str, state: MemberState) -> Callable[[], bool]:
    return lambda: all(observer.state_of(member_id) is state for observer in observers)


async def test_members_on_real_sockets_join_leave_and_die(
    members: list[tuple[Membership, UdpTransport]],
) -> None:
    memberships = [member for member, _ in members]
    seed = memberships[0].local.address
    for member in memberships[1:]:
        member.join([seed])
    ids = {member.member_id for member in memberships}
    joined = await eventually(
        lambda: all(m.member_ids(MemberState.ALIVE) == ids for m in memberships), within=5.0
    )

    # Garbage from a stranger: counted, never fatal.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
        target = memberships[1].local.address
        for payload in (b"\x00garbage", b"\x02" + b"\xff" * 40, b"\x01\x91\x92\x03"):
            stranger.sendto(payload, (target.host, target.port))
    await eventually(lambda: memberships[1].stats.dropped_unauthenticated >= 3, within=2.0)

    leaver, victim, observers = memberships[3], memberships[2], memberships[:2]
    assert await leaver.leave_and_wait(2.0)
    leaver.stop()
    members[3][1].close()
    left = await eventually(all_see(observers, leaver.member_id, MemberState.LEFT), within=2.0)

    victim.stop()
    members[2][1].close()
    dead = await eventually(all_see(observers, victim.member_id, MemberState.DEAD), within=8.0)
    print(f"\nUDP: joined in {joined:.2f} s, left seen in {left:.2f} s, dead in {dead:.2f} s")
    assert all(m.state_of(leaver.member_id) is MemberState.LEFT for m in observers)


async def test_resolve_gives_every_address_of_a_name() -> None:
    addresses = await resolve("localhost", 7946)
    assert addresses and all(address.port == 7946 for address in addresses)
    assert {address.host for address in addresses} <= {"127.0.0.1", "::1"}
