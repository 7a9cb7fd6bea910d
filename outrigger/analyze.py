"""`outrigger analyze -f FILE|DIR|- [--mesh FILE] [-o text|json] [--max-amplification N]`.

Offline findings on Kubernetes manifests and a mesh file, like `istioctl analyze`: nothing is
contacted, the same validator the webhook and the control plane use checks every annotation,
and policy is resolved with the control plane's precedence (`outrigger.topology`). The checks:

- every input problem `outrigger.topology` reports (invalid annotations, unknown callees, ...);
- retry amplification along every call chain (`outrigger.chains`): the chain's deepest callee
  can receive the product of the attempts of every hop below the top for one request at the
  top; above `--max-amplification` (default 4) it is a `RetryAmplification` warning; loops are
  `CallCycle` warnings; when there are too many chains to list, the worst chain into each
  deepest service is still checked;
- per call, a callee whose timeout is longer than its caller's, or that has none while its
  caller has one (`CalleeTimeoutLonger`);
- per service: `per-try-timeout x (attempts + 1)` beyond `timeout` (`RetriesBeyondTimeout`),
  retries of non-idempotent requests without a retry budget
  (`NonIdempotentRetriesWithoutBudget`), and a per-endpoint breaker on a service with exactly
  one endpoint (`BreakerOnSingleEndpoint`; how endpoints are counted: `outrigger.topology`).

Exit status 0, or 1 when an error-level finding was found (warnings do not fail); 2 for a usage
error. The JSON output (`-o json`) is described in README.md, "outrigger analyze"; its
`apiVersion` changes if a field ever changes meaning.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, TextIO

from mesh.policy import format_duration
from outrigger.chains import MAX_CHAINS, Chain, Node, Walk, attempts, walk, worst_chains
from outrigger.findings import LEVELS, Finding, ObjectRef, finding
from outrigger.topology import Caller, Service, Topology, build, read_documents

API_VERSION: Final = "outrigger.dev/analyze/v1"
DEFAULT_MAX_AMPLIFICATION: Final = 4
_EPSILON: Final = 1e-9  # durations are whole nanoseconds
_LEVEL_WORDS: Final = {"error": "error", "warning": "warning", "info": "note"}


@dataclass(frozen=True, slots=True)
class Report:
    topology: Topology
    walk: Walk
    findings: tuple[Finding, ...]
    max_amplification: int
    mesh: str | None

    def count(self, level: str) -> int:
        return sum(1 for f in self.findings if f.code.level == level)

    @property
    def exit_status(self) -> int:
        return 1 if self.count("error") else 0


# -- names ----------------------------------------------------------------------------------


def _name(node: Node, home: str) -> str:
    """A node as a chain shows it: the bare name in the top's namespace, else name.namespace."""
    if isinstance(node, Caller):
        return f"{node.ref.kind}/{node.ref.name}" + (
            "" if node.namespace == home else f".{node.namespace}"
        )
    return node.name if node.namespace == home else f"{node.name}.{node.namespace}"


def chain_text(chain: Chain) -> str:
    """ "frontend -> orders x3 -> payments x2": each hop with its attempts when it retries."""
    home = chain.top.namespace
    parts = [_name(chain.top, home)]
    for hop in chain.hops[1:]:
        parts.append(_name(hop.node, home) + (f" x{hop.attempts}" if hop.attempts > 1 else ""))
    return " -> ".join(parts)


def _ref(node: Node) -> ObjectRef:
    return node.ref


# -- checks -----------------------------------------------------------------------------------


def _amplification(chain: Chain, limit: int) -> Finding:
    deepest, top = chain.deepest, chain.top
    home = top.namespace
    at_top = f"one call by {top.ref}" if isinstance(top, Caller) else f"one request to {top.name}"
    message = (
        f"{_name(deepest, home)} can receive {chain.amplification} requests for {at_top}: "
        f"{chain_text(chain)} (limit {limit})"
    )
    retrying = [h.node for h in chain.hops[1:] if h.attempts > 1]
    services = [n for n in retrying if isinstance(n, Service)]
    if len(services) == 1:
        fix = f"lower {services[0].where('retry-attempts')} to {limit - 1} or fewer retries"
    else:
        keep, *drop = services
        undo = [
            f'set {s.own("retry-attempts")} to "0"'
            if s.shared("retry-attempts")
            else f"remove {s.where('retry-attempts')}"
            for s in drop
        ]
        fix = (
            f"retry at one hop only: keep the retries of {_name(keep, home)}, "
            + ", ".join(undo)
            + f" (or lower them until the product is at most {limit})"
        )
    objects = (_ref(deepest), *(_ref(h.node) for h in chain.hops[:-1]))
    return finding("RetryAmplification", objects, message, fix)


def _cycle(loop: tuple[Service, ...]) -> Finding:
    home = loop[0].namespace
    names = [_name(s, home) for s in loop]
    factor = math.prod(attempts(s) for s in loop)
    turn = (
        f"with retries, each turn multiplies the requests by {factor}"
        if factor > 1
        else "each turn adds a request to every service in it"
    )
    message = f"{' -> '.join([*names, names[0]])}: a request can go round this loop; {turn}"
    fix = (
        "break the loop: remove one of these calls (outrigger.dev/calls or calls:), or make "
        "sure no request can go round it"
    )
    return finding("CallCycle", tuple(s.ref for s in loop), message, fix)


def _timeouts(topology: Topology) -> list[Finding]:
    found = []
    services = topology.services
    for caller in services.values():
        limit = caller.policy.timeout
        if limit is None:
            continue
        targets = {call.key(caller.namespace) for call in caller.calls}
        for key in sorted(targets):
            callee = services.get(key)
            if callee is None or callee is caller:
                continue
            own = callee.policy.timeout
            if own is not None and own <= limit + _EPSILON:
                continue
            has = "has no timeout" if own is None else f"has timeout {format_duration(own)}"
            message = (
                f"{callee.ref} {has}, longer than its caller {caller.ref}'s "
                f"{format_duration(limit)}: requests to {caller.name} give up while "
                f"{callee.name} still works on them"
            )
            verb = "set" if own is None else "lower"
            fix = f"{verb} {callee.where('timeout')} below {format_duration(limit)}"
            found.append(finding("CalleeTimeoutLonger", (callee.ref, caller.ref), message, fix))
    return found


def _retries_beyond_timeout(service: Service) -> Finding | None:
    retries, timeout = service.policy.retries, service.policy.timeout
    if retries is None or retries.attempts == 0 or timeout is None:
        return None
    per_try = retries.per_try_timeout
    if per_try is None:
        return None
    tries = retries.attempts + 1
    needed = per_try * tries
    if needed <= timeout + _EPSILON:
        return None
    fit = math.floor(timeout / per_try + _EPSILON)  # attempts that can run a whole per-try
    message = (
        f"{service.ref}: per-try-timeout {format_duration(per_try)} x {tries} attempts = "
        f"{format_duration(needed)} is beyond its {format_duration(timeout)} timeout: when "
        f"each attempt times out only {fit} fit, the last {tries - fit} can never run"
    )
    options = []
    if fit >= 2:
        options.append(f"lower {service.where('retry-attempts')} to {fit - 1}")
    shorter = math.floor(timeout / tries * 1000) / 1000
    if shorter > 0:
        options.append(f"lower {service.where('per-try-timeout')} to {format_duration(shorter)}")
    options.append(f"raise {service.where('timeout')} to {format_duration(needed)}")
    return finding("RetriesBeyondTimeout", service.ref, message, ", or ".join(options))


def _non_idempotent(service: Service) -> Finding | None:
    retries = service.policy.retries
    if retries is None or retries.attempts == 0 or not retries.non_idempotent:
        return None
    if retries.budget is not None:
        return None
    message = (
        f"{service.ref} retries non-idempotent requests (POST, PATCH) up to {retries.attempts} "
        "times with no retry budget: a failing upstream gets every such request again, and "
        "nothing caps the extra load"
    )
    fix = (
        f'set {service.where("retry-budget-percent")} (e.g. "20"), or set '
        f"{service.where('retry-non-idempotent')} to false"
    )
    return finding("NonIdempotentRetriesWithoutBudget", service.ref, message, fix)


def _single_endpoint_breaker(service: Service) -> Finding | None:
    breaker = service.policy.circuit_breaker
    endpoints = service.endpoints
    if breaker.consecutive_failures is None or endpoints is None or endpoints.count != 1:
        return None
    message = (
        f"{service.ref} has a per-endpoint breaker ({breaker.consecutive_failures} consecutive "
        f"failures) and one endpoint ({endpoints.why}): once it trips, every request gets "
        f"503 UH for {format_duration(breaker.open_for)} instead of reaching it"
    )
    fix = (
        f"run at least two endpoints (replicas: 2), or remove "
        f"{service.where('breaker-consecutive-failures')}"
    )
    return finding("BreakerOnSingleEndpoint", service.ref, message, fix)


def analyze(
    paths: Sequence[str],
    mesh: str | None = None,
    *,
    max_amplification: int = DEFAULT_MAX_AMPLIFICATION,
    stdin: TextIO | None = None,
    max_chains: int = MAX_CHAINS,
) -> Report:
    """Read the inputs and run every check."""
    documents, files, found = read_documents(paths, stdin if stdin is not None else sys.stdin)
    topology = build(documents, mesh)
    topology.inputs = files
    findings = [*found, *topology.findings]
    result = walk(topology, max_chains)
    findings += [
        _amplification(chain, max_amplification)
        for chain in result.chains
        if chain.amplification > max_amplification
    ]
    findings += [_cycle(loop) for loop in result.cycles]
    if result.truncated:
        findings.append(
            finding("ChainsTruncated", (),
                    f"the calls form more than {max_chains} chains; the first {max_chains} are "
                    "listed, and the worst chain into each deepest service is checked",
                    "analyze fewer services at a time (one namespace's manifests) to list them "
                    "all")
        )  # fmt: skip
        flagged = {c.deepest.key for c in result.chains if c.amplification > max_amplification}
        findings += [
            _amplification(chain, max_amplification)
            for chain in worst_chains(topology)
            if chain.amplification > max_amplification and chain.deepest.key not in flagged
        ]
    findings += _timeouts(topology)
    for service in sorted(topology.services.values(), key=lambda s: s.key):
        for check in (_retries_beyond_timeout, _non_idempotent, _single_endpoint_breaker):
            item = check(service)
            if item is not None:
                findings.append(item)
    return Report(
        topology=topology,
        walk=result,
        findings=tuple(sorted(findings, key=Finding.sort_key)),
        max_amplification=max_amplification,
        mesh=mesh,
    )


# -- output -----------------------------------------------------------------------------------


def _sorted_chains(report: Report) -> list[Chain]:
    return sorted(report.walk.chains, key=lambda c: (-c.amplification, chain_text(c)))


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def render_text(report: Report) -> str:
    lines: list[str] = []
    for item in report.findings:
        code = item.code
        level = code.level.capitalize()
        subject = ""
        if item.objects:
            first = item.objects[0]
            shown = first.source and first.source != str(first)
            subject = f" {first}" + (f" ({first.source})" if shown else "")
        lines.append(f"{level} [{code.code} {code.name}]{subject}")
        lines.append(f"    {item.message}")
        lines.append(f"    fix: {item.fix}")
    chains = _sorted_chains(report)
    if chains:
        if lines:
            lines.append("")
        lines.append(
            "Call chains: requests the deepest service can receive for one request at the top "
            f"(warning above {report.max_amplification})"
        )
        width = len(f"{chains[0].amplification:,}")
        for chain in chains:
            flag = "  <- above the limit" if chain.amplification > report.max_amplification else ""
            where = f"  [{chain.top.namespace}]" if chain.top.namespace else ""
            amount = f"{chain.amplification:,}".rjust(width)
            lines.append(f"  {amount}  {chain_text(chain)}{where}{flag}")
    topology = report.topology
    counts = [
        _plural(report.count(level), _LEVEL_WORDS[level]) for level in LEVELS if report.count(level)
    ]
    read = [_plural(len(topology.inputs), "file")] if topology.inputs or not report.mesh else []
    read += [report.mesh] if report.mesh else []
    scope = (
        " and ".join(read)
        + f": {_plural(topology.objects, 'object')}, {_plural(len(topology.services), 'service')}"
        + f", {_plural(len(report.walk.chains), 'call chain')}"
    )
    if lines:
        lines.append("")
    if counts:
        lines.append(f"Found {', '.join(counts)} in {scope}.")
    else:
        lines.append(f"No problems found in {scope}.")
    return "\n".join(lines) + "\n"


def _chain_json(chain: Chain, limit: int) -> dict[str, Any]:
    return {
        "top": chain.top.ref.as_json(),
        "hops": [
            {"object": hop.node.ref.as_json(), "attempts": hop.attempts, "requests": hop.requests}
            for hop in chain.hops
        ],
        "amplification": chain.amplification,
        "aboveLimit": chain.amplification > limit,
        "text": chain_text(chain),
    }


def render_json(report: Report) -> str:
    topology = report.topology
    document = {
        "apiVersion": API_VERSION,
        "inputs": topology.inputs,
        "mesh": report.mesh,
        "maxAmplification": report.max_amplification,
        "summary": {
            "errors": report.count("error"),
            "warnings": report.count("warning"),
            "info": report.count("info"),
            "objects": topology.objects,
            "services": len(topology.services),
            "chains": len(report.walk.chains),
        },
        "findings": [item.as_json() for item in report.findings],
        "chains": [_chain_json(c, report.max_amplification) for c in _sorted_chains(report)],
    }
    return json.dumps(document, indent=2) + "\n"


# -- the command --------------------------------------------------------------------------------


def amplification_limit(text: str) -> int:
    """--max-amplification: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def run_analyze(args: argparse.Namespace) -> int:
    report = analyze(
        args.file or [], args.mesh, max_amplification=args.max_amplification, stdin=sys.stdin
    )
    render = render_json if args.output == "json" else render_text
    sys.stdout.write(render(report))
    return report.exit_status
