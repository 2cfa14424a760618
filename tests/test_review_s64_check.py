"""Review s64 of ``safepool/check.py``: the shapes s63's mutation review
left open, fixed."""

from __future__ import annotations

import textwrap

from safepool.check import check_source


def found(source: str) -> list[tuple[int, str]]:
    return [(f.line, f.code) for f in check_source(textwrap.dedent(source))]


def test_a_class_attribute_does_not_hide_a_module_level_acquire_alias_from_its_methods() -> None:
    # Inside a method, `acq` is the module's (a class body's names are not
    # in scope there): the lease is never released.
    source = """
    acq = pool.acquire


    class Repo:
        acq = None

        async def f(self):
            con = await acq()
            await con.execute("SELECT 1")
    """
    assert found(source) == [(9, "SP002")]


def test_a_class_body_alias_is_the_class_bodys_own() -> None:
    # In the class body itself the class's name is the one used.
    source = """
    acq = pool.acquire


    class Repo:
        acq = other.make
        con = acq()
    """
    assert found(source) == []


def test_a_method_parameter_still_shadows_the_module_level_alias() -> None:
    source = """
    acq = pool.acquire


    class Repo:
        async def f(self, acq):
            con = await acq()
            await con.execute("SELECT 1")
    """
    assert found(source) == []


def messages(source: str) -> list[tuple[int, str]]:
    return [(f.line, f.message) for f in check_source(textwrap.dedent(source))]


def test_an_acquire_and_its_release_on_one_line_are_described_in_their_order() -> None:
    source = """
    async def f(pool):
        con = await pool.acquire(); await pool.release(con)
    """
    assert messages(source) == [(3, (
        "connection `con` acquired here is not released on every path: an exception or a cancellation between "
        "the acquire and the release (both on line 3) skips the release"
    ))]


def test_a_release_before_the_acquire_on_one_line_still_comes_before_it() -> None:
    source = """
    async def f(pool, con):
        await pool.release(con); con = await pool.acquire()
    """
    assert messages(source) == [(3, (
        "connection `con` acquired here is not released on every path: the release of `con` at line 3 comes "
        "before this acquire, and none after it"
    ))]


def test_a_connection_stored_on_an_object_and_released_on_the_same_line_is_judged_as_on_two_lines() -> None:
    # It was not reported at all: the release did not count as after the acquire.
    one_line = """
    async def f(self, pool):
        self.con = await pool.acquire(); await pool.release(self.con)
    """
    two_lines = """
    async def f(self, pool):
        self.con = await pool.acquire()
        await pool.release(self.con)
    """
    assert found(one_line) == found(two_lines) == [(3, "SP001")]
