"""A Litestar service on safepool (docs/recipes.md; tests/integration/test_recipes.py
runs it against a real PostgreSQL).

Run it: ``DATABASE_URL=postgresql://... python docs/examples/recipe_litestar.py``
(needs litestar and uvicorn), then ``curl localhost:8000/numbers/3`` and
``curl localhost:8000/ready``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

from litestar import Litestar, Request, Response, get
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.params import FromPath
from litestar.types import ASGIApp, Receive, Scope, Send

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
BUSY = (safepool.PoolOverloadedError, safepool.PoolTimeoutError, safepool.ServerUnavailableError)


class SitePerRoute(ASGIMiddleware):
    """Every acquire a request makes (its dependencies', the tasks it starts)
    counts against its route's bulkhead, ``safepool.site("GET /numbers/{count}")``.
    Litestar runs middleware after routing, so the route's path is known.
    Without it, all routes would acquire from one site, ``provide_connection``."""

    scopes = (ScopeType.HTTP,)

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        with safepool.site(f"{scope['method']} {scope['path_template']}"):
            await next_app(scope, receive, send)


async def provide_connection(state: State) -> AsyncIterator[safepool.PoolConnectionProxy]:
    """One connection for the request; Litestar releases it after the handler
    returns, before the response is sent (and throws the handler's exception in)."""
    pool: safepool.Pool = state.pool
    async with pool.acquire() as con:
        yield con


@get("/numbers/{count:int}")
async def numbers(count: FromPath[int], con: NamedDependency[safepool.PoolConnectionProxy]) -> list[dict[str, int]]:
    rows = await con.fetch("SELECT n, n * n AS square FROM generate_series(1, $1::int) AS n", count)
    return [dict(row) for row in rows]


@get("/ready")
async def ready(state: State) -> Response[dict[str, Any]]:
    # Readiness, not liveness: 503 takes the instance out of rotation while
    # the pool cannot serve (closed, server down, probe failed or hung).
    report = await state.pool.health(probe_timeout=0.5)
    return Response(report.to_dict(), status_code=200 if report.ready else 503)


def busy(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, str]]:
    """"Not now" errors: answer 503 quickly and let the client or load balancer retry."""
    return Response({"error": "database busy, retry later"}, status_code=503, headers={"Retry-After": "1"})


def create_app(dsn: str, **overrides: Any) -> Litestar:
    @contextlib.asynccontextmanager
    async def pool_lifespan(app: Litestar) -> AsyncIterator[None]:
        # The pool opens before the first request and closes after the last one.
        async with safepool.create_pool(dsn, name="api", **{**POOL_OPTIONS, **overrides}) as pool:
            app.state.pool = pool
            yield

    return Litestar(
        route_handlers=[numbers, ready],
        dependencies={"con": Provide(provide_connection)},
        lifespan=[pool_lifespan],
        exception_handlers={error: busy for error in BUSY},
        middleware=[SitePerRoute()],
    )


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(create_app(os.environ["DATABASE_URL"]), port=int(os.environ.get("PORT", "8000")))
