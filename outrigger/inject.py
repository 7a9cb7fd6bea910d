"""`outrigger inject -f FILE|- [--mesh FILE]`: the webhook's injection, offline, on manifests.

For clusters without the webhook: `outrigger inject -f app.yaml | kubectl apply -f -`. Each
document of a multi-document YAML stream is read; Pods and the pod templates of Deployments,
StatefulSets, DaemonSets, ReplicaSets, ReplicationControllers, Jobs and CronJobs go through
`control_plane.webhooks.inject.inject_pod`, the function the `/inject` webhook runs, with the
`injection:` settings and `tracing.otlp_endpoint` of `--mesh` (else the defaults); Lists are
walked item by item; every other document is written back untouched. Unlike the webhook, which
the API server calls only for selected pods, this injects every workload it is given except
those whose pod template opts out (label, or annotation, `outrigger.dev/inject: disabled`) or
is never injected.

Output is YAML on stdout (comments are not kept). What was skipped and why, and any warning,
goes to stderr. A value the webhook would deny stops the command with the reason and no output,
so a half-injected stream never reaches kubectl.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from control_plane.webhooks.inject import inject_pod
from mesh.injection import POD_TEMPLATES, Injection, InjectionError
from mesh.model import MeshError, load_mesh

Json = dict[str, Any]


class ManifestError(Exception):
    """A manifest that cannot be injected; the message names the file and the object."""


def _describe(document: Json) -> str:
    metadata = document.get("metadata") if isinstance(document.get("metadata"), dict) else {}
    assert isinstance(metadata, dict)
    name = metadata.get("name") or metadata.get("generateName") or "(unnamed)"
    namespace = metadata.get("namespace")
    return (
        f"{document.get('kind')} {namespace}/{name}"
        if namespace
        else f"{document.get('kind')} {name}"
    )


def _replace(document: Json, path: tuple[str, ...], value: Json) -> Json:
    """A copy of `document` with the mapping at `path` replaced (the rest shared)."""
    if not path:
        return value
    child = document.get(path[0])
    assert isinstance(child, dict)
    return {**document, path[0]: _replace(child, path[1:], value)}


class Injector:
    def __init__(self, injection: Injection, otlp_endpoint: str | None, source: str) -> None:
        self.injection = injection
        self.otlp_endpoint = otlp_endpoint
        self.source = source
        self.notes: list[str] = []  # for stderr

    def document(self, document: object) -> object:
        """The document with its pods injected; anything else as it was."""
        if not isinstance(document, dict):
            return document
        kind = document.get("kind")
        items = document.get("items")
        if isinstance(kind, str) and kind.endswith("List") and isinstance(items, list):
            return {**document, "items": [self.document(item) for item in items]}
        if kind not in POD_TEMPLATES:
            return document
        path = POD_TEMPLATES[kind]
        what = _describe(document)
        template: object = document
        for key in path:
            template = template.get(key) if isinstance(template, dict) else None
        if not isinstance(template, dict):
            raise ManifestError(f"{self.source}: {what}: {'.'.join(path)}: must be a pod template")
        metadata = document.get("metadata")
        namespace = metadata.get("namespace") if isinstance(metadata, dict) else None
        try:
            result = inject_pod(
                template,
                namespace=namespace or None,
                injection=self.injection,
                otlp_endpoint=self.otlp_endpoint,
            )
        except InjectionError as exc:
            where = ".".join(path)
            raise ManifestError(
                f"{self.source}: {what}: {where + ': ' if where else ''}{exc}"
            ) from None
        if result.skipped is not None:
            self.notes.append(f"{what}: not injected: {result.skipped}")
            return document
        self.notes += [f"{what}: warning: {warning}" for warning in result.warnings]
        return _replace(document, path, result.pod)


class _Dumper(yaml.SafeDumper):
    """Writes a mapping used twice in full, never as a YAML anchor and alias."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def inject_text(
    text: str, injection: Injection, source: str = "-", otlp_endpoint: str | None = None
) -> tuple[str, list[str]]:
    """The injected YAML stream and the notes for stderr. Raises ManifestError."""
    try:
        documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as exc:
        raise ManifestError(f"{source}: not valid YAML: {exc}") from None
    injector = Injector(injection, otlp_endpoint, source)
    out = [injector.document(doc) for doc in documents]
    # No line folding: the status annotation is one long JSON string.
    text = yaml.dump_all(out, Dumper=_Dumper, sort_keys=False, width=1 << 16)
    return text, injector.notes


def run_inject(args: argparse.Namespace) -> int:
    try:
        mesh = load_mesh(args.mesh) if args.mesh else None
    except MeshError as exc:
        print(f"outrigger inject: {exc}", file=sys.stderr)
        return 1
    try:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        print(f"outrigger inject: cannot read {args.file}: {exc}", file=sys.stderr)
        return 1
    try:
        output, notes = inject_text(
            text,
            mesh.injection if mesh else Injection(),
            "stdin" if args.file == "-" else args.file,
            mesh.tracing.otlp_endpoint if mesh else None,
        )
    except ManifestError as exc:
        print(f"outrigger inject: {exc}", file=sys.stderr)
        return 1
    for note in notes:
        print(f"outrigger inject: {note}", file=sys.stderr)
    sys.stdout.write(output)
    return 0
