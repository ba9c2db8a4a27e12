"""Handing FUSE connections over to the next node process, so mounts survive a crash.

A FUSE mount lives as long as some process holds its `/dev/fuse` descriptor: when the server that
holds the only one dies, the kernel aborts the connection and every open file of the mount (a
running container's lower dir) answers ENOTCONN/EIO from then on. Here a tiny *keeper* process
(started by the node, detached in its own session, re-used while alive) holds a duplicate of each
mount's descriptor, received over a unix socket (SCM_RIGHTS). A node that was killed leaves the
connections alive: requests wait in the kernel's queue, and the restarted node takes the
descriptors back and serves the same connections, with no new mount and no new INIT (node ids
are RAFS inode numbers, the same in every process). Requests the dead process had read but not
answered are sent again by the kernel on `FUSE_NOTIFY_RESEND` (Linux 6.9 and later; before, such
a request waits until its process is killed).

Owns: the keeper (`serve_keeper`, `python -m d7y_node.fuse_handover keeper NAME`), its wire
(one JSON object per SOCK_SEQPACKET message, descriptors as SCM_RIGHTS, peers of the keeper's own
uid only), and the node's side (`Handover`: deposit, withdraw, release, and cleaning a mount
point the keeper holds without touching the mount). The keeper drops a descriptor when its
connection ends (the mount was unmounted: the descriptor polls POLLERR), and exits when it has
held nothing for `KEEPER_IDLE_SECONDS`.

Does not speak the FUSE protocol (`fuse_kernel.py`) or decide what to mount (`mounts.py`,
`nydus_snapshots.py`). A held mount that nobody adopts stays mounted but unserved (its accesses
wait) until a node takes it back or cleans it (`Handover.clean`, lazy unmount): a node started on
the data dir does that at start for every scope it serves.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from d7y_node import fuse_kernel
from d7y_node.errors import D7yError

log = logging.getLogger(__name__)

# One request or answer; the largest is a `list` of a few hundred mount points.
MAX_MESSAGE_BYTES = 256 * 1024
# A keeper holding nothing this long exits (a node re-starts one when it mounts again).
KEEPER_IDLE_SECONDS = 30.0
# How often the keeper looks at its descriptors when nothing else wakes it.
KEEPER_POLL_SECONDS = 1.0
# How long a node waits for a keeper it started to accept calls.
KEEPER_START_SECONDS = 10.0
# One call to the keeper; it answers from memory, so this is only for a keeper that hangs.
CALL_TIMEOUT_SECONDS = 5.0
# The abstract socket's name (no file, so no path length limit or stale socket file): one keeper
# per data dir.
NAME_PREFIX = "d7y-node-fuse-keeper-"
# The node's scopes: `d7y-node mount` mounts (mounts.py) and the snapshotter's (nydus_snapshots.py).
MOUNTS_SCOPE = "mounts"
SNAPSHOTS_SCOPE = "nydus"


class HandoverError(D7yError):
    """The keeper could not be reached or refused a call."""


def keeper_name(data_dir: Path) -> str:
    digest = hashlib.sha256(os.fsencode(os.path.abspath(data_dir))).hexdigest()[:24]
    return NAME_PREFIX + digest


def _address(name: str) -> bytes:
    return b"\0" + name.encode()


@dataclass(frozen=True)
class Held:
    """A connection taken back from the keeper: the descriptor (ours to close) and the FUSE
    protocol minor the kernel agreed to at INIT."""

    fd: int
    protocol_minor: int


# -- the wire -----------------------------------------------------------------------------------


def _send(sock: socket.socket, message: Mapping[str, Any], fds: tuple[int, ...] = ()) -> None:
    data = json.dumps(message).encode()
    if len(data) > MAX_MESSAGE_BYTES:
        raise HandoverError("a keeper message is too large")
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


def _receive(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """One message and its descriptors; ({}, []) when the peer closed."""
    descriptors = array.array("i")
    ancillary_size = socket.CMSG_SPACE(descriptors.itemsize * 4)
    data, ancillary, flags, _address = sock.recvmsg(MAX_MESSAGE_BYTES, ancillary_size)
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(payload[: len(payload) - len(payload) % received.itemsize])
            fds.extend(received)
    for fd in fds:
        os.set_inheritable(fd, False)
    if not data:
        for fd in fds:
            os.close(fd)
        return {}, []
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        raise HandoverError("a keeper message was cut short")
    try:
        message = json.loads(data)
    except ValueError:
        message = None
    if not isinstance(message, dict):
        for fd in fds:
            os.close(fd)
        raise HandoverError("a keeper message is not a JSON object")
    return message, fds


# -- the keeper ---------------------------------------------------------------------------------


class Keeper:
    """What the keeper process holds: key → (descriptor, protocol minor)."""

    def __init__(self) -> None:
        self.held: dict[str, tuple[int, int]] = {}

    def put(self, key: str, fd: int, minor: int) -> None:
        self.drop(key)
        self.held[key] = (fd, minor)

    def drop(self, key: str) -> bool:
        entry = self.held.pop(key, None)
        if entry is None:
            return False
        with contextlib.suppress(OSError):
            os.close(entry[0])
        return True

    def drop_ended(self) -> list[str]:
        """Forget the connections that ended (the kernel reports POLLERR on their descriptor)."""
        if not self.held:
            return []
        poller = select.poll()
        keys_by_fd = {fd: key for key, (fd, _minor) in self.held.items()}
        for fd in keys_by_fd:
            poller.register(fd, 0)  # only POLLERR/POLLHUP/POLLNVAL: never read their requests
        ended = [keys_by_fd[fd] for fd, _events in poller.poll(0)]
        for key in ended:
            self.drop(key)
        return ended

    def answer(self, message: Mapping[str, Any], fds: list[int]) -> tuple[dict[str, Any],
                                                                          tuple[int, ...]]:
        operation, key = message.get("op"), message.get("key")
        if operation == "ping":
            return {"ok": True, "pid": os.getpid()}, ()
        if operation == "list":
            prefix = str(message.get("prefix", ""))
            return {"ok": True, "held": {name: minor for name, (_fd, minor) in self.held.items()
                                         if name.startswith(prefix)}}, ()
        if not isinstance(key, str) or not key:
            return {"ok": False, "error": "a key is needed"}, ()
        if operation == "put":
            minor = message.get("minor")
            if len(fds) != 1 or not isinstance(minor, int):
                return {"ok": False, "error": "put needs one descriptor and its minor"}, ()
            self.put(key, fds.pop(), minor)
            return {"ok": True}, ()
        if operation == "take":
            entry = self.held.get(key)
            if entry is None:
                return {"ok": False, "error": "not held"}, ()
            return {"ok": True, "minor": entry[1]}, (entry[0],)
        if operation == "drop":
            return {"ok": self.drop(key)}, ()
        return {"ok": False, "error": f"unknown operation {operation!r}"}, ()


def serve_keeper(listener: socket.socket, *, idle_seconds: float = KEEPER_IDLE_SECONDS) -> None:
    """Answer calls on `listener` until nothing was held for `idle_seconds`. Blocking."""
    keeper = Keeper()
    connections: dict[int, socket.socket] = {}
    poller = select.poll()
    poller.register(listener.fileno(), select.POLLIN)
    idle_since = time.monotonic()
    uid = os.getuid()
    while True:
        for fd, _events in poller.poll(KEEPER_POLL_SECONDS * 1000):
            if fd == listener.fileno():
                with contextlib.suppress(OSError):
                    connection, _address = listener.accept()
                    credentials = connection.getsockopt(
                        socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
                    peer_uid = int.from_bytes(credentials[4:8], sys.byteorder)
                    if peer_uid not in (uid, 0):
                        connection.close()
                        continue
                    connections[connection.fileno()] = connection
                    poller.register(connection.fileno(), select.POLLIN)
                continue
            connection = connections[fd]
            try:
                message, fds = _receive(connection)
                if not message:
                    raise ConnectionResetError
                answer, to_send = keeper.answer(message, fds)
                for extra in fds:  # descriptors the operation did not take
                    os.close(extra)
                _send(connection, answer, to_send)
            except (OSError, HandoverError):
                poller.unregister(fd)
                connections.pop(fd).close()
        keeper.drop_ended()
        if keeper.held or connections:
            idle_since = time.monotonic()
        elif time.monotonic() - idle_since > idle_seconds:
            return


def _keeper_main(name: str) -> int:
    """`python -m d7y_node.fuse_handover keeper NAME`: bind, then fork the keeper and exit, so
    the node's start returns as soon as the keeper accepts calls and nobody has to reap it."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        listener.bind(_address(name))
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            return 0  # another keeper for this data dir runs
        raise
    listener.listen(16)
    if os.fork() != 0:
        return 0
    os.setsid()
    with contextlib.suppress(OSError):
        os.chdir("/")
    # Let go of the starter's pipes (it waits for their end) and terminal.
    null = os.open(os.devnull, os.O_RDWR)
    for standard in (0, 1, 2):
        os.dup2(null, standard)
    os.close(null)
    serve_keeper(listener)
    return 0


# -- the node's side ----------------------------------------------------------------------------


class Handover:
    """The node's side: one scope (`mounts`, `nydus`) of mounts in the data dir's keeper.

    Calls are blocking socket round trips to a local process that answers from memory; they run
    in a thread. The keeper is started on the first deposit.
    """

    def __init__(self, data_dir: Path, scope: str) -> None:
        self.name = keeper_name(data_dir)
        self.scope = scope

    def _key(self, mountpoint: str) -> str:
        return f"{self.scope}:{os.path.abspath(mountpoint)}"

    # -- calls --

    def _call(self, message: Mapping[str, Any], fds: tuple[int, ...] = (),
              *, start: bool = False) -> tuple[dict[str, Any], list[int]]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        with sock:
            sock.settimeout(CALL_TIMEOUT_SECONDS)
            try:
                sock.connect(_address(self.name))
            except (ConnectionRefusedError, FileNotFoundError):
                if not start:
                    return {"ok": False, "error": "no keeper"}, []
                self._start_keeper()
                sock.connect(_address(self.name))
            _send(sock, message, fds)
            answer, received = _receive(sock)
            if not answer:
                raise HandoverError("the keeper closed the connection")
            return answer, received

    def _start_keeper(self) -> None:
        command = [sys.executable, "-m", "d7y_node.fuse_handover", "keeper", self.name]
        completed = subprocess.run(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, start_new_session=True, timeout=KEEPER_START_SECONDS,
            check=False,
        )
        if completed.returncode != 0:
            raise HandoverError("cannot start the FUSE keeper: "
                                + completed.stderr.decode(errors="replace").strip()[-500:])
        log.info("started the FUSE keeper %s", self.name)

    async def _run(self, message: Mapping[str, Any], fds: tuple[int, ...] = (),
                   *, start: bool = False) -> tuple[dict[str, Any], list[int]]:
        try:
            return await asyncio.to_thread(self._call, message, fds, start=start)
        except (OSError, subprocess.SubprocessError) as error:
            raise HandoverError(f"the FUSE keeper: {error}") from None

    # -- the operations --

    async def deposit(self, mountpoint: str, fd: int, protocol_minor: int) -> None:
        """Let the keeper hold (a duplicate of) the connection of `mountpoint`."""
        message = {"op": "put", "key": self._key(mountpoint), "minor": protocol_minor}
        try:
            answer, extra = await self._run(message, (fd,), start=True)
        except HandoverError:
            # A keeper that just reached its idle end hangs up: the next call starts another.
            answer, extra = await self._run(message, (fd,), start=True)
        for received in extra:
            os.close(received)
        if not answer.get("ok"):
            raise HandoverError(f"the keeper refused {mountpoint}: {answer.get('error')}")

    async def withdraw(self, mountpoint: str) -> Held | None:
        """The connection the keeper holds for `mountpoint` (it keeps its own copy until
        `release`), or None."""
        answer, fds = await self._run({"op": "take", "key": self._key(mountpoint)})
        if not answer.get("ok") or len(fds) != 1 or not isinstance(answer.get("minor"), int):
            for fd in fds:
                os.close(fd)
            return None
        os.set_blocking(fds[0], False)
        return Held(fds[0], answer["minor"])

    async def release(self, mountpoint: str) -> None:
        """The keeper lets go of `mountpoint` (it is being unmounted for good)."""
        with contextlib.suppress(HandoverError):
            await self._run({"op": "drop", "key": self._key(mountpoint)})

    async def held(self) -> list[str]:
        """The mount points of this scope the keeper holds."""
        try:
            answer, _fds = await self._run({"op": "list", "prefix": f"{self.scope}:"})
        except HandoverError as error:
            log.warning("cannot ask the FUSE keeper: %s", error)
            return []
        held = answer.get("held")
        if not isinstance(held, dict):
            return []
        return [key.split(":", 1)[1] for key in held if isinstance(key, str)]

    async def holds(self, mountpoint: str) -> bool:
        wanted = self._key(mountpoint).split(":", 1)[1]
        return wanted in await self.held()

    async def detach(self, mountpoint: str) -> None:
        """End a held mount nobody will serve: detach it (a lazy unmount needs no answer from
        a server), then let the keeper close the connection, which fails what still waits."""
        try:
            await asyncio.to_thread(fuse_kernel.unmount, mountpoint, lazy=True)
        except OSError as error:
            if error.errno != errno.EINVAL:
                log.warning("%s: cannot detach: %s", mountpoint, error)
        await self.release(mountpoint)

    async def clean(self, mountpoint: str) -> bool:
        """`fuse_kernel.clean_stale_mount`, safe for a mount point the keeper holds (asking
        that mount anything would wait for a server forever): such a one is detached."""
        if await self.holds(mountpoint):
            log.warning("%s: detached a mount no process serves", mountpoint)
            await self.detach(mountpoint)
            return True
        return await fuse_kernel.clean_stale_mount(mountpoint)


async def detach_all(data_dir: Path) -> list[str]:
    """End every mount the data dir's keeper holds (a node started without `fuse_handover`
    after one with it: nobody will serve them); the mount points detached."""
    detached: list[str] = []
    for scope in (MOUNTS_SCOPE, SNAPSHOTS_SCOPE):
        handover = Handover(data_dir, scope)
        for mountpoint in await handover.held():
            log.warning("%s: detached a mount kept for a handover that is off now", mountpoint)
            await handover.detach(mountpoint)
            detached.append(mountpoint)
    return detached


def held_by_keeper(data_dir: Path) -> set[str]:
    """Every mount point the data dir's keeper holds (any scope); blocking, for callers off the
    loop that must not touch such a mount (it may have no server)."""
    handover = Handover(data_dir, "")
    try:
        answer, _fds = handover._call({"op": "list", "prefix": ""})
    except (OSError, HandoverError):
        return set()
    held = answer.get("held")
    if not isinstance(held, dict):
        return set()
    return {key.split(":", 1)[1] for key in held if isinstance(key, str) and ":" in key}


__all__ = [
    "MOUNTS_SCOPE",
    "SNAPSHOTS_SCOPE",
    "Handover",
    "HandoverError",
    "Held",
    "Keeper",
    "detach_all",
    "held_by_keeper",
    "keeper_name",
    "serve_keeper",
]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "keeper":
        sys.exit(_keeper_main(sys.argv[2]))
    print("usage: python -m d7y_node.fuse_handover keeper NAME", file=sys.stderr)
    sys.exit(2)
