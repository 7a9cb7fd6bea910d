"""The harness scripts in tests/bench import each other as top-level modules (`rows`, `report`,
`processes`), as they do when run as `python tests/bench/<script>.py`."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
