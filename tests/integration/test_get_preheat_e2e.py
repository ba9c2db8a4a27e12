"""`d7y-node get` and `d7y-node preheat` end to end: three real `d7y-node start` processes joined
in a cluster on 127.0.0.1, the real docker-registry with pushed images, the CLI as a process."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from d7y_node.peer import task_key_for
from d7y_node.scheduler import task_homes
from tests.harness.node import Node
from tests.harness.registry import Registry
from tests.integration.conftest import (
    BIG_REPOSITORY,
    SMALL_REPOSITORY,
    TAG,
    ImageSet,
    NodeFactory,
)

pytestmark = pytest.mark.integration

CONVERGE_SECONDS = 20.0


def cli(*arguments: str, timeout: float = 120.0) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "d7y_node", *arguments], capture_output=True, timeout=timeout,
        check=False,
    )


def peer_of(node: Node) -> str:
    return f"127.0.0.1:{node.peer_port}"


def start_cluster(node_factory: NodeFactory, count: int) -> list[Node]:
    nodes: list[Node] = []
    for index in range(count):
        extra = ["--node-id", f"n{index}"]
        if nodes:
            extra += ["--join", f"127.0.0.1:{nodes[0].gossip_port}"]
        nodes.append(node_factory(extra_arguments=extra))
    deadline = time.monotonic() + CONVERGE_SECONDS
    while time.monotonic() < deadline:
        alive = []
        for node in nodes:
            with urllib.request.urlopen(f"http://{peer_of(node)}/status", timeout=5) as answer:
                status = json.loads(answer.read())
            alive.append(sum(member["state"] == "alive" for member in status["members"]))
        if all(count_alive == count for count_alive in alive):
            return nodes
        time.sleep(0.2)
    raise AssertionError(f"the cluster did not converge: {alive}")


def test_preheat_has_each_blob_fetched_once_by_its_home(
    registry: Registry, images: ImageSet, node_factory: NodeFactory
) -> None:
    nodes = start_cluster(node_factory, 3)
    mark = registry.access_log.mark()
    result = cli("preheat", f"{registry.host}/{BIG_REPOSITORY}:{TAG}", "--peer", peer_of(nodes[0]))
    assert result.returncode == 0, result.stderr.decode()
    lines = [line.split() for line in result.stdout.decode().splitlines()]
    blobs = {blob.digest: blob.size for blob in images.big.blobs}
    assert {line[0] for line in lines} == set(blobs)
    for name, size_text, host in lines:
        assert int(size_text) == blobs[name]
        assert host == task_homes(task_key_for(name), ["n0", "n1", "n2"])[0]
    registry.access_log.settle()
    for digest, size in blobs.items():
        # Once: the pieces' range GETs add up to the blob, by one host.
        assert registry.access_log.bytes_served(digest, since=mark) == size, digest
    # A pull of a preheated blob through another node: no registry bytes.
    layer = images.big.largest_layer
    mark = registry.access_log.mark()
    result = cli("get", f"{registry.host}/{BIG_REPOSITORY}@{layer.digest}", "-o", "-",
                 "--peer", peer_of(nodes[2]))
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == layer.read()
    registry.access_log.settle()
    assert registry.access_log.bytes_served(layer.digest, since=mark) == 0


def test_get_of_a_registry_blob_through_the_cluster(
    registry: Registry, images: ImageSet, node_factory: NodeFactory, tmp_path: Path
) -> None:
    nodes = start_cluster(node_factory, 3)
    layer = images.small.largest_layer
    url = f"{registry.url}/v2/{SMALL_REPOSITORY}/blobs/{layer.digest}"
    mark = registry.access_log.mark()
    for index, node in enumerate(nodes):
        output = tmp_path / f"layer-{index}"
        result = cli("get", url, "-o", str(output), "--peer", peer_of(node))
        assert result.returncode == 0, result.stderr.decode()
        assert output.read_bytes() == layer.read()
    registry.access_log.settle()
    assert registry.access_log.bytes_served(layer.digest, since=mark) == layer.size
