"""Renders checked in: the golden default render and the plain manifests must equal what the
chart renders now (`make golden`, `make manifests` rewrite them)."""

from __future__ import annotations

import yaml

from tests.helm.chart import KUBE_VERSIONS, documents, render, validate
from tests.helm.golden import GOLDEN, default_render
from tests.helm.manifests import PLAIN, PLAIN_VALUES, as_files, masked, plain_manifests


def test_the_default_render_equals_the_golden_file() -> None:
    assert default_render() == GOLDEN.read_text(), (
        "the chart's default render changed: if on purpose, run `make golden` and review the diff"
    )


def test_masking_hides_every_certificate_and_key_and_nothing_else() -> None:
    raw = as_files(render(), hooks=True)
    assert "LS0tLS1CRUdJTi" in raw  # base64 of "-----BEGIN"
    golden = masked(raw)
    assert "LS0tLS1CRUdJTi" not in golden
    assert golden.count("MASKED") == 6  # ca.crt, tls.crt, tls.key, and three caBundles
    assert len(golden.splitlines()) == len(raw.splitlines())


def test_k8s_outrigger_yaml_is_the_self_certificates_render_of_the_chart() -> None:
    assert PLAIN.read_text() == plain_manifests(), (
        "k8s/outrigger.yaml is out of date with the chart: run `make manifests`"
    )


def test_the_plain_manifests_carry_no_private_key_no_test_hook_and_validate() -> None:
    text = PLAIN.read_text()
    assert "PRIVATE KEY" not in text and "tls.key" not in text and "LS0tLS1CRUdJTi" not in text
    docs = [d for d in yaml.safe_load_all(text) if d]
    kinds = [d["kind"] for d in docs]
    assert kinds[0] == "Namespace" and "Pod" not in kinds  # `helm test` pods are not applied
    assert kinds[-2:] == ["MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"]
    chart_objects = [
        (d["kind"], d["metadata"]["name"])
        for d in documents(render(PLAIN_VALUES))
        if "helm.sh/hook" not in d["metadata"].get("annotations", {})
    ]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in docs[1:]) == sorted(chart_objects)
    for doc in docs:
        for version in KUBE_VERSIONS:
            validate(doc, version)
