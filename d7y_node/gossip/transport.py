"""How gossip bytes travel: the transport protocols, the real UDP one, and a simulated network.

Owns moving opaque bytes between addresses: datagrams (`PacketTransport`: probes, acks, gossip)
and request/response exchanges (`StreamTransport`: push-pull state sync, which the node will
carry over its peer HTTP port). Does not look inside the bytes (`messages.py`, `auth.py`) and
never raises on a failed send: UDP is lossy by nature and the protocol above expects that.

`SimulatedNetwork` is the in-memory stand-in for tests: many transports in one process, driven by
a `VirtualClock`, with seeded loss, latency, partitions and silent kills.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from collections.abc import Callable, Iterable
from typing import Protocol

from d7y_node.gossip.clock import VirtualClock
from d7y_node.gossip.messages import Address

logger = logging.getLogger(__name__)

PacketReceiver = Callable[[bytes, Address], None]
# The stream server side: the request bytes and where they came from, to the reply bytes.
StreamHandler = Callable[[bytes, Address], bytes]
# The stream client side gets the reply, or None when the exchange failed or timed out.
ReplyCallback = Callable[[bytes | None], None]

# The largest datagram read from the socket; anything above the membership's packet limit is
# dropped there, but reading it whole lets it be counted instead of silently truncated.
UDP_READ_LIMIT = 65535


class PacketTransport(Protocol):
    """Best-effort datagrams to and from one bound address."""

    @property
    def local_address(self) -> Address:
        """Where this transport receives (the bound address)."""
        ...

    def set_receiver(self, receiver: PacketReceiver) -> None:
        """Deliver every received datagram to `receiver` (replacing any previous one)."""
        ...

    def send(self, address: Address, payload: bytes) -> None:
        """Send one datagram; failures are logged and otherwise ignored."""
        ...

    def close(self) -> None: ...


class StreamTransport(Protocol):
    """Reliable request/response exchanges, for push-pull state sync.

    The real one rides the peer HTTP port (one POST per exchange); the in-memory one is
    `SimulatedNetwork.stream`. Callbacks rather than coroutines keep the membership state machine
    independent of the event loop, so it runs the same on asyncio and on a virtual clock.
    """

    def set_handler(self, handler: StreamHandler) -> None:
        """Answer incoming exchanges with `handler`."""
        ...

    def exchange(
        self, address: Address, request: bytes, timeout: float, on_reply: ReplyCallback
    ) -> None:
        """Send `request` to `address`; call `on_reply` exactly once, with the reply or None."""
        ...


# ---------------------------------------------------------------------------------------------
# The real UDP transport


class _DatagramProtocol(asyncio.DatagramProtocol):
    """Hands datagrams to the receiver; never lets a handler error escape."""

    def __init__(self) -> None:
        self.receiver: PacketReceiver | None = None

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        receiver = self.receiver
        if receiver is None:
            return
        host, port = addr[0], addr[1]
        if not isinstance(host, str) or not isinstance(port, int):
            return
        try:
            receiver(data, Address(host, port))
        except Exception:
            # A bug in a handler must not take the socket down; the packet is lost, like any.
            logger.exception("gossip packet from %s:%s could not be handled", host, port)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and the like arrive here: an unreachable member shows up as a
        # failed probe anyway.
        logger.debug("gossip socket error: %s", exc)


class UdpTransport:
    """Gossip datagrams over a real UDP socket on the running asyncio loop."""

    def __init__(
        self,
        transport: asyncio.DatagramTransport,
        protocol: _DatagramProtocol,
        local_address: Address,
    ) -> None:
        self._transport = transport
        self._protocol = protocol
        self._local_address = local_address
        self.send_errors = 0

    @classmethod
    async def bind(cls, host: str, port: int) -> UdpTransport:
        """A transport bound to `host:port` (port 0: any free port)."""
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        transport, protocol = await loop.create_datagram_endpoint(
            _DatagramProtocol, local_addr=(host, port), family=family
        )
        bound = transport.get_extra_info("sockname")
        return cls(transport, protocol, Address(host, int(bound[1])))

    @property
    def local_address(self) -> Address:
        return self._local_address

    def set_receiver(self, receiver: PacketReceiver) -> None:
        self._protocol.receiver = receiver

    def send(self, address: Address, payload: bytes) -> None:
        if self._transport.is_closing():
            return
        try:
            self._transport.sendto(payload, (address.host, address.port))
        except OSError as error:
            self.send_errors += 1
            logger.debug("gossip send to %s failed: %s", address, error)

    def close(self) -> None:
        self._protocol.receiver = None
        self._transport.close()


async def resolve(host: str, port: int) -> list[Address]:
    """Every address `host` resolves to (a headless service name gives all its pods), so the
    caller can join them all; gossip itself only ever sends to IP literals."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    found: list[Address] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        address = Address(str(sockaddr[0]), int(sockaddr[1]))
        if address not in found:
            found.append(address)
    return found


# ---------------------------------------------------------------------------------------------
# The simulated network


class SimulatedNetwork:
    """Many in-memory transports on one virtual clock, with loss, latency and partitions.

    Every random choice comes from the network's own seeded generator, and every delivery is a
    clock callback, so a run is reproducible.
    """

    def __init__(
        self,
        clock: VirtualClock,
        seed: int = 0,
        *,
        latency: tuple[float, float] = (0.0005, 0.003),
    ) -> None:
        self.clock = clock
        self._random = random.Random(seed)
        self.latency = latency
        # The probability that one datagram is lost (each direction is a separate datagram).
        self.loss = 0.0
        self._packet_receivers: dict[Address, PacketReceiver | None] = {}
        self._stream_handlers: dict[Address, StreamHandler | None] = {}
        # Faults are per host, so a member's packet and stream addresses fail together.
        self._group_of: dict[str, int] = {}
        self._silenced: set[str] = set()
        self._cut_links: set[frozenset[str]] = set()
        self.packets_sent = 0
        self.packets_delivered = 0
        self.largest_packet = 0

    # Faults -----------------------------------------------------------------------------------

    def partition(self, groups: Iterable[Iterable[str]]) -> None:
        """Only hosts in the same group can talk (packets and streams alike); hosts in no group
        form one more group of their own."""
        self._group_of = {}
        for index, group in enumerate(groups, start=1):
            for host in group:
                self._group_of[host] = index

    def heal(self) -> None:
        """Undo `partition` and every `cut`."""
        self._group_of = {}
        self._cut_links.clear()

    def cut(self, host: str, other: str) -> None:
        """Break the link between two hosts only (both still reach everyone else)."""
        self._cut_links.add(frozenset((host, other)))

    def silence(self, host: str) -> None:
        """Drop everything to and from `host`, as if it died without a word."""
        self._silenced.add(host)

    def revive(self, host: str) -> None:
        """Undo `silence`: the host is back (a restarted process binds its addresses again)."""
        self._silenced.discard(host)

    def _reachable(self, source: Address, destination: Address) -> bool:
        if source.host in self._silenced or destination.host in self._silenced:
            return False
        if self._cut_links and frozenset((source.host, destination.host)) in self._cut_links:
            return False
        return self._group_of.get(source.host, 0) == self._group_of.get(destination.host, 0)

    def _delay(self) -> float:
        low, high = self.latency
        return self._random.uniform(low, high)

    # Packets ----------------------------------------------------------------------------------

    def transport(self, address: Address) -> SimulatedTransport:
        """A packet transport bound to `address`."""
        if address in self._packet_receivers:
            raise ValueError(f"{address} is already bound")
        self._packet_receivers[address] = None
        return SimulatedTransport(self, address)

    def _set_receiver(self, address: Address, receiver: PacketReceiver | None) -> None:
        self._packet_receivers[address] = receiver

    def _unbind(self, address: Address) -> None:
        self._packet_receivers.pop(address, None)
        self._stream_handlers.pop(address, None)

    def send(self, source: Address, destination: Address, payload: bytes) -> None:
        self.packets_sent += 1
        self.largest_packet = max(self.largest_packet, len(payload))
        if not self._reachable(source, destination):
            return
        if self.loss and self._random.random() < self.loss:
            return
        self.clock.call_later(self._delay(), lambda: self._deliver(source, destination, payload))

    def inject(self, source: Address, destination: Address, payload: bytes) -> None:
        """Deliver arbitrary bytes as if `source` sent them (for garbage and forgery tests)."""
        self.clock.call_later(0.0, lambda: self._deliver(source, destination, payload))

    def _deliver(self, source: Address, destination: Address, payload: bytes) -> None:
        # Reachability is checked again: a partition or kill may have happened in flight.
        if not self._reachable(source, destination):
            return
        receiver = self._packet_receivers.get(destination)
        if receiver is not None:
            self.packets_delivered += 1
            receiver(payload, source)

    # Streams ----------------------------------------------------------------------------------

    def stream(self, address: Address) -> SimulatedStream:
        """A stream transport reachable at `address`."""
        self._stream_handlers.setdefault(address, None)
        return SimulatedStream(self, address)

    def _set_handler(self, address: Address, handler: StreamHandler | None) -> None:
        self._stream_handlers[address] = handler

    def exchange(
        self,
        source: Address,
        destination: Address,
        request: bytes,
        timeout: float,
        on_reply: ReplyCallback,
    ) -> None:
        # A stream is reliable once connected, so there is no random loss; only partitions,
        # kills and missing servers fail it, after the caller's timeout as a real one would.
        answered = False

        def fail() -> None:
            nonlocal answered
            if not answered:
                answered = True
                on_reply(None)

        def serve() -> None:
            handler = self._stream_handlers.get(destination)
            if handler is None or not self._reachable(source, destination):
                return
            reply = handler(request, source)
            self.clock.call_later(self._delay(), lambda: answer(reply))

        def answer(reply: bytes) -> None:
            nonlocal answered
            if not answered and self._reachable(source, destination):
                answered = True
                on_reply(reply)

        self.clock.call_later(timeout, fail)
        self.clock.call_later(self._delay(), serve)


class SimulatedTransport:
    """One bound address on a `SimulatedNetwork`."""

    def __init__(self, network: SimulatedNetwork, address: Address) -> None:
        self._network = network
        self._address = address

    @property
    def local_address(self) -> Address:
        return self._address

    def set_receiver(self, receiver: PacketReceiver) -> None:
        self._network._set_receiver(self._address, receiver)

    def send(self, address: Address, payload: bytes) -> None:
        self._network.send(self._address, address, payload)

    def close(self) -> None:
        self._network._unbind(self._address)


class SimulatedStream:
    """The stream side of one address on a `SimulatedNetwork`."""

    def __init__(self, network: SimulatedNetwork, address: Address) -> None:
        self._network = network
        self._address = address

    def set_handler(self, handler: StreamHandler) -> None:
        self._network._set_handler(self._address, handler)

    def exchange(
        self, address: Address, request: bytes, timeout: float, on_reply: ReplyCallback
    ) -> None:
        self._network.exchange(self._address, address, request, timeout, on_reply)
