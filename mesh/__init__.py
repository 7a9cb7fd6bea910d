"""The neutral core both the data plane and the control plane import.

- `model`: the mesh model (services, endpoints, policy) and its one validator, shared by the mesh
  file, Kubernetes annotations, the admission webhook and `outrigger analyze`.
- `xds`: the xDS vocabulary: type URLs, well-known resource names, decoding helpers.
- `translate`: mesh model -> xDS v3 resources, the one translation.

`sidecar/` and `control_plane/` never import each other; both import this package.
"""
