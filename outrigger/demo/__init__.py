"""`outrigger demo`: a whole mesh on this machine, a scripted failure story and a live view.

- `service`: the demo apps (frontend → orders → payments), tiny asyncio HTTP servers.
- `processes`: starting the control plane, sidecars and apps, reading their bound ports, stopping.
- `meshfile`: the demo mesh file, filled with the bound endpoints and rewritten by the story.
- `load`: the load generator calling frontend's sidecar at a steady rate.
- `scrape`: the sidecars' admin endpoints, read into per-service figures.
- `story`: the scripted steps, each with the check that it happened.
- `traces`: the OTLP/gRPC trace receiver the demo runs when no endpoint is given.
- `view`: the rich live view, the status line and a trace's waterfall.
- `run`: the orchestration behind `outrigger demo`.
"""
