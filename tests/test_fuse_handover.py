"""Tests of `d7y_node.fuse_handover`: the keeper's bookkeeping (a descriptor per key, dropped when
its connection ends), its wire (a real abstract unix socket, descriptors passed with SCM_RIGHTS,
bad messages refused), the node's side (`Handover`: deposit, withdraw, held, release, scopes) and a
keeper process started on demand. Mount handover with the kernel is in
tests/integration/test_remount_e2e.py and tests/test_nydus_snapshots.py.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from d7y_node.fuse_handover import (
    Handover,
    HandoverError,
    Keeper,
    _address,
    _receive,
    _send,
    held_by_keeper,
    keeper_name,
    serve_keeper,
)


def pipe_pair() -> tuple[int, int]:
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    return read_end, write_end


def test_the_keeper_holds_one_descriptor_per_key_and_drops_ended_ones() -> None:
    keeper = Keeper()
    first_read, first_write = pipe_pair()
    second_read, second_write = pipe_pair()
    replaced_read, replaced_write = pipe_pair()
    try:
        keeper.put("mounts:/a", replaced_read, 38)
        keeper.put("mounts:/a", first_read, 31)  # replaces (and closes) the earlier one
        with pytest.raises(OSError):
            os.fstat(replaced_read)
        keeper.put("nydus:/b", second_read, 38)
        answer, fds = keeper.answer({"op": "list", "prefix": "mounts:"}, [])
        assert answer == {"ok": True, "held": {"mounts:/a": 31}} and fds == ()
        answer, fds = keeper.answer({"op": "take", "key": "mounts:/a"}, [])
        assert answer == {"ok": True, "minor": 31} and fds == (first_read,)
        assert "mounts:/a" in keeper.held  # taking leaves the keeper's copy
        # A connection that ended (here: the other end of a pipe closed, POLLHUP) is dropped,
        # a live one (POLLIN is never asked for) is kept.
        os.close(second_write)
        second_write = -1
        os.write(first_write, b"pending request")
        assert keeper.drop_ended() == ["nydus:/b"]
        assert list(keeper.held) == ["mounts:/a"]
        assert keeper.answer({"op": "drop", "key": "mounts:/a"}, []) == ({"ok": True}, ())
        assert keeper.held == {}
    finally:
        for fd in (first_write, second_write, replaced_write):
            if fd >= 0:
                os.close(fd)


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ({"op": "put", "key": "k"}, "one descriptor"),
        ({"op": "put", "key": "k", "minor": "38"}, "one descriptor"),
        ({"op": "take"}, "a key is needed"),
        ({"op": "take", "key": "unknown"}, "not held"),
        ({"op": "explode", "key": "k"}, "unknown operation"),
    ],
)
def test_the_keeper_refuses_bad_calls(message: dict[str, object], error: str) -> None:
    answer, fds = Keeper().answer(message, [])
    assert answer["ok"] is False and error in answer["error"] and fds == ()


@pytest.fixture
def keeper_socket(tmp_path: Path) -> Iterator[Path]:
    """A keeper serving in a thread for the data dir `tmp_path` (idle exit after 0.5 s)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(_address(keeper_name(tmp_path)))
    listener.listen(4)
    thread = threading.Thread(target=serve_keeper, args=(listener,),
                              kwargs={"idle_seconds": 0.5}, daemon=True)
    thread.start()
    try:
        yield tmp_path
    finally:
        thread.join(timeout=10)
        listener.close()
    assert not thread.is_alive(), "the keeper exits once it holds nothing"


async def test_a_node_deposits_withdraws_and_releases(keeper_socket: Path) -> None:
    mounts = Handover(keeper_socket, "mounts")
    nydus = Handover(keeper_socket, "nydus")
    read_end, write_end = pipe_pair()
    try:
        await mounts.deposit("/mnt/a", read_end, 38)
        assert await mounts.held() == ["/mnt/a"]
        assert await nydus.held() == []  # scopes do not see each other's mounts
        assert held_by_keeper(keeper_socket) == {"/mnt/a"}
        held = await mounts.withdraw("/mnt/a")
        assert held is not None and held.protocol_minor == 38
        try:
            # The same pipe, through the keeper: a write on one end reads on the other.
            os.write(write_end, b"x")
            assert os.read(held.fd, 1) == b"x"
            assert held.fd != read_end
        finally:
            os.close(held.fd)
        assert await nydus.withdraw("/mnt/a") is None
        assert await mounts.holds("/mnt/a")
        await mounts.release("/mnt/a")
        assert await mounts.held() == []
        assert await mounts.withdraw("/mnt/a") is None
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_bad_message_closes_only_that_connection(keeper_socket: Path) -> None:
    address = _address(keeper_name(keeper_socket))
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as bad:
        bad.connect(address)
        bad.send(b"[not an object]")
        assert bad.recv(100) == b""  # the keeper hung up
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as good:
        good.connect(address)
        _send(good, {"op": "ping"})
        answer, fds = _receive(good)
        assert answer["ok"] is True and fds == []


async def test_without_a_keeper_nothing_is_held(tmp_path: Path) -> None:
    handover = Handover(tmp_path / secrets.token_hex(4), "mounts")
    assert await handover.held() == []
    assert await handover.withdraw("/mnt/a") is None
    await handover.release("/mnt/a")  # nothing to release: no error
    assert held_by_keeper(tmp_path / "none") == set()


async def test_a_deposit_starts_a_keeper_process(tmp_path: Path) -> None:
    """The keeper is a process of its own (it outlives the node); it exits by itself once the
    connections it holds have ended."""
    handover = Handover(tmp_path, "mounts")
    read_end, write_end = pipe_pair()
    try:
        await handover.deposit("/mnt/a", read_end, 38)
        answer, _fds = handover._call({"op": "ping"})
        keeper_pid = answer["pid"]
        assert keeper_pid != os.getpid()
        assert await handover.held() == ["/mnt/a"]
    finally:
        os.close(read_end)
        os.close(write_end)  # the pipe ends: the keeper drops its copy
    with pytest.raises(HandoverError):
        await handover.deposit("/mnt/b", -1, 38)  # not a descriptor: refused before sending
