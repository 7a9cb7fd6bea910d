"""Every command line the chart runs in the image (ENTRYPOINT ["outrigger"]), and the ones the
injector runs in a pod, is accepted by `outrigger`'s own argument parser, flags and values; and
every command line k8s/examples runs in that image (`python -m MODULE ...`: the demo's app and
the load generator) by that module's parser.

Some flags belong to work that lands separately. They are listed in PENDING with the issue that
adds them: while such a flag is missing the test passes, but any other missing flag fails it, and
so does a PENDING flag that has landed (delete its line: from then on it is checked like the
rest). That keeps main green while the issues land in any order, and strict once they have.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import pytest
import yaml

from control_plane.webhooks.inject import inject_pod
from mesh.injection import POD_TEMPLATES, parse_injection
from outrigger.cli import build_parser
from tests.control_plane.webhooks.pods import template_of
from tests.helm.chart import SCENARIOS, find, objects

EXAMPLES = Path(__file__).resolve().parents[2] / "k8s" / "examples"
# What k8s/examples may run besides `outrigger`: the modules the image ships for the demo.
EXAMPLE_MODULES = ("outrigger.demo.service", "outrigger.loadgen")

# (command, flag) -> issue; (command, "") means the subcommand itself.
PENDING: dict[tuple[str, str], int] = {}


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
    """What the injector runs in a pod, given the chart's mesh file: the command lines of the
    containers and postStart hook it adds (native and plain-container modes, a pod setting
    every annotation), and `outrigger inject` itself."""
    mesh_text = find(objects(), "ConfigMap", "outrigger-mesh")["data"]["mesh.yaml"]
    mesh = yaml.safe_load(mesh_text)
    injection = parse_injection(mesh["injection"])
    otlp_endpoint = mesh.get("tracing", {}).get("otlp_endpoint")
    lines = []
    for native in ("true", "false"):
        pod = {
            "metadata": {
                "annotations": {
                    "outrigger.dev/native-sidecar": native,
                    "outrigger.dev/trace-sampling": "0.5",
                    "outrigger.dev/exclude-outbound-ports": "5432",
                    "outrigger.dev/include-outbound-cidrs": "10.0.0.0/8",
                    "outrigger.dev/exclude-outbound-cidrs": "10.96.0.1/32",
                }
            },
            "spec": {"containers": [{"name": "app", "image": "app:1"}]},
        }
        spec = inject_pod(
            pod, namespace="shop", injection=injection, otlp_endpoint=otlp_endpoint
        ).pod["spec"]
        for container in spec["initContainers"] + spec["containers"]:
            if container["name"].startswith("outrigger-"):
                assert container["command"] == ["outrigger"]
                lines.append(container["args"])
                hook = container.get("lifecycle", {}).get("postStart", {}).get("exec")
                if hook:
                    assert hook["command"][0] == "outrigger"
                    lines.append(hook["command"][1:])
    return [*lines, ["inject", "-f", "pod.yaml", "--mesh=/etc/outrigger/mesh.yaml"]]


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


def example_command_lines() -> list[tuple[str, list[str]]]:
    """(module, args) of every container in k8s/examples: `python -m MODULE`, or the image's
    entrypoint (`outrigger`) when the container sets no command."""
    lines = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None or doc["kind"] not in POD_TEMPLATES:
                continue
            spec = template_of(doc)["spec"]
            for container in spec.get("initContainers", []) + spec["containers"]:
                command = container.get("command", ["outrigger"])
                if command == ["outrigger"]:
                    lines.append(("outrigger.cli", container.get("args", [])))
                    continue
                assert command[:2] == ["python", "-m"] and len(command) == 3, command
                lines.append((command[2], container.get("args", [])))
    return lines


@pytest.mark.parametrize(
    ("module", "argv"), example_command_lines(), ids=[m for m, _ in example_command_lines()]
)
def test_every_command_line_the_examples_run_is_accepted_by_its_module(
    module: str, argv: list[str]
) -> None:
    assert module in (*EXAMPLE_MODULES, "outrigger.cli"), f"{module}: not a module the image runs"
    parser: argparse.ArgumentParser = importlib.import_module(module).build_parser()
    parser.parse_args(argv)  # exits (fails the test) on an unknown flag or a bad value


def test_the_examples_run_the_demo_app_and_the_load_generator() -> None:
    assert {module for module, _ in example_command_lines()} == set(EXAMPLE_MODULES)
