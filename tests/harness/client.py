"""Plain HTTP clients for tests: one request with exact headers, and raw bytes on a socket.

Owns sending a request and reporting exactly what came back, including a body cut short, so a test
can tell "error status" from "200 with a truncated body". Does not retry or follow redirects.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass

# Requests to the mirror on loopback answer in well under this; a hang fails the test instead.
REQUEST_TIMEOUT_SECONDS = 120.0
# Raw responses are read until the server closes or this much arrives (error bodies are small).
RAW_READ_LIMIT_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Reply:
    """What a server answered: `complete` is False when the body ended before its length."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    complete: bool
    seconds: float

    def header(self, name: str) -> str | None:
        for key, value in self.headers.items():
            if key.lower() == name.lower():
                return value
        return None

    def oci_error_codes(self) -> list[str]:
        """The `code`s of an OCI error body (`{"errors": [{"code": ...}]}`), [] if it is not one."""
        try:
            document = json.loads(self.body)
        except ValueError:
            return []
        if not isinstance(document, dict) or not isinstance(document.get("errors"), list):
            return []
        return [str(error.get("code")) for error in document["errors"] if isinstance(error, dict)]


def request(
    method: str, host: str, path: str, headers: Mapping[str, str] | None = None,
    *, timeout: float = REQUEST_TIMEOUT_SECONDS,
) -> Reply:
    """One request on a new connection; the whole body is read (or as much as arrives)."""
    address, _, port = host.rpartition(":")
    connection = http.client.HTTPConnection(address, int(port), timeout=timeout)
    started = time.monotonic()
    try:
        connection.request(method, path, headers=dict(headers or {}))
        response = connection.getresponse()
        complete = True
        try:
            body = response.read()
        except http.client.IncompleteRead as error:
            body, complete = error.partial, False
        except (ConnectionError, TimeoutError):
            body, complete = b"", False
        return Reply(response.status, dict(response.getheaders()), body, complete,
                     time.monotonic() - started)
    finally:
        connection.close()


@dataclass(frozen=True)
class RawReply:
    """Bytes a server sent back to a raw request; `status` is None when it sent no status line."""

    status: int | None
    data: bytes

    @property
    def body(self) -> bytes:
        return self.data.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in self.data else b""


def raw_request(host: str, payload: bytes, *, timeout: float = 10.0) -> RawReply:
    """Send `payload` as it is and read until the server closes (send `Connection: close`)."""
    address, _, port = host.rpartition(":")
    received = bytearray()
    with socket.create_connection((address, int(port)), timeout=timeout) as connection:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            connection.sendall(payload)
        try:
            while len(received) < RAW_READ_LIMIT_BYTES:
                chunk = connection.recv(65536)
                if not chunk:
                    break
                received += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    status: int | None = None
    first_line = bytes(received).split(b"\r\n", 1)[0].split()
    if len(first_line) >= 2 and first_line[0].startswith(b"HTTP/") and first_line[1].isdigit():
        status = int(first_line[1])
    return RawReply(status, bytes(received))
