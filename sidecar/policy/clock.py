"""Where the policy layers get time from.

Deadlines (`Request.deadline`) and breaker open timers are absolute values on a `Clock`; timers
are armed on the running loop with *relative* delays (`deadline.call_at(loop.time() + delay)`,
the retry backoff's `sleep(delay)`), so any clock that ticks at the loop's rate works. In
production the clock is the running loop's `time()` (the server bounds a response body by
`Request.deadline` on the same base); tests use a loop whose time only moves when it would
otherwise wait, so timeouts run instantly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


def loop_time() -> float:
    """The running loop's clock: the default `Clock`."""
    return asyncio.get_running_loop().time()
