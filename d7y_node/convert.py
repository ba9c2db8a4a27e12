"""OCI / Docker image → Nydus (RAFS v6) image: `d7y-node convert SOURCE TARGET`.

Owns the conversion: layers are downloaded one at a time into temporary files (verified against
their digests) and decompressed (gzip, zstd or plain tar, told apart by their first bytes) into an
uncompressed tar on disk; each tar is applied in order to one `builder.Tree` with the OCI rules
(whiteouts and opaque directories delete from the layers below only, hard links share one inode,
symlinks, devices, fifos, modes, owners, mtimes and PAX `SCHILY.xattr.*` kept). A regular file's
content stays in its layer's tar: the tree only names the byte range (`Content.from_path`), so no
layer is ever held in memory, and its chunks go to the blob of the layer that last wrote it.
Then `writer.write_image` writes one data blob per layer and the bootstrap, and the result is
pushed in the form Nydus tools (nydusify, the nydus-snapshotter) use:

- one layer per data blob, media type `application/vnd.oci.image.layer.nydus.blob.v1`, annotated
  `containerd.io/snapshot/nydus-blob: "true"`; its diff id is its own digest (a blob is not
  compressed as a whole);
- last, a tar.gz layer holding `image/image.boot`, annotated
  `containerd.io/snapshot/nydus-bootstrap: "true"`, `containerd.io/snapshot/nydus-fs-version: "6"`
  (and `containerd.io/snapshot/nydus-blob-ids`, the blob ids as a JSON list, which older
  snapshotters read);
- the source config with `rootfs.diff_ids` replaced by the new layers' uncompressed digests, and
  an OCI manifest under the target reference.

Hostile layers are refused with a `ConvertError` naming the entry: absolute paths or `..`, hard
links to a path outside the tree or to nothing, member data past the end of the tar, sparse or
unknown entry types, and decompressed layers beyond `max_layer_bytes`.

While it works it reports each step's bytes (each layer pulled, the file bytes written into the
blobs, each blob pushed) to a `ConvertProgress`: a bar per step on a terminal (drawn by
`fetch.Progress`, the bar of `d7y-node get`), one plain line per step elsewhere.

Does not speak HTTP itself (`oci.py`), nor know the RAFS layout (`rafs/`).
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO

import zstandard

from d7y_node.errors import D7yError, RafsError
from d7y_node.fetch import Progress as BarProgress
from d7y_node.fetch import human_size
from d7y_node.oci import (
    MEDIA_TYPE_OCI_CONFIG,
    MEDIA_TYPE_OCI_MANIFEST,
    Descriptor,
    OciRegistry,
    default_platform,
    file_sha256,
    sha256_digest,
)
from d7y_node.preheat import Platform
from d7y_node.rafs.builder import Content, Inode, Tree
from d7y_node.rafs.chunks import Compressor, Digester
from d7y_node.rafs.writer import DEFAULT_CHUNK_SIZE, WriterOptions, write_image
from d7y_node.registry_auth import Credentials


class ConvertError(D7yError):
    """An image that cannot be converted: a hostile or malformed layer, or an unsupported form."""


MEDIA_TYPE_NYDUS_BLOB = "application/vnd.oci.image.layer.nydus.blob.v1"
MEDIA_TYPE_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ANNOTATION_NYDUS_BLOB = "containerd.io/snapshot/nydus-blob"
ANNOTATION_NYDUS_BOOTSTRAP = "containerd.io/snapshot/nydus-bootstrap"
ANNOTATION_NYDUS_FS_VERSION = "containerd.io/snapshot/nydus-fs-version"
ANNOTATION_NYDUS_BLOB_IDS = "containerd.io/snapshot/nydus-blob-ids"
NYDUS_FS_VERSION = "6"
# Where the bootstrap sits in its layer tar (the nydus-snapshotter unpacks exactly this name).
BOOTSTRAP_DIRECTORY = "image"
BOOTSTRAP_MEMBER = "image/image.boot"

# OCI layer conventions (image-spec layer.md).
WHITEOUT_PREFIX = b".wh."
OPAQUE_WHITEOUT = b".wh..wh..opq"
# `.wh..wh.` names other than the opaque marker are aufs metadata (e.g. `.wh..wh.plnk`): skipped.
AUFS_METADATA_PREFIX = b".wh..wh."

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# A decompressed layer larger than this is refused (a decompression bomb fills the disk long
# before it is useful); the largest real layers (CUDA, ML frameworks) stay well below.
DEFAULT_MAX_LAYER_BYTES = 64 << 30
# Entries per layer at most: a tar of millions of empty entries costs memory in the tree.
DEFAULT_MAX_LAYER_ENTRIES = 2_000_000
COPY_BLOCK_BYTES = 1 << 20
# The bootstrap layer's gzip level: metadata compresses well and is small, so the best level.
BOOTSTRAP_GZIP_LEVEL = 9
# Tar header fields: names are bytes on disk; utf-8 + surrogateescape gives them back exactly.
TAR_ENCODING = "utf-8"
TAR_ERRORS = "surrogateescape"
PAX_XATTR_PREFIXES = ("SCHILY.xattr.",)
PAX_BASE64_XATTR_PREFIX = "LIBARCHIVE.xattr."
MIB = 1 << 20


@dataclass(frozen=True)
class ConvertOptions:
    """How to convert (the RAFS writer's settings, which platform, and the layer limits)."""

    compressor: Compressor = Compressor.ZSTD
    chunk_size: int = DEFAULT_CHUNK_SIZE
    digester: Digester = Digester.BLAKE3
    platform: Platform = field(default_factory=default_platform)
    insecure_registries: tuple[str, ...] = ()
    # Docker config.json with registry logins for the pull and the push (None: anonymous).
    auth_file: Path | None = None
    # Temporary files go here (None: the system's temp dir); they are removed at the end.
    work_directory: Path | None = None
    max_layer_bytes: int = DEFAULT_MAX_LAYER_BYTES
    max_layer_entries: int = DEFAULT_MAX_LAYER_ENTRIES

    def writer_options(self) -> WriterOptions:
        return WriterOptions(
            chunk_size=self.chunk_size, compressor=self.compressor, digester=self.digester
        )


@dataclass(frozen=True)
class ConvertedImage:
    """What was pushed: the manifest's digest and body, and the layer descriptors."""

    manifest_digest: str
    manifest: bytes
    layers: tuple[Descriptor, ...]
    config: dict[str, Any]


# -- layers → tree -------------------------------------------------------------------------


def decompress_layer(
    source: Path, target: Path, *, max_bytes: int = DEFAULT_MAX_LAYER_BYTES
) -> str:
    """Write the uncompressed tar of the layer `source` (gzip, zstd or plain) to `target`;
    its sha256 digest (the layer's diff id)."""
    with source.open("rb") as raw:
        magic = raw.read(len(ZSTD_MAGIC))
        raw.seek(0)
        stream: BinaryIO
        if magic.startswith(GZIP_MAGIC):
            stream = gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[assignment]
        elif magic == ZSTD_MAGIC:
            stream = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        else:
            stream = raw
        hasher = hashlib.sha256()
        written = 0
        try:
            with target.open("wb") as output:
                while block := stream.read(COPY_BLOCK_BYTES):
                    written += len(block)
                    if written > max_bytes:
                        raise ConvertError(
                            f"layer {source.name} decompresses to more than {max_bytes} bytes"
                        )
                    hasher.update(block)
                    output.write(block)
        except (OSError, EOFError, zstandard.ZstdError) as err:
            raise ConvertError(f"layer {source.name} does not decompress: {err}") from None
        finally:
            if stream is not raw:
                stream.close()
    return "sha256:" + hasher.hexdigest()


def _normalize(name: str, what: str) -> bytes:
    """The tree path of a tar member name, refusing absolute paths and `..`."""
    raw = name.encode(TAR_ENCODING, TAR_ERRORS)
    if b"\0" in raw:
        raise ConvertError(f"{what} {raw[:200]!r}: a NUL byte in the name")
    if raw.startswith(b"/"):
        raise ConvertError(f"{what} {raw[:200]!r}: an absolute path in a layer")
    parts = [part for part in raw.split(b"/") if part and part != b"."]
    if b".." in parts:
        raise ConvertError(f"{what} {raw[:200]!r}: `..` leaves the image root")
    return b"/" + b"/".join(parts)


def _split(path: bytes) -> tuple[bytes, bytes]:
    parent, _, name = path.rpartition(b"/")
    return parent or b"/", name


def _xattrs(member: tarfile.TarInfo) -> dict[bytes, bytes]:
    xattrs: dict[bytes, bytes] = {}
    for key, value in member.pax_headers.items():
        if key.startswith(PAX_XATTR_PREFIXES):
            name = key.split(".xattr.", 1)[1]
            xattrs[name.encode(TAR_ENCODING, TAR_ERRORS)] = value.encode(TAR_ENCODING, TAR_ERRORS)
        elif key.startswith(PAX_BASE64_XATTR_PREFIX):
            name = key[len(PAX_BASE64_XATTR_PREFIX):]
            try:
                xattrs[name.encode(TAR_ENCODING, TAR_ERRORS)] = base64.b64decode(value)
            except ValueError:
                raise ConvertError(f"{member.name!r}: xattr {name!r} is not base64") from None
    return xattrs


def _attributes(member: tarfile.TarInfo) -> dict[str, Any]:
    mtime = member.mtime
    seconds = int(mtime)
    nanoseconds = round((mtime - seconds) * 1_000_000_000) if isinstance(mtime, float) else 0
    if nanoseconds >= 1_000_000_000:
        seconds, nanoseconds = seconds + 1, 0
    if seconds < 0:
        seconds, nanoseconds = 0, 0
    if member.uid < 0 or member.gid < 0:
        raise ConvertError(f"{member.name!r}: negative owner")
    return {
        "uid": member.uid, "gid": member.gid, "mtime": seconds,
        "mtime_nanoseconds": nanoseconds, "xattrs": _xattrs(member),
    }


class LayerApplier:
    """Applies layer tars in order to one tree (layer `n` is the `n`-th call).

    Layers stack as overlayfs stacks them (what containerd's and Docker's overlay unpackers
    give, and what Nydus builds): each layer's paths are its own, never resolved through a
    symlink of a layer below, so an upper `lib/x` over a lower symlink `lib` makes `lib` a
    directory; a directory over a lower file replaces it; directories merge unless opaque.
    """

    def __init__(
        self, tree: Tree | None = None, *,
        max_layer_entries: int = DEFAULT_MAX_LAYER_ENTRIES,
    ) -> None:
        self.tree = tree or Tree()
        self.layer_count = 0
        self.max_layer_entries = max_layer_entries

    def apply(self, tar_path: Path) -> int:
        """Apply the uncompressed layer tar at `tar_path` (kept: file contents are read from it
        when the image is written); the layer's index."""
        layer = self.layer_count
        tar_size = tar_path.stat().st_size
        try:
            with tarfile.open(
                tar_path, "r:", encoding=TAR_ENCODING, errors=TAR_ERRORS
            ) as archive:
                members: list[tarfile.TarInfo] = []
                for member in archive:
                    members.append(member)
                    if len(members) > self.max_layer_entries:
                        raise ConvertError(
                            f"layer {layer} has more than {self.max_layer_entries} entries"
                        )
                    if member.offset_data + max(member.size, 0) > tar_size:
                        raise ConvertError(
                            f"layer {layer}: {member.name!r} claims {member.size} bytes past "
                            "the end of the tar"
                        )
        except tarfile.TarError as err:
            raise ConvertError(f"layer {layer} is not a valid tar: {err}") from None
        # Whiteouts delete only what the layers below hold, so all of them go first.
        entries: list[tuple[bytes, tarfile.TarInfo]] = []
        for member in members:
            path = _normalize(member.name, f"layer {layer}: entry")
            parent, name = _split(path)
            if name.startswith(AUFS_METADATA_PREFIX):
                if name == OPAQUE_WHITEOUT:
                    self._make_opaque(parent)
                continue
            if name.startswith(WHITEOUT_PREFIX):
                self._whiteout(parent, name[len(WHITEOUT_PREFIX):], path)
                continue
            entries.append((path, member))
        for path, member in entries:
            self._add(path, member, layer, tar_path)
        self.layer_count += 1
        return layer

    def _resolve_directory(self, path: bytes) -> Inode | None:
        node = self.tree.get(path)
        return node if node is not None and node.is_directory else None

    def _make_opaque(self, path: bytes) -> None:
        node = self._resolve_directory(path)
        if node is not None:
            node.children.clear()

    def _whiteout(self, parent: bytes, name: bytes, path: bytes) -> None:
        if not name or name in (b".", b".."):
            raise ConvertError(f"whiteout {path[:200]!r} names nothing")
        node = self._resolve_directory(parent)
        if node is not None:
            node.children.pop(name, None)

    def _add(self, path: bytes, member: tarfile.TarInfo, layer: int, tar_path: Path) -> None:
        where = f"layer {layer}: {path[:200]!r}"
        if path == b"/" and not member.isdir():
            raise ConvertError(f"{where}: the root must be a directory")
        permissions = member.mode & 0o7777
        if member.islnk():
            target_path = _normalize(member.linkname, f"{where}: hard link to")
            target = self.tree.get(target_path)
            if target is None:
                raise ConvertError(f"{where}: hard link to {target_path[:200]!r}, which is absent")
            if target.is_directory:
                raise ConvertError(f"{where}: hard link to a directory")
            # As containerd's unpacker does: the link entry's own attributes end up on the
            # inode (it chowns and chmods the new name), its xattrs are added to the target's.
            # Tar writers give a link entry its target's attributes, so this rarely shows.
            attributes = _attributes(member)
            target.mode = stat.S_IFMT(target.mode) | permissions
            target.uid, target.gid = attributes["uid"], attributes["gid"]
            target.mtime = attributes["mtime"]
            target.mtime_nanoseconds = attributes["mtime_nanoseconds"]
            target.xattrs.update(attributes["xattrs"])
            if target_path != path:
                self._place(path, target)
            return
        attributes = _attributes(member)
        if member.isdir():
            existing = self.tree.get(path)
            if existing is not None and existing.is_directory:
                existing.mode = stat.S_IFDIR | permissions
                existing.uid = attributes["uid"]
                existing.gid = attributes["gid"]
                existing.mtime = attributes["mtime"]
                existing.mtime_nanoseconds = attributes["mtime_nanoseconds"]
                existing.xattrs = attributes["xattrs"]
                return
            self._place(path, Inode(mode=stat.S_IFDIR | permissions, **attributes))
            return
        if member.isreg():
            if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE):
                raise ConvertError(f"{where}: unsupported tar entry type {member.type!r}")
            if member.issparse():
                raise ConvertError(f"{where}: sparse tar entries are not supported")
            content = Content.from_path(tar_path, offset=member.offset_data, size=member.size)
            node = Inode(
                mode=stat.S_IFREG | permissions, content=content, layer=layer, **attributes
            )
        elif member.issym():
            link = member.linkname.encode(TAR_ENCODING, TAR_ERRORS)
            node = Inode(mode=stat.S_IFLNK | 0o777, target=link, **attributes)
        elif member.ischr() or member.isblk():
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            try:
                rdev = os.makedev(member.devmajor, member.devminor)
            except (OverflowError, ValueError):
                raise ConvertError(f"{where}: invalid device number") from None
            node = Inode(mode=kind | permissions, rdev=rdev, **attributes)
        elif member.isfifo():
            node = Inode(mode=stat.S_IFIFO | permissions, **attributes)
        else:
            raise ConvertError(f"{where}: unsupported tar entry type {member.type!r}")
        self._place(path, node)

    def _place(self, path: bytes, node: Inode) -> None:
        try:
            self.tree.put(path, node)
        except RafsError as err:
            raise ConvertError(f"{path[:200]!r}: {err}") from None


# -- the Nydus image -------------------------------------------------------------------------


def bootstrap_layer(bootstrap: bytes, path: Path) -> tuple[Descriptor, str]:
    """Write the tar.gz holding `image/image.boot` to `path`; its descriptor (without
    annotations) and its diff id. The same bootstrap always gives the same bytes."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as archive:
        folder = tarfile.TarInfo(BOOTSTRAP_DIRECTORY)
        folder.type = tarfile.DIRTYPE
        folder.mode = 0o755
        archive.addfile(folder)
        member = tarfile.TarInfo(BOOTSTRAP_MEMBER)
        member.size = len(bootstrap)
        member.mode = 0o644
        archive.addfile(member, io.BytesIO(bootstrap))
    tar_bytes = raw.getvalue()
    with path.open("wb") as output, gzip.GzipFile(
        "", "wb", BOOTSTRAP_GZIP_LEVEL, output, mtime=0
    ) as compressed:
        compressed.write(tar_bytes)
    descriptor = Descriptor(MEDIA_TYPE_LAYER_GZIP, file_sha256(path), path.stat().st_size)
    return descriptor, sha256_digest(tar_bytes)


def nydus_config(source_config: dict[str, Any], diff_ids: list[str]) -> dict[str, Any]:
    """The source config with `rootfs.diff_ids` naming the new layers."""
    config = dict(source_config)
    rootfs = dict(config.get("rootfs") or {})
    rootfs["type"] = "layers"
    rootfs["diff_ids"] = diff_ids
    config["rootfs"] = rootfs
    return config


def nydus_manifest(config: Descriptor, layers: list[Descriptor]) -> bytes:
    document = {
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_OCI_MANIFEST,
        "config": config.as_json(),
        "layers": [layer.as_json() for layer in layers],
    }
    return json.dumps(document, separators=(",", ":")).encode()


# -- progress -------------------------------------------------------------------------------

PHASE_PULL = "pulled"
PHASE_WRITE = "written"
PHASE_PUSH = "pushed"
# A step's label ("pull 12/34 <8 hex digits>") and bar are narrower than `get`'s, so the line
# with the phase total at its end fits a 100-column terminal (on 80 columns the end is cut).
STEP_LABEL_WIDTH = 20
STEP_BAR_WIDTH = 16
SHORT_DIGEST_HEX = 8
# The width assumed when a terminal does not say its own.
DEFAULT_TERMINAL_COLUMNS = 80


class ConvertProgress:
    """What a conversion shows while it works: each step (a layer pulled, the files written into
    the Nydus blobs, a blob pushed) with its bytes, and the totals.

    On a terminal each step is a bar (`fetch.Progress`, the one `d7y-node get` draws) with the
    total of its phase beside it (all layers' bytes pulled, all file bytes written, all bytes
    pushed); elsewhere each step is one plain line when it ends. Without a stream, silent.
    The counters (`moved`, `totals`) are what the summary line reports.
    """

    def __init__(self, stream: IO[str] | None = None, *, tty: bool | None = None) -> None:
        self.stream = stream
        self.tty = bool(stream is not None and (stream.isatty() if tty is None else tty))
        self.totals: dict[str, int] = {}
        self.moved: dict[str, int] = {}
        self.skipped_pushes = 0
        self.started = time.monotonic()
        self._phase = PHASE_PULL
        self._bar: BarProgress | None = None

    def note(self, line: str) -> None:
        if self.stream is not None:
            self.stream.write(line + "\n")
            self.stream.flush()

    def phase(self, name: str, total: int) -> None:
        """Begin a phase whose steps move `total` bytes between them."""
        self._phase = name
        self.totals[name] = total
        self.moved.setdefault(name, 0)

    def step(self, label: str, total: int) -> None:
        """Begin a step of the current phase (ending the one before)."""
        self.end_step()
        if self.stream is None:
            return
        columns = None
        if self.tty:
            try:
                columns = os.get_terminal_size(self.stream.fileno()).columns
            except (OSError, ValueError, io.UnsupportedOperation):
                columns = None
            columns = columns or DEFAULT_TERMINAL_COLUMNS
        self._bar = BarProgress(
            self.stream, total, label, tty=self.tty, suffix=self._phase_total,
            summary_on_tty=False, label_width=STEP_LABEL_WIDTH, bar_width=STEP_BAR_WIDTH,
            columns=columns,
        )

    def advance(self, amount: int) -> None:
        """`amount` more bytes of the current step (from any one thread at a time)."""
        self.moved[self._phase] = self.moved.get(self._phase, 0) + amount
        if self._bar is not None:
            self._bar.advance(amount)

    def end_step(self) -> None:
        bar, self._bar = self._bar, None
        if bar is not None:
            bar.finish()

    def abort(self) -> None:
        """The conversion failed: drop the current step, ending its bar's line on a terminal
        so the error is printed on a line of its own."""
        bar, self._bar = self._bar, None
        if bar is not None and self.tty and bar.done and self.stream is not None:
            self.stream.write("\n")
            self.stream.flush()

    def skip(self, line: str, amount: int) -> None:
        """The current step was found done already (a blob the registry has, so no byte moved):
        it leaves the phase's total and gets `line` instead of a bar."""
        self._bar = None
        self.skipped_pushes += 1
        self.totals[self._phase] = self.totals.get(self._phase, 0) - amount
        self.note(line)

    def _phase_total(self) -> str:
        return (
            f" | {self._phase} {human_size(self.moved.get(self._phase, 0))}"
            f"/{human_size(self.totals.get(self._phase, 0))}"
        )

    def summary(self) -> str:
        elapsed = time.monotonic() - self.started
        parts = [
            f"{name} {human_size(self.moved.get(name, 0))}"
            for name in (PHASE_PULL, PHASE_WRITE, PHASE_PUSH) if name in self.totals
        ]
        if self.skipped_pushes:
            parts[-1] += f" ({self.skipped_pushes} blob(s) already there)"
        return f"total: {', '.join(parts)} in {elapsed:.1f}s"


def _short(digest: str) -> str:
    return digest.removeprefix("sha256:")[:SHORT_DIGEST_HEX]


def _file_bytes(tree: Tree) -> int:
    """The bytes of every regular file's content, each inode once (what the writer reads)."""
    unique = {id(node): node.size for _path, node in tree.walk() if node.is_regular}
    return sum(unique.values())


async def convert(
    source: str, target: str, options: ConvertOptions | None = None,
    *, progress: ConvertProgress | None = None,
) -> ConvertedImage:
    """Pull `source`, convert it, push the Nydus image as `target`."""
    options = options or ConvertOptions()
    progress = progress or ConvertProgress()
    writer_options = options.writer_options()  # refuses bad settings before any download
    credentials = Credentials.of(options.auth_file)
    async with OciRegistry(options.insecure_registries, credentials=credentials) as registry:
        try:
            return await _convert(registry, source, target, options, writer_options, progress)
        except BaseException:
            progress.abort()
            raise


async def _convert(
    registry: OciRegistry, source: str, target: str, options: ConvertOptions,
    writer_options: WriterOptions, progress: ConvertProgress,
) -> ConvertedImage:
    source_image = registry.location(source)
    target_image = registry.location(target)
    manifest = await registry.resolve(source_image, options.platform)
    source_config = await registry.config(source_image, manifest.config)
    layer_count = len(manifest.layers)
    progress.note(f"{source_image}: {layer_count} layer(s), manifest {manifest.digest}")
    rootfs = source_config.get("rootfs")
    source_diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(source_diff_ids, list) or len(source_diff_ids) != layer_count:
        raise ConvertError(
            f"{source_image}: the config's rootfs.diff_ids do not match its "
            f"{layer_count} layer(s)"
        )
    work = Path(tempfile.mkdtemp(prefix="d7y-convert-", dir=options.work_directory))
    try:
        applier = LayerApplier(max_layer_entries=options.max_layer_entries)
        progress.phase(PHASE_PULL, sum(layer.size for layer in manifest.layers))
        for index, descriptor in enumerate(manifest.layers):
            compressed = work / f"layer-{index}.download"
            progress.step(
                f"pull {index + 1}/{layer_count} {_short(descriptor.digest)}", descriptor.size
            )
            await registry.download(source_image, descriptor, compressed, progress.advance)
            progress.end_step()
            tar_path = work / f"layer-{index}.tar"
            diff_id = await asyncio.to_thread(
                decompress_layer, compressed, tar_path, max_bytes=options.max_layer_bytes
            )
            compressed.unlink()
            if source_diff_ids[index] != diff_id:
                raise ConvertError(
                    f"layer {index} unpacks to {diff_id}, its config says "
                    f"{source_diff_ids[index]}"
                )
            await asyncio.to_thread(applier.apply, tar_path)
        blob_directory = work / "blobs"
        blob_directory.mkdir()
        file_bytes = await asyncio.to_thread(_file_bytes, applier.tree)
        progress.phase(PHASE_WRITE, file_bytes)
        progress.step("write Nydus blobs", file_bytes)
        written = await asyncio.to_thread(
            write_image, applier.tree, blob_directory, writer_options, progress=progress.advance
        )
        progress.end_step()
        progress.note(
            f"{len(written.blobs)} Nydus blob(s) of "
            f"{human_size(sum(blob.size for blob in written.blobs))} and a bootstrap of "
            f"{human_size(len(written.bootstrap))}"
        )
        boot_path = work / "bootstrap.tar.gz"
        boot_descriptor, boot_diff_id = await asyncio.to_thread(
            bootstrap_layer, written.bootstrap, boot_path
        )
        layers = [
            Descriptor(
                MEDIA_TYPE_NYDUS_BLOB, "sha256:" + blob.blob_id, blob.size,
                {ANNOTATION_NYDUS_BLOB: "true"},
            )
            for blob in written.blobs
        ]
        blob_ids = json.dumps([blob.blob_id for blob in written.blobs], separators=(",", ":"))
        layers.append(Descriptor(
            boot_descriptor.media_type, boot_descriptor.digest, boot_descriptor.size,
            {
                ANNOTATION_NYDUS_BLOB_IDS: blob_ids,
                ANNOTATION_NYDUS_BOOTSTRAP: "true",
                ANNOTATION_NYDUS_FS_VERSION: NYDUS_FS_VERSION,
            },
        ))
        config = nydus_config(
            source_config, [layer.digest for layer in layers[:-1]] + [boot_diff_id]
        )
        config_bytes = json.dumps(config, separators=(",", ":")).encode()
        config_path = work / "config.json"
        config_path.write_bytes(config_bytes)
        config_descriptor = Descriptor(
            MEDIA_TYPE_OCI_CONFIG, sha256_digest(config_bytes), len(config_bytes)
        )
        uploads = [(blob.path, "sha256:" + blob.blob_id, blob.size) for blob in written.blobs]
        uploads.append((boot_path, boot_descriptor.digest, boot_descriptor.size))
        uploads.append((config_path, config_descriptor.digest, len(config_bytes)))
        progress.phase(PHASE_PUSH, sum(size for _path, _digest, size in uploads))
        for number, (path, digest, size) in enumerate(uploads, 1):
            label = f"push {number}/{len(uploads)} {_short(digest)}"
            progress.step(label, size)
            if await registry.push_blob(target_image, digest, path, progress.advance):
                progress.end_step()
            else:
                progress.skip(f"{label}: already there", size)
        body = nydus_manifest(config_descriptor, layers)
        digest = await registry.push_manifest(target_image, body, MEDIA_TYPE_OCI_MANIFEST)
        progress.note(f"{target_image}: manifest {digest}")
        progress.note(progress.summary())
        return ConvertedImage(digest, body, tuple(layers), config)
    finally:
        await asyncio.to_thread(shutil.rmtree, work, True)
