"""The node's one typed configuration.

Owns parsing and validation of every setting, from four layers with a fixed precedence:
command-line flag > `D7Y_*` environment variable > YAML file (`--config`) > default.
A wrong value raises `ConfigError` naming the key as the user wrote it. Does not start anything.

Each service gets only its own frozen section (`StoreConfig`, `TaskConfig`, ...), so a test can
build one service with a hand-made section.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from d7y_node.errors import ConfigError

ENV_PREFIX = "D7Y_"

DEFAULT_DATA_DIR = Path("/var/lib/d7y-node")
DEFAULT_PROXY_LISTEN = "0.0.0.0:65001"
DEFAULT_PEER_LISTEN = "0.0.0.0:65002"
DEFAULT_REGISTRY_MIRROR = "https://registry-1.docker.io"
DEFAULT_GOSSIP_PORT = 7946
# Two homes per task: home 0 fetches from origin and tracks the swarm, home 1 keeps a copy to
# take over (the scheduler's `DEFAULT_HOME_REPLICAS`).
DEFAULT_HOMES = 2
# At most this many homes: each one more is one more copy of every announce.
MAX_HOMES = 5
# A downloader that has heard from no home, and seen no swarm progress, for this long goes to
# the origin itself: long enough for a home to fetch a first piece from a slow origin, short
# enough that a lost home costs a client little.
DEFAULT_HOME_TIMEOUT = 10.0
# Labels a member may carry (the gossip wire's bound, `LABELS_MAX_COUNT`).
MAX_LABELS = 16
# containerd's snapshots API (snapshotter.py): our socket, and the path Nydus users already have
# in their containerd configuration (nydus-snapshotter's), served too when nothing else does.
DEFAULT_SNAPSHOTTER_SOCKET = Path("/run/d7y-node/snapshotter.sock")
DEFAULT_NYDUS_SOCKET = Path("/run/containerd-nydus/containerd-nydus-grpc.sock")
# sun_path holds 108 bytes with the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107

LOG_LEVELS = ("debug", "info", "warning", "error")

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "ki": 1024, "kib": 1024, "mi": 1024**2, "mib": 1024**2, "gi": 1024**3, "gib": 1024**3,
    "ti": 1024**4, "tib": 1024**4,
}
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


# ---------------------------------------------------------------------------------------------
# Sections handed to the services


@dataclass(frozen=True)
class Listen:
    """A host and port to bind."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class StoreConfig:
    """Where pieces live and when they are collected."""

    data_dir: Path = DEFAULT_DATA_DIR
    # Bytes the store may hold; None means "a share of the disk" (watermarks apply to the disk).
    gc_quota: int | None = None
    # GC starts above high and evicts down to low (fractions of the quota, or of the disk).
    gc_high_watermark: float = 0.8
    gc_low_watermark: float = 0.6
    # Tasks unread for this long are evicted whatever the usage; None keeps them.
    gc_ttl: float | None = 7 * 86400.0
    # How often GC looks; it also runs at once when a write would cross the high watermark.
    gc_interval: float = 60.0

    @property
    def tasks_dir(self) -> Path:
        return self.data_dir / "tasks"


@dataclass(frozen=True)
class TaskConfig:
    """How downloads run."""

    # Concurrent range requests to origin for one task: enough to fill a fast link, few enough
    # not to look like abuse to a registry's CDN.
    origin_concurrency: int = 4
    # A stalled origin read fails after this long without a byte.
    read_timeout: float = 30.0
    # How many times one piece is retried against origin before the task fails.
    piece_retries: int = 3


@dataclass(frozen=True)
class RegistryConfig:
    """How the node talks to origin registries."""

    # Upstream when a request names none.
    default_registry: str = DEFAULT_REGISTRY_MIRROR
    # host[:port] reached with plain HTTP (besides localhost and 127.*, which always are).
    insecure_registries: tuple[str, ...] = ()
    # Connecting to an origin fails after this long, so clients fall back to their next host fast.
    connect_timeout: float = 5.0
    # A whole metadata request (manifest, HEAD) fails after this long.
    request_timeout: float = 30.0
    # A client's credentials that upstream accepted for a repository are trusted this long
    # before upstream is asked again (blobs served from the store still need authorization).
    auth_cache_ttl: float = 300.0
    # Docker-style config.json with the node's own registry logins, for the node's own requests
    # (Nydus mounts by reference, the snapshotter's lazy layers; never a mirror client's);
    # None: no credentials (anonymous tokens are still fetched where a registry wants them).
    auth_file: Path | None = field(default_factory=lambda: docker_config_path())


@dataclass(frozen=True)
class ProxyConfig:
    """The registry mirror endpoint."""

    listen: Listen = Listen("0.0.0.0", 65001)
    # Largest manifest accepted from upstream (the distribution spec's registries use 4 MiB).
    max_manifest_bytes: int = 4 * 1024 * 1024


@dataclass(frozen=True)
class ClusterConfig:
    """Membership and P2P scheduling."""

    # Where the gossip UDP socket binds.
    gossip_listen: Listen = Listen("0.0.0.0", DEFAULT_GOSSIP_PORT)
    # The address other members reach us at; None: the gossip listen address if it is a
    # specific one, else the address of the interface with the default route.
    advertise_addr: str | None = None
    # Members to join (HOST:PORT); a name resolving to several addresses joins them all.
    join: tuple[str, ...] = ()
    # (key, value) pairs announced to the cluster (zone, rack, ...), in the order given.
    labels: tuple[tuple[str, str], ...] = ()
    # The cluster secret: every gossip packet and peer request is authenticated with it.
    secret_file: Path | None = None
    # Homes per task (rendezvous hashing over alive members).
    homes: int = DEFAULT_HOMES
    # No answer from any home (and no progress of the swarm) for this long: go to origin.
    home_timeout: float = DEFAULT_HOME_TIMEOUT
    # This member's id; None: a stable id stored in the data dir on first start.
    node_id: str | None = None


@dataclass(frozen=True)
class SnapshotterConfig:
    """containerd's snapshots API on unix sockets (None turns one off)."""

    # The node's own socket (containerd's `proxy_plugins` address). The default path is served
    # when it is free (another node there: a warning); a path the user set must be free.
    socket: Path | None = DEFAULT_SNAPSHOTTER_SOCKET
    # nydus-snapshotter's socket path, served too when no other process serves it.
    nydus_socket: Path | None = DEFAULT_NYDUS_SOCKET


@dataclass(frozen=True)
class NodeConfig:
    """Everything, as `d7y-node config` prints it."""

    store: StoreConfig = field(default_factory=StoreConfig)
    tasks: TaskConfig = field(default_factory=TaskConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    peer_listen: Listen = Listen("0.0.0.0", 65002)
    log_level: str = "info"
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    snapshotter: SnapshotterConfig = field(default_factory=SnapshotterConfig)
    # Keep each FUSE mount's connection in a keeper process (fuse_handover.py), so that a node
    # killed with kill -9 hands its mounts, and the containers reading them, to its next start.
    # Off by default: a killed node that is never started again leaves mounts that wait for it.
    fuse_handover: bool = False

    def as_dict(self) -> dict[str, Any]:
        """The flat, user-facing form (the same keys as the YAML file)."""
        out: dict[str, Any] = {}
        for key, option in OPTIONS.items():
            out[key] = option.show(option.get(self))
        return out


# ---------------------------------------------------------------------------------------------
# Value parsers: each takes what the user wrote (YAML scalar, env string, flag string).


def parse_listen(key: str, value: Any) -> Listen:
    if not isinstance(value, str):
        raise ConfigError(key, f"expected ADDR:PORT, got {value!r}")
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\[\]]*):(\d+)", value.strip())
    if not m:
        raise ConfigError(key, f"expected ADDR:PORT, got {value!r}")
    host = m.group(1) or m.group(3) or "0.0.0.0"
    port = int(m.group(2) or m.group(4))
    if not 0 < port < 65536:
        raise ConfigError(key, f"port {port} is out of range 1-65535")
    return Listen(host, port)


def parse_size(key: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a size such as 50GiB, got {value!r}")
    if isinstance(value, int):
        size = value
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
        unit = m.group(2).lower() if m else ""
        if not m or unit not in _SIZE_UNITS:
            raise ConfigError(key, f"expected a size such as 50GiB, got {value!r}")
        size = int(float(m.group(1)) * _SIZE_UNITS[unit])
    if size <= 0:
        raise ConfigError(key, "must be more than 0")
    return size


_SWITCH_WORDS = {"on": True, "true": True, "yes": True, "1": True,
                 "off": False, "false": False, "no": False, "0": False}


def parse_switch(key: str, value: Any) -> bool:
    """on/off (also true/false, yes/no, 1/0, or a YAML boolean)."""
    if isinstance(value, bool):
        return value
    word = _SWITCH_WORDS.get(str(value).strip().lower())
    if word is None:
        raise ConfigError(key, f"expected on or off, got {value!r}")
    return word


def parse_duration(key: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a duration such as 30s or 24h, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", str(value).replace(" ", ""))
        rebuilt = "".join(n + u for n, u in parts)
        if not parts or rebuilt != str(value).replace(" ", ""):
            raise ConfigError(key, f"expected a duration such as 30s or 24h, got {value!r}")
        seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise ConfigError(key, "must be more than 0")
    return seconds


def parse_optional(
    parse: Callable[[str, Any], Any],
) -> Callable[[str, Any], Any]:
    """Wrap a parser so that `off`/`none`/`0`/null turn the setting off (None)."""

    def parse_or_none(key: str, value: Any) -> Any:
        if value is None or str(value).strip().lower() in ("off", "none", "0", "false", ""):
            return None
        return parse(key, value)

    return parse_or_none


def parse_fraction(key: str, value: Any) -> float:
    try:
        text = str(value).strip()
        number = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise ConfigError(key, f"expected a fraction such as 0.8 or 80%, got {value!r}") from None
    if not 0 < number <= 1:
        raise ConfigError(key, f"must be between 0 and 1 (or 0% and 100%), got {value!r}")
    return number


def parse_url(key: str, value: Any) -> str:
    text = str(value).strip().rstrip("/")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("",):
        raise ConfigError(key, f"expected a registry URL such as https://registry.example, got "
                               f"{value!r}")
    return text


def parse_host_port(key: str, value: Any) -> str:
    text = str(value).strip().lower()
    if not re.fullmatch(r"(\[[0-9a-f:]+\]|[a-z0-9]([a-z0-9.-]*[a-z0-9])?)(:\d{1,5})?", text):
        raise ConfigError(key, f"expected HOST[:PORT], got {value!r}")
    return text


def parse_host_list(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        items = [v for v in re.split(r"[,\s]+", value) if v]
    elif isinstance(value, list | tuple):
        items = [str(v) for v in value]
    else:
        raise ConfigError(key, f"expected a list of HOST[:PORT], got {value!r}")
    return tuple(parse_host_port(key, v) for v in items)


def parse_join_list(key: str, value: Any) -> tuple[str, ...]:
    """Members to join, each HOST[:PORT] (the gossip port 7946 when none is given)."""
    joined = []
    for item in parse_host_list(key, value):
        if not re.search(r":\d+$", item):
            item = f"{item}:{DEFAULT_GOSSIP_PORT}"
        port = int(item.rsplit(":", 1)[1])
        if not 0 < port < 65536:
            raise ConfigError(key, f"port {port} is out of range 1-65535")
        joined.append(item)
    return tuple(joined)


_LABEL_KEY = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.\-/]{0,62}[A-Za-z0-9])?")
_LABEL_VALUE = re.compile(r"[A-Za-z0-9_.\-/:]{0,128}")


def parse_labels(key: str, value: Any) -> tuple[tuple[str, str], ...]:
    """KEY=VALUE pairs: a list, a comma-separated string, or (in YAML) a mapping."""
    if isinstance(value, Mapping):
        items = [f"{k}={'' if v is None else v}" for k, v in value.items()]
    elif isinstance(value, str):
        items = [v for v in re.split(r"[,\s]+", value) if v]
    elif isinstance(value, list | tuple):
        items = [str(v) for v in value]
    else:
        raise ConfigError(key, f"expected KEY=VALUE labels, got {value!r}")
    labels: dict[str, str] = {}
    for item in items:
        name, equals, text = item.partition("=")
        if not equals or not _LABEL_KEY.fullmatch(name) or not _LABEL_VALUE.fullmatch(text):
            raise ConfigError(key, f"expected KEY=VALUE (letters, digits, _ . - /), got {item!r}")
        labels[name] = text
    if len(labels) > MAX_LABELS:
        raise ConfigError(key, f"at most {MAX_LABELS} labels")
    return tuple(labels.items())


def parse_address(key: str, value: Any) -> str:
    """An IP address or host name other hosts can reach (no port)."""
    text = str(value).strip()
    try:
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        pass
    if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", text):
        raise ConfigError(key, f"expected an IP address or host name, got {value!r}")
    return text


def parse_homes(key: str, value: Any) -> int:
    try:
        number = int(str(value))
    except ValueError:
        raise ConfigError(key, f"expected a whole number, got {value!r}") from None
    if not 1 <= number <= MAX_HOMES:
        raise ConfigError(key, f"must be between 1 and {MAX_HOMES}, got {number}")
    return number


def parse_node_id(key: str, value: Any) -> str:
    text = str(value).strip()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}", text):
        raise ConfigError(key, f"expected 1-128 letters, digits, _ . : -, got {value!r}")
    return text


def parse_log_level(key: str, value: Any) -> str:
    level = str(value).strip().lower()
    if level not in LOG_LEVELS:
        raise ConfigError(key, f"expected one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return level


def read_json_file(path: str | Path, key: str, max_bytes: int) -> Any:
    """The JSON document in `path` (at most `max_bytes` long); `ConfigError` naming `key` when it
    cannot be read, is longer, or is not JSON."""
    try:
        with open(path, "rb") as file:
            raw = file.read(max_bytes + 1)
    except OSError as err:
        raise ConfigError(key, f"cannot read {path}: {err.strerror}") from None
    if len(raw) > max_bytes:
        raise ConfigError(key, f"{path} is larger than {max_bytes} bytes")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError) as err:
        raise ConfigError(key, f"{path} is not JSON: {err}") from None


def docker_config_path(environ: Mapping[str, str] | None = None) -> Path:
    """Where Docker keeps its `config.json`: `$DOCKER_CONFIG`, else `~/.docker`."""
    environ = os.environ if environ is None else environ
    directory = environ.get("DOCKER_CONFIG")
    base = Path(directory) if directory else Path(environ.get("HOME") or "/root") / ".docker"
    return base / "config.json"


def parse_path(key: str, value: Any) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(key, f"expected a path, got {value!r}")
    try:
        return Path(value).expanduser().absolute()
    except RuntimeError:  # "~user" of no such user
        raise ConfigError(key, f"cannot expand {value!r}: no such home directory") from None


def parse_socket_path(key: str, value: Any) -> Path:
    """A unix socket path: absolute once expanded, and short enough for sun_path."""
    path = parse_path(key, value)
    if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
        raise ConfigError(key, f"a unix socket path is at most {MAX_SOCKET_PATH_BYTES} bytes, "
                               f"got {path}")
    return path


# ---------------------------------------------------------------------------------------------
# The options: one row per user-facing key.


@dataclass(frozen=True)
class Option:
    """One user-facing setting: its key, where it lands in `NodeConfig`, and how it parses."""

    key: str  # YAML key; the flag is --key-with-dashes, the env var D7Y_KEY_UPPER
    path: tuple[str, ...]  # attribute path in NodeConfig
    parse: Callable[[str, Any], Any]
    help: str
    metavar: str = "VALUE"

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.key.upper()

    def get(self, config: NodeConfig) -> Any:
        value: Any = config
        for name in self.path:
            value = getattr(value, name)
        return value

    @staticmethod
    def show(value: Any) -> Any:
        if isinstance(value, Path | Listen):
            return str(value)
        if isinstance(value, tuple) and value and all(
            isinstance(item, tuple) and len(item) == 2 for item in value
        ):
            return [f"{name}={text}" for name, text in value]
        if isinstance(value, tuple):
            return list(value)
        return value


def _options() -> dict[str, Option]:
    rows = [
        Option("data_dir", ("store", "data_dir"), parse_path,
               "where pieces and metadata live", "DIR"),
        Option("proxy_listen", ("proxy", "listen"), parse_listen,
               "registry mirror address", "ADDR:PORT"),
        Option("peer_listen", ("peer_listen",), parse_listen,
               "peer HTTP address (also /metrics and /healthz)", "ADDR:PORT"),
        Option("registry_mirror", ("registry", "default_registry"), parse_url,
               "upstream registry when a request names none", "URL"),
        Option("insecure_registry", ("registry", "insecure_registries"), parse_host_list,
               "upstream reached over plain HTTP (repeatable)", "HOST[:PORT]"),
        Option("registry_auth_file", ("registry", "auth_file"), parse_optional(parse_path),
               "Docker config.json with the node's own registry logins, for its Nydus mounts "
               "(default $DOCKER_CONFIG/config.json or ~/.docker/config.json; off: none)",
               "FILE"),
        Option("log_level", ("log_level",), parse_log_level,
               "debug, info, warning or error", "LEVEL"),
        Option("gc_quota", ("store", "gc_quota"), parse_optional(parse_size),
               "bytes the store may hold, e.g. 50GiB (default: watermarks of the disk)", "BYTES"),
        Option("gc_high_watermark", ("store", "gc_high_watermark"), parse_fraction,
               "GC starts above this share of the quota or disk", "FRACTION"),
        Option("gc_low_watermark", ("store", "gc_low_watermark"), parse_fraction,
               "GC evicts down to this share", "FRACTION"),
        Option("gc_ttl", ("store", "gc_ttl"), parse_optional(parse_duration),
               "evict tasks unread this long, e.g. 7d (off to keep them)", "DURATION"),
        Option("gc_interval", ("store", "gc_interval"), parse_duration,
               "how often GC looks", "DURATION"),
        Option("origin_concurrency", ("tasks", "origin_concurrency"), _parse_concurrency,
               "parallel range requests to origin per download", "N"),
        Option("connect_timeout", ("registry", "connect_timeout"), parse_duration,
               "give up connecting to an origin after this long", "DURATION"),
        Option("gossip_listen", ("cluster", "gossip_listen"), parse_listen,
               "gossip (UDP) address", "ADDR:PORT"),
        Option("advertise_addr", ("cluster", "advertise_addr"), parse_optional(parse_address),
               "address other members reach this one at (default: the gossip address, or "
               "the default route's)", "ADDR"),
        Option("join", ("cluster", "join"), parse_join_list,
               "a member to join (repeatable; a name with several addresses joins them all)",
               "HOST[:PORT]"),
        Option("label", ("cluster", "labels"), parse_labels,
               "a label other members see, e.g. zone=a (repeatable)", "KEY=VALUE"),
        Option("secret_file", ("cluster", "secret_file"), parse_optional(parse_path),
               "cluster key file: gossip and peer requests are authenticated with it", "FILE"),
        Option("homes", ("cluster", "homes"), parse_homes,
               "homes per task (home 0 fetches from origin, the next take over)", "N"),
        Option("home_timeout", ("cluster", "home_timeout"), parse_duration,
               "go to origin when no home answers (and the swarm stalls) this long",
               "DURATION"),
        Option("node_id", ("cluster", "node_id"), parse_optional(parse_node_id),
               "this member's id (default: one stored in the data dir)", "ID"),
        Option("snapshotter_socket", ("snapshotter", "socket"),
               parse_optional(parse_socket_path),
               "containerd snapshotter socket (proxy_plugins address); off to not serve it",
               "PATH"),
        Option("nydus_socket", ("snapshotter", "nydus_socket"),
               parse_optional(parse_socket_path),
               "also serve the snapshotter on nydus-snapshotter's socket path when it is free; "
               "off to not", "PATH"),
        Option("fuse_handover", ("fuse_handover",), parse_switch,
               "on: FUSE mounts outlive a killed node and the next start serves them on "
               "(running containers keep working)", "on|off"),
    ]
    return {row.key: row for row in rows}


def _parse_concurrency(key: str, value: Any) -> int:
    try:
        number = int(str(value))
    except ValueError:
        raise ConfigError(key, f"expected a whole number, got {value!r}") from None
    if not 1 <= number <= 64:
        raise ConfigError(key, f"must be between 1 and 64, got {number}")
    return number


OPTIONS: dict[str, Option] = _options()


def _replace_path(config: Any, path: tuple[str, ...], value: Any) -> Any:
    if len(path) == 1:
        return dataclasses.replace(config, **{path[0]: value})
    inner = getattr(config, path[0])
    return dataclasses.replace(config, **{path[0]: _replace_path(inner, path[1:], value)})


def read_config_file(path: Path) -> dict[str, Any]:
    """The YAML file as a mapping of keys (dashes or underscores) to values."""
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError("config", f"cannot read {path}: {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError("config", f"{path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("config", f"{path} must hold a mapping of keys to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def load_config(
    *,
    file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> NodeConfig:
    """Build the effective configuration: flags > environment > file > defaults.

    `flags` holds only what the user gave (None values are ignored); keys are option keys.
    """
    environ = os.environ if environ is None else environ
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if file is not None:
        layers.append(("file", read_config_file(file)))
    layers.append(("env", {
        option.key: environ[option.env] for option in OPTIONS.values() if option.env in environ
    }))
    layers.append(("flag", {k: v for k, v in (flags or {}).items() if v is not None}))

    config = NodeConfig()
    for source, values in layers:
        for key, raw in values.items():
            option = OPTIONS.get(key)
            if option is None:
                raise ConfigError(key, f"unknown setting (from the {source})")
            label = {"file": key, "env": option.env, "flag": option.flag}[source]
            config = _replace_path(config, option.path, option.parse(label, raw))
    return validate(config)


def validate(config: NodeConfig) -> NodeConfig:
    """Checks that span several keys."""
    store = config.store
    if store.gc_low_watermark >= store.gc_high_watermark:
        raise ConfigError("gc_low_watermark", "must be below gc_high_watermark")
    for key, listen in (("proxy_listen", config.proxy.listen), ("peer_listen", config.peer_listen)):
        try:
            ipaddress.ip_address(listen.host)
        except ValueError:
            if not re.fullmatch(r"[A-Za-z0-9.-]+", listen.host):
                raise ConfigError(key, f"{listen.host!r} is not an address or host name") from None
    if config.cluster.gossip_listen.host not in ("0.0.0.0", "::"):
        try:
            ipaddress.ip_address(config.cluster.gossip_listen.host)
        except ValueError:
            raise ConfigError(
                "gossip_listen", f"{config.cluster.gossip_listen.host!r} is not an IP address"
            ) from None
    if config.proxy.listen.port == config.peer_listen.port and (
        config.proxy.listen.host == config.peer_listen.host
        or "0.0.0.0" in (config.proxy.listen.host, config.peer_listen.host)
    ):
        raise ConfigError("peer_listen", "must not use the same port as proxy_listen")
    return config


def is_plain_http(host: str, insecure: tuple[str, ...]) -> bool:
    """Whether an upstream `host[:port]` is reached over plain HTTP, as containerd decides it:
    localhost and loopback addresses always are, others only when listed as insecure."""
    name = host.lower()
    bare = name.rsplit(":", 1)[0] if not name.endswith("]") else name
    bare = bare.strip("[]")
    if bare == "localhost" or bare.startswith("127.") or bare == "::1":
        return True
    return name in insecure or bare in insecure
