"""cli.py: `d7y-node config` prints what the node would run with; mistakes give one clear line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("D7Y_")}
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "d7y_node", *args],
        capture_output=True, text=True, env=environ, timeout=60, check=False,
    )


def test_config_prints_the_effective_settings(tmp_path: Path) -> None:
    file = tmp_path / "node.yaml"
    file.write_text("gc_quota: 1GiB\nlog_level: warning\n")
    result = run_cli(
        "config", "--config", str(file), "--data-dir", str(tmp_path / "data"),
        "--insecure-registry", "a:1", "--insecure-registry", "b:2",
        env={"D7Y_LOG_LEVEL": "debug"},
    )
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["data_dir"] == str(tmp_path / "data")
    assert shown["gc_quota"] == 1024**3
    assert shown["log_level"] == "debug"
    assert shown["insecure_registry"] == ["a:1", "b:2"]
    assert shown["proxy_listen"] == "0.0.0.0:65001"


def test_bad_flag_value_is_one_line_naming_the_flag() -> None:
    result = run_cli("config", "--gc-quota", "lots")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["d7y-node: error: --gc-quota: expected a size such as 50GiB, got 'lots'"]


def test_bad_env_value_names_the_variable() -> None:
    result = run_cli("config", env={"D7Y_PROXY_LISTEN": "nowhere"})
    assert result.returncode == 2
    assert "D7Y_PROXY_LISTEN" in result.stderr


def test_start_refuses_bad_config_before_binding(tmp_path: Path) -> None:
    result = run_cli("start", "--data-dir", str(tmp_path), "--log-level", "chatty")
    assert result.returncode == 2
    assert "--log-level" in result.stderr
    assert "Traceback" not in result.stderr
