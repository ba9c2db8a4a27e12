"""Tests of `d7y_node.proxy`: the mirror API over the real TaskManager and PieceStore.

Faults come from the origin double in `tests/test_registry.py`; the end of the file runs the
mirror against the real CNCF registry (`docker-registry`), marked `integration`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given
from hypothesis import strategies as st

from d7y_node import proxy as proxy_module
from d7y_node.config import ProxyConfig, RegistryConfig, StoreConfig, TaskConfig
from d7y_node.errors import InvalidRequest
from d7y_node.metrics import Metrics
from d7y_node.piece_store import BLOCK_SIZE, PieceStore
from d7y_node.proxy import ProxyServer, RangeSpec, parse_range, parse_route
from d7y_node.registry import RegistryClient
from d7y_node.tasks import TaskManager
from tests.test_registry import CHALLENGE, SECRET, Origin, free_port, sha256_digest

MIB = 1024 * 1024
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@dataclass
class Mirror:
    """One proxy over a real store and task manager, and a client for it."""

    origin: Origin
    metrics: Metrics
    store: PieceStore
    tasks: TaskManager
    registry: RegistryClient
    client: TestClient[aiohttp.web.Request, aiohttp.web.Application]

    @property
    def port(self) -> int:
        port = self.client.port
        assert port is not None
        return port

    def requests(self, route: str, status: int) -> float:
        return float(self.metrics.requests.labels(route=route, status=str(status))._value.get())


async def start_mirror(
    tmp_path: Path, origin: Origin, *, default_registry: str | None = None
) -> Mirror:
    metrics = Metrics()
    store = PieceStore(StoreConfig(data_dir=tmp_path / "data"), metrics)
    await store.open()
    tasks = TaskManager(store, TaskConfig(read_timeout=5.0, piece_retries=1), metrics)
    await tasks.start()
    registry = RegistryClient(
        RegistryConfig(default_registry=default_registry or str(origin.url),
                       connect_timeout=1.0, request_timeout=5.0),
        metrics,
    )
    proxy = ProxyServer(ProxyConfig(), tasks, registry, metrics)
    client = TestClient(TestServer(proxy.app(), host="127.0.0.1"))
    await client.start_server()
    return Mirror(origin, metrics, store, tasks, registry, client)


async def stop_mirror(mirror: Mirror) -> None:
    await mirror.client.close()
    await mirror.tasks.close()
    await mirror.registry.close()
    await mirror.store.close()


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    double = Origin()
    await double.start()
    yield double
    await double.close()


@pytest.fixture
async def mirror(tmp_path: Path, origin: Origin) -> AsyncIterator[Mirror]:
    node = await start_mirror(tmp_path, origin)
    yield node
    await stop_mirror(node)


async def raw_request(port: int, head: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes exactly as given (no client normalizes the path); read to close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    header_block, _, body = data.partition(b"\r\n\r\n")
    lines = header_block.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split(" ")[2 - 1]), headers, body


async def eventually(condition: Callable[[], bool], seconds: float = 2.0) -> None:
    """Wait for a server-side effect that lands just after the client got its bytes."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        await asyncio.sleep(0.01)


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: mirror\r\nConnection: close\r\n\r\n".encode()


def error_code(body: bytes) -> str:
    code: str = json.loads(body)["errors"][0]["code"]
    return code


def blob_data(size: int, seed: int = 1) -> bytes:
    block = hashlib.sha256(str(seed).encode()).digest() * 2048  # 64 KiB of varied bytes
    return (block * (size // len(block) + 1))[:size]


# -- parsers -----------------------------------------------------------------------------------


def test_parse_range() -> None:
    assert parse_range(None) is None
    assert parse_range("bytes=0-9") == RangeSpec(0, 9)
    assert parse_range("bytes=5-") == RangeSpec(5, None)
    assert parse_range("bytes=-5") == RangeSpec(None, 5)
    assert parse_range(" bytes = 1-2 ") == RangeSpec(1, 2)
    assert parse_range("bytes=0-1,5-6") is None  # several ranges: the whole body
    assert parse_range("items=0-1") is None  # unknown unit: ignored
    for bad in ("bytes", "bytes=", "bytes=-", "bytes=a-b", "bytes=5-3", "bytes=1-2-3",
                "bytes=0-1,x", "bytes=" + "9" * 25 + "-"):
        with pytest.raises(InvalidRequest) as caught:
            parse_range(bad)
        assert caught.value.code == "RANGE_INVALID"


def test_range_resolution() -> None:
    assert RangeSpec(0, 9).resolve(100) is not None
    assert RangeSpec(90, 200).resolve(100).count == 10  # type: ignore[union-attr]
    assert RangeSpec(None, 500).resolve(100).start == 0  # type: ignore[union-attr]
    assert RangeSpec(None, 10).resolve(100).start == 90  # type: ignore[union-attr]
    assert RangeSpec(100, None).resolve(100) is None
    assert RangeSpec(None, 0).resolve(100) is None
    assert RangeSpec(0, 0).resolve(0) is None


def test_parse_route() -> None:
    digest = "sha256:" + "a" * 64
    route = parse_route(f"/v2/library/busy-box_1/blobs/{digest}?ns=docker.io")
    assert (route.kind, route.repository, route.reference) == ("blob", "library/busy-box_1", digest)
    assert parse_route(f"/v2/a/blobs/sha256%3A{'a' * 64}").reference == digest
    assert parse_route("/v2/a/b/c/manifests/v1.0-rc_1").reference == "v1.0-rc_1"
    assert parse_route("/v2/a/tags/list").kind == "tags"
    assert parse_route("/v2/").kind == "v2"
    cases = {
        f"/v2/../etc/blobs/{digest}": "NAME_INVALID",
        f"/v2/a/../b/blobs/{digest}": "NAME_INVALID",
        f"/v2/a/%2e%2e/b/blobs/{digest}": "NAME_INVALID",
        f"/v2/a%2fb/blobs/{digest}": "NAME_INVALID",
        f"/v2/Upper/blobs/{digest}": "NAME_INVALID",
        f"/v2/a//b/blobs/{digest}": "NAME_INVALID",
        f"/v2/{'a' * 256}/blobs/{digest}": "NAME_INVALID",
        "/v2/a/blobs/sha256:abc": "DIGEST_INVALID",
        f"/v2/a/blobs/sha256:{'A' * 64}": "DIGEST_INVALID",
        f"/v2/a/blobs/sha512:{'a' * 128}": "DIGEST_INVALID",
        "/v2/a/blobs/..%2f..%2fetc%2fpasswd": "DIGEST_INVALID",
        "/v2/a/manifests/-bad": "TAG_INVALID",
        f"/v2/a/manifests/{'t' * 129}": "TAG_INVALID",
        "/v2/a/manifests/%2e%2e": "TAG_INVALID",
        "/v2/_catalog": "UNSUPPORTED",
        "/v3/": "UNSUPPORTED",
        "/v2/a/tags/other": "UNSUPPORTED",
        "/v2/a/blobs/uploads/": "UNSUPPORTED",
    }
    for path, code in cases.items():
        with pytest.raises(InvalidRequest) as caught:
            parse_route(path)
        assert caught.value.code == code, path


@given(st.text(max_size=60))
def test_parse_range_takes_any_text(header: str) -> None:
    try:
        spec = parse_range(header)
    except InvalidRequest as err:
        assert err.code == "RANGE_INVALID" and err.status == 400
        return
    if spec is not None:
        for length in (0, 1, 1000):
            span = spec.resolve(length)
            if span is not None:
                assert span.start >= 0 and span.count >= 1
                assert span.start + span.count <= length


@given(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 10**6))
def test_range_resolution_stays_inside(first: int, extra: int, length: int) -> None:
    for spec in (RangeSpec(first, first + extra), RangeSpec(first, None), RangeSpec(None, extra)):
        span = spec.resolve(length)
        if span is None:
            continue
        assert 0 <= span.start < length
        assert 1 <= span.count <= length - span.start


@given(st.text(alphabet="/v2abcmnifestlobsha256:.%2eEfF-_", max_size=80))
def test_parse_route_takes_any_path(path: str) -> None:
    try:
        route = parse_route(path)
    except InvalidRequest as err:
        assert err.status in (400, 404)
        return
    assert ".." not in route.repository and "%" not in route.repository
    assert "/" not in route.reference and not route.reference.startswith(".")
    assert all(part not in (".", "..") for part in route.repository.split("/"))


# -- API basics and bad input ------------------------------------------------------------------


async def test_base_endpoint(mirror: Mirror) -> None:
    for path in ("/v2/", "/v2"):
        response = await mirror.client.get(path)
        assert response.status == 200
        assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"
        assert await response.json() == {}
    await eventually(lambda: mirror.requests("v2", 200) == 2)
    # Upstream's challenge is passed through, so clients that learn auth from it run it.
    mirror.origin.required_auth = SECRET
    response = await mirror.client.get("/v2/")
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == CHALLENGE
    response = await mirror.client.get("/v2/", headers={"Authorization": SECRET})
    assert response.status == 200
    assert mirror.origin.seen[-1].headers["Authorization"] == SECRET


async def test_bad_requests_get_oci_errors(mirror: Mirror) -> None:
    digest = "sha256:" + "b" * 64
    for path, status, code in [
        (f"/v2/../../etc/blobs/{digest}", 400, "NAME_INVALID"),
        (f"/v2/a/%2e%2e/blobs/{digest}", 400, "NAME_INVALID"),
        (f"/v2/a%2Fb/blobs/{digest}", 400, "NAME_INVALID"),
        ("/v2/a/blobs/sha256:%2e%2e%2f", 400, "DIGEST_INVALID"),
        ("/v2/a/blobs/md5:abc", 400, "DIGEST_INVALID"),
        ("/v2/a/manifests/bad%20tag", 400, "TAG_INVALID"),
        ("/v2/_catalog", 404, "UNSUPPORTED"),
        ("/etc/passwd", 404, "UNSUPPORTED"),
    ]:
        got, headers, body = await raw_request(mirror.port, get(path))
        assert (got, error_code(body)) == (status, code), path
        assert headers["content-type"].startswith("application/json")
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        got, _, body = await raw_request(
            mirror.port,
            f"{method} /v2/a/blobs/uploads/ HTTP/1.1\r\nHost: m\r\nContent-Length: 0\r\n"
            "Connection: close\r\n\r\n".encode(),
        )
        assert (got, error_code(body)) == (405, "UNSUPPORTED")
    # Nothing reached the origin.
    assert mirror.origin.seen == []


async def test_bad_upstream_names_are_refused(mirror: Mirror) -> None:
    digest = "sha256:" + "b" * 64
    response = await mirror.client.get(f"/v2/a/blobs/{digest}?ns=a/b")
    assert response.status == 400
    response = await mirror.client.get(
        f"/v2/a/blobs/{digest}", headers={"X-Dragonfly-Registry": "https://u:p@evil.example"}
    )
    assert response.status == 400
    assert mirror.origin.seen == []


async def test_oversized_header_and_node_keeps_serving(mirror: Mirror) -> None:
    huge = "x" * 100_000
    status, _, _ = await raw_request(
        mirror.port,
        f"GET /v2/ HTTP/1.1\r\nHost: m\r\nX-Big: {huge}\r\nConnection: close\r\n\r\n".encode(),
    )
    assert status in (400, 431)
    status, _, _ = await raw_request(mirror.port, get("/v2/" + "a" * 100_000))
    assert status in (400, 414)
    assert (await mirror.client.get("/v2/")).status == 200


# -- blobs -------------------------------------------------------------------------------------


async def test_blob_pull_then_cache_hit(mirror: Mirror) -> None:
    data = blob_data(3 * MIB + 123)
    digest = mirror.origin.add_blob(data)
    path = f"/v2/library/app/blobs/{digest}"
    response = await mirror.client.get(path)
    assert response.status == 200
    assert await response.read() == data
    assert response.headers["Docker-Content-Digest"] == digest
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert response.headers["Accept-Ranges"] == "bytes"
    assert response.headers["Content-Length"] == str(len(data))
    info = mirror.tasks.info(digest)
    assert info is not None and info.complete
    fetched = len(mirror.origin.blob_requests("GET"))
    assert mirror.metrics.cache_bytes._value.get() == 0
    # Again: from the store, no new GET upstream, and the credential check is cached.
    seen_before = len(mirror.origin.seen)
    response = await mirror.client.get(path)
    assert await response.read() == data
    assert len(mirror.origin.blob_requests("GET")) == fetched
    assert len(mirror.origin.seen) == seen_before
    assert mirror.metrics.cache_bytes._value.get() == len(data)
    assert mirror.metrics.served_bytes._value.get() == 2 * len(data)
    await eventually(lambda: mirror.requests("blob", 200) == 2)


async def test_concurrent_clients_share_one_download(mirror: Mirror) -> None:
    data = blob_data(2 * MIB + 1, seed=2)
    digest = mirror.origin.add_blob(data)
    mirror.origin.delay = 0.05  # keep the download running while clients join

    async def pull() -> bytes:
        response = await mirror.client.get(f"/v2/library/app/blobs/{digest}")
        assert response.status == 200
        return await response.read()

    bodies = await asyncio.gather(*[pull() for _ in range(100)])
    assert all(body == data for body in bodies)
    info = mirror.tasks.info(digest)
    assert info is not None and info.complete
    # One HEAD (the credential check, shared) and one GET per piece.
    assert len(mirror.origin.blob_requests("HEAD")) == 1
    assert len(mirror.origin.blob_requests("GET")) == info.piece_count


async def test_ranges(mirror: Mirror) -> None:
    data = blob_data(2 * MIB + 7, seed=3)
    digest = mirror.origin.add_blob(data)
    path = f"/v2/library/app/blobs/{digest}"
    for header, start, end in [
        ("bytes=10-19", 10, 20),
        ("bytes=-5", len(data) - 5, len(data)),
        (f"bytes={MIB + 3}-", MIB + 3, len(data)),
        ("bytes=0-99999999999", 0, len(data)),
    ]:
        response = await mirror.client.get(path, headers={"Range": header})
        assert response.status == 206, header
        assert await response.read() == data[start:end], header
        assert response.headers["Content-Range"] == f"bytes {start}-{end - 1}/{len(data)}"
        assert response.headers["Content-Length"] == str(end - start)
    response = await mirror.client.get(path, headers={"Range": f"bytes={len(data)}-"})
    assert response.status == 416
    assert response.headers["Content-Range"] == f"bytes */{len(data)}"
    response = await mirror.client.get(path, headers={"Range": "bytes=abc"})
    assert response.status == 400
    assert error_code(await response.read()) == "RANGE_INVALID"
    response = await mirror.client.get(path, headers={"Range": "bytes=0-1,5-6"})
    assert response.status == 200
    assert await response.read() == data


async def test_range_waits_only_for_its_pieces(mirror: Mirror) -> None:
    data = blob_data(8 * MIB, seed=4)
    digest = mirror.origin.add_blob(data)
    response = await mirror.client.get(
        f"/v2/library/app/blobs/{digest}", headers={"Range": f"bytes={5 * MIB}-{5 * MIB + 9}"}
    )
    assert response.status == 206
    assert await response.read() == data[5 * MIB:5 * MIB + 10]
    ranges = [s.headers["Range"] for s in mirror.origin.blob_requests("GET")]
    # Only the block holding those bytes (a range makes a lazy task: piece_store.BLOCK_SIZE).
    assert ranges == [f"bytes={5 * MIB}-{5 * MIB + BLOCK_SIZE - 1}"]


async def test_head_blob_does_not_download(mirror: Mirror) -> None:
    data = blob_data(MIB + 5, seed=5)
    digest = mirror.origin.add_blob(data)
    response = await mirror.client.head(f"/v2/library/app/blobs/{digest}")
    assert response.status == 200
    assert response.headers["Content-Length"] == str(len(data))
    assert response.headers["Docker-Content-Digest"] == digest
    assert mirror.origin.blob_requests("GET") == []
    assert mirror.tasks.info(digest) is None


async def test_unknown_blob_is_upstream_404(mirror: Mirror) -> None:
    response = await mirror.client.get(f"/v2/library/app/blobs/sha256:{'c' * 64}")
    assert response.status == 404
    assert error_code(await response.read()) == "BLOB_UNKNOWN"
    await eventually(lambda: mirror.requests("blob", 404) == 1)


# -- authorization -----------------------------------------------------------------------------


async def test_auth_passthrough_and_store_needs_upstream_consent(mirror: Mirror) -> None:
    origin = mirror.origin
    data = blob_data(MIB, seed=6)
    digest = origin.add_blob(data)
    origin.required_auth = SECRET
    path = f"/v2/private/app/blobs/{digest}"
    response = await mirror.client.get(path)
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == CHALLENGE
    assert await response.read() == b'{"errors":[{"code":"UNAUTHORIZED"}]}'
    response = await mirror.client.get(path, headers={"Authorization": SECRET})
    assert response.status == 200
    assert await response.read() == data
    # Complete in the store now, yet a client upstream refuses gets the 401, not the bytes.
    for credential in (None, "Bearer stolen"):
        headers = {"Authorization": credential} if credential else {}
        response = await mirror.client.get(path, headers=headers)
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == CHALLENGE
        response = await mirror.client.head(path, headers=headers)
        assert response.status == 401
    # The accepted credential is remembered: no upstream request for the next pull.
    seen = len(origin.seen)
    response = await mirror.client.get(path, headers={"Authorization": SECRET})
    assert await response.read() == data
    assert len(origin.seen) == seen


async def test_upstream_down_and_blob_stored(mirror: Mirror) -> None:
    origin = mirror.origin
    data = blob_data(MIB, seed=7)
    digest = origin.add_blob(data)
    path = f"/v2/library/app/blobs/{digest}"
    response = await mirror.client.get(path, headers={"Authorization": SECRET})
    assert await response.read() == data
    await origin.close()
    # The credential accepted within the TTL is still served from the store...
    response = await mirror.client.get(path, headers={"Authorization": SECRET})
    assert response.status == 200
    assert await response.read() == data
    # ...another is not (upstream cannot vouch for it): 502, fast.
    started = time.monotonic()
    response = await mirror.client.get(path, headers={"Authorization": "Bearer other"})
    assert response.status == 502
    assert error_code(await response.read()) == "UNAVAILABLE"
    assert time.monotonic() - started < 1.0


async def test_redirect_does_not_leak_authorization(mirror: Mirror) -> None:
    origin = mirror.origin
    data = blob_data(2 * MIB, seed=8)
    digest = origin.add_blob(data)
    origin.redirect = True
    origin.required_auth = SECRET
    response = await mirror.client.get(
        f"/v2/private/app/blobs/{digest}", headers={"Authorization": SECRET}
    )
    assert await response.read() == data
    storage = [s for s in origin.seen if s.host != origin.host]
    assert storage, "the storage host was never asked"
    assert all("Authorization" not in s.headers for s in storage)


async def test_stored_blob_is_not_released_by_another_upstream(mirror: Mirror) -> None:
    data = blob_data(MIB, seed=14)
    digest = mirror.origin.add_blob(data)
    response = await mirror.client.get(f"/v2/library/app/blobs/{digest}")
    assert await response.read() == data
    # An upstream that claims every digest (it cannot have these bytes) gets no stored byte:
    # the request is relayed to it and its own bytes come back.
    impostor = Origin()
    await impostor.start()
    try:
        impostor.blobs[digest] = b"i" * len(data)
        response = await mirror.client.get(f"/v2/library/app/blobs/{digest}?ns={impostor.host}")
        assert response.status == 200
        assert await response.read() == b"i" * len(data)
        response = await mirror.client.get(
            f"/v2/library/app/blobs/{digest}?ns={impostor.host}", headers={"Range": "bytes=0-9"}
        )
        assert await response.read() == b"i" * 10
        impostor.required_auth = SECRET
        response = await mirror.client.get(f"/v2/library/app/blobs/{digest}?ns={impostor.host}")
        assert response.status == 401
    finally:
        await impostor.close()
    assert mirror.metrics.cache_bytes._value.get() == 0
    info = mirror.tasks.info(digest)
    assert info is not None and info.complete


async def test_other_repository_needs_upstream_word_on_the_digest(mirror: Mirror) -> None:
    origin = mirror.origin
    private = blob_data(MIB, seed=15)
    public = blob_data(MIB, seed=16)
    private_digest = origin.add_blob(private)
    public_digest = origin.add_blob(public)
    origin.repositories[private_digest] = {"team/private"}
    response = await mirror.client.get(f"/v2/team/private/blobs/{private_digest}")
    assert await response.read() == private
    # Accepted for team/public (by pulling one of its blobs)...
    response = await mirror.client.get(f"/v2/team/public/blobs/{public_digest}")
    assert await response.read() == public
    # ...is no licence for the private blob through team/public: upstream says 404 there.
    response = await mirror.client.get(f"/v2/team/public/blobs/{private_digest}")
    assert response.status == 404
    heads = [s.path for s in origin.blob_requests("HEAD")]
    assert f"/v2/team/public/blobs/{private_digest}" in heads
    # Where upstream does hold it, the stored bytes are served (after that one HEAD).
    origin.repositories[private_digest].add("team/public")
    response = await mirror.client.get(f"/v2/team/public/blobs/{private_digest}")
    assert await response.read() == private
    assert mirror.metrics.cache_bytes._value.get() == len(private)


# -- faults ------------------------------------------------------------------------------------


async def test_origin_closing_at_once(mirror: Mirror) -> None:
    origin = mirror.origin
    data = blob_data(3 * MIB, seed=9)
    digest = origin.add_blob(data)
    origin.close_after = 0  # headers, then the connection closes: no progress at all
    path = f"/v2/library/app/blobs/{digest}"
    response = await mirror.client.get(path)
    # The first piece never arrives: a proper error before any header.
    assert response.status == 502
    assert error_code(await response.read()) == "UNKNOWN"
    info = mirror.tasks.info(digest)
    assert info is None or not info.complete
    origin.close_after = None
    response = await mirror.client.get(path)
    assert response.status == 200
    assert await response.read() == data


async def test_origin_closing_mid_body_resumes(mirror: Mirror) -> None:
    origin = mirror.origin
    data = blob_data(3 * MIB, seed=13)
    digest = origin.add_blob(data)
    origin.close_after = 300_000
    origin.close_times = 3
    response = await mirror.client.get(f"/v2/library/app/blobs/{digest}")
    assert response.status == 200
    assert await response.read() == data
    info = mirror.tasks.info(digest)
    assert info is not None and info.complete
    assert origin.close_times == 0


async def test_failure_after_headers_gives_short_body(mirror: Mirror) -> None:
    origin = mirror.origin
    data = blob_data(4 * MIB, seed=10)
    digest = origin.add_blob(data)
    origin.corrupt = True  # flips the first byte: only the whole-blob sha256 can tell
    path = f"/v2/library/app/blobs/{digest}"
    response = await mirror.client.get(path)
    received = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async for chunk in response.content.iter_any():
            received += chunk
    assert len(received) < len(data)
    assert mirror.metrics.digest_mismatches._value.get() == 1
    info = mirror.tasks.info(digest)
    assert info is None or not info.complete
    origin.corrupt = False
    response = await mirror.client.get(path)
    assert await response.read() == data


async def test_wrong_bytes_small_blob(mirror: Mirror) -> None:
    origin = mirror.origin
    data = b"tiny blob"
    digest = origin.add_blob(data)
    origin.corrupt = True
    path = f"/v2/library/app/blobs/{digest}"
    try:
        response = await mirror.client.get(path)
        body = await response.read()
        assert response.status == 502 or len(body) < len(data)
    except aiohttp.ClientPayloadError:
        pass
    info = mirror.tasks.info(digest)
    assert info is None or not info.complete
    assert (await mirror.client.get("/v2/")).status == 200


async def test_upstream_down_is_502_fast(tmp_path: Path, origin: Origin) -> None:
    node = await start_mirror(tmp_path, origin, default_registry=f"http://127.0.0.1:{free_port()}")
    try:
        started = time.monotonic()
        for path in (f"/v2/a/blobs/sha256:{'d' * 64}", "/v2/a/manifests/latest"):
            response = await node.client.get(path)
            assert response.status == 502
            assert error_code(await response.read()) == "UNAVAILABLE"
        assert (await node.client.get("/v2/")).status == 200  # the mirror itself is up
        assert time.monotonic() - started < 1.0
    finally:
        await stop_mirror(node)


async def test_dragonfly_header_names_upstream(tmp_path: Path, origin: Origin) -> None:
    node = await start_mirror(tmp_path, origin, default_registry=f"http://127.0.0.1:{free_port()}")
    try:
        data = blob_data(MIB + 1, seed=11)
        digest = origin.add_blob(data)
        response = await node.client.get(
            f"/v2/library/app/blobs/{digest}",
            headers={"X-Dragonfly-Registry": str(origin.url), "Range": "bytes=100-199"},
        )
        assert response.status == 206
        assert await response.read() == data[100:200]
        # ns= also names it.
        response = await node.client.get(f"/v2/library/app/blobs/{digest}?ns={origin.host}")
        assert await response.read() == data
    finally:
        await stop_mirror(node)


@pytest.mark.parametrize("path_taken", ["thread_sendfile", "copy"])
def test_pull_on_uvloop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path_taken: str) -> None:
    """The node runs on uvloop, where `loop.sendfile` is not available: sendfile from a worker
    thread, or (TLS, no socket) pread + write."""
    import uvloop

    if path_taken == "copy":
        async def refuse(self: object, segment: object) -> int:
            raise proxy_module._NoSendfile

        monkeypatch.setattr(proxy_module._SegmentSender, "_thread_sendfile", refuse)

    async def scenario() -> None:
        origin = Origin()
        await origin.start()
        node = await start_mirror(tmp_path, origin)
        try:
            data = blob_data(3 * MIB + 11, seed=17)
            digest = origin.add_blob(data)
            path = f"/v2/library/app/blobs/{digest}"
            for _ in range(2):
                response = await node.client.get(path)
                assert await response.read() == data
            response = await node.client.get(path, headers={"Range": "bytes=-100"})
            assert await response.read() == data[-100:]
            await eventually(lambda: node.metrics.cache_bytes._value.get() == len(data) + 100)
            await client_goes_away(node, path)
        finally:
            await stop_mirror(node)
            await origin.close()

    uvloop.run(scenario())


async def client_goes_away(node: Mirror, path: str) -> None:
    """A client that reads a little of a big body and hangs up; the node keeps serving."""
    for _ in range(3):
        reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
        writer.write(get(path))
        await writer.drain()
        await reader.readexactly(1000)
        writer.transport.abort()
    response = await node.client.get("/v2/")
    assert response.status == 200


async def test_client_going_away(mirror: Mirror, caplog: pytest.LogCaptureFixture) -> None:
    data = blob_data(8 * MIB, seed=18)
    digest = mirror.origin.add_blob(data)
    path = f"/v2/library/app/blobs/{digest}"
    await client_goes_away(mirror, path)  # while downloading
    response = await mirror.client.get(path)
    assert await response.read() == data
    await client_goes_away(mirror, path)  # from the store
    # A client leaving is not an error of the node's: nothing logged as one.
    assert not [record for record in caplog.records if record.levelname == "ERROR"]


# -- manifests and tags ------------------------------------------------------------------------


async def test_manifests(mirror: Mirror) -> None:
    origin = mirror.origin
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}).encode()
    digest = sha256_digest(body)
    origin.manifests["v1"] = (body, OCI_MANIFEST)
    origin.manifests[digest] = (body, OCI_MANIFEST)
    response = await mirror.client.get(
        "/v2/library/app/manifests/v1", headers={"Accept": OCI_MANIFEST}
    )
    assert response.status == 200
    assert await response.read() == body
    assert response.headers["Content-Type"] == OCI_MANIFEST
    assert response.headers["Docker-Content-Digest"] == digest
    assert origin.seen[-1].headers["Accept"] == OCI_MANIFEST
    response = await mirror.client.head("/v2/library/app/manifests/v1")
    assert response.status == 200
    assert response.headers["Content-Length"] == str(len(body))
    # By digest: kept in the store, then answered from it.
    response = await mirror.client.get(f"/v2/library/app/manifests/{digest}")
    assert await response.read() == body
    info = mirror.tasks.info(digest)
    assert info is not None and info.complete
    seen = len(origin.seen)
    response = await mirror.client.get(f"/v2/library/app/manifests/{digest}")
    assert await response.read() == body
    assert response.headers["Content-Type"] == OCI_MANIFEST
    assert len(origin.seen) == seen
    response = await mirror.client.get("/v2/library/app/manifests/missing")
    assert response.status == 404
    await eventually(lambda: mirror.requests("manifest", 200) == 4)


async def test_stored_manifest_needs_upstream_consent(mirror: Mirror) -> None:
    origin = mirror.origin
    body = b'{"schemaVersion":2}'
    digest = sha256_digest(body)
    origin.manifests[digest] = (body, OCI_MANIFEST)
    origin.required_auth = SECRET
    response = await mirror.client.get(
        f"/v2/private/app/manifests/{digest}", headers={"Authorization": SECRET}
    )
    assert await response.read() == body
    response = await mirror.client.get(f"/v2/private/app/manifests/{digest}")
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == CHALLENGE


async def test_manifest_with_wrong_digest_is_not_kept(mirror: Mirror) -> None:
    body = b'{"schemaVersion":2}'
    digest = "sha256:" + "e" * 64
    mirror.origin.manifests[digest] = (body, OCI_MANIFEST)
    response = await mirror.client.get(f"/v2/library/app/manifests/{digest}")
    assert response.status == 200
    assert mirror.tasks.info(digest) is None


async def test_tags_list(mirror: Mirror) -> None:
    response = await mirror.client.get("/v2/library/app/tags/list?n=10")
    assert response.status == 200
    assert (await response.json())["tags"] == ["a", "b"]
    assert mirror.origin.seen[-1].path == "/v2/library/app/tags/list?n=10"


# -- the real registry -------------------------------------------------------------------------


REGISTRY_BINARY = "/usr/bin/docker-registry"


@pytest.fixture
async def real_registry(tmp_path: Path) -> AsyncIterator[str]:
    if not os.access(REGISTRY_BINARY, os.X_OK):
        pytest.skip("docker-registry is not installed")
    port = free_port()
    config = tmp_path / "registry.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {tmp_path / 'registry'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    process = await asyncio.create_subprocess_exec(
        REGISTRY_BINARY, "serve", str(config),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    address = f"127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                try:
                    async with session.get(f"http://{address}/v2/") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
            else:
                raise RuntimeError("docker-registry did not start")
        yield address
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 10)


async def push_blob(session: aiohttp.ClientSession, address: str, name: str, data: bytes) -> str:
    digest = sha256_digest(data)
    async with session.post(f"http://{address}/v2/{name}/blobs/uploads/") as response:
        assert response.status == 202
        location = response.headers["Location"]
    if location.startswith("/"):
        location = f"http://{address}{location}"
    separator = "&" if "?" in location else "?"
    async with session.put(
        f"{location}{separator}digest={digest}", data=data,
        headers={"Content-Type": "application/octet-stream"},
    ) as response:
        assert response.status == 201, await response.text()
    return digest


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("docker-registry") is None and not os.path.exists(
    REGISTRY_BINARY), reason="docker-registry is not installed")
async def test_real_registry(tmp_path: Path, origin: Origin, real_registry: str) -> None:
    name = "team/app"
    layer = blob_data(5 * MIB + 17, seed=12)
    config_blob = json.dumps({"architecture": "amd64", "os": "linux",
                              "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    async with aiohttp.ClientSession() as session:
        layer_digest = await push_blob(session, real_registry, name, layer)
        config_digest = await push_blob(session, real_registry, name, config_blob)
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config_digest, "size": len(config_blob)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": layer_digest, "size": len(layer)}],
        }).encode()
        async with session.put(
            f"http://{real_registry}/v2/{name}/manifests/v1", data=manifest,
            headers={"Content-Type": OCI_MANIFEST},
        ) as response:
            assert response.status == 201, await response.text()
    manifest_digest = sha256_digest(manifest)

    node = await start_mirror(tmp_path, origin, default_registry=f"http://127.0.0.1:{free_port()}")
    try:
        ns = f"?ns={real_registry}"
        client = node.client
        response = await client.get(f"/v2/{name}/manifests/v1{ns}",
                                    headers={"Accept": OCI_MANIFEST})
        assert response.status == 200
        assert await response.read() == manifest
        assert response.headers["Docker-Content-Digest"] == manifest_digest
        response = await client.get(f"/v2/{name}/manifests/{manifest_digest}{ns}",
                                    headers={"Accept": OCI_MANIFEST})
        assert await response.read() == manifest
        response = await client.head(f"/v2/{name}/blobs/{layer_digest}{ns}")
        assert response.status == 200
        assert response.headers["Content-Length"] == str(len(layer))
        response = await client.get(f"/v2/{name}/blobs/{layer_digest}{ns}",
                                    headers={"Range": "bytes=1000-1999"})
        assert response.status == 206
        assert await response.read() == layer[1000:2000]
        for _ in range(2):
            response = await client.get(f"/v2/{name}/blobs/{layer_digest}{ns}")
            assert response.status == 200
            assert await response.read() == layer
        response = await client.get(f"/v2/{name}/blobs/{config_digest}{ns}")
        assert await response.read() == config_blob
        response = await client.get(f"/v2/{name}/blobs/sha256:{'f' * 64}{ns}")
        assert response.status == 404
        assert error_code(await response.read()) == "BLOB_UNKNOWN"
        response = await client.get(f"/v2/other/blobs/{layer_digest}{ns}")
        assert response.status == 404  # not in that repository upstream: not served
        assert node.metrics.cache_bytes._value.get() == len(layer)
    finally:
        await stop_mirror(node)
