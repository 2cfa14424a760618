"""reset_mode="auto" micro-benchmark: the classifier's cache hit, the proxy's
added cost per fetchval against the base proxy (a stand-in connection, so
only the proxies are timed), and a cache miss (parse + walk).

    python -m benchmarks.autoreset_micro

Not collected by pytest; figures are in docs/reset-modes.md.
"""

from __future__ import annotations

import time
import timeit
from typing import Any

from safepool import _autoreset
from safepool._autoreset import AutoResetProxy, reset_reason
from safepool.proxy import PoolConnectionProxy


class _Settings:
    standard_conforming_strings = "on"


class StandInConnection:
    def _set_proxy(self, proxy: Any) -> None:
        pass

    def get_settings(self) -> _Settings:
        return _Settings()

    def fetchval(self, query: str, *args: Any, column: int = 0, timeout: float | None = None) -> int:
        return 1


class StandInHolder:
    clean_mark = 0

    def _abandoned(self, lease: Any) -> None:
        pass


def _best_ns(stmt: str, names: dict[str, Any], number: int = 200_000) -> float:
    return min(timeit.repeat(stmt, globals=names, number=number, repeat=7)) / number * 1e9


def main() -> None:
    sql = "SELECT id, name FROM users WHERE id = $1"
    reset_reason(sql)
    base = PoolConnectionProxy(StandInHolder(), StandInConnection(), object())  # type: ignore[arg-type]
    auto = AutoResetProxy(StandInHolder(), StandInConnection(), object())  # type: ignore[arg-type]
    names = {"reset_reason": reset_reason, "sql": sql, "base": base, "auto": auto}
    print(f"classification, cache hit: {_best_ns('reset_reason(sql)', names):.0f} ns")
    plain, marked = _best_ns("base.fetchval(sql, 1)", names), _best_ns("auto.fetchval(sql, 1)", names)
    print(f"fetchval: base proxy {plain:.0f} ns, auto proxy {marked:.0f} ns, added {marked - plain:.0f} ns")
    texts = [
        f"SELECT id, lower(name), count(*) OVER () FROM users u JOIN orders o ON o.uid = u.id "
        f"WHERE u.id = {i} AND o.created > now() - interval '1 day'"
        for i in range(2000)
    ]
    start = time.perf_counter()
    for text in texts:
        _autoreset._classify(text)
    print(f"classification, cache miss: {(time.perf_counter() - start) / len(texts) * 1e6:.1f} us")
    base._detach()
    auto._detach()


if __name__ == "__main__":
    main()
