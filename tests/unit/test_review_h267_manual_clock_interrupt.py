"""Review h267: ``ManualClock.advance()`` where one callback raises an error
and a later one raises ``KeyboardInterrupt`` (or ``SystemExit``).

Since 6b0a5ed, advance() collects a callback's error and goes on, "as the
event loop goes on past a callback that raised", and raises it at the end
("where the loop would log it, the test sees it"); ``KeyboardInterrupt``
and ``SystemExit`` propagate at once. The loop would have logged the first
error (its exception handler) before the interrupt stopped it. advance()
re-raises the interrupt (safepool/_clock.py:169-170) with the errors it
collected so far in ``errors`` only: they are dropped, neither chained to
the interrupt (``__context__`` is None: each was caught in an earlier
iteration's ``except``) nor reported anywhere. A leak report's
ResourceWarning turned into an error by a test, or a pool callback's bug,
vanishes whenever a later due callback interrupts.
"""

from __future__ import annotations

import pytest

from safepool._clock import ManualClock


def _chain(error: BaseException | None) -> list[BaseException]:
    found: list[BaseException] = []
    while error is not None and error not in found:
        found.append(error)
        error = error.__cause__ or error.__context__
    return found


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit])
def test_an_error_collected_before_an_interrupt_is_not_lost(stop: type[BaseException]) -> None:
    clock = ManualClock()

    def fail() -> None:
        raise ValueError("the first callback's bug")

    def interrupt() -> None:
        raise stop()

    clock.call_at(1001.0, fail)
    clock.call_at(1002.0, interrupt)
    with pytest.raises(stop) as raised:
        clock.advance(5.0)
    assert any(isinstance(e, ValueError) for e in _chain(raised.value)), _chain(raised.value)


def test_control_the_error_alone_is_raised() -> None:
    clock = ManualClock()

    def fail() -> None:
        raise ValueError("the first callback's bug")

    clock.call_at(1001.0, fail)
    with pytest.raises(ValueError, match="first callback"):
        clock.advance(5.0)
