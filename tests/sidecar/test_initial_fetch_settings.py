"""`initial_fetch_timeout`: a flag and a sidecar.yaml key, a duration, 10 s by default."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from sidecar.settings import SETTING_KEYS, SettingsError, SidecarSettings


def _args(**flags: Any) -> argparse.Namespace:
    values: dict[str, Any] = dict.fromkeys(SETTING_KEYS)
    values.update(config=None, service="a", control_plane="127.0.0.1:15010")
    values.update(flags)
    return argparse.Namespace(**values)


def test_initial_fetch_timeout_defaults_to_ten_seconds() -> None:
    assert SidecarSettings.from_args(_args()).initial_fetch_timeout == 10.0


def test_initial_fetch_timeout_from_the_flag_and_from_sidecar_yaml(tmp_path: Path) -> None:
    assert (
        SidecarSettings.from_args(_args(initial_fetch_timeout="1500ms")).initial_fetch_timeout
        == 1.5
    )
    config = tmp_path / "sidecar.yaml"
    config.write_text("initial-fetch-timeout: 2s\n")
    assert SidecarSettings.from_args(_args(config=str(config))).initial_fetch_timeout == 2.0
    config.write_text("initial_fetch_timeout: 0s\n")  # 0: wait for the control plane forever
    assert SidecarSettings.from_args(_args(config=str(config))).initial_fetch_timeout == 0.0


def test_a_bad_initial_fetch_timeout_names_the_key_and_the_form() -> None:
    with pytest.raises(SettingsError, match=r"^initial_fetch_timeout: expected a duration like"):
        SidecarSettings.from_args(_args(initial_fetch_timeout="10"))
