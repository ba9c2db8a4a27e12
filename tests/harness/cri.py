"""A small client of the Kubernetes CRI image service (gRPC, `runtime.v1`), as the kubelet calls it.

Owns the calls the tests make to containerd's CRI plugin on containerd's own socket: PullImage,
ImageStatus, ListImages, RemoveImage and the runtime's Version. Messages come from our reduced copy
of the CRI proto (`protos/cri_image.proto`, field numbers as in k8s.io/cri-api); the calls are
made with grpclib over the unix socket, without generated stubs. Errors come back as `CriError`
with the gRPC status name. Does not start containerd or configure it (`containerd.py`).

The kubelet pulls without a pod sandbox in these tests (PullImage's `sandbox_config` is left out),
which is how `crictl pull` calls it too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from grpclib.client import Channel, UnaryUnaryMethod
from grpclib.exceptions import GRPCError, StreamTerminatedError

from tests.harness.protos import cri_image_pb2 as cri

# The CRI version this client speaks (containerd 1.6 serves runtime.v1 and the older v1alpha2).
API_PACKAGE = "runtime.v1"
IMAGE_SERVICE = f"/{API_PACKAGE}.ImageService"
RUNTIME_SERVICE = f"/{API_PACKAGE}.RuntimeService"
# The version string the kubelet sends in VersionRequest.
KUBELET_API_VERSION = "v1"
# A pull crosses loopback in seconds; a lazy (remote) pull only fetches a bootstrap. This bounds a
# hang on a loaded 2-core machine, so a stuck snapshotter fails the test instead of blocking it.
PULL_TIMEOUT_SECONDS = 240.0
CALL_TIMEOUT_SECONDS = 30.0

Reply = TypeVar("Reply")


class CriError(Exception):
    """A CRI call failed; `status` is the gRPC status name (e.g. "NOT_FOUND", "UNKNOWN")."""

    def __init__(self, method: str, status: str, message: str) -> None:
        super().__init__(f"{method}: {status}: {message}")
        self.method = method
        self.status = status
        self.message = message


@dataclass(frozen=True)
class ImageInfo:
    """What the image service says about one image."""

    image_id: str
    repo_tags: tuple[str, ...]
    repo_digests: tuple[str, ...]
    size: int

    @classmethod
    def from_message(cls, message: Any) -> ImageInfo:
        return cls(message.id, tuple(message.repo_tags), tuple(message.repo_digests),
                   int(message.size))


@dataclass(frozen=True)
class RuntimeVersion:
    """The runtime's answer to Version: its name, version and CRI API version."""

    runtime_name: str
    runtime_version: str
    runtime_api_version: str


class CriImageClient:
    """The CRI image service on one unix socket; an async context manager holding one channel."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self._channel: Channel | None = None

    async def __aenter__(self) -> CriImageClient:
        self._channel = Channel(path=self.socket_path)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    async def _call(
        self, service: str, method: str, request: Any, reply_type: type[Reply],
        time_limit: float,
    ) -> Reply:
        if self._channel is None:
            raise RuntimeError("use CriImageClient as `async with`")
        name = f"{service}/{method}"
        call: UnaryUnaryMethod[Any, Reply] = UnaryUnaryMethod(
            self._channel, name, type(request), reply_type
        )
        try:
            return await call(request, timeout=time_limit)
        except GRPCError as error:
            raise CriError(method, error.status.name, error.message or "") from None
        except StreamTerminatedError as error:
            raise CriError(method, "UNAVAILABLE", str(error)) from None

    async def version(self) -> RuntimeVersion:
        reply = await self._call(RUNTIME_SERVICE, "Version",
                                 cri.VersionRequest(version=KUBELET_API_VERSION),
                                 cri.VersionResponse, CALL_TIMEOUT_SECONDS)
        return RuntimeVersion(reply.runtime_name, reply.runtime_version,
                              reply.runtime_api_version)

    async def pull(
        self, reference: str, *, annotations: Mapping[str, str] | None = None,
        time_limit: float = PULL_TIMEOUT_SECONDS,
    ) -> str:
        """PullImage; returns the image ref containerd answers (the image id, `sha256:…`)."""
        request = cri.PullImageRequest(
            image=cri.ImageSpec(image=reference, annotations=dict(annotations or {}))
        )
        reply = await self._call(IMAGE_SERVICE, "PullImage", request, cri.PullImageResponse,
                                 time_limit)
        return str(reply.image_ref)

    async def status(self, reference: str) -> ImageInfo | None:
        """ImageStatus; None when the runtime does not have the image."""
        request = cri.ImageStatusRequest(image=cri.ImageSpec(image=reference))
        reply = await self._call(IMAGE_SERVICE, "ImageStatus", request, cri.ImageStatusResponse,
                                 CALL_TIMEOUT_SECONDS)
        return ImageInfo.from_message(reply.image) if reply.HasField("image") else None

    async def list_images(self) -> list[ImageInfo]:
        reply = await self._call(IMAGE_SERVICE, "ListImages", cri.ListImagesRequest(),
                                 cri.ListImagesResponse, CALL_TIMEOUT_SECONDS)
        return [ImageInfo.from_message(image) for image in reply.images]

    async def remove(self, reference: str) -> None:
        request = cri.RemoveImageRequest(image=cri.ImageSpec(image=reference))
        await self._call(IMAGE_SERVICE, "RemoveImage", request, cri.RemoveImageResponse,
                         CALL_TIMEOUT_SECONDS)


class CriImages:
    """Blocking calls for synchronous tests: each opens a channel, makes one call, closes it."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path

    def _run(self, call: Callable[[CriImageClient], Awaitable[Reply]]) -> Reply:
        async def once() -> Reply:
            async with CriImageClient(self.socket_path) as client:
                return await call(client)

        return asyncio.run(once())

    def version(self) -> RuntimeVersion:
        return self._run(lambda client: client.version())

    def pull(self, reference: str, *, annotations: Mapping[str, str] | None = None,
             time_limit: float = PULL_TIMEOUT_SECONDS) -> str:
        return self._run(lambda client: client.pull(reference, annotations=annotations,
                                                    time_limit=time_limit))

    def status(self, reference: str) -> ImageInfo | None:
        return self._run(lambda client: client.status(reference))

    def list_images(self) -> list[ImageInfo]:
        return self._run(lambda client: client.list_images())

    def remove(self, reference: str) -> None:
        self._run(lambda client: client.remove(reference))
