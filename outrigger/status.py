"""`outrigger status`: every replica's view of its sidecars, merged into one plain-text table.

The data comes from `control_plane.status` (CSDS), asked of every replica by
`outrigger.replicas`; this module renders it: one row per sidecar and the replica it is
connected to, then the problems the control plane works around (once, however many replicas
report them), and on stderr each replica that did not answer. The exit status is 1 when any
did not: the table is then not the whole mesh.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TextIO

from control_plane.status import TYPE_COLUMNS, ProblemStatus
from outrigger.replicas import ReplicaError, ReplicaView, ask_all, replicas_for


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, two spaces apart (kubectl's style)."""
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in (header, *rows)
    ]
    return "\n".join(lines) + "\n"


def render(views: list[ReplicaView], out: TextIO) -> None:
    """One row per sidecar of every replica that answered, naming the replica."""
    rows = []
    for view in views:
        for proxy in view.proxies:
            cells = []
            nacks = []
            for name, _ in TYPE_COLUMNS:
                ts = proxy.types.get(name)
                if ts is None:
                    cells.append("-")
                    continue
                sent, acked = ts.version_sent[:8] or "-", ts.version_acked[:8] or "-"
                cells.append(f"{ts.status} {sent}/{acked}")
                if ts.last_nack:
                    nacks.append(f"{name}: {ts.last_nack}")
            row = [proxy.node_id, proxy.service, *cells, view.replica.name, "; ".join(nacks)]
            rows.append([cell or "-" for cell in row])
    if not rows:
        out.write("no sidecars connected\n")
        return
    header = [
        "NODE",
        "SERVICE",
        *(f"{name} (sent/acked)" for name, _ in TYPE_COLUMNS),
        "CONTROL PLANE",
        "LAST NACK",
    ]
    out.write(table(header, sorted(rows, key=lambda r: (r[1], r[0], r[-2]))))


def render_problems(problems: list[ProblemStatus], out: TextIO) -> None:
    """The problems the control plane works around, one per line, after the sidecars."""
    if not problems:
        return
    out.write("\n" + table(
        ["OBJECT", "REASON", "PROBLEM"],
        [[p.object, p.reason, p.message] for p in problems],
    ))  # fmt: skip


def run_status(args: argparse.Namespace) -> int:
    try:
        replicas = replicas_for(args)
    except ReplicaError as exc:
        print(f"outrigger status: {exc}", file=sys.stderr)
        return 1
    views = ask_all(replicas)
    answered = [v for v in views if not v.error]
    for view in views:
        if view.error:
            missing = " (its sidecars are not shown)" if answered else ""
            message = f"cannot ask the control plane {view.replica.where}: {view.error}{missing}"
            print(f"outrigger status: {message}", file=sys.stderr)
    if not answered:
        return 1
    render(answered, sys.stdout)
    problems = {(p.object, p.reason, p.key, p.message): p for v in answered for p in v.problems}
    render_problems([problems[k] for k in sorted(problems)], sys.stdout)
    return 1 if len(answered) < len(views) else 0
