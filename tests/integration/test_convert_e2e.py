"""`d7y-node convert` end to end: an OCI image with every kind of entry spread over layers is
pushed to a real registry, converted by the CLI to another tag, and the result is checked three
ways: (a) the pushed manifest has the Nydus layer media types and annotations; (b) the bootstrap
mounted with our FUSE mount over the pulled blobs shows the same tree as the source image unpacked
by real containerd (`ctr images pull` + `ctr images mount`); (c) with `--compressor none` the
Linux kernel's EROFS driver mounts the bootstrap with a loop device per blob and shows that tree
too. Compared: names, types, content, modes, owners, link targets, hard-link groups, xattrs,
device numbers, file mtimes.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
from collections.abc import Iterator
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
from d7y_node.fuse_mount import DirectoryBlobSource, RafsMount
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
from tests.harness.registry import Registry
from tests.test_convert import Entry, directory, make_tar

pytestmark = pytest.mark.integration

SOURCE_REPOSITORY = "convert/source"
CONVERT_TIMEOUT_SECONDS = 300.0
# File sizes around the 4 KiB block and 1 MiB chunk edges, and one past 8 MiB.
FILE_SIZES = (0, 1, 4095, 4096, 4097, (1 << 20) - 1, 1 << 20, (1 << 20) + 1, 9 * (1 << 20) + 5)


def random_bytes(size: int, seed: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(b"%d-%d" % (seed, counter)).digest()
        counter += 1
    return bytes(out[:size])


LAYERS: list[list[Entry]] = [
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
        Entry("dev/loop7", kind=tarfile.BLKTYPE, mode=0o660, device=(7, 7)),
        directory("run"),
        Entry("run/pipe", kind=tarfile.FIFOTYPE, mode=0o620, uid=5, gid=6),
        Entry("tagged", data=b"with xattrs\n",
              xattrs=(("user.color", "blue"), ("trusted.note", "t" * 100))),
        Entry("replaced", data=b"lower version\n"),
        directory("sizes"),
        *[Entry(f"sizes/{size}", data=random_bytes(size, size), mode=0o640)
          for size in FILE_SIZES],
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
        Entry("sizes/1", data=b"rewritten in the upper layer"),
        directory("dir-xattr", xattrs=(("user.dir", "d"),)),
        Entry("lib/via-link", data=b"makes lib a directory\n"),
    ],
]


def build_source_image(
    layout: Path, layers_entries: list[list[Entry]] | None = None,
    *, wrong_diff_id: bool = False,
) -> BuiltImage:
    """An OCI layout with `layers_entries` (LAYERS by default), for this machine's platform."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def store(data: bytes, media_type: str) -> Descriptor:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return Descriptor(media_type, "sha256:" + digest, len(data), blobs / digest)

    layers = []
    diff_ids = []
    for entries in LAYERS if layers_entries is None else layers_entries:
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
                       "annotations": {"org.opencontainers.image.ref.name": "v1"}}],
    }))
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    return BuiltImage(layout, "v1", manifest, config_descriptor, tuple(layers), ("/bin/sh",))


@pytest.fixture(scope="module")
def source_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    server = Registry(tmp_path_factory.mktemp("convert-registry"))
    server.start()
    try:
        image = build_source_image(tmp_path_factory.mktemp("convert-layout") / "layout")
        image.push(server.host, f"{SOURCE_REPOSITORY}:v1")
        yield server
    finally:
        server.stop()


Snapshot = dict[str, dict[str, Any]]


def snapshot(root: str) -> tuple[Snapshot, set[frozenset[str]]]:
    """Below `root` (the root itself left out: its attributes are the unpacker's): each path's
    type and mode, owner, device number, link target, content digest, xattrs, file mtime; and
    the hard-link groups."""
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
            if stat.S_ISLNK(st.st_mode):
                entry["target"] = os.readlink(path)
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as file:
                    entry["sha256"] = hashlib.sha256(file.read()).hexdigest()
                inodes.setdefault(st.st_ino, set()).add(relative)
            result[relative] = entry
    groups = {frozenset(paths) for paths in inodes.values() if len(paths) > 1}
    return result, groups


def run_convert(
    registry: Registry, source: str, target_tag: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "d7y_node", "convert", f"{registry.host}/{source}",
         f"{registry.host}/{SOURCE_REPOSITORY}:{target_tag}", *extra],
        capture_output=True, text=True, timeout=CONVERT_TIMEOUT_SECONDS,
    )


def convert(registry: Registry, target_tag: str, *extra: str) -> None:
    result = run_convert(registry, f"{SOURCE_REPOSITORY}:v1", target_tag, *extra)
    assert result.returncode == 0, result.stderr
    assert "layer 2/2" in result.stderr  # the progress lines
    assert result.stdout.strip().startswith("sha256:")


def get(registry: Registry, path: str, accept: str | None = None) -> bytes:
    request = urllib.request.Request(f"{registry.url}{path}")
    if accept:
        request.add_header("Accept", accept)
    with urllib.request.urlopen(request, timeout=30) as response:
        body: bytes = response.read()
        return body


def pull_nydus(registry: Registry, tag: str, into: Path) -> tuple[Path, Path, list[str]]:
    """Check the converted manifest; download the blobs (named by blob id) and the bootstrap.
    Returns (bootstrap, blob dir, blob ids in manifest order)."""
    manifest = json.loads(get(registry, f"/v2/{SOURCE_REPOSITORY}/manifests/{tag}",
                              MEDIA_TYPE_OCI_MANIFEST))
    assert manifest["mediaType"] == MEDIA_TYPE_OCI_MANIFEST
    *blobs, boot = manifest["layers"]
    assert blobs, "every layer here holds file data"
    for layer in blobs:
        assert layer["mediaType"] == MEDIA_TYPE_NYDUS_BLOB
        assert layer["annotations"] == {ANNOTATION_NYDUS_BLOB: "true"}
    assert boot["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    assert boot["annotations"][ANNOTATION_NYDUS_BOOTSTRAP] == "true"
    assert boot["annotations"][ANNOTATION_NYDUS_FS_VERSION] == "6"
    config_digest = manifest["config"]["digest"]
    config = json.loads(get(registry, f"/v2/{SOURCE_REPOSITORY}/blobs/{config_digest}"))
    blob_dir = into / "blobs"
    blob_dir.mkdir(parents=True)
    ids = []
    for layer in blobs:
        data = get(registry, f"/v2/{SOURCE_REPOSITORY}/blobs/{layer['digest']}")
        blob_id = layer["digest"].removeprefix("sha256:")
        assert hashlib.sha256(data).hexdigest() == blob_id
        (blob_dir / blob_id).write_bytes(data)
        ids.append(blob_id)
    boot_tar = gzip.decompress(get(registry, f"/v2/{SOURCE_REPOSITORY}/blobs/{boot['digest']}"))
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


@pytest.fixture(scope="module")
def containerd_view(
    source_registry: Registry, tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Snapshot, set[frozenset[str]]]:
    """The source image as real containerd unpacks and mounts it (overlayfs)."""
    if os.geteuid() != 0:
        pytest.skip("containerd needs root")
    daemon = Containerd(tmp_path_factory.mktemp("convert-containerd"))
    daemon.start()
    reference = f"{source_registry.host}/{SOURCE_REPOSITORY}:v1"
    mountpoint = tmp_path_factory.mktemp("containerd-mount")
    try:
        write_mirror_hosts(daemon.hosts_dir, source_registry.host, None)
        daemon.pull(reference)
        daemon.ctr(["images", "mount", reference, str(mountpoint)])
        try:
            return snapshot(str(mountpoint))
        finally:
            daemon.ctr(["images", "unmount", "--rm", str(mountpoint)], check=False)
    finally:
        daemon.stop()


def check_expected_features(view: Snapshot) -> None:
    """The reference itself shows what the layers meant (so a broken unpacker cannot agree)."""
    assert "/etc/gone" not in view and "/var/cache/old" not in view
    assert "/var/cache/sub" not in view and "/var/cache/new" in view
    assert view["/dev/null"]["rdev"] == os.makedev(1, 3)
    assert view["/tagged"]["xattrs"]["user.color"] == b"blue"
    # Overlay stacking: the upper layer's `lib/` is a directory over the lower symlink.
    assert "/lib/via-link" in view and "/usr/lib/via-link" not in view
    assert view["/sizes/1"]["sha256"] == hashlib.sha256(b"rewritten in the upper layer").hexdigest()


def without_trusted_xattrs(view: Snapshot) -> Snapshot:
    """`view` without `trusted.*` xattrs: this host's containerd (Debian 1.6) does not set them
    when it unpacks a layer (checked on its snapshot directories), while Nydus and we keep every
    xattr the layer has; the test checks ours separately."""
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


async def in_thread(function: Any, *args: Any) -> Any:
    return await asyncio.wait_for(asyncio.to_thread(function, *args), 120)


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                    reason="mounting FUSE needs root and /dev/fuse")
async def test_converted_image_mounts_like_containerd_unpacks_it(
    source_registry: Registry, containerd_view: tuple[Snapshot, set[frozenset[str]]],
    tmp_path: Path,
) -> None:
    await in_thread(convert, source_registry, "nydus")
    bootstrap, blob_dir, _ids = await in_thread(pull_nydus, source_registry, "nydus", tmp_path)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    async with (
        DirectoryBlobSource(blob_dir) as source,
        RafsMount(bootstrap, mountpoint, source),
    ):
        seen = await in_thread(snapshot, str(mountpoint))
    expected, expected_groups = containerd_view
    check_expected_features(expected)
    assert {frozenset({"/bin/tool", "/bin/tool-alias"}),
            frozenset({"/etc/hosts", "/etc/hosts.hard"})} <= expected_groups
    assert seen[1] == expected_groups
    assert differences(without_trusted_xattrs(seen[0]), expected) == []
    assert seen[0]["/tagged"]["xattrs"]["trusted.note"] == b"t" * 100


def erofs_available() -> bool:
    try:
        filesystems = Path("/proc/filesystems").read_text()
    except OSError:
        return False
    return os.geteuid() == 0 and "erofs" in filesystems and shutil.which("losetup") is not None


def test_uncompressed_conversion_mounts_with_kernel_erofs(
    source_registry: Registry, containerd_view: tuple[Snapshot, set[frozenset[str]]],
    tmp_path: Path,
) -> None:
    if not erofs_available():
        pytest.skip("needs root, losetup and EROFS support in the kernel")
    convert(source_registry, "nydus-none", "--compressor", "none", "--digester", "sha256",
            "--chunk-size", str(1 << 20))
    bootstrap, blob_dir, ids = pull_nydus(source_registry, "nydus-none", tmp_path)
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
    expected, expected_groups = containerd_view
    assert seen[1] == expected_groups
    assert differences(without_trusted_xattrs(seen[0]), expected) == []
    assert seen[0]["/tagged"]["xattrs"]["trusted.note"] == b"t" * 100


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
    image.push(source_registry.host, f"convert/{name}:v1")
    result = run_convert(source_registry, f"convert/{name}:v1", f"{name}-nydus")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("d7y-node: error:") and message in last, result.stderr
    # Nothing was pushed under the target tag.
    with pytest.raises(urllib.error.HTTPError):
        get(source_registry, f"/v2/{SOURCE_REPOSITORY}/manifests/{name}-nydus",
            MEDIA_TYPE_OCI_MANIFEST)
