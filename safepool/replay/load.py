"""A bounded, open-loop load generator: a request rate (fixed, or with a
surge) for a fixed time.

Open loop: each request is sent on schedule whether or not the earlier ones
have answered, as real users do; a stalled service therefore
piles up requests instead of slowing the generator down (a closed loop would
hide the outage). Every request has a client-side timeout, and the drain at
the end is bounded, so the run's length is known in advance.

The client is a few lines of HTTP/1.1 over asyncio streams, one connection
per request: the client deadline is a total deadline (httpx's timeouts are
per phase), and its cost stays flat at hundreds of requests in flight
(httpx's connection pool spends time quadratic in the connections open, and
became the bottleneck of the surge).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .app import ARCHIVED_FROM
from .config import ReplayConfig

TRANSPORT_ERROR = 0  # status recorded when no HTTP response came back


@dataclass(slots=True)
class RequestRecord:
    sent: float  # seconds since the run started
    done: float
    status: int  # HTTP status, or TRANSPORT_ERROR
    leaking: bool  # hit the faulty line: an archived customer (leak), a payment while the provider hangs (stuck)

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def latency(self) -> float:
        return self.done - self.sent


@dataclass(frozen=True, slots=True)
class Request:
    due: float  # seconds since the run started
    method: str
    path: str
    leaking: bool


def _regular_path(rng: random.Random) -> str:
    if rng.random() < 0.7:
        return f"/orders/{rng.randrange(1, 50_000)}"
    return f"/products/{rng.randrange(1, 5_000)}"


def schedule(config: ReplayConfig) -> list[Request]:
    """Every request of the run, in order (deterministic for a seed).

    - leak: from ``leak_start`` on, a share ``leak_probability`` asks for an
      archived customer (the leaking branch);
    - stuck: a share ``leak_probability`` are payments, all the time; from
      ``leak_start`` on the provider hangs and those are the faulty line;
    - surge: every request is a report (three reporting routes, at random); the rate is ``surge_factor`` times the
      pool's capacity from ``leak_start`` for ``surge_duration``;
    - restart: the regular mix.
    """
    rng = random.Random(config.seed)
    requests: list[Request] = []
    for t in _arrivals(config):
        after = t >= config.leak_start
        if config.scenario == "leak" and after and rng.random() < config.leak_probability:
            request = Request(t, "GET", f"/orders/{ARCHIVED_FROM + rng.randrange(10_000)}", True)
        elif config.scenario == "stuck" and rng.random() < config.leak_probability:
            request = Request(t, "POST", f"/payments/{rng.randrange(1, 50_000)}", after)
        elif config.scenario == "surge":
            kind = rng.choice(("sales", "stock", "users"))
            request = Request(t, "GET", f"/reports/{kind}/{rng.randrange(1, 50_000)}", False)
        else:
            request = Request(t, "GET", _regular_path(rng), False)
        requests.append(request)
    return requests


def _arrivals(config: ReplayConfig) -> Iterator[float]:
    """The requests' due times (seconds from the start): ``rate_at`` per
    second, evenly spaced, from each rate's first second (the surge's
    starts at ``leak_start``), ``rate * seconds`` of them per stretch. Each
    time is its stretch's start plus ``i / rate``: a running sum of ``1 /
    rate`` drifted (501 requests in 10 s at 50/s, and the surge began a
    request late, at 3.05 s; review s63)."""
    edges = [0.0, config.duration]
    if config.scenario == "surge":
        edges = sorted({0.0, min(config.leak_start, config.duration), min(config.surge_end, config.duration),
                        config.duration})
    for start, end in itertools.pairwise(edges):
        rate = config.rate_at(start)
        # (ceil, less a hair: 3 s at 20/s is 60 requests, not 61 from float noise)
        for i in range(max(0, math.ceil((end - start) * rate - 1e-9))):
            yield start + i / rate


def client_timeout(config: ReplayConfig) -> float:
    """The client's deadline (longer than the service's unless the scenario says otherwise)."""
    return config.client_timeout


async def http_request(host: str, port: int, method: str, path: str) -> int:
    """Send one request on a new connection; return the response's status."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(
            f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()
        )
        status_line = await reader.readline()
        parts = status_line.split()
        if len(parts) < 2 or not parts[1].isdigit():
            return TRANSPORT_ERROR
        await reader.read()  # headers and body, up to the server's close
        return int(parts[1])
    finally:
        writer.close()


async def run_load(
    address: tuple[str, int],
    config: ReplayConfig,
    start: float,
    records: list[RequestRecord],
    on_sent: Callable[[int], None] | None = None,
    until: Callable[[], float] | None = None,
) -> None:
    """Send the scheduled requests on time, then wait (bounded) for the
    stragglers. Appends to ``records`` as answers come in.

    ``until``: seconds since ``start`` that the load must reach, read again
    before each request past the schedule: the load goes on with the regular
    mix at the last rate until then (the restart scenario's server may take
    longer to come back than ``duration`` allowed for)."""
    loop = asyncio.get_running_loop()
    in_flight: set[asyncio.Task[None]] = set()

    async def send(request: Request) -> None:
        sent = loop.time() - start
        try:
            async with asyncio.timeout(config.client_timeout):
                status = await http_request(*address, request.method, request.path)
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            status = TRANSPORT_ERROR
        records.append(RequestRecord(sent, loop.time() - start, status, request.leaking))

    async def send_on_time(request: Request) -> None:
        delay = start + request.due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = loop.create_task(send(request))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)

    try:
        for i, request in enumerate(schedule(config)):
            await send_on_time(request)
            if on_sent is not None:
                on_sent(i + 1)
        if until is not None:
            rng = random.Random(config.seed + 1)
            t = config.duration
            while t < until():
                await send_on_time(Request(t, "GET", _regular_path(rng), False))
                t += 1.0 / config.rate_at(t)
        if in_flight:
            await asyncio.wait(set(in_flight), timeout=client_timeout(config) + 1.0)
    finally:
        for task in in_flight:
            task.cancel()
        if in_flight:
            await asyncio.wait(set(in_flight))
