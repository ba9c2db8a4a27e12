"""A real containerd (Debian 1.6) for one test: its own root, state, socket and registry hosts dir.

Owns the config.toml, starting and stopping `containerd`, `hosts.toml` files that point a registry
at a mirror, and `ctr` calls (pull, run, image listing). Teardown kills the runc shims this
containerd started (found by its unique socket path) and unmounts whatever it left mounted.
Does not know what the mirror is.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness.process import ManagedProcess, run, wait_until

CONTAINERD = "/usr/bin/containerd"
CTR = "/usr/bin/ctr"
# The namespace every test container and image lives in (containerd keeps them apart per namespace).
NAMESPACE = "d7y-test"
START_TIMEOUT_SECONDS = 30.0
# A pull of the big image crosses loopback in seconds; this bounds a slow mirror, so a hang fails.
PULL_TIMEOUT_SECONDS = 240.0
RUN_TIMEOUT_SECONDS = 120.0
# Plugins that cannot work in a test root (no btrfs/zfs/devmapper, no CRI): off, to keep logs clean.
DISABLED_PLUGINS = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
)

# The namespace the CRI plugin keeps Kubernetes images and containers in.
CRI_NAMESPACE = "k8s.io"
CRI_PLUGIN = "io.containerd.grpc.v1.cri"


@dataclass(frozen=True)
class CriSettings:
    """Turns the CRI plugin on (image service only: no CNI, so pods cannot network, which the
    image service does not need): its snapshotter, snapshot labels for remote snapshotters, and
    registry hosts from this daemon's hosts dir."""

    snapshotter: str = "overlayfs"
    # false: the CRI plugin passes the image ref and layer digest labels to the snapshotter.
    disable_snapshot_annotations: bool = False


@dataclass(frozen=True)
class DaemonOptions:
    """What a test changes in the default daemon: the CRI plugin, and snapshotters reached over
    gRPC (`[proxy_plugins.<name>] type = "snapshot"`, name → unix socket path)."""

    cri: CriSettings | None = None
    proxy_snapshotters: Mapping[str, str] = field(default_factory=dict)


def write_mirror_hosts(
    hosts_dir: Path, registry_host: str, mirror_url: str | None, *, registry_scheme: str = "http",
) -> Path:
    """Write `hosts_dir/<registry_host>/hosts.toml`: pull and resolve via `mirror_url` first.

    containerd then asks the mirror `GET /v2/<name>/...?ns=<registry_host>` and falls back to the
    registry itself when the mirror fails. `mirror_url=None` writes the registry alone.
    """
    directory = hosts_dir / registry_host
    directory.mkdir(parents=True, exist_ok=True)
    lines = [f'server = "{registry_scheme}://{registry_host}"', ""]
    if mirror_url is not None:
        lines += [f'[host."{mirror_url}"]', '  capabilities = ["pull", "resolve"]', ""]
    path = directory / "hosts.toml"
    path.write_text("\n".join(lines))
    return path


def _mounts_under(root: Path) -> list[str]:
    mounts: list[str] = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == str(root) or point.startswith(str(root) + "/"):
                mounts.append(point)
    return mounts


class Containerd:
    """One containerd daemon; `ctr` calls go to its socket and use `hosts_dir` for registries."""

    def __init__(self, work_dir: Path, options: DaemonOptions | None = None) -> None:
        self.work_dir = work_dir
        self.options = options if options is not None else DaemonOptions()
        self.root = work_dir / "root"
        self.hosts_dir = work_dir / "certs.d"
        # A unix socket path must fit in 108 bytes; pytest's tmp paths can be longer.
        self.short_dir = Path(tempfile.mkdtemp(prefix="d7y-ctd-"))
        self.state = self.short_dir / "state"
        self.address = str(self.short_dir / "containerd.sock")
        self.process = ManagedProcess(
            [CONTAINERD, "--config", str(work_dir / "config.toml")],
            log_path=work_dir / "containerd.log",
        )

    @property
    def cri_address(self) -> str:
        """The CRI gRPC services share containerd's socket."""
        return self.address

    def _optional_config(self) -> list[str]:
        lines: list[str] = []
        for name, socket_path in self.options.proxy_snapshotters.items():
            lines += [f'[proxy_plugins."{name}"]', '  type = "snapshot"',
                      f'  address = "{socket_path}"']
        cri = self.options.cri
        if cri is not None:
            plugin = f'[plugins."{CRI_PLUGIN}"'
            lines += [
                f"{plugin}]",
                # The sandbox image is never pulled: the tests run no pods.
                '  sandbox_image = "registry.invalid/pause:none"',
                f"{plugin}.containerd]",
                f'  snapshotter = "{cri.snapshotter}"',
                "  disable_snapshot_annotations = "
                f"{str(cri.disable_snapshot_annotations).lower()}",
                f"{plugin}.registry]",
                f'  config_path = "{self.hosts_dir}"',
                f"{plugin}.cni]",
                f'  bin_dir = "{self.work_dir / "cni-bin"}"',
                f'  conf_dir = "{self.work_dir / "cni-conf"}"',
            ]
        return lines

    def _config(self) -> str:
        plugins = [plugin for plugin in DISABLED_PLUGINS
                   if not (plugin == CRI_PLUGIN and self.options.cri is not None)]
        disabled = ", ".join(f'"{plugin}"' for plugin in plugins)
        return "\n".join([
            "version = 2",
            f'root = "{self.root}"',
            f'state = "{self.state}"',
            f"disabled_plugins = [{disabled}]",
            "",
            "[grpc]",
            f'  address = "{self.address}"',
            "[ttrpc]",
            f'  address = "{self.address}.ttrpc"',
            "[debug]",
            '  address = ""',
            '  level = "info"',
            "[metrics]",
            '  address = ""',
            '[plugins."io.containerd.internal.v1.opt"]',
            f'  path = "{self.work_dir / "opt"}"',
            *self._optional_config(),
            "",
        ])

    @property
    def config_path(self) -> Path:
        return self.work_dir / "config.toml"

    def write_config(self) -> Path:
        """Write config.toml as `start()` would (a test may then change it and start with
        `write_config=False`)."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.hosts_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self._config())
        return self.config_path

    def start(self, *, write_config: bool = True) -> None:
        if write_config:
            self.write_config()
        self.process.start()
        wait_until(
            lambda: self.ctr(["version"], check=False).returncode == 0,
            timeout=START_TIMEOUT_SECONDS, what="containerd", alive=lambda: self.process.running,
        )

    def ctr(
        self, arguments: Sequence[str], *, timeout: float = 60.0, check: bool = True,
        namespace: str = NAMESPACE,
    ) -> subprocess.CompletedProcess[str]:
        return run([CTR, "-a", self.address, "-n", namespace, *arguments], timeout=timeout,
                   check=check)

    def pull(
        self, reference: str, *, user: str | None = None, check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """`ctr images pull` with this daemon's hosts dir (registries are plain HTTP here)."""
        arguments = ["images", "pull", "--hosts-dir", str(self.hosts_dir), "--plain-http"]
        if user is not None:
            arguments += ["--user", user]
        return self.ctr([*arguments, reference], timeout=PULL_TIMEOUT_SECONDS, check=check)

    def run_container(self, reference: str, container_id: str, command: Sequence[str] = ()) -> str:
        """`ctr run --rm` the image and return what it printed."""
        result = self.ctr(["run", "--rm", reference, container_id, *command],
                          timeout=RUN_TIMEOUT_SECONDS)
        return result.stdout

    def image_names(self) -> list[str]:
        return self.ctr(["images", "list", "--quiet"]).stdout.split()

    def content_digests(self) -> list[str]:
        lines = self.ctr(["content", "list", "--quiet"]).stdout.split()
        return [line for line in lines if line.startswith("sha256:")]

    def _kill_own_shims(self) -> None:
        """SIGKILL runc shims started by this daemon: their command line names our socket."""
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and b"containerd-shim" in argv[0] and self.address.encode() in argv:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry.name), signal.SIGKILL)

    def stop(self) -> None:
        self.process.stop()
        self._kill_own_shims()
        for root in (self.root, self.state):
            for point in sorted(_mounts_under(root), key=len, reverse=True):
                subprocess.run(["umount", "-l", point], check=False, capture_output=True)
        shutil.rmtree(self.short_dir, ignore_errors=True)
