"""The golden render: the chart with default values, certificates masked, as `helm template`
prints it (hooks included). Rewrite after a deliberate chart change with `make golden`, and
read the diff before committing it."""

from __future__ import annotations

from tests.helm.chart import ROOT, render
from tests.helm.manifests import as_files, masked

GOLDEN = ROOT / "tests/helm/golden/default.yaml"


def default_render() -> str:
    return masked(as_files(render(), hooks=True))


if __name__ == "__main__":
    GOLDEN.write_text(default_render())
    print(f"wrote {GOLDEN.relative_to(ROOT)}")
