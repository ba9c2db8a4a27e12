"""Issue 3, item 6: a 100-member cluster in simulation (join, silent death, loss, partition,
wrong key, garbage, graceful leave). Deterministic: every run of a seed is the same run.

The figures these runs measure are printed (`pytest -s`) for the report and the README.
"""

from __future__ import annotations

import random

import msgpack

from d7y_node.gossip import Address, ClusterKey, EventKind, GossipConfig, Load, MemberState
from d7y_node.gossip.auth import Purpose
from d7y_node.gossip.messages import Ack, MemberRecord, PushPull, encode_packet, encode_push_pull
from d7y_node.gossip.suspicion import suspicion_timeout
from tests.gossip.simulation import GOSSIP_PORT, PEER_PORT, Cluster

SIZE = 100


def converged_cluster(
    seed: int,
    size: int = SIZE,
    *,
    config: GossipConfig | None = None,
    secret: bytes | None = None,
) -> Cluster:
    cluster = Cluster(seed=seed, config=config, secret=secret)
    cluster.start(size, join_every=0.01)
    assert cluster.clock.run_until(cluster.converged, timeout=30.0)
    # Let the join gossip settle, so the measurements below see a steady cluster.
    cluster.clock.advance(10.0)
    assert cluster.converged()
    return cluster


def dead_events(cluster: Cluster, since: float) -> list[tuple[str, str]]:
    return [
        (observer, event.member.member_id)
        for observer, recorded in cluster.recorded.items()
        for at, event in recorded.events
        if event.kind is EventKind.DEAD and at >= since
    ]


def test_a_new_member_is_known_by_all_within_a_few_seconds() -> None:
    cluster = converged_cluster(seed=11)
    started = cluster.clock.now()
    newcomer = cluster.add()
    newcomer.join([cluster.members[37].local.address])

    def everyone_knows() -> bool:
        return (
            cluster.all_see(newcomer.member_id, MemberState.ALIVE)
            and len(newcomer.member_ids(MemberState.ALIVE)) == SIZE + 1
        )

    assert cluster.clock.run_until(everyone_knows, timeout=5.0, check_every=0.01)
    print(f"\njoin known by all {SIZE} in {cluster.clock.now() - started:.2f} s (simulated)")
    assert cluster.clock.now() - started <= 3.0


def test_a_silently_killed_member_is_declared_dead_by_all_in_time() -> None:
    cluster = converged_cluster(seed=12)
    victim = cluster.members[50]
    killed_at = cluster.clock.now()
    cluster.kill(victim)
    # The Lifeguard minimum for 100 members (8 s), plus a few probe rounds to notice and to
    # collect the confirmations that bring the timeout down to that minimum.
    bound = suspicion_timeout(4, SIZE, 1.0) + 5 * 1.0
    assert cluster.clock.run_until(
        lambda: cluster.all_see(victim.member_id, MemberState.DEAD), timeout=60.0
    )
    detected = cluster.clock.now() - killed_at
    first_suspect = min(
        at
        for recorded in cluster.recorded.values()
        for at in recorded.of(EventKind.SUSPECT, victim.member_id)
    )
    print(
        f"\nsilent death: first suspicion after {first_suspect - killed_at:.2f} s, "
        f"dead for all after {detected:.2f} s (bound {bound:.0f} s)"
    )
    assert detected <= bound
    # Nobody else was declared dead, and nobody declared the victim dead before the minimum.
    assert {member for _, member in dead_events(cluster, killed_at)} == {victim.member_id}
    assert all(
        at - first_suspect >= suspicion_timeout(4, SIZE - 1, 1.0) - 0.01
        for recorded in cluster.recorded.values()
        for at in recorded.of(EventKind.DEAD, victim.member_id)
    )


def test_ten_percent_packet_loss_for_a_minute_kills_nobody() -> None:
    cluster = converged_cluster(seed=13)
    since = cluster.clock.now()
    cluster.network.loss = 0.10
    cluster.clock.advance(60.0)
    suspicions = sum(
        1
        for recorded in cluster.recorded.values()
        for at, event in recorded.events
        if event.kind is EventKind.SUSPECT and at >= since
    )
    refutations = sum(member.stats.refutations for member in cluster.members)
    print(
        f"\n10% loss, 60 s: {suspicions} suspicion events, {refutations} refutations, "
        f"{len(dead_events(cluster, since))} false deaths"
    )
    assert dead_events(cluster, since) == []
    # Every packet fit the UDP limit, however much gossip was piggybacked.
    assert 1000 < cluster.network.largest_packet <= GossipConfig().packet_size_limit
    # The loss did bite (the test is not vacuous): suspicions were raised and refuted.
    assert refutations > 0
    cluster.network.loss = 0.0
    assert cluster.clock.run_until(cluster.converged, timeout=10.0)


def test_a_partition_heals_back_into_one_membership() -> None:
    size = 40
    cluster = converged_cluster(
        seed=14, size=size, config=GossipConfig(reconnect_interval=10.0, push_pull_interval=15.0)
    )
    left, right = cluster.members[: size // 2], cluster.members[size // 2 :]
    cluster.network.partition([[member.local.address.host for member in left]])
    split_at = cluster.clock.now()

    # Each side declares the other side dead...
    def split_complete() -> bool:
        return all(
            cluster.all_see(member.member_id, MemberState.DEAD, observers)
            for side, observers in ((left, right), (right, left))
            for member in side
        )

    assert cluster.clock.run_until(split_complete, timeout=90.0, check_every=0.5)
    split = cluster.clock.now() - split_at
    assert cluster.converged(left) and cluster.converged(right)
    cluster.clock.advance(20.0)
    cluster.network.heal()
    healed_at = cluster.clock.now()
    # ...and after the heal, reconnection and push-pull merge both sides again.
    assert cluster.clock.run_until(cluster.converged, timeout=60.0, check_every=0.5)
    print(
        f"\npartition {size // 2}/{size // 2}: sides split after {split:.1f} s, "
        f"one membership again {cluster.clock.now() - healed_at:.1f} s after the heal"
    )


def test_a_member_with_the_wrong_key_is_never_admitted_and_garbage_is_counted() -> None:
    size = 20
    cluster = converged_cluster(seed=15, size=size, secret=b"cluster secret")
    members = list(cluster.members)
    intruder = cluster.add(secret=b"another secret")
    intruder.join([members[0].local.address, members[5].local.address])
    keyless = cluster.add(keyless=True)
    keyless.join([members[0].local.address])
    target = members[3]
    sender = Address("10.9.9.9", GOSSIP_PORT)
    key = ClusterKey(b"cluster secret")
    valid = key.seal(Purpose.PACKET, encode_packet([Ack(1)]))
    rng = random.Random(15)
    garbage: list[bytes] = [
        valid[:-1] + bytes([valid[-1] ^ 1]),  # tampered body
        valid[:5] + bytes([valid[5] ^ 0x80]) + valid[6:],  # tampered tag
        b"",
        b"\x02",
        bytes(rng.getrandbits(8) for _ in range(300)),
        key.seal(Purpose.PACKET, b"\xc1garbage"),  # authentic, but not msgpack
        key.seal(Purpose.PACKET, msgpack.packb([[5, "not an incarnation"]])),
        key.seal(Purpose.PACKET, b"\x90" * 2000),  # authentic, but oversized
    ]
    for payload in garbage:
        cluster.network.inject(sender, target.local.address, payload)
    # A push-pull under another key, claiming one more member: refused, nothing merged.
    forged = ClusterKey(b"another secret").seal(
        Purpose.STREAM,
        encode_push_pull(
            PushPull(True, (MemberRecord("forged", sender, 1, {}, Load(), 9, MemberState.ALIVE),))
        ),
    )
    replies: list[bytes | None] = []
    stream_address = Address(target.local.address.host, PEER_PORT)
    cluster.network.exchange(sender, stream_address, forged, 5.0, replies.append)
    cluster.clock.advance(30.0)
    assert replies == [b""]
    assert target.stats.streams_unauthenticated == 1
    assert all("forged" not in member.member_ids() for member in cluster.members)

    for member in members:
        assert member.member_ids() == {m.member_id for m in members}
    assert intruder.member_ids() == {intruder.member_id}
    assert keyless.member_ids() == {keyless.member_id}
    assert cluster.converged(members)
    dropped = sum(member.stats.dropped_unauthenticated for member in members)
    stats = target.stats
    print(
        f"\nwrong key: {dropped} packets dropped unauthenticated; garbage at {target.member_id}: "
        f"{stats.dropped_unauthenticated} unauthenticated, {stats.dropped_malformed} malformed, "
        f"{stats.dropped_oversized} oversized"
    )
    assert dropped > 0
    # Nobody ever answered the intruder: it is unknown to them, not just ignored by it.
    assert intruder.stats.packets_received == 0 and keyless.stats.packets_received == 0
    assert stats.dropped_malformed >= 2
    assert stats.dropped_oversized >= 1
    assert stats.dropped_unauthenticated >= 5


def test_a_graceful_leave_is_seen_as_left_not_dead() -> None:
    size = 30
    cluster = converged_cluster(seed=16, size=size)
    leaver = cluster.members[12]
    done: list[float] = []
    since = cluster.clock.now()
    leaver.leave(lambda: done.append(cluster.clock.now()))
    assert cluster.clock.run_until(lambda: bool(done), timeout=10.0, check_every=0.01)
    cluster.kill(leaver)  # after the announcement: the process exits
    assert cluster.clock.run_until(
        lambda: cluster.all_see(leaver.member_id, MemberState.LEFT), timeout=5.0, check_every=0.01
    )
    print(f"\nleave known by all {size - 1} after {cluster.clock.now() - since:.2f} s")
    # Well past any suspicion timeout: still "left", never "dead".
    cluster.clock.advance(40.0)
    assert cluster.all_see(leaver.member_id, MemberState.LEFT)
    assert dead_events(cluster, since) == []
    assert all(
        len(recorded.of(EventKind.LEAVE, leaver.member_id)) == 1
        for member_id, recorded in cluster.recorded.items()
        if member_id != leaver.member_id
    )
