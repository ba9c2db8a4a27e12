"""Tests of `d7y_node.registry`: upstream naming, redirects, range reads and the access cache.

The origin is a small aiohttp test double (`Origin`) because the faults tested here (a body cut
off, ranges ignored, redirects to a second host) cannot be made to happen with the real registry;
`tests/test_proxy.py` reuses it and also runs against the real `docker-registry`.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from d7y_node.config import RegistryConfig
from d7y_node.errors import InvalidRequest, UpstreamStatus, UpstreamUnavailable
from d7y_node.metrics import Metrics
from d7y_node.registry import AccessCache, RegistryClient, Upstream

SECRET = "Bearer secret-token"
CHALLENGE = 'Bearer realm="http://127.0.0.1/token",service="test"'


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Seen:
    """One request the origin double received."""

    method: str
    host: str
    path: str
    headers: dict[str, str]


@dataclass
class Origin:
    """An origin registry double with switchable faults.

    Blobs and manifests are served under any repository name. A second server (`storage`)
    plays the signed-URL blob store that a registry redirects to.
    """

    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    # When set, requests without exactly this Authorization get 401 + WWW-Authenticate.
    required_auth: str | None = None
    ignore_range: bool = False
    # Send this many body bytes of a blob, then close the connection.
    close_after: int | None = None
    # How many responses are cut that way (None: all).
    close_times: int | None = None
    # Flip one byte of every blob body.
    corrupt: bool = False
    # Redirect blob GET/HEAD to the storage server.
    redirect: bool = False
    redirect_loop: bool = False
    # The signature the storage server accepts (change it to expire the URLs handed out).
    signature: str = "abc"
    # The storage server answers HEAD 403, as S3 does for a URL signed for GET.
    storage_refuses_head: bool = False
    # digest -> the repositories that hold it (others get 404); digests not listed are
    # in every repository.
    repositories: dict[str, set[str]] = field(default_factory=dict)
    # Send manifest bodies in several writes with pauses between them.
    trickle: bool = False
    # Delay before answering blob requests, in seconds.
    delay: float = 0.0
    seen: list[Seen] = field(default_factory=list)
    server: TestServer | None = None
    storage: TestServer | None = None

    @property
    def url(self) -> URL:
        assert self.server is not None
        return URL(f"http://127.0.0.1:{self.server.port}")

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.url.port}"

    def add_blob(self, data: bytes) -> str:
        digest = sha256_digest(data)
        self.blobs[digest] = data
        return digest

    def blob_requests(self, method: str = "GET", host: str | None = None) -> list[Seen]:
        return [
            s for s in self.seen
            if s.method == method and "/blobs/" in s.path and (host is None or s.host == host)
        ]

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._handle)
        storage = web.Application()
        storage.router.add_route("*", "/{path:.*}", self._storage)
        self.server = TestServer(app, host="127.0.0.1")
        # Another address on loopback: a different host for the Authorization rule.
        self.storage = TestServer(storage, host="127.0.0.2")
        await self.server.start_server()
        await self.storage.start_server()

    async def close(self) -> None:
        for server in (self.server, self.storage):
            if server is not None:
                await server.close()

    def _record(self, request: web.Request) -> None:
        self.seen.append(Seen(request.method, request.host, request.path_qs,
                              dict(request.headers)))

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        path = request.path
        if self.required_auth is not None and (
            request.headers.get("Authorization") != self.required_auth
        ):
            return web.Response(
                status=401, body=b'{"errors":[{"code":"UNAUTHORIZED"}]}',
                headers={"WWW-Authenticate": CHALLENGE, "Content-Type": "application/json"},
            )
        if "/manifests/" in path:
            reference = path.rsplit("/", 1)[1]
            if reference not in self.manifests:
                return web.Response(status=404, body=b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}')
            body, media_type = self.manifests[reference]
            headers = {"Content-Type": media_type, "Docker-Content-Digest": sha256_digest(body)}
            response = web.StreamResponse(headers=headers)
            response.content_length = len(body)
            await response.prepare(request)
            if request.method == "HEAD":
                return response
            step = max(1, len(body) // 3) if self.trickle else len(body) or 1
            for start in range(0, len(body), step):
                await response.write(body[start:start + step])
                if self.trickle:
                    await asyncio.sleep(0.02)
            await response.write_eof()
            return response
        if "/tags/list" in path:
            return web.json_response({"name": "x", "tags": ["a", "b"]})
        if "/blobs/" in path:
            digest = path.rsplit("/", 1)[1]
            repository = path.removeprefix("/v2/").rsplit("/blobs/", 1)[0]
            held_in = self.repositories.get(digest)
            if digest not in self.blobs or (held_in is not None and repository not in held_in):
                return web.Response(status=404, body=b'{"errors":[{"code":"BLOB_UNKNOWN"}]}')
            if self.redirect_loop:
                raise web.HTTPTemporaryRedirect(path)
            if self.redirect:
                assert self.storage is not None
                target = (
                    f"http://127.0.0.2:{self.storage.port}/store/{digest}"
                    f"?signature={self.signature}"
                )
                raise web.HTTPTemporaryRedirect(target)
            return await self._serve_blob(request, digest)
        return web.Response(status=404)

    async def _storage(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        if request.query.get("signature") != self.signature or (
            self.storage_refuses_head and request.method == "HEAD"
        ):
            return web.Response(status=403)
        return await self._serve_blob(request, request.path.rsplit("/", 1)[1])

    async def _serve_blob(self, request: web.Request, digest: str) -> web.StreamResponse:
        if self.delay:
            await asyncio.sleep(self.delay)
        data = self.blobs[digest]
        if self.corrupt and data:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        status, start, end = 200, 0, len(data)
        range_header = request.headers.get("Range")
        headers = {"Content-Type": "application/octet-stream", "Docker-Content-Digest": digest}
        if range_header and not self.ignore_range:
            first, last = range_header.removeprefix("bytes=").split("-")
            start, end = int(first), min(int(last) + 1, len(data))
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = end - start
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        body = data[start:end]
        if self.close_after is not None and self.close_times != 0:
            if self.close_times is not None:
                self.close_times -= 1
            await response.write(body[: self.close_after])
            await asyncio.sleep(0.05)
            assert request.transport is not None
            request.transport.close()
            return response
        await response.write(body)
        await response.write_eof()
        return response


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    double = Origin()
    await double.start()
    yield double
    await double.close()


@pytest.fixture
async def client(origin: Origin) -> AsyncIterator[RegistryClient]:
    config = RegistryConfig(default_registry=str(origin.url), connect_timeout=2.0,
                            request_timeout=5.0)
    registry = RegistryClient(config, Metrics())
    yield registry
    await registry.close()


async def collect(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in chunks])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- upstream naming ---------------------------------------------------------------------------


def test_upstream_naming() -> None:
    registry = RegistryClient(
        RegistryConfig(insecure_registries=("registry.lan:5000",)), Metrics()
    )
    assert registry.upstream(None, None) == Upstream("https", "registry-1.docker.io")
    assert registry.upstream(None, "docker.io") == Upstream("https", "registry-1.docker.io")
    assert registry.upstream(None, "index.docker.io") == Upstream("https", "registry-1.docker.io")
    assert registry.upstream(None, "ghcr.io") == Upstream("https", "ghcr.io")
    assert registry.upstream(None, "localhost:5000") == Upstream("http", "localhost:5000")
    assert registry.upstream(None, "127.0.0.1:5000") == Upstream("http", "127.0.0.1:5000")
    assert registry.upstream(None, "registry.lan:5000") == Upstream("http", "registry.lan:5000")
    assert registry.upstream(None, "registry.lan") == Upstream("https", "registry.lan")
    # The header wins over ns=, and its scheme is taken as written.
    assert registry.upstream("https://index.docker.io", "ghcr.io") == Upstream(
        "https", "registry-1.docker.io"
    )
    assert registry.upstream("http://10.0.0.1:5000/", None) == Upstream("http", "10.0.0.1:5000")
    assert registry.upstream("https://quay.io/v2/", None) == Upstream("https", "quay.io")


@pytest.mark.parametrize("header", [
    "https://user:pw@registry.example",
    "https://registry.example/../admin",
    "https://registry.example/other",
    "https://registry.example?x=1",
    "https://registry.example#frag",
    "ftp://registry.example",
    "file:///etc/passwd",
    "https://registry.example:99999",
    "https://regi stry.example",
    "https://",
])
def test_upstream_header_refuses_tricks(header: str) -> None:
    registry = RegistryClient(RegistryConfig(), Metrics())
    with pytest.raises(InvalidRequest):
        registry.upstream(header, None)


@pytest.mark.parametrize("ns", ["a/b", "host:port", "-bad.example", "x" * 300, "a@b"])
def test_upstream_namespace_refuses_tricks(ns: str) -> None:
    registry = RegistryClient(RegistryConfig(), Metrics())
    with pytest.raises(InvalidRequest):
        registry.upstream(None, ns)


# -- blob reads --------------------------------------------------------------------------------


async def test_range_read_and_length(origin: Origin, client: RegistryClient) -> None:
    data = bytes(range(256)) * 4096
    digest = origin.add_blob(data)
    source = client.blob_source(client.default_upstream, "library/x", digest, None)
    assert await source.content_length() == len(data)
    assert await collect(source.read(1000, 50_000)) == data[1000:51_000]
    assert await collect(source.read(0, len(data))) == data
    ranges = [s.headers.get("Range") for s in origin.blob_requests()]
    assert ranges == ["bytes=1000-50999", f"bytes=0-{len(data) - 1}"]
    assert client.metrics.origin_bytes._value.get() == 50_000 + len(data)


async def test_origin_ignoring_range_is_skipped_to_offset(
    origin: Origin, client: RegistryClient
) -> None:
    data = bytes(range(256)) * 8192
    digest = origin.add_blob(data)
    origin.ignore_range = True
    source = client.blob_source(client.default_upstream, "library/x", digest, None)
    assert await collect(source.read(1_500_000, 300_000)) == data[1_500_000:1_800_000]
    # Read to the end too: the last bytes of a 200 body.
    assert await collect(source.read(len(data) - 10, 10)) == data[-10:]


async def test_redirect_to_other_host_drops_authorization(
    origin: Origin, client: RegistryClient
) -> None:
    data = b"layer bytes" * 1000
    digest = origin.add_blob(data)
    origin.redirect = True
    origin.required_auth = SECRET
    source = client.blob_source(client.default_upstream, "private/x", digest, SECRET)
    assert await source.content_length() == len(data)
    assert await collect(source.read(5, 100)) == data[5:105]
    at_registry = [s for s in origin.seen if s.host == origin.host]
    at_storage = [s for s in origin.seen if s.host != origin.host]
    assert len(at_registry) == 2 and len(at_storage) == 2
    assert all(s.headers.get("Authorization") == SECRET for s in at_registry)
    assert all("Authorization" not in s.headers for s in at_storage)
    assert at_storage[1].headers["Range"] == "bytes=5-104"


async def test_storage_url_is_reused_until_it_expires(
    origin: Origin, client: RegistryClient
) -> None:
    data = bytes(range(256)) * 400
    digest = origin.add_blob(data)
    origin.redirect = True
    origin.required_auth = SECRET
    source = client.blob_source(client.default_upstream, "private/x", digest, SECRET,
                                content_length=len(data))
    for offset in (0, 1000, 2000):
        assert await collect(source.read(offset, 1000)) == data[offset:offset + 1000]
    assert len(origin.blob_requests("GET", host=origin.host)) == 1
    origin.signature = "renewed"  # the URL handed out before no longer works
    assert await collect(source.read(5000, 10)) == data[5000:5010]
    assert len(origin.blob_requests("GET", host=origin.host)) == 2
    at_storage = [s for s in origin.seen if s.host != origin.host]
    assert len(at_storage) == 5
    assert all("Authorization" not in s.headers for s in at_storage)


async def test_length_when_storage_refuses_head(origin: Origin, client: RegistryClient) -> None:
    data = b"z" * 12345
    digest = origin.add_blob(data)
    origin.redirect = True
    origin.storage_refuses_head = True
    origin.required_auth = SECRET
    assert await client.blob_length(client.default_upstream, "a/b", digest, SECRET) == len(data)
    at_storage = [s for s in origin.seen if s.host != origin.host]
    assert [(s.method, s.headers.get("Range")) for s in at_storage] == [
        ("HEAD", None), ("GET", "bytes=0-0")
    ]
    assert all("Authorization" not in s.headers for s in at_storage)
    # A refusal at the registry itself is not mistaken for that.
    with pytest.raises(UpstreamStatus) as caught:
        await client.blob_length(client.default_upstream, "a/b", digest, "Bearer wrong")
    assert caught.value.status == 401


async def test_redirect_loop_is_bounded(origin: Origin, client: RegistryClient) -> None:
    digest = origin.add_blob(b"x")
    origin.redirect_loop = True
    source = client.blob_source(client.default_upstream, "library/x", digest, None)
    with pytest.raises(UpstreamUnavailable, match="redirects"):
        await collect(source.read(0, 1))
    assert len(origin.blob_requests()) == 6


async def test_unauthorized_keeps_challenge(origin: Origin, client: RegistryClient) -> None:
    digest = origin.add_blob(b"private")
    origin.required_auth = SECRET
    source = client.blob_source(client.default_upstream, "private/x", digest, "Bearer wrong")
    with pytest.raises(UpstreamStatus) as caught:
        await collect(source.read(0, 7))
    assert caught.value.status == 401
    assert caught.value.headers["WWW-Authenticate"] == CHALLENGE
    assert b"UNAUTHORIZED" in caught.value.body
    with pytest.raises(UpstreamStatus) as caught:
        await source.content_length()
    assert caught.value.status == 401
    assert caught.value.headers["WWW-Authenticate"] == CHALLENGE


async def test_body_cut_off_is_unavailable(origin: Origin, client: RegistryClient) -> None:
    data = b"y" * 200_000
    digest = origin.add_blob(data)
    origin.close_after = 1000
    source = client.blob_source(client.default_upstream, "library/x", digest, None)
    with pytest.raises(UpstreamUnavailable):
        await collect(source.read(0, len(data)))
    # The pool is not poisoned: the next read works.
    origin.close_after = None
    assert await collect(source.read(0, len(data))) == data


async def test_missing_blob_is_404(origin: Origin, client: RegistryClient) -> None:
    source = client.blob_source(client.default_upstream, "library/x", "sha256:" + "0" * 64, None)
    with pytest.raises(UpstreamStatus) as caught:
        await source.content_length()
    assert caught.value.status == 404


async def test_upstream_down_fails_fast() -> None:
    port = free_port()
    registry = RegistryClient(
        RegistryConfig(default_registry=f"http://127.0.0.1:{port}", connect_timeout=1.0),
        Metrics(),
    )
    try:
        source = registry.blob_source(registry.default_upstream, "a", "sha256:" + "1" * 64, None)
        started = time.monotonic()
        with pytest.raises(UpstreamUnavailable):
            await source.content_length()
        assert time.monotonic() - started < 1.0
        assert registry.metrics.upstream_errors.labels(kind="connect")._value.get() == 1
    finally:
        await registry.close()


async def test_fetch_bounds_body(origin: Origin, client: RegistryClient) -> None:
    body = b"{" + b" " * 5000 + b"}"
    origin.manifests["v1"] = (body, "application/vnd.oci.image.manifest.v1+json")
    url = client.manifest_url(client.default_upstream, "library/x", "v1")
    answer = await client.fetch("GET", url, {}, max_bytes=10_000)
    assert answer.body == body
    origin.trickle = True  # arriving in pieces is not "too long"
    answer = await client.fetch("GET", url, {}, max_bytes=len(body))
    assert answer.body == body
    assert answer.headers["Content-Type"] == "application/vnd.oci.image.manifest.v1+json"
    with pytest.raises(UpstreamUnavailable, match="more than"):
        await client.fetch("GET", url, {}, max_bytes=1000)


# -- access cache ------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_access_cache_dedupes_and_expires() -> None:
    clock = FakeClock()
    cache = AccessCache(ttl=60.0, clock=clock)
    upstream = Upstream("https", "registry.example")
    probes = 0
    release = asyncio.Event()

    async def probe() -> int | None:
        nonlocal probes
        probes += 1
        await release.wait()
        return 42

    waiting = [
        asyncio.ensure_future(cache.check(upstream, "a/b", SECRET, "sha256:x", probe))
        for _ in range(100)
    ]
    await asyncio.sleep(0)
    release.set()
    assert await asyncio.gather(*waiting) == [42] * 100
    assert probes == 1
    # Within the TTL the cache answers (None: nothing probed).
    assert await cache.check(upstream, "a/b", SECRET, "sha256:y", probe) is None
    assert probes == 1
    # Another credential, repository or upstream is a different key.
    assert await cache.check(upstream, "a/b", "Bearer other", "sha256:x", probe) == 42
    assert await cache.check(upstream, "a/c", SECRET, "sha256:x", probe) == 42
    assert probes == 3
    clock.now += 61
    assert not cache.granted(upstream, "a/b", SECRET)
    assert await cache.check(upstream, "a/b", SECRET, "sha256:x", probe) == 42
    assert probes == 4


async def test_access_cache_keeps_no_refusal() -> None:
    cache = AccessCache(ttl=60.0)
    upstream = Upstream("https", "registry.example")
    calls = 0

    async def refuse() -> int | None:
        nonlocal calls
        calls += 1
        raise UpstreamStatus(401, {"WWW-Authenticate": CHALLENGE}, b"")

    for _ in range(2):
        with pytest.raises(UpstreamStatus):
            await cache.check(upstream, "a/b", None, "sha256:x", refuse)
    assert calls == 2
    assert not cache.granted(upstream, "a/b", None)
