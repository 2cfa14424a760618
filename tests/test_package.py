"""The release artifacts: `python -m build` makes an sdist and a wheel that
`twine check --strict` accepts, each carrying what it should, and the wheel
installed into a fresh virtualenv (dependencies from the package index) opens
a pool on the test server and answers `python -m safepool --version`.

The build runs on a copy of the source tree, so it leaves no egg-info or
build directory behind in the checkout.
"""

from __future__ import annotations

import email.parser
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import pytest

import safepool

ROOT = Path(__file__).resolve().parents[1]
# The sdist is built from a copy of the tree: leave out what is not source.
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "venv", "__pycache__", "*.pyc", "*.egg-info", "build", "dist", "site",
    ".mypy_cache", ".ruff_cache", ".pytest_cache", ".benchmarks", ".hypothesis",
    ".venvs",  # .ci/matrix.py's virtualenvs, one per Python and asyncpg version
)


def _run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    run = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert run.returncode == 0, f"{cmd}\n{run.stdout}\n{run.stderr}"
    return run


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sdist and wheel of this checkout, built the way a release is."""
    pytest.importorskip("build", reason="pip install -e '.[test]' installs build and twine")
    work = tmp_path_factory.mktemp("package")
    source = work / "src"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    out = work / "dist"
    # Build isolation installs the build backend (setuptools) from the package index.
    _run([sys.executable, "-m", "build", "--outdir", str(out), str(source)], timeout=600)
    return out


def _one(dist: Path, pattern: str) -> Path:
    [path] = dist.glob(pattern)
    return path


def _metadata(text: str) -> email.message.Message:
    return email.parser.HeaderParser().parsestr(text)


def test_twine_check_passes(dist: Path) -> None:
    pytest.importorskip("twine")
    artifacts = sorted(str(path) for path in dist.iterdir())
    assert len(artifacts) == 2, artifacts
    run = _run([sys.executable, "-m", "twine", "check", "--strict", *artifacts], timeout=120)
    assert run.stdout.count("PASSED") == 2, run.stdout


def test_wheel_contains_only_the_package(dist: Path) -> None:
    version = safepool.__version__
    wheel = _one(dist, f"safepool-{version}-py3-none-any.whl")
    names = zipfile.ZipFile(wheel).namelist()
    info = f"safepool-{version}.dist-info/"
    assert {name.split("/")[0] for name in names} == {"safepool", info.rstrip("/")}
    assert "safepool/py.typed" in names
    assert f"{info}licenses/LICENSE" in names
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]
    # Every module of the checkout's package is in the wheel, and nothing else.
    source = {str(p.relative_to(ROOT)) for p in (ROOT / "safepool").rglob("*") if p.suffix in (".py", ".typed")}
    assert {name for name in names if name.startswith("safepool/")} == source

    meta = _metadata(zipfile.ZipFile(wheel).read(f"{info}METADATA").decode())
    assert meta["Name"] == "safepool" and meta["Version"] == version
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta["Requires-Python"] == ">=3.11"
    classifiers = meta.get_all("Classifier") or []
    for classifier in (
        "Framework :: AsyncIO",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Typing :: Typed",
    ):
        assert classifier in classifiers
    assert any(url.startswith("Changelog, ") for url in meta.get_all("Project-URL") or [])
    assert any(dep.startswith("asyncpg") for dep in meta.get_all("Requires-Dist") or [])
    entry_points = zipfile.ZipFile(wheel).read(f"{info}entry_points.txt").decode()
    assert "[pytest11]" in entry_points and "safepool.testing" in entry_points


def test_sdist_carries_the_release_files(dist: Path) -> None:
    version = safepool.__version__
    sdist = _one(dist, f"safepool-{version}.tar.gz")
    top = f"safepool-{version}/"
    with tarfile.open(sdist) as archive:
        names = {name.removeprefix(top) for name in archive.getnames()}
        assert version in (archive.extractfile(f"{top}PKG-INFO") or pytest.fail("no PKG-INFO")).read().decode()
    for required in (
        "README.md", "LICENSE", "CHANGELOG.md", "pyproject.toml", "PKG-INFO",
        "safepool/__init__.py", "safepool/py.typed", "tests/conftest.py", "docs/index.md",
    ):
        assert required in names, required
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]
    assert not [name for name in names if name.startswith((".git/", ".venv/", "dist/", "build/"))]


def test_one_version_source() -> None:
    """pyproject reads the version from safepool/__init__.py; the changelog has its section."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and 'attr = "safepool.__version__"' in pyproject
    assert "\nversion = " not in pyproject.split("[project]")[1].split("\n[")[0]
    assert f"## [{safepool.__version__}] - " in (ROOT / "CHANGELOG.md").read_text()


def test_the_asyncpg_range_is_the_tested_one() -> None:
    """The dependency on asyncpg admits the releases the version matrix
    tests (.ci/matrix.py's ASYNCPG), and no later one: safepool reads
    asyncpg's private members (docs/compatibility.md)."""
    import ast
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    module = ast.parse((ROOT / ".ci" / "matrix.py").read_text())
    (versions,) = [
        ast.literal_eval(node.value) for node in module.body
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["ASYNCPG"]
    ]
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (asyncpg_requirement,) = [Requirement(d) for d in dependencies if Requirement(d).name == "asyncpg"]
    tested = sorted(Version(v) for v in versions)
    assert all(asyncpg_requirement.specifier.contains(v) for v in tested)
    below = Version(f"{tested[0].major}.{tested[0].minor - 1}.0")
    above = Version(f"{tested[-1].major}.{tested[-1].minor + 1}.0")
    assert not asyncpg_requirement.specifier.contains(below)
    assert not asyncpg_requirement.specifier.contains(above)
    shown = (ROOT / "docs" / "compatibility.md").read_text()
    assert f"| asyncpg | {', '.join(f'{v.major}.{v.minor}' for v in tested)} " in shown


def test_cli_help_and_version() -> None:
    run = _run([sys.executable, "-m", "safepool", "--version"], cwd=ROOT, timeout=60)
    assert run.stdout.strip() == f"safepool {safepool.__version__}"
    run = _run([sys.executable, "-m", "safepool", "--help"], cwd=ROOT, timeout=60)
    for command in ("replay", "top", "check"):
        assert f"    {command} " in run.stdout, run.stdout


SMOKE = textwrap.dedent(
    """
    import asyncio, os, sys

    import safepool

    async def main() -> None:
        pool = await safepool.create_pool(os.environ["SAFEPOOL_SMOKE_DSN"], min_size=1, max_size=2, name="smoke")
        try:
            async with pool.acquire() as con:
                assert await con.fetchval("SELECT 1") == 1
            stats = pool.stats()
            assert (stats.acquired, stats.released, stats.in_use) == (1, 1, 0), stats
        finally:
            await pool.close()
        print("smoke ok", safepool.__version__, safepool.__file__)

    asyncio.run(main())
    """
)


def test_wheel_installs_into_a_fresh_venv_and_serves(dist: Path, pg_dsn: str, tmp_path: Path) -> None:
    version = safepool.__version__
    wheel = _one(dist, f"safepool-{version}-py3-none-any.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], timeout=300)
    python = venv / "bin" / "python"
    # cwd is outside the checkout and PYTHONPATH is cleared, so only the installed wheel can be imported
    # (and pip, with the checkout on PYTHONPATH, would find its egg-info and skip the wheel as installed).
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # asyncpg comes from the package index, as for a user.
    _run([str(python), "-m", "pip", "install", "-q", str(wheel)], cwd=tmp_path, env=env, timeout=600)
    (tmp_path / "smoke.py").write_text(SMOKE)
    env["SAFEPOOL_SMOKE_DSN"] = pg_dsn
    run = _run([str(python), "smoke.py"], cwd=tmp_path, env=env, timeout=120)
    assert run.stdout.startswith(f"smoke ok {version} {venv}"), run.stdout
    run = _run([str(python), "-m", "safepool", "--version"], cwd=tmp_path, env=env, timeout=60)
    assert run.stdout.strip() == f"safepool {version}"


@pytest.mark.parametrize(
    "module, package, extra",
    [("safepool.metrics.prometheus", "prometheus_client", "prometheus"), ("safepool.metrics.otel", "opentelemetry", "otel")],
)
def test_an_exporter_without_its_extra_says_what_to_install(module: str, package: str, extra: str) -> None:
    hide = f"import sys; sys.modules[{package!r}] = None; import {module}"
    run = subprocess.run([sys.executable, "-c", hide], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("ModuleNotFoundError: ") and f"pip install 'safepool[{extra}]'" in last
