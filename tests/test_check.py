"""``python -m safepool check``: the AST scan on fixture files with known true
positives, true negatives and documented limits, and its command line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from safepool.check import check_source, main

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "check_fixtures"


def expected(path: Path) -> dict[int, tuple[str, str]]:
    """{line: (code, word)} from `# expect: SP001 word` comments."""
    marks = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        match = re.search(r"# expect: (SP\d{3})(?: ([\w+]+))?", line)
        if match:
            marks[number] = (match[1], match[2] or "")
    return marks


@pytest.mark.parametrize("name", ["leaks.py", "clean.py", "limits.py"])
def test_fixture_files_report_exactly_what_is_marked(name: str) -> None:
    path = FIXTURES / name
    findings = check_source(path.read_text(), str(path))
    marks = expected(path)
    assert {f.line: f.code for f in findings} == {line: code for line, (code, _) in marks.items()}
    for finding in findings:
        word = marks[finding.line][1]
        if word in ("return", "raise", "yield", "continue", "break", "when", "skipped", "again"):
            assert word in finding.message, finding
        elif word == "exception":
            assert "exception or a cancellation" in finding.message
        elif word.startswith("line"):  # "line": the next line; "line+2": two lines down (the return in an if)
            offset = int(word.partition("+")[2] or 1)
            assert f"line {finding.line + offset} between the acquire" in finding.message
        assert finding.hint


def test_missed_cases_are_really_missed() -> None:
    """limits.py's `missed:` lines stay unreported: the docs say so."""
    path = FIXTURES / "limits.py"
    missed = [n for n, line in enumerate(path.read_text().splitlines(), 1) if "# missed:" in line]
    assert len(missed) == 13
    assert not {f.line for f in check_source(path.read_text())} & set(missed)


def test_the_incident_handler_is_named_with_its_early_return() -> None:
    source = '''
async def customer_orders(request):
    con = await pool.acquire()
    customer = await con.fetchrow(CUSTOMER_SQL, request.customer_id)
    if customer["archived"]:
        metrics.leaked += 1
        return JSONResponse({"archived": True})
    orders = await con.fetch(ORDERS_SQL, request.customer_id)
    await pool.release(con)
    return JSONResponse({"orders": orders})
'''
    [finding] = check_source(source, "app.py")
    assert (finding.line, finding.code) == (3, "SP001")
    assert "the return at line 7 leaves without releasing it" in finding.message
    assert "async with pool.acquire() as con:" in finding.hint


def test_a_gathered_acquire_gets_a_fix_that_fixes_it() -> None:
    # The fix line said "release it in a `finally:` block right after the
    # acquire": the code reported had that already.
    source = (
        "async def f(pool):\n"
        "    first, second = await asyncio.gather(pool.acquire(), pool.acquire())\n"
        "    try:\n"
        "        pass\n"
        "    finally:\n"
        "        await pool.release(first)\n"
        "        await pool.release(second)\n"
    )
    findings = check_source(source)
    assert [f.code for f in findings] == ["SP001", "SP001"]
    for finding, var in zip(findings, ("first", "second"), strict=True):
        assert "`gather()` raises before the `try:`" in finding.message
        assert "finally" not in finding.hint
        assert finding.hint == (
            f"acquire outside `gather()`, one connection at a time (`async with pool.acquire() as {var}:`), "
            "or pass `return_exceptions=True` to `gather()` and release each connection it returns")


def test_release_in_a_branch_before_the_return_covers_it() -> None:
    source = '''
async def handler(pool, flag):
    con = await pool.acquire()
    if flag:
        await pool.release(con)
        return None
    await pool.release(con)
'''
    [finding] = check_source(source)
    assert "exception or a cancellation" in finding.message  # no return is blamed


def test_pool_names_option() -> None:
    source = "async def f(db):\n    con = await db.acquire()\n    await con.execute('SELECT 1')\n"
    assert check_source(source) == []
    assert [f.code for f in check_source(source, pool_names=r"^db$")] == ["SP002"]


def test_cli_exit_codes_and_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(FIXTURES / "clean.py")]) == 0
    assert "safepool check: no problems (1 file scanned)" in capsys.readouterr().out
    assert main([str(FIXTURES)]) == 1
    out = capsys.readouterr().out
    assert f"{FIXTURES / 'leaks.py'}:10:17: SP001 connection `con` acquired here" in out
    assert "    fix: use `async with pool.acquire() as con:`" in out
    assert re.search(r"safepool check: \d+ problems in 2 files \(3 scanned\)", out)
    assert main([str(FIXTURES), "--exclude", "leaks.py", "--exclude", "limits.py"]) == 0
    capsys.readouterr()
    broken = tmp_path / "broken.py"
    broken.write_text("def f(:\n")
    assert main([str(broken)]) == 2
    captured = capsys.readouterr()
    assert "SyntaxError" in captured.err
    # The summary must not read as a clean pass when the exit status is 2,
    # and a file that did not parse was not scanned: it is counted apart, by name.
    assert captured.out.strip() == (
        f"safepool check: no problems (0 files scanned, 1 could not be read or parsed: {broken}; errors above)")
    assert main([str(tmp_path / "missing")]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == f"{tmp_path / 'missing'}: error: no such file or directory"
    assert captured.out.strip() == (
        f"safepool check: no problems (0 files scanned, 1 path not found: {tmp_path / 'missing'}; errors above)")


def test_cli_a_file_that_does_not_parse_is_not_counted_as_scanned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a_clean.py").write_text("async def f(pool):\n    async with pool.acquire() as con:\n        pass\n")
    (tmp_path / "b_broken.py").write_text("def f(:\n")
    (tmp_path / "c_leaky.py").write_text("async def f(pool):\n    await pool.acquire()\n")
    # Findings decide the status (1) even with a file unchecked, as documented.
    assert main([str(tmp_path)]) == 1
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert out == (f"safepool check: 1 problem in 1 file (2 scanned, 1 could not be read or parsed: "
                   f"{tmp_path / 'b_broken.py'}; errors above)")
    assert main([str(tmp_path), "--exclude", "c_leaky.py"]) == 2
    out = capsys.readouterr().out.strip()
    assert out == (f"safepool check: no problems (1 file scanned, 1 could not be read or parsed: "
                   f"{tmp_path / 'b_broken.py'}; errors above)")
    assert main(["--format", "json", str(tmp_path)]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["files_scanned"] == 2
    assert [Path(e["path"]).name for e in report["errors"]] == ["b_broken.py"]
    for name in ("d.py", "e.py", "f.py", "g.py"):
        (tmp_path / name).write_text("(\n")
    assert main([str(tmp_path)]) == 1
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert out.endswith(f"(2 scanned, 5 could not be read or parsed: {tmp_path / 'b_broken.py'}, "
                        f"{tmp_path / 'd.py'}, {tmp_path / 'e.py'} and 2 more; errors above)")


def test_cli_an_undecodable_file_gets_no_python_version_hint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # tokenize.open() refuses it before any parsing (a SyntaxError too): the
    # grammar of the Python running the check has nothing to do with it.
    undecodable = tmp_path / "latin1.py"
    undecodable.write_bytes(b"\xff\xfe x = 1\n")
    assert main([str(undecodable)]) == 2
    err = capsys.readouterr().err
    assert "encoding declaration" in err and "parsed as Python" not in err
    newer = tmp_path / "newer.py"
    newer.write_text("def f(:\n")
    assert main([str(newer)]) == 2
    assert "parsed as Python" in capsys.readouterr().err


def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--format", "json", str(FIXTURES / "leaks.py")]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["files_scanned"] == 1 and report["errors"] == []
    first = report["findings"][0]
    assert set(first) == {"path", "line", "col", "code", "message", "hint"}
    assert (first["line"], first["code"]) == (10, "SP001")
    assert main(["--format", "json", str(FIXTURES / "clean.py")]) == 0
    assert json.loads(capsys.readouterr().out)["findings"] == []


def test_python_dash_m_entry_point_finds_the_replay_leak() -> None:
    """The replay's service leaks on purpose (the incident) and hands a
    connection to a background task (the stuck scenario): the check names both."""
    run = subprocess.run(
        [sys.executable, "-m", "safepool", "check", "safepool/replay/app.py", "--format", "json"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 1, run.stderr
    leak, stuck = json.loads(run.stdout)["findings"]
    assert leak["code"] == "SP001" and "return at line" in leak["message"]
    assert stuck["code"] == "SP001" and "released only in an `except` handler" in stuck["message"]


def test_cli_reads_files_as_python_does(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A PEP 263 coding line and a UTF-8 byte order mark are valid Python:
    the file is checked, not reported as unreadable."""
    leak = 'async def f(pool):\n    con = await pool.acquire()\n    await con.execute("SELECT 1")\n'
    (tmp_path / "latin1.py").write_bytes(b"# -*- coding: latin-1 -*-\n# caf\xe9\n" + leak.encode())
    (tmp_path / "bom.py").write_bytes(b"\xef\xbb\xbf" + leak.encode())
    assert main(["--format", "json", str(tmp_path)]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["errors"] == []
    assert [(Path(f["path"]).name, f["line"], f["code"]) for f in report["findings"]] == [
        ("bom.py", 2, "SP002"), ("latin1.py", 4, "SP002"),
    ]


def test_cli_a_file_too_deep_to_parse_is_an_error_not_a_crash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "generated.py").write_text("x = " + "+".join(["1"] * 200_000) + "\n")
    (tmp_path / "leaky.py").write_text("async def f(pool):\n    await pool.acquire()\n")
    assert main(["--format", "json", str(tmp_path)]) == 1  # the other file is still checked
    report = json.loads(capsys.readouterr().out)
    assert [f["code"] for f in report["findings"]] == ["SP003"]
    assert report["errors"] == [{"path": str(tmp_path / "generated.py"),
                                 "error": "RecursionError: too deeply nested to parse"}]


def test_cli_a_syntax_error_names_the_grammar_it_was_parsed_with(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "broken.py").write_text("def f(:\n")
    assert main([str(tmp_path / "broken.py")]) == 2
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert f"(parsed as Python {version}: run the check with the Python version" in capsys.readouterr().err


def test_cli_a_parser_limit_is_not_blamed_on_the_python_version(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # "too many nested parentheses" is a limit of every version's parser: the
    # hint to run the check with another Python sent the user the wrong way.
    (tmp_path / "generated.py").write_text("x = " + "(" * 300 + "1" + ")" * 300 + "\n")
    assert main([str(tmp_path / "generated.py")]) == 2
    err = capsys.readouterr().err
    assert "too many nested parentheses" in err and "parsed as Python" not in err


def test_pool_aliases_are_pools() -> None:
    source = '''
class Repository:
    def __init__(self, pool):
        self._db = pool

    async def get(self, key):
        con = await self._db.acquire()
        return await con.fetchval("SELECT $1", key)


async def handler(request):
    db = request.app["pool"]
    conn = db
    con = await conn.acquire()
    await con.execute("SELECT 1")
'''
    assert [(f.line, f.code) for f in check_source(source)] == [(7, "SP002"), (14, "SP002")]


def test_aiohttp_app_keys_of_pools_are_pools() -> None:
    """aiohttp 3.9+ warns (NotAppKeyWarning) on string keys, so services keep
    the pool under a typed ``AppKey``: ``app[POOL]`` was not taken for a pool."""
    source = '''
from typing import Final

import asyncpg
from aiohttp import web

POOL = web.AppKey("pool", asyncpg.Pool)
DB: Final = web.AppKey[asyncpg.Pool]("db")
REPLICA = web.AppKey("replica_pool", object)
WORKERS = web.AppKey("workers", ThreadPoolExecutor)


async def one(request):
    con = await request.app[POOL].acquire()
    return await con.fetchval("SELECT 1")


async def two(request):
    db = request.app[DB]
    con = await db.acquire()
    return await con.fetchval("SELECT 1")


async def three(request):
    con = await request.app[REPLICA].acquire()
    return await con.fetchval("SELECT 1")


async def four(request):
    worker = await request.app[WORKERS].acquire()
    return worker
'''
    assert [(f.line, f.code) for f in check_source(source)] == [(14, "SP002"), (20, "SP002"), (25, "SP002")]


def test_python_dash_m_safepool_dot_check_runs_the_check_too() -> None:
    """`python -m safepool.check src/` (the module's own name) ran nothing and
    exited 0: a CI step written that way passed whatever the code."""
    run = subprocess.run(
        [sys.executable, "-m", "safepool.check", str(FIXTURES / "leaks.py")],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 1, run.stderr
    assert "SP001 connection `con` acquired here" in run.stdout
    assert "safepool check: " in run.stdout.splitlines()[-1]


def test_an_acquire_after_the_release_is_not_blamed_on_a_gap_before_it() -> None:
    """The `try:` whose `finally:` releases comes before the second acquire:
    the message named a 'line between the acquire and that `try:`' that was
    after both."""
    source = '''
async def twice(pool):
    con = await pool.acquire()
    try:
        await con.execute("SELECT 1")
    finally:
        await pool.release(con)
    con = await pool.acquire()
    await con.execute("SELECT 2")
'''
    [finding] = check_source(source)
    assert (finding.line, finding.code) == (8, "SP001")
    # Not "no release of it comes after the acquire" either, which left the
    # reader looking at the release of `con` a line up: it says where it is.
    assert finding.message.endswith("the release of `con` at line 7 comes before this acquire, and none after it")


def test_cli_exclude_matches_a_trailing_part_of_the_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--exclude 'migrations/*'` excluded nothing under `src/` (only the whole
    path or the base name were matched), nor did `src/migrations` when the
    check was given `./src`."""
    leak = "async def f(pool):\n    await pool.acquire()\n"
    for name in ("src/migrations/m1.py", "src/app/a.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(leak)
    monkeypatch.chdir(tmp_path)
    for root, pattern in [("src", "migrations/*"), ("./src", "src/migrations"), ("src", "migrations"),
                          (str(tmp_path / "src"), "src/migrations/*.py")]:
        assert main(["--format", "json", root, "--exclude", pattern]) == 1
        paths = [Path(f["path"]).as_posix() for f in json.loads(capsys.readouterr().out)["findings"]]
        assert [p.rpartition("src/")[2] for p in paths] == ["app/a.py"], (root, pattern)


def test_output_piped_into_a_reader_that_stops_early(tmp_path: Path) -> None:
    """`python -m safepool check src/ | head`: the reader closes the pipe
    after a few lines. The check printed a BrokenPipeError traceback (`top`
    did not); now it stops quietly, and its exit status still says what it
    found."""
    leak = "async def f{n}(pool):\n    con = await pool.acquire()\n    await con.execute('SELECT 1')\n\n\n"
    (tmp_path / "many.py").write_text("".join(leak.format(n=n) for n in range(2000)))
    for format in ("text", "json"):
        child = subprocess.Popen(
            [sys.executable, "-m", "safepool", "check", str(tmp_path), "--format", format],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        assert child.stdout is not None and child.stderr is not None
        assert child.stdout.readline()  # far less than the output: the pipe's buffer fills
        child.stdout.close()
        stderr = child.stderr.read().decode()
        child.stderr.close()
        assert child.wait(timeout=60) == 1, stderr
        assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr


def test_an_await_in_the_finally_before_the_release_is_named() -> None:
    """`finally: await con.execute("UNLISTEN *")` then the release: that
    await failing (a broken connection) or cancelled skips the release. The
    check accepted it as a release in `finally:`."""
    source = '''
async def listen(pool):
    con = await pool.acquire()
    try:
        await con.execute("LISTEN jobs")
    finally:
        await con.execute("UNLISTEN *")
        await pool.release(con)
'''
    [finding] = check_source(source)
    assert (finding.line, finding.code) == (3, "SP001")
    assert finding.message == (
        "connection `con` is released in a `finally:` block, but line 7 in that `finally:` comes before the "
        "release and can fail or leave first: the release is then skipped")
    assert finding.hint.startswith("release it first in the `finally:`, or put what comes before the release in a "
                                   "`try:` of its own (`finally: try: ... finally: await pool.release(con)`)")


def test_cli_a_package_named_like_build_output_is_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A walk skips `build`, `dist`, `venv`... (build output, virtualenvs):
    an application package of that name (`app/build/`, a service's build
    jobs) was skipped with them, its leaks unreported."""
    leak = "async def f(pool):\n    await pool.acquire()\n"
    for name in ("app/build/__init__.py", "app/build/jobs.py", "app/dist/__init__.py",
                 "build/lib/app/handlers.py", "dist/app/handlers.py", "venv/lib/site.py",
                 ".venv/lib/site.py", "app/__pycache__/x.py", "node_modules/pkg/x.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(leak)
    monkeypatch.chdir(tmp_path)
    assert main(["--format", "json", "."]) == 1
    report = json.loads(capsys.readouterr().out)
    assert sorted(Path(f["path"]).as_posix() for f in report["findings"]) == [
        "app/build/__init__.py", "app/build/jobs.py", "app/dist/__init__.py"]
    # Given by name, a skipped directory is checked all the same.
    assert main(["--format", "json", "build"]) == 1
    assert [Path(f["path"]).as_posix() for f in json.loads(capsys.readouterr().out)["findings"]] == [
        "build/lib/app/handlers.py"]


def test_cli_symlinks(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """As docs/testing.md says: a symlink to a file is checked, a symlinked
    directory is not walked into (a loop cannot hang the walk), and a
    dangling symlink is an error (exit status 2 when nothing is found)."""
    leak = "async def f(pool):\n    await pool.acquire()\n"
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "leak.py").write_text(leak)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "linked.py").symlink_to(tmp_path / "shared" / "leak.py")
    (tmp_path / "src" / "shared").symlink_to(tmp_path / "shared", target_is_directory=True)
    (tmp_path / "src" / "loop").symlink_to(tmp_path / "src", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    assert main(["--format", "json", "src"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert [Path(f["path"]).as_posix() for f in report["findings"]] == ["src/linked.py"]
    assert report["files_scanned"] == 1
    (tmp_path / "src" / "linked.py").unlink()
    (tmp_path / "src" / "dangling.py").symlink_to(tmp_path / "missing.py")
    assert main(["src"]) == 2
    captured = capsys.readouterr()
    assert "src/dangling.py: error: FileNotFoundError" in captured.err
    # Given by name, a symlinked directory is walked.
    assert main(["--format", "json", "src/shared"]) == 1
    assert [Path(f["path"]).as_posix() for f in json.loads(capsys.readouterr().out)["findings"]] == [
        "src/shared/leak.py"]


def test_cli_a_directory_without_python_files_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`python -m safepool check app/` after the code moved to `src/` said
    "no problems (0 files scanned)" with exit status 0: a CI step that
    checked nothing passed. Such a directory is now an error (status 2)."""
    leak = "async def f(pool):\n    await pool.acquire()\n"
    (tmp_path / "app" / "static").mkdir(parents=True)
    (tmp_path / "app" / ".venv").mkdir()
    (tmp_path / "app" / ".venv" / "x.py").write_text(leak)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text(leak)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_a.py").write_text("")
    monkeypatch.chdir(tmp_path)
    assert main(["app"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("app: error: no Python files to check in this directory (not searched: hidden "
                                   "directories, and __pycache__, build, dist")
    assert captured.out.strip() == (
        "safepool check: no problems (0 files scanned, 1 directory without Python files: app; errors above)")
    assert main(["--format", "json", "app"]) == 2
    report = json.loads(capsys.readouterr().out)
    assert report["files_scanned"] == 0 and [e["path"] for e in report["errors"]] == ["app"]
    # Findings elsewhere still decide the status.
    assert main(["src", "app"]) == 1
    capsys.readouterr()
    # An empty file is a file checked; a directory excluded as a whole is not an error.
    assert main(["tests"]) == 0
    assert main(["tests", "app", "--exclude", "app"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "safepool check: no problems (1 file scanned)"


def test_cli_help_names_the_suppression_comment(capsys: pytest.CaptureFixture[str]) -> None:
    """A user facing a false positive (a helper that releases) learns of
    `# safepool: ignore` from `--help`, not only from the docs."""
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "# safepool: ignore" in " ".join(capsys.readouterr().out.split())


def test_the_suppression_comment_on_each_line_of_the_statement() -> None:
    leak = "async def f(pool):\n    con = await pool.acquire(\n        timeout=1,\n    ){}\n    await con.execute('SELECT 1')\n"
    assert [f.line for f in check_source(leak.format(""))] == [2]
    assert check_source(leak.format("  # safepool: ignore")) == []
    assert check_source(leak.replace("acquire(", "acquire(  # safepool: ignore").format("")) == []
    # On another statement's line, it does not hide the finding.
    assert [f.line for f in check_source(leak.format("") + "    pass  # safepool: ignore\n")] == [2]


def test_cli_a_nul_byte_is_not_blamed_on_the_python_version(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A NUL byte (a binary or corrupted file named .py) is refused by every
    # version's parser: the hint to run the check with another Python misled.
    (tmp_path / "corrupt.py").write_bytes(b"async def f(pool):\n    con = await pool.acquire()\n\x00\n")
    assert main([str(tmp_path / "corrupt.py")]) == 2
    err = capsys.readouterr().err
    assert "null bytes" in err and "parsed as Python" not in err


def test_fields_annotated_with_a_pool_type_are_pools() -> None:
    """A dataclass (or attrs, pydantic) field `db: asyncpg.Pool`, or an
    annotated attribute, holds a pool as an annotated parameter does: its
    acquires were not checked. A field annotated with a semaphore is not a
    pool whatever its name."""
    source = '''
from dataclasses import dataclass

import asyncio
import asyncpg


@dataclass
class Repository:
    db: asyncpg.Pool
    worker_pool: asyncio.Semaphore

    async def get(self):
        con = await self.db.acquire()
        return await con.fetchval("SELECT 1")

    async def throttled(self):
        await self.worker_pool.acquire()


class Service:
    def __init__(self, database):
        self.database: "safepool.Pool" = database

    async def get(self):
        con = await self.database.acquire()
        return await con.fetchval("SELECT 1")
'''
    assert [(f.line, f.code) for f in check_source(source)] == [(14, "SP002"), (26, "SP002")]


def test_cli_a_dsn_given_for_a_path_is_named_without_its_password(capsys: pytest.CaptureFixture[str]) -> None:
    # The wrong tool for a DSN (or a pasted command line): "no such file".
    dsn = "postgresql://app:s3cret@db.internal/orders"
    assert main([dsn]) == 2
    captured = capsys.readouterr()
    assert "s3cret" not in captured.out + captured.err
    assert "postgresql://app:***@db.internal/orders: error: no such file or directory" in captured.err
    assert main(["--format", "json", dsn]) == 2
    captured = capsys.readouterr()
    assert "s3cret" not in captured.out + captured.err
    assert json.loads(captured.out)["errors"] == [
        {"path": "postgresql://app:***@db.internal/orders", "error": "no such file or directory"}
    ]
    with pytest.raises(SystemExit):
        main(["--format", dsn, "x.py"])  # argparse: "invalid choice: 'postgresql://...'"
    captured = capsys.readouterr()
    assert "s3cret" not in captured.err and "postgresql://app:***@db.internal/orders" in captured.err


def test_cli_overlapping_paths_check_each_file_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src" / "app"
    src.mkdir(parents=True)
    (src / "orders.py").write_text("async def f(pool):\n    con = await pool.acquire()\n    await con.execute('SELECT 1')\n")
    # `check src/ src/app/`, or `check src/ src/app/orders.py` (a CI step that names a file
    # the directory already covers): one file, one finding.
    assert main([str(tmp_path / "src"), str(src), str(src / "orders.py")]) == 1
    out = capsys.readouterr().out
    assert out.count("SP002") == 1, out
    assert out.strip().endswith("safepool check: 1 problem in 1 file (1 scanned)"), out


def test_a_release_under_a_condition_other_than_not_none_is_reported() -> None:
    source = '''
async def skips_a_closed_connection(pool):
    con = await pool.acquire()
    try:
        await con.execute("SELECT 1")
    finally:
        if not con.is_closed():  # a closed connection still holds its pool slot until released
            await pool.release(con)


async def inverted(pool):
    con = await pool.acquire()
    try:
        await con.execute("SELECT 1")
    finally:
        if con is None:
            await pool.release(con)
'''
    assert [(f.line, f.code) for f in check_source(source)] == [(3, "SP001"), (12, "SP001")]


def test_cli_everything_excluded_is_an_error_that_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every file given excluded (`--exclude x.py x.py`) said "no problems (0
    files scanned)" with status 0, and a directory whose Python files were
    all excluded was said to hold none: both check nothing, both status 2,
    and the messages name --exclude. A file excluded beside one checked is
    no error."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.py").write_text("async def f(pool):\n    await pool.acquire()\n")
    (tmp_path / "y.py").write_text("")
    assert main(["--exclude", "x.py", "x.py"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == "x.py: error: excluded by --exclude: nothing was checked"
    assert captured.out.strip() == (
        "safepool check: no problems (0 files scanned, every path given excluded: x.py; errors above)")
    assert main(["--exclude", "*.py", "."]) == 2
    assert "or excluded by --exclude)" in capsys.readouterr().err
    assert main(["--exclude", "x.py", "x.py", "y.py"]) == 0
    assert capsys.readouterr().out.strip() == "safepool check: no problems (1 file scanned)"


def test_a_release_under_isinstance_of_a_connection_class_is_on_every_path() -> None:
    source = '''
import asyncio
import asyncpg


async def gathered(pool):
    first, second = await asyncio.gather(pool.acquire(), pool.acquire(), return_exceptions=True)
    try:
        if isinstance(first, BaseException) or isinstance(second, BaseException):
            raise LookupError("no connection")
        return await first.fetchval("SELECT 1") + await second.fetchval("SELECT 2")
    finally:
        if isinstance(first, asyncpg.Connection):
            await pool.release(first)
        if isinstance(second, asyncpg.pool.PoolConnectionProxy):
            await pool.release(second)
'''
    assert check_source(source) == []


def test_cli_a_directory_given_and_excluded_itself_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "migrations").mkdir()
    (tmp_path / "migrations" / "m0001.py").write_text("async def f(pool):\n    await pool.acquire()\n")
    assert main(["--exclude", "m*", "migrations"]) == 2
    assert "no problems (0 files scanned)" not in capsys.readouterr().out
    assert main(["--exclude", "*", "."]) == 2


def test_and_of_presence_tests_is_one_and_anything_else_is_not() -> None:
    """``acquired and con is not None`` (the flag set right after the
    acquire, and the not-None test) is true exactly when the connection is
    held: on every path. ``con is not None and ok`` is not: SP001; nor is
    ``isinstance(con, Other)``. The ``else:`` of ``con is None or not
    acquired`` releases exactly when held."""
    source = '''
async def flagged(pool):
    con = None
    acquired = False
    try:
        con = await pool.acquire()
        acquired = True
        await con.execute("SELECT 1")
    finally:
        if acquired and con is not None:
            await pool.release(con)


async def inverted(pool):
    con = None
    try:
        con = await pool.acquire()
        await con.execute("SELECT 1")
    finally:
        if con is None or not con:
            pass
        else:
            await pool.release(con)


async def conditional(pool, ok):
    con = None
    try:
        con = await pool.acquire()
        await con.execute("SELECT 1")
    finally:
        if con is not None and ok:
            await pool.release(con)


async def other_class(pool):
    con = None
    try:
        con = await pool.acquire()
        await con.execute("SELECT 1")
    finally:
        if isinstance(con, Widget):
            await pool.release(con)
'''
    assert [(f.line, f.code) for f in check_source(source)] == [(29, "SP001"), (39, "SP001")]


def test_a_release_only_in_an_except_handler_names_the_normal_path() -> None:
    source = '''
async def fetch(pool):
    con = await pool.acquire()
    try:
        await con.execute("SELECT 1")
    except Exception:
        await pool.release(con)
        raise
    return 1
'''
    [finding] = check_source(source)
    assert finding.code == "SP001"
    # The `except` handler is the one path that does release: the message
    # must not say an exception skips it.
    assert "exception or a cancellation" not in finding.message, finding.message
    assert "released only in an `except` handler (line 7): when nothing fails" in finding.message, finding.message
