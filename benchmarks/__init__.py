"""safepool's benchmark suite: ratios against asyncpg's pool, measured in one run."""
