"""Combined-fault stress of safepool on a real server (a manual tool, not a
test: pytest does not collect it).

    python tests/faults/stress_combined.py --dsn postgresql://... --seed 1 --ops 3000 [--loop uvloop]

One seeded run mixes, on a pool with max_size 2-4 and random options
(reset_mode full/rollback/auto, max_queries, max_inactive_connection_lifetime,
lease_timeout, setup=/init= hooks that fail, sleep or SET), worker tasks
doing acquire/release, ``async with pool.acquire()``, release from another
task or under asyncio.shield, pool.fetchval/execute shortcuts, transactions
committed, rolled back or left open, SET and advisory locks; every operation
may be cancelled (task.cancel() once or twice, asyncio.timeout, wait_for,
anyio move_on_after / fail_after / a cancelled CancelScope), release(timeout=)
and acquire(timeout=, lease_timeout=) are short at random; a chaos task runs
pg_terminate_backend on the pool's backends and expire_connections(); the
run ends with close() after the work, or close() / terminate() mid-flight.

With --multistep (on by default; --no-multistep gives the mix above, draw
for draw), leases also make multi-step calls: a cursor iterated in a
transaction (``async for``), a cursor opened by ``await`` then ``fetch`` /
``forward`` / ``fetchrow``, ``prepare()`` then ``fetchval`` or its own
``cursor()``, ``copy_records_to_table`` / ``copy_to_table`` (a bytes source,
an async iterable, a file-like object read in a thread) writing tags checked
as the other writes, ``copy_from_query`` to an async sink or a file-like
object, ``add_listener`` / NOTIFY / ``remove_listener`` (or left added);
each may be cancelled as above. A further kind, "mid_release", runs such a
call in a task of its own and releases the lease from the worker (another
task) while the call is between its steps (or about to be, or done): the
call's own error is then free (asyncpg's "another operation is in
progress" or "released back to the pool" included) but must be typed, the
release must not raise it, and the next leases must be clean.

Checked: the server's backend count (application_name) <= max_size, sampled
continuously; stats() sums and check_invariants() at every loop iteration; no
operation runs past $ST47_HANG seconds (30); no backend is left after the
close; no write reported committed is absent; no lease sees a previous
lease's transaction, SET or advisory lock (full and auto modes), nor a
LISTEN of a previous lease (full and auto modes; "rollback" keeps session
state, docs/migration.md); only typed errors reach the caller; "another operation is in
progress" reaches only a call whose lease another task released. Prints one JSON line; exit status 1 when anything was found.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import sys
import time
import traceback
from collections import Counter
from typing import Any

import anyio
import asyncpg

import safepool
from safepool import _internals as _pg

HANG = float(os.environ.get("ST47_HANG", "30"))  # an operation still running after this long is a hang


class HookError(Exception):
    pass


def classify(exc: BaseException) -> str | None:
    if isinstance(exc, HookError):
        return "hook"
    if isinstance(exc, safepool.PoolError):
        return type(exc).__name__
    if isinstance(exc, asyncpg.ConnectionDoesNotExistError):
        return "connection_lost"
    if isinstance(exc, asyncpg.PostgresError):
        return f"server:{exc.sqlstate}"
    if isinstance(exc, asyncpg.InternalClientError) and "another operation (2) is in progress" in str(exc):
        return "asyncpg:unsolicited_fatal"
    if isinstance(exc, RuntimeError) and "the handler is closed" in str(exc):
        # uvloop: asyncpg wrote (a COPY's next chunk, its CopyFail) to a
        # transport the lost connection closed; the same on asyncpg's pool
        # (test_review_h244_copy_lost.py on uvloop).
        return "asyncpg:uvloop_write_to_closed"
    if isinstance(exc, asyncpg.InternalClientError) and "got result for unknown protocol state 3" in str(exc):
        # asyncpg's close() (an expired generation, max_queries) cancelled a
        # call of the lease whose answer was already on its way: the same on
        # both pools (review h245, test_review_h245_close_mid_prepare.py;
        # docs/reliability.md).
        return "asyncpg:close_mid_call"
    if isinstance(exc, asyncpg.InterfaceError):
        msg = str(exc)
        if "connection is closed" in msg:
            return "connection_closed"
        if "released back to the pool" in msg:
            return "released_proxy_used"
        if "another operation is in progress" in msg:
            return "iface:another_operation"
        return "iface:" + msg[:60]
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, OSError):
        return f"os:{type(exc).__name__}"
    return None


async def main(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    app = f"st47_{args.seed}_{args.loop}_{os.getpid()}_{random.SystemRandom().randrange(10**9)}"
    max_size = rng.choice([2, 3, 4])
    cfg: dict[str, Any] = dict(
        max_size=max_size,
        min_size=rng.randint(0, max_size),
        reset_mode=rng.choice(["full", "rollback", "auto"]),
        max_queries=rng.choice([50000, rng.randint(3, 30)]),
        max_inactive_connection_lifetime=rng.choice([300.0, 0.0, round(rng.uniform(0.02, 0.3), 3)]),
        lease_timeout=rng.choice([None, None, round(rng.uniform(0.05, 0.5), 3)]),
    )
    use_setup = rng.random() < 0.5
    use_init = rng.random() < 0.5
    cfg["setup"] = use_setup
    cfg["init"] = use_init
    hook_rng = random.Random(args.seed * 7 + 1)

    async def setup(con: Any) -> None:
        x = hook_rng.random()
        if x < 0.05:
            raise HookError("setup failed")
        if x < 0.15:
            await asyncio.sleep(hook_rng.uniform(0, 0.005))
        elif x < 0.3:
            await con.execute("SELECT 1")
        elif x < 0.35:
            await con.execute("SELECT pg_sleep(0.01)")
            await con.execute("SET stress.setup = 'x'")

    async def init(con: Any) -> None:
        x = hook_rng.random()
        if x < 0.03:
            raise HookError("init failed")
        if x < 0.2:
            await asyncio.sleep(hook_rng.uniform(0, 0.005))
        await con.execute("SELECT 1")

    admin = await asyncpg.connect(args.dsn)
    sampler_con = await asyncpg.connect(args.dsn)
    await admin.execute("CREATE TABLE IF NOT EXISTS stress47_w (tag text PRIMARY KEY)")

    pool_kwargs = {k: v for k, v in cfg.items() if k not in ("setup", "init")}
    pool = await safepool.create_pool(
        args.dsn, server_settings={"application_name": app},
        setup=setup if use_setup else None, init=init if use_init else None, **pool_kwargs,
    )
    findings: list[str] = []
    freed: dict[Any, tuple[float, str, str]] = {}
    import weakref
    pid_of: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()

    def note_pids() -> None:
        for slot in pool._state.slots():
            c = slot.connection
            if c is not None and c not in pid_of and c._protocol is not None:
                pid_of[c] = c._protocol.backend_pid
    orig_slot_closed = pool._runner.slot_closed

    def traced_slot_closed(slot: Any, error: Exception | None = None) -> None:
        con = slot.connection
        pid = pid_of.get(con) if con is not None else None
        freed[pid] = (time.monotonic(), f"closed={None if con is None else con.is_closed()} "
                      f"watch={slot in pool._runner.exit_watches} peer_closed={con is not None and _pg.peer_closed(con)}",
                      " <- ".join(f"{f.name}:{f.lineno}" for f in traceback.extract_stack(limit=9)[:-1]))
        orig_slot_closed(slot, error)

    pool._runner.slot_closed = traced_slot_closed
    # Graceful closes met by a statement (or COPY) in flight: asyncpg's close()
    # cancels it, and a server that ends the connection meanwhile resolves
    # its waiter with None (for a finding about a write, below).
    closes_in_flight: dict[Any, list[str]] = {}
    orig_con_close = asyncpg.Connection.close

    async def traced_con_close(self: Any, *, timeout: float | None = None) -> None:
        from safepool import _internals
        if self._protocol is not None and _internals.statement_in_flight(self):
            closes_in_flight.setdefault(pid_of.get(self), []).append(
                " <- ".join(f"{f.name}:{f.lineno}" for f in traceback.extract_stack(limit=12)[:-1]))
        await orig_con_close(self, timeout=timeout)

    asyncpg.Connection.close = traced_con_close  # type: ignore[method-assign]
    orig_close_slot = pool._runner.close_slot
    close_info: dict[Any, str] = {}

    def traced_close_slot(slot: Any, *args: Any, **kwargs: Any) -> None:
        h = pool._runner.slot_holders.get(slot)
        con = slot.connection
        if con is not None:
            close_info[pid_of.get(con)] = (
                f"unresponsive={h is not None and h.unresponsive} lost={h is not None and h.lost_while_leased} "
                f"is_closed={con.is_closed()} cancelling={con._protocol is not None and con._protocol._is_cancelling()} "
                f"aborted={con._aborted} terminating={pool._runner.terminating}")
        orig_close_slot(slot, *args, **kwargs)

    pool._runner.close_slot = traced_close_slot
    outcomes: Counter[str] = Counter()
    cancel_kinds: Counter[str] = Counter()
    ms_kinds: Counter[str] = Counter()
    unreduced: list[str] = []  # errors seen, not yet classified as asyncpg's or safepool's
    examples: dict[str, str] = {}  # an outcome kind -> its first traceback (--examples)
    chaos: Counter[str] = Counter()
    writes: dict[str, str] = {}  # tag -> ok / committed_then_error:<kind> / failed / ambiguous
    lease_ops: dict[int, tuple[int, str, dict[str, Any]]] = {}  # lease id -> the op that acquired it (for a hang)
    write_pid: dict[str, Any] = {}  # tag -> the backend that wrote it (for a finding, to read in the server's log)
    max_server = 0
    server_samples = 0
    stats_samples = 0
    running: dict[int, tuple[float, str, asyncio.Task[Any]]] = {}
    loop_errs: list[dict[str, Any]] = []
    terminated_mid = [False]  # pool.terminate() called mid-flight
    stray_waiter_errs: list[dict[str, Any]] = []
    stop_sampling = False

    def on_loop_error(_loop: Any, ctx: dict[str, Any]) -> None:
        msg = str(ctx.get("message", ""))
        if msg.startswith("Resetting connection with an active transaction"):
            return
        exc = ctx.get("exception")
        if msg == "Future exception was never retrieved" and str(exc) == "unexpected connection_lost() call":
            return
        if msg == "Future exception was never retrieved" and (
                (isinstance(exc, asyncpg.ConnectionDoesNotExistError)
                 and str(exc).startswith("connection was closed in the middle of operation"))
                or isinstance(exc, asyncpg.QueryCanceledError)):
            # Judged at the end: asyncpg's own where the run met an
            # unsolicited FATAL (see below).
            stray_waiter_errs.append(ctx)
            return
        loop_errs.append(ctx)

    asyncio.get_running_loop().set_exception_handler(on_loop_error)

    def check_stats(where: str) -> None:
        nonlocal stats_samples
        stats_samples += 1
        s = pool.stats()
        parts = (s.idle, s.in_use, s.connecting, s.resetting, s.closing)
        if any(p < 0 for p in parts) or s.size < 0 or s.waiting < 0:
            findings.append(f"{where}: negative count {s}")
        if sum(parts) != s.size:
            findings.append(f"{where}: idle+in_use+connecting+resetting+closing={sum(parts)} != size={s.size}")
        if s.size > s.max_size:
            findings.append(f"{where}: size {s.size} > max_size {s.max_size}")
        try:
            pool._state.check_invariants()
        except AssertionError as exc:
            findings.append(f"{where}: invariants: {exc}")

    ticks = 0

    def ticker() -> None:
        nonlocal ticks
        if stop_ticker:
            return
        ticks += 1
        check_stats("tick")
        note_pids()
        asyncio.get_running_loop().call_soon(ticker)

    stop_ticker = False

    async def sampler() -> None:
        nonlocal max_server, server_samples
        while not stop_sampling:
            check_stats("sample")
            try:
                pids = await sampler_con.fetchval(
                    "SELECT array_agg(pid) FROM pg_stat_activity WHERE application_name = $1", app) or []
                n = len(pids)
            except Exception as exc:
                findings.append(f"sampler failed: {exc!r}")
                return
            server_samples += 1
            max_server = max(max_server, n)
            if n > max_size:
                snap = {pid_of.get(s.connection) if s.connection is not None else None: s.state.value
                        for s in pool._state.slots()}
                now_ = time.monotonic()
                extra = {p: (round(now_ - freed[p][0], 4), close_info.get(p), freed[p][1], freed[p][2]) if p in freed else "never freed"
                         for p in pids if p not in snap}
                findings.append(f"EXTRA backends {extra}")
                rows = await sampler_con.fetch(
                    "SELECT pid, state, left(query, 60) AS q, now() - state_change AS since, wait_event"
                    " FROM pg_stat_activity WHERE application_name = $1", app)
                findings.append(f"server shows {n} backends > max_size {max_size} (pool {pool!r}) slots {snap} "
                                f"rows {[tuple(r) for r in rows]}")
            await asyncio.sleep(0.005)

    leak_modes_full = cfg["reset_mode"] in ("full", "auto")

    async def check_fresh(con: Any, lease_tag: str) -> None:
        if con.is_in_transaction():
            findings.append(f"{lease_tag}: lease handed out in a transaction (client view)")
        try:
            # Simple protocol: fails outside a transaction block, as it must.
            await con.execute("SAVEPOINT stress_probe")
        except asyncpg.NoActiveSQLTransactionError:
            pass
        except asyncpg.InFailedSQLTransactionError:
            findings.append(f"{lease_tag}: lease sees a failed transaction left by a previous lease")
        else:
            findings.append(f"{lease_tag}: lease sees a transaction left open by a previous lease")
        row = await con.fetchrow(
            "SELECT current_setting('stress.tag', true) AS tag,"
            " (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()) AS adv,"
            " current_setting('statement_timeout') AS st,"
            " (SELECT count(*) FROM pg_listening_channels()) AS lis")
        if row["lis"] and leak_modes_full:  # (rollback mode keeps LISTEN: docs/migration.md)
            findings.append(f"{lease_tag}: lease LISTENs on {row['lis']} channel(s) of a previous lease")
        if leak_modes_full:
            if row["tag"] not in (None, ""):
                findings.append(f"{lease_tag}: lease sees SET stress.tag={row['tag']!r} of a previous lease")
            if row["adv"]:
                findings.append(f"{lease_tag}: lease holds {row['adv']} advisory lock(s) of a previous lease")
            if row["st"] != "0":
                findings.append(f"{lease_tag}: statement_timeout={row['st']} left by a previous lease")

    async def multistep(con: Any, r: random.Random, opid: int, state: dict[str, Any]) -> None:
        """One multi-step call (or a few) on the lease ``con``."""
        k = r.randrange(9)
        state["ms"] = ("cursor_iter", "cursor_await", "prepare", "prepare_cursor", "copy_records",
                       "copy_to_table", "copy_from_query", "listener", "listener_left")[k]
        ms_kinds[state["ms"]] += 1
        if k == 0:
            n = r.randint(1, 40)
            got = 0
            async with con.transaction():
                async for row in con.cursor("SELECT g FROM generate_series(1, $1) g", n, prefetch=r.randint(1, 10)):
                    got += 1
                    if row[0] != got:
                        findings.append(f"op {opid}: cursor row {row[0]} != {got}")
                    if r.random() < 0.1:
                        await asyncio.sleep(r.uniform(0, 0.003))
            if got != n:
                findings.append(f"op {opid}: cursor gave {got} rows of {n}")
        elif k == 1:
            async with con.transaction():
                cur = await con.cursor("SELECT g FROM generate_series(1, 30) g")
                rows = await cur.fetch(r.randint(1, 5))
                moved = await cur.forward(r.randint(1, 5))
                nxt = await cur.fetchrow()
                if nxt is not None and nxt[0] != len(rows) + moved + 1:
                    findings.append(f"op {opid}: cursor fetchrow {nxt[0]} after {len(rows)}+{moved}")
        elif k == 2:
            ps = await con.prepare(r.choice(("SELECT $1::int + 1", "SELECT $1::int + 1 FROM pg_sleep(0.002)")))
            v = await ps.fetchval(opid)
            if v != opid + 1:
                findings.append(f"op {opid}: prepared fetchval {v}")
        elif k == 3:
            ps = await con.prepare("SELECT g FROM generate_series(1, $1) g")
            async with con.transaction():
                got = [row[0] async for row in ps.cursor(r.randint(1, 20), prefetch=r.randint(1, 5))]
            if got != list(range(1, len(got) + 1)):
                findings.append(f"op {opid}: prepared cursor rows {got}")
        elif k in (4, 5):
            tags = [f"{app}-{opid}-c{len(state['tags']) + i}" for i in range(r.randint(1, 3))]
            for tag in tags:
                state["tags"].append(tag)
                writes[tag] = "pending"
                write_pid[tag] = con.get_server_pid()
            if k == 4:
                await con.copy_records_to_table("stress47_w", records=[(t,) for t in tags], columns=["tag"])
            else:
                data = "".join(t + "\n" for t in tags).encode()
                form = r.randrange(3)
                if form == 0:
                    source: Any = bytearray(data)  # (bytes would be read as a path)
                elif form == 1:
                    async def chunks() -> Any:
                        for t in tags:
                            await asyncio.sleep(r.uniform(0, 0.003))
                            yield (t + "\n").encode()
                    source = chunks()
                else:
                    source = io.BytesIO(data)  # (read in an executor thread)
                ret = await con.copy_to_table("stress47_w", source=source, columns=["tag"])
                for tag in tags:
                    write_pid[tag] = f"{write_pid[tag]} form={form} ret={ret!r} kind={state.get('kind')}"
            for tag in tags:
                writes[tag] = "committed"
        elif k == 6:
            n = r.randint(1, 50)
            if r.random() < 0.5:
                got_b: list[bytes] = []

                async def sink(b: bytes) -> None:
                    got_b.append(bytes(b))
                    if r.random() < 0.3:
                        await asyncio.sleep(r.uniform(0, 0.003))
                await con.copy_from_query("SELECT generate_series(1, $1)", n, output=sink)
                text = b"".join(got_b)
            else:
                buf = io.BytesIO()
                await con.copy_from_query("SELECT generate_series(1, $1)", n, output=buf)
                text = buf.getvalue()
            if text.split() != [str(i).encode() for i in range(1, n + 1)]:
                findings.append(f"op {opid}: copy_from_query gave {text[:80]!r}")
        else:
            channel = f"st47_ch{r.randint(1, 3)}"
            heard: list[str] = []

            def listener(_c: Any, _pid: int, _ch: str, payload: str) -> None:
                heard.append(payload)
            await con.add_listener(channel, listener)
            await con.execute(f"NOTIFY {channel}, 'op{opid}'")
            if r.random() < 0.5:
                await asyncio.sleep(r.uniform(0, 0.005))
            if k == 7:
                await con.remove_listener(channel, listener)

    async def lease_work(con: Any, r: random.Random, opid: int, state: dict[str, Any]) -> None:
        if r.random() < 0.5:
            await check_fresh(con, f"op {opid}")
        for _ in range(r.randint(1, 3)):
            if args.multistep and r.random() < 0.3:
                await multistep(con, r, opid, state)
                continue
            k = r.random()
            if k < 0.15:
                await con.fetchval("SELECT 1")
            elif k < 0.27:
                await con.execute("SELECT pg_sleep($1)", r.uniform(0, 0.02))
            elif k < 0.37:
                await con.execute(f"SET stress.tag = 'L{opid}'")
                if r.random() < 0.3:
                    await con.execute("SET statement_timeout = '7s'")
            elif k < 0.45:
                await con.fetchval("SELECT pg_try_advisory_lock($1)", r.randint(1, 3))
            elif k < 0.53:
                await con.execute("BEGIN")
                await con.execute("SELECT 1")
                return  # left open
            elif k < 0.68:
                tag = f"{app}-{opid}-{len(state['tags'])}"
                state["tags"].append(tag)
                writes[tag] = "pending"
                write_pid[tag] = con.get_server_pid()
                async with con.transaction():
                    await con.execute("INSERT INTO stress47_w VALUES ($1)", tag)
                    if r.random() < 0.3:
                        await con.execute("SELECT pg_sleep($1)", r.uniform(0, 0.01))
                writes[tag] = "committed"
            elif k < 0.78:
                await asyncio.sleep(r.uniform(0, 0.01))
            elif k < 0.86:
                async with con.transaction():
                    await con.execute("SELECT pg_sleep($1)", r.uniform(0, 0.01))
            elif k < 0.89:
                await con.fetchval("SELECT 1/0")
            elif k < 0.92:
                if r.random() < 0.5:
                    await asyncio.sleep(r.uniform(0, 0.3))  # past a short lease_timeout
                else:
                    await con.execute("SELECT pg_sleep($1)", r.uniform(0, 0.3))
            else:
                await con.execute("SELECT pg_advisory_xact_lock($1)", r.randint(10, 12))

    async def op(opid: int, r: random.Random, kind: str, state: dict[str, Any]) -> None:
        acq_timeout = r.choice([None, None, r.uniform(0.001, 0.05)])
        if kind == "explicit":
            if r.random() < 0.2:
                state["lt"] = r.uniform(0.01, 0.2)
                con = await pool.acquire(lease_timeout=state["lt"])
            else:
                con = await (pool.acquire() if acq_timeout is None else pool.acquire(timeout=acq_timeout))
            lease_ops[con._lease.id] = (opid, kind, state)
            try:
                await lease_work(con, r, opid, state)
                state["stage"] = "release"
            finally:
                rt = r.choice([None, None, r.uniform(0.001, 0.05)])
                if rt is None:
                    await pool.release(con)
                else:
                    await pool.release(con, timeout=rt)
        elif kind == "other_release":
            con = await (pool.acquire() if acq_timeout is None else pool.acquire(timeout=acq_timeout))
            lease_ops[con._lease.id] = (opid, kind, state)
            try:
                await lease_work(con, r, opid, state)
                state["stage"] = "release"
            finally:
                form = r.choice(("task", "shield", "task_cancelled"))
                # (asyncio.wait: a cancel of this task must not cancel the
                # release task before its first step; a release coroutine
                # that never starts never releases, with asyncpg's pool too.)
                if form == "task":
                    rt = asyncio.create_task(pool.release(con))
                    rt.add_done_callback(lambda f: f.cancelled() or f.exception())
                    await asyncio.wait({rt})
                    rt.result()
                elif form == "shield":
                    inner = asyncio.ensure_future(pool.release(con))
                    inner.add_done_callback(lambda f: f.cancelled() or f.exception())
                    await asyncio.shield(inner)
                else:
                    rt = asyncio.create_task(pool.release(con))
                    rt.add_done_callback(lambda f: f.cancelled() or f.exception())
                    # (Not before its first step: a coroutine cancelled before it
                    # starts never releases, with asyncpg's pool too.)
                    asyncio.get_running_loop().call_soon(rt.cancel)
                    await asyncio.wait({rt})
                    if not rt.cancelled():
                        rt.result()
        elif kind == "mid_release":
            # A multi-step call in a task of its own; the lease released from
            # this task (another one) while the call runs, as asyncpg's pool
            # allows: the call's error is the caller's own business (typed).
            con = await (pool.acquire() if acq_timeout is None else pool.acquire(timeout=acq_timeout))
            lease_ops[con._lease.id] = (opid, kind, state)
            released = False
            call: asyncio.Task[Any] | None = None
            try:
                if r.random() < 0.3:
                    await check_fresh(con, f"op {opid}")
                cr = random.Random(r.random())
                call = asyncio.create_task(multistep(con, cr, opid, state), name=f"op{opid}:call")
                call.add_done_callback(lambda f: f.cancelled() or f.exception())
                when = r.randrange(4)
                if when == 0:  # once a step of it is counted (between its steps)
                    holder = con._holder
                    for _ in range(2000):
                        if holder.copies or call.done():
                            break
                        await asyncio.sleep(0)
                elif when == 1:
                    for _ in range(r.randint(0, 6)):
                        await asyncio.sleep(0)
                elif when == 2:
                    await asyncio.sleep(r.uniform(0, 0.01))
                state["stage"] = "release"
                state["mid"] = call.done()
                counted = con._holder.copies
                released = True
                try:
                    await pool.release(con)
                except asyncpg.InterfaceError as exc:
                    # asyncpg's behaviour: a release made while another task's
                    # statement (or a cursor's step, counted or not) is
                    # running on the connection raises "another operation
                    # is in progress": the reset is refused, the connection
                    # closed (both pools: review h244's scenario, a release
                    # during con.execute("SELECT pg_sleep(0.2)") or a
                    # cursor's __anext__ in another task). Between two steps
                    # of a counted call (the protocol idle) safepool resets
                    # after the step instead (test_review_s69_between_steps).
                    if "another operation is in progress" not in str(exc):
                        raise
                    outcomes[f"mid_release:release_refused_running(asyncpg):counted={bool(counted)}"] += 1
            finally:
                try:
                    if call is not None:
                        if not released:
                            call.cancel()
                        done_, _ = await asyncio.wait({call}, timeout=HANG)
                        if not done_:
                            findings.append(f"HANG: op {opid}'s call after a release by another task")
                        elif call.cancelled():
                            outcomes["mid:cancelled"] += 1
                        elif call.exception() is None:
                            outcomes["mid:ok"] += 1
                        else:
                            exc = call.exception()
                            kn = classify(exc)
                            if kn is None and terminated_mid[0] and after_pool_terminate(exc):
                                kn = "asyncpg:copy_write_after_pool_terminate"
                            if kn is None and released and (
                                    (isinstance(exc, AttributeError) and "'NoneType' object has no attribute" in str(exc)
                                     and any(f"'{name}'" in str(exc)
                                             for name in ("write", "resume_reading", "pause_reading", "_init_types")))
                                    or (isinstance(exc, RuntimeError) and "the handler is closed" in str(exc))):
                                # A call whose lease this task released: the
                                # refused reset gave the connection up, and the
                                # COPY's next chunk met no transport (uvloop: a
                                # closed one), or a prepare no protocol. The same
                                # on asyncpg's pool, which terminates at once
                                # (test_review_s74_copy_released.py).
                                kn = "asyncpg:copy_write_after_release"
                            if kn is None:
                                findings.append(f"untyped error in op {opid}'s call released mid-way: "
                                                f"{''.join(traceback.format_exception(exc))[-1500:]}")
                                kn = "UNTYPED:" + type(exc).__name__
                            outcomes[f"mid:{state.get('ms')}:{kn}"] += 1
                            examples.setdefault(f"mid:{state.get('ms')}:{kn}", "".join(traceback.format_exception(exc))[-1200:])
                            if not released:  # (cancelled by this task: its lease not released yet)
                                if kn in ("iface:another_operation", "server:25P01"):
                                    findings.append(f"another operation in op {opid}'s call, not released: {exc!r}")
                finally:
                    # (Even when this task is cancelled again while it waits
                    # for the call: anyio's scopes cancel at every await. A
                    # lease lost here was the tool's, and one whose call left
                    # a listener is never reclaimed, by design.)
                    if not released:
                        try:
                            await pool.release(con)
                        except asyncpg.InterfaceError as exc:
                            if "another operation is in progress" not in str(exc):
                                raise
                            outcomes["mid_release:release_refused_running(asyncpg):cancelled_wait"] += 1
        elif kind == "ctx":
            ctx = pool.acquire() if acq_timeout is None else pool.acquire(timeout=acq_timeout)
            async with ctx as con:
                lease_ops[con._lease.id] = (opid, kind, state)
                await lease_work(con, r, opid, state)
                state["stage"] = "release"
        elif kind == "shortcut":
            if r.random() < 0.6:
                v = await pool.fetchval("SELECT $1::int", opid)
                if v != opid:
                    findings.append(f"op {opid}: fetchval returned {v}")
            else:
                tag = f"{app}-{opid}-s"
                writes[tag] = "pending"
                state["tags"].append(tag)
                await pool.execute("INSERT INTO stress47_w VALUES ($1)", tag)
                writes[tag] = "committed"
        else:
            raise AssertionError(kind)

    def after_pool_terminate(exc: BaseException) -> bool:
        """A multi-step call's next step on a connection pool.terminate()
        aborted under it: asyncpg's abort drops the protocol and its
        transport (``Connection._abort``), and the step meets ``None`` (a
        COPY's write or resume_reading, copy_from_query's inlining query's
        bind_execute), as on asyncpg's pool, whose terminate() aborts alike."""
        return isinstance(exc, AttributeError) and any(
            f"'NoneType' object has no attribute '{name}'" in str(exc)
            for name in ("write", "resume_reading", "pause_reading", "bind_execute", "prepare", "_init_types"))

    CANCELS = ("none", "none", "cancel", "cancel2", "cancel2_same", "timeout", "wait_for",
               "anyio_move_on", "anyio_fail_after", "anyio_scope_cancel")

    async def one(opid: int) -> None:
        r = random.Random(args.seed * 1_000_003 + opid)
        kinds: tuple[str, ...] = (("explicit", "ctx", "ctx", "shortcut") if args.no_other
                                  else ("explicit", "ctx", "ctx", "shortcut", "other_release"))
        if args.multistep and not args.no_other:
            kinds += ("mid_release",)
        kind = r.choice(kinds)
        how = r.choice(CANCELS)
        d = r.choice((r.uniform(0, 0.002), r.uniform(0, 0.02), r.uniform(0, 0.1)))
        cancel_kinds[how] += 1
        state: dict[str, Any] = {"tags": [], "stage": "work", "kind": kind}
        loop = asyncio.get_running_loop()

        async def body() -> None:
            if how == "timeout":
                async with asyncio.timeout(d):
                    await op(opid, r, kind, state)
            elif how == "wait_for":
                await asyncio.wait_for(op(opid, r, kind, state), d)
            elif how == "anyio_move_on":
                with anyio.move_on_after(d):
                    await op(opid, r, kind, state)
            elif how == "anyio_fail_after":
                with anyio.fail_after(d):
                    await op(opid, r, kind, state)
            elif how == "anyio_scope_cancel":
                with anyio.CancelScope() as scope:
                    loop.call_later(d, scope.cancel)
                    await op(opid, r, kind, state)
            else:
                await op(opid, r, kind, state)

        t = asyncio.create_task(body(), name=f"op{opid}:{kind}:{how}")
        if how == "cancel":
            loop.call_later(d, t.cancel)
        elif how == "cancel2":
            loop.call_later(d, lambda: (t.cancel(), loop.call_soon(t.cancel)))
        elif how == "cancel2_same":
            loop.call_later(d, lambda: (t.cancel(), t.cancel()))
        running[opid] = (time.monotonic(), t.get_name(), t)
        done, _ = await asyncio.wait({t}, timeout=HANG)
        running.pop(opid, None)
        if not done:
            stack = "".join(traceback.format_list(traceback.extract_stack(t.get_stack(limit=30)[-1]))) if t.get_stack() else ""
            findings.append(f"HANG: {t.get_name()} still running after {HANG}s; pool {pool!r}; stack:\n{stack}")
            return
        def settle_writes(how_ended: str) -> None:
            for tag in state["tags"]:
                if writes[tag] == "committed":
                    if how_ended != "ok":
                        writes[tag] = f"committed_then_{how_ended}:{state['stage']}"
                else:  # the commit's answer never came: no claim either way
                    writes[tag] = f"ambiguous:{how_ended}"

        if t.cancelled():
            outcomes["cancelled"] += 1
            settle_writes("cancelled")
            return
        exc = t.exception()
        if exc is None:
            outcomes["ok"] += 1
            settle_writes("ok")
            return
        kindname = classify(exc)
        if kindname == "iface:another_operation" and classify(exc.__context__) == "asyncpg:unsolicited_fatal":
            # The lease's call met a protocol that had read a message it did
            # not expect (a FATAL of the chaos task's pg_terminate_backend,
            # read while idle): asyncpg's COPY left its waiter set, and the
            # release's reset is refused, on both pools (review h245,
            # test_review_h245_copy_on_error_consume.py).
            kindname = "asyncpg:release_after_unsolicited_fatal"
        if kindname is None and terminated_mid[0] and after_pool_terminate(exc):
            # pool.terminate() aborted the connection under a COPY, whose
            # next write (or CopyFail) met no transport: asyncpg's pool
            # terminates its connections alike (holder.terminate()).
            kindname = "asyncpg:copy_write_after_pool_terminate"
        if kindname in ("iface:another_operation", "server:25P01"):
            findings.append(f"another operation in {t.get_name()} lt={state.get('lt')} ms={state.get('ms')} mid_done={state.get('mid')}: {''.join(traceback.format_exception(exc))[-2500:]}")
        if kindname is None:
            findings.append(f"untyped error in {t.get_name()}: {''.join(traceback.format_exception(exc))[-1500:]}")
            kindname = "UNTYPED:" + type(exc).__name__
        outcomes[kindname] += 1
        examples.setdefault(f"{kind}:{state.get('stage')}:{kindname}", "".join(traceback.format_exception(exc))[-1200:])
        settle_writes("error-" + kindname)

    next_op = 0
    total = args.ops

    async def worker() -> None:
        nonlocal next_op
        if args.only:
            for opid in map(int, args.only.split(",")):
                await one(opid)
            next_op = total
            return
        while next_op < total:
            opid = next_op
            next_op += 1
            await one(opid)

    async def chaos_task() -> None:
        crng = random.Random(args.seed * 31 + 7)
        while not stop_sampling:
            await asyncio.sleep(crng.uniform(0.005, 0.06))
            x = crng.random()
            if args.chaos == "none":
                x = 1.0
            elif args.chaos == "expire" and x < 0.6:
                x = 1.0
            elif args.chaos == "terminate" and 0.6 <= x < 0.72:
                x = 1.0
            try:
                if x < 0.45:
                    rows = await admin.fetch(
                        "SELECT pid, state FROM pg_stat_activity WHERE application_name = $1", app)
                    if rows:
                        v = crng.choice(rows)
                        if await admin.fetchval("SELECT pg_terminate_backend($1)", v["pid"]):
                            chaos[f"terminate:{v['state']}"] += 1
                elif x < 0.6:
                    # by the pool's own view: the backend pid of a random slot
                    slots = [s for s in pool._state.slots() if s.connection is not None]
                    if slots:
                        s = crng.choice(slots)
                        pid = pid_of.get(s.connection)
                        if pid is None:
                            continue
                        if await admin.fetchval("SELECT pg_terminate_backend($1)", pid):
                            chaos[f"terminate_slot:{s.state.value}"] += 1
                elif x < 0.72:
                    await pool.expire_connections()
                    chaos["expire"] += 1
                else:
                    chaos["nothing"] += 1
            except Exception as exc:
                if pool._state.closing:
                    return
                findings.append(f"chaos failed: {exc!r}")

    def dump_pool() -> str:
        """The pool's slots, open leases (and who still refers to a lease's
        proxy) and tasks: for a hang report."""
        import gc

        def referrers(obj: Any) -> str:
            return ", ".join(
                f"{type(r).__name__}:{getattr(r, 'f_code', None) and r.f_code.co_name}:{getattr(r, 'f_lineno', '')}"
                for r in gc.get_referrers(obj))

        out = [repr(pool), f"phase={pool._state.phase} size={pool._state.size}"]
        out += [f"slot {slot!r} con_closed={None if slot.connection is None else slot.connection.is_closed()}"
                for slot in pool._state.slots()]
        out += [f"lease {lease.id} state={lease.state} slot={lease.slot!r} age={pool._now() - lease.acquired_at:.2f} "
                f"op={lease_ops.get(lease.id, ('?',))[0]} kind={lease_ops.get(lease.id, ('?', '?'))[1]} "
                f"op_state={ {k: v for k, v in lease_ops.get(lease.id, (0, 0, {}))[2].items() if k != 'tags'} }"
                for lease in pool._state.leases()]
        out += [f"  proxy {ref!r:.80} referrers: {referrers(ref)}"
                for lease in pool._state.leases() for ref in gc.get_referrers(lease)
                if type(ref).__name__.endswith("Proxy")]
        def awaiting(t: asyncio.Task[Any]) -> str:
            """The task's await chain, outermost first, down to what it waits on."""
            parts = []
            obj: Any = t.get_coro()
            for _ in range(30):
                frame = getattr(obj, "cr_frame", None) or getattr(obj, "gi_frame", None)
                if frame is None:
                    parts.append(f"{obj!r:.160}")
                    break
                parts.append(f"{frame.f_code.co_name}:{frame.f_lineno}")
                nxt = getattr(obj, "cr_await", None) or getattr(obj, "gi_yieldfrom", None)
                if nxt is None:
                    break
                obj = nxt
            return " -> ".join(parts)

        out += [f"task {t.get_name()} {t.get_coro()!r} done={t.done()}: {awaiting(t)}"
                for t in list(pool._runner.tasks)]
        return "\n".join(out)

    workers_n = rng.choice([max_size, 2 * max_size, 4 * max_size])
    if args.workers:
        workers_n = args.workers
    end_mode = rng.choice(["close_after", "close_mid", "terminate_mid"]) if args.end is None else args.end
    cfg["workers"] = workers_n
    cfg["end"] = end_mode
    samp = asyncio.create_task(sampler())
    asyncio.get_running_loop().call_soon(ticker)
    ch = asyncio.create_task(chaos_task())
    workers = [asyncio.create_task(worker()) for _ in range(workers_n)]
    started = time.monotonic()
    if end_mode == "close_after":
        await asyncio.gather(*workers)
        stop_sampling = True
        await ch
        check_stats("before close")
        ct = asyncio.create_task(pool.close())
        done, _ = await asyncio.wait({ct}, timeout=HANG)
        if not done:
            findings.append(f"HANG: pool.close() after the run; {dump_pool()}")
            ct.cancel()
            await asyncio.wait({ct})
    else:
        while next_op < total * 0.8:  # noqa: ASYNC110 (a counter the workers move, polled)
            await asyncio.sleep(0.01)
        stop_sampling = True
        await ch
        try:
            if end_mode == "close_mid":
                ct = asyncio.create_task(pool.close())
                done, _ = await asyncio.wait({ct}, timeout=HANG)
                if not done:
                    findings.append(f"HANG: pool.close() mid-flight; running: {[v[1] for v in running.values()]}; "
                                    f"{dump_pool()}")
                    ct.cancel()
                    await asyncio.wait({ct})
                else:
                    ct.result()
            else:
                terminated_mid[0] = True
                pool.terminate()
        except Exception as exc:
            findings.append(f"{end_mode} raised {exc!r}")
        try:
            async with asyncio.timeout(HANG + 5):
                await asyncio.gather(*workers)
        except TimeoutError:
            findings.append(f"HANG: workers after {end_mode}: {[v[1] for v in running.values()]}")
    elapsed = time.monotonic() - started
    await samp
    stop_ticker = True
    check_stats("after close")
    s = pool.stats()
    if s.size != 0:
        findings.append(f"after close: size {s.size} ({pool!r})")
    # No backend of the pool remains on the server (a terminated one takes a moment to leave).
    left = -1
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        left = await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", app)
        if left == 0:
            break
        await asyncio.sleep(0.05)
    if left:
        rows = await admin.fetch("SELECT pid, state, query FROM pg_stat_activity WHERE application_name = $1", app)
        findings.append(f"after {end_mode}: {left} backends of the pool remain 5s later: {[dict(r) for r in rows]}")
    # Writes.
    present = {r["tag"] for r in await admin.fetch("SELECT tag FROM stress47_w WHERE tag LIKE $1", app + "-%")}
    wsum: Counter[str] = Counter()
    for tag, status in writes.items():
        there = tag in present
        wsum[f"{status.split(':')[0]}:{'present' if there else 'absent'}"] += 1
        if status == "committed" and not there:
            pid = write_pid.get(tag)
            closes = closes_in_flight.get(int(str(pid).split()[0])) if pid is not None else None
            findings.append(f"write {tag} reported committed but absent (backend {pid}; closes in flight {closes})")
        if status.startswith("committed_then_error"):
            wsum["detail:" + status] += 1
            if status.endswith(":release") and not any(k in status for k in (
                    "connection_lost", "connection_closed", "unsolicited_fatal", "server:57P01", "os:", "-timeout:")):
                findings.append(f"write {tag} committed, then the release raised: {status}")
    await admin.execute("DELETE FROM stress47_w WHERE tag LIKE $1", app + "-%")
    await admin.close()
    await sampler_con.close()
    stray_sources = ("unsolicited_fatal", "uvloop_write_to_closed", "copy_write_after_release")
    if stray_waiter_errs and any(src in key for key in list(outcomes) + list(wsum) for src in stray_sources):
        # A COPY started on a protocol that had read a FATAL while idle
        # (the chaos task's pg_terminate_backend), or whose write failed
        # before it could hand its waiter a callback (uvloop's closed
        # transport, a transport the release's terminate took), leaves
        # asyncpg's waiter to be completed by the connection's end (or the
        # server's cancel) with an error nobody reads: the same on
        # asyncpg's pool (test_review_h245_copy_on_error_consume.py and
        # test_review_s74_copy_released.py compare the loop errors).
        outcomes["loop:asyncpg_stray_waiter"] += len(stray_waiter_errs)
    else:
        loop_errs += stray_waiter_errs
    def cancel_task_of_a_dead_copy(ctx: dict[str, Any]) -> bool:
        """asyncpg's: a COPY IN that failed in its source loop after the
        server ended its backend asked for a cancel on the dead protocol;
        the cancel task waits on a future nothing completes and is collected
        with the dropped connection (review h248, both pools alike:
        tests/integration/test_review_h248_copy_cancel_task.py)."""
        task = ctx.get("task")
        coro = task.get_coro() if task is not None else None
        return (str(ctx.get("message", "")).startswith("Task was destroyed but it is pending")
                and getattr(coro, "__qualname__", "") == "Connection._cancel"
                and any(k.startswith("terminate") for k in chaos) and ms_kinds["copy_to_table"] > 0)

    dead_copy_tasks = [ctx for ctx in loop_errs if cancel_task_of_a_dead_copy(ctx)]
    if dead_copy_tasks:
        outcomes["loop:asyncpg_cancel_task_of_a_dead_copy"] += len(dead_copy_tasks)
        loop_errs = [ctx for ctx in loop_errs if ctx not in dead_copy_tasks]
    for ctx in loop_errs:
        fut = ctx.get("future", ctx.get("task"))
        where = ""
        if fut is not None:
            where = f" in {fut!r:.300}"
        findings.append(f"loop error: {ctx.get('message')} {ctx.get('exception')!r}{where}")
    st = pool.stats()
    return dict(
        seed=args.seed, loop=args.loop, ops=total, seconds=round(elapsed, 2), cfg=cfg, outcomes=dict(outcomes),
        cancels=dict(cancel_kinds), multistep=dict(ms_kinds), chaos=dict(chaos), writes=dict(wsum), max_server=max_server,
        server_samples=server_samples, stats_samples=stats_samples, ticks=ticks,
        counters=dict(acquired=st.acquired, released=st.released, expired=st.leases_expired,
                      opened=st.connections_opened, closed=st.connections_closed, resets=st.resets,
                      resets_failed=st.resets_failed, connect_errors=st.connect_errors, leaks=st.leaks_detected),
        unreduced=unreduced[:10], findings=findings[:30], n_findings=len(findings), **({"examples": examples} if args.examples else {}),
    )


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--ops", type=int, default=3000)
    p.add_argument("--loop", default="asyncio")
    p.add_argument("--end", default=None)
    p.add_argument("--no-other", action="store_true")
    p.add_argument("--chaos", default="all")
    p.add_argument("--only", default="")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--examples", action="store_true", help="the first traceback of each outcome kind")
    p.add_argument("--multistep", action=argparse.BooleanOptionalAction, default=True,
                   help="multi-step calls (cursor, prepare, COPY, listeners) and mid-call releases")
    p.add_argument("--dsn", default=os.environ.get("SAFEPOOL_TEST_DSN"), required="SAFEPOOL_TEST_DSN" not in os.environ)
    a = p.parse_args()
    if a.loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            result = runner.run(main(a))
    else:
        result = asyncio.run(main(a))
    print(json.dumps(result, default=str))
    sys.exit(1 if result["n_findings"] else 0)
