"""Per-service concurrency limits: `max_requests` active attempts and `max_pending` waiters.

Both refuse at once with 503 flag UO; nothing here queues.

- `max_requests` bounds the attempts in flight to the service (Envoy's cluster `max_requests`;
  retries count, as upstream requests). The balancer owns the active count (it already tracks
  every attempt until its response body completes): it adds to `ServiceLoad.active` below the
  limit, calls `ServiceLoad.admit()` at it (which refuses), and takes its count off when the
  attempt ends; a separate layer would cost a second body wrapper per request.
- `max_pending` bounds requests waiting for an upstream connection. Only the connection pool
  knows when a request waits (no idle connection, a connect in progress or the per-endpoint
  connection cap reached), so the pool wraps that wait in `with load.pending_slot(): ...`;
  entering a full slot raises `ConcurrencyError`. The pool finds the service's `ServiceLoad` through
  the `ServiceRegistry` by `Request.service.name`.

`ServiceLoad` also carries the retry layer's `retries_active` for the retry budget, because the
budget is a fraction of this load.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType

from sidecar.config import ServiceConfig
from sidecar.flags import Flag, PolicyError
from sidecar.policy.stats import ServiceStats


class ConcurrencyError(PolicyError):
    """The service is at `max_requests` or `max_pending`: 503 UO, answered at once."""

    FLAG = Flag.UPSTREAM_OVERFLOW


@dataclass(frozen=True, slots=True)
class ConcurrencyConfig:
    max_requests: int
    max_pending: int

    @classmethod
    def from_service(cls, cfg: ServiceConfig) -> ConcurrencyConfig:
        return cls(cfg.breaker.max_requests, cfg.breaker.max_pending)


class ServiceLoad:
    """Live counts for one service; survives config pushes (limits are re-applied)."""

    __slots__ = (
        "active",
        "max_pending",
        "max_requests",
        "pending",
        "retries_active",
        "stats",
    )

    def __init__(self, stats: ServiceStats, config: ConcurrencyConfig | None = None) -> None:
        self.stats = stats
        self.active = 0  # attempts in flight (head awaited or body not yet done)
        self.pending = 0  # attempts waiting for an upstream connection
        self.retries_active = 0  # retries scheduled or in flight (retry budget)
        self.max_requests = 1024
        self.max_pending = 1024
        if config is not None:
            self.configure(config)

    def configure(self, config: ConcurrencyConfig) -> None:
        self.max_requests = config.max_requests
        self.max_pending = config.max_pending

    def admit(self) -> None:
        """Count one more active attempt, or refuse it (503 UO) at `max_requests`."""
        if self.active >= self.max_requests:
            self.stats.overflows += 1
            raise ConcurrencyError(f"max_requests {self.max_requests} reached")
        self.active += 1

    def pending_slot(self) -> PendingSlot:
        """For the pool: `with load.pending_slot():` around waiting for a connection."""
        return PendingSlot(self)


class PendingSlot:
    """One request waiting for a connection; entering raises `ConcurrencyError` when full."""

    __slots__ = ("_entered", "_load")

    def __init__(self, load: ServiceLoad) -> None:
        self._load = load
        self._entered = False

    def __enter__(self) -> PendingSlot:
        load = self._load
        if load.pending >= load.max_pending:
            load.stats.overflows += 1
            raise ConcurrencyError(f"max_pending {load.max_pending} reached")
        load.pending += 1
        self._entered = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._entered:
            self._entered = False
            self._load.pending -= 1
