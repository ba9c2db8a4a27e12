"""`d7y-node convert` end to end, over several OCI images built here and pushed to a real
registry, each converted by the CLI to a Nydus image in that registry and checked against the
same source image unpacked by real containerd (`ctr images pull` + `ctr images mount`):

- `sizes`: regular files of many sizes, 0 bytes to past 8 MiB, on and around the 4 KiB block and
  1 MiB chunk edges, random and compressible, a file repeated in a later layer (chunk dedup);
- `whiteouts`: file and directory whiteouts and opaque directories over four layers, entries
  whited out and created again, directories replaced by files and files by directories, a
  directory over a lower symlink;
- `special`: hard-link groups (and one a later layer breaks), xattrs, character and block
  devices (also with 12-bit majors and 20-bit minors), fifos, odd modes (setuid, setgid, sticky,
  none at all), owners past 16 bits, symlinks (relative, absolute, dangling, 1000 bytes long),
  long and non-ASCII names, deep paths;
- `mixed`: a little of everything in two layers.

Each image is converted with its own settings (compressors `zstd`, `lz4_block`, `none`; digests
`blake3`, `sha256`; chunk sizes 1 MiB and 64 KiB). Checks: (a) the pushed manifest has the Nydus
media types and annotations, and the converter's progress output; (b) `d7y-node mount <image
reference>` (served by a running node, and by the command itself with `--foreground`) shows the
same tree as containerd's unpack; (c) with `--compressor none` the Linux kernel's EROFS driver
mounts the pulled bootstrap with a loop device per blob and shows that tree too. Compared: names,
types, content, modes, owners, link targets, hard-link groups, xattrs, device numbers, file mtimes.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
import termios
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from d7y_node.convert import (
    ANNOTATION_NYDUS_BLOB,
    ANNOTATION_NYDUS_BOOTSTRAP,
    ANNOTATION_NYDUS_FS_VERSION,
    BOOTSTRAP_MEMBER,
    MEDIA_TYPE_NYDUS_BLOB,
)
from d7y_node.fuse_kernel import is_mount_point
from d7y_node.mounts import MountRecords
from d7y_node.oci import MEDIA_TYPE_OCI_MANIFEST, default_platform
from d7y_node.rafs import open_bootstrap
from tests.harness.containerd import Containerd, write_mirror_hosts
from tests.harness.images import (
    MEDIA_TYPE_CONFIG,
    MEDIA_TYPE_LAYER_GZIP,
    MEDIA_TYPE_MANIFEST,
    BuiltImage,
    Descriptor,
)
from tests.harness.node import node_command
from tests.harness.process import run, wait_until
from tests.harness.registry import Registry
from tests.integration.conftest import NodeFactory, end_foreground_mount
from tests.test_convert import Entry, directory, make_tar

pytestmark = pytest.mark.integration

SOURCE_TAG = "v1"
CONVERT_TIMEOUT_SECONDS = 300.0
COMMAND_TIMEOUT_SECONDS = 120.0
MOUNT_WAIT_SECONDS = 30.0
TERMINAL_COLUMNS = 160
KIB = 1 << 10
MIB = 1 << 20
NEEDS_FUSE = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                                reason="mounting FUSE needs root and /dev/fuse")


# -- the source images ---------------------------------------------------------------------------


def random_bytes(size: int) -> bytes:
    return os.urandom(size)


def compressible_bytes(size: int) -> bytes:
    line = b"the same line again, which compresses well\n"
    return (line * (size // len(line) + 1))[:size]


# Around the 4 KiB block, the 64 KiB chunk of the `whiteouts` conversion, the 1 MiB chunk, and
# past 8 MiB.
RANDOM_SIZES = (
    0, 1, 511, 4095, 4 * KIB, 4 * KIB + 1, 64 * KIB - 1, 64 * KIB, MIB - 1, MIB, MIB + 1,
    2 * MIB, 3 * MIB + 7, 8 * MIB - 1, 8 * MIB, 8 * MIB + 1, 9 * MIB + 5,
)
COMPRESSIBLE_SIZES = (100, 4 * KIB, MIB, 2 * MIB + 1, 8 * MIB + 3)


def sizes_layers() -> list[list[Entry]]:
    repeated = random_bytes(MIB + 1)
    return [
        [
            directory("random"),
            *[Entry(f"random/{size}", data=random_bytes(size), mode=0o644)
              for size in RANDOM_SIZES],
            directory("text"),
            *[Entry(f"text/{size}", data=compressible_bytes(size), mode=0o600)
              for size in COMPRESSIBLE_SIZES],
            Entry("zeros-2MiB", data=bytes(2 * MIB)),
            Entry("repeated-lower", data=repeated),
        ],
        [
            # The same content in a later layer: its chunks are stored once.
            Entry("repeated-upper", data=repeated),
            Entry("random/1", data=b"rewritten in the upper layer"),
            Entry("random/grown-to-a-chunk", data=random_bytes(MIB)),
        ],
    ]


def check_sizes(view: Snapshot) -> None:
    for size in RANDOM_SIZES:
        if size != 1:  # rewritten above
            assert view[f"/random/{size}"]["size"] == size
    rewritten = hashlib.sha256(b"rewritten in the upper layer").hexdigest()
    assert view["/random/1"]["sha256"] == rewritten
    assert view["/repeated-lower"]["sha256"] == view["/repeated-upper"]["sha256"]
    assert view["/random/9437189"]["size"] == 9 * MIB + 5


def whiteouts_layers() -> list[list[Entry]]:
    return [
        [
            directory("a"), directory("a/b"), Entry("a/b/c", data=b"c\n"),
            Entry("a/keep", data=b"first keep\n"),
            directory("d"), Entry("d/1", data=b"1\n"), Entry("d/2", data=b"2\n"),
            directory("d/sub"), Entry("d/sub/x", data=b"x\n"),
            Entry("e", data=b"e is a file below\n"),
            directory("f"), Entry("f/inner", data=b"inner\n"),
            Entry("g", kind=tarfile.SYMTYPE, link="a"),
            Entry("h", data=b"h\n"),
            directory("opq"), Entry("opq/old1", data=b"old1\n"),
            directory("opq/sub"), Entry("opq/sub/old2", data=b"old2\n"),
            directory("deep"), directory("deep/er"), Entry("deep/er/file", data=b"deep\n"),
        ],
        [
            Entry("a/.wh.keep"),
            Entry(".wh.d"),
            directory("e"), Entry("e/now-a-dir", data=b"e is a directory now\n"),
            Entry("f", data=b"f is a file now\n"),
            directory("opq", mode=0o750), Entry("opq/.wh..wh..opq"),
            Entry("opq/new1", data=b"new1\n"), Entry("opq/new2", data=b"new2\n"),
            directory("new"), Entry("new/x", data=b"added in layer 2\n"),
            Entry("deep/er/.wh.file"),
        ],
        [
            Entry(".wh.new"),
            directory("d"), Entry("d/fresh", data=b"d again, without its old files\n"),
            Entry("a/keep", data=b"second keep\n"),
            Entry("opq/.wh.new1"),
            Entry("h", kind=tarfile.SYMTYPE, link="a/b/c"),
            directory("deep/er"), Entry("deep/er/.wh..wh..opq"),
            Entry("deep/er/after", data=b"after\n"),
        ],
        [
            directory("opq"), Entry("opq/.wh..wh..opq"), Entry("opq/final", data=b"final\n"),
            Entry("e/.wh.now-a-dir"),
            # Over the lower symlink `g` (to `a`): `g` becomes a directory (overlay stacking).
            Entry("g/through", data=b"g is a directory now\n"),
            Entry(".wh.h"),
            Entry("a/b/.wh.c"),
        ],
    ]


def check_whiteouts(view: Snapshot) -> None:
    assert "/a/keep" in view and "/a/b/c" not in view and "/a/b" in view
    assert sorted(path for path in view if path.startswith("/d/")) == ["/d/fresh"]
    assert stat.S_ISDIR(view["/e"]["mode"]) and "/e/now-a-dir" not in view
    assert stat.S_ISREG(view["/f"]["mode"]) and "/f/inner" not in view
    assert sorted(path for path in view if path.startswith("/opq/")) == ["/opq/final"]
    assert "/new" not in view and "/h" not in view
    assert stat.S_ISDIR(view["/g"]["mode"]) and "/a/through" not in view
    assert sorted(path for path in view if path.startswith("/deep/er/")) == ["/deep/er/after"]


LONG_NAME = "n" * 255
DEEP_PATH = "/".join(f"level{index}" for index in range(24))


def special_layers() -> list[list[Entry]]:
    deep_directories = [directory("/".join(DEEP_PATH.split("/")[: index + 1]))
                        for index in range(24)]
    return [
        [
            directory("hl"), directory("hl/sub"),
            Entry("hl/a", data=b"group one\n", mode=0o640, uid=11, gid=12),
            Entry("hl/b", kind=tarfile.LNKTYPE, link="hl/a", mode=0o640, uid=11, gid=12),
            Entry("hl/c", kind=tarfile.LNKTYPE, link="hl/a", mode=0o640, uid=11, gid=12),
            Entry("hl/sub/d", kind=tarfile.LNKTYPE, link="hl/a", mode=0o640, uid=11, gid=12),
            Entry("hl/x", data=b"group two\n"),
            Entry("hl/y", kind=tarfile.LNKTYPE, link="hl/x"),
            Entry("hl/z", kind=tarfile.LNKTYPE, link="hl/x"),
            Entry("hl/empty", data=b""),
            Entry("hl/empty-too", kind=tarfile.LNKTYPE, link="hl/empty"),
            Entry("xattrs", data=b"with xattrs\n",
                  xattrs=(("user.color", "blue"), ("user.utf8", "grün ✓"),
                          ("trusted.note", "t" * 200))),
            directory("xattr-dir", xattrs=(("user.dir", "d"),)),
            directory("dev"),
            Entry("dev/null", kind=tarfile.CHRTYPE, mode=0o666, device=(1, 3)),
            Entry("dev/big-char", kind=tarfile.CHRTYPE, mode=0o600, device=(4095, 1048575)),
            Entry("dev/loop7", kind=tarfile.BLKTYPE, mode=0o660, device=(7, 7)),
            Entry("dev/nvme", kind=tarfile.BLKTYPE, mode=0o640, uid=6, gid=6,
                  device=(259, 70000)),
            Entry("fifo", kind=tarfile.FIFOTYPE, mode=0o644, uid=5, gid=6),
            directory("modes"),
            Entry("modes/none", data=b"no permissions\n", mode=0o000),
            Entry("modes/all", data=b"every bit\n", mode=0o7777),
            Entry("modes/setuid", data=b"setuid\n", mode=0o4711),
            Entry("modes/setgid", data=b"setgid\n", mode=0o2755, gid=50),
            directory("modes/sticky", mode=0o1777),
            directory("modes/closed", mode=0o000),
            Entry("modes/closed/inside", data=b"behind a closed directory\n"),
            directory("owners"),
            Entry("owners/nobody", data=b"nobody\n", uid=65534, gid=65534),
            Entry("owners/wide", data=b"past 16 bits\n", uid=100000, gid=2_000_000),
            directory("owners/dir", mode=0o711, uid=1000, gid=70000),
            Entry("owners/link", kind=tarfile.SYMTYPE, link="nobody", uid=33, gid=34),
            directory("links"),
            Entry("links/relative", kind=tarfile.SYMTYPE, link="../hl/a"),
            Entry("links/absolute", kind=tarfile.SYMTYPE, link="/hl/x"),
            Entry("links/dangling", kind=tarfile.SYMTYPE, link="nowhere/at/all"),
            Entry("links/long", kind=tarfile.SYMTYPE, link="x/" * 500),
            Entry("links/to-dir", kind=tarfile.SYMTYPE, link="../modes"),
            directory("names"),
            Entry(f"names/{LONG_NAME}", data=b"a 255-byte name\n"),
            Entry("names/naïve ünïcödé ✓", data=b"utf-8 name\n"),
            Entry("names/with space and 'quote'", data=b"space\n"),
            Entry("names/.hidden", data=b"hidden\n"),
            *deep_directories,
            Entry(f"{DEEP_PATH}/bottom", data=b"deep down\n"),
            directory("empty-dir", mode=0o700),
            Entry("metadata-only", data=b"same bytes\n", mode=0o644),
        ],
        [
            # Rewriting `hl/z` breaks it out of its group; `metadata-only` changes its mode and
            # owner with the same content.
            Entry("hl/z", data=b"on its own now\n"),
            Entry("metadata-only", data=b"same bytes\n", mode=0o755, uid=9, gid=9),
            Entry("hl/new", data=b"group three\n", uid=3),
            Entry("hl/new-link", kind=tarfile.LNKTYPE, link="hl/new", uid=3),
        ],
    ]


def check_special(view: Snapshot) -> None:
    assert view["/dev/big-char"]["rdev"] == os.makedev(4095, 1048575)
    assert view["/dev/nvme"]["rdev"] == os.makedev(259, 70000)
    assert stat.S_ISFIFO(view["/fifo"]["mode"])
    assert stat.S_IMODE(view["/modes/all"]["mode"]) == 0o7777
    assert stat.S_IMODE(view["/modes/none"]["mode"]) == 0
    assert view["/owners/wide"]["gid"] == 2_000_000
    assert view["/xattrs"]["xattrs"]["user.utf8"] == "grün ✓".encode()
    assert view["/links/long"]["target"] == "x/" * 500
    assert f"/names/{LONG_NAME}" in view and f"/{DEEP_PATH}/bottom" in view
    assert stat.S_IMODE(view["/metadata-only"]["mode"]) == 0o755


MIXED_LAYERS: list[list[Entry]] = [
    [
        directory("etc"),
        Entry("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\n"),
        Entry("etc/gone", data=b"removed by a whiteout\n"),
        directory("var", mode=0o750, uid=7, gid=8),
        directory("var/cache"),
        Entry("var/cache/old", data=b"old\n"),
        directory("var/cache/sub"),
        Entry("var/cache/sub/deep", data=b"deep\n"),
        directory("bin"),
        Entry("bin/tool", data=b"#!/bin/sh\necho tool\n" * 300, mode=0o4755, uid=1000, gid=1001),
        Entry("bin/tool-alias", kind=tarfile.LNKTYPE, link="bin/tool"),
        directory("usr"),
        directory("usr/lib"),
        Entry("lib", kind=tarfile.SYMTYPE, link="usr/lib"),
        Entry("abs", kind=tarfile.SYMTYPE, link="/etc/passwd"),
        directory("dev"),
        Entry("dev/null", kind=tarfile.CHRTYPE, mode=0o666, device=(1, 3)),
        Entry("run/pipe", kind=tarfile.FIFOTYPE, mode=0o620, uid=5, gid=6),
        Entry("tagged", data=b"with xattrs\n",
              xattrs=(("user.color", "blue"), ("trusted.note", "t" * 100))),
        Entry("replaced", data=b"lower version\n"),
    ],
    [
        Entry("etc/.wh.gone"),
        directory("var/cache", mode=0o700, uid=3, gid=4),
        Entry("var/cache/.wh..wh..opq"),
        Entry("var/cache/new", data=b"new\n"),
        Entry("replaced", data=b"upper version\n", mode=0o600, uid=2),
        Entry("etc/hosts", data=b"127.0.0.1 localhost\n", mode=0o444, gid=9),
        Entry("etc/hosts.hard", kind=tarfile.LNKTYPE, link="etc/hosts"),
        directory("sticky", mode=0o1777),
        Entry("odd", data=b"odd mode\n", mode=0o2707, uid=65534, gid=65535),
        directory("dir-xattr", xattrs=(("user.dir", "d"),)),
        Entry("lib/via-link", data=b"makes lib a directory\n"),
    ],
]


def check_mixed(view: Snapshot) -> None:
    assert "/etc/gone" not in view and "/var/cache/old" not in view
    assert "/var/cache/sub" not in view and "/var/cache/new" in view
    assert view["/dev/null"]["rdev"] == os.makedev(1, 3)
    assert view["/tagged"]["xattrs"]["user.color"] == b"blue"
    assert "/lib/via-link" in view and "/usr/lib/via-link" not in view


@dataclass(frozen=True)
class SourceImage:
    """An image to convert: its layers, how to convert it, and what its tree must show."""

    name: str
    layers: Callable[[], list[list[Entry]]]
    convert_flags: tuple[str, ...]
    check: Callable[[Snapshot], None]

    @property
    def repository(self) -> str:
        return f"convert/{self.name}"


IMAGES = {
    image.name: image for image in (
        SourceImage("sizes", sizes_layers, (), check_sizes),
        SourceImage("whiteouts", whiteouts_layers,
                    ("--compressor", "lz4_block", "--digester", "sha256",
                     "--chunk-size", str(64 * KIB)), check_whiteouts),
        SourceImage("special", special_layers, ("--compressor", "none"), check_special),
        SourceImage("mixed", lambda: MIXED_LAYERS, ("--digester", "sha256"), check_mixed),
    )
}


def build_source_image(
    layout: Path, layers_entries: list[list[Entry]], *, wrong_diff_id: bool = False,
) -> BuiltImage:
    """An OCI layout with `layers_entries`, for this machine's platform."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def store(data: bytes, media_type: str) -> Descriptor:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return Descriptor(media_type, "sha256:" + digest, len(data), blobs / digest)

    layers = []
    diff_ids = []
    for entries in layers_entries:
        tar = make_tar(entries)
        diff_ids.append("sha256:" + hashlib.sha256(tar + b"x" * wrong_diff_id).hexdigest())
        layers.append(store(gzip.compress(tar, compresslevel=1, mtime=0), MEDIA_TYPE_LAYER_GZIP))
    platform = default_platform()
    config = {
        "architecture": platform.architecture, "os": platform.os,
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    config_descriptor = store(json.dumps(config).encode(), MEDIA_TYPE_CONFIG)
    manifest = store(json.dumps({
        "schemaVersion": 2, "mediaType": MEDIA_TYPE_MANIFEST,
        "config": config_descriptor.as_json(), "layers": [layer.as_json() for layer in layers],
    }).encode(), MEDIA_TYPE_MANIFEST)
    (layout / "index.json").write_text(json.dumps({
        "schemaVersion": 2,
        "manifests": [{**manifest.as_json(),
                       "annotations": {"org.opencontainers.image.ref.name": SOURCE_TAG}}],
    }))
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    return BuiltImage(layout, SOURCE_TAG, manifest, config_descriptor, tuple(layers),
                      ("/bin/sh",))


@pytest.fixture(scope="module")
def source_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A registry holding every source image as `convert/<name>:v1`."""
    server = Registry(tmp_path_factory.mktemp("convert-registry"))
    server.start()
    try:
        for image in IMAGES.values():
            layout = tmp_path_factory.mktemp(f"layout-{image.name}") / "layout"
            built = build_source_image(layout, image.layers())
            built.push(server.host, f"{image.repository}:{SOURCE_TAG}")
            shutil.rmtree(layout)  # the registry has it now
        yield server
    finally:
        server.stop()


# -- trees ---------------------------------------------------------------------------------------

Snapshot = dict[str, dict[str, Any]]
View = tuple[Snapshot, set[frozenset[str]]]


def snapshot(root: str) -> View:
    """Below `root` (the root itself left out: its attributes are the unpacker's): each path's
    type and mode, owner, device number, link target, size and content digest, xattrs, file
    mtime; and the hard-link groups."""
    result: Snapshot = {}
    inodes: dict[int, set[str]] = {}
    for directory_path, names, files in os.walk(root):
        for name in names + files:
            path = os.path.join(directory_path, name)
            relative = "/" + os.path.relpath(path, root)
            st = os.lstat(path)
            entry: dict[str, Any] = {
                "mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid,
                "xattrs": {key: os.getxattr(path, key, follow_symlinks=False)
                           for key in sorted(os.listxattr(path, follow_symlinks=False))},
            }
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                entry["rdev"] = st.st_rdev
            if not stat.S_ISDIR(st.st_mode):
                entry["mtime"] = st.st_mtime_ns
                entry["nlink"] = st.st_nlink
            if stat.S_ISLNK(st.st_mode):
                entry["target"] = os.readlink(path)
            if stat.S_ISREG(st.st_mode):
                entry["size"] = st.st_size
                hasher = hashlib.sha256()
                with open(path, "rb") as file:
                    while block := file.read(MIB):
                        hasher.update(block)
                entry["sha256"] = hasher.hexdigest()
                inodes.setdefault(st.st_ino, set()).add(relative)
            result[relative] = entry
    groups = {frozenset(paths) for paths in inodes.values() if len(paths) > 1}
    return result, groups


def without_trusted_xattrs(view: Snapshot) -> Snapshot:
    """`view` without `trusted.*` xattrs: this host's containerd (Debian 1.6) does not set them
    when it unpacks a layer (checked on its snapshot directories), while Nydus and we keep every
    xattr the layer has; the tests check ours separately."""
    return {
        path: {**entry, "xattrs": {key: value for key, value in entry["xattrs"].items()
                                   if not key.startswith("trusted.")}}
        for path, entry in view.items()
    }


def differences(seen: Snapshot, expected: Snapshot) -> list[str]:
    """Each path and field where the two trees disagree (empty when they are equal)."""
    out = [f"{path}: only in {'mount' if path in seen else 'reference'}"
           for path in sorted(set(seen) ^ set(expected))]
    for path in sorted(set(seen) & set(expected)):
        for key in sorted(set(seen[path]) | set(expected[path])):
            if seen[path].get(key) != expected[path].get(key):
                out.append(f"{path} {key}: {seen[path].get(key)!r} != {expected[path].get(key)!r}")
    return out


def without_link_counts(view: Snapshot) -> Snapshot:
    return {path: {key: value for key, value in entry.items() if key != "nlink"}
            for path, entry in view.items()}


def assert_same_tree(seen: View, expected: View, image: SourceImage) -> None:
    """`seen` (ours) equals containerd's `expected`; link counts are checked against the
    hard-link groups instead (overlayfs shows a lower file's own count, which still includes
    links an upper layer replaced)."""
    image.check(seen[0])  # what the layers meant, on our side too
    assert seen[1] == expected[1]
    assert differences(without_trusted_xattrs(without_link_counts(seen[0])),
                       without_link_counts(expected[0])) == []
    group_sizes = {path: len(group) for group in seen[1] for path in group}
    wrong_counts = [(path, entry["nlink"], group_sizes.get(path, 1))
                    for path, entry in seen[0].items()
                    if "nlink" in entry and entry["nlink"] != group_sizes.get(path, 1)]
    assert wrong_counts == []
    if image.name == "special":
        assert seen[0]["/xattrs"]["xattrs"]["trusted.note"] == b"t" * 200
    if image.name == "mixed":
        assert seen[0]["/tagged"]["xattrs"]["trusted.note"] == b"t" * 100


@pytest.fixture(scope="module")
def containerd_views(
    source_registry: Registry, tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, View]:
    """Every source image as real containerd unpacks and mounts it (overlayfs)."""
    if os.geteuid() != 0:
        pytest.skip("containerd needs root")
    daemon = Containerd(tmp_path_factory.mktemp("convert-containerd"))
    daemon.start()
    views: dict[str, View] = {}
    try:
        write_mirror_hosts(daemon.hosts_dir, source_registry.host, None)
        for image in IMAGES.values():
            reference = f"{source_registry.host}/{image.repository}:{SOURCE_TAG}"
            mountpoint = tmp_path_factory.mktemp(f"containerd-{image.name}")
            daemon.pull(reference)
            daemon.ctr(["images", "mount", reference, str(mountpoint)])
            try:
                views[image.name] = snapshot(str(mountpoint))
            finally:
                daemon.ctr(["images", "unmount", "--rm", str(mountpoint)], check=False)
            # The reference itself shows what the layers meant (so a broken unpacker and a
            # broken converter cannot simply agree).
            image.check(views[image.name][0])
    finally:
        daemon.stop()
    return views


# -- converting ----------------------------------------------------------------------------------


def run_convert(
    registry: Registry, source: str, target: str, *extra: str, tty: bool = False,
) -> subprocess.CompletedProcess[str]:
    """`d7y-node convert`; with `tty`, its stderr is a pseudo-terminal (read back as text)."""
    argv = [sys.executable, "-m", "d7y_node", "convert", f"{registry.host}/{source}",
            f"{registry.host}/{target}", *extra]
    if not tty:
        return subprocess.run(argv, capture_output=True, text=True,
                              timeout=CONVERT_TIMEOUT_SECONDS)
    master, slave = os.openpty()
    # Wide enough for a whole step line (a narrower terminal cuts the phase total off).
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, TERMINAL_COLUMNS, 0, 0))
    try:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=slave)
        os.close(slave)
        slave = -1
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the command ended and closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        stdout, _ = process.communicate(timeout=CONVERT_TIMEOUT_SECONDS)
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    return subprocess.CompletedProcess(argv, process.returncode, stdout.decode(),
                                       b"".join(chunks).decode("utf-8", "replace"))


class Conversions:
    """Each (image, settings) converted once per module: the target reference."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.done: dict[tuple[str, tuple[str, ...]], str] = {}

    def get(self, image: SourceImage, flags: tuple[str, ...] | None = None) -> str:
        flags = image.convert_flags if flags is None else flags
        key = (image.name, flags)
        if key not in self.done:
            tag = f"nydus-{len(self.done)}"
            result = run_convert(self.registry, f"{image.repository}:{SOURCE_TAG}",
                                 f"{image.repository}:{tag}", *flags)
            assert result.returncode == 0, result.stderr
            layer_count = int(result.stderr.split(" layer(s)", 1)[0].rsplit(" ", 1)[-1])
            # Not a terminal: one plain line per step, and the totals at the end.
            assert "\r" not in result.stderr
            for number in range(1, layer_count + 1):
                assert f"pull {number}/{layer_count} " in result.stderr
            assert "write Nydus blobs: " in result.stderr
            assert result.stderr.splitlines()[-1].startswith("total: pulled ")
            assert result.stdout.strip().startswith("sha256:")
            self.done[key] = tag
        return self.done[key]


@pytest.fixture(scope="module")
def conversions(source_registry: Registry) -> Conversions:
    return Conversions(source_registry)


def get(registry: Registry, path: str, accept: str | None = None) -> bytes:
    request = urllib.request.Request(f"{registry.url}{path}")
    if accept:
        request.add_header("Accept", accept)
    with urllib.request.urlopen(request, timeout=30) as response:
        body: bytes = response.read()
        return body


def pull_nydus(
    registry: Registry, repository: str, tag: str, into: Path
) -> tuple[Path, Path, list[str]]:
    """Check the converted manifest; download the blobs (named by blob id) and the bootstrap.
    Returns (bootstrap, blob dir, blob ids in manifest order)."""
    manifest = json.loads(get(registry, f"/v2/{repository}/manifests/{tag}",
                              MEDIA_TYPE_OCI_MANIFEST))
    assert manifest["mediaType"] == MEDIA_TYPE_OCI_MANIFEST
    *blobs, boot = manifest["layers"]
    assert blobs, "every image here holds file data"
    for layer in blobs:
        assert layer["mediaType"] == MEDIA_TYPE_NYDUS_BLOB
        assert layer["annotations"] == {ANNOTATION_NYDUS_BLOB: "true"}
    assert boot["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    assert boot["annotations"][ANNOTATION_NYDUS_BOOTSTRAP] == "true"
    assert boot["annotations"][ANNOTATION_NYDUS_FS_VERSION] == "6"
    config_digest = manifest["config"]["digest"]
    config = json.loads(get(registry, f"/v2/{repository}/blobs/{config_digest}"))
    blob_dir = into / "blobs"
    blob_dir.mkdir(parents=True)
    ids = []
    for layer in blobs:
        data = get(registry, f"/v2/{repository}/blobs/{layer['digest']}")
        blob_id = layer["digest"].removeprefix("sha256:")
        assert hashlib.sha256(data).hexdigest() == blob_id
        (blob_dir / blob_id).write_bytes(data)
        ids.append(blob_id)
    boot_tar = gzip.decompress(get(registry, f"/v2/{repository}/blobs/{boot['digest']}"))
    assert config["rootfs"]["diff_ids"] == [
        layer["digest"] for layer in blobs] + ["sha256:" + hashlib.sha256(boot_tar).hexdigest()]
    with tarfile.open(fileobj=io.BytesIO(boot_tar)) as archive:
        member = archive.extractfile(BOOTSTRAP_MEMBER)
        assert member is not None
        bootstrap = into / "image.boot"
        bootstrap.write_bytes(member.read())
    filesystem = open_bootstrap(bootstrap.read_bytes())
    assert [blob.blob_id for blob in filesystem.blobs] == ids
    return bootstrap, blob_dir, ids


# -- (a) + (b): the converted image, mounted by `d7y-node mount` ---------------------------------


def d7y(*arguments: object) -> subprocess.CompletedProcess[str]:
    return run([*node_command(), *map(str, arguments)], timeout=COMMAND_TIMEOUT_SECONDS)


@NEEDS_FUSE
@pytest.mark.parametrize("served_by", ["node", "foreground"])
@pytest.mark.parametrize("name", list(IMAGES))
def test_converted_image_mounts_like_containerd_unpacks_it(
    source_registry: Registry, containerd_views: dict[str, View], conversions: Conversions,
    node_factory: NodeFactory, tmp_path: Path, name: str, served_by: str,
) -> None:
    image = IMAGES[name]
    tag = conversions.get(image)
    pull_nydus(source_registry, image.repository, tag, tmp_path / "pulled")  # the manifest form
    reference = f"{source_registry.host}/{image.repository}:{tag}"
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    process: subprocess.Popen[bytes] | None = None
    if served_by == "node":
        data_dir = node_factory().data_dir
        answer = d7y("mount", "--data-dir", data_dir, reference, mountpoint)
        assert "served by the node" in answer.stdout
    else:
        data_dir = tmp_path / "data"
        process = subprocess.Popen(
            [*node_command(), "mount", "--foreground", "--data-dir", str(data_dir), reference,
             str(mountpoint)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
    try:
        if process is not None:
            wait_until(lambda: is_mount_point(str(mountpoint)), timeout=MOUNT_WAIT_SECONDS,
                       what="the foreground mount", alive=lambda: process.poll() is None)
        seen = snapshot(str(mountpoint))
        d7y("umount", "--data-dir", data_dir, mountpoint)
        if process is not None:
            assert process.wait(timeout=10) == 0
    finally:
        end_foreground_mount(process, mountpoint)
    assert not is_mount_point(str(mountpoint))
    assert MountRecords(data_dir).all() == []
    assert_same_tree(seen, containerd_views[name], image)


def test_convert_draws_a_progress_bar_on_a_terminal(source_registry: Registry) -> None:
    image = IMAGES["sizes"]
    result = run_convert(source_registry, f"{image.repository}:{SOURCE_TAG}",
                         f"{image.repository}:tty", tty=True)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.replace("\r\n", "\n").split("\n")
    pull = next(line for line in lines if "pull 1/2 " in line)
    # Redrawn in place, ending at 100% of the layer, with every layer's total beside it.
    assert pull.count("\r") >= 1 and "100.0%" in pull.split("\r")[-1]
    assert "| pulled " in pull
    written = next(line for line in lines if "write Nydus blobs" in line)
    assert "100.0%" in written.split("\r")[-1] and "| written " in written
    pushes = [line for line in lines if line.lstrip("\r").startswith("push ")]
    assert pushes and all("| pushed " in line or "already there" in line for line in pushes)
    assert any(line.startswith("total: pulled ") for line in lines)
    assert result.stdout.strip().startswith("sha256:")


# -- (c): the kernel's EROFS driver --------------------------------------------------------------


def erofs_available() -> bool:
    try:
        filesystems = Path("/proc/filesystems").read_text()
    except OSError:
        return False
    return os.geteuid() == 0 and "erofs" in filesystems and shutil.which("losetup") is not None


@pytest.mark.parametrize("name", list(IMAGES))
def test_uncompressed_conversion_mounts_with_kernel_erofs(
    source_registry: Registry, containerd_views: dict[str, View], conversions: Conversions,
    tmp_path: Path, name: str,
) -> None:
    if not erofs_available():
        pytest.skip("needs root, losetup and EROFS support in the kernel")
    image = IMAGES[name]
    tag = conversions.get(image, ("--compressor", "none", "--digester", "sha256"))
    bootstrap, blob_dir, ids = pull_nydus(source_registry, image.repository, tag, tmp_path)
    loops: list[str] = []
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    try:
        for blob_id in ids:
            attached = subprocess.run(
                ["losetup", "--find", "--show", "--read-only", str(blob_dir / blob_id)],
                capture_output=True, text=True,
            )
            if attached.returncode != 0:
                pytest.skip(f"no loop device available: {attached.stderr.strip()}")
            loops.append(attached.stdout.strip())
        devices = ",".join(f"device={loop}" for loop in loops)
        mounted = subprocess.run(
            ["mount", "-t", "erofs", "-o", f"ro,loop,{devices}", str(bootstrap), str(mountpoint)],
            capture_output=True, text=True,
        )
        assert mounted.returncode == 0, mounted.stderr
        try:
            seen = snapshot(str(mountpoint))
        finally:
            subprocess.run(["umount", str(mountpoint)], check=True)
    finally:
        for loop in loops:
            subprocess.run(["losetup", "--detach", loop], check=False)
    assert_same_tree(seen, containerd_views[name], image)


# -- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "entries", "wrong_diff_id", "message"), [
    ("traversal", [[Entry("../escape", data=b"x")]], False, "leaves the image root"),
    ("absolute", [[Entry("/etc/passwd", data=b"x")]], False, "absolute path"),
    ("escaping-link", [[Entry("link", kind=tarfile.LNKTYPE, link="../../etc/shadow")]], False,
     "leaves the image root"),
    ("bad-diff-id", [[Entry("fine", data=b"x")]], True, "its config says"),
])
def test_hostile_or_inconsistent_images_fail_with_one_clear_line(
    source_registry: Registry, tmp_path: Path, name: str, entries: list[list[Entry]],
    wrong_diff_id: bool, message: str,
) -> None:
    image = build_source_image(tmp_path / "layout", entries, wrong_diff_id=wrong_diff_id)
    image.push(source_registry.host, f"convert/{name}:{SOURCE_TAG}")
    result = run_convert(source_registry, f"convert/{name}:{SOURCE_TAG}",
                         f"convert/{name}:nydus")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("d7y-node: error:") and message in last, result.stderr
    # Nothing was pushed under the target tag.
    with pytest.raises(urllib.error.HTTPError):
        get(source_registry, f"/v2/convert/{name}/manifests/nydus", MEDIA_TYPE_OCI_MANIFEST)
