"""`outrigger status`: the control plane's view of every sidecar, as a plain-text table.

The data comes from `control_plane.status` (CSDS); this module only renders it, with no
dependency beyond the standard library so the command works in the sidecar image.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TextIO

import grpc

from control_plane.status import (
    TYPE_COLUMNS,
    ProblemStatus,
    ProxyStatus,
    fetch_problems,
    fetch_status,
)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, two spaces apart (kubectl's style)."""
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in (header, *rows)
    ]
    return "\n".join(lines) + "\n"


def render(proxies: list[ProxyStatus], out: TextIO) -> None:
    if not proxies:
        out.write("no sidecars connected\n")
        return
    header = ["NODE", "SERVICE", *(f"{name} (sent/acked)" for name, _ in TYPE_COLUMNS), "LAST NACK"]
    rows = []
    for proxy in sorted(proxies, key=lambda p: (p.service, p.node_id)):
        cells = []
        nacks = []
        for name, _ in TYPE_COLUMNS:
            ts = proxy.types.get(name)
            if ts is None:
                cells.append("-")
                continue
            cells.append(f"{ts.status} {ts.version_sent[:8] or '-'}/{ts.version_acked[:8] or '-'}")
            if ts.last_nack:
                nacks.append(f"{name}: {ts.last_nack}")
        rows.append([proxy.node_id, proxy.service, *cells, "; ".join(nacks) or "-"])
    out.write(table(header, rows))


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
        proxies = fetch_status(args.control_plane)
        problems = fetch_problems(args.control_plane)
    except grpc.RpcError as exc:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        print(
            f"outrigger status: cannot ask the control plane at {args.control_plane}: "
            f"{code.name if code else exc}",
            file=sys.stderr,
        )
        return 1
    render(proxies, sys.stdout)
    render_problems(problems, sys.stdout)
    return 0
