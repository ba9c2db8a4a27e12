"""The registry mirror: the pull side of the OCI distribution API on the proxy port.

Owns request validation (repository names, digests, tags, `Range`), the routes `/v2/`,
manifests (passed through, by-digest ones kept in the store), tag lists (passed through) and
blobs (through the `TaskManager`, streamed with `sendfile` while they download), the rule that
content in the store is served only to a client upstream accepts (`AccessCache` in
`registry.py`), the mapping of `d7y_node.errors` to OCI error JSON (`error_response`, used only by
the boundary middleware), and the request metrics.

Does not talk to origins itself (that is `registry.py`) nor keep bytes (that is `tasks.py`).

Decisions a client can observe:
- `GET /v2/` answers 200 `{}`, except that upstream's 401 challenge is passed through as it is,
  since clients such as skopeo and docker learn the auth scheme from this ping only.
- A malformed `Range` (not `bytes=a-b`, `bytes=a-` or `bytes=-n`, or `a > b`) answers
  400 `RANGE_INVALID`; a range unit other than `bytes` is ignored (200, RFC 9110 §14.2); several
  ranges answer the whole body with 200 (allowed by RFC 9110 §14.2); a range starting at or
  after the end answers 416 with `Content-Range: bytes */LENGTH`.
- A range request does not make the node download the whole blob (`whole=False`); a request
  without `Range` does.
- Content in the store is served only after upstream accepted the client's `Authorization`
  for that repository (a HEAD, remembered per credential for `auth_cache_ttl`); when the
  content was first fetched through another repository, upstream must accept that digest in
  the asked repository. If upstream is unreachable and the credential was not accepted within
  the TTL, the answer is 502 even when the blob is complete locally.
- Stored content is released only on the word of the upstream it came from: asked for through
  another upstream (`ns=`, `X-Dragonfly-Registry`), a blob is relayed from that upstream
  without the store, so an upstream cannot vouch for content it does not have.
- An upstream refusal (401 with `WWW-Authenticate`, 403, 404, 429) goes back as upstream sent
  it; a refused HEAD probe is asked again as a GET so a GET client gets upstream's body.
- A whole blob still downloading is sent except its last piece until its sha256 matched (the
  `TaskHandle.segments` contract), so a client never receives all of a blob that turns out wrong.
- If a download fails after the response headers went out, the connection is closed: the
  client sees a short body, never a wrong byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import select
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import unquote

from aiohttp import web
from multidict import CIMultiDict

from d7y_node.config import ProxyConfig
from d7y_node.errors import (
    D7yError,
    DigestMismatch,
    InvalidRequest,
    StoreFull,
    TaskFailed,
    UpstreamStatus,
    UpstreamUnavailable,
)
from d7y_node.metrics import Metrics
from d7y_node.registry import RegistryClient, Upstream, forwardable_headers
from d7y_node.tasks import Segment, TaskHandle, TaskManager

log = logging.getLogger(__name__)

T = TypeVar("T")

API_VERSION_HEADER = "Docker-Distribution-API-Version"
API_VERSION = "registry/2.0"
REGISTRY_HEADER = "X-Dragonfly-Registry"
BLOB_CONTENT_TYPE = "application/octet-stream"
ERROR_CONTENT_TYPE = "application/json"
# Blobs never change under their digest; clients and caches may keep them (as the CNCF
# registry says).
BLOB_CACHE_CONTROL = "max-age=31536000"

# Upstream's `/v2/` body is not used; it is read only to keep the connection reusable.
MAX_PING_BODY_BYTES = 64 * 1024

# The `status` label of a request whose client disconnected before its answer was complete
# (nginx's convention for the same event).
CLIENT_CLOSED_STATUS = "499"
# OCI error codes for a blob GET upstream refused without a body.
BODYLESS_STATUS_CODES = {
    401: "UNAUTHORIZED", 403: "DENIED", 404: "BLOB_UNKNOWN", 429: "TOOMANYREQUESTS",
}

# The store attribute holding a stored manifest's media type; its presence marks the task as a
# manifest that may be answered from the store.
MANIFEST_TYPE_ATTRIBUTE = "manifest_content_type"

# Store attributes naming where content was first fetched: stored bytes are released only on the
# word of that upstream, and per digest when asked for through another repository.
UPSTREAM_ATTRIBUTE = "upstream"
REPOSITORY_ATTRIBUTE = "repository"

# Manifest response headers a client needs, taken from upstream as they are.
MANIFEST_HEADERS = ("Content-Type", "Docker-Content-Digest", "ETag", "Last-Modified")
TAG_LIST_HEADERS = ("Content-Type", "Link")

# The distribution spec's repository name grammar; the CNCF registry bounds a name to 255.
MAX_NAME_LENGTH = 255
_NAME = re.compile(
    r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*"
)
_TAG = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
_SHA256_DIGEST = re.compile(r"sha256:[a-f0-9]{64}")
# Any well-formed digest (OCI image spec); only sha256 is supported.
_ANY_DIGEST = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
_ROUTE = re.compile(r"(?P<name>.+)/(?P<kind>manifests|blobs|tags)/(?P<rest>[^/]+)")
_RANGE_SPEC = re.compile(r"(\d{0,19})-(\d{0,19})")

# Bytes read per `pread` when `sendfile` is not possible (uvloop, TLS): large enough that the
# thread hand-off is noise, small enough to keep memory per reader bounded.
COPY_CHUNK_BYTES = 1 << 20

# How segments reach the socket (see `_SegmentSender`).
SEND_LOOP = "loop"
SEND_THREAD = "thread"
SEND_COPY = "copy"
# A worker thread sends for at most this long per hand-off, so a slow client never holds one of
# the loop's threads for long, and at most this many bytes per sendfile call.
SEND_SLICE_SECONDS = 0.05
SEND_BYTES = 16 << 20
# A client that takes no byte for this long is cut off.
SEND_STALL_SECONDS = 60.0
# How often to look whether the transport's own buffer (the headers) has drained.
WRITE_BUFFER_POLL = 0.0005

ROUTE_V2 = "v2"
ROUTE_MANIFEST = "manifest"
ROUTE_BLOB = "blob"
ROUTE_OTHER = "other"
_ROUTE_KEY = web.RequestKey("d7y_route", str)


@dataclass(frozen=True)
class Route:
    """A validated mirror request: which API (`kind`), repository and reference/digest."""

    kind: str  # "v2", "manifest", "blob" or "tags"
    repository: str = ""
    reference: str = ""

    @property
    def metric_label(self) -> str:
        return {"v2": ROUTE_V2, "manifest": ROUTE_MANIFEST, "blob": ROUTE_BLOB}.get(
            self.kind, ROUTE_OTHER
        )


@dataclass(frozen=True)
class ByteRange:
    """What a GET answers: `count` bytes from `start`, as 200 (whole) or 206 (a range)."""

    start: int
    count: int
    status: int = 206

    def content_range(self, length: int) -> str:
        return f"bytes {self.start}-{self.start + self.count - 1}/{length}"


@dataclass(frozen=True)
class RangeSpec:
    """One `bytes=` range as written: `first-last`, `first-` (last None) or `-suffix`."""

    first: int | None
    last: int | None

    def resolve(self, length: int) -> ByteRange | None:
        """The bytes this range covers in a body of `length`, or None if none (→ 416)."""
        if self.first is None:
            suffix = self.last or 0
            if suffix == 0 or length == 0:
                return None
            count = min(suffix, length)
            return ByteRange(length - count, count)
        if self.first >= length:
            return None
        last = length - 1 if self.last is None else min(self.last, length - 1)
        return ByteRange(self.first, last - self.first + 1)


def parse_route(raw_path: str) -> Route:
    """Validate a request path (still percent-encoded) into a `Route`; raises `InvalidRequest`."""
    path = raw_path.split("?", 1)[0]
    if path in ("/v2", "/v2/"):
        return Route("v2")
    if not path.startswith("/v2/"):
        raise InvalidRequest("UNSUPPORTED", "not an OCI distribution API path", status=404)
    match = _ROUTE.fullmatch(path[len("/v2/"):])
    if match is None:
        raise InvalidRequest("UNSUPPORTED", "not a route of this mirror", status=404)
    name, kind, rest = match.group("name", "kind", "rest")
    if len(name) > MAX_NAME_LENGTH or not _NAME.fullmatch(name):
        raise InvalidRequest("NAME_INVALID", "invalid repository name")
    reference = unquote(rest)
    if kind == "tags":
        if reference != "list":
            raise InvalidRequest("UNSUPPORTED", "not a route of this mirror", status=404)
        return Route("tags", name, "")
    if kind == "blobs":
        check_digest(reference)
        return Route("blob", name, reference)
    if reference.startswith("sha256:") or ":" in reference:
        check_digest(reference)
    elif not _TAG.fullmatch(reference):
        raise InvalidRequest("TAG_INVALID", "invalid tag")
    return Route("manifest", name, reference)


def check_digest(digest: str) -> None:
    if _SHA256_DIGEST.fullmatch(digest):
        return
    if _ANY_DIGEST.fullmatch(digest) and not digest.startswith("sha256:"):
        raise InvalidRequest("DIGEST_INVALID", "unsupported digest algorithm (only sha256)")
    raise InvalidRequest("DIGEST_INVALID", "invalid digest (expected sha256: and 64 hex digits)")


def parse_range(header: str | None) -> RangeSpec | None:
    """The single range a `Range` header asks for; None means "the whole body" (no header,
    another unit, or several ranges). Raises `InvalidRequest` (400) when malformed."""
    if header is None:
        return None
    unit, equals, specs = header.strip().partition("=")
    if not equals:
        raise InvalidRequest("RANGE_INVALID", "malformed Range header")
    if unit.strip().lower() != "bytes":
        return None
    parts = [part.strip() for part in specs.split(",")]
    ranges = []
    for part in parts:
        match = _RANGE_SPEC.fullmatch(part)
        if match is None or match.group(0) == "-":
            raise InvalidRequest("RANGE_INVALID", "malformed Range header")
        first_text, last_text = match.groups()
        if not first_text:
            ranges.append(RangeSpec(None, int(last_text)))
            continue
        first, last = int(first_text), int(last_text) if last_text else None
        if last is not None and last < first:
            raise InvalidRequest("RANGE_INVALID", "Range ends before it starts")
        ranges.append(RangeSpec(first, last))
    return ranges[0] if len(ranges) == 1 else None


def resolve_span(
    wanted: RangeSpec | None, length: int, headers: CIMultiDict[str]
) -> ByteRange | web.Response:
    """The bytes a GET answers (adding `Content-Range` to `headers` for a range), or the 416
    response when the range starts at or after the end."""
    if wanted is None:
        return ByteRange(0, length, 200)
    span = wanted.resolve(length)
    if span is None:
        return oci_error(416, "RANGE_INVALID", "range not satisfiable",
                         headers={"Content-Range": f"bytes */{length}"})
    headers["Content-Range"] = span.content_range(length)
    return span


def same_upstream(attributes: Mapping[str, str], upstream: Upstream) -> bool:
    """Whether stored content came from `upstream` (only then may its word release it)."""
    return attributes.get(UPSTREAM_ATTRIBUTE) == str(upstream)


def same_repository(attributes: Mapping[str, str], route: Route) -> bool:
    return attributes.get(REPOSITORY_ATTRIBUTE) == route.repository


def oci_error(status: int, code: str, message: str, detail: object = None,
              headers: Mapping[str, str] | None = None) -> web.Response:
    body = {"errors": [{"code": code, "message": message, "detail": detail}]}
    response = web.Response(
        status=status, body=json.dumps(body).encode(), content_type=ERROR_CONTENT_TYPE,
        headers=headers,
    )
    response.headers[API_VERSION_HEADER] = API_VERSION
    return response


def error_response(error: D7yError) -> web.Response:
    """The one mapping of the node's errors to what a registry client sees."""
    if isinstance(error, InvalidRequest):
        return oci_error(error.status, error.code, error.message)
    if isinstance(error, UpstreamStatus):
        headers = forwardable_headers(error.headers)
        headers.popall("Content-Encoding", None)  # the body was read raw; keep it raw
        response = web.Response(status=error.status, body=error.body, headers=headers)
        if "Content-Type" in error.headers:
            response.headers["Content-Type"] = error.headers["Content-Type"]
        return response
    if isinstance(error, UpstreamUnavailable):
        return oci_error(502, "UNAVAILABLE", f"upstream registry unavailable: {error}")
    if isinstance(error, DigestMismatch):
        return oci_error(502, "UNKNOWN", "upstream content does not match its digest")
    if isinstance(error, StoreFull):
        return oci_error(503, "UNAVAILABLE", "mirror store is full")
    if isinstance(error, TaskFailed):
        return oci_error(502, "UNKNOWN", f"download failed: {error}")
    return oci_error(500, "UNKNOWN", str(error) or type(error).__name__)


class ProxyServer:
    """Serves the mirror API for one node: builds the aiohttp application."""

    def __init__(
        self,
        config: ProxyConfig,
        tasks: TaskManager,
        registry: RegistryClient,
        metrics: Metrics,
    ) -> None:
        self.config = config
        self.tasks = tasks
        self.registry = registry
        self.metrics = metrics

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._boundary])
        app.router.add_route("*", "/{path:.*}", self._dispatch)
        return app

    # -- boundary ---------------------------------------------------------------------------

    @web.middleware
    async def _boundary(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        response: web.StreamResponse
        try:
            response = await handler(request)
        except D7yError as error:
            response = error_response(error)
        except web.HTTPException as exc:
            response = oci_error(exc.status, "UNSUPPORTED", exc.reason)
        except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
            raise
        except ConnectionError:
            # The client went away mid-answer (an aborted pull): nobody is left to answer and
            # nothing is wrong here. Counted, then re-raised for aiohttp, which drops it quietly.
            log.debug("client left during %s %s", request.method, request.path)
            self.metrics.requests.labels(
                route=request.get(_ROUTE_KEY, ROUTE_OTHER), status=CLIENT_CLOSED_STATUS
            ).inc()
            raise
        except Exception:
            log.exception("unexpected error serving %s %s", request.method, request.path)
            response = oci_error(500, "UNKNOWN", "internal error")
        self.metrics.requests.labels(
            route=request.get(_ROUTE_KEY, ROUTE_OTHER), status=str(response.status)
        ).inc()
        return response

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            raise InvalidRequest("UNSUPPORTED", "this mirror is read-only", status=405)
        route = parse_route(request.raw_path)
        request[_ROUTE_KEY] = route.metric_label
        upstream = self.registry.upstream(
            request.headers.get(REGISTRY_HEADER), request.query.get("ns")
        )
        if route.kind == "v2":
            return await self._base(request, upstream)
        if route.kind == "blob":
            return await self._blob(request, route, upstream)
        if route.kind == "manifest":
            return await self._manifest(request, route, upstream)
        return await self._tags(request, route, upstream)

    async def _base(self, request: web.Request, upstream: Upstream) -> web.StreamResponse:
        """`/v2/`: 200, unless upstream wants the client to authenticate. Clients such as
        skopeo and docker learn the auth scheme from this ping only, so upstream's 401
        challenge goes back as it is; any other upstream answer, or none, is a 200."""
        headers = {}
        authorization = request.headers.get("Authorization")
        if authorization:
            headers["Authorization"] = authorization
        url = upstream.base_url.with_path("/v2/", encoded=True)
        try:
            await self.registry.fetch("GET", url, headers, max_bytes=MAX_PING_BODY_BYTES)
        except UpstreamStatus as refusal:
            if refusal.status == 401:
                raise
        except UpstreamUnavailable as error:
            log.debug("ping of %s failed: %s", upstream, error)
        response = web.Response(body=b"{}", content_type="application/json")
        response.headers[API_VERSION_HEADER] = API_VERSION
        return response

    # -- manifests and tags ------------------------------------------------------------------

    def _upstream_headers(self, request: web.Request) -> dict[str, str]:
        headers = {}
        for name in ("Authorization", "Accept"):
            values = request.headers.getall(name, [])
            if values:
                headers[name] = ", ".join(values)
        return headers

    async def _manifest(
        self, request: web.Request, route: Route, upstream: Upstream
    ) -> web.StreamResponse:
        reference = route.reference
        by_digest = _SHA256_DIGEST.fullmatch(reference) is not None
        if by_digest:
            stored = await self._stored_manifest(request, route, upstream)
            if stored is not None:
                return stored
        url = self.registry.manifest_url(upstream, route.repository, reference)
        answer = await self.registry.fetch(
            request.method, url, self._upstream_headers(request),
            max_bytes=self.config.max_manifest_bytes,
        )
        authorization = request.headers.get("Authorization")
        self.registry.access.grant(
            upstream, route.repository, authorization, reference if by_digest else None
        )
        headers = CIMultiDict(
            (name, answer.headers[name]) for name in MANIFEST_HEADERS if name in answer.headers
        )
        if request.method == "HEAD":
            return await self._head(request, headers, answer.headers.get("Content-Length"))
        if "Docker-Content-Digest" not in headers:
            headers["Docker-Content-Digest"] = "sha256:" + hashlib.sha256(answer.body).hexdigest()
        if by_digest:
            await self._keep_manifest(
                reference, answer.body, headers.get("Content-Type"), upstream, route
            )
        self.metrics.served_bytes.inc(len(answer.body))
        return web.Response(body=answer.body, headers=headers)

    async def _stored_manifest(
        self, request: web.Request, route: Route, upstream: Upstream
    ) -> web.StreamResponse | None:
        digest = route.reference
        info = self.tasks.info(digest)
        if info is None or not info.complete or MANIFEST_TYPE_ATTRIBUTE not in info.attributes:
            return None
        if not same_upstream(info.attributes, upstream):
            return None  # held from another upstream: ask this one
        url = self.registry.manifest_url(upstream, route.repository, digest)
        upstream_headers = self._upstream_headers(request)

        async def probe() -> int | None:
            await self.registry.fetch("HEAD", url, upstream_headers, max_bytes=0)
            return None

        await self.registry.access.check(
            upstream, route.repository, request.headers.get("Authorization"), digest, probe,
            per_subject=not same_repository(info.attributes, route),
        )
        try:
            async with self.tasks.open(digest, None) as handle:
                content_type = handle.info.attributes[MANIFEST_TYPE_ATTRIBUTE]
                length = handle.info.content_length
                body = b"" if request.method == "HEAD" else await handle.read(0, length)
        except (KeyError, TaskFailed):
            return None  # evicted meanwhile: ask upstream
        headers = CIMultiDict({
            "Content-Type": content_type, "Docker-Content-Digest": digest, "ETag": f'"{digest}"',
        })
        if request.method == "HEAD":
            return await self._head(request, headers, str(length))
        self.metrics.served_bytes.inc(len(body))
        self.metrics.cache_bytes.inc(len(body))
        return web.Response(body=body, headers=headers)

    async def _keep_manifest(
        self, digest: str, body: bytes, content_type: str | None, upstream: Upstream,
        route: Route,
    ) -> None:
        hex_digest = hashlib.sha256(body).hexdigest()
        if content_type is None or "sha256:" + hex_digest != digest:
            return  # not what was asked for: pass it on, keep nothing
        try:
            await self.tasks.put(
                digest, body, sha256=hex_digest,
                attributes={
                    MANIFEST_TYPE_ATTRIBUTE: content_type,
                    UPSTREAM_ATTRIBUTE: str(upstream),
                    REPOSITORY_ATTRIBUTE: route.repository,
                },
            )
        except D7yError as error:
            log.warning("not keeping manifest %s: %s", digest, error)

    async def _tags(
        self, request: web.Request, route: Route, upstream: Upstream
    ) -> web.StreamResponse:
        url = self.registry.tags_url(upstream, route.repository)
        query = {k: v for k, v in request.query.items() if k in ("n", "last")}
        answer = await self.registry.fetch(
            request.method, url.with_query(query), self._upstream_headers(request),
            max_bytes=self.config.max_manifest_bytes,
        )
        headers = CIMultiDict(
            (name, answer.headers[name]) for name in TAG_LIST_HEADERS if name in answer.headers
        )
        if request.method == "HEAD":
            return await self._head(request, headers, answer.headers.get("Content-Length"))
        return web.Response(body=answer.body, headers=headers)

    async def _head(
        self, request: web.Request, headers: CIMultiDict[str], length: str | None
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers=headers)
        if length is not None and length.isdigit():
            response.content_length = int(length)
        await response.prepare(request)
        await response.write_eof()
        return response

    # -- blobs -------------------------------------------------------------------------------

    async def _authorize_blob(
        self, request: web.Request, upstream: Upstream, route: Route, per_digest: bool
    ) -> int | None:
        """Pass if upstream accepts the client for this repository (cached; with `per_digest`
        for this digest in it); returns the blob's length when an upstream HEAD was needed."""
        authorization = request.headers.get("Authorization")

        async def probe() -> int | None:
            return await self.registry.blob_length(
                upstream, route.repository, route.reference, authorization
            )

        return await self.registry.access.check(
            upstream, route.repository, authorization, route.reference, probe,
            per_subject=per_digest,
        )

    async def _explain(
        self, request: web.Request, upstream: Upstream, route: Route, refusal: UpstreamStatus
    ) -> UpstreamStatus:
        """A refusal a GET client can read: upstream HEAD refusals have no body, so ask the
        same as a GET for upstream's own answer (or write an OCI error body if it has none)."""
        if refusal.body or request.method != "GET":
            return refusal
        url = self.registry.blob_url(upstream, route.repository, route.reference)
        authorization = request.headers.get("Authorization")
        headers = {"Authorization": authorization} if authorization else {}
        with contextlib.suppress(UpstreamUnavailable):
            answer = await self.registry.refusal(url, headers)
            if answer is not None and answer.body:
                return answer
        code = BODYLESS_STATUS_CODES.get(refusal.status, "UNKNOWN")
        body = {"errors": [{"code": code, "message": f"upstream answered {refusal.status}",
                            "detail": None}]}
        with_body = dict(refusal.headers)
        with_body["Content-Type"] = ERROR_CONTENT_TYPE
        return UpstreamStatus(refusal.status, with_body, json.dumps(body).encode())

    async def _blob(
        self, request: web.Request, route: Route, upstream: Upstream
    ) -> web.StreamResponse:
        try:
            return await self._serve_blob(request, route, upstream)
        except UpstreamStatus as refusal:
            raise await self._explain(request, upstream, route, refusal) from None

    async def _serve_blob(
        self, request: web.Request, route: Route, upstream: Upstream
    ) -> web.StreamResponse:
        digest = route.reference
        authorization = request.headers.get("Authorization")
        info = self.tasks.info(digest)
        from_store = info is not None and info.complete
        headers = CIMultiDict({
            "Content-Type": BLOB_CONTENT_TYPE,
            "Docker-Content-Digest": digest,
            "Accept-Ranges": "bytes",
            "ETag": f'"{digest}"',
            "Cache-Control": BLOB_CACHE_CONTROL,
        })
        wanted = parse_range(request.headers.get("Range")) if request.method == "GET" else None
        if info is not None and not same_upstream(info.attributes, upstream):
            return await self._relay(request, route, upstream, wanted, headers)
        per_digest = info is not None and not same_repository(info.attributes, route)
        probed_length = await self._authorize_blob(request, upstream, route, per_digest)
        if request.method == "HEAD":
            if info is not None:
                length = info.content_length
            elif probed_length is not None:
                length = probed_length
            else:
                length = await self.registry.blob_length(
                    upstream, route.repository, digest, authorization
                )
            return await self._head(request, headers, str(length))

        known_length = info.content_length if info is not None else probed_length
        source = self.registry.blob_source(
            upstream, route.repository, digest, authorization, content_length=known_length
        )
        async with self.tasks.open(
            digest, source, content_length=known_length, sha256=digest[len("sha256:"):],
            attributes={UPSTREAM_ATTRIBUTE: str(upstream), REPOSITORY_ATTRIBUTE: route.repository},
            whole=wanted is None,
        ) as handle:
            # Another request may have created the task meanwhile: check whose it is.
            relay = not same_upstream(handle.info.attributes, upstream)
            if not relay:
                if not per_digest and not same_repository(handle.info.attributes, route):
                    await self._authorize_blob(request, upstream, route, True)
                span = resolve_span(wanted, handle.info.content_length, headers)
                if isinstance(span, web.Response):
                    return span
                return await self._stream(request, handle, span, headers, from_store)
        return await self._relay(request, route, upstream, wanted, headers)

    async def _relay(
        self,
        request: web.Request,
        route: Route,
        upstream: Upstream,
        wanted: RangeSpec | None,
        headers: CIMultiDict[str],
    ) -> web.StreamResponse:
        """Pass a blob through from `upstream` without the store: its digest is held from
        another upstream, and one upstream's word is no authority over another's content.
        Relayed bytes are not verified here; the client checks the digest, as it does with
        any registry."""
        authorization = request.headers.get("Authorization")
        length = await self.registry.blob_length(
            upstream, route.repository, route.reference, authorization
        )
        if request.method == "HEAD":
            return await self._head(request, headers, str(length))
        span = resolve_span(wanted, length, headers)
        if isinstance(span, web.Response):
            return span
        source = self.registry.blob_source(
            upstream, route.repository, route.reference, authorization, content_length=length
        )
        response = web.StreamResponse(status=span.status, headers=headers)
        response.content_length = span.count
        chunks = source.read(span.start, span.count)
        async with _closing(chunks):
            # The first bytes before the headers, so an early refusal keeps its status.
            first = await anext(chunks, b"") if span.count else b""
            await response.prepare(request)
            try:
                chunk = first
                while chunk:
                    await response.write(chunk)
                    self.metrics.served_bytes.inc(len(chunk))
                    chunk = await anext(chunks, b"")
            except (D7yError, OSError) as error:
                _log_cut(request, error)
                _abort(request)
                return response
        await response.write_eof()
        return response

    async def _stream(
        self,
        request: web.Request,
        handle: TaskHandle,
        span: ByteRange,
        headers: CIMultiDict[str],
        from_store: bool,
    ) -> web.StreamResponse:
        """Send `span` of the task: headers once its first bytes are on disk (so an early
        failure still gets a proper error status), then segment after segment."""
        response = web.StreamResponse(status=span.status, headers=headers)
        response.content_length = span.count
        if not span.count:
            await response.prepare(request)
            await response.write_eof()
            return response
        sender = _SegmentSender(request, response)
        async with _closing(handle.segments(span.start, span.count)) as segments:
            try:
                first = await anext(segments)  # a failure here becomes an error response
            except StopAsyncIteration:
                raise TaskFailed("the task yielded no bytes for a non-empty range") from None
            await response.prepare(request)
            try:
                segment: Segment | None = first
                while segment is not None:
                    await self._count(sender.send(segment), from_store)
                    segment = await anext(segments, None)
            except (D7yError, OSError) as error:
                # Headers (and maybe bytes) are out: cut the connection so the client sees a
                # short body rather than a wrong one.
                _log_cut(request, error)
                sender.abort()
                return response
            except BaseException:
                sender.abort()
                raise
        await response.write_eof()
        return response

    async def _count(self, sending: Awaitable[int], from_store: bool) -> None:
        sent = await sending
        self.metrics.served_bytes.inc(sent)
        if from_store:
            self.metrics.cache_bytes.inc(sent)


def _log_cut(request: web.Request, error: Exception) -> None:
    if isinstance(error, D7yError):
        log.warning("%s cut off after its headers: %s", request.path, error)
    else:  # the client went away: nothing wrong here
        log.debug("%s: client went away: %s", request.path, error)


def _abort(request: web.Request) -> None:
    """Close the connection under a response whose headers are out (a short body follows)."""
    transport = request.transport
    if transport is not None:
        transport.close()


@contextlib.asynccontextmanager
async def _closing(iterator: AsyncIterator[T]) -> AsyncIterator[AsyncIterator[T]]:
    """Close an abandoned async iterator at once (a task forgets the reader's range, a
    response goes back to the pool)."""
    try:
        yield iterator
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()


class _SegmentSender:
    """Writes segments of a data file to one response, the cheapest way the loop allows:

    1. `loop.sendfile` on the transport, as aiohttp's `FileResponse` does (asyncio's own loop);
    2. `sendfile(2)` from a worker thread on a duplicate of the socket's descriptor (uvloop,
       which has no `loop.sendfile`): only once the transport's own buffer is empty, and
       nothing else writes to the connection while a response is being sent, so the bytes stay
       in order; the duplicate keeps the socket alive even if the loop closes its descriptor;
    3. `pread` + write otherwise (TLS, no socket).
    """

    def __init__(self, request: web.Request, response: web.StreamResponse) -> None:
        self.request = request
        self.response = response
        self.loop = asyncio.get_running_loop()
        self.mode = SEND_LOOP

    async def send(self, segment: Segment) -> int:
        if self.mode == SEND_LOOP:
            try:
                return await self._loop_sendfile(segment)
            except _NoSendfile:
                self.mode = SEND_THREAD
        if self.mode == SEND_THREAD:
            try:
                return await self._thread_sendfile(segment)
            except _NoSendfile:
                self.mode = SEND_COPY
        return await self._copy(segment)

    def _transport(self) -> asyncio.Transport:
        transport = self.request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("client went away")
        return transport

    async def _loop_sendfile(self, segment: Segment) -> int:
        transport = self._transport()
        # The headers were sent by prepare(); the loop waits until the transport's buffer is
        # empty before the first sendfile byte, so the order on the wire is kept.
        # Wrapping an open descriptor does no blocking I/O.
        with open(segment.fd, "rb", buffering=0, closefd=False) as file:  # noqa: ASYNC230
            try:
                sent = await self.loop.sendfile(
                    transport, file, segment.offset, segment.count, fallback=False
                )
            except (NotImplementedError, asyncio.SendfileNotAvailableError) as err:
                # Raised only before any byte was sent (uvloop, TLS, odd files).
                raise _NoSendfile from err
            except RuntimeError as err:
                if transport.is_closing():
                    raise ConnectionResetError("client went away") from err
                raise _NoSendfile from err
        if sent != segment.count:
            raise ConnectionResetError(f"sendfile stopped after {sent} of {segment.count}")
        return sent

    async def _thread_sendfile(self, segment: Segment) -> int:
        transport = self._transport()
        sock = transport.get_extra_info("socket")
        if sock is None or transport.get_extra_info("sslcontext") is not None:
            raise _NoSendfile
        while transport.get_write_buffer_size():
            await asyncio.sleep(WRITE_BUFFER_POLL)
            transport = self._transport()
        socket_fd = os.dup(sock.fileno())
        try:
            offset, remaining = segment.offset, segment.count
            stalled_since = self.loop.time()
            while remaining:
                sent = await self.loop.run_in_executor(
                    None, _send_file_slice, socket_fd, segment.fd, offset, remaining
                )
                now = self.loop.time()
                if sent:
                    stalled_since = now
                elif now - stalled_since > SEND_STALL_SECONDS:
                    raise TimeoutError(f"client took no byte for {SEND_STALL_SECONDS:.0f}s")
                offset += sent
                remaining -= sent
                self._transport()  # the loop saw the client go: stop
        finally:
            os.close(socket_fd)
        return segment.count

    async def _copy(self, segment: Segment) -> int:
        offset, remaining = segment.offset, segment.count
        while remaining:
            size = min(COPY_CHUNK_BYTES, remaining)
            data = await self.loop.run_in_executor(None, os.pread, segment.fd, size, offset)
            if not data:
                raise TaskFailed("data file ended before its verified pieces")
            await self.response.write(data)
            offset += len(data)
            remaining -= len(data)
        return segment.count

    def abort(self) -> None:
        _abort(self.request)


def _send_file_slice(socket_fd: int, file_fd: int, offset: int, count: int) -> int:
    """In a worker thread: `sendfile` up to `count` bytes to a non-blocking socket for at
    most `SEND_SLICE_SECONDS`, waiting for room with `poll`. Returns the bytes sent (0 if the
    client took none in that time); raises `OSError` when the connection broke."""
    poller = select.poll()
    poller.register(socket_fd, select.POLLOUT)
    deadline = time.monotonic() + SEND_SLICE_SECONDS
    sent = 0
    while sent < count:
        try:
            done = os.sendfile(socket_fd, file_fd, offset + sent, min(count - sent, SEND_BYTES))
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            poller.poll(left * 1000)
            continue
        if done == 0:
            raise OSError(errno.EIO, "data file ended before its verified pieces")
        sent += done
        if time.monotonic() >= deadline:
            break
    return sent


class _NoSendfile(Exception):
    """`sendfile` is not possible on this loop or transport; copy instead."""
