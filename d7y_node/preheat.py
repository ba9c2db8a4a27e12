"""`d7y-node preheat IMAGE_REF`: every blob of an image fetched by its home now, before pulls.

Owns:
- image references (`parse_image_reference`): `[REGISTRY/]NAME[:TAG][@sha256:HEX]`; the first
  component is a registry when it has a `.` or `:` or is `localhost` (as docker decides); a
  reference without one goes to the node's default upstream (`--registry-mirror`), and there a
  one-component name on Docker Hub gets `library/`; the tag defaults to `latest`;
- manifest resolution (`resolve_blobs`) through the node's `RegistryClient`, anonymously: an
  index (OCI or Docker list) gives its platform manifests (all of them, or those matching
  `--platform os/arch[/variant]`; attestation entries with platform `unknown/unknown` are
  skipped), each manifest gives its config and layers; manifests fetched by digest are kept
  in the store as the mirror keeps them, so a later pull finds them too;
- the node's route `POST /api/v1/preheat?image=REF[&platform=P]`, which hands every blob to
  `FetchService.ask_home(..., wait=True)`: the blob's home 0 (else home 1, else this host)
  downloads it whole from origin and answers once it is complete, and the route streams one
  JSON line per blob (digest, size, media type, the host that fetched it, or the error);
- the command's client side (`preheat`), printing one line per blob.

Registries that need a token flow (Docker Hub, most clouds) are not supported: the node runs
no token flows (`registry.py`), so preheat works against registries that answer anonymously.
Does not fetch bytes itself (`fetch.py`, `tasks.py`) nor decide homes (`p2p.py`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from aiohttp import web

from d7y_node.errors import D7yError, InvalidRequest
from d7y_node.fetch import (
    FetchService,
    FetchTarget,
    NodeParts,
    error_json,
    error_response,
    open_node,
    signed_request,
)
from d7y_node.peer import PeerAuth
from d7y_node.proxy import (
    MANIFEST_TYPE_ATTRIBUTE,
    REPOSITORY_ATTRIBUTE,
    UPSTREAM_ATTRIBUTE,
    parse_route,
)
from d7y_node.registry import DOCKER_HUB_API_HOST, RegistryClient, Upstream, parse_upstream_url

log = logging.getLogger(__name__)

PREHEAT_PATH = "/api/v1/preheat"

INDEX_TYPES = frozenset({
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
})
MANIFEST_TYPES = frozenset({
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
})
ACCEPT = ", ".join(sorted(INDEX_TYPES | MANIFEST_TYPES))
# Platforms of index entries that are not images (buildkit's attestation manifests).
UNKNOWN_PLATFORM = "unknown"
DEFAULT_TAG = "latest"
# Blobs fetched at once: each is a home's whole download; a few keep homes busy in parallel
# without one preheat flooding the origin.
PREHEAT_CONCURRENCY = 4
# An index nests at most this deep (an index of indexes is legal, deeper is abuse).
MAX_INDEX_DEPTH = 2

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class ImageReference:
    """A parsed image reference; `registry` None means the node's default upstream."""

    registry: str | None
    repository: str
    tag: str | None
    digest: str | None

    @property
    def reference(self) -> str:
        return self.digest or self.tag or DEFAULT_TAG


def parse_image_reference(text: str) -> ImageReference:
    """See the module docstring. Raises `InvalidRequest`."""
    value = text.strip()
    digest = None
    if "@" in value:
        value, digest = value.rsplit("@", 1)
        if not _DIGEST.fullmatch(digest):
            raise InvalidRequest("DIGEST_INVALID", f"{digest!r} is not sha256: and 64 hex digits")
    registry = None
    first, _, rest = value.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        registry, value = first, rest
    tag = None
    name, colon, maybe_tag = value.rpartition(":")
    if colon and "/" not in maybe_tag:
        value, tag = name, maybe_tag
    if not value:
        raise InvalidRequest("NAME_INVALID", f"no repository name in {text!r}")
    return ImageReference(registry, value, tag, digest)


@dataclass(frozen=True)
class Platform:
    """`os/architecture[/variant]`, as in an index entry's `platform`."""

    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.strip().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise InvalidRequest("PLATFORM_INVALID", f"expected os/arch[/variant], got {text!r}")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    def matches(self, entry: dict[str, Any]) -> bool:
        return (
            entry.get("os") == self.os
            and entry.get("architecture") == self.architecture
            and (self.variant is None or entry.get("variant") == self.variant)
        )


@dataclass(frozen=True)
class BlobToFetch:
    """One blob of the image: a config or a layer."""

    digest: str
    size: int
    media_type: str


def _descriptor(entry: Any) -> BlobToFetch:
    if not isinstance(entry, dict) or not _DIGEST.fullmatch(str(entry.get("digest", ""))):
        raise InvalidRequest("MANIFEST_INVALID", "a descriptor without a sha256 digest")
    size = entry.get("size")
    if not isinstance(size, int) or size < 0:
        raise InvalidRequest("MANIFEST_INVALID", f"descriptor {entry['digest']} has a bad size")
    return BlobToFetch(entry["digest"], size, str(entry.get("mediaType", "")))


KeepManifest = Callable[[str, bytes, str], Any]


async def resolve_blobs(
    registry: RegistryClient,
    upstream: Upstream,
    repository: str,
    reference: str,
    *,
    platform: Platform | None,
    max_bytes: int,
    keep: KeepManifest | None = None,
    depth: int = 0,
) -> list[BlobToFetch]:
    """The config and layers of the image (every platform's, or `platform`'s), each once."""
    parse_route(f"/v2/{repository}/manifests/{reference}")  # validates name and reference
    url = registry.manifest_url(upstream, repository, reference)
    answer = await registry.fetch("GET", url, {"Accept": ACCEPT}, max_bytes=max_bytes)
    content_type = answer.headers.get("Content-Type", "").split(";")[0].strip()
    try:
        document = json.loads(answer.body)
    except ValueError:
        raise InvalidRequest("MANIFEST_INVALID", f"{repository}:{reference} is not JSON") from None
    if not isinstance(document, dict):
        raise InvalidRequest("MANIFEST_INVALID", f"{repository}:{reference} is not an object")
    media_type = str(document.get("mediaType") or content_type)
    held = "sha256:" + hashlib.sha256(answer.body).hexdigest()
    if keep is not None and _DIGEST.fullmatch(reference) and held == reference:
        await keep(reference, answer.body, media_type)
    blobs: dict[str, BlobToFetch] = {}
    if media_type in INDEX_TYPES or "manifests" in document:
        if depth >= MAX_INDEX_DEPTH:
            raise InvalidRequest("MANIFEST_INVALID", "indexes nest too deep")
        for entry in document.get("manifests") or []:
            child = _descriptor(entry)
            wanted = entry.get("platform") or {}
            if wanted.get("os") == UNKNOWN_PLATFORM:
                continue
            if platform is not None and not platform.matches(wanted):
                continue
            for blob in await resolve_blobs(
                registry, upstream, repository, child.digest, platform=platform,
                max_bytes=max_bytes, keep=keep, depth=depth + 1,
            ):
                blobs.setdefault(blob.digest, blob)
        if not blobs:
            wanted_text = f" for {platform.os}/{platform.architecture}" if platform else ""
            raise InvalidRequest("MANIFEST_UNKNOWN", f"no image manifest{wanted_text}", status=404)
        return list(blobs.values())
    if media_type not in MANIFEST_TYPES and "layers" not in document:
        raise InvalidRequest("MANIFEST_INVALID", f"unsupported manifest type {media_type!r}")
    for entry in [document.get("config"), *(document.get("layers") or [])]:
        blob = _descriptor(entry)
        blobs.setdefault(blob.digest, blob)
    return list(blobs.values())


class PreheatService:
    """The node's preheat route (see the module docstring)."""

    def __init__(self, node: NodeParts, fetch: FetchService) -> None:
        self.node = node
        self.fetch = fetch

    def register(self, app: web.Application) -> None:
        app.router.add_post(PREHEAT_PATH, self._preheat)

    def upstream_of(self, image: ImageReference) -> tuple[Upstream, str]:
        insecure = self.node.config.registry.insecure_registries
        upstream = (
            parse_upstream_url(image.registry, insecure, "image")
            if image.registry is not None else self.node.registry.default_upstream
        )
        repository = image.repository
        if upstream.host == DOCKER_HUB_API_HOST and "/" not in repository:
            repository = f"library/{repository}"
        return upstream, repository

    async def _preheat(self, request: web.Request) -> web.StreamResponse:
        reason = self.fetch.allowed(request, members=False)
        if reason is not None:
            return error_json(401 if self.node.peer_auth else 403, "UNAUTHORIZED",
                              f"refused: {reason}")
        try:
            image = parse_image_reference(request.query.get("image", ""))
            platform_text = request.query.get("platform")
            platform = Platform.parse(platform_text) if platform_text else None
            upstream, repository = self.upstream_of(image)
            blobs = await resolve_blobs(
                self.node.registry, upstream, repository, image.reference, platform=platform,
                max_bytes=self.node.config.proxy.max_manifest_bytes,
                keep=self._keeper(upstream, repository),
            )
        except D7yError as error:
            return error_response(error)
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        limit = asyncio.Semaphore(PREHEAT_CONCURRENCY)

        async def one(blob: BlobToFetch) -> dict[str, Any]:
            async with limit:
                return await self._fetch_blob(upstream, repository, blob)

        for finished in asyncio.as_completed([one(blob) for blob in blobs]):
            line = await finished
            await response.write(json.dumps(line).encode() + b"\n")
        await response.write_eof()
        return response

    def _keeper(self, upstream: Upstream, repository: str) -> KeepManifest:
        async def keep(digest: str, body: bytes, media_type: str) -> None:
            try:
                await self.node.tasks.put(
                    digest, body, sha256=digest.removeprefix("sha256:"),
                    attributes={
                        MANIFEST_TYPE_ATTRIBUTE: media_type,
                        UPSTREAM_ATTRIBUTE: str(upstream),
                        REPOSITORY_ATTRIBUTE: repository,
                    },
                )
            except D7yError as error:
                log.warning("not keeping manifest %s: %s", digest, error)

        return keep

    async def _fetch_blob(
        self, upstream: Upstream, repository: str, blob: BlobToFetch
    ) -> dict[str, Any]:
        target = FetchTarget(
            task_id=blob.digest,
            url=str(RegistryClient.blob_url(upstream, repository, blob.digest)),
            sha256=blob.digest.removeprefix("sha256:"),
            upstream=upstream,
            repository=repository,
        )
        started = time.monotonic()
        line: dict[str, Any] = {"digest": blob.digest, "size": blob.size,
                                "media_type": blob.media_type}
        try:
            answer = await self.fetch.ask_home(target, wait=True)
        except D7yError as error:
            line["error"] = str(error)
            return line
        if answer is not None:
            line["host"] = answer.host or self.node.member_id
            line["size"] = answer.content_length
            line["complete"] = answer.complete
        line["seconds"] = round(time.monotonic() - started, 3)
        return line


# -- the command's client side -------------------------------------------------------------------

# The node answers a preheat as its blobs complete; between two lines it may fetch a big blob.
PREHEAT_STALL_SECONDS = 3600.0


def preheat(
    base: str, image: str, platform: str | None, auth: PeerAuth | None, out: IO[str]
) -> int:
    """Preheat `image` through the node at `base`; print one line per blob to `out`
    (`DIGEST SIZE HOST`, or `DIGEST error: ...`). Returns how many blobs failed."""
    query = {"image": image, **({"platform": platform} if platform else {})}
    request = signed_request(base, f"{PREHEAT_PATH}?{urllib.parse.urlencode(query)}", "POST",
                             auth)
    failures = 0
    with open_node(request, PREHEAT_STALL_SECONDS) as response:
        for raw in response:
            if not raw.strip():
                continue
            line = json.loads(raw)
            if "error" in line:
                failures += 1
                out.write(f"{line['digest']}  error: {line['error']}\n")
            else:
                out.write(f"{line['digest']}  {line['size']:>12}  {line.get('host') or '-'}\n")
            out.flush()
    return failures


def register_commands(app: web.Application, node: NodeParts) -> None:
    """Add the `get`, `fetch` and `preheat` routes to the node's peer-port application."""
    fetch = FetchService(node)
    fetch.register(app)
    PreheatService(node, fetch).register(app)
