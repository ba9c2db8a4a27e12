"""Child processes for tests: free ports, readiness polling, start/stop with a captured log.

Owns the mechanics every harness module shares; does not know what any program is for.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

# A stopped program gets this long after SIGTERM before SIGKILL: graceful shutdowns here flush
# small metadata files, which takes well under a second on a healthy machine.
STOP_GRACE_SECONDS = 15.0
# How often readiness checks poll: fast enough not to add visible latency to a test.
POLL_INTERVAL_SECONDS = 0.05
# How much of a log is shown when a test fails: the end is where the error is.
LOG_TAIL_BYTES = 20_000


# prctl(2) option: the signal a child gets when the thread that started it dies.
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it if the test process dies without its teardown."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def free_port(host: str = "127.0.0.1", kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    """A port (TCP, or UDP with `kind=SOCK_DGRAM`) nothing uses right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def wait_until(
    condition: Callable[[], bool], *, timeout: float, what: str,
    alive: Callable[[], bool] | None = None,
) -> None:
    """Poll `condition` until it holds; raise TimeoutError naming `what` otherwise.

    `alive` (if given) is checked too, so a child that died is reported at once, not after the
    whole timeout.
    """
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return
        if alive is not None and not alive():
            raise RuntimeError(f"{what}: the process exited before it was ready")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not ready after {timeout:.0f}s")
        time.sleep(POLL_INTERVAL_SECONDS)


def http_status(url: str, *, timeout: float = 2.0) -> int | None:
    """The status of a GET to `url`, or None when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as error:
        return error.code
    except (OSError, ValueError):
        return None


def tail(path: Path, limit: int = LOG_TAIL_BYTES) -> str:
    """The last `limit` bytes of a log file, as text ('' when it does not exist)."""
    try:
        with path.open("rb") as log:
            log.seek(0, os.SEEK_END)
            size = log.tell()
            log.seek(max(0, size - limit))
            return log.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


class ManagedProcess:
    """One child process whose stdout and stderr go to a log file; stopped on `stop()`."""

    def __init__(
        self, argv: Sequence[str], *, log_path: Path, cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self.cwd = cwd
        self.env = dict(env) if env is not None else None
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the child; its output is appended to the log (restarts keep earlier runs)."""
        if self.running:
            raise RuntimeError(f"{self.argv[0]} is already running")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"\n===== start: {' '.join(self.argv)}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.cwd, env=self.env, start_new_session=True, preexec_fn=_die_with_parent,
            )

    @property
    def pid(self) -> int:
        if self.popen is None:
            raise RuntimeError("not started")
        return self.popen.pid

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def stop(self, *, grace: float = STOP_GRACE_SECONDS) -> int | None:
        """SIGTERM, then SIGKILL after `grace`; returns the exit code (None if never started)."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.popen.returncode

    def kill(self) -> None:
        """SIGKILL the child at once (a crash, as the kernel's OOM killer would do it)."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.kill()
        self.popen.wait(timeout=STOP_GRACE_SECONDS)

    def log_tail(self) -> str:
        return tail(self.log_path)


def run(
    argv: Sequence[str], *, timeout: float, check: bool = True, input_bytes: bytes | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion; on failure raise with its output, so a test shows why."""
    completed = subprocess.run(
        list(argv), capture_output=True, timeout=timeout, input=input_bytes,
        env=dict(env) if env is not None else None, check=False,
    )
    result = subprocess.CompletedProcess(
        completed.args, completed.returncode,
        completed.stdout.decode("utf-8", "replace"), completed.stderr.decode("utf-8", "replace"),
    )
    if check and result.returncode != 0:
        raise CommandFailed(result)
    return result


class CommandFailed(RuntimeError):
    """A command run by the harness exited non-zero; the message carries its output."""

    def __init__(self, result: subprocess.CompletedProcess[str]) -> None:
        super().__init__(
            f"{' '.join(map(str, result.args))} exited {result.returncode}\n"
            f"--- stdout\n{result.stdout[-LOG_TAIL_BYTES:]}\n"
            f"--- stderr\n{result.stderr[-LOG_TAIL_BYTES:]}"
        )
        self.result = result
