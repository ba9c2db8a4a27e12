"""Tests of `d7y_node.fuse_kernel`: the FUSE wire format and a session's request handling.

The kernel side is played over a SOCK_SEQPACKET socket pair, which keeps message boundaries the
way /dev/fuse does (one read, one request; one write, one reply), so the session code runs
unchanged without a mount. Real mounts are in tests/integration/test_fuse_mount_e2e.py.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import stat
import struct
from collections.abc import AsyncIterator, Sequence

import pytest

from d7y_node.fuse_kernel import (
    INIT_ASYNC_READ,
    INIT_MAX_PAGES,
    INIT_NO_OPEN_SUPPORT,
    INIT_NO_OPENDIR_SUPPORT,
    OPEN_KEEP_CACHE,
    READ_AHEAD_BYTES,
    DirectoryItem,
    Entry,
    FileAttributes,
    FilesystemStatistics,
    FuseError,
    FuseSession,
    Opcode,
    Opened,
    encode_device,
    encode_dirents,
    mount_device,
    xattr_reply,
)

IN_HEADER = struct.Struct("<IIQQIIIHH")
# What a kernel older than FUSE_NO_OPEN_SUPPORT (or one that must be asked for opens) offers.
ASKED_OPENS = 0xFFFFFFFF & ~(INIT_NO_OPEN_SUPPORT | INIT_NO_OPENDIR_SUPPORT)
OUT_HEADER = struct.Struct("<IiQ")
DIRENT = struct.Struct("<QQII")


def attributes(ino: int, mode: int = stat.S_IFREG | 0o644, size: int = 10) -> FileAttributes:
    return FileAttributes(ino=ino, mode=mode, nlink=1, uid=1, gid=2, size=size, rdev=0,
                          mtime=1_700_000_000, mtime_nanoseconds=5, blocks=1)


class FakeOperations:
    """A two-file filesystem; `gate` holds reads until set."""

    attribute_timeout = 60.0

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.gate.set()
        self.forgotten: list[tuple[int, int]] = []
        self.opens = 0

    def lookup(self, parent: int, name: bytes) -> Entry:
        if name == b"file":
            return Entry(attributes(2), 30.0, 60.0)
        return Entry(None, 30.0, 60.0)

    def getattr(self, ino: int) -> FileAttributes:
        if ino == 1:
            return attributes(1, stat.S_IFDIR | 0o755, 0)
        if ino == 2:
            return attributes(2)
        raise FuseError(errno.ENOENT)

    def readlink(self, ino: int) -> bytes:
        raise FuseError(errno.EINVAL)

    def open(self, ino: int, flags: int) -> Opened:
        self.opens += 1
        return Opened(7, OPEN_KEEP_CACHE)

    async def read(self, ino: int, handle: int, offset: int, size: int) -> bytes:
        await self.gate.wait()
        if offset > 100:
            raise RuntimeError("boom")
        return bytes([65 + offset % 26]) * size

    def release(self, ino: int, handle: int) -> None:
        pass

    def opendir(self, ino: int, flags: int) -> Opened:
        self.opens += 1
        return Opened(0, 0)

    def readdir(self, ino: int, offset: int) -> Sequence[DirectoryItem]:
        items = [DirectoryItem(b".", 1, stat.S_IFDIR, 1), DirectoryItem(b"..", 1, stat.S_IFDIR, 2),
                 DirectoryItem(b"file", 2, stat.S_IFREG, 3)]
        return items[offset:]

    def releasedir(self, ino: int, handle: int) -> None:
        pass

    def getxattr(self, ino: int, name: bytes) -> bytes:
        if name == b"user.a":
            return b"value"
        raise FuseError(errno.ENODATA)

    def listxattr(self, ino: int) -> Sequence[bytes]:
        return [b"user.a", b"user.bb"]

    def statfs(self, ino: int) -> FilesystemStatistics:
        return FilesystemStatistics(10, 0, 0, 3, 0, 4096, 255, 4096)

    def forget(self, ino: int, lookups: int) -> None:
        self.forgotten.append((ino, lookups))


class FakeKernel:
    """The kernel's end of a session."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.unique = 0

    async def send(self, opcode: int, nodeid: int = 1, body: bytes = b"") -> int:
        self.unique += 1
        header = IN_HEADER.pack(IN_HEADER.size + len(body), opcode, self.unique, nodeid,
                                0, 0, 123, 0, 0)
        await asyncio.get_running_loop().sock_sendall(self.sock, header + body)
        return self.unique

    async def receive(self) -> tuple[int, int, bytes]:
        data = await asyncio.wait_for(
            asyncio.get_running_loop().sock_recv(self.sock, 1 << 20), 5
        )
        length, error, unique = OUT_HEADER.unpack_from(data)
        assert length == len(data)
        return unique, error, data[OUT_HEADER.size :]

    async def call(self, opcode: int, nodeid: int = 1, body: bytes = b"") -> tuple[int, bytes]:
        unique = await self.send(opcode, nodeid, body)
        got, error, payload = await self.receive()
        assert got == unique
        return error, payload

    async def init(self, minor: int = 38, flags: int = 0xFFFFFFFF) -> bytes:
        error, payload = await self.call(Opcode.INIT, 0, struct.pack("<IIII", 7, minor, 131072,
                                                                       flags))
        assert error == 0
        return payload


@pytest.fixture
async def kernel() -> AsyncIterator[tuple[FakeKernel, FuseSession, FakeOperations]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    theirs.setblocking(False)
    operations = FakeOperations()
    session = FuseSession(os.dup(ours.fileno()), operations, name="test")
    ours.close()
    serving = asyncio.create_task(session.serve())
    fake = FakeKernel(theirs)
    try:
        yield fake, session, operations
    finally:
        session.close()
        await asyncio.wait_for(serving, 5)
        theirs.close()


def test_device_numbers_use_the_kernels_encoding() -> None:
    assert encode_device(os.makedev(1, 3)) == (1 << 8) | 3
    # minor 70000: low byte first, the rest above the major (new_encode_dev)
    assert encode_device(os.makedev(259, 70000)) == (70000 & 0xFF) | (259 << 8) | (
        (70000 & ~0xFF) << 12)


def test_dirents_fill_the_buffer_and_carry_next_offsets() -> None:
    items = [DirectoryItem(b"n%03d" % i, 10 + i, stat.S_IFREG, i + 1) for i in range(100)]
    record = (DIRENT.size + 4 + 7) & ~7  # 32 bytes each
    packed = encode_dirents(items, 10 * record + record - 1)
    assert len(packed) == 10 * record
    for index in range(10):
        ino, next_offset, name_length, kind = DIRENT.unpack_from(packed, index * record)
        assert (ino, next_offset, name_length) == (10 + index, index + 1, 4)
        assert kind == stat.S_IFREG >> 12
        assert packed[index * record + DIRENT.size : index * record + DIRENT.size + 4] == (
            b"n%03d" % index)
    assert encode_dirents(items, record - 1) == b""


def test_mount_device_is_read_from_mountinfo(tmp_path: os.PathLike[str]) -> None:
    device = os.stat("/").st_dev
    assert mount_device("/") == f"{os.major(device)}:{os.minor(device)}"
    assert mount_device(os.path.join(str(tmp_path), "not-a-mount-point")) is None


def test_xattr_reply_sizes() -> None:
    assert xattr_reply(b"value", 0) == struct.pack("<II", 5, 0)
    assert xattr_reply(b"value", 5) == b"value"
    with pytest.raises(FuseError) as raised:
        xattr_reply(b"value", 4)
    assert raised.value.errno == errno.ERANGE


async def test_init_negotiates_version_and_flags(kernel: tuple[FakeKernel, FuseSession,
                                                               FakeOperations]) -> None:
    fake, session, _ = kernel
    # Before INIT nothing is answered but with EIO.
    error, _ = await fake.call(Opcode.GETATTR, 1, bytes(16))
    assert error == -errno.EIO
    payload = await fake.init(minor=40, flags=INIT_ASYNC_READ)
    major, minor, readahead, flags = struct.unpack_from("<IIII", payload)
    # The readahead offered is raised to ours (the kernel keeps the smaller of it and the
    # mount's bdi setting, which `mount` raises too).
    assert (major, minor, readahead) == (7, 38, READ_AHEAD_BYTES)
    assert flags == INIT_ASYNC_READ  # never a flag the kernel did not offer
    assert not flags & INIT_MAX_PAGES
    assert session.initialized.is_set()


async def test_init_from_a_too_old_kernel_fails() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.setblocking(False)
    session = FuseSession(os.dup(ours.fileno()), FakeOperations(), name="old")
    ours.close()
    serving = asyncio.create_task(session.serve())
    fake = FakeKernel(theirs)
    error, _ = await fake.call(Opcode.INIT, 0, struct.pack("<IIII", 7, 12, 0, 0))
    assert error == -errno.EPROTO
    await asyncio.wait_for(serving, 5)  # the session ends
    theirs.close()


async def test_metadata_requests(kernel: tuple[FakeKernel, FuseSession, FakeOperations]) -> None:
    fake, _, operations = kernel
    await fake.init(flags=ASKED_OPENS)
    error, payload = await fake.call(Opcode.LOOKUP, 1, b"file\0")
    assert error == 0 and len(payload) == 128
    nodeid, _generation, entry_valid, attr_valid = struct.unpack_from("<QQQQ", payload)
    assert (nodeid, entry_valid, attr_valid) == (2, 30, 60)
    ino, size = struct.unpack_from("<QQ", payload, 40)
    assert (ino, size) == (2, 10)
    # A missing name is a negative entry (node id 0) the kernel may cache, not ENOENT.
    error, payload = await fake.call(Opcode.LOOKUP, 1, b"missing\0")
    assert error == 0 and struct.unpack_from("<QQQ", payload) == (0, 0, 30)

    error, payload = await fake.call(Opcode.GETATTR, 2, bytes(16))
    assert error == 0 and len(payload) == 104
    (timeout,) = struct.unpack_from("<Q", payload)
    mode, nlink, uid, gid = struct.unpack_from("<IIII", payload, 16 + 60)
    assert (timeout, mode, nlink, uid, gid) == (60, stat.S_IFREG | 0o644, 1, 1, 2)
    error, _ = await fake.call(Opcode.GETATTR, 99, bytes(16))
    assert error == -errno.ENOENT

    error, _ = await fake.call(Opcode.READLINK, 2)
    assert error == -errno.EINVAL
    error, payload = await fake.call(Opcode.OPEN, 2, struct.pack("<II", os.O_RDONLY, 0))
    assert error == 0 and struct.unpack("<QII", payload) == (7, OPEN_KEEP_CACHE, 0)

    getxattr = struct.pack("<II", 0, 0) + b"user.a\0"
    assert await fake.call(Opcode.GETXATTR, 2, getxattr) == (0, struct.pack("<II", 5, 0))
    getxattr = struct.pack("<II", 100, 0) + b"user.a\0"
    assert await fake.call(Opcode.GETXATTR, 2, getxattr) == (0, b"value")
    getxattr = struct.pack("<II", 100, 0) + b"user.zz\0"
    assert (await fake.call(Opcode.GETXATTR, 2, getxattr))[0] == -errno.ENODATA
    assert await fake.call(Opcode.LISTXATTR, 2, struct.pack("<II", 100, 0)) == (
        0, b"user.a\0user.bb\0")
    assert (await fake.call(Opcode.LISTXATTR, 2, struct.pack("<II", 3, 0)))[0] == -errno.ERANGE

    error, payload = await fake.call(Opcode.STATFS, 1)
    assert error == 0 and len(payload) == 80
    assert struct.unpack_from("<QQQQQII", payload) == (10, 0, 0, 3, 0, 4096, 255)

    # Writes are refused; unknown requests are ENOSYS; forgets get no reply.
    assert (await fake.call(Opcode.SETATTR, 2, bytes(88)))[0] == -errno.EROFS
    assert (await fake.call(16, 2, bytes(40)))[0] == -errno.ENOSYS
    await fake.send(Opcode.FORGET, 2, struct.pack("<Q", 3))
    await fake.send(Opcode.BATCH_FORGET, 0, struct.pack("<II", 2, 0) + struct.pack(
        "<QQQQ", 5, 1, 6, 2))
    # Nothing is ever dirty: the first FLUSH is ENOSYS, which tells the kernel to send none.
    assert (await fake.call(Opcode.FLUSH, 2, bytes(24)))[0] == -errno.ENOSYS
    assert operations.forgotten == [(2, 3), (5, 1), (6, 2)]


async def test_opens_cost_no_request_where_the_kernel_allows(
    kernel: tuple[FakeKernel, FuseSession, FakeOperations],
) -> None:
    fake, _, operations = kernel
    await fake.init()  # offers FUSE_NO_OPEN_SUPPORT and FUSE_NO_OPENDIR_SUPPORT
    opens = operations.opens
    # ENOSYS: "no open requests from now on, every open succeeds with keep_cache".
    assert (await fake.call(Opcode.OPEN, 2, struct.pack("<II", os.O_RDONLY, 0)))[0] == (
        -errno.ENOSYS)
    assert (await fake.call(Opcode.OPENDIR, 1, struct.pack("<II", os.O_RDONLY, 0)))[0] == (
        -errno.ENOSYS)
    assert (await fake.call(Opcode.FLUSH, 2, bytes(24)))[0] == -errno.ENOSYS
    assert operations.opens == opens
    # Reads come with handle 0 then; they are answered as ever.
    read_in = struct.pack("<QQIIQII", 0, 0, 5, 0, 0, 0, 0)
    assert await fake.call(Opcode.READ, 2, read_in) == (0, b"AAAAA")


async def test_opens_are_answered_when_asked_to(kernel: tuple[FakeKernel, FuseSession,
                                                                FakeOperations]) -> None:
    _, session, operations = kernel
    session.close()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    theirs.setblocking(False)
    asking = FuseSession(os.dup(ours.fileno()), operations, open_without_requests=False)
    ours.close()
    serving = asyncio.create_task(asking.serve())
    try:
        fake = FakeKernel(theirs)
        await fake.init()
        error, payload = await fake.call(Opcode.OPEN, 2, struct.pack("<II", os.O_RDONLY, 0))
        assert error == 0 and struct.unpack("<QII", payload) == (7, OPEN_KEEP_CACHE, 0)
        assert (await fake.call(Opcode.FLUSH, 2, bytes(24)))[0] == 0
    finally:
        asking.close()
        await asyncio.wait_for(serving, 5)
        theirs.close()


async def test_a_malformed_request_gets_einval_and_the_session_goes_on(
    kernel: tuple[FakeKernel, FuseSession, FakeOperations],
) -> None:
    fake, _, _ = kernel
    await fake.init(flags=ASKED_OPENS)
    assert (await fake.call(Opcode.OPEN, 2, b"\1"))[0] == -errno.EINVAL  # body too short
    assert (await fake.call(Opcode.LOOKUP, 1, b"no terminating nul"))[0] == -errno.EINVAL
    await fake.send(Opcode.FORGET, 2, b"")  # no reply even when malformed
    assert (await fake.call(Opcode.GETATTR, 2, bytes(16)))[0] == 0


async def test_readdir_continues_at_the_offset(
    kernel: tuple[FakeKernel, FuseSession, FakeOperations],
) -> None:
    fake, _, _ = kernel
    await fake.init()
    read_in = struct.Struct("<QQIIQII")
    error, payload = await fake.call(Opcode.READDIR, 1, read_in.pack(0, 0, 4096, 0, 0, 0, 0))
    assert error == 0
    names = []
    position = 0
    while position < len(payload):
        _ino, next_offset, length, _kind = DIRENT.unpack_from(payload, position)
        names.append((payload[position + 24 : position + 24 + length], next_offset))
        position += (24 + length + 7) & ~7
    assert names == [(b".", 1), (b"..", 2), (b"file", 3)]
    error, payload = await fake.call(Opcode.READDIR, 1, read_in.pack(0, 2, 4096, 0, 0, 0, 0))
    assert DIRENT.unpack_from(payload)[:3] == (2, 3, 4)
    error, payload = await fake.call(Opcode.READDIR, 1, read_in.pack(0, 3, 4096, 0, 0, 0, 0))
    assert (error, payload) == (0, b"")
    # readdirplus: entries with attributes; "." and ".." carry node id 0.
    error, payload = await fake.call(Opcode.READDIRPLUS, 1, read_in.pack(0, 1, 4096, 0, 0, 0, 0))
    assert error == 0
    assert struct.unpack_from("<Q", payload)[0] == 0  # ".." without attributes
    second = (128 + 24 + 2 + 7) & ~7
    assert struct.unpack_from("<Q", payload, second)[0] == 2  # "file": node 2
    assert payload[second + 128 + 24 : second + 128 + 28] == b"file"


async def test_reads_run_concurrently_and_can_be_interrupted(
    kernel: tuple[FakeKernel, FuseSession, FakeOperations],
) -> None:
    fake, _, operations = kernel
    await fake.init()
    read_in = struct.Struct("<QQIIQII")
    operations.gate.clear()
    first = await fake.send(Opcode.READ, 2, read_in.pack(7, 0, 4, 0, 0, 0, 0))
    second = await fake.send(Opcode.READ, 2, read_in.pack(7, 1, 3, 0, 0, 0, 0))
    # Metadata is answered while reads wait.
    assert (await fake.call(Opcode.GETATTR, 2, bytes(16)))[0] == 0
    await fake.send(Opcode.INTERRUPT, 0, struct.pack("<Q", first))
    assert await fake.receive() == (first, -errno.EINTR, b"")
    operations.gate.set()
    assert await fake.receive() == (second, 0, b"BBB")
    # An operation's unexpected failure is EIO, not a dead session.
    assert await fake.call(Opcode.READ, 2, read_in.pack(7, 200, 3, 0, 0, 0, 0)) == (
        -errno.EIO, b"")
    assert await fake.call(Opcode.READ, 2, read_in.pack(7, 2, 2, 0, 0, 0, 0)) == (0, b"CC")


async def test_session_ends_when_the_kernel_side_closes() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    session = FuseSession(os.dup(ours.fileno()), FakeOperations(), name="closing")
    ours.close()
    serving = asyncio.create_task(session.serve())
    await asyncio.sleep(0)
    theirs.close()
    await asyncio.wait_for(serving, 5)
