"""Tests of `d7y-node get` (`d7y_node.fetch`): URL task ids, and real nodes in one process (as in
test_p2p.py) fetching from a real aiohttp origin on 127.0.0.1 that counts the bytes it sends."""

from __future__ import annotations

import asyncio
import hashlib
import io
import random
import sys
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from unittest import mock

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from d7y_node.errors import D7yError, InvalidRequest
from d7y_node.fetch import (
    GET_PATH,
    FetchService,
    Progress,
    download,
    normalize_url,
    open_node,
    parse_target,
    signed_request,
    url_task_id,
)
from d7y_node.gossip import ClusterKey
from d7y_node.gossip.members import Member
from d7y_node.gossip.messages import Address, Load, MemberState
from d7y_node.node import Node
from d7y_node.peer import PeerAuth, task_key_for
from d7y_node.piece_store import MIB
from d7y_node.scheduler import task_homes
from tests.harness.background import serve_in_loop
from tests.test_p2p import cluster, config_for

# -- task ids ------------------------------------------------------------------------------------


def test_signature_parameters_do_not_change_the_task() -> None:
    base = "https://Bucket.S3.Example.com:443/path/file.tar?b=2&a=1"
    signed = (
        "https://bucket.s3.example.com/path/file.tar?X-Amz-Signature=abc&a=1&X-Amz-Date=2024"
        "&b=2&x-amz-credential=k%2Fx&Expires=99#frag"
    )
    cloudfront = ("https://bucket.s3.example.com/path/file.tar?a=1&b=2&Policy=p&Signature=s"
                  "&Key-Pair-Id=K")
    assert normalize_url(base) == "https://bucket.s3.example.com/path/file.tar?a=1&b=2"
    assert url_task_id(base) == url_task_id(signed) == url_task_id(cloudfront)
    assert url_task_id(base).startswith("url:")
    # A parameter that is not a signature names other content.
    assert url_task_id(base) != url_task_id(base + "&c=3")
    assert url_task_id(base) != url_task_id(base.replace("/file.tar", "/other.tar"))
    # A non-default port stays; so does the scheme.
    assert normalize_url("HTTP://h.example:8080/x") == "http://h.example:8080/x"
    assert url_task_id("http://h.example/x") != url_task_id("https://h.example/x")


def test_azure_sas_names_are_dropped_only_with_a_sas_signature() -> None:
    sas = "https://a.blob.example/c/f?sv=2020&se=2030&sp=r&sig=abc"
    assert normalize_url(sas) == "https://a.blob.example/c/f"
    # Without `sig`, `sp` may be content: it stays.
    assert normalize_url("https://a.example/f?sp=r") == "https://a.example/f?sp=r"


def test_targets() -> None:
    digest = "sha256:" + "ab" * 32
    blob = parse_target(f"http://127.0.0.1:5000/v2/library/busybox/blobs/{digest}", None, ())
    assert (blob.task_id, blob.repository, blob.sha256) == (digest, "library/busybox", "ab" * 32)
    assert blob.attributes() == {"upstream": "http://127.0.0.1:5000",
                                 "repository": "library/busybox"}
    short = parse_target(f"127.0.0.1:5000/library/busybox@{digest}", None, ())
    assert short == blob
    plain = parse_target("https://example.com/f?Expires=1", None, ())
    assert plain.task_id == url_task_id("https://example.com/f")
    assert plain.url == "https://example.com/f?Expires=1"  # the origin gets the signature
    assert plain.sha256 is None
    verified = parse_target("https://example.com/f", digest, ())
    assert (verified.task_id, verified.sha256) == (digest, "ab" * 32)
    for bad in ("ftp://example.com/f", "example.com/f", "https:///nohost"):
        with pytest.raises(InvalidRequest):
            parse_target(bad, None, ())
    with pytest.raises(InvalidRequest):
        parse_target("https://example.com/f", "sha256:nothex", ())


# -- an origin -----------------------------------------------------------------------------------


class Origin:
    """Files over HTTP with HEAD and single `bytes=a-b` ranges, counting bytes and requests."""

    def __init__(self, files: dict[str, bytes], *, delay: float = 0.0) -> None:
        self.files = files
        self.delay = delay
        self.sent = 0
        self.queries: list[str] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/files/{name}", self._file)
        self._runner, port = await serve_in_loop(app)
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _file(self, request: web.Request) -> web.StreamResponse:
        data = self.files.get(request.match_info["name"])
        if data is None:
            return web.Response(status=404)
        self.queries.append(request.query_string)
        start, end = 0, len(data)
        status = 200
        header = request.headers.get("Range")
        if header:
            first, _, last = header.removeprefix("bytes=").partition("-")
            start, end, status = int(first), min(len(data), int(last) + 1), 206
        response = web.StreamResponse(status=status)
        response.content_length = end - start
        if status == 206:
            response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        step = 256 * 1024
        for position in range(start, end, step):
            chunk = data[position : min(end, position + step)]
            if self.delay:
                await asyncio.sleep(self.delay)
            await response.write(chunk)
            self.sent += len(chunk)
        await response.write_eof()
        return response


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    files = {
        "small.bin": random.Random(1).randbytes(300_000),
        "big.bin": random.Random(2).randbytes(6 * MIB + 123),
    }
    server = Origin(files)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def base_of(node: Node) -> str:
    assert node.peer_address is not None
    return f"http://127.0.0.1:{node.peer_address.port}"


async def get(node: Node, url: str, output: Path, *, digest: str | None = None,
              auth: PeerAuth | None = None) -> tuple[str, int]:
    """The command's client, in a thread (it blocks; the nodes run on this loop)."""
    return await asyncio.to_thread(
        download, base_of(node), url, str(output), digest=digest, auth=auth,
        progress_stream=io.StringIO(),
    )


def files_in(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir() if path.is_file())


async def run_cli(*arguments: str) -> tuple[int, bytes, bytes]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "d7y_node", *arguments,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stdout, stderr


# -- through the cluster -------------------------------------------------------------------------


async def test_signed_urls_of_one_file_leave_the_origin_once(
    tmp_path: Path, origin: Origin
) -> None:
    data = origin.files["big.bin"]
    first_url = f"{origin.url}/files/big.bin?v=1&X-Amz-Signature=aaa&X-Amz-Expires=60"
    second_url = f"{origin.url}/files/big.bin?Signature=bbb&Expires=99&v=1"
    task_id = url_task_id(first_url)
    assert url_task_id(second_url) == task_id
    async with cluster(tmp_path, 3) as nodes:
        homes = task_homes(task_key_for(task_id), [node.member_id or "" for node in nodes])
        others = [node for node in nodes if node.member_id != homes[0]]
        got_id, size = await get(others[0], first_url, tmp_path / "one")
        assert (got_id, size) == (task_id, len(data))
        assert (tmp_path / "one").read_bytes() == data
        # The home fetched it from origin, with the caller's signature; the caller from peers.
        assert origin.sent == len(data)
        assert all("X-Amz-Signature=aaa" in query for query in origin.queries)
        home = next(node for node in nodes if node.member_id == homes[0])
        assert home.scheduler is not None and home.scheduler.stats.origin_bytes == len(data)
        assert others[0].scheduler is not None
        assert others[0].scheduler.stats.peer_bytes == len(data)
        # Another signature of the same file, through another host: no origin bytes at all.
        await get(others[1], second_url, tmp_path / "two")
        assert (tmp_path / "two").read_bytes() == data
        assert origin.sent == len(data)


async def test_digest_mismatch_fails_clearly_and_leaves_no_file(
    tmp_path: Path, origin: Origin
) -> None:
    wrong = "sha256:" + "0" * 64
    output = tmp_path / "out.bin"
    output.write_bytes(b"previous")
    async with cluster(tmp_path, 1) as (node,):
        assert node.peer_address is not None
        code, _, stderr = await run_cli(
            "get", f"{origin.url}/files/small.bin", "-o", str(output), "--digest", wrong,
            "--peer", f"127.0.0.1:{node.peer_address.port}",
        )
        assert code == 1
        message = stderr.decode()
        assert message.startswith("d7y-node: error:") and "sha256:" in message
        assert "expected" in message or "hashes to" in message
        # The old file is untouched, no temporary file is left, nothing was kept in the store.
        assert output.read_bytes() == b"previous"
        assert files_in(tmp_path) == ["out.bin"]
        assert node.tasks.info(wrong) is None
        # The right digest works, and replaces the file.
        right = "sha256:" + hashlib.sha256(origin.files["small.bin"]).hexdigest()
        code, _, stderr = await run_cli(
            "get", f"{origin.url}/files/small.bin", "-o", str(output), "--digest", right,
            "--peer", f"127.0.0.1:{node.peer_address.port}",
        )
        assert code == 0, stderr
        assert output.read_bytes() == origin.files["small.bin"]


async def test_stdout_and_origin_refusal(tmp_path: Path, origin: Origin) -> None:
    async with cluster(tmp_path, 1) as (node,):
        assert node.peer_address is not None
        peer = f"127.0.0.1:{node.peer_address.port}"
        code, stdout, _ = await run_cli(
            "get", f"{origin.url}/files/small.bin", "-o", "-", "--peer", peer
        )
        assert code == 0 and stdout == origin.files["small.bin"]
        output = tmp_path / "missing"
        with pytest.raises(D7yError, match="404"):
            await get(node, f"{origin.url}/files/nothing.bin", output)
        assert not output.exists()
        assert files_in(tmp_path) == []


async def test_an_interrupted_get_resumes_from_the_pieces_held(tmp_path: Path) -> None:
    data = random.Random(3).randbytes(24 * MIB)
    slow = Origin({"f": data}, delay=0.02)
    await slow.start()
    url = f"{slow.url}/files/f"
    task_id = url_task_id(url)
    directory = tmp_path / "node"
    try:
        node = Node(config_for(directory, node_id="n0"))
        await node.start()
        try:
            attempt = asyncio.create_task(get(node, url, tmp_path / "first"))
            async with asyncio.timeout(20):
                while True:
                    info = node.tasks.info(task_id)
                    if info is not None and info.pieces_done >= info.piece_count // 3:
                        break
                    await asyncio.sleep(0.02)
        finally:
            # Downloads stop at once (a graceful stop would let this one finish).
            await node.tasks.close()
            await node.stop()
        with pytest.raises(D7yError):
            await attempt
        assert not (tmp_path / "first").exists()
        sent_before = slow.sent
        assert sent_before < len(data)
        node = Node(config_for(directory, node_id="n0"))
        await node.start()
        try:
            await get(node, url, tmp_path / "second")
        finally:
            await node.stop()
        assert (tmp_path / "second").read_bytes() == data
        # The second run fetched at most what the first had not stored (plus pieces in flight).
        assert slow.sent - sent_before <= len(data) - len(data) // 4
    finally:
        await slow.stop()


async def test_with_a_cluster_key_requests_must_be_signed(
    tmp_path: Path, origin: Origin
) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cret-for-the-test")
    node = Node(config_for(tmp_path / "n", node_id="n0", secret_file=secret))
    await node.start()
    try:
        url = f"{origin.url}/files/small.bin"
        with pytest.raises(D7yError, match="401"):
            await get(node, url, tmp_path / "unsigned")
        assert origin.sent == 0
        auth = PeerAuth(ClusterKey(b"s3cret-for-the-test"))
        await get(node, url, tmp_path / "signed", auth=auth)
        assert (tmp_path / "signed").read_bytes() == origin.files["small.bin"]
        # A signature is over the whole target: another URL with the same tag is refused.
        request = signed_request(base_of(node), f"{GET_PATH}?url=x", "GET", auth)
        request.full_url = base_of(node) + f"{GET_PATH}?" + urllib.parse.urlencode({"url": url})
        with pytest.raises(D7yError, match="401"):
            await asyncio.to_thread(open_node, request, 5.0)
    finally:
        await node.stop()


# -- who may call --------------------------------------------------------------------------------


class _Parts:
    """The node parts `FetchService.allowed` reads: no cluster key, one member at 10.0.0.2."""

    peer_auth = None

    def __init__(self) -> None:
        member = Member(member_id="m", address=Address("10.0.0.2", 7946), peer_port=65002,
                        labels={}, load=Load(free_upload_slots=1), state=MemberState.ALIVE,
                        incarnation=0)

        class _Membership:
            def members(self, *states: MemberState) -> list[Member]:
                return [member]

        self.membership = _Membership()


def _request_from(address: str) -> web.Request:
    """A request as aiohttp sees it from a client at `address` (the tests only have loopback
    addresses, so a remote client is the one thing made up here)."""
    transport = mock.Mock()
    transport.get_extra_info.side_effect = (
        lambda name, default=None: (address, 40000) if name == "peername" else default
    )
    return make_mocked_request("GET", f"{GET_PATH}?url=x", transport=transport)


def test_without_a_cluster_key_only_loopback_and_members_may_call() -> None:
    service = FetchService(_Parts())  # type: ignore[arg-type]
    assert service.allowed(_request_from("127.0.0.1"), members=False) is None
    assert service.allowed(_request_from("10.0.0.9"), members=False) is not None
    # A member may ask this host to fetch as a home, but not use it as its `get` endpoint.
    assert service.allowed(_request_from("10.0.0.2"), members=True) is None
    assert service.allowed(_request_from("10.0.0.2"), members=False) is not None
    assert service.allowed(_request_from("10.0.0.9"), members=True) is not None


def test_progress_on_a_terminal_and_elsewhere() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    progress = Progress(terminal, 2 * MIB, "file.bin", tty=True)
    progress.advance(MIB)
    progress.advance(MIB)
    progress.finish()
    assert "\r" in terminal.getvalue() and "100.0%" in terminal.getvalue()
    plain = io.StringIO()
    quiet = Progress(plain, 10, "file.bin", tty=False)
    quiet.advance(10)
    quiet.finish()
    assert plain.getvalue().count("\n") == 1 and plain.getvalue().startswith("file.bin: 10 bytes")
