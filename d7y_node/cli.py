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
from typing import Any, Optional

import typer
import yaml

from d7y_node import __version__
from d7y_node.config import OPTIONS, NodeConfig, load_config
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

    peer = flags.pop("peer", None)
    as_json = bool(flags.pop("json", False))
    config = resolve(config_file, flags)
    url = status_url(config, peer)
    try:
        with urllib.request.urlopen(url, timeout=STATUS_TIMEOUT_SECONDS) as response:
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


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def main() -> None:
    """The console script: run the app, turning our errors into one line and an exit code."""
    try:
        app(standalone_mode=True)
    except D7yError as err:
        code = EXIT_CONFIG if isinstance(err, ConfigError) else EXIT_FAILURE
        print(f"d7y-node: error: {err}", file=sys.stderr)
        sys.exit(code)
