"""Issue 2, "How to show it" items 1 to 5, with real parts: the CNCF registry, containerd + runc,
skopeo, and d7y-node started as a real process (`d7y-node start`).

Each test names the item it shows. Faults a real registry cannot produce (a connection cut
mid-body, wrong bytes, a slow link for `kill -9` mid-download) come from `tests/harness/origins.py`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from tests.harness import client
from tests.harness.containerd import write_mirror_hosts
from tests.harness.images import (
    BIG_LAYER_BYTES,
    HELLO_OUTPUT,
    MEDIUM_LAYER_BYTES,
    SKOPEO,
    RandomFile,
    random_file_sha256,
    sha256_file,
)
from tests.harness.origins import Fault, FaultyOrigin, ThrottledRelay
from tests.harness.process import free_port, run, wait_until
from tests.harness.registry import Registry
from tests.integration.conftest import (
    BIG_REPOSITORY,
    SMALL_REPOSITORY,
    TAG,
    TOKEN_SERVICE,
    ContainerdFactory,
    ImageSet,
    NodeFactory,
    TokenSetup,
)

pytestmark = pytest.mark.integration

# A port where nothing listens: the default upstream of nodes that must use the request's own.
UNUSED_UPSTREAM = f"http://127.0.0.1:{free_port()}"
# An unreachable origin must be answered 502 fast enough for containerd to try its next host.
UPSTREAM_DOWN_LIMIT_SECONDS = 10.0
# The slow link for the crash test: 64 MiB at this rate takes about 4 s, time to kill mid-way.
CRASH_LINK_BYTES_PER_SECOND = 16 * 1024 * 1024
# Kill once this share of the blob crossed the link, so a restart from zero differs from a resume.
CRASH_AT_SHARE = 0.6
# A resume may lose pieces that were in flight; a restart from zero costs >= 1 + CRASH_AT_SHARE.
RESUME_LIMIT_SHARE = 1.45
CONCURRENT_CLIENTS = 100
# A HEAD may cost the node a tiny ranged probe upstream, never the blob.
HEAD_DOWNLOAD_LIMIT_BYTES = 64 * 1024
SKOPEO_TIMEOUT_SECONDS = 300.0


def _basic(credentials: str) -> str:
    return "Basic " + base64.b64encode(credentials.encode()).decode()


def _blob_path(repository: str, digest: str) -> str:
    return f"/v2/{repository}/blobs/{digest}"


# ---------------------------------------------------------------------------------------------
# Item 1: the registry and the images, on their own (checks the harness, not the node)


def test_registry_serves_built_images_and_containerd_runs_them_directly(
    registry: Registry, images: ImageSet, containerd_factory: ContainerdFactory,
) -> None:
    assert images.big.largest_layer.size >= BIG_LAYER_BYTES * 0.99
    manifest = client.request(
        "GET", registry.host, f"/v2/{BIG_REPOSITORY}/manifests/{TAG}",
        {"Accept": "application/vnd.oci.image.manifest.v1+json"},
    )
    assert manifest.status == 200
    assert manifest.header("Docker-Content-Digest") == images.big.manifest.digest
    daemon = containerd_factory()
    write_mirror_hosts(daemon.hosts_dir, registry.host, None)
    reference = f"{registry.host}/{SMALL_REPOSITORY}:{TAG}"
    daemon.pull(reference)
    assert HELLO_OUTPUT in daemon.run_container(reference, "direct-hello")


# ---------------------------------------------------------------------------------------------
# Item 2: containerd pulls through the mirror and runs; a second root pulls from the node only


def test_containerd_pulls_through_mirror_and_second_root_is_served_from_the_node(
    registry: Registry, images: ImageSet, node_factory: NodeFactory,
    containerd_factory: ContainerdFactory,
) -> None:
    node = node_factory(registry_mirror=UNUSED_UPSTREAM)
    reference = f"{registry.host}/{BIG_REPOSITORY}:{TAG}"
    image = images.big

    first = containerd_factory()
    write_mirror_hosts(first.hosts_dir, registry.host, node.proxy_url)
    mark = registry.access_log.mark()
    first.pull(reference)
    output = first.run_container(
        reference, "mirror-hello",
        ["/bin/sh", "-c", f"echo {HELLO_OUTPUT}; sha256sum /data/big.bin"],
    )
    assert HELLO_OUTPUT in output
    big_file = RandomFile("data/big.bin", BIG_LAYER_BYTES, seed=64)
    assert random_file_sha256(big_file) in output, output
    registry.access_log.settle()
    # Every blob crossed from the registry exactly once, and through the node (not a fallback).
    for blob in image.blobs:
        assert registry.access_log.bytes_served(blob.digest, since=mark) == blob.size, blob
    assert node.metric("d7y_origin_bytes") >= sum(blob.size for blob in image.blobs)

    second = containerd_factory()
    write_mirror_hosts(second.hosts_dir, registry.host, node.proxy_url)
    mark = registry.access_log.mark()
    second.pull(reference)
    assert HELLO_OUTPUT in second.run_container(reference, "mirror-hello-2")
    registry.access_log.settle()
    again = registry.access_log.blob_serves(since=mark)
    assert again == [], f"the registry served blobs a second time: {again}"
    assert node.metric("d7y_cache_served_bytes") >= sum(blob.size for blob in image.blobs)


# ---------------------------------------------------------------------------------------------
# Item 3: skopeo through the mirror; a nydusd-style request with X-Dragonfly-Registry and Range


def test_skopeo_copies_through_mirror(
    registry: Registry, images: ImageSet, node_factory: NodeFactory, tmp_path: Path,
) -> None:
    node = node_factory(registry_mirror=registry.url)
    layout = tmp_path / "copied"
    run(
        [SKOPEO, "--insecure-policy", "copy", "--quiet", "--src-tls-verify=false",
         f"docker://{node.proxy_host}/{BIG_REPOSITORY}:{TAG}", f"oci:{layout}:{TAG}"],
        timeout=SKOPEO_TIMEOUT_SECONDS,
    )
    for blob in images.big.blobs:
        copied = layout / "blobs" / "sha256" / blob.digest.split(":", 1)[1]
        assert copied.exists(), f"{blob.digest} missing from the copy"
        assert sha256_file(copied) == blob.digest
    assert node.metric("d7y_origin_bytes") >= images.big.largest_layer.size


def test_nydusd_style_range_request_with_dragonfly_registry_header(
    registry: Registry, images: ImageSet, node_factory: NodeFactory,
) -> None:
    node = node_factory(registry_mirror=UNUSED_UPSTREAM)
    layer = images.big.largest_layer
    data = layer.read()
    path = _blob_path(BIG_REPOSITORY, layer.digest)
    header = {"X-Dragonfly-Registry": registry.url}
    cases = {
        f"bytes=1000000-{1000000 + 999_999}": (1000000, 1000000 + 999_999),
        f"bytes={layer.size - 4096}-": (layer.size - 4096, layer.size - 1),
        "bytes=-5000": (layer.size - 5000, layer.size - 1),
        "bytes=0-0": (0, 0),
    }
    for range_value, (first, last) in cases.items():
        reply = client.request("GET", node.proxy_host, path, {**header, "Range": range_value})
        assert reply.status == 206, (range_value, reply.status, reply.body[:300])
        assert reply.header("Content-Range") == f"bytes {first}-{last}/{layer.size}", range_value
        assert reply.body == data[first:last + 1], range_value
    whole = client.request("GET", node.proxy_host, path, header)
    assert whole.status == 200 and whole.complete
    assert hashlib.sha256(whole.body).hexdigest() == layer.digest.split(":", 1)[1]


def test_manifests_pass_through_with_their_headers(
    registry: Registry, images: ImageSet, node_factory: NodeFactory,
) -> None:
    node = node_factory(registry_mirror=registry.url)
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    manifest = images.big.manifest
    for reference in (TAG, manifest.digest):
        path = f"/v2/{BIG_REPOSITORY}/manifests/{reference}"
        for method in ("GET", "HEAD"):
            direct = client.request(method, registry.host, path, accept)
            mirrored = client.request(method, node.proxy_host, path, accept)
            assert mirrored.status == 200, (method, reference, mirrored.status, mirrored.body)
            for name in ("Content-Type", "Docker-Content-Digest", "Content-Length"):
                assert mirrored.header(name) == direct.header(name), (method, reference, name)
            if method == "GET":
                assert mirrored.body == manifest.read()
    unknown = client.request("GET", node.proxy_host, f"/v2/{BIG_REPOSITORY}/manifests/nope", accept)
    assert unknown.status == 404 and "MANIFEST_UNKNOWN" in unknown.oci_error_codes()


def test_head_blob_answers_length_and_digest_without_downloading(
    registry: Registry, images: ImageSet, node_factory: NodeFactory,
) -> None:
    node = node_factory(registry_mirror=UNUSED_UPSTREAM)
    layer = images.big.largest_layer
    mark = registry.access_log.mark()
    reply = client.request(
        "HEAD", node.proxy_host,
        _blob_path(BIG_REPOSITORY, layer.digest) + f"?ns={registry.host}",
    )
    assert reply.status == 200
    assert reply.header("Content-Length") == str(layer.size)
    assert reply.header("Docker-Content-Digest") == layer.digest
    registry.access_log.settle()
    asked = [entry for entry in registry.access_log.entries()[mark:]
             if entry.blob_digest == layer.digest]
    assert asked, "the registry saw no request for the blob: was the HEAD answered from nowhere?"
    downloaded = registry.access_log.bytes_served(layer.digest, since=mark)
    assert downloaded < HEAD_DOWNLOAD_LIMIT_BYTES, f"HEAD made the node download {downloaded} bytes"


# ---------------------------------------------------------------------------------------------
# Item 4: Basic and Bearer token auth through the mirror


@dataclass(frozen=True)
class AuthCase:
    """One authenticated registry and how a client proves who it is to it."""

    registry: Registry
    credentials: str
    scheme: str
    token_realm: str | None

    def authorization(self, repository: str) -> str:
        """The `Authorization` value a client that ran the registry's auth flow would send."""
        if self.token_realm is None:
            return _basic(self.credentials)
        realm_host = self.token_realm.split("//", 1)[1].split("/", 1)[0]
        reply = client.request(
            "GET", realm_host,
            f"/token?service={TOKEN_SERVICE}&scope=repository:{repository}:pull",
            {"Authorization": _basic(self.credentials)},
        )
        assert reply.status == 200, reply.body[:300]
        return "Bearer " + str(json.loads(reply.body)["token"])


@pytest.fixture(params=["basic", "token"])
def auth_case(request: pytest.FixtureRequest) -> AuthCase:
    if request.param == "basic":
        registry: Registry = request.getfixturevalue("basic_registry")
        assert registry.credentials is not None
        return AuthCase(registry, registry.credentials, "Basic", None)
    setup: TokenSetup = request.getfixturevalue("token_registry")
    return AuthCase(setup.registry, setup.credentials, "Bearer", setup.token_server.realm)


def test_auth_registries_work_directly(
    auth_case: AuthCase, containerd_factory: ContainerdFactory,
) -> None:
    """The harness alone: without the node, the auth registries refuse strangers, admit the user."""
    daemon = containerd_factory()
    write_mirror_hosts(daemon.hosts_dir, auth_case.registry.host, None)
    reference = f"{auth_case.registry.host}/{SMALL_REPOSITORY}:{TAG}"
    failed = daemon.pull(reference, check=False)
    assert failed.returncode != 0 and "401" in failed.stderr, failed.stderr
    daemon.pull(reference, user=auth_case.credentials)
    assert HELLO_OUTPUT in daemon.run_container(reference, "direct-auth-hello")


def test_auth_challenge_passes_through_and_credentials_are_forwarded(
    auth_case: AuthCase, images: ImageSet, node_factory: NodeFactory,
) -> None:
    node = node_factory(registry_mirror=auth_case.registry.url)
    manifest_path = f"/v2/{SMALL_REPOSITORY}/manifests/{TAG}"
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}

    refused = client.request("GET", node.proxy_host, manifest_path, accept)
    assert refused.status == 401
    challenge = refused.header("WWW-Authenticate") or ""
    assert challenge.startswith(auth_case.scheme + " "), challenge
    if auth_case.token_realm is not None:
        assert auth_case.token_realm in challenge, challenge

    authorization = auth_case.authorization(SMALL_REPOSITORY)
    allowed = client.request(
        "GET", node.proxy_host, manifest_path, {**accept, "Authorization": authorization}
    )
    assert allowed.status == 200, allowed.body[:300]
    assert allowed.header("Docker-Content-Digest") == images.small.manifest.digest
    for blob in images.small.blobs:
        path = _blob_path(SMALL_REPOSITORY, blob.digest)
        fetched = client.request("GET", node.proxy_host, path, {"Authorization": authorization})
        assert fetched.status == 200 and fetched.body == blob.read(), blob.digest
        # In the node's store now; a client without credentials must still get none of it.
        cached = client.request("GET", node.proxy_host, path)
        assert cached.status == 401, (blob.digest, cached.status, cached.body[:200])


def test_containerd_pulls_with_credentials_through_mirror(
    auth_case: AuthCase, images: ImageSet, node_factory: NodeFactory,
    containerd_factory: ContainerdFactory,
) -> None:
    node = node_factory(registry_mirror=UNUSED_UPSTREAM)
    daemon = containerd_factory()
    write_mirror_hosts(daemon.hosts_dir, auth_case.registry.host, node.proxy_url)
    reference = f"{auth_case.registry.host}/{SMALL_REPOSITORY}:{TAG}"
    failed = daemon.pull(reference, check=False)
    assert failed.returncode != 0 and "401" in failed.stderr, failed.stderr
    mark = auth_case.registry.access_log.mark()
    daemon.pull(reference, user=auth_case.credentials)
    assert HELLO_OUTPUT in daemon.run_container(reference, "auth-hello")
    # Through the node, not by falling back to the registry: the node fetched every blob, and the
    # registry served each once (a fallback after the node would make it twice).
    assert node.metric("d7y_origin_bytes") >= sum(blob.size for blob in images.small.blobs)
    auth_case.registry.access_log.settle()
    for blob in images.small.blobs:
        served = auth_case.registry.access_log.bytes_served(blob.digest, since=mark)
        assert served == blob.size, (blob.digest, served)


def test_skopeo_pulls_with_credentials_through_mirror(
    auth_case: AuthCase, images: ImageSet, node_factory: NodeFactory, tmp_path: Path,
) -> None:
    node = node_factory(registry_mirror=auth_case.registry.url)
    skopeo = [SKOPEO, "--insecure-policy", "copy", "--quiet", "--src-tls-verify=false"]
    source = f"docker://{node.proxy_host}/{SMALL_REPOSITORY}:{TAG}"
    without = run([*skopeo, source, f"oci:{tmp_path / 'no-creds'}:{TAG}"],
                  timeout=SKOPEO_TIMEOUT_SECONDS, check=False)
    assert without.returncode != 0
    assert "401" in without.stderr or "unauthorized" in without.stderr.lower(), without.stderr
    layout = tmp_path / "creds"
    run([*skopeo, "--src-creds", auth_case.credentials, source, f"oci:{layout}:{TAG}"],
        timeout=SKOPEO_TIMEOUT_SECONDS)
    for blob in images.small.blobs:
        copied = layout / "blobs" / "sha256" / blob.digest.split(":", 1)[1]
        assert sha256_file(copied) == blob.digest


# ---------------------------------------------------------------------------------------------
# Item 5: bad input, broken upstreams, kill -9


def _assert_still_serving(node_host: str, registry: Registry, images: ImageSet) -> None:
    layer = images.small.layers[-1]
    reply = client.request(
        "GET", node_host, _blob_path(SMALL_REPOSITORY, layer.digest),
        {"X-Dragonfly-Registry": registry.url},
    )
    assert reply.status == 200 and reply.body == layer.read()


TRAVERSAL_PATHS = (
    "/v2/../../../../etc/passwd/blobs/sha256:" + "a" * 64,
    "/v2/test/../../../../etc/blobs/sha256:" + "a" * 64,
    "/v2/%2e%2e/%2e%2e/%2e%2e/etc/blobs/sha256:" + "a" * 64,
    "/v2/test%2f..%2f..%2fetc/blobs/sha256:" + "a" * 64,
    "/v2/test/small/blobs/sha256:../../../../../etc/passwd",
    "/v2/test/small/blobs/sha256:..%2f..%2f..%2f..%2fetc%2fpasswd",
    "/v2/test/small/blobs/../../../../../etc/passwd",
    "/v2/test/small/manifests/../../../../../etc/passwd",
)
MALFORMED_DIGEST_PATHS = (
    "/v2/test/small/blobs/sha256:" + "g" * 64,
    "/v2/test/small/blobs/sha256:abc",
    "/v2/test/small/blobs/sha256:" + "a" * 65,
    "/v2/test/small/blobs/sha256:" + "A" * 64,
    "/v2/test/small/blobs/md5:d41d8cd98f00b204e9800998ecf8427e",
    "/v2/test/small/blobs/" + "a" * 64,
    "/v2/test/small/blobs/sha256:%00" + "a" * 63,
    "/v2/Test/UPPER/blobs/sha256:" + "a" * 64,
)


def test_path_traversal_and_malformed_digests_are_refused(
    registry: Registry, images: ImageSet, node_factory: NodeFactory,
) -> None:
    node = node_factory(registry_mirror=registry.url)
    failures: list[tuple[str, object, bytes]] = []
    for path in (*TRAVERSAL_PATHS, *MALFORMED_DIGEST_PATHS):
        payload = (
            f"GET {path} HTTP/1.1\r\nHost: {node.proxy_host}\r\nConnection: close\r\n\r\n"
        ).encode()
        reply = client.raw_request(node.proxy_host, payload)
        if reply.status not in (400, 404) or b"root:" in reply.data:
            failures.append((path, reply.status, reply.data[:200]))
        elif b'"errors"' not in reply.body:
            failures.append((path, f"{reply.status} without an OCI error body", reply.data[:200]))
    assert not failures, "\n".join(map(str, failures))
    data_dir_files = [str(p) for p in node.data_dir.rglob("*") if "passwd" in p.name]
    assert not data_dir_files
    assert node.healthy()
    _assert_still_serving(node.proxy_host, registry, images)


MALFORMED_RANGES = ("bytes=abc", "bytes=5-2", "bytes=--1", "bytes=", "bytes=1-2-3", "bytes=-0")
# RFC 9110 lets a server ignore these (an unknown unit must be ignored; several ranges may be):
# the answer is then the whole blob with 200, or a refusal.
IGNORABLE_RANGES = ("items=0-5", "bytes=0-1,4-5")


def test_malformed_and_unsatisfiable_ranges(
    registry: Registry, images: ImageSet, node_factory: NodeFactory,
) -> None:
    node = node_factory(registry_mirror=registry.url)
    layer = images.small.layers[0]
    path = _blob_path(SMALL_REPOSITORY, layer.digest)
    failures: list[tuple[str, object, bytes]] = []
    for value in MALFORMED_RANGES:
        reply = client.request("GET", node.proxy_host, path, {"Range": value})
        if reply.status not in (400, 416):
            failures.append((value, reply.status, reply.body[:200]))
    for value in IGNORABLE_RANGES:
        reply = client.request("GET", node.proxy_host, path, {"Range": value})
        whole = reply.status == 200 and reply.complete and reply.body == layer.read()
        if not whole and reply.status not in (400, 416):
            failures.append((value, reply.status, reply.body[:200]))
    beyond = client.request("GET", node.proxy_host, path, {"Range": f"bytes={layer.size}-"})
    if beyond.status != 416:
        failures.append(("beyond the end", beyond.status, beyond.body[:200]))
    elif beyond.header("Content-Range") != f"bytes */{layer.size}":
        failures.append(("beyond the end: Content-Range", beyond.header("Content-Range"), b""))
    assert not failures, "\n".join(map(str, failures))
    assert node.healthy()
    _assert_still_serving(node.proxy_host, registry, images)


def test_oversized_request_line_and_headers(
    registry: Registry, images: ImageSet, node_factory: NodeFactory,
) -> None:
    node = node_factory(registry_mirror=registry.url)
    host = node.proxy_host
    blob = _blob_path(SMALL_REPOSITORY, images.small.layers[0].digest)
    payloads = {
        "one 64 KiB header": (f"GET {blob} HTTP/1.1\r\nHost: {host}\r\nX-Big: {'a' * 65536}\r\n"
                              "Connection: close\r\n\r\n"),
        "10000 headers": (f"GET {blob} HTTP/1.1\r\nHost: {host}\r\n"
                          + "".join(f"X-H{i}: v\r\n" for i in range(10000))
                          + "Connection: close\r\n\r\n"),
        "a 128 KiB URL": (f"GET /v2/{'a' * 131072}/blobs/sha256:{'a' * 64} HTTP/1.1\r\n"
                          f"Host: {host}\r\nConnection: close\r\n\r\n"),
        "a 64 KiB Range": (f"GET {blob} HTTP/1.1\r\nHost: {host}\r\nRange: bytes={'1' * 65536}-\r\n"
                           "Connection: close\r\n\r\n"),
        "a 64 KiB X-Dragonfly-Registry": (
            f"GET {blob} HTTP/1.1\r\nHost: {host}\r\nX-Dragonfly-Registry: http://{'a' * 65536}\r\n"
            "Connection: close\r\n\r\n"),
    }
    failures: list[tuple[str, object, bytes]] = []
    for what, payload in payloads.items():
        reply = client.raw_request(host, payload.encode())
        # Refused with a 4xx, or the connection closed without an answer: both are fine;
        # a 200 or a 5xx is not.
        if reply.status is not None and not 400 <= reply.status < 500:
            failures.append((what, reply.status, reply.data[:200]))
    assert not failures, "\n".join(map(str, failures))
    assert node.healthy()
    _assert_still_serving(host, registry, images)


def test_upstream_closing_mid_body_fails_cleanly_and_keeps_nothing(
    registry: Registry, images: ImageSet, node_factory: NodeFactory,
    faulty_origin: FaultyOrigin,
) -> None:
    node = node_factory(registry_mirror=UNUSED_UPSTREAM)
    data = bytes(range(256)) * (8 * 1024)  # 2 MiB
    digest = faulty_origin.add_blob(data, Fault.CLOSE_MID_BODY)
    path = _blob_path("faulty/blob", digest)
    header = {"X-Dragonfly-Registry": faulty_origin.url}

    broken = client.request("GET", node.proxy_host, path, header)
    assert faulty_origin.requests(digest) >= 1
    assert not (broken.status == 200 and broken.complete), (
        "a blob whose upstream broke off was served as complete"
    )
    assert node.healthy()

    faulty_origin.set_fault(digest, Fault.NONE)
    middle = len(data) // 2
    ranged = client.request("GET", node.proxy_host, path,
                            {**header, "Range": f"bytes={middle - 100}-{middle + 100}"})
    assert ranged.status == 206 and ranged.body == data[middle - 100:middle + 101]
    whole = client.request("GET", node.proxy_host, path, header)
    assert whole.status == 200 and whole.complete and whole.body == data
    _assert_still_serving(node.proxy_host, registry, images)


def test_upstream_sending_wrong_bytes_is_caught_and_nothing_is_kept(
    registry: Registry, images: ImageSet, node_factory: NodeFactory,
    faulty_origin: FaultyOrigin,
) -> None:
    node = node_factory(registry_mirror=UNUSED_UPSTREAM)
    data = hashlib.sha256(b"seed").digest() * (64 * 1024)  # 2 MiB
    digest = faulty_origin.add_blob(data, Fault.WRONG_BYTES)
    path = _blob_path("faulty/blob", digest)
    header = {"X-Dragonfly-Registry": faulty_origin.url}

    corrupt = client.request("GET", node.proxy_host, path, header)
    assert not (corrupt.status == 200 and corrupt.complete), (
        f"bytes that do not match {digest} were served as a complete blob"
        f" (equal to origin: {corrupt.body == data})"
    )
    assert node.metric("d7y_digest_mismatches") >= 1
    assert node.healthy()

    faulty_origin.set_fault(digest, Fault.NONE)
    middle = len(data) // 2
    ranged = client.request("GET", node.proxy_host, path,
                            {**header, "Range": f"bytes={middle - 100}-{middle + 100}"})
    assert ranged.status == 206 and ranged.body == data[middle - 100:middle + 101], (
        "a piece with wrong bytes was kept and served again"
    )
    whole = client.request("GET", node.proxy_host, path, header)
    assert whole.status == 200 and whole.complete and whole.body == data
    _assert_still_serving(node.proxy_host, registry, images)


def test_unreachable_upstream_answers_502_quickly(node_factory: NodeFactory) -> None:
    node = node_factory(registry_mirror=UNUSED_UPSTREAM)
    for path in (f"/v2/library/x/manifests/{TAG}", _blob_path("library/x", "sha256:" + "b" * 64)):
        reply = client.request("GET", node.proxy_host, path,
                               timeout=UPSTREAM_DOWN_LIMIT_SECONDS * 3)
        assert reply.status == 502, (path, reply.status, reply.body[:200])
        assert reply.seconds < UPSTREAM_DOWN_LIMIT_SECONDS
        assert reply.oci_error_codes(), reply.body[:200]
    assert node.healthy()


def test_kill_9_during_download_then_restart_completes_with_correct_bytes(
    registry: Registry, images: ImageSet, node_factory: NodeFactory,
) -> None:
    layer = images.big.largest_layer
    relay = ThrottledRelay(registry.port, CRASH_LINK_BYTES_PER_SECOND)
    relay.start()
    try:
        node = node_factory(registry_mirror=UNUSED_UPSTREAM)
        path = _blob_path(BIG_REPOSITORY, layer.digest)
        header = {"X-Dragonfly-Registry": relay.url}
        interrupted: list[client.Reply | BaseException] = []

        def pull() -> None:
            try:
                interrupted.append(client.request("GET", node.proxy_host, path, header))
            except BaseException as error:
                interrupted.append(error)

        puller = threading.Thread(target=pull, daemon=True)
        puller.start()
        wait_until(lambda: relay.downstream_bytes >= layer.size * CRASH_AT_SHARE,
                   timeout=60.0, what="most of the big blob through the slow link")
        node.kill()
        puller.join(timeout=30.0)
        at_kill = relay.downstream_bytes
        assert at_kill < layer.size, "the download finished before the kill; slow the link down"

        node.start()  # the same data dir and ports
        reply = client.request("GET", node.proxy_host, path, header)
        assert reply.status == 200 and reply.complete
        assert len(reply.body) == layer.size
        assert "sha256:" + hashlib.sha256(reply.body).hexdigest() == layer.digest
        total = relay.downstream_bytes
        print(f"kill -9 after {at_kill} of {layer.size} bytes; {total} crossed the link in all")
        assert total < layer.size * RESUME_LIMIT_SHARE, (
            f"the partial task did not resume: {total} bytes crossed the link for a"
            f" {layer.size}-byte blob ({at_kill} before the kill)"
        )
    finally:
        relay.stop()


def test_graceful_stop_and_restart_serves_from_the_store(
    registry: Registry, images: ImageSet, node_factory: NodeFactory,
) -> None:
    node = node_factory(registry_mirror=registry.url)
    layer = images.big.layer_near(MEDIUM_LAYER_BYTES)
    path = _blob_path(BIG_REPOSITORY, layer.digest)
    mark = registry.access_log.mark()
    first = client.request("GET", node.proxy_host, path)
    assert first.status == 200 and first.body == layer.read()
    registry.access_log.settle()
    assert registry.access_log.bytes_served(layer.digest, since=mark) == layer.size
    started = time.monotonic()
    assert node.stop() == 0, "SIGTERM did not end the node with exit code 0"
    assert time.monotonic() - started < 10.0
    node.start()
    mark = registry.access_log.mark()
    again = client.request("GET", node.proxy_host, path)
    assert again.status == 200 and again.body == layer.read()
    registry.access_log.settle()
    assert registry.access_log.serve_count(layer.digest, since=mark) == 0


# ---------------------------------------------------------------------------------------------
# Many clients, one download


async def test_concurrent_gets_of_one_blob_fetch_it_from_origin_once(
    registry: Registry, images: ImageSet, node_factory: NodeFactory,
) -> None:
    node = node_factory(registry_mirror=UNUSED_UPSTREAM)
    layer = images.big.layer_near(MEDIUM_LAYER_BYTES)
    url = f"{node.proxy_url}{_blob_path(BIG_REPOSITORY, layer.digest)}?ns={registry.host}"
    mark = registry.access_log.mark()
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def fetch() -> tuple[int, str]:
            async with session.get(url) as response:
                digest = hashlib.sha256()
                async for chunk in response.content.iter_chunked(256 * 1024):
                    digest.update(chunk)
                return response.status, "sha256:" + digest.hexdigest()

        results = await asyncio.gather(*(fetch() for _ in range(CONCURRENT_CLIENTS)))
    assert all(status == 200 for status, _ in results), [status for status, _ in results]
    assert all(digest == layer.digest for _, digest in results)
    await asyncio.to_thread(registry.access_log.settle)
    served = registry.access_log.bytes_served(layer.digest, since=mark)
    assert served == layer.size, (
        f"the registry served {served} bytes of a {layer.size}-byte blob"
        f" in {registry.access_log.serve_count(layer.digest, since=mark)} requests"
    )
