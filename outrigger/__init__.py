"""The `outrigger` command line and the tools that compose the other packages (demo, status).

The sidecar (`sidecar`), the control plane (`control_plane`) and the neutral core (`mesh`) do
not import this package; it imports them.
"""
