"""`d7y-node setup containerd`: the containerd configuration that makes this node its mirror and
snapshotter.

Owns what containerd must be told, and how it is merged into files a user already has:
- `<hosts dir>/<registry>/hosts.toml` per registry: the node's mirror first (pull + resolve), the
  registry itself after it (containerd falls back to it when the node does not answer). Other
  `[host]` entries the file already has stay, after ours.
- `config.toml`: the `[proxy_plugins.<name>]` snapshot plugin on the node's socket; the CRI
  plugin's `snapshotter` and `disable_snapshot_annotations = false` (the CRI labels tell the
  snapshotter which image and layer a snapshot is for); the CRI registry `config_path` (the hosts
  dir); the CRI plugin taken out of `disabled_plugins` (Docker's packaged config disables it).
  Every other setting, comment and table of the file is kept as it was (tomlkit edits in place).

Writing is atomic (temp file + fsync + rename), keeps a timestamped backup of each file it
changes, and changes nothing when everything is already as it should be (so a second run writes
nothing). containerd reads `config.toml` only at start, so a changed `config.toml` needs a restart;
`hosts.toml` files are read at every pull and need none.

The snapshotter is named `nydus` by default: images pulled and containers created by an existing
Nydus setup are recorded by containerd under the snapshotter's name, and kubelet/RuntimeClass
configurations name it too; keeping the name lets d7y-node replace nydus-snapshotter without any
of them changing (the node also listens on nydus-snapshotter's socket path).

Does not own: the node's settings (`config.py`), the snapshotter service (`snapshotter.py`),
restarting containerd.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomlkit
import tomlkit.exceptions
from tomlkit.items import Table

from d7y_node.config import Listen, is_plain_http
from d7y_node.errors import ConfigError, D7yError

DEFAULT_CONFIG_PATH = Path("/etc/containerd/config.toml")
DEFAULT_HOSTS_DIR = Path("/etc/containerd/certs.d")
# See the module docstring: the name existing Nydus configurations use.
DEFAULT_SNAPSHOTTER_NAME = "nydus"
# Docker Hub is where most images come from; others are named with --registry.
DEFAULT_REGISTRIES = ("docker.io",)
# containerd names Docker Hub `docker.io`, but its API lives on another host.
DOCKER_HUB = "docker.io"
DOCKER_HUB_SERVER = "https://registry-1.docker.io"
# What containerd may ask the mirror: blobs and manifests by digest (pull) and tags (resolve);
# never push.
MIRROR_CAPABILITIES = ("pull", "resolve")
# The config format containerd 1.x writes with `containerd config default`.
NEW_CONFIG_VERSION = 2
# Names containerd accepts for the CRI plugin in `disabled_plugins` (v1 short name, v2, and v3's
# image service plugin).
CRI_PLUGIN_NAMES = ("cri", "io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images")
HEADER_COMMENT = "Written by `d7y-node setup containerd`: pulls go through the d7y-node mirror"


@dataclass(frozen=True)
class ContainerdSetup:
    """What to configure: where containerd's files are and what they should point at."""

    # The node's registry mirror as containerd reaches it, e.g. http://127.0.0.1:65001.
    mirror_url: str
    snapshotter_name: str
    snapshotter_socket: str
    config_path: Path
    # None: the `config_path` the existing config.toml names, else DEFAULT_HOSTS_DIR.
    hosts_dir: Path | None
    registries: tuple[str, ...]
    # Registries reached over plain HTTP (besides localhost and loopback addresses).
    insecure_registries: tuple[str, ...] = ()


@dataclass(frozen=True)
class PlannedFile:
    """One file as it is and as it should be; `changes` says what differs, in words."""

    path: Path
    old_text: str | None
    new_text: str
    changes: tuple[str, ...]

    @property
    def changed(self) -> bool:
        return self.old_text != self.new_text


@dataclass(frozen=True)
class Plan:
    """Every file `setup containerd` would write, config.toml first."""

    config: PlannedFile
    hosts: tuple[PlannedFile, ...]

    @property
    def files(self) -> tuple[PlannedFile, ...]:
        return (self.config, *self.hosts)

    @property
    def restart_needed(self) -> bool:
        """containerd reads config.toml only when it starts."""
        return self.config.changed


@dataclass(frozen=True)
class Written:
    """A file `write_plan` replaced, and the backup of what was there (None: it was new)."""

    path: Path
    backup: Path | None


def mirror_url(listen: Listen) -> str:
    """The proxy's address as a local containerd reaches it (a wildcard bind means loopback)."""
    host = listen.host
    if host in ("0.0.0.0", "", "*"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{listen.port}"


def check_registry_name(registry: str) -> str:
    """A `host[:port]` as containerd names registry directories; anything else is a mistake."""
    name = registry.strip()
    if not name or "/" in name or name.startswith(".") or any(c.isspace() for c in name):
        raise ConfigError("--registry", f"{registry!r} is not a registry host[:port]")
    return name


def registry_server(registry: str, insecure: Sequence[str]) -> str:
    """The registry's own URL: containerd's fallback after the mirror."""
    if registry == DOCKER_HUB:
        return DOCKER_HUB_SERVER
    scheme = "http" if is_plain_http(registry, tuple(insecure)) else "https"
    return f"{scheme}://{registry}"


def _parse(path: Path, text: str) -> tuple[dict[str, Any], tomlkit.TOMLDocument]:
    """The file checked by the standard library's strict parser, and tomlkit's editable copy."""
    try:
        parsed = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(str(path), f"is not valid TOML ({err}); fix or move it first") from None
    try:
        document = tomlkit.parse(text)
    except tomlkit.exceptions.TOMLKitError as err:
        raise ConfigError(str(path), f"cannot be edited ({err}); fix or move it first") from None
    return parsed, document


def _table(parent: Any, key: str, where: str, *, super_table: bool = False) -> Any:
    """`parent[key]` as a table, created when missing; a non-table there is an error."""
    if key not in parent:
        parent[key] = tomlkit.table(is_super_table=super_table)
    value = parent[key]
    if not isinstance(value, (Table, dict)):
        raise ConfigError(where, f"{key!r} is a {type(value).__name__}, expected a table")
    return value


class _Editor:
    """Sets keys in a tomlkit document, recording each change as `dotted.key = value`."""

    def __init__(self, document: Any, where: str) -> None:
        self.document = document
        self.where = where
        self.changes: list[str] = []

    def table(self, path: Sequence[str]) -> Any:
        current = self.document
        for index, key in enumerate(path):
            current = _table(current, key, self.where, super_table=index < len(path) - 1)
        return current

    def set(self, path: Sequence[str], key: str, value: Any) -> None:
        table = self.table(path)
        old = table.get(key)
        if old is not None and _plain(old) == value:
            return
        table[key] = value
        dotted = ".".join(_quote_key(part) for part in (*path, key))
        self.changes.append(f"{dotted} = {_show(value)}")


def _plain(value: Any) -> Any:
    unwrap = getattr(value, "unwrap", None)
    return unwrap() if callable(unwrap) else value


def _quote_key(key: str) -> str:
    return key if key.replace("-", "").replace("_", "").isalnum() else f'"{key}"'


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


@dataclass(frozen=True)
class _CriLayout:
    """Where a config version keeps the CRI settings we set."""

    # The table holding `snapshotter` and `disable_snapshot_annotations`.
    snapshotter_table: tuple[str, ...]
    # The table holding the registry's `config_path` (and the old `mirrors`).
    registry_table: tuple[str, ...]


def _cri_layout(version: int, path: Path) -> _CriLayout:
    if version == 1:  # no `version` key: containerd reads it as v1, plugins named by short id
        return _CriLayout(("plugins", "cri", "containerd"), ("plugins", "cri", "registry"))
    if version == 2:  # containerd 1.x
        cri = ("plugins", "io.containerd.grpc.v1.cri")
        return _CriLayout((*cri, "containerd"), (*cri, "registry"))
    if version == 3:  # containerd 2.x: the image settings moved to the images plugin
        images = ("plugins", "io.containerd.cri.v1.images")
        return _CriLayout(images, (*images, "registry"))
    raise ConfigError(str(path), f"config version {version} is not one containerd knows (1-3)")


def existing_hosts_dir(config_text: str | None, path: Path) -> Path | None:
    """The hosts dir the existing config.toml's CRI plugin uses, if it names one."""
    if not config_text or not config_text.strip():
        return None
    parsed, _document = _parse(path, config_text)
    version = parsed.get("version", 1)
    if not isinstance(version, int):
        return None
    table: Any = parsed
    for key in _cri_layout(version, path).registry_table:
        table = table.get(key, {}) if isinstance(table, dict) else {}
    value = table.get("config_path") if isinstance(table, dict) else None
    if isinstance(value, str) and value:
        return Path(value.split(":")[0])  # containerd takes several dirs joined by ':'
    return None


def merge_config(old_text: str | None, setup: ContainerdSetup, hosts_dir: Path) -> PlannedFile:
    """config.toml with our settings merged in; every other setting, table and comment kept."""
    path = setup.config_path
    where = str(path)
    if old_text is None or not old_text.strip():
        parsed: dict[str, Any] = {"version": NEW_CONFIG_VERSION}
        document: Any = tomlkit.document()
        document["version"] = NEW_CONFIG_VERSION
    else:
        parsed, document = _parse(path, old_text)
    version = parsed.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ConfigError(where, f"version = {version!r} is not a number")
    layout = _cri_layout(version, path)
    editor = _Editor(document, where)
    if old_text is None or not old_text.strip():
        editor.changes.append(f"version = {NEW_CONFIG_VERSION}")

    disabled = parsed.get("disabled_plugins")
    if isinstance(disabled, list) and any(name in CRI_PLUGIN_NAMES for name in disabled):
        kept = [name for name in disabled if name not in CRI_PLUGIN_NAMES]
        document["disabled_plugins"] = kept
        editor.changes.append(f"disabled_plugins = {kept} (the CRI plugin enabled)")

    proxy = ("proxy_plugins", setup.snapshotter_name)
    editor.set(proxy, "type", "snapshot")
    editor.set(proxy, "address", setup.snapshotter_socket)

    editor.set(layout.snapshotter_table, "snapshotter", setup.snapshotter_name)
    editor.set(layout.snapshotter_table, "disable_snapshot_annotations", False)

    registry = editor.table(layout.registry_table)
    if registry.get("mirrors"):
        dotted = ".".join(_quote_key(part) for part in layout.registry_table)
        raise ConfigError(
            where,
            f"{dotted}.mirrors is set, and containerd refuses it together with config_path; "
            f"move each mirror to {hosts_dir}/<registry>/hosts.toml and remove it first",
        )
    editor.set(layout.registry_table, "config_path", str(hosts_dir))

    new_text = tomlkit.dumps(document)
    if old_text is None or not old_text.strip():
        new_text = f"# {HEADER_COMMENT} and snapshotter.\n{new_text}"
    tomllib.loads(new_text)  # what we write must parse: a bug here must not reach containerd
    return PlannedFile(path, old_text, new_text if editor.changes else old_text or new_text,
                       tuple(editor.changes))


def merge_hosts(
    path: Path, old_text: str | None, registry: str, setup: ContainerdSetup,
) -> PlannedFile:
    """A registry's hosts.toml with the node's mirror as the first host; the server and any
    other hosts already there are kept (after ours, in their order)."""
    where = str(path)
    if old_text is None or not old_text.strip():
        document: Any = tomlkit.document()
        document.add(tomlkit.comment(f"{HEADER_COMMENT},"))
        document.add(tomlkit.comment("then to the registry itself when the node cannot answer."))
        parsed: dict[str, Any] = {}
    else:
        parsed, document = _parse(path, old_text)
    changes: list[str] = []
    if "server" not in parsed:
        server = registry_server(registry, setup.insecure_registries)
        document["server"] = server
        changes.append(f'server = "{server}"')
    hosts = parsed.get("host", {})
    if not isinstance(hosts, dict):
        raise ConfigError(where, "'host' is not a table")
    ours = dict(hosts.get(setup.mirror_url, {}))
    capabilities = list(ours.get("capabilities", []))
    wanted = [*MIRROR_CAPABILITIES, *(c for c in capabilities if c not in MIRROR_CAPABILITIES)]
    first = next(iter(hosts), None)
    if first != setup.mirror_url or capabilities != wanted:
        changes.append(f'host."{setup.mirror_url}" first, capabilities = {wanted}')
        old_hosts = document.get("host")
        table = tomlkit.table(is_super_table=True)
        entry = tomlkit.table()
        entry["capabilities"] = wanted
        for key, value in ours.items():
            if key != "capabilities":
                entry[key] = value
        table[setup.mirror_url] = entry
        if old_hosts is not None:
            for url in hosts:
                if url != setup.mirror_url:
                    table[url] = old_hosts[url]
            del document["host"]
        document["host"] = table
    new_text = tomlkit.dumps(document)
    tomllib.loads(new_text)
    return PlannedFile(path, old_text, new_text if changes else old_text or new_text,
                       tuple(changes))


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise ConfigError(str(path), "is not UTF-8 text") from None
    except OSError as err:
        raise D7yError(f"cannot read {path}: {err.strerror}") from None


def plan(setup: ContainerdSetup) -> Plan:
    """Read the files as they are and work out what each should become (nothing is written)."""
    if not setup.registries:
        raise ConfigError("--registry", "name at least one registry")
    registries = [check_registry_name(registry) for registry in setup.registries]
    config_text = _read(setup.config_path)
    hosts_dir = setup.hosts_dir
    if hosts_dir is None:
        hosts_dir = existing_hosts_dir(config_text, setup.config_path) or DEFAULT_HOSTS_DIR
    config = merge_config(config_text, setup, hosts_dir)
    hosts = []
    for registry in dict.fromkeys(registries):
        path = hosts_dir / registry / "hosts.toml"
        hosts.append(merge_hosts(path, _read(path), registry, setup))
    return Plan(config, tuple(hosts))


def render(planned: Plan) -> str:
    """The files as they would be written, each under a comment line naming it and its state."""
    parts = []
    for file in planned.files:
        if file.old_text is None:
            state = "new"
        elif file.changed:
            state = "changed: " + "; ".join(file.changes)
        else:
            state = "unchanged"
        parts.append(f"# ---- {file.path} ({state})\n{file.new_text.rstrip()}\n")
    return "\n".join(parts)


def _backup_path(path: Path, now: datetime.datetime) -> Path:
    stamp = now.strftime("%Y%m%dT%H%M%S")
    candidate = path.with_name(f"{path.name}.{stamp}.bak")
    counter = 1
    while candidate.exists():
        candidate = path.with_name(f"{path.name}.{stamp}.{counter}.bak")
        counter += 1
    return candidate


def _write_atomically(path: Path, text: str, mode: int) -> None:
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_plan(planned: Plan, *, now: datetime.datetime | None = None) -> list[Written]:
    """Write every changed file (backing up the old one); unchanged files are left alone."""
    moment = now or datetime.datetime.now()
    written: list[Written] = []
    for file in planned.files:
        if not file.changed:
            continue
        try:
            file.path.parent.mkdir(parents=True, exist_ok=True)
            backup = None
            mode = 0o644
            if file.old_text is not None:
                mode = file.path.stat().st_mode & 0o7777
                backup = _backup_path(file.path, moment)
                _write_atomically(backup, file.old_text, mode)
            _write_atomically(file.path, file.new_text, mode)
        except OSError as err:
            raise D7yError(f"cannot write {file.path}: {err.strerror or err}") from None
        written.append(Written(file.path, backup))
    return written
