"""The converter's layer logic on small layer tars built in memory: whiteouts, opaque
directories, hard links, xattrs, devices, fifos, symlinks, modes and owners merge into the
expected tree; the written bootstrap reads back to that same tree; hostile tars are refused; the
Nydus bootstrap layer, config and manifest have the form Nydus tools expect."""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import json
import os
import stat
import struct
import subprocess
import sys
import tarfile
import termios
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zstandard
from aiohttp import web
from aiohttp.test_utils import TestServer

from d7y_node.convert import (
    ANNOTATION_NYDUS_BLOB,
    BOOTSTRAP_MEMBER,
    PHASE_PULL,
    PHASE_PUSH,
    PHASE_WRITE,
    ConvertError,
    ConvertProgress,
    LayerApplier,
    bootstrap_layer,
    decompress_layer,
    nydus_config,
    nydus_manifest,
)
from d7y_node.errors import D7yError
from d7y_node.fetch import PROGRESS_INTERVAL_SECONDS
from d7y_node.oci import Descriptor, ImageLocation, ImageManifest, OciRegistry, sha256_digest
from d7y_node.preheat import Platform
from d7y_node.rafs import FileReader, Filesystem, open_bootstrap
from d7y_node.rafs.blob import read_file_range
from d7y_node.rafs.builder import Tree
from d7y_node.rafs.chunks import Compressor
from d7y_node.rafs.writer import WriterOptions, write_image

MTIME = 1_700_000_000


@dataclass(frozen=True)
class Entry:
    """One tar member to write."""

    name: str
    kind: bytes = tarfile.REGTYPE
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    link: str = ""
    device: tuple[int, int] = (0, 0)
    xattrs: tuple[tuple[str, str], ...] = ()


def directory(name: str, mode: int = 0o755, **fields: Any) -> Entry:
    return Entry(name, tarfile.DIRTYPE, mode=mode, **fields)


def make_tar(entries: Sequence[Entry]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for entry in entries:
            info = tarfile.TarInfo(entry.name)
            info.type = entry.kind
            info.mode = entry.mode
            info.uid, info.gid = entry.uid, entry.gid
            info.mtime = MTIME
            info.linkname = entry.link
            info.devmajor, info.devminor = entry.device
            info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in entry.xattrs}
            if entry.kind == tarfile.REGTYPE:
                info.size = len(entry.data)
                archive.addfile(info, io.BytesIO(entry.data))
            else:
                archive.addfile(info)
    return raw.getvalue()


def apply_layers(tmp_path: Path, layers: Sequence[Sequence[Entry]]) -> LayerApplier:
    applier = LayerApplier()
    for index, entries in enumerate(layers):
        path = tmp_path / f"layer-{index}.tar"
        path.write_bytes(make_tar(entries))
        applier.apply(path)
    return applier


Snapshot = dict[str, dict[str, Any]]


def snapshot_tree(tree: Tree) -> Snapshot:
    """Every path's type, attributes, content, target, xattrs and hard-link group."""
    groups: dict[int, str] = {}
    result: Snapshot = {}
    for path, node in tree.walk():
        entry: dict[str, Any] = {
            "mode": node.mode, "uid": node.uid, "gid": node.gid, "rdev": node.rdev,
            "xattrs": dict(node.xattrs), "mtime": node.mtime,
        }
        if node.is_symlink:
            entry["target"] = node.target
        if node.is_regular:
            with node.content.open() as stream:
                entry["data"] = hashlib.sha256(stream.read()).hexdigest()
            entry["layer"] = node.layer
            entry["group"] = groups.setdefault(id(node), path.decode())
        result[path.decode()] = entry
    return result


def snapshot_bootstrap(filesystem: Filesystem, blob_dir: Path) -> Snapshot:
    readers = [FileReader(blob_dir / blob.blob_id) for blob in filesystem.blobs]
    groups: dict[int, str] = {}
    result: Snapshot = {}
    for path, attributes in filesystem.walk():
        entry: dict[str, Any] = {
            "mode": attributes.mode, "uid": attributes.uid, "gid": attributes.gid,
            "rdev": attributes.rdev, "mtime": attributes.mtime,
            "xattrs": filesystem.xattrs(attributes.ino),
        }
        if attributes.is_symlink:
            entry["target"] = filesystem.readlink(attributes.ino)
        if attributes.is_regular:
            data = read_file_range(filesystem, attributes.ino, 0, attributes.size, readers)
            entry["data"] = hashlib.sha256(data).hexdigest()
            entry["group"] = groups.setdefault(attributes.ino, path.decode())
        result[path.decode()] = entry
    for reader in readers:
        reader.close()
    return result


LOWER = [
    directory("etc"),
    Entry("etc/passwd", data=b"root:x:0:0\n"),
    Entry("etc/gone", data=b"deleted above\n"),
    directory("var", mode=0o700, uid=7, gid=8),
    directory("var/cache"),
    Entry("var/cache/old", data=b"old cache\n"),
    directory("var/cache/sub"),
    Entry("var/cache/sub/deep", data=b"deep\n"),
    Entry("bin/tool", data=b"#!/bin/sh\n" * 100, mode=0o4755, uid=1000, gid=1001),
    Entry("bin/alias", kind=tarfile.LNKTYPE, link="bin/tool", mode=0o4755, uid=1000, gid=1001),
    Entry("lib", kind=tarfile.SYMTYPE, link="/usr/lib"),
    Entry("dev/null", kind=tarfile.CHRTYPE, mode=0o666, device=(1, 3)),
    Entry("dev/loop0", kind=tarfile.BLKTYPE, mode=0o660, device=(7, 0)),
    Entry("run/pipe", kind=tarfile.FIFOTYPE, mode=0o600),
    Entry("tagged", data=b"x", xattrs=(("user.color", "blue"), ("security.capability", "c"))),
    Entry("replaced", data=b"lower version"),
]
UPPER = [
    Entry("etc/.wh.gone"),
    directory("var/cache", mode=0o750, uid=3),
    Entry("var/cache/.wh..wh..opq"),
    Entry("var/cache/new", data=b"new cache\n"),
    Entry("replaced", data=b"upper version", mode=0o600),
    Entry("etc/hosts", data=b"127.0.0.1 localhost\n", mode=0o640, gid=4),
    Entry("etc/hosts.link", kind=tarfile.LNKTYPE, link="etc/hosts", mode=0o640, gid=4),
    Entry("empty", data=b""),
    Entry("sticky", kind=tarfile.DIRTYPE, mode=0o1777),
]


def test_layers_merge_into_the_expected_tree(tmp_path: Path) -> None:
    tree = apply_layers(tmp_path, [LOWER, UPPER]).tree
    seen = snapshot_tree(tree)
    assert "/etc/gone" not in seen
    assert "/var/cache/old" not in seen and "/var/cache/sub" not in seen
    assert seen["/var/cache"]["mode"] == stat.S_IFDIR | 0o750
    assert seen["/var/cache"]["uid"] == 3
    assert seen["/var/cache/new"]["layer"] == 1
    assert seen["/var"]["mode"] == stat.S_IFDIR | 0o700 and seen["/var"]["uid"] == 7
    assert seen["/replaced"]["layer"] == 1 and seen["/replaced"]["mode"] == stat.S_IFREG | 0o600
    assert seen["/replaced"]["data"] == hashlib.sha256(b"upper version").hexdigest()
    assert seen["/bin/tool"]["mode"] == stat.S_IFREG | 0o4755
    assert (seen["/bin/tool"]["uid"], seen["/bin/tool"]["gid"]) == (1000, 1001)
    assert seen["/bin/alias"]["group"] == "/bin/alias"  # walk sorts: alias comes first
    assert seen["/bin/tool"]["group"] == "/bin/alias"
    assert seen["/etc/hosts.link"]["group"] == seen["/etc/hosts"]["group"]
    assert seen["/lib"]["target"] == b"/usr/lib"
    assert seen["/dev/null"]["mode"] == stat.S_IFCHR | 0o666
    assert seen["/dev/null"]["rdev"] == os.makedev(1, 3)
    assert seen["/dev/loop0"]["mode"] == stat.S_IFBLK | 0o660
    assert seen["/run/pipe"]["mode"] == stat.S_IFIFO | 0o600
    assert seen["/tagged"]["xattrs"] == {b"user.color": b"blue", b"security.capability": b"c"}
    assert seen["/sticky"]["mode"] == stat.S_IFDIR | 0o1777
    assert seen["/etc/passwd"]["layer"] == 0 and seen["/etc/passwd"]["mtime"] == MTIME
    assert seen["/empty"]["data"] == hashlib.sha256(b"").hexdigest()


def test_whiteouts_only_hide_lower_layers(tmp_path: Path) -> None:
    # An opaque marker hides what was below, not what the same layer adds (in any order).
    layers = [
        [directory("d"), Entry("d/lower", data=b"1")],
        [directory("d"), Entry("d/kept", data=b"2"), Entry("d/.wh..wh..opq")],
    ]
    seen = snapshot_tree(apply_layers(tmp_path, layers).tree)
    assert sorted(path for path in seen if path.startswith("/d/")) == ["/d/kept"]
    # A whiteout of something absent is a no-op; a dir replaced by a file and back works.
    layers = [
        [directory("x"), Entry("x/a", data=b"a")],
        [Entry(".wh.nothing"), Entry(".wh.x"), Entry("x", data=b"file now")],
        [Entry(".wh.x"), directory("x", mode=0o711)],
    ]
    seen = snapshot_tree(apply_layers(tmp_path, layers).tree)
    assert seen["/x"]["mode"] == stat.S_IFDIR | 0o711
    assert "/x/a" not in seen


def test_a_hard_link_entry_sets_the_attributes_of_its_inode(tmp_path: Path) -> None:
    # containerd chowns and chmods the new name, i.e. the shared inode; xattrs are added.
    layers = [[
        Entry("a", data=b"shared", mode=0o600, uid=1, xattrs=(("user.a", "1"),)),
        Entry("b", kind=tarfile.LNKTYPE, link="a", mode=0o755, uid=2, gid=3,
              xattrs=(("user.b", "2"),)),
    ]]
    seen = snapshot_tree(apply_layers(tmp_path, layers).tree)
    for path in ("/a", "/b"):
        assert seen[path]["mode"] == stat.S_IFREG | 0o755
        assert (seen[path]["uid"], seen[path]["gid"]) == (2, 3)
        assert seen[path]["xattrs"] == {b"user.a": b"1", b"user.b": b"2"}
    assert seen["/b"]["group"] == "/a"


def test_upper_paths_are_not_resolved_through_lower_symlinks(tmp_path: Path) -> None:
    # As overlayfs stacks layers (containerd's unpack shows the same): an upper `lib/new`
    # over a lower symlink `lib` makes `lib` a directory; an upper `file/below` over a lower
    # file makes `file` one. Lower directories merge.
    layers = [
        [directory("usr", mode=0o700), directory("usr/lib"),
         Entry("lib", kind=tarfile.SYMTYPE, link="usr/lib"), Entry("file", data=b"plain")],
        [Entry("lib/new", data=b"x"), Entry("file/below", data=b"y"), Entry("usr/more")],
    ]
    seen = snapshot_tree(apply_layers(tmp_path, layers).tree)
    assert stat.S_ISDIR(seen["/lib"]["mode"])
    assert "/lib/new" in seen and "/usr/lib/new" not in seen
    assert "/file/below" in seen
    assert seen["/usr"]["mode"] == stat.S_IFDIR | 0o700 and "/usr/lib" in seen


def test_later_layer_breaks_a_hard_link_it_overwrites(tmp_path: Path) -> None:
    layers = [
        [Entry("a", data=b"shared"), Entry("b", kind=tarfile.LNKTYPE, link="a")],
        [Entry("b", data=b"own copy")],
    ]
    seen = snapshot_tree(apply_layers(tmp_path, layers).tree)
    assert seen["/a"]["group"] == "/a" and seen["/b"]["group"] == "/b"
    assert seen["/a"]["layer"] == 0 and seen["/b"]["layer"] == 1


@pytest.mark.parametrize("compressor", [Compressor.ZSTD, Compressor.NONE, Compressor.LZ4_BLOCK])
def test_written_bootstrap_reads_back_as_the_merged_tree(
    tmp_path: Path, compressor: Compressor
) -> None:
    big = Entry("data/big.bin", data=os.urandom(3 * (1 << 20) + 17))
    layers = [LOWER, [*UPPER, big], [Entry("data/big.copy", data=big.data)]]
    tree = apply_layers(tmp_path, layers).tree
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    written = write_image(
        tree, blobs, WriterOptions(chunk_size=1 << 20, compressor=compressor)
    )
    # The third layer's data is all deduplicated into the second's blob.
    assert [blob.layer for blob in written.blobs] == [0, 1]
    expected = snapshot_tree(tree)
    for entry in expected.values():
        entry.pop("layer", None)
    filesystem = open_bootstrap(written.bootstrap)
    seen = snapshot_bootstrap(filesystem, blobs)
    assert seen == expected


def hostile(tmp_path: Path, entries: Sequence[Entry], message: str) -> None:
    with pytest.raises(ConvertError, match=message):
        apply_layers(tmp_path, [entries])


def test_hostile_paths_are_refused(tmp_path: Path) -> None:
    hostile(tmp_path, [Entry("../escape", data=b"x")], "leaves the image root")
    hostile(tmp_path, [Entry("a/../../escape", data=b"x")], "leaves the image root")
    hostile(tmp_path, [Entry("/etc/passwd", data=b"x")], "absolute path")
    hostile(tmp_path, [Entry("link", kind=tarfile.LNKTYPE, link="../etc/shadow")],
            "leaves the image root")
    hostile(tmp_path, [Entry("link", kind=tarfile.LNKTYPE, link="missing")], "absent")
    hostile(tmp_path, [directory("d"), Entry("link", kind=tarfile.LNKTYPE, link="d")],
            "hard link to a directory")
    hostile(tmp_path, [Entry(".wh..")], "names nothing")


def test_a_member_claiming_more_than_the_tar_holds_is_refused(tmp_path: Path) -> None:
    data = bytearray(make_tar([Entry("big", data=b"x" * 10)]))
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as archive:
        start = archive.getmember("big").offset
    # Patch the size field (octal, 12 bytes at offset 124) of the file's header: 8 GiB - 1.
    data[start + 124: start + 136] = b"%011o\0" % ((1 << 33) - 1)
    header = data[start: start + 512]
    checksum = 256 + sum(header[:148]) + sum(header[156:])
    data[start + 148: start + 156] = b"%06o\0 " % checksum
    path = tmp_path / "bomb.tar"
    path.write_bytes(bytes(data))
    with pytest.raises(ConvertError, match="past the end of the tar"):
        LayerApplier().apply(path)


def test_too_many_entries_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "many.tar"
    path.write_bytes(make_tar([Entry(f"f{i}") for i in range(20)]))
    with pytest.raises(ConvertError, match="more than 10 entries"):
        LayerApplier(max_layer_entries=10).apply(path)


@pytest.mark.parametrize("form", ["gzip", "zstd", "plain"])
def test_layers_decompress_by_their_magic(tmp_path: Path, form: str) -> None:
    tar = make_tar(LOWER)
    packed = {
        "gzip": gzip.compress(tar),
        "zstd": zstandard.ZstdCompressor().compress(tar),
        "plain": tar,
    }[form]
    source = tmp_path / "layer"
    source.write_bytes(packed)
    target = tmp_path / "layer.tar"
    assert decompress_layer(source, target) == "sha256:" + hashlib.sha256(tar).hexdigest()
    assert target.read_bytes() == tar
    with pytest.raises(ConvertError, match="more than 100 bytes"):
        decompress_layer(source, tmp_path / "small.tar", max_bytes=100)


def test_a_corrupt_gzip_layer_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "layer"
    source.write_bytes(gzip.compress(make_tar(LOWER))[:-40])
    with pytest.raises(ConvertError, match="does not decompress"):
        decompress_layer(source, tmp_path / "out.tar")


def test_bootstrap_layer_manifest_and_config(tmp_path: Path) -> None:
    bootstrap = b"B" * 5000
    descriptor, diff_id = bootstrap_layer(bootstrap, tmp_path / "boot.tar.gz")
    raw = gzip.decompress((tmp_path / "boot.tar.gz").read_bytes())
    assert diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert descriptor.digest == "sha256:" + hashlib.sha256(
        (tmp_path / "boot.tar.gz").read_bytes()).hexdigest()
    with tarfile.open(fileobj=io.BytesIO(raw)) as archive:
        member = archive.extractfile(BOOTSTRAP_MEMBER)
        assert member is not None and member.read() == bootstrap
    # Deterministic: the same bootstrap, the same layer.
    again, _ = bootstrap_layer(bootstrap, tmp_path / "again.tar.gz")
    assert again.digest == descriptor.digest

    config = nydus_config({"os": "linux", "rootfs": {"type": "layers", "diff_ids": ["x"]},
                           "config": {"Cmd": ["sh"]}}, ["sha256:a", diff_id])
    assert config["rootfs"]["diff_ids"] == ["sha256:a", diff_id]
    assert config["config"] == {"Cmd": ["sh"]}
    blob = Descriptor("application/vnd.oci.image.layer.nydus.blob.v1", "sha256:" + "a" * 64, 9,
                      {ANNOTATION_NYDUS_BLOB: "true"})
    body = nydus_manifest(Descriptor("c", "sha256:" + "c" * 64, 3), [blob, descriptor])
    parsed = ImageManifest.parse(body, "application/vnd.oci.image.manifest.v1+json")
    assert parsed.layers[0].annotations == {ANNOTATION_NYDUS_BLOB: "true"}
    assert json.loads(body)["mediaType"] == "application/vnd.oci.image.manifest.v1+json"


def test_image_locations() -> None:
    local = ImageLocation.parse("127.0.0.1:5000/team/app:v1", ())
    assert (local.upstream.scheme, local.upstream.host) == ("http", "127.0.0.1:5000")
    assert (local.repository, local.reference) == ("team/app", "v1")
    hub = ImageLocation.parse("busybox", ())
    assert (hub.upstream.scheme, hub.repository, hub.reference) == (
        "https", "library/busybox", "latest")
    pinned = "registry.lan:5000/app@sha256:" + "b" * 64
    insecure = ImageLocation.parse(pinned, ("registry.lan:5000",))
    assert insecure.upstream.scheme == "http" and insecure.reference == "sha256:" + "b" * 64


async def test_an_index_resolves_to_the_wanted_platform() -> None:
    config = json.dumps({"os": "linux", "architecture": "arm64"}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "c", "digest": sha256_digest(config), "size": len(config)},
        "layers": [],
    }).encode()
    other = b'{"schemaVersion": 2, "layers": []}'
    index = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"digest": sha256_digest(other), "size": len(other), "mediaType": "m",
             "platform": {"os": "linux", "architecture": "amd64"}},
            {"digest": sha256_digest(manifest), "size": len(manifest), "mediaType": "m",
             "platform": {"os": "linux", "architecture": "arm64"}},
        ],
    }).encode()
    documents = {"v1": index, sha256_digest(manifest): manifest, sha256_digest(other): other}

    async def manifests(request: web.Request) -> web.Response:
        body = documents.get(request.match_info["reference"])
        if body is None:
            return web.Response(status=404)
        return web.Response(body=body, content_type="application/json")

    async def blobs(request: web.Request) -> web.Response:
        return web.Response(body=config)

    app = web.Application()
    app.router.add_get("/v2/team/app/manifests/{reference}", manifests)
    app.router.add_get("/v2/team/app/blobs/{digest}", blobs)
    async with TestServer(app, host="127.0.0.1") as server, OciRegistry() as registry:
        image = registry.location(f"127.0.0.1:{server.port}/team/app:v1")
        resolved = await registry.resolve(image, Platform("linux", "arm64"))
        assert resolved.digest == sha256_digest(manifest)
        assert await registry.config(image, resolved.config) == {
            "os": "linux", "architecture": "arm64"}
        with pytest.raises(D7yError, match="no linux/riscv64 image"):
            await registry.resolve(image, Platform("linux", "riscv64"))


@pytest.mark.parametrize(("arguments", "message"), [
    (["--compressor", "gzip"], "--compressor"),
    (["--digester", "md5"], "--digester"),
    (["--chunk-size", "1000"], "--chunk-size"),
    (["--platform", "linux"], "--platform"),
])
def test_cli_refuses_bad_settings_before_any_download(
    arguments: list[str], message: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "d7y_node", "convert", "127.0.0.1:1/a:b", "127.0.0.1:1/a:c",
         *arguments], capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert message in result.stderr


# -- progress -----------------------------------------------------------------------------------

MIB = 1 << 20
# The pseudo-terminal's width in the tests: wide enough for a whole step line.
TERMINAL_COLUMNS = 120


def read_terminal(master: int) -> str:
    """Everything written to the pseudo-terminal whose writing side is closed."""
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the other side is closed and everything was read
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode()


def drive(progress: ConvertProgress) -> None:
    """Two layers pulled, the files written, one blob pushed and one already there."""
    progress.note("source: 2 layer(s)")
    progress.phase(PHASE_PULL, 3 * MIB)
    progress.step("pull 1/2 aaaaaaaa", 2 * MIB)
    progress.advance(MIB)
    time.sleep(PROGRESS_INTERVAL_SECONDS)  # the bar is redrawn at most this often
    progress.advance(MIB)
    progress.end_step()
    progress.step("pull 2/2 bbbbbbbb", MIB)
    progress.advance(MIB)
    progress.end_step()
    progress.phase(PHASE_WRITE, 5 * MIB)
    progress.step("write Nydus blobs", 5 * MIB)
    progress.advance(5 * MIB)
    progress.end_step()
    progress.phase(PHASE_PUSH, 4 * MIB)
    progress.step("push 1/2 cccccccc", 3 * MIB)
    progress.advance(3 * MIB)
    progress.end_step()
    progress.step("push 2/2 dddddddd", MIB)
    progress.skip("push 2/2 dddddddd: already there", MIB)
    progress.note(progress.summary())


def test_convert_progress_on_a_terminal_draws_a_bar_per_step_with_the_phase_total() -> None:
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, TERMINAL_COLUMNS, 0, 0))
    try:
        with os.fdopen(slave, "w", closefd=True) as terminal:
            progress = ConvertProgress(terminal)
            assert progress.tty
            drive(progress)
        output = read_terminal(master)
    finally:
        os.close(master)
    lines = output.replace("\r\n", "\n").split("\n")
    # Each step's line is redrawn in place (`\r`) and ends as a full bar.
    pull_one = next(line for line in lines if "pull 1/2" in line)
    redraws = [part for part in pull_one.split("\r") if part]
    assert len(redraws) >= 2, pull_one
    assert " 50.0% 1.0MiB/2.0MiB" in redraws[0] and "| pulled 1.0MiB/3.0MiB" in redraws[0]
    assert "[################] 100.0% 2.0MiB/2.0MiB" in redraws[-1]
    assert "| pulled 2.0MiB/3.0MiB" in redraws[-1]
    pull_two = next(line for line in lines if "pull 2/2" in line)
    assert "| pulled 3.0MiB/3.0MiB" in pull_two
    assert "| written 5.0MiB/5.0MiB" in next(line for line in lines if "write Nydus" in line)
    # The blob the registry has is only found when its turn comes: then it is a plain line,
    # not a bar, and it leaves the push total.
    assert "| pushed 3.0MiB/4.0MiB" in next(line for line in lines if "push 1/2" in line)
    assert "push 2/2 dddddddd: already there" in lines
    summary = next(line for line in lines if line.startswith("total:"))
    assert "pulled 3.0MiB, written 5.0MiB, pushed 3.0MiB (1 blob(s) already there)" in summary
    assert all(len(part) < TERMINAL_COLUMNS for line in lines for part in line.split("\r"))


def test_convert_progress_elsewhere_is_one_plain_line_per_step() -> None:
    plain = io.StringIO()
    drive(ConvertProgress(plain))
    text = plain.getvalue()
    assert "\r" not in text and "\x1b" not in text and "[#" not in text
    assert text.splitlines() == [
        "source: 2 layer(s)",
        *[line for line in text.splitlines() if line.startswith("pull 1/2 aaaaaaaa: ")],
        *[line for line in text.splitlines() if line.startswith("pull 2/2 bbbbbbbb: ")],
        *[line for line in text.splitlines() if line.startswith("write Nydus blobs: ")],
        *[line for line in text.splitlines() if line.startswith("push 1/2 cccccccc: ")],
        "push 2/2 dddddddd: already there",
        text.splitlines()[-1],
    ]
    assert "pull 1/2 aaaaaaaa: 2097152 bytes in" in text
    assert text.splitlines()[-1].startswith("total: pulled 3.0MiB, written 5.0MiB, pushed 3.0MiB")


def test_convert_progress_without_a_stream_is_silent_but_counts() -> None:
    progress = ConvertProgress()
    drive(progress)
    assert progress.moved == {PHASE_PULL: 3 * MIB, PHASE_WRITE: 5 * MIB, PHASE_PUSH: 3 * MIB}
    assert progress.totals[PHASE_PUSH] == 3 * MIB  # the blob already there left the total
