"""OCI image documents and the registry conversation the converter needs: pull and push.

Owns resolving an image reference to one platform's manifest (an index or manifest list → the
entry for `os/arch[/variant]`), checking descriptors, streaming a blob into a local file while its
sha256 is verified, and the push side of the distribution API: blob uploads (`POST` then a
monolithic `PUT ?digest=`, skipped when a `HEAD` finds the blob already there) and the manifest
`PUT`.

Pulling goes through `registry.RegistryClient` (its pooled session, hand-followed redirects that
drop `Authorization` off-host, and its error mapping). `RegistryClient.request` is for idempotent
requests only (it resends once on a stale pooled connection), so uploads use a session of their
own here: a `POST` or `PUT` must never be sent twice behind the caller's back. Credentials are
the node's own logins (`registry_auth.RegistryLogin`: a Docker `config.json`, Basic or a Bearer
token per repository, `pull` to read and `pull,push` to write), or one fixed `Authorization`
the caller gives.

Does not know about layers' contents (`convert.py`) or about RAFS.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform as host_platform
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

from d7y_node.config import RegistryConfig
from d7y_node.errors import D7yError, InvalidRequest, UpstreamStatus, UpstreamUnavailable
from d7y_node.metrics import Metrics
from d7y_node.preheat import ImageReference, Platform, parse_image_reference
from d7y_node.registry import USER_AGENT, RegistryClient, Upstream, parse_upstream_url
from d7y_node.registry_auth import Credentials, RegistryLogin

MEDIA_TYPE_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_TYPE_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_TYPE_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_TYPE_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_TYPE_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = frozenset({MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_DOCKER_LIST})
MANIFEST_TYPES = frozenset({MEDIA_TYPE_OCI_MANIFEST, MEDIA_TYPE_DOCKER_MANIFEST})
ACCEPT = ", ".join(sorted(INDEX_TYPES | MANIFEST_TYPES))

# The distribution spec's registries refuse manifests over 4 MiB; configs are of the same kind.
MAX_DOCUMENT_BYTES = 4 * 1024 * 1024
# An index may point at another index (rare); deeper nesting is a loop or abuse.
MAX_INDEX_DEPTH = 2
# Blob bytes are written to disk in pieces of at most this size.
DOWNLOAD_BLOCK_BYTES = 1 << 20
# Upload bodies are read from disk in pieces of this size.
UPLOAD_BLOCK_BYTES = 4 << 20
# An upload is only given up when no byte moved for this long (a multi-GiB layer takes minutes).
UPLOAD_STALL_SECONDS = 300.0
DEFAULT_TAG = "latest"
DOCKER_HUB_HOST = "docker.io"
DOCKER_HUB_OFFICIAL_NAMESPACE = "library"

# `platform.machine()` names → GOARCH names, which OCI platforms use.
MACHINE_ARCHITECTURES = {
    "x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
    "armv7l": "arm", "armv6l": "arm", "i686": "386", "i386": "386",
    "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64",
}


def default_platform() -> Platform:
    """linux/<this machine's architecture>."""
    machine = host_platform.machine().lower()
    return Platform("linux", MACHINE_ARCHITECTURES.get(machine, machine))


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor as a manifest holds it."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, entry: Any, what: str) -> Descriptor:
        if not isinstance(entry, dict):
            raise InvalidRequest("MANIFEST_INVALID", f"{what} is not an object")
        digest = entry.get("digest")
        size = entry.get("size")
        media_type = entry.get("mediaType", "")
        if not isinstance(digest, str) or not _is_sha256(digest):
            raise InvalidRequest("MANIFEST_INVALID", f"{what} has no sha256 digest")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidRequest("MANIFEST_INVALID", f"{what} ({digest}) has a bad size")
        annotations = entry.get("annotations") or {}
        if not isinstance(media_type, str) or not isinstance(annotations, dict):
            raise InvalidRequest("MANIFEST_INVALID", f"{what} ({digest}) is malformed")
        return cls(media_type, digest, size, {str(k): str(v) for k, v in annotations.items()})

    def as_json(self) -> dict[str, Any]:
        value: dict[str, Any] = {
            "mediaType": self.media_type, "digest": self.digest, "size": self.size,
        }
        if self.annotations:
            value["annotations"] = dict(self.annotations)
        return value


def _is_sha256(digest: str) -> bool:
    algorithm, _, hex_part = digest.partition(":")
    return (
        algorithm == "sha256" and len(hex_part) == 64
        and all(c in "0123456789abcdef" for c in hex_part)
    )


@dataclass(frozen=True)
class ImageManifest:
    """One platform's image: its manifest document, config and layers."""

    digest: str
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]

    @classmethod
    def parse(cls, body: bytes, media_type: str) -> ImageManifest:
        document = json_object(body, "manifest")
        if document.get("schemaVersion") != 2:
            raise InvalidRequest("MANIFEST_INVALID", "only schema version 2 manifests convert")
        layers = document.get("layers")
        if not isinstance(layers, list):
            raise InvalidRequest("MANIFEST_INVALID", "the manifest has no layer list")
        return cls(
            sha256_digest(body),
            media_type,
            Descriptor.parse(document.get("config"), "the config descriptor"),
            tuple(Descriptor.parse(layer, f"layer {index}") for index, layer in enumerate(layers)),
        )


def json_object(body: bytes, what: str) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidRequest("MANIFEST_INVALID", f"the {what} is not JSON: {err}") from None
    if not isinstance(document, dict):
        raise InvalidRequest("MANIFEST_INVALID", f"the {what} is not a JSON object")
    return document


@dataclass(frozen=True)
class ImageLocation:
    """Where an image lives: its registry, repository and tag or digest."""

    upstream: Upstream
    repository: str
    reference: str

    @classmethod
    def parse(cls, text: str, insecure: tuple[str, ...]) -> ImageLocation:
        parsed: ImageReference = parse_image_reference(text)
        host = parsed.registry or DOCKER_HUB_HOST
        upstream = parse_upstream_url(host, insecure, text)
        repository = parsed.repository
        if parsed.registry is None and "/" not in repository:
            repository = f"{DOCKER_HUB_OFFICIAL_NAMESPACE}/{repository}"
        return cls(upstream, repository, parsed.digest or parsed.tag or DEFAULT_TAG)

    def __str__(self) -> str:
        separator = "@" if self.reference.startswith("sha256:") else ":"
        return f"{self.upstream.host}/{self.repository}{separator}{self.reference}"


class OciRegistry:
    """Pulls and pushes images for the converter; `async with` closes its sessions."""

    def __init__(
        self, insecure_registries: tuple[str, ...] = (), authorization: str | None = None,
        *, metrics: Metrics | None = None, credentials: Credentials | None = None,
    ) -> None:
        self.insecure_registries = insecure_registries
        self._pull = RegistryClient(
            RegistryConfig(insecure_registries=insecure_registries), metrics or Metrics()
        )
        self._authorization = authorization
        self._login = (
            RegistryLogin(self._pull, credentials)
            if credentials is not None and authorization is None else None
        )
        self._push_session: aiohttp.ClientSession | None = None

    async def _headers(self, image: ImageLocation, actions: str = "pull") -> dict[str, str]:
        """`Authorization` for `image`'s repository: the fixed one, or the node's login."""
        value = self._authorization
        if value is None and self._login is not None:
            value = await self._login.authorization(image.upstream, image.repository, actions)
        return {"Authorization": value} if value else {}

    async def __aenter__(self) -> OciRegistry:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._pull.close()
        if self._push_session is not None:
            await self._push_session.close()
            self._push_session = None

    def location(self, text: str) -> ImageLocation:
        return ImageLocation.parse(text, self.insecure_registries)

    # -- pulling ----------------------------------------------------------------------------

    async def _document(self, image: ImageLocation, url: URL, accept: str) -> tuple[bytes, str]:
        headers = {**await self._headers(image), "Accept": accept}
        response = await self._pull.fetch("GET", url, headers, max_bytes=MAX_DOCUMENT_BYTES)
        media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        return response.body, media_type

    async def resolve(self, image: ImageLocation, wanted: Platform) -> ImageManifest:
        """The manifest of `image` for `wanted` (an index is followed to its entry)."""
        reference = image.reference
        for _depth in range(MAX_INDEX_DEPTH + 1):
            url = RegistryClient.manifest_url(image.upstream, image.repository, reference)
            body, media_type = await self._document(image, url, ACCEPT)
            if reference.startswith("sha256:") and sha256_digest(body) != reference:
                raise UpstreamUnavailable(f"{image}: manifest does not match its digest")
            document = json_object(body, "manifest")
            media_type = str(document.get("mediaType") or media_type)
            if media_type in INDEX_TYPES or (
                "manifests" in document and "layers" not in document
            ):
                reference = _select_platform(document, wanted, image)
                continue
            if media_type not in MANIFEST_TYPES and "layers" not in document:
                raise InvalidRequest("MANIFEST_INVALID", f"{image}: unsupported {media_type!r}")
            return ImageManifest.parse(body, media_type or MEDIA_TYPE_OCI_MANIFEST)
        raise InvalidRequest("MANIFEST_INVALID", f"{image}: indexes nested too deep")

    async def config(self, image: ImageLocation, descriptor: Descriptor) -> dict[str, Any]:
        """The image config, verified against its descriptor."""
        if descriptor.size > MAX_DOCUMENT_BYTES:
            raise InvalidRequest("MANIFEST_INVALID", f"config of {descriptor.size} bytes")
        url = RegistryClient.blob_url(image.upstream, image.repository, descriptor.digest)
        response = await self._pull.fetch(
            "GET", url, await self._headers(image), max_bytes=MAX_DOCUMENT_BYTES
        )
        if sha256_digest(response.body) != descriptor.digest:
            raise UpstreamUnavailable(f"config of {image} does not match {descriptor.digest}")
        return json_object(response.body, "config")

    async def download(
        self, image: ImageLocation, descriptor: Descriptor, path: Path,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Write the blob into `path`, checking its size and sha256 (the file is removed when
        they do not match)."""
        url = RegistryClient.blob_url(image.upstream, image.repository, descriptor.digest)
        response = await self._pull.request("GET", url, await self._headers(image), whole=False)
        hasher = hashlib.sha256()
        received = 0
        try:
            if response.status != 200:
                raise await self._pull.status_error(response)
            with path.open("wb") as target:
                async for block in response.content.iter_chunked(DOWNLOAD_BLOCK_BYTES):
                    received += len(block)
                    if received > descriptor.size:
                        raise UpstreamUnavailable(
                            f"{descriptor.digest}: more than the {descriptor.size} bytes announced"
                        )
                    hasher.update(block)
                    target.write(block)
                    if progress is not None:
                        progress(len(block))
        except (aiohttp.ClientError, TimeoutError) as err:
            _discard(path)
            raise UpstreamUnavailable(f"{descriptor.digest}: {err or type(err).__name__}") from err
        except BaseException:
            _discard(path)
            raise
        finally:
            response.release()
        if received != descriptor.size or "sha256:" + hasher.hexdigest() != descriptor.digest:
            _discard(path)
            raise UpstreamUnavailable(f"{descriptor.digest}: the bytes do not match the digest")

    # -- pushing ----------------------------------------------------------------------------

    def _session(self) -> aiohttp.ClientSession:
        if self._push_session is None or self._push_session.closed:
            self._push_session = aiohttp.ClientSession(
                auto_decompress=False,
                headers={"User-Agent": USER_AGENT},
                trust_env=False,
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=30.0, sock_read=UPLOAD_STALL_SECONDS
                ),
            )
        return self._push_session

    async def _call(
        self, image: ImageLocation, method: str, url: URL, *, data: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, Mapping[str, str], bytes]:
        sent = {**await self._headers(image, "pull,push"), **(headers or {})}
        try:
            async with self._session().request(
                method, url, data=data, headers=sent, allow_redirects=False,
            ) as response:
                body = await response.content.read(MAX_DOCUMENT_BYTES)
                return response.status, dict(response.headers), body
        except (aiohttp.ClientError, TimeoutError) as err:
            raise UpstreamUnavailable(f"{url.host}: {err or type(err).__name__}") from err

    async def has_blob(self, image: ImageLocation, digest: str) -> bool:
        url = RegistryClient.blob_url(image.upstream, image.repository, digest)
        status, _headers, _body = await self._call(image, "HEAD", url)
        return status == 200

    async def push_blob(
        self, image: ImageLocation, digest: str, path: Path,
        progress: Callable[[int], None] | None = None,
    ) -> bool:
        """Upload the file `path` as blob `digest` unless the repository has it; True if sent.
        `progress` is called with the size of each block as it is handed to the connection."""
        if await self.has_blob(image, digest):
            return False
        start = image.upstream.base_url.with_path(
            f"/v2/{image.repository}/blobs/uploads/", encoded=True
        )
        status, headers, body = await self._call(image, "POST", start)
        location = headers.get("Location")
        if status != 202 or not location:
            raise UpstreamStatus(status, headers, body)
        upload = start.join(URL(location))
        if (upload.scheme, upload.host, upload.port) != (start.scheme, start.host, start.port):
            raise UpstreamUnavailable(f"{start.host} sent the upload to another host")
        upload = upload.update_query({"digest": digest})
        size = os.stat(path).st_size
        status, headers, body = await self._call(
            image, "PUT", upload, data=_file_body(path, progress),
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
        )
        if status != 201:
            raise UpstreamStatus(status, headers, body)
        return True

    async def push_manifest(self, image: ImageLocation, body: bytes, media_type: str) -> str:
        """PUT the manifest under the image's tag (or digest); its digest."""
        url = RegistryClient.manifest_url(image.upstream, image.repository, image.reference)
        status, headers, answer = await self._call(
            image, "PUT", url, data=body, headers={"Content-Type": media_type}
        )
        if status not in (200, 201):
            raise UpstreamStatus(status, headers, answer)
        return sha256_digest(body)


def _discard(path: Path) -> None:
    path.unlink(missing_ok=True)


async def _file_body(path: Path, progress: Callable[[int], None] | None = None) -> Any:
    with path.open("rb") as source:
        while block := source.read(UPLOAD_BLOCK_BYTES):
            yield block
            if progress is not None:
                progress(len(block))


def _select_platform(document: dict[str, Any], wanted: Platform, image: ImageLocation) -> str:
    entries = document.get("manifests")
    if not isinstance(entries, list):
        raise InvalidRequest("MANIFEST_INVALID", f"{image}: an index without manifests")
    available = []
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        platform = entry.get("platform")
        if not isinstance(platform, dict):
            continue
        available.append(f"{platform.get('os')}/{platform.get('architecture')}")
        if wanted.matches(platform):
            return Descriptor.parse(entry, "an index entry").digest
    raise D7yError(
        f"{image} has no {wanted.os}/{wanted.architecture} image "
        f"(it has: {', '.join(available) or 'none'})"
    )


def file_sha256(path: str | os.PathLike[str]) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as source:
        while block := source.read(UPLOAD_BLOCK_BYTES):
            hasher.update(block)
    return "sha256:" + hasher.hexdigest()
