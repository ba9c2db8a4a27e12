"""What membership tells the rest of the node: member views, change events, counters.

Owns the read-only `Member` snapshot, the `MemberEvent` an observer receives (join, update,
suspect, dead, leave) and `GossipStats`, the counters of what happened on the wire. Does not own
the state machine that produces them (`state.py`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from d7y_node.gossip.messages import Address, Load, MemberState


@dataclass(frozen=True)
class Member:
    """One member as this node currently sees it."""

    member_id: str
    # The gossip (UDP) address.
    address: Address
    # The peer HTTP port on the same host; 0 when it serves none.
    peer_port: int
    labels: Mapping[str, str]
    load: Load
    state: MemberState
    # Bumped by the member itself to refute a suspicion or to announce new metadata.
    incarnation: int

    @property
    def peer_address(self) -> Address | None:
        """Where the member's peer HTTP server listens, if it has one."""
        return Address(self.address.host, self.peer_port) if self.peer_port else None


class EventKind(enum.Enum):
    """What changed about a member."""

    # First seen alive, or alive again after being dead or gone.
    JOIN = "join"
    # Still alive, but its address, labels or load changed, or it refuted a suspicion.
    UPDATE = "update"
    # A probe failed; it will be declared dead unless it refutes in time.
    SUSPECT = "suspect"
    # Declared dead: a suspicion ran out, or another member said so.
    DEAD = "dead"
    # It announced that it is leaving (graceful shutdown).
    LEAVE = "leave"


@dataclass(frozen=True)
class MemberEvent:
    """One change, with the member as it is after the change."""

    kind: EventKind
    member: Member


Observer = Callable[[MemberEvent], None]


@dataclass
class GossipStats:
    """Counters of one member's gossip traffic; the node exports them as metrics."""

    packets_sent: int = 0
    packets_received: int = 0
    # Dropped packets, by reason.
    dropped_oversized: int = 0
    dropped_unauthenticated: int = 0
    dropped_malformed: int = 0
    # Pings addressed to another member id (a stale address after a restart, usually).
    misdirected_pings: int = 0
    # An alive message gave a live member a different address: kept the one we had.
    address_conflicts: int = 0
    # We had to refute a suspicion or a death of ourselves.
    refutations: int = 0
    # Probes (direct and indirect) that got no ack in time.
    probes_failed: int = 0
    push_pulls: int = 0
    push_pull_failures: int = 0
    # Push-pull exchanges (either side) dropped, by reason.
    streams_unauthenticated: int = 0
    streams_malformed: int = 0
