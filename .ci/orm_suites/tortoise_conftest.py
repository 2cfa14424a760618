"""Fixtures the tortoise-orm sdist's tests expect but the sdist does not ship.

tortoise-orm keeps these fixtures in a conftest.py at the root of its
repository, which the sdist leaves out. The tests name them (``db``,
``db_simple``, ``db_truncate``, ``db_isolated``); this file provides them,
written for safepool's CI from the tests' own documented use:

- ``db_module``: one test database per test module, schema from
  ``tests.testmodels``;
- ``db``: that database, with each test inside a transaction rolled back at
  the end;
- ``db_simple``: that database, no cleanup;
- ``db_truncate``: that database, every table emptied after the test;
- ``db_isolated``: a database of its own for the test.

The database URL comes from ``TORTOISE_TEST_DB`` as in tortoise's own CI.
.ci/orm copies this file to the sdist's root as conftest.py.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest_asyncio
import tortoise.context as tortoise_context
from tortoise.context import TortoiseContext, tortoise_test_context

MODELS = ["tests.testmodels"]


def _db_url() -> str:
    return os.environ.get("TORTOISE_TEST_DB", "sqlite://:memory:")


class _Rollback(Exception):
    """Raised into the test's transaction so that it rolls back."""


async def _empty_tables(ctx: TortoiseContext) -> None:
    if not ctx.apps:
        return
    for model in ctx.apps.get_models_iterable():
        client = model._meta.db
        quote = client.query_class.SQL_CONTEXT.quote_char
        await client.execute_script(f"DELETE FROM {quote}{model._meta.db_table}{quote}")


@pytest_asyncio.fixture(scope="module")
async def db_module() -> AsyncIterator[TortoiseContext]:
    async with tortoise_test_context(MODELS, db_url=_db_url(), app_label="models", connection_label="models") as ctx:
        # Tests and fixtures run in other tasks than this module-scoped
        # fixture, so its context variable does not reach them: publish the
        # context as the global fallback for the module's lifetime.
        previous = tortoise_context._global_context
        tortoise_context._global_context = ctx
        try:
            yield ctx
        finally:
            tortoise_context._global_context = previous


@pytest_asyncio.fixture
async def db(db_module: TortoiseContext) -> AsyncIterator[TortoiseContext]:
    token = tortoise_context._current_context.set(db_module)
    try:
        client = db_module.db()
        if not client.capabilities.supports_transactions:
            yield db_module
            await _empty_tables(db_module)
            return
        transaction = client._in_transaction()
        await transaction.__aenter__()
        try:
            yield db_module
        finally:
            await transaction.__aexit__(_Rollback, _Rollback(), None)
    finally:
        tortoise_context._current_context.reset(token)


@pytest_asyncio.fixture
async def db_simple(db_module: TortoiseContext) -> AsyncIterator[TortoiseContext]:
    token = tortoise_context._current_context.set(db_module)
    try:
        yield db_module
    finally:
        tortoise_context._current_context.reset(token)


@pytest_asyncio.fixture
async def db_truncate(db_module: TortoiseContext) -> AsyncIterator[TortoiseContext]:
    token = tortoise_context._current_context.set(db_module)
    try:
        yield db_module
        await _empty_tables(db_module)
    finally:
        tortoise_context._current_context.reset(token)


@pytest_asyncio.fixture
async def db_isolated() -> AsyncIterator[TortoiseContext]:
    async with tortoise_test_context(MODELS, db_url=_db_url(), app_label="models", connection_label="models") as ctx:
        yield ctx
