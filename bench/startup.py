#!/usr/bin/env python3
"""Benchmark of container start-up (issue 5, item 4): the Dragonfly + Nydus table, reproduced.

One command (run from the repository root, as root: `python bench/startup.py`):

  lab         network namespaces (tests/harness/netns.py): the registry (Debian's
              `docker-registry`) in a host whose link is limited by `tc tbf` to --origin-mbit
              (100 Mbit/s); a client host and --peers peer hosts on --host-mbit (1 Gbit/s) links.
  image       debootstrap bookworm minbase + python3 + python3-pip, one tar+gzip layer, built once
              and cached under --cache-dir (/var/cache/d7y-bench/, the code path of bench/lazy.py),
              pushed as OCI from inside the registry's host (loopback: no limit) and converted
              there with `d7y-node convert` to a Nydus tag.
  containerd  the machine's containerd 1.6 + runc (tests/harness/containerd.py), a fresh root per
              cold run, with the CRI plugin on; it runs in the client host's network only
              (`nsenter --net`: its mounts and runc's are the machine's). Every pull is a CRI
              PullImage (tests/harness/cri.py), as the kubelet makes it; the container is
              `ctr -n k8s.io run --rm --snapshotter S IMAGE ID python3 -c "import json;
              print('ok')"`. The clock runs from the PullImage request to that container's exit.
  local node  `d7y-node start --snapshotter-socket …` in the client host, also `nsenter --net`
              (its FUSE mounts must be visible to containerd and runc), containerd's snapshotter
              (`proxy_plugins`) and registry mirror (hosts.toml). In the cluster scenarios its
              node id is chosen so that it is never a home of the image's blobs (like a plain
              dfdaemon: the origin is fetched by the seed peers, the homes).

Scenarios, each the median of --repeats (3) runs:

  OCIv1                 containerd's own pull, straight from the registry (no mirror: the published
                        baseline is containerd + overlayfs pulling from the registry), unpacked by
                        the overlayfs snapshotter, then run. Fresh containerd per run.
  Nydus cold            the Nydus tag through a fresh local node alone (empty piece store, no
                        peers), d7y-node as snapshotter. Fresh node and containerd per run.
  Nydus + P2P cold      the same, the local node joined to --peers fresh peers (all stores empty):
                        the blobs' homes fetch from origin, the local node from them.
  hit remote peer cache the peers hold the blobs (pulled through a peer's mirror beforehand); the
                        local node is fresh and empty each run.
  hit local peer cache  the local node's piece store holds what the container reads; the image
                        was removed from containerd (CRI RemoveImage: its snapshots and FUSE
                        mount are gone), so each run is a fresh pull and a fresh mount.
  hit local chunk cache the image stays pulled: its snapshots, the FUSE mount and the chunks read
                        before (piece store and the kernel's page cache) are all there; a run is
                        PullImage (the tag is resolved again, nothing is fetched) and a new
                        container. This is what Nydus calls its local blob cache hit.

For each: the median seconds (and every run's), the PullImage part, the origin bytes (the
registry's access log), the ratio OCIv1 ÷ scenario, and the ratio published for a python image
(Nydus cold 5.4x, hit remote peer 6.5x, hit local peer 9.3x, hit Nydus cache 45x) with MET/MISS.

Exit status: 0 when every scenario measured (targets met or not: the table says MISS), 1 when
something broke (a scenario that could not run says why in the table), 2 when the machine cannot
run it (not root, tools missing), 130 on Ctrl-C or SIGTERM. Every container, mount, namespace,
process, containerd state directory and the temporary directory are removed on every path.

Owns only the measurement; the lab, the registry, containerd, the CRI client and the node's
command line are the harness's (`tests/harness/`), the image is bench/lazy.py's, the peers are
started as bench/p2p.py starts them; the node is whatever `python -m d7y_node` runs.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
if str(REPOSITORY_ROOT) not in sys.path:
    sys.path.insert(0, str(REPOSITORY_ROOT))

from benchlib import BenchFailed, log  # noqa: E402 (after the sys.path setup)
from lazy import debootstrap_rootfs, pack_image  # noqa: E402
from p2p import start_cluster, wait_converged  # noqa: E402

from d7y_node.peer import task_key_for  # noqa: E402
from d7y_node.scheduler import DEFAULT_HOME_REPLICAS, task_homes  # noqa: E402
from tests.harness.containerd import (  # noqa: E402
    CRI_NAMESPACE,
    CTR,
    Containerd,
    CriSettings,
    DaemonOptions,
    write_mirror_hosts,
)
from tests.harness.cri import CriImages  # noqa: E402
from tests.harness.images import MEDIA_TYPE_MANIFEST, BuiltImage  # noqa: E402
from tests.harness.netns import (  # noqa: E402
    GOSSIP_PORT,
    NODE_PROXY_PORT,
    Host,
    NamespacedNode,
    NamespacedRegistry,
    NetworkLab,
    megabits,
    netns_available,
)
from tests.harness.node import node_command  # noqa: E402
from tests.harness.process import run, wait_until  # noqa: E402

MEGABYTE = 1_000_000  # sizes are reported in decimal units, as tc counts bits

ISSUE_ORIGIN_MBIT = 100.0
# The peers' and the client's links: a data-centre LAN is faster still, but tbf at 1 Gbit/s is what
# bench/p2p.py measured as reliable on this machine.
DEFAULT_HOST_MBIT = 1000.0
# Peers besides the local node: with two homes per task, one more peer is never a home, so the
# cluster has the shape of a Dragonfly deployment (seed peers + plain peers).
DEFAULT_PEERS = 3
DEFAULT_REPEATS = 3

DEFAULT_CACHE_DIR = Path("/var/cache/d7y-bench")
PACKAGES = ("python3", "python3-pip")
REPOSITORY = "bench/python"
OCI_TAG = "startup-oci"
NYDUS_TAG = "startup-nydus"
CONTAINER_COMMAND = ("python3", "-c", "import json; print('ok')")
CONTAINER_OUTPUT = "ok"

# containerd's name for our snapshotter (a `proxy_plugins` entry) and its own overlay one.
SNAPSHOTTER_NAME = "d7y"
OVERLAY_SNAPSHOTTER = "overlayfs"

# The published start-up ratios (OCIv1 ÷ scenario) for a python image, Dragonfly + Nydus.
PUBLISHED_RATIOS = {
    "nydus-cold": 5.4,
    "remote-peer": 6.5,
    "local-peer": 9.3,
    "chunk-cache": 45.0,
}

NODE_LOG_LEVEL = "info"
NODE_START_TIMEOUT_SECONDS = 60.0
# Push and convert of a ~130 MB image from inside the registry's host: a minute or two.
STEP_TIMEOUT_SECONDS = 900.0
# A container of this image exits in about a second; this bounds a hang, not a slow run.
RUN_TIMEOUT_SECONDS = 300.0
COMMAND_TIMEOUT_SECONDS = 60.0
# Curl of a blob through a peer's mirror when warming the peers.
WARM_TIMEOUT_SECONDS = 300.0


class Interrupted(BaseException):
    """SIGTERM or SIGHUP reached the benchmark; handled like Ctrl-C."""


@dataclass(frozen=True)
class Scenario:
    """One row of the table."""

    key: str
    name: str
    published_ratio: float | None


SCENARIOS = (
    Scenario("oci", "OCIv1 (containerd pull + overlayfs)", None),
    Scenario("nydus-cold", "Nydus cold", PUBLISHED_RATIOS["nydus-cold"]),
    Scenario("p2p-cold", "Nydus + P2P cold", None),
    Scenario("remote-peer", "hit remote peer cache", PUBLISHED_RATIOS["remote-peer"]),
    Scenario("local-peer", "hit local peer cache", PUBLISHED_RATIOS["local-peer"]),
    Scenario("chunk-cache", "hit local chunk cache", PUBLISHED_RATIOS["chunk-cache"]),
)


# ---------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class Run:
    """One start: PullImage request → container exit."""

    seconds: float
    pull_seconds: float
    # What the registry wrote during the run (its access log: every response body).
    origin_bytes: int


@dataclass
class Row:
    scenario: Scenario
    runs: list[Run] = field(default_factory=list)
    error: str | None = None

    @property
    def median_seconds(self) -> float:
        return statistics.median(run.seconds for run in self.runs)

    @property
    def median_pull_seconds(self) -> float:
        return statistics.median(run.pull_seconds for run in self.runs)

    @property
    def median_origin_bytes(self) -> float:
        return statistics.median(run.origin_bytes for run in self.runs)


@dataclass
class Results:
    machine: str
    origin_mbit: float
    host_mbit: float
    peers: int
    repeats: int
    oci_bytes: int = 0
    unpacked_bytes: int = 0
    nydus_bytes: int = 0
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def row(self, key: str) -> Row | None:
        return next((row for row in self.rows if row.scenario.key == key), None)

    def ratio(self, row: Row) -> float | None:
        base = self.row("oci")
        if base is None or not base.runs or not row.runs:
            return None
        return base.median_seconds / row.median_seconds


# ---------------------------------------------------------------------------------------------
# Mounts left behind


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below `root` (the machine's mount namespace), deepest first."""
    found: list[str] = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == str(root) or point.startswith(str(root) + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def unmount_under(root: Path) -> list[str]:
    """Lazily unmount everything at or below `root`; what was unmounted."""
    points = mounts_under(root)
    for point in points:
        subprocess.run(["umount", "-l", point], capture_output=True, check=False,
                       timeout=COMMAND_TIMEOUT_SECONDS)
    return points


# ---------------------------------------------------------------------------------------------
# The bench: lab, registry, image, and the parts started per run


class StartupBench:
    """Owns the lab, the registry with both tags, and the containerd/node stacks of each run."""

    def __init__(self, arguments: argparse.Namespace, work_dir: Path, lab: NetworkLab,
                 results: Results) -> None:
        self.arguments = arguments
        self.work_dir = work_dir
        self.lab = lab
        self.results = results
        # Unix socket paths must fit in 108 bytes: a short directory of their own.
        self.socket_dir = Path(tempfile.mkdtemp(prefix="d7y-startup-"))
        self.registry: NamespacedRegistry | None = None
        self.registry_host: Host | None = None
        self.client: Host | None = None
        self.peer_hosts: list[Host] = []
        self.peers: list[NamespacedNode] = []
        self.nydus_digests: list[str] = []
        self._serial = itertools.count(1)
        self._local_ids = itertools.count(1)

    # -- the lab, once

    def set_up(self, image: BuiltImage) -> None:
        origin = megabits(self.arguments.origin_mbit)
        hosts = megabits(self.arguments.host_mbit)
        self.registry_host = self.lab.add_host("registry")
        registry = self.lab.start_registry(self.registry_host, self.work_dir / "registry",
                                           shape=origin)
        self.registry = registry
        self.client = self.lab.add_host("client", shape=hosts)
        self.peer_hosts = [self.lab.add_host(f"peer{number}", shape=hosts)
                           for number in range(1, self.arguments.peers + 1)]
        started = time.monotonic()
        registry.push(image, f"{REPOSITORY}:{OCI_TAG}")
        log(f"pushed the OCI image in {time.monotonic() - started:.1f} s; converting…")
        started = time.monotonic()
        self.lab.run(self.registry_host, [*node_command(), "convert", self.oci_reference,
                                          self.nydus_reference, "--insecure-registry",
                                          registry.host], timeout=STEP_TIMEOUT_SECONDS)
        manifest = self._manifest(NYDUS_TAG)
        self.nydus_digests = [manifest["config"]["digest"],
                              *(layer["digest"] for layer in manifest["layers"])]
        self.results.nydus_bytes = int(manifest["config"]["size"]) + sum(
            int(layer["size"]) for layer in manifest["layers"])
        log(f"converted in {time.monotonic() - started:.1f} s: Nydus "
            f"{self.results.nydus_bytes / MEGABYTE:.1f} MB in {len(manifest['layers'])} layers")

    def _manifest(self, tag: str) -> dict[str, Any]:
        registry = self._registry()
        assert self.registry_host is not None

        def fetch() -> dict[str, Any]:
            request = urllib.request.Request(
                f"{registry.url}/v2/{REPOSITORY}/manifests/{tag}",
                headers={"Accept": MEDIA_TYPE_MANIFEST})
            with urllib.request.urlopen(request, timeout=10) as response:
                manifest: dict[str, Any] = json.loads(response.read())
            return manifest

        return self.lab.call_in(self.registry_host, fetch)

    def _registry(self) -> NamespacedRegistry:
        if self.registry is None:
            raise BenchFailed("the registry is not up")
        return self.registry

    def _client(self) -> Host:
        if self.client is None:
            raise BenchFailed("the lab is not up")
        return self.client

    @property
    def oci_reference(self) -> str:
        return f"{self._registry().host}/{REPOSITORY}:{OCI_TAG}"

    @property
    def nydus_reference(self) -> str:
        return f"{self._registry().host}/{REPOSITORY}:{NYDUS_TAG}"

    # -- containerd

    @contextlib.contextmanager
    def containerd(self, *, nydus: bool) -> Iterator[Containerd]:
        """A fresh containerd in the client host's network: CRI on, overlayfs or d7y-node as the
        CRI snapshotter; the registry direct (OCIv1) or through the local node's mirror (Nydus)."""
        serial = next(self._serial)
        options = DaemonOptions(
            cri=CriSettings(snapshotter=SNAPSHOTTER_NAME if nydus else OVERLAY_SNAPSHOTTER),
            proxy_snapshotters={SNAPSHOTTER_NAME: str(self.snapshotter_socket)} if nydus else {},
        )
        daemon = Containerd(self.work_dir / f"containerd{serial}", options)
        daemon.process = self.lab.process(self._client(), daemon.process.argv,
                                          log_path=daemon.process.log_path, share_mounts=True)
        # OCIv1: the registry itself as the only host (containerd 1.6 rejects a hosts.toml
        # without a `host` table: "invalid `host` tree").
        registry = self._registry().host
        mirror = f"http://127.0.0.1:{NODE_PROXY_PORT}" if nydus else f"http://{registry}"
        write_mirror_hosts(daemon.hosts_dir, registry, mirror)
        try:
            daemon.start()
            yield daemon
        finally:
            daemon.stop()
            unmount_under(daemon.work_dir)

    def ctr(self, daemon: Containerd, arguments: Sequence[str], *,
            timeout: float = COMMAND_TIMEOUT_SECONDS,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        return run([CTR, "-a", daemon.address, "-n", CRI_NAMESPACE, *arguments], timeout=timeout,
                   check=check)

    # -- nodes

    @property
    def snapshotter_socket(self) -> Path:
        return self.socket_dir / "snapshotter.sock"

    def local_node_id(self) -> str:
        """A new id that ranks below every peer home for each of the Nydus image's blobs."""
        peer_ids = [host.name for host in self.peer_hosts]
        for number in self._local_ids:
            candidate = f"local{number}"
            if not peer_ids or all(
                candidate not in task_homes(task_key_for(digest), [*peer_ids, candidate],
                                            DEFAULT_HOME_REPLICAS)
                for digest in self.nydus_digests
            ):
                return candidate
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def local_node(self, *, join: bool) -> Iterator[NamespacedNode]:
        """A fresh d7y-node (empty data dir) in the client host, containerd's snapshotter."""
        client = self._client()
        node_id = self.local_node_id()
        arguments = [
            "--snapshotter-socket", str(self.snapshotter_socket),
            # Not nydus-snapshotter's machine-wide socket path: only the bench's containerd.
            "--nydus-socket", "off",
            "--advertise-addr", client.address, "--node-id", node_id,
            "--log-level", NODE_LOG_LEVEL,
        ]
        if join:
            arguments += ["--join", f"{self.peer_hosts[0].address}:{GOSSIP_PORT}"]
        node = NamespacedNode(self.lab, client, self.work_dir / node_id,
                              insecure_registries=[self._registry().host],
                              extra_arguments=arguments, share_mounts=True)
        try:
            node.process.start()
            wait_until(node.healthy, timeout=NODE_START_TIMEOUT_SECONDS,
                       what=f"d7y-node {node_id}", alive=lambda: node.process.running)
            wait_until(self.snapshotter_socket.exists, timeout=NODE_START_TIMEOUT_SECONDS,
                       what="the snapshotter socket", alive=lambda: node.process.running)
            if join:
                wait_converged(self.lab, [*self.peers, node])
            yield node
        except Exception:
            print(node.log_tail()[-4000:], file=sys.stderr)
            raise
        finally:
            node.stop()
            unmount_under(node.work_dir)
            with contextlib.suppress(FileNotFoundError):
                self.snapshotter_socket.unlink()

    @contextlib.contextmanager
    def peer_cluster(self) -> Iterator[list[NamespacedNode]]:
        """Fresh nodes (empty stores) on every peer host, one cluster."""
        directory = self.work_dir / f"peers{next(self._serial)}"
        self.peers = start_cluster(self.lab, self.peer_hosts, self._registry(), directory)
        try:
            wait_converged(self.lab, self.peers)
            yield self.peers
        finally:
            for peer in self.peers:
                peer.stop()
            self.peers = []

    def warm_peers(self) -> None:
        """Every blob of the Nydus image through the first peer's mirror: its homes (peers)
        fetch it from origin, the first peer holds a copy too."""
        peer = self.peer_hosts[0]
        registry = self._registry()
        for digest in self.nydus_digests:
            url = (f"http://127.0.0.1:{NODE_PROXY_PORT}/v2/{REPOSITORY}/blobs/{digest}"
                   f"?ns={registry.host}")
            download = self.lab.download(peer, url, timeout=WARM_TIMEOUT_SECONDS)
            if download.status != 200:
                raise BenchFailed(f"warming {digest[:19]}… through {peer.name}: HTTP "
                                  f"{download.status}")

    # -- one start

    def start_once(self, daemon: Containerd, *, nydus: bool) -> Run:
        """PullImage, then run the container to its exit; the times and the origin bytes."""
        registry = self._registry()
        reference = self.nydus_reference if nydus else self.oci_reference
        container = f"startup{next(self._serial)}"
        registry.access_log.settle()
        mark = registry.access_log.mark()
        started = time.monotonic()
        # The harness bounds the call (a hang fails the run instead of blocking it).
        CriImages(daemon.cri_address).pull(reference)
        pulled = time.monotonic()
        completed = self.ctr(daemon, [
            "run", "--rm", "--snapshotter", SNAPSHOTTER_NAME if nydus else OVERLAY_SNAPSHOTTER,
            reference, container, *CONTAINER_COMMAND], timeout=RUN_TIMEOUT_SECONDS, check=False)
        finished = time.monotonic()
        if completed.returncode != 0 or completed.stdout.strip() != CONTAINER_OUTPUT:
            raise BenchFailed(f"the container exited {completed.returncode}, printed "
                              f"{completed.stdout.strip()[-200:]!r}: "
                              f"{completed.stderr.strip()[-1000:]}")
        registry.access_log.settle()
        origin = sum(entry.written for entry in registry.access_log.entries()[mark:])
        return Run(finished - started, pulled - started, origin)

    def remove_image(self, daemon: Containerd, *, nydus: bool) -> None:
        """CRI RemoveImage: containerd deletes the image and collects its content and snapshots
        (the snapshotter removes them, unmounting first)."""
        CriImages(daemon.cri_address).remove(self.nydus_reference if nydus
                                             else self.oci_reference)
        snapshotter = SNAPSHOTTER_NAME if nydus else OVERLAY_SNAPSHOTTER
        left = self.ctr(daemon, ["snapshots", "--snapshotter", snapshotter, "list"],
                        check=False).stdout.strip().splitlines()[1:]
        if left:
            raise BenchFailed(f"{len(left)} snapshots left after RemoveImage: {left[:3]}")


# ---------------------------------------------------------------------------------------------
# Scenarios


def measure(results: Results, key: str, repeats: int, one: Callable[[int], Run]) -> None:
    """Run `one(index)` `repeats` times into the scenario's row; an error ends the row."""
    scenario = next(item for item in SCENARIOS if item.key == key)
    row = Row(scenario)
    results.rows.append(row)
    for index in range(repeats):
        log(f"{scenario.name}: run {index + 1} of {repeats}…")
        try:
            timed = one(index)
        except Exception as error:  # a failed command, a CRI error, a part that did not start
            lines = str(error).strip().splitlines()
            row.error = f"{type(error).__name__}: {lines[0][:300] if lines else ''}"
            log(f"{scenario.name} failed: {error}")
            return
        row.runs.append(timed)
        log(f"{scenario.name}: {timed.seconds:.2f} s (pull {timed.pull_seconds:.2f} s, origin "
            f"{timed.origin_bytes / MEGABYTE:.1f} MB)")


def run_scenarios(bench: StartupBench, wanted: set[str], repeats: int) -> None:
    results = bench.results

    if "oci" in wanted:
        def oci(index: int) -> Run:
            with bench.containerd(nydus=False) as daemon:
                return bench.start_once(daemon, nydus=False)

        measure(results, "oci", repeats, oci)

    if "nydus-cold" in wanted:
        def nydus_cold(index: int) -> Run:
            with bench.local_node(join=False), bench.containerd(nydus=True) as daemon:
                return bench.start_once(daemon, nydus=True)

        measure(results, "nydus-cold", repeats, nydus_cold)

    if "p2p-cold" in wanted:
        def p2p_cold(index: int) -> Run:
            with bench.peer_cluster(), bench.local_node(join=True), \
                    bench.containerd(nydus=True) as daemon:
                return bench.start_once(daemon, nydus=True)

        measure(results, "p2p-cold", repeats, p2p_cold)

    cached = {"remote-peer", "local-peer", "chunk-cache"} & wanted
    if not cached:
        return
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(bench.peer_cluster())
            bench.warm_peers()
        except Exception as error:
            for key in sorted(cached):
                row = Row(next(item for item in SCENARIOS if item.key == key))
                row.error = f"peers could not be warmed: {str(error)[:300]}"
                results.rows.append(row)
            return
        if "remote-peer" in wanted:
            def remote_peer(index: int) -> Run:
                with bench.local_node(join=True), bench.containerd(nydus=True) as daemon:
                    return bench.start_once(daemon, nydus=True)

            measure(results, "remote-peer", repeats, remote_peer)
        if not {"local-peer", "chunk-cache"} & wanted:
            return
        # One local node and containerd for both: the first start fills the node's store (not
        # timed when the remote-peer runs already did the same thing).
        try:
            stack.enter_context(bench.local_node(join=True))
            daemon = stack.enter_context(bench.containerd(nydus=True))
            log("filling the local node's store (one start, not timed)…")
            bench.start_once(daemon, nydus=True)
        except Exception as error:
            for key in sorted({"local-peer", "chunk-cache"} & wanted):
                row = Row(next(item for item in SCENARIOS if item.key == key))
                row.error = f"the local node could not be filled: {str(error)[:300]}"
                results.rows.append(row)
            return
        if "local-peer" in wanted:
            def local_peer(index: int) -> Run:
                bench.remove_image(daemon, nydus=True)
                return bench.start_once(daemon, nydus=True)

            measure(results, "local-peer", repeats, local_peer)
        if "chunk-cache" in wanted:
            def chunk_cache(index: int) -> Run:
                return bench.start_once(daemon, nydus=True)

            measure(results, "chunk-cache", repeats, chunk_cache)


# ---------------------------------------------------------------------------------------------
# Report


def format_table(results: Results) -> str:
    lines = [
        f"machine: {results.machine}",
        f"image: debootstrap --variant=minbase --include={','.join(PACKAGES)} bookworm, one "
        f"tar+gzip layer {results.oci_bytes / MEGABYTE:.1f} MB "
        f"({results.unpacked_bytes / MEGABYTE:.0f} MB unpacked); Nydus (zstd, 1 MiB chunks) "
        f"{results.nydus_bytes / MEGABYTE:.1f} MB",
        f"origin link {results.origin_mbit:g} Mbit/s (tc tbf), client and {results.peers} peers "
        f"{results.host_mbit:g} Mbit/s; containerd 1.6 + runc; CRI PullImage → `ctr run --rm` "
        f"exit of python3 -c \"import json; print('ok')\"; median of {results.repeats}",
        "",
        f"{'scenario':<38} {'median':>8} {'pull':>7} {'origin':>9} {'ratio':>7} "
        f"{'published':>9}  result  runs",
    ]
    for row in results.rows:
        if not row.runs:
            lines.append(f"{row.scenario.name:<38} {'-':>8} {'-':>7} {'-':>9} {'-':>7} "
                         f"{_published(row):>9}  "
                         f"{'FAILED' if row.error else '-':<6}  {row.error or ''}")
            continue
        ratio = results.ratio(row)
        verdict = "-"
        if row.scenario.published_ratio is not None and ratio is not None:
            verdict = "MET" if ratio >= row.scenario.published_ratio else "MISS"
        if row.error:
            verdict = "FAILED"
        runs = ", ".join(f"{run.seconds:.2f}" for run in row.runs)
        lines.append(
            f"{row.scenario.name:<38} {row.median_seconds:>7.2f}s {row.median_pull_seconds:>6.2f}s "
            f"{row.median_origin_bytes / MEGABYTE:>6.1f} MB "
            f"{'-' if ratio is None else f'{ratio:.1f}x':>7} {_published(row):>9}  {verdict:<6}  "
            f"{runs}" + (f"  ({row.error})" if row.error else ""))
    lines += [
        "median: PullImage request → container exit; pull: of which PullImage; origin: what the "
        "registry sent (access log); ratio: OCIv1 median ÷ scenario median; published: the "
        "Dragonfly + Nydus ratio for a python image (MET when ours is at least that).",
    ]
    for note in results.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _published(row: Row) -> str:
    ratio = row.scenario.published_ratio
    return "-" if ratio is None else f"{ratio:g}x"


# ---------------------------------------------------------------------------------------------
# Command line


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Container start-up benchmark: OCIv1 vs. Nydus through d7y-node (cold, P2P, "
                    "peer and local cache hits) behind a 100 Mbit/s registry. Needs root; run "
                    "from the repository root.")
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS,
                        help="runs per scenario; the median counts (default 3)")
    parser.add_argument("--peers", type=int, default=DEFAULT_PEERS,
                        help="peer hosts besides the local one (default 3)")
    parser.add_argument("--origin-mbit", type=float, default=ISSUE_ORIGIN_MBIT,
                        help="the registry's link in Mbit/s (default 100)")
    parser.add_argument("--host-mbit", type=float, default=DEFAULT_HOST_MBIT,
                        help="the client's and the peers' links in Mbit/s (default 1000)")
    parser.add_argument("--scenarios", default=",".join(item.key for item in SCENARIOS),
                        help="comma-separated subset of: "
                             + ", ".join(item.key for item in SCENARIOS))
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR,
                        help=f"where the debootstrapped root and its OCI layout are kept "
                             f"(default {DEFAULT_CACHE_DIR})")
    parser.add_argument("--json", type=Path, metavar="FILE",
                        help="also write the figures as JSON to FILE")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (logs) after the run")
    arguments = parser.parse_args(argv)
    if arguments.repeats < 1:
        parser.error("--repeats must be at least 1")
    if arguments.peers < DEFAULT_HOME_REPLICAS:
        parser.error(f"--peers must be at least {DEFAULT_HOME_REPLICAS} (the homes of a task)")
    if arguments.origin_mbit <= 0 or arguments.host_mbit <= 0:
        parser.error("rates must be positive")
    known = {item.key for item in SCENARIOS}
    wanted = {key.strip() for key in arguments.scenarios.split(",") if key.strip()}
    if not wanted or wanted - known:
        parser.error(f"--scenarios: unknown {sorted(wanted - known)}; known {sorted(known)}")
    arguments.wanted = wanted
    return arguments


def raise_interrupted(signal_number: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signal_number).name)


def results_json(results: Results) -> dict[str, Any]:
    return {
        **asdict(results),
        "summary": {row.scenario.key: {
            "median_seconds": row.median_seconds if row.runs else None,
            "ratio": results.ratio(row),
            "published_ratio": row.scenario.published_ratio,
            "error": row.error,
        } for row in results.rows},
    }


def load_average() -> float:
    """The machine's 1-minute load average: above the core count, other work shared the CPUs."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def unpacked_size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    missing = [tool for tool in ("containerd", "ctr", "runc", "skopeo", "nsenter",
                                 "docker-registry", "debootstrap")
               if shutil.which(tool) is None]
    if os.geteuid() != 0 or missing or not netns_available():
        print("bench/startup.py needs root, ip, tc, nft, curl"
              f"{', ' + ', '.join(missing) if missing else ''} (it builds network namespaces, "
              "runs containerd and mounts)", file=sys.stderr)
        return 2
    for number in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, raise_interrupted)
    results = Results(
        f"{os.cpu_count()} CPUs, Linux {platform.release()}, Python {platform.python_version()}",
        arguments.origin_mbit, arguments.host_mbit, arguments.peers, arguments.repeats)
    if arguments.origin_mbit != ISSUE_ORIGIN_MBIT:
        results.notes.append(f"origin rate {arguments.origin_mbit:g} Mbit/s (the issue asks "
                             f"for {ISSUE_ORIGIN_MBIT:g})")
    work_dir = Path(tempfile.mkdtemp(prefix="d7y-bench-startup-"))
    failed: str | None = None
    bench: StartupBench | None = None
    started = time.monotonic()
    load_before = load_average()
    try:
        rootfs = debootstrap_rootfs(arguments.cache_dir, PACKAGES)
        image = pack_image(rootfs, arguments.cache_dir, PACKAGES)
        results.oci_bytes = sum(blob.size for blob in (*image.blobs, image.manifest))
        results.unpacked_bytes = unpacked_size(rootfs)
        with NetworkLab(work_dir / "lab") as lab:
            bench = StartupBench(arguments, work_dir, lab, results)
            try:
                bench.set_up(image)
                run_scenarios(bench, arguments.wanted, arguments.repeats)
            except Exception:
                print(lab.log_tails(3000), file=sys.stderr)
                raise
            finally:
                bench.peers = []
    except (KeyboardInterrupt, Interrupted):
        print("interrupted; containers, mounts, lab and processes are torn down", file=sys.stderr)
        return 130
    except Exception as error:
        failed = f"{type(error).__name__}: {error}"
        print(f"benchmark failed: {failed}", file=sys.stderr)
    finally:
        unmount_under(work_dir)
        if bench is not None:
            shutil.rmtree(bench.socket_dir, ignore_errors=True)
        if arguments.keep:
            log(f"kept {work_dir}")
        else:
            shutil.rmtree(work_dir, ignore_errors=True)
    results.notes.append(
        f"whole run {time.monotonic() - started:.0f} s; 1-minute load average {load_before:.1f} "
        f"at the start, {load_average():.1f} at the end ({os.cpu_count()} CPUs: more means "
        "other work shared the machine, and the OCIv1 unpack, which is CPU-bound, slows most)")
    print(format_table(results))
    if arguments.json is not None:
        arguments.json.write_text(json.dumps(results_json(results), indent=2) + "\n")
    broken = [row for row in results.rows if row.error]
    if failed is not None or broken:
        print(f"FAILED: {failed or ', '.join(row.scenario.name for row in broken)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
