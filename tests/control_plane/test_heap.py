"""The heap trimmer: freed memory goes back to the operating system once a burst is over."""

from __future__ import annotations

import asyncio
import os

import pytest

from control_plane.app import ControlPlane
from control_plane.cache import CLUSTER_TYPE
from control_plane.heap import HeapTrimmer, glibc_trim
from tests.control_plane.ads_fixtures import AdsTestClient
from tests.control_plane.conftest import serving_plane


class Counted:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


async def poke_for(heap: HeapTrimmer, seconds: float, every: float = 0.01) -> None:
    for _ in range(round(seconds / every)):
        heap.poke()
        await asyncio.sleep(every)


async def test_it_trims_once_the_activity_stops_and_not_during_it() -> None:
    trim = Counted()
    heap = HeapTrimmer(trim, quiet=0.1, longest=10.0)
    await poke_for(heap, 0.3)
    assert trim.calls == 0
    await asyncio.sleep(0.25)
    assert trim.calls == 1
    await asyncio.sleep(0.2)
    assert trim.calls == 1  # nothing happened since: no second trim
    heap.close()


async def test_unbroken_activity_is_trimmed_after_the_longest_wait() -> None:
    trim = Counted()
    heap = HeapTrimmer(trim, quiet=0.1, longest=0.2)
    await poke_for(heap, 0.5)
    assert trim.calls >= 1
    heap.close()


def rss_mib() -> float:
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_the_glibc_trim_gives_freed_memory_back() -> None:
    trim = glibc_trim()
    if trim is None:
        pytest.skip("this C library has no malloc_trim (not glibc)")
    blocks = [bytes(1024) for _ in range(60_000)]  # ~60 MiB from malloc's main heap
    pinned = bytes(1024)  # above them: free() alone cannot shrink the heap
    del blocks
    before = rss_mib()
    trim()
    assert before - rss_mib() > 30
    assert len(pinned) == 1024


async def test_the_control_plane_trims_after_its_streams_go_quiet() -> None:
    async with serving_plane() as plane:
        plane.heap.quiet = 0.1
        await ask_once(plane)
        async with asyncio.timeout(3):
            while plane.heap.trims == 0:
                await asyncio.sleep(0.02)


async def ask_once(plane: ControlPlane) -> None:
    client = AdsTestClient(f"127.0.0.1:{plane.xds_port}")
    try:
        await client.send(CLUSTER_TYPE)
        await client.recv()
    finally:
        await client.close()
