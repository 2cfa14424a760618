"""An aiohttp.web service on safepool (docs/recipes.md; tests/integration/test_recipes.py
runs it against a real PostgreSQL).

Run it: ``DATABASE_URL=postgresql://... python docs/examples/recipe_aiohttp.py``
(needs aiohttp), then ``curl localhost:8080/numbers/3`` and
``curl localhost:8080/ready``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

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
#                               (each request's acquire site is named after its route: site_per_route)
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


POOL = web.AppKey("pool", safepool.Pool)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def busy_is_503(request: web.Request, handler: Handler) -> web.StreamResponse:
    """"Not now" errors: answer 503 quickly and let the client or load balancer retry."""
    try:
        return await handler(request)
    except BUSY:
        return web.json_response({"error": "database busy, retry later"}, status=503, headers={"Retry-After": "1"})


@web.middleware
async def site_per_route(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every acquire the request makes counts against its route's bulkhead,
    ``safepool.site("GET /numbers/{count}")``. Without it, the site is the
    function that calls ``acquire()``, so a helper several routes share
    would be one site for all of them."""
    resource = request.match_info.route.resource
    if resource is None:  # no route matched (404, 405): no site named
        return await handler(request)
    with safepool.site(f"{request.method} {resource.canonical}"):
        return await handler(request)


async def numbers(request: web.Request) -> web.Response:
    count = int(request.match_info["count"])
    async with request.app[POOL].acquire() as con:
        rows = await con.fetch("SELECT n, n * n AS square FROM generate_series(1, $1::int) AS n", count)
    # The connection is back in the pool before the response is written.
    return web.json_response([dict(row) for row in rows])


async def ready(request: web.Request) -> web.Response:
    # Readiness, not liveness: 503 takes the instance out of rotation while
    # the pool cannot serve (closed, server down, probe failed or hung).
    report = await request.app[POOL].health(probe_timeout=0.5)
    return web.json_response(report.to_dict(), status=200 if report.ready else 503)


def create_app(dsn: str, **overrides: Any) -> web.Application:
    async def pool_context(app: web.Application) -> AsyncIterator[None]:
        # Opened at startup, closed at cleanup (after the last request).
        async with safepool.create_pool(dsn, name="api", **{**POOL_OPTIONS, **overrides}) as pool:
            app[POOL] = pool
            yield

    app = web.Application(middlewares=[busy_is_503, site_per_route])
    app.cleanup_ctx.append(pool_context)
    app.router.add_get("/numbers/{count:\\d+}", numbers)
    app.router.add_get("/ready", ready)
    return app


if __name__ == "__main__":
    web.run_app(create_app(os.environ["DATABASE_URL"]), port=int(os.environ.get("PORT", "8080")))
