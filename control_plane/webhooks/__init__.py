"""The control plane's admission webhooks (HTTPS, port 15017).

- `inject`: the sidecar injector, a pure function from a pod to the injected pod and its
  JSONPatch (also what `outrigger inject` runs offline).
- `validate`: the policy annotations of Services and Namespaces, checked by the validator the
  control plane and `outrigger analyze` use (`mesh.annotations.check`).
- `review`: AdmissionReview v1 in and out.
- `server`: the HTTPS server; handlers are registered by path (`/inject`, `/validate`).
"""
