"""Policy tests run on a loop with virtual time: timeouts and backoff take no real time."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest

from tests.sidecar.policy.fakes import VirtualTimeLoop


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], Any]]:
    return {"virtual_time": VirtualTimeLoop}
