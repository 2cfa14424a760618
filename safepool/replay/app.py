"""The service under test: a small order API whose handlers use the pool.

It carries the incident's bug: on one branch, ``customer_orders`` returns
early and skips ``release()`` (scenario ``leak``). ``payment`` hands its
connection to a background task that awaits a payment provider with no
timeout (scenario ``stuck``, once the provider hangs). ``report`` holds its
connection for a fixed query time (scenario ``surge``). The same code runs on
asyncpg's pool and on safepool; only the pool object differs.

Error mapping, as in the incident: a request that misses its deadline, or
fails with any other error (a broken connection), is an HTTP 500; the pool's
refusals are HTTP 503, which tells a load balancer to retry elsewhere:
safepool's (wait queue full, acquire timeout, server down) and asyncpg's
acquire timeout (``asyncio.TimeoutError``; no handler here sets another
timeout, so a ``TimeoutError`` a handler raises is the acquire's).
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from safepool import site
from safepool.errors import PoolOverloadedError, PoolTimeoutError, ServerUnavailableError

# Customer ids from here on are archived accounts: the branch with the bug.
ARCHIVED_FROM = 900_000

CUSTOMER_SQL = "SELECT $1::int AS id, $1::int >= 900000 AS archived"
ORDERS_SQL = "SELECT g AS id, ($1::int * 31 + g) % 97 AS amount FROM generate_series(1, 5) AS g"
PRODUCT_SQL = "SELECT $1::int AS id, md5($1::text) AS name"
PAYMENT_SQL = "SELECT $1::int AS id, 'pending' AS status"
CONFIRM_SQL = "SELECT $1::int AS id, $2::text AS status"
REPORT_SQL = "SELECT pg_sleep($1::float8), $2::int AS id"


class ServiceMetrics:
    """What the service knows about itself (the replay's ground truth)."""

    __slots__ = ("leaked", "stuck", "in_flight", "timed_out", "refused", "failed", "provider_hangs", "background")

    def __init__(self) -> None:
        self.leaked = 0  # connections left unreleased by the buggy branch
        self.stuck = 0  # connections handed to a payment confirmation while the provider hangs
        self.in_flight = 0
        self.timed_out = 0  # requests past their deadline: HTTP 500
        self.refused = 0  # requests the pool refused: HTTP 503
        self.failed = 0  # requests failed by another error: HTTP 500
        self.provider_hangs = False  # set by the replay when the stuck scenario's fault starts
        # The service keeps its background tasks referenced, as asyncio requires.
        self.background: set[asyncio.Task[None]] = set()

    async def shutdown(self) -> None:
        """Cancel the background tasks still running (the hung confirmations)."""
        for task in self.background:
            task.cancel()
        if self.background:
            await asyncio.wait(set(self.background), timeout=5)


def build_app(pool: Any, *, request_timeout: float, query_time: float = 0.25) -> tuple[ASGIApp, ServiceMetrics]:
    """The ASGI app, bound to ``pool`` (asyncpg's or safepool's).
    ``query_time``: seconds a report request holds its connection."""
    metrics = ServiceMetrics()
    never = asyncio.Event()  # what a hung payment provider answers with

    async def payment_provider(payment_id: int) -> str:
        if metrics.provider_hangs:
            # Counted here, where the connection gets stuck: a confirmation
            # started just before the fault but first run after it hangs too.
            metrics.stuck += 1
            await never.wait()  # the upstream hangs, and the call has no timeout
        await asyncio.sleep(0.005)
        return "confirmed"

    async def confirm_payment(con: Any, payment_id: int) -> None:
        try:
            status = await payment_provider(payment_id)
            await con.fetchrow(CONFIRM_SQL, payment_id, status)
        finally:
            try:
                await pool.release(con)
            except Exception:
                pass  # taken back by the pool meanwhile (lease_timeout)

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

    async def payment(request: Request) -> Response:
        payment_id: int = request.path_params["payment_id"]
        con = await pool.acquire()  # the stuck acquire
        try:
            await con.fetchrow(PAYMENT_SQL, payment_id)
        except BaseException:
            await pool.release(con)
            raise
        # Answer now, confirm in the background; the task holds the connection
        # until the provider answers (the service keeps the task referenced).
        task = asyncio.get_running_loop().create_task(confirm_payment(con, payment_id))
        metrics.background.add(task)
        task.add_done_callback(metrics.background.discard)
        return JSONResponse({"payment": payment_id, "status": "pending"}, status_code=202)

    async def report(request: Request) -> Response:
        report_id: int = request.path_params["report_id"]
        async with pool.acquire() as con:
            row = await con.fetchrow(REPORT_SQL, query_time, report_id)
        return JSONResponse({"report": row["id"]})

    async def pool_refused(request: Request, exc: Exception) -> Response:
        metrics.refused += 1
        return PlainTextResponse(f"service unavailable: {type(exc).__name__}", status_code=503)

    app = Starlette(
        routes=[
            Route("/orders/{customer_id:int}", customer_orders),
            Route("/products/{product_id:int}", product),
            Route("/payments/{payment_id:int}", payment, methods=["POST"]),
            # The surge hits the service's reporting routes, not one handler:
            # with a bulkhead per route, one route alone gets only its share.
            Route("/reports/sales/{report_id:int}", report),
            Route("/reports/stock/{report_id:int}", report),
            Route("/reports/users/{report_id:int}", report),
        ],
        exception_handlers={
            PoolOverloadedError: pool_refused,
            PoolTimeoutError: pool_refused,
            ServerUnavailableError: pool_refused,
            TimeoutError: pool_refused,  # asyncpg's acquire(timeout=...)
        },
    )
    return RequestDeadline(SitePerRoute(app, app.routes), request_timeout, metrics), metrics


class SitePerRoute:
    """ASGI middleware: each request's pool acquires count against its
    route's bulkhead (``safepool.site("GET /reports/sales/{report_id:int}")``),
    the recipe of docs/backpressure.md. A plain context variable: asyncpg's
    pool ignores it."""

    def __init__(self, app: ASGIApp, routes: list[Any]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        name = None
        if scope["type"] == "http":
            for route in self.routes:
                match, _ = route.matches(scope)
                if match is Match.FULL:
                    name = f"{scope['method']} {route.path}"
                    break
        if name is None:
            await self.app(scope, receive, send)
            return
        with site(name):
            await self.app(scope, receive, send)


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
        except Exception as exc:
            # Starlette has already answered 500 (and re-raised for the server
            # to log): count it here instead, keeping the terminal quiet.
            self.metrics.failed += 1
            if not started:
                await PlainTextResponse(f"error: {type(exc).__name__}", status_code=500)(scope, receive, send)
        finally:
            self.metrics.in_flight -= 1
