"""The Linux kernel's EROFS driver as an independent judge: an uncompressed RAFS v6 image made by
the test builder mounts with the blob as its extra device, and the kernel sees the same tree our
reader does (names, types, modes, owners, sizes, times, link counts, devices, xattrs, hard-link
groups, content). Needs root, loop devices and EROFS in the kernel."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from d7y_node.rafs import BytesReader, Filesystem, open_bootstrap
from d7y_node.rafs.blob import read_file_range
from tests.rafs.fixture_paths import FIXTURES
from tests.rafs.image_builder import Node, build, directory, regular, symlink

pytestmark = pytest.mark.integration


def erofs_available() -> bool:
    try:
        filesystems = Path("/proc/filesystems").read_text()
    except OSError:
        return False
    return os.geteuid() == 0 and "erofs" in filesystems and shutil.which("losetup") is not None


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[tuple[Path, Filesystem, bytes]]:
    if not erofs_available():
        pytest.skip("needs root, losetup and EROFS support in the kernel")
    shared = regular(b"linked " * 2000, xattrs={b"user.tag": b"shared"})
    root = directory(
        {
            b"big": regular(os.urandom(2 * (1 << 20) + 123), mode=0o640, uid=12, gid=34),
            b"small": regular(b"small file\n", compact=True),
            b"one": shared,
            b"two": shared,
            b"symlink": symlink(b"big"),
            b"fifo": Node(mode=stat.S_IFIFO | 0o600),
            b"chardev": Node(mode=stat.S_IFCHR | 0o600, rdev=os.makedev(1, 5)),
            b"many": directory({b"name-%04d" % i: regular(b"%d" % i) for i in range(400)}),
            b"plain": directory({b"x": regular(b"")}, inline=False),
        },
        xattrs={b"trusted.overlay.opaque": b"y", b"user.root": b"r" * 100},
    )
    built = build(root, compress=False, extended_all=False)
    bootstrap_path = tmp_path / "image.boot"
    blob_path = tmp_path / "blob"
    bootstrap_path.write_bytes(built.bootstrap)
    chunk_data_size = open_bootstrap(built.bootstrap).blobs[0].compressed_size
    blob_path.write_bytes(built.blob[:chunk_data_size])
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    attached = subprocess.run(
        ["losetup", "--find", "--show", "--read-only", str(blob_path)],
        capture_output=True,
        text=True,
    )
    if attached.returncode != 0:
        pytest.skip(f"no loop device available: {attached.stderr.strip()}")
    loop = attached.stdout.strip()
    try:
        mount(["-t", "erofs", "-o", f"ro,loop,device={loop}", str(bootstrap_path), str(mountpoint)])
        try:
            yield mountpoint, open_bootstrap(built.bootstrap), built.blob
        finally:
            subprocess.run(["umount", str(mountpoint)], check=True)
    finally:
        subprocess.run(["losetup", "--detach", loop], check=False)


def mount(arguments: list[str]) -> None:
    """Run mount(8); a container without the privilege to mount skips, anything else fails."""
    result = subprocess.run(["mount", *arguments], capture_output=True, text=True)
    if result.returncode != 0:
        message = result.stderr.strip()
        if "permission denied" in message.lower() or "not permitted" in message.lower():
            pytest.skip(f"mounting is not permitted here: {message}")
        raise AssertionError(f"mount {' '.join(arguments)} failed: {message}")


def kernel_view(mountpoint: Path) -> dict[bytes, tuple[object, ...]]:
    view: dict[bytes, tuple[object, ...]] = {}
    for directory_path, names, files in os.walk(mountpoint):
        for name in [".", *names, *files]:
            path = Path(directory_path) / name
            if name == "." and Path(directory_path) != mountpoint:
                continue
            info = path.lstat()
            # The root is "." relative to the mountpoint; other names may start with a dot.
            inside = os.fsencode(path.relative_to(mountpoint))
            relative = b"/" if inside == b"." else b"/" + inside
            xattrs = {
                os.fsencode(key): os.getxattr(path, key, follow_symlinks=False)
                for key in os.listxattr(path, follow_symlinks=False)
            }
            content = path.read_bytes() if stat.S_ISREG(info.st_mode) else None
            target = os.fsencode(os.readlink(path)) if stat.S_ISLNK(info.st_mode) else None
            view[relative] = (
                info.st_mode,
                info.st_uid,
                info.st_gid,
                info.st_size,
                info.st_nlink,
                info.st_rdev,
                info.st_mtime_ns,
                xattrs,
                content,
                target,
                info.st_ino,
            )
    return view


def reader_view(filesystem: Filesystem, blob: bytes) -> dict[bytes, tuple[object, ...]]:
    view: dict[bytes, tuple[object, ...]] = {}
    for path, a in filesystem.walk():
        content = (
            read_file_range(filesystem, a.ino, 0, a.size, [BytesReader(blob)])
            if a.is_regular
            else None
        )
        target = filesystem.readlink(a.ino) if a.is_symlink else None
        view[path] = (
            a.mode,
            a.uid,
            a.gid,
            a.size,
            a.nlink,
            a.rdev,
            a.mtime * 10**9 + a.mtime_nanoseconds,
            filesystem.xattrs(a.ino),
            content,
            target,
            a.ino,
        )
    return view


def link_groups(view: dict[bytes, tuple[object, ...]]) -> set[frozenset[bytes]]:
    groups: dict[object, set[bytes]] = {}
    for path, values in view.items():
        groups.setdefault(values[-1], set()).add(path)
    return {frozenset(group) for group in groups.values()}


def test_kernel_sees_the_same_tree(mounted: tuple[Path, Filesystem, bytes]) -> None:
    mountpoint, filesystem, blob = mounted
    kernel = kernel_view(mountpoint)
    ours = reader_view(filesystem, blob)
    assert sorted(kernel) == sorted(ours)
    for path in ours:
        assert kernel[path][:-1] == ours[path][:-1], path
    assert link_groups(kernel) == link_groups(ours)
    assert frozenset({b"/one", b"/two"}) in link_groups(ours)


def test_kernel_agrees_on_the_real_v6_fixture(tmp_path: Path) -> None:
    """nydus-image's own v6 bootstrap: the kernel (without the blob, so no file content) and
    our reader list the same names, modes, sizes, owners, times and link counts."""
    if not erofs_available():
        pytest.skip("needs root, losetup and EROFS support in the kernel")
    if not FIXTURES.is_dir():
        pytest.skip(f"Nydus fixtures not found at {FIXTURES}")
    bootstrap = FIXTURES / "v6" / "rafs-v6-2.2.boot"
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    mount(["-t", "erofs", "-o", "ro,loop", str(bootstrap), str(mountpoint)])
    try:
        kernel = {}
        for path in [mountpoint, *sorted(mountpoint.iterdir())]:
            info = path.lstat()
            name = b"/" + os.fsencode(path.relative_to(mountpoint)).removeprefix(b".")
            kernel[name.replace(b"//", b"/")] = (
                info.st_mode,
                info.st_uid,
                info.st_gid,
                info.st_size,
                info.st_nlink,
                info.st_mtime_ns,
            )
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)
    filesystem = open_bootstrap(bootstrap.read_bytes())
    ours = {
        path: (a.mode, a.uid, a.gid, a.size, a.nlink, a.mtime * 10**9 + a.mtime_nanoseconds)
        for path, a in filesystem.walk()
    }
    assert kernel == ours
