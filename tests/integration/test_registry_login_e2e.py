"""The node's own registry logins (`registry_auth.py`) against real registries that want them.

`test/small:v1` is converted to Nydus on the open registry and copied (skopeo, with the owner's
credentials) to a registry with htpasswd Basic auth and to one with Bearer tokens from the
harness's token server. A node given a Docker `config.json` with the login mounts the image by
reference and reads its files: the manifest, the bootstrap layer and the data blob all come with
the node's own `Authorization` (a token from the token server, or Basic). A node without the
login gets the registry's 401 back from `d7y-node mount`, and mounts nothing. In a cluster, the
blob's home, which has no login of its own, fetches with the one the mounting node's announce
carries. `d7y-node convert` pulls from and pushes to the token registry with the same login.
"""

from __future__ import annotations

import base64
import json
import os
import urllib.request
from pathlib import Path

import pytest

from d7y_node.fuse_kernel import is_mount_point
from tests.harness.images import MEDIA_TYPE_MANIFEST
from tests.harness.node import node_command
from tests.harness.process import run
from tests.harness.registry import Registry
from tests.integration.conftest import (
    BASIC_USER,
    SMALL_REPOSITORY,
    TAG,
    NodeFactory,
    TokenSetup,
    start_pair,
    two_node_ids,
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


def test_the_home_of_a_blob_fetches_with_the_login_the_announce_carries(
    token_registry: TokenSetup, nydus_reference: str, registry: Registry,
    node_factory: NodeFactory, tmp_path: Path,
) -> None:
    reference = copy_image(nydus_reference, token_registry.registry.host,
                           token_registry.credentials)
    request = urllib.request.Request(
        f"{registry.url}/v2/{SMALL_REPOSITORY}/manifests/{NYDUS_TAG}",
        headers={"Accept": MEDIA_TYPE_MANIFEST},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        layers = json.loads(response.read())["layers"]
    data_blobs = [layer["digest"] for layer in layers
                  if layer["mediaType"] == "application/vnd.oci.image.layer.nydus.blob.v1"]
    config = docker_config(tmp_path / "config.json", token_registry.registry.host,
                           token_registry.credentials)
    # The node without a login is every data blob's home 0.
    reader, home = start_pair(
        node_factory, *two_node_ids(data_blobs, "login"),
        reader_arguments=["--registry-auth-file", str(config)],
        home_arguments=["--registry-auth-file", "off"],
    )
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    run([*node_command(), "mount", "--data-dir", str(reader.data_dir), reference,
         str(mountpoint)], timeout=COMMAND_TIMEOUT_SECONDS)
    try:
        assert (mountpoint / "bin" / "busybox").read_bytes() == Path("/bin/busybox").read_bytes()
        assert reader.metric("d7y_p2p_origin_fallbacks") == 0
        assert home.metric("d7y_p2p_seeds", outcome="started") >= 1
        assert home.metric("d7y_p2p_seeds", outcome="failed") == 0
        assert home.metric("d7y_peer_ranges_served") >= 1
    finally:
        run([*node_command(), "umount", "--data-dir", str(reader.data_dir), str(mountpoint)],
            timeout=COMMAND_TIMEOUT_SECONDS, check=False)


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


def test_convert_pulls_and_pushes_with_the_login(
    token_registry: TokenSetup, node_factory: NodeFactory, tmp_path: Path,
) -> None:
    host = token_registry.registry.host
    config = docker_config(tmp_path / "config.json", host, token_registry.credentials)
    source = f"{host}/{SMALL_REPOSITORY}:{TAG}"
    target = f"{host}/{SMALL_REPOSITORY}:converted-with-login"
    refused = run([*node_command(), "convert", "--registry-auth-file", "off", source, target],
                  timeout=COMMAND_TIMEOUT_SECONDS, check=False)
    assert refused.returncode != 0 and "401" in refused.stderr, refused.stderr
    run([*node_command(), "convert", "--registry-auth-file", str(config), source, target],
        timeout=COMMAND_TIMEOUT_SECONDS)
    node = node_factory(extra_arguments=["--registry-auth-file", str(config)])
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    run([*node_command(), "mount", "--data-dir", str(node.data_dir), target, str(mountpoint)],
        timeout=COMMAND_TIMEOUT_SECONDS)
    try:
        assert (mountpoint / SMALL_FILE).read_bytes() == SMALL_FILE_CONTENT
    finally:
        run([*node_command(), "umount", "--data-dir", str(node.data_dir), str(mountpoint)],
            timeout=COMMAND_TIMEOUT_SECONDS, check=False)
