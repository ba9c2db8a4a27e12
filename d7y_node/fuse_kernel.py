"""The Linux FUSE kernel protocol, spoken on `/dev/fuse` from the asyncio loop.

Owns mounting (`mount(2)` as root, `fusermount3` otherwise), unmounting, cleaning a mount point left
behind by a dead server, and one `FuseSession` per mount: it reads requests from the kernel, decodes
them, calls an `Operations` object and encodes the replies (`include/uapi/linux/fuse.h`, protocol
7.x). It knows nothing of RAFS: `fuse_mount.py` provides the operations of a read-only image.

Why not pyfuse3 (evaluated for this module):
- pyfuse3 keeps its FUSE session, operations object and mount point in module-level C globals
  (`session`, `operations`, `mountpoint_b` in `pyfuse3/__init__.pyx`): one mount per process. The
  node serves one mount per Nydus image (the snapshotter mounts many), in one process, on one loop.
- Its asyncio support swaps trio for a shim process-wide (`pyfuse3.asyncio.enable()` replaces
  `pyfuse3.trio`), more global state; and it is a C extension built against libfuse3, so every
  machine needs libfuse3-dev, pkg-config and a compiler.
- The kernel protocol is small, stable and versioned (major 7, the minor negotiated at INIT), and
  `/dev/fuse` is pollable: a non-blocking fd with `loop.add_reader` serves requests on our own
  loop (uvloop included) with no thread and no second event loop. Only `mount(2)`/`umount2(2)`
  need libc (ctypes), and `fusermount3` (Debian `fuse3`) is used only when not root.

Requests are answered in order of arrival; metadata operations are answered inline (they are
cheap lookups in a memory-mapped bootstrap), reads run as tasks so many can wait for data at once,
and an INTERRUPT cancels the read it names.

Opening and closing cost no request (`open_without_requests`, on by default): the first OPEN,
OPENDIR and FLUSH are answered ENOSYS, which a kernel that offers FUSE_NO_OPEN_SUPPORT and
FUSE_NO_OPENDIR_SUPPORT takes as "every open succeeds, with keep_cache (and cache_dir)", and no
FLUSH, RELEASE or RELEASEDIR follows. A read-only image needs no per-open state (the kernel and
the read-only mount already refuse writes), and each open+close was three round trips to this
process: 60 us against 6 us on ext4 (bench/README.md), paid by every file a container opens.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import enum
import errno
import logging
import os
import shutil
import socket
import stat
import struct
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)

# The protocol version we speak: 7.31 (Linux 5.4) has everything used here; 7.38 is the newest
# layout of the structures below, so replies use it and the kernel adapts.
KERNEL_MAJOR = 7
KERNEL_MINOR = 38
OLDEST_KERNEL_MINOR = 31

ROOT_ID = 1

# Reads of up to this many pages per request (FUSE_MAX_PAGES): 1 MiB, one default RAFS chunk.
MAX_PAGES = 256
# Nothing is ever written to a read-only mount, but the kernel sizes its request buffer check by
# this (a read buffer must hold a WRITE of max_write bytes plus headers).
MAX_WRITE = 128 * 1024
# One request read from /dev/fuse: headers plus the largest body (a WRITE of MAX_WRITE bytes).
REQUEST_BUFFER_SIZE = MAX_WRITE + 4096
# Requests the kernel keeps in flight in the background (readahead): enough to keep a slow
# network busy, far below what would pin much memory.
MAX_BACKGROUND = 64
CONGESTION_THRESHOLD = 48
# The kernel's readahead on a mount we make, in bytes: one FUSE read request (MAX_PAGES) and one
# default RAFS chunk, so a sequential reader costs a request per chunk. The kernel's default of
# 128 KiB made that 8 requests and halved cold sequential reads (bench/README.md); the bytes a
# lazy mount fetches do not change (they go by chunks anyway). Set through the mount's bdi in
# sysfs, which only root may write; the INIT answer offers it too, as the kernel keeps the
# smaller of the two.
READ_AHEAD_BYTES = 1024 * 1024
# Requests handled per wake-up before yielding to the loop, so one busy mount cannot starve others.
REQUESTS_PER_WAKEUP = 64
# How long an unmount waits for the kernel to end the session before aborting the connection.
UNMOUNT_GRACE = 2.0
# `enum fuse_notify_code`: FUSE_NOTIFY_RESEND (protocol 7.40) puts the requests a server read but
# did not answer back in the queue; a notification is a reply with unique 0 and this as error.
NOTIFY_RESEND = 7


class Opcode(enum.IntEnum):
    """`enum fuse_opcode`: the requests a read-only filesystem sees (others get ENOSYS)."""

    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    OPEN = 14
    READ = 15
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    GETXATTR = 22
    LISTXATTR = 23
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    ACCESS = 34
    INTERRUPT = 36
    DESTROY = 38
    BATCH_FORGET = 42
    READDIRPLUS = 44


# FUSE_INIT flags we ask for (each is used only if the kernel offers it).
INIT_ASYNC_READ = 1 << 0
INIT_DO_READDIRPLUS = 1 << 13
INIT_READDIRPLUS_AUTO = 1 << 14
INIT_PARALLEL_DIROPS = 1 << 18
INIT_MAX_PAGES = 1 << 22
INIT_CACHE_SYMLINKS = 1 << 23
# Offered by the kernel (nothing to ask for): an ENOSYS answer to OPEN / OPENDIR means "no open
# requests any more, every open succeeds".
INIT_NO_OPEN_SUPPORT = 1 << 17
INIT_NO_OPENDIR_SUPPORT = 1 << 24
WANTED_INIT_FLAGS = (
    INIT_ASYNC_READ
    | INIT_DO_READDIRPLUS
    | INIT_READDIRPLUS_AUTO
    | INIT_PARALLEL_DIROPS
    | INIT_MAX_PAGES
    | INIT_CACHE_SYMLINKS
)

# fuse_open_out.open_flags
OPEN_KEEP_CACHE = 1 << 1
OPEN_CACHE_DIR = 1 << 3

# Requests the kernel expects no answer to.
_NO_REPLY = frozenset({Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.INTERRUPT})

_IN_HEADER = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, extlen, pad
_OUT_HEADER = struct.Struct("<IiQ")  # len, error (negative errno), unique
_ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
_ENTRY_OUT = struct.Struct("<QQQQII")  # nodeid, generation, entry/attr valid, their nsec
_ATTR_OUT = struct.Struct("<QII")  # attr_valid, attr_valid_nsec, dummy
_OPEN_OUT = struct.Struct("<QII")  # fh, open_flags, padding
_OPEN_IN = struct.Struct("<II")  # flags, open_flags
_READ_IN = struct.Struct("<QQII")  # fh, offset, size, read_flags (the rest is unused here)
_RELEASE_IN = struct.Struct("<QII")  # fh, flags, release_flags
_GETXATTR_IN = struct.Struct("<II")  # size, padding
_GETXATTR_OUT = struct.Struct("<II")  # size, padding
_FORGET_IN = struct.Struct("<Q")
_BATCH_FORGET_IN = struct.Struct("<II")
_FORGET_ONE = struct.Struct("<QQ")
_INTERRUPT_IN = struct.Struct("<Q")
_INIT_IN = struct.Struct("<IIII")  # major, minor, max_readahead, flags
_INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")
_STATFS_OUT = struct.Struct("<QQQQQIIII24x")
_DIRENT = struct.Struct("<QQII")  # ino, off, namelen, type

assert _IN_HEADER.size == 40 and _ATTR.size == 88 and _INIT_OUT.size == 64
assert _ENTRY_OUT.size + _ATTR.size == 128 and _STATFS_OUT.size == 80


class FuseError(Exception):
    """An operation's answer is this errno."""

    def __init__(self, error_number: int, message: str = "") -> None:
        super().__init__(message or os.strerror(error_number))
        self.errno = error_number


@dataclass(frozen=True, slots=True)
class FileAttributes:
    """`struct fuse_attr`: what `stat` shows, already in the kernel's encodings."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    rdev: int  # st_rdev as glibc encodes it (os.makedev); sent in the kernel's 32-bit encoding
    mtime: int
    mtime_nanoseconds: int
    blocks: int  # 512-byte units
    block_size: int = 4096

    def pack(self) -> bytes:
        return _ATTR.pack(
            self.ino, self.size, self.blocks, self.mtime, self.mtime, self.mtime,
            self.mtime_nanoseconds, self.mtime_nanoseconds, self.mtime_nanoseconds,
            self.mode, self.nlink, self.uid, self.gid, encode_device(self.rdev),
            self.block_size, 0,
        )


@dataclass(frozen=True, slots=True)
class Entry:
    """A lookup's answer; `attributes` None is a negative entry the kernel may cache."""

    attributes: FileAttributes | None
    entry_timeout: float
    attribute_timeout: float


@dataclass(frozen=True, slots=True)
class DirectoryItem:
    """One name in a directory listing; `next_offset` is where the listing goes on after it."""

    name: bytes
    ino: int
    file_type: int  # an S_IFMT value
    next_offset: int


@dataclass(frozen=True, slots=True)
class FilesystemStatistics:
    """`struct fuse_kstatfs`."""

    blocks: int
    free_blocks: int
    available_blocks: int
    files: int
    free_files: int
    block_size: int
    name_length: int
    fragment_size: int


@dataclass(frozen=True, slots=True)
class Opened:
    """An open's answer: a handle and `OPEN_*` flags."""

    handle: int
    flags: int


class Operations(Protocol):
    """What a read-only filesystem answers. Raise `FuseError` for an errno; any other exception
    becomes EIO (and is logged)."""

    attribute_timeout: float

    def lookup(self, parent: int, name: bytes) -> Entry: ...

    def getattr(self, ino: int) -> FileAttributes: ...

    def readlink(self, ino: int) -> bytes: ...

    def open(self, ino: int, flags: int) -> Opened: ...

    async def read(self, ino: int, handle: int, offset: int, size: int) -> bytes: ...

    def release(self, ino: int, handle: int) -> None: ...

    def opendir(self, ino: int, flags: int) -> Opened: ...

    def readdir(self, ino: int, offset: int) -> Iterable[DirectoryItem]:
        """The items from `offset` on (offset 0 is the start; an item's `next_offset` is where a
        later call continues), in order; iterated only as far as the reply has room."""
        ...

    def releasedir(self, ino: int, handle: int) -> None: ...

    def getxattr(self, ino: int, name: bytes) -> bytes: ...

    def listxattr(self, ino: int) -> Sequence[bytes]: ...

    def statfs(self, ino: int) -> FilesystemStatistics: ...

    def forget(self, ino: int, lookups: int) -> None: ...


def encode_device(rdev: int) -> int:
    """st_rdev (glibc encoding) in the kernel's `new_encode_dev` form, which `fuse_attr.rdev`
    carries: minor's low byte, major, then minor's upper bits."""
    major, minor = os.major(rdev), os.minor(rdev)
    return ((minor & 0xFF) | ((major & 0xFFF) << 8) | ((minor & ~0xFF) << 12)) & 0xFFFFFFFF


def _timeout(seconds: float) -> tuple[int, int]:
    whole = int(seconds)
    return whole, int((seconds - whole) * 1_000_000_000)


def encode_entry(entry: Entry) -> bytes:
    """`fuse_entry_out`: node id 0 is a negative entry, cached for `entry_timeout`."""
    entry_seconds, entry_nanoseconds = _timeout(entry.entry_timeout)
    attribute_seconds, attribute_nanoseconds = _timeout(entry.attribute_timeout)
    attributes = entry.attributes
    if attributes is None:
        return _ENTRY_OUT.pack(0, 0, entry_seconds, 0, entry_nanoseconds, 0) + bytes(_ATTR.size)
    return (
        _ENTRY_OUT.pack(attributes.ino, 0, entry_seconds, attribute_seconds,
                        entry_nanoseconds, attribute_nanoseconds)
        + attributes.pack()
    )


def encode_attribute_reply(attributes: FileAttributes, timeout: float) -> bytes:
    seconds, nanoseconds = _timeout(timeout)
    return _ATTR_OUT.pack(seconds, nanoseconds, 0) + attributes.pack()


def _dirent_type(file_type: int) -> int:
    # struct dirent d_type is the S_IFMT value shifted down (DT_REG = S_IFREG >> 12, ...).
    return stat.S_IFMT(file_type) >> 12


def _align8(length: int) -> int:
    return (length + 7) & ~7


def encode_dirents(items: Iterable[DirectoryItem], size: int) -> bytes:
    """As many `fuse_dirent` records as fit in `size` bytes."""
    parts: list[bytes] = []
    used = 0
    for item in items:
        record = _DIRENT.size + len(item.name)
        padded = _align8(record)
        if used + padded > size:
            break
        parts.append(_DIRENT.pack(item.ino, item.next_offset, len(item.name),
                                  _dirent_type(item.file_type)))
        parts.append(item.name)
        parts.append(bytes(padded - record))
        used += padded
    return b"".join(parts)


def encode_direntplus(
    items: Iterable[DirectoryItem], size: int, entry_of: Callable[[DirectoryItem], Entry | None]
) -> bytes:
    """As many `fuse_direntplus` records as fit in `size` bytes; `entry_of` None (for "." and
    "..") sends node id 0, which the kernel takes as "no attributes" and counts no lookup for."""
    parts: list[bytes] = []
    used = 0
    empty = bytes(_ENTRY_OUT.size + _ATTR.size)
    for item in items:
        record = _ENTRY_OUT.size + _ATTR.size + _DIRENT.size + len(item.name)
        padded = _align8(record)
        if used + padded > size:
            break
        entry = entry_of(item)
        parts.append(empty if entry is None else encode_entry(entry))
        parts.append(_DIRENT.pack(item.ino, item.next_offset, len(item.name),
                                  _dirent_type(item.file_type)))
        parts.append(item.name)
        parts.append(bytes(padded - record))
        used += padded
    return b"".join(parts)


def xattr_reply(value: bytes, size: int) -> bytes:
    """A GETXATTR/LISTXATTR answer: the size alone when asked with size 0, else the bytes, or
    ERANGE when they do not fit."""
    if size == 0:
        return _GETXATTR_OUT.pack(len(value), 0)
    if len(value) > size:
        raise FuseError(errno.ERANGE)
    return value


def _c_string(body: memoryview) -> bytes:
    data = bytes(body)
    end = data.find(b"\0")
    if end < 0:
        raise FuseError(errno.EINVAL, "name without a terminating NUL")
    return data[:end]


class FuseSession:
    """One mount's conversation with the kernel over a `/dev/fuse` descriptor.

    `serve()` runs until the kernel ends the connection (the filesystem was unmounted) or
    `close()` is called. Owns the descriptor: it is closed when serving ends.
    """

    def __init__(
        self, fd: int, operations: Operations, *, name: str = "fuse",
        open_without_requests: bool = True,
    ) -> None:
        self._fd = fd
        self._operations = operations
        self._name = name
        # See the module docstring; which of OPEN / OPENDIR the kernel lets go unasked is known
        # at INIT.
        self._open_without_requests = open_without_requests
        self._unasked_opens: frozenset[int] = frozenset()
        self._buffer = bytearray(REQUEST_BUFFER_SIZE)
        self._view = memoryview(self._buffer)
        self._initialized = asyncio.Event()
        self._ended: asyncio.Future[None] | None = None
        self._reads: dict[int, asyncio.Task[None]] = {}
        self._interrupted: set[int] = set()
        self._closed = False
        self.protocol_minor = 0
        self.requests = 0

    @property
    def initialized(self) -> asyncio.Event:
        """Set once the kernel's INIT has been answered: the mount is usable."""
        return self._initialized

    def adopt(self, protocol_minor: int) -> None:
        """Serve a connection that another process initialised and handed over
        (`fuse_handover.py`): no INIT comes, the kernel agreed to `protocol_minor` then. The
        kernel is asked to send again what the previous server read but never answered
        (FUSE_NOTIFY_RESEND, Linux 6.9+; an older kernel refuses it, and such a request waits
        until its process is killed)."""
        self.protocol_minor = protocol_minor
        # Every kernel of protocol 7.31 or newer (OLDEST_KERNEL_MINOR) supports both.
        self._choose_unasked_opens(INIT_NO_OPEN_SUPPORT | INIT_NO_OPENDIR_SUPPORT)
        self._initialized.set()
        try:
            os.write(self._fd, _OUT_HEADER.pack(_OUT_HEADER.size, NOTIFY_RESEND, 0))
        except OSError as error:
            log.info("%s: the kernel resends nothing (%s)", self._name, error.strerror)

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        self._ended = loop.create_future()
        loop.add_reader(self._fd, self._on_readable)
        try:
            await self._ended
        finally:
            loop.remove_reader(self._fd)
            reads = list(self._reads.values())
            for task in reads:
                task.cancel()
            await asyncio.gather(*reads, return_exceptions=True)
            self._close_fd()

    def close(self) -> None:
        """Stop serving; a mount still in place then answers ENOTCONN (it must be unmounted)."""
        self._end()
        if self._ended is None:
            self._close_fd()

    def _close_fd(self) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(OSError):
                os.close(self._fd)

    def _end(self) -> None:
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(None)

    # -- reading requests ----------------------------------------------------------------------

    def _on_readable(self) -> None:
        for _ in range(REQUESTS_PER_WAKEUP):
            if self._ended is None or self._ended.done():
                return
            try:
                length = os.readv(self._fd, [self._buffer])
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except OSError as error:
                if error.errno == errno.ENOENT:
                    continue  # the request was interrupted before we read it
                if error.errno != errno.ENODEV:
                    log.warning("%s: reading /dev/fuse failed: %s", self._name, error)
                self._end()  # ENODEV: unmounted
                return
            if length == 0:
                self._end()
                return
            try:
                self._handle(self._view[:length])
            except Exception:
                log.exception("%s: request handling failed", self._name)

    def _handle(self, request: memoryview) -> None:
        if len(request) < _IN_HEADER.size:
            log.warning("%s: short request of %d bytes", self._name, len(request))
            return
        (length, opcode, unique, nodeid, _uid, _gid, _pid, extension_length,
         _padding) = _IN_HEADER.unpack_from(request)
        body = request[_IN_HEADER.size + extension_length * 8 : min(length, len(request))]
        self.requests += 1
        try:
            self._route(opcode, unique, nodeid, body)
        except struct.error:
            log.warning("%s: %s with a malformed body of %d bytes", self._name,
                        _opcode_name(opcode), len(body))
            if opcode not in _NO_REPLY:
                self._reply_error(unique, errno.EINVAL)

    def _route(self, opcode: int, unique: int, nodeid: int, body: memoryview) -> None:
        if opcode == Opcode.INIT:
            self._init(unique, body)
            return
        if not self._initialized.is_set():
            self._reply_error(unique, errno.EIO)
            return
        if opcode == Opcode.FORGET:
            (lookups,) = _FORGET_IN.unpack_from(body)
            self._forget([(nodeid, lookups)])
            return  # no reply
        if opcode == Opcode.BATCH_FORGET:
            (count, _dummy) = _BATCH_FORGET_IN.unpack_from(body)
            count = min(count, (len(body) - _BATCH_FORGET_IN.size) // _FORGET_ONE.size)
            self._forget([
                _FORGET_ONE.unpack_from(body, _BATCH_FORGET_IN.size + index * _FORGET_ONE.size)
                for index in range(count)
            ])
            return
        if opcode == Opcode.INTERRUPT:
            (target,) = _INTERRUPT_IN.unpack_from(body)
            task = self._reads.get(target)
            if task is not None:
                self._interrupted.add(target)
                task.cancel()
            return  # no reply
        if opcode == Opcode.READ:
            handle, offset, size, _flags = _READ_IN.unpack_from(body)
            task = asyncio.get_running_loop().create_task(
                self._read(unique, nodeid, handle, offset, size)
            )
            self._reads[unique] = task
            return
        if opcode == Opcode.DESTROY:
            self._reply(unique, b"")
            self._end()
            return
        try:
            payload = self._dispatch(opcode, nodeid, body)
        except FuseError as error:
            self._reply_error(unique, error.errno)
        except struct.error:
            raise
        except Exception:
            log.exception("%s: %s of node %d failed", self._name, _opcode_name(opcode), nodeid)
            self._reply_error(unique, errno.EIO)
        else:
            self._reply(unique, payload)

    def _forget(self, inodes: list[tuple[int, int]]) -> None:
        for ino, lookups in inodes:
            try:
                self._operations.forget(ino, lookups)
            except Exception:
                log.exception("%s: forget of node %d failed", self._name, ino)

    def _dispatch(self, opcode: int, nodeid: int, body: memoryview) -> bytes:
        operations = self._operations
        if opcode == Opcode.LOOKUP:
            return encode_entry(operations.lookup(nodeid, _c_string(body)))
        if opcode == Opcode.GETATTR:
            return encode_attribute_reply(operations.getattr(nodeid), operations.attribute_timeout)
        if opcode == Opcode.READLINK:
            return operations.readlink(nodeid)
        if opcode in self._unasked_opens:
            # The kernel stops sending this opcode: OPEN/OPENDIR succeed with keep_cache (and
            # cache_dir), FLUSH is never needed (nothing is written).
            raise FuseError(errno.ENOSYS)
        if opcode in (Opcode.OPEN, Opcode.OPENDIR):
            flags, _open_flags = _OPEN_IN.unpack_from(body)
            opener = operations.open if opcode == Opcode.OPEN else operations.opendir
            opened = opener(nodeid, flags)
            return _OPEN_OUT.pack(opened.handle, opened.flags, 0)
        if opcode in (Opcode.RELEASE, Opcode.RELEASEDIR):
            handle, _flags, _release_flags = _RELEASE_IN.unpack_from(body)
            releaser = operations.release if opcode == Opcode.RELEASE else operations.releasedir
            releaser(nodeid, handle)
            return b""
        if opcode in (Opcode.READDIR, Opcode.READDIRPLUS):
            _handle, offset, size, _flags = _READ_IN.unpack_from(body)
            items = operations.readdir(nodeid, offset)
            if opcode == Opcode.READDIR:
                return encode_dirents(items, size)

            def entry_of(item: DirectoryItem) -> Entry | None:
                if item.name in (b".", b".."):
                    return None
                return operations.lookup(nodeid, item.name)

            return encode_direntplus(items, size, entry_of)
        if opcode == Opcode.GETXATTR:
            (size, _padding) = _GETXATTR_IN.unpack_from(body)
            name = _c_string(body[_GETXATTR_IN.size :])
            return xattr_reply(operations.getxattr(nodeid, name), size)
        if opcode == Opcode.LISTXATTR:
            (size, _padding) = _GETXATTR_IN.unpack_from(body)
            names = b"".join(name + b"\0" for name in operations.listxattr(nodeid))
            return xattr_reply(names, size)
        if opcode == Opcode.STATFS:
            statistics = operations.statfs(nodeid)
            return _STATFS_OUT.pack(
                statistics.blocks, statistics.free_blocks, statistics.available_blocks,
                statistics.files, statistics.free_files, statistics.block_size,
                statistics.name_length, statistics.fragment_size, 0,
            )
        if opcode in (Opcode.FLUSH, Opcode.FSYNC, Opcode.FSYNCDIR):
            return b""  # nothing is ever dirty
        if opcode == Opcode.SETATTR:
            raise FuseError(errno.EROFS)
        raise FuseError(errno.ENOSYS)

    async def _read(self, unique: int, ino: int, handle: int, offset: int, size: int) -> None:
        try:
            data = await self._operations.read(ino, handle, offset, size)
        except asyncio.CancelledError:
            if unique in self._interrupted:
                self._reply_error(unique, errno.EINTR)
            return
        except FuseError as error:
            self._reply_error(unique, error.errno)
        except Exception:
            log.exception("%s: read of node %d at %d failed", self._name, ino, offset)
            self._reply_error(unique, errno.EIO)
        else:
            self._reply(unique, data[:size])
        finally:
            self._reads.pop(unique, None)
            self._interrupted.discard(unique)

    def _choose_unasked_opens(self, kernel_flags: int) -> None:
        if not self._open_without_requests:
            return
        unasked = {Opcode.FLUSH}
        if kernel_flags & INIT_NO_OPEN_SUPPORT:
            unasked.add(Opcode.OPEN)
        if kernel_flags & INIT_NO_OPENDIR_SUPPORT:
            unasked.add(Opcode.OPENDIR)
        self._unasked_opens = frozenset(unasked)

    def _init(self, unique: int, body: memoryview) -> None:
        major, minor, max_readahead, flags = _INIT_IN.unpack_from(body)
        if major > KERNEL_MAJOR:
            # Tell the kernel our major; it sends a new INIT in our protocol.
            self._reply(unique, struct.pack("<II", KERNEL_MAJOR, KERNEL_MINOR) + bytes(56))
            return
        if major < KERNEL_MAJOR or minor < OLDEST_KERNEL_MINOR:
            log.error("%s: kernel FUSE protocol %d.%d is too old (need %d.%d)", self._name,
                      major, minor, KERNEL_MAJOR, OLDEST_KERNEL_MINOR)
            self._reply_error(unique, errno.EPROTO)
            self._end()
            return
        self.protocol_minor = min(minor, KERNEL_MINOR)
        self._choose_unasked_opens(flags)
        reply = _INIT_OUT.pack(
            KERNEL_MAJOR, self.protocol_minor, max(max_readahead, READ_AHEAD_BYTES),
            flags & WANTED_INIT_FLAGS,
            MAX_BACKGROUND, CONGESTION_THRESHOLD, MAX_WRITE, 1, MAX_PAGES, 0, 0,
        )
        self._reply(unique, reply)
        self._initialized.set()

    # -- replies -------------------------------------------------------------------------------

    def _reply(self, unique: int, payload: bytes) -> None:
        self._write([_OUT_HEADER.pack(_OUT_HEADER.size + len(payload), 0, unique), payload])

    def _reply_error(self, unique: int, error_number: int) -> None:
        self._write([_OUT_HEADER.pack(_OUT_HEADER.size, -error_number, unique)])

    def _write(self, parts: list[bytes]) -> None:
        if self._closed:
            return
        try:
            os.writev(self._fd, parts)
        except OSError as error:
            if error.errno == errno.ENOENT:
                return  # the request was interrupted meanwhile: the kernel forgot it
            if error.errno == errno.ENODEV:
                self._end()
                return
            log.warning("%s: writing a reply failed: %s", self._name, error)


def _opcode_name(opcode: int) -> str:
    try:
        return Opcode(opcode).name
    except ValueError:
        return f"opcode {opcode}"


# -- mounting -----------------------------------------------------------------------------------

_MS_RDONLY = 1
_MNT_DETACH = 2


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


@dataclass(frozen=True, slots=True)
class MountRequest:
    """How to mount: the source and subtype shown in /proc/mounts, and access options."""

    mountpoint: str
    source: str = "d7y-node"
    subtype: str = "rafs"
    # Let users other than the mounting one in (containers run as anyone). For a non-root
    # mounter, fusermount3 allows it only with user_allow_other in /etc/fuse.conf.
    allow_other: bool = True


def _mount_options(request: MountRequest) -> list[str]:
    options = ["default_permissions"]
    if request.allow_other:
        options.append("allow_other")
    return options


def mount(request: MountRequest, *, use_fusermount: bool | None = None) -> int:
    """Mount a read-only FUSE filesystem; return the non-blocking `/dev/fuse` descriptor to serve
    it with. Root calls mount(2) itself; others (or `use_fusermount`) go through the setuid
    `fusermount3`. Blocks briefly: call it from a thread."""
    if use_fusermount is None:
        use_fusermount = os.geteuid() != 0
    if use_fusermount:
        return _mount_with_fusermount(request)
    return _mount_as_root(request)


def _mount_as_root(request: MountRequest) -> int:
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        root_mode = stat.S_IFMT(os.stat(request.mountpoint).st_mode)
        data = ",".join([
            f"fd={fd}", f"rootmode={root_mode:o}", f"user_id={os.getuid()}",
            f"group_id={os.getgid()}", *_mount_options(request),
        ])
        result = _libc().mount(
            request.source.encode(), os.fsencode(request.mountpoint),
            f"fuse.{request.subtype}".encode(), ctypes.c_ulong(_MS_RDONLY), data.encode(),
        )
        if result != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"mount {request.mountpoint}: {os.strerror(error)}")
    except BaseException:
        os.close(fd)
        raise
    set_read_ahead(request.mountpoint, READ_AHEAD_BYTES)
    return fd


def mount_device(mountpoint: str) -> str | None:
    """"major:minor" of the filesystem mounted at `mountpoint` (the top one), from
    /proc/self/mountinfo: no request reaches the mount, so it works before INIT is answered
    (only the parent directory is resolved: a stat of the mount point itself would wait for
    the INIT answer)."""
    absolute = os.path.abspath(mountpoint)
    parent, name = os.path.split(absolute)
    target = os.fsencode(os.path.join(os.path.realpath(parent), name) if name else absolute)
    try:
        with open("/proc/self/mountinfo", "rb") as file:
            lines = file.read().splitlines()
    except OSError:
        return None
    found = None
    for line in lines:
        fields = line.split(b" ")
        if len(fields) > 4 and _unescape_mount_path(fields[4]) == target:
            found = fields[2].decode()
    return found


def set_read_ahead(mountpoint: str, size: int) -> bool:
    """Set the kernel's readahead for the mount at `mountpoint` to `size` bytes (its bdi's
    `read_ahead_kb`); False when it cannot be set (not root, no sysfs). Blocking, but sends
    nothing to the mount."""
    device = mount_device(mountpoint)
    if device is None:
        return False
    try:
        with open(f"/sys/class/bdi/{device}/read_ahead_kb", "w") as file:
            file.write(str(size // 1024))
    except OSError as error:
        log.debug("readahead of %s stays the kernel's: %s", mountpoint, error)
        return False
    return True


def _fusermount() -> str:
    program = shutil.which("fusermount3") or shutil.which("fusermount")
    if program is None:
        raise OSError(errno.ENOENT, "fusermount3 not found (Debian package fuse3)")
    return program


def _mount_with_fusermount(request: MountRequest) -> int:
    """fusermount3 opens /dev/fuse, mounts, and hands the descriptor back over a socket
    (SCM_RIGHTS) named by the `_FUSE_COMMFD` environment variable."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        options = ",".join([
            "ro", f"fsname={request.source}", f"subtype={request.subtype}",
            *_mount_options(request),
        ])
        environment = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        process = subprocess.Popen(
            [_fusermount(), "-o", options, "--", request.mountpoint],
            env=environment, pass_fds=(theirs.fileno(),), stderr=subprocess.PIPE,
        )
        theirs.close()
        try:
            _message, fds, _flags, _address = socket.recv_fds(ours, 1, 1)
        finally:
            _stdout, stderr = process.communicate()
        if not fds:
            raise OSError(errno.EIO, f"fusermount3 failed: {stderr.decode(errors='replace')}")
    fd = fds[0]
    os.set_blocking(fd, False)
    return fd


def unmount(mountpoint: str, *, lazy: bool = True, use_fusermount: bool | None = None) -> None:
    """Unmount a FUSE mount point (`lazy`: detach now, let open files finish). Blocks: call it
    from a thread. Raises `OSError` (EINVAL when nothing is mounted there)."""
    if use_fusermount is None:
        use_fusermount = os.geteuid() != 0
    if not use_fusermount:
        result = _libc().umount2(os.fsencode(mountpoint), _MNT_DETACH if lazy else 0)
        if result != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"umount {mountpoint}: {os.strerror(error)}")
        return
    arguments = [_fusermount(), "-u", *(["-z"] if lazy else []), "--", mountpoint]
    completed = subprocess.run(arguments, capture_output=True, check=False)
    if completed.returncode != 0:
        raise OSError(errno.EINVAL, completed.stderr.decode(errors="replace").strip())


def is_mount_point(path: str) -> bool:
    """Whether `path` is a mount point, from /proc/self/mountinfo (no access to the mount itself,
    so it neither hangs on a busy server nor fails on a dead one)."""
    target = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo", "rb") as file:
            lines = file.read().splitlines()
    except OSError:
        return False
    for line in lines:
        fields = line.split(b" ")
        if len(fields) > 4 and _unescape_mount_path(fields[4]) == os.fsencode(target):
            return True
    return False


def _unescape_mount_path(field: bytes) -> bytes:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return field.replace(b"\\040", b" ").replace(b"\\011", b"\t").replace(
        b"\\012", b"\n").replace(b"\\134", b"\\")


def clean_if_dead(mountpoint: str) -> bool:
    """Unmount `mountpoint` if it is a FUSE mount whose server is gone (ENOTCONN), as a crash
    leaves it; True if one was cleaned. A live mount, or no mount, is left alone. Blocking.

    Asks with statfs, which the kernel always sends to the server: a `stat` may be answered from
    attributes cached while the server lived (they are kept for a day), so it does not tell a
    dead mount."""
    if not is_mount_point(mountpoint):
        return False
    try:
        os.statvfs(mountpoint)
    except OSError as error:
        if error.errno not in (errno.ENOTCONN, errno.ECONNABORTED):
            raise
        unmount(mountpoint, lazy=True)
        return True
    return False


async def clean_stale_mount(mountpoint: str) -> bool:
    """`clean_if_dead` off the loop."""
    return await asyncio.to_thread(clean_if_dead, mountpoint)


__all__ = [
    "DirectoryItem",
    "Entry",
    "FileAttributes",
    "FilesystemStatistics",
    "FuseError",
    "FuseSession",
    "MountRequest",
    "Opened",
    "Operations",
    "clean_if_dead",
    "clean_stale_mount",
    "encode_device",
    "is_mount_point",
    "mount",
    "mount_device",
    "set_read_ahead",
    "unmount",
]
