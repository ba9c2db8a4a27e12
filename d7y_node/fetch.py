"""`d7y-node get`: any HTTP(S) URL or registry blob fetched through the running node's cluster.

Owns:
- what a URL's task is (`parse_target`): a registry blob (`http(s)://REGISTRY/v2/NAME/blobs/
  sha256:HEX` without a query, or the short `REGISTRY/NAME@sha256:HEX`) is the mirror's own task
  (id = its digest, same upstream/repository attributes), so `get` and the mirror share one
  download; any other URL is `url:` + the sha256 of its normalized form (`normalize_url`:
  scheme and host lower case, default port dropped, fragment dropped, signature parameters
  dropped, the other query parameters sorted), or the `--digest` when one is given;
- the origin `PieceSource` of a plain URL (`UrlOrigin`, a thin `registry.OriginBlob` over an
  arbitrary URL: the range, redirect and signed-location logic is registry.py's);
- the node's routes on the peer port (`FetchService.register`):
  `GET /api/v1/get?url=U[&digest=D]` streams the content to the caller once it is in the
  piece store (the download runs through `TaskManager` with the cluster's source policy);
  `POST /api/v1/fetch?url=U[&digest=D][&wait=1]` makes this host download the content whole
  (the task's home is asked this by whoever wants the content, so the home is the one host
  that goes to origin; `wait=1` answers only once it is complete, for `preheat`);
- the command's client side (`download`): progress on a TTY, atomic `-o FILE`, `-o -`.

Completion rule: with a digest the content must hash to it (else `DigestMismatch`, nothing
kept); a plain URL without one completes on its length (every piece held): nothing else can
tell good bytes from bad. Content under one normalized URL is treated as immutable, as a cache
key: once complete it is served from the store without asking the origin again.

Who may call: with a cluster key every request must carry the peer protocol's signature
(`peer.PeerAuth`; the CLI signs with the key from `--secret-file`). Without one, `get` answers
only loopback clients, and `fetch` only loopback or a current cluster member's address: the
routes make the node fetch any URL, which must not be open to the network.

Does not decide origin or peers (`p2p.py`), store bytes (`tasks.py`) or speak to registries
beyond `RegistryClient` (`registry.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

import aiohttp
from aiohttp import web
from yarl import URL

from d7y_node.config import NodeConfig, is_plain_http
from d7y_node.errors import (
    D7yError,
    DigestMismatch,
    InvalidRequest,
    PeerFailed,
    TaskFailed,
    UpstreamStatus,
    UpstreamUnavailable,
)
from d7y_node.gossip.messages import MemberState
from d7y_node.gossip.state import Membership
from d7y_node.p2p import ClusterScheduler
from d7y_node.peer import AUTH_HEADER, PeerAuth, is_loopback, task_key_for
from d7y_node.proxy import REPOSITORY_ATTRIBUTE, UPSTREAM_ATTRIBUTE, check_digest, parse_route
from d7y_node.registry import OriginBlob, RegistryClient, Upstream, parse_upstream_url
from d7y_node.tasks import PieceSource, TaskManager

log = logging.getLogger(__name__)

GET_PATH = "/api/v1/get"
FETCH_PATH = "/api/v1/fetch"

# Query parameters that carry a URL's credentials or expiry rather than naming its content,
# compared case-insensitively: AWS S3 (SigV2 `AWSAccessKeyId`/`Signature`/`Expires`, SigV4
# `X-Amz-*`), Google Cloud Storage (`GoogleAccessId`/`Signature`/`Expires`, `X-Goog-*`),
# CloudFront (`Expires`/`Signature`/`Policy`/`Key-Pair-Id`), Alibaba OSS (`OSSAccessKeyId`,
# `security-token`).
SIGNATURE_PARAMETERS = frozenset({
    "expires", "signature", "policy", "key-pair-id", "awsaccesskeyid", "googleaccessid",
    "ossaccesskeyid", "security-token",
})
SIGNATURE_PREFIXES = ("x-amz-", "x-goog-")
# Azure shared access signatures use short names (`sv`, `se`, `sp`, ...) that other sites may
# use for content, so they are dropped only from a URL that carries a SAS signature (`sig`).
AZURE_SIGNATURE = "sig"
AZURE_SAS_PARAMETERS = frozenset({
    "sig", "sv", "ss", "srt", "sp", "se", "st", "spr", "sip", "si", "sr", "skoid", "sktid",
    "skt", "ske", "sks", "skv", "sdd", "rscc", "rscd", "rsce", "rscl", "rsct",
})
DEFAULT_PORTS = {"http": 80, "https": 443}
URL_TASK_PREFIX = "url:"
# The normalized URL kept with a URL task (for `status` and logs), never its signature.
URL_ATTRIBUTE = "url"

# URLs longer than this are refused (signed URLs run to ~2 KiB; 8 KiB is a common server limit).
MAX_URL_LENGTH = 8192
# Bytes per pread when copying a task to the caller (large enough that the loop sees few
# calls, small enough to keep memory flat).
COPY_CHUNK_BYTES = 1 << 20
# A home asked to start a download answers once the task exists (its length known): one origin
# round trip. A home asked to wait (`preheat`) answers when the content is complete, so that
# request may take as long as a big blob's download.
HOME_START_TIMEOUT_SECONDS = 30.0
HOME_WAIT_TIMEOUT_SECONDS = 3600.0

_SHORT_BLOB = re.compile(r"(?P<registry>[^/@]+)/(?P<name>[^@]+)@(?P<digest>sha256:[0-9a-f]{64})")
_BLOB_PATH = re.compile(r"/v2/.+/blobs/sha256:[0-9a-f]{64}")


# -- what a URL names ----------------------------------------------------------------------------


def _is_signature_parameter(name: str, azure: bool) -> bool:
    lowered = name.lower()
    return (
        lowered in SIGNATURE_PARAMETERS
        or lowered.startswith(SIGNATURE_PREFIXES)
        or (azure and lowered in AZURE_SAS_PARAMETERS)
    )


def normalize_url(text: str) -> str:
    """The URL as a cache key: scheme and host lower case, default port dropped, fragment
    dropped, signature parameters dropped, the rest of the query sorted (each `name=value` as
    it was written, so percent-encoding is kept). Raises `InvalidRequest` if not HTTP(S)."""
    parts = urllib.parse.urlsplit(text.strip())
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        raise InvalidRequest("URL_INVALID", f"not an http(s) URL with a host: {text[:200]!r}")
    try:
        port = parts.port
    except ValueError:
        raise InvalidRequest("URL_INVALID", f"bad port in {text[:200]!r}") from None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    if port is not None and port != DEFAULT_PORTS[scheme]:
        host = f"{host}:{port}"
    pairs = [pair for pair in parts.query.split("&") if pair]
    names = {urllib.parse.unquote_plus(pair.split("=", 1)[0]).lower() for pair in pairs}
    azure = AZURE_SIGNATURE in names
    kept = sorted(
        pair for pair in pairs
        if not _is_signature_parameter(urllib.parse.unquote_plus(pair.split("=", 1)[0]), azure)
    )
    query = "&".join(kept)
    return urllib.parse.urlunsplit((scheme, host, parts.path or "/", query, ""))


def url_task_id(text: str) -> str:
    """`url:` + the sha256 hex of the normalized URL."""
    return URL_TASK_PREFIX + hashlib.sha256(normalize_url(text).encode()).hexdigest()


@dataclass(frozen=True)
class FetchTarget:
    """One thing `get` can fetch: a registry blob or a plain URL, and its task."""

    task_id: str
    # What the origin is asked for: the URL as given (signature and all).
    url: str
    # The hex sha256 the content must hash to, if known.
    sha256: str | None
    # Registry blobs only: where the blob lives (the mirror's task attributes).
    upstream: Upstream | None = None
    repository: str | None = None

    @property
    def is_blob(self) -> bool:
        return self.upstream is not None

    def attributes(self) -> dict[str, str]:
        if self.upstream is not None and self.repository is not None:
            return {UPSTREAM_ATTRIBUTE: str(self.upstream), REPOSITORY_ATTRIBUTE: self.repository}
        return {URL_ATTRIBUTE: normalize_url(self.url)}

    def source(self, registry: RegistryClient, content_length: int | None) -> PieceSource:
        if self.upstream is not None and self.repository is not None:
            return registry.blob_source(
                self.upstream, self.repository, self.task_id, None, content_length=content_length
            )
        return UrlOrigin(registry, self.url, self.task_id, content_length)


def parse_target(text: str, digest: str | None, insecure: tuple[str, ...]) -> FetchTarget:
    """The target `text` names (see the module docstring). `digest` (`sha256:HEX`) verifies
    the content and names its task. Raises `InvalidRequest`."""
    text = text.strip()
    if len(text) > MAX_URL_LENGTH:
        raise InvalidRequest("URL_INVALID", f"a URL is at most {MAX_URL_LENGTH} characters")
    if digest is not None:
        check_digest(digest)
    if "://" not in text:
        match = _SHORT_BLOB.fullmatch(text)
        if match is None:
            raise InvalidRequest(
                "URL_INVALID", "expected an http(s) URL or REGISTRY/NAME@sha256:HEX"
            )
        upstream = parse_upstream_url(match["registry"], insecure, "registry")
        scheme = "http" if is_plain_http(upstream.host, insecure) else "https"
        text = f"{scheme}://{match['registry']}/v2/{match['name']}/blobs/{match['digest']}"
    normalize_url(text)  # validates scheme and host
    parts = urllib.parse.urlsplit(text)
    if not parts.query and _BLOB_PATH.fullmatch(parts.path):
        route = parse_route(parts.path)
        if digest is not None and digest != route.reference:
            raise InvalidRequest(
                "DIGEST_INVALID", f"--digest {digest} is not the blob's {route.reference}"
            )
        upstream = parse_upstream_url(f"{parts.scheme}://{parts.netloc}", insecure, "registry")
        return FetchTarget(
            task_id=route.reference,
            url=str(RegistryClient.blob_url(upstream, route.repository, route.reference)),
            sha256=route.reference.removeprefix("sha256:"),
            upstream=upstream,
            repository=route.repository,
        )
    if digest is not None:
        return FetchTarget(digest, text, digest.removeprefix("sha256:"))
    return FetchTarget(url_task_id(text), text, None)


class UrlOrigin:
    """A `tasks.PieceSource` over any HTTP(S) URL: reads go through a `registry.OriginBlob`
    pointed at the URL (its range reads, redirects and remembered storage location), the
    length comes from a HEAD (or a one-byte range GET where a HEAD is refused, as URLs signed
    for GET only do).

    Deliberately not an `OriginBlob` itself: `p2p.origin_request_of` describes those to the
    task's home as registry blobs, and a home's `RegistryOrigins` refuses a plain URL. The
    home of a URL task is asked to fetch it by `FetchService.ask_home` instead."""

    def __init__(
        self, client: RegistryClient, url: str, label: str, content_length: int | None
    ) -> None:
        self.client = client
        self.url = URL(url, encoded=True)  # as given: re-encoding would break a signature
        self.label = label
        host = self.url.raw_host or ""
        authority = f"{host}:{self.url.port}" if self.url.explicit_port else host
        self.upstream = Upstream(self.url.scheme, authority)
        self._content_length = content_length
        self._reader = OriginBlob(client, self.upstream, "", label, None, content_length)
        self._reader.url = self.url

    async def content_length(self) -> int:
        if self._content_length is not None:
            return self._content_length
        response = await self.client.request("HEAD", self.url, {})
        try:
            length = response.headers.get("Content-Length", "")
            refused = not 200 <= response.status < 300
        finally:
            response.release()
        if refused or not length.isdigit():
            # Raises the origin's refusal if the range GET is refused too.
            self._content_length = await self.client._length_by_range(
                self.upstream, self.url, {}, self.label
            )
        else:
            self._content_length = int(length)
        return self._content_length

    def read(self, offset: int, length: int) -> AsyncIterator[bytes]:
        return self._reader.read(offset, length)


# -- the node's routes ---------------------------------------------------------------------------


class NodeParts(Protocol):
    """What the fetch routes use of the running `node.Node`."""

    @property
    def config(self) -> NodeConfig: ...
    @property
    def tasks(self) -> TaskManager: ...
    @property
    def registry(self) -> RegistryClient: ...
    @property
    def scheduler(self) -> ClusterScheduler | None: ...
    @property
    def membership(self) -> Membership | None: ...
    @property
    def peer_auth(self) -> PeerAuth | None: ...
    @property
    def session(self) -> aiohttp.ClientSession | None: ...
    @property
    def member_id(self) -> str | None: ...


@dataclass(frozen=True)
class HomeAnswer:
    """What a host that was asked to fetch a task says (the JSON of `POST /api/v1/fetch`)."""

    task_id: str
    content_length: int
    complete: bool
    # The member that fetched it (None: a node outside a cluster).
    host: str | None

    def as_json(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "content_length": self.content_length,
                "complete": self.complete, "host": self.host}


@dataclass
class FetchStats:
    """Counters of the fetch routes."""

    gets: int = 0
    home_fetches: int = 0
    # Asks to a home that failed (that host then fetched through its own cluster source).
    home_failures: int = 0
    refused: int = 0


def error_json(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"code": code, "message": message}, status=status)


def error_response(error: D7yError) -> web.Response:
    """The one mapping of errors to these routes' JSON answers."""
    if isinstance(error, InvalidRequest):
        return error_json(error.status, error.code, error.message)
    if isinstance(error, UpstreamStatus):
        return error_json(502, "ORIGIN_REFUSED", f"the origin answered {error.status}")
    if isinstance(error, DigestMismatch):
        return error_json(502, "DIGEST_MISMATCH", str(error))
    if isinstance(error, UpstreamUnavailable):
        return error_json(502, "ORIGIN_UNAVAILABLE", str(error))
    return error_json(502, "FETCH_FAILED", str(error))


class FetchService:
    """The node's `get` and `fetch` routes (see the module docstring)."""

    def __init__(self, node: NodeParts) -> None:
        self.node = node
        self.stats = FetchStats()

    def register(self, app: web.Application) -> None:
        app.router.add_get(GET_PATH, self._guarded(self._get, members=False), allow_head=False)
        app.router.add_post(FETCH_PATH, self._guarded(self._fetch, members=True))

    # -- access ---------------------------------------------------------------------------------

    def allowed(self, request: web.Request, *, members: bool) -> str | None:
        """None if the caller may use the route, else why not."""
        auth = self.node.peer_auth
        if auth is not None:
            return auth.check(request.method, request.raw_path, request.headers.get(AUTH_HEADER),
                              b"")
        if is_loopback(request):
            return None
        membership = self.node.membership
        if members and membership is not None:
            for member in membership.members(MemberState.ALIVE, MemberState.SUSPECT):
                address = member.peer_address
                if address is not None and address.host == request.remote:
                    return None
        return "not a loopback client (set a cluster key to allow others)"

    def _guarded(
        self, handler: Callable[[web.Request], Awaitable[web.StreamResponse]], *, members: bool
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def guarded(request: web.Request) -> web.StreamResponse:
            reason = self.allowed(request, members=members)
            if reason is not None:
                self.stats.refused += 1
                return error_json(401 if self.node.peer_auth else 403, "UNAUTHORIZED",
                                  f"refused: {reason}")
            try:
                return await handler(request)
            except D7yError as error:
                return error_response(error)

        return guarded

    def target_of(self, request: web.Request) -> FetchTarget:
        url = request.query.get("url")
        if not url:
            raise InvalidRequest("URL_INVALID", "the url parameter is required")
        digest = request.query.get("digest") or None
        return parse_target(url, digest, self.node.config.registry.insecure_registries)

    # -- get ------------------------------------------------------------------------------------

    async def _get(self, request: web.Request) -> web.StreamResponse:
        target = self.target_of(request)
        self.stats.gets += 1
        known = await self.ask_home(target, wait=False)
        length = known.content_length if known is not None else None
        source = target.source(self.node.registry, length)
        async with self.node.tasks.open(
            target.task_id, source, content_length=length, sha256=target.sha256,
            attributes=target.attributes(), whole=True,
        ) as handle:
            info = handle.info
            response = web.StreamResponse(headers={
                "Content-Type": "application/octet-stream", "X-D7y-Task-Id": info.task_id,
            })
            response.content_length = info.content_length
            if info.content_length == 0:
                await response.prepare(request)
                await response.write_eof()
                return response
            segments = handle.segments(0, info.content_length)
            try:
                # The first bytes before the headers: an early failure keeps its status.
                first = await anext(segments)
                await response.prepare(request)
                try:
                    await _copy(response, first.fd, first.offset, first.count)
                    async for segment in segments:
                        await _copy(response, segment.fd, segment.offset, segment.count)
                except (D7yError, OSError) as error:
                    # Headers are out: cut the connection, the caller sees a short body.
                    log.warning("get of %s cut off: %s", target.task_id, error)
                    if request.transport is not None:
                        request.transport.close()
                    return response
            finally:
                # An abandoned reader must let go of its range at once.
                close = getattr(segments, "aclose", None)
                if close is not None:
                    await close()
            await response.write_eof()
            return response

    # -- fetch at a home ------------------------------------------------------------------------

    async def _fetch(self, request: web.Request) -> web.StreamResponse:
        target = self.target_of(request)
        wait = request.query.get("wait") in ("1", "true")
        self.stats.home_fetches += 1
        answer = await self.fetch_here(target, wait=wait)
        return web.json_response(answer.as_json())

    async def fetch_here(self, target: FetchTarget, *, wait: bool) -> HomeAnswer:
        """Download `target` whole on this host (it keeps going after this returns); with
        `wait`, return once it is complete."""
        source = target.source(self.node.registry, None)
        async with self.node.tasks.open(
            target.task_id, source, sha256=target.sha256, attributes=target.attributes(),
            whole=True,
        ) as handle:
            if wait:
                async for _segment in handle.segments(0, handle.info.content_length):
                    pass  # each yields once its pieces are held; the last once verified
            info = handle.info
            return HomeAnswer(info.task_id, info.content_length, info.complete,
                              self.node.member_id)

    def homes(self, target: FetchTarget) -> list[str]:
        scheduler = self.node.scheduler
        return scheduler.homes(task_key_for(target.task_id)) if scheduler is not None else []

    async def ask_home(self, target: FetchTarget, *, wait: bool) -> HomeAnswer | None:
        """Have the task's home (home 0, else home 1) download `target`: this host itself when
        it is the home (or alone). Returns the home's answer, or None if no home answered (the
        caller's own download then goes through the cluster source, which falls back to the
        origin when the swarm stays silent)."""
        membership, session = self.node.membership, self.node.session
        for home in self.homes(target):
            if home == self.node.member_id:
                if wait:
                    return await self.fetch_here(target, wait=True)
                return None  # the caller's own download is the home's
            member = membership.member(home) if membership is not None else None
            address = member.peer_address if member is not None else None
            if address is None or session is None:
                continue
            try:
                return await self._ask(session, str(address), home, target, wait=wait)
            except PeerFailed as error:
                self.stats.home_failures += 1
                log.warning("home %s could not fetch %s: %s", home, target.task_id, error)
        if wait:
            return await self.fetch_here(target, wait=True)
        return None

    async def _ask(
        self, session: aiohttp.ClientSession, address: str, home: str, target: FetchTarget,
        *, wait: bool,
    ) -> HomeAnswer:
        query = {"url": target.url, "wait": "1" if wait else "0"}
        if target.sha256 is not None and not target.is_blob:
            query["digest"] = "sha256:" + target.sha256
        path = f"{FETCH_PATH}?{urllib.parse.urlencode(query)}"
        headers = {}
        if self.node.peer_auth is not None:
            headers[AUTH_HEADER] = self.node.peer_auth.sign("POST", path)
        within = HOME_WAIT_TIMEOUT_SECONDS if wait else HOME_START_TIMEOUT_SECONDS
        try:
            async with session.post(
                URL(f"http://{address}{path}", encoded=True), headers=headers,
                timeout=aiohttp.ClientTimeout(total=within),
            ) as response:
                body = await response.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as error:
            raise PeerFailed(home, f"fetch: {error or type(error).__name__}") from None
        try:
            answer = json.loads(body)
        except ValueError:
            raise PeerFailed(home, f"fetch answered {response.status}, not JSON") from None
        if response.status != 200 or not isinstance(answer, dict):
            message = answer.get("message") if isinstance(answer, dict) else None
            raise PeerFailed(home, f"fetch answered {response.status}: {message}")
        try:
            return HomeAnswer(str(answer["task_id"]), int(answer["content_length"]),
                              bool(answer["complete"]), answer.get("host"))
        except (KeyError, TypeError, ValueError):
            raise PeerFailed(home, "fetch answered malformed JSON") from None


async def _copy(response: web.StreamResponse, fd: int, offset: int, count: int) -> None:
    """Write `count` bytes of the data file at `offset` to the response."""
    loop = asyncio.get_running_loop()
    end = offset + count
    while offset < end:
        data = await loop.run_in_executor(
            None, os.pread, fd, min(COPY_CHUNK_BYTES, end - offset), offset
        )
        if not data:
            raise TaskFailed("data file ended before its verified pieces")
        await response.write(data)
        offset += len(data)


# -- the command's client side -------------------------------------------------------------------

# The progress line is redrawn at most this often (a terminal is slow; the eye is slower).
PROGRESS_INTERVAL_SECONDS = 0.1
# Columns of a progress line's label and bar (the line fits a 100-column terminal).
PROGRESS_LABEL_WIDTH = 30
PROGRESS_BAR_WIDTH = 30
# ANSI "erase in line" (to its end): a redrawn line may be shorter than the one it replaces.
ERASE_TO_END_OF_LINE = "\x1b[K"
# Bytes read from the node per call.
READ_CHUNK_BYTES = 1 << 20
# The node may take this long between two bytes (it waits on its origin or peers meanwhile).
STALL_TIMEOUT_SECONDS = 120.0


@dataclass
class Progress:
    """A one-line progress display on a terminal, or a single final line elsewhere."""

    stream: IO[str]
    total: int
    label: str
    tty: bool = False
    done: int = 0
    started: float = field(default_factory=time.monotonic)
    _drawn: float = 0.0
    # Appended to the bar on a terminal (e.g. the total of several transfers).
    suffix: Callable[[], str] | None = None
    # On a terminal, whether a summary line follows the final bar (else the bar is the last word).
    summary_on_tty: bool = True
    label_width: int = PROGRESS_LABEL_WIDTH
    bar_width: int = PROGRESS_BAR_WIDTH
    # The terminal's width: a longer line is cut (a wrapped line cannot be redrawn with `\r`).
    columns: int | None = None

    def advance(self, amount: int) -> None:
        self.done += amount
        now = time.monotonic()
        if self.tty and now - self._drawn >= PROGRESS_INTERVAL_SECONDS:
            self._drawn = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        text = progress_text(
            self.label, self.done, self.total, now - self.started,
            suffix=self.suffix() if self.suffix is not None else "",
            label_width=self.label_width, bar_width=self.bar_width,
        )
        if self.columns is not None:
            text = text[: max(self.columns - 1, 1)]
        self.stream.write(f"\r{text}{ERASE_TO_END_OF_LINE}")
        self.stream.flush()

    def finish(self) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        if self.tty:
            self._draw(time.monotonic())
            self.stream.write("\n")
            if not self.summary_on_tty:
                self.stream.flush()
                return
        self.stream.write(
            f"{self.label}: {self.done} bytes in {elapsed:.1f}s "
            f"({_human(int(self.done / elapsed))}/s)\n"
        )
        self.stream.flush()


def progress_text(
    label: str, done: int, total: int, elapsed: float, *, suffix: str = "",
    label_width: int = PROGRESS_LABEL_WIDTH, bar_width: int = PROGRESS_BAR_WIDTH,
) -> str:
    """One progress line: label, bar, percent, bytes done of `total`, rate, then `suffix`."""
    fraction = min(done / total, 1.0) if total else 1.0
    bar = "#" * int(bar_width * fraction)
    rate = done / max(elapsed, 1e-6)
    return (
        f"{label[:label_width]:<{label_width}} [{bar:<{bar_width}}] {100 * fraction:5.1f}% "
        f"{_human(done)}/{_human(total)} {_human(int(rate))}/s{suffix}"
    )


def human_size(size: int) -> str:
    """`size` bytes as people read it (B, KiB, MiB, GiB with one decimal)."""
    return _human(size)


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f}{unit}" if unit != "B" else f"{int(value)}B"
        value /= 1024
    return f"{size}B"


def signed_request(
    base: str, path: str, method: str, auth: PeerAuth | None
) -> urllib.request.Request:
    """A request to the node's `path` (with query), signed when there is a cluster key."""
    headers = {AUTH_HEADER: auth.sign(method, path)} if auth is not None else {}
    return urllib.request.Request(base + path, method=method, headers=headers)


def open_node(request: urllib.request.Request, timeout: float) -> Any:
    """The node's response; a refusal raises `D7yError` with the node's own message."""
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        try:
            message = json.loads(error.read()).get("message", "")
        except (ValueError, AttributeError, OSError):
            message = ""
        raise D7yError(f"the node answered {error.code}: {message or error.reason}") from None
    except OSError as error:
        raise D7yError(f"cannot reach the node at {request.full_url.split('?')[0]}: "
                       f"{getattr(error, 'reason', error)}") from None


def download(
    base: str,
    url: str,
    output: str,
    *,
    digest: str | None,
    auth: PeerAuth | None,
    progress_stream: IO[str] | None = None,
) -> tuple[str, int]:
    """Fetch `url` through the node at `base` (`http://HOST:PORT`) into `output` (a path,
    written to a temporary file beside it and renamed, or `-` for stdout). Returns (task id,
    bytes). Raises `D7yError` for a refusal, a short body or a digest mismatch."""
    if digest is not None:
        digest = digest.lower()
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
            raise D7yError(f"--digest must be sha256: and 64 hex digits, got {digest!r}")
    query = {"url": url, **({"digest": digest} if digest else {})}
    request = signed_request(base, f"{GET_PATH}?{urllib.parse.urlencode(query)}", "GET", auth)
    stream = progress_stream if progress_stream is not None else sys.stderr
    with open_node(request, STALL_TIMEOUT_SECONDS) as response:
        task_id = response.headers.get("X-D7y-Task-Id", "?")
        total = int(response.headers.get("Content-Length") or -1)
        label = Path(urllib.parse.urlsplit(url).path).name or task_id
        progress = Progress(stream, max(total, 0), label, tty=stream.isatty())
        hasher = hashlib.sha256()
        with _output(output) as sink:
            while True:
                try:
                    chunk = response.read1(READ_CHUNK_BYTES)
                except OSError as error:
                    raise D7yError(f"the transfer broke after {progress.done} bytes: "
                                   f"{error}") from None
                if not chunk:
                    break
                sink.write(chunk)
                if digest is not None:
                    hasher.update(chunk)
                progress.advance(len(chunk))
            if 0 <= total != progress.done:
                raise D7yError(
                    f"the node cut the transfer off after {progress.done} of {total} bytes "
                    "(the content failed its digest or the origin broke off; see the node's log)"
                )
            if digest is not None and "sha256:" + hasher.hexdigest() != digest:
                raise D7yError(f"content hashes to sha256:{hasher.hexdigest()}, not {digest}")
    progress.finish()
    return task_id, progress.done


@contextlib.contextmanager
def _output(output: str) -> Iterator[IO[bytes]]:
    """A binary sink: stdout for `-`, else a temporary file renamed over `output` only when
    the block ends without an error (removed otherwise)."""
    if output == "-":
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    path = Path(output)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
    try:
        with open(temporary, "wb") as sink:
            yield sink
            sink.flush()
            os.fsync(sink.fileno())
        os.replace(temporary, path)
    except OSError as error:
        raise D7yError(f"cannot write {output}: {error.strerror or error}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()

