"""Every command line the chart runs in the image (ENTRYPOINT ["outrigger"]), and the ones the
injector will run, is accepted by `outrigger`'s own argument parser, flags and values.

Some flags belong to work that lands separately. They are listed in PENDING with the issue that
adds them: while such a flag is missing the test passes, but any other missing flag fails it, and
so does a PENDING flag that has landed (delete its line: from then on it is checked like the
rest). That keeps main green while the issues land in any order, and strict once they have.
"""

from __future__ import annotations

import argparse
from typing import Any

import yaml

from outrigger.cli import build_parser
from tests.helm.chart import SCENARIOS, find, objects

# (command, flag) -> issue; (command, "") means the subcommand itself.
PENDING: dict[tuple[str, str], int] = {
    ("control-plane", "--webhook"): 15,
    ("control-plane", "--webhook-cert"): 15,
    ("control-plane", "--webhook-key"): 15,
    ("control-plane", "--namespaces"): 15,
    ("control-plane", "--debounce"): 15,
    # certificates=self: the control plane makes its CA (issue 17's control-plane half).
    ("control-plane", "--webhook-secret"): 17,
    ("control-plane", "--webhook-dns-name"): 17,
    ("control-plane", "--mutating-webhook-configuration"): 17,
    ("control-plane", "--validating-webhook-configuration"): 17,
    ("sidecar", "--health"): 16,
    ("sidecar", "--metrics"): 16,
    ("sidecar", "--log-level"): 16,
    ("sidecar", "--trace-sampling"): 16,
    ("iptables", ""): 16,
    ("wait", ""): 16,
    ("inject", ""): 16,
}


def chart_command_lines() -> list[list[str]]:
    """The control plane's args in every scenario (the image's entrypoint is `outrigger`)."""
    lines = []
    for values in SCENARIOS.values():
        deployment = find(
            objects(values), "Deployment", None if "fullnameOverride" in values else "outrigger"
        )
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            assert "command" not in container, "the chart relies on the image's entrypoint"
            lines.append(container["args"])
    return lines


def injector_command_lines() -> list[list[str]]:
    """What the injector runs in a pod (README.md, "Command line"; issue 16), with the
    ports and addresses the chart's mesh file gives it. Replace with the injector's own output
    once it exists (an `outrigger inject` of a pod, its containers' args)."""
    mesh_text = find(objects(), "ConfigMap", "outrigger-mesh")["data"]["mesh.yaml"]
    injection: dict[str, Any] = yaml.safe_load(mesh_text)["injection"]
    ports = injection["ports"]
    return [
        [
            "sidecar",
            f"--control-plane={injection['control_plane']}",
            f"--inbound=0.0.0.0:{ports['inbound']}",
            f"--outbound=127.0.0.1:{ports['outbound']}",
            f"--admin=127.0.0.1:{ports['admin']}",
            f"--health=0.0.0.0:{ports['health']}",
            f"--metrics=0.0.0.0:{ports['metrics']}",
            "--snapshot-cache=/var/run/outrigger/snapshot",
            f"--log-level={injection['proxy_log_level']}",
            "--trace-sampling=0.01",
            "--otlp-endpoint=http://jaeger.outrigger-system.svc:4317",
        ],
        ["iptables", "--dry-run"],
        ["wait", "--timeout=60s"],
        ["inject", "-f", "pod.yaml", "--mesh=/etc/outrigger/mesh.yaml"],
    ]


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def refusals(argv: list[str]) -> list[tuple[str, str]]:
    """(command, flag) pairs the CLI does not know; a known flag with a bad value fails here."""
    parser = build_parser()
    command = argv[0]
    if command not in subcommands(parser):
        return [(command, "")]
    _, extra = parser.parse_known_args(argv)  # exits (fails the test) on a bad value
    return [(command, a.split("=", 1)[0]) for a in extra if a.startswith("-")]


def test_every_command_line_the_chart_and_injector_run_is_accepted_by_the_cli() -> None:
    lines = chart_command_lines() + injector_command_lines()
    missing = {pair for argv in lines for pair in refusals(argv)}
    unpromised = sorted(pair for pair in missing if pair not in PENDING)
    assert not unpromised, f"the CLI does not accept what the chart/injector run: {unpromised}"
    used = {(argv[0], a.split("=", 1)[0]) for argv in lines for a in argv[1:] if a.startswith("--")}
    used |= {(argv[0], "") for argv in lines}
    landed = sorted(pair for pair in PENDING if pair in used and pair not in missing)
    assert not landed, f"these have landed: delete them from PENDING so they stay checked: {landed}"
    stale = sorted(pair for pair in PENDING if pair not in used)
    assert not stale, f"PENDING lists what nothing runs: {stale}"


def test_the_check_refuses_an_unknown_flag_and_a_bad_value() -> None:
    assert refusals(["control-plane", "--mesh=/m.yaml", "--no-such-flag=1"]) == [
        ("control-plane", "--no-such-flag")
    ]
    assert refusals(["no-such-command"]) == [("no-such-command", "")]
    assert refusals(["status", "--control-plane=127.0.0.1:15010"]) == []
