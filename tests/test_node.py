"""node.py: the process starts with working settings, serves health and metrics, keeps a second
node off its data dir, and stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_node(data_dir: Path) -> tuple[subprocess.Popen[str], int, int]:
    proxy, peer = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("D7Y_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "d7y_node", "start", "--data-dir", str(data_dir),
         "--proxy-listen", f"127.0.0.1:{proxy}", "--peer-listen", f"127.0.0.1:{peer}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    return process, proxy, peer


def wait_healthy(process: subprocess.Popen[str], peer: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"node exited {process.returncode}: {process.communicate()[0]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{peer}/healthz", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("node did not become healthy")


@pytest.fixture
def node(tmp_path: Path):  # type: ignore[no-untyped-def]
    process, proxy, peer = start_node(tmp_path / "data")
    try:
        wait_healthy(process, peer)
        yield process, proxy, peer
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_serves_health_metrics_and_the_v2_root(node) -> None:  # type: ignore[no-untyped-def]
    _, proxy, peer = node
    with urllib.request.urlopen(f"http://127.0.0.1:{peer}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    for name in ("d7y_proxy_requests", "d7y_origin_bytes", "d7y_cache_served_bytes",
                 "d7y_active_tasks", "d7y_store_bytes", "d7y_gc_evictions",
                 "d7y_digest_mismatches"):
        assert name in text
    with urllib.request.urlopen(f"http://127.0.0.1:{proxy}/v2/", timeout=5) as resp:
        assert resp.status == 200
        assert resp.headers["Docker-Distribution-API-Version"] == "registry/2.0"


def test_second_node_on_the_same_data_dir_is_refused(node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    second, _, _ = start_node(tmp_path / "data")
    output, _ = second.communicate(timeout=30)
    assert second.returncode == 2
    assert "in use by another d7y-node" in output
    assert "Traceback" not in output


def test_sigterm_stops_cleanly(node) -> None:  # type: ignore[no-untyped-def]
    process, _, _ = node
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=20)
    assert process.returncode == 0, output
    assert "stopped" in output
    assert "Traceback" not in output
