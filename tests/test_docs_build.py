"""The documentation site builds with `mkdocs build --strict` (warnings are
errors: broken links, missing pages, bad docstrings), and includes the tested
examples."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
_spec = importlib.util.spec_from_file_location("docs_snippets", DOCS / "hooks" / "snippets.py")
assert _spec is not None and _spec.loader is not None
snippets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(snippets)


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs", reason="pip install -e '.[test]' installs the docs dependencies")
    pytest.importorskip("mkdocstrings")
    site = tmp_path / "site"
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert run.returncode == 0, run.stdout + run.stderr
    nav = re.findall(r":\s*([\w-]+)\.md\s*$", (ROOT / "mkdocs.yml").read_text(), re.MULTILINE)
    assert {"index", "runbook", "testing", "migration", "best-practices", "api"} <= set(nav)
    for page in nav:
        html = site / ("index.html" if page == "index" else f"{page}/index.html")
        assert html.is_file(), page
        if not (DOCS / f"{page}.md").exists():  # a page another issue has not written yet
            assert "Written with issue" in html.read_text()
    best = (site / "best-practices" / "index.html").read_text()
    assert "transfer" in best and "--8&lt;--" not in best and "--8<--" not in best
    api = (site / "api" / "index.html").read_text()
    for name in ("create_pool", "PoolTimeoutError", "assert_no_leaks", "check_source", "leases"):
        assert name in api


def test_every_example_section_is_included_in_a_page() -> None:
    shown = {block for page in DOCS.glob("*.md") for block in snippets.blocks(page.read_text())}
    for example in (DOCS / "examples").glob("*.py"):
        sections = [line.split("[start:")[1].rstrip("]") for line in example.read_text().splitlines()
                    if "--8<-- [start:" in line]
        for section in sections or [None]:  # (an example without sections is shown whole)
            assert (f"examples/{example.name}", section) in shown, (example.name, section)


def test_pages_show_the_examples_as_they_are_tested() -> None:
    # A page shows an example as a plain code block (GitHub renders no
    # include directive); a block that drifted from its example would show
    # untested code. `python docs/hooks/snippets.py` rewrites them.
    stale = [page.name for page in DOCS.glob("*.md") if snippets.sync(page.read_text()) != page.read_text()]
    assert stale == [], "run: python docs/hooks/snippets.py"
    assert not [page.name for page in DOCS.glob("*.md") if '--8<-- "' in page.read_text()]


def test_a_drifted_block_is_found_and_rewritten() -> None:
    page = (DOCS / "getting-started.md").read_text()
    assert ("examples/quickstart.py", "quickstart") in snippets.blocks(page)
    drifted = page.replace("min_size=2,", "min_size=3,", 1)
    assert drifted != page and snippets.sync(drifted) == page


def test_readme_links_to_existing_pages() -> None:
    readme = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / target).exists(), target
    for page in ("testing.md", "runbook.md", "migration.md", "best-practices.md"):
        assert f"docs/{page}" in readme


def _github_slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, every
    character but letters, digits, spaces, hyphens and underscores dropped,
    each space a hyphen (so " -m" becomes "--m", where the docs site's
    slugs differ: README's links are read on GitHub)."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_readme_links_to_existing_anchors() -> None:
    """Each `docs/page.md#anchor` link of README.md names a heading of that
    page as GitHub spells its anchor (a heading "... python -m safepool
    top" once broke README's link there)."""
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\((docs/[^)#]+)#([^)]+)\)", readme)
    assert links
    for target, anchor in links:
        lines = (ROOT / target).read_text().splitlines()
        headings = {_github_slug(line.lstrip("#")) for line in lines if re.match(r"#{1,6} ", line)}
        assert anchor in headings, f"{target}#{anchor}"


_PYTHON_BLOCK = re.compile(r"^( *)```(?:python|py)\n(.*?)^\1```", re.M | re.S)


def test_every_python_block_in_the_readme_and_docs_parses() -> None:
    """The snippet blocks are checked against tested files (above); the
    other ```python blocks (the README's, inline examples of a page) are at
    least valid Python, with top-level ``await`` as a REPL or a notebook
    allows it."""
    blocks = 0
    for page in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        text = page.read_text()
        for match in _PYTHON_BLOCK.finditer(text):
            blocks += 1
            line = text.count("\n", 0, match.start(2)) + 1
            source = textwrap.dedent(match.group(2))
            try:
                compile(source, f"{page.name}:{line}", "exec",
                        flags=ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
            except SyntaxError as error:
                pytest.fail(f"{page.name}, the block at line {line}: {error}")
    assert blocks >= 30  # (the pattern still finds the pages' blocks)
