#!/usr/bin/env python3
"""Benchmark of the P2P cluster: N hosts pull one blob behind a slow origin, direct vs. d7y-node.

One command (run from the repository root, as root: `python bench/p2p.py`) builds a lab of network
namespaces with the test harness (`tests/harness/netns.py`): a switch, one namespace per host, the
real CNCF registry (Debian's `docker-registry`) in a namespace of its own whose link is limited by
`tc tbf` to the origin rate (100 Mbit/s by default), every host's link limited to the host rate
(1 Gbit/s) in both directions. It pushes a random blob (256 MiB) from inside the registry's own
namespace (loopback: the origin limit does not slow the push), then measures:

  (a) direct          every host `curl`s the blob straight from the registry, all at once
  (b) through nodes   a fresh `d7y-node start` (empty data dir) on every host, joined into one
                      cluster (gossip), membership converged (every node's /status shows every
                      member alive); then every host `curl`s the blob through its own node
                      (`http://127.0.0.1:65001/v2/<name>/blobs/<digest>?ns=<registry>`), all at once

For each: the time until all hosts have the blob (from one common start), each host's time and
their spread (last - first), the bytes the origin sent (the registry's access log: blob bytes
written; and its interface's transmit counter: bytes on the wire, headers included), the machine's
CPU use, and a sha256 check of every host's copy (after the clock stopped). Then the targets of
issue 3, item 7: (b) all done within 1.2 x size ÷ origin bandwidth, origin bytes (access log)
≤ 1.05 x size; and the ratio (a)/(b) of the times until all have it.

The CPU figures say whether the links set the pace: when processes outside the lab used a
noticeable share of a core (a shared machine) or the lab kept the cores busy, a note says so (and
suggests half the rates). `--origin-mbit` and `--host-mbit` scale the rates; the table then says
they differ from the issue's.

Exit status: 0 when the measurement ran, targets met or not (the table says MISS); 1 when something
broke (wrong bytes, an HTTP error, a program did not start, membership did not converge); 2 when
the machine cannot run a lab (not root, tools missing); 130 on Ctrl-C or SIGTERM. The lab (every
namespace and process) and the temporary directory are removed on every path.

This script owns only the measurement. The lab, the registry and the node's command line are the
harness's (`tests/harness/`); the node is whatever `python -m d7y_node` runs.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
if str(REPOSITORY_ROOT) not in sys.path:
    sys.path.insert(0, str(REPOSITORY_ROOT))

from benchlib import BenchFailed, log, size_argument  # noqa: E402 (after the sys.path setup)

from tests.harness.netns import (  # noqa: E402 (the repository root must be on sys.path first)
    GOSSIP_PORT,
    HOST_INTERFACE,
    IP_BINARY,
    Host,
    NamespacedNode,
    NamespacedRegistry,
    NetworkLab,
    megabits,
    netns_available,
)
from tests.harness.process import wait_until  # noqa: E402

REPOSITORY = "bench/p2p"
MEGABYTE = 1_000_000  # sizes and rates are reported in decimal units, as tc counts bits
MEBIBYTE = 1 << 20

# Targets of issue 3, item 7.
TIME_TARGET_FACTOR = 1.2
ORIGIN_BYTES_TARGET_FACTOR = 1.05
# The rates the issue asks for; other rates are reported as scaled.
ISSUE_ORIGIN_MBIT = 100.0
ISSUE_HOST_MBIT = 1000.0

# The blob streams in blocks of this size: random bytes, never all in memory.
PUSH_BLOCK_BYTES = 4 * MEBIBYTE
# Membership converges in a few 1 s probe rounds; generous for 8 Python nodes on 2 cores.
CONVERGE_TIMEOUT_SECONDS = 60.0
# A node answers /healthz about a second after its start; 8 starting at once on 2 cores take longer.
NODE_START_TIMEOUT_SECONDS = 60.0
# A transfer may take this many times its ideal time (size ÷ share of the slowest link) before
# it counts as hung; plus a fixed allowance for start-up.
DOWNLOAD_TIMEOUT_FACTOR = 4.0
DOWNLOAD_TIMEOUT_ALLOWANCE_SECONDS = 60.0
# Above this share of all cores busy during a phase, the machine (not the links) may have set
# the pace: the table says so and suggests lower rates.
CPU_BOUND_BUSY_FRACTION = 0.9
# Processes outside the benchmark using more than this share of one core during a phase mean the
# machine was shared (the benchmark's own threads use a few percent).
SHARED_MACHINE_PERCENT = 25.0
# Nodes log at this level: debug lines for every piece would cost CPU the transfer needs.
NODE_LOG_LEVEL = "info"
# Interfaces answer `ip -s` in milliseconds; this bounds a wedged command.
COMMAND_TIMEOUT_SECONDS = 10.0



class Interrupted(BaseException):
    """SIGTERM or SIGHUP reached the benchmark; handled like Ctrl-C (not caught as an error)."""


# ---------------------------------------------------------------------------------------------
# Small helpers





def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while block := source.read(PUSH_BLOCK_BYTES):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, interrupts) CPU seconds of the whole machine since boot, from /proc/stat.

    `interrupts` (irq and softirq time) is mostly the kernel moving the lab's packets through
    veths, the bridge and tbf; it belongs to no process.
    """
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is already inside user).
    idle = fields[3] + fields[4]
    total = sum(fields[:8])
    return (total - idle) / CLOCK_TICKS, (fields[5] + fields[6]) / CLOCK_TICKS


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` (all its threads); 0 once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # Fields after the command name's closing parenthesis start at field 3; utime and stime are
    # fields 14 and 15.
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def children_cpu_seconds() -> float:
    """CPU seconds of this process's reaped children (the curl clients)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class CpuUse:
    """CPU seconds spent during one phase, by party, and the wall time of the phase."""

    wall_seconds: float
    machine: float
    interrupts: float
    nodes: float
    registry: float
    clients: float

    @property
    def other(self) -> float:
        """Everything else on the machine (the benchmark itself, other users' work)."""
        return max(0.0, self.machine - self.interrupts - self.nodes - self.registry
                   - self.clients)

    @property
    def busy_fraction(self) -> float:
        """Share of all cores busy."""
        cores = os.cpu_count() or 1
        return self.machine / (self.wall_seconds * cores) if self.wall_seconds > 0 else 0.0

    def percent_of_core(self, seconds: float) -> float:
        return 100 * seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0


class CpuMeter:
    """Takes CPU readings of the machine, given processes and the reaped clients."""

    def __init__(self, node_pids: Sequence[int], registry_pid: int) -> None:
        self.node_pids = list(node_pids)
        self.registry_pid = registry_pid
        self._start = self._reading()

    def _reading(self) -> tuple[float, float, float, float, float, float]:
        busy, interrupts = machine_cpu_seconds()
        nodes = sum(process_cpu_seconds(pid) for pid in self.node_pids)
        return (time.monotonic(), busy, interrupts, nodes,
                process_cpu_seconds(self.registry_pid), children_cpu_seconds())

    def stop(self) -> CpuUse:
        end = self._reading()
        wall, machine, interrupts, nodes, registry, clients = (
            after - before for after, before in zip(end, self._start, strict=True)
        )
        return CpuUse(wall, machine, interrupts, nodes, registry, clients)


def interface_transmit_bytes(host: Host) -> int:
    """Bytes `host`'s link has sent so far (the kernel's counter: payload and every header)."""
    result = run_command(
        [IP_BINARY, "-n", host.namespace, "-s", "-j", "link", "show", HOST_INTERFACE]
    )
    (link,) = json.loads(result)
    transmitted: int = link["stats64"]["tx"]["bytes"]
    return transmitted


def run_command(argv: Sequence[str]) -> str:
    completed = subprocess.run(list(argv), capture_output=True, text=True, check=False,
                               timeout=COMMAND_TIMEOUT_SECONDS)
    if completed.returncode != 0:
        raise BenchFailed(f"{' '.join(argv)} exited {completed.returncode}: {completed.stderr}")
    return completed.stdout


# ---------------------------------------------------------------------------------------------
# The blob


def push_blob(registry: NamespacedRegistry, size: int) -> str:
    """Push `size` random bytes as one blob, from inside the registry's host; its digest.

    The distribution spec's streamed upload (POST, one chunked PATCH, PUT with the digest), made
    on the registry's own host: the connection stays on its loopback, so the origin limit does
    not slow the push.
    """

    def request(method: str, target: str, body: Any = None,
                headers: dict[str, str] | None = None, expect: int = 200) -> str:
        parsed = urllib.parse.urlsplit(urllib.parse.urljoin(registry.url + "/", target))
        path = parsed.path + (f"?{parsed.query}" if parsed.query else "")
        connection = http.client.HTTPConnection(parsed.hostname or "", parsed.port, timeout=600)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            response.read()
        finally:
            connection.close()
        if response.status != expect:
            raise BenchFailed(f"registry {method} {path}: status {response.status}, not {expect}")
        return response.getheader("Location") or response.getheader("Content-Length") or ""

    def push() -> str:
        digest = hashlib.sha256()

        def blocks() -> Iterator[bytes]:
            remaining = size
            while remaining > 0:
                block = os.urandom(min(remaining, PUSH_BLOCK_BYTES))
                digest.update(block)
                remaining -= len(block)
                yield block

        location = request("POST", f"/v2/{REPOSITORY}/blobs/uploads/", expect=202)
        # An iterable body without Content-Length goes out chunked: one PATCH streams it all.
        location = request("PATCH", location, body=blocks(), expect=202,
                           headers={"Content-Type": "application/octet-stream"}) or location
        blob_digest = f"sha256:{digest.hexdigest()}"
        separator = "&" if "?" in location else "?"
        request("PUT", f"{location}{separator}digest={urllib.parse.quote(blob_digest)}",
                headers={"Content-Length": "0"}, expect=201)
        length = request("HEAD", f"/v2/{REPOSITORY}/blobs/{blob_digest}")
        if length != str(size):
            raise BenchFailed(f"the registry reports a length of {length}, not {size}")
        return blob_digest

    return registry.lab.call_in(registry.lab_host, push)


# ---------------------------------------------------------------------------------------------
# Measurements


@dataclass(frozen=True)
class HostResult:
    """One host's transfer in one scenario."""

    host: str
    # From the common start to curl's exit, as the benchmark saw it.
    done_seconds: float
    # curl's own time_total (from its start, which lags the common start by a few ms).
    curl_seconds: float
    status: int
    size_bytes: int
    sha256_ok: bool
    # Through a node only: what the node's /status says it fetched from origin and from peers.
    node_origin_bytes: int | None = None
    node_peer_bytes: int | None = None


@dataclass(frozen=True)
class Scenario:
    """All hosts pulling the blob at once, one way."""

    name: str
    hosts: list[HostResult]
    # Blob bytes the registry wrote (its access log, 200/206 GETs of the blob).
    origin_bytes: int
    # Bytes the registry's link transmitted (headers and the other traffic of the phase too).
    origin_wire_bytes: int
    # CPU used during the transfer, by party.
    cpu: CpuUse

    @property
    def all_done_seconds(self) -> float:
        return max(result.done_seconds for result in self.hosts)

    @property
    def first_done_seconds(self) -> float:
        return min(result.done_seconds for result in self.hosts)

    @property
    def median_done_seconds(self) -> float:
        return statistics.median(result.done_seconds for result in self.hosts)

    @property
    def spread_seconds(self) -> float:
        return self.all_done_seconds - self.first_done_seconds


@dataclass
class Results:
    hosts: int
    size_bytes: int
    digest: str
    origin_mbit: float
    host_mbit: float
    machine: str
    scenarios: list[Scenario] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def time_target_seconds(self) -> float:
        return TIME_TARGET_FACTOR * self.size_bytes * 8 / (self.origin_mbit * MEGABYTE)

    @property
    def origin_bytes_target(self) -> float:
        return ORIGIN_BYTES_TARGET_FACTOR * self.size_bytes


def pull_all(lab: NetworkLab, hosts: Sequence[Host], url_for: Callable[[Host], str],
             output: Path, timeout: float) -> list[tuple[Host, float, float, int, int]]:
    """Every host downloads its URL at once (released together); (host, done, curl, status, size).

    `done` counts from the common release to the end of that host's curl. On an error or an
    interrupt this returns at once, without waiting for the other transfers: the lab's teardown
    kills the curls still running in the hosts, which ends their threads.
    """
    output.mkdir(parents=True, exist_ok=True)
    release = threading.Barrier(len(hosts) + 1)
    started: list[float] = []

    def one(host: Host) -> tuple[Host, float, float, int, int]:
        release.wait()
        download = lab.download(host, url_for(host), output=output / host.name, timeout=timeout)
        return host, time.monotonic() - started[0], download.seconds, download.status, \
            download.size_bytes

    pool = ThreadPoolExecutor(len(hosts))
    try:
        futures = [pool.submit(one, host) for host in hosts]
        started.append(time.monotonic())
        release.wait()
        return [future.result() for future in futures]
    except BaseException:
        release.abort()
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def check_copies(results: Sequence[tuple[Host, float, float, int, int]], output: Path,
                 size: int, digest: str, what: str) -> dict[str, bool]:
    """Every copy's status, size and sha256 (each file removed once hashed); host → sha256 ok."""
    verified: dict[str, bool] = {}
    for host, _, _, status, received in results:
        path = output / host.name
        if status != 200 or received != size:
            raise BenchFailed(f"{what}: {host.name} got HTTP {status} and {received} of {size} "
                              "bytes")
        verified[host.name] = sha256_of(path) == digest
        path.unlink()
        if not verified[host.name]:
            raise BenchFailed(f"{what}: {host.name}'s copy does not match {digest}")
    return verified


def measure(lab: NetworkLab, registry: NamespacedRegistry, hosts: Sequence[Host],
            url_for: Callable[[Host], str], name: str, size: int, digest: str, output: Path,
            timeout: float, node_pids: Sequence[int] = ()) -> Scenario:
    mark = registry.access_log.mark()
    wire_before = interface_transmit_bytes(registry.lab_host)
    meter = CpuMeter(node_pids, registry.process.pid)
    results = pull_all(lab, hosts, url_for, output, timeout)
    cpu = meter.stop()
    registry.access_log.settle()
    wire = interface_transmit_bytes(registry.lab_host) - wire_before
    origin = registry.access_log.bytes_served(digest, since=mark)
    verified = check_copies(results, output, size, digest, name)
    return Scenario(
        name,
        [HostResult(host.name, done, curl, status, received, verified[host.name])
         for host, done, curl, status, received in results],
        origin, wire, cpu,
    )


def node_status(lab: NetworkLab, node: NamespacedNode) -> dict[str, Any]:
    status: dict[str, Any] = json.loads(lab.http_get(node.lab_host, f"{node.peer_url}/status"))
    return status


def start_cluster(lab: NetworkLab, hosts: Sequence[Host], registry: NamespacedRegistry,
                  work_dir: Path) -> list[NamespacedNode]:
    """A fresh node on every host, all healthy: the first one (the seed) alone, then the others
    at once, each joining the seed.

    The seed is up before anyone joins it: a join that finds nobody is retried only after a
    while, which would add that wait to the convergence. Processes are started from this
    thread (a harness child dies with the thread that started it); the waits for /healthz of
    the others run side by side.
    """
    seed = hosts[0]

    def start(host: Host) -> NamespacedNode:
        arguments = [
            "--gossip-listen", f"{host.address}:{GOSSIP_PORT}", "--advertise-addr", host.address,
            "--node-id", host.name, "--log-level", NODE_LOG_LEVEL,
        ]
        if host is not seed:
            arguments += ["--join", f"{seed.address}:{GOSSIP_PORT}"]
        node = NamespacedNode(lab, host, work_dir / host.name,
                              insecure_registries=[registry.host], extra_arguments=arguments)
        node.process.start()
        return node

    def healthy(node: NamespacedNode) -> None:
        wait_until(node.healthy, timeout=NODE_START_TIMEOUT_SECONDS,
                   what=f"d7y-node on {node.lab_host.name}", alive=lambda: node.process.running)

    nodes = [start(seed)]
    healthy(nodes[0])
    nodes += [start(host) for host in hosts[1:]]
    with ThreadPoolExecutor(len(nodes) - 1) as pool:
        list(pool.map(healthy, nodes[1:]))
    return nodes


def wait_converged(lab: NetworkLab, nodes: Sequence[NamespacedNode]) -> float:
    """Wait until every node's /status shows every member alive; the seconds it took."""
    started = time.monotonic()

    def all_alive() -> bool:
        for node in nodes:
            try:
                members = node_status(lab, node)["members"]
            except OSError:
                return False
            if sum(1 for member in members if member["state"] == "alive") != len(nodes):
                return False
        return True

    wait_until(all_alive, timeout=CONVERGE_TIMEOUT_SECONDS,
               what=f"{len(nodes)} members alive on every node")
    return time.monotonic() - started


def run(arguments: argparse.Namespace, work_dir: Path) -> Results:
    size: int = arguments.size
    host_count: int = arguments.hosts
    origin_rate = megabits(arguments.origin_mbit)
    host_rate = megabits(arguments.host_mbit)
    results = Results(
        host_count, size, "", arguments.origin_mbit, arguments.host_mbit,
        f"{os.cpu_count()} CPUs, Linux {platform.release()}, Python {platform.python_version()}",
    )
    if (arguments.origin_mbit, arguments.host_mbit) != (ISSUE_ORIGIN_MBIT, ISSUE_HOST_MBIT):
        results.notes.append(
            f"rates scaled: origin {arguments.origin_mbit:g} Mbit/s, hosts "
            f"{arguments.host_mbit:g} Mbit/s (the issue asks for {ISSUE_ORIGIN_MBIT:g} and "
            f"{ISSUE_HOST_MBIT:g}); the targets scale with the origin rate"
        )
    # The slowest share: all hosts splitting the origin in (a).
    ideal = host_count * size * 8 / origin_rate.rate_bits_per_second
    timeout = DOWNLOAD_TIMEOUT_FACTOR * ideal + DOWNLOAD_TIMEOUT_ALLOWANCE_SECONDS

    with NetworkLab(work_dir / "lab") as lab:
        try:
            registry_host = lab.add_host("registry")
            registry = lab.start_registry(registry_host, work_dir / "registry", shape=origin_rate)
            log(f"registry at {registry.host}, its link limited to {arguments.origin_mbit:g} "
                "Mbit/s")
            started = time.monotonic()
            results.digest = push_blob(registry, size)
            log(f"pushed {size / MEGABYTE:.0f} MB blob {results.digest[:19]}… in "
                f"{time.monotonic() - started:.1f} s")
            hosts = [lab.add_host(f"host{index}", shape=host_rate) for index in range(host_count)]
            log(f"{host_count} hosts, each link limited to {arguments.host_mbit:g} Mbit/s")
            output = work_dir / "out"

            if not arguments.skip_direct:
                log(f"(a) {host_count} hosts pull straight from the registry "
                    f"(ideal {ideal:.0f} s)…")
                direct = measure(
                    lab, registry, hosts, lambda host: registry.blob_url(REPOSITORY,
                                                                         results.digest),
                    "(a) direct from origin", size, results.digest, output, timeout,
                )
                results.scenarios.append(direct)
                log(f"(a) all done in {direct.all_done_seconds:.1f} s")

            started = time.monotonic()
            nodes = start_cluster(lab, hosts, registry, work_dir / "nodes")
            converged = wait_converged(lab, nodes)
            log(f"{host_count} nodes started, membership converged "
                f"{converged:.1f} s after the last was healthy "
                f"({time.monotonic() - started:.1f} s in all)")
            by_host = {node.lab_host.name: node for node in nodes}

            def through_node(host: Host) -> str:
                node = by_host[host.name]
                return (f"http://127.0.0.1:{node.proxy_port}/v2/{REPOSITORY}/blobs/"
                        f"{results.digest}?ns={registry.host}")

            log(f"(b) {host_count} hosts pull through their own node "
                f"(target {results.time_target_seconds:.1f} s)…")
            peer = measure(lab, registry, hosts, through_node, "(b) through d7y-node", size,
                           results.digest, output, timeout,
                           node_pids=[node.process.pid for node in nodes])
            log(f"(b) all done in {peer.all_done_seconds:.1f} s")
            hosts_with_nodes: list[HostResult] = []
            for result in peer.hosts:
                tasks = node_status(lab, by_host[result.host])["tasks"]
                task = next((task for task in tasks if task["task_id"] == results.digest), None)
                hosts_with_nodes.append(HostResult(
                    **{**asdict(result),
                       "node_origin_bytes": task["origin_bytes"] if task else None,
                       "node_peer_bytes": task["peer_bytes"] if task else None},
                ))
            results.scenarios.append(Scenario(peer.name, hosts_with_nodes, peer.origin_bytes,
                                              peer.origin_wire_bytes, peer.cpu))
            results.notes += [note for scenario in results.scenarios
                              for note in cpu_notes(scenario, arguments)]
        except Exception:
            print(lab.log_tails(3000), file=sys.stderr)
            raise
    return results


# ---------------------------------------------------------------------------------------------
# Report


def cpu_notes(scenario: Scenario, arguments: argparse.Namespace) -> list[str]:
    """What the CPU figures say about a scenario's times: shared machine, or the lab CPU-bound."""
    cpu = scenario.cpu
    other = cpu.percent_of_core(cpu.other)
    shared = other >= SHARED_MACHINE_PERCENT
    notes: list[str] = []
    if shared:
        notes.append(f"{scenario.name}: processes outside the lab used {other:.0f}% of a core "
                     "during the transfer (a shared machine): the times are noisy; run again "
                     "on a quiet machine")
    if cpu.busy_fraction >= CPU_BOUND_BUSY_FRACTION and not shared:
        notes.append(f"{scenario.name}: the lab kept the cores {cpu.busy_fraction:.0%} busy, so "
                     "they may have set the pace rather than the links; compare with "
                     f"--origin-mbit {arguments.origin_mbit / 2:g} "
                     f"--host-mbit {arguments.host_mbit / 2:g}")
    return notes


def pass_or_miss(met: bool) -> str:
    return "PASS" if met else "MISS"


def format_table(results: Results) -> str:
    size = results.size_bytes
    lines = [
        f"blob: {size / MEGABYTE:.1f} MB ({size} bytes) {results.digest}",
        f"hosts: {results.hosts}; origin link {results.origin_mbit:g} Mbit/s, host links "
        f"{results.host_mbit:g} Mbit/s (tc tbf, each direction)",
        f"machine: {results.machine}",
        "",
        f"{'scenario':<24} {'all done':>9} {'first':>8} {'median':>8} {'spread':>8} "
        f"{'origin bytes':>14} {'x blob':>7} {'on wire':>10} {'origin Mbit/s':>14}",
    ]
    for scenario in results.scenarios:
        origin_rate = scenario.origin_wire_bytes * 8 / scenario.all_done_seconds / MEGABYTE
        lines.append(
            f"{scenario.name:<24} {scenario.all_done_seconds:>8.1f}s "
            f"{scenario.first_done_seconds:>7.1f}s {scenario.median_done_seconds:>7.1f}s "
            f"{scenario.spread_seconds:>7.1f}s {scenario.origin_bytes / MEGABYTE:>11.1f} MB "
            f"{scenario.origin_bytes / size:>6.2f}x "
            f"{scenario.origin_wire_bytes / MEGABYTE:>7.1f} MB {origin_rate:>14.1f}"
        )
        cpu = scenario.cpu
        parts = [("machine", cpu.machine), ("nodes", cpu.nodes), ("registry", cpu.registry),
                 ("curl", cpu.clients), ("irq/softirq", cpu.interrupts), ("other", cpu.other)]
        lines.append("    CPU, 100% = one core: " + ", ".join(
            f"{label} {cpu.percent_of_core(seconds):.0f}%" for label, seconds in parts
            if label != "nodes" or scenario.name.startswith("(b)")
        ))
    lines.append("")
    lines.append("all done: from one common start until the last host's curl ended; spread: last"
                 " - first; origin bytes: the registry's access log (blob bytes written); on "
                 "wire: its link's transmit counter (headers included); origin Mbit/s: on wire / "
                 "all done; CPU: during the transfer; irq/softirq: mostly the kernel moving "
                 "the lab's packets; other: every process not in the lab")
    by_name = {scenario.name[:3]: scenario for scenario in results.scenarios}
    peer = by_name.get("(b)")
    direct = by_name.get("(a)")
    if peer is not None:
        lines += [
            "",
            f"per host, (b) through d7y-node{' and (a) direct' if direct else ''}:",
            f"  {'host':<8} {'(b) done':>9} {'curl':>7} {'node origin':>12} {'node peers':>11}"
            f"{'   (a) done' if direct else ''}",
        ]
        direct_by_host = {result.host: result for result in direct.hosts} if direct else {}
        for result in peer.hosts:
            node_origin = ("?" if result.node_origin_bytes is None
                           else f"{result.node_origin_bytes / MEGABYTE:.1f} MB")
            node_peers = ("?" if result.node_peer_bytes is None
                          else f"{result.node_peer_bytes / MEGABYTE:.1f} MB")
            direct_done = (f" {direct_by_host[result.host].done_seconds:>9.1f}s"
                           if result.host in direct_by_host else "")
            lines.append(f"  {result.host:<8} {result.done_seconds:>8.1f}s "
                         f"{result.curl_seconds:>6.1f}s {node_origin:>12} {node_peers:>11}"
                         f"{direct_done}")
        time_met = peer.all_done_seconds <= results.time_target_seconds
        bytes_met = peer.origin_bytes <= results.origin_bytes_target
        lines += [
            "",
            "targets (issue 3, item 7):",
            f"  (b) all done ≤ {TIME_TARGET_FACTOR} x size ÷ origin bandwidth = "
            f"{results.time_target_seconds:.1f} s: {peer.all_done_seconds:.1f} s  "
            f"{pass_or_miss(time_met)}",
            f"  (b) origin bytes ≤ {ORIGIN_BYTES_TARGET_FACTOR} x size = "
            f"{results.origin_bytes_target / MEGABYTE:.1f} MB: "
            f"{peer.origin_bytes / MEGABYTE:.1f} MB  {pass_or_miss(bytes_met)}",
        ]
        if direct is not None:
            lines.append(f"  ratio (a)/(b) of the time until all have it: "
                         f"{direct.all_done_seconds / peer.all_done_seconds:.1f}x")
    lines.append("  every copy's sha256 matched the blob's")
    for note in results.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def results_json(results: Results) -> dict[str, Any]:
    return {
        **asdict(results),
        "time_target_seconds": results.time_target_seconds,
        "origin_bytes_target": results.origin_bytes_target,
        "all_done_seconds": {scenario.name: scenario.all_done_seconds
                             for scenario in results.scenarios},
    }


# ---------------------------------------------------------------------------------------------
# Command line


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="P2P benchmark: N hosts (network namespaces) pull one blob from an origin "
                    "behind a slow link, (a) directly and (b) through d7y-node. Needs root; run "
                    "from the repository root.",
    )
    parser.add_argument("--hosts", type=int, default=8, help="hosts pulling (default 8)")
    parser.add_argument("--size", type=size_argument(), default=256 * MEBIBYTE,
                        help="blob size, e.g. 256MiB (default) or 64MiB")
    parser.add_argument("--origin-mbit", type=float, default=ISSUE_ORIGIN_MBIT,
                        help="the registry's link in Mbit/s (default 100)")
    parser.add_argument("--host-mbit", type=float, default=ISSUE_HOST_MBIT,
                        help="each host's link in Mbit/s, both directions (default 1000)")
    parser.add_argument("--skip-direct", action="store_true",
                        help="measure only (b), through the nodes (no ratio then)")
    parser.add_argument("--json", type=Path, metavar="FILE",
                        help="also write the figures as JSON to FILE")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (logs) after the run")
    arguments = parser.parse_args(argv)
    if arguments.hosts < 2:
        parser.error("--hosts: at least 2")
    if arguments.origin_mbit <= 0 or arguments.host_mbit <= 0:
        parser.error("rates must be positive")
    return arguments


def raise_interrupted(signal_number: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signal_number).name)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    if not netns_available():
        print("bench/p2p.py needs root and ip, tc, nft and curl (it builds network namespaces)",
              file=sys.stderr)
        return 2
    for number in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, raise_interrupted)
    work_dir = Path(tempfile.mkdtemp(prefix="d7y-bench-p2p-"))
    try:
        results = run(arguments, work_dir)
    except (KeyboardInterrupt, Interrupted):
        print("interrupted; the lab is torn down", file=sys.stderr)
        return 130
    except Exception as error:
        print(f"benchmark failed: {error}", file=sys.stderr)
        return 1
    finally:
        if arguments.keep:
            log(f"kept {work_dir}")
        else:
            shutil.rmtree(work_dir, ignore_errors=True)
    print(format_table(results))
    if arguments.json is not None:
        arguments.json.write_text(json.dumps(results_json(results), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
