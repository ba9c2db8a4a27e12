"""Origin doubles for faults a real registry cannot show: a blob server that breaks on purpose, and
a bandwidth-limited TCP relay that puts a slow link in front of the real registry.

Owns `FaultyOrigin` (an aiohttp app speaking just enough of the distribution API: `/v2/` and blob
GET/HEAD with single ranges; each blob can be served correctly, cut off mid-body, or with bytes
that do not match its digest) and `ThrottledRelay` (forwards TCP to a real server, limits and counts
the bytes going back to the client). Does not know about d7y-node.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import re
import threading
from dataclasses import dataclass

from aiohttp import web

from tests.harness.background import BackgroundApp, BackgroundLoop
from tests.harness.process import free_port

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
# Relayed data moves in chunks of this size: small enough that throttling is smooth.
RELAY_CHUNK_BYTES = 64 * 1024


class Fault(enum.Enum):
    """How a `FaultyOrigin` serves one blob."""

    NONE = "none"
    # Announces the full Content-Length, sends half of the requested bytes, closes the connection.
    CLOSE_MID_BODY = "close-mid-body"
    # Sends the right number of bytes, one of them flipped, so the sha256 does not match.
    WRONG_BYTES = "wrong-bytes"


@dataclass
class _Blob:
    data: bytes
    fault: Fault
    requests: int = 0


class FaultyOrigin:
    """A registry double on 127.0.0.1 that serves registered blobs, faithfully or not."""

    def __init__(self) -> None:
        self._blobs: dict[str, _Blob] = {}
        self._lock = threading.Lock()
        app = web.Application()
        app.router.add_get("/v2/", self._base)
        app.router.add_route("*", r"/v2/{name:.+}/blobs/{digest}", self._blob)
        self._server = BackgroundApp(app, "faulty-origin")

    @property
    def url(self) -> str:
        return self._server.url

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._server.port}"

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        self._server.stop()

    def add_blob(self, data: bytes, fault: Fault = Fault.NONE) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        with self._lock:
            self._blobs[digest] = _Blob(data, fault)
        return digest

    def set_fault(self, digest: str, fault: Fault) -> None:
        with self._lock:
            self._blobs[digest].fault = fault

    def requests(self, digest: str) -> int:
        with self._lock:
            return self._blobs[digest].requests

    async def _base(self, request: web.Request) -> web.Response:
        return web.json_response({}, headers={"Docker-Distribution-API-Version": "registry/2.0"})

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        digest = request.match_info["digest"]
        with self._lock:
            blob = self._blobs.get(digest)
            if blob is not None and request.method == "GET":
                blob.requests += 1
        if blob is None or request.method not in ("GET", "HEAD"):
            return web.json_response(
                {"errors": [{"code": "BLOB_UNKNOWN", "message": "blob unknown"}]}, status=404
            )
        size = len(blob.data)
        start, end, status = 0, size - 1, 200
        headers = {"Docker-Content-Digest": digest, "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        range_header = request.headers.get("Range")
        match = _RANGE.match(range_header) if range_header is not None else None
        if match:
            first, last = match.groups()
            if first:
                start, end = int(first), min(int(last), size - 1) if last else size - 1
            elif last:
                start, end = max(0, size - int(last)), size - 1
            if start > end or start >= size:
                return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        body = blob.data[start:end + 1]
        if request.method == "HEAD":
            headers["Content-Length"] = str(len(body))
            return web.Response(status=status, headers=headers)
        if blob.fault is Fault.WRONG_BYTES and body:
            middle = len(body) // 2
            body = body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1:]
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = len(body)
        await response.prepare(request)
        if blob.fault is Fault.CLOSE_MID_BODY:
            await response.write(body[: len(body) // 2])
            await asyncio.sleep(0.05)
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write(body)
        await response.write_eof()
        return response


class _Limiter:
    """A shared byte rate for all connections of a relay."""

    def __init__(self, bytes_per_second: float) -> None:
        self.bytes_per_second = bytes_per_second
        self._next = 0.0

    async def take(self, count: int) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        start = max(now, self._next)
        self._next = start + count / self.bytes_per_second
        if start > now:
            await asyncio.sleep(start - now)


class ThrottledRelay:
    """Forwards TCP from 127.0.0.1:<port> to `target_port`, limiting bytes sent back to clients."""

    def __init__(self, target_port: int, bytes_per_second: float) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._limiter = _Limiter(bytes_per_second)
        self._downstream_bytes = 0
        self._lock = threading.Lock()
        self._background: BackgroundLoop | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def downstream_bytes(self) -> int:
        """Bytes relayed from the target back to clients so far (headers included)."""
        with self._lock:
            return self._downstream_bytes

    def start(self) -> None:
        self._background = BackgroundLoop("throttled-relay")
        self._server = self._background.call(self._listen())

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(self._connection, "127.0.0.1", self.port)

    async def _connection(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter,
    ) -> None:
        try:
            target_reader, target_writer = await asyncio.open_connection(
                "127.0.0.1", self.target_port
            )
        except OSError:
            client_writer.close()
            return
        upstream = asyncio.ensure_future(self._pipe(client_reader, target_writer, throttle=False))
        downstream = asyncio.ensure_future(self._pipe(target_reader, client_writer, throttle=True))
        for task in (upstream, downstream):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await asyncio.wait([upstream, downstream], return_when=asyncio.FIRST_COMPLETED)
        for task in (upstream, downstream):
            task.cancel()
        for writer in (client_writer, target_writer):
            writer.close()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, throttle: bool,
    ) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while chunk := await reader.read(RELAY_CHUNK_BYTES):
                if throttle:
                    await self._limiter.take(len(chunk))
                    with self._lock:
                        self._downstream_bytes += len(chunk)
                writer.write(chunk)
                await writer.drain()

    def stop(self) -> None:
        if self._background is None:
            return
        if self._server is not None:
            server = self._server
            self._background.call(self._close(server))
        self._background.close()
        self._background = None

    async def _close(self, server: asyncio.Server) -> None:
        server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.sleep(0)
