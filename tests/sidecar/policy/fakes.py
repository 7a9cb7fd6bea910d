"""Policy test doubles: a virtual-time loop, in-memory bodies, a scripted upstream, and the
helpers that call a callback handler from a test and wait for its reply."""

from __future__ import annotations

import asyncio
import selectors
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field

from sidecar.config import (
    Backoff,
    CircuitBreaker,
    Endpoint,
    LbPolicy,
    RetryBudget,
    RetryPolicy,
    ServiceConfig,
)
from sidecar.exchange import BodyNotReplayable, Request, Response, Result
from sidecar.exchange import Reply as Answer  # `Reply` here is a scripted upstream reply
from sidecar.flags import Flag, ProxyError


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """A loop whose clock only moves when it would otherwise wait: it jumps to the next timer.

    Real I/O still works (select is polled with a zero timeout); a wait with no timer at all
    blocks for real, so a test that deadlocks is caught by pytest-timeout.
    """

    def __init__(self) -> None:
        super().__init__(selectors.DefaultSelector())
        self._now = 1000.0
        real_select = self._selector.select  # type: ignore[attr-defined]

        def select(timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
            if timeout is not None and timeout > 0:
                self._now += timeout
                timeout = 0
            return real_select(timeout)  # type: ignore[no-any-return]

        self._selector.select = select  # type: ignore[attr-defined]

    def time(self) -> float:
        return self._now


class MemoryRequestBody:
    def __init__(self, data: bytes = b"", *, replayable: bool = True) -> None:
        self._data = data
        self._replayable = replayable
        self._read = False

    @property
    def replayable(self) -> bool:
        return self._replayable

    @property
    def length(self) -> int | None:
        return len(self._data) if self._replayable else None

    async def chunks(self) -> AsyncIterator[bytes]:
        if self._read and not self._replayable:
            raise BodyNotReplayable
        self._read = True
        if self._data:
            yield self._data


class MemoryResponseBody:
    def __init__(self, data: bytes = b"") -> None:
        self.data = data
        self.discarded = False
        self.consumed = False
        self._sent = False
        self._callbacks: list[Callable[[], None]] = []

    def take(self) -> bytes:
        """Models a body still streaming until read: it is done when read to its end."""
        if self.consumed:
            return b""
        if self._sent or not self.data:
            self.consumed = True
            self._done()
            return b""
        self._sent = True
        return self.data

    def notify(self, callback: Callable[[], None]) -> None:
        callback()  # always something to take

    def whole(self) -> None:
        return None  # modelled as still streaming until read

    async def read(self) -> bytes:
        return self.take()

    def when_done(self, callback: Callable[[], None]) -> None:
        if self.consumed or self.discarded:
            callback()
        else:
            self._callbacks.append(callback)

    def discard(self) -> None:
        self.discarded = True
        self._done()

    def _done(self) -> None:
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()


def request(
    method: bytes = b"GET",
    headers: Iterable[tuple[bytes, bytes]] = (),
    *,
    replayable: bool = True,
    body: bytes = b"",
) -> Request:
    return Request(
        method,
        b"/",
        b"svc",
        list(headers),
        MemoryRequestBody(body, replayable=replayable),
    )


class UpstreamError(ProxyError):
    """What the fake forwarder raises (the lead's forwarder raises its own subclasses)."""


@dataclass
class Reply:
    status: int = 200
    headers: tuple[tuple[bytes, bytes], ...] = ()
    delay: float = 0.0


@dataclass
class Fail:
    flag: Flag
    delay: float = 0.0


@dataclass
class Hang:
    """Never answers: only cancellation ends it."""


Action = Reply | Fail | Hang


@dataclass
class Call:
    endpoint: Endpoint
    method: bytes
    deadline: float | None
    started: float
    cancelled: bool = False


@dataclass
class FakeUpstream:
    """An EndpointHandler answering from a script per endpoint, then from `default`."""

    default: Action = field(default_factory=Reply)
    scripts: dict[Endpoint, deque[Action]] = field(default_factory=lambda: defaultdict(deque))
    calls: list[Call] = field(default_factory=list)
    responses: list[Response] = field(default_factory=list)
    bodies: list[MemoryResponseBody] = field(default_factory=list)  # as sent, before wrapping
    per_endpoint: dict[Endpoint, Action] = field(default_factory=dict)

    def script(self, endpoint: Endpoint, *actions: Action) -> None:
        self.scripts[endpoint].extend(actions)

    def always(self, endpoint: Endpoint, action: Action) -> None:
        self.per_endpoint[endpoint] = action

    def endpoints_called(self) -> list[Endpoint]:
        return [call.endpoint for call in self.calls]

    def __call__(self, req: Request, endpoint: Endpoint, reply: Answer) -> None:
        loop = asyncio.get_running_loop()
        call = Call(endpoint, req.method, req.deadline, loop.time())
        self.calls.append(call)
        queue = self.scripts.get(endpoint)
        action = queue.popleft() if queue else self.per_endpoint.get(endpoint, self.default)
        if isinstance(action, Hang):
            self._wait(req, call, reply, None)
        elif action.delay:
            answer = loop.call_later(action.delay, self._answer, req, endpoint, action, reply)
            self._wait(req, call, reply, answer)
        else:
            self._answer(req, endpoint, action, reply)

    @staticmethod
    def _wait(req: Request, call: Call, reply: Answer, answer: asyncio.TimerHandle | None) -> None:
        """Hold the wait as the forwarder does: interruptible (a deadline, the client gone)."""

        def interrupt(error: ProxyError) -> None:
            if answer is not None:
                answer.cancel()
            call.cancelled = True
            reply(error)

        req.on_interrupt = interrupt

    def _answer(
        self, req: Request, endpoint: Endpoint, action: Reply | Fail, reply: Answer
    ) -> None:
        req.on_interrupt = None
        if isinstance(action, Fail):
            reply(UpstreamError(action.flag, f"scripted {action.flag.value} from {endpoint}"))
            return
        body = MemoryResponseBody(b"x")
        resp = Response(action.status, b"", list(action.headers), body, endpoint)
        self.responses.append(resp)
        self.bodies.append(body)
        reply(resp)


EP = [Endpoint("10.0.0.1", 80), Endpoint("10.0.0.2", 80), Endpoint("10.0.0.3", 80)]


def service(
    endpoints: Iterable[Endpoint] = EP[:2],
    *,
    timeout: float | None = None,
    attempts: int | None = None,
    retry_on: Iterable[str] = ("connect-failure", "reset", "gateway-error"),
    statuses: Iterable[int] = (),
    per_try_timeout: float | None = None,
    backoff: Backoff | None = None,
    budget: RetryBudget | None = None,
    non_idempotent: bool = False,
    consecutive_failures: int | None = None,
    open_for: float = 30.0,
    max_ejection_percent: int = 100,
    max_requests: int = 1024,
    max_pending: int = 1024,
    lb: LbPolicy = LbPolicy.ROUND_ROBIN,
) -> ServiceConfig:
    retry = None
    if attempts is not None:
        retry = RetryPolicy(
            attempts=attempts,
            retry_on=frozenset(retry_on),
            retriable_status=frozenset(statuses),
            per_try_timeout=per_try_timeout,
            backoff=backoff or Backoff(base=0.025, max=0.25),
            budget=budget,
            non_idempotent=non_idempotent,
        )
    return ServiceConfig(
        name="svc",
        namespace="default",
        port=80,
        cluster="svc",
        endpoints=tuple(endpoints),
        timeout=timeout,
        retry=retry,
        breaker=CircuitBreaker(
            consecutive_failures=consecutive_failures,
            open_for=open_for,
            max_ejection_percent=max_ejection_percent,
            max_requests=max_requests,
            max_pending=max_pending,
        ),
        lb=lb,
    )


async def outcome_of(handler: object, req: Request) -> Result:
    """Call a Handler; wait for its one reply (a response or a ProxyError) and return it."""
    assert callable(handler)
    replied: asyncio.Future[Result] = asyncio.get_running_loop().create_future()

    def reply(result: Result) -> None:
        assert not replied.done(), f"replied twice: {replied.result()!r}, then {result!r}"
        replied.set_result(result)

    handler(req, reply)
    return await replied


async def call(handler: object, req: Request) -> Response:
    """Call a Handler and wait for its response; raises the ProxyError it replied with."""
    result = await outcome_of(handler, req)
    if isinstance(result, ProxyError):
        raise result
    return result


async def drain(resp: Response) -> bytes:
    parts = []
    while data := await resp.body.read():
        parts.append(data)
    return b"".join(parts)


class FirstChoice:
    """An rng for the balancer that always picks the first candidate (index 0)."""

    def randrange(self, n: int) -> int:
        return 0
