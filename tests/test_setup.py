"""setup.py and `d7y-node setup containerd`: the generated containerd files, the merge into an
existing config.toml (idempotent, other settings and comments kept, backups), and clear errors.

`containerd config default` output is checked when containerd is installed (marked integration):
the merged file must still be read by containerd itself (`containerd config dump`)."""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from d7y_node.config import Listen
from d7y_node.errors import ConfigError
from d7y_node.setup import (
    DEFAULT_HOSTS_DIR,
    ContainerdSetup,
    merge_config,
    merge_hosts,
    mirror_url,
    plan,
    registry_server,
    render,
    write_plan,
)

SOCKET = "/run/d7y-node/snapshotter.sock"
MIRROR = "http://127.0.0.1:65001"
CRI = "io.containerd.grpc.v1.cri"

# A config a user might have: comments, runtimes, an auth entry, metrics, an unrelated plugin.
USER_CONFIG = """\
# my containerd, tuned by hand
version = 2
root = "/srv/containerd"
oom_score = -999

[grpc]
  max_recv_message_size = 16777216  # keep: big manifests

[metrics]
  address = "127.0.0.1:1338"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.9"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = true
  [plugins."io.containerd.grpc.v1.cri".registry.configs."private.example".auth]
    username = "me"
    password = "secret"

[plugins."io.containerd.gc.v1.scheduler"]
  pause_threshold = 0.03
"""


def make_setup(tmp_path: Path, **changes: object) -> ContainerdSetup:
    values: dict[str, object] = {
        "mirror_url": MIRROR, "snapshotter_name": "nydus", "snapshotter_socket": SOCKET,
        "config_path": tmp_path / "config.toml", "hosts_dir": tmp_path / "certs.d",
        "registries": ("docker.io",),
    }
    values.update(changes)
    return ContainerdSetup(**values)  # type: ignore[arg-type]


def load(path: Path) -> dict[str, object]:
    return tomllib.loads(path.read_text())


def dig(table: object, *keys: str) -> object:
    for key in keys:
        assert isinstance(table, dict), f"{key}: not in a table"
        table = table[key]
    return table


# ---- what is generated


def test_mirror_url_turns_a_wildcard_bind_into_loopback() -> None:
    assert mirror_url(Listen("0.0.0.0", 65001)) == "http://127.0.0.1:65001"
    assert mirror_url(Listen("::", 65001)) == "http://[::1]:65001"
    assert mirror_url(Listen("10.1.2.3", 7000)) == "http://10.1.2.3:7000"
    assert mirror_url(Listen("fd00::5", 7000)) == "http://[fd00::5]:7000"


def test_registry_server_is_the_registry_itself_as_fallback() -> None:
    assert registry_server("docker.io", ()) == "https://registry-1.docker.io"
    assert registry_server("quay.io", ()) == "https://quay.io"
    assert registry_server("127.0.0.1:5000", ()) == "http://127.0.0.1:5000"
    assert registry_server("harbor.lan:8080", ("harbor.lan:8080",)) == "http://harbor.lan:8080"


def test_new_config_has_every_setting_containerd_needs(tmp_path: Path) -> None:
    planned = plan(make_setup(tmp_path))
    assert planned.config.old_text is None and planned.restart_needed
    config = tomllib.loads(planned.config.new_text)
    assert config["version"] == 2
    assert dig(config, "proxy_plugins", "nydus") == {"type": "snapshot", "address": SOCKET}
    assert dig(config, "plugins", CRI, "containerd") == {
        "snapshotter": "nydus", "disable_snapshot_annotations": False,
    }
    assert dig(config, "plugins", CRI, "registry", "config_path") == str(tmp_path / "certs.d")


def test_hosts_toml_puts_the_mirror_first_with_pull_and_resolve(tmp_path: Path) -> None:
    planned = plan(make_setup(tmp_path, registries=("docker.io", "127.0.0.1:5000", "docker.io")))
    assert [file.path for file in planned.hosts] == [
        tmp_path / "certs.d" / "docker.io" / "hosts.toml",
        tmp_path / "certs.d" / "127.0.0.1:5000" / "hosts.toml",
    ]
    hub = tomllib.loads(planned.hosts[0].new_text)
    assert hub == {"server": "https://registry-1.docker.io",
                   "host": {MIRROR: {"capabilities": ["pull", "resolve"]}}}
    local = tomllib.loads(planned.hosts[1].new_text)
    assert local["server"] == "http://127.0.0.1:5000"


def test_snapshotter_name_and_socket_come_from_the_setup(tmp_path: Path) -> None:
    planned = plan(make_setup(tmp_path, snapshotter_name="d7y", snapshotter_socket="/x.sock"))
    config = tomllib.loads(planned.config.new_text)
    assert dig(config, "proxy_plugins", "d7y", "address") == "/x.sock"
    assert dig(config, "plugins", CRI, "containerd", "snapshotter") == "d7y"


# ---- merging into what a user has


def test_merge_keeps_every_other_setting_and_comment(tmp_path: Path) -> None:
    setup = make_setup(tmp_path)
    merged = merge_config(USER_CONFIG, setup, tmp_path / "certs.d")
    before, after = tomllib.loads(USER_CONFIG), tomllib.loads(merged.new_text)
    # Our keys changed...
    assert dig(after, "plugins", CRI, "containerd", "snapshotter") == "nydus"
    assert dig(after, "plugins", CRI, "containerd", "disable_snapshot_annotations") is False
    assert dig(after, "proxy_plugins", "nydus", "address") == SOCKET
    # ...and everything else is as it was.
    for key in ("root", "oom_score", "grpc", "metrics"):
        assert after[key] == before[key]
    assert dig(after, "plugins", CRI, "sandbox_image") == "registry.k8s.io/pause:3.9"
    assert dig(after, "plugins", CRI, "containerd", "runtimes") == dig(
        before, "plugins", CRI, "containerd", "runtimes")
    assert dig(after, "plugins", CRI, "registry", "configs") == dig(
        before, "plugins", CRI, "registry", "configs")
    assert dig(after, "plugins", "io.containerd.gc.v1.scheduler") == dig(
        before, "plugins", "io.containerd.gc.v1.scheduler")
    assert "# my containerd, tuned by hand" in merged.new_text
    assert "# keep: big manifests" in merged.new_text
    assert any("snapshotter" in change for change in merged.changes)


def test_write_is_idempotent_and_backs_up_what_it_changes(tmp_path: Path) -> None:
    setup = make_setup(tmp_path)
    setup.config_path.write_text(USER_CONFIG)
    os.chmod(setup.config_path, 0o600)
    moment = datetime.datetime(2026, 11, 28, 10, 0, 0)
    first = plan(setup)
    written = write_plan(first, now=moment)
    assert [entry.path for entry in written] == [file.path for file in first.files]
    backup = written[0].backup
    assert backup == tmp_path / "config.toml.20261128T100000.bak"
    assert backup.read_text() == USER_CONFIG
    assert setup.config_path.stat().st_mode & 0o777 == 0o600  # secrets stay private
    assert written[1].backup is None  # the hosts.toml was new
    text_after_first = setup.config_path.read_text()

    second = plan(setup)
    assert not any(file.changed for file in second.files)
    assert not second.restart_needed
    assert write_plan(second, now=moment) == []
    assert setup.config_path.read_text() == text_after_first
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "certs.d", "config.toml", "config.toml.20261128T100000.bak"]


def test_hosts_change_alone_needs_no_restart(tmp_path: Path) -> None:
    setup = make_setup(tmp_path)
    write_plan(plan(setup))
    again = plan(make_setup(tmp_path, registries=("docker.io", "quay.io")))
    assert not again.config.changed and not again.restart_needed
    assert [file.path.parent.name for file in again.hosts if file.changed] == ["quay.io"]


def test_existing_hosts_toml_keeps_its_server_and_other_hosts_after_ours(tmp_path: Path) -> None:
    path = tmp_path / "hosts.toml"
    old = (
        '# corporate mirror first\nserver = "https://registry.example"\n\n'
        '[host."https://mirror.corp"]\n  capabilities = ["pull"]\n  ca = "/etc/corp.pem"\n'
    )
    merged = merge_hosts(path, old, "registry.example", make_setup(tmp_path))
    hosts = tomllib.loads(merged.new_text)
    assert hosts["server"] == "https://registry.example"
    assert list(hosts["host"]) == [MIRROR, "https://mirror.corp"]
    assert hosts["host"]["https://mirror.corp"] == {"capabilities": ["pull"],
                                                    "ca": "/etc/corp.pem"}
    assert "# corporate mirror first" in merged.new_text
    again = merge_hosts(path, merged.new_text, "registry.example", make_setup(tmp_path))
    assert not again.changed


def test_dockers_packaged_config_gets_the_cri_plugin_enabled(tmp_path: Path) -> None:
    old = ('#   Copyright Docker Inc.\n\ndisabled_plugins = ["cri"]\n\n'
           '#root = "/var/lib/containerd"\n')
    merged = merge_config(old, make_setup(tmp_path), tmp_path / "certs.d")
    config = tomllib.loads(merged.new_text)
    assert config["disabled_plugins"] == []
    assert "version" not in config  # still version 1: its plugins are named by short id
    assert dig(config, "plugins", "cri", "containerd", "snapshotter") == "nydus"
    assert dig(config, "plugins", "cri", "registry", "config_path") == str(tmp_path / "certs.d")


def test_containerd_2_config_uses_the_images_plugin(tmp_path: Path) -> None:
    merged = merge_config("version = 3\n", make_setup(tmp_path), tmp_path / "certs.d")
    images = dig(tomllib.loads(merged.new_text), "plugins", "io.containerd.cri.v1.images")
    assert isinstance(images, dict)
    assert images["snapshotter"] == "nydus" and images["disable_snapshot_annotations"] is False
    assert images["registry"] == {"config_path": str(tmp_path / "certs.d")}


def test_hosts_dir_defaults_to_the_one_the_config_already_names(tmp_path: Path) -> None:
    setup = make_setup(tmp_path, hosts_dir=None)
    setup.config_path.write_text(
        f'version = 2\n[plugins."{CRI}".registry]\n  config_path = "{tmp_path / "mine"}"\n')
    assert plan(setup).hosts[0].path == tmp_path / "mine" / "docker.io" / "hosts.toml"
    fresh = make_setup(tmp_path / "other", hosts_dir=None)
    assert plan(fresh).hosts[0].path == DEFAULT_HOSTS_DIR / "docker.io" / "hosts.toml"


@pytest.mark.parametrize(("text", "message"), [
    ("version = 2\n[plugins\nbroken", "is not valid TOML"),
    ('version = "two"\n', "is not a number"),
    ("version = 9\n", "config version 9"),
    ("version = 2\nproxy_plugins = 5\n", "expected a table"),
    (f'version = 2\n[plugins."{CRI}".registry.mirrors."docker.io"]\n'
     '  endpoint = ["https://m"]\n', "mirrors is set"),
])
def test_unusable_existing_config_is_a_config_error(
    tmp_path: Path, text: str, message: str,
) -> None:
    setup = make_setup(tmp_path)
    setup.config_path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        plan(setup)
    assert setup.config_path.read_text() == text


def test_render_names_each_file_and_its_state(tmp_path: Path) -> None:
    setup = make_setup(tmp_path)
    write_plan(plan(setup))
    shown = render(plan(make_setup(tmp_path, snapshotter_socket="/other.sock")))
    assert f"# ---- {setup.config_path} (changed: " in shown
    assert 'proxy_plugins.nydus.address = "/other.sock"' in shown
    assert "docker.io/hosts.toml (unchanged)" in shown


# ---- the command


def run_setup(*args: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("D7Y_")}
    return subprocess.run(
        [sys.executable, "-m", "d7y_node", "setup", "containerd", *args],
        capture_output=True, text=True, env=environ, timeout=60, check=False,
    )


def test_command_prints_without_writing(tmp_path: Path) -> None:
    result = run_setup("--config-path", str(tmp_path / "config.toml"),
                       "--hosts-dir", str(tmp_path / "certs.d"), "--registry", "quay.io",
                       "--proxy-listen", "0.0.0.0:7001")
    assert result.returncode == 0, result.stderr
    assert '[host."http://127.0.0.1:7001"]' in result.stdout
    assert 'server = "https://quay.io"' in result.stdout
    assert "--write" in result.stdout.splitlines()[-1]
    assert list(tmp_path.iterdir()) == []


def test_command_writes_then_reports_nothing_to_do(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(USER_CONFIG)
    args = ("--write", "--config-path", str(config), "--hosts-dir", str(tmp_path / "certs.d"))
    first = run_setup(*args)
    assert first.returncode == 0, first.stderr
    assert f"updated {config} (backup: " in first.stdout
    assert "containerd must be restarted" in first.stdout
    second = run_setup(*args)
    assert second.returncode == 0, second.stderr
    assert f"unchanged {config}" in second.stdout
    assert "needs no restart" in second.stdout


def test_command_refuses_bad_toml_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("version = 2\n[grpc\n")
    result = run_setup("--write", "--config-path", str(config),
                       "--hosts-dir", str(tmp_path / "certs.d"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"d7y-node: error: {config}: is not valid TOML")
    assert config.read_text() == "version = 2\n[grpc\n"
    assert not (tmp_path / "certs.d").exists()


def test_command_refuses_a_bad_registry_name(tmp_path: Path) -> None:
    result = run_setup("--config-path", str(tmp_path / "c.toml"), "--registry", "a/b")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "d7y-node: error: --registry: 'a/b' is not a registry host[:port]")


def test_command_needs_the_snapshotter_socket_on(tmp_path: Path) -> None:
    result = run_setup("--config-path", str(tmp_path / "c.toml"), "--snapshotter-socket", "off")
    assert result.returncode == 2
    assert result.stderr.startswith("d7y-node: error: --snapshotter-socket: is off")
    assert list(tmp_path.iterdir()) == []


def test_command_uses_the_nodes_socket_setting(tmp_path: Path) -> None:
    socket = tmp_path / "d7y.sock"
    result = run_setup("--config-path", str(tmp_path / "c.toml"),
                       "--snapshotter-socket", str(socket), "--snapshotter-name", "d7y")
    assert result.returncode == 0, result.stderr
    assert f'[proxy_plugins.d7y]\ntype = "snapshot"\naddress = "{socket}"' in result.stdout


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("containerd") is None, reason="containerd is not installed")
def test_containerd_reads_the_merged_default_config(tmp_path: Path) -> None:
    default = subprocess.run(["containerd", "config", "default"], capture_output=True, text=True,
                             check=True, timeout=30).stdout
    setup = make_setup(tmp_path)
    setup.config_path.write_text(default)
    write_plan(plan(setup))
    dumped = subprocess.run(
        ["containerd", "--config", str(setup.config_path), "config", "dump"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert dumped.returncode == 0, dumped.stderr
    config = tomllib.loads(dumped.stdout)
    assert dig(config, "proxy_plugins", "nydus", "address") == SOCKET
    assert dig(config, "plugins", CRI, "containerd", "snapshotter") == "nydus"
    assert dig(config, "plugins", CRI, "containerd", "disable_snapshot_annotations") is False
    assert dig(config, "plugins", CRI, "registry", "config_path") == str(tmp_path / "certs.d")
