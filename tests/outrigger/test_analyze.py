"""`outrigger analyze`: one test per finding, retry amplification along chains (the headline),
the inputs it reads, the exit status and the JSON it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from control_plane.sources.cluster import ClusterState, cluster_mesh
from mesh.model import Mesh
from outrigger.analyze import Report, analyze, chain_text, render_json, render_text
from outrigger.findings import CODES

Json = dict[str, Any]
OUTRIGGER = Path(sys.executable).with_name("outrigger")
ROOT = Path(__file__).resolve().parents[2]
SHOP = ROOT / "k8s" / "examples" / "shop.yaml"
K8S_VERSION = "1.29.0"


# -- manifests, as users write them (each checked against the Kubernetes schema) ------------


def namespace(name: str = "shop", **policy: str) -> Json:
    meta: Json = {"name": name}
    if policy:
        meta["annotations"] = {f"outrigger.dev/{k}": v for k, v in policy.items()}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta}


def service(name: str, ns: str = "shop", *, annotations: Json | None = None, **policy: str) -> Json:
    """A Service selecting app=NAME; `policy` keys with _ for - (retry_attempts="2")."""
    found = {f"outrigger.dev/{k.replace('_', '-')}": v for k, v in policy.items()}
    found.update(annotations or {})
    meta: Json = {"name": name, "namespace": ns}
    if found:
        meta["annotations"] = found
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 80}]},
    }


def workload(
    name: str,
    ns: str = "shop",
    *,
    kind: str = "Deployment",
    replicas: int | None = 2,
    calls: str | None = None,
    annotations: Json | None = None,
) -> Json:
    meta: Json = {"name": name, "namespace": ns}
    found = dict(annotations or {})
    if calls is not None:
        found["outrigger.dev/calls"] = calls
    if found:
        meta["annotations"] = found
    pod_spec: Json = {"containers": [{"name": name, "image": f"registry.example/{name}:1"}]}
    template: Json = {"metadata": {"labels": {"app": name}}, "spec": pod_spec}
    spec: Json = {"selector": {"matchLabels": {"app": name}}, "template": template}
    if kind == "StatefulSet":
        spec["serviceName"] = name
    if kind == "DaemonSet":
        replicas = None
    if kind == "CronJob":
        pod_spec["restartPolicy"] = "Never"
        spec = {"schedule": "@hourly", "jobTemplate": {"spec": {"template": template}}}
        replicas = None
    if replicas is not None:
        spec["replicas"] = replicas
    api = "batch/v1" if kind == "CronJob" else "apps/v1"
    return {"apiVersion": api, "kind": kind, "metadata": meta, "spec": spec}


def chain_of(*names: str, attempts: dict[str, int] | None = None, ns: str = "shop") -> list[Json]:
    """Services NAME[0] -> NAME[1] -> ...; `attempts` gives retry-attempts per service."""
    docs = []
    for i, name in enumerate(names):
        policy: Json = {}
        if i + 1 < len(names):
            policy["calls"] = names[i + 1]
        if attempts and name in attempts:
            policy["retry_attempts"] = str(attempts[name])
        docs.append(service(name, ns, **policy))
    return docs


def write(path: Path, *docs: Json, check: bool = True) -> Path:
    if check:
        for doc in docs:
            for item in doc["items"] if doc["kind"] == "List" else [doc]:
                kubernetes_validate.validate(item, K8S_VERSION, strict=True)
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def run(
    tmp_path: Path, *docs: Json, mesh: str | None = None, check: bool = True, **kw: Any
) -> Report:
    manifests = write(tmp_path / "manifests.yaml", *docs, check=check)
    mesh_path = None
    if mesh is not None:
        mesh_path = tmp_path / "mesh.yaml"
        mesh_path.write_text(mesh)
    return analyze([str(manifests)], str(mesh_path) if mesh_path else None, **kw)


def named(report: Report, name: str) -> list[Json]:
    assert name in CODES
    return [f.as_json() for f in report.findings if f.name == name]


def cli(*args: str, stdin: str | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(OUTRIGGER), "analyze", *args],
        input=stdin, capture_output=True, text=True, timeout=60, cwd=cwd,
    )  # fmt: skip


# -- invalid annotations ------------------------------------------------------------------


def test_an_invalid_annotation_is_an_error_in_the_words_of_the_control_planes_event(
    tmp_path: Path,
) -> None:
    bad = service("payments", timeout="2 seconds")
    report = run(tmp_path, namespace(timeout="5s"), bad)
    (found,) = named(report, "InvalidAnnotation")
    assert found["level"] == "error"
    assert found["objects"][0]["kind"] == "Service"
    assert found["objects"][0]["source"].endswith(
        "manifests.yaml:8"
    )  # after the Namespace and its ---
    assert found["fix"] == (
        'set outrigger.dev/timeout to a duration like "250ms", "1.5s", "2s" or "1m", e.g. "2s"'
    )
    state = ClusterState()  # what the control plane holds for the same objects
    state.put("Namespace", namespace(timeout="5s"))
    state.put("Service", bad)
    (event,) = cluster_mesh(state, Mesh()).problems
    assert (
        found["message"]
        == event.message
        == (
            'outrigger.dev/timeout: must be a duration like "250ms", "1.5s", "2s" or "1m", '
            'got "2 seconds"; using 5s (namespace) instead'
        )
    )
    assert report.exit_status == 1


def test_a_namespace_and_a_workload_are_checked_too(tmp_path: Path) -> None:
    report = run(
        tmp_path,
        namespace(**{"retry-budget-percent": "lots"}),
        workload("orders", annotations={"outrigger.dev/cals": "payments"}),
    )
    messages = {f["objects"][0]["kind"]: f for f in named(report, "InvalidAnnotation")}
    assert messages["Namespace"]["message"] == (
        'outrigger.dev/retry-budget-percent: must be a percentage from 0 to 100, got "lots"; '
        "using none (built-in) instead"
    )
    assert messages["Deployment"]["message"] == (
        "outrigger.dev/cals: not a known annotation; did you mean outrigger.dev/calls?"
    )
    assert messages["Deployment"]["fix"] == "rename it to outrigger.dev/calls"


def test_an_unquoted_number_is_an_error_with_the_quote_as_the_fix(tmp_path: Path) -> None:
    doc = service("orders")
    doc["metadata"]["annotations"] = {"outrigger.dev/retry-attempts": 2}
    report = analyze([str(write(tmp_path / "m.yaml", doc, check=False))])
    (found,) = named(report, "InvalidAnnotation")
    assert found["message"] == (
        'outrigger.dev/retry-attempts: must be a string (quote it in YAML: "2"), got 2'
    )
    assert found["fix"] == 'quote the value: outrigger.dev/retry-attempts: "2"'


def test_a_policy_annotation_on_a_workload_is_misplaced(tmp_path: Path) -> None:
    report = run(tmp_path, workload("orders", annotations={"outrigger.dev/timeout": "2s"}))
    (found,) = named(report, "MisplacedAnnotation")
    assert found["level"] == "warning"
    assert found["message"] == (
        "outrigger.dev/timeout on Deployment shop/orders does nothing: policy is read from "
        "Services and Namespaces"
    )


# -- retry amplification: the headline --------------------------------------------------------


def test_attempts_multiply_per_hop_and_a_chain_above_the_limit_is_a_warning(
    tmp_path: Path,
) -> None:
    docs = chain_of("edge", "api", "orders", "payments",
                    attempts={"api": 2, "orders": 1, "payments": 2})  # fmt: skip
    report = run(tmp_path, *docs)
    (chain,) = report.walk.chains
    assert [(h.node.ref.name, h.attempts, h.requests) for h in chain.hops] == [
        ("edge", 1, 1),
        ("api", 3, 3),
        ("orders", 2, 6),
        ("payments", 3, 18),
    ]
    (warning,) = named(report, "RetryAmplification")
    assert warning["message"] == (
        "payments can receive 18 requests for one request to edge: "
        "edge -> api x3 -> orders x2 -> payments x3 (limit 4)"
    )
    assert [o["name"] for o in warning["objects"]] == ["payments", "edge", "api", "orders"]
    assert warning["fix"] == (
        "retry at one hop only: keep the retries of api, remove outrigger.dev/retry-attempts on "
        "Service shop/orders, remove outrigger.dev/retry-attempts on Service shop/payments (or "
        "lower them until the product is at most 4)"
    )
    assert report.exit_status == 0  # a warning does not fail


def test_every_chain_is_reported_even_below_the_limit(tmp_path: Path) -> None:
    report = run(tmp_path, *chain_of("a", "b", "c", attempts={"b": 1}))
    assert named(report, "RetryAmplification") == []
    (chain,) = json.loads(render_json(report))["chains"]
    assert (chain["text"], chain["amplification"], chain["aboveLimit"]) == ("a -> b x2 -> c", 2,
                                                                            False)  # fmt: skip
    assert "  2  a -> b x2 -> c  [shop]\n" in render_text(report)


def test_the_limit_is_a_flag(tmp_path: Path) -> None:
    docs = chain_of("a", "b", "c", attempts={"b": 2, "c": 2})  # 9
    assert len(named(run(tmp_path, *docs), "RetryAmplification")) == 1
    assert named(run(tmp_path, *docs, max_amplification=9), "RetryAmplification") == []
    one_hop = named(run(tmp_path, *chain_of("a", "b", attempts={"b": 5})), "RetryAmplification")
    assert (
        one_hop[0]["fix"]
        == "lower outrigger.dev/retry-attempts on Service shop/b to 3 or fewer retries"
    )


def test_retries_a_namespace_gives_every_service_are_undone_per_service(tmp_path: Path) -> None:
    report = run(tmp_path, namespace(**{"retry-attempts": "2"}), *chain_of("a", "b", "c"))
    (warning,) = named(report, "RetryAmplification")
    assert "c can receive 9 requests" in warning["message"]
    assert warning["fix"].startswith(
        "retry at one hop only: keep the retries of b, set outrigger.dev/retry-attempts on "
        'Service shop/c to "0"'
    )


def test_a_workload_no_service_selects_is_the_top_and_workload_calls_join_their_service(
    tmp_path: Path,
) -> None:
    report = run(
        tmp_path,
        workload("loadgen", kind="CronJob", calls="frontend"),
        service("frontend"),
        workload("frontend", calls="orders"),  # the Service frontend selects these pods
        service("orders", retry_attempts="4"),
    )
    (chain,) = report.walk.chains
    assert chain_text(chain) == "CronJob/loadgen -> frontend -> orders x5"
    (warning,) = named(report, "RetryAmplification")
    assert warning["message"].startswith(
        "orders can receive 5 requests for one call by CronJob shop/loadgen"
    )


def test_calls_across_namespaces_name_the_namespace(tmp_path: Path) -> None:
    report = run(
        tmp_path,
        service("web", "front", calls="api.back"),
        service("api", "back", retry_attempts="1", calls="db"),
        service("db", "back", retry_attempts="2"),
    )
    (chain,) = report.walk.chains
    assert chain_text(chain) == "web -> api.back x2 -> db.back x3"
    assert chain.amplification == 6


@pytest.mark.timeout(30)
def test_a_loop_is_reported_once_and_never_hangs(tmp_path: Path) -> None:
    docs = [
        service("a", calls="b"),
        service("b", calls="c", retry_attempts="1"),
        service("c", calls="a,c", retry_attempts="2"),  # back to a, and to itself
    ]
    report = run(tmp_path, *docs)  # a hang would hit the test's timeout
    loops = sorted(f["message"] for f in named(report, "CallCycle"))
    assert loops == [
        "a -> b -> c -> a: a request can go round this loop; with retries, each turn multiplies "
        "the requests by 6",
        "c -> c: a request can go round this loop; with retries, each turn multiplies the "
        "requests by 3",
    ]
    # No top (everything is called): the walk starts from the first service, and the chain
    # stops before the loop closes.
    assert [chain_text(c) for c in report.walk.chains] == ["a -> b x2 -> c x3"]


def test_a_long_chain_is_walked_without_recursion_and_its_product_reported(
    tmp_path: Path,
) -> None:
    names = [f"s{i:04d}" for i in range(1500)]
    docs = chain_of(*names, attempts={name: 1 for name in names[1:]})
    report = run(tmp_path, *docs, check=False)  # 1,500 copies of a checked shape
    (chain,) = report.walk.chains
    assert len(chain.hops) == 1500
    assert chain.amplification == 2**1499
    (warning,) = named(report, "RetryAmplification")
    assert warning["message"].startswith(f"s1499 can receive {2**1499} requests for one request")
    assert f"  {2**1499:,}  s0000 -> s0001 x2 -> " in render_text(report)


@pytest.mark.timeout(30)
def test_a_dense_call_graph_stops_at_the_chain_limit(tmp_path: Path) -> None:
    # 12 layers of 4 services, each calling all of the next layer: 4**11 paths.
    layers = [[f"l{i}-{j}" for j in range(4)] for i in range(12)]
    docs = [service("top", calls=",".join(layers[0]))]
    for i, layer in enumerate(layers):
        for name in layer:
            calls = ",".join(layers[i + 1]) if i + 1 < len(layers) else None
            docs.append(service(name, **({"calls": calls} if calls else {})))
    report = run(tmp_path, *docs, max_chains=200, check=False)
    assert len(report.walk.chains) == 200
    (note,) = named(report, "ChainsTruncated")
    assert note["level"] == "info"


def test_past_the_chain_limit_the_worst_chain_into_each_service_is_still_checked(
    tmp_path: Path,
) -> None:
    sinks = [f"b{i}" for i in range(10)]
    docs = [
        service("top", calls="a,z"),
        service("a", calls=",".join(sinks)),  # walked first: 10 quiet chains
        *(service(name) for name in sinks),
        service("z", calls="y", retry_attempts="9"),  # never listed with max_chains=5
        service("y", retry_attempts="1"),
    ]
    report = run(tmp_path, *docs, max_chains=5)
    assert len(report.walk.chains) == 5
    assert all("z" not in chain_text(c) for c in report.walk.chains)
    (warning,) = named(report, "RetryAmplification")
    assert warning["message"] == (
        "y can receive 20 requests for one request to top: top -> z x10 -> y x2 (limit 4)"
    )
    assert len(named(report, "ChainsTruncated")) == 1


# -- timeouts, retries, breakers ----------------------------------------------------------------


def test_a_callee_that_outlives_its_caller(tmp_path: Path) -> None:
    report = run(
        tmp_path,
        service("frontend", timeout="2s", calls="orders,search,cache"),
        service("orders", timeout="5s"),
        service("search"),  # no timeout at all
        service("cache", timeout="2s"),  # equal is fine
    )
    found = {f["objects"][0]["name"]: f for f in named(report, "CalleeTimeoutLonger")}
    assert set(found) == {"orders", "search"}
    assert found["orders"]["message"] == (
        "Service shop/orders has timeout 5s, longer than its caller Service shop/frontend's 2s: "
        "requests to frontend give up while orders still works on them"
    )
    assert found["orders"]["fix"] == "lower outrigger.dev/timeout on Service shop/orders below 2s"
    assert found["search"]["fix"] == "set outrigger.dev/timeout on Service shop/search below 2s"


def test_per_try_timeouts_beyond_the_total_timeout(tmp_path: Path) -> None:
    report = run(
        tmp_path,
        service("orders", timeout="3s", retry_attempts="3", per_try_timeout="1s"),
        service("exact", timeout="3s", retry_attempts="2", per_try_timeout="1s"),
    )
    (found,) = named(report, "RetriesBeyondTimeout")
    assert found["message"] == (
        "Service shop/orders: per-try-timeout 1s x 4 attempts = 4s is beyond its 3s timeout: "
        "when each attempt times out only 3 fit, the last 1 can never run"
    )
    assert found["fix"] == (
        "lower outrigger.dev/retry-attempts on Service shop/orders to 2, or lower "
        "outrigger.dev/per-try-timeout on Service shop/orders to 750ms, or raise "
        "outrigger.dev/timeout on Service shop/orders to 4s"
    )


def test_non_idempotent_retries_need_a_budget(tmp_path: Path) -> None:
    report = run(
        tmp_path,
        service("orders", retry_attempts="2", retry_non_idempotent="true"),
        service("ledger", retry_attempts="2", retry_non_idempotent="true",
                retry_budget_percent="20"),
        service("search", retry_attempts="2"),
    )  # fmt: skip
    (found,) = named(report, "NonIdempotentRetriesWithoutBudget")
    assert found["objects"][0]["name"] == "orders"
    assert found["fix"] == (
        'set outrigger.dev/retry-budget-percent on Service shop/orders (e.g. "20"), or set '
        "outrigger.dev/retry-non-idempotent on Service shop/orders to false"
    )


def test_a_breaker_on_a_single_endpoint(tmp_path: Path) -> None:
    breaker = {"breaker_consecutive_failures": "5"}
    autoscaler = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "scaled", "namespace": "shop"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "scaled"},
            "maxReplicas": 10,
        },
    }
    manual = service("manual", **breaker)
    del manual["spec"]["selector"]
    endpoint_slice = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": "manual-1", "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": "manual"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.0.0.7"]},
                      {"addresses": ["10.0.0.8"], "conditions": {"ready": False}}],
    }  # fmt: skip
    report = run(
        tmp_path,
        service("single", **breaker), workload("single", replicas=1),
        service("pair", **breaker), workload("pair", replicas=2),
        service("scaled", **breaker), workload("scaled", replicas=3), autoscaler,
        service("daemon", **breaker), workload("daemon", kind="DaemonSet"),
        service("nobreaker"), workload("nobreaker", replicas=1),
        manual, endpoint_slice,
    )  # fmt: skip
    found = {f["objects"][0]["name"]: f for f in named(report, "BreakerOnSingleEndpoint")}
    assert set(found) == {"single", "scaled", "manual"}
    assert found["single"]["message"] == (
        "Service shop/single has a per-endpoint breaker (5 consecutive failures) and one "
        "endpoint (Deployment shop/single has replicas: 1): once it trips, every request gets "
        "503 UH for 30s instead of reaching it"
    )
    assert "HorizontalPodAutoscaler shop/scaled scales Deployment shop/scaled down to " \
        "minReplicas: 1" in found["scaled"]["message"]  # fmt: skip
    assert "EndpointSlice shop/manual-1 lists 1 ready address(es)" in found["manual"]["message"]


# -- inputs ---------------------------------------------------------------------------------


def test_a_callee_not_among_the_inputs_is_named(tmp_path: Path) -> None:
    report = run(tmp_path, service("orders", calls="payments,inventory.stock"),
                 service("payments"))  # fmt: skip
    (found,) = named(report, "UnknownCallee")
    assert found["message"] == (
        'Service shop/orders calls "inventory.stock" (inventory.stock), which is not among the '
        "inputs: chains through it are not followed"
    )


MESH = """
defaults:
  retries: {attempts: 1}
services:
  - name: stripe
    namespace: shop
    endpoints: ["api.stripe.com:443"]
    policy:
      timeout: 10s
      retries: {attempts: 2}
      circuit_breaker: {consecutive_failures: 3}
  - name: payments
    namespace: shop
    endpoints: ["10.0.0.9:80"]
"""


def test_a_mesh_file_adds_its_defaults_and_services(tmp_path: Path) -> None:
    report = run(
        tmp_path,
        namespace(**{"retry-attempts": "3"}),
        service("frontend", calls="orders", retry_attempts="0"),
        service("orders", calls="payments"),  # 3 from the namespace, over the mesh's 1
        service("payments", calls="stripe"),  # also in the mesh file: the Service wins
        mesh=MESH,
    )
    (chain,) = report.walk.chains
    assert chain_text(chain) == "frontend -> orders x4 -> payments x4 -> stripe x3"
    (conflict,) = named(report, "ServiceConflict")
    assert [o["kind"] for o in conflict["objects"]] == ["Service", "MeshService"]
    (breaker,) = named(report, "BreakerOnSingleEndpoint")
    assert breaker["fix"] == (
        "run at least two endpoints (replicas: 2), or remove "
        f'policy.circuit_breaker.consecutive_failures of service "stripe" in {tmp_path}/mesh.yaml'
    )


def test_a_mesh_file_alone_is_analyzed_with_its_calls(tmp_path: Path) -> None:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(
        "services:\n"
        "  - {name: web, endpoints: ['10.0.0.1:80', '10.0.0.2:80'], calls: [api]}\n"
        "  - {name: api, endpoints: ['10.0.0.3:80', '10.0.0.4:80'], calls: [db],\n"
        "     policy: {timeout: 1s, retries: {attempts: 2}}}\n"
        "  - {name: db, endpoints: ['10.0.0.5:80', '10.0.0.6:80'],\n"
        "     policy: {timeout: 5s, retries: {attempts: 2}}}\n"
    )
    report = analyze([], str(mesh))
    assert [chain_text(c) for c in report.walk.chains] == ["web -> api x3 -> db x3"]
    assert {f.name for f in report.findings} == {"RetryAmplification", "CalleeTimeoutLonger"}
    (late,) = named(report, "CalleeTimeoutLonger")
    assert late["fix"] == f'lower policy.timeout of service "db" in {mesh} below 1s'
    assert render_text(report).endswith(f"in {mesh}: 0 objects, 3 services, 1 call chain.\n")


def test_an_invalid_mesh_file_is_an_error_with_the_control_planes_message(
    tmp_path: Path,
) -> None:
    report = run(tmp_path, service("orders"), mesh="defaults: {retries: {attempts: two}}\n")
    (found,) = named(report, "InvalidMeshFile")
    assert found["message"] == (
        f'{tmp_path}/mesh.yaml: defaults.retries.attempts: must be a whole number >= 0, got "two"'
    )
    assert report.exit_status == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("kind: Service\nmetadata: {name: [\n", "not valid YAML, nothing in it was analyzed: "),
        ("- a\n- b\n", "a list, not a Kubernetes object"),
        ("services: []\n", "not a Kubernetes object (apiVersion and kind are required); it "
                           "looks like a mesh file"),
        ("\xff", "cannot read it"),
        ("a: " + "[" * 5000 + "]" * 5000, "not valid YAML, nothing in it was analyzed: "),
    ],
)  # fmt: skip
def test_input_that_is_not_manifests_is_an_error(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(content.encode("latin-1"))
    report = analyze([str(path)])
    (found,) = named(report, "InvalidInput")
    assert message in found["message"]
    assert report.exit_status == 1


def test_a_list_is_read_item_by_item_and_lines_point_at_each_document(tmp_path: Path) -> None:
    listed = {"apiVersion": "v1", "kind": "List", "items": chain_of("a", "b", attempts={"b": 9})}
    report = run(tmp_path, namespace(), listed)
    assert [chain_text(c) for c in report.walk.chains] == ["a -> b x10"]
    (warning,) = named(report, "RetryAmplification")
    assert warning["objects"][0]["source"] == f"{tmp_path}/manifests.yaml:6"


# -- the command ------------------------------------------------------------------------------


def test_the_shop_example_retries_at_one_hop_and_stays_within_the_limit() -> None:
    result = cli("-f", "k8s/examples/")
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        "Call chains: requests the deepest service can receive for one request at the top "
        "(warning above 4)\n"
        "  3  Job/loadgen -> frontend -> orders -> payments x3  [shop]\n"
        "\n"
        "No problems found in 1 file: 9 objects, 3 services, 1 call chain.\n"
    )
    strict = cli("-f", "k8s/examples/shop.yaml", "--max-amplification", "2")
    assert strict.returncode == 0  # a warning does not fail a build
    assert strict.stdout == (
        "Warning [OR0201 RetryAmplification] Service shop/payments (k8s/examples/shop.yaml:67)\n"
        "    payments can receive 3 requests for one call by Job shop/loadgen: "
        "Job/loadgen -> frontend -> orders -> payments x3 (limit 2)\n"
        "    fix: lower outrigger.dev/retry-attempts on Service shop/payments to 1 or fewer "
        "retries\n"
        "\n"
        "Call chains: requests the deepest service can receive for one request at the top "
        "(warning above 2)\n"
        "  3  Job/loadgen -> frontend -> orders -> payments x3  [shop]  <- above the limit\n"
        "\n"
        "Found 1 warning in 1 file: 9 objects, 3 services, 1 call chain.\n"
    )


def test_exit_status_is_one_for_an_error_and_two_for_a_usage_error(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.yaml", service("orders", timeout="soon"))
    assert cli("-f", str(bad)).returncode == 1
    assert cli("-f", str(SHOP)).returncode == 0
    nothing = cli()
    assert nothing.returncode == 2
    assert "needs -f FILE|DIR|- (manifests), --mesh FILE, or both" in nothing.stderr
    zero = cli("-f", str(SHOP), "--max-amplification", "0")
    assert zero.returncode == 2
    assert "--max-amplification: must be a whole number >= 1, got '0'" in zero.stderr


def test_manifests_on_stdin_and_in_several_places(tmp_path: Path) -> None:
    other = write(tmp_path / "more.yaml", service("extra", calls="payments"))
    result = cli("-f", "-", "-f", str(other), "-o", "json", stdin=SHOP.read_text())
    document = json.loads(result.stdout)
    assert document["inputs"] == ["<stdin>", str(other)]
    assert document["summary"]["objects"] == 10
    chains = {c["text"]: c["top"]["source"] for c in document["chains"]}
    assert chains == {
        "Job/loadgen -> frontend -> orders -> payments x3": "<stdin>:281",
        "extra -> payments x3": f"{other}:1",
    }


def test_a_directory_is_its_yaml_and_json_files_and_an_empty_one_is_an_error(
    tmp_path: Path,
) -> None:
    write(tmp_path / "a.yaml", *chain_of("a", "b"))
    (tmp_path / "c.json").write_text(json.dumps(service("c", calls="a")))
    (tmp_path / "notes.txt").write_text("not a manifest")
    report = analyze([str(tmp_path)])
    assert report.topology.inputs == [str(tmp_path / "a.yaml"), str(tmp_path / "c.json")]
    assert [chain_text(c) for c in report.walk.chains] == ["c -> a -> b"]
    empty = tmp_path / "empty"
    empty.mkdir()
    (found,) = named(analyze([str(empty)]), "InvalidInput")
    assert found["message"] == f"{empty}: no .yaml, .yml, .json files in this directory"


def test_json_output_has_the_documented_shape() -> None:
    document = json.loads(cli("-f", str(SHOP), "-o", "json", "--max-amplification", "2").stdout)
    assert list(document) == [
        "apiVersion", "inputs", "mesh", "maxAmplification", "summary", "findings", "chains",
    ]  # fmt: skip
    assert document["apiVersion"] == "outrigger.dev/analyze/v1"
    assert document["summary"] == {"errors": 0, "warnings": 1, "info": 0, "objects": 9,
                                   "services": 3, "chains": 1}  # fmt: skip
    (finding,) = document["findings"]
    assert list(finding) == ["code", "name", "level", "objects", "message", "fix"]
    assert list(finding["objects"][0]) == ["kind", "namespace", "name", "source"]
    (chain,) = document["chains"]
    assert list(chain) == ["top", "hops", "amplification", "aboveLimit", "text"]
    assert [(h["object"]["name"], h["attempts"], h["requests"]) for h in chain["hops"]] == [
        ("loadgen", 1, 1), ("frontend", 1, 1), ("orders", 1, 1), ("payments", 3, 3),
    ]  # fmt: skip
    assert chain["amplification"] == 3 and chain["aboveLimit"] is True


def test_codes_are_unique_and_every_one_can_be_rendered() -> None:
    codes = [c.code for c in CODES.values()]
    assert len(set(codes)) == len(codes)
    assert all(c.level in ("error", "warning", "info") for c in CODES.values())


def test_the_order_of_the_inputs_does_not_change_the_findings(tmp_path: Path) -> None:
    docs = [*chain_of("a", "b", "c", attempts={"b": 3, "c": 3}), service("d", calls="b")]

    def seen(report: Report) -> list[tuple[str, str, str]]:
        return [(f.name, str(f.objects[0]), f.message) for f in report.findings]

    forward, backward = run(tmp_path, *docs), run(tmp_path, *reversed(docs))
    assert seen(forward) == seen(backward)
    assert [chain_text(c) for c in forward.walk.chains] == [
        chain_text(c) for c in backward.walk.chains
    ]


# -- the README says what the command does ----------------------------------------------------


def _readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## `outrigger analyze`")
    return text[start : text.index("\n## ", start + 1)]


def test_the_readme_shows_the_real_output_for_the_shop() -> None:
    section = _readme_section()
    command = "$ outrigger analyze -f k8s/examples/\n"
    shown = section[section.index(command) + len(command) :].split("```", 1)[0]
    assert shown == cli("-f", "k8s/examples/").stdout


def test_the_readme_lists_every_finding_code() -> None:
    rows = [
        [cell.strip().strip("`") for cell in line.strip("|").split("|")]
        for line in _readme_section().splitlines()
        if line.startswith("| OR")
    ]
    assert rows == [[c.code, c.name, c.level, c.what] for c in CODES.values()]
