"""Kubernetes Events for the problems the source works around (events.k8s.io/v1).

Each problem is posted once while it lasts, as a Warning Event regarding its object (a Service,
or a Namespace: Events about cluster-scoped objects live in namespace "default", as client-go's
recorder puts them), reason `InvalidPolicy`, action `ResolvePolicy`, and a note that names the
key, the value, the allowed form and the value used instead, so `kubectl describe service` and
`kubectl events` show it. A problem that goes away and comes back is posted again. Posting never
blocks the control plane: a failure is logged and tried again with the next update.

events.k8s.io/v1 rather than core v1 Events: it is the API client-go's recorder uses since
Kubernetes 1.19, and the same objects show up in `kubectl get events` (core v1) too.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Iterable
from typing import Any, Final

from control_plane.sources import SourceProblem

log = logging.getLogger("outrigger.control_plane.kubernetes")

REPORTING_CONTROLLER: Final = "outrigger.dev/control-plane"
ACTION: Final = "ResolvePolicy"
NOTE_LIMIT: Final = 1024  # bytes, the API's limit on `note`


def event_body(problem: SourceProblem, instance: str, now: datetime.datetime) -> dict[str, Any]:
    """An events.k8s.io/v1 Event for `problem` (which must have a `regarding` object)."""
    ref = problem.regarding
    assert ref is not None
    namespace = ref.namespace or "default"
    note = problem.message.encode()[:NOTE_LIMIT].decode("utf-8", "ignore")
    regarding = {"apiVersion": ref.api_version, "kind": ref.kind, "name": ref.name}
    if ref.namespace:
        regarding["namespace"] = ref.namespace
    if ref.uid:
        regarding["uid"] = ref.uid
    return {
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        "metadata": {"generateName": f"{ref.name}.", "namespace": namespace},
        "eventTime": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "reportingController": REPORTING_CONTROLLER,
        "reportingInstance": instance[:128],
        "action": ACTION,
        "reason": problem.reason,
        "type": "Warning",
        "note": note,
        "regarding": regarding,
    }


class EventRecorder:
    """Posts each current problem once; `events_api` is an `EventsV1Api`."""

    def __init__(self, events_api: Any, instance: str) -> None:
        self.events_api = events_api
        self.instance = instance
        self.posted: set[SourceProblem] = set()
        self.failures = 0

    async def record(self, problems: Iterable[SourceProblem]) -> None:
        current = {p for p in problems if p.regarding is not None}
        self.posted &= current  # gone ones may be posted again if they come back
        for problem in sorted(current - self.posted, key=lambda p: (p.where, p.key)):
            body = event_body(problem, self.instance, datetime.datetime.now(datetime.UTC))
            try:
                await self.events_api.create_namespaced_event(
                    body["metadata"]["namespace"], body, _request_timeout=(10, 10)
                )
            except Exception as exc:  # the API client raises ApiException and aiohttp errors
                self.failures += 1
                log.warning("cannot post the Event for %s (%s): %s", problem.where, problem.key,
                            exc)  # fmt: skip
                continue
            self.posted.add(problem)
