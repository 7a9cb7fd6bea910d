"""The neutral core both the data plane and the control plane import.

- `policy`: the policy settings, their one validator (every value check) and how levels combine;
  shared by the mesh file, Kubernetes annotations, the admission webhook and `outrigger analyze`.
- `model`: the mesh model (services, endpoints, policy) and the mesh file's parser.
- `annotations`: `outrigger.dev/*` annotations: `check` one object's, `resolve` a Service's
  effective policy (Service > Namespace > mesh defaults > built-in, per-key fallback).
- `xds`: the xDS vocabulary: type URLs, well-known resource names, decoding helpers.
- `translate`: mesh model -> xDS v3 resources, the one translation.

`sidecar/` and `control_plane/` never import each other; both import this package.
"""
