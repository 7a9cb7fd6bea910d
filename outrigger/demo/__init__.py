"""`outrigger demo`: a whole mesh on this machine, a scripted failure story and a live view.

- `service`: the demo apps (frontend → orders → payments), tiny asyncio HTTP servers.
- `processes`: starting the control plane, sidecars and apps, reading their bound ports, stopping.
- `meshfile`: the demo mesh file, filled with the bound endpoints and rewritten by the story.
- `load`: what the load generator (`outrigger.loadgen`, its own process) reports, cut in windows.
- `scrape`: the sidecars' admin endpoints, read into per-service figures.
- `story`: the scripted steps, each with the check that it happened.
- `traces`: the OTLP/gRPC trace receiver (its own process) the demo runs when no endpoint is
  given, and the demo's side of it.
- `usage`: CPU use of the demo's processes by role, and of the machine.
- `guard`: the latency guard: are the load's latencies the mesh's or the demo's own?
- `view`: the rich live view, the status line and a trace's waterfall.
- `run`: the orchestration behind `outrigger demo`.
"""
