"""A cluster of `Membership`s on a `SimulatedNetwork` and a `VirtualClock`, for the gossip tests.

Owns building members with distinct hosts and seeds, and the questions the tests ask of the whole
cluster (does everyone see X as Y?). Every run is a pure function of the seed.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field

from d7y_node.gossip import (
    Address,
    ClusterKey,
    EventKind,
    GossipConfig,
    LocalMember,
    MemberEvent,
    Membership,
    MemberState,
    SimulatedNetwork,
    VirtualClock,
)
from d7y_node.gossip.transport import SimulatedTransport

GOSSIP_PORT = 7946
PEER_PORT = 65002


def host_of(index: int) -> str:
    return f"10.0.{index // 250}.{index % 250 + 1}"


@dataclass
class Recorded:
    """Events seen by one member, with their virtual time."""

    events: list[tuple[float, MemberEvent]] = field(default_factory=list)

    def of(self, kind: EventKind, member_id: str) -> list[float]:
        return [
            at
            for at, event in self.events
            if event.kind is kind and event.member.member_id == member_id
        ]


class Cluster:
    """Members on one simulated network; members[i] has id `m{i:03}` and host `host_of(i)`."""

    def __init__(
        self, *, seed: int = 1, config: GossipConfig | None = None, secret: bytes | None = None
    ) -> None:
        self.clock = VirtualClock()
        self.network = SimulatedNetwork(self.clock, seed)
        self.config = config or GossipConfig()
        self.seed = seed
        self.secret = secret
        self.members: list[Membership] = []
        self.recorded: dict[str, Recorded] = {}
        self.transports: dict[Address, SimulatedTransport] = {}

    def add(
        self,
        *,
        secret: bytes | None = None,
        keyless: bool = False,
        labels: dict[str, str] | None = None,
        index: int | None = None,
        host: str | None = None,
        start: bool = True,
    ) -> Membership:
        """One more member, started unless `start` is False, not joined. It uses the cluster's
        secret unless given another `secret`, or none at all if `keyless`. With `index`, it
        replaces (restarts) member `index`: same id, and the same host unless another `host`."""
        if index is None:
            index = len(self.members)
        else:
            old = self.members[index]
            old.stop()
            self.transports[old.local.address].close()
        host = host or host_of(index)
        self.network.revive(host)
        address = Address(host, GOSSIP_PORT)
        key = None if keyless else secret if secret is not None else self.secret
        transport = self.network.transport(address)
        self.transports[address] = transport
        member = Membership(
            local=LocalMember(f"m{index:03}", address, PEER_PORT, labels or {"zone": "a"}),
            transport=transport,
            stream=self.network.stream(Address(host, PEER_PORT)),
            clock=self.clock,
            # A restarted member gets a new seed, like a new process would.
            rng=random.Random(self.seed * 100_003 + index + 7919 * len(self.transports)),
            config=self.config,
            cluster_key=ClusterKey(key) if key is not None else None,
        )
        recorded = Recorded()
        member.subscribe(lambda event: recorded.events.append((self.clock.now(), event)))
        self.recorded[member.member_id] = recorded
        if index == len(self.members):
            self.members.append(member)
        else:
            self.members[index] = member
        if start:
            member.start()
        return member

    def start(self, count: int, *, join_every: float = 0.05) -> None:
        """`count` members, each joining through member 0, `join_every` seconds apart."""
        first = self.add()
        for _ in range(count - 1):
            self.clock.advance(join_every)
            self.add().join([first.local.address])

    def running(self) -> list[Membership]:
        return [member for member in self.members if member.running]

    def all_see(
        self, member_id: str, state: MemberState, observers: Iterable[Membership] | None = None
    ) -> bool:
        return all(
            observer.state_of(member_id) is state
            for observer in (observers if observers is not None else self.running())
            if observer.member_id != member_id
        )

    def converged(self, observers: Iterable[Membership] | None = None) -> bool:
        """Every observer sees exactly the observers as alive."""
        group = list(observers if observers is not None else self.running())
        expected = {member.member_id for member in group}
        return all(observer.member_ids(MemberState.ALIVE) == expected for observer in group)

    def kill(self, member: Membership) -> None:
        """The member's host dies silently: no leave, no more packets either way."""
        self.network.silence(member.local.address.host)
        member.stop()
