"""``python -m safepool replay``: the connection-leak outage, replayed on
asyncpg's pool and on safepool, side by side (see docs/replay.md)."""

from __future__ import annotations

from .cli import main

__all__ = ["main"]
