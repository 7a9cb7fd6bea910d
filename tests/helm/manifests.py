"""Renders as files: k8s/outrigger.yaml (the plain manifests, `make manifests`) and the golden
render (`make golden`). Objects come in Helm's install order, each under a `# Source:` line as
`helm template` prints them, with the templates' own comments kept.

    python -m tests.helm.manifests > k8s/outrigger.yaml
"""

from __future__ import annotations

import re
import sys
from typing import Any

import yaml

from tests.helm.chart import NAMESPACE, ROOT, render

PLAIN = ROOT / "k8s/outrigger.yaml"
# Plain manifests never carry a private key: the control plane makes its own certificates.
PLAIN_VALUES: dict[str, Any] = {"webhook": {"certificates": "self"}}

# Helm's install order (pkg/release/util/kind_sorter.go), for the kinds this chart makes;
# other kinds (cert-manager, Prometheus operator) follow, as Helm puts unknown kinds last.
INSTALL_ORDER = (
    "Namespace",
    "PodDisruptionBudget",
    "ServiceAccount",
    "Secret",
    "ConfigMap",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
    "Service",
    "Pod",
    "Deployment",
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
)

HEADER = """\
# Outrigger for `kubectl apply -f k8s/outrigger.yaml`: the Helm chart (helm/outrigger) rendered
# with webhook.certificates=self, so no private key is written here; the control plane makes
# its own CA at start. Do not edit: change the chart and run `make manifests` (a test fails when
# this file is out of date).
"""

NAMESPACE_DOC = f"""\
apiVersion: v1
kind: Namespace
metadata:
  name: {NAMESPACE}
  labels:
    # The control plane's pods meet the restricted profile (injected namespaces cannot).
    pod-security.kubernetes.io/enforce: restricted
"""

_CERT_FIELD = re.compile(r"^(\s*(?:caBundle|ca\.crt|tls\.crt|tls\.key):\s*)\S+$", re.MULTILINE)


def as_files(rendered: dict[str, str], *, hooks: bool) -> str:
    """Every rendered object as one multi-document YAML, in install order."""
    entries: list[tuple[int, str, str]] = []
    for path, text in rendered.items():
        if path.endswith("NOTES.txt"):
            continue
        doc = yaml.safe_load(text)
        if not doc:
            continue
        is_hook = "helm.sh/hook" in doc["metadata"].get("annotations", {})
        if is_hook and not hooks:
            continue
        kind = doc["kind"]
        rank = INSTALL_ORDER.index(kind) if kind in INSTALL_ORDER else len(INSTALL_ORDER)
        entries.append((rank, path, text.strip("\n")))
    return "".join(f"---\n# Source: {path}\n{text}\n" for _, path, text in sorted(entries))


def plain_manifests() -> str:
    return HEADER + "---\n" + NAMESPACE_DOC + as_files(render(PLAIN_VALUES), hooks=False)


def masked(text: str) -> str:
    """Certificates, keys and CA bundles differ on every render: replace their values."""
    return _CERT_FIELD.sub(r"\1MASKED", text)


if __name__ == "__main__":
    sys.stdout.write(plain_manifests())
