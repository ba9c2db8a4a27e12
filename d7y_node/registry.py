"""The client side of origin registries.

Owns everything the node says to an upstream registry over HTTP: which upstream a request names
(`Upstream`, `RegistryClient.upstream`), the one pooled `aiohttp.ClientSession`, redirects
followed by hand so a client's `Authorization` never reaches another host (signed storage URLs),
manifest and blob requests, the origin blob `PieceSource` (`OriginBlob`) that `tasks.py` pulls
pieces from, and the per-credential authorization cache (`AccessCache`) that decides whether a
client may read content the node already holds.

Does not speak the mirror's HTTP API (that is `proxy.py`), does not store anything (that is
`tasks.py`), and does not run token flows itself: the client's own `Authorization` goes upstream
and an upstream 401 goes back to the client unchanged.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from d7y_node import __version__
from d7y_node.config import RegistryConfig, is_plain_http
from d7y_node.errors import InvalidRequest, UpstreamStatus, UpstreamUnavailable
from d7y_node.metrics import Metrics

log = logging.getLogger(__name__)

USER_AGENT = f"d7y-node/{__version__}"

# Docker Hub's names for itself that all mean its API host (as containerd and docker map them).
DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
DOCKER_HUB_API_HOST = "registry-1.docker.io"

# Registries redirect a blob once (to storage), sometimes twice (storage → CDN edge); more than
# this is a loop or abuse.
MAX_REDIRECTS = 5
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})

# The client's socket read buffer (aiohttp pauses the socket when it holds twice this); the
# default 64 KiB makes a loopback transfer stop and start thousands of times per GiB.
READ_BUFFER_BYTES = 4 << 20

# What a storage service answers a HEAD on a URL signed for GET only.
SIGNED_URL_REFUSALS = frozenset({400, 403, 405})

# Upstream error bodies (401 challenges, 404 JSON) are small; more than this is not an error
# body worth keeping.
MAX_ERROR_BODY_BYTES = 64 * 1024

# An idempotent request is sent once more when a pooled connection turns out dead before any
# response byte arrived (the server closed a keep-alive connection as we reused it).
CONNECTION_RETRIES = 1

# Concurrent connections to all upstreams, and to one upstream host: a mirror fans many clients
# into few origins; this keeps us from looking like a flood to a registry's CDN.
CONNECTION_LIMIT = 256
CONNECTION_LIMIT_PER_HOST = 64

# Authorization cache entries kept at most; the oldest are dropped beyond this.
MAX_ACCESS_ENTRIES = 10_000

# Headers that describe one hop of a connection, never the content (RFC 9110 §7.6.1).
HOP_BY_HOP_HEADERS = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "content-length",
})

_HOST_PORT = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?)(:\d{1,5})?")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


@dataclass(frozen=True)
class Upstream:
    """An origin registry: how to reach it (`scheme`) and its `host[:port]` (lower case)."""

    scheme: str
    host: str

    @property
    def base_url(self) -> URL:
        return URL.build(scheme=self.scheme, authority=self.host, encoded=True)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}"


@dataclass(frozen=True)
class UpstreamResponse:
    """A successful upstream answer, body read completely (manifests, tag lists, HEADs)."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes


def _check_host(host: str, what: str) -> str:
    name = host.strip().lower()
    if not _HOST_PORT.fullmatch(name):
        raise InvalidRequest("UNSUPPORTED", f"{what}: {host!r} is not a registry HOST[:PORT]")
    port = name.rsplit(":", 1)[1] if ":" in name and not name.endswith("]") else None
    if port is not None and not 0 < int(port) < 65536:
        raise InvalidRequest("UNSUPPORTED", f"{what}: port {port} is out of range")
    hostname = name.rsplit(":", 1)[0] if port is not None else name
    if hostname in DOCKER_HUB_ALIASES:
        return DOCKER_HUB_API_HOST
    return name


def parse_upstream_url(text: str, insecure: tuple[str, ...], what: str) -> Upstream:
    """An upstream from `https://host[:port]` (or a bare `host[:port]`, whose scheme follows
    containerd's rule). Userinfo, paths other than `/` or `/v2`, queries and fragments are
    refused: the request path comes only from the validated repository name."""
    value = text.strip()
    if "://" not in value:
        host = _check_host(value, what)
        return Upstream("http" if is_plain_http(host, insecure) else "https", host)
    parts = urlsplit(value)
    if parts.scheme.lower() not in ("http", "https"):
        raise InvalidRequest("UNSUPPORTED", f"{what}: scheme must be http or https")
    if "@" in parts.netloc or parts.query or parts.fragment or "?" in value or "#" in value:
        raise InvalidRequest("UNSUPPORTED", f"{what}: only scheme://host[:port] is allowed")
    if parts.path.rstrip("/") not in ("", "/v2"):
        raise InvalidRequest("UNSUPPORTED", f"{what}: only scheme://host[:port] is allowed")
    return Upstream(parts.scheme.lower(), _check_host(parts.netloc, what))


def authorization_key(authorization: str | None) -> str:
    """A short fingerprint of a credential, so caches never hold the secret itself."""
    return hashlib.sha256((authorization or "").encode()).hexdigest()[:32]


def forwardable_headers(headers: Mapping[str, str]) -> CIMultiDict[str]:
    """Upstream response headers a client may see as they are (hop-by-hop ones dropped)."""
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in HOP_BY_HOP_HEADERS:
            out.add(name, value)
    return out


async def _read_body(response: aiohttp.ClientResponse, max_bytes: int) -> bytes | None:
    """The whole body, or None as soon as it grows past `max_bytes`."""
    chunks = []
    size = 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > max_bytes:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


class RegistryClient:
    """Talks to origin registries for the whole node over one pooled session."""

    def __init__(self, config: RegistryConfig, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.default_upstream = parse_upstream_url(
            config.default_registry, config.insecure_registries, "registry_mirror"
        )
        self.access = AccessCache(config.auth_cache_ttl)
        self._session: aiohttp.ClientSession | None = None

    # -- upstream naming ------------------------------------------------------------------

    def upstream(self, registry_header: str | None, namespace: str | None) -> Upstream:
        """The upstream a request names: the `X-Dragonfly-Registry` header, else containerd's
        `ns=` parameter, else the configured default. Raises `InvalidRequest` if malformed."""
        insecure = self.config.insecure_registries
        if registry_header:
            return parse_upstream_url(registry_header, insecure, "X-Dragonfly-Registry")
        if namespace:
            host = _check_host(namespace, "ns")
            return Upstream("http" if is_plain_http(host, insecure) else "https", host)
        return self.default_upstream

    # -- session --------------------------------------------------------------------------

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=CONNECTION_LIMIT, limit_per_host=CONNECTION_LIMIT_PER_HOST
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                # Bytes are content-addressed: never let aiohttp decompress them.
                auto_decompress=False,
                read_bufsize=READ_BUFFER_BYTES,
                # Accept-Encoding: identity, so no CDN compresses a blob on the fly.
                headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
                trust_env=False,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _timeout(self, *, whole: bool) -> aiohttp.ClientTimeout:
        # Metadata requests get an overall deadline; blob bodies only a stall deadline.
        return aiohttp.ClientTimeout(
            total=self.config.request_timeout if whole else None,
            connect=self.config.connect_timeout,
            sock_connect=self.config.connect_timeout,
            sock_read=self.config.request_timeout,
        )

    # -- requests -------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        url: URL,
        headers: Mapping[str, str],
        *,
        whole: bool = True,
    ) -> aiohttp.ClientResponse:
        """Send an idempotent `method` to `url`, following redirects by hand.

        `Authorization` goes only to the host of `url`; once a redirect leaves that host it is
        dropped for the rest of the chain. Returns the final response, open, with any status
        (the caller reads and releases it). Raises `UpstreamUnavailable` on connection trouble.
        """
        session = self._client()
        origin = (url.scheme, url.host, url.port)
        send = CIMultiDict(headers)
        limits = self._timeout(whole=whole)
        for _hop in range(MAX_REDIRECTS + 1):
            response = await self._send(session, method, url, send, limits)
            if response.status not in REDIRECT_STATUSES:
                return response
            location = response.headers.get("Location")
            response.release()
            if not location:
                self.metrics.upstream_errors.labels(kind="redirect").inc()
                raise UpstreamUnavailable(f"{url.host} redirected without a Location")
            try:
                target = url.join(URL(location))
            except ValueError:
                self.metrics.upstream_errors.labels(kind="redirect").inc()
                raise UpstreamUnavailable(f"{url.host} redirected to a bad Location") from None
            if target.scheme not in ("http", "https") or not target.host:
                self.metrics.upstream_errors.labels(kind="redirect").inc()
                raise UpstreamUnavailable(f"{url.host} redirected to a non-HTTP location")
            if (target.scheme, target.host, target.port) != origin:
                send.popall("Authorization", None)
            url = target
        self.metrics.upstream_errors.labels(kind="redirect").inc()
        raise UpstreamUnavailable(f"more than {MAX_REDIRECTS} redirects from {url.host}")

    async def _send(
        self,
        session: aiohttp.ClientSession,
        method: str,
        url: URL,
        headers: CIMultiDict[str],
        limits: aiohttp.ClientTimeout,
    ) -> aiohttp.ClientResponse:
        for attempt in range(CONNECTION_RETRIES + 1):
            try:
                return await session.request(
                    method, url, headers=headers, allow_redirects=False, timeout=limits
                )
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as err:
                # A stale pooled connection fails like this before any byte came back; an
                # idempotent request may go again, once.
                if attempt < CONNECTION_RETRIES and not isinstance(
                    err, aiohttp.ClientConnectorError
                ):
                    continue
                self.metrics.upstream_errors.labels(kind="connect").inc()
                raise UpstreamUnavailable(f"{url.host}: {err}") from err
            except (aiohttp.ClientError, TimeoutError, ValueError) as err:
                kind = "timeout" if isinstance(err, TimeoutError) else "connect"
                self.metrics.upstream_errors.labels(kind=kind).inc()
                raise UpstreamUnavailable(f"{url.host}: {err or type(err).__name__}") from err
        raise AssertionError("unreachable")

    async def status_error(self, response: aiohttp.ClientResponse) -> UpstreamStatus:
        """The `UpstreamStatus` for a non-2xx answer (headers and a bounded body kept)."""
        body = b""
        try:
            body = await _read_body(response, MAX_ERROR_BODY_BYTES) or b""
        except (aiohttp.ClientError, TimeoutError):
            pass
        finally:
            response.close()
        self.metrics.upstream_errors.labels(kind=f"status_{response.status}").inc()
        return UpstreamStatus(response.status, forwardable_headers(response.headers), body)

    async def fetch(
        self,
        method: str,
        url: URL,
        headers: Mapping[str, str],
        *,
        max_bytes: int,
    ) -> UpstreamResponse:
        """A small document (manifest, tag list) or a HEAD, read whole.

        Raises `UpstreamStatus` for non-2xx, `UpstreamUnavailable` on connection trouble or a
        body longer than `max_bytes`.
        """
        response = await self.request(method, url, headers)
        try:
            if not 200 <= response.status < 300:
                raise await self.status_error(response)
            body: bytes | None = b""
            if method != "HEAD":
                if (response.content_length or 0) > max_bytes:
                    raise UpstreamUnavailable(f"{url.host} sent more than {max_bytes} bytes")
                body = await _read_body(response, max_bytes)
            if body is None:
                raise UpstreamUnavailable(f"{url.host} sent more than {max_bytes} bytes")
            return UpstreamResponse(response.status, response.headers, body)
        except (aiohttp.ClientError, TimeoutError) as err:
            self.metrics.upstream_errors.labels(kind="body").inc()
            raise UpstreamUnavailable(f"{url.host}: {err or type(err).__name__}") from err
        finally:
            response.release()

    async def refusal(self, url: URL, headers: Mapping[str, str]) -> UpstreamStatus | None:
        """Upstream's full refusal (headers and body) of a GET of `url`, or None if it does
        not refuse. Used after a bodyless HEAD refusal so a client sees the real answer."""
        response = await self.request("GET", url, headers)
        if 200 <= response.status < 300:
            response.close()
            return None
        return await self.status_error(response)

    # -- blobs ----------------------------------------------------------------------------

    @staticmethod
    def blob_url(upstream: Upstream, repository: str, digest: str) -> URL:
        """`repository` and `digest` must already be validated (proxy.py does)."""
        return upstream.base_url.with_path(f"/v2/{repository}/blobs/{digest}", encoded=True)

    @staticmethod
    def tags_url(upstream: Upstream, repository: str) -> URL:
        return upstream.base_url.with_path(f"/v2/{repository}/tags/list", encoded=True)

    @staticmethod
    def manifest_url(upstream: Upstream, repository: str, reference: str) -> URL:
        return upstream.base_url.with_path(f"/v2/{repository}/manifests/{reference}", encoded=True)

    async def blob_length(
        self, upstream: Upstream, repository: str, digest: str, authorization: str | None
    ) -> int:
        """The blob's length from an upstream HEAD (redirects followed).

        Storage URLs signed for GET only (S3, GCS) refuse a HEAD that was redirected to them;
        then the length comes from a one-byte range GET instead.
        """
        headers = {"Authorization": authorization} if authorization else {}
        url = self.blob_url(upstream, repository, digest)
        response = await self.request("HEAD", url, headers)
        try:
            if response.status in SIGNED_URL_REFUSALS and response.url.host != url.host:
                response.close()
                return await self._length_by_range(upstream, url, headers, digest)
            if not 200 <= response.status < 300:
                raise await self.status_error(response)
            length = response.headers.get("Content-Length")
        finally:
            response.release()
        if length is None or not length.isdigit():
            self.metrics.upstream_errors.labels(kind="no_length").inc()
            raise UpstreamUnavailable(f"{upstream.host} did not say how long {digest} is")
        return int(length)

    async def _length_by_range(
        self, upstream: Upstream, url: URL, headers: Mapping[str, str], digest: str
    ) -> int:
        response = await self.request("GET", url, {**headers, "Range": "bytes=0-0"}, whole=True)
        try:
            if response.status == 206:
                match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
                if match is not None and match.group(3).isdigit():
                    return int(match.group(3))
            elif response.status == 200 and response.content_length is not None:
                return response.content_length
            elif response.status == 416:
                return 0  # nothing to range over: an empty blob
            else:
                raise await self.status_error(response)
        finally:
            response.close()  # the body is not wanted
        self.metrics.upstream_errors.labels(kind="no_length").inc()
        raise UpstreamUnavailable(f"{upstream.host} did not say how long {digest} is")

    def blob_source(
        self,
        upstream: Upstream,
        repository: str,
        digest: str,
        authorization: str | None,
        *,
        content_length: int | None = None,
        authorize: Authorize | None = None,
    ) -> OriginBlob:
        return OriginBlob(
            self, upstream, repository, digest, authorization, content_length, authorize
        )


# The node's own credentials for one repository (`registry_auth.RegistryLogin`): the
# `Authorization` to send, asked again (`renew=True`) when the registry refused the last one.
Authorize = Callable[[bool], Awaitable[str | None]]


class OriginBlob:
    """A `PieceSource` reading one blob from its origin registry with range GETs.

    Remembers where the registry redirected the first request (a signed storage URL) and
    sends later ranges there directly, going back to the registry if that URL stops working.
    With `authorize` (the node's own credentials, not a client's), it gets its `Authorization`
    before the first request and again, once per request, when the registry answers 401 (a
    token expired).
    """

    def __init__(
        self,
        client: RegistryClient,
        upstream: Upstream,
        repository: str,
        digest: str,
        authorization: str | None,
        content_length: int | None,
        authorize: Authorize | None = None,
    ) -> None:
        self.client = client
        self.upstream = upstream
        self.repository = repository
        self.digest = digest
        self.url = RegistryClient.blob_url(upstream, repository, digest)
        self._authorization = authorization
        self._authorize = authorize
        self._authorized = authorize is None
        self._content_length = content_length
        # Where the registry last redirected a range GET (a signed storage URL), if elsewhere.
        self._location: URL | None = None

    def _headers(self) -> dict[str, str]:
        return {"Authorization": self._authorization} if self._authorization else {}

    async def authorize(self, *, renew: bool = False) -> bool:
        """Get the `Authorization` from `authorize` (first use, or `renew` after a 401);
        returns whether there is a hook to ask."""
        if self._authorize is None:
            return False
        if renew or not self._authorized:
            self._authorization = await self._authorize(renew)
            self._authorized = True
        return True

    async def content_length(self) -> int:
        if self._content_length is None:
            await self.authorize()
            try:
                self._content_length = await self.client.blob_length(
                    self.upstream, self.repository, self.digest, self._authorization
                )
            except UpstreamStatus as err:
                if err.status != 401 or not await self.authorize(renew=True):
                    raise
                self._content_length = await self.client.blob_length(
                    self.upstream, self.repository, self.digest, self._authorization
                )
        return self._content_length

    async def read(self, offset: int, length: int) -> AsyncIterator[bytes]:
        """Yield exactly `length` bytes from `offset`. An origin that ignores `Range` (200)
        is read from the start and the bytes before `offset` are skipped."""
        if length <= 0:
            return
        metrics = self.client.metrics
        response = await self._get_range(offset, length)
        try:
            if response.status == 206:
                skip = self._range_skip(response, offset)
            elif response.status == 200:
                skip = offset
            else:
                raise await self.client.status_error(response)
            remaining = length
            content = response.content
            while remaining:
                # The chunks as the socket delivered them: no joining or re-slicing copies
                # (iter_chunked's fixed sizes cost half the throughput on uvloop).
                chunk, end_of_http_chunk = await content.readchunk()
                if not chunk:
                    if end_of_http_chunk:
                        continue
                    break
                metrics.origin_bytes.inc(len(chunk))
                if skip:
                    if len(chunk) <= skip:
                        skip -= len(chunk)
                        continue
                    chunk = chunk[skip:]
                    skip = 0
                if len(chunk) >= remaining:
                    yield chunk[:remaining] if len(chunk) > remaining else chunk
                    remaining = 0
                    break
                remaining -= len(chunk)
                yield chunk
            if remaining:
                metrics.upstream_errors.labels(kind="short_body").inc()
                raise UpstreamUnavailable(
                    f"{self.upstream.host} ended {self.digest} {remaining} bytes short"
                )
        except (aiohttp.ClientError, TimeoutError) as err:
            metrics.upstream_errors.labels(kind="body").inc()
            raise UpstreamUnavailable(
                f"{self.upstream.host}: reading {self.digest}: {err or type(err).__name__}"
            ) from err
        finally:
            # Close rather than release: a body we stopped reading cannot be reused.
            if response.content.at_eof():
                response.release()
            else:
                response.close()

    async def _get_range(self, offset: int, length: int) -> aiohttp.ClientResponse:
        """The response to a range GET: at the remembered storage URL if there is one (no
        `Authorization`: it is another host), else at the registry, following its redirects."""
        byte_range = f"bytes={offset}-{offset + length - 1}"
        location = self._location
        if location is not None:
            response = await self.client.request(
                "GET", location, {"Range": byte_range}, whole=False
            )
            if response.status in (200, 206):
                return response
            # Expired or refused: forget it and ask the registry again.
            response.close()
            self._location = None
        await self.authorize()
        headers = self._headers()
        headers["Range"] = byte_range
        response = await self.client.request("GET", self.url, headers, whole=False)
        if response.status == 401 and self._authorize is not None:
            response.close()
            await self.authorize(renew=True)
            headers = {**self._headers(), "Range": byte_range}
            response = await self.client.request("GET", self.url, headers, whole=False)
        final = response.url
        if response.status in (200, 206) and (final.scheme, final.host, final.port) != (
            self.url.scheme, self.url.host, self.url.port
        ):
            self._location = final
        return response

    def _range_skip(self, response: aiohttp.ClientResponse, offset: int) -> int:
        match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
        if match is None or int(match.group(1)) > offset:
            response.close()
            self.client.metrics.upstream_errors.labels(kind="bad_range").inc()
            raise UpstreamUnavailable(
                f"{self.upstream.host} answered a range of {self.digest} it was not asked for"
            )
        return offset - int(match.group(1))


def _consume_outcome(future: asyncio.Future[int | None]) -> None:
    if not future.cancelled():
        future.exception()


@dataclass
class _Grant:
    expires: float


class AccessCache:
    """Remembers which credentials upstream accepted, for `ttl` seconds.

    A grant is for (upstream, repository, fingerprint of the Authorization header), and also
    for that key plus the subject probed (a digest). Callers that need upstream's word on one
    particular digest (content first stored from another repository) ask `per_subject`.
    Concurrent checks of one key and subject share one upstream request. Only successes are
    remembered: a refusal goes back to the client, which will come again with new credentials.
    """

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.clock = clock
        self._grants: dict[tuple[str, ...], _Grant] = {}
        self._pending: dict[tuple[str, ...], asyncio.Future[int | None]] = {}

    @staticmethod
    def _key(upstream: Upstream, repository: str, authorization: str | None) -> tuple[str, ...]:
        return (str(upstream), repository, authorization_key(authorization))

    def _granted(self, key: tuple[str, ...]) -> bool:
        grant = self._grants.get(key)
        if grant is None:
            return False
        if grant.expires <= self.clock():
            del self._grants[key]
            return False
        return True

    def granted(
        self,
        upstream: Upstream,
        repository: str,
        authorization: str | None,
        subject: str | None = None,
    ) -> bool:
        key = self._key(upstream, repository, authorization)
        return self._granted(key if subject is None else (*key, subject))

    def grant(
        self,
        upstream: Upstream,
        repository: str,
        authorization: str | None,
        subject: str | None = None,
    ) -> None:
        """Remember that upstream just accepted this credential for the repository (and, with
        `subject`, for that digest in it)."""
        key = self._key(upstream, repository, authorization)
        self._remember(key)
        if subject is not None:
            self._remember((*key, subject))

    def _remember(self, key: tuple[str, ...]) -> None:
        if len(self._grants) >= MAX_ACCESS_ENTRIES:
            self._prune()
        self._grants.pop(key, None)  # re-inserted last: the dict stays in expiry order
        self._grants[key] = _Grant(self.clock() + self.ttl)

    async def check(
        self,
        upstream: Upstream,
        repository: str,
        authorization: str | None,
        subject: str,
        probe: Callable[[], Awaitable[int | None]],
        *,
        per_subject: bool = False,
    ) -> int | None:
        """Pass if the credential was accepted for the repository (with `per_subject`: for
        `subject` in it) within the TTL; else run `probe` (an upstream HEAD of `subject`,
        returning what it learnt, e.g. a length) once for all concurrent callers with the same
        key and subject, and remember a success. Returns the probe's result, or None when the
        cache answered."""
        key = self._key(upstream, repository, authorization)
        subject_key = (*key, subject)
        if self._granted(subject_key if per_subject else key):
            return None
        future = self._pending.get(subject_key)
        if future is None:
            future = asyncio.ensure_future(self._probe(key, subject_key, probe))
            # Every waiter may have gone (clients hung up): the outcome is then nobody's.
            future.add_done_callback(_consume_outcome)
            self._pending[subject_key] = future
        return await asyncio.shield(future)

    async def _probe(
        self,
        key: tuple[str, ...],
        subject_key: tuple[str, ...],
        probe: Callable[[], Awaitable[int | None]],
    ) -> int | None:
        try:
            result = await probe()
            self._remember(key)
            self._remember(subject_key)
            return result
        finally:
            del self._pending[subject_key]

    def _prune(self) -> None:
        now = self.clock()
        for key in [k for k, grant in self._grants.items() if grant.expires <= now]:
            del self._grants[key]
        while len(self._grants) >= MAX_ACCESS_ENTRIES:
            del self._grants[next(iter(self._grants))]
