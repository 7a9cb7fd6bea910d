"""The mesh file as the control plane's source: loaded, then reloaded when it changes.

The file is watched by `control_plane.watch.FileWatcher` (polled, debounced); an edit that does
not validate is published as a `SourceError`, so the control plane keeps the last good mesh.
"""

from __future__ import annotations

from pathlib import Path

from control_plane.sources import Publish, SourceError, Update
from control_plane.watch import FileWatcher
from mesh.model import Mesh, MeshError, load_mesh


def read_mesh(path: Path) -> Mesh:
    """The mesh in `path`; a SourceError names the file and the problem."""
    try:
        return load_mesh(path)
    except MeshError as exc:
        raise SourceError(str(exc)) from None


class FileSource:
    def __init__(self, path: Path, *, poll_interval: float = 0.1, debounce: float = 0.2) -> None:
        self.path = path
        self.description = f"mesh file {path}"
        self._publish: Publish | None = None
        # Fingerprinted now, before the first read: an edit after this point is never missed.
        self._watcher = FileWatcher(
            path, self._reload, poll_interval=poll_interval, debounce=debounce
        )

    async def first(self) -> Update:
        return Update(read_mesh(self.path))

    async def run(self, publish: Publish) -> None:
        self._publish = publish
        await self._watcher.run()

    async def _reload(self) -> None:
        try:
            update: Update | SourceError = Update(read_mesh(self.path))
        except SourceError as exc:
            update = exc
        if self._publish is not None:
            await self._publish(update)

    async def close(self) -> None:
        return None
