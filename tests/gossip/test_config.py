"""Gossip settings and identity validation."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest

from d7y_node.errors import ConfigError
from d7y_node.gossip import Address, GossipConfig, Load, LocalMember


def test_the_defaults_are_memberlists_lan_profile() -> None:
    config = GossipConfig()
    assert (config.probe_interval, config.probe_timeout, config.indirect_checks) == (1.0, 0.5, 3)
    assert (config.gossip_interval, config.gossip_nodes) == (0.2, 3)
    assert (config.suspicion_mult, config.suspicion_max_timeout_mult) == (4, 6)
    assert (config.retransmit_mult, config.push_pull_interval) == (4, 30.0)
    assert config.awareness_max_multiplier == 8
    assert config.packet_size_limit == 1400


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"probe_interval": 0.0}, "gossip.probe_interval"),
        ({"probe_timeout": 1.0}, "gossip.probe_timeout"),
        ({"indirect_checks": 0}, "gossip.indirect_checks"),
        ({"packet_size_limit": 500}, "gossip.packet_size_limit"),
        ({"stream_timeout": -1.0}, "gossip.stream_timeout"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(changes: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as raised:
        dataclasses.replace(GossipConfig(), **changes)
    assert raised.value.key == key


def test_a_member_that_cannot_be_announced_is_refused() -> None:
    here = Address("10.0.0.1", 7946)
    LocalMember("node-1", here, 65002, {"zone": "a", "rack": "r1"}, Load(4, 0, 0))
    good = LocalMember("node-1", here)
    bad_changes: list[Callable[[], object]] = [
        lambda: dataclasses.replace(good, member_id=""),
        lambda: dataclasses.replace(good, member_id="x" * 200),
        lambda: dataclasses.replace(good, labels={"zone": "z" * 100}),
        lambda: dataclasses.replace(good, load=Load(-1, 0, 0)),
        lambda: dataclasses.replace(good, peer_port=70000),
        lambda: dataclasses.replace(good, address=Address("0.0.0.0", 7946)),
        lambda: dataclasses.replace(good, address=Address("::", 7946)),
    ]
    for bad in bad_changes:
        with pytest.raises(ConfigError):
            bad()
