"""Per-service policy counters: plain ints, exported to Prometheus by the admin server."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class ServiceStats:
    retries: int = 0  # retry attempts started (not counting first tries)
    retries_exhausted: int = 0  # requests that ran out of attempts (flag URX)
    budget_exhausted: int = 0  # retries refused because the retry budget was spent
    timeouts: int = 0  # total request timeouts fired (flag UT)
    per_try_timeouts: int = 0  # attempts cut by per_try_timeout
    overflows: int = 0  # requests refused by max_requests or max_pending (flag UO)
    ejections: int = 0  # endpoint breaker trips, re-trips after a failed probe included
    ejections_suppressed: int = 0  # trips refused because of max_ejection_percent
