"""`outrigger inject`: the webhook's injection on manifests, offline."""

from __future__ import annotations

import copy
import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from control_plane.webhooks.inject import IPTABLES_FLAGS, SIDECAR_FLAGS
from mesh.injection import POD_TEMPLATES, Injection
from outrigger.cli import main
from outrigger.inject import inject_text
from tests.control_plane.webhooks.pods import assert_valid, pod, template_of
from tests.control_plane.webhooks.reviews import admission_review, inject_in_process, patched

Json = dict[str, Any]
OUTRIGGER = Path(sys.executable).with_name("outrigger")
WORKLOADS = Path(__file__).parent / "manifests" / "workloads.yaml"
MESH = """
tracing: {otlp_endpoint: "http://jaeger.tracing.svc:4317"}
injection:
  image: registry.example/outrigger:9.9
  native_sidecar: false
"""


def run(
    capsys: pytest.CaptureFixture[str], *args: str, stdin: str | None = None
) -> tuple[int, str, str]:
    if stdin is not None:
        sys.stdin = io.StringIO(stdin)
    try:
        code = main(["inject", *args])
    finally:
        sys.stdin = sys.__stdin__
    out, err = capsys.readouterr()
    return code, out, err


def by_name(documents: list[Json]) -> dict[str, Json]:
    flat: list[Json] = []
    for document in documents:
        flat += document["items"] if document["kind"] == "List" else [document]
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in flat}


def containers(template: Json) -> tuple[list[str], list[str]]:
    spec = template["spec"]
    return [c["name"] for c in spec.get("initContainers", [])], [
        c["name"] for c in spec["containers"]
    ]


def test_every_workload_kind_is_injected_and_everything_else_passes_through(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run(capsys, "-f", str(WORKLOADS))
    assert code == 0
    before = by_name(list(yaml.safe_load_all(WORKLOADS.read_text())))
    after = by_name(list(yaml.safe_load_all(out)))
    assert after.keys() == before.keys()
    for name, document in after.items():
        assert_valid(document)
        if document["kind"] not in POD_TEMPLATES or name == "Deployment/legacy":
            assert document == before[name], name
            continue
        inits, main = containers(template_of(document))
        native = name != "ReplicaSet/worker"  # the one whose template asks for a plain container
        if native:
            assert inits[:2] == ["outrigger-init", "outrigger-proxy"], name
        else:
            assert (inits[0], main[0]) == ("outrigger-init", "outrigger-proxy"), name
    # the pod template's own init container stays after the proxy
    assert containers(template_of(after["Deployment/web"])) == (
        ["outrigger-init", "outrigger-proxy", "migrate"],
        ["web"],
    )
    assert err.splitlines() == [
        "outrigger inject: Job shop/report: warning: annotation outrigger.dev/native-sidecar: "
        '"false" is ignored: a pod that runs to completion (restartPolicy Never) gets the '
        "native sidecar, so it can finish",
        "outrigger inject: Deployment shop/legacy: not injected: annotation outrigger.dev/inject "
        "is disabled",
    ]


def test_the_mesh_file_sets_the_image_and_plain_containers_except_for_jobs(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(MESH)
    code, out, _ = run(capsys, "-f", str(WORKLOADS), "--mesh", str(mesh))
    assert code == 0
    after = by_name(list(yaml.safe_load_all(out)))
    deployment = template_of(after["Deployment/web"])
    assert containers(deployment) == (["outrigger-init", "migrate"], ["outrigger-proxy", "web"])
    proxy = deployment["spec"]["containers"][0]
    assert proxy["image"] == "registry.example/outrigger:9.9"
    assert proxy["args"][proxy["args"].index("--otlp-endpoint") + 1] == (
        "http://jaeger.tracing.svc:4317"
    )
    for job in ("Job/report", "CronJob/cleanup"):
        assert containers(template_of(after[job]))[0][:2] == ["outrigger-init", "outrigger-proxy"]


def test_injecting_the_output_again_changes_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    _, once, _ = run(capsys, "-f", str(WORKLOADS))
    code, twice, err = run(capsys, "-f", "-", stdin=once)
    assert code == 0
    assert twice == once
    assert "not injected: already injected" in err


def test_a_bad_annotation_stops_the_command_with_no_output(
    capsys: pytest.CaptureFixture[str],
) -> None:
    manifest = WORKLOADS.read_text().replace(
        'exclude-outbound-ports: "5432"', 'exclude-outbound-ports: "postgres"'
    )
    code, out, err = run(capsys, "-f", "-", stdin=manifest)
    assert (code, out) == (1, "")
    assert err == (
        "outrigger inject: stdin: Deployment shop/web: spec.template: annotation "
        "outrigger.dev/exclude-outbound-ports: must be ports from 1 to 65535, comma-separated in "
        'an annotation (e.g. "3306,6379"), got "postgres"\n'
    )


def test_an_unquoted_annotation_number_is_refused_before_kubectl_would(
    capsys: pytest.CaptureFixture[str],
) -> None:
    manifest = yaml.safe_dump(pod(annotations={"outrigger.dev/trace-sampling": 0.5}))
    code, out, err = run(capsys, "-f", "-", stdin=manifest)
    assert (code, out) == (1, "")
    assert 'must be a string (quote it in YAML: "0.5")' in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-f", "/nonexistent/app.yaml"], "outrigger inject: cannot read /nonexistent/app.yaml"),
        (["-f", "-", "--mesh", "/nonexistent/mesh.yaml"], "cannot read the mesh file"),
    ],
)
def test_unreadable_inputs_are_named(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code, out, err = run(capsys, *args, stdin="")
    assert (code, out) == (1, "")
    assert message in err


def test_invalid_yaml_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "-f", "-", stdin="kind: Pod\n  metadata: [\n")
    assert (code, out) == (1, "")
    assert err.startswith("outrigger inject: stdin: not valid YAML:")


def test_the_pod_annotation_can_ask_for_injection_too(capsys: pytest.CaptureFixture[str]) -> None:
    manifest = yaml.safe_dump(pod(annotations={"outrigger.dev/inject": "enabled"}))
    code, out, _ = run(capsys, "-f", "-", stdin=manifest)
    assert code == 0
    assert containers(yaml.safe_load(out))[0][:2] == ["outrigger-init", "outrigger-proxy"]


@pytest.mark.parametrize("native", [True, False])
def test_the_webhook_and_inject_produce_the_same_pod(native: bool) -> None:
    injection = Injection(image="registry.example/outrigger:1.0", native_sidecar=native)
    deployment = by_name(list(yaml.safe_load_all(WORKLOADS.read_text())))["Deployment/web"]
    offline = by_name(
        list(yaml.safe_load_all(inject_text(yaml.safe_dump(deployment), injection)[0]))
    )
    offline_template = template_of(offline["Deployment/web"])
    # The pod the ReplicaSet controller creates from the original template, as admitted.
    template = copy.deepcopy(deployment["spec"]["template"])
    created = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {**template["metadata"], "generateName": "web-7d4b9c-", "namespace": "shop"},
        "spec": template["spec"],
    }
    review = admission_review(created)
    online = patched(review, inject_in_process(review, injection))
    assert online["spec"] == offline_template["spec"]
    assert online["metadata"]["annotations"] == offline_template["metadata"]["annotations"]
    # and a bare Pod comes out the same from both
    bare = pod()
    review = admission_review(bare)
    online_pod = patched(review, inject_in_process(review, injection))
    offline_pod = yaml.safe_load(inject_text(yaml.safe_dump(bare), injection)[0])
    assert online_pod == offline_pod


def test_the_console_script_reads_stdin_for_kubectl_pipes() -> None:
    manifest = yaml.safe_dump(pod())
    proc = subprocess.run(
        [str(OUTRIGGER), "inject", "-f", "-"],
        input=manifest,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    injected = yaml.safe_load(proc.stdout)
    assert_valid(injected)
    assert "outrigger.dev/status" in injected["metadata"]["annotations"]


@pytest.mark.parametrize(
    ("command", "flags"),
    [("sidecar", SIDECAR_FLAGS), ("iptables", IPTABLES_FLAGS), ("wait", ("--timeout", "--url"))],
)
def test_the_flags_the_injector_emits_are_flags_the_commands_take(
    capsys: pytest.CaptureFixture[str], command: str, flags: tuple[str, ...]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    shown = capsys.readouterr().out
    assert exited.value.code == 0
    missing = [flag for flag in flags if flag not in shown.split()]
    assert missing == []
