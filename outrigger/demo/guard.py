"""The demo's latency guard: are the latencies the demo shows the mesh's, or the demo's own?

Over the story's healthy windows (before the first failure, and from the restore on) the load
generator's p50 (exact, from each request's due time) is compared with frontend's sidecar's
inbound p50 (its histogram, interpolated). They measure nearly the same thing: the load's
requests are the frontend sidecar's inbound requests. When the load's p50 is above 2x the
sidecar's + 5 ms, the difference was spent outside the mesh's own timing: in the load generator
(its timer fired late: the demo is short of CPU) or between it and the sidecar (kernel queues, a
sidecar that reads late because it is starved). The guard says which, and `outrigger demo` exits
non-zero, so that numbers that describe the machine are not read as the mesh's.
"""

from __future__ import annotations

from dataclasses import dataclass

FACTOR = 2.0
SLACK = 0.005  # seconds
HEALTHY = 99.0  # % success: below it something was failing, and the guard does not judge


@dataclass(frozen=True)
class Verdict:
    judged: bool  # False: nothing healthy to compare (say why in `reason`)
    ok: bool
    bound: float | None  # seconds
    reason: str
    own_lag: bool = False  # the demo's own lag is the cause


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def judge(
    requests: int,
    success: float | None,
    load_p50: float | None,
    frontend_p50: float | None,
    lag_p50: float | None,
    lag_p99: float | None,
) -> Verdict:
    """The verdict on one healthy period: the load's figures, frontend's sidecar's inbound p50
    and the load generator's timer lag over the same time."""
    if requests == 0 or load_p50 is None or frontend_p50 is None:
        return Verdict(
            False, True, None, "no healthy traffic to compare (none answered, or no reading)"
        )
    if success is None or success < HEALTHY:
        return Verdict(
            False,
            True,
            None,
            f"requests failed in the healthy windows ({success or 0:.1f}% success): "
            "not comparing latencies while something fails",
        )
    bound = FACTOR * frontend_p50 + SLACK
    if load_p50 <= bound:
        return Verdict(
            True,
            True,
            bound,
            f"load p50 {_ms(load_p50)} <= 2 x frontend's {_ms(frontend_p50)} + 5 ms = {_ms(bound)}",
        )
    excess = load_p50 - frontend_p50
    over = f"load p50 {_ms(load_p50)} > 2 x frontend's {_ms(frontend_p50)} + 5 ms = {_ms(bound)}"
    lag50 = lag_p50 or 0.0
    lag99 = lag_p99 or 0.0
    if lag50 >= excess / 2 or lag99 >= excess:
        return Verdict(
            True,
            False,
            bound,
            f"{over}; cause: the demo's own lag: its load generator's timer fired "
            f"p50 {_ms(lag50)} / p99 {_ms(lag99)} late, so its requests went out late: the demo "
            "could not keep time, as on a machine short of CPU (see the CPU lines). These "
            "latencies are the demo's, not the mesh's",
            own_lag=True,
        )
    return Verdict(
        True,
        False,
        bound,
        f"{over}; not the load generator's own lag (p50 {_ms(lag50)} / p99 {_ms(lag99)}): the "
        "time goes between it and the frontend sidecar's timer (the kernel's queues, or a "
        "sidecar that reads late because it is short of CPU)",
    )
