"""Fixtures tying the harness (tests/harness/) to test lifetimes.

Session scope: the images (the 64 MiB layer costs seconds to build) and the registries they are
pushed to. Function scope: nodes, containerd daemons and origin doubles, so each test starts from
empty state. Every fixture stops what it started, also when the test fails, and a failing test gets
the tail of each node's and containerd's log in its report.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from d7y_node import fuse_kernel
from d7y_node.fuse_kernel import is_mount_point
from d7y_node.peer import task_key_for
from d7y_node.scheduler import task_homes
from tests.harness.containerd import Containerd
from tests.harness.images import BuiltImage, big_image, small_image
from tests.harness.netns import NetworkLab
from tests.harness.node import Node
from tests.harness.origins import FaultyOrigin
from tests.harness.process import wait_until
from tests.harness.registry import BasicAuth, Registry, TokenAuth
from tests.harness.token_server import SigningKey, TokenServer

BIG_REPOSITORY = "test/big"
SMALL_REPOSITORY = "test/small"
TAG = "v1"
BASIC_USER = BasicAuth("alice", "alice-secret")
TOKEN_USER = BasicAuth("bob", "bob-secret")
TOKEN_SERVICE = "d7y-test-registry"
TOKEN_ISSUER = "d7y-test-issuer"

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"report_{report.when}", report)


def _test_failed(request: pytest.FixtureRequest) -> bool:
    return any(
        getattr(getattr(request.node, f"report_{when}", None), "failed", False)
        for when in ("setup", "call")
    )


@pytest.fixture
def lab(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[NetworkLab]:
    """An open network-namespace lab (tests/harness/netns.py), closed after the test whatever
    happened (a finalizer backs up the `with`); a failing test gets every process's log tail."""
    network_lab = NetworkLab(tmp_path / "lab")
    request.addfinalizer(network_lab.close)
    with network_lab:
        try:
            yield network_lab
        finally:
            if _test_failed(request):
                print(network_lab.log_tails())


@dataclass(frozen=True)
class ImageSet:
    big: BuiltImage
    small: BuiltImage


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> ImageSet:
    root = tmp_path_factory.mktemp("images")
    return ImageSet(big=big_image(root / "big"), small=small_image(root / "small"))


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory, images: ImageSet) -> Iterator[Registry]:
    """A registry without auth holding `test/big:v1` and `test/small:v1`."""
    server = Registry(tmp_path_factory.mktemp("registry"))
    server.start()
    try:
        images.big.push(server.host, f"{BIG_REPOSITORY}:{TAG}")
        images.small.push(server.host, f"{SMALL_REPOSITORY}:{TAG}")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def basic_registry(
    tmp_path_factory: pytest.TempPathFactory, images: ImageSet,
) -> Iterator[Registry]:
    """A registry with htpasswd Basic auth holding `test/small:v1`."""
    server = Registry(tmp_path_factory.mktemp("basic-registry"), basic=BASIC_USER)
    server.start()
    try:
        images.small.push(server.host, f"{SMALL_REPOSITORY}:{TAG}",
                          credentials=f"{BASIC_USER.username}:{BASIC_USER.password}")
        yield server
    finally:
        server.stop()


@dataclass(frozen=True)
class TokenSetup:
    registry: Registry
    token_server: TokenServer
    credentials: str


@pytest.fixture(scope="session")
def token_registry(
    tmp_path_factory: pytest.TempPathFactory, images: ImageSet,
) -> Iterator[TokenSetup]:
    """A registry with Bearer token auth (our token server) holding `test/small:v1`."""
    work = tmp_path_factory.mktemp("token-registry")
    key = SigningKey.generate(work / "key")
    token_server = TokenServer(
        key=key, service=TOKEN_SERVICE, issuer=TOKEN_ISSUER,
        username=TOKEN_USER.username, password=TOKEN_USER.password,
    )
    token_server.start()
    server = Registry(
        work / "registry",
        token=TokenAuth(token_server.realm, TOKEN_SERVICE, TOKEN_ISSUER, key.cert_path),
    )
    credentials = f"{TOKEN_USER.username}:{TOKEN_USER.password}"
    try:
        server.start()
        images.small.push(server.host, f"{SMALL_REPOSITORY}:{TAG}", credentials=credentials)
        yield TokenSetup(server, token_server, credentials)
    finally:
        server.stop()
        token_server.stop()


NodeFactory = Callable[..., Node]


@pytest.fixture
def node_factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[NodeFactory]:
    """Makes started nodes (`factory(registry_mirror=..., ...)`); all are stopped afterwards."""
    nodes: list[Node] = []

    def make(**options: Any) -> Node:
        node = Node(tmp_path / f"node-{len(nodes)}", **options)
        nodes.append(node)
        node.start()
        return node

    try:
        yield make
    finally:
        for node in nodes:
            node.stop()
        if _test_failed(request):
            for index, node in enumerate(nodes):
                print(f"\n===== node-{index} log tail ({node.process.log_path})\n{node.log_tail()}")


ContainerdFactory = Callable[[], Containerd]


@pytest.fixture
def containerd_factory(
    tmp_path: Path, request: pytest.FixtureRequest,
) -> Iterator[ContainerdFactory]:
    """Makes started containerd daemons, each with a fresh root; all are stopped afterwards."""
    daemons: list[Containerd] = []

    def make() -> Containerd:
        daemon = Containerd(tmp_path / f"containerd-{len(daemons)}")
        daemons.append(daemon)
        daemon.start()
        return daemon

    try:
        yield make
    finally:
        for daemon in daemons:
            daemon.stop()
        if _test_failed(request):
            for index, daemon in enumerate(daemons):
                print(f"\n===== containerd-{index} log tail\n{daemon.process.log_tail()[-6000:]}")


@pytest.fixture
def faulty_origin() -> Iterator[FaultyOrigin]:
    origin = FaultyOrigin()
    origin.start()
    try:
        yield origin
    finally:
        origin.stop()


def end_foreground_mount(process: subprocess.Popen[Any] | None, mountpoint: Path) -> None:
    """A test's teardown of a `d7y-node mount --foreground`: the server killed if it still runs,
    and no dead mount left behind by a failed test."""
    if process is not None and process.poll() is None:
        process.kill()
        process.wait()
    if is_mount_point(str(mountpoint)):
        fuse_kernel.unmount(str(mountpoint))


def two_node_ids(digests: Iterable[str], prefix: str) -> tuple[str, str]:
    """Node ids (`PREFIX-reader-N`, `PREFIX-home-N`) of a two-node cluster in which the second
    is home 0 of every one of `digests` (so the first reads them from peers)."""
    keys = [task_key_for(digest) for digest in digests]
    for number in range(1000):
        reader, home = f"{prefix}-reader-{number}", f"{prefix}-home-{number}"
        if all(task_homes(key, [reader, home], 2)[0] == home for key in keys):
            return reader, home
    raise AssertionError("no such node ids")


def start_pair(node_factory: NodeFactory, reader_id: str, home_id: str,
               reader_arguments: Iterable[str] = (), home_arguments: Iterable[str] = (),
               ) -> tuple[Node, Node]:
    """(reader, home): two started nodes that joined one cluster and see each other alive."""
    home = node_factory(extra_arguments=["--node-id", home_id, *home_arguments])
    reader = node_factory(extra_arguments=[
        "--node-id", reader_id, "--join", f"127.0.0.1:{home.gossip_port}", *reader_arguments,
    ])
    wait_until(lambda: all(node.metric("d7y_gossip_members", state="alive") == 2
                           for node in (home, reader)),
               timeout=30.0, what="the two nodes see each other")
    return reader, home
