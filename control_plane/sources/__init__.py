"""Where the control plane's mesh comes from: a mesh file, or the Kubernetes API (plus a mesh
file for the mesh-wide settings).

A source hands the control plane `Update`s: a whole, valid `mesh.model.Mesh` and the problems
it found on the way that did not stop it (an invalid annotation that fell back, a service named
both in the mesh file and in the cluster). An input it cannot use at all is a `SourceError`:
the control plane logs and counts it and keeps serving the last good mesh.

- `file.FileSource`: the mesh file, reloaded when it changes.
- `kubernetes.KubernetesSource`: Services, EndpointSlices and Namespaces, listed and watched.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from mesh.model import Mesh


class SourceError(Exception):
    """An input the source cannot use (the message names it and the problem)."""


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """The Kubernetes object a problem is about (an Event's `regarding`)."""

    kind: str
    name: str
    namespace: str = ""  # "" for cluster-scoped objects (Namespace)
    uid: str = ""
    api_version: str = "v1"

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}" if self.namespace else (
            f"{self.kind} {self.name}"
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class SourceProblem:
    """Something wrong in the input that the source worked around; shown until fixed."""

    reason: str  # InvalidPolicy | ServiceConflict
    message: str  # names the key, the value, the allowed form and what is used instead
    regarding: ObjectRef | None = None  # None: the mesh file
    key: str = ""
    value: str = ""

    @property
    def where(self) -> str:
        return str(self.regarding) if self.regarding is not None else "mesh file"

    def as_json(self) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "object": self.where,
            "key": self.key,
            "value": self.value,
            "message": self.message,
        }


@dataclass(frozen=True, slots=True)
class Update:
    mesh: Mesh
    problems: tuple[SourceProblem, ...] = ()


Publish = Callable[[Update | SourceError], Awaitable[bool]]


class Source(Protocol):
    description: str  # for logs: "mesh file mesh.yaml", "Kubernetes API https://..."

    async def first(self) -> Update:
        """The first whole state (raises SourceError when it cannot be had)."""
        ...

    async def run(self, publish: Publish) -> None:
        """Publish every later change (or refusal) until cancelled."""
        ...

    async def close(self) -> None: ...
