"""The tested examples of ``docs/examples/``, inlined into the pages.

A page shows an example's section as a plain code block under a marker,
so it reads the same on GitHub and on the built site::

    <!-- snippet: examples/quickstart.py:quickstart -->
    ```python
    ...the lines between "# --8<-- [start:quickstart]" and "[end:quickstart]"...
    ```

(``<!-- snippet: examples/recipe_fastapi.py -->``: the whole file.)

The examples themselves run in the tests (against PostgreSQL); this keeps
the pages' copies equal to them: ``tests/test_docs_build.py`` fails on a
page whose block differs from its section, and

    python docs/hooks/snippets.py          # rewrite the blocks from the examples

brings them back in line (``--check``: only say which pages differ).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1]
BLOCK = re.compile(
    r"^<!-- snippet: (?P<file>examples/[\w.-]+\.py)(?::(?P<section>[\w-]+))? -->\n```python\n(?P<body>.*?)^```$",
    re.MULTILINE | re.DOTALL,
)


def section(file: str, name: str | None) -> str:
    """The lines of ``name``'s section in ``docs/<file>`` (None: the whole
    file), with a final newline.

    :raises ValueError: the file has no such section (or no end marker)."""
    text = (DOCS / file).read_text()
    if name is None:
        return text if text.endswith("\n") else text + "\n"
    lines = text.splitlines(keepends=True)
    start, end = f"# --8<-- [start:{name}]", f"# --8<-- [end:{name}]"
    try:
        first = next(i for i, line in enumerate(lines) if line.strip() == start) + 1
        last = next(i for i in range(first, len(lines)) if lines[i].strip() == end)
    except StopIteration:
        raise ValueError(f"docs/{file} has no section {name!r} (markers {start!r} ... {end!r})") from None
    return "".join(lines[first:last])


def sync(text: str) -> str:
    """``text`` (a page) with every snippet block's body taken from its example."""
    def body(m: re.Match[str]) -> str:
        where = m["file"] if m["section"] is None else f"{m['file']}:{m['section']}"
        return f"<!-- snippet: {where} -->\n```python\n{section(m['file'], m['section'])}```"

    return BLOCK.sub(body, text)


def blocks(text: str) -> list[tuple[str, str | None]]:
    """``[(file, section or None), ...]``: the snippet blocks of a page, in order."""
    return [(m["file"], m["section"]) for m in BLOCK.finditer(text)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only list the pages whose blocks differ (exit 1)")
    args = parser.parse_args()
    stale = []
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text()
        synced = sync(text)
        if synced != text:
            stale.append(page.name)
            if not args.check:
                page.write_text(synced)
    verb = "differ from their examples" if args.check else "rewritten"
    print(f"{len(stale)} pages {verb}{': ' + ', '.join(stale) if stale else ''}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
