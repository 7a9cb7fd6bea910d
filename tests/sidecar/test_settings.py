"""`outrigger sidecar` settings: flags, sidecar.yaml, defaults, and errors that name the key."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.config import Endpoint
from sidecar.routing import authority_endpoint
from sidecar.settings import SettingsError, SidecarSettings


def _args(**overrides: object) -> argparse.Namespace:
    values: dict[str, object] = {
        "config": None,
        "mesh": None,
        "control_plane": None,
        "service": None,
        "namespace": None,
        "node_id": None,
        "outbound": None,
        "inbound": None,
        "app": None,
        "admin": None,
        "drain_timeout": None,
        "snapshot_cache": None,
        "access_log": None,
    }
    values.update(overrides)
    return argparse.Namespace(**values)


def test_defaults_are_istios_ports() -> None:
    settings = SidecarSettings.from_args(_args(service="frontend"))
    assert settings.outbound == ("127.0.0.1", 15001)
    assert settings.inbound == ("127.0.0.1", 15006)
    assert settings.admin == ("127.0.0.1", 15000)
    assert settings.app == ("127.0.0.1", 8080)
    assert settings.drain_timeout == 20.0
    assert settings.namespace == "default"
    assert settings.node_id.startswith("frontend~")


def test_config_file_keys_take_dashes_or_underscores_and_flags_win(tmp_path: Path) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        "service: orders\ndrain-timeout: 5s\noutbound: 127.0.0.1:25001\naccess_log: true\n"
    )
    settings = SidecarSettings.from_args(_args(config=str(config), outbound="127.0.0.1:35001"))
    assert settings.service == "orders"
    assert settings.drain_timeout == 5.0
    assert settings.access_log is True
    assert settings.outbound == ("127.0.0.1", 35001)  # the flag beats the file


def test_unknown_config_key_names_the_key_and_the_allowed_ones(tmp_path: Path) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_text("service: orders\nretries: 3\n")
    with pytest.raises(SettingsError, match=r"unknown key 'retries'.*allowed: mesh"):
        SidecarSettings.from_args(_args(config=str(config)))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"outbound": "15001"}, r"outbound: expected HOST:PORT"),
        ({"app": "127.0.0.1:99999"}, r"app: expected HOST:PORT"),
        ({"drain_timeout": "20"}, r"drain_timeout: expected a duration like 250ms"),
        ({"service": None}, r"service: required"),
        ({"mesh": "m.yaml", "control_plane": "127.0.0.1:15010"}, r"give one"),
    ],
)
def test_bad_settings_name_the_key_and_the_form(overrides: dict[str, object], message: str) -> None:
    args = _args(service="frontend")
    for key, value in overrides.items():
        setattr(args, key, value)
    with pytest.raises(SettingsError, match=message):
        SidecarSettings.from_args(args)


@pytest.mark.parametrize(
    ("authority", "endpoint"),
    [
        (b"payments", Endpoint("payments", 80)),
        (b"127.0.0.1:9001", Endpoint("127.0.0.1", 9001)),
        (b"[::1]:8080", Endpoint("::1", 8080)),
        (b"[::1]", Endpoint("::1", 80)),
        (b"", None),
    ],
)
def test_passthrough_authority_becomes_an_endpoint(
    authority: bytes, endpoint: Endpoint | None
) -> None:
    assert authority_endpoint(authority) == endpoint


def test_invalid_mesh_file_stops_start_up_naming_file_service_and_field(tmp_path: Path) -> None:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(
        "services:\n  - name: payments\n    endpoints: ['127.0.0.1:9001']\n"
        "    policy: {retries: {attempts: two}}\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "outrigger.cli", "sidecar", "--mesh", str(mesh), "--service", "f"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "mesh.yaml" in done.stderr
    assert 'service "payments"' in done.stderr
    assert "policy.retries.attempts" in done.stderr
