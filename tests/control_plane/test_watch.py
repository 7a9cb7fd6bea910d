"""The mesh file watcher: polling sees every kind of edit, bursts are debounced into one call."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from control_plane.watch import FileWatcher


async def _wait_for(predicate: object, timeout: float = 3.0) -> None:
    assert callable(predicate)
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_a_burst_of_five_edits_is_one_call(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text("v0\n")
    calls: list[str] = []
    watcher = FileWatcher(path, lambda: calls.append(path.read_text()), debounce=0.2)
    task = asyncio.create_task(watcher.run())
    try:
        for i in range(1, 6):
            path.write_text(f"v{i}\n")
            await asyncio.sleep(0.05)
        await _wait_for(lambda: calls)
        await asyncio.sleep(0.5)  # a second call would come within this
        assert calls == ["v5\n"]
    finally:
        task.cancel()


async def test_separate_edits_are_separate_calls(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text("a\n")
    calls: list[str] = []
    watcher = FileWatcher(path, lambda: calls.append(path.read_text()), debounce=0.1)
    task = asyncio.create_task(watcher.run())
    try:
        path.write_text("b\n")
        await _wait_for(lambda: len(calls) == 1)
        path.write_text("c\n")
        await _wait_for(lambda: len(calls) == 2)
        assert calls == ["b\n", "c\n"]
    finally:
        task.cancel()


async def test_same_size_rewrite_with_the_same_mtime_is_seen(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text("aaaa\n")
    st = path.stat()
    calls: list[str] = []
    watcher = FileWatcher(path, lambda: calls.append(path.read_text()), debounce=0.05)
    task = asyncio.create_task(watcher.run())
    try:
        path.write_text("bbbb\n")
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        await _wait_for(lambda: calls)
        assert calls == ["bbbb\n"]
    finally:
        task.cancel()


async def test_continuous_edits_still_reload_within_max_delay(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text("0\n")
    calls: list[str] = []
    watcher = FileWatcher(path, lambda: calls.append(path.read_text()), debounce=0.2, max_delay=0.5)
    task = asyncio.create_task(watcher.run())
    try:
        loop = asyncio.get_running_loop()
        start = loop.time()
        i = 0
        while not calls:
            assert loop.time() - start < 1.0, "edits every 50 ms starved the reload"
            i += 1
            path.write_text(f"{i}\n")
            await asyncio.sleep(0.05)
    finally:
        task.cancel()


async def test_a_missing_file_is_not_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text("a\n")
    calls: list[str] = []
    watcher = FileWatcher(path, lambda: calls.append("called"), debounce=0.05)
    task = asyncio.create_task(watcher.run())
    try:
        path.unlink()
        await asyncio.sleep(0.4)
        assert calls == []
        path.write_text("b\n")
        await _wait_for(lambda: calls)
    finally:
        task.cancel()
