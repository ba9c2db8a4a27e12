"""SWIM membership with the Lifeguard refinements (as in hashicorp/memberlist), one module per
mechanism:

- `messages.py`: the wire format (msgpack, frozen dataclasses, bounded and validated);
- `auth.py`: the optional cluster key (HMAC-SHA256 tags on packets and streams);
- `transport.py`: the packet and stream protocols, real UDP, and a simulated network;
- `clock.py`: real and virtual time;
- `suspicion.py`, `awareness.py`, `broadcast_queue.py`: the Lifeguard suspicion timer, local
  health, and the transmit-limited piggyback queue;
- `state.py`: `Membership`, the probe loop and state machine that uses all of the above;
- `members.py`, `config.py`: what it reports (views, events, counters) and how it is tuned.

This package does not know about the rest of the node: the node builds a `Membership` with a
transport, a clock and its config, and subscribes to its events.
"""

from d7y_node.gossip.auth import ClusterKey
from d7y_node.gossip.clock import Clock, LoopClock, VirtualClock
from d7y_node.gossip.config import GossipConfig, LocalMember
from d7y_node.gossip.members import EventKind, GossipStats, Member, MemberEvent, Observer
from d7y_node.gossip.messages import Address, Load, MemberState
from d7y_node.gossip.state import Membership
from d7y_node.gossip.transport import (
    PacketTransport,
    SimulatedNetwork,
    StreamTransport,
    UdpTransport,
    resolve,
)

__all__ = [
    "Address",
    "Clock",
    "ClusterKey",
    "EventKind",
    "GossipConfig",
    "GossipStats",
    "Load",
    "LocalMember",
    "LoopClock",
    "Member",
    "MemberEvent",
    "MemberState",
    "Membership",
    "Observer",
    "PacketTransport",
    "SimulatedNetwork",
    "StreamTransport",
    "UdpTransport",
    "VirtualClock",
    "resolve",
]
