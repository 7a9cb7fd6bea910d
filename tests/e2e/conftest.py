from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.mesh_processes import Processes


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    """Processes started by the test, every one killed at its end."""
    with Processes(tmp_path) as group:
        yield group
