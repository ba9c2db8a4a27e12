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


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_node(
    data_dir: Path, *extra: str, gossip: int | None = None
) -> tuple[subprocess.Popen[str], int, int]:
    proxy, peer = free_port(), free_port()
    gossip = gossip or free_udp_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("D7Y_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "d7y_node", "start", "--data-dir", str(data_dir),
         "--proxy-listen", f"127.0.0.1:{proxy}", "--peer-listen", f"127.0.0.1:{peer}",
         "--gossip-listen", f"127.0.0.1:{gossip}",
         # The snapshotter beside the data dir, never on the host's /run paths.
         "--snapshotter-socket", str(data_dir.parent / f"{data_dir.name}.sock"),
         "--nydus-socket", "off", *extra],
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


def get_json(url: str) -> dict:  # type: ignore[type-arg]
    import json

    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())  # type: ignore[no-any-return]


def wait_for(condition, timeout: float = 20.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = condition()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def test_two_nodes_form_a_cluster_and_a_leaving_node_is_seen_leaving(tmp_path: Path) -> None:
    first_gossip = free_udp_port()
    first, _, first_peer = start_node(
        tmp_path / "a", "--label", "zone=a", "--node-id", "first", gossip=first_gossip
    )
    second, _, second_peer = start_node(
        tmp_path / "b", "--join", f"127.0.0.1:{first_gossip}", "--label", "zone=b"
    )
    try:
        wait_healthy(first, first_peer)
        wait_healthy(second, second_peer)

        def both_alive(peer: int) -> dict | None:  # type: ignore[type-arg]
            status = get_json(f"http://127.0.0.1:{peer}/status")
            alive = [m for m in status["members"] if m["state"] == "alive"]
            return status if len(alive) == 2 else None

        status = wait_for(lambda: both_alive(first_peer))
        wait_for(lambda: both_alive(second_peer))
        members = {m["id"]: m for m in status["members"]}
        assert status["member_id"] == "first" and members["first"]["labels"] == {"zone": "a"}
        (other,) = [m for m in members.values() if m["id"] != "first"]
        assert other["labels"] == {"zone": "b"} and other["peer_port"] == second_peer
        # The generated id is kept in the data dir: a restart is the same member.
        assert (tmp_path / "b" / "node-id").read_text().strip() == other["id"]
        with urllib.request.urlopen(f"http://127.0.0.1:{first_peer}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        assert 'd7y_gossip_members{state="alive"} 2.0' in text
        assert "d7y_p2p_origin_fallbacks_total 0.0" in text
        env = {k: v for k, v in os.environ.items() if not k.startswith("D7Y_")}
        shown = subprocess.run(
            [sys.executable, "-m", "d7y_node", "status", "--peer-listen",
             f"0.0.0.0:{first_peer}"], capture_output=True, text=True, env=env, timeout=30,
        )
        assert shown.returncode == 0, shown.stderr
        assert "*first" in shown.stdout and "zone=b" in shown.stdout
        assert shown.stdout.count("alive") == 2
        unreachable = subprocess.run(
            [sys.executable, "-m", "d7y_node", "status", "--peer", f"127.0.0.1:{free_port()}"],
            capture_output=True, text=True, env=env, timeout=30,
        )
        assert unreachable.returncode == 1
        assert unreachable.stderr.startswith("d7y-node: error: cannot read the node's status")
        second.send_signal(signal.SIGTERM)
        output, _ = second.communicate(timeout=20)
        assert second.returncode == 0, output

        def left() -> bool:
            status = get_json(f"http://127.0.0.1:{first_peer}/status")
            return any(m["id"] == other["id"] and m["state"] == "left"
                       for m in status["members"])

        wait_for(left, timeout=5)
    finally:
        for process in (first, second):
            if process.poll() is None:
                process.kill()
                process.wait()
