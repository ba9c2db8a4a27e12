"""Tests of `d7y_node.nydusd_config`: nydusd JSON configs in the shapes the Nydus docs show
(registry backend with auth and mirrors, blobcache, fs_prefetch), written to files and read
back, what maps onto a mount and which settings are named in warnings."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from d7y_node.errors import ConfigError
from d7y_node.nydusd_config import load_nydusd_config, map_nydusd_config

AUTH = base64.b64encode(b"alice:alice-secret").decode()

# The registry-backend config of docs/nydusd.md, with a blob cache and prefetch.
REGISTRY_CONFIG: dict[str, Any] = {
    "device": {
        "backend": {
            "type": "registry",
            "config": {
                "scheme": "http",
                "host": "127.0.0.1:5000",
                "repo": "library/busybox",
                "auth": AUTH,
                "skip_verify": True,
                "timeout": 5,
                "connect_timeout": 5,
                "retry_limit": 2,
            },
        },
        "cache": {
            "type": "blobcache",
            "config": {"work_dir": "/var/lib/nydus/cache"},
        },
    },
    "mode": "direct",
    "digest_validate": False,
    "iostats_files": False,
    "enable_xattr": True,
    "fs_prefetch": {
        "enable": True,
        "threads_count": 4,
        "merging_size": 131072,
        "bandwidth_rate": 1048576,
        "prefetch_all": True,
    },
}

# nydusd behind a Dragonfly mirror (the d7y.io Nydus integration's shape).
MIRROR_CONFIG: dict[str, Any] = {
    "device": {
        "backend": {
            "type": "registry",
            "config": {
                "mirrors": [{
                    "host": "http://127.0.0.1:65001",
                    "auth_through": False,
                    "headers": {"X-Dragonfly-Registry": "https://index.docker.io"},
                    "ping_url": "http://127.0.0.1:40901/server/ping",
                }],
                "repo": "library/python",
                "timeout": 5,
            },
        },
        "cache": {"type": "blobcache", "config": {"work_dir": "/cache"}},
    },
    "mode": "direct",
    "fs_prefetch": {"enable": False},
}


def write(tmp_path: Path, document: Any, name: str = "nydusd.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(document, indent=2))
    return path


def warned(settings: Any, name: str) -> bool:
    return any(f"`{name}`" in line for line in settings.warnings)


def test_registry_config_maps_what_applies(tmp_path: Path) -> None:
    settings = load_nydusd_config(write(tmp_path, REGISTRY_CONFIG))
    assert settings.registry == "http://127.0.0.1:5000"
    assert settings.repository == "library/busybox"
    assert settings.authorization == f"Basic {AUTH}"
    assert settings.prefetch_files is True
    assert settings.prefetch_blobs is True
    assert settings.prefetch_bandwidth == 1048576


def test_registry_config_warns_once_per_setting_that_does_not_apply(tmp_path: Path) -> None:
    settings = load_nydusd_config(write(tmp_path, REGISTRY_CONFIG))
    expected = [
        "device.backend.config.skip_verify", "device.backend.config.timeout",
        "device.backend.config.connect_timeout", "device.backend.config.retry_limit",
        "device.cache.type", "device.cache.config", "mode", "digest_validate",
        "iostats_files", "enable_xattr", "fs_prefetch.threads_count",
        "fs_prefetch.merging_size",
    ]
    for name in expected:
        assert warned(settings, name), name
    assert len(settings.warnings) == len(expected)
    # The cache's work_dir is named in its warning, so users see it is not used.
    assert any("work_dir" in line for line in settings.warnings)
    # What maps is not warned about.
    for name in ("device.backend.config.host", "device.backend.config.repo",
                 "fs_prefetch.enable", "fs_prefetch.bandwidth_rate"):
        assert not warned(settings, name), name


def test_dragonfly_mirror_header_names_the_upstream(tmp_path: Path) -> None:
    settings = load_nydusd_config(write(tmp_path, MIRROR_CONFIG))
    assert settings.registry == "https://index.docker.io"
    assert settings.repository == "library/python"
    assert settings.prefetch_files is False
    assert settings.prefetch_blobs is False
    assert warned(settings, "device.backend.config.mirrors[0].host")
    assert warned(settings, "device.backend.config.mirrors[0].auth_through")
    assert warned(settings, "device.backend.config.mirrors[0].ping_url")
    assert not warned(settings, "device.backend.config.mirrors[0].headers.X-Dragonfly-Registry")


def test_backend_host_wins_over_the_mirror_header() -> None:
    document = json.loads(json.dumps(MIRROR_CONFIG))
    document["device"]["backend"]["config"]["host"] = "registry.example:5000"
    settings = map_nydusd_config(document)
    assert settings.registry == "https://registry.example:5000"


def test_other_backends_do_not_apply() -> None:
    settings = map_nydusd_config({
        "device": {"backend": {"type": "oss", "config": {
            "endpoint": "oss-cn-hangzhou.aliyuncs.com", "bucket_name": "images",
        }}},
    })
    assert settings.registry is None
    assert warned(settings, "device.backend.type")
    assert warned(settings, "device.backend.config.endpoint")
    assert warned(settings, "device.backend.config.bucket_name")


def test_prefetch_without_rate_has_no_cap_and_zero_means_none() -> None:
    assert map_nydusd_config({"fs_prefetch": {"enable": True}}).prefetch_bandwidth is None
    zero = map_nydusd_config({"fs_prefetch": {"enable": True, "bandwidth_rate": 0}})
    assert zero.prefetch_bandwidth is None
    assert map_nydusd_config({}).prefetch_files is None  # the node's default stays


def test_unknown_settings_are_named() -> None:
    settings = map_nydusd_config({"something_new": 1, "device": {"other": {}}})
    assert warned(settings, "something_new")
    assert warned(settings, "device.other")


@pytest.mark.parametrize("document, message", [
    ([], "not an object"),
    ({"device": {"backend": {"type": "registry", "config": {"scheme": "ftp"}}}}, "ftp"),
    ({"device": {"backend": {"type": "registry", "config": {"auth": "not base64!"}}}},
     "base64"),
    ({"device": {"backend": {"type": "registry",
                             "config": {"auth": base64.b64encode(b"nocolon").decode()}}}},
     "user:password"),
    ({"device": {"backend": {"type": "registry", "config": {"mirrors": {}}}}}, "not a list"),
    ({"fs_prefetch": {"enable": "yes"}}, "true or false"),
    ({"fs_prefetch": {"bandwidth_rate": -1}}, "non-negative"),
    ({"device": {"backend": {"type": "registry", "config": {"timeout": "5s"}}}},
     "non-negative"),
])
def test_malformed_configs_are_refused(document: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        map_nydusd_config(document)


def test_unreadable_or_non_json_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_nydusd_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    with pytest.raises(ConfigError, match="not JSON"):
        load_nydusd_config(bad)
