"""A FastAPI service on safepool (docs/recipes.md; tests/integration/test_recipes.py
runs it against a real PostgreSQL).

Run it: ``DATABASE_URL=postgresql://... python docs/examples/recipe_fastapi.py``
(needs fastapi and uvicorn), then ``curl localhost:8000/numbers/3`` and
``curl localhost:8000/ready``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

import safepool

# Recommended service configuration (docs/migration.md, "Opt-in protections",
# the column "recommended for a web service"):
#   min_size=5, max_size=20     size for the server's budget, not for the peak request rate
#   max_waiters=16 * max_size   a request beyond 320 queued ones fails at once: PoolOverloadedError -> 503
#   acquire_timeout=5           the request's own deadline: PoolTimeoutError -> 503
#   lease_timeout=30            above the slowest legitimate transaction: a lease held longer is
#                               taken back and its holder gets LeaseExpiredError (a bug -> 500)
#   leak_warning_after=10       log a lease held 10 s with the line that acquired it
#   fail_fast=True              server down: ServerUnavailableError at once -> 503
#   wait_on_connect_error=True  server full (53300): wait for a released connection instead of
#                               raising (so a request must never hold two connections at once)
#   max_site_share=0.5          bulkheads: one route holds at most 10 of the 20 connections; a leaking
#                               or stuck route waits at its cap (-> 503) while the other routes are served
#                               (each request's acquire site is named after its route: SitePerRoute)
#   queue_policy="adaptive"     overload: while a queue stands, a request waits 10 ms for a connection, not
#                               its whole 5 s (PoolOverloadedError -> 503), and one the pool cannot serve
#                               within 5 s at its current rate is refused at once (-> 503)
POOL_OPTIONS: dict[str, Any] = dict(
    min_size=5,
    max_size=20,
    max_waiters=16 * 20,
    acquire_timeout=5,
    lease_timeout=30,
    leak_warning_after=10,
    fail_fast=True,
    wait_on_connect_error=True,
    max_site_share=0.5,
    queue_policy="adaptive",
)
# "Not now" errors: answer 503 quickly and let the client or load balancer retry.
BUSY = (safepool.PoolOverloadedError, safepool.PoolTimeoutError, safepool.ServerUnavailableError)


class SitePerRoute:
    """ASGI middleware: every acquire a request makes (its dependency's, a
    ``pool.fetchval()``, the tasks it starts) counts against its route's
    bulkhead, ``safepool.site("GET /numbers/{count}")``. Without it, all
    routes would acquire from one site, the ``connection`` function below."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for route in scope["app"].routes:
                if route.matches(scope)[0] is Match.FULL:
                    with safepool.site(f"{scope['method']} {route.path}"):
                        await self.app(scope, receive, send)
                    return
        await self.app(scope, receive, send)  # no route: no site named


async def connection(request: Request) -> AsyncIterator[safepool.PoolConnectionProxy]:
    """One connection for the request, released when the handler returns."""
    pool: safepool.Pool = request.app.state.pool
    async with pool.acquire() as con:
        yield con


# scope="function": the connection goes back when the handler returns, before
# the response is sent, so a slow client does not hold it (FastAPI >= 0.121;
# the default scope releases it only after the response is sent).
Connection = Annotated[safepool.PoolConnectionProxy, Depends(connection, scope="function")]


def create_app(dsn: str, **overrides: Any) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The pool opens before the first request and closes after the last one.
        async with safepool.create_pool(dsn, name="api", **{**POOL_OPTIONS, **overrides}) as pool:
            app.state.pool = pool
            yield

    app = FastAPI(lifespan=lifespan)
    app.add_middleware(SitePerRoute)

    async def busy(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": "database busy, retry later"}, status_code=503, headers={"Retry-After": "1"})

    for error in BUSY:  # LeaseExpiredError stays a 500: it is a bug to fix
        app.add_exception_handler(error, busy)

    @app.get("/numbers/{count}")
    async def numbers(count: int, con: Connection) -> list[dict[str, int]]:
        rows = await con.fetch("SELECT n, n * n AS square FROM generate_series(1, $1::int) AS n", count)
        return [dict(row) for row in rows]

    @app.get("/total")
    async def total(request: Request) -> dict[str, int]:
        # One statement needs no dependency: the pool acquires and releases.
        return {"total": await request.app.state.pool.fetchval("SELECT sum(n)::int FROM generate_series(1, 10) AS n")}

    @app.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        # Readiness, not liveness: 503 takes the instance out of rotation while
        # the pool cannot serve (closed, server down, probe failed or hung).
        report = await request.app.state.pool.health(probe_timeout=0.5)
        return JSONResponse(report.to_dict(), status_code=200 if report.ready else 503)

    return app


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(create_app(os.environ["DATABASE_URL"]), port=int(os.environ.get("PORT", "8000")))
