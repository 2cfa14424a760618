"""The service under test: a small order API whose handlers use the pool.

It carries the incident's bug: on one branch, ``customer_orders`` returns
early and skips ``release()``. The same code runs on asyncpg's pool and on
safepool; only the pool object differs.

Error mapping, as in the incident: a request that misses its deadline is an
HTTP 500; safepool's refusals (wait queue full, acquire timeout, server down)
are HTTP 503, which tells a load balancer to retry elsewhere.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from safepool.errors import PoolOverloadedError, PoolTimeoutError, ServerUnavailableError

# Customer ids from here on are archived accounts: the branch with the bug.
ARCHIVED_FROM = 900_000

CUSTOMER_SQL = "SELECT $1::int AS id, $1::int >= 900000 AS archived"
ORDERS_SQL = "SELECT g AS id, ($1::int * 31 + g) % 97 AS amount FROM generate_series(1, 5) AS g"
PRODUCT_SQL = "SELECT $1::int AS id, md5($1::text) AS name"


class ServiceMetrics:
    """What the service knows about itself (the replay's ground truth)."""

    __slots__ = ("leaked", "in_flight", "timed_out", "refused")

    def __init__(self) -> None:
        self.leaked = 0  # connections left unreleased by the buggy branch
        self.in_flight = 0
        self.timed_out = 0  # requests past their deadline: HTTP 500
        self.refused = 0  # requests the pool refused: HTTP 503


def build_app(pool: Any, *, request_timeout: float) -> tuple[ASGIApp, ServiceMetrics]:
    """The ASGI app, bound to ``pool`` (asyncpg's or safepool's)."""
    metrics = ServiceMetrics()

    async def customer_orders(request: Request) -> Response:
        customer_id: int = request.path_params["customer_id"]
        con = await pool.acquire()  # the leaking acquire
        customer = await con.fetchrow(CUSTOMER_SQL, customer_id)
        if customer["archived"]:
            # The bug: this early return skips the release below.
            metrics.leaked += 1
            return JSONResponse({"customer": customer_id, "archived": True, "orders": []})
        orders = await con.fetch(ORDERS_SQL, customer_id)
        await pool.release(con)
        return JSONResponse({"customer": customer_id, "orders": [dict(row) for row in orders]})

    async def product(request: Request) -> Response:
        product_id: int = request.path_params["product_id"]
        async with pool.acquire() as con:
            row = await con.fetchrow(PRODUCT_SQL, product_id)
        return JSONResponse(dict(row))

    async def pool_refused(request: Request, exc: Exception) -> Response:
        metrics.refused += 1
        return PlainTextResponse(f"service unavailable: {type(exc).__name__}", status_code=503)

    app = Starlette(
        routes=[
            Route("/orders/{customer_id:int}", customer_orders),
            Route("/products/{product_id:int}", product),
        ],
        exception_handlers={
            PoolOverloadedError: pool_refused,
            PoolTimeoutError: pool_refused,
            ServerUnavailableError: pool_refused,
        },
    )
    return RequestDeadline(app, request_timeout, metrics), metrics


class RequestDeadline:
    """ASGI middleware: a request still running after ``seconds`` is
    cancelled and answered with HTTP 500 (what the incident's users saw)."""

    def __init__(self, app: ASGIApp, seconds: float, metrics: ServiceMetrics) -> None:
        self.app = app
        self.seconds = seconds
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        self.metrics.in_flight += 1
        try:
            async with asyncio.timeout(self.seconds):
                await self.app(scope, receive, send_tracked)
        except TimeoutError:
            if started:
                raise
            self.metrics.timed_out += 1
            await PlainTextResponse("request timed out", status_code=500)(scope, receive, send)
        finally:
            self.metrics.in_flight -= 1
