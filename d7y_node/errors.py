"""The one error hierarchy of d7y-node.

Every module raises these; each protocol boundary maps them to its own error shape exactly once
(OCI error JSON in `proxy.py`, exit code + one line in `cli.py`). Nothing here knows about HTTP.
"""

from __future__ import annotations

from collections.abc import Mapping


class D7yError(Exception):
    """Base of every error d7y-node raises on purpose."""


class ConfigError(D7yError):
    """A configuration value is wrong; `key` names it the way the user wrote it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


class InvalidRequest(D7yError):
    """A client asked for something malformed (bad name, digest, range, header)."""

    def __init__(self, code: str, message: str, *, status: int = 400) -> None:
        # `code` is the OCI distribution error code (NAME_INVALID, DIGEST_INVALID, ...).
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


class UpstreamUnavailable(D7yError):
    """The origin could not be reached or broke the connection; clients should try elsewhere."""


class UpstreamStatus(D7yError):
    """The origin answered with a status the client must see as it is (401, 403, 404, 429...)."""

    def __init__(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        super().__init__(f"upstream answered {status}")
        self.status = status
        self.headers = dict(headers)
        self.body = body


class TaskFailed(D7yError):
    """A download could not complete; every reader waiting on it gets this."""


class DigestMismatch(TaskFailed):
    """The bytes received do not hash to the content's digest; nothing of them is kept."""


class StoreFull(TaskFailed):
    """The piece store has no room left for this task (disk full or quota reached)."""


class GossipError(D7yError):
    """Something wrong with a gossip packet or stream from another host; it is dropped."""


class MalformedMessage(GossipError):
    """Gossip bytes that do not decode to a valid message (garbage, truncated, out of bounds)."""


class AuthenticationFailed(GossipError):
    """Gossip bytes without a valid cluster-key tag (no key, another key, or tampered)."""


class RafsError(D7yError):
    """A Nydus (RAFS) bootstrap or data blob is malformed, unsupported, or fails verification."""


class PeerFailed(UpstreamUnavailable):
    """A peer could not give what was asked (unreachable, refused, malformed answer); the
    scheduler counts it against that peer and asks another. `peer` names it (id or address)."""

    def __init__(self, peer: str, message: str) -> None:
        super().__init__(f"peer {peer}: {message}")
        self.peer = peer
        self.message = message


class PeerBusy(PeerFailed):
    """A peer has no free upload slot now; try another, or this one after `retry_after` s."""

    def __init__(self, peer: str, retry_after: float) -> None:
        super().__init__(peer, f"no free upload slot, retry after {retry_after:g}s")
        self.retry_after = retry_after


class PieceCorrupt(PeerFailed):
    """A peer's piece does not hash to the xxh3 it came with: that peer is dropped for the task
    and the piece is fetched elsewhere."""


class NodeUnreachable(D7yError):
    """A command could not reach the running node's peer port (refused, timed out)."""


class SnapshotError(D7yError):
    """A containerd snapshots call that cannot be done; `snapshotter.py` maps each subclass to
    the gRPC status containerd turns into its own error (errdefs)."""


class SnapshotNotFound(SnapshotError):
    """No snapshot has that key or name (gRPC NOT_FOUND)."""


class SnapshotAlreadyExists(SnapshotError):
    """A snapshot with that key or name exists already (gRPC ALREADY_EXISTS)."""


class SnapshotFailedPrecondition(SnapshotError):
    """The snapshot is not in a state that allows the call: committing a committed one,
    removing one with children (gRPC FAILED_PRECONDITION)."""


class SnapshotInvalidArgument(SnapshotError):
    """A key, label, filter or field mask that is malformed (gRPC INVALID_ARGUMENT)."""
