"""Hosts as network namespaces for multi-host tests: a switch, veth links, shaped links, faults.

Owns the lab network and its lifetime: a "switch" namespace holding a bridge, one namespace per
host joined to it by a veth pair, addresses in a private subnet, `tc tbf` bandwidth limits on both
directions of a link, faults (kill -9 a host, pull a host's cable, partition hosts into groups,
heal), running programs inside a host, reaching a host from the test process, and a teardown that
always leaves nothing behind — plus a sweep that removes what a crashed earlier run left.
Does not own the programs themselves: `registry.py` and `node.py` build their configuration and
command lines; the subclasses here only move them into a host (wrap the command in
`ip netns exec`, listen on the host's address) and reach them from inside it.

Topology (everything lives in namespaces this module creates; the machine's own interfaces and
routes are never touched, and lab traffic never leaves the lab):

    <lab>-switch:  bridge `switch0`, ports `port0`, `port1`, …  (no address)
    <lab>-<host>:  `eth0` (peer of `portN`) with an address in LAB_SUBNET, and `lo`

Every namespace is named `d7ylab-<pid>-<start ticks>-<token>-<role>`: the pid and start time of the
test process that owns it (so a sweep can tell a crashed run's leftovers from a parallel run's live
lab) and a random token per lab. Interfaces need no unique names: each lives in its own namespace.
Every process started in a host also carries `D7Y_NETNS_LAB=<lab id>` in its environment, so a
sweep finds it even after its namespace lost its name.

Shaping: the egress of a host's `eth0` limits what the host sends (upload); the egress of its
switch-side `portN` limits what it receives (download). Both are `tbf` qdiscs. (This kernel has no
`netem`, no u32/flower classifiers and no `gact` action; partitions therefore use nftables, which
it has.)

Reaching a host from the test process: `call_in(host, function)` runs `function` on a fresh thread
that has joined the host's network namespace (setns(2) changes only the calling thread), so
sockets and urllib requests made there are the host's. A long-lived child must never be started
on such a thread: ManagedProcess children get SIGKILL when the thread that started them ends. Use
`NetworkLab.process()` (`ip netns exec`) for those.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import re
import secrets
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import yaml

from tests.harness.images import BuiltImage
from tests.harness.node import Node
from tests.harness.process import (
    STOP_GRACE_SECONDS,
    ManagedProcess,
    http_status,
    run,
    wait_until,
)
from tests.harness.registry import (
    REGISTRY_BINARY,
    START_TIMEOUT_SECONDS,
    AccessLog,
    BasicAuth,
    Registry,
    TokenAuth,
)

T = TypeVar("T")

IP_BINARY = "/usr/sbin/ip"
TC_BINARY = "/usr/sbin/tc"
NFT_BINARY = "/usr/sbin/nft"
CURL_BINARY = "/usr/bin/curl"
NSENTER_BINARY = "/usr/bin/nsenter"
NAMESPACE_DIRECTORY = Path("/run/netns")
NAMESPACE_PREFIX = "d7ylab-"
LAB_ENVIRONMENT_VARIABLE = "D7Y_NETNS_LAB"
# Private addresses that exist only behind each lab's own bridge; parallel labs may reuse them
# because no two labs share a switch, and no route leads there from the machine.
LAB_SUBNET = ipaddress.IPv4Network("10.213.0.0/24")
HOST_INTERFACE = "eth0"
BRIDGE_INTERFACE = "switch0"
# Roles become part of namespace names; short lowercase words keep `ip netns list` readable.
_ROLE_NAME = re.compile(r"^[a-z][a-z0-9]{0,15}$")
_NAMESPACE_NAME = re.compile(r"^d7ylab-(?P<pid>\d+)-(?P<ticks>\d+)-(?P<token>[0-9a-f]+)-")

# Fixed ports are safe inside a host: each host namespace is new and runs only what a test starts.
REGISTRY_PORT = 5000
NODE_PROXY_PORT = 65001
NODE_PEER_PORT = 65002
GOSSIP_PORT = 7946

# ip, tc and nft answer in milliseconds; this only bounds a wedged command.
COMMAND_TIMEOUT_SECONDS = 10.0
# Teardown gives each program this long after SIGTERM: a node flushes small files in well under a
# second, and a wedged one must not stretch every failing test by STOP_GRACE_SECONDS.
TEARDOWN_GRACE_SECONDS = 5.0
# tbf drops packets that would wait longer than this: about a switch's buffer, so TCP sees loss
# and backs off instead of queueing seconds of data (bufferbloat would distort timings).
DEFAULT_QUEUE_LATENCY_SECONDS = 0.05
# tbf's bucket: a few milliseconds of traffic at the link's rate, and never less than one 64 KiB
# GSO packet (veth passes segments that large). Measured here: 100 Mbit/s gives 96% of the rate
# and 1 Gbit/s 94%, where a 16 KiB bucket gave 1 Gbit/s only 64%.
BURST_SECONDS = 0.002
MIN_BURST_BYTES = 64 * 1024
# A connect between two hosts on the bridge takes well under a millisecond.
REACH_TIMEOUT_SECONDS = 2.0
# curl's progress is written once at the end; the timeout only bounds a hung transfer.
DOWNLOAD_TIMEOUT_SECONDS = 300.0

# setns(2) flag for a network namespace (linux/sched.h).
_CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class LinkShape:
    """A token-bucket limit on one direction of a link (a `tc qdisc … tbf`)."""

    rate_bits_per_second: int
    queue_latency_seconds: float = DEFAULT_QUEUE_LATENCY_SECONDS

    @property
    def burst_bytes(self) -> int:
        return max(MIN_BURST_BYTES, int(self.rate_bits_per_second / 8 * BURST_SECONDS))

    def tbf_arguments(self) -> list[str]:
        latency_microseconds = round(self.queue_latency_seconds * 1_000_000)
        return [
            "tbf", "rate", f"{self.rate_bits_per_second}bit", "burst", str(self.burst_bytes),
            "latency", f"{latency_microseconds}us",
        ]


def megabits(count: float) -> LinkShape:
    """A LinkShape of `count` Mbit/s (10^6 bits, as tc and network cards count)."""
    return LinkShape(round(count * 1_000_000))


@dataclass(eq=False)
class Host:
    """One machine of the lab: a namespace, its address, its switch port, what runs in it."""

    name: str
    namespace: str
    address: str
    # The bridge-side end of this host's veth: shaped for downloads, set down to pull the cable.
    switch_port: str
    processes: list[ManagedProcess] = field(default_factory=list)


@dataclass(frozen=True)
class Download:
    """What curl reported for one transfer."""

    status: int
    size_bytes: int
    seconds: float

    @property
    def bits_per_second(self) -> float:
        return self.size_bytes * 8 / self.seconds if self.seconds > 0 else float("inf")


# --- namespaces, threads, processes ------------------------------------------------------------


def netns_available() -> bool:
    """Whether this machine can run a lab: root, and the ip/tc/nft tools present."""
    tools = (IP_BINARY, TC_BINARY, NFT_BINARY, CURL_BINARY)
    return os.geteuid() == 0 and all(Path(tool).exists() for tool in tools)


def process_start_ticks(pid: int) -> int | None:
    """The start time of `pid` in clock ticks since boot (/proc/PID/stat field 22), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses; the fields after the last ')'
    # start at field 3 (state), so field 22 is the 20th of them.
    fields = stat.rpartition(")")[2].split()
    return int(fields[19]) if len(fields) > 19 else None


def _owner_alive(pid: int, ticks: int) -> bool:
    return process_start_ticks(pid) == ticks


def _lab_id_alive(lab_id: str) -> bool:
    pid, _, rest = lab_id.partition("-")
    ticks = rest.partition("-")[0]
    if not (pid.isdigit() and ticks.isdigit()):
        return False
    return _owner_alive(int(pid), int(ticks))


def namespace_names() -> list[str]:
    """Every named network namespace on the machine (as `ip netns list` shows them)."""
    try:
        return sorted(entry.name for entry in NAMESPACE_DIRECTORY.iterdir())
    except FileNotFoundError:
        return []


def namespace_pids(namespace: str) -> list[int]:
    """The processes inside a named namespace."""
    result = run([IP_BINARY, "netns", "pids", namespace], timeout=COMMAND_TIMEOUT_SECONDS,
                 check=False)
    return [int(word) for word in result.stdout.split() if word.isdigit()]


def processes_of_lab(lab_id: str | None = None) -> dict[int, str]:
    """pid → lab id of every process carrying the lab marker (only `lab_id`'s when given)."""
    marker = f"{LAB_ENVIRONMENT_VARIABLE}=".encode()
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environment = (entry / "environ").read_bytes()
        except OSError:
            continue
        for variable in environment.split(b"\0"):
            if variable.startswith(marker):
                owner = variable[len(marker):].decode(errors="replace")
                if lab_id is None or owner == lab_id:
                    found[int(entry.name)] = owner
                break
    return found


def _kill(pids: Iterable[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _delete_namespace(namespace: str) -> None:
    """kill -9 what runs inside, then remove the name (its interfaces go with the namespace)."""
    _kill(namespace_pids(namespace))
    run([IP_BINARY, "netns", "delete", namespace], timeout=COMMAND_TIMEOUT_SECONDS, check=False)


def sweep_leftovers() -> list[str]:
    """Remove what labs of test processes that no longer run left behind; what was removed.

    Namespaces named by this module whose owner (pid and start time) is gone, and processes that
    carry a dead lab's marker. Veths and bridges exist only inside lab namespaces, so they go with
    them. Labs of live processes (a parallel run) are left alone.
    """
    removed: list[str] = []
    stale = {pid: lab_id for pid, lab_id in processes_of_lab().items()
             if not _lab_id_alive(lab_id)}
    _kill(stale)
    removed += [f"process {pid} of lab {lab_id}" for pid, lab_id in stale.items()]
    for namespace in namespace_names():
        match = _NAMESPACE_NAME.match(namespace)
        if match and not _owner_alive(int(match["pid"]), int(match["ticks"])):
            _delete_namespace(namespace)
            removed.append(f"namespace {namespace}")
    return removed


def call_in_namespace(namespace: str, function: Callable[[], T]) -> T:
    """Run `function` on a new thread inside `namespace`'s network; its result or its exception.

    Sockets made there belong to the namespace (and stay usable from any thread). Never start a
    long-lived ManagedProcess in `function` (it would be killed when the thread ends); a child that
    `function` runs to completion is fine.
    """
    results: list[T] = []
    errors: list[BaseException] = []

    def body() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            target = os.open(NAMESPACE_DIRECTORY / namespace, os.O_RDONLY)
            try:
                if libc.setns(target, _CLONE_NEWNET) != 0:
                    number = ctypes.get_errno()
                    raise OSError(number, f"setns {namespace}: {os.strerror(number)}")
            finally:
                os.close(target)
            try:
                results.append(function())
            finally:
                libc.setns(own, _CLONE_NEWNET)
        except BaseException as error:
            errors.append(error)
        finally:
            os.close(own)

    thread = threading.Thread(target=body, name=f"in-{namespace}", daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return results[0]


# --- the lab ------------------------------------------------------------------------------------


class NetworkLab:
    """Manages one lab: its switch, hosts, links, faults and processes, from open to teardown.

    Use as a context manager (`with NetworkLab(path) as lab:`); `close()` runs on every path and
    is safe to call twice. Opening first sweeps leftovers of crashed earlier runs.
    """

    def __init__(self, work_dir: Path, *, subnet: ipaddress.IPv4Network = LAB_SUBNET) -> None:
        self.work_dir = work_dir
        pid = os.getpid()
        self.lab_id = f"{pid}-{process_start_ticks(pid)}-{secrets.token_hex(3)}"
        self.switch_namespace = self._namespace_name("switch")
        self.subnet = subnet
        self.hosts: dict[str, Host] = {}
        # Hosts that have partition rules, so heal() knows where to remove them.
        self._partitioned: set[str] = set()
        self._free_addresses: Iterator[ipaddress.IPv4Address] = subnet.hosts()
        self._namespaces: list[str] = []
        self._closed = False

    def _namespace_name(self, role: str) -> str:
        return f"{NAMESPACE_PREFIX}{self.lab_id}-{role}"

    # lifetime

    def __enter__(self) -> NetworkLab:
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exception: object) -> None:
        self.close()

    def open(self) -> list[str]:
        """Sweep leftovers, then create the switch; what the sweep removed."""
        removed = sweep_leftovers()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._add_namespace(self.switch_namespace)
        self._ip(self.switch_namespace, "link", "add", BRIDGE_INTERFACE, "type", "bridge")
        # Forward at once: a new port would otherwise spend seconds in STP listening/learning.
        self._ip(self.switch_namespace, "link", "set", BRIDGE_INTERFACE, "type", "bridge",
                 "stp_state", "0", "forward_delay", "0")
        self._ip(self.switch_namespace, "link", "set", BRIDGE_INTERFACE, "up")
        return removed

    def close(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL) and delete every namespace. Idempotent."""
        if self._closed:
            return
        self._closed = True
        managed = [process for host in self.hosts.values() for process in host.processes]
        for process in managed:
            if process.running:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + TEARDOWN_GRACE_SECONDS
        for process in managed:
            with contextlib.suppress(Exception):
                process.stop(grace=max(0.0, deadline - time.monotonic()))
        _kill(processes_of_lab(self.lab_id))
        for namespace in reversed(self._namespaces):
            _delete_namespace(namespace)
        # Reap children the kills above ended, so no zombie of ours outlives the lab.
        for process in managed:
            with contextlib.suppress(Exception):
                process.kill()

    def leftovers(self) -> list[str]:
        """What of this lab still exists: namespaces and marked processes ([] after close())."""
        found = [f"namespace {name}" for name in namespace_names() if name in self._namespaces]
        found += [f"process {pid}" for pid in processes_of_lab(self.lab_id)]
        return found

    # building

    def add_host(self, name: str, *, shape: LinkShape | None = None) -> Host:
        """A new host on the switch with the next free address; `shape` limits both directions."""
        if not _ROLE_NAME.match(name) or name == "switch":
            raise ValueError(f"host name {name!r}: want a short lowercase word, not 'switch'")
        if name in self.hosts:
            raise ValueError(f"host {name!r} exists")
        namespace = self._namespace_name(name)
        host = Host(name, namespace, str(next(self._free_addresses)), f"port{len(self.hosts)}")
        self._add_namespace(namespace)
        self.hosts[name] = host
        # Created directly in the two namespaces: neither end ever exists in the machine's own.
        run([IP_BINARY, "link", "add", HOST_INTERFACE, "netns", namespace, "type", "veth",
             "peer", "name", host.switch_port, "netns", self.switch_namespace],
            timeout=COMMAND_TIMEOUT_SECONDS)
        self._ip(self.switch_namespace, "link", "set", host.switch_port,
                 "master", BRIDGE_INTERFACE, "up")
        self._ip(namespace, "address", "add", f"{host.address}/{self.subnet.prefixlen}",
                 "dev", HOST_INTERFACE)
        self._ip(namespace, "link", "set", HOST_INTERFACE, "up")
        self._ip(namespace, "link", "set", "lo", "up")
        if shape is not None:
            self.shape(host, upload=shape, download=shape)
        return host

    def shape(self, host: Host, *, upload: LinkShape | None, download: LinkShape | None) -> None:
        """Limit what `host` sends (`upload`) and receives (`download`); None removes a limit."""
        for namespace, interface, limit in (
            (host.namespace, HOST_INTERFACE, upload),
            (self.switch_namespace, host.switch_port, download),
        ):
            if limit is None:
                run([IP_BINARY, "netns", "exec", namespace, TC_BINARY, "qdisc", "delete", "dev",
                     interface, "root"], timeout=COMMAND_TIMEOUT_SECONDS, check=False)
            else:
                run([IP_BINARY, "netns", "exec", namespace, TC_BINARY, "qdisc", "replace", "dev",
                     interface, "root", *limit.tbf_arguments()], timeout=COMMAND_TIMEOUT_SECONDS)

    def _add_namespace(self, namespace: str) -> None:
        run([IP_BINARY, "netns", "add", namespace], timeout=COMMAND_TIMEOUT_SECONDS)
        self._namespaces.append(namespace)

    @staticmethod
    def _ip(namespace: str, *arguments: str) -> None:
        run([IP_BINARY, "-n", namespace, *arguments], timeout=COMMAND_TIMEOUT_SECONDS)

    # running things in a host

    def enter(self, host: Host, argv: Sequence[str], *, share_mounts: bool = False) -> list[str]:
        """The command line that runs `argv` in `host`'s network.

        `ip netns exec` (the default) also gives the program a mount namespace of its own, so
        mounts it makes are invisible outside. `share_mounts` enters only the network namespace
        (`nsenter --net`): the program's mounts are the machine's, e.g. a node whose FUSE mounts
        a containerd on the host must see, or a containerd whose mounts runc must see.
        """
        if share_mounts:
            return [NSENTER_BINARY, f"--net={NAMESPACE_DIRECTORY / host.namespace}", "--", *argv]
        return [IP_BINARY, "netns", "exec", host.namespace, *argv]

    def process(
        self, host: Host, argv: Sequence[str], *, log_path: Path,
        env: Mapping[str, str] | None = None, cwd: Path | None = None,
        share_mounts: bool = False,
    ) -> ManagedProcess:
        """A ManagedProcess (not started) that runs `argv` inside `host`; the lab stops it.

        `share_mounts`: see `enter`."""
        environment = dict(os.environ if env is None else env)
        environment[LAB_ENVIRONMENT_VARIABLE] = self.lab_id
        managed = ManagedProcess(
            self.enter(host, argv, share_mounts=share_mounts),
            log_path=log_path, cwd=cwd, env=environment,
        )
        host.processes.append(managed)
        return managed

    def start(
        self, host: Host, argv: Sequence[str], *, log_name: str,
        env: Mapping[str, str] | None = None,
    ) -> ManagedProcess:
        """Start `argv` in `host` with its output in `<work dir>/logs/<host>-<log_name>.log`."""
        managed = self.process(
            host, argv, log_path=self.work_dir / "logs" / f"{host.name}-{log_name}.log", env=env,
        )
        managed.start()
        return managed

    def run(
        self, host: Host, argv: Sequence[str], *, timeout: float, check: bool = True,
        share_mounts: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in `host` to completion (process.run's contract; `share_mounts`: see
        `enter`)."""
        return run(self.enter(host, argv, share_mounts=share_mounts), timeout=timeout,
                   check=check)

    def call_in(self, host: Host, function: Callable[[], T]) -> T:
        """Run `function` in `host`'s network from this process (see call_in_namespace)."""
        return call_in_namespace(host.namespace, function)

    def http_status(self, host: Host, url: str, *, timeout: float = 2.0) -> int | None:
        """The status of a GET to `url` made from `host`, None when nothing answered."""
        return self.call_in(host, lambda: http_status(url, timeout=timeout))

    def http_get(self, host: Host, url: str, *, timeout: float = 10.0) -> bytes:
        """The body of a GET to `url` made from `host` (HTTPError for an error status)."""

        def fetch() -> bytes:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                body: bytes = response.read()
                return body

        return self.call_in(host, fetch)

    def download(self, host: Host, url: str, *, timeout: float = DOWNLOAD_TIMEOUT_SECONDS,
                 output: Path | None = None) -> Download:
        """`curl` `url` from `host` (to `output`, or discarded) and report size and time."""
        result = self.run(
            host,
            [CURL_BINARY, "--silent", "--show-error", "--output", str(output or os.devnull),
             "--write-out", "%{http_code} %{size_download} %{time_total}", "--max-time",
             str(timeout), url],
            timeout=timeout + COMMAND_TIMEOUT_SECONDS,
        )
        status, size, seconds = result.stdout.split()
        return Download(int(status), int(size), float(seconds))

    def tcp_echo(self, source: Host, destination: Host, *,
                 timeout: float = REACH_TIMEOUT_SECONDS) -> float:
        """Round-trip a few bytes over TCP from `source` to `destination`; the seconds it took.

        A listener on the destination's address, a connection from the source: raises
        TimeoutError when packets vanish (a partition), ConnectionError/OSError on refusal.
        """
        payload = secrets.token_bytes(16)

        def listen() -> socket.socket:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.bind((destination.address, 0))
            listener.listen(1)
            return listener

        listener = self.call_in(destination, listen)
        port: int = listener.getsockname()[1]
        started = time.monotonic()
        try:
            client = self.call_in(
                source, lambda: socket.create_connection((destination.address, port), timeout),
            )
            with client:
                client.sendall(payload)
                listener.settimeout(timeout)
                server, _ = listener.accept()
                with server:
                    server.settimeout(timeout)
                    server.sendall(server.recv(len(payload)))
                echoed = client.recv(len(payload))
            if echoed != payload:
                raise ConnectionError(f"echo from {destination.name} came back as {echoed!r}")
            return time.monotonic() - started
        finally:
            listener.close()

    def reachable(self, source: Host, destination: Host, *,
                  timeout: float = REACH_TIMEOUT_SECONDS) -> bool:
        try:
            self.tcp_echo(source, destination, timeout=timeout)
        except OSError:
            return False
        return True

    # faults

    def kill_host(self, host: Host) -> None:
        """`kill -9` everything running in `host` at once (a crash; its network stays up)."""
        _kill(namespace_pids(host.namespace))
        for process in host.processes:
            process.kill()

    def disconnect(self, host: Host) -> None:
        """Pull `host`'s cable: its switch port goes down, nothing reaches it or leaves it."""
        self._ip(self.switch_namespace, "link", "set", host.switch_port, "down")

    def reconnect(self, host: Host) -> None:
        self._ip(self.switch_namespace, "link", "set", host.switch_port, "up")

    def partition(self, *groups: Sequence[Host]) -> None:
        """Hosts in different groups stop hearing each other; hosts in no group hear everyone.

        Each host drops, on arrival, every packet from hosts of the other groups: senders see
        silence (timeouts), as on a cut link, not errors. Replaces an earlier partition.
        """
        members = [host.name for group in groups for host in group]
        if len(members) != len(set(members)):
            raise ValueError("a host can be in one group only")
        self.heal()
        for index, group in enumerate(groups):
            others = [host.address for other_index, other in enumerate(groups)
                      if other_index != index for host in other]
            if not others:
                continue
            rules = (
                "table inet d7ylab {\n"
                "  chain input {\n"
                "    type filter hook input priority 0; policy accept;\n"
                f"    ip saddr {{ {', '.join(others)} }} drop\n"
                "  }\n"
                "}\n"
            )
            for host in group:
                self._partitioned.add(host.name)
                run([IP_BINARY, "netns", "exec", host.namespace, NFT_BINARY, "-f", "-"],
                    timeout=COMMAND_TIMEOUT_SECONDS, input_bytes=rules.encode())

    def heal(self) -> None:
        """Undo `partition()`: every host hears every other again."""
        for name in sorted(self._partitioned):
            self.run(self.hosts[name], [NFT_BINARY, "delete", "table", "inet", "d7ylab"],
                     timeout=COMMAND_TIMEOUT_SECONDS)
        self._partitioned.clear()

    # the real programs, moved into a host

    def start_registry(
        self, host: Host, work_dir: Path, *, shape: LinkShape | None = None,
        basic: BasicAuth | None = None, token: TokenAuth | None = None,
    ) -> NamespacedRegistry:
        """The real registry in `host`, listening on its address; `shape` limits the host's link."""
        if shape is not None:
            self.shape(host, upload=shape, download=shape)
        registry = NamespacedRegistry(self, host, work_dir, basic=basic, token=token)
        registry.start()
        return registry

    def start_node(
        self, host: Host, work_dir: Path, *, registry_mirror: str | None = None,
        insecure_registries: Sequence[str] = (), extra_arguments: Sequence[str] = (),
        share_mounts: bool = False,
    ) -> NamespacedNode:
        """`d7y-node start` in `host`; `extra_arguments` carry e.g. --gossip-listen and --join.

        `share_mounts` (see `enter`): the node's FUSE mounts are visible on the machine."""
        node = NamespacedNode(
            self, host, work_dir, registry_mirror=registry_mirror,
            insecure_registries=insecure_registries, extra_arguments=extra_arguments,
            share_mounts=share_mounts,
        )
        node.start()
        return node

    def log_tails(self, limit: int = 6000) -> str:
        """The end of every process log in the lab, for a failing test's report."""
        parts: list[str] = []
        for host in self.hosts.values():
            for process in host.processes:
                header = f"===== {host.name}: {process.log_path}"
                parts.append(f"{header}\n{process.log_tail()[-limit:]}")
        return "\n".join(parts)


class NamespacedRegistry(Registry):
    """registry.py's registry, run inside a lab host and listening on the host's address."""

    def __init__(
        self, lab: NetworkLab, lab_host: Host, work_dir: Path, *, port: int = REGISTRY_PORT,
        basic: BasicAuth | None = None, token: TokenAuth | None = None,
    ) -> None:
        super().__init__(work_dir, basic=basic, token=token)
        self.lab = lab
        self.lab_host = lab_host
        self.port = port
        self.process = lab.process(
            lab_host, [REGISTRY_BINARY, "serve", str(work_dir / "config.yml")],
            log_path=work_dir / "registry.log",
        )
        self.access_log = AccessLog(self.process.log_path)

    @property
    def host(self) -> str:
        return f"{self.lab_host.address}:{self.port}"

    def start(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        (self.work_dir / "config.yml").write_text(yaml.safe_dump(self._config()))
        self.process.start()
        wait_until(
            lambda: self.lab.http_status(self.lab_host, f"{self.url}/v2/") in (200, 401),
            timeout=START_TIMEOUT_SECONDS, what=f"registry in {self.lab_host.name}",
            alive=lambda: self.process.running,
        )

    def push(self, image: BuiltImage, reference: str) -> None:
        """`skopeo copy` an image in from the registry's own host (loopback: no link limit)."""
        self.lab.call_in(
            self.lab_host, lambda: image.push(self.host, reference, credentials=self.credentials),
        )

    def blob_url(self, repository: str, digest: str) -> str:
        return f"{self.url}/v2/{repository}/blobs/{digest}"


class NamespacedNode(Node):
    """node.py's `d7y-node start`, run inside a lab host with fixed ports on the host's address.

    The proxy listens on all of the host's addresses (its own clients use loopback or the
    address); the peer port on the host's address, which is what other hosts reach.
    """

    def __init__(
        self, lab: NetworkLab, lab_host: Host, work_dir: Path, *,
        registry_mirror: str | None = None, insecure_registries: Sequence[str] = (),
        extra_arguments: Sequence[str] = (), share_mounts: bool = False,
    ) -> None:
        super().__init__(work_dir, registry_mirror=registry_mirror,
                         insecure_registries=insecure_registries, extra_arguments=extra_arguments)
        self.lab = lab
        self.lab_host = lab_host
        self.proxy_port = NODE_PROXY_PORT
        self.peer_port = NODE_PEER_PORT
        # Node's command line with the two listen addresses moved into the host.
        arguments = list(self.process.argv)
        arguments[arguments.index("--proxy-listen") + 1] = f"0.0.0.0:{self.proxy_port}"
        arguments[arguments.index("--peer-listen") + 1] = f"{lab_host.address}:{self.peer_port}"
        arguments[arguments.index("--gossip-listen") + 1] = f"{lab_host.address}:{GOSSIP_PORT}"
        self.process = lab.process(lab_host, arguments, log_path=work_dir / "node.log",
                                   share_mounts=share_mounts)

    @property
    def proxy_host(self) -> str:
        return f"{self.lab_host.address}:{self.proxy_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.lab_host.address}:{self.peer_port}"

    def healthy(self) -> bool:
        return self.lab.http_status(self.lab_host, f"{self.peer_url}/healthz") == 200

    def metrics_text(self) -> str:
        return self.lab.call_in(self.lab_host, lambda: Node.metrics_text(self))

    def stop(self, *, grace: float = STOP_GRACE_SECONDS) -> int | None:
        return self.process.stop(grace=grace)
