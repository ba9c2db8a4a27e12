"""Membership behaviours one at a time, on small simulated clusters: refutation, indirect
probes, Lifeguard health, metadata updates, reaping, restarts, observers, push-pull."""

from __future__ import annotations

import pytest

from d7y_node.errors import MalformedMessage
from d7y_node.gossip import (
    Address,
    EventKind,
    GossipConfig,
    Load,
    Member,
    Membership,
    MemberState,
)
from d7y_node.gossip.auth import NoKey, Purpose
from d7y_node.gossip.messages import Suspect, encode_packet
from tests.gossip.simulation import Cluster


def small_cluster(size: int = 5, *, seed: int = 1, config: GossipConfig | None = None) -> Cluster:
    cluster = Cluster(seed=seed, config=config)
    cluster.start(size)
    assert cluster.clock.run_until(cluster.converged, timeout=10.0)
    cluster.clock.advance(5.0)
    return cluster


def view(observer: Membership, member_id: str) -> Member:
    """What `observer` knows of `member_id` (which it must know)."""
    member = observer.member(member_id)
    assert member is not None, f"{observer.member_id} does not know {member_id}"
    return member


def events_of(cluster: Cluster, kind: EventKind, since: float = 0.0) -> list[str]:
    return [
        event.member.member_id
        for recorded in cluster.recorded.values()
        for at, event in recorded.events
        if event.kind is kind and at >= since
    ]


def test_a_member_refutes_a_false_suspicion_with_a_new_incarnation() -> None:
    cluster = small_cluster()
    accused = cluster.members[1]
    before = view(accused, "m001")
    # Member 2 hears (from member 0's address) that member 1 is suspect.
    lie = encode_packet([Suspect(before.incarnation, "m001", "m000")])
    cluster.network.inject(
        cluster.members[0].local.address,
        cluster.members[2].local.address,
        NoKey().seal(Purpose.PACKET, lie),
    )
    cluster.clock.advance(0.01)
    assert cluster.members[2].state_of("m001") is MemberState.SUSPECT
    assert cluster.clock.run_until(
        lambda: (
            cluster.all_see("m001", MemberState.ALIVE)
            and all(view(m, "m001").incarnation > before.incarnation for m in cluster.members)
        ),
        timeout=3.0,
    )
    assert accused.stats.refutations == 1
    cluster.clock.advance(30.0)
    assert events_of(cluster, EventKind.DEAD) == []
    # The suspicion and its refutation were both reported.
    assert "m001" in events_of(cluster, EventKind.SUSPECT)
    assert "m001" in events_of(cluster, EventKind.UPDATE)


def test_a_broken_link_is_bridged_by_indirect_probes() -> None:
    cluster = small_cluster()
    since = cluster.clock.now()
    cluster.network.cut(
        cluster.members[0].local.address.host, cluster.members[1].local.address.host
    )
    cluster.clock.advance(30.0)
    assert cluster.members[0].stats.probes_failed == 0
    assert events_of(cluster, EventKind.SUSPECT, since) == []
    assert cluster.converged()
    # The helpers' nacks never came (they did reach member 1), and member 0 stays healthy.
    assert cluster.members[0].health_score == 0


def test_an_isolated_member_loses_confidence_in_itself() -> None:
    cluster = small_cluster()
    lonely = cluster.members[0]
    cluster.network.partition([[lonely.local.address.host]])
    cluster.clock.advance(20.0)
    # No acks and no nacks either: Lifeguard blames itself, up to the maximum multiplier.
    assert lonely.health_score == GossipConfig().awareness_max_multiplier - 1
    cluster.network.heal()
    assert cluster.clock.run_until(cluster.converged, timeout=60.0)
    # Every successful probe takes one point off, at the stretched interval: 8 + 7 + ... + 2 s.
    assert cluster.clock.run_until(lambda: lonely.health_score == 0, timeout=60.0)


def test_a_load_and_label_update_reaches_everyone_with_a_new_incarnation() -> None:
    cluster = small_cluster()
    member = cluster.members[2]
    before = view(member, "m002")
    member.update(
        load=Load(free_upload_slots=3, upload_bytes_per_second=1000), labels={"zone": "b"}
    )
    since = cluster.clock.now()

    def everyone_sees_it() -> bool:
        views = [view(observer, "m002") for observer in cluster.members]
        return all(v.load.free_upload_slots == 3 and v.labels == {"zone": "b"} for v in views)

    assert cluster.clock.run_until(everyone_sees_it, timeout=2.0, check_every=0.01)
    assert view(cluster.members[0], "m002").incarnation == before.incarnation + 1
    assert events_of(cluster, EventKind.UPDATE, since).count("m002") == len(cluster.members)
    with pytest.raises(MalformedMessage):
        member.update(labels={"k" * 100: "v"})


def test_dead_members_are_reaped_after_the_retention_time() -> None:
    cluster = small_cluster(config=GossipConfig(dead_member_retention=20.0))
    cluster.kill(cluster.members[4])
    observers = cluster.members[:4]
    assert cluster.clock.run_until(
        lambda: cluster.all_see("m004", MemberState.DEAD, observers), timeout=30.0
    )
    assert cluster.clock.run_until(
        lambda: all(observer.member("m004") is None for observer in observers), timeout=30.0
    )
    assert cluster.converged(observers)


@pytest.mark.parametrize("new_host", [None, "10.0.7.7"], ids=["same-address", "new-address"])
def test_a_restarted_member_is_welcome_back(new_host: str | None) -> None:
    cluster = small_cluster()
    cluster.kill(cluster.members[4])
    observers = cluster.members[:4]
    assert cluster.clock.run_until(
        lambda: cluster.all_see("m004", MemberState.DEAD, observers), timeout=30.0
    )
    dead_incarnation = view(observers[0], "m004").incarnation
    since = cluster.clock.now()
    # The same id, starting again from incarnation 1, at the same or at another address.
    restarted = cluster.add(index=4, host=new_host)
    restarted.join([observers[1].local.address])
    assert cluster.clock.run_until(cluster.converged, timeout=5.0, check_every=0.01)
    welcomed = view(observers[0], "m004")
    assert welcomed.incarnation > 1
    if new_host is None:
        # It learned of its death and outbid it.
        assert welcomed.incarnation > dead_incarnation
    else:
        assert welcomed.address == Address(new_host, 7946)
    assert events_of(cluster, EventKind.JOIN, since).count("m004") >= len(observers)


def test_leaving_alone_finishes_at_once_and_nothing_is_sent_after_stop() -> None:
    cluster = Cluster(seed=3)
    alone = cluster.add()
    done: list[bool] = []
    alone.leave(lambda: done.append(True))
    assert done == [True]
    alone.stop()
    sent = cluster.network.packets_sent
    cluster.clock.advance(10.0)
    assert cluster.network.packets_sent == sent


def test_an_observer_that_raises_does_not_break_membership() -> None:
    cluster = Cluster(seed=4)
    first = cluster.add()
    seen: list[EventKind] = []

    def broken(_event: object) -> None:
        raise RuntimeError("observer bug")

    first.subscribe(broken)
    unsubscribe = first.subscribe(lambda event: seen.append(event.kind))
    cluster.add().join([first.local.address])
    assert cluster.clock.run_until(cluster.converged, timeout=5.0)
    assert seen == [EventKind.JOIN]
    unsubscribe()
    cluster.add().join([first.local.address])
    assert cluster.clock.run_until(cluster.converged, timeout=5.0)
    assert seen == [EventKind.JOIN]


def test_a_joining_member_gets_the_whole_membership_in_one_push_pull() -> None:
    cluster = small_cluster(10)
    newcomer = cluster.add()
    newcomer.join([cluster.members[3].local.address])
    # Two round trips (the join ping, then the exchange): far too soon for gossip to have told
    # it about the other eight, whose own alive broadcasts ran out long ago.
    cluster.clock.advance(0.02)
    assert len(newcomer.member_ids(MemberState.ALIVE)) == 11
    assert newcomer.stats.push_pulls == 1 and newcomer.stats.push_pull_failures == 0


@pytest.mark.parametrize("push_pull_interval", [3.0, 3600.0], ids=["push-pull", "none"])
def test_periodic_push_pull_repairs_an_update_that_gossip_missed(push_pull_interval: float) -> None:
    # Slow probes, so that a short isolation causes no suspicion (whose refutation would carry
    # the news too): only push-pull can deliver an update whose gossip has run out.
    config = GossipConfig(
        probe_interval=5.0, probe_timeout=2.0, push_pull_interval=push_pull_interval
    )
    cluster = small_cluster(seed=7, config=config)
    isolated = cluster.members[1]
    since = cluster.clock.now()
    cluster.network.partition([[isolated.local.address.host]])
    cluster.members[2].update(load=Load(free_upload_slots=7))
    cluster.clock.advance(1.0)
    cluster.network.heal()

    def learned() -> bool:
        return view(isolated, "m002").load.free_upload_slots == 7

    assert cluster.clock.run_until(learned, timeout=20.0) is (push_pull_interval < 20.0)
    assert events_of(cluster, EventKind.SUSPECT, since) == []


def test_members_view_lists_every_state() -> None:
    cluster = small_cluster(6)
    cluster.members[5].leave()
    cluster.clock.advance(1.0)
    cluster.kill(cluster.members[5])
    cluster.kill(cluster.members[4])
    observer = cluster.members[0]
    assert cluster.clock.run_until(
        lambda: observer.state_of("m004") is MemberState.SUSPECT, timeout=10.0
    )
    states = {member.member_id: member.state for member in observer.members()}
    assert states["m004"] is MemberState.SUSPECT and states["m005"] is MemberState.LEFT
    assert cluster.clock.run_until(lambda: observer.state_of("m004") is MemberState.DEAD, 60.0)
    assert [m.member_id for m in observer.members(MemberState.DEAD)] == ["m004"]
    assert [m.member_id for m in observer.members(MemberState.LEFT)] == ["m005"]
    assert len(observer.members(MemberState.ALIVE)) == 4
    assert observer.member("m000") is not None
    assert view(observer, "m000").peer_address == Address("10.0.0.1", 65002)


def run_scenario(seed: int) -> tuple[list[tuple[float, str, str, str]], int]:
    cluster = small_cluster(12, seed=seed)
    cluster.network.loss = 0.2
    cluster.kill(cluster.members[3])
    cluster.clock.advance(30.0)
    log = [
        (at, observer, event.kind.value, event.member.member_id)
        for observer, recorded in sorted(cluster.recorded.items())
        for at, event in recorded.events
    ]
    return log, cluster.network.packets_sent


def test_a_simulation_is_a_pure_function_of_its_seed() -> None:
    first, second, other = run_scenario(21), run_scenario(21), run_scenario(22)
    assert first == second
    assert first != other


def test_update_before_start_changes_what_is_announced() -> None:
    cluster = Cluster(seed=5)
    first = cluster.add()
    fresh = cluster.add(start=False)
    fresh.update(load=Load(free_upload_slots=9))
    fresh.start()
    fresh.join([first.local.address])
    assert cluster.clock.run_until(
        lambda: "m001" in first.member_ids() and view(first, "m001").load.free_upload_slots == 9,
        timeout=3.0,
    )
    assert view(fresh, "m001").incarnation == 1


def test_members_started_before_their_seed_join_it_within_seconds() -> None:
    # Hosts started at the same moment: the joiners' first pings find no seed yet.
    cluster = Cluster(seed=5)
    seed = cluster.add(start=False)
    joiners = [cluster.add() for _ in range(3)]
    for joiner in joiners:
        joiner.join([seed.local.address])
    cluster.clock.advance(5.0)
    seed.start()
    started = cluster.clock.now()
    assert cluster.clock.run_until(cluster.converged, timeout=30.0)
    # The rejoin interval (1 s), not the 30 s reconnect interval, bounds the wait.
    assert cluster.clock.now() - started < 2.5
