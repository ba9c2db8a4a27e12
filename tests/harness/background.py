"""An asyncio loop on a background thread, for test servers that must run beside synchronous tests,
and `serve_in_loop` for async tests' servers on their own loop.

Owns the thread and the loop; servers (token server, origin doubles, relays) hand it coroutines.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from aiohttp import web

from tests.harness.process import free_port

T = TypeVar("T")

# A server's start or stop finishes in milliseconds; this only bounds a wedged loop.
CALL_TIMEOUT_SECONDS = 30.0


class BackgroundLoop:
    """A private event loop running on a daemon thread until `close()`."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run `coroutine` on the loop and wait for its result."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(timeout=CALL_TIMEOUT_SECONDS)

    def close(self) -> None:
        if not self.loop.is_running():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=CALL_TIMEOUT_SECONDS)
        self.loop.close()


async def serve_in_loop(app: web.Application) -> tuple[web.AppRunner, int]:
    """Serve `app` on 127.0.0.1 at a port the kernel picks, on the running loop (for async
    tests); the runner (`cleanup()` stops it) and the port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


class BackgroundApp:
    """An aiohttp application served on 127.0.0.1 with a free port from a background loop."""

    def __init__(self, app: web.Application, name: str) -> None:
        self.app = app
        self.name = name
        self.port = 0
        self._background: BackgroundLoop | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._background = BackgroundLoop(self.name)
        self.port = free_port()
        self._runner = web.AppRunner(self.app, access_log=None)
        self._background.call(self._start(self._runner, self.port))

    @staticmethod
    async def _start(runner: web.AppRunner, port: int) -> None:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()

    def stop(self) -> None:
        if self._background is None:
            return
        if self._runner is not None:
            self._background.call(self._runner.cleanup())
            self._runner = None
        self._background.close()
        self._background = None
