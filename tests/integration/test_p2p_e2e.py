"""Issue 3 end to end: hosts as network namespaces (tests/harness/netns.py), each running its own
`d7y-node start --join …`, the registry in a namespace of its own behind a `tbf` limit.

Shown here: several hosts pulling one blob at once through their own nodes make the registry send
it once (its access log), every copy verifies; a host that joins later gets it from peers alone;
`kill -9` of the blob's home in the middle of the transfer still lets every other host complete
with correct bytes, the origin sending at most twice the blob.
"""

from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from d7y_node.peer import task_key_for
from d7y_node.scheduler import task_homes
from tests.harness.images import BuiltImage, LayerSpec, RandomFile, build_image
from tests.harness.netns import (
    GOSSIP_PORT,
    Host,
    NamespacedNode,
    NamespacedRegistry,
    NetworkLab,
    megabits,
    netns_available,
)
from tests.harness.process import wait_until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not netns_available(), reason="needs root and ip/tc/nft/curl"),
]

HOSTS = 5
BLOB_BYTES = 64 * 1024 * 1024
REPOSITORY = "test/p2p"
# The origin's link: 64 MiB at 200 Mbit/s takes 2.7 s, long enough that every host asks while
# the home is still fetching (so peers really serve a partial blob).
ORIGIN_RATE = megabits(200)
# Membership converges in a few probe rounds; generous for a loaded 2-core machine.
CONVERGE_SECONDS = 30.0
# Home timeout given to the nodes: far above a piece's fetch time at ORIGIN_RATE, so a fallback
# to origin in these tests is a bug, not slowness.
HOME_TIMEOUT = "30s"


@pytest.fixture
def image(tmp_path: Path) -> BuiltImage:
    return build_image(
        tmp_path / "image",
        [LayerSpec(random_files=(RandomFile("big.bin", BLOB_BYTES, seed=33),))],
    )


def start_cluster_node(
    lab: NetworkLab, host: Host, work_dir: Path, registry: NamespacedRegistry,
    seed: Host | None,
) -> NamespacedNode:
    arguments = [
        "--gossip-listen", f"{host.address}:{GOSSIP_PORT}", "--advertise-addr", host.address,
        "--home-timeout", HOME_TIMEOUT, "--node-id", host.name,
    ]
    if seed is not None:
        arguments += ["--join", f"{seed.address}:{GOSSIP_PORT}"]
    return lab.start_node(
        host, work_dir / host.name, insecure_registries=[registry.host],
        extra_arguments=arguments,
    )


def status(lab: NetworkLab, node: NamespacedNode) -> dict:  # type: ignore[type-arg]
    body = lab.http_get(node.lab_host, f"{node.peer_url}/status")
    return json.loads(body)  # type: ignore[no-any-return]


def wait_converged(lab: NetworkLab, nodes: list[NamespacedNode]) -> None:
    def all_alive() -> bool:
        for node in nodes:
            try:
                members = status(lab, node)["members"]
            except OSError:
                return False
            if sum(1 for member in members if member["state"] == "alive") != len(nodes):
                return False
        return True

    wait_until(all_alive, timeout=CONVERGE_SECONDS, what=f"{len(nodes)} members alive on each")


def blob_url(node: NamespacedNode, registry: NamespacedRegistry, digest: str) -> str:
    return f"http://{node.proxy_host}/v2/{REPOSITORY}/blobs/{digest}?ns={registry.host}"


def fetch_all(
    lab: NetworkLab, nodes: list[NamespacedNode], registry: NamespacedRegistry, digest: str,
    output: Path,
) -> dict[str, int]:
    """Every node's host downloads the blob through its own node at once; status per host."""
    output.mkdir(parents=True, exist_ok=True)

    def one(node: NamespacedNode) -> tuple[str, int]:
        target = output / node.lab_host.name
        download = lab.download(node.lab_host, blob_url(node, registry, digest), output=target)
        return node.lab_host.name, download.status

    with ThreadPoolExecutor(len(nodes)) as pool:
        return dict(pool.map(one, nodes))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def home_of(digest: str, hosts: list[Host]) -> str:
    return task_homes(task_key_for(digest), [host.name for host in hosts])[0]


def test_five_hosts_pull_one_blob_and_the_registry_sends_it_once(
    lab: NetworkLab, image: BuiltImage, tmp_path: Path,
) -> None:
    registry_host = lab.add_host("registry")
    registry = lab.start_registry(registry_host, tmp_path / "registry", shape=ORIGIN_RATE)
    registry.push(image, f"{REPOSITORY}:v1")
    layer = image.layers[0]
    hosts = [lab.add_host(f"host{index}") for index in range(HOSTS)]
    nodes = [start_cluster_node(lab, hosts[0], tmp_path, registry, None)]
    nodes += [start_cluster_node(lab, host, tmp_path, registry, hosts[0]) for host in hosts[1:]]
    wait_converged(lab, nodes)
    mark = registry.access_log.mark()

    started = time.monotonic()
    statuses = fetch_all(lab, nodes, registry, layer.digest, tmp_path / "out")
    elapsed = time.monotonic() - started

    assert set(statuses.values()) == {200}, statuses
    for host in hosts:
        assert sha256_of(tmp_path / "out" / host.name) == layer.digest, host.name
    registry.access_log.settle()
    sent = registry.access_log.bytes_served(layer.digest, since=mark)
    assert sent == layer.size, f"the registry sent {sent} bytes of a {layer.size}-byte blob"
    home = home_of(layer.digest, hosts)
    for node in nodes:
        (task,) = [t for t in status(lab, node)["tasks"] if t["task_id"] == layer.digest]
        assert task["complete"]
        if node.lab_host.name == home:
            assert task["origin_bytes"] == layer.size
        else:
            assert (task["origin_bytes"], task["peer_bytes"]) == (0, layer.size), node.lab_host
    print(f"{HOSTS} hosts got {layer.size} bytes in {elapsed:.1f}s; origin sent {sent}")

    # A host that joins later gets everything from peers.
    late_host = lab.add_host("late")
    late = start_cluster_node(lab, late_host, tmp_path, registry, hosts[0])
    wait_converged(lab, [*nodes, late])
    if home_of(layer.digest, [*hosts, late_host]) != late_host.name:
        mark = registry.access_log.mark()
        statuses = fetch_all(lab, [late], registry, layer.digest, tmp_path / "late-out")
        assert statuses == {late_host.name: 200}
        assert sha256_of(tmp_path / "late-out" / late_host.name) == layer.digest
        registry.access_log.settle()
        assert registry.access_log.bytes_served(layer.digest, since=mark) == 0
        (task,) = [t for t in status(lab, late)["tasks"] if t["task_id"] == layer.digest]
        assert (task["origin_bytes"], task["peer_bytes"]) == (0, layer.size)


def test_kill_9_of_the_home_mid_transfer_every_other_host_completes(
    lab: NetworkLab, image: BuiltImage, tmp_path: Path,
) -> None:
    registry_host = lab.add_host("registry")
    # Slower, so the kill lands in the middle of the transfer.
    registry = lab.start_registry(registry_host, tmp_path / "registry", shape=megabits(100))
    registry.push(image, f"{REPOSITORY}:v1")
    layer = image.layers[0]
    hosts = [lab.add_host(f"host{index}") for index in range(4)]
    nodes = [start_cluster_node(lab, hosts[0], tmp_path, registry, None)]
    nodes += [start_cluster_node(lab, host, tmp_path, registry, hosts[0]) for host in hosts[1:]]
    wait_converged(lab, nodes)
    home = home_of(layer.digest, hosts)
    (home_node,) = [node for node in nodes if node.lab_host.name == home]
    others = [node for node in nodes if node is not home_node]
    mark = registry.access_log.mark()

    with ThreadPoolExecutor(len(nodes)) as pool:
        output = tmp_path / "out"
        output.mkdir()
        futures = {
            node.lab_host.name: pool.submit(
                lab.download, node.lab_host, blob_url(node, registry, layer.digest),
                output=output / node.lab_host.name,
            )
            for node in nodes
        }

        def home_half_way() -> bool:
            return registry.access_log.bytes_served(layer.digest, since=mark) >= layer.size // 3

        wait_until(home_half_way, timeout=60.0, what="a third of the blob from origin")
        lab.kill_host(home_node.lab_host)
        results = {name: futures[name].result() for name in (n.lab_host.name for n in others)}

    assert {name: result.status for name, result in results.items()} == {
        name: 200 for name in results
    }
    for node in others:
        assert sha256_of(tmp_path / "out" / node.lab_host.name) == layer.digest
    registry.access_log.settle()
    sent = registry.access_log.bytes_served(layer.digest, since=mark)
    assert sent <= 2 * layer.size, f"origin sent {sent} bytes of a {layer.size}-byte blob"
    # The next home took over as the origin fetcher; nobody gave up on the homes.
    successor = task_homes(task_key_for(layer.digest), [n.lab_host.name for n in others])[0]
    for node in others:
        (task,) = [t for t in status(lab, node)["tasks"] if t["task_id"] == layer.digest]
        assert task["complete"]
        if node.lab_host.name != successor:
            assert task["origin_bytes"] == 0, node.lab_host
        metrics = lab.http_get(node.lab_host, f"{node.peer_url}/metrics").decode()
        assert "d7y_p2p_origin_fallbacks_total 0.0" in metrics, node.lab_host
    print(f"home {home} killed; origin sent {sent} bytes of {layer.size}")
