"""Tests of `d7y-node preheat` (`d7y_node.preheat`): image references, manifest resolution, and
a preheat through real nodes in one process against a small real registry app on 127.0.0.1 (the
integration test uses the real docker-registry)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from d7y_node.errors import D7yError, InvalidRequest
from d7y_node.peer import task_key_for
from d7y_node.preheat import ImageReference, Platform, parse_image_reference, preheat
from d7y_node.scheduler import task_homes
from tests.harness.background import serve_in_loop
from tests.test_get import base_of
from tests.test_p2p import cluster

INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def test_image_references() -> None:
    assert parse_image_reference("busybox") == ImageReference(None, "busybox", None, None)
    assert parse_image_reference("127.0.0.1:5000/library/busybox:1.36") == ImageReference(
        "127.0.0.1:5000", "library/busybox", "1.36", None
    )
    digest = "sha256:" + "a" * 64
    parsed = parse_image_reference(f"localhost/x/y@{digest}")
    assert parsed == ImageReference("localhost", "x/y", None, digest)
    assert parsed.reference == digest
    assert parse_image_reference("user/app").registry is None  # no dot, colon or localhost
    assert parse_image_reference("user/app").reference == "latest"
    with pytest.raises(InvalidRequest):
        parse_image_reference("x@sha256:short")
    assert Platform.parse("linux/arm64/v8") == Platform("linux", "arm64", "v8")
    with pytest.raises(InvalidRequest):
        Platform.parse("linux")


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Registry:
    """Manifests and blobs of one repository over the distribution API (GET, HEAD, ranges),
    counting the blob bytes it sends per digest."""

    def __init__(self) -> None:
        self.manifests: dict[str, tuple[str, bytes]] = {}
        self.blobs: dict[str, bytes] = {}
        self.sent: dict[str, int] = {}
        self.url = ""
        self._runner: web.AppRunner | None = None

    def add_blob(self, data: bytes) -> dict[str, object]:
        digest = digest_of(data)
        self.blobs[digest] = data
        return {"mediaType": "application/octet-stream", "digest": digest, "size": len(data)}

    def add_manifest(self, media_type: str, document: dict[str, object],
                     tag: str | None = None) -> dict[str, object]:
        body = json.dumps({"schemaVersion": 2, "mediaType": media_type, **document}).encode()
        digest = digest_of(body)
        self.manifests[digest] = (media_type, body)
        if tag is not None:
            self.manifests[tag] = (media_type, body)
        return {"mediaType": media_type, "digest": digest, "size": len(body)}

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/v2/{name:.+}/manifests/{reference}", self._manifest)
        app.router.add_route("*", "/v2/{name:.+}/blobs/{digest}", self._blob)
        self._runner, port = await serve_in_loop(app)
        self.url = f"127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _manifest(self, request: web.Request) -> web.Response:
        found = self.manifests.get(request.match_info["reference"])
        if found is None:
            return web.Response(status=404)
        return web.Response(body=found[1], headers={"Content-Type": found[0]})

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        digest = request.match_info["digest"]
        data = self.blobs.get(digest)
        if data is None:
            return web.Response(status=404)
        start, end, status = 0, len(data), 200
        header = request.headers.get("Range")
        if header:
            first, _, last = header.removeprefix("bytes=").partition("-")
            start, end, status = int(first), min(len(data), int(last) + 1), 206
        response = web.StreamResponse(status=status)
        response.content_length = end - start
        if status == 206:
            response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        await response.prepare(request)
        if request.method != "HEAD":
            await response.write(data[start:end])
            self.sent[digest] = self.sent.get(digest, 0) + end - start
        await response.write_eof()
        return response


@pytest.fixture
async def registry() -> AsyncIterator[Registry]:
    server = Registry()
    generator = random.Random(5)
    manifests = []
    for architecture in ("amd64", "arm64"):
        config = server.add_blob(json.dumps({"architecture": architecture}).encode())
        layers = [server.add_blob(generator.randbytes(size)) for size in (700_000, 90_000)]
        shared = server.add_blob(b"a layer both platforms share" * 1000)
        manifest = server.add_manifest(MANIFEST, {"config": config,
                                                  "layers": [*layers, shared]})
        manifests.append({**manifest, "platform": {"os": "linux", "architecture": architecture}})
    attestation = server.add_manifest(MANIFEST, {"config": server.add_blob(b"{}"), "layers": []})
    manifests.append({**attestation, "platform": {"os": "unknown", "architecture": "unknown"}})
    server.add_manifest(INDEX, {"manifests": manifests}, tag="v1")
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def run_preheat(node_base: str, image: str, platform: str | None = None) -> list[str]:
    out = io.StringIO()
    failures = await asyncio.to_thread(preheat, node_base, image, platform, None, out)
    assert failures == 0, out.getvalue()
    return out.getvalue().splitlines()


async def test_each_blob_is_fetched_by_its_home(tmp_path: Path, registry: Registry) -> None:
    async with cluster(tmp_path, 3) as nodes:
        lines = await run_preheat(base_of(nodes[0]), f"{registry.url}/team/app:v1")
        members = [node.member_id or "" for node in nodes]
        wanted = {
            digest for digest in registry.blobs
            if digest != digest_of(b"{}")  # the attestation's config is skipped
        }
        seen: dict[str, tuple[int, str]] = {}
        for line in lines:
            name, size_text, host_name = line.split()
            seen[name] = (int(size_text), host_name)
        assert set(seen) == wanted
        for digest, (size, host) in seen.items():
            assert size == len(registry.blobs[digest])
            home = task_homes(task_key_for(digest), members)[0]
            assert host == home
            holder = next(node for node in nodes if node.member_id == home)
            info = holder.tasks.info(digest)
            assert info is not None and info.complete
            assert info.attributes["repository"] == "team/app"
            assert registry.sent[digest] == size  # once, by its home
        # The platform manifests were kept, as the mirror keeps them.
        kept = [digest for digest in registry.manifests if digest.startswith("sha256:")
                and any(node.tasks.info(digest) for node in nodes)]
        assert len(kept) == 2
        # Again: nothing leaves the registry.
        before = dict(registry.sent)
        await run_preheat(base_of(nodes[1]), f"{registry.url}/team/app:v1")
        assert registry.sent == before


async def test_one_platform(tmp_path: Path, registry: Registry) -> None:
    async with cluster(tmp_path, 1) as (node,):
        lines = await run_preheat(base_of(node), f"{registry.url}/team/app:v1", "linux/arm64")
        arm_config = digest_of(json.dumps({"architecture": "arm64"}).encode())
        assert len(lines) == 4 and any(line.startswith(arm_config) for line in lines)
        assert all(line.split()[2] == node.member_id for line in lines)
        with pytest.raises(D7yError, match="no image manifest"):
            await run_preheat(base_of(node), f"{registry.url}/team/app:v1", "linux/s390x")
        with pytest.raises(D7yError, match="origin answered 404"):
            await run_preheat(base_of(node), f"{registry.url}/team/app:missing")
