"""The real CNCF registry (Debian's `docker-registry`, distribution 2.8) on loopback, and its log.

Owns starting and stopping one registry with storage under a test directory, in one of three auth
modes (none, htpasswd Basic, Bearer token), and reading its access log to count which blobs it
served. Does not build or push images (`images.py`) or run the token server (`token_server.py`).

The registry writes one combined-log line per request to its output:
    127.0.0.1 - - [28/Nov/2026:07:27:41 +0000] "GET /v2/foo/blobs/sha256:… HTTP/1.1" 200 157 "" "ua"
so a blob served is a GET of `/v2/<name>/blobs/<digest>` with status 200 or 206, and the number
after the status is the bytes written.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.harness.process import (
    ManagedProcess,
    free_port,
    http_status,
    run,
    wait_until,
)

REGISTRY_BINARY = "/usr/bin/docker-registry"
HTPASSWD_BINARY = "/usr/bin/htpasswd"
# The registry is up in well under a second; this bounds a slow, loaded CI machine.
START_TIMEOUT_SECONDS = 30.0
# The access log line is written after the response; a request that just finished may lag this long.
LOG_SETTLE_SECONDS = 0.3

_ACCESS_LINE = re.compile(
    r'^\S+ \S+ \S+ \[[^\]]*\] "(?P<method>[A-Z]+) (?P<uri>\S+) HTTP/[0-9.]+" '
    r'(?P<status>\d{3}) (?P<written>\d+|-)(?: "[^"]*" "(?P<agent>[^"]*)")?'
)
_BLOB_PATH = re.compile(r"^/v2/(?P<name>.+)/blobs/(?P<digest>[a-z0-9]+:[a-zA-Z0-9=_-]+)$")


@dataclass(frozen=True)
class BasicAuth:
    """htpasswd (bcrypt) Basic auth with one user."""

    username: str
    password: str


@dataclass(frozen=True)
class TokenAuth:
    """Bearer token auth: the registry sends clients to `realm` and trusts `root_cert_bundle`."""

    realm: str
    service: str
    issuer: str
    root_cert_bundle: Path


@dataclass(frozen=True)
class AccessEntry:
    """One request the registry answered."""

    method: str
    uri: str
    status: int
    written: int
    user_agent: str

    @property
    def path(self) -> str:
        return self.uri.split("?", 1)[0]

    @property
    def blob_digest(self) -> str | None:
        match = _BLOB_PATH.match(self.path)
        return match.group("digest") if match else None

    @property
    def serves_blob(self) -> bool:
        return self.method == "GET" and self.status in (200, 206) and self.blob_digest is not None


class AccessLog:
    """The registry's access log, read on demand; `mark()` lets a test count only what follows."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def entries(self) -> list[AccessEntry]:
        found: list[AccessEntry] = []
        try:
            text = self.path.read_text(errors="replace")
        except FileNotFoundError:
            return found
        for line in text.splitlines():
            match = _ACCESS_LINE.match(line)
            if match:
                written = match.group("written")
                found.append(
                    AccessEntry(
                        match.group("method"), match.group("uri"), int(match.group("status")),
                        0 if written == "-" else int(written), match.group("agent") or "",
                    )
                )
        return found

    def mark(self) -> int:
        """The number of requests logged so far; pass it as `since` to count only later ones."""
        return len(self.entries())

    def settle(self) -> None:
        """Wait until no new line arrived for LOG_SETTLE_SECONDS (requests in flight are logged)."""
        previous = -1
        while True:
            count = self.mark()
            if count == previous:
                return
            previous = count
            time.sleep(LOG_SETTLE_SECONDS)

    def blob_serves(self, since: int = 0) -> list[AccessEntry]:
        """Blob GETs answered 200/206 after `since`."""
        return [entry for entry in self.entries()[since:] if entry.serves_blob]

    def serve_count(self, digest: str, since: int = 0) -> int:
        return sum(1 for entry in self.blob_serves(since) if entry.blob_digest == digest)

    def bytes_served(self, digest: str, since: int = 0) -> int:
        serves = self.blob_serves(since)
        return sum(entry.written for entry in serves if entry.blob_digest == digest)


class Registry:
    """One `docker-registry serve` process on 127.0.0.1 with a free port."""

    def __init__(
        self, work_dir: Path, *, basic: BasicAuth | None = None, token: TokenAuth | None = None,
    ) -> None:
        if basic is not None and token is not None:
            raise ValueError("a registry has one auth mode")
        self.work_dir = work_dir
        self.basic = basic
        self.token = token
        self.port = free_port()
        self.process = ManagedProcess(
            [REGISTRY_BINARY, "serve", str(work_dir / "config.yml")],
            log_path=work_dir / "registry.log",
        )
        self.access_log = AccessLog(self.process.log_path)

    @property
    def host(self) -> str:
        """host:port, as image references and `ns=` name it."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def credentials(self) -> str | None:
        """user:password for clients (skopeo --creds, ctr --user), None without auth."""
        if self.basic is not None:
            return f"{self.basic.username}:{self.basic.password}"
        return None

    def _config(self) -> dict[str, object]:
        config: dict[str, object] = {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.work_dir / "storage")},
                "delete": {"enabled": True},
            },
            "http": {"addr": self.host, "secret": "d7y-test-secret"},
        }
        if self.basic is not None:
            htpasswd = self.work_dir / "htpasswd"
            result = run(
                [HTPASSWD_BINARY, "-Bbn", self.basic.username, self.basic.password], timeout=30.0
            )
            htpasswd.write_text(result.stdout)
            config["auth"] = {"htpasswd": {"realm": "d7y-test", "path": str(htpasswd)}}
        if self.token is not None:
            config["auth"] = {
                "token": {
                    "realm": self.token.realm,
                    "service": self.token.service,
                    "issuer": self.token.issuer,
                    "rootcertbundle": str(self.token.root_cert_bundle),
                }
            }
        return config

    def start(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        (self.work_dir / "config.yml").write_text(yaml.safe_dump(self._config()))
        self.process.start()
        # /v2/ answers 200 without auth and 401 with it: either means it is serving.
        wait_until(
            lambda: http_status(f"{self.url}/v2/") in (200, 401),
            timeout=START_TIMEOUT_SECONDS, what=f"registry on {self.host}",
            alive=lambda: self.process.running,
        )

    def stop(self) -> None:
        self.process.stop()
