"""What `outrigger analyze` reports: findings, each with a stable code, and the objects involved.

A finding is a value: a code from `CODES` (its name and level come with it), the objects it is
about (the first is the one to change, where there is one), a one-line message and a one-line
fix. Codes never change meaning; new checks get new codes. Levels:

- `error`: the objects are refused or not used as written (an invalid annotation, a mesh file
  the control plane would not load, a manifest that is not YAML). `outrigger analyze` exits 1.
- `warning`: accepted, but the policy does something the author probably did not mean
  (retry amplification, a callee that outlives its caller, ...).
- `info`: worth knowing, nothing to fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias

Level: TypeAlias = Literal["error", "warning", "info"]
LEVELS: Final[tuple[Level, ...]] = ("error", "warning", "info")


@dataclass(frozen=True, slots=True)
class Code:
    code: str  # "OR0201"
    name: str  # "RetryAmplification"
    level: Level
    what: str  # one line, for the README's table


CODES: Final[dict[str, Code]] = {
    c.name: c
    for c in (
        Code("OR0001", "InvalidInput", "error",
             "a file that cannot be read, is not YAML, or holds something that is not a "
             "Kubernetes object"),
        Code("OR0002", "InvalidMeshFile", "error",
             "the --mesh file is refused, with the control plane's message"),
        Code("OR0101", "InvalidAnnotation", "error",
             "an outrigger.dev/ annotation the webhook would deny; the control plane's Event "
             "message, with the value it uses instead"),
        Code("OR0102", "UnknownCallee", "warning",
             "outrigger.dev/calls (or calls:) names a service that is not among the inputs"),
        Code("OR0103", "ServiceConflict", "warning",
             "a service both in the manifests and in the mesh file (the manifests' is used, as "
             "the control plane does)"),
        Code("OR0104", "MisplacedAnnotation", "warning",
             "a policy annotation on a workload or pod template, where nothing reads it"),
        Code("OR0201", "RetryAmplification", "warning",
             "a call chain whose deepest callee can receive more than --max-amplification "
             "requests for one request at the top"),
        Code("OR0202", "CallCycle", "warning",
             "services that call each other in a loop: retries multiply on every turn"),
        Code("OR0203", "ChainsTruncated", "info",
             "more call chains than analyze lists (1,000); the worst chain into each deepest "
             "service is still checked"),
        Code("OR0301", "CalleeTimeoutLonger", "warning",
             "a callee whose timeout is longer than its caller's (or has none): the caller gives "
             "up while the callee still works"),
        Code("OR0302", "RetriesBeyondTimeout", "warning",
             "per-try-timeout x (attempts + 1) beyond the total timeout: the last retries can "
             "never run"),
        Code("OR0303", "NonIdempotentRetriesWithoutBudget", "warning",
             "retries of non-idempotent requests (POST, PATCH) without a retry budget"),
        Code("OR0304", "BreakerOnSingleEndpoint", "warning",
             "a per-endpoint breaker on a service with one endpoint: it can only turn errors "
             "into 503 UH"),
    )
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """An object a finding is about: a Kubernetes object, a mesh file entry, or a file."""

    kind: str  # "Service", "Namespace", "Deployment", ..., "MeshService", "File"
    name: str
    namespace: str = ""  # "" for cluster-scoped objects and files
    source: str = ""  # where it was read: "k8s/examples/shop.yaml:24", "mesh.yaml"

    def __str__(self) -> str:
        if self.kind == "File":
            return self.name
        return f"{self.kind} {self.namespace}/{self.name}" if self.namespace else (
            f"{self.kind} {self.name}"
        )  # fmt: skip

    def as_json(self) -> dict[str, str]:
        return {
            "kind": self.kind,
            "namespace": self.namespace,
            "name": self.name,
            "source": self.source,
        }


@dataclass(frozen=True, slots=True)
class Finding:
    name: str  # a key of CODES
    objects: tuple[ObjectRef, ...]
    message: str
    fix: str

    @property
    def code(self) -> Code:
        return CODES[self.name]

    def sort_key(self) -> tuple[Any, ...]:
        first = self.objects[0] if self.objects else ObjectRef("", "")
        return (
            LEVELS.index(self.code.level),
            self.code.code,
            first.namespace,
            first.name,
            first.kind,
            self.message,
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "code": self.code.code,
            "name": self.name,
            "level": self.code.level,
            "objects": [o.as_json() for o in self.objects],
            "message": self.message,
            "fix": self.fix,
        }


def finding(
    name: str, objects: tuple[ObjectRef, ...] | ObjectRef, message: str, fix: str
) -> Finding:
    """A Finding, checking that `name` is a known code."""
    if name not in CODES:
        raise KeyError(f"no finding code named {name}")
    refs = objects if isinstance(objects, tuple) else (objects,)
    return Finding(name, refs, message, fix)
