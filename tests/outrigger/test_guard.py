"""The demo's latency guard on plain numbers: the load's p50 against frontend's sidecar's, and
who is to blame when they disagree."""

from __future__ import annotations

from outrigger.demo.guard import judge

MS = 0.001


def test_a_load_p50_near_the_sidecars_passes() -> None:
    v = judge(500, 100.0, load_p50=6 * MS, frontend_p50=5 * MS, lag_p50=0.1 * MS, lag_p99=1 * MS)
    assert v.judged and v.ok
    assert v.bound is not None and abs(v.bound - 15 * MS) < 1e-9
    assert "6.0 ms <= 2 x frontend's 5.0 ms + 5 ms = 15.0 ms" in v.reason


def test_a_slow_load_whose_generator_ran_late_blames_the_demo() -> None:
    # the numbers of issue 14 on a busy 2-core machine: seconds at the load, 100 ms at frontend
    v = judge(500, 100.0, load_p50=2.1, frontend_p50=0.1, lag_p50=1.9, lag_p99=8.0)
    assert v.judged and not v.ok and v.own_lag
    assert "2100.0 ms > 2 x frontend's 100.0 ms + 5 ms = 205.0 ms" in v.reason
    assert "cause: the demo's own lag" in v.reason
    assert "not the mesh's" in v.reason


def test_a_slow_load_with_a_punctual_generator_does_not_blame_the_demo() -> None:
    v = judge(500, 100.0, load_p50=40 * MS, frontend_p50=5 * MS, lag_p50=0.1 * MS, lag_p99=2 * MS)
    assert v.judged and not v.ok and not v.own_lag
    assert "not the load generator's own lag" in v.reason


def test_a_long_tail_of_lag_alone_is_enough_to_blame_the_demo() -> None:
    v = judge(500, 100.0, load_p50=40 * MS, frontend_p50=5 * MS, lag_p50=1 * MS, lag_p99=60 * MS)
    assert not v.ok and v.own_lag


def test_nothing_is_judged_while_requests_fail_or_without_traffic() -> None:
    failing = judge(500, 97.0, load_p50=2.0, frontend_p50=0.1, lag_p50=0.0, lag_p99=0.0)
    assert not failing.judged and failing.ok
    assert "97.0% success" in failing.reason
    empty = judge(0, None, None, None, None, None)
    assert not empty.judged and "no healthy traffic" in empty.reason
