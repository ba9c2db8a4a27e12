"""Nydus images as remote snapshots: the `snapshotter.RemoteLayers` hook for Nydus (RAFS) layers.

Owns, for the containerd snapshotter (`snapshotter.py`):
- which layers containerd must not download: a data blob (`containerd.io/snapshot/nydus-blob`,
  an annotation of the Nydus manifest that containerd's unpacker passes on as a snapshot label);
- the bootstrap layer (`containerd.io/snapshot/nydus-bootstrap`): containerd unpacks its tar.gz
  into the snapshot (`image/image.boot`); once committed, the bootstrap is checked with `rafs/`
  (a malformed one is a clear `RafsError`) and the snapshot is marked with `RAFS_LABEL`;
- the lazy mount of a bootstrap snapshot: when a container's chain reaches it, its RAFS is mounted
  (`fuse_mount.RafsMount`) under `<data_dir>/nydus/<snapshot id>/mnt` and that directory becomes
  the chain's lowest lower dir. Blobs are read by digest (`sha256:<blob id>` of the bootstrap's
  blob table) from the image's repository, named by the CRI label
  `containerd.io/snapshot/cri.image-ref`, through the node's `TaskManager`
  (`fuse_mount.TaskBlobSource`: only the pieces a read needs, from peers or origin);
- what survives a restart: each mount's directory holds a small state file; at start every
  recorded mount of a snapshot that still exists is mounted again (a stale FUSE mount point a
  dead process left is cleaned first), and directories of snapshots that are gone are removed;
- unmounting before a snapshot is removed, and every mount when the node stops.

Does not own snapshot metadata or overlay mounts (`snapshotter.py`), the FUSE protocol
(`fuse_kernel.py`), the RAFS format (`rafs/`), registries (`registry.py`; the image's location
is resolved as `mounts.ImageResolver` does for `d7y-node mount`), or handing a FUSE connection
over to a new process (`fuse_handover.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import mmap
import os
import re
import secrets
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from d7y_node import fuse_kernel
from d7y_node.errors import D7yError, InvalidRequest, RafsError
from d7y_node.mounts import MAX_BOOTSTRAP_BYTES, ImageResolver

if TYPE_CHECKING:
    from d7y_node.fuse_handover import Handover
    from d7y_node.fuse_mount import MountOptions, RafsMount
    from d7y_node.snapshotter import SnapshotInfo

log = logging.getLogger(__name__)

# Labels containerd passes (the unpacker copies a layer's `containerd.io/snapshot/...`
# annotations into the snapshot's labels; the CRI plugin adds the `cri.*` ones when
# `disable_snapshot_annotations = false`).
BLOB_LABEL = "containerd.io/snapshot/nydus-blob"
BOOTSTRAP_LABEL = "containerd.io/snapshot/nydus-bootstrap"
IMAGE_REF_LABEL = "containerd.io/snapshot/cri.image-ref"
LAYER_DIGEST_LABEL = "containerd.io/snapshot/cri.layer-digest"
MANIFEST_DIGEST_LABEL = "containerd.io/snapshot/cri.manifest-digest"
# Ours, on a committed bootstrap snapshot whose RAFS was checked: the RAFS version ("5" or "6").
RAFS_LABEL = "containerd.io/snapshot/d7y-node.rafs-version"

# Where containerd's unpack of the bootstrap layer puts the bootstrap (the layer's only member).
BOOTSTRAP_PATH = Path("image") / "image.boot"
NYDUS_DIR = "nydus"
MOUNT_DIR = "mnt"
STATE_FILE = "state.json"
# State files are a few hundred bytes; a bigger one is not ours.
MAX_STATE_BYTES = 64 * 1024
_SHA256_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def is_true(labels: Mapping[str, str], name: str) -> bool:
    return str(labels.get(name, "")).strip().lower() == "true"


class ClosableBlobSource(Protocol):
    """A `fuse_mount.BlobSource` the mount owns and closes when it ends."""

    async def read(self, blob_id: str, offset: int, length: int) -> bytes: ...

    async def prefetch(self, blob_id: str, offset: int, length: int) -> None: ...

    async def close(self) -> None: ...


# Gives the blob source of an image, from the image reference its snapshot's labels name.
SourceFactory = Callable[["ImageLocation"], ClosableBlobSource]


@dataclass(frozen=True)
class ImageLocation:
    """Where a bootstrap snapshot's blobs come from, as its CRI labels say."""

    image_ref: str
    layer_digest: str | None = None
    manifest_digest: str | None = None

    @classmethod
    def from_labels(cls, info: SnapshotInfo) -> ImageLocation:
        labels = info.labels
        image_ref = str(labels.get(IMAGE_REF_LABEL, "")).strip()
        if not image_ref:
            raise InvalidRequest(
                "NYDUS_IMAGE_UNKNOWN",
                f"snapshot {info.name!r} is a Nydus bootstrap without the label "
                f"{IMAGE_REF_LABEL}: its blobs cannot be located (pull the image through the CRI "
                "plugin with disable_snapshot_annotations = false)",
            )
        digests: dict[str, str | None] = {}
        for name in (LAYER_DIGEST_LABEL, MANIFEST_DIGEST_LABEL):
            value = labels.get(name)
            if value is not None and not _SHA256_DIGEST.fullmatch(value):
                raise InvalidRequest("NYDUS_LABEL_INVALID",
                                     f"snapshot {info.name!r}: {name} is not a sha256 digest")
            digests[name] = value
        return cls(image_ref, digests[LAYER_DIGEST_LABEL], digests[MANIFEST_DIGEST_LABEL])

    def as_json(self) -> dict[str, Any]:
        return {"image_ref": self.image_ref, "layer_digest": self.layer_digest,
                "manifest_digest": self.manifest_digest}


def registry_sources(resolver: ImageResolver) -> SourceFactory:
    """Blob sources through the node: the image's registry and repository as `d7y-node mount`
    resolves a reference (registry mirrors and insecure registries of the node's config), each
    blob a `TaskManager` task whose pieces come from peers or origin."""

    def factory(location: ImageLocation) -> ClosableBlobSource:
        # Loaded on the first mount, as `mounts.py` does: a node that never mounts keeps its
        # idle memory lower.
        from d7y_node.fuse_mount import TaskBlobSource
        from d7y_node.mounts import MountSpec
        from d7y_node.tasks import PieceSource

        # The mount point is not used to locate the image.
        spec = MountSpec(mountpoint="/", image=location.image_ref)
        upstream, repository, _reference = resolver.location(spec)
        # containerd pulled the bootstrap with the kubelet's credentials; the blobs are fetched
        # with the node's own (`--registry-auth-file`).
        authorize = resolver.authorizer(None, upstream, repository)

        def source(blob_id: str) -> PieceSource:
            return resolver.registry.blob_source(
                upstream, repository, f"sha256:{blob_id}", None, authorize=authorize
            )

        return TaskBlobSource(resolver.tasks, source)

    return factory


def check_bootstrap(path: Path, name: str) -> tuple[int, list[str]]:
    """The RAFS version and blob ids of the bootstrap at `path`; a clear `RafsError` for anything
    that is not a sound bootstrap whose blobs can be fetched by digest. Blocking."""
    from d7y_node.rafs import ROOT_INO, RafsV5Filesystem, open_bootstrap

    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size > MAX_BOOTSTRAP_BYTES:
                raise RafsError(f"{name}: a bootstrap of {size} bytes is too big")
            # Mapped, not read: a big bootstrap costs memory only for the pages looked at.
            data: mmap.mmap | bytes = (
                mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
            )
    except FileNotFoundError:
        raise RafsError(
            f"{name}: the Nydus bootstrap layer holds no {BOOTSTRAP_PATH}"
        ) from None
    except IsADirectoryError:
        raise RafsError(f"{name}: {BOOTSTRAP_PATH} in the bootstrap layer is not a file") from None
    except OSError as error:
        raise RafsError(f"{name}: cannot read the bootstrap: {error.strerror}") from None
    filesystem = None
    try:
        filesystem = open_bootstrap(data, name=name)
        blob_ids = [blob.blob_id for blob in filesystem.blobs]
        if not filesystem.getattr(ROOT_INO).is_directory:
            raise RafsError(f"{name}: the root of the image is not a directory")
        version = 5 if isinstance(filesystem, RafsV5Filesystem) else 6
    except RafsError as error:
        text = str(error)
        raise RafsError(text if text.startswith(name) else f"{name}: {text}") from None
    except Exception as error:  # a hostile bootstrap must be an error, never a crash
        raise RafsError(f"{name}: not a valid RAFS bootstrap ({error})") from None
    finally:
        filesystem = None  # it reads the map: let go of it before closing the map
        if isinstance(data, mmap.mmap):
            with contextlib.suppress(BufferError):
                data.close()
    for blob_id in blob_ids:
        if not _SHA256_HEX.fullmatch(blob_id):
            raise RafsError(f"{name}: blob id {blob_id!r} is not a sha256 digest")
    return version, blob_ids


@dataclass
class _Mounted:
    info: SnapshotInfo
    mount: RafsMount
    source: ClosableBlobSource
    watcher: asyncio.Task[None] | None = None


class NydusLayers:
    """`snapshotter.RemoteLayers` for Nydus images; see the module docstring.

    `sources` gives a mount its blob source from the image's location (`registry_sources` on a
    node); `options` are the mounts' (prefetch, caches). With a `handover` (a keeper of FUSE
    connections, `fuse_handover.py`), a node killed with `kill -9` leaves its mounts alive and the
    next start serves the same connections: running containers keep reading their lower dirs.
    """

    def __init__(
        self,
        data_dir: Path,
        sources: SourceFactory,
        *,
        options: MountOptions | None = None,
        handover: Handover | None = None,
    ) -> None:
        self.directory = data_dir / NYDUS_DIR
        self.sources = sources
        self.options = options
        self.handover = handover
        self._mounts: dict[int, _Mounted] = {}
        self._locks: dict[int, asyncio.Lock] = {}
        self._closing = False

    @classmethod
    def for_node(
        cls, data_dir: Path, resolver: ImageResolver, *, handover: Handover | None = None
    ) -> NydusLayers:
        return cls(data_dir, registry_sources(resolver), handover=handover)

    # -- the hook -------------------------------------------------------------------------------

    def skip(self, key: str, parent: str, labels: Mapping[str, str]) -> bool:
        return is_true(labels, BLOB_LABEL)

    async def committed(self, info: SnapshotInfo, fs: Path) -> Mapping[str, str]:
        if not is_true(info.labels, BOOTSTRAP_LABEL):
            return {}
        version, blob_ids = await asyncio.to_thread(
            check_bootstrap, fs / BOOTSTRAP_PATH, f"snapshot {info.name!r}"
        )
        log.info("snapshot %s: a RAFS v%d bootstrap over %d blobs", info.name, version,
                 len(blob_ids))
        return {RAFS_LABEL: str(version)}

    def is_bootstrap(self, info: SnapshotInfo) -> bool:
        return is_true(info.labels, BOOTSTRAP_LABEL) and RAFS_LABEL in info.labels

    async def lower(self, info: SnapshotInfo, fs: Path) -> Path | None:
        if not is_true(info.labels, BOOTSTRAP_LABEL):
            return None
        if RAFS_LABEL not in info.labels:
            # Committed before this hook knew it (or by another snapshotter): check it now.
            await asyncio.to_thread(check_bootstrap, fs / BOOTSTRAP_PATH,
                                    f"snapshot {info.name!r}")
        return await self.mount(info, fs)

    async def restore(
        self, snapshots: Sequence[SnapshotInfo], fs_of: Callable[[SnapshotInfo], Path]
    ) -> None:
        """Mount again what was mounted before the restart; forget the rest."""
        by_id = {info.id: info for info in snapshots}
        for directory, state in self._recorded():
            snapshot_id = int(directory.name)
            info = by_id.get(snapshot_id)
            if info is not None and state is not None and state.get("name") == info.name \
                    and is_true(info.labels, BOOTSTRAP_LABEL):
                try:
                    await self.mount(info, fs_of(info))
                    log.info("snapshot %s: RAFS mount restored", info.name)
                    continue
                except (D7yError, OSError) as error:
                    log.warning("snapshot %s: cannot restore its RAFS mount: %s", info.name,
                                error)
            await self._forget(directory)
        if self.handover is not None:
            # Connections kept for mounts of snapshots that are gone are ended.
            mounted = {str(self.mountpoint(snapshot_id)) for snapshot_id in self._mounts}
            for mountpoint in await self.handover.held():
                if mountpoint not in mounted:
                    await self.handover.detach(mountpoint)

    async def removing(self, info: SnapshotInfo, fs: Path) -> None:
        await self.unmount(info.id)
        await self._forget(self._directory(info.id))

    async def close(self) -> None:
        self._closing = True
        for snapshot_id in list(self._mounts):
            await self.unmount(snapshot_id, keep_record=True)

    # -- mounts ---------------------------------------------------------------------------------

    def mountpoint(self, snapshot_id: int) -> Path:
        return self._directory(snapshot_id) / MOUNT_DIR

    def mounted(self) -> list[SnapshotInfo]:
        return [mounted.info for mounted in self._mounts.values()]

    def get(self, snapshot_id: int) -> RafsMount | None:
        mounted = self._mounts.get(snapshot_id)
        return None if mounted is None else mounted.mount

    async def mount(self, info: SnapshotInfo, fs: Path) -> Path:
        """The RAFS of bootstrap snapshot `info` mounted (now, if it is not yet); its mount
        point."""
        lock = self._locks.setdefault(info.id, asyncio.Lock())
        async with lock:
            mounted = self._mounts.get(info.id)
            if mounted is not None and mounted.watcher is not None and \
                    not mounted.watcher.done():
                return Path(mounted.mount.mountpoint)
            if self._closing:
                raise D7yError("the node is shutting down")
            location = ImageLocation.from_labels(info)
            bootstrap = fs / BOOTSTRAP_PATH
            if not bootstrap.is_file():
                raise RafsError(f"snapshot {info.name!r} holds no {BOOTSTRAP_PATH}")
            mountpoint = self.mountpoint(info.id)
            await asyncio.to_thread(mountpoint.mkdir, parents=True, exist_ok=True)
            self._write_state(info, location)
            source = self.sources(location)
            from d7y_node.fuse_mount import MountOptions, RafsMount

            options = self.options or MountOptions()
            mount = RafsMount(bootstrap, mountpoint, source, options, handover=self.handover)
            try:
                await mount.__aenter__()
            except BaseException:
                await source.close()
                raise
            mounted = _Mounted(info, mount, source)
            self._mounts[info.id] = mounted
            mounted.watcher = asyncio.create_task(
                self._watch(mounted), name=f"nydus mount {info.name}"
            )
            log.info("snapshot %s: RAFS of %s mounted at %s", info.name, location.image_ref,
                     mountpoint)
            return mountpoint

    async def _watch(self, mounted: _Mounted) -> None:
        """Wait for the mount to end (here or from outside), then let go of it."""
        try:
            await mounted.mount.serve()
        finally:
            if self._mounts.get(mounted.info.id) is mounted:
                del self._mounts[mounted.info.id]
                with contextlib.suppress(Exception):
                    await mounted.mount.close()
                await mounted.source.close()

    async def unmount(self, snapshot_id: int, *, keep_record: bool = False) -> bool:
        """End the mount of a snapshot; False if it has none. `keep_record`: the next start
        mounts it again (the node stops, the snapshot stays)."""
        mounted = self._mounts.pop(snapshot_id, None)
        if mounted is None:
            return False
        try:
            await mounted.mount.close()
        finally:
            await mounted.source.close()
            if mounted.watcher is not None and mounted.watcher is not asyncio.current_task():
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await mounted.watcher
        if not keep_record:
            self._remove_state(snapshot_id)
        return True

    # -- the record of mounts -------------------------------------------------------------------

    def _directory(self, snapshot_id: int) -> Path:
        return self.directory / str(snapshot_id)

    def _write_state(self, info: SnapshotInfo, location: ImageLocation) -> None:
        directory = self._directory(info.id)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / STATE_FILE
        temporary = directory / f".{STATE_FILE}.{secrets.token_hex(4)}.tmp"
        temporary.write_text(json.dumps({"name": info.name, **location.as_json()}) + "\n")
        os.replace(temporary, path)

    def _remove_state(self, snapshot_id: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self._directory(snapshot_id) / STATE_FILE).unlink()

    def _recorded(self) -> list[tuple[Path, dict[str, Any] | None]]:
        """Every mount directory (named by a snapshot id) and its state (None: unreadable)."""
        try:
            directories = sorted(path for path in self.directory.iterdir()
                                 if path.name.isdigit() and path.is_dir())
        except OSError:
            return []
        found: list[tuple[Path, dict[str, Any] | None]] = []
        for directory in directories:
            state: dict[str, Any] | None = None
            try:
                raw = (directory / STATE_FILE).read_bytes()[: MAX_STATE_BYTES + 1]
                value = json.loads(raw) if len(raw) <= MAX_STATE_BYTES else None
                state = value if isinstance(value, dict) else None
            except (OSError, ValueError):
                state = None
            found.append((directory, state))
        return found

    async def _forget(self, directory: Path) -> None:
        """Remove a mount directory (cleaning a stale mount a dead process left in it first)."""
        mountpoint = directory / MOUNT_DIR
        try:
            if self.handover is not None:
                cleaned = await self.handover.clean(str(mountpoint))
            else:
                cleaned = await fuse_kernel.clean_stale_mount(str(mountpoint))
            if cleaned:
                log.warning("%s: unmounted a mount left by a process that is gone", mountpoint)
        except OSError as error:
            log.warning("%s: cannot clean a stale mount: %s", mountpoint, error)
            return
        if await asyncio.to_thread(fuse_kernel.is_mount_point, str(mountpoint)):
            log.warning("%s is still mounted; its directory stays", mountpoint)
            return
        await asyncio.to_thread(shutil.rmtree, directory, True)


__all__ = [
    "BLOB_LABEL",
    "BOOTSTRAP_LABEL",
    "IMAGE_REF_LABEL",
    "LAYER_DIGEST_LABEL",
    "MANIFEST_DIGEST_LABEL",
    "RAFS_LABEL",
    "ImageLocation",
    "NydusLayers",
    "check_bootstrap",
    "registry_sources",
]
