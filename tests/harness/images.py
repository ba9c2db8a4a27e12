"""OCI images built by the tests: an OCI layout written by hand, pushed to a registry with skopeo.

Owns the image format side: tar + gzip layers (Python's tarfile/gzip), sha256 digests, the config
and manifest JSON, the `oci-layout` directory, and `skopeo copy` into a registry. Layers are
deterministic (fixed mtimes, seeded content) so two builds give the same digests. Does not run a
registry (`registry.py`).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import shutil
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness.process import run

BUSYBOX = Path("/bin/busybox")
SKOPEO = "/usr/bin/skopeo"
# Commands the test images use, each a symlink to the static busybox as Debian's package makes them.
BUSYBOX_APPLETS = ("sh", "echo", "cat", "ls", "sha256sum", "wc", "head", "true", "sleep")
MEDIA_TYPE_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_TYPE_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_TYPE_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
# Random bytes do not compress, so the fastest level gives the same size as the best one.
RANDOM_LAYER_GZIP_LEVEL = 1
# Content is written in blocks of this size so a 64 MiB layer never sits in memory twice.
WRITE_BLOCK_BYTES = 4 * 1024 * 1024
# A push of the big image takes a few seconds on loopback; this bounds a loaded CI machine.
PUSH_TIMEOUT_SECONDS = 300.0
HELLO_OUTPUT = "hello-from-d7y"


@dataclass(frozen=True)
class Descriptor:
    """A blob in the layout: what the manifest says about it, and where its bytes are."""

    media_type: str
    digest: str
    size: int
    path: Path

    def as_json(self) -> dict[str, object]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}

    def read(self) -> bytes:
        return self.path.read_bytes()


@dataclass(frozen=True)
class RandomFile:
    """A file of `size` seeded pseudo-random (incompressible) bytes."""

    path: str
    size: int
    seed: int


@dataclass(frozen=True)
class LayerSpec:
    """What one layer holds: text files, random files, symlinks, and optionally busybox."""

    text_files: dict[str, str] = field(default_factory=dict)
    random_files: tuple[RandomFile, ...] = ()
    symlinks: dict[str, str] = field(default_factory=dict)
    directories: tuple[str, ...] = ()
    busybox: bool = False


@dataclass(frozen=True)
class BuiltImage:
    """An image in an OCI layout directory, addressable as `oci:<layout>:<tag>`."""

    layout_dir: Path
    tag: str
    manifest: Descriptor
    config: Descriptor
    layers: tuple[Descriptor, ...]
    command: tuple[str, ...]

    @property
    def blobs(self) -> tuple[Descriptor, ...]:
        """Config and layers: every blob a pull fetches."""
        return (self.config, *self.layers)

    @property
    def largest_layer(self) -> Descriptor:
        return max(self.layers, key=lambda layer: layer.size)

    def layer_near(self, size: int) -> Descriptor:
        """The layer whose size is closest to `size`."""
        return min(self.layers, key=lambda layer: abs(layer.size - size))

    def push(
        self, registry_host: str, reference: str, *, credentials: str | None = None,
    ) -> None:
        """`skopeo copy` the image to `registry_host/reference` (plain HTTP)."""
        argv = [
            SKOPEO, "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
            f"oci:{self.layout_dir}:{self.tag}", f"docker://{registry_host}/{reference}",
        ]
        if credentials is not None:
            argv[4:4] = ["--dest-creds", credentials]
        run(argv, timeout=PUSH_TIMEOUT_SECONDS)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while block := source.read(WRITE_BLOCK_BYTES):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


class _RandomStream(io.RawIOBase):
    """A readable stream of `size` seeded pseudo-random bytes, made block by block."""

    def __init__(self, size: int, seed: int) -> None:
        self._remaining = size
        self._random = random.Random(seed)
        self._buffer = b""

    def readable(self) -> bool:
        return True

    def readinto(self, target: memoryview) -> int:  # type: ignore[override]
        if not self._buffer and self._remaining:
            count = min(WRITE_BLOCK_BYTES, self._remaining)
            self._buffer = self._random.randbytes(count)
            self._remaining -= count
        count = min(len(target), len(self._buffer))
        target[:count] = self._buffer[:count]
        self._buffer = self._buffer[count:]
        return count


def random_file_bytes(item: RandomFile, offset: int, length: int) -> bytes:
    """Bytes [offset, offset+length) of a random file's content."""
    stream = io.BufferedReader(_RandomStream(item.size, item.seed), WRITE_BLOCK_BYTES)
    skipped = 0
    while skipped < offset:
        skipped += len(stream.read(min(WRITE_BLOCK_BYTES, offset - skipped)))
    return stream.read(length)


def random_file_sha256(item: RandomFile) -> str:
    """The sha256 (hex) of a random file's content, as `sha256sum` inside a container prints it."""
    digest = hashlib.sha256()
    stream = _RandomStream(item.size, item.seed)
    buffer = bytearray(WRITE_BLOCK_BYTES)
    while count := stream.readinto(memoryview(buffer)):
        digest.update(memoryview(buffer)[:count])
    return digest.hexdigest()


def _tar_info(
    name: str, *, kind: bytes, mode: int, size: int = 0, link: str = "",
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.linkname = link
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def _write_layer_tar(spec: LayerSpec, tar_path: Path) -> None:
    directories = set(spec.directories)
    if spec.busybox:
        directories.update({"bin", "etc", "tmp", "proc", "sys", "dev"})
    for name in [*spec.text_files, *(item.path for item in spec.random_files), *spec.symlinks]:
        parent = Path(name).parent
        while str(parent) not in (".", "/", ""):
            directories.add(str(parent))
            parent = parent.parent
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as archive:
        for directory in sorted(directories):
            archive.addfile(_tar_info(directory, kind=tarfile.DIRTYPE, mode=0o755))
        if spec.busybox:
            size = BUSYBOX.stat().st_size
            with BUSYBOX.open("rb") as binary:
                archive.addfile(
                    _tar_info("bin/busybox", kind=tarfile.REGTYPE, mode=0o755, size=size), binary
                )
            for applet in BUSYBOX_APPLETS:
                archive.addfile(
                    _tar_info(f"bin/{applet}", kind=tarfile.SYMTYPE, mode=0o777, link="busybox")
                )
        for name, text in sorted(spec.text_files.items()):
            data = text.encode()
            archive.addfile(
                _tar_info(name, kind=tarfile.REGTYPE, mode=0o644, size=len(data)), io.BytesIO(data)
            )
        for item in spec.random_files:
            archive.addfile(
                _tar_info(item.path, kind=tarfile.REGTYPE, mode=0o644, size=item.size),
                io.BufferedReader(_RandomStream(item.size, item.seed), WRITE_BLOCK_BYTES),
            )
        for name, target in sorted(spec.symlinks.items()):
            archive.addfile(_tar_info(name, kind=tarfile.SYMTYPE, mode=0o777, link=target))


def _store_blob(blobs_dir: Path, staging: Path, media_type: str) -> Descriptor:
    digest = sha256_file(staging)
    final = blobs_dir / digest.split(":", 1)[1]
    staging.replace(final)
    return Descriptor(media_type, digest, final.stat().st_size, final)


def _store_bytes(blobs_dir: Path, data: bytes, media_type: str) -> Descriptor:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    final = blobs_dir / digest.split(":", 1)[1]
    final.write_bytes(data)
    return Descriptor(media_type, digest, len(data), final)


def build_image(
    layout_dir: Path, layers: Sequence[LayerSpec], *, tag: str = "latest",
    command: Sequence[str] = ("/bin/sh", "-c", f"echo {HELLO_OUTPUT}"),
) -> BuiltImage:
    """Write an OCI layout with one linux/amd64 image made of `layers` (bottom first)."""
    if layout_dir.exists():
        shutil.rmtree(layout_dir)
    blobs_dir = layout_dir / "blobs" / "sha256"
    blobs_dir.mkdir(parents=True)
    layer_descriptors: list[Descriptor] = []
    diff_ids: list[str] = []
    for index, spec in enumerate(layers):
        tar_path = layout_dir / f"layer-{index}.tar"
        _write_layer_tar(spec, tar_path)
        diff_ids.append(sha256_file(tar_path))
        gz_path = layout_dir / f"layer-{index}.tar.gz"
        level = RANDOM_LAYER_GZIP_LEVEL if spec.random_files else 6
        # mtime=0 keeps the gzip header, and so the digest, the same from build to build.
        with (
            tar_path.open("rb") as source,
            gz_path.open("wb") as raw,
            gzip.GzipFile("", "wb", level, raw, mtime=0) as target,
        ):
            shutil.copyfileobj(source, target, WRITE_BLOCK_BYTES)
        tar_path.unlink()
        layer_descriptors.append(_store_blob(blobs_dir, gz_path, MEDIA_TYPE_LAYER_GZIP))
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": list(command), "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": f"d7y test layer {i}"} for i in range(len(layers))],
    }
    config_descriptor = _store_bytes(
        blobs_dir, json.dumps(config, sort_keys=True).encode(), MEDIA_TYPE_CONFIG
    )
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_MANIFEST,
        "config": config_descriptor.as_json(),
        "layers": [layer.as_json() for layer in layer_descriptors],
    }
    manifest_descriptor = _store_bytes(
        blobs_dir, json.dumps(manifest, sort_keys=True).encode(), MEDIA_TYPE_MANIFEST
    )
    image_index = {
        "schemaVersion": 2,
        "manifests": [
            {**manifest_descriptor.as_json(),
             "annotations": {"org.opencontainers.image.ref.name": tag}}
        ],
    }
    (layout_dir / "index.json").write_text(json.dumps(image_index))
    (layout_dir / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    return BuiltImage(
        layout_dir, tag, manifest_descriptor, config_descriptor, tuple(layer_descriptors),
        tuple(command),
    )


# The big image: busybox, 64 MiB of random bytes (the issue asks for at least 64 MiB), a 4 MiB
# layer for the many-clients test (big enough to still be downloading while clients arrive, small
# enough that 100 copies cross loopback in seconds), and a small text layer.
BIG_LAYER_BYTES = 64 * 1024 * 1024
MEDIUM_LAYER_BYTES = 4 * 1024 * 1024


# The big image's 64 MiB file of random bytes.
BIG_FILE = RandomFile("data/big.bin", BIG_LAYER_BYTES, seed=64)


def big_image(layout_dir: Path) -> BuiltImage:
    return build_image(
        layout_dir,
        [
            LayerSpec(busybox=True),
            LayerSpec(random_files=(BIG_FILE,)),
            LayerSpec(random_files=(RandomFile("data/medium.bin", MEDIUM_LAYER_BYTES, seed=4),)),
            LayerSpec(text_files={"etc/d7y-test.txt": "layer three\n"}),
        ],
    )


def small_image(layout_dir: Path) -> BuiltImage:
    """Busybox and a text layer: for tests where size does not matter (auth, bad input)."""
    return build_image(
        layout_dir,
        [
            LayerSpec(busybox=True),
            LayerSpec(text_files={"etc/d7y-test.txt": "small image\n"}),
        ],
    )
