"""The node's lifecycle: builds every service, runs them on one uvloop loop, shuts down gracefully.

Owns start-up order (store → tasks → registry client → listeners), the data-dir lock that keeps two
nodes off one store, the peer port's `/healthz` and `/metrics`, and the reverse order on SIGTERM:
stop accepting, let in-flight responses finish for a short grace period, stop downloads, flush
metadata. Does not implement any protocol itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
from pathlib import Path
from typing import IO

from aiohttp import web

from d7y_node import __version__
from d7y_node.config import Listen, NodeConfig
from d7y_node.errors import ConfigError
from d7y_node.metrics import Metrics
from d7y_node.piece_store import PieceStore
from d7y_node.proxy import ProxyServer
from d7y_node.registry import RegistryClient
from d7y_node.tasks import TaskManager

log = logging.getLogger(__name__)

# In-flight responses get this long to finish after SIGTERM before their connections are closed;
# short, because a client cut off falls back to its next mirror or the origin anyway.
SHUTDOWN_GRACE_SECONDS = 5.0

LOCK_FILE = "node.lock"


class DataDirLock:
    """An exclusive `flock` on the data dir, so two nodes never share one piece store."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_FILE
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(self.path, "a+")  # noqa: SIM115 - held for the node's whole life
        except OSError as err:
            raise ConfigError(
                "data_dir", f"cannot use {self.path.parent}: {err.strerror}"
            ) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            raise ConfigError(
                "data_dir", f"{self.path.parent} is in use by another d7y-node (pid {holder})"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class Node:
    """One host's d7y-node: every service, wired together and run on the current loop."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.store = PieceStore(config.store, self.metrics)
        self.tasks = TaskManager(self.store, config.tasks, self.metrics)
        self.registry = RegistryClient(config.registry, self.metrics)
        self.proxy = ProxyServer(config.proxy, self.tasks, self.registry, self.metrics)
        self._lock = DataDirLock(config.store.data_dir)
        self._runners: list[web.AppRunner] = []
        self._ready = False
        # Where each listener really bound (a configured port 0 becomes a real one).
        self.proxy_address: Listen | None = None
        self.peer_address: Listen | None = None

    async def start(self) -> None:
        """Start every service; returns once both ports accept connections."""
        self._lock.acquire()
        try:
            await self.store.open()
            await self.tasks.start()
            self.proxy_address = await self._serve(self.proxy.app(), self.config.proxy.listen)
            self.peer_address = await self._serve(self._peer_app(), self.config.peer_listen)
        except BaseException:
            await self.stop()
            raise
        self._ready = True
        log.info(
            "d7y-node %s ready: mirror on %s, peer on %s, data in %s",
            __version__, self.proxy_address, self.peer_address, self.config.store.data_dir,
        )

    async def stop(self) -> None:
        """Stop accepting, let responses finish briefly, stop downloads, flush, release the dir."""
        self._ready = False
        for runner in reversed(self._runners):
            with contextlib.suppress(Exception):
                await runner.cleanup()
        self._runners.clear()
        for step in (self.tasks.close, self.registry.close, self.store.close):
            try:
                await step()
            except Exception:
                log.exception("error while stopping %s", step.__qualname__)
        self._lock.release()

    async def run_until_signalled(self) -> None:
        """Start, wait for SIGTERM or SIGINT, stop."""
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stopping.set)
        try:
            await self.start()
            await stopping.wait()
            log.info("shutting down")
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            await self.stop()
        log.info("stopped")

    async def _serve(self, app: web.Application, listen: Listen) -> Listen:
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(
            runner, listen.host, listen.port,
            shutdown_timeout=SHUTDOWN_GRACE_SECONDS, reuse_address=True,
        )
        try:
            await site.start()
        except OSError as err:
            raise ConfigError("listen", f"cannot listen on {listen}: {err.strerror}") from None
        server = site._server  # the asyncio server: the only way to learn a port-0 bind
        sockets = getattr(server, "sockets", None) or []
        host, port = sockets[0].getsockname()[:2] if sockets else (listen.host, listen.port)
        return Listen(str(host), int(port))

    def _peer_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def _healthz(self, request: web.Request) -> web.Response:
        if not self._ready:
            return web.json_response({"status": "starting"}, status=503)
        return web.json_response({"status": "ok", "version": __version__})

    async def _metrics(self, request: web.Request) -> web.Response:
        body = self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": self.metrics.content_type})
