"""The nydusd JSON config Nydus users already have, mapped onto a d7y-node mount.

Owns reading that file (`load_nydusd_config`) and deciding, setting by setting, what it means
here (`map_nydusd_config`): the registry backend's `scheme` + `host` name the registry blobs
and manifests come from, `repo` the repository, `auth` the credentials sent there;
`fs_prefetch.enable` turns on prefetching the bootstrap's prefetch table, `prefetch_all` the
whole-blob prefetch, `bandwidth_rate` caps it. A mirror carrying `X-Dragonfly-Registry` was a
Dragonfly in front of that registry: the header names the real upstream (the node is the
mirror now). Everything else (TLS and retry knobs of nydusd's own HTTP client, its blob cache,
its threads) has no meaning for a mount whose chunks go through the node's piece store and
cluster: each such setting gets one warning line naming it, so nothing is ignored silently.

The schema is nydusd's v1 config (`device.backend`, `device.cache`, `mode`, `fs_prefetch`,
...), as its docs (docs/nydusd.md) and `api/src/config.rs` describe it. Does not mount
anything (`mounts.py`) nor talk to registries (`registry.py`).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from d7y_node.config import read_json_file
from d7y_node.errors import ConfigError

# A nydusd config is a few KiB; anything much larger is not one.
MAX_CONFIG_BYTES = 1024 * 1024
# The header by which a Dragonfly mirror learns the registry it stands in front of.
DRAGONFLY_REGISTRY_HEADER = "x-dragonfly-registry"
# Backend types of nydusd; only `registry` names something the node can fetch from.
REGISTRY_BACKEND = "registry"

# Settings with no meaning for a mount served by the node, and why (the warning's reason).
_NOT_APPLICABLE_BACKEND = {
    "skip_verify": "TLS verification follows the node's registry settings",
    "timeout": "the node's registry timeouts apply",
    "connect_timeout": "the node's registry timeouts apply",
    "retry_limit": "the node retries through its cluster and origin",
    "proxy": "the node itself is the P2P proxy",
    "registry_token": "use `auth` (a bearer token is not sent)",
    "blob_url_scheme": "the node follows the registry's redirects itself",
    "blob_redirected_host": "the node follows the registry's redirects itself",
}
_NOT_APPLICABLE_CACHE = {
    "type": "the node's piece store is the cache",
    "config": "the node's piece store is the cache (`work_dir` is not used)",
    "compressed": "the node's piece store keeps blobs as the registry serves them",
    "validate": "every chunk is always verified against its digest",
    "prefetch": "use `fs_prefetch`",
}
_NOT_APPLICABLE_PREFETCH = {
    "threads_count": "prefetch runs on the node's loop",
    "merging_size": "adjacent ranges are always merged",
    "bandwidth_limit": "use `bandwidth_rate`",
}
_NOT_APPLICABLE_TOP = {
    "mode": "the mount always serves files directly",
    "digest_validate": "every chunk is always verified against its digest",
    "iostats_files": "no per-file I/O statistics",
    "enable_xattr": "extended attributes are always served",
    "amplify_io": "sequential reads fetch one chunk ahead",
    "access_pattern": "no access-pattern recording",
    "latest_read_files": "no access-pattern recording",
}


@dataclass(frozen=True)
class NydusdSettings:
    """What a nydusd config means for one mount; None/unset fields keep the node's defaults."""

    # `scheme://host[:port]` of the registry the image and its blobs come from.
    registry: str | None = None
    repository: str | None = None
    # The `Authorization` header value for that registry (`Basic ...` from `auth`).
    authorization: str | None = None
    prefetch_files: bool | None = None
    prefetch_blobs: bool | None = None
    # Bytes per second for the whole-blob prefetch.
    prefetch_bandwidth: int | None = None
    # One line per setting that does not apply here, naming it.
    warnings: tuple[str, ...] = ()


def load_nydusd_config(path: str | Path) -> NydusdSettings:
    """Read and map a nydusd JSON config file; `ConfigError` when it is not one."""
    return map_nydusd_config(read_json_file(path, "--nydusd-config", MAX_CONFIG_BYTES))


def _object(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError("--nydusd-config", f"`{where}` is not an object")
    return value


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError("--nydusd-config", f"`{where}` is not a non-negative number")
    return float(value)


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError("--nydusd-config", f"`{where}` is not true or false")
    return value


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError("--nydusd-config", f"`{where}` is not a string")
    return value


class _Mapper:
    def __init__(self) -> None:
        self.warnings: list[str] = []
        self.fields: dict[str, Any] = {}

    def ignore(self, name: str, reason: str) -> None:
        self.warnings.append(f"nydusd config: `{name}` does not apply: {reason}")

    def settings(self) -> NydusdSettings:
        return NydusdSettings(**self.fields, warnings=tuple(self.warnings))


def map_nydusd_config(document: Any) -> NydusdSettings:
    """The settings a parsed nydusd config (v1 schema) gives a mount, with warnings."""
    top = _object(document, "(the file)")
    mapper = _Mapper()
    for key, value in top.items():
        if key == "device":
            _map_device(mapper, _object(value, "device"))
        elif key == "fs_prefetch":
            _map_prefetch(mapper, _object(value, "fs_prefetch"))
        elif key in _NOT_APPLICABLE_TOP:
            mapper.ignore(key, _NOT_APPLICABLE_TOP[key])
        else:
            mapper.ignore(key, "unknown setting")
    return mapper.settings()


def _map_device(mapper: _Mapper, device: Mapping[str, Any]) -> None:
    for key, value in device.items():
        if key == "backend":
            _map_backend(mapper, _object(value, "device.backend"))
        elif key == "cache":
            cache = _object(value, "device.cache")
            for name in cache:
                reason = _NOT_APPLICABLE_CACHE.get(name, "unknown setting")
                mapper.ignore(f"device.cache.{name}", reason)
        else:
            mapper.ignore(f"device.{key}", "unknown setting")


def _map_backend(mapper: _Mapper, backend: Mapping[str, Any]) -> None:
    kind = backend.get("type")
    config = _object(backend.get("config"), "device.backend.config")
    for key in backend:
        if key not in ("type", "config"):
            mapper.ignore(f"device.backend.{key}", "unknown setting")
    if kind != REGISTRY_BACKEND:
        mapper.ignore(
            "device.backend.type",
            f"{kind!r} is not a registry: chunks come through the node from the image's registry",
        )
        for key in config:
            mapper.ignore(f"device.backend.config.{key}", f"belongs to the {kind!r} backend")
        return
    scheme = "https"
    host: str | None = None
    for key, value in config.items():
        where = f"device.backend.config.{key}"
        if key == "scheme":
            scheme = _text(value, where).lower() or "https"
            if scheme not in ("http", "https"):
                raise ConfigError("--nydusd-config", f"`{where}` is {value!r}, not http or https")
        elif key == "host":
            host = _text(value, where) or None
        elif key == "repo":
            mapper.fields["repository"] = _text(value, where) or None
        elif key == "auth":
            mapper.fields["authorization"] = _authorization(_text(value, where), where)
        elif key == "mirrors":
            _map_mirrors(mapper, value, where)
        elif key in _NOT_APPLICABLE_BACKEND:
            if key in ("timeout", "connect_timeout", "retry_limit"):
                _number(value, where)
            mapper.ignore(where, _NOT_APPLICABLE_BACKEND[key])
        else:
            mapper.ignore(where, "unknown setting")
    if host is not None:
        # A mirror's X-Dragonfly-Registry, read first, names the real upstream; `host` wins.
        mapper.fields["registry"] = f"{scheme}://{host}"


def _authorization(auth: str, where: str) -> str | None:
    """nydusd's `auth` is base64 of `user:password`: sent as HTTP Basic."""
    if not auth:
        return None
    try:
        decoded = base64.b64decode(auth, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError("--nydusd-config", f"`{where}` is not base64") from None
    if b":" not in decoded:
        raise ConfigError("--nydusd-config", f"`{where}` is not base64 of user:password")
    return f"Basic {auth}"


def _map_mirrors(mapper: _Mapper, value: Any, where: str) -> None:
    if not isinstance(value, list):
        raise ConfigError("--nydusd-config", f"`{where}` is not a list")
    for index, entry in enumerate(value):
        mirror = _object(entry, f"{where}[{index}]")
        headers = _object(mirror.get("headers"), f"{where}[{index}].headers")
        upstream = next(
            (str(v) for k, v in headers.items() if k.lower() == DRAGONFLY_REGISTRY_HEADER), None
        )
        if upstream:
            mapper.fields.setdefault("registry", upstream.rstrip("/"))
        host = mirror.get("host", "?")
        mapper.ignore(
            f"{where}[{index}].host",
            f"{host} is not used: the node is the mirror"
            + (f" (its registry {upstream} is)" if upstream else ""),
        )
        for key in mirror:
            if key not in ("host", "headers"):
                mapper.ignore(f"{where}[{index}].{key}", "mirror health checks are the node's")
        for key in headers:
            if key.lower() != DRAGONFLY_REGISTRY_HEADER:
                mapper.ignore(f"{where}[{index}].headers.{key}", "mirror headers are not sent")


def _map_prefetch(mapper: _Mapper, prefetch: Mapping[str, Any]) -> None:
    enabled = True
    for key, value in prefetch.items():
        where = f"fs_prefetch.{key}"
        if key == "enable":
            enabled = _flag(value, where)
            mapper.fields["prefetch_files"] = enabled
        elif key == "prefetch_all":
            mapper.fields["prefetch_blobs"] = _flag(value, where)
        elif key == "bandwidth_rate":
            rate = int(_number(value, where))
            # nydusd treats 0 as "no limit".
            mapper.fields["prefetch_bandwidth"] = rate or None
        elif key in _NOT_APPLICABLE_PREFETCH:
            mapper.ignore(where, _NOT_APPLICABLE_PREFETCH[key])
        else:
            mapper.ignore(where, "unknown setting")
    if not enabled:
        # Prefetch off turns off the whole-blob prefetch too.
        mapper.fields["prefetch_blobs"] = False


__all__ = ["NydusdSettings", "load_nydusd_config", "map_nydusd_config"]
