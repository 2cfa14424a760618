"""Extensions use only the pool's public observation surface (issue 13).

The pytest plugin (safepool/testing), the exporters (safepool/metrics),
health (safepool/health.py) and top (safepool/top) must not reach a pool's,
a lease's or a connection's private members, patch the pool, import the
state core or the asyncpg adapter, or read the pool's log records: a
reworded log line or a renamed private attribute would break them with no
pool test failing. An AST scan enforces it.

The rule is deliberately simple: ``<expr>._name`` is flagged unless
``<expr>`` is ``self`` or ``cls`` (an extension's own objects) or the pair is
in ALLOWED below, each with its reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "safepool"
EXTENSIONS = ("testing", "metrics", "health.py", "top")
# Modules an extension must not import: the state core, the asyncpg adapter
# and asyncpg-compat shims, the runner and the pool's own helpers (the
# public names of _registry are safepool.pool's).
FORBIDDEN_MODULES = {
    "_state", "_internals", "_compat", "_detach", "_autoreset", "_stack", "_runner", "_reclaim", "_holder",
    "_surface", "_registry", "_options", "_workers", "_reporting", "_leasing",
}
# (path relative to safepool/, source of the flagged expression): why it is fine.
ALLOWED: dict[tuple[str, str], str] = {
    ("metrics/prometheus.py", "getattr(..., '_collector_to_names')"): (
        "prometheus_client's registry, not safepool's: read only, to find a PoolCollector already registered "
        "(it has no public list of collectors); register() falls back to the collectors it made"
    ),
    ("testing/tracker.py", "getattr(..., '_fut_waiter')"): (
        "asyncio's Task, not safepool's: read only, the future a holding task is blocked on (strict mode follows "
        "it to the tasks that complete it: shield(), wait_for() on 3.11, gather(), a TaskGroup); asyncio has no "
        "public call graph before 3.14; missing, nothing is followed"
    ),
    ("testing/tracker.py", "getattr(..., '_callbacks')"): (
        "asyncio's Future, not safepool's: read only, a task's done callbacks, to find the tasks that complete "
        "the future a holder waits on; missing, nothing is followed"
    ),
}


def extension_files() -> list[Path]:
    files: list[Path] = []
    for name in EXTENSIONS:
        path = PACKAGE / name
        files.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path])
    return files


def _is_dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__")


def violations(source: str, relpath: str) -> list[str]:
    """What an extension's source does beyond the public surface, one line each."""
    found: list[str] = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        where = f"{relpath}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not _is_dunder(node.attr):
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            text = ast.unparse(node)
            if (relpath, text) not in ALLOWED:
                found.append(f"{where}: private attribute {text}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            name = node.args[1] if len(node.args) >= 2 else None
            if isinstance(name, ast.Constant) and isinstance(name.value, str):
                private = name.value.startswith("_") and not _is_dunder(name.value)
                # Writing an attribute by name is patching; reading one by name, a private read.
                if node.func.id in ("setattr", "delattr") or (node.func.id in ("getattr", "hasattr") and private):
                    text = f"{node.func.id}(..., {name.value!r})"
                    if (relpath, text) not in ALLOWED:
                        found.append(f"{where}: {text}")
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            parts = node.module.split(".")
            if (node.level or parts[0] == "safepool") and FORBIDDEN_MODULES & set(parts):
                found.append(f"{where}: imports {'.' * node.level}{node.module}")
            if (node.level or parts[0] == "safepool") and any(
                alias.name.startswith("_") and not _is_dunder(alias.name) and parts[-1] in ("pool", "events", "stats")
                for alias in node.names
            ):
                found.append(f"{where}: imports a private name from {node.module}")
        elif isinstance(node, ast.Import):
            found.extend(
                f"{where}: imports {alias.name}"
                for alias in node.names
                if alias.name.startswith("safepool.") and FORBIDDEN_MODULES & set(alias.name.split("."))
            )
        if isinstance(node, ast.Attribute) and node.attr in ("addHandler", "getMessage", "__dict__"):
            found.append(f"{where}: {ast.unparse(node)} (log records and class dicts are not an interface)")
    return found


def test_extensions_use_only_the_public_surface() -> None:
    problems: list[str] = []
    for path in extension_files():
        problems += violations(path.read_text(encoding="utf-8"), str(path.relative_to(PACKAGE)))
    assert not problems, "\n".join(problems)


def test_every_extension_is_scanned() -> None:
    scanned = {str(path.relative_to(PACKAGE)) for path in extension_files()}
    assert {"testing/guards.py", "testing/tracker.py", "testing/plugin.py", "metrics/otel.py",
            "metrics/prometheus.py", "metrics/__init__.py", "health.py", "top/snapshot.py"} <= scanned


def test_the_scan_catches_what_the_old_extensions_did() -> None:
    """Each shape of access the extensions used before issue 13 is flagged;
    an extension's own private members are not."""
    flagged = {
        "pool._state.leases()": "private attribute pool._state",
        "lease.slot.connection._proxy": "private attribute lease.slot.connection._proxy",
        "previous = pool._capture_stack": "private attribute pool._capture_stack",
        "setattr(Pool, '__init__', wrapper)": "setattr(..., '__init__')",
        "setattr(Pool, '_busy_message', wrapper)": "setattr(..., '_busy_message')",
        "getattr(pool, '_leak_warning_after')": "getattr(..., '_leak_warning_after')",
        "from .._state import PoolState": "imports .._state",
        "import safepool._internals": "imports safepool._internals",
        "from ..pool import _LIVE_POOLS": "imports a private name from pool",
        "logging.getLogger('safepool.leaks').addHandler(h)": "addHandler",
        "text = record.getMessage()": "getMessage",
        "original = Pool.__dict__['__init__']": "Pool.__dict__",
    }
    for source, expected in flagged.items():
        found = violations(source, "x.py")
        assert len(found) == 1 and expected in found[0], (source, found)
    clean = (
        "self._lock = 1\nself._watched[pool] = w\ncls._registry.clear()\n"
        "pool.capture_stack = True\npool.add_event_listener(cb)\ngetattr(stats, name)\n"
        "from ..pool import Pool, live_pools, on_pool_created\nfrom .._histogram import DEFAULT_BOUNDS\n"
        "x.__class__\n"
    )
    assert violations(clean, "x.py") == []
