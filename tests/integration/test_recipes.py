"""The framework recipes of docs/recipes.md (docs/examples/recipe_*.py) on a
real PostgreSQL: each app opens its pool at startup and closes it at
shutdown, serves through a per-request connection, answers 503 when the pool
is busy, returns the connection when the handler fails, and reports
readiness from ``pool.health()``, and counts each request against its
route's bulkhead (``safepool.site``); each uses the configuration docs/migration.md
recommends.

FastAPI and Litestar run in-process through httpx's ASGI transport (their
lifespans entered directly, on the test's event loop); aiohttp through its
test client, on a loopback port.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import json
import re
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import safepool
from safepool.testing import assert_no_leaks

pytestmark = pytest.mark.asyncio
DOCS = Path(__file__).resolve().parents[2] / "docs"
RECIPES = ("fastapi", "aiohttp", "litestar")


def load(framework: str) -> ModuleType:
    pytest.importorskip(framework, reason="pip install -e '.[test]' installs the recipe frameworks")
    name = f"docs_examples_recipe_{framework}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, DOCS / "examples" / f"recipe_{framework}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@dataclass
class Answer:
    status: int
    body: Any
    headers: dict[str, str]


class Running:
    """One recipe app between startup and shutdown: ``await get(path)`` and its pool."""

    def __init__(self, app: Any, client: Any, pool: safepool.Pool, in_use_at_response_start: list[int]) -> None:
        self.app, self.client, self.pool = app, client, pool
        # pool.stats().in_use when each response's status line went out.
        self.in_use_at_response_start = in_use_at_response_start

    async def get(self, path: str) -> Answer:
        response = await self.client.get(path)
        if hasattr(response, "status_code"):  # httpx
            status, text = response.status_code, response.text
        else:  # aiohttp
            status, text = response.status, await response.text()
        is_json = response.headers.get("content-type", "").startswith("application/json")
        return Answer(status, json.loads(text) if is_json else text, {k.lower(): v for k, v in response.headers.items()})


@contextlib.asynccontextmanager
async def running(framework: str, dsn: str, **overrides: Any) -> AsyncIterator[Running]:
    recipe = load(framework)
    app = recipe.create_app(dsn, **overrides)
    seen: list[int] = []
    if framework == "aiohttp":
        from aiohttp.test_utils import TestClient, TestServer

        async def prepare(request: Any, response: Any) -> None:
            seen.append(app[recipe.POOL].stats().in_use)

        app.on_response_prepare.append(prepare)
        async with TestClient(TestServer(app)) as client:  # runs the cleanup context's startup and cleanup
            yield Running(app, client, app[recipe.POOL], seen)
        return
    import httpx

    async def observed(scope: Any, receive: Any, send: Any) -> None:
        async def watch(message: Any) -> None:
            if message["type"] == "http.response.start":
                seen.append(app.state.pool.stats().in_use)
            await send(message)

        await app(scope, receive, watch)

    lifespan = app.router.lifespan_context(app) if framework == "fastapi" else app.lifespan()
    async with lifespan:
        # raise_app_exceptions=False: a handler's exception becomes the 500 a server would send.
        transport = httpx.ASGITransport(app=observed, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield Running(app, client, app.state.pool, seen)


def recommended_options() -> dict[str, Any]:
    """The keyword arguments of the create_pool call in docs/migration.md's
    "Opt-in protections" section."""
    text = (DOCS / "migration.md").read_text()
    section = text.split("### Opt-in protections", 1)[1].split("\n## ", 1)[0]
    [block] = re.findall(r"```python\n(.*?)```", section, re.S)
    [call] = [node for node in ast.walk(ast.parse(block)) if isinstance(node, ast.Call)]
    return {kw.arg: eval(compile(ast.Expression(kw.value), "migration.md", "eval"), {}) for kw in call.keywords}


@pytest.mark.parametrize("framework", RECIPES)
async def test_recipe_uses_the_recommended_configuration(framework: str) -> None:
    recommended = recommended_options()
    assert {"lease_timeout", "leak_warning_after", "max_waiters", "acquire_timeout"} <= recommended.keys()
    recipe = load(framework)
    assert recipe.POOL_OPTIONS == {key: value for key, value in recommended.items() if key != "name"}
    source = (DOCS / "examples" / f"recipe_{framework}.py").read_text()
    for key in recipe.POOL_OPTIONS:  # the comment block explains each one
        assert re.search(rf"^#   .*\b{key}=", source, re.M), key


@pytest.mark.parametrize("framework", RECIPES)
async def test_recipe_serves_through_its_pool_and_closes_it(framework: str, pg_dsn: str) -> None:
    async with running(framework, pg_dsn) as app:
        pool = app.pool
        stats = pool.stats()
        assert (stats.name, stats.min_size, stats.max_size, stats.max_waiters) == ("api", 5, 20, 320)
        with assert_no_leaks(pool):
            answer = await app.get("/numbers/3")
            assert answer.status == 200, answer
            assert answer.body == [{"n": 1, "square": 1}, {"n": 2, "square": 4}, {"n": 3, "square": 9}]
            if framework == "fastapi":
                assert (await app.get("/total")).body == {"total": 55}
            ready = await app.get("/ready")
            assert ready.status == 200 and ready.body["status"] == "ok" and ready.body["pool"] == "api"
        # The request's connection was back in the pool before its response started.
        assert app.in_use_at_response_start and set(app.in_use_at_response_start) == {0}
        after = pool.stats()
        assert after.in_use == 0 and after.acquired - stats.acquired == after.released - stats.released >= 2
        assert not pool.is_closing()
    assert pool.is_closing()  # shutdown closed it


@pytest.mark.parametrize("framework", RECIPES)
async def test_recipe_answers_503_while_the_pool_is_busy(framework: str, pg_dsn: str) -> None:
    # One connection and no queue: while the test holds it, a request is refused at once.
    async with running(framework, pg_dsn, min_size=1, max_size=1, max_waiters=0) as app:
        async with app.pool.acquire():
            answer = await app.get("/numbers/3")
        assert answer.status == 503 and answer.headers["retry-after"] == "1"
        assert answer.body == {"error": "database busy, retry later"}
        assert app.pool.stats().overload_rejections == 1
        assert (await app.get("/numbers/1")).status == 200


@pytest.mark.parametrize("framework", RECIPES)
async def test_a_failing_handler_returns_its_connection(framework: str, pg_dsn: str) -> None:
    async with running(framework, pg_dsn, min_size=1, max_size=2) as app:
        with assert_no_leaks(app.pool):
            answer = await app.get("/numbers/3000000000")  # out of int4 range: the query raises
            assert answer.status == 500
        stats = app.pool.stats()
        assert stats.in_use == 0 and stats.acquired == stats.released
        assert (await app.get("/numbers/2")).status == 200


@pytest.mark.parametrize("framework", RECIPES)
async def test_readiness_fails_once_the_pool_is_closed(framework: str, pg_dsn: str) -> None:
    async with running(framework, pg_dsn, min_size=1, max_size=2) as app:
        await app.pool.close()
        answer = await app.get("/ready")
        assert answer.status == 503
        assert answer.body["status"] == "failing" and answer.body["reasons"][0]["code"] == "closed"


@pytest.mark.parametrize("framework", RECIPES)
async def test_a_request_acquires_at_its_routes_site(framework: str, pg_dsn: str) -> None:
    # The pool's setup hook runs in the acquiring request, on its fresh
    # lease: it records what pool.leases() and stats().sites say while the
    # request holds its connection.
    pools: list[safepool.Pool] = []
    seen: list[tuple[list[str | None], list[tuple[str, int, int]]]] = []

    async def record(con: Any) -> None:
        pool = pools[0]
        sites = [(row.site, row.in_use, row.waiting) for row in pool.stats().sites]
        seen.append(([lease.site for lease in pool.leases()], sites))

    routes = {"/numbers/3": "GET /numbers/{count}"}
    if framework == "fastapi":
        routes["/total"] = "GET /total"  # a pool shortcut, without the dependency
    async with running(framework, pg_dsn, min_size=1, max_size=4, setup=record) as app:
        pools.append(app.pool)
        assert app.pool.stats().site_cap == 2  # ceil(0.5 * 4)
        for path, site in routes.items():
            seen.clear()
            assert (await app.get(path)).status == 200
            assert seen == [([site], [(site, 1, 0)])], path
        assert app.pool.stats().sites == ()  # a site without leases or waiters is dropped


@pytest.mark.parametrize("framework", RECIPES)
async def test_a_route_at_its_cap_waits_while_the_others_are_served(framework: str, pg_dsn: str) -> None:
    # max_site_share=0.5 of two open connections: one per route.
    async with running(framework, pg_dsn, min_size=2, max_size=2, acquire_timeout=0.3) as app:
        async with app.pool.acquire(site="GET /numbers/{count}"):  # as a stuck request of that route would
            # Its route is at its cap: the request waits beside the idle
            # connection until its acquire timeout, then gets 503.
            answer = await app.get("/numbers/3")
            assert answer.status == 503 and answer.body == {"error": "database busy, retry later"}
            stats = app.pool.stats()
            assert (stats.acquire_timeouts, stats.in_use, stats.idle) == (1, 1, 1)
            if framework == "fastapi":
                assert (await app.get("/total")).body == {"total": 55}  # another route takes the idle one
        async with app.pool.acquire(site="GET /elsewhere"):  # another site holding the same share
            assert (await app.get("/numbers/3")).status == 200
        assert app.pool.stats().acquire_timeouts == 1
