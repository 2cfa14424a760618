"""A user's unittest suite (IsolatedAsyncioTestCase) run by pytest: a leak
in a test whose asyncTearDown closes the pool, a test that fails and leaks,
and a clean one. Copied into a pytester directory by test_testing_plugin.py."""

import asyncio
import os
import unittest

import safepool

DSN = os.environ["SAFEPOOL_PLUGIN_DSN"]


class OrdersTest(unittest.IsolatedAsyncioTestCase):
    async def asyncSetUp(self):
        self.pool = await safepool.create_pool(DSN, min_size=1, max_size=2)

    async def asyncTearDown(self):
        # Runs before the plugin's check: the leaked connection makes close()
        # wait, until the timeout terminates the pool.
        await asyncio.wait_for(self.pool.close(), 0.5)

    async def test_leak_then_teardown_closes_the_pool(self):
        self.con = await self.pool.acquire()  # LEAK-UNITTEST-TEARDOWN

    async def test_clean(self):
        async with self.pool.acquire() as con:
            self.assertEqual(await con.fetchval("SELECT 1"), 1)


class FailingTest(unittest.IsolatedAsyncioTestCase):
    async def test_fails_and_leaks(self):
        self.pool = await safepool.create_pool(DSN, min_size=1, max_size=2)
        # (After the check; its connections must not outlive the loop.)
        self.addCleanup(self.pool.terminate)
        self.con = await self.pool.acquire()  # LEAK-UNITTEST-FAILS
        self.assertEqual(await self.con.fetchval("SELECT 1"), 2)
