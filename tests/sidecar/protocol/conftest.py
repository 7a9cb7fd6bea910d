"""The codec tests run on both implementations: the compiled one and the pure-Python reference."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.sidecar.protocol.implementations import NAMES, codec


@pytest.fixture(scope="module", params=["python", "native"])
def implementation(request: pytest.FixtureRequest) -> Iterator[str]:
    """Runs a test module (one that says `pytestmark = pytest.mark.usefixtures(...)`) once per
    implementation: the codec names it imported from sidecar.protocol are swapped for that one's."""
    chosen = codec(request.param)
    with pytest.MonkeyPatch.context() as patch:
        for name in NAMES:
            if hasattr(request.module, name):
                patch.setattr(request.module, name, getattr(chosen, name))
        yield request.param
