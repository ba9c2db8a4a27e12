"""config.py: precedence of the four layers, value parsing, and clear errors naming the key."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from d7y_node.config import (
    OPTIONS,
    Listen,
    NodeConfig,
    is_plain_http,
    load_config,
    parse_duration,
    parse_listen,
    parse_size,
)
from d7y_node.errors import ConfigError


def test_defaults_match_the_design() -> None:
    config = load_config(environ={})
    assert config == NodeConfig()
    assert config.store.data_dir == Path("/var/lib/d7y-node")
    assert config.proxy.listen == Listen("0.0.0.0", 65001)
    assert config.peer_listen == Listen("0.0.0.0", 65002)
    assert config.registry.default_registry == "https://registry-1.docker.io"
    assert (config.store.gc_high_watermark, config.store.gc_low_watermark) == (0.8, 0.6)


def test_flag_beats_env_beats_file_beats_default(tmp_path: Path) -> None:
    file = tmp_path / "node.yaml"
    file.write_text("data-dir: /from/file\nproxy_listen: 127.0.0.1:1\nlog_level: debug\n")
    environ = {"D7Y_PROXY_LISTEN": "127.0.0.1:2", "D7Y_PEER_LISTEN": "127.0.0.1:3"}
    config = load_config(file=file, environ=environ, flags={"peer_listen": "127.0.0.1:4",
                                                            "gc_quota": None})
    assert config.store.data_dir == Path("/from/file")
    assert config.proxy.listen == Listen("127.0.0.1", 2)
    assert config.peer_listen == Listen("127.0.0.1", 4)
    assert config.log_level == "debug"
    assert config.store.gc_quota is None


def test_repeatable_insecure_registry_from_each_layer(tmp_path: Path) -> None:
    file = tmp_path / "node.yaml"
    file.write_text("insecure_registry: [reg.local:5000, other]\n")
    assert load_config(file=file, environ={}).registry.insecure_registries == (
        "reg.local:5000", "other")
    env = {"D7Y_INSECURE_REGISTRY": "a:1, b:2"}
    assert load_config(environ=env).registry.insecure_registries == ("a:1", "b:2")
    flags = {"insecure_registry": ["c:3"]}
    assert load_config(environ=env, flags=flags).registry.insecure_registries == ("c:3",)


@pytest.mark.parametrize(
    ("layer", "key", "value", "named"),
    [
        ("flag", "proxy_listen", "nonsense", "--proxy-listen"),
        ("flag", "peer_listen", "1.2.3.4:70000", "--peer-listen"),
        ("env", "gc_quota", "lots", "D7Y_GC_QUOTA"),
        ("env", "gc_ttl", "3 fortnights", "D7Y_GC_TTL"),
        ("file", "registry_mirror", "ftp://x", "registry_mirror"),
        ("file", "log_level", "loud", "log_level"),
        ("flag", "gc_high_watermark", "120%", "--gc-high-watermark"),
        ("flag", "insecure_registry", ["bad host/x"], "--insecure-registry"),
        ("flag", "origin_concurrency", "0", "--origin-concurrency"),
    ],
)
def test_bad_values_name_the_key_as_written(
    tmp_path: Path, layer: str, key: str, value: object, named: str
) -> None:
    file = None
    environ: dict[str, str] = {}
    flags: dict[str, object] = {}
    if layer == "file":
        file = tmp_path / "node.yaml"
        file.write_text(f"{key}: {value}\n")
    elif layer == "env":
        environ[OPTIONS[key].env] = str(value)
    else:
        flags[key] = value
    with pytest.raises(ConfigError) as caught:
        load_config(file=file, environ=environ, flags=flags)
    assert caught.value.key == named


def test_unknown_file_key_and_bad_yaml(tmp_path: Path) -> None:
    file = tmp_path / "node.yaml"
    file.write_text("data_dri: /x\n")
    with pytest.raises(ConfigError, match="data_dri: unknown setting"):
        load_config(file=file, environ={})
    file.write_text("a: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(file=file, environ={})
    file.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(file=file, environ={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(file=tmp_path / "missing.yaml", environ={})


def test_cross_key_checks() -> None:
    with pytest.raises(ConfigError, match="gc_low_watermark"):
        load_config(environ={}, flags={"gc_low_watermark": "0.9"})
    with pytest.raises(ConfigError, match="peer_listen"):
        load_config(environ={}, flags={"proxy_listen": ":9000", "peer_listen": "127.0.0.1:9000"})


def test_units() -> None:
    assert parse_size("k", "50GiB") == 50 * 1024**3
    assert parse_size("k", "1.5 MB") == 1_500_000
    assert parse_size("k", 4096) == 4096
    assert parse_duration("k", "1h30m") == 5400
    assert parse_duration("k", "250ms") == 0.25
    assert parse_listen("k", "[::1]:65001") == Listen("::1", 65001)
    assert parse_listen("k", ":65001") == Listen("0.0.0.0", 65001)
    assert load_config(environ={}, flags={"gc_ttl": "off"}).store.gc_ttl is None


@given(st.text(max_size=40))
def test_parsers_never_raise_anything_but_config_error(text: str) -> None:
    for option in OPTIONS.values():
        with contextlib.suppress(ConfigError):
            option.parse(option.key, text)


def test_plain_http_follows_containerd() -> None:
    assert is_plain_http("localhost:5000", ())
    assert is_plain_http("127.0.0.1:5000", ())
    assert is_plain_http("[::1]:5000", ())
    assert not is_plain_http("registry.example:5000", ())
    assert is_plain_http("registry.example:5000", ("registry.example:5000",))
    assert is_plain_http("registry.example:5000", ("registry.example",))
    assert not is_plain_http("registry-1.docker.io", ())


def test_cluster_options_from_every_layer(tmp_path: Path) -> None:
    file = tmp_path / "node.yaml"
    file.write_text("label: {zone: a, rack: r1}\nhomes: 3\n")
    config = load_config(
        file=file,
        environ={"D7Y_JOIN": "10.0.0.1,seeds.example:8000", "D7Y_HOME_TIMEOUT": "2s"},
        flags={"gossip_listen": "10.0.0.5:7000", "advertise_addr": "10.0.0.5",
               "secret_file": str(tmp_path / "key"), "node_id": "host-5"},
    )
    cluster = config.cluster
    assert cluster.labels == (("zone", "a"), ("rack", "r1"))
    assert cluster.homes == 3
    assert cluster.join == ("10.0.0.1:7946", "seeds.example:8000")
    assert cluster.home_timeout == 2.0
    assert cluster.gossip_listen == Listen("10.0.0.5", 7000)
    assert (cluster.advertise_addr, cluster.node_id) == ("10.0.0.5", "host-5")
    assert cluster.secret_file == tmp_path / "key"
    shown = config.as_dict()
    assert shown["label"] == ["zone=a", "rack=r1"] and shown["join"][0] == "10.0.0.1:7946"
    # What `config` prints loads back to the same configuration.
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(shown))
    assert load_config(file=again, environ={}) == config
    defaults = load_config(environ={}).cluster
    assert (defaults.gossip_listen, defaults.homes, defaults.join) == (
        Listen("0.0.0.0", 7946), 2, ()
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [("label", ["zone"]), ("label", ["=a"]), ("homes", "0"), ("homes", "9"),
     ("join", ["host:99999"]), ("node_id", "a b"), ("advertise_addr", "bad/addr"),
     ("gossip_listen", "name:7946"), ("home_timeout", "soon")],
)
def test_bad_cluster_values(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(environ={}, flags={key: value})
    # Checks of one value name the flag; checks across values (validate) the key.
    assert caught.value.key in (OPTIONS[key].flag, key)
