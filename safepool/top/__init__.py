"""``python -m safepool top DSN`` (alias ``watch``): a server's connections
grouped by application_name and state, from pg_stat_activity, refreshing.

- ``snapshot``: the query and the aggregation (a pure function of the rows);
- ``render``: the plain-text and rich views;
- ``cli``: arguments, the connection, the refresh loop, errors and exit codes.
"""

from __future__ import annotations

from .cli import main

__all__ = ["main"]
