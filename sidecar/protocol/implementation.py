"""Which codec runs: the compiled one (native.pyx) or the pure-Python reference.

`request.py`, `response.py` and `serialize.py` are the reference; each ends by putting the
compiled twin of its parser or serializers in their place when `NATIVE` is set, so code that
imports `sidecar.protocol.request.RequestParser` gets the compiled parser without knowing it.
The environment variable `OUTRIGGER_CODEC` chooses: `native` (the compiled module must load),
`python` (the reference), or unset (the compiled module when it is built, else the reference).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Final

__all__ = ["NAME", "NATIVE", "VARIABLE"]

VARIABLE: Final = "OUTRIGGER_CODEC"
_MODULE: Final = "sidecar.protocol.native"


def _load() -> ModuleType | None:
    choice = os.environ.get(VARIABLE, "")
    if choice == "python":
        return None
    if choice not in ("", "native"):
        raise ValueError(f"{VARIABLE} must be 'native' or 'python' (or unset), got {choice!r}")
    try:
        return importlib.import_module(_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name != _MODULE:
            raise
        if choice == "native":
            raise ImportError(
                f"{VARIABLE}=native but {_MODULE} is not built: run `make install` "
                "(it needs a C compiler and the Python headers: build-essential python3-dev)"
            ) from exc
        return None


NATIVE: Final = _load()
NAME: Final = "python" if NATIVE is None else "native"
