"""The `d7y-node` command line.

Owns argument parsing and the mapping of errors to exit codes with one clear line on stderr.
Every node setting's flag comes from the one option table in `config.py`, so a key added there is
at once a flag, an environment variable and a YAML key. Does not run services itself (`node.py`).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
import yaml

from d7y_node import __version__
from d7y_node.config import (
    OPTIONS,
    NodeConfig,
    docker_config_path,
    load_config,
    parse_optional,
    parse_path,
)
from d7y_node.errors import ConfigError, D7yError

# Exit codes: 2 for a usage or configuration mistake (as typer/click use), 1 for a failure at run
# time.
EXIT_CONFIG = 2
EXIT_FAILURE = 1

REPEATABLE = {"insecure_registry", "join", "label"}

app = typer.Typer(
    name="d7y-node",
    help="One process per host: a P2P registry mirror with a durable, verified piece store.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def with_node_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give `command` a `--config FILE` option and one flag per setting in `OPTIONS`.

    The command receives `config_file` and a keyword per option key (None when not given).
    """
    parameters = [
        inspect.Parameter(
            "config_file", inspect.Parameter.KEYWORD_ONLY,
            annotation=Optional[Path],  # noqa: UP045 - typer reads this annotation at run time
            default=typer.Option(None, "--config", metavar="FILE",
                                 help="YAML file with settings (keys as below, _ or -)"),
        )
    ]
    for key, option in OPTIONS.items():
        annotation: Any = Optional[list[str]] if key in REPEATABLE else Optional[str]  # noqa: UP045
        parameters.append(inspect.Parameter(
            key, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
            default=typer.Option(None, option.flag, help=f"{option.help} [env {option.env}]",
                                 metavar=option.metavar, show_default=False),
        ))
    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    return command


def resolve(config_file: Path | None, flags: dict[str, Any]) -> NodeConfig:
    return load_config(file=config_file, flags=flags)


@app.command()
@with_node_options
def start(config_file: Path | None = None, **flags: Any) -> None:
    """Run the node: the registry mirror, the piece store and the peer port."""
    config = resolve(config_file, flags)
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # aiohttp logs every client disconnect at INFO/ERROR; only our own logger speaks at info.
    logging.getLogger("aiohttp").setLevel(max(logging.WARNING, logging.root.level))
    # grpclib's HTTP/2 header codec logs every header of every snapshotter call at DEBUG.
    logging.getLogger("hpack").setLevel(max(logging.WARNING, logging.root.level))

    import uvloop

    from d7y_node.node import Node  # the services import only when a node really runs

    node = Node(config)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(node.run_until_signalled())


@app.command("config")
@with_node_options
def show_config(config_file: Path | None = None, **flags: Any) -> None:
    """Print the effective configuration (flags > D7Y_* environment > file > defaults)."""
    config = resolve(config_file, flags)
    typer.echo(yaml.safe_dump(config.as_dict(), sort_keys=False), nl=False)


# `status` gives up on a node that does not answer within this long (it answers from memory).
STATUS_TIMEOUT_SECONDS = 5.0


def status_url(config: NodeConfig, peer: str | None) -> str:
    """The running node's `/status`: `--peer HOST:PORT`, else its configured peer address
    (loopback when it listens on every address)."""
    if peer is None:
        host, port = config.peer_listen.host, config.peer_listen.port
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        peer = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"http://{peer}/status"


def format_status(status: dict[str, Any]) -> str:
    """Members and local tasks as two plain tables."""
    lines = [f"member {status.get('member_id')} (gossip {status.get('gossip_address')})", ""]
    lines.append(f"{'MEMBER':<28} {'ADDRESS':<22} {'STATE':<8} {'SLOTS':>5}  LABELS")
    for member in status.get("members", []):
        labels = ",".join(f"{k}={v}" for k, v in sorted(member.get("labels", {}).items()))
        marker = "*" if member.get("self") else " "
        lines.append(
            f"{marker}{member['id']:<27} {member['address']:<22} {member['state']:<8} "
            f"{member['load']['free_upload_slots']:>5}  {labels or '-'}"
        )
    lines += ["", f"{'TASK':<24} {'SIZE':>12} {'PROGRESS':>8} {'ORIGIN':>12} {'P2P':>12}  PARENTS"]
    for task in status.get("tasks", []):
        count = task["piece_count"] or 1
        progress = "done" if task["complete"] else f"{100 * task['pieces_done'] // count}%"
        name = task["task_id"]
        short = name if len(name) <= 24 else name[:21] + "..."
        lines.append(
            f"{short:<24} {task['content_length']:>12} {progress:>8} {task['origin_bytes']:>12} "
            f"{task['peer_bytes']:>12}  {','.join(task['parents']) or '-'}"
        )
    return "\n".join(lines)


def status(config_file: Path | None = None, **flags: Any) -> None:
    """Show the running node's members and tasks (read from its peer port)."""
    import json
    import urllib.error
    import urllib.request

    from d7y_node.peer import AUTH_HEADER

    as_json = bool(flags.pop("json", False))
    base, auth = _node_client(config_file, flags)
    url = f"{base}/status"
    request = urllib.request.Request(url)
    if auth is not None:
        request.add_header(AUTH_HEADER, auth.sign("GET", "/status"))
    try:
        with urllib.request.urlopen(request, timeout=STATUS_TIMEOUT_SECONDS) as response:
            body = json.loads(response.read())
    except (OSError, ValueError) as err:
        raise D7yError(f"cannot read the node's status at {url}: {err}") from None
    typer.echo(json.dumps(body, indent=2) if as_json else format_status(body))


def _add_status_options(command: Callable[..., None]) -> Callable[..., None]:
    """`--peer HOST:PORT` and `--json`, besides the node options `status` reads its address
    from."""
    signature = inspect.signature(command)
    extra = [
        inspect.Parameter(
            "peer", inspect.Parameter.KEYWORD_ONLY,
            annotation=Optional[str],  # noqa: UP045 - typer reads this annotation at run time
            default=typer.Option(None, "--peer", metavar="HOST:PORT",
                                 help="the node's peer address (default: from its settings)"),
        ),
        inspect.Parameter(
            "json", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
            default=typer.Option(False, "--json", help="print the raw JSON"),
        ),
    ]
    command.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*signature.parameters.values(), *extra]
    )
    return command


app.command("status")(_add_status_options(with_node_options(status)))


def _node_client(config_file: Path | None, flags: dict[str, Any]) -> tuple[str, Any]:
    """The running node's peer-port base URL (`--peer`, else its settings) and the request
    signer when a cluster key is set (`--secret-file`): (base, PeerAuth | None)."""
    from d7y_node.node import read_cluster_key
    from d7y_node.peer import PeerAuth

    peer = flags.pop("peer", None)
    config = resolve(config_file, flags)
    key = read_cluster_key(config.cluster)
    return status_url(config, peer).removesuffix("/status"), (
        PeerAuth(key) if key is not None else None
    )


def _command_options(
    command: Callable[..., None], leading: list[inspect.Parameter]
) -> Callable[..., None]:
    """`leading` (arguments and the command's own options) before the node options."""
    signature = inspect.signature(with_node_options(command))
    peer = inspect.Parameter(
        "peer", inspect.Parameter.KEYWORD_ONLY,
        annotation=Optional[str],  # noqa: UP045 - typer reads this annotation at run time
        default=typer.Option(None, "--peer", metavar="HOST:PORT",
                             help="the node's peer address (default: from its settings)"),
    )
    command.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*leading, peer, *signature.parameters.values()]
    )
    return command


def get(url: str, config_file: Path | None = None, **flags: Any) -> None:
    """Fetch URL through the running node and its cluster into -o FILE.

    URL: any http(s) URL; a registry blob URL
    (http(s)://REGISTRY/v2/NAME/blobs/sha256:HEX); or
    REGISTRY/NAME@sha256:HEX. `-o -` writes to stdout.

    Signature query parameters (Expires, Signature, X-Amz-*,
    X-Goog-*, Key-Pair-Id, Policy, Azure SAS) do not change
    which content a URL names.

    A plain URL without --digest is complete once all its bytes
    arrived; with --digest they must hash to it.
    """
    from d7y_node.fetch import download

    output = flags.pop("output")
    digest = flags.pop("digest", None)
    base, auth = _node_client(config_file, flags)
    download(base, url, output, digest=digest, auth=auth)


app.command("get")(_command_options(get, [
    inspect.Parameter("url", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str,
                      default=typer.Argument(..., metavar="URL")),
    inspect.Parameter(
        "output", inspect.Parameter.KEYWORD_ONLY, annotation=str,
        default=typer.Option(..., "-o", "--output", metavar="FILE",
                             help="where to write (`-` for stdout); written atomically"),
    ),
    inspect.Parameter(
        "digest", inspect.Parameter.KEYWORD_ONLY,
        annotation=Optional[str],  # noqa: UP045 - typer reads this annotation at run time
        default=typer.Option(None, "--digest", metavar="sha256:HEX",
                             help="the content's digest: verified, and names the task"),
    ),
]))


def preheat(image: str, config_file: Path | None = None, **flags: Any) -> None:
    """Resolve IMAGE's manifest and have each blob's home fetch it now.

    Prints one line per blob: digest, size, the host that fetched it."""
    from d7y_node.preheat import preheat as run_preheat

    platform = flags.pop("platform", None)
    base, auth = _node_client(config_file, flags)
    failures = run_preheat(base, image, platform, auth, sys.stdout)
    if failures:
        raise D7yError(f"{failures} blob(s) of {image} could not be fetched")


app.command("preheat")(_command_options(preheat, [
    inspect.Parameter("image", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str,
                      default=typer.Argument(..., metavar="IMAGE_REF")),
    inspect.Parameter(
        "platform", inspect.Parameter.KEYWORD_ONLY,
        annotation=Optional[str],  # noqa: UP045 - typer reads this annotation at run time
        default=typer.Option(None, "--platform", metavar="OS/ARCH[/VARIANT]",
                             help="only this platform of a multi-platform image (default: all)"),
    ),
]))


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


@app.command("convert")
def convert_image(
    source: str = typer.Argument(..., metavar="SOURCE_REF"),
    target: str = typer.Argument(..., metavar="TARGET_REF"),
    compressor: str = typer.Option("zstd", "--compressor", help="zstd, lz4_block or none"),
    chunk_size: int = typer.Option(1 << 20, "--chunk-size", metavar="N",
                                   help="bytes per chunk, a power of two (4 KiB .. 16 MiB)"),
    digester: str = typer.Option("blake3", "--digester", help="blake3 or sha256"),
    platform: Optional[str] = typer.Option(  # noqa: UP045 - typer reads this annotation
        None, "--platform", metavar="OS/ARCH[/VARIANT]",
        help="which image of a multi-platform source (default: linux/<this machine>)"),
    insecure_registry: Annotated[
        Optional[list[str]],  # noqa: UP045 - typer reads this annotation at run time
        typer.Option("--insecure-registry", metavar="HOST:PORT",
                     help="reach this registry over plain HTTP (repeatable; localhost always is)"),
    ] = None,
    registry_auth_file: Optional[str] = typer.Option(  # noqa: UP045 - typer reads this annotation
        None, "--registry-auth-file", metavar="FILE",
        help="Docker config.json with registry logins for the pull and the push "
             "(default $DOCKER_CONFIG/config.json or ~/.docker/config.json; off: none)"),
) -> None:
    """Convert an OCI or Docker image into a Nydus (RAFS v6) image and push it as TARGET_REF."""
    from d7y_node.convert import ConvertOptions, ConvertProgress, convert
    from d7y_node.oci import default_platform
    from d7y_node.preheat import Platform
    from d7y_node.rafs.chunks import Compressor, Digester

    if compressor not in ("zstd", "lz4_block", "none"):
        raise ConfigError("--compressor", f"{compressor!r} is not zstd, lz4_block or none")
    if digester not in ("blake3", "sha256"):
        raise ConfigError("--digester", f"{digester!r} is not blake3 or sha256")
    try:
        chosen = Platform.parse(platform) if platform else default_platform()
    except D7yError as err:
        raise ConfigError("--platform", str(err)) from None
    auth_file = (
        docker_config_path() if registry_auth_file is None
        else parse_optional(parse_path)("--registry-auth-file", registry_auth_file)
    )
    options = ConvertOptions(
        compressor=Compressor(compressor), chunk_size=chunk_size, digester=Digester(digester),
        platform=chosen, insecure_registries=tuple(insecure_registry or ()), auth_file=auth_file,
    )
    try:
        options.writer_options()
    except D7yError as err:
        raise ConfigError("--chunk-size", str(err)) from None

    # A bar per step on a terminal, one line per step elsewhere (both on stderr).
    progress = ConvertProgress(sys.stderr)
    result = asyncio.run(convert(source, target, options, progress=progress))
    typer.echo(result.manifest_digest)


def _mount_target(
    config_file: Path | None, flags: dict[str, Any]
) -> tuple[NodeConfig, str | None, Any]:
    """The node settings, the running node's base URL (None: no node runs on the data dir)
    and the request signer, for `mount` and `umount`."""
    from d7y_node.mounts import find_node
    from d7y_node.node import read_cluster_key
    from d7y_node.peer import PeerAuth

    node = flags.pop("node", None)
    peer = flags.pop("peer", None) or node
    config = resolve(config_file, flags)
    configured = status_url(config, None).removeprefix("http://").removesuffix("/status")
    base = find_node(config.store.data_dir, peer, configured)
    key = read_cluster_key(config.cluster)
    return config, base, PeerAuth(key) if key is not None else None


def mount(arguments: list[str], config_file: Path | None = None, **flags: Any) -> None:
    """Mount a Nydus image (SOURCE: an image reference, fetched through the node) or a local
    bootstrap and blob directory (--bootstrap, --blob-dir) read-only at MOUNTPOINT.

    The node running on this host serves the mount and this returns once it is ready; with
    --foreground, or when no node runs, this command serves it until unmounted (Ctrl-C).
    """
    import dataclasses

    from d7y_node.mounts import MountSpec, request_mount, serve_foreground
    from d7y_node.nydusd_config import load_nydusd_config

    bootstrap, blob_dir = flags.pop("bootstrap", None), flags.pop("blob_dir", None)
    foreground = bool(flags.pop("foreground", False))
    nydusd_config = flags.pop("nydusd_config", None)
    no_prefetch = bool(flags.pop("no_prefetch", False))
    if len(arguments) == 1:
        source, mountpoint = None, arguments[0]
    elif len(arguments) == 2:
        source, mountpoint = arguments
    else:
        raise ConfigError("mount", "expected [SOURCE] MOUNTPOINT")
    if (source is None) == (bootstrap is None and blob_dir is None):
        raise ConfigError("mount", "give SOURCE, or --bootstrap and --blob-dir (not both)")
    if source is None and bootstrap is not None and blob_dir is None:
        # Blobs beside the bootstrap (the bootstrap's own blob, when it is inlined in one).
        blob_dir = str(Path(bootstrap).absolute().parent)
    if source is None and (bootstrap is None or blob_dir is None):
        raise ConfigError("mount", "--bootstrap and --blob-dir go together")
    spec = MountSpec(
        mountpoint=str(Path(mountpoint).absolute()), image=source,
        bootstrap=str(Path(bootstrap).absolute()) if bootstrap else None,
        blob_dir=str(Path(blob_dir).absolute()) if blob_dir else None,
    )
    if nydusd_config is not None:
        settings = load_nydusd_config(nydusd_config)
        for warning in settings.warnings:
            print(f"d7y-node: warning: {warning}", file=sys.stderr)
        changes: dict[str, Any] = {
            name: value for name, value in (
                ("registry", settings.registry), ("repository", settings.repository),
                ("authorization", settings.authorization),
                ("prefetch_files", settings.prefetch_files),
                ("prefetch_blobs", settings.prefetch_blobs),
                ("prefetch_bandwidth", settings.prefetch_bandwidth),
            ) if value is not None
        }
        spec = dataclasses.replace(spec, **changes)
    if no_prefetch:
        spec = dataclasses.replace(spec, prefetch_files=False, prefetch_blobs=False)
    try:
        spec.check()
    except D7yError as err:
        raise ConfigError("mount", str(err)) from None
    config, base, auth = _mount_target(config_file, flags)
    if base is not None and not foreground:
        request_mount(base, spec, auth)
        typer.echo(f"mounted {spec.mountpoint} (served by the node at {base})")
        return

    def ready() -> None:
        print(f"mounted {spec.mountpoint}; serving until unmounted", file=sys.stderr, flush=True)

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve_foreground(spec, config, ready=ready))


def _node_option() -> inspect.Parameter:
    return inspect.Parameter(
        "node", inspect.Parameter.KEYWORD_ONLY,
        annotation=Optional[str],  # noqa: UP045 - typer reads this annotation at run time
        default=typer.Option(None, "--node", metavar="HOST:PORT",
                             help="the node's peer address (as --peer; default: the node "
                                  "running on the data dir)"),
    )


def _optional_path_option(name: str, flag: str, help_text: str) -> inspect.Parameter:
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY,
        annotation=Optional[str],  # noqa: UP045 - typer reads this annotation at run time
        default=typer.Option(None, flag, metavar="PATH", help=help_text),
    )


app.command("mount")(_command_options(mount, [
    inspect.Parameter("arguments", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=list[str],
                      default=typer.Argument(..., metavar="[SOURCE] MOUNTPOINT")),
    _optional_path_option("bootstrap", "--bootstrap",
                          "a local RAFS bootstrap file, or a data blob with the "
                          "bootstrap inlined (its ToC lists image.boot)"),
    _optional_path_option("blob_dir", "--blob-dir",
                          "the directory of the bootstrap's blobs (files named by blob id; "
                          "default: the bootstrap's directory)"),
    _optional_path_option("nydusd_config", "--nydusd-config",
                          "a nydusd JSON config: registry, repo, auth and prefetch apply"),
    _node_option(),
    inspect.Parameter(
        "foreground", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
        default=typer.Option(False, "--foreground",
                             help="serve the mount in this process until unmounted"),
    ),
    inspect.Parameter(
        "no_prefetch", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
        default=typer.Option(False, "--no-prefetch",
                             help="fetch only what is read (no prefetch-table prefetch)"),
    ),
]))


def umount(mountpoint: str, config_file: Path | None = None, **flags: Any) -> None:
    """End a mount made by `d7y-node mount`, served by the node or by a foreground command."""
    from d7y_node.errors import NodeUnreachable
    from d7y_node.mounts import request_unmount, unmount_directly

    config, base, auth = _mount_target(config_file, flags)
    path = str(Path(mountpoint).absolute())
    if base is not None:
        try:
            if request_unmount(base, path, auth):
                return
        except NodeUnreachable as err:
            print(f"d7y-node: warning: {err}; unmounting directly", file=sys.stderr)
    unmount_directly(config.store.data_dir, path)


app.command("umount")(_command_options(umount, [
    inspect.Parameter("mountpoint", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str,
                      default=typer.Argument(..., metavar="MOUNTPOINT")),
    _node_option(),
]))


setup_app = typer.Typer(
    name="setup", help="Configure other programs on this host to use the node.",
    no_args_is_help=True,
)
app.add_typer(setup_app, name="setup")


def setup_containerd(config_file: Path | None = None, **flags: Any) -> None:
    """Print the containerd configuration for this node, or --write it.

    hosts.toml mirrors through the node's proxy; the snapshotter
    proxy plugin on the node's socket; the CRI plugin's snapshotter,
    with snapshot annotations on.

    --write merges into an existing config.toml (other settings and
    comments kept), backs up each file it changes and changes nothing
    when all is set already. It says whether containerd must be
    restarted (only a changed config.toml needs that).
    """
    from d7y_node import setup as containerd_setup

    write = bool(flags.pop("write", False))
    config_path = Path(flags.pop("containerd_config"))
    hosts_dir = flags.pop("hosts_dir", None)
    registries = tuple(flags.pop("registry", None) or containerd_setup.DEFAULT_REGISTRIES)
    name = flags.pop("snapshotter_name")
    config = resolve(config_file, flags)
    if config.snapshotter.socket is None:
        raise ConfigError("--snapshotter-socket",
                          "is off: name the socket the node serves for containerd")
    setup = containerd_setup.ContainerdSetup(
        mirror_url=containerd_setup.mirror_url(config.proxy.listen),
        snapshotter_name=name, snapshotter_socket=str(config.snapshotter.socket),
        config_path=config_path,
        hosts_dir=Path(hosts_dir) if hosts_dir else None, registries=registries,
        insecure_registries=config.registry.insecure_registries,
    )
    planned = containerd_setup.plan(setup)
    if not write:
        typer.echo(containerd_setup.render(planned), nl=False)
        typer.echo("# not written: `d7y-node setup containerd --write` writes these files")
        return
    written = containerd_setup.write_plan(planned)
    for file in planned.files:
        done = next((entry for entry in written if entry.path == file.path), None)
        if done is None:
            typer.echo(f"unchanged {file.path}")
        elif done.backup is None:
            typer.echo(f"created {file.path}")
        else:
            typer.echo(f"updated {file.path} (backup: {done.backup})")
    if planned.restart_needed:
        typer.echo("containerd must be restarted to load the new config.toml "
                   "(e.g. `systemctl restart containerd`)")
    else:
        typer.echo("containerd needs no restart (hosts.toml files are read at every pull)")


def _setup_containerd_options() -> list[inspect.Parameter]:
    def option(name: str, annotation: Any, default: Any) -> inspect.Parameter:
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                 default=default)

    from d7y_node import setup as containerd_setup

    parameters = [
        option("write", bool, typer.Option(
            False, "--write", help="write the files (default: print them)")),
        option("containerd_config", str, typer.Option(
            str(containerd_setup.DEFAULT_CONFIG_PATH), "--config-path", metavar="FILE",
            help="containerd's config.toml")),
        option("hosts_dir", Optional[str], typer.Option(  # noqa: UP045 - read by typer
            None, "--hosts-dir", metavar="DIR",
            help="containerd's registry hosts dir (default: the config_path config.toml "
                 f"names, else {containerd_setup.DEFAULT_HOSTS_DIR})")),
        option("registry", Optional[list[str]], typer.Option(  # noqa: UP045 - read by typer
            None, "--registry", metavar="HOST[:PORT]",
            help="a registry to mirror through the node (repeatable; default: docker.io)")),
        option("snapshotter_name", str, typer.Option(
            containerd_setup.DEFAULT_SNAPSHOTTER_NAME, "--snapshotter-name", metavar="NAME",
            help="the proxy plugin's name (nydus: existing Nydus configurations keep working)")),
    ]
    return parameters


def _with_leading_options(
    command: Callable[..., None], leading: list[inspect.Parameter]
) -> Callable[..., None]:
    """`leading` (the command's own options) before the node options."""
    signature = inspect.signature(with_node_options(command))
    command.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*leading, *signature.parameters.values()]
    )
    return command


setup_app.command("containerd")(
    _with_leading_options(setup_containerd, _setup_containerd_options())
)


def main() -> None:
    """The console script: run the app, turning our errors into one line and an exit code."""
    try:
        app(standalone_mode=True)
    except D7yError as err:
        code = EXIT_CONFIG if isinstance(err, ConfigError) else EXIT_FAILURE
        print(f"d7y-node: error: {err}", file=sys.stderr)
        sys.exit(code)
