"""Credentials for the node's own registry requests: Nydus mounts by image reference (and so the
snapshotter's lazy mounts), with the Docker `config.json` a host already has.

Owns `Credentials` (a user and password per registry host, read from a Docker-style
`config.json`: `auths.HOST.auth` as base64 `user:password`, or `username` and `password`; an
`identitytoken` entry, which needs an OAuth exchange, is skipped with a warning),
`parse_challenge` (RFC 7235 `WWW-Authenticate`), and `RegistryLogin`, which answers "what
`Authorization` do I send to this repository": it pings `/v2/` once per registry to learn its
challenge, then
- `Bearer realm=… service=…`: gets a token for `repository:NAME:pull` from the realm (the
  distribution spec's token flow), with Basic credentials when it has some for the host and
  anonymously otherwise (public images on Docker Hub need such a token too), and keeps it until
  shortly before it expires;
- `Basic`: sends the host's credentials;
- no challenge (the registry answers 200): sends nothing.

Never used for the mirror's clients: a proxied request carries only its client's own
`Authorization` (proxy.py), so a client without credentials never gets in with the node's.
Credentials and tokens are never logged. Does not send requests itself beyond the ping and the
token request (`RegistryClient`), nor know which requests need it (mounts.py asks).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yarl import URL

from d7y_node.config import read_json_file
from d7y_node.errors import ConfigError, UpstreamUnavailable
from d7y_node.registry import RegistryClient, Upstream

log = logging.getLogger(__name__)

# What a registry's challenge is remembered for (a registry does not change its scheme often).
CHALLENGE_TTL_SECONDS = 300.0
# A token is renewed this long before it expires, and lives this long when the answer says not
# (the distribution spec's default).
TOKEN_MARGIN_SECONDS = 10.0
DEFAULT_TOKEN_SECONDS = 60.0
MAX_TOKEN_ANSWER_BYTES = 64 * 1024
MAX_CONFIG_BYTES = 1024 * 1024
# Names Docker uses for Docker Hub in `config.json`, all meaning its registry host.
DOCKER_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io",
                   "registry-1.docker.io")
DOCKER_HUB_HOST = "registry-1.docker.io"

_PARAMETER = re.compile(r'\s*([A-Za-z][A-Za-z0-9_.-]*)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,"]*)\s*,?')


@dataclass(frozen=True)
class Login:
    """One host's user and password."""

    username: str
    password: str = field(repr=False)

    def basic(self) -> str:
        secret = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(secret).decode("ascii")


class Credentials:
    """Logins by registry host, from a Docker-style `config.json` (absent file: none)."""

    @classmethod
    def of(cls, path: Path | None) -> Credentials:
        """`load(path)`, or none without a path."""
        return cls.load(path) if path is not None else cls()

    def __init__(self, logins: Mapping[str, Login] | None = None) -> None:
        self._logins = dict(logins or {})

    @classmethod
    def load(cls, path: Path) -> Credentials:
        """The logins in `path`; none when it does not exist. Raises `ConfigError` when it
        exists but is not a Docker config (not JSON, `auths` not a map, a bad `auth`)."""
        if not path.exists():
            return cls()
        document = read_json_file(path, "registry_auth_file", MAX_CONFIG_BYTES)
        auths = document.get("auths", {}) if isinstance(document, dict) else None
        if not isinstance(auths, dict):
            raise ConfigError("registry_auth_file", f"{path}: `auths` is not a map")
        logins: dict[str, Login] = {}
        for key, entry in auths.items():
            if not isinstance(entry, dict):
                raise ConfigError("registry_auth_file", f"{path}: auths.{key} is not a map")
            login = _login(entry, f"{path}: auths.{key}")
            if login is not None:
                logins[_host_of(str(key))] = login
        return cls(logins)

    def get(self, host: str) -> Login | None:
        host = host.lower()
        if host in DOCKER_HUB_KEYS:
            host = DOCKER_HUB_HOST
        return self._logins.get(host)

    def __len__(self) -> int:
        return len(self._logins)


def _login(entry: Mapping[str, Any], where: str) -> Login | None:
    identity = entry.get("identitytoken")
    username, password = entry.get("username"), entry.get("password")
    encoded = entry.get("auth")
    if isinstance(encoded, str) and encoded:
        try:
            decoded = base64.b64decode(encoded, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise ConfigError("registry_auth_file", f"{where}.auth is not base64 text") from None
        username, separator, password = decoded.partition(":")
        if not separator:
            raise ConfigError("registry_auth_file", f"{where}.auth is not user:password")
    if isinstance(username, str) and isinstance(password, str) and username:
        return Login(username=username, password=password)
    if isinstance(identity, str) and identity:
        log.warning("%s: identity tokens are not supported; requests go without credentials",
                    where)
    return None  # an entry for a credential helper, or empty: nothing to send


def _host_of(key: str) -> str:
    """`https://host:port/v1/` or `host:port` → `host:port` (Docker Hub's names → its host)."""
    if key.lower() in DOCKER_HUB_KEYS:
        return DOCKER_HUB_HOST
    if "://" in key:
        parsed = URL(key)
        host = parsed.host or ""
        return f"{host}:{parsed.port}" if parsed.explicit_port else host
    return key.split("/", 1)[0].lower()


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lower case: "bearer", "basic", or "" when the registry asked for nothing
    parameters: Mapping[str, str]


def parse_challenge(header: str) -> Challenge:
    """The first challenge of a `WWW-Authenticate` value: `Bearer realm="…",service="…"`."""
    scheme, _, rest = header.strip().partition(" ")
    parameters: dict[str, str] = {}
    position = 0
    while position < len(rest):
        match = _PARAMETER.match(rest, position)
        if match is None or match.end() == position:
            break
        name, value = match.group(1).lower(), match.group(2)
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        parameters.setdefault(name, value)
        position = match.end()
    return Challenge(scheme.lower(), parameters)


class RegistryLogin:
    """The `Authorization` for the node's own requests to a repository (see the module doc)."""

    def __init__(
        self, client: RegistryClient, credentials: Credentials,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.credentials = credentials
        self._clock = clock
        # host → (when learned, challenge)
        self._challenges: dict[str, tuple[float, Challenge]] = {}
        # (host, repository, actions) → (expires at, Authorization value)
        self._tokens: dict[tuple[str, str, str], tuple[float, str]] = {}
        self._locks: dict[tuple[str, str, str], asyncio.Lock] = {}

    async def authorization(
        self, upstream: Upstream, repository: str, actions: str = "pull", *, renew: bool = False
    ) -> str | None:
        """What to send as `Authorization` to `repository` on `upstream` (None: nothing).
        `renew` forgets what was known first (the registry refused it). Raises
        `UpstreamStatus` when the token server refuses, `UpstreamUnavailable` when it cannot
        be reached or answers nonsense."""
        key = (upstream.host, repository, actions)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            if renew:
                self._tokens.pop(key, None)
                self._challenges.pop(upstream.host, None)
            held = self._tokens.get(key)
            if held is not None and self._clock() < held[0]:
                return held[1]
            challenge = await self._challenge(upstream)
            login = self.credentials.get(upstream.host)
            if challenge.scheme == "basic":
                return login.basic() if login is not None else None
            if challenge.scheme != "bearer":
                return None
            token, lifetime = await self._token(challenge, repository, actions, login)
            value = f"Bearer {token}"
            self._tokens[key] = (self._clock() + max(0.0, lifetime - TOKEN_MARGIN_SECONDS), value)
            return value

    async def _challenge(self, upstream: Upstream) -> Challenge:
        known = self._challenges.get(upstream.host)
        if known is not None and self._clock() - known[0] < CHALLENGE_TTL_SECONDS:
            return known[1]
        response = await self.client.request("GET", upstream.base_url / "v2" / "", {})
        try:
            header = response.headers.get("WWW-Authenticate", "")
            status = response.status
        finally:
            response.close()
        challenge = parse_challenge(header) if status == 401 and header else Challenge("", {})
        self._challenges[upstream.host] = (self._clock(), challenge)
        return challenge

    async def _token(
        self, challenge: Challenge, repository: str, actions: str, login: Login | None
    ) -> tuple[str, float]:
        realm = challenge.parameters.get("realm", "")
        try:
            url = URL(realm)
        except ValueError:
            url = URL()
        if url.scheme not in ("http", "https") or not url.host:
            raise UpstreamUnavailable(f"the registry's token realm {realm!r} is not a URL")
        query = dict(url.query)
        if "service" in challenge.parameters:
            query["service"] = challenge.parameters["service"]
        query["scope"] = f"repository:{repository}:{actions}"
        headers = {"Authorization": login.basic()} if login is not None else {}
        answer = await self.client.fetch(
            "GET", url.with_query(query), headers, max_bytes=MAX_TOKEN_ANSWER_BYTES
        )
        return _token_of(answer.body, url.host or "")


def _token_of(body: bytes, host: str) -> tuple[str, float]:
    try:
        answer = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        answer = None
    if not isinstance(answer, dict):
        raise UpstreamUnavailable(f"the token server {host} answered something not JSON")
    token = answer.get("token") or answer.get("access_token")
    if not isinstance(token, str) or not token or any(c in token for c in "\r\n "):
        raise UpstreamUnavailable(f"the token server {host} answered without a token")
    lifetime = answer.get("expires_in")
    seconds = float(lifetime) if isinstance(lifetime, int | float) and lifetime > 0 else None
    return token, seconds if seconds is not None else DEFAULT_TOKEN_SECONDS
