"""Call chains, and how retries multiply along them.

A caller's sidecar applies the callee's policy on the route to it, so a request to a service
with `retry-attempts: 2` can be tried 3 times. Along a chain top -> a -> b, one request that
reaches the top can become attempts(a) requests to a, and attempts(a) x attempts(b) to b: the
amplification of the chain is that product at its deepest callee. The top's own retries are not
counted (they belong to whoever calls the top).

Chains are the paths of calls from a top to a service that calls nothing further, each service
at most once per path:

- tops are the workloads no Service selects (they only call) and the services nothing in the
  inputs calls; services reachable only through a loop (no top) are walked from the first of
  them by namespace and name, until every service has been visited;
- a call back into the path is a loop: it is reported once (`cycles`, rotated to start at its
  first service by namespace and name) and the chain ends before it;
- the walk keeps its own stack (no recursion: a chain of thousands of services is fine) and
  stops after `limit` chains (`truncated`), so a dense call graph with exponentially many paths
  ends in bounded time.

`worst_chains` does not list paths: it finds, for every service that calls nothing further, the
chain into it with the most requests, in time linear in the calls (a longest path by product
over the calls in topological order; services in or below a loop are left out, the loop is
reported). `outrigger analyze` uses it when the walk was truncated, so no amplification above
the limit goes unreported because its chain was not listed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final, TypeAlias

from outrigger.topology import Caller, Service, Topology

MAX_CHAINS: Final = 1000
Node: TypeAlias = Service | Caller


@dataclass(frozen=True, slots=True)
class Hop:
    node: Node
    attempts: int  # tries per request from the previous hop (1 + retries); 1 at the top
    requests: int  # requests this hop can receive for one request at the top


@dataclass(frozen=True, slots=True)
class Chain:
    hops: tuple[Hop, ...]

    @property
    def top(self) -> Node:
        return self.hops[0].node

    @property
    def deepest(self) -> Service:
        node = self.hops[-1].node
        assert isinstance(node, Service)
        return node

    @property
    def amplification(self) -> int:
        return self.hops[-1].requests


@dataclass(slots=True)
class Walk:
    chains: list[Chain] = field(default_factory=list)
    cycles: list[tuple[Service, ...]] = field(default_factory=list)
    truncated: bool = False


def attempts(service: Service) -> int:
    """Tries per request to `service`: the first plus its retries."""
    retries = service.policy.retries
    return 1 + (retries.attempts if retries is not None else 0)


def _id(node: Node) -> tuple[str, str, str]:
    if isinstance(node, Service):
        return ("", node.namespace, node.name)
    return (node.ref.kind, node.namespace, node.ref.name)


class _Graph:
    def __init__(self, topology: Topology) -> None:
        self.services = topology.services
        self.edges: dict[tuple[str, str, str], list[Service]] = {}
        self.called: set[tuple[str, str]] = set()
        nodes: list[Node] = [*topology.callers, *topology.services.values()]
        for node in nodes:
            targets: dict[tuple[str, str], Service] = {}
            for call in node.calls:
                key = call.key(node.namespace)
                if key in self.services:
                    targets[key] = self.services[key]
            self.edges[_id(node)] = [targets[key] for key in sorted(targets)]
            self.called.update(targets)
        self.tops: list[Node] = sorted(topology.callers, key=_id)
        self.tops += [s for key, s in sorted(self.services.items()) if key not in self.called]

    def out(self, node: Node) -> Iterator[Service]:
        return iter(self.edges[_id(node)])


def _chain(path: list[Node]) -> Chain:
    hops = [Hop(path[0], 1, 1)]
    for node in path[1:]:
        assert isinstance(node, Service)
        tries = attempts(node)
        hops.append(Hop(node, tries, hops[-1].requests * tries))
    return Chain(tuple(hops))


def _rotated(loop: list[Node]) -> tuple[Service, ...]:
    services = [n for n in loop if isinstance(n, Service)]
    first = min(range(len(services)), key=lambda i: services[i].key)
    return tuple(services[first:] + services[:first])


def walk(topology: Topology, limit: int = MAX_CHAINS) -> Walk:
    """Every chain (up to `limit`) and every loop in the topology's calls."""
    graph = _Graph(topology)
    result = Walk()
    seen_cycles: set[tuple[tuple[str, str], ...]] = set()
    visited: set[tuple[str, str, str]] = set()

    def from_top(top: Node) -> None:
        path: list[Node] = [top]
        on_path = {_id(top)}
        stack = [graph.out(top)]
        extended = [False]
        visited.add(_id(top))
        while stack:
            step = next(stack[-1], None)
            if step is None:
                if not extended[-1] and len(path) > 1:
                    if len(result.chains) >= limit:
                        result.truncated = True
                        return
                    result.chains.append(_chain(path))
                stack.pop()
                extended.pop()
                on_path.discard(_id(path.pop()))
                continue
            if _id(step) in on_path:
                start = next(i for i, n in enumerate(path) if _id(n) == _id(step))
                loop = _rotated(path[start:])
                key = tuple(s.key for s in loop)
                if key not in seen_cycles:
                    seen_cycles.add(key)
                    result.cycles.append(loop)
                continue
            extended[-1] = True
            visited.add(_id(step))
            path.append(step)
            on_path.add(_id(step))
            stack.append(graph.out(step))
            extended.append(False)

    for top in graph.tops:
        if not result.truncated:
            from_top(top)
    for _, service in sorted(graph.services.items()):
        if _id(service) not in visited and not result.truncated:
            from_top(service)
    return result


def worst_chains(topology: Topology) -> list[Chain]:
    """For each service that calls nothing further, the chain from a top into it with the most
    requests (see the module docstring); sorted by namespace and name of that service."""
    graph = _Graph(topology)
    nodes: list[Node] = [*topology.callers, *topology.services.values()]
    waiting = {_id(n): 0 for n in nodes}
    for node in nodes:
        for target in graph.out(node):
            waiting[_id(target)] += 1
    best: dict[tuple[str, str, str], tuple[int, Node | None]] = {}
    ready = [n for n in nodes if waiting[_id(n)] == 0]
    for node in ready:
        best[_id(node)] = (1, None)
    while ready:  # Kahn's order: every call into a node is settled before the node is used
        node = ready.pop()
        requests = best[_id(node)][0]
        for target in graph.out(node):
            more = requests * attempts(target)
            if more > best.get(_id(target), (0, None))[0]:
                best[_id(target)] = (more, node)
            waiting[_id(target)] -= 1
            if waiting[_id(target)] == 0:
                ready.append(target)
    found = []
    for _, service in sorted(topology.services.items()):
        entry = best.get(_id(service))
        if entry is None or entry[1] is None or waiting[_id(service)] or graph.edges[_id(service)]:
            continue
        path: list[Node] = [service]
        while (previous := best[_id(path[-1])][1]) is not None:
            path.append(previous)
        found.append(_chain(path[::-1]))
    return found
