"""The node's own registry logins (`registry_auth.py`) against real registries that want them.

`test/small:v1` is converted to Nydus on the open registry and copied (skopeo, with the owner's
credentials) to a registry with htpasswd Basic auth and to one with Bearer tokens from the
harness's token server. A node given a Docker `config.json` with the login mounts the image by
reference and reads its files: the manifest, the bootstrap layer and the data blob all come with
the node's own `Authorization` (a token from the token server, or Basic). A node without the
login gets the registry's 401 back from `d7y-node mount`, and mounts nothing.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from d7y_node.fuse_kernel import is_mount_point
from tests.harness.node import node_command
from tests.harness.process import run
from tests.harness.registry import Registry
from tests.integration.conftest import (
    BASIC_USER,
    SMALL_REPOSITORY,
    TAG,
    NodeFactory,
    TokenSetup,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                       reason="mounting FUSE needs root and /dev/fuse"),
]

COMMAND_TIMEOUT_SECONDS = 120.0
NYDUS_TAG = "login-nydus"
SMALL_FILE = "etc/d7y-test.txt"
SMALL_FILE_CONTENT = b"small image\n"


@pytest.fixture(scope="module")
def nydus_reference(registry: Registry) -> str:
    """`test/small:v1` converted to Nydus on the open registry."""
    target = f"{registry.host}/{SMALL_REPOSITORY}:{NYDUS_TAG}"
    run([*node_command(), "convert", f"{registry.host}/{SMALL_REPOSITORY}:{TAG}", target],
        timeout=COMMAND_TIMEOUT_SECONDS)
    return target


def copy_image(source: str, target_host: str, credentials: str) -> str:
    target = f"{target_host}/{SMALL_REPOSITORY}:{NYDUS_TAG}"
    run(["skopeo", "copy", "--src-tls-verify=false", "--dest-tls-verify=false",
         "--dest-creds", credentials, f"docker://{source}", f"docker://{target}"],
        timeout=COMMAND_TIMEOUT_SECONDS)
    return target


def docker_config(path: Path, host: str, credentials: str) -> Path:
    """A `config.json` as `docker login` writes it."""
    auth = base64.b64encode(credentials.encode()).decode()
    path.write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    return path


@pytest.fixture(params=["basic", "token"])
def protected(
    request: pytest.FixtureRequest, nydus_reference: str,
) -> tuple[str, str, TokenSetup | None]:
    """(the Nydus image's reference in a registry that wants a login, the login, the token
    setup when it is the token registry)."""
    if request.param == "basic":
        basic: Registry = request.getfixturevalue("basic_registry")
        credentials = f"{BASIC_USER.username}:{BASIC_USER.password}"
        return copy_image(nydus_reference, basic.host, credentials), credentials, None
    setup: TokenSetup = request.getfixturevalue("token_registry")
    reference = copy_image(nydus_reference, setup.registry.host, setup.credentials)
    return reference, setup.credentials, setup


def test_a_node_mounts_an_image_with_its_own_login(
    protected: tuple[str, str, TokenSetup | None], node_factory: NodeFactory, tmp_path: Path,
) -> None:
    reference, credentials, token = protected
    host = reference.split("/", 1)[0]
    config = docker_config(tmp_path / "config.json", host, credentials)
    node = node_factory(extra_arguments=["--registry-auth-file", str(config)])
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    issued = token.token_server.issued if token is not None else 0
    run([*node_command(), "mount", "--data-dir", str(node.data_dir), reference,
         str(mountpoint)], timeout=COMMAND_TIMEOUT_SECONDS)
    try:
        assert (mountpoint / SMALL_FILE).read_bytes() == SMALL_FILE_CONTENT
        assert (mountpoint / "bin" / "busybox").read_bytes() == Path("/bin/busybox").read_bytes()
        if token is not None:
            # One token for the repository, reused for the manifest, bootstrap and blob.
            assert token.token_server.issued == issued + 1
        assert credentials.split(":")[1] not in node.process.log_path.read_text()
    finally:
        run([*node_command(), "umount", "--data-dir", str(node.data_dir), str(mountpoint)],
            timeout=COMMAND_TIMEOUT_SECONDS, check=False)
    assert not is_mount_point(str(mountpoint))


def test_a_node_without_the_login_gets_the_registry_s_refusal(
    protected: tuple[str, str, TokenSetup | None], node_factory: NodeFactory, tmp_path: Path,
) -> None:
    reference, _credentials, _token = protected
    node = node_factory(extra_arguments=["--registry-auth-file", "off"])
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    refused = run([*node_command(), "mount", "--data-dir", str(node.data_dir), reference,
                   str(mountpoint)], timeout=COMMAND_TIMEOUT_SECONDS, check=False)
    assert refused.returncode != 0
    assert "401" in refused.stderr, refused.stderr
    assert not is_mount_point(str(mountpoint))


def test_a_malformed_docker_config_stops_the_node_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text('{"auths": {"r.example": {"auth": "not base64!"}}}')
    started = run([*node_command(), "start", "--data-dir", str(tmp_path / "data"),
                   "--registry-auth-file", str(config)], timeout=30.0, check=False)
    assert started.returncode == 2, started.stderr
    assert "registry_auth_file" in started.stderr and "base64" in started.stderr
    assert "Traceback" not in started.stderr
