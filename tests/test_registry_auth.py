"""Tests of `d7y_node.registry_auth`'s parsing: `WWW-Authenticate` challenges and Docker
`config.json` files. The token flow itself runs against the CNCF registry and the harness's token
server in tests/integration/test_registry_login_e2e.py."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from d7y_node.config import docker_config_path
from d7y_node.errors import ConfigError
from d7y_node.registry_auth import Credentials, Login, parse_challenge


def test_challenges_parse_as_the_registries_send_them() -> None:
    bearer = parse_challenge(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/busybox:pull,push"'
    )
    assert bearer.scheme == "bearer"
    assert bearer.parameters == {
        "realm": "https://auth.docker.io/token", "service": "registry.docker.io",
        "scope": "repository:library/busybox:pull,push",
    }
    spaced = parse_challenge('BEARER  realm = "http://127.0.0.1:5001/token" , service=x')
    assert spaced.parameters == {"realm": "http://127.0.0.1:5001/token", "service": "x"}
    escaped = parse_challenge(r'Basic realm="say \"hi\", please"')
    assert (escaped.scheme, escaped.parameters) == ("basic", {"realm": 'say "hi", please'})
    assert parse_challenge("").scheme == ""
    # Garbage stops the parameters, never the parse.
    assert parse_challenge('Bearer realm="x", ,,, =oops').parameters == {"realm": "x"}


def write(path: Path, document: object) -> Path:
    path.write_text(json.dumps(document))
    return path


def encoded(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_a_docker_config_gives_each_host_its_login(tmp_path: Path) -> None:
    credentials = Credentials.load(write(tmp_path / "config.json", {
        "auths": {
            "https://index.docker.io/v1/": {"auth": encoded("hub-user:hub:secret")},
            "registry.example:5000": {"username": "alice", "password": "pw"},
            "https://ghcr.io": {"auth": encoded("bob:token")},
            "helper.example": {},  # a credential helper's entry: nothing here
            "oauth.example": {"identitytoken": "refresh"},
        },
        "credsStore": "desktop",
    }))
    assert credentials.get("registry-1.docker.io") == Login("hub-user", "hub:secret")
    assert credentials.get("docker.io") == Login("hub-user", "hub:secret")
    assert credentials.get("registry.example:5000") == Login("alice", "pw")
    assert credentials.get("ghcr.io") == Login("bob", "token")
    assert credentials.get("helper.example") is None
    assert credentials.get("oauth.example") is None
    assert len(credentials) == 3
    assert "pw" not in repr(credentials.get("registry.example:5000"))
    assert Login("alice", "pw").basic() == "Basic " + encoded("alice:pw")


def test_no_file_means_no_logins_and_a_bad_one_is_a_config_error(tmp_path: Path) -> None:
    assert len(Credentials.load(tmp_path / "absent.json")) == 0
    assert len(Credentials.of(None)) == 0
    for text in ("not json", '["a list"]', '{"auths": []}', '{"auths": {"h": "x"}}',
                 '{"auths": {"h": {"auth": "%%%"}}}',
                 '{"auths": {"h": {"auth": "' + encoded("no-colon") + '"}}}'):
        path = tmp_path / "config.json"
        path.write_text(text)
        with pytest.raises(ConfigError) as raised:
            Credentials.load(path)
        assert raised.value.key == "registry_auth_file"
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (1024 * 1024 + 1))
    with pytest.raises(ConfigError, match="larger than"):
        Credentials.load(big)


def test_the_default_file_is_docker_s() -> None:
    assert docker_config_path({"DOCKER_CONFIG": "/etc/docker-config"}) == Path(
        "/etc/docker-config/config.json"
    )
    assert docker_config_path({"HOME": "/home/u"}) == Path("/home/u/.docker/config.json")
    assert docker_config_path({}) == Path("/root/.docker/config.json")
