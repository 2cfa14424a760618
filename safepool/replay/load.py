"""A bounded, open-loop load generator: a fixed request rate for a fixed time.

Open loop: request ``i`` is sent at ``start + i / rate`` whether or not the
earlier ones have answered, as real users do; a stalled service therefore
piles up requests instead of slowing the generator down (a closed loop would
hide the outage). Every request has a client-side timeout, and the drain at
the end is bounded, so the run's length is known in advance.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from .app import ARCHIVED_FROM
from .config import ReplayConfig

TRANSPORT_ERROR = 0  # status recorded when no HTTP response came back


@dataclass(slots=True)
class RequestRecord:
    sent: float  # seconds since the run started
    done: float
    status: int  # HTTP status, or TRANSPORT_ERROR
    leaking: bool  # hit the buggy branch (an archived customer)

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def latency(self) -> float:
        return self.done - self.sent


def pick_path(rng: random.Random, leaking: bool) -> str:
    if leaking:
        return f"/orders/{ARCHIVED_FROM + rng.randrange(10_000)}"
    if rng.random() < 0.7:
        return f"/orders/{rng.randrange(1, 50_000)}"
    return f"/products/{rng.randrange(1, 5_000)}"


def client_timeout(config: ReplayConfig) -> float:
    """Longer than the service's own deadline: the service should answer first."""
    return config.request_timeout + 3.0


async def run_load(
    client: httpx.AsyncClient,
    config: ReplayConfig,
    start: float,
    records: list[RequestRecord],
    on_sent: Callable[[int], None] | None = None,
) -> None:
    """Send ``duration * rate`` requests on schedule, then wait (bounded) for
    the stragglers. Appends to ``records`` as answers come in."""
    loop = asyncio.get_running_loop()
    rng = random.Random(config.seed)
    in_flight: set[asyncio.Task[None]] = set()

    async def send(path: str, leaking: bool) -> None:
        sent = loop.time() - start
        try:
            response = await client.get(path)
            status = response.status_code
        except httpx.HTTPError:
            status = TRANSPORT_ERROR
        records.append(RequestRecord(sent, loop.time() - start, status, leaking))

    total = int(config.duration * config.rate)
    try:
        for i in range(total):
            due = i / config.rate
            delay = start + due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            leaking = due >= config.leak_start and rng.random() < config.leak_probability
            task = loop.create_task(send(pick_path(rng, leaking), leaking))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            if on_sent is not None:
                on_sent(i + 1)
        if in_flight:
            await asyncio.wait(set(in_flight), timeout=client_timeout(config) + 1.0)
    finally:
        for task in in_flight:
            task.cancel()
        if in_flight:
            await asyncio.wait(set(in_flight))
