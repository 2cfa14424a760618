"""mkdocs hook: pages listed in the nav that are not written yet.

The documentation is written by several issues at once. Rather than commit
placeholder files that someone must remember to replace, the build generates
a one-line page for each nav entry whose file does not exist yet (and for
pages that existing pages already link to). As soon as the real file lands,
it is used instead: nothing to delete.
"""

from __future__ import annotations

from typing import Any

from mkdocs.structure.files import File, Files

# Pages other issues are writing, and the issue that writes each.
PENDING = {
    "design.md": ("How safepool works", 2),
    "leases.md": ("Lease timeouts and leak reports", 3),
    "backpressure.md": ("Backpressure", 4),
    "metrics.md": ("Metrics, health checks and events", 5),
    "performance.md": ("Performance", 6),
    "replay.md": ("The outage, replayed", 8),
    "reliability.md": ("Reliability", 9),
    "pgbouncer.md": ("PgBouncer", 9),
}


def on_files(files: Files, config: Any) -> Files:
    for path, (title, issue) in PENDING.items():
        if files.get_file_from_path(path) is None:
            content = f"# {title}\n\nWritten with issue {issue}.\n"
            files.append(File.generated(config, path, content=content))
    return files
