"""The node's mounts: RAFS images mounted by `d7y-node mount`, served by the running node or by
the command itself (`--foreground`), and what survives a crash.

Owns:
- the mount request (`MountSpec`: a Nydus image reference, or a local bootstrap and blob
  directory; the registry/repository/credentials and prefetch settings, e.g. from a nydusd
  config) and its JSON form on the wire;
- an image's bootstrap (`ImageResolver`): the manifest is resolved through the node's
  `RegistryClient`, the layer annotated `containerd.io/snapshot/nydus-bootstrap: "true"` is
  fetched through the `TaskManager` (a tar.gz holding `image/image.boot`, extracted into the
  data dir once per digest), and each blob id of the bootstrap's blob table is the layer
  `sha256:<blob id>`, read through `fuse_mount.TaskBlobSource` (only the pieces a read needs,
  from peers or origin; the piece store is the cache);
- the record of every mount in the data dir (`MountRecords`: one JSON file per mount point
  under `mounts/records/`, written atomically, so the node and foreground commands never
  rewrite each other's), and the node's peer address (`mounts/node-address`) so commands given
  only the data dir find the node;
- `MountManager`: mounts made by one process, their registry, unmount on shutdown, and at start
  the cleanup of mount points a crashed server left (ENOTCONN) from the recorded list, then
  (`restore`, a node only) mounting again what the node had recorded, or, with a keeper of FUSE
  connections (`fuse_handover.py`), serving on the same connections;
- the node's routes on the peer port: `POST /api/v1/mounts` (body: a `MountSpec`; answers once
  the kernel has initialised the mount), `DELETE /api/v1/mounts?mountpoint=P`,
  `GET /api/v1/mounts`. Only loopback clients (a mount names paths on this host), and with a
  cluster key only requests signed with it (`peer.PeerAuth`, as `fetch.py`'s routes);
- the command's client side (`find_node`, `request_mount`, `request_unmount`) and the
  foreground server (`serve_foreground`).

Does not read RAFS (`rafs/`), speak FUSE (`fuse_kernel.py`, `fuse_mount.py`) or map nydusd
configs (`nydusd_config.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import secrets
import signal
import tarfile
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from d7y_node import fuse_kernel
from d7y_node.config import Listen, NodeConfig
from d7y_node.errors import (
    D7yError,
    InvalidRequest,
    NodeUnreachable,
    RafsError,
    UpstreamStatus,
)
from d7y_node.oci import Descriptor, default_platform, json_object
from d7y_node.peer import AUTH_HEADER, PeerAuth, is_loopback
from d7y_node.preheat import Platform, parse_image_reference
from d7y_node.proxy import REPOSITORY_ATTRIBUTE, UPSTREAM_ATTRIBUTE
from d7y_node.registry import Authorize, RegistryClient, Upstream, parse_upstream_url
from d7y_node.tasks import TaskManager

if TYPE_CHECKING:
    # The FUSE and RAFS stack (and zstandard, lz4, blake3 under it) loads on the first mount, not
    # at start: a node that never mounts keeps its idle RSS a few MB lower.
    from d7y_node.fuse_handover import Handover
    from d7y_node.fuse_mount import (
        DirectoryBlobSource,
        MountOptions,
        RafsMount,
        TaskBlobSource,
    )
    from d7y_node.registry_auth import RegistryLogin

log = logging.getLogger(__name__)

MOUNTS_PATH = "/api/v1/mounts"
MOUNTS_DIR = "mounts"
RECORDS_DIR = "records"
BOOTSTRAPS_DIR = "bootstraps"
NODE_ADDRESS_FILE = "node-address"
LOCK_FILE = "node.lock"  # node.py's data-dir lock: held while a node runs

SERVED_BY_NODE = "node"
SERVED_BY_FOREGROUND = "foreground"

# Nydus image forms (the converters of the Nydus project and ours write these).
BOOTSTRAP_ANNOTATION = "containerd.io/snapshot/nydus-bootstrap"
BLOB_MEDIA_TYPE = "application/vnd.oci.image.layer.nydus.blob.v1"
BOOTSTRAP_MEMBER = "image/image.boot"
MANIFEST_ACCEPT = ", ".join((
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
))
# Registries refuse manifests over 4 MiB (the distribution spec's common limit).
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
# A bootstrap layer is metadata only (a million-file image's is ~100 MiB); it is read whole into
# memory to extract, so anything bigger is refused rather than risk the node's memory.
MAX_BOOTSTRAP_LAYER_BYTES = 256 * 1024 * 1024
MAX_BOOTSTRAP_BYTES = 512 * 1024 * 1024
# An index may point at another index (rare); deeper nesting is a loop or abuse.
MAX_INDEX_DEPTH = 2
# A mount request answers once the kernel initialised the mount; resolving the image and
# fetching its bootstrap come first, which over a slow origin may take a while.
MOUNT_REQUEST_TIMEOUT_SECONDS = 300.0
UNMOUNT_REQUEST_TIMEOUT_SECONDS = 30.0
# Mount records are a few hundred bytes; a bigger file there is not one of ours.
MAX_RECORD_BYTES = 64 * 1024


# -- the request ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MountSpec:
    """What to mount where; either `image`, or `bootstrap` and `blob_dir`."""

    mountpoint: str
    image: str | None = None
    bootstrap: str | None = None
    blob_dir: str | None = None
    # `scheme://host[:port]` of the image's registry when not the reference's own.
    registry: str | None = None
    repository: str | None = None
    # Sent to the registry; never written to the data dir.
    authorization: str | None = None
    prefetch_files: bool = True
    prefetch_blobs: bool = False
    prefetch_bandwidth: int | None = None

    def check(self) -> None:
        if not os.path.isabs(self.mountpoint):
            raise InvalidRequest("MOUNT_INVALID", f"{self.mountpoint!r} is not an absolute path")
        local = self.bootstrap is not None or self.blob_dir is not None
        if (self.image is None) == (not local):
            raise InvalidRequest(
                "MOUNT_INVALID", "give an image reference, or a bootstrap and a blob directory"
            )
        if local and (self.bootstrap is None or self.blob_dir is None):
            raise InvalidRequest("MOUNT_INVALID", "a local mount needs a bootstrap and a blob dir")
        if self.prefetch_bandwidth is not None and self.prefetch_bandwidth <= 0:
            raise InvalidRequest("MOUNT_INVALID", "the prefetch bandwidth must be positive")

    def options(self) -> MountOptions:
        from d7y_node.fuse_mount import MountOptions

        return MountOptions(
            prefetch_files=self.prefetch_files, prefetch_blobs=self.prefetch_blobs,
            prefetch_bandwidth=self.prefetch_bandwidth,
        )

    def as_json(self, *, secrets_too: bool = True) -> dict[str, Any]:
        value = asdict(self)
        if not secrets_too:
            value.pop("authorization")
        return value

    @classmethod
    def from_json(cls, value: Any) -> MountSpec:
        if not isinstance(value, dict) or not isinstance(value.get("mountpoint"), str):
            raise InvalidRequest("MOUNT_INVALID", "a mount request needs a mountpoint")
        text_fields = ("image", "bootstrap", "blob_dir", "registry", "repository",
                       "authorization")
        for name in text_fields:
            if value.get(name) is not None and not isinstance(value[name], str):
                raise InvalidRequest("MOUNT_INVALID", f"{name} must be a string")
        for name in ("prefetch_files", "prefetch_blobs"):
            if name in value and not isinstance(value[name], bool):
                raise InvalidRequest("MOUNT_INVALID", f"{name} must be true or false")
        bandwidth = value.get("prefetch_bandwidth")
        if bandwidth is not None and (isinstance(bandwidth, bool) or not isinstance(bandwidth,
                                                                                     int)):
            raise InvalidRequest("MOUNT_INVALID", "prefetch_bandwidth must be an integer")
        spec = cls(
            mountpoint=value["mountpoint"],
            **{name: value.get(name) for name in text_fields},
            prefetch_files=value.get("prefetch_files", True),
            prefetch_blobs=value.get("prefetch_blobs", False),
            prefetch_bandwidth=bandwidth,
        )
        spec.check()
        return spec


@dataclass(frozen=True)
class MountRecord:
    """A mount as kept in the data dir: what, by whom (`node` or `foreground`), which pid."""

    spec: MountSpec
    served_by: str
    pid: int

    def as_json(self) -> dict[str, Any]:
        return {"spec": self.spec.as_json(secrets_too=False), "served_by": self.served_by,
                "pid": self.pid}

    @classmethod
    def from_json(cls, value: Any) -> MountRecord:
        if not isinstance(value, dict):
            raise InvalidRequest("MOUNT_INVALID", "a mount record is not an object")
        served_by, pid = value.get("served_by"), value.get("pid")
        if served_by not in (SERVED_BY_NODE, SERVED_BY_FOREGROUND) or not isinstance(pid, int):
            raise InvalidRequest("MOUNT_INVALID", "a mount record without its server")
        return cls(MountSpec.from_json(value.get("spec")), served_by, pid)


class MountRecords:
    """The mounts recorded in a data dir: `mounts/records/<sha256 of the mount point>.json`."""

    def __init__(self, data_dir: Path) -> None:
        self.directory = data_dir / MOUNTS_DIR / RECORDS_DIR

    def _path(self, mountpoint: str) -> Path:
        name = hashlib.sha256(os.fsencode(mountpoint)).hexdigest()[:32]
        return self.directory / f"{name}.json"

    def save(self, record: MountRecord) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(record.spec.mountpoint)
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        temporary.write_text(json.dumps(record.as_json()) + "\n")
        os.replace(temporary, path)

    def remove(self, mountpoint: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(mountpoint).unlink()

    def get(self, mountpoint: str) -> MountRecord | None:
        return self._read(self._path(mountpoint))

    def _read(self, path: Path) -> MountRecord | None:
        try:
            with open(path, "rb") as file:
                raw = file.read(MAX_RECORD_BYTES + 1)
            if len(raw) > MAX_RECORD_BYTES:
                raise ValueError("too large")
            return MountRecord.from_json(json.loads(raw))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, D7yError) as err:
            log.warning("ignoring the mount record %s: %s", path, err)
            return None

    def all(self) -> list[MountRecord]:
        try:
            paths = sorted(self.directory.glob("*.json"))
        except OSError:
            return []
        return [record for path in paths if (record := self._read(path)) is not None]


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- images -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NydusImage:
    """A resolved Nydus image: where its blobs live, its bootstrap layer, its data blobs."""

    upstream: Upstream
    repository: str
    bootstrap_digest: str
    bootstrap_size: int
    # Blob id (sha256 hex) → size of the data layers.
    blob_sizes: Mapping[str, int] = field(default_factory=dict)


def extract_bootstrap(layer: bytes) -> bytes:
    """`image/image.boot` out of a bootstrap layer (a tar.gz, or a plain tar)."""
    try:
        with tarfile.open(fileobj=io.BytesIO(layer), mode="r:*") as archive:
            for member in archive:
                if member.name.lstrip("./") != BOOTSTRAP_MEMBER:
                    continue
                if not member.isfile():
                    raise RafsError(f"{BOOTSTRAP_MEMBER} in the bootstrap layer is not a file")
                if member.size > MAX_BOOTSTRAP_BYTES:
                    raise RafsError(f"a bootstrap of {member.size} bytes is too big")
                extracted = archive.extractfile(member)
                assert extracted is not None
                return extracted.read()
    except (tarfile.TarError, OSError, EOFError) as err:
        raise RafsError(f"the bootstrap layer is not a readable tar: {err}") from None
    raise RafsError(f"the bootstrap layer holds no {BOOTSTRAP_MEMBER}")


class ImageResolver:
    """Nydus images through the node's registry client and task manager."""

    def __init__(
        self, registry: RegistryClient, tasks: TaskManager, data_dir: Path,
        insecure_registries: tuple[str, ...], platform: Platform | None = None,
        login: RegistryLogin | None = None,
    ) -> None:
        self.registry = registry
        # The node's own registry credentials, for mounts that bring none (`--authorization`).
        self.login = login
        self.tasks = tasks
        self.bootstraps = data_dir / MOUNTS_DIR / BOOTSTRAPS_DIR
        self.insecure = insecure_registries
        self.platform = platform

    def location(self, spec: MountSpec) -> tuple[Upstream, str, str]:
        assert spec.image is not None
        image = parse_image_reference(spec.image)
        if spec.registry is not None:
            upstream = parse_upstream_url(spec.registry, self.insecure, "registry")
        elif image.registry is not None:
            upstream = parse_upstream_url(image.registry, self.insecure, "image")
        else:
            upstream = self.registry.default_upstream
        return upstream, spec.repository or image.repository, image.reference

    def authorizer(
        self, authorization: str | None, upstream: Upstream, repository: str
    ) -> Authorize | None:
        """The node's own credentials for `repository` (`registry_auth`), unless the mount
        brought an `Authorization` of its own or the node has no login."""
        login = self.login
        if authorization or login is None:
            return None

        async def authorize(renew: bool) -> str | None:
            return await login.authorization(upstream, repository, renew=renew)

        return authorize

    async def resolve(self, spec: MountSpec) -> NydusImage:
        upstream, repository, reference = self.location(spec)
        headers = {"Accept": MANIFEST_ACCEPT}
        authorize = self.authorizer(spec.authorization, upstream, repository)
        authorization = spec.authorization or (await authorize(False) if authorize else None)
        if authorization:
            headers["Authorization"] = authorization
        for _depth in range(MAX_INDEX_DEPTH + 1):
            url = RegistryClient.manifest_url(upstream, repository, reference)
            try:
                answer = await self.registry.fetch(
                    "GET", url, headers, max_bytes=MAX_MANIFEST_BYTES
                )
            except UpstreamStatus as err:
                if err.status != 401 or authorize is None:
                    raise
                renewed = await authorize(True)  # a token that expired meanwhile
                headers.pop("Authorization", None)
                if renewed:
                    headers["Authorization"] = renewed
                answer = await self.registry.fetch(
                    "GET", url, headers, max_bytes=MAX_MANIFEST_BYTES
                )
            document = json_object(answer.body, f"manifest of {spec.image}")
            if "manifests" in document and "layers" not in document:
                reference = self._choose(document, spec)
                continue
            return self.nydus_image(document, upstream, repository, spec)
        raise InvalidRequest("MANIFEST_INVALID", f"{spec.image}: indexes nest too deep")

    def _choose(self, document: dict[str, Any], spec: MountSpec) -> str:
        """The index entry for `platform` (default: linux/<this machine>)."""
        if self.platform is None:
            self.platform = default_platform()
        for entry in document.get("manifests") or []:
            if isinstance(entry, dict) and self.platform.matches(entry.get("platform") or {}):
                return Descriptor.parse(entry, "an index entry").digest
        raise InvalidRequest(
            "MANIFEST_UNKNOWN",
            f"{spec.image} has no {self.platform.os}/{self.platform.architecture} image",
            status=404,
        )

    @staticmethod
    def nydus_image(
        document: dict[str, Any], upstream: Upstream, repository: str, spec: MountSpec
    ) -> NydusImage:
        """The image a Nydus manifest describes: its bootstrap layer (by annotation) and its
        data blobs (by media type)."""
        layers = document.get("layers")
        if not isinstance(layers, list) or not layers:
            raise InvalidRequest("MANIFEST_INVALID", f"{spec.image}: no layers")
        bootstrap: tuple[str, int] | None = None
        blobs: dict[str, int] = {}
        for entry in layers:
            layer = Descriptor.parse(entry, "a layer")
            if layer.annotations.get(BOOTSTRAP_ANNOTATION, "").lower() == "true":
                bootstrap = (layer.digest, layer.size)
            elif layer.media_type == BLOB_MEDIA_TYPE:
                blobs[layer.digest.removeprefix("sha256:")] = layer.size
        if bootstrap is None:
            raise InvalidRequest(
                "MANIFEST_INVALID",
                f"{spec.image} is not a Nydus image (no layer annotated {BOOTSTRAP_ANNOTATION})",
            )
        return NydusImage(upstream, repository, bootstrap[0], bootstrap[1], blobs)

    async def bootstrap(
        self, image: NydusImage, authorization: str | None, authorize: Authorize | None = None
    ) -> Path:
        """The bootstrap file of the image in the data dir (fetched and extracted once)."""
        hex_digest = image.bootstrap_digest.removeprefix("sha256:")
        path = self.bootstraps / f"{hex_digest}.boot"
        if path.exists():
            return path
        if image.bootstrap_size > MAX_BOOTSTRAP_LAYER_BYTES:
            raise RafsError(f"a bootstrap layer of {image.bootstrap_size} bytes is too big")
        source = self.registry.blob_source(
            image.upstream, image.repository, image.bootstrap_digest, authorization,
            content_length=image.bootstrap_size, authorize=authorize,
        )
        async with self.tasks.open(
            image.bootstrap_digest, source, content_length=image.bootstrap_size,
            sha256=hex_digest, whole=True,
            # As the mirror keeps a blob, so a pull through it finds this task its own.
            attributes={UPSTREAM_ATTRIBUTE: str(image.upstream),
                        REPOSITORY_ATTRIBUTE: image.repository},
        ) as handle:
            layer = await handle.read(0, image.bootstrap_size)
        await asyncio.to_thread(self._write, path, layer)
        return path

    @staticmethod
    def _write(path: Path, layer: bytes) -> None:
        from d7y_node.rafs import open_bootstrap

        data = extract_bootstrap(layer)
        open_bootstrap(data, name=str(path))  # refuse to keep what does not parse
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        temporary.write_bytes(data)
        os.replace(temporary, path)

    def blob_source(
        self, image: NydusImage, authorization: str | None, authorize: Authorize | None = None
    ) -> TaskBlobSource:
        from d7y_node.fuse_mount import TaskBlobSource

        def source(blob_id: str) -> Any:
            return self.registry.blob_source(
                image.upstream, image.repository, f"sha256:{blob_id}", authorization,
                content_length=image.blob_sizes.get(blob_id), authorize=authorize,
            )

        return TaskBlobSource(self.tasks, source, content_lengths=image.blob_sizes)


# -- the manager --------------------------------------------------------------------------------


@dataclass
class ActiveMount:
    spec: MountSpec
    mount: RafsMount
    source: DirectoryBlobSource | TaskBlobSource
    watcher: asyncio.Task[None] | None = None


class MountManager:
    """Mounts served by this process; see the module docstring.

    `resolver` (None: local mounts only) turns image references into a bootstrap and a blob
    source. `served_by` is what records say of this process's mounts.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        resolver: ImageResolver | None = None,
        auth: PeerAuth | None = None,
        served_by: str = SERVED_BY_NODE,
        handover: Handover | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.records = MountRecords(data_dir)
        self.resolver = resolver
        self.auth = auth
        self.served_by = served_by
        # A keeper of FUSE connections (`fuse_handover.py`): mounts outlive a killed node and
        # the next one serves them on (running users keep their open files).
        self.handover = handover
        self._mounts: dict[str, ActiveMount] = {}
        self._busy: set[str] = set()
        self._closing = False
        self._advertised = False

    # -- life -----------------------------------------------------------------------------------

    async def clean_stale(self) -> list[str]:
        """Unmount the recorded mount points whose server is gone (a crash leaves them
        ENOTCONN) and forget their records; the mount points cleaned. Mounts of a foreground
        command still running are left alone."""
        cleaned: list[str] = []
        for record in self.records.all():
            mountpoint = record.spec.mountpoint
            if mountpoint in self._mounts:
                continue
            if (record.pid != os.getpid() and record.served_by == SERVED_BY_FOREGROUND
                    and _process_alive(record.pid)):
                continue
            try:
                if await self._clean(mountpoint):
                    log.warning("%s: unmounted a mount left by a server that is gone", mountpoint)
                    cleaned.append(mountpoint)
            except OSError as err:
                log.warning("%s: cannot clean a stale mount: %s", mountpoint, err)
                continue
            self.records.remove(mountpoint)
        return cleaned

    async def restore(self) -> list[str]:
        """At a node's start: mount again what a node served here before it stopped or crashed
        (the records of its mounts), after cleaning what a dead server left; forget the records
        of dead foreground commands, as `clean_stale` does. The mount points mounted again.

        Credentials are never written to the data dir: an image mount that needed an
        `Authorization` is mounted again with the registry settings of the node's config
        only, and when that is refused its record is dropped (logged)."""
        restored: list[str] = []
        for record in self.records.all():
            mountpoint = record.spec.mountpoint
            # (Not by pid: a node in a container is pid 1 in every life.)
            if mountpoint in self._mounts or record.served_by != SERVED_BY_NODE:
                continue
            try:
                await self.mount(record.spec)
            except (D7yError, OSError) as err:
                log.warning("%s: cannot mount again after the restart: %s", mountpoint, err)
                self.records.remove(mountpoint)
                with contextlib.suppress(OSError):
                    await self._clean(mountpoint)
                continue
            log.info("%s: mounted again after the restart", mountpoint)
            restored.append(mountpoint)
        if self.handover is not None:
            # Connections kept for mounts nobody records any more are ended.
            for mountpoint in await self.handover.held():
                if mountpoint not in self._mounts:
                    await self.handover.detach(mountpoint)
        await self.clean_stale()  # the records of dead foreground commands
        return restored

    async def _clean(self, mountpoint: str) -> bool:
        """Clean a stale mount point without ever asking a mount that no process serves but a
        keeper holds (that would wait forever): with our keeper such a one is detached, without
        it (a foreground command) it is left for the node."""
        if self.handover is not None:
            return await self.handover.clean(mountpoint)
        from d7y_node.fuse_handover import held_by_keeper

        if _normal(mountpoint) in await asyncio.to_thread(held_by_keeper, self.data_dir):
            raise OSError(errno.EBUSY, "a keeper holds it for the node")
        return await fuse_kernel.clean_stale_mount(mountpoint)

    def advertise(self, address: Listen) -> None:
        """Note where this node's peer port listens, for commands given only the data dir."""
        host = address.host if address.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        text = f"[{host}]:{address.port}" if ":" in host else f"{host}:{address.port}"
        directory = self.data_dir / MOUNTS_DIR
        directory.mkdir(parents=True, exist_ok=True)
        temporary = directory / f".{NODE_ADDRESS_FILE}.{secrets.token_hex(4)}.tmp"
        temporary.write_text(text + "\n")
        os.replace(temporary, directory / NODE_ADDRESS_FILE)
        self._advertised = True

    async def close(self) -> None:
        """Unmount every mount of this process (the node's shutdown)."""
        self._closing = True
        for mountpoint in list(self._mounts):
            await self.unmount(mountpoint)
        if self._advertised:  # never another node's (a start that found the dir locked)
            self._advertised = False
            with contextlib.suppress(FileNotFoundError):
                (self.data_dir / MOUNTS_DIR / NODE_ADDRESS_FILE).unlink()

    # -- mounts ---------------------------------------------------------------------------------

    def mounted(self) -> list[MountSpec]:
        return [active.spec for active in self._mounts.values()]

    def get(self, mountpoint: str) -> ActiveMount | None:
        return self._mounts.get(mountpoint)

    async def mount(self, spec: MountSpec) -> ActiveMount:
        """Mount and return once the kernel initialised the mount."""
        spec.check()
        mountpoint = _normal(spec.mountpoint)
        if self._closing:
            raise D7yError("the node is shutting down")
        if mountpoint in self._mounts or mountpoint in self._busy:
            raise InvalidRequest("MOUNT_EXISTS", f"{mountpoint} is already mounted here",
                                 status=409)
        self._busy.add(mountpoint)
        try:
            if self.handover is None and await self._clean(mountpoint):
                log.warning("%s: unmounted a mount left by a server that is gone", mountpoint)
            bootstrap, source = await self._prepare(spec)
            from d7y_node.fuse_mount import RafsMount

            mount = RafsMount(bootstrap, mountpoint, source, spec.options(),
                              handover=self.handover)
            try:
                await mount.__aenter__()
            except BaseException:
                await source.close()
                raise
            active = ActiveMount(spec, mount, source)
            self._mounts[mountpoint] = active
            self.records.save(MountRecord(spec, self.served_by, os.getpid()))
            active.watcher = asyncio.create_task(self._watch(active), name=f"mount {mountpoint}")
            return active
        finally:
            self._busy.discard(mountpoint)

    async def _prepare(
        self, spec: MountSpec
    ) -> tuple[Path, DirectoryBlobSource | TaskBlobSource]:
        if spec.image is None:
            return await asyncio.to_thread(_local_source, spec, self.data_dir)
        if self.resolver is None:
            raise D7yError("image mounts need the node's registry client and piece store")
        image = await self.resolver.resolve(spec)
        authorize = self.resolver.authorizer(spec.authorization, image.upstream, image.repository)
        bootstrap = await self.resolver.bootstrap(image, spec.authorization, authorize)
        return bootstrap, self.resolver.blob_source(image, spec.authorization, authorize)

    async def _watch(self, active: ActiveMount) -> None:
        """Wait for the mount to end (from here or outside), then let go of it."""
        try:
            await active.mount.serve()
        finally:
            await self._release(active)

    async def _release(self, active: ActiveMount) -> None:
        mountpoint = active.mount.mountpoint
        if self._mounts.get(mountpoint) is not active:
            return
        del self._mounts[mountpoint]
        try:
            await active.mount.close()
        finally:
            await active.source.close()
            self.records.remove(mountpoint)
            log.info("unmounted %s", mountpoint)

    async def unmount(self, mountpoint: str) -> bool:
        """End a mount of this process; False if it has none there."""
        active = self._mounts.get(_normal(mountpoint))
        if active is None:
            return False
        await active.mount.unmount()
        await self._release(active)
        if active.watcher is not None and active.watcher is not asyncio.current_task():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await active.watcher
        return True

    # -- routes ---------------------------------------------------------------------------------

    def register(self, app: web.Application) -> None:
        app.router.add_get(MOUNTS_PATH, self._list)
        app.router.add_post(MOUNTS_PATH, self._mount)
        app.router.add_delete(MOUNTS_PATH, self._unmount)

    def _refusal(self, request: web.Request, body: bytes) -> web.Response | None:
        if not is_loopback(request):
            return _error(403, "UNAUTHORIZED", "mounts are made for loopback clients only")
        if self.auth is not None:
            reason = self.auth.check(request.method, request.raw_path,
                                     request.headers.get(AUTH_HEADER), body)
            if reason is not None:
                return _error(401, "UNAUTHORIZED", f"refused: {reason} signature")
        return None

    async def _list(self, request: web.Request) -> web.Response:
        refusal = self._refusal(request, b"")
        if refusal is not None:
            return refusal
        return web.json_response(
            {"mounts": [spec.as_json(secrets_too=False) for spec in self.mounted()]}
        )

    async def _mount(self, request: web.Request) -> web.Response:
        body = await request.read()
        refusal = self._refusal(request, body)
        if refusal is not None:
            return refusal
        try:
            spec = MountSpec.from_json(json.loads(body or b"null"))
            active = await self.mount(spec)
        except ValueError:
            return _error(400, "MOUNT_INVALID", "the body is not JSON")
        except InvalidRequest as err:
            return _error(err.status, err.code, err.message)
        except UpstreamStatus as err:
            return _error(502, "ORIGIN_REFUSED", f"the registry answered {err.status}")
        except (D7yError, OSError) as err:
            return _error(500, "MOUNT_FAILED", str(err))
        return web.json_response({"mountpoint": active.mount.mountpoint})

    async def _unmount(self, request: web.Request) -> web.Response:
        refusal = self._refusal(request, b"")
        if refusal is not None:
            return refusal
        mountpoint = request.query.get("mountpoint", "")
        if not os.path.isabs(mountpoint):
            return _error(400, "MOUNT_INVALID", "mountpoint must be an absolute path")
        if not await self.unmount(mountpoint):
            return _error(404, "MOUNT_UNKNOWN", f"this node serves no mount at {mountpoint}")
        return web.json_response({"mountpoint": mountpoint})


def _normal(path: str) -> str:
    """An absolute path as `RafsMount` names its mount point."""
    return os.path.abspath(path)


def _local_source(
    spec: MountSpec, data_dir: Path | None = None
) -> tuple[Path, DirectoryBlobSource]:
    from d7y_node.fuse_mount import DirectoryBlobSource

    assert spec.bootstrap is not None and spec.blob_dir is not None
    if not os.path.isfile(spec.bootstrap):
        raise InvalidRequest("MOUNT_INVALID", f"no bootstrap file {spec.bootstrap}")
    if not os.path.isdir(spec.blob_dir):
        raise InvalidRequest("MOUNT_INVALID", f"no blob directory {spec.blob_dir}")
    if data_dir is not None:
        inlined = _inlined_bootstrap(Path(spec.bootstrap), data_dir)
        if inlined is not None:
            bootstrap, blob_id = inlined
            return bootstrap, DirectoryBlobSource(spec.blob_dir, {blob_id: spec.bootstrap})
    return Path(spec.bootstrap), DirectoryBlobSource(spec.blob_dir)


def _inlined_bootstrap(path: Path, data_dir: Path) -> tuple[Path, str] | None:
    """When `path` is a data blob with its bootstrap inlined (`rafs.inlined`), that bootstrap
    extracted into the data dir (once per content) and the id its blob table gives `path`;
    None when `path` is a bootstrap itself (or no blob with one inlined: the mount says why)."""
    from d7y_node.rafs.blob import FileReader
    from d7y_node.rafs.inlined import is_bootstrap, read_inlined_bootstrap

    with FileReader(path) as reader:
        if is_bootstrap(reader):
            return None
        inlined = read_inlined_bootstrap(reader, name=str(path))
    if inlined is None:
        return None
    digest = hashlib.sha256(inlined.bootstrap).hexdigest()
    target = data_dir / MOUNTS_DIR / BOOTSTRAPS_DIR / f"inlined-{digest}.boot"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        temporary.write_bytes(inlined.bootstrap)
        os.replace(temporary, target)
    return target, inlined.blob_id


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"code": code, "message": message}, status=status)


# -- the command's side -------------------------------------------------------------------------


def node_running(data_dir: Path) -> bool:
    """Whether a node holds the data dir's lock."""
    path = data_dir / LOCK_FILE
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError:
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def find_node(data_dir: Path, peer: str | None, configured: str) -> str | None:
    """The base URL of the node to ask: `--peer` if given; else, when a node runs on the data
    dir, the address it noted there; else None.

    The data dir's lock is also held by a foreground image mount (it opens the piece store
    itself), which notes no address: then there is no node to ask. A node notes its address
    as soon as its peer port listens; `configured` (the settings' peer address) is for one
    caught in between."""
    if peer is not None:
        return f"http://{peer}"
    if not node_running(data_dir):
        return None
    try:
        noted = (data_dir / MOUNTS_DIR / NODE_ADDRESS_FILE).read_text().strip()
    except FileNotFoundError:
        return None
    except OSError:
        noted = ""
    return f"http://{noted or configured}"


def _call(base: str, method: str, path: str, body: bytes, auth: PeerAuth | None,
          timeout: float) -> tuple[int, dict[str, Any]]:
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json"} if body else {}
    if auth is not None:
        headers[AUTH_HEADER] = auth.sign(method, path, body)
    request = urllib.request.Request(base + path, data=body or None, method=method,
                                     headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        try:
            answer = json.loads(error.read())
        except (ValueError, OSError):
            answer = {}
        return error.code, answer if isinstance(answer, dict) else {}
    except OSError as error:
        raise NodeUnreachable(f"cannot reach the node at {base}: "
                              f"{getattr(error, 'reason', error)}") from None


def request_mount(base: str, spec: MountSpec, auth: PeerAuth | None) -> None:
    """Have the node at `base` serve the mount; returns once it is ready."""
    body = json.dumps(spec.as_json()).encode()
    status, answer = _call(base, "POST", MOUNTS_PATH, body, auth, MOUNT_REQUEST_TIMEOUT_SECONDS)
    if status != 200:
        raise D7yError(f"the node could not mount: {answer.get('message') or status}")


def request_unmount(base: str, mountpoint: str, auth: PeerAuth | None) -> bool:
    """Have the node end its mount at `mountpoint`; False if it serves none there."""
    path = f"{MOUNTS_PATH}?{urllib.parse.urlencode({'mountpoint': mountpoint})}"
    status, answer = _call(base, "DELETE", path, b"", auth, UNMOUNT_REQUEST_TIMEOUT_SECONDS)
    if status == 404:
        return False
    if status != 200:
        raise D7yError(f"the node could not unmount: {answer.get('message') or status}")
    return True


# A foreground server asked to stop gets this long to unmount and exit before the mount is
# detached from outside.
FOREGROUND_STOP_SECONDS = 10.0


def unmount_directly(data_dir: Path, mountpoint: str) -> None:
    """Unmount without a node (a foreground mount, or one a dead server left).

    A live foreground server is asked to stop (SIGTERM, as nydusd is): it unmounts and exits on
    its own, instead of waiting for the kernel to tell it that a detached mount is gone."""
    record = MountRecords(data_dir).get(mountpoint)
    if (
        record is not None
        and record.served_by == SERVED_BY_FOREGROUND
        and record.pid != os.getpid()
        and _process_alive(record.pid)
    ):
        os.kill(record.pid, signal.SIGTERM)
        deadline = time.monotonic() + FOREGROUND_STOP_SECONDS
        while time.monotonic() < deadline and fuse_kernel.is_mount_point(mountpoint):
            time.sleep(0.05)
        if not fuse_kernel.is_mount_point(mountpoint):
            MountRecords(data_dir).remove(mountpoint)
            return
    try:
        fuse_kernel.unmount(mountpoint, lazy=True)
    except OSError as err:
        if err.errno == errno.EINVAL:
            MountRecords(data_dir).remove(mountpoint)
            raise D7yError(f"{mountpoint} is not mounted") from None
        raise D7yError(f"cannot unmount {mountpoint}: {err.strerror or err}") from None
    MountRecords(data_dir).remove(mountpoint)


async def serve_foreground(
    spec: MountSpec, config: NodeConfig, *, ready: Callable[[], None] | None = None
) -> None:
    """Serve the mount in this process until it is unmounted (SIGINT/SIGTERM unmount it), as
    nydusd does. An image mount opens the data dir's piece store itself (no node may run)."""
    from d7y_node.metrics import Metrics
    from d7y_node.node import DataDirLock
    from d7y_node.piece_store import PieceStore

    data_dir = config.store.data_dir
    loop = asyncio.get_running_loop()
    stack = contextlib.AsyncExitStack()
    async with stack:
        resolver = None
        if spec.image is not None:
            lock = DataDirLock(data_dir)
            lock.acquire()
            stack.callback(lock.release)
            # No node runs here now: an address one noted before a crash is stale.
            with contextlib.suppress(FileNotFoundError):
                (data_dir / MOUNTS_DIR / NODE_ADDRESS_FILE).unlink()
            metrics = Metrics()
            store = PieceStore(config.store, metrics)
            await store.open()
            stack.push_async_callback(store.close)
            tasks = TaskManager(store, config.tasks, metrics)
            await tasks.start()
            stack.push_async_callback(tasks.close)
            registry = RegistryClient(config.registry, metrics)
            stack.push_async_callback(registry.close)
            from d7y_node.registry_auth import Credentials, RegistryLogin

            resolver = ImageResolver(
                registry, tasks, data_dir, config.registry.insecure_registries,
                login=RegistryLogin(registry, Credentials.of(config.registry.auth_file)),
            )
        else:
            data_dir.mkdir(parents=True, exist_ok=True)
        manager = MountManager(data_dir, resolver=resolver, served_by=SERVED_BY_FOREGROUND)
        stack.push_async_callback(manager.close)
        await manager.clean_stale()
        active = await manager.mount(spec)
        stopping = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stopping.set)
            stack.callback(loop.remove_signal_handler, signum)
        if ready is not None:
            ready()
        assert active.watcher is not None
        stop = asyncio.create_task(stopping.wait())
        await asyncio.wait({active.watcher, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        await manager.unmount(active.mount.mountpoint)


__all__ = [
    "MOUNTS_PATH",
    "ImageResolver",
    "MountManager",
    "MountRecord",
    "MountRecords",
    "MountSpec",
    "NydusImage",
    "extract_bootstrap",
    "find_node",
    "node_running",
    "request_mount",
    "request_unmount",
    "serve_foreground",
    "unmount_directly",
]
