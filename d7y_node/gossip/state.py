"""The membership state machine: SWIM probes, Lifeguard, dissemination, push-pull, join, leave.

Owns `Membership`: the list of members and their states (alive, suspect, dead, left), the probe
loop (direct ping, then indirect pings through `indirect_checks` members, then suspicion),
incarnation numbers and refutation, piggybacking of broadcasts on every packet, periodic gossip
and push-pull, reconnection to dead members (so a healed partition merges back), joining through
seed addresses, and the graceful leave. Does not own the bytes on the wire (`messages.py`,
`auth.py`), their transport (`transport.py`) or the time (`clock.py`): all are handed in, so the
same code runs on UDP and asyncio, or on a simulated network with a virtual clock.

Everything runs as clock callbacks on one thread; nothing here blocks or awaits.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from d7y_node.errors import AuthenticationFailed, MalformedMessage
from d7y_node.gossip.auth import ClusterKey, NoKey, Purpose, Sealer
from d7y_node.gossip.awareness import Awareness
from d7y_node.gossip.broadcast_queue import BroadcastQueue
from d7y_node.gossip.clock import Clock, TimerHandle
from d7y_node.gossip.config import GossipConfig, LocalMember
from d7y_node.gossip.members import EventKind, GossipStats, Member, MemberEvent, Observer
from d7y_node.gossip.messages import (
    COMPOUND_HEADER_BYTES,
    SEQUENCE_MODULUS,
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
    encode_push_pull,
)
from d7y_node.gossip.suspicion import Suspicion, suspicion_timeout
from d7y_node.gossip.transport import PacketTransport, StreamTransport

logger = logging.getLogger(__name__)

# Push-pull runs at its base interval up to this many members, then slower (doubling the
# interval each time the cluster doubles), so full-state traffic stays bounded as n grows.
PUSH_PULL_SCALE_THRESHOLD = 32


def push_pull_interval(base: float, member_count: int) -> float:
    """The push-pull interval for a cluster of `member_count` members."""
    if member_count <= PUSH_PULL_SCALE_THRESHOLD:
        return base
    multiplier = math.ceil(math.log2(member_count) - math.log2(PUSH_PULL_SCALE_THRESHOLD)) + 1
    return base * multiplier


@dataclass(slots=True)
class _Entry:
    """Our mutable record of one member (the public view is the frozen `Member`)."""

    member_id: str
    address: Address
    peer_port: int
    labels: Mapping[str, str]
    load: Load
    incarnation: int
    state: MemberState
    # When `state` last changed (clock time): drives reaping and gossip to the dead.
    state_changed_at: float

    def view(self) -> Member:
        return Member(
            self.member_id,
            self.address,
            self.peer_port,
            dict(self.labels),
            self.load,
            self.state,
            self.incarnation,
        )

    def alive_message(self) -> Alive:
        return Alive(
            self.incarnation, self.member_id, self.address, self.peer_port, self.labels, self.load
        )

    def meta(self) -> tuple[Address, int, Mapping[str, str], Load]:
        return (self.address, self.peer_port, self.labels, self.load)


@dataclass(slots=True)
class _Probe:
    """One probe round of one member: acked yet, and the nacks the indirect probers sent."""

    target_id: str
    sequence: int
    acked: bool = False
    expected_nacks: int = 0
    nacks: int = 0
    timeout_timer: TimerHandle | None = None
    deadline_timer: TimerHandle | None = None


_GONE = (MemberState.DEAD, MemberState.LEFT)
_LIVE = (MemberState.ALIVE, MemberState.SUSPECT)


class Membership:
    """One member of a SWIM cluster: its view of everyone and the protocol that keeps it."""

    def __init__(
        self,
        *,
        local: LocalMember,
        transport: PacketTransport,
        clock: Clock,
        rng: random.Random,
        config: GossipConfig | None = None,
        stream: StreamTransport | None = None,
        cluster_key: ClusterKey | None = None,
    ) -> None:
        self.config = config or GossipConfig()
        self.local = local
        self.member_id = local.member_id
        self.stats = GossipStats()
        self._transport = transport
        self._clock = clock
        self._random = rng
        self._stream = stream
        self._sealer: Sealer = cluster_key or NoKey()
        self._entries: dict[str, _Entry] = {}
        # Alive + suspect members including us: the n in every log(n) formula.
        self._live_count = 0
        # Round-robin probe order, reshuffled (and reaped) at every wrap: every member is probed
        # once per round, which bounds detection time (SWIM's round-robin variant).
        self._probe_order: list[str] = []
        self._probe_index = 0
        self._suspicions: dict[str, Suspicion] = {}
        # Outstanding pings by sequence number: what to do on an ack, or on a nack.
        self._ack_handlers: dict[int, Callable[[], None]] = {}
        self._nack_handlers: dict[int, Callable[[], None]] = {}
        self._sequence = rng.randrange(SEQUENCE_MODULUS)
        self._incarnation = 0
        self._awareness = Awareness(self.config.awareness_max_multiplier)
        self._broadcasts = BroadcastQueue(self.config.retransmit_mult, lambda: self._live_count)
        self._observers: list[Observer] = []
        self._timers: dict[str, TimerHandle] = {}
        self._running = False
        self._leaving = False
        # Where we joined; contacted again whenever we are left alone.
        self._seeds: list[Address] = []
        # A joining member does one full push-pull with the first member it learns of.
        self._join_sync_pending = False
        # Messages already decoded, by their bytes (see `decode_packet`).
        self._decoded: dict[bytes, Message] = {}
        self._packet_budget = (
            self.config.packet_size_limit - self._sealer.overhead - COMPOUND_HEADER_BYTES
        )

    # Public API -------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Started and not stopped."""
        return self._running

    @property
    def health_score(self) -> int:
        """Lifeguard's local health score (0 is healthy)."""
        return self._awareness.score

    def members(self, *states: MemberState) -> list[Member]:
        """Every member we know (ourselves included), by id; only those in `states` if given."""
        return [
            entry.view()
            for _, entry in sorted(self._entries.items())
            if not states or entry.state in states
        ]

    def member_ids(self, *states: MemberState) -> set[str]:
        """The ids of the members in `states` (all if none given), without building views."""
        return {
            member_id
            for member_id, entry in self._entries.items()
            if not states or entry.state in states
        }

    def state_of(self, member_id: str) -> MemberState | None:
        """What we believe about `member_id`; None if we do not know it."""
        entry = self._entries.get(member_id)
        return entry.state if entry is not None else None

    def member(self, member_id: str) -> Member | None:
        entry = self._entries.get(member_id)
        return entry.view() if entry is not None else None

    def subscribe(self, observer: Observer) -> Callable[[], None]:
        """Call `observer` on every member event (including our own join at `start()`);
        returns the function that unsubscribes. Observers run synchronously inside the state
        machine: they must be quick and must not call back into this membership."""
        self._observers.append(observer)
        return lambda: self._observers.remove(observer)

    def start(self) -> None:
        """Announce ourselves and start the periodic probe, gossip, push-pull and reconnect."""
        if self._running:
            return
        self._running = True
        self._transport.set_receiver(self._receive)
        if self._stream is not None:
            self._stream.set_handler(self._serve_stream)
        self._incarnation += 1
        local = self.local
        self._on_alive(
            Alive(
                self._incarnation,
                local.member_id,
                local.address,
                local.peer_port,
                dict(local.labels),
                local.load,
            ),
            bootstrap=True,
        )
        config = self.config
        self._every("probe", lambda: self._awareness.scale(config.probe_interval), self._probe)
        self._every("gossip", lambda: config.gossip_interval, self._gossip)
        self._every(
            "push-pull",
            lambda: push_pull_interval(config.push_pull_interval, self._live_count),
            self._push_pull_random,
        )
        self._every("reconnect", lambda: config.reconnect_interval, self._reconnect)
        self._every("rejoin", lambda: config.rejoin_interval, self._rejoin)

    def join(self, seeds: Iterable[Address]) -> None:
        """Contact `seeds` (gossip addresses of any members): each answers with its own alive
        message, learns about us, and the first one we learn of gets a full push-pull."""
        self._seeds = [seed for seed in seeds if seed != self.local.address]
        self._join_sync_pending = self._stream is not None
        self._contact_seeds()

    def update(self, *, labels: Mapping[str, str] | None = None, load: Load | None = None) -> None:
        """Announce new labels or load: a new incarnation, gossiped like any alive message.
        Each call costs one broadcast to the whole cluster, so call it every few seconds at
        most. Before `start()` it only changes what `start()` will announce. Raises
        `MalformedMessage` if the new metadata is out of bounds."""
        if self.member_id not in self._entries:
            local = self.local
            announced = Alive(
                0,
                local.member_id,
                local.address,
                local.peer_port,
                dict(labels) if labels is not None else local.labels,
                load if load is not None else local.load,
            )
            encode_message(announced)
            self.local = dataclasses.replace(local, labels=announced.labels, load=announced.load)
            return
        me = self._entries[self.member_id]
        alive = Alive(
            self._incarnation + 1,
            self.member_id,
            me.address,
            me.peer_port,
            dict(labels) if labels is not None else me.labels,
            load if load is not None else me.load,
        )
        encode_message(alive)
        self._incarnation += 1
        self._on_alive(alive, bootstrap=True)

    def leave(self, on_done: Callable[[], None] | None = None) -> None:
        """Announce that we leave (others record us as "left", not "dead"). `on_done` is called
        once the announcement has been sent its full number of times; keep running until then,
        then `stop()`."""
        if self._leaving or not self._running:
            if on_done is not None:
                on_done()
            return
        self._leaving = True
        me = self._entries[self.member_id]
        anyone = any(
            entry.state in _LIVE
            for entry in self._entries.values()
            if entry.member_id != self.member_id
        )
        self._on_dead(
            Dead(me.incarnation, self.member_id, self.member_id),
            on_finished=on_done if anyone else None,
        )
        if not anyone and on_done is not None:
            on_done()

    async def leave_and_wait(self, wait: float) -> bool:
        """`leave()`, then wait (on the running asyncio loop) until the announcement went out or
        `wait` seconds passed; True if it went out."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def finished() -> None:
            if not done.done():
                done.set_result(None)

        self.leave(finished)
        try:
            await asyncio.wait_for(done, wait)
        except TimeoutError:
            return False
        return True

    def stop(self) -> None:
        """Stop every timer and stop answering; the transports are closed by their owner."""
        self._running = False
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for suspicion in self._suspicions.values():
            suspicion.cancel()
        self._suspicions.clear()
        self._ack_handlers.clear()
        self._nack_handlers.clear()

    # Scheduling -------------------------------------------------------------------------------

    def _every(self, name: str, interval: Callable[[], float], action: Callable[[], None]) -> None:
        def tick() -> None:
            if not self._running:
                return
            self._timers[name] = self._clock.call_later(interval(), tick)
            action()

        # A random first delay, so members started together do not tick in lockstep.
        self._timers[name] = self._clock.call_later(self._random.uniform(0, interval()), tick)

    def _next_sequence(self) -> int:
        self._sequence = (self._sequence + 1) % SEQUENCE_MODULUS
        return self._sequence

    # Sending ----------------------------------------------------------------------------------

    def _send(self, address: Address, messages: Sequence[Message]) -> None:
        """Send `messages` in one packet, filled up with pending broadcasts."""
        encoded = [encode_message(message) for message in messages]
        room = self._packet_budget - sum(len(item) for item in encoded)
        encoded.extend(self._broadcasts.take(room))
        self._send_encoded(address, encoded)

    def _send_encoded(self, address: Address, encoded: list[bytes]) -> None:
        self.stats.packets_sent += 1
        self._transport.send(address, self._sealer.seal(Purpose.PACKET, compound(encoded)))

    def _broadcast(
        self, member_id: str, message: Message, on_finished: Callable[[], None] | None = None
    ) -> None:
        self._broadcasts.queue(member_id, encode_message(message), on_finished)

    # Receiving --------------------------------------------------------------------------------

    def _receive(self, data: bytes, source: Address) -> None:
        if not self._running:
            return
        self.stats.packets_received += 1
        if len(data) > self.config.packet_size_limit:
            self.stats.dropped_oversized += 1
            return
        try:
            body = self._sealer.open(Purpose.PACKET, data)
        except AuthenticationFailed:
            self.stats.dropped_unauthenticated += 1
            return
        try:
            messages = decode_packet(body, self.config.packet_size_limit, self._decoded)
        except MalformedMessage:
            self.stats.dropped_malformed += 1
            return
        for message in messages:
            self._handle(message)

    def _handle(self, message: Message) -> None:
        match message:
            case Ping():
                self._on_ping(message)
            case IndirectPing():
                self._on_indirect_ping(message)
            case Ack():
                handler = self._ack_handlers.pop(message.sequence, None)
                if handler is not None:
                    handler()
            case Nack():
                handler = self._nack_handlers.get(message.sequence)
                if handler is not None:
                    handler()
            case Alive():
                self._on_alive(message)
            case Suspect():
                self._on_suspect(message)
            case Dead():
                self._on_dead(message)

    def _on_ping(self, ping: Ping) -> None:
        if ping.target_id and ping.target_id != self.member_id:
            self.stats.misdirected_pings += 1
            return
        reply: list[Message] = [Ack(ping.sequence)]
        sender = self._entries.get(ping.source_id)
        if not self._leaving and (sender is None or sender.state is not MemberState.ALIVE):
            # Introduce ourselves to a member that does not seem to know us (it is joining, or
            # coming back from a partition), and tell it what we believe about it, so that it
            # refutes a suspicion or death with a new incarnation right away.
            reply.append(self._entries[self.member_id].alive_message())
            if sender is not None:
                reply.append(self._accusation(sender))
        self._send(ping.source_address, reply)

    def _accusation(self, entry: _Entry) -> Message:
        """What we hold against a non-alive member, as a message it will refute."""
        if entry.state is MemberState.SUSPECT:
            return Suspect(entry.incarnation, entry.member_id, self.member_id)
        if entry.state is MemberState.LEFT:
            return Dead(entry.incarnation, entry.member_id, entry.member_id)
        return Dead(entry.incarnation, entry.member_id, self.member_id)

    def _on_indirect_ping(self, request: IndirectPing) -> None:
        sequence = self._next_sequence()
        timer: list[TimerHandle] = []

        def acked() -> None:
            for handle in timer:
                handle.cancel()
            self._send(request.source_address, [Ack(request.sequence)])

        def timed_out() -> None:
            self._ack_handlers.pop(sequence, None)
            if request.want_nack and self._running:
                self._send(request.source_address, [Nack(request.sequence)])

        self._ack_handlers[sequence] = acked
        timer.append(self._clock.call_later(self.config.probe_timeout, timed_out))
        self._send(
            request.target_address,
            [Ping(sequence, request.target_id, self.member_id, self.local.address)],
        )

    # The probe loop ---------------------------------------------------------------------------

    def _next_probe_target(self) -> _Entry | None:
        checked = 0
        while checked < len(self._probe_order):
            if self._probe_index >= len(self._probe_order):
                self._reap_and_shuffle()
                self._probe_index = 0
                checked += 1
                continue
            member_id = self._probe_order[self._probe_index]
            self._probe_index += 1
            entry = self._entries.get(member_id)
            if entry is None or member_id == self.member_id or entry.state in _GONE:
                checked += 1
                continue
            return entry
        return None

    def _reap_and_shuffle(self) -> None:
        now = self._clock.now()
        for member_id in list(self._probe_order):
            entry = self._entries[member_id]
            retention = (
                self.config.dead_member_retention
                if entry.state is MemberState.DEAD
                else self.config.left_member_retention
            )
            if entry.state in _GONE and now - entry.state_changed_at > retention:
                del self._entries[member_id]
                self._probe_order.remove(member_id)
        self._random.shuffle(self._probe_order)

    def _probe(self) -> None:
        target = self._next_probe_target()
        if target is None:
            return
        sequence = self._next_sequence()
        probe = _Probe(target.member_id, sequence)
        deadline = self._awareness.scale(self.config.probe_interval)

        def acked() -> None:
            probe.acked = True
            self._nack_handlers.pop(sequence, None)
            for handle in (probe.timeout_timer, probe.deadline_timer):
                if handle is not None:
                    handle.cancel()
            self._awareness.apply_delta(-1)

        def nacked() -> None:
            probe.nacks += 1

        self._ack_handlers[sequence] = acked
        self._nack_handlers[sequence] = nacked
        messages: list[Message] = [
            Ping(sequence, target.member_id, self.member_id, self.local.address)
        ]
        if target.state is MemberState.SUSPECT:
            # Tell a suspect it is suspected, so it can refute at once. The accusation goes
            # first: the suspect refutes before it answers, and the ack carries the refutation.
            messages.insert(0, self._accusation(target))
        self._send(target.address, messages)
        # The direct-ack timeout is not scaled by our health (waiting longer does not help UDP
        # through); the whole round's deadline is, which gives indirect probes more time.
        probe.timeout_timer = self._clock.call_later(
            self.config.probe_timeout, lambda: self._probe_indirectly(probe)
        )
        probe.deadline_timer = self._clock.call_later(deadline, lambda: self._probe_failed(probe))

    def _probe_indirectly(self, probe: _Probe) -> None:
        target = self._entries.get(probe.target_id)
        if probe.acked or not self._running or target is None:
            return
        helpers = self._random_members(
            self.config.indirect_checks,
            lambda entry: (
                entry.state is MemberState.ALIVE
                and entry.member_id not in (self.member_id, probe.target_id)
            ),
        )
        request = IndirectPing(
            probe.sequence,
            target.member_id,
            target.address,
            self.member_id,
            self.local.address,
            want_nack=True,
        )
        for helper in helpers:
            self._send(helper.address, [request])
        probe.expected_nacks = len(helpers)

    def _probe_failed(self, probe: _Probe) -> None:
        self._ack_handlers.pop(probe.sequence, None)
        self._nack_handlers.pop(probe.sequence, None)
        if probe.acked or not self._running:
            return
        self.stats.probes_failed += 1
        # Lifeguard: missing nacks mean the trouble may be ours (the helpers could not even
        # answer us), so we slow down; with no helpers, any failed probe counts against us.
        if probe.expected_nacks:
            self._awareness.apply_delta(probe.expected_nacks - probe.nacks)
        else:
            self._awareness.apply_delta(1)
        target = self._entries.get(probe.target_id)
        if target is not None:
            self._on_suspect(Suspect(target.incarnation, target.member_id, self.member_id))

    # Dissemination ----------------------------------------------------------------------------

    def _random_members(self, count: int, wanted: Callable[[_Entry], bool]) -> list[_Entry]:
        """Up to `count` distinct random members for which `wanted` holds, without scanning
        everyone: random picks (3n tries at most), or a shuffled scan when n is small, where
        random picks would too often miss the few wanted members."""
        order = self._probe_order
        chosen: list[_Entry] = []
        candidates: Iterable[str]
        if len(order) < 3 * count:
            candidates = list(order)
            self._random.shuffle(candidates)
        else:
            candidates = (
                order[int(self._random.random() * len(order))] for _ in range(3 * len(order))
            )
        for member_id in candidates:
            entry = self._entries.get(member_id)
            if entry is not None and entry not in chosen and wanted(entry):
                chosen.append(entry)
                if len(chosen) == count:
                    break
        return chosen

    def _gossip(self) -> None:
        if not len(self._broadcasts):
            return
        now = self._clock.now()
        dead_time = self.config.gossip_to_the_dead_time

        def wanted(entry: _Entry) -> bool:
            if entry.member_id == self.member_id:
                return False
            if entry.state is MemberState.DEAD:
                return now - entry.state_changed_at <= dead_time
            return entry.state is not MemberState.LEFT

        for target in self._random_members(self.config.gossip_nodes, wanted):
            encoded = self._broadcasts.take(self._packet_budget)
            if not encoded:
                return
            self._send_encoded(target.address, encoded)

    # Push-pull and reconnection ---------------------------------------------------------------

    def _records(self) -> tuple[MemberRecord, ...]:
        return tuple(
            MemberRecord(
                entry.member_id,
                entry.address,
                entry.peer_port,
                entry.labels,
                entry.load,
                entry.incarnation,
                entry.state,
            )
            for entry in self._entries.values()
        )

    def _push_pull_random(self) -> None:
        candidates = [
            entry
            for entry in self._entries.values()
            if entry.state is MemberState.ALIVE
            and entry.member_id != self.member_id
            and entry.peer_port
        ]
        if candidates:
            self._push_pull(self._random.choice(candidates), join=False)

    def _push_pull(self, entry: _Entry, *, join: bool) -> None:
        if self._stream is None or not entry.peer_port:
            return
        self.stats.push_pulls += 1
        request = self._sealer.seal(
            Purpose.STREAM, encode_push_pull(PushPull(join, self._records()))
        )
        self._stream.exchange(
            Address(entry.address.host, entry.peer_port),
            request,
            self.config.stream_timeout,
            lambda reply: self._push_pull_reply(reply, join=join),
        )

    def _open_stream(self, data: bytes) -> PushPull | None:
        try:
            return decode_push_pull(self._sealer.open(Purpose.STREAM, data))
        except AuthenticationFailed:
            self.stats.streams_unauthenticated += 1
        except MalformedMessage:
            self.stats.streams_malformed += 1
        return None

    def _push_pull_reply(self, reply: bytes | None, *, join: bool) -> None:
        if not self._running:
            return
        exchange = self._open_stream(reply) if reply is not None else None
        if exchange is None:
            self.stats.push_pull_failures += 1
            if join:
                self._join_sync_pending = True
            return
        self._merge(exchange.members)

    def _serve_stream(self, request: bytes, source: Address) -> bytes:
        """The server side of push-pull: merge their state first, then answer with ours, so the
        answer already carries any refutation their state provoked."""
        if not self._running:
            return b""
        exchange = self._open_stream(request)
        if exchange is None:
            return b""
        self._merge(exchange.members)
        return self._sealer.seal(Purpose.STREAM, encode_push_pull(PushPull(False, self._records())))

    def _merge(self, records: Iterable[MemberRecord]) -> None:
        for record in records:
            if record.state is MemberState.ALIVE:
                self._on_alive(
                    Alive(
                        record.incarnation,
                        record.member_id,
                        record.address,
                        record.peer_port,
                        record.labels,
                        record.load,
                    )
                )
            elif record.state is MemberState.LEFT:
                self._on_dead(Dead(record.incarnation, record.member_id, record.member_id))
            else:
                # Their "dead" is only a suspicion to us: the member gets its chance to refute.
                self._on_suspect(Suspect(record.incarnation, record.member_id, self.member_id))

    def _reconnect(self) -> None:
        """Reach out to one random dead member (it may be behind a healed partition)."""
        dead = [entry for entry in self._entries.values() if entry.state is MemberState.DEAD]
        if dead:
            target = self._random.choice(dead)
            # The accusation makes a live target refute at once; its refutation rides back on
            # the ack, and the push-pull then merges both sides' views.
            ping = Ping(self._next_sequence(), target.member_id, self.member_id, self.local.address)
            self._send(target.address, [self._accusation(target), ping])
            self._push_pull(target, join=False)

    def _rejoin(self) -> None:
        """Contact the seeds again while nobody else is alive: hosts started together find
        each other as soon as the first seed is up, not a reconnect interval later."""
        alone = not any(
            entry.state in _LIVE
            for entry in self._entries.values()
            if entry.member_id != self.member_id
        )
        if alone and self._seeds:
            self._join_sync_pending = self._stream is not None
            self._contact_seeds()

    def _contact_seeds(self) -> None:
        me = self._entries[self.member_id].alive_message()
        for seed in self._seeds:
            # The ping comes first: the seed answers it with its own alive message because it
            # does not know us yet, then learns about us from the alive message that follows.
            self._send(
                seed, [Ping(self._next_sequence(), "", self.member_id, self.local.address), me]
            )

    # State transitions ------------------------------------------------------------------------

    def _set_state(self, entry: _Entry, state: MemberState) -> None:
        if (entry.state in _LIVE) != (state in _LIVE):
            self._live_count += 1 if state in _LIVE else -1
        entry.state = state
        entry.state_changed_at = self._clock.now()

    def _cancel_suspicion(self, member_id: str) -> None:
        suspicion = self._suspicions.pop(member_id, None)
        if suspicion is not None:
            suspicion.cancel()

    def _notify(self, kind: EventKind, entry: _Entry) -> None:
        if not self._observers:
            return
        event = MemberEvent(kind, entry.view())
        for observer in list(self._observers):
            try:
                observer(event)
            except Exception:
                # An observer's bug must not corrupt the membership state machine.
                logger.exception("membership observer failed on %s", event)

    def _refute(self, accused_incarnation: int) -> None:
        """Beat an accusation against us with a newer incarnation, and tell everyone."""
        incarnation = max(self._incarnation + 1, accused_incarnation + 1)
        self._incarnation = incarnation
        me = self._entries[self.member_id]
        me.incarnation = incarnation
        self._awareness.apply_delta(1)
        self.stats.refutations += 1
        self._broadcast(self.member_id, me.alive_message())

    def _add_entry(self, alive: Alive) -> _Entry:
        entry = _Entry(
            alive.member_id,
            alive.address,
            alive.peer_port,
            alive.labels,
            alive.load,
            alive.incarnation,
            MemberState.ALIVE,
            self._clock.now(),
        )
        self._entries[alive.member_id] = entry
        self._live_count += 1
        # A random place in the probe order (not the end), so a new member is probed within
        # one round on average by everyone, not all at the end of their rounds.
        self._probe_order.append(alive.member_id)
        offset = self._random.randrange(len(self._probe_order))
        order = self._probe_order
        order[offset], order[-1] = order[-1], order[offset]
        return entry

    def _on_alive(self, alive: Alive, *, bootstrap: bool = False) -> None:
        is_self = alive.member_id == self.member_id
        if is_self and self._leaving:
            return
        entry = self._entries.get(alive.member_id)
        if entry is None:
            entry = self._add_entry(alive)
            self._broadcast(alive.member_id, alive)
            self._notify(EventKind.JOIN, entry)
            if self._join_sync_pending and not is_self and entry.peer_port:
                self._join_sync_pending = False
                self._push_pull(entry, join=True)
            return
        reclaimed = False
        if (alive.address, alive.peer_port) != (entry.address, entry.peer_port):
            if entry.state in _GONE and not is_self:
                # A member restarted elsewhere (a rescheduled pod) under the same id.
                reclaimed = True
            else:
                self.stats.address_conflicts += 1
                logger.warning(
                    "member %s claims address %s, but it is alive at %s",
                    alive.member_id,
                    alive.address,
                    entry.address,
                )
                return
        if is_self:
            if alive.incarnation < entry.incarnation:
                return
        elif alive.incarnation <= entry.incarnation and not reclaimed:
            return
        self._cancel_suspicion(alive.member_id)
        if is_self and not bootstrap:
            if alive.incarnation == entry.incarnation and (
                (alive.address, alive.peer_port, alive.labels, alive.load) == entry.meta()
            ):
                return
            # Someone gossips a newer or different version of us (our own earlier life): refute.
            self._refute(alive.incarnation)
            return
        old_state, old_meta = entry.state, entry.meta()
        self._broadcast(alive.member_id, alive)
        entry.incarnation = alive.incarnation
        entry.address, entry.peer_port = alive.address, alive.peer_port
        entry.labels, entry.load = alive.labels, alive.load
        if entry.state is not MemberState.ALIVE:
            self._set_state(entry, MemberState.ALIVE)
        if old_state in _GONE:
            self._notify(EventKind.JOIN, entry)
        elif old_state is MemberState.SUSPECT or entry.meta() != old_meta:
            self._notify(EventKind.UPDATE, entry)

    def _on_suspect(self, suspect: Suspect) -> None:
        entry = self._entries.get(suspect.member_id)
        if entry is None or suspect.incarnation < entry.incarnation:
            return
        suspicion = self._suspicions.get(suspect.member_id)
        if suspicion is not None:
            # Another independent accuser shortens the timeout; pass the news on.
            if suspicion.confirm(suspect.from_id):
                self._broadcast(suspect.member_id, suspect)
            return
        if entry.state is not MemberState.ALIVE:
            return
        if entry.member_id == self.member_id:
            self._refute(suspect.incarnation)
            return
        self._broadcast(suspect.member_id, suspect)
        entry.incarnation = suspect.incarnation
        self._set_state(entry, MemberState.SUSPECT)
        config = self.config
        # Expect confirmations from suspicion_mult - 2 others, which reaches the minimum timeout
        # about two probe rounds before the nominal one; none in a cluster too small to give them.
        expected = config.suspicion_mult - 2
        if self._live_count - 2 < expected:
            expected = 0
        minimum = suspicion_timeout(config.suspicion_mult, self._live_count, config.probe_interval)
        member_id = suspect.member_id

        def expired(_confirmations: int) -> None:
            if self._suspicions.get(member_id) is not suspicion_created:
                return
            del self._suspicions[member_id]
            current = self._entries.get(member_id)
            if self._running and current is not None and current.state is MemberState.SUSPECT:
                self._on_dead(Dead(current.incarnation, member_id, self.member_id))

        suspicion_created = Suspicion(
            self._clock,
            first_accuser=suspect.from_id,
            expected_confirmations=expected,
            minimum=minimum,
            maximum=config.suspicion_max_timeout_mult * minimum,
            on_timeout=expired,
        )
        self._suspicions[member_id] = suspicion_created
        self._notify(EventKind.SUSPECT, entry)

    def _on_dead(self, dead: Dead, on_finished: Callable[[], None] | None = None) -> None:
        entry = self._entries.get(dead.member_id)
        if entry is None or dead.incarnation < entry.incarnation:
            return
        self._cancel_suspicion(dead.member_id)
        if entry.state in _GONE:
            return
        if entry.member_id == self.member_id and not self._leaving:
            self._refute(dead.incarnation)
            return
        self._broadcast(dead.member_id, dead, on_finished)
        entry.incarnation = dead.incarnation
        left = dead.from_id == dead.member_id
        self._set_state(entry, MemberState.LEFT if left else MemberState.DEAD)
        self._notify(EventKind.LEAVE if left else EventKind.DEAD, entry)
