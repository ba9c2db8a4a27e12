"""A `d7y-node start` child process for tests: free ports, a data dir, logs, crash and restart.

Owns the command line, waiting for `/healthz` on the peer port, graceful stop (SIGTERM) and
`kill -9`, restarting on the same data dir and ports, and reading `/metrics`. Does not judge the
node's behaviour.
"""

from __future__ import annotations

import re
import socket
import sys
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from tests.harness.process import ManagedProcess, free_port, http_status, wait_until

# The node is up in about a second; a loaded CI machine (2 cores, other tests) may need more.
START_TIMEOUT_SECONDS = 30.0
_SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)"
)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def node_command() -> list[str]:
    """The console script next to this Python if installed, else `python -m d7y_node`."""
    script = Path(sys.executable).parent / "d7y-node"
    return [str(script)] if script.exists() else [sys.executable, "-m", "d7y_node"]


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text exposition → (name, labels, value) samples."""
    samples: list[tuple[str, dict[str, str], float]] = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match:
            labels = dict(_LABEL.findall(match.group("labels") or ""))
            samples.append((match.group("name"), labels, float(match.group("value"))))
    return samples


class Node:
    """One d7y-node; `restart()` keeps its data dir and ports, as a host reboot would."""

    def __init__(
        self, work_dir: Path, *, registry_mirror: str | None = None,
        insecure_registries: Sequence[str] = (), extra_arguments: Sequence[str] = (),
    ) -> None:
        self.work_dir = work_dir
        self.data_dir = work_dir / "data"
        self.proxy_port = free_port()
        self.peer_port = free_port()
        # Its own gossip port, so nodes of tests running side by side never share 7946.
        self.gossip_port = free_port(kind=socket.SOCK_DGRAM)
        arguments = [
            *node_command(), "start",
            "--data-dir", str(self.data_dir),
            "--proxy-listen", f"127.0.0.1:{self.proxy_port}",
            "--peer-listen", f"127.0.0.1:{self.peer_port}",
            "--gossip-listen", f"127.0.0.1:{self.gossip_port}",
            "--log-level", "debug",
        ]
        if registry_mirror is not None:
            arguments += ["--registry-mirror", registry_mirror]
        for host in insecure_registries:
            arguments += ["--insecure-registry", host]
        # The snapshotter sockets in the work dir, never the host's /run paths, unless asked for.
        if "--snapshotter-socket" not in extra_arguments:
            arguments += ["--snapshotter-socket", str(work_dir / "snapshotter.sock")]
        if "--nydus-socket" not in extra_arguments:
            arguments += ["--nydus-socket", "off"]
        arguments += list(extra_arguments)
        self.process = ManagedProcess(arguments, log_path=work_dir / "node.log")

    @property
    def proxy_host(self) -> str:
        return f"127.0.0.1:{self.proxy_port}"

    @property
    def proxy_url(self) -> str:
        return f"http://{self.proxy_host}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def healthy(self) -> bool:
        return http_status(f"{self.peer_url}/healthz") == 200

    def start(self) -> None:
        self.process.start()
        wait_until(
            self.healthy, timeout=START_TIMEOUT_SECONDS, what="d7y-node /healthz",
            alive=lambda: self.process.running,
        )

    def stop(self) -> int | None:
        """SIGTERM and wait; the exit code (0 for a graceful shutdown)."""
        return self.process.stop()

    def kill(self) -> None:
        """`kill -9`: no chance to flush anything."""
        self.process.kill()

    def restart(self) -> None:
        if self.process.running:
            self.stop()
        self.start()

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"{self.peer_url}/metrics", timeout=5.0) as response:
            text: str = response.read().decode()
            return text

    def metric(self, name: str, **labels: str) -> float:
        """The sum of samples called `name` (or `name_total`) whose labels include `labels`."""
        total = 0.0
        for sample_name, sample_labels, value in parse_metrics(self.metrics_text()):
            if sample_name not in (name, f"{name}_total"):
                continue
            if all(sample_labels.get(key) == wanted for key, wanted in labels.items()):
                total += value
        return total

    def log_tail(self) -> str:
        return self.process.log_tail()
