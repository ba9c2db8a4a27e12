"""The membership protocol's tunables and this member's identity.

Owns `GossipConfig` (timings and fan-outs, defaults from memberlist's LAN profile) and
`LocalMember` (who we are and what we tell others), both validated on construction. Does not read
files, flags or the environment: `d7y_node/config.py` builds these from the node's settings.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

from d7y_node.errors import ConfigError, MalformedMessage
from d7y_node.gossip.messages import Address, Alive, Load, encode_message


@dataclass(frozen=True)
class GossipConfig:
    """Timings (seconds) and fan-outs of SWIM + Lifeguard."""

    # One failure-detection round per second: a failed member is noticed within a few seconds.
    probe_interval: float = 1.0
    # A LAN round trip is well under 500 ms; missing it starts indirect probes.
    probe_timeout: float = 0.5
    # Members asked to probe indirectly: 3 routes around one bad link with high probability.
    indirect_checks: int = 3
    # Suspicion lasts at least suspicion_mult * log10(n) probe intervals (4: 8 s at n=100)...
    suspicion_mult: int = 4
    # ...and at most this many times that, without independent confirmations (Lifeguard).
    suspicion_max_timeout_mult: int = 6
    # Each broadcast is piggybacked retransmit_mult * ceil(log10(n + 1)) times (12 at n=100).
    retransmit_mult: int = 4
    # Gossip 5 times a second to 3 members: news reaches a 100-member cluster in ~1 s.
    gossip_interval: float = 0.2
    gossip_nodes: int = 3
    # Keep gossiping to a member this long after it died, so it can learn of and refute it.
    gossip_to_the_dead_time: float = 30.0
    # Full state exchange with one random member (scaled up beyond 32 members), repairing what
    # the lossy gossip missed.
    push_pull_interval: float = 30.0
    # Try to reach one dead member this often, so a healed partition merges back.
    reconnect_interval: float = 30.0
    # While no other member is alive, contact the join seeds again this often (one small packet
    # per seed), so hosts started at the same moment form a cluster within about a second.
    rejoin_interval: float = 1.0
    # How long a dead member stays listed (and reconnect is tried) before it is forgotten:
    # a partition lasting longer than this needs a new `join` to heal.
    dead_member_retention: float = 3600.0
    # How long a member that left on purpose stays listed as "left".
    left_member_retention: float = 300.0
    # Lifeguard: probe timing stretches up to 8* while we are unhealthy ourselves.
    awareness_max_multiplier: int = 8
    # A UDP payload that fits a 1500-byte Ethernet MTU after IPv6 (40) and UDP (8) headers,
    # with room left for tunnel encapsulation (VXLAN adds 50).
    packet_size_limit: int = 1400
    # Give up on a push-pull exchange after this long.
    stream_timeout: float = 10.0

    def __post_init__(self) -> None:
        for name in (
            "probe_interval",
            "probe_timeout",
            "gossip_interval",
            "gossip_to_the_dead_time",
            "push_pull_interval",
            "reconnect_interval",
            "rejoin_interval",
            "dead_member_retention",
            "left_member_retention",
            "stream_timeout",
        ):
            if not getattr(self, name) > 0:
                raise ConfigError(f"gossip.{name}", "must be a positive number of seconds")
        if self.probe_timeout >= self.probe_interval:
            raise ConfigError("gossip.probe_timeout", "must be shorter than the probe interval")
        for name in (
            "indirect_checks",
            "suspicion_mult",
            "suspicion_max_timeout_mult",
            "retransmit_mult",
            "gossip_nodes",
            "awareness_max_multiplier",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"gossip.{name}", "must be at least 1")
        if not 1200 <= self.packet_size_limit <= 65000:
            raise ConfigError("gossip.packet_size_limit", "must be within [1200, 65000] bytes")


@dataclass(frozen=True)
class LocalMember:
    """This member as the others will see it."""

    # Unique in the cluster and stable across restarts (the hostname, usually).
    member_id: str
    # Where our gossip socket is reachable from the other members.
    address: Address
    # The peer HTTP port on the same host (pieces, tracker, push-pull); 0 for none.
    peer_port: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)
    load: Load = field(default_factory=Load)

    def __post_init__(self) -> None:
        try:
            unspecified = ipaddress.ip_address(self.address.host).is_unspecified
        except ValueError:
            unspecified = False  # a name, not an IP literal
        if unspecified:
            raise ConfigError(
                "advertise_addr",
                f"{self.address.host} is where we listen, not where others can reach us",
            )
        try:
            encode_message(
                Alive(0, self.member_id, self.address, self.peer_port, self.labels, self.load)
            )
        except MalformedMessage as error:
            raise ConfigError("gossip", f"this member cannot be announced: {error}") from None
