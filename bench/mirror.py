#!/usr/bin/env python3
"""Benchmark of the registry mirror: one big blob over loopback, direct vs. through the node.

One command does everything: it starts the real CNCF registry (Debian's `docker-registry`) on a
free loopback port with its storage in a temporary directory, pushes a random blob (1 GiB by
default) with the distribution spec's chunked upload, then measures with `curl` (a client that is
not the bottleneck, in its own process):

  direct        single client, straight from the registry: --repeats runs at the start and
                --repeats more interleaved with the cache hits; the median of all
  first pull    single client, through a fresh node with an empty data dir
  cache hit     single client, through the node once the blob is stored (median of --repeats)
  32 clients    aggregate throughput (total bytes / wall time) of --clients concurrent clients,
                direct from the registry (the baseline, run just before) and as cache hits
                through the node

Interleaving the baselines with what they are compared to keeps the ratios fair when the
machine's load changes during the run. Every row also shows the CPU used by the node (and its
event-loop thread), the registry, the curl clients and every other process, as % of a core and
as CPU-seconds per GB moved (stable even on a shared machine, unlike MB/s).

and the node's resident memory (VmRSS of the process tree, sampled every 100 ms, and the kernel's
VmHWM peak) idle after start and under load. The bytes of every path are checked against the
blob's sha256 once, in a separate untimed pass, so hashing never slows a timed pass.

Targets (issue 2, item 6), as ratios from one run: first pull >= 0.9x direct, cache hit >= 1.2x
direct; node RSS <= 60 MB idle and <= 150 MB under load (MB = 10^6 bytes everywhere here).

Exit status: 0 when the measurement ran, even if targets were missed (the table says MISS);
1 when something broke (wrong bytes, an HTTP error, the registry or the node did not start);
130 on Ctrl-C. Every process started and every temporary directory is cleaned up on every path.

This script owns only the measurement. It does not own the node (it runs whatever
`--node-command` starts, `python -m d7y_node` by default) nor the registry.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from benchlib import BenchFailed, log, size_argument

REGISTRY_BINARY = "/usr/bin/docker-registry"
REPOSITORY = "bench/blob"
LOOPBACK = "127.0.0.1"

# Targets of issue 2, item 6.
FIRST_PULL_TARGET_RATIO = 0.9
CACHE_HIT_TARGET_RATIO = 1.2
IDLE_RSS_TARGET_BYTES = 60_000_000
LOAD_RSS_TARGET_BYTES = 150_000_000

MEGABYTE = 1_000_000  # throughput and RSS are reported in decimal MB, the stricter reading
MEBIBYTE = 1 << 20

# The blob is a 16 MiB random block repeated, each copy rotated by a different offset and stamped
# with its index: incompressible, cheap to generate (a memcpy per block), and no two aligned
# pieces of any power-of-two size up to 16 MiB are equal, so nothing downstream can deduplicate it.
BLOCK_SIZE = 16 * MEBIBYTE
# Odd, so `index * ROTATION_STEP mod BLOCK_SIZE` differs for every block index below 2^24.
ROTATION_STEP = 4_194_301

# How often the node's memory is sampled under load (the brief asks for 100 ms).
RSS_SAMPLE_INTERVAL_SECONDS = 0.1
# Idle RSS: the peak over this window, taken after the node has been ready for IDLE_SETTLE_SECONDS
# (so start-up allocations are in, and a lazily grown structure would show).
IDLE_SETTLE_SECONDS = 1.0
IDLE_WINDOW_SECONDS = 2.0
# Before starting, the machine's CPU use is measured for QUIET_CHECK_SECONDS; above
# QUIET_LIMIT_PERCENT (of one core) something else is running and the table says so.
QUIET_CHECK_SECONDS = 1.0
QUIET_LIMIT_PERCENT = 15.0
# CPU seconds per GB below this are not worth a mention (e.g. the idle registry on a cache hit).
COST_SHOWN_MINIMUM = 0.01
# How long each of the registry and the node may take to answer their health check.
START_TIMEOUT_SECONDS = 30.0
# How long SIGTERM gets before SIGKILL.
STOP_TIMEOUT_SECONDS = 15.0
# Bytes read at a time from curl when a download is verified.
IO_CHUNK_BYTES = 4 * MEBIBYTE
# py-spy's sampling rate: its default; high enough for a clear top list over a few seconds, low
# enough that pausing the node for each sample costs well under 1% of its time.
PROFILE_RATE_HZ = 100
PROFILE_TOP_COUNT = 12
# py-spy needs a moment to attach to the node before a profiled phase starts.
PROFILE_ATTACH_SECONDS = 0.5



class Interrupted(Exception):
    """SIGTERM or SIGHUP reached the benchmark; handled like Ctrl-C."""


# ---------------------------------------------------------------------------------------------
# Small helpers


def free_port(kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    """A TCP (or UDP) port nobody uses right now (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]
        return port


def megabytes_per_second(byte_count: int, seconds: float) -> float:
    return byte_count / seconds / MEGABYTE if seconds > 0 else 0.0


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_http_ok(url: str, process: subprocess.Popen[bytes], what: str, log_path: Path) -> float:
    """Poll `url` until it answers 200; returns seconds waited. Fails if the process exits."""
    started = time.monotonic()
    deadline = started + START_TIMEOUT_SECONDS
    last_error = ""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchFailed(
                f"{what} exited with status {process.returncode} before it was ready; "
                f"last lines of {log_path}:\n{tail(log_path)}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return time.monotonic() - started
                last_error = f"status {response.status}"
        except urllib.error.HTTPError as error:
            last_error = f"status {error.code}"
        except OSError as error:
            last_error = str(error)
        time.sleep(0.05)
    raise BenchFailed(
        f"{what} did not answer 200 on {url} within {START_TIMEOUT_SECONDS:.0f} s "
        f"({last_error}); last lines of {log_path}:\n{tail(log_path)}"
    )


# ---------------------------------------------------------------------------------------------
# /proc readings


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (via /proc/PID/task/TID/children)."""
    found = [pid]
    index = 0
    while index < len(found):
        current = found[index]
        index += 1
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                with contextlib.suppress(OSError):
                    children = Path(f"/proc/{current}/task/{task}/children").read_text().split()
                    found.extend(int(child) for child in children)
    return found


def status_kilobytes(pid: int, key: str) -> int:
    """A `kB` field (VmRSS, VmHWM) of /proc/PID/status, in bytes; 0 if the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def stat_cpu_seconds(stat_path: str) -> float:
    """User + system CPU time from a /proc `stat` file; 0 if it is gone."""
    try:
        stat = Path(stat_path).read_text()
    except OSError:
        return 0.0
    # Fields after the command name (which may hold spaces) start at field 3.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process tree rooted at `pid`."""
    return sum(stat_cpu_seconds(f"/proc/{member}/stat") for member in process_tree(pid))


def main_thread_cpu_seconds(pid: int) -> float:
    """CPU time of the process's main thread alone (the node's event loop runs there)."""
    return stat_cpu_seconds(f"/proc/{pid}/task/{pid}/stat")


def machine_busy_seconds() -> float:
    """CPU time the machine's processes used (all cores; /proc/stat's first line), leaving
    out interrupts and softirqs: loopback TCP is processed there and would look like load."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, _irq, _softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + steal) / CLOCK_TICKS


def wait_until_quiet(patience: float) -> float:
    """CPU% (of one core) the rest of the machine uses, measured over QUIET_CHECK_SECONDS;
    measured again for up to `patience` seconds while it is above QUIET_LIMIT_PERCENT."""
    deadline = time.monotonic() + patience
    while True:
        busy_before = machine_busy_seconds()
        time.sleep(QUIET_CHECK_SECONDS)
        others = 100 * (machine_busy_seconds() - busy_before) / QUIET_CHECK_SECONDS
        if others <= QUIET_LIMIT_PERCENT or time.monotonic() >= deadline:
            return others
        log(f"waiting for a quiet machine: {others:.0f}% of a core in use")


def reaped_children_cpu_seconds() -> float:
    """CPU time of this benchmark's finished children (the curl clients)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class RssSampler:
    """Samples a process tree's resident memory every 100 ms on a thread, labelled by phase."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.phase = "start"
        self.peak_by_phase: dict[str, int] = {}
        self.samples: list[tuple[float, str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def mark(self, phase: str) -> None:
        self.sample()
        self.phase = phase
        self.sample()

    def sample(self) -> int:
        rss = sum(status_kilobytes(member, "VmRSS") for member in process_tree(self.pid))
        phase = self.phase
        self.samples.append((time.monotonic(), phase, rss))
        if rss > self.peak_by_phase.get(phase, 0):
            self.peak_by_phase[phase] = rss
        return rss

    def peak_between(self, start: float, end: float) -> int:
        return max((rss for when, _, rss in self.samples if start <= when <= end), default=0)

    def high_water_mark(self) -> int:
        """The kernel's peak RSS of the node's main process over its whole life."""
        return status_kilobytes(self.pid, "VmHWM")

    def _run(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_INTERVAL_SECONDS):
            self.sample()


# ---------------------------------------------------------------------------------------------
# Processes


@dataclass
class Service:
    """A started child process with its log file; stopped with SIGTERM, then SIGKILL."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    stop_seconds: float | None = None
    killed: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        started = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT_SECONDS)
            self.stop_seconds = time.monotonic() - started
        except subprocess.TimeoutExpired:
            self.killed = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        # Anything the service left in its own process group goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)


class Processes:
    """Every child process this run started, so one `finally` can stop them all."""

    def __init__(self) -> None:
        self.services: list[Service] = []
        self.loose: list[subprocess.Popen[bytes]] = []

    def start(
        self,
        name: str,
        command: Sequence[str],
        log_path: Path,
        environment: Mapping[str, str] | None = None,
    ) -> Service:
        with log_path.open("wb") as log_file:
            # Its own session: Ctrl-C in the terminal reaches only the benchmark, which then
            # stops the service in order instead of racing it.
            process = subprocess.Popen(
                list(command),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **environment} if environment else None,
            )
        service = Service(name, process, log_path)
        self.services.append(service)
        return service

    def spawn(self, command: Sequence[str], **options: Any) -> subprocess.Popen[bytes]:
        process: subprocess.Popen[bytes] = subprocess.Popen(list(command), **options)
        self.loose.append(process)
        return process

    def reap(self, process: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ValueError):
            self.loose.remove(process)

    def stop_all(self) -> None:
        for process in self.loose:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
            with contextlib.suppress(Exception):
                process.wait(timeout=STOP_TIMEOUT_SECONDS)
        self.loose.clear()
        for service in reversed(self.services):
            with contextlib.suppress(Exception):
                service.stop()


# ---------------------------------------------------------------------------------------------
# The registry and the blob


def start_registry(processes: Processes, workdir: Path) -> tuple[Service, str]:
    """Starts docker-registry on a free loopback port; returns it and its base URL."""
    if not os.access(REGISTRY_BINARY, os.X_OK):
        raise BenchFailed(f"{REGISTRY_BINARY} is missing: apt-get install docker-registry")
    port = free_port()
    storage = workdir / "registry-storage"
    storage.mkdir()
    # JSON is YAML, so no YAML library is needed to write the config.
    config = {
        "version": 0.1,
        "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
        "storage": {
            "filesystem": {"rootdirectory": str(storage)},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {"addr": f"{LOOPBACK}:{port}"},
    }
    config_path = workdir / "registry.yml"
    config_path.write_text(json.dumps(config, indent=2))
    log_path = workdir / "registry.log"
    service = processes.start("registry", [REGISTRY_BINARY, "serve", str(config_path)], log_path)
    base_url = f"http://{LOOPBACK}:{port}"
    wait_http_ok(f"{base_url}/v2/", service.process, "docker-registry", log_path)
    return service, base_url


def blob_chunks(size: int) -> Iterator[memoryview]:
    """The benchmark blob, `size` bytes, as a stream of at most BLOCK_SIZE-byte chunks."""
    block = memoryview(os.urandom(BLOCK_SIZE))
    chunk = bytearray(BLOCK_SIZE)
    view = memoryview(chunk)
    remaining = size
    index = 0
    while remaining > 0:
        shift = (index * ROTATION_STEP) % BLOCK_SIZE
        view[: BLOCK_SIZE - shift] = block[shift:]
        view[BLOCK_SIZE - shift :] = block[:shift]
        view[:8] = index.to_bytes(8, "big")
        count = min(remaining, BLOCK_SIZE)
        yield view[:count]
        remaining -= count
        index += 1


def registry_request(
    base_url: str,
    method: str,
    target: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    expect: int = 200,
) -> http.client.HTTPResponse:
    """One plain-HTTP request to the registry; `target` may be a path or an absolute URL."""
    parsed = urllib.parse.urlsplit(urllib.parse.urljoin(base_url + "/", target))
    path = parsed.path + (f"?{parsed.query}" if parsed.query else "")
    connection = http.client.HTTPConnection(parsed.hostname or LOOPBACK, parsed.port, timeout=600)
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    response.read()
    connection.close()
    if response.status != expect:
        raise BenchFailed(f"registry {method} {path}: status {response.status}, wanted {expect}")
    return response


def push_blob(base_url: str, size: int) -> str:
    """Pushes a random blob with a streamed (chunked) upload; returns its `sha256:` digest."""
    started = time.monotonic()
    response = registry_request(base_url, "POST", f"/v2/{REPOSITORY}/blobs/uploads/", expect=202)
    location = response.getheader("Location")
    if not location:
        raise BenchFailed("registry answered the upload POST without a Location")
    digest = hashlib.sha256()

    def hashed_chunks() -> Iterator[memoryview]:
        for chunk in blob_chunks(size):
            digest.update(chunk)
            yield chunk

    # No Content-Length on an iterable body: http.client sends it chunked, one PATCH streaming
    # the whole blob (the spec's "streamed" upload), so the blob is never all in memory.
    response = registry_request(
        base_url,
        "PATCH",
        location,
        body=hashed_chunks(),
        headers={"Content-Type": "application/octet-stream"},
        expect=202,
    )
    location = response.getheader("Location") or location
    blob_digest = f"sha256:{digest.hexdigest()}"
    separator = "&" if "?" in location else "?"
    registry_request(
        base_url,
        "PUT",
        f"{location}{separator}digest={urllib.parse.quote(blob_digest)}",
        headers={"Content-Length": "0"},
        expect=201,
    )
    head = registry_request(base_url, "HEAD", f"/v2/{REPOSITORY}/blobs/{blob_digest}")
    if int(head.getheader("Content-Length") or -1) != size:
        raise BenchFailed(f"registry reports a length of {head.getheader('Content-Length')}")
    log(
        f"pushed {size / MEGABYTE:.0f} MB blob {blob_digest[:19]}… in "
        f"{time.monotonic() - started:.1f} s"
    )
    return blob_digest


# ---------------------------------------------------------------------------------------------
# Clients


@dataclass(frozen=True)
class Transfer:
    """One download as curl saw it."""

    status: int
    byte_count: int
    seconds: float

    @property
    def megabytes_per_second(self) -> float:
        return megabytes_per_second(self.byte_count, self.seconds)


CURL_WRITE_OUT = "%{http_code} %{size_download} %{time_total}"


def curl_command(url: str, timeout: float, output: str) -> list[str]:
    return ["curl", "-sS", "--max-time", f"{timeout:.0f}", "-o", output, url]


def parse_transfer(text: str, url: str) -> Transfer:
    try:
        status, byte_count, seconds = text.split()
        return Transfer(int(status), int(byte_count), float(seconds))
    except ValueError as error:
        raise BenchFailed(f"curl {url}: unexpected output {text!r}") from error


def check_transfer(transfer: Transfer, size: int, what: str) -> None:
    if transfer.status != 200 or transfer.byte_count != size:
        raise BenchFailed(
            f"{what}: status {transfer.status} with {transfer.byte_count} bytes, "
            f"wanted 200 with {size}"
        )


def timed_download(
    processes: Processes, url: str, size: int, timeout: float, what: str
) -> Transfer:
    """One download to /dev/null, timed by curl itself."""
    process = processes.spawn(
        [*curl_command(url, timeout, "/dev/null"), "-w", CURL_WRITE_OUT],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    stdout, stderr = process.communicate()
    processes.reap(process)
    if process.returncode != 0:
        raise BenchFailed(f"{what}: curl failed ({process.returncode}): {stderr.decode().strip()}")
    transfer = parse_transfer(stdout.decode(), url)
    check_transfer(transfer, size, what)
    return transfer


def verified_download(
    processes: Processes, url: str, size: int, digest: str, timeout: float, what: str
) -> None:
    """Downloads once and checks the sha256 of what arrived (an untimed pass)."""
    process = processes.spawn(
        [*curl_command(url, timeout, "-"), "--fail"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    hasher = hashlib.sha256()
    received = 0
    while chunk := process.stdout.read(IO_CHUNK_BYTES):
        hasher.update(chunk)
        received += len(chunk)
    _, stderr = process.communicate()
    processes.reap(process)
    if process.returncode != 0:
        raise BenchFailed(f"{what}: curl failed ({process.returncode}): {stderr.decode().strip()}")
    got = f"sha256:{hasher.hexdigest()}"
    if received != size or got != digest:
        raise BenchFailed(
            f"{what}: WRONG BYTES: got {received} bytes {got}, wanted {size} {digest}"
        )
    log(f"{what}: {received} bytes, sha256 matches")


@dataclass(frozen=True)
class ConcurrentResult:
    """`clients` simultaneous downloads: their aggregate rate over the wall time of all."""

    clients: int
    total_bytes: int
    wall_seconds: float
    slowest_client_seconds: float
    fastest_client_seconds: float

    @property
    def megabytes_per_second(self) -> float:
        return megabytes_per_second(self.total_bytes, self.wall_seconds)


def concurrent_downloads(
    processes: Processes, url: str, size: int, clients: int, timeout: float, what: str
) -> ConcurrentResult:
    """`clients` curl processes at once; wall time from the first start to the last exit."""
    command = [*curl_command(url, timeout, "/dev/null"), "-w", CURL_WRITE_OUT]
    started = time.monotonic()
    running = [
        processes.spawn(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(clients)
    ]
    outputs = [process.communicate() for process in running]
    wall = time.monotonic() - started
    transfers = []
    for process, (stdout, stderr) in zip(running, outputs, strict=True):
        processes.reap(process)
        if process.returncode != 0:
            raise BenchFailed(
                f"{what}: a client's curl failed ({process.returncode}): {stderr.decode().strip()}"
            )
        transfer = parse_transfer(stdout.decode(), url)
        check_transfer(transfer, size, what)
        transfers.append(transfer)
    return ConcurrentResult(
        clients=clients,
        total_bytes=sum(transfer.byte_count for transfer in transfers),
        wall_seconds=wall,
        slowest_client_seconds=max(transfer.seconds for transfer in transfers),
        fastest_client_seconds=min(transfer.seconds for transfer in transfers),
    )


# ---------------------------------------------------------------------------------------------
# The node


@dataclass
class NodeEndpoints:
    proxy_url: str
    peer_url: str


GOSSIP_OPTION = "--gossip-listen"


@functools.cache
def node_option_exists(node_command: tuple[str, ...], option: str) -> bool:
    """Whether `NODE start --help` lists `option` (the node grows options issue by issue)."""
    completed = subprocess.run(
        [*node_command, "start", "--help"],
        capture_output=True,
        text=True,
        check=False,
        timeout=START_TIMEOUT_SECONDS,
        # Wide and plain, so a help formatter neither wraps nor colours option names.
        env={**os.environ, "COLUMNS": "250", "TERM": "dumb", "NO_COLOR": "1"},
    )
    return option in completed.stdout


def start_node(
    processes: Processes,
    node_command: tuple[str, ...],
    extra_arguments: Sequence[str],
    data_dir: Path,
    registry_url: str,
    log_path: Path,
    environment: Mapping[str, str],
) -> tuple[Service, NodeEndpoints, float]:
    """Starts a node with an empty data dir; returns it once /healthz answers 200."""
    data_dir.mkdir()
    proxy_port = free_port()
    peer_port = free_port()
    while peer_port == proxy_port:
        peer_port = free_port()
    command = [
        *node_command,
        "start",
        "--data-dir",
        str(data_dir),
        "--proxy-listen",
        f"{LOOPBACK}:{proxy_port}",
        "--peer-listen",
        f"{LOOPBACK}:{peer_port}",
        "--registry-mirror",
        registry_url,
    ]
    if node_option_exists(node_command, GOSSIP_OPTION):
        # Gossip is not measured here; a free loopback port keeps the node off the default
        # 0.0.0.0:7946, which another node on this host may hold.
        command += [GOSSIP_OPTION, f"{LOOPBACK}:{free_port(socket.SOCK_DGRAM)}"]
    command += extra_arguments
    service = processes.start("node", command, log_path, environment)
    endpoints = NodeEndpoints(f"http://{LOOPBACK}:{proxy_port}", f"http://{LOOPBACK}:{peer_port}")
    ready_seconds = wait_http_ok(f"{endpoints.peer_url}/healthz", service.process, "node", log_path)
    return service, endpoints, ready_seconds


def stop_node(service: Service, notes: list[str]) -> None:
    service.stop()
    if service.killed:
        notes.append(
            f"node (pid {service.pid}) did not exit within {STOP_TIMEOUT_SECONDS:.0f} s of "
            "SIGTERM and was killed"
        )
    elif service.process.returncode not in (0, -signal.SIGTERM):
        notes.append(f"node exited with status {service.process.returncode} after SIGTERM")


# ---------------------------------------------------------------------------------------------
# Profiling


FRAME_PATTERN = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?P<line>:\d+)?\)$")
THREAD_PATTERN = re.compile(r"^thread \((?:0x)?[0-9a-fA-F]+\)(?::\s*(?P<name>.*))?$")
# A pool thread blocked in `work_queue.get()`: waiting for work, not working.
POOL_WAIT_FRAME = "_worker (futures/thread.py:81)"
# The event loop's own C code (uvloop): epoll wait and libuv socket I/O both show as this line.
LOOP_FRAME = "Runner.run (asyncio/runners.py:118)"
LOOP_FRAME_NOTE = " [inside the C event loop: epoll wait or libuv socket I/O]"
# Frames every main-thread sample has (the command line's entry): not worth listing.
ENTRY_POINT_PATTERN = re.compile(r"d7y_node/(cli|__main__)\.py")


def short_frame(frame: str, keep_line: bool) -> str:
    """`function (/long/path/pkg/file.py:123)` → `function (pkg/file.py:123)`."""
    match = FRAME_PATTERN.match(frame.strip())
    if match is None:
        return frame.strip()
    parts = Path(match.group("file")).parts
    short = "/".join(parts[-2:]) if len(parts) >= 2 else match.group("file")
    line = (match.group("line") or "") if keep_line else ""
    return f"{match.group('function')} ({short}{line})"


def thread_group(name: str) -> str:
    """`d7y-store_3` → `d7y-store`: pool threads are summed as one group."""
    return re.sub(r"[_-]\d+$", "", name.strip()) or "unnamed"


@dataclass
class ThreadGroupProfile:
    """Where one group of the node's threads spent its (wall-clock) samples in a phase."""

    group: str
    samples: int
    waiting_for_work: float
    top_lines: list[tuple[str, float]] = field(default_factory=list)
    top_node_functions: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class ProfileSummary:
    """py-spy's samples of one phase, folded per thread group."""

    phase: str
    path: str
    seconds: float
    groups: list[ThreadGroupProfile] = field(default_factory=list)


def summarize_profile(phase: str, path: Path, seconds: float) -> ProfileSummary:
    """Reads py-spy's raw output (collapsed stacks, one thread frame first, idle included).

    Per thread group: the share of its samples at each innermost source line ("self", where
    it was running or blocked), and the share with each d7y_node function on the stack.
    """
    line_counts: dict[str, Counter[str]] = {}
    node_counts: dict[str, Counter[str]] = {}
    totals: Counter[str] = Counter()
    waiting: Counter[str] = Counter()
    with contextlib.suppress(OSError):
        for text in path.read_text(errors="replace").splitlines():
            stack, _, count_text = text.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = [frame for frame in stack.split(";") if frame]
            group = "unknown"
            if frames and (match := THREAD_PATTERN.match(frames[0])):
                group = thread_group(match.group("name") or "unnamed")
                frames = frames[1:]
            python_frames = [frame for frame in frames if ".py:" in frame or "<frozen" in frame]
            leaf_frames = python_frames or frames
            if not leaf_frames:
                continue
            leaf = short_frame(leaf_frames[-1], keep_line=True)
            if frames and frames[-1] not in python_frames:
                # --native: name the C function too (e.g. epoll_wait, sendfile, sha256).
                leaf += f" → {short_frame(frames[-1], keep_line=False)}"
            if leaf == LOOP_FRAME:
                leaf += LOOP_FRAME_NOTE
            totals[group] += count
            if short_frame(leaf_frames[-1], keep_line=True) == POOL_WAIT_FRAME:
                waiting[group] += count
                continue
            line_counts.setdefault(group, Counter())[leaf] += count
            node_functions = {
                short_frame(frame, keep_line=False)
                for frame in python_frames
                if "d7y_node" in frame
            }
            for function in node_functions:
                node_counts.setdefault(group, Counter())[function] += count
    groups = []
    for group, total in totals.most_common():
        groups.append(
            ThreadGroupProfile(
                group=group,
                samples=total,
                waiting_for_work=waiting[group] / total,
                top_lines=[
                    (name, count / total)
                    for name, count in line_counts.get(group, Counter()).most_common(
                        PROFILE_TOP_COUNT
                    )
                ],
                top_node_functions=[
                    (name, count / total)
                    for name, count in node_counts.get(group, Counter()).most_common(
                        PROFILE_TOP_COUNT
                    )
                ],
            )
        )
    return ProfileSummary(phase=phase, path=str(path), seconds=seconds, groups=groups)


@contextlib.contextmanager
def recording(
    processes: Processes, command: list[str], error_log: Path
) -> Iterator[Callable[[], float]]:
    """Run a sampling profiler (`command`) around one phase; stop it with SIGINT (so it writes
    its output) when the phase ends. Yields a function giving the phase's seconds."""
    with error_log.open("wb") as error_file:
        recorder = processes.spawn(
            command,
            stdin=subprocess.DEVNULL,
            stdout=error_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    # A profiler needs a moment to attach before the phase starts.
    time.sleep(PROFILE_ATTACH_SECONDS)
    started = time.monotonic()
    seconds: list[float] = []
    try:
        yield lambda: seconds[0]
    finally:
        seconds.append(time.monotonic() - started)
        with contextlib.suppress(ProcessLookupError):
            recorder.send_signal(signal.SIGINT)
        try:
            recorder.wait(timeout=30)
        except subprocess.TimeoutExpired:
            recorder.kill()
            recorder.wait()
        processes.reap(recorder)


class Profiler:
    """Runs `py-spy record` on the node for one phase at a time (only with --profile)."""

    def __init__(self, processes: Processes, directory: Path | None, native: bool) -> None:
        self.processes = processes
        self.directory = directory
        self.native = native
        self.summaries: list[ProfileSummary] = []
        self.executable = shutil.which("py-spy") if directory is not None else None
        if directory is not None and self.executable is None:
            raise BenchFailed("--profile needs py-spy: pip install py-spy")

    @contextlib.contextmanager
    def phase(self, name: str, pid: int) -> Iterator[None]:
        if self.directory is None or self.executable is None:
            yield
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        output = self.directory / f"{name}.collapsed.txt"
        error_log = self.directory / f"{name}.py-spy.log"
        command = [
            self.executable,
            "record",
            "--pid",
            str(pid),
            "--threads",
            # Idle samples too: a mirror is often slow because it waits (upstream, fsync, a
            # lock), and py-spy's idle filter would hide exactly that.
            "--idle",
            "--rate",
            str(PROFILE_RATE_HZ),
            "--format",
            "raw",
            "--output",
            str(output),
        ]
        if self.native:
            command.append("--native")
        with recording(self.processes, command, error_log) as elapsed:
            yield
        if not output.exists():
            log(f"py-spy wrote no profile for {name}; see {error_log}:\n{tail(error_log)}")
        self.summaries.append(summarize_profile(name, output, elapsed()))


PERF_LINE_PATTERN = re.compile(r"^\s*(?P<share>\d+(?:\.\d+)?)%\s+(?P<rest>.+?)\s*$")
# perf's sampling rate: an odd number, so it does not beat with the kernel's timer tick.
PERF_RATE_HZ = 999


@dataclass
class PerfSummary:
    """`perf record` of the node in one phase: where its CPU went, by binary and by function,
    kernel included (socket and page-cache copies, page faults, scheduler), which py-spy
    cannot see."""

    phase: str
    path: str
    seconds: float
    by_object: list[tuple[str, float]] = field(default_factory=list)
    by_function: list[tuple[str, float]] = field(default_factory=list)


def perf_report(path: Path, sort: str) -> list[tuple[str, float]]:
    """`perf report --sort SORT` as (name, share); unsymbolized addresses of one binary are
    added up under that binary's name."""
    completed = subprocess.run(
        ["perf", "report", "-i", str(path), "--no-children", "--sort", sort, "--stdio"],
        capture_output=True,
        text=True,
        check=False,
    )
    shares: dict[str, float] = {}
    for line in completed.stdout.splitlines():
        if line.startswith("#") or not (match := PERF_LINE_PATTERN.match(line)):
            continue
        words = match.group("rest").split()
        if sort == "dso,sym" and len(words) >= 3:
            binary, symbol = words[0], " ".join(words[2:])
            binary = "kernel" if binary == "[kernel.kallsyms]" else binary
            name = f"{binary} (no symbols)" if symbol.startswith("0x") else f"{symbol} ({binary})"
        else:
            name = " ".join(words)
        shares[name] = shares.get(name, 0.0) + float(match.group("share")) / 100
    return sorted(shares.items(), key=lambda item: item[1], reverse=True)[:PROFILE_TOP_COUNT]


class PerfProfiler:
    """Runs `perf record` on the node for one phase at a time (only with --perf)."""

    def __init__(self, processes: Processes, directory: Path | None) -> None:
        self.processes = processes
        self.directory = directory
        self.summaries: list[PerfSummary] = []
        if directory is not None and shutil.which("perf") is None:
            raise BenchFailed("--perf needs perf: apt-get install linux-perf")

    @contextlib.contextmanager
    def phase(self, name: str, pid: int) -> Iterator[None]:
        if self.directory is None:
            yield
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        output = self.directory / f"{name}.perf.data"
        error_log = self.directory / f"{name}.perf.log"
        command = ["perf", "record", "-F", str(PERF_RATE_HZ), "-p", str(pid), "-o", str(output)]
        with recording(self.processes, command, error_log) as elapsed:
            yield
        if output.exists():
            self.summaries.append(
                PerfSummary(
                    phase=name,
                    path=str(output),
                    seconds=elapsed(),
                    by_object=perf_report(output, "dso"),
                    by_function=perf_report(output, "dso,sym"),
                )
            )
        else:
            log(f"perf wrote nothing for {name}; see {error_log}:\n{tail(error_log)}")


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class Scenario:
    """One row of the result table."""

    name: str
    megabytes_per_second: float = 0.0
    baseline: str | None = None
    ratio: float | None = None
    target_ratio: float | None = None
    runs: list[float] = field(default_factory=list)
    node_cpu_percent: float | None = None
    node_loop_cpu_percent: float | None = None
    registry_cpu_percent: float | None = None
    client_cpu_percent: float | None = None
    other_cpu_percent: float | None = None
    phase_seconds: float = 0.0
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    bytes_moved: int = 0
    detail: str = ""

    def add_cpu(self, wall: float, used: Mapping[str, float]) -> None:
        """Adds one measured stretch; the percentages are over all stretches so far."""
        self.phase_seconds += wall
        for part, seconds in used.items():
            self.cpu_seconds[part] = self.cpu_seconds.get(part, 0.0) + seconds

        def share(part: str) -> float | None:
            if part not in self.cpu_seconds or self.phase_seconds <= 0:
                return None
            return 100 * self.cpu_seconds[part] / self.phase_seconds

        self.node_cpu_percent = share("node")
        self.node_loop_cpu_percent = share("loop")
        self.registry_cpu_percent = share("registry")
        self.client_cpu_percent = share("clients")
        self.other_cpu_percent = share("other")

    def cpu_seconds_per_gigabyte(self, percent: float | None) -> float | None:
        """CPU cost of moving 10^9 bytes: barely moved by other load on the machine, unlike
        MB/s, so it compares runs on a shared machine (1 / it = that part's ceiling in GB/s
        on one core)."""
        if percent is None or not self.bytes_moved:
            return None
        return percent / 100 * self.phase_seconds / (self.bytes_moved / 1e9)

    @property
    def verdict(self) -> str:
        if self.target_ratio is None or self.ratio is None:
            return ""
        return "PASS" if self.ratio >= self.target_ratio else "MISS"


@dataclass
class MemoryFigure:
    name: str
    bytes: int
    target_bytes: int

    @property
    def verdict(self) -> str:
        return "PASS" if self.bytes <= self.target_bytes else "MISS"


@dataclass
class Results:
    size_bytes: int
    digest: str = ""
    clients: int = 0
    repeats: int = 0
    profiled: bool = False
    scenarios: list[Scenario] = field(default_factory=list)
    memory: list[MemoryFigure] = field(default_factory=list)
    rss_by_phase: dict[str, int] = field(default_factory=dict)
    node_ready_seconds: float | None = None
    notes: list[str] = field(default_factory=list)
    profiles: list[ProfileSummary] = field(default_factory=list)
    perf_profiles: list[PerfSummary] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)

    def scenario(self, name: str) -> Scenario:
        return next(scenario for scenario in self.scenarios if scenario.name == name)


class CpuMeter:
    """CPU use over one measured phase, 100% = one core busy: the node (all threads and its
    event-loop thread alone), the registry and the curl clients. On 2 cores the four add up
    to at most 200%; a column near 100% with the rest idle names the bottleneck."""

    def __init__(self, registry_pid: int, node_pid: int | None) -> None:
        self.registry_pid = registry_pid
        self.node_pid = node_pid

    @contextlib.contextmanager
    def measure(self, scenario: Scenario) -> Iterator[None]:
        """Adds this stretch's CPU and wall time to the scenario's (a scenario may be measured
        in several stretches, e.g. runs interleaved with another scenario's)."""
        registry_before = cpu_seconds(self.registry_pid)
        clients_before = reaped_children_cpu_seconds()
        node_before = cpu_seconds(self.node_pid) if self.node_pid else 0.0
        loop_before = main_thread_cpu_seconds(self.node_pid) if self.node_pid else 0.0
        machine_before = machine_busy_seconds()
        started = time.monotonic()
        yield
        wall = time.monotonic() - started
        machine = machine_busy_seconds() - machine_before
        used = {
            "registry": cpu_seconds(self.registry_pid) - registry_before,
            "clients": reaped_children_cpu_seconds() - clients_before,
        }
        if self.node_pid:
            used["node"] = cpu_seconds(self.node_pid) - node_before
            used["loop"] = main_thread_cpu_seconds(self.node_pid) - loop_before
        used["other"] = max(
            machine - used["registry"] - used["clients"] - used.get("node", 0.0), 0.0
        )
        scenario.add_cpu(wall, used)


def blob_path(digest: str) -> str:
    return f"/v2/{REPOSITORY}/blobs/{digest}"


@dataclass(frozen=True)
class Measure:
    """What every scenario needs: where the processes are and how long a download may take."""

    processes: Processes
    profilers: tuple[Profiler, PerfProfiler]
    meter: CpuMeter
    size: int
    timeout: float


@contextlib.contextmanager
def profiled(measure: Measure, phase: str | None) -> Iterator[None]:
    """Every enabled profiler attached to the node for this phase (none for direct ones)."""
    pid = measure.meter.node_pid
    with contextlib.ExitStack() as stack:
        if phase and pid:
            for profiler in measure.profilers:
                stack.enter_context(profiler.phase(phase, pid))
        yield


@dataclass
class Series:
    """One single-client scenario being measured: where it downloads from and how."""

    scenario: Scenario
    url: str
    meter: CpuMeter
    transfers: list[Transfer] = field(default_factory=list)


def single_client(
    measure: Measure, series: Sequence[Series], repeats: int, profile_phase: str | None = None
) -> None:
    """`repeats` sequential downloads by one client for each series, interleaved (A B A B ...)
    so that a change in the machine's load hits every series alike; each gets its median."""
    with profiled(measure, profile_phase):
        for _ in range(repeats):
            for one in series:
                with one.meter.measure(one.scenario):
                    one.transfers.append(
                        timed_download(
                            measure.processes,
                            one.url,
                            measure.size,
                            measure.timeout,
                            one.scenario.name,
                        )
                    )
    for one in series:
        scenario = one.scenario
        scenario.bytes_moved = sum(transfer.byte_count for transfer in one.transfers)
        scenario.runs = [transfer.megabytes_per_second for transfer in one.transfers]
        scenario.megabytes_per_second = statistics.median(scenario.runs)
        log(f"{scenario.name}: {scenario.megabytes_per_second:.0f} MB/s")


def aggregate(
    measure: Measure,
    scenario: Scenario,
    url: str,
    clients: int,
    profile_phase: str | None = None,
) -> None:
    """`clients` concurrent downloads; total bytes over the wall time."""
    with profiled(measure, profile_phase), measure.meter.measure(scenario):
        result = concurrent_downloads(
            measure.processes, url, measure.size, clients, measure.timeout, scenario.name
        )
    scenario.megabytes_per_second = result.megabytes_per_second
    scenario.bytes_moved = result.total_bytes
    scenario.detail = (
        f"wall {result.wall_seconds:.1f} s, each client "
        f"{result.fastest_client_seconds:.1f}-{result.slowest_client_seconds:.1f} s"
    )
    log(f"{scenario.name}: {scenario.megabytes_per_second:.0f} MB/s")


def name_medians(scenarios: Sequence[Scenario]) -> None:
    """`direct, 1 client` → `direct, 1 client (median of 10)`, once all runs are in."""
    for scenario in scenarios:
        if len(scenario.runs) > 1:
            scenario.name += f" (median of {len(scenario.runs)})"


def compare(scenario: Scenario, baseline: Scenario, target_ratio: float | None) -> Scenario:
    scenario.baseline = baseline.name
    scenario.ratio = scenario.megabytes_per_second / baseline.megabytes_per_second
    scenario.target_ratio = target_ratio
    return scenario


def run(arguments: argparse.Namespace, processes: Processes, workdir: Path) -> Results:
    size: int = arguments.size
    timeout: float = arguments.timeout
    clients: int = arguments.clients
    repeats: int = arguments.repeats
    results = Results(
        size_bytes=size,
        clients=clients,
        repeats=repeats,
        profiled=arguments.profile,
        environment={
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": str(os.cpu_count()),
            "kernel": platform.release(),
            "node_command": " ".join(arguments.node_command),
        },
    )
    profilers = (
        Profiler(
            processes,
            arguments.profile_dir if arguments.profile else None,
            arguments.profile_native,
        ),
        PerfProfiler(processes, arguments.profile_dir if arguments.perf else None),
    )
    others = wait_until_quiet(arguments.wait_quiet)
    results.environment["machine_cpu_percent_before"] = f"{others:.0f}"
    if others > QUIET_LIMIT_PERCENT:
        results.notes.append(
            f"the machine was busy before the run ({others:.0f}% of a core used by other "
            "processes): figures are noisy; run again on a quiet machine"
        )
        log(results.notes[-1])
    registry, registry_url = start_registry(processes, workdir)
    log(f"registry pid {registry.pid} at {registry_url}, log {registry.log_path}")
    digest = push_blob(registry_url, size)
    results.digest = digest
    direct_url = registry_url + blob_path(digest)

    # (a) direct from the registry: the baselines. More direct runs are interleaved with the
    # cache hits below, and the 32-client baseline runs just before the node's 32 clients, so a
    # change in the machine's load hits both sides of each ratio alike.
    direct_meter = CpuMeter(registry.pid, None)
    measure = Measure(processes, profilers, direct_meter, size, timeout)
    verified_download(processes, direct_url, size, digest, timeout, "direct")
    direct = Scenario(name="direct, 1 client", megabytes_per_second=0.0)
    direct_series = Series(direct, direct_url, direct_meter)
    single_client(measure, [direct_series], repeats)
    direct_concurrent = Scenario(name=f"direct, {clients} clients (aggregate)")
    if arguments.direct_only:
        aggregate(measure, direct_concurrent, direct_url, clients)
        results.scenarios += [direct, direct_concurrent]
        name_medians(results.scenarios)
        return results

    node_arguments: list[str] = list(arguments.node_arg)
    node_environment = dict(arguments.node_env)
    # The first-pull path's bytes are checked on a throwaway node, so the timed first pull
    # (on a second fresh node) is not slowed by hashing in the client.
    check_node, check_endpoints, _ = start_node(
        processes,
        tuple(arguments.node_command),
        node_arguments,
        workdir / "node-check-data",
        registry_url,
        workdir / "node-check.log",
        node_environment,
    )
    log(f"check node pid {check_node.pid} ready at {check_endpoints.proxy_url}")
    verified_download(
        processes,
        check_endpoints.proxy_url + blob_path(digest),
        size,
        digest,
        timeout,
        "first pull via node",
    )
    stop_node(check_node, results.notes)
    shutil.rmtree(workdir / "node-check-data", ignore_errors=True)

    node, endpoints, ready_seconds = start_node(
        processes,
        tuple(arguments.node_command),
        node_arguments,
        workdir / "node-data",
        registry_url,
        workdir / "node.log",
        node_environment,
    )
    results.node_ready_seconds = ready_seconds
    log(
        f"node pid {node.pid} ready in {ready_seconds:.1f} s at {endpoints.proxy_url}, "
        f"log {node.log_path}"
    )
    node_url = endpoints.proxy_url + blob_path(digest)
    node_meter = CpuMeter(registry.pid, node.pid)
    measure = Measure(processes, profilers, node_meter, size, timeout)

    with RssSampler(node.pid) as sampler:
        sampler.mark("idle")
        time.sleep(IDLE_SETTLE_SECONDS)
        idle_start = time.monotonic()
        time.sleep(IDLE_WINDOW_SECONDS)
        idle_rss = sampler.peak_between(idle_start, time.monotonic())
        results.memory.append(MemoryFigure("node RSS idle", idle_rss, IDLE_RSS_TARGET_BYTES))

        # (b) the first pull through the fresh node.
        sampler.mark("first pull")
        first_pull = Scenario(name="first pull via node, 1 client")
        single_client(measure, [Series(first_pull, node_url, node_meter)], 1, "first-pull")

        # (c) cache hits, interleaved with more direct runs.
        sampler.mark("cache hit")
        verified_download(processes, node_url, size, digest, timeout, "cache hit via node")
        cache_hit = Scenario(name="cache hit via node, 1 client")
        single_client(
            measure,
            [direct_series, Series(cache_hit, node_url, node_meter)],
            repeats,
            "cache-hit",
        )

        # Concurrent clients: the direct baseline, then the node with its memory watched.
        sampler.mark("direct concurrent")
        aggregate(
            Measure(processes, profilers, direct_meter, size, timeout),
            direct_concurrent,
            direct_url,
            clients,
        )
        sampler.mark("concurrent cache hit")
        load_start = time.monotonic()
        node_concurrent = Scenario(name=f"cache hit via node, {clients} clients (aggregate)")
        aggregate(measure, node_concurrent, node_url, clients, "concurrent-cache-hit")
        load_end = time.monotonic()

        name_medians([direct, cache_hit])
        results.scenarios += [
            direct,
            direct_concurrent,
            compare(first_pull, direct, FIRST_PULL_TARGET_RATIO),
            compare(cache_hit, direct, CACHE_HIT_TARGET_RATIO),
            compare(node_concurrent, direct_concurrent, None),
        ]

        sampler.mark("idle after load")
        time.sleep(IDLE_WINDOW_SECONDS)
        results.memory.append(
            MemoryFigure(
                f"node RSS peak, {clients} clients (sampled)",
                sampler.peak_between(load_start, load_end),
                LOAD_RSS_TARGET_BYTES,
            )
        )
        results.memory.append(
            MemoryFigure(
                "node VmHWM, whole run (incl. first pull)",
                sampler.high_water_mark(),
                LOAD_RSS_TARGET_BYTES,
            )
        )
        results.rss_by_phase = dict(sampler.peak_by_phase)

    if node.process.poll() is not None:
        raise BenchFailed(f"node exited during the run with status {node.process.returncode}")
    stop_node(node, results.notes)
    if node.stop_seconds is not None:
        results.notes.append(f"node stopped {node.stop_seconds:.1f} s after SIGTERM")
    results.profiles = profilers[0].summaries
    results.perf_profiles = profilers[1].summaries
    return results


# ---------------------------------------------------------------------------------------------
# Output


def percent(value: float | None) -> str:
    return f"{value:.0f}%" if value is not None else "-"


def format_table(results: Results) -> str:
    lines = [
        f"blob: {results.size_bytes / MEGABYTE:.0f} MB ({results.size_bytes} bytes) "
        f"{results.digest}",
        f"machine: {results.environment.get('cpus')} CPUs, "
        f"Linux {results.environment.get('kernel')}, Python {results.environment.get('python')}"
        + (" - PROFILED with py-spy (figures slightly perturbed)" if results.profiled else ""),
        "",
        f"{'scenario':<46} {'MB/s':>6} {'x base':>6} {'target':>6} {'result':>6} |"
        f" {'node':>5} {'loop':>5} {'regy':>5} {'curl':>5} {'other':>5}",
    ]
    for scenario in results.scenarios:
        ratio = f"{scenario.ratio:.2f}" if scenario.ratio is not None else "1.00"
        target = f">={scenario.target_ratio:.1f}" if scenario.target_ratio is not None else "-"
        lines.append(
            f"{scenario.name:<46} {scenario.megabytes_per_second:>6.0f} {ratio:>6} {target:>6}"
            f" {scenario.verdict:>6} |"
            + "".join(
                f" {percent(value):>5}"
                for value in (
                    scenario.node_cpu_percent,
                    scenario.node_loop_cpu_percent,
                    scenario.registry_cpu_percent,
                    scenario.client_cpu_percent,
                    scenario.other_cpu_percent,
                )
            )
        )
        if len(scenario.runs) > 1:
            lines.append(f"{'':<4}runs: " + ", ".join(f"{rate:.0f}" for rate in scenario.runs))
        if scenario.detail:
            lines.append(f"{'':<4}{scenario.detail}")
        costs = [
            f"{label} {cost:.2f}"
            for label, percent_value in (
                ("node", scenario.node_cpu_percent),
                ("loop", scenario.node_loop_cpu_percent),
                ("registry", scenario.registry_cpu_percent),
                ("curl", scenario.client_cpu_percent),
            )
            if (cost := scenario.cpu_seconds_per_gigabyte(percent_value)) is not None
            and (label != "registry" or cost >= COST_SHOWN_MINIMUM)
        ]
        if costs:
            lines.append(f"{'':<4}CPU seconds per GB: " + ", ".join(costs))
    lines += [
        "x base: single-client rows against direct 1 client, aggregate rows against direct",
        "aggregate. CPU over the phase, 100% = one core of 2: node = all its threads,",
        "loop = its event-loop (main) thread alone, regy = docker-registry, curl = the clients,",
        "other = every other process on the machine (if that is high, the machine was shared",
        "and the figures are noisy).",
    ]
    if results.memory:
        lines += ["", f"{'memory':<46} {'MB':>6} {'target':>13} {'result':>6}"]
        for figure in results.memory:
            target = f"<={figure.target_bytes / MEGABYTE:.0f} MB"
            lines.append(
                f"{figure.name:<46} {figure.bytes / MEGABYTE:>6.1f} {target:>13} "
                f"{figure.verdict:>6}"
            )
        phases = ", ".join(
            f"{phase} {rss / MEGABYTE:.1f}" for phase, rss in results.rss_by_phase.items()
        )
        lines.append(f"    peak RSS by phase (MB): {phases}")
    if results.node_ready_seconds is not None:
        lines.append(f"node ready {results.node_ready_seconds:.1f} s after start")
    for note in results.notes:
        lines.append(f"note: {note}")
    for summary in results.profiles:
        lines += ["", f"profile {summary.phase} ({summary.seconds:.1f} s) -> {summary.path}"]
        for group in summary.groups:
            lines.append(
                f"  thread {group.group}: {group.samples} samples"
                + (
                    f", {group.waiting_for_work:.0%} waiting for work"
                    if group.waiting_for_work
                    else ""
                )
            )
            lines += [f"    {share:6.1%}  {name}" for name, share in group.top_lines]
            if group.top_node_functions:
                lines.append("    d7y_node functions on the stack:")
                lines += [
                    f"    {share:6.1%}  {name}" for name, share in group.top_node_functions[:6]
                ]
    for perf in results.perf_profiles:
        lines += ["", f"perf {perf.phase} ({perf.seconds:.1f} s) -> {perf.path}", "  by binary:"]
        lines += [f"    {share:6.1%}  {name}" for name, share in perf.by_object]
        lines.append("  by function:")
        lines += [f"    {share:6.1%}  {name}" for name, share in perf.by_function]
    return "\n".join(lines)


def results_json(results: Results) -> dict[str, Any]:
    data = asdict(results)
    for scenario, row in zip(results.scenarios, data["scenarios"], strict=True):
        row["verdict"] = scenario.verdict
        row["cpu_seconds_per_gigabyte"] = {
            part: scenario.cpu_seconds_per_gigabyte(percent_value)
            for part, percent_value in (
                ("node", scenario.node_cpu_percent),
                ("node_loop", scenario.node_loop_cpu_percent),
                ("registry", scenario.registry_cpu_percent),
                ("clients", scenario.client_cpu_percent),
            )
        }
    for figure, row in zip(results.memory, data["memory"], strict=True):
        row["verdict"] = figure.verdict
    return data


# ---------------------------------------------------------------------------------------------
# Entry point


def environment_setting(text: str) -> tuple[str, str]:
    name, equals, value = text.partition("=")
    if not equals or not name:
        raise argparse.ArgumentTypeError(f"not NAME=VALUE: {text!r}")
    return name, value


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/mirror.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""\
Finding where the time goes on a MISS:
  1. The CPU columns of every row (node, its loop thread, registry, curl, rest of the machine):
     the node's loop near 100% = the loop is CPU-bound (look at what runs on it); everything far
     below 100% = the node waits (too few requests in flight, a lock, fsync, a thread hop).
  2. --profile attaches `py-spy record --threads --idle` (pip install py-spy) to the node during
     the first pull, the single-client cache hits (the interleaved direct runs fall in that
     window too: the node idles then) and the concurrent cache hits, and prints per
     thread group (MainThread = the event loop, d7y-store = the store's pool, ...) the source
     lines where its samples were, idle included, so waits show up as well as work, plus the
     d7y_node functions on the stack. "waiting for work" is a pool thread idle in its queue.
     --profile-native adds C frames (epoll_pwait = the loop idle; read/write/sendfile = socket
     I/O; pwritev/fdatasync = disk). Raw collapsed stacks are kept in --profile-dir as
     PHASE.collapsed.txt (flame graph: `inferno-flamegraph < PHASE.collapsed.txt > PHASE.svg`,
     or load the file in speedscope). py-spy pauses the node ~100 times a second, so profiled
     figures are a little lower (a lot lower with --profile-native).
  3. --perf attaches `perf record` (Debian: linux-perf) instead or as well: the node's CPU by
     binary (kernel, libcrypto = sha256, libpython = the interpreter, xxhash, uvloop) and by
     function, kernel included: socket copies (_copy_to_iter), page-cache writes
     (copy_folio_from_iter_atomic), page faults, thread hand-offs (futex, finish_task_switch).

Examples:
  python bench/mirror.py                       # the full run, 1 GiB blob
  python bench/mirror.py --size 256MiB         # a quick run
  python bench/mirror.py --direct-only         # registry baseline only, no node
  python bench/mirror.py --profile --json out.json
  python bench/mirror.py --perf --size 256MiB
  python bench/mirror.py --wait-quiet 300       # on a shared machine
""",
    )
    parser.add_argument(
        "--size",
        type=size_argument(),
        default=1 << 30,
        help="blob size, e.g. 1GiB (default), 256MiB",
    )
    parser.add_argument(
        "--clients",
        type=int,
        default=32,
        help="concurrent clients in the aggregate scenarios (default 32)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="runs of the single-client direct and cache-hit scenarios; "
        "the median is reported (default 5: single runs vary by +-10%% on loopback)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds any single download may take (default 600)",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures here")
    parser.add_argument(
        "--node-command",
        type=str.split,
        default=[sys.executable, "-m", "d7y_node"],
        help="how to run the node, split on spaces "
        "(default: this Python with -m d7y_node; e.g. 'd7y-node')",
    )
    parser.add_argument(
        "--node-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="an extra argument for `d7y-node start` (repeatable), "
        "e.g. --node-arg=--log-level=warning",
    )
    parser.add_argument(
        "--node-env",
        action="append",
        default=[],
        type=environment_setting,
        metavar="NAME=VALUE",
        help="an environment variable for the node only (repeatable), e.g. "
        "--node-env MALLOC_ARENA_MAX=2 to see how much of the RSS is malloc arenas",
    )
    parser.add_argument(
        "--direct-only", action="store_true", help="measure the registry alone (no node)"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="run py-spy on the node in each node phase and print the top functions (see below)",
    )
    parser.add_argument(
        "--profile-native",
        action="store_true",
        help="with --profile: also sample C frames (py-spy --native), e.g. to tell uvloop's "
        "epoll wait from its socket writes; slower sampling",
    )
    parser.add_argument(
        "--perf",
        action="store_true",
        help="run `perf record` on the node in each node phase and print where its CPU went "
        "by binary and function, kernel included (see below)",
    )
    parser.add_argument(
        "--profile-dir",
        type=Path,
        default=Path("mirror-profile"),
        help="where --profile and --perf write their data (default ./mirror-profile)",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before starting, wait up to this long for the machine to be idle (other processes "
        f"under {QUIET_LIMIT_PERCENT:.0f}%% of a core); default 0: measure at once, and say so "
        "in the table if the machine was busy",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="parent of the temporary directory (default: the system's temp dir;"
        " it needs room for about 3x --size)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary directory (logs, stores) instead of deleting it",
    )
    arguments = parser.parse_args(argv)
    if arguments.clients < 1 or arguments.repeats < 1:
        parser.error("--clients and --repeats must be at least 1")
    return arguments


def raise_interrupted(signal_number: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signal_number).name)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    if shutil.which("curl") is None:
        print("curl is missing: apt-get install curl", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, raise_interrupted)
    signal.signal(signal.SIGHUP, raise_interrupted)
    processes = Processes()
    workdir = Path(tempfile.mkdtemp(prefix="d7y-bench-mirror-", dir=arguments.work_dir))
    status = 1
    try:
        results = run(arguments, processes, workdir)
        print(format_table(results))
        if arguments.json is not None:
            arguments.json.write_text(json.dumps(results_json(results), indent=2) + "\n")
            log(f"figures written to {arguments.json}")
        status = 0
    except BenchFailed as error:
        print(f"benchmark broke: {error}", file=sys.stderr)
    except (KeyboardInterrupt, Interrupted):
        print("interrupted", file=sys.stderr)
        status = 130
    finally:
        # Ignore further Ctrl-C while cleaning up, so cleanup itself is not cut short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        processes.stop_all()
        if arguments.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
