"""``python -m safepool check PATH...``: find acquired connections that some
path through the code never gives back.

An AST scan, one function at a time. For each ``pool.acquire()`` it asks:
is the result used with ``async with``, or, when awaited into a variable, is
that variable released in a ``finally:`` block that starts right after the
acquire? Anything else is reported with the file, the line and a fix.

What it cannot know (see docs/testing.md, "Limits of the static check"):
which objects are pools (it goes by name: a receiver whose last name ends in
``pool``/``pools``, a name bound from ``create_pool(...)``, a parameter
annotated ``...Pool``; ``--pool-names`` changes the pattern), and where a
connection goes once it leaves the function (returned, stored on an object,
appended to a list): those are not followed and not reported.

Codes:

- SP001: released on some paths only (not in ``finally``, not ``async with``);
- SP002: never released in the function that acquired it;
- SP003: ``await pool.acquire()`` whose result is thrown away (or used once and dropped);
- SP004: ``pool.acquire()`` neither awaited nor used with ``async with``.

A line ending in ``# safepool: ignore`` is not reported.
"""

from __future__ import annotations

import argparse
import ast
import contextvars
import fnmatch
import functools
import json
import os
import re
import sys
import tokenize
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NoReturn

from ._cli import silence_stdout
from ._secrets import mask_dsn, passwords, redact_argv, redact_code

__all__ = ["Finding", "check_source", "main"]

DEFAULT_POOL_NAMES = r"(?i)pools?$"
IGNORE_COMMENT = re.compile(r"#\s*safepool:\s*ignore\b")
# Directories a walk skips (hidden ones too): caches, virtualenvs, build
# output. One of these names that is a package (has an `__init__.py`:
# `myapp/build/`) is code, and is checked.
SKIP_DIRS = {"__pycache__", "node_modules", "site-packages", "venv", ".venv", "build", "dist"}

_Scope = ast.Module | ast.FunctionDef | ast.AsyncFunctionDef
_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)
_RELEASE_METHODS = {"release", "close", "terminate"}
# Exit-stack registrations: of a callable and its arguments, and of an exit itself.
_CALLBACK_REGISTRATIONS = {"push_async_callback", "callback"}
_CLEANUP_REGISTRATIONS = _CALLBACK_REGISTRATIONS | {"push", "push_async_exit"}
# Calls that pass an acquire's awaitable through to what awaits them.
_WRAPPERS = {"wait_for", "shield"}
# Asynchronous context managers whose entering does not suspend: a deadline
# around a release in `finally:` (`async with asyncio.timeout(5):`).
_DEADLINES = {"timeout", "timeout_at"}
_WITHS = (ast.With, ast.AsyncWith)
_ESCAPE_METHODS = {"append", "add", "put", "put_nowait", "extend", "insert", "appendleft", "setdefault", "update"}
# `with pytest.raises(PoolTimeoutError):` (or unittest's assertRaises): the
# block's last statement is expected to raise, so an acquire there gets no
# connection; if it does, the test fails anyway.
_EXPECTS_RAISE = {"raises", "assertRaises", "assertRaisesRegex"}
# Objects with an acquire() that are not connection pools, whatever their
# name (`self.worker_pool = asyncio.Semaphore(5)`).
_NOT_POOLS = {"Lock", "RLock", "Semaphore", "BoundedSemaphore", "Condition", "CapacityLimiter"}


@dataclass(frozen=True)
class Finding:
    """One problem found: where (``path``; ``line`` and ``col`` 1-based, the
    acquire's position), its ``code`` (SP001-SP004, docs/testing.md), the
    ``message`` and the ``hint`` (the fix), as ``--format json`` prints it."""

    path: str
    line: int
    col: int
    code: str
    message: str
    hint: str

    def to_text(self) -> str:
        """The finding as the text format prints it: ``path:line:col: CODE
        message`` (line and column 1-based, as compilers print them), then
        an indented ``fix:`` line."""
        return f"{self.path}:{self.line}:{self.col}: {self.code} {self.message}\n    fix: {self.hint}"


def _hint(receiver: str, var: str | None, code: str = "") -> str:
    name = "con" if var is None or code == "SP004" else var
    receiver, first = _named_receiver(receiver, name)
    if "." in name:  # stored on an object: `request.state.con`
        return first + (
            f"release it in a `finally:` block right after the acquire (`try: ... finally: await "
            f"{receiver}.release({name})`), or acquire into a local name: `async with {receiver}.acquire() as con:`"
        )
    if code == "SP004":
        return first + (
            f"`{name} = await {receiver}.acquire()` (then release it in `finally:`), or "
            f"`async with {receiver}.acquire() as {name}:`"
        )
    return first + (
        f"use `async with {receiver}.acquire() as {name}:`, or release it in a `finally:` block "
        f"right after the acquire (`try: ... finally: await {receiver}.release({name})`)"
    )


def _registration_hint(receiver: str, var: str, registration: ast.Call) -> str:
    """The fix for an exit-stack registration that does not run on every
    path right after the acquire."""
    pool, bind_first = _named_receiver(receiver, var)
    assert isinstance(registration.func, ast.Attribute)
    stack = _receiver_source(registration.func.value)
    return (f"{bind_first}register the release right after the acquire, outside any condition "
            f"(`{var} = await {pool}.acquire()`, then `{stack}.push_async_callback({pool}.release, {var})`), "
            f"or let the stack acquire it: `{var} = await {stack}.enter_async_context({pool}.acquire())`")


def _is_plain(node: ast.expr) -> bool:
    """Whether ``node`` names the same object each time it is evaluated, as
    far as its source tells: a name, or attributes and constant subscripts
    of one (``self.pool``, ``app["pool"]``); no call, no await."""
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        if isinstance(node, ast.Subscript) and not isinstance(node.slice, ast.Constant):
            return False
        node = node.value
    return isinstance(node, ast.Name)


def _named_receiver(receiver: str, var: str = "con") -> tuple[str, str]:
    """The pool as a fix line may write it twice (acquire, release), and
    what the fix says first: ``receiver`` itself when it is plain
    (_is_plain); a walrus's name (``(pool := app.pool)``: ``pool``);
    otherwise (a call, an await: ``(await create_pool(dsn))``, which a
    second time would make another pool) the name ``pool``, bound first."""
    try:
        node = ast.parse(receiver, mode="eval").body
    except SyntaxError:
        return receiver, ""
    if isinstance(node, ast.NamedExpr):
        return node.target.id, ""
    if _is_plain(node):
        return receiver, ""
    name = "pool" if var != "pool" else "the_pool"
    return name, f"bind the pool to a name first (`{name} = {ast.unparse(node)}`), then "


def _receiver_source(node: ast.expr) -> str:
    """The source of ``node`` as the receiver of a method call, parenthesised
    when its precedence needs it: ``(await create_pool(dsn))``, ``(a or
    b)``, ``(lambda: pool)``; ``self.pool`` as it is. (``ast.unparse`` of
    the attribute ``node.x`` puts the parentheses; ``.x`` is cut off.)"""
    return ast.unparse(ast.Attribute(value=node, attr="x", ctx=ast.Load()))[:-2].rstrip()


def _last_name(node: ast.expr) -> str | None:
    """`self.app.pool` -> "pool"; `pools[key]` -> "pools"; `app["pool"]` -> "pool"
    (aiohttp's application state); `get_pool()` -> "get_pool"."""
    while True:
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, ast.Attribute):
            return node.attr
        if isinstance(node, ast.Subscript):
            if isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
                return node.slice.value
            node = node.value
        elif isinstance(node, ast.Call):
            node = node.func
        elif isinstance(node, ast.Await):
            node = node.value
        else:
            return None


def _assigned_pairs(targets: list[ast.expr], value: ast.expr) -> list[tuple[list[ast.expr], ast.expr]]:
    """What an assignment binds to what: ``targets`` and ``value`` as they
    are, or, unpacked element by element, ``self.pool, self.cache = pg_pool,
    cache`` as ``self.pool = pg_pool`` and ``self.cache = cache``. A tuple
    (or list) target with another number of elements or a starred one binds
    nothing that is told here."""
    if not isinstance(value, (ast.Tuple, ast.List)) or any(isinstance(e, ast.Starred) for e in value.elts):
        return [(targets, value)]
    unpacked: list[ast.Tuple | ast.List] = [
        t for t in targets
        if isinstance(t, (ast.Tuple, ast.List)) and len(t.elts) == len(value.elts)
        and not any(isinstance(e, ast.Starred) for e in t.elts)
    ]
    whole = [t for t in targets if not isinstance(t, (ast.Tuple, ast.List))]
    pairs: list[tuple[list[ast.expr], ast.expr]] = [(whole, value)] if whole else []
    if unpacked:
        for i, element in enumerate(value.elts):
            pairs.extend(_assigned_pairs([t.elts[i] for t in unpacked], element))
    return pairs


def _is_pool_app_key(call: ast.Call, pool_names: re.Pattern[str]) -> bool:
    """Whether ``call`` makes an aiohttp ``AppKey`` for a pool: its type (the
    second argument, or ``AppKey[T]``'s parameter) names a ``...Pool``, or its
    name (the first argument, a string) matches ``pool_names``."""
    func = call.func
    kind: ast.expr | None = None
    if isinstance(func, ast.Subscript):
        kind, func = func.slice, func.value
    if _last_name(func) != "AppKey":
        return False
    if kind is None and len(call.args) >= 2:
        kind = call.args[1]
    if kind is not None and re.search(r"Pool\b", ast.unparse(kind)):
        return True
    name = call.args[0] if call.args else None
    return isinstance(name, ast.Constant) and isinstance(name.value, str) and bool(pool_names.search(name.value))


class _Module:
    """One parsed file: parent links and the names that hold pools."""

    def __init__(self, tree: ast.Module, source: str, pool_names: re.Pattern[str]) -> None:
        self.tree = tree
        self.lines = source.splitlines()
        self.parents: dict[ast.AST, ast.AST] = {}
        for parent in ast.walk(tree):
            for child in ast.iter_child_nodes(parent):
                self.parents[child] = parent
        self.pool_pattern = pool_names
        self.known_pools: set[str] = set()
        # Names bound to a lock or semaphore (`worker_pool = asyncio.Semaphore(5)`):
        # not pools, even when the name says so.
        self.not_pools: set[str] = set()
        assignments: list[ast.Assign | ast.AnnAssign] = []
        for node in ast.walk(tree):
            if isinstance(node, ast.AnnAssign) and (name := _last_name(node.target)):
                # A field or attribute annotated with a pool's type (`db:
                # asyncpg.Pool` in a dataclass, `self.db: Pool = db`), as a
                # parameter is below.
                if re.search(r"Pool\b", ast.unparse(node.annotation)):
                    self.known_pools.add(name)
                elif _last_name(node.annotation) in _NOT_POOLS:
                    self.not_pools.add(name)
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
                assignments.append(node)
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if _last_name(node.value) == "create_pool" and isinstance(node.value, (ast.Call, ast.Await)):
                    self.known_pools.update(n for n in map(_last_name, targets) if n)
                elif isinstance(node.value, ast.Call) and _last_name(node.value.func) in _NOT_POOLS:
                    self.not_pools.update(n for n in map(_last_name, targets) if n)
            elif isinstance(node, (ast.With, ast.AsyncWith)):
                for item in node.items:
                    if item.optional_vars is not None and _last_name(item.context_expr) == "create_pool":
                        name = _last_name(item.optional_vars)
                        if name:
                            self.known_pools.add(name)
            elif isinstance(node, ast.arg) and node.annotation is not None:
                if re.search(r"Pool\b", ast.unparse(node.annotation)):
                    self.known_pools.add(node.arg)
                elif _last_name(node.annotation) in _NOT_POOLS:
                    self.not_pools.add(node.arg)
        # aiohttp's typed application keys (`POOL = web.AppKey("pool",
        # asyncpg.Pool)`, or `web.AppKey[asyncpg.Pool]("pool")`): `app[POOL]`
        # is a pool when the key's type is a `...Pool`, or its name reads
        # as one, as `app["pool"]` does.
        self.pool_keys: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Call):
                if _is_pool_app_key(node.value, pool_names):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    self.pool_keys.update(n for n in map(_last_name, targets) if n)
        # Aliases: `db = app.state.pool`, `self._db = pool`, `db =
        # request.app["pool"]` (and aliases of those), anywhere in the file,
        # by last name as for create_pool.
        aliases = [
            (target, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Assign) and len(node.targets) == 1
            and isinstance(node.targets[0], (ast.Name, ast.Attribute))
            and isinstance(node.value, (ast.Name, ast.Attribute, ast.Subscript))
            and (target := _last_name(node.targets[0])) is not None
        ]
        while True:
            found = {name for name, value in aliases if name not in self.known_pools and self.is_pool(value)}
            if not found:
                break
            self.known_pools |= found
        # Which pool names may hold the same pool (_Module.same_pool): a
        # name and what is assigned to it (`db = self._pool`, `self.pool =
        # pool`, `pool = primary if x else replica`: all three), by last
        # name as above. A union-find over the names.
        self.pool_links: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                pairs = _assigned_pairs(node.targets, node.value)
            elif isinstance(node, (ast.AnnAssign, ast.NamedExpr)) and node.value is not None:
                pairs = _assigned_pairs([node.target], node.value)
            else:
                continue
            for targets, value in pairs:
                values = [value]
                while any(isinstance(v, (ast.IfExp, ast.BoolOp)) for v in values):
                    values = [
                        part for v in values
                        for part in ([v.body, v.orelse] if isinstance(v, ast.IfExp)
                                     else v.values if isinstance(v, ast.BoolOp) else [v])
                    ]
                names = [_last_name(t) for t in targets] + [
                    _last_name(v) for v in values if isinstance(v, (ast.Name, ast.Attribute, ast.Subscript))
                ]
                keys = [name.lstrip("_") for name in names if name]
                for key in keys[1:]:
                    self.pool_links[self.pool_root(key)] = self.pool_root(keys[0])
        # Aliases of a pool's acquire (`acq = pool.acquire`,
        # `functools.partial(pool.acquire, timeout=1)`, `lambda: pool.acquire()`),
        # `await acq()` is `await pool.acquire()`. A name is an alias in the
        # function that assigns it and the functions nested in it (the whole
        # file for a module-level name), an attribute (`self._acquire =
        # pool.acquire`) by its name across the file, as pools are; a call
        # `x.acquire()` is judged by `x`, whatever is named `acquire`.
        self.acquire_names: dict[tuple[ast.AST, str], str] = {}
        self.acquire_attributes: dict[str, str] = {}
        for node in assignments:
            if node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                receiver = self.acquire_receiver(node.value)
                if receiver is None:
                    continue
                for alias in targets:
                    if isinstance(alias, ast.Name):
                        scope = self.binding_scope(self.scope_of(node), alias.id)
                        self.acquire_names[scope, alias.id] = receiver
                        if isinstance(scope, ast.ClassDef):
                            # `acq = pool.acquire` in a class body: its methods
                            # call it as `self.acq()`, an attribute.
                            self.acquire_attributes[alias.id] = receiver
                    elif isinstance(alias, ast.Attribute):
                        self.acquire_attributes[alias.attr] = receiver
        self.acquire_name_ids = {name for _, name in self.acquire_names}
        # Names and attributes bound to a pool's release (`release =
        # pool.release`, `partial(pool.release, ...)`): `release(con)` gives
        # `con` back. By name across the file (see _RELEASE_ALIASES).
        self.release_aliases: set[str] = set()
        for node in assignments:
            if node.value is not None and self.method_receiver(node.value, "release") is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                self.release_aliases.update(name for name in map(_last_name, targets) if name)

    def acquire_receiver(self, value: ast.expr) -> str | None:
        """The pool's source text when ``value`` is an alias of its acquire
        (``pool.acquire``, ``partial(pool.acquire, ...)``, ``lambda:
        pool.acquire(...)``), else None."""
        return self.method_receiver(value, "acquire", lambdas=True)

    def method_receiver(self, value: ast.expr, method: str, *, lambdas: bool = False) -> str | None:
        """The pool's source text when ``value`` is its ``method``
        (``pool.release``), a ``partial`` of it or, with ``lambdas``, a
        lambda calling it; else None."""
        if isinstance(value, ast.Call) and _last_name(value.func) == "partial" and value.args:
            value = value.args[0]
        elif lambdas and isinstance(value, ast.Lambda) and isinstance(value.body, ast.Call):
            value = value.body.func
        if isinstance(value, ast.Attribute) and value.attr == method and self.is_pool(value.value):
            return _receiver_source(value.value)
        return None

    def acquire_call(self, node: ast.AST) -> str | None:
        """The pool's source text when ``node`` is a call of its acquire
        (``pool.acquire()``, or of an alias: ``acq()``), else None."""
        if not isinstance(node, ast.Call):
            return None
        func = node.func
        if isinstance(func, ast.Attribute):
            if func.attr == "acquire":
                return _receiver_source(func.value) if self.is_pool(func.value) else None
            return self.acquire_attributes.get(func.attr)
        if isinstance(func, ast.Name) and func.id in self.acquire_name_ids:
            scope = self.binding_scope(self.scope_of(node), func.id)
            here = True
            while True:
                # A class body's names are not seen by the functions in it
                # (Python's scoping): outward from a method, its class is skipped.
                if here or not isinstance(scope, ast.ClassDef):
                    if (scope, func.id) in self.acquire_names:
                        return self.acquire_names[scope, func.id]
                    if scope is self.tree or _binds(scope, func.id):
                        return None  # ... or a name of its own there: `async def f(acquire):`
                here = False
                scope = self.scope_of(scope)
        return None

    def binding_scope(self, scope: ast.AST, name: str) -> ast.AST:
        """The scope whose variable ``name`` is in ``scope``: the module's
        under ``global name``, the enclosing function's that binds it under
        ``nonlocal name`` (Python's scoping), else ``scope`` itself."""
        while scope is not self.tree:
            declared = _declares(scope, name)
            if declared is ast.Global:
                return self.tree
            if declared is not ast.Nonlocal:
                return scope
            scope = self.scope_of(scope)
            while isinstance(scope, ast.ClassDef):
                scope = self.scope_of(scope)  # (nonlocal skips class bodies)
        return scope

    def is_pool(self, receiver: ast.expr) -> bool:
        if isinstance(receiver, ast.Subscript) and isinstance(receiver.slice, (ast.Name, ast.Attribute)):
            if _last_name(receiver.slice) in self.pool_keys:
                return True
        if (
            isinstance(receiver, ast.Subscript) and isinstance(receiver.slice, ast.Constant)
            and isinstance(receiver.slice.value, str) and self.is_pool(receiver.value)
        ):
            return True  # `self.pools["primary"]`: an item of pools (`app["pool"]` is judged by its key below)
        name = _last_name(receiver)
        return name is not None and (
            name in self.known_pools or (name not in self.not_pools and bool(self.pool_pattern.search(name)))
        )

    def pool_root(self, key: str) -> str:
        while key in self.pool_links and self.pool_links[key] != key:
            key = self.pool_links[key]
        return key

    def pool_identity(self, receiver: ast.expr) -> str | None:
        """Which pool ``receiver`` is, as far as this scan can tell: for a
        pool (:meth:`is_pool`) named by a name, an attribute chain or a
        string item (``read_pool``, ``self._pool``, ``app["pool"]``), its
        last name without leading underscores, or the first of the names
        assigned one to another (:attr:`pool_links`); None for any other
        receiver (``get_pool()``, ``pools[key]``, ``app[POOL]``): it cannot
        tell. Two pools with different identities are two pools (see
        :func:`_releases`)."""
        node = receiver
        while True:
            if isinstance(node, ast.Attribute):
                node = node.value
            elif (
                isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant)
                and isinstance(node.slice.value, str)
            ):
                node = node.value
            else:
                break
        if not isinstance(node, ast.Name) or not self.is_pool(receiver):
            return None
        name = _last_name(receiver)
        return self.pool_root(name.lstrip("_")) if name else None

    def ignored(self, *lines: int) -> bool:
        return any(0 < n <= len(self.lines) and IGNORE_COMMENT.search(self.lines[n - 1]) for n in lines)

    def scope_of(self, node: ast.AST) -> ast.AST:
        parent = self.parents.get(node)
        while parent is not None and not isinstance(parent, (*_SCOPES, ast.Module)):
            parent = self.parents.get(parent)
        return parent if parent is not None else self.tree

    def statement_of(self, node: ast.AST) -> ast.stmt:
        while not isinstance(node, ast.stmt):
            node = self.parents[node]
        return node


def _position(node: ast.expr) -> tuple[int, int]:
    """Where ``node`` starts in the source, (line, column): what comes first
    on one line too (``con = await pool.acquire(); await pool.release(con)``)."""
    return node.lineno, node.col_offset


def _gathered_name(call: ast.AST, parent: ast.AST | None, assign: ast.Assign) -> str | None:
    """The name ``call`` lands in when it is one of ``asyncio.gather()``'s
    arguments and the gathered results are unpacked into names, position by
    position (``a, b = await asyncio.gather(pool.acquire(), pool.acquire())``);
    None for any other shape (starred arguments or targets, a length mismatch)."""
    if not (isinstance(parent, ast.Call) and _last_name(parent.func) == "gather" and call in parent.args):
        return None
    if len(assign.targets) != 1 or not isinstance(assign.targets[0], (ast.Tuple, ast.List)):
        return None
    names = assign.targets[0].elts
    if len(names) != len(parent.args) or any(isinstance(arg, ast.Starred) for arg in parent.args):
        return None
    target = names[parent.args.index(call)]
    return target.id if isinstance(target, ast.Name) else None


def _gather_drops_results(gather: ast.Call) -> bool:
    """Whether ``asyncio.gather(...)`` drops the other results when one of
    its awaitables raises: more than one awaitable, and no
    ``return_exceptions`` other than a literal False."""
    if len(gather.args) < 2 and not any(isinstance(arg, ast.Starred) for arg in gather.args):
        return False
    return not any(
        k.arg == "return_exceptions" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
        for k in gather.keywords
    )


def _calls_method(scope: ast.AST, var: str, method: str) -> bool:
    """Whether ``var.method(...)`` is called anywhere in ``scope``."""
    return any(
        isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == method
        and _is_name(node.func.value, var)
        for node in _walk_scope(scope)
    )


def _binds(scope: ast.AST, name: str) -> bool:
    """Whether the function ``scope`` has a parameter ``name`` or assigns it."""
    if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        args = scope.args
        if any(a.arg == name for a in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg] if a):
            return True
    return any(
        isinstance(node, ast.Name) and node.id == name and isinstance(node.ctx, ast.Store)
        for node in _walk_scope(scope)
    )


def _declares(scope: ast.AST, name: str) -> type[ast.Global] | type[ast.Nonlocal] | None:
    """``ast.Global`` or ``ast.Nonlocal`` if ``scope`` declares ``name`` so, else None."""
    for node in _walk_scope(scope):
        if isinstance(node, (ast.Global, ast.Nonlocal)) and name in node.names:
            return type(node)
    return None


def _walk_scope(node: ast.AST) -> Iterator[ast.AST]:
    """Every node under ``node`` without entering nested functions or classes."""
    stack = list(ast.iter_child_nodes(node))
    while stack:
        child = stack.pop()
        yield child
        if not isinstance(child, _SCOPES):
            stack.extend(ast.iter_child_nodes(child))


def _own_nodes(node: ast.AST) -> list[ast.AST]:
    """``node`` and every node under it that runs in its scope: a nested
    function or class statement (or lambda) is itself, without its body,
    which runs elsewhere, or never (its release gives nothing back here, its
    await does not suspend here)."""
    if isinstance(node, _SCOPES):
        return [node]
    return [node, *_walk_scope(node)]


def _is_name(node: ast.AST | None, var: str) -> bool:
    """Is ``node`` the name ``var``, or, for a connection stored on an
    attribute (``request.state.con``), that attribute?"""
    if isinstance(node, ast.Name):
        return node.id == var
    return isinstance(node, ast.Attribute) and "." in var and _dotted(node) == var


def _tests_presence(
    test: ast.expr, var: str, present: bool, flag: Callable[[ast.expr], bool] | None = None,
) -> bool:
    """Is ``test`` true exactly when ``var`` holds a connection (``present``;
    ``con``, ``con is not None``, ``isinstance(con, asyncpg.Connection)``)
    or exactly when it holds none (``not con``, ``con is None``,
    ``isinstance(con, BaseException)`` after ``gather(...,
    return_exceptions=True)``)? A connection is never falsy. ``flag``: a
    name set right after the acquire (``acquired``), true exactly when the
    connection is held. ``and`` of such tests (``acquired and con is not
    None``) is one too, as ``or`` is of tests of none. Any other test (``not
    con.is_closed()``, ``con is not None and ok``) may skip a release of a
    connection that was acquired."""
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        return _tests_presence(test.operand, var, not present, flag)
    if isinstance(test, ast.BoolOp):
        if isinstance(test.op, ast.And if present else ast.Or):
            return all(_tests_presence(value, var, present, flag) for value in test.values)
        return False
    if _is_name(test, var):
        return present
    if present and flag is not None and flag(test):
        return True
    if (
        isinstance(test, ast.Call) and isinstance(test.func, ast.Name) and test.func.id == "isinstance"
        and len(test.args) == 2 and _is_name(test.args[0], var)
    ):
        # `gather(..., return_exceptions=True)`: a connection, or the error.
        if _names_classes(test.args[1], ("Exception", "Error")):
            return not present
        if _names_classes(test.args[1], ("Connection", "ConnectionProxy")):
            return present
        return False
    if isinstance(test, ast.Compare) and len(test.ops) == 1:
        left, right, op = test.left, test.comparators[0], test.ops[0]
        if (_is_name(left, var) and _is_none(right)) or (_is_none(left) and _is_name(right, var)):
            if isinstance(op, (ast.IsNot, ast.NotEq)):
                return present
            if isinstance(op, (ast.Is, ast.Eq)):
                return not present
    return False


def _names_classes(node: ast.expr, endings: tuple[str, ...]) -> bool:
    """Classes by their names' endings: ``BaseException``,
    ``asyncpg.PostgresError``, ``(OSError, TimeoutError)`` for
    ("Exception", "Error"); ``asyncpg.Connection``,
    ``asyncpg.pool.PoolConnectionProxy`` for ("Connection", "ConnectionProxy")."""
    if isinstance(node, ast.Tuple):
        return bool(node.elts) and all(_names_classes(element, endings) for element in node.elts)
    name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else ""
    return name.endswith(endings)


def _is_none(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and node.value is None


def _dotted(node: ast.expr) -> str | None:
    """``request.state.con`` for an attribute of attributes of a name, else None."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or not parts:
        return None
    return ".".join([node.id, *reversed(parts)])


# The release aliases of the module being checked (_Module.release_aliases),
# read by _releases and the helpers that call it, set by _Checker.run.
_RELEASE_ALIASES: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar(
    "release_aliases", default=frozenset()
)


# Whether a pool is another one than the one the connection being followed
# came from (``pool.release(con)`` with ``con`` from ``read_pool``), set by
# _Checker.check_acquire; None: any pool's release counts.
_OTHER_POOL: contextvars.ContextVar[Callable[[ast.expr], bool] | None] = contextvars.ContextVar(
    "other_pool", default=None
)


def _to_another_pool(receiver: ast.expr) -> bool:
    """Is ``receiver`` (of a ``release()``) a pool that the connection
    followed was not acquired from? Only when the scan can tell both pools
    apart (_Module.pool_identity); if it cannot, the release counts."""
    other = _OTHER_POOL.get()
    return other is not None and other(receiver)


def _releases(node: ast.AST, var: str) -> bool:
    """Is ``node`` a call that gives ``var`` back (or registers that)? A
    ``release()`` of another pool than the one ``var`` came from does not:
    that pool refuses it (see _OTHER_POOL)."""
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    gives_back = (node.args and _is_name(node.args[0], var)) or any(_is_name(k.value, var) for k in node.keywords)
    if isinstance(func, ast.Name) and func.id in _RELEASE_ALIASES.get():
        return bool(gives_back)  # `release = pool.release; await release(con)`
    if isinstance(func, ast.Call) and not node.args and not node.keywords:
        inner = func
        if _last_name(inner.func) == "partial" and inner.args and _last_name(inner.args[0]) == "release":
            # `await functools.partial(pool.release, con)()`
            first = inner.args[0]
            if isinstance(first, ast.Attribute) and _to_another_pool(first.value):
                return False
            return any(_is_name(arg, var) for arg in inner.args[1:]) or any(
                _is_name(k.value, var) for k in inner.keywords
            )
        return False
    if (
        isinstance(func, ast.Call) and _last_name(func.func) == "getattr" and len(func.args) == 2
        and isinstance(func.args[1], ast.Constant) and func.args[1].value == "release"
    ):
        # `await getattr(pool, "release")(con)`
        return bool(gives_back) and not _to_another_pool(func.args[0])
    if not isinstance(func, ast.Attribute):
        return False
    if func.attr in _RELEASE_ALIASES.get() and gives_back:
        return True  # `self._release = pool.release`, then `await self._release(con)`
    method = func.attr
    if method == "release" and gives_back:
        return not _to_another_pool(func.value)
    if method in ("close", "terminate") and _is_name(func.value, var):
        return True
    if method in _CALLBACK_REGISTRATIONS and node.args:
        # stack.push_async_callback(pool.release, con) / stack.push_async_callback(con.close)
        # / stack.push_async_callback(lambda: pool.release(con)) (the stack calls it). Not
        # stack.callback(log.info, con): the callable must release (review s63).
        first = node.args[0]
        if isinstance(first, ast.Attribute) and first.attr == "release":
            if _to_another_pool(first.value):
                return False
            return any(_is_name(arg, var) for arg in node.args[1:]) or any(_is_name(k.value, var) for k in node.keywords)
        return _releases_when_called(first, var)
    if method in _CLEANUP_REGISTRATIONS:
        # stack.push(con) / push_async_exit(...): the object (or callable) is the exit.
        return any(_is_name(arg, var) or _releases_when_called(arg, var) for arg in node.args)
    return False


def _releases_when_called(node: ast.AST, var: str) -> bool:
    """Is ``node`` a callable that gives ``var`` back: ``con.close`` (or
    ``release``, ``terminate``), or a lambda whose body releases it?"""
    if isinstance(node, ast.Attribute):
        return node.attr in _RELEASE_METHODS and _is_name(node.value, var)
    return isinstance(node, ast.Lambda) and _releases(node.body, var)


def _holds(value: ast.AST | None, var: str) -> bool:
    """Does ``value`` keep ``var`` itself: the name, or an element of a tuple,
    list, set or dict, or an argument of a call that is not awaited (an object
    built around it: ``Session(con)``)? ``await helper(con)`` does not."""
    if value is None:
        return False
    if _is_name(value, var):
        return True
    if isinstance(value, (ast.Tuple, ast.List, ast.Set)):
        return any(_holds(item, var) for item in value.elts)
    if isinstance(value, ast.Dict):
        return any(_holds(item, var) for item in value.values)
    if isinstance(value, ast.Starred):
        return _holds(value.value, var)
    if isinstance(value, ast.Call):
        return any(_holds(arg, var) for arg in value.args) or any(_holds(k.value, var) for k in value.keywords)
    return False


def _escapes(node: ast.AST, var: str) -> bool:
    """Does the connection leave the function here (ownership moves elsewhere)?"""
    if isinstance(node, ast.Return):
        return _holds(node.value, var)
    if isinstance(node, (ast.Assign, ast.AnnAssign)) and _holds(node.value, var):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        if _is_name(node.value, var) and any(isinstance(t, ast.Name) and t.id != var for t in targets):
            # `conn = con`: the connection goes on under another local name,
            # which the check does not follow: trusted, as a hand-over is
            # (a release under the alias was reported, review h228).
            return True
        return any(isinstance(t, (ast.Attribute, ast.Subscript)) for t in targets)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr"
            and len(node.args) == 3):
        return _holds(node.args[2], var)  # setattr(holder, "con", con): stored on an object (review s63)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _ESCAPE_METHODS:
        # (In a tuple or an object too: ``queue.put((priority, con))``, review s63.)
        return any(_holds(arg, var) for arg in node.args)
    return False


def _decorator_kind(scope: ast.AST) -> str:
    if not isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return ""
    for decorator in scope.decorator_list:
        text = ast.unparse(decorator)
        if "fixture" in text:
            return "fixture"
        if "contextmanager" in text:
            return "contextmanager"
    return ""


def _fixture_teardown_releases(module: _Module, acquire_stmt: ast.stmt, release: ast.Call, var: str) -> bool:
    """Whether a pytest fixture gives ``var`` back in its teardown on every
    path: the acquire, a ``yield`` and the release's statement in one block,
    in that order, and nothing else between them that can raise or leave
    (pytest runs a fixture's teardown after the test, failed or not, but
    only if its setup reached the ``yield``; a step after the ``yield`` that
    raises skips the release: review h233). Other shapes (a ``try:`` whose
    ``finally:`` releases) are the general rules'."""
    stmt: ast.AST = release
    while not isinstance(stmt, ast.stmt):
        stmt = module.parents[stmt]
    released, acquired = _block_of(module, stmt), _block_of(module, acquire_stmt)
    if released is None or acquired is None or released[0] is not acquired[0] or acquired[1] >= released[1]:
        return False
    between = released[0][acquired[1] + 1:released[1]]
    yields = [
        i for i, each in enumerate(between)
        if isinstance(each, ast.Expr) and isinstance(each.value, (ast.Yield, ast.YieldFrom))
    ]
    return len(yields) == 1 and all(
        _leaves_before_release(each, var) is None for i, each in enumerate(between) if i != yields[0]
    )


def _block_of(module: _Module, stmt: ast.stmt) -> tuple[list[ast.stmt], int] | None:
    """The statement list holding ``stmt`` and its index there."""
    parent = module.parents.get(stmt)
    if parent is None:
        return None
    for field in ("body", "orelse", "finalbody", "handlers"):
        block = getattr(parent, field, None)
        if isinstance(block, list) and any(s is stmt for s in block):
            return block, next(i for i, s in enumerate(block) if s is stmt)
    if isinstance(parent, ast.match_case) and any(s is stmt for s in parent.body):
        return parent.body, next(i for i, s in enumerate(parent.body) if s is stmt)
    return None


def _contains_release(block: list[ast.stmt], var: str) -> bool:
    return any(isinstance(n, ast.Call) and _releases(n, var) for stmt in block for n in _own_nodes(stmt))


def _leaves_holding(stmt: ast.stmt, var: str) -> ast.AST | None:
    """Like :func:`_may_leave`, but a branch of an ``if`` that releases ``var``
    first may leave after that (``if job.skipped: await pool.release(con);
    continue`` before the ``try:``)."""
    if not isinstance(stmt, ast.If):
        return _may_leave(stmt)
    return _if_leaves_holding(stmt, var, _leaves_holding)


def _if_leaves_holding(
    stmt: ast.If, var: str, inner_leaves: Callable[[ast.stmt, str], ast.AST | None]
) -> ast.AST | None:
    """The node of an ``if`` statement that can suspend or leave while
    ``var`` is held: an await in its test, or what ``inner_leaves`` finds in
    a branch before that branch releases ``var``."""
    for node in _own_nodes(stmt.test):
        if isinstance(node, (ast.Await, ast.Yield, ast.YieldFrom)):
            return node
    for branch in (stmt.body, stmt.orelse):
        for inner in branch:
            if isinstance(inner, ast.Expr) and any(
                isinstance(n, ast.Call) and _releases(n, var) for n in _own_nodes(inner.value)
            ):
                break  # released: whatever follows in this branch is fine
            leaver = inner_leaves(inner, var)
            if leaver is not None:
                return leaver
    return None


def _is_release_call(node: ast.AST) -> bool:
    """``pool.release(x)`` (of any connection), also wrapped
    (``asyncio.shield(pool.release(con))``). Not ``x.close()``: any object
    has one (``await session.close()``), and it can fail."""
    while isinstance(node, ast.Call) and _last_name(node.func) in _WRAPPERS and node.args:
        node = node.args[0]
    return (
        isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "release"
        and bool(node.args or node.keywords)
    )


def _leaves_before_release(stmt: ast.stmt, var: str) -> ast.AST | None:
    """A node in ``stmt``, a statement of a ``finally:`` before the release
    of ``var``, that can suspend, raise or leave, so that the release is
    skipped: as :func:`_leaves_holding`, but a release of another connection
    (``finally: await pool.release(a); await pool.release(b)``) is not one."""
    if isinstance(stmt, ast.If):
        return _if_leaves_holding(stmt, var, _leaves_before_release)
    return next(
        (node for node in _leaving(stmt) if not (isinstance(node, ast.Await) and _is_release_call(node.value))), None
    )


def _expr_leaver(expr: ast.expr, var: str) -> ast.AST | None:
    """A node of ``expr`` that can suspend, raise or leave (see
    :func:`_leaves_before_release`)."""
    return _leaves_before_release(ast.Expr(value=expr), var)


def _header_leaver(node: ast.AST, parent: ast.AST, var: str, registration: bool) -> ast.AST | None:
    """What ``parent`` runs before its part ``node`` that can suspend, raise
    or leave: an await in the test of an ``if``, ``while`` or conditional
    expression, the iterable of a ``for``, the subject of a ``match``, the
    items of a ``with`` (an ``async with`` or ``async for`` itself: entering
    it awaits), or a step in the body of a ``try:`` whose ``else:`` holds
    ``node``. For an exit-stack ``registration``, a ``with`` itself too: as
    for a ``try:`` after the acquire, the registration must come right after
    it, not inside a block entered in between."""
    in_header = False
    exprs: list[ast.expr] = []
    if isinstance(parent, (ast.If, ast.While, ast.IfExp)):
        in_header = node is parent.test
        exprs = [parent.test]
    elif isinstance(parent, (ast.For, ast.AsyncFor)):
        in_header = node is parent.iter or node is parent.target
        if isinstance(parent, ast.AsyncFor) and not in_header:
            return parent
        exprs = [parent.iter]
    elif isinstance(parent, ast.Match):
        in_header = node is parent.subject
        exprs = [parent.subject]
    elif isinstance(parent, (ast.With, ast.AsyncWith)):
        in_header = any(node is item for item in parent.items)
        if not in_header and (registration or (isinstance(parent, ast.AsyncWith) and not all(
            # `async with asyncio.timeout(5): await pool.release(con)`:
            # entering a deadline does not suspend (as `wait_for()`).
            isinstance(item.context_expr, ast.Call) and _last_name(item.context_expr.func) in _DEADLINES
            for item in parent.items
        ))):
            return parent
        exprs = [item.context_expr for item in parent.items]
    elif isinstance(parent, (ast.Try, ast.TryStar)) and any(node is s for s in parent.orelse):
        return next((leaver for s in parent.body if (leaver := _leaves_before_release(s, var)) is not None), None)
    if in_header:
        return None
    return next((leaver for expr in exprs if (leaver := _expr_leaver(expr, var)) is not None), None)


def _catches_everything(handler: ast.ExceptHandler) -> bool:
    """Is ``handler`` a bare ``except:`` or an ``except BaseException:``?"""
    kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(kind is None or _last_name(kind) == "BaseException" for kind in kinds)


def _catches_all(pattern: ast.pattern) -> bool:
    """Is ``pattern`` irrefutable: ``case _:``, ``case name:``, an ``|`` with one of those?"""
    if isinstance(pattern, ast.MatchAs):
        return pattern.pattern is None or _catches_all(pattern.pattern)
    if isinstance(pattern, ast.MatchOr):
        return any(_catches_all(p) for p in pattern.patterns)
    return False


def _non_empty(iterable: ast.expr) -> bool:
    """Is ``iterable`` a literal tuple, list or set with an item?"""
    return isinstance(iterable, (ast.Tuple, ast.List, ast.Set)) and any(
        not isinstance(e, ast.Starred) for e in iterable.elts
    )


def _breaks(loop: ast.For | ast.AsyncFor | ast.While) -> bool:
    """Does a ``break`` in ``loop``'s body end it (not a loop inside it)?"""
    stack: list[ast.AST] = list(loop.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Break):
            return True
        if isinstance(node, (ast.For, ast.AsyncFor, ast.While)):
            stack.extend(node.orelse)  # a `break` in its `else:` ends the outer loop
            continue
        if not isinstance(node, _SCOPES):
            stack.extend(ast.iter_child_nodes(node))
    return False


def _may_leave(stmt: ast.stmt) -> ast.AST | None:
    """A node in ``stmt`` that can suspend, raise or leave (await, return,
    raise, yield; a ``break`` or ``continue`` of a loop outside ``stmt``)."""
    return next(_leaving(stmt), None)


# What can suspend, raise or leave the statement it is in: an `assert`
# raises as `raise` does (unless Python runs with -O: the check assumes it
# does not); an `async for` in a list, set or dict comprehension (`[r async
# for r in cur]`) suspends as an `await` does, not in a generator expression,
# which only creates an async generator (see _leaving).
_LEAVING = (
    ast.Await, ast.Return, ast.Raise, ast.Assert, ast.Yield, ast.YieldFrom, ast.Break, ast.Continue, ast.AsyncWith,
    ast.AsyncFor,
)


def _leaving(stmt: ast.stmt) -> Iterator[ast.AST]:
    """The nodes of ``stmt`` that can suspend, raise or leave it, in order:
    not a ``break`` or ``continue`` that ends or turns a loop inside
    ``stmt`` (``stmt`` itself included), one in a loop's body, not in its
    ``else:`` (review s63)."""
    bound = {
        id(jump)
        for node in _own_nodes(stmt) if isinstance(node, (ast.For, ast.AsyncFor, ast.While))
        for inner in node.body for jump in _own_nodes(inner) if isinstance(jump, (ast.Break, ast.Continue))
    }
    # A generator expression runs nothing but its first iterable when it is
    # created (`rows = (r async for r in source)` is an async generator):
    # its `async for` and its awaits run when something iterates it.
    deferred = {
        id(inner)
        for node in _own_nodes(stmt) if isinstance(node, ast.GeneratorExp)
        for part in (node.elt, node.generators[0].target, *node.generators[0].ifs, *node.generators[1:])
        for inner in _own_nodes(part)
    } | {
        id(node.generators[0])
        for node in _own_nodes(stmt) if isinstance(node, ast.GeneratorExp)
    }
    for node in _own_nodes(stmt):
        if id(node) in deferred:
            continue
        if isinstance(node, _LEAVING) and id(node) not in bound:
            yield node
        elif isinstance(node, ast.comprehension) and node.is_async:
            yield node.iter  # (a comprehension has no line of its own)


class _Checker:
    def __init__(self, module: _Module, path: str) -> None:
        self.module = module
        self.path = path
        self.findings: list[Finding] = []

    def run(self) -> list[Finding]:
        token = _RELEASE_ALIASES.set(frozenset(self.module.release_aliases))
        try:
            for node in ast.walk(self.module.tree):
                receiver = self.module.acquire_call(node)
                if receiver is not None:
                    assert isinstance(node, ast.Call)
                    self.check_acquire(node, receiver)
        finally:
            _RELEASE_ALIASES.reset(token)
        self.findings.sort(key=lambda f: (f.line, f.col))
        return self.findings

    def report(
        self, node: ast.AST, stmt: ast.stmt, code: str, message: str, receiver: str, var: str | None,
        hint: str | None = None,
    ) -> None:
        line = getattr(node, "lineno", 1)
        if self.module.ignored(line, stmt.lineno, getattr(stmt, "end_lineno", None) or line):
            return
        # Both quote the source (the pool expression): without its password
        # literals, as a leak report's source lines show them.
        self.findings.append(Finding(
            self.path, line, getattr(node, "col_offset", 0) + 1, code, redact_code(message),
            redact_code(hint or _hint(receiver, var, code)),
        ))

    def check_acquire(self, call: ast.Call, receiver: str) -> None:
        # A release counts only if it goes to the pool the connection came
        # from, when the scan can tell the two apart (_to_another_pool).
        acquired_from = self.module.pool_identity(ast.parse(receiver, mode="eval").body)
        other: Callable[[ast.expr], bool] | None = None
        if acquired_from is not None:
            def other(pool: ast.expr) -> bool:
                identity = self.module.pool_identity(pool)
                return identity is not None and identity != acquired_from
        token = _OTHER_POOL.set(other)
        try:
            self.check_acquire_of(call, receiver)
        finally:
            _OTHER_POOL.reset(token)

    def check_acquire_of(self, call: ast.Call, receiver: str) -> None:
        module = self.module
        parent = module.parents.get(call)
        # async with pool.acquire() [as con]:
        if isinstance(parent, ast.withitem):
            return
        # stack.enter_async_context(pool.acquire())
        if isinstance(parent, ast.Call) and _last_name(parent.func) == "enter_async_context":
            return
        top: ast.AST = call
        awaited = False
        # What is awaited may wrap the acquire: `pool.acquire().__aenter__()`
        # (the context is thrown away, so only a release of the connection
        # gives it back), asyncio.wait_for(..., 5), asyncio.shield(...), in
        # any nesting; any other call only when it is awaited itself
        # (`await helper(pool.acquire())`, asyncio.gather's arguments).
        arg: ast.AST = call  # the node whose parent is `parent`
        while True:
            if (
                isinstance(parent, ast.Attribute) and parent.attr == "__aenter__"
                and isinstance(entered := module.parents.get(parent), ast.Call) and entered.func is parent
            ):
                arg, parent = entered, module.parents.get(entered)
            elif (
                isinstance(parent, ast.Call) and arg in parent.args and _last_name(parent.func) in _WRAPPERS
                and not isinstance(module.parents.get(parent), ast.Await)
            ) or (isinstance(parent, ast.IfExp) and arg is not parent.test):
                # ... or one branch of a conditional expression: `await
                # (pool.acquire() if x else replica_pool.acquire())`.
                arg, parent = parent, module.parents.get(parent)
            else:
                break
        dropped = self.dropped_by_a_statement(arg, parent)
        if dropped is not None:
            # `asyncio.ensure_future(pool.acquire())` or `await
            # asyncio.gather(*(pool.acquire() for _ in range(3)))` as a
            # statement: the connections acquired reach nothing.
            stmt = module.statement_of(call)
            self.report(call, stmt, "SP003",
                        f"the connection from `{ast.unparse(dropped)}` is thrown away: it can never be released",
                        receiver, None)
            return
        if isinstance(parent, ast.Await):
            top, awaited = parent, True
        elif (
            isinstance(parent, ast.Call) and arg in parent.args and isinstance(module.parents.get(parent), ast.Await)
        ):
            top, awaited = module.parents[parent], True
        elif isinstance(arg, ast.IfExp):
            # `ctx = pool.acquire() if x else replica_pool.acquire()`: a
            # context either way, where the conditional's value lands.
            top = arg
        elif arg is not call:
            # Entered or wrapped, and not awaited: nothing this scan follows
            # (a task, a coroutine passed on), as for a bare acquire passed on.
            return
        holder = module.parents.get(top)
        while isinstance(holder, ast.IfExp) and top is not holder.test:
            # `con = await pool.acquire() if need else None`: the connection,
            # when there is one, lands where the conditional's value does.
            top, holder = holder, module.parents.get(holder)
        stmt = module.statement_of(call)
        if awaited and _expected_to_raise(module, stmt):
            return
        var: str | None = None
        # `await asyncio.gather(pool.acquire(), ...)`: the gather call.
        gather = parent if isinstance(parent, ast.Call) and _last_name(parent.func) == "gather" else None
        if isinstance(holder, ast.NamedExpr) and isinstance(holder.target, ast.Name):
            var = holder.target.id
        elif isinstance(holder, ast.Assign) and holder.value is top:
            if len(holder.targets) == 1 and isinstance(holder.targets[0], ast.Name) and gather is None:
                var = holder.targets[0].id
            elif (
                len(holder.targets) == 1 and gather is None and (stored := _dotted(holder.targets[0])) is not None
            ):
                var = stored  # `request.state.con = await pool.acquire()`: followed only if released here
            elif (unpacked := _gathered_name(arg, parent, holder)) is not None:
                var = unpacked  # a, b = await asyncio.gather(pool.acquire(), pool.acquire())
            else:
                # Stored on an object, unpacked, gathered into a list (`cons
                # = await asyncio.gather(...)`, released item by item): not followed.
                return
        elif isinstance(holder, ast.AnnAssign) and holder.value is top:
            if isinstance(holder.target, ast.Name):
                var = holder.target.id
            else:
                return
        elif (
            awaited and isinstance(holder, ast.Attribute) and holder.value is top
            and holder.attr not in _RELEASE_METHODS
        ):
            # `await (await pool.acquire()).fetchval(...)`: used once, kept nowhere.
            self.report(call, stmt, "SP003",
                        f"the connection from `{ast.unparse(top)}` is used once (`.{holder.attr}`) and thrown "
                        "away: it can never be released", receiver, None)
            return
        elif isinstance(holder, ast.Expr):
            if awaited:
                self.report(call, stmt, "SP003",
                            f"the connection from `{ast.unparse(top)}` is thrown away: it can never be released",
                            receiver, None)
            else:
                self.report(call, stmt, "SP004",
                            f"`{receiver}.acquire()` is neither awaited nor used with `async with`: "
                            "no connection is acquired (a missing `await` or `async with`?)", receiver, None)
            return
        else:
            return  # returned, yielded, passed on: ownership leaves this function
        scope = module.scope_of(call)
        if not awaited:
            self.check_context_variable(call, stmt, scope, receiver, var)
            return
        self.check_connection_variable(call, stmt, scope, receiver, var, gather)

    def dropped_by_a_statement(self, arg: ast.AST, parent: ast.AST | None) -> ast.expr | None:
        """The call whose result, holding the acquire ``arg``, a statement
        throws away: a task made of it (``asyncio.ensure_future(arg)``;
        ``create_task()`` takes coroutines only, and raises ``TypeError``
        for an acquire), or the ``gather()`` of a comprehension of it
        (``await asyncio.gather(*(arg for _ in range(3)))``). None
        otherwise."""
        parents = self.module.parents
        if (
            isinstance(parent, ast.Call) and arg in parent.args
            and _last_name(parent.func) == "ensure_future"
            and isinstance(parents.get(parent), ast.Expr)
        ):
            return parent
        if isinstance(parent, (ast.GeneratorExp, ast.ListComp)) and parent.elt is arg:
            star = parents.get(parent)
            gather = parents.get(star) if isinstance(star, ast.Starred) else None
            awaited = parents.get(gather) if gather is not None else None
            if (
                isinstance(gather, ast.Call) and _last_name(gather.func) == "gather"
                and isinstance(awaited, ast.Await) and isinstance(parents.get(awaited), ast.Expr)
            ):
                return awaited
        return None

    def check_context_variable(self, call: ast.Call, stmt: ast.stmt, scope: ast.AST, receiver: str, var: str) -> None:
        """``ctx = pool.acquire()``: fine if ``async with ctx`` follows."""
        for node in _walk_scope(scope):
            if isinstance(node, ast.withitem) and _is_name(node.context_expr, var):
                return
            if _escapes(node, var):
                return
            if isinstance(node, ast.Await) and _is_name(node.value, var):
                # `con = await ctx`: the connection arrives there; followed
                # from that statement, as `con = await pool.acquire()`.
                holder = self.module.parents.get(node)
                if (
                    isinstance(holder, ast.Assign) and len(holder.targets) == 1
                    and isinstance(holder.targets[0], ast.Name) and holder.value is node
                ):
                    self.check_connection_variable(call, holder, scope, receiver, holder.targets[0].id)
                return  # any other shape: too indirect to follow
        if _calls_method(scope, var, "__aenter__"):
            # Entered by hand: released only by its own __aexit__ (its paths
            # are not followed, as for `con = await ctx`).
            if not _calls_method(scope, var, "__aexit__"):
                self.report(call, stmt, "SP002",
                            f"`{var}.__aenter__()` acquires a connection that no `{var}.__aexit__()` in this "
                            "function releases", receiver, None)
            return
        self.report(call, stmt, "SP004",
                    f"`{var} = {receiver}.acquire()` is neither awaited nor used with `async with {var}`",
                    receiver, var)

    def check_connection_variable(
        self, call: ast.Call, stmt: ast.stmt, scope: ast.AST, receiver: str, var: str, gather: ast.Call | None = None
    ) -> None:
        if self.inside_release(call, stmt):
            return  # `await pool.release(con := await pool.acquire())`: nothing runs between the two
        releases: list[ast.Call] = []
        for node in _walk_scope(scope):
            if _escapes(node, var):
                return
            if isinstance(node, (ast.Global, ast.Nonlocal)) and var in node.names:
                return  # `global con`: kept in the module (or the enclosing function), as on an object
            if isinstance(node, ast.Call) and _releases(node, var):
                releases.append(node)
        if "." in var and not any(self.owned_release(release, call, stmt, scope) for release in releases):
            # Stored on an object and not released here after the acquire
            # (`__aenter__` keeps it for `__aexit__`; `release(self.con)`
            # then `self.con = await pool.acquire()` replaces it), or only
            # when something failed (`except BaseException: release;
            # raise`) or under a condition (`if not await self.ping():`):
            # it leaves the function on the normal path, as the docs'
            # limits say.
            return
        if not releases:
            token = _OTHER_POOL.set(None)
            try:
                elsewhere = [n for n in _walk_scope(scope) if isinstance(n, ast.Call) and _releases(n, var)]
            finally:
                _OTHER_POOL.reset(token)
            if elsewhere:
                refused = min(elsewhere, key=_position)
                pool, bind_first = _named_receiver(receiver, var)
                self.report(call, stmt, "SP002",
                            f"connection `{var}` acquired here from `{receiver}` is never released in "
                            f"`{_scope_name(scope)}`: `{ast.unparse(refused)}` at line {refused.lineno} gives it to "
                            "another pool, which refuses it", receiver, var,
                            hint=f"{bind_first}release it to the pool it came from: `await {pool}.release({var})` in "
                            f"a `finally:` block right after the acquire, or `async with {pool}.acquire() as "
                            f"{var}:`")
                return
            self.report(call, stmt, "SP002",
                        f"connection `{var}` acquired here is never released in `{_scope_name(scope)}`",
                        receiver, var)
            return
        conditions: list[tuple[str, ast.Call | None]] = []
        loops: list[ast.stmt] = []
        late: list[int] = []
        tries: list[ast.stmt] = []
        unregistered: list[tuple[ast.Call, int]] = []
        if any(
            self.safe_release(release, stmt, scope, var, conditions, loops, late, tries, unregistered)
            for release in releases
        ):
            rebound = self.rebinding(call, stmt, tries[0], var) if tries else None
            if rebound is not None:
                self.report(call, stmt, "SP001",
                            f"connection `{var}` acquired here is not released on every path: `{var}` is bound "
                            f"again at line {rebound.lineno}, before the `finally:` releases it, and the "
                            "connection it held is never released", receiver, var,
                            hint=f"release it before binding `{var}` again, or give the other value a name "
                            f"of its own (`async with {receiver}.acquire() as {var}:` for each connection)")
                return
            if gather is not None and _gather_drops_results(gather):
                # Not the usual fix: the `finally:` right after is there already.
                self.report(call, stmt, "SP001",
                            f"connection `{var}` is gathered with other awaitables: if one of them fails (or the "
                            "gather is cancelled), `gather()` raises before the `try:` and this connection is never "
                            "released", receiver, var,
                            hint=f"acquire outside `gather()`, one connection at a time (`async with "
                            f"{receiver}.acquire() as {var}:`), or pass `return_exceptions=True` to `gather()` and "
                            "release each connection it returns")
            return
        if loops:
            self.report(call, stmt, "SP001",
                        f"connection `{var}` is acquired on each turn of the loop at line {loops[0].lineno}, but "
                        "released only in the `finally:` after that loop: each turn's connection but the last "
                        "is never released", receiver, var)
            return
        if late:
            pool, bind_first = _named_receiver(receiver, var)
            self.report(call, stmt, "SP001",
                        f"connection `{var}` is released in a `finally:` block, but line {late[0]} in that "
                        "`finally:` comes before the release and can fail or leave first: the release is then "
                        "skipped", receiver, var,
                        hint=f"{bind_first}release it first in the `finally:`, or put what comes before the release "
                        f"in a `try:` of its own (`finally: try: ... finally: await {pool}.release({var})`)")
            return
        if conditions:
            phrase, registration = conditions[0]
            if registration is None:
                self.report(call, stmt, "SP001",
                            f"connection `{var}` is released in a `finally:` block {phrase}; on the other path it "
                            "is never released", receiver, var)
            else:
                self.report(call, stmt, "SP001",
                            f"connection `{var}` is registered for release with an exit stack at line "
                            f"{registration.lineno} {phrase}; on the other path it is never released",
                            receiver, var, hint=_registration_hint(receiver, var, registration))
            return
        if unregistered:
            registration, step = unregistered[0]
            self.report(call, stmt, "SP001",
                        f"connection `{var}` is registered for release with an exit stack at line "
                        f"{registration.lineno}, but line {step} between the acquire and that registration can fail "
                        "or leave first: the connection is then never released", receiver, var,
                        hint=_registration_hint(receiver, var, registration))
            return
        gap = self.gap_before_finally(releases, stmt, var)
        if gap is not None:
            self.report(call, stmt, "SP001",
                        f"connection `{var}` is released in a `finally:` block, but line {gap} between the acquire "
                        "and that `try:` can fail or leave first", receiver, var)
            return
        exit_line = self.unreleased_exit(stmt, scope, var)
        kind = _decorator_kind(scope)
        if exit_line is not None:
            what, line = exit_line
            if what in ("continue", "break"):
                reason = f"the `{what}` at line {line} skips the release"
            else:
                reason = f"the {what} at line {line} leaves without releasing it"
        elif kind == "contextmanager" or _is_generator(scope):
            reason = "an exception thrown in at the `yield` skips the release"
        elif (after := [r for r in releases if _position(r) > _position(call)]) and all(
            self.in_handler(r, scope, call) for r in after
        ):
            handlers = sorted({r.lineno for r in after})
            reason = (f"it is released only in an `except` handler (line{'s' if len(handlers) > 1 else ''} "
                      f"{', '.join(map(str, handlers))}): when nothing fails, it is never released")
        elif after:
            first = min(r.lineno for r in after)
            where = (f"line {call.lineno} and line {first}" if first > call.lineno
                     else f"the acquire and the release (both on line {first})")
            reason = f"an exception or a cancellation between {where} skips the release"
        else:
            # The releases come before it (a connection acquired again after
            # one was released): say where, as the user sees a release of `con`.
            before = sorted({r.lineno for r in releases})
            lines = ", ".join(map(str, before))
            reason = (f"the release{'s' if len(before) > 1 else ''} of `{var}` at line{'s' if len(before) > 1 else ''} "
                      f"{lines} come{'' if len(before) > 1 else 's'} before this acquire, and none after it")
        self.report(call, stmt, "SP001",
                    f"connection `{var}` acquired here is not released on every path: {reason}", receiver, var)

    def inside_release(self, call: ast.Call, stmt: ast.stmt) -> bool:
        """Whether ``call`` is (in) an argument of a ``release()`` call in
        ``stmt``, which runs right after it."""
        node: ast.AST = call
        while node is not stmt and node in self.module.parents:
            parent = self.module.parents[node]
            if (isinstance(parent, ast.Call) and isinstance(parent.func, ast.Attribute)
                    and parent.func.attr == "release" and node is not parent.func):
                return not _to_another_pool(parent.func.value)
            node = parent
        return False

    def owned_release(self, release: ast.Call, call: ast.Call, acquire_stmt: ast.stmt, scope: ast.AST) -> bool:
        """For a connection stored on an object: whether ``release`` says
        this function meant to give it back, being after the acquire, in
        the acquire's own block or in a ``finally:``, not in a handler."""
        if _position(release) <= _position(call) or self.in_handler(release, scope, call):
            return False
        home = _block_of(self.module, acquire_stmt)
        if home is not None and any(self.module.statement_of(release) is s for s in home[0]):
            return True
        node: ast.AST = release
        while node is not scope and node in self.module.parents:
            parent = self.module.parents[node]
            if isinstance(parent, (ast.Try, ast.TryStar)) and any(node is s for s in parent.finalbody):
                return True
            node = parent
        return False

    def in_handler(self, node: ast.AST, scope: ast.AST, acquire: ast.AST) -> bool:
        """Whether ``node`` is inside an ``except`` handler in ``scope`` that
        the ``acquire`` call is not in: a release there runs only if
        something failed after the acquire. (One in the acquire's own
        handler runs as the acquire does; review s63.)"""
        own = set(map(id, self.handlers_of(acquire, scope)))
        return any(id(handler) not in own for handler in self.handlers_of(node, scope))

    def handlers_of(self, node: ast.AST, scope: ast.AST) -> list[ast.ExceptHandler]:
        """The ``except`` handlers in ``scope`` that ``node`` is inside."""
        handlers = []
        while node is not scope and node in self.module.parents:
            node = self.module.parents[node]
            if isinstance(node, ast.ExceptHandler):
                handlers.append(node)
        return handlers

    def safe_release(
        self, release: ast.Call, acquire_stmt: ast.stmt, scope: ast.AST, var: str,
        conditions: list[tuple[str, ast.Call | None]], loops: list[ast.stmt], late: list[int],
        tries: list[ast.stmt] | None = None, unregistered: list[tuple[ast.Call, int]] | None = None,
    ) -> bool:
        """Whether ``release`` gives ``var`` back on every path. A release in
        the right ``finally:`` that runs only on some paths out of it (under
        an ``if`` unrelated to the connection, in one branch of a conditional
        expression, after ``ok and``, in a ``match`` case, in a loop's body
        that may run zero times, in an ``except`` handler) is not: that
        condition, as a phrase ("only when `ok` (line 7)"), is added to
        ``conditions`` with None. Neither is a ``finally:`` after a loop
        that acquires on each turn: that loop is added to ``loops``; nor one
        that awaits, raises or returns before the release (``finally: await
        con.execute("UNLISTEN *")`` then the release; an ``async with``
        around it, an await in the test of the ``if`` around it or earlier
        in its statement): the line of that step is added to ``late``. The
        ``try:`` of a ``finally:`` that releases is added to ``tries``.

        An exit-stack registration (``stack.push_async_callback(pool.release,
        con)``) counts as a ``try:`` right after the acquire does
        (:meth:`try_follows`): only when it runs on every path after the
        acquire and nothing that can raise, suspend or leave comes between
        them. Under a condition: the phrase is added to ``conditions`` with
        the registration; after such a step (or inside a ``with`` entered
        after the acquire): the registration and the step's line are added
        to ``unregistered``."""
        module = self.module
        registration = isinstance(release.func, ast.Attribute) and release.func.attr in _CLEANUP_REGISTRATIONS
        # A pytest fixture's teardown runs even when the test failed.
        if not registration and _decorator_kind(scope) == "fixture" and release.lineno > acquire_stmt.lineno:
            if _fixture_teardown_releases(module, acquire_stmt, release, var):
                return True
        node: ast.AST = release
        condition: str | None = None  # the innermost condition so far that does not test the connection
        # The first step on the way up that can leave before the release:
        # one earlier in the release's own statement (`print(await
        # con.fetchval(...), await pool.release(con))`), then the outermost
        # statement before it in its blocks.
        before: ast.AST | None = self.leaver_in_statement(release, var)
        while node is not scope:
            parent = module.parents[node]
            if registration and node is acquire_stmt:
                # `stack.push_async_callback(pool.release, con := await pool.acquire())`
                if condition is not None:
                    conditions.append((condition, release))
                return condition is None
            if registration and isinstance(node, ast.stmt):
                follows = (
                    # `if (con := await pool.acquire()) is not None:` registering first in its body.
                    "next" if isinstance(acquire_stmt, (ast.If, ast.While)) and acquire_stmt.body[0] is node
                    else self.try_follows(acquire_stmt, node, var)
                )
                if follows is not None:
                    if condition is not None:
                        conditions.append((condition, release))
                        return False
                    if follows != "next" or before is not None:
                        line = int(follows) if follows != "next" else getattr(before, "lineno", node.lineno)
                        if unregistered is not None:
                            unregistered.append((release, line))
                        return False
                    return True
            if isinstance(node, ast.stmt) and (place := _block_of(module, node)) is not None:
                block, index = place
                for earlier in block[:index]:
                    leaver = _leaves_before_release(earlier, var)
                    if leaver is not None:
                        before = leaver
                        break
            if isinstance(parent, (ast.Try, ast.TryStar)) and any(node is s for s in parent.finalbody):
                if (
                    _contains(parent.body, acquire_stmt) or self.try_follows(acquire_stmt, parent, var) == "next"
                    # `if (con := await pool.acquire()) is not None:` with the
                    # `try:` first in its body (a connection is never falsy).
                    or (isinstance(acquire_stmt, (ast.If, ast.While)) and acquire_stmt.body[0] is parent)
                ):
                    loop = _turning_loop(parent.body, acquire_stmt, var)
                    if loop is not None:
                        loops.append(loop)
                        return False
                    if condition is not None:
                        conditions.append((condition, None))
                        return False
                    if before is not None:
                        late.append(getattr(before, "lineno", release.lineno))
                        return False
                    if tries is not None:
                        tries.append(parent)
                    return True
            else:
                if condition is None:
                    condition = self.path_condition(node, parent, var, acquire_stmt)
                header = _header_leaver(node, parent, var, registration)
                if header is not None:
                    before = header
            node = parent
        return False

    def leaver_in_statement(self, release: ast.Call, var: str, root: ast.AST | None = None) -> ast.AST | None:
        """A node of the statement holding ``release`` (or of ``root``, an
        expression around it) that can suspend, raise or leave, and runs
        before it: one that ends before the release starts, and is not
        around it (``await``, ``asyncio.shield(...)``), or one in its
        arguments (``timeout=await budget()``). An await of a release of another connection is not one
        (see :func:`_leaves_before_release`)."""
        stmt = root if isinstance(root, ast.stmt) else self.module.statement_of(release)
        if isinstance(root, ast.expr):
            stmt = ast.Expr(value=root)
        around: set[int] = set()
        node: ast.AST = release
        while node is not stmt and node is not root and node in self.module.parents:
            node = self.module.parents[node]
            around.add(id(node))
        # Its arguments run before it; its receiver too, but a pool
        # expression that awaits (`(await get_pool()).release(con)`) is the
        # pool rules' business, as for the acquire.
        inside = {id(n) for arg in [*release.args, *release.keywords] for n in ast.walk(arg)}
        start = _position(release)
        for leaver in _leaving(stmt):
            if id(leaver) in around or (isinstance(leaver, ast.Await) and _is_release_call(leaver.value)):
                continue
            end = (getattr(leaver, "end_lineno", None) or 0, getattr(leaver, "end_col_offset", None) or 0)
            if id(leaver) in inside or end <= start:
                return leaver
        return None

    def releases_on_every_path(self, top: list[ast.stmt] | ast.expr, var: str, acquire_stmt: ast.stmt) -> bool:
        """Whether ``top`` (a block, or an expression: a branch of a
        conditional expression) gives ``var`` back whenever it runs: it holds
        a release that no condition, loop or handler inside it skips, and
        that nothing before it in ``top`` that can suspend, raise or leave
        comes before (:meth:`runs_whenever`)."""
        nodes = [n for stmt in top for n in _own_nodes(stmt)] if isinstance(top, list) else _own_nodes(top)
        return any(
            isinstance(n, ast.Call) and _releases(n, var) and self.runs_whenever(n, top, var, acquire_stmt)
            for n in nodes
        )

    def runs_whenever(
        self, release: ast.Call, top: list[ast.stmt] | ast.expr, var: str, acquire_stmt: ast.stmt
    ) -> bool:
        """Whether ``release``, inside ``top``, runs whenever ``top`` does,
        with nothing before it that can suspend, raise or leave (the rules of
        :meth:`safe_release`, up to ``top``)."""
        module = self.module
        if isinstance(top, list):
            def in_top(node: ast.AST) -> bool:
                return any(node is s for s in top)
            root: ast.AST | None = None
        else:
            def in_top(node: ast.AST) -> bool:
                return node is top
            root = top
        if self.leaver_in_statement(release, var, root) is not None:
            return False
        node: ast.AST = release
        while True:
            if isinstance(node, ast.stmt) and (place := _block_of(module, node)) is not None:
                block, index = place
                if any(_leaves_before_release(earlier, var) is not None for earlier in block[:index]):
                    return False
            if in_top(node):
                return True
            parent = module.parents.get(node)
            if parent is None or isinstance(parent, _SCOPES):
                return False
            if (
                self.path_condition(node, parent, var, acquire_stmt) is not None
                or _header_leaver(node, parent, var, False) is not None
            ):
                return False
            node = parent

    def path_condition(self, node: ast.AST, parent: ast.AST, var: str, acquire_stmt: ast.stmt) -> str | None:
        """When ``parent`` runs its part ``node`` only on some paths through
        it, and not exactly when ``var`` holds a connection: a phrase that
        says when (``only when `ok` (line 7)``). None when ``node`` runs
        whenever ``parent`` does, or when the other paths release ``var``
        too (the ``else:`` of ``if con is None:``, an ``if`` whose other
        branch releases, a ``match`` whose every case releases and one of
        them catches all)."""
        module = self.module

        def flag(checked_at: ast.AST) -> Callable[[ast.expr], bool]:
            at = checked_at if isinstance(checked_at, ast.stmt) else module.statement_of(checked_at)
            return functools.partial(self.flags_acquire, acquire_stmt=acquire_stmt, checked_at=at)

        if isinstance(parent, ast.If) and node is not parent.test:
            # `if con is not None:` (acquired inside the try) is fine, and
            # so is an `if` whose other branch releases too; `if ok:` is
            # not, nor `if not con.is_closed():` (a closed connection
            # still holds its slot until released) or `if con is None:`.
            in_body = any(node is s for s in parent.body)
            other = parent.orelse if in_body else parent.body
            if _tests_presence(parent.test, var, in_body, flag(parent)) or self.releases_on_every_path(
                other, var, acquire_stmt
            ):
                return None
            return f"only when `{ast.unparse(parent.test)}`{'' if in_body else ' is false'} (line {parent.lineno})"
        if isinstance(parent, ast.IfExp) and node is not parent.test:
            # `await pool.release(con) if ok else None`
            in_body = node is parent.body
            other_expr = parent.orelse if in_body else parent.body
            if _tests_presence(parent.test, var, in_body, flag(parent)) or self.releases_on_every_path(
                other_expr, var, acquire_stmt
            ):
                return None
            return f"only when `{ast.unparse(parent.test)}`{'' if in_body else ' is false'} (line {parent.lineno})"
        if isinstance(parent, ast.BoolOp) and node is not parent.values[0]:
            # `ok and await pool.release(con)`: runs when what comes before
            # it is true (`and`) or false (`or`).
            index = next(i for i, value in enumerate(parent.values) if value is node)
            earlier = parent.values[:index]
            test = earlier[0] if len(earlier) == 1 else ast.BoolOp(op=parent.op, values=earlier)
            present = isinstance(parent.op, ast.And)
            if _tests_presence(test, var, present, flag(parent)):
                return None
            return f"only when `{ast.unparse(test)}`{'' if present else ' is false'} (line {parent.lineno})"
        if isinstance(parent, ast.match_case) and any(node is s for s in parent.body):
            match = module.parents[parent]
            assert isinstance(match, ast.Match)
            if any(case.guard is None and _catches_all(case.pattern) for case in match.cases) and all(
                case is parent or self.releases_on_every_path(case.body, var, acquire_stmt) for case in match.cases
            ):
                return None
            return f"only in some cases of the `match` at line {match.lineno}"
        if isinstance(parent, ast.ExceptHandler):
            # `except BaseException: await pool.release(con); raise` with an
            # `else:` (or a `try:` body) that releases: one or the other runs.
            attempt = module.parents[parent]
            assert isinstance(attempt, (ast.Try, ast.TryStar))
            if _catches_everything(parent) and (
                self.releases_on_every_path(attempt.orelse, var, acquire_stmt)
                or self.releases_on_every_path(attempt.body, var, acquire_stmt)
            ):
                return None
            return f"only in the `except` handler at line {parent.lineno}, when its `try:` fails"
        if isinstance(parent, (ast.For, ast.AsyncFor, ast.While)):
            kind = {ast.For: "for", ast.AsyncFor: "async for", ast.While: "while"}[type(parent)]
            if any(node is s for s in parent.body):
                if isinstance(parent, ast.While) and isinstance(parent.test, ast.Constant) and parent.test.value:
                    return None  # `while True:`: the first turn runs
                if isinstance(parent, ast.For) and _non_empty(parent.iter):
                    return None
                when = (f"`{ast.unparse(parent.test)}`" if isinstance(parent, ast.While)
                        else "its iterable is not empty")
                return f"only when the `{kind}` loop at line {parent.lineno} runs its body (when {when})"
            if any(node is s for s in parent.orelse) and _breaks(parent):
                return f"only when the `{kind}` loop at line {parent.lineno} ends without a `break` (its `else:`)"
            return None
        comprehension = module.parents.get(parent) if isinstance(parent, ast.comprehension) else parent
        if isinstance(comprehension, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            # Only its first iterable runs whatever it holds (and a generator
            # expression runs nothing more until something iterates it).
            if parent is comprehension.generators[0] and node is comprehension.generators[0].iter:
                return None
            return f"only when the comprehension at line {comprehension.lineno} has items"
        if isinstance(parent, ast.Assert) and node is parent.msg:
            return f"only when the `assert` at line {parent.lineno} fails"
        return None

    def rebinding(self, call: ast.Call, acquire_stmt: ast.stmt, try_stmt: ast.stmt, var: str) -> ast.Name | None:
        """A binding of ``var`` (``con = ...``, ``for con in ...``, ``as
        con``) that runs after the acquire and before the ``finally:`` of
        ``try_stmt`` releases ``var``, with no release of ``var`` before it
        in its blocks: the connection acquired is then lost (``if stale:
        con = await pool.acquire()`` inside the ``try:``). Followed as
        :meth:`try_follows` follows the statements after the acquire: not
        into the other branch of an ``if``, nor into a handler of a ``try:``
        whose body acquires."""
        module = self.module
        assert isinstance(try_stmt, (ast.Try, ast.TryStar))
        after: list[ast.stmt] = [acquire_stmt]
        stmt: ast.AST = acquire_stmt
        while isinstance(stmt, ast.stmt) and (place := _block_of(module, stmt)) is not None:
            block, index = place
            parent = module.parents.get(stmt)
            after.extend(block[index + 1:])
            if isinstance(parent, (ast.Try, ast.TryStar)) and block is parent.body:
                after.extend(parent.orelse)
            elif isinstance(parent, ast.ExceptHandler):
                parent = module.parents.get(parent)
            if parent is None or isinstance(parent, _SCOPES):
                break
            stmt = parent
        finalbody = {id(n) for s in try_stmt.finalbody for n in ast.walk(s)}
        inside = {id(n) for n in ast.walk(try_stmt)}
        for position, later in enumerate(after):
            for node in _own_nodes(later):
                if not (isinstance(node, ast.Name) and node.id == var and isinstance(node.ctx, ast.Store)):
                    continue
                if later is acquire_stmt and isinstance(later, ast.Assign) and any(
                    n is node for target in later.targets for n in ast.walk(target)
                ):
                    continue  # the acquire's own target (`con = await ctx` too)
                if id(node) in finalbody or not (id(node) in inside or node.lineno < try_stmt.lineno):
                    continue
                if self.in_comprehension(node, later):
                    continue  # `[c.pid for con in others]`: the comprehension's own name
                # The acquire's own target (`con = await pool.acquire()`, or
                # a name of `a, b = await asyncio.gather(...)`).
                binding = module.parents.get(node)
                while isinstance(binding, (ast.Tuple, ast.List, ast.Starred)):
                    binding = module.parents.get(binding)
                value = getattr(binding, "value", None)
                if isinstance(binding, (ast.Assign, ast.AnnAssign, ast.NamedExpr)) and value is not None and any(
                    n is call for n in ast.walk(value)
                ):
                    continue
                # Released in the statements after the acquire before this
                # one (`await pool.release(con)`, then `con = None`, in the
                # `try:` that acquired; review s63), or before it in its own
                # blocks.
                if not (_contains_release(after[1:position], var) or self.released_before(node, later, var)):
                    return node
        return None

    def in_comprehension(self, node: ast.AST, outer: ast.stmt) -> bool:
        """Whether ``node`` is a name of a comprehension (its own scope)."""
        while node is not outer and node in self.module.parents:
            node = self.module.parents[node]
            if isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
                return True
        return False

    def released_before(self, node: ast.AST, outer: ast.stmt, var: str) -> bool:
        """Whether a statement before ``node`` releases ``var``, in each
        block from ``node``'s up to the one holding ``outer``."""
        while node is not outer and node in self.module.parents:
            if isinstance(node, ast.stmt) and (place := _block_of(self.module, node)) is not None:
                block, index = place
                if _contains_release(block[:index], var):
                    return True
            node = self.module.parents[node]
        return False

    def flags_acquire(self, test: ast.expr, acquire_stmt: ast.stmt, checked_at: ast.stmt) -> bool:
        """Whether ``test`` (of the statement ``checked_at``) is a flag set
        right after the acquire, so true exactly when the connection is held:
        ``con = await pool.acquire()`` then ``acquired = True`` (nothing
        between can fail), and ``if acquired:`` in the ``finally:``, with no
        other binding of the name between the two."""
        place = _block_of(self.module, acquire_stmt)
        if not isinstance(test, ast.Name) or place is None:
            return False
        block, index = place
        following = block[index + 1] if index + 1 < len(block) else None
        if not (
            isinstance(following, ast.Assign) and len(following.targets) == 1
            and _is_name(following.targets[0], test.id)
            and isinstance(following.value, ast.Constant) and following.value.value is True
        ):
            return False
        # Not set again before the test (`failed = True` ... `failed = False`
        # in the `try:`: a release only on failure; review s63). Set before
        # the acquire or after the test, it still flags.
        return not any(
            isinstance(node, ast.Name) and node.id == test.id and isinstance(node.ctx, ast.Store)
            and (following.lineno, following.col_offset) < (node.lineno, node.col_offset)
            and node.lineno <= checked_at.lineno
            for node in _walk_scope(self.module.scope_of(acquire_stmt))
        )

    def try_follows(self, acquire_stmt: ast.stmt, try_stmt: ast.stmt, var: str) -> str | None:
        """"next" if ``try_stmt`` comes right after the acquire in the same
        block (nothing in between can fail or leave holding ``var``), the line
        of the first await, return, raise... in between, or None if unrelated
        (the ``try:`` does not come after the acquire). An acquire in a branch
        of an ``if`` (``con = None; if need: con = await pool.acquire()``) is
        followed out of it: the rest of that branch, then what follows the
        ``if``. So is one in the body of a ``try:`` whose handlers catch the
        acquire's errors (``try: con = await pool.acquire() except
        PoolTimeoutError: return 503``): the rest of that body, its ``else:``
        and ``finally:`` (a handler runs with the connection held only if
        something after the acquire raised: that is the first leaver), then
        what follows the ``try``."""
        module = self.module
        first_leaver: str | None = None
        stmt = acquire_stmt
        while True:
            place = _block_of(self.module, stmt)
            if place is None:
                return None
            block, index = place
            parent = self.module.parents.get(stmt)
            following = block[index + 1:]
            if isinstance(parent, (ast.Try, ast.TryStar)) and block is parent.body:
                following = following + parent.orelse + parent.finalbody
            elif isinstance(parent, (ast.Try, ast.TryStar)) and block is parent.orelse:
                following = following + parent.finalbody
            elif isinstance(parent, ast.ExceptHandler):
                # An acquire in a handler (`except PoolTimeoutError: con =
                # await fallback_pool.acquire()`): the rest of the handler,
                # the `finally:`, then what follows the `try`.
                parent = module.parents.get(parent)
                following = following + getattr(parent, "finalbody", [])
            elif (
                isinstance(parent, ast.While) and block is parent.body
                and _tests_presence(parent.test, var, False)
            ):
                # `while con is None: try: con = await pool.acquire() except
                # PoolTimeoutError: ...`: the test ends the loop once the
                # connection is held; its `else:`, then what follows it.
                following = following + parent.orelse
            elif not isinstance(parent, ast.If):
                parent = None
            for later in following:
                if later is try_stmt:
                    return first_leaver or "next"
                loop = self.broken_loop(later)
                if loop is not None:
                    # A retry loop's `break` once the acquire succeeded: what
                    # follows the loop comes next (not its `else:`), after the
                    # `finally:` blocks and the `async with` exits (awaits)
                    # the `break` goes through.
                    for exit_stmt in self.finally_on_the_way(later, loop):
                        leaver: ast.AST | None
                        if isinstance(exit_stmt, ast.AsyncWith):
                            leaver = exit_stmt
                        else:
                            leaver = _leaves_holding(exit_stmt, var)
                        if leaver is not None and first_leaver is None:
                            first_leaver = str(getattr(leaver, "lineno", exit_stmt.lineno))
                    parent = loop
                    break
                leaver = _leaves_holding(later, var)
                if leaver is not None and first_leaver is None:
                    # The await, return or raise itself (an `if` may hold it lines below).
                    first_leaver = str(getattr(leaver, "lineno", later.lineno))
            if not isinstance(parent, ast.stmt):
                return None
            stmt = parent

    def broken_loop(self, stmt: ast.stmt) -> ast.For | ast.AsyncFor | ast.While | None:
        """The loop that ``stmt`` ends, when it is a ``break`` statement: the
        innermost loop whose body holds it (one in a loop's ``else:`` ends
        the loop around that one), in the same function; else None."""
        if not isinstance(stmt, ast.Break):
            return None
        node: ast.AST = stmt
        while node in self.module.parents:
            parent = self.module.parents[node]
            if isinstance(parent, _SCOPES):
                return None
            if isinstance(parent, (ast.For, ast.AsyncFor, ast.While)) and any(node is s for s in parent.body):
                return parent
            node = parent
        return None

    def finally_on_the_way(self, jump: ast.stmt, loop: ast.stmt) -> list[ast.stmt]:
        """What runs when ``jump`` leaves for ``loop``, in order: the
        statements of the ``finally:`` blocks of each ``try`` between them
        whose body, handlers or ``else:`` hold ``jump``, and each ``async
        with`` between them (itself: its ``__aexit__`` is an await)."""
        statements: list[ast.stmt] = []
        node: ast.AST = jump
        while node is not loop and node in self.module.parents:
            parent = self.module.parents[node]
            if isinstance(parent, (ast.Try, ast.TryStar)) and not any(node is s for s in parent.finalbody):
                statements.extend(parent.finalbody)
            elif isinstance(parent, ast.AsyncWith):
                statements.append(parent)
            node = parent
        return statements

    def gap_before_finally(self, releases: list[ast.Call], acquire_stmt: ast.stmt, var: str) -> int | None:
        """The line of the first step between the acquire and a ``try:``
        after it whose ``finally:`` releases ``var``: what
        :meth:`try_follows` finds, or, for a ``try:`` inside a ``with`` or
        ``async with`` block after the acquire (``with
        tracer.start_as_current_span(...): try: ...``), that block's line
        (entering it can fail, an ``async with``'s awaits) or the first step
        before it. None if there is no such ``try:``."""
        for release in releases:
            node: ast.AST = release
            while node in self.module.parents:
                parent = self.module.parents[node]
                if isinstance(parent, (ast.Try, ast.TryStar)) and any(node is s for s in parent.finalbody):
                    follows = self.try_follows(acquire_stmt, parent, var)
                    if follows is not None and follows != "next":
                        return int(follows)
                    inner: ast.stmt = parent
                    steps: list[int] = []  # in the `with` blocks around the `try:`, the outermost's last
                    while follows is None and isinstance(block := self.module.parents.get(inner), _WITHS):
                        at = next(i for i, s in enumerate(block.body) if s is inner)
                        leavers = [_leaves_holding(s, var) for s in block.body[:at]]
                        steps[:0] = [getattr(leaver, "lineno", block.lineno) for leaver in leavers if leaver][:1]
                        if isinstance(block, ast.AsyncWith) and _header_leaver(inner, block, var, False):
                            steps.insert(0, block.lineno)
                        inner = block
                        follows = self.try_follows(acquire_stmt, block, var)
                        if follows is not None:
                            return int(follows) if follows != "next" else (steps or [block.lineno])[0]
                node = parent
        return None

    def unreleased_exit(self, acquire_stmt: ast.stmt, scope: ast.AST, var: str) -> tuple[str, int] | None:
        """The first ``return``/``raise`` after the acquire with no release of
        ``var`` before it on its way up to the acquire's block, or the first
        such ``continue``/``break`` of a loop the acquire is in."""
        module = self.module
        place = _block_of(module, acquire_stmt)
        if place is None:
            return None
        home, index = place
        exits = sorted(
            (
                n for n in _walk_scope(scope)
                if isinstance(n, ast.stmt) and n.lineno > acquire_stmt.lineno and (
                    isinstance(n, (ast.Return, ast.Raise))
                    or (isinstance(n, (ast.Continue, ast.Break)) and self.leaves_loop_of(n, acquire_stmt, scope))
                )
            ),
            key=lambda n: n.lineno,
        )
        for exit_node in exits:
            node: ast.AST = exit_node
            covered = False
            reached_home = False
            while node is not scope and not covered:
                assert isinstance(node, ast.stmt) or node in module.parents
                if isinstance(node, ast.stmt):
                    found = _block_of(module, node)
                    if found is not None:
                        block, at = found
                        start = index + 1 if block is home else 0
                        if block is home and at <= index:
                            break
                        covered = _contains_release(block[start:at], var)
                        if block is home:
                            reached_home = True
                            break
                parent = module.parents[node]
                if (
                    isinstance(parent, (ast.Try, ast.TryStar)) and not any(node is s for s in parent.finalbody)
                    and _contains_release(parent.finalbody, var)
                ):
                    covered = True  # it leaves through a `finally:` that releases (in a `with` after the acquire)
                node = parent
            if reached_home and not covered:
                return type(exit_node).__name__.lower(), exit_node.lineno
        return None

    def leaves_loop_of(self, jump: ast.Continue | ast.Break, acquire_stmt: ast.stmt, scope: ast.AST) -> bool:
        """Whether ``jump`` belongs to a loop that holds the acquire (it ends
        the acquire's iteration), not to a loop nested after it."""
        node: ast.AST = jump
        while node is not scope and node in self.module.parents:
            node = self.module.parents[node]
            if isinstance(node, (ast.For, ast.AsyncFor, ast.While)):
                return _contains(node.body, acquire_stmt)
        return False


def _expected_to_raise(module: _Module, stmt: ast.stmt) -> bool:
    """Is ``stmt`` the last statement of a ``with pytest.raises(...):`` (or
    ``self.assertRaises(...)``) block?"""
    block = module.parents.get(stmt)
    return (
        isinstance(block, ast.With) and block.body[-1] is stmt
        and any(
            isinstance(item.context_expr, ast.Call) and _last_name(item.context_expr.func) in _EXPECTS_RAISE
            for item in block.items
        )
    )


def _turning_loop(block: list[ast.stmt], acquire_stmt: ast.stmt, var: str) -> ast.stmt | None:
    """A loop in ``block`` (a ``try:`` body) whose body holds the acquire and
    turns again with the connection still held: one that neither releases
    ``var`` in its body, nor has a ``break`` or ``return`` after the acquire
    (a retry loop: ``for _ in range(3): try: con = await pool.acquire() ...
    break``), nor is a ``while`` that tests ``var`` (``while con is None:``)."""
    for stmt in block:
        for loop in [stmt, *_walk_scope(stmt)]:
            if not isinstance(loop, (ast.For, ast.AsyncFor, ast.While)) or not _contains(loop.body, acquire_stmt):
                continue
            if isinstance(loop, ast.While) and any(_is_name(n, var) for n in ast.walk(loop.test)):
                continue
            body = [n for s in loop.body for n in _own_nodes(s)]
            if any(isinstance(n, ast.Call) and _releases(n, var) for n in body):
                continue
            if any(isinstance(n, (ast.Break, ast.Return)) and n.lineno >= acquire_stmt.lineno for n in body):
                continue
            return loop
    return None


def _contains(block: list[ast.stmt], target: ast.stmt) -> bool:
    return any(node is target for stmt in block for node in [stmt, *ast.walk(stmt)])


def _is_generator(scope: ast.AST) -> bool:
    return any(isinstance(n, (ast.Yield, ast.YieldFrom)) for n in _walk_scope(scope))


def _scope_name(scope: ast.AST) -> str:
    return getattr(scope, "name", "<module>")


def check_source(source: str, path: str = "<string>", *, pool_names: str = DEFAULT_POOL_NAMES) -> list[Finding]:
    """The :class:`Finding` list for one file's ``source`` (``path`` is only
    reported in each finding); ``pool_names`` is the regular expression a
    receiver's last name must match to count as a pool (``--pool-names``).
    Lines ending in ``# safepool: ignore`` are left out.

    :raises SyntaxError: ``source`` does not parse.
    :raises re.error: ``pool_names`` is not a regular expression."""
    tree = ast.parse(source, filename=path)
    return _Checker(_Module(tree, source, re.compile(pool_names)), path).run()


def _excluded(path: str, excludes: Sequence[str]) -> bool:
    """Whether ``path`` (``./`` and ``//`` normalised away), or a trailing
    part of it from a directory boundary on, matches one of ``excludes``."""
    parts = os.path.normpath(path).split(os.sep)
    tails = [os.sep.join(parts[i:]) for i in range(len(parts))]
    return any(fnmatch.fnmatch(tail, os.path.normpath(pattern)) for pattern in excludes for tail in tails)


def _python_files(paths: Sequence[str], excludes: Sequence[str]) -> Iterator[str]:
    # A pattern matches the path (`./` and `//` normalised away) or any
    # trailing part of it from a directory boundary on: `migrations`,
    # `migrations/*` and `src/migrations` all exclude src/migrations/0001.py.
    def excluded(path: str) -> bool:
        return _excluded(path, excludes)

    for root in paths:
        if os.path.isfile(root):
            if not excluded(root):
                yield root
            continue
        for directory, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(
                d for d in dirnames
                if not d.startswith(".") and not excluded(os.path.join(directory, d))
                and (d not in SKIP_DIRS or os.path.isfile(os.path.join(directory, d, "__init__.py")))
            )
            for filename in sorted(filenames):
                path = os.path.join(directory, filename)
                if filename.endswith(".py") and not excluded(path):
                    yield path


def _some(paths: Sequence[str], shown: int = 3) -> str:
    """``a.py, b.py, c.py and 2 more``: the paths a summary line names."""
    listed = ", ".join(paths[:shown])
    return listed if len(paths) <= shown else f"{listed} and {len(paths) - shown} more"


class _Parser(argparse.ArgumentParser):
    """argparse whose error line shows no password of a DSN among the
    arguments ("invalid choice: 'postgresql://u:pw@h/db'")."""

    def __init__(self, arguments: Sequence[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.arguments = arguments

    def error(self, message: str) -> NoReturn:
        super().error(redact_argv(message, self.arguments))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m safepool check PATH...``: print the findings of every
    file (``--format text`` or ``json``) and return the exit status: 0
    nothing found, 1 findings (even if some files could not be checked), 2
    no findings but a file could not be read or parsed, a path does not
    exist, a directory given holds no Python file to check, or ``--exclude``
    left out every file given. ``argv`` defaults to ``sys.argv[1:]``.

    :raises SystemExit: (status 2, argparse's) an argument it refuses (an
        unknown option, a ``--pool-names`` that is not a regular
        expression), with the usage on stderr."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = _Parser(
        arguments,
        prog="python -m safepool check",
        description="Find pool.acquire() results that are not released on every path. "
        "Exit status: 0 nothing found, 1 findings (even if some files could not be checked), "
        "2 no findings but a file could not be read or parsed, a path does not exist, "
        "a directory given holds no Python file to check, or --exclude left out every file given.",
        epilog="A finding whose line (the acquire's, or its statement's first or last) has the comment "
        "`# safepool: ignore` is not reported: for a false positive, such as a connection released by "
        "another function. The known ones are listed in safepool's docs/testing.md.",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="files or directories (searched for *.py)")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument(
        "--pool-names", default=DEFAULT_POOL_NAMES, metavar="REGEX",
        help="a receiver whose last name matches this is a pool (default: %(default)s)",
    )
    parser.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="skip matching paths")
    args = parser.parse_args(arguments)
    try:
        re.compile(args.pool_names)
    except re.error as exc:
        parser.error(f"--pool-names: {exc}")

    findings: list[Finding] = []
    errors: list[dict[str, str]] = []
    scanned = 0  # files read and parsed: those whose findings are above
    unparsed: list[str] = []  # files that could not be read or parsed
    empty: list[str] = []  # directories given that hold no Python file to check
    seen: set[str] = set()  # each file's real path: overlapping paths (src, src/app) check it once
    for root in args.paths:
        paths = list(_python_files([root], args.exclude))
        if not paths and os.path.isdir(root) and not _excluded(root, args.exclude):
            # `check app/` once the code moved to `src/`: "no problems (0
            # files scanned)" and exit status 0 would pass CI checking nothing.
            empty.append(root)
        for path in paths:
            real = os.path.realpath(path)
            if real in seen:
                continue
            seen.add(real)
            if _check_file(path, args.pool_names, findings, errors):
                scanned += 1
            else:
                unparsed.append(path)
    # A DSN given for a path (the wrong tool, or a pasted command line) is
    # named without its password.
    missing = [mask_dsn(root) if passwords(root) else root for root in args.paths if not os.path.exists(root)]
    errors.extend({"path": root, "error": "no such file or directory"} for root in missing)
    excluded = " or excluded by --exclude" if args.exclude else ""
    errors.extend(
        {"path": root, "error": "no Python files to check in this directory (not searched: hidden "
         f"directories, and {', '.join(sorted(SKIP_DIRS - {'.venv'}))} unless they are packages{excluded})"}
        for root in empty
    )
    left_out: list[str] = []  # paths given that --exclude left out, when nothing else was checked
    if not scanned and not unparsed and not missing and not empty:
        # Every file named was excluded (`check --exclude 'x*' x.py`): as a
        # directory with nothing to check, exit status 2, not a clean pass.
        left_out = [root for root in args.paths if os.path.isfile(root) or _excluded(root, args.exclude)]
        errors.extend({"path": root, "error": "excluded by --exclude: nothing was checked"} for root in left_out)

    try:
        _report(args.format, findings, errors, scanned, unparsed, missing, empty, left_out)
    except BrokenPipeError:
        # `python -m safepool check src/ | head`: the reader has what it
        # wanted. No traceback, and the exit status still says what was found.
        silence_stdout()
    if findings:
        return 1
    return 2 if errors else 0


def _check_file(path: str, pool_names: str, findings: list[Finding], errors: list[dict[str, str]]) -> int:
    """Check one file: 1 if it was read and parsed (its findings added to
    ``findings``), 0 if not (its error added to ``errors``)."""
    source: str | None = None
    try:
        # As Python reads source: a `# -*- coding: ... -*-` line or a
        # UTF-8 byte order mark decides the encoding (PEP 263).
        with tokenize.open(path) as file:
            source = file.read()
        findings.extend(check_source(source, path, pool_names=pool_names))
        return 1
    except SyntaxError as exc:
        message = f"{type(exc).__name__}: {exc}"
        if (
            type(exc) is SyntaxError and source is not None and not (exc.msg or "").startswith("too many")
            and "null bytes" not in (exc.msg or "")
        ):
            # Parsed with this interpreter's grammar: newer syntax (PEP
            # 695's `type X = ...` on 3.11) is an error here, not in the
            # code. (An undecodable file fails before parsing, and a
            # parser limit, "too many nested parentheses", is the same in
            # every version, as is a NUL byte in the file: no hint.)
            message += (f" (parsed as Python {sys.version_info.major}.{sys.version_info.minor}: "
                        "run the check with the Python version the code is written for)")
        errors.append({"path": path, "error": message})
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        errors.append({"path": path, "error": f"{type(exc).__name__}: {exc}"})
    except RecursionError:
        # Deeply nested expressions (generated code) exhaust the parser's
        # stack: that file is not checked; the others still are.
        errors.append({"path": path, "error": "RecursionError: too deeply nested to parse"})
    return 0


def _report(
    format: str, findings: list[Finding], errors: list[dict[str, str]], scanned: int,
    unparsed: list[str], missing: list[str], empty: list[str], left_out: list[str],
) -> None:
    """Print the findings (stdout), the errors (stderr) and the summary line."""
    if format == "json":
        print(json.dumps({
            "files_scanned": scanned,
            "findings": [asdict(f) for f in findings],
            "errors": errors,
        }, indent=2))
    else:
        for finding in findings:
            print(finding.to_text())
        for error in errors:
            print(f"{error['path']}: error: {error['error']}", file=sys.stderr)
        files = len({f.path for f in findings})
        if findings:
            summary = (f"{len(findings)} problem{'s' if len(findings) != 1 else ''} in {files} "
                       f"file{'s' if files != 1 else ''} ({scanned} scanned")
        else:
            summary = f"no problems ({scanned} file{'s' if scanned != 1 else ''} scanned"
        # Files that were not checked are not "scanned", and are named: with
        # exit status 2 (or 1) "no problems" alone would read as a clean pass.
        if unparsed:
            summary += f", {len(unparsed)} could not be read or parsed: {_some(unparsed)}"
        if missing:
            summary += f", {len(missing)} path{'s' if len(missing) != 1 else ''} not found: {_some(missing)}"
        if empty:
            summary += (f", {len(empty)} director{'ies' if len(empty) != 1 else 'y'} without Python files: "
                        f"{_some(empty)}")
        if left_out:
            summary += f", every path given excluded: {_some(left_out)}"
        summary += ")" if not errors else "; errors above)"
        print(f"safepool check: {summary}")


if __name__ == "__main__":  # python -m safepool.check, as python -m safepool check
    sys.exit(main())
