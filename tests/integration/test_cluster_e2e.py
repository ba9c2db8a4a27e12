"""Issue 3 at cluster level, in network namespaces (tests/harness/netns.py): each host runs its own
`d7y-node start --join …`; faults are real (nftables partitions, bytes flipped in a data file).

Shown here:
- (5) hosts partitioned into two groups stop seeing each other and, once the partition heals,
  membership converges again (every node's `/status`); a host started with another cluster key
  (`--secret-file`) is never admitted: in nobody's members, its gossip and peer requests refused;
- (4) a parent whose piece store goes bad on disk (bytes flipped in its data file while it is the
  only parent) is detected by the downloaders (piece digest failures counted, the parent
  dropped for the task), and every downloader still completes with correct bytes.
"""

from __future__ import annotations

import hashlib
import json
import re
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from d7y_node.gossip import ClusterKey
from d7y_node.peer import AUTH_HEADER, PREFIX, PeerAuth, task_key_for
from d7y_node.piece_store import piece_size_for
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

REPOSITORY = "test/cluster"
BLOB_BYTES = 16 * 1024 * 1024
# Membership converges in a few probe rounds; generous for a loaded 2-core machine.
CONVERGE_SECONDS = 30.0
# After a heal, members declared dead learn of it from gossip to the dead, push-pull or the
# reconnect round (each at most every 30 s): allow two rounds.
HEAL_SECONDS = 70.0
# A partitioned side is suspected, then declared dead, within the suspicion timeout
# (4 * log10(n) probe intervals, up to 6 times that without confirmations).
PARTITION_SECONDS = 40.0
# The corrupt-parent test's home timeout: once the only parent is dropped, the downloaders wait
# this long for the swarm before going to origin; short so the test stays short.
SHORT_HOME_TIMEOUT = "2s"
CLUSTER_SECRET = "the cluster's key\n"
OTHER_SECRET = "another cluster's key\n"


def start_cluster_node(
    lab: NetworkLab, host: Host, work_dir: Path, seed: Host | None, *,
    registry: NamespacedRegistry | None = None, secret_file: Path | None = None,
    home_timeout: str = "30s",
) -> NamespacedNode:
    arguments = [
        "--gossip-listen", f"{host.address}:{GOSSIP_PORT}", "--advertise-addr", host.address,
        "--home-timeout", home_timeout, "--node-id", host.name,
    ]
    if seed is not None:
        arguments += ["--join", f"{seed.address}:{GOSSIP_PORT}"]
    if secret_file is not None:
        arguments += ["--secret-file", str(secret_file)]
    return lab.start_node(
        host, work_dir / host.name,
        insecure_registries=[registry.host] if registry is not None else [],
        extra_arguments=arguments,
    )


def status(  # type: ignore[type-arg]
    lab: NetworkLab, node: NamespacedNode, secret: str = CLUSTER_SECRET
) -> dict:
    """`node`'s /status, asked from its own host and signed with `secret` (a node without a
    cluster key ignores the signature)."""
    header = PeerAuth(ClusterKey(secret.strip().encode())).sign("GET", "/status")

    def send() -> bytes:
        request = urllib.request.Request(f"{node.peer_url}/status", headers={AUTH_HEADER: header})
        with urllib.request.urlopen(request, timeout=5.0) as response:
            return bytes(response.read())

    return json.loads(lab.call_in(node.lab_host, send))  # type: ignore[no-any-return]


def members_by_state(
    lab: NetworkLab, node: NamespacedNode, secret: str = CLUSTER_SECRET
) -> dict[str, str]:
    """What `node`'s /status says of each member: id → state."""
    return {member["id"]: member["state"] for member in status(lab, node, secret)["members"]}


def wait_converged(lab: NetworkLab, nodes: list[NamespacedNode], timeout: float) -> None:
    names = {node.lab_host.name for node in nodes}

    def all_alive() -> bool:
        for node in nodes:
            try:
                states = members_by_state(lab, node)
            except OSError:
                return False
            if {name for name, state in states.items() if state == "alive"} != names:
                return False
        return True

    wait_until(all_alive, timeout=timeout, what=f"{sorted(names)} alive on each of them")


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of counter or gauge `name` whose labels include `labels`."""
    total = 0.0
    pattern = re.compile(rf"{re.escape(name)}(?:_total)?(?:\{{(?P<labels>[^}}]*)\}})? (?P<v>\S+)")
    for line in text.splitlines():
        match = pattern.fullmatch(line.strip())
        if match is None:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group("labels") or ""))
        if all(found.get(key) == value for key, value in labels.items()):
            total += float(match.group("v"))
    return total


def signed_status(lab: NetworkLab, source: Host, target: NamespacedNode, secret: str) -> int:
    """The status a peer request signed with `secret` gets from `target`, sent from `source`."""
    path = f"{PREFIX}/tasks/{'0' * 64}/state?wait=0"
    header = PeerAuth(ClusterKey(secret.strip().encode())).sign("GET", path)

    def send() -> int:
        request = urllib.request.Request(f"{target.peer_url}{path}",
                                         headers={AUTH_HEADER: header})
        try:
            with urllib.request.urlopen(request, timeout=5.0) as response:
                return int(response.status)
        except urllib.error.HTTPError as error:
            return int(error.code)

    return lab.call_in(source, send)


def test_a_partition_heals_and_a_host_with_another_key_is_never_admitted(
    lab: NetworkLab, tmp_path: Path,
) -> None:
    key, other = tmp_path / "cluster.key", tmp_path / "other.key"
    key.write_text(CLUSTER_SECRET)
    other.write_text(OTHER_SECRET)
    hosts = [lab.add_host(f"host{index}") for index in range(4)]
    nodes = [start_cluster_node(lab, hosts[0], tmp_path, None, secret_file=key)]
    nodes += [start_cluster_node(lab, host, tmp_path, hosts[0], secret_file=key)
              for host in hosts[1:]]
    intruder_host = lab.add_host("intruder")
    intruder = start_cluster_node(lab, intruder_host, tmp_path, hosts[0], secret_file=other)
    wait_converged(lab, nodes, CONVERGE_SECONDS)
    names = {host.name for host in hosts}

    def intruder_kept_out() -> None:
        for node in nodes:
            assert set(members_by_state(lab, node)) == names, node.lab_host.name
        assert set(members_by_state(lab, intruder, OTHER_SECRET)) == {"intruder"}

    intruder_kept_out()
    # Its gossip was dropped, unauthenticated, by the member it tried to join through.
    seed_metrics = lab.http_get(hosts[0], f"{nodes[0].peer_url}/metrics").decode()
    assert metric(seed_metrics, "d7y_gossip_dropped", reason="unauthenticated") > 0
    # Peer requests signed with its key are refused; with the cluster's key the same request
    # reaches the route (404: no such task), so the refusal is the key's doing.
    refused_before = metric(seed_metrics, "d7y_peer_unauthenticated", reason="invalid")
    assert signed_status(lab, intruder_host, nodes[0], OTHER_SECRET) == 401
    assert signed_status(lab, intruder_host, nodes[0], CLUSTER_SECRET) == 404
    seed_metrics = lab.http_get(hosts[0], f"{nodes[0].peer_url}/metrics").decode()
    assert metric(seed_metrics, "d7y_peer_unauthenticated", reason="invalid") == (
        refused_before + 1
    )

    # Two groups that cannot hear each other: each side loses the other ...
    left, right = nodes[:2], nodes[2:]
    lab.partition(hosts[:2], hosts[2:])

    def sides_apart() -> bool:
        # Declared dead, not merely suspected: merging back then takes the dead members'
        # refutation (gossip to the dead, push-pull, reconnect), the harder way to heal.
        for side, far in ((left, right), (right, left)):
            far_names = {node.lab_host.name for node in far}
            for node in side:
                states = members_by_state(lab, node)
                if any(states.get(name) != "dead" for name in far_names):
                    return False
        return True

    wait_until(sides_apart, timeout=PARTITION_SECONDS, what="each side to declare the other dead")
    apart = {node.lab_host.name: members_by_state(lab, node) for node in nodes}
    # ... while each still sees its own side alive.
    for side in (left, right):
        for node in side:
            for peer in side:
                assert apart[node.lab_host.name][peer.lab_host.name] == "alive"
    # Heal: everyone is alive on every node again.
    lab.heal()
    wait_converged(lab, nodes, HEAL_SECONDS)
    intruder_kept_out()


@pytest.fixture
def image(tmp_path: Path) -> BuiltImage:
    return build_image(
        tmp_path / "image",
        [LayerSpec(random_files=(RandomFile("blob.bin", BLOB_BYTES, seed=71),))],
    )


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def blob_url(node: NamespacedNode, registry: NamespacedRegistry, digest: str) -> str:
    return f"http://{node.proxy_host}/v2/{REPOSITORY}/blobs/{digest}?ns={registry.host}"


def test_a_parent_whose_store_went_bad_is_detected_and_everyone_completes(
    lab: NetworkLab, image: BuiltImage, tmp_path: Path,
) -> None:
    registry_host = lab.add_host("registry")
    registry = lab.start_registry(registry_host, tmp_path / "registry", shape=megabits(400))
    registry.push(image, f"{REPOSITORY}:v1")
    layer = image.layers[0]
    hosts = [lab.add_host(f"host{index}") for index in range(3)]
    nodes = [
        start_cluster_node(lab, host, tmp_path, hosts[0] if index else None,
                           registry=registry, home_timeout=SHORT_HOME_TIMEOUT)
        for index, host in enumerate(hosts)
    ]
    wait_converged(lab, nodes, CONVERGE_SECONDS)
    key = task_key_for(layer.digest)
    home = task_homes(key, [host.name for host in hosts])[0]
    (parent,) = [node for node in nodes if node.lab_host.name == home]
    downloaders = [node for node in nodes if node is not parent]
    output = tmp_path / "out"
    output.mkdir()

    # The home gets the blob from origin: complete and verified, the swarm's only parent.
    got = lab.download(parent.lab_host, blob_url(parent, registry, layer.digest),
                       output=output / "parent")
    assert got.status == 200 and sha256_of(output / "parent") == layer.digest

    # Its disk goes bad: one byte flipped in every piece of the first half of the data file
    # (in place: the node keeps its file open and serves from it with sendfile).
    piece_size = piece_size_for(layer.size)
    data_file = parent.data_dir / "tasks" / f"{key}.data"
    with data_file.open("r+b") as file:
        for start in range(0, layer.size // 2, piece_size):
            file.seek(start + 17)
            byte = file.read(1)
            file.seek(start + 17)
            file.write(bytes([byte[0] ^ 0xFF]))

    with ThreadPoolExecutor(len(downloaders)) as pool:
        results = dict(pool.map(
            lambda node: (node.lab_host.name, lab.download(
                node.lab_host, blob_url(node, registry, layer.digest),
                output=output / node.lab_host.name,
            ).status),
            downloaders,
        ))
    assert results == {node.lab_host.name: 200 for node in downloaders}
    for node in downloaders:
        assert sha256_of(output / node.lab_host.name) == layer.digest, node.lab_host.name
        metrics = lab.http_get(node.lab_host, f"{node.peer_url}/metrics").decode()
        # Every downloader asked the bad parent for the first piece first, saw it fail its
        # xxh3, and dropped that parent for the task.
        assert metric(metrics, "d7y_peer_piece_digest_failures") >= 1, node.lab_host.name
        assert metric(metrics, "d7y_p2p_peers_dropped") >= 1, node.lab_host.name
        (task,) = [t for t in status(lab, node)["tasks"] if t["task_id"] == layer.digest]
        assert task["complete"]


def test_a_home_without_a_client_fetches_for_the_swarm_and_the_registry_sends_once(
    lab: NetworkLab, image: BuiltImage, tmp_path: Path,
) -> None:
    """The blob's home gets no client request of its own: the others' announces make it fetch
    the blob from origin (with the clients' credentials, over the keyed peer channel), the others
    get it from the home, and the registry sends it once: nobody waits for the home timeout."""
    key = tmp_path / "cluster.key"
    key.write_text(CLUSTER_SECRET)
    registry_host = lab.add_host("registry")
    registry = lab.start_registry(registry_host, tmp_path / "registry", shape=megabits(200))
    registry.push(image, f"{REPOSITORY}:v1")
    layer = image.layers[0]
    hosts = [lab.add_host(f"host{index}") for index in range(3)]
    nodes = [
        start_cluster_node(lab, host, tmp_path, hosts[0] if index else None,
                           registry=registry, secret_file=key)
        for index, host in enumerate(hosts)
    ]
    wait_converged(lab, nodes, CONVERGE_SECONDS)
    home = task_homes(task_key_for(layer.digest), [host.name for host in hosts])[0]
    (home_node,) = [node for node in nodes if node.lab_host.name == home]
    downloaders = [node for node in nodes if node is not home_node]
    output = tmp_path / "out"
    output.mkdir()
    mark = registry.access_log.mark()

    with ThreadPoolExecutor(len(downloaders)) as pool:
        results = dict(pool.map(
            lambda node: (node.lab_host.name, lab.download(
                node.lab_host, blob_url(node, registry, layer.digest),
                output=output / node.lab_host.name,
            )),
            downloaders,
        ))
    assert {name: result.status for name, result in results.items()} == {
        node.lab_host.name: 200 for node in downloaders
    }
    # Well under the 30 s home timeout: nobody went to origin on its own.
    assert max(result.seconds for result in results.values()) < 15.0
    for node in downloaders:
        assert sha256_of(output / node.lab_host.name) == layer.digest
        (task,) = [t for t in status(lab, node)["tasks"] if t["task_id"] == layer.digest]
        assert (task["origin_bytes"], task["peer_bytes"]) == (0, layer.size), node.lab_host
    registry.access_log.settle()
    sent = registry.access_log.bytes_served(layer.digest, since=mark)
    assert sent == layer.size, f"the registry sent {sent} bytes of a {layer.size}-byte blob"

    def home_complete() -> bool:
        tasks = status(lab, home_node)["tasks"]
        return any(t["task_id"] == layer.digest and t["complete"] for t in tasks)

    wait_until(home_complete, timeout=10.0, what="the home to hold the whole blob")
    metrics = lab.http_get(home_node.lab_host, f"{home_node.peer_url}/metrics").decode()
    assert metric(metrics, "d7y_p2p_seeds", outcome="completed") == 1
