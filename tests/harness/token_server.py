"""A Bearer token server for the CNCF registry's `auth.token` mode, as the distribution spec says.

Owns a key pair and self-signed certificate made with `openssl`, the `/token` endpoint that checks
Basic credentials and issues RS256 JWTs granting the requested `repository:NAME:ACTIONS` scopes,
and a count of the tokens it issued. The registry trusts the certificate through `rootcertbundle`;
each JWT carries it in its `x5c` header. Signing uses `openssl dgst`, so no JWT library is needed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from tests.harness.background import BackgroundApp
from tests.harness.process import run

# Tokens live long enough for one pull of the big image on a slow machine, not for a whole session.
TOKEN_LIFETIME_SECONDS = 600
# Clock skew allowance for `nbf`: the registry rejects a token used before its `nbf`.
NOT_BEFORE_SKEW_SECONDS = 30
COMMAND_TIMEOUT_SECONDS = 60.0


def base64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class SigningKey:
    """An RSA key and its self-signed certificate, both PEM files."""

    key_path: Path
    cert_path: Path

    @classmethod
    def generate(cls, directory: Path) -> SigningKey:
        directory.mkdir(parents=True, exist_ok=True)
        key_path = directory / "token-signing.key"
        cert_path = directory / "token-signing.crt"
        run(
            [
                "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256",
                "-days", "2", "-subj", "/CN=d7y-test-token-issuer",
                "-keyout", str(key_path), "-out", str(cert_path),
            ],
            timeout=COMMAND_TIMEOUT_SECONDS,
        )
        return cls(key_path, cert_path)

    def certificate_der_base64(self) -> str:
        """The certificate's DER in standard base64, the form JWT `x5c` entries take."""
        lines = self.cert_path.read_text().splitlines()
        body = "".join(line for line in lines if line and not line.startswith("-----"))
        return body


class TokenServer:
    """Issues registry tokens to one user; anonymous or wrong credentials get 401."""

    def __init__(
        self, *, key: SigningKey, service: str, issuer: str, username: str, password: str,
    ) -> None:
        self.key = key
        self.service = service
        self.issuer = issuer
        self.username = username
        self.password = password
        self.issued = 0
        self.refused = 0
        app = web.Application()
        app.router.add_get("/token", self._token)
        self._server = BackgroundApp(app, "token-server")

    @property
    def realm(self) -> str:
        return f"{self._server.url}/token"

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        self._server.stop()

    def _authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return user == self.username and password == self.password

    async def _token(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            self.refused += 1
            return web.json_response(
                {"errors": [{"code": "UNAUTHORIZED", "message": "bad or missing credentials"}]},
                status=401, headers={"WWW-Authenticate": 'Basic realm="d7y-test-token"'},
            )
        access: list[dict[str, object]] = []
        for scope in request.query.getall("scope", []):
            # repository:NAME:ACTION[,ACTION]; NAME may contain ':' only in a port, never here.
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind and name and actions:
                access.append({"type": kind, "name": name, "actions": actions.split(",")})
        token = await self.sign(access)
        self.issued += 1
        return web.json_response(
            {"token": token, "access_token": token, "expires_in": TOKEN_LIFETIME_SECONDS,
             "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        )

    async def sign(self, access: list[dict[str, object]]) -> str:
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.key.certificate_der_base64()]}
        claims = {
            "iss": self.issuer, "sub": self.username, "aud": self.service,
            "exp": now + TOKEN_LIFETIME_SECONDS, "nbf": now - NOT_BEFORE_SKEW_SECONDS,
            "iat": now, "jti": f"{now}-{self.issued}", "access": access,
        }
        signing_input = (
            base64url(json.dumps(header).encode()) + "." + base64url(json.dumps(claims).encode())
        )
        process = await asyncio.create_subprocess_exec(
            "openssl", "dgst", "-sha256", "-sign", str(self.key.key_path),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        signature, error = await process.communicate(signing_input.encode())
        if process.returncode != 0:
            raise RuntimeError(f"openssl dgst failed: {error.decode(errors='replace')}")
        return signing_input + "." + base64url(signature)
