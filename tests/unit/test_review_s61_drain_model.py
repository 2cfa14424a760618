"""Review s61, the drain audit (helper-187): the runner's timer modelled
beside the state core. Random walks of the model-based machines
(``tests/unit/test_state_machine.py``: ``PoolMachine`` and
``CappedPoolMachine``, which drive ``PoolState`` as the I/O layer does)
keep, beside the core, the one loop timer ``Runner`` arms: after each step
it is re-armed (``Runner.arm_timer``'s rule: only for an earlier
deadline) exactly where the I/O layer drains or arms, and left alone where
it does not:

- an acquire: after ``try_acquire`` only for actions; after ``enqueue``
  for actions, the waiter's deadline, connect failures or
  ``connects_to_watch`` (``Leaser.acquire``); a claim only for actions
  (a lost grant's task queues again: drained as an ``enqueue``);
- a release: an inline reset's ``state.release`` only for actions; a clean
  or discarded one, and every ``reset_done``, through
  ``Runner.after_hand_on`` (its one-``Wake`` path skips the drain unless
  ``connects_to_watch``; with no action only the idle lifetime is armed);
- ``arm_lease`` arms; ``connect_answered`` and the min_size upkeep's
  ``plan_floor_connect`` (``Runner.restore_floor``) arm nothing;
- everything else (connect, close and cancel outcomes, a lost connection,
  resize, expiry, close, a reclaimed lease, the timer firing) drains.

After every step ``next_deadline()`` must not come before the armed timer:
else a deadline (a waiter's, a lease's, an idle lifetime, a probe, a
connect presumed lost) has no timer and passes unnoticed until some other
event drains. (The capped machine completes resets, closes and answered
connects inside its steps: each of those drains in the runner, so such a
step counts as drained.)

What the audit found: one gap, reproduced below and on a real server
(fixed: the policy's release sets ``connects_to_watch`` while connects
run, and the release drains for it): a release whose reset runs drained
only for actions, and with site caps it can make a capped site's task
eligible, turning a connect nobody waits on into an orphan whose lost
deadline then had no timer. The walks also find the session's three
bugs when their fixes are undone in the core (``connects_to_watch`` set
by neither ``enqueue`` nor ``_grant``), and the idle lifetime's when the
model's ``after_hand_on`` forgets it. The upkeep's connect goes to a
waiting task in ``plan_floor_connect`` only while connects are paced,
with the backoff's timer already armed (the real-server tests of both
shapes: tests/faults/test_review_s61_drain_audit.py).

Mutations killed (each applied by hand and the test seen to fail):
``PoolState.enqueue`` without ``self.connects_to_watch = True`` (the plain
machine), ``PoolState._grant`` without it (the capped machine).
"""

from __future__ import annotations

import random
from typing import Any

import hypothesis.stateful as hs
import pytest

from safepool._state import ReleaseOutcome, Wake
from tests.unit import test_state_machine as m


class TimerModel:
    """Mixed into a machine: ``timer_at``, the runner's armed timer."""

    timer_at: float | None = None
    last_actions: list[Any]
    watched = False  # connects_to_watch when the step's actions were taken
    inner = False  # the capped machine completed a reset, close or connect

    state: Any
    held: list[Any]
    waiters: list[Any]
    now: float

    def arm(self) -> None:
        """``Runner.arm_timer``."""
        when = self.state.next_deadline()
        if when == self.timer_at or (when is not None and self.timer_at is not None and self.timer_at <= when):
            return
        self.timer_at = when

    def drained(self) -> None:
        self.state.connects_to_watch = False
        self.arm()

    def after_hand_on(self) -> None:
        """``Runner.after_hand_on``."""
        state = self.state
        actions = self.last_actions
        if actions:
            if len(actions) == 1 and type(actions[0]) is Wake and not self.watched:
                return
            self.drained()
        elif state.connects_to_watch:
            self.drained()
        elif state.max_inactive_lifetime and state.size > state.min_size:
            expiry = state.idle_expiry()
            if self.timer_at is None or (expiry is not None and expiry < self.timer_at):
                self.arm()

    def _drain(self) -> None:
        state = self.state
        self.last_actions = list(state.actions)
        self.watched = state.connects_to_watch
        c = state.counters
        before = (c.resets, c.resets_failed, c.connections_closed, c.connections_opened)
        super()._drain()  # type: ignore[misc]
        if isinstance(self, m.CappedPoolMachine) and before != (
            c.resets, c.resets_failed, c.connections_closed, c.connections_opened
        ):
            self.inner = True

    def after(self, name: str, held: int, queued: int, kw: dict[str, Any]) -> None:
        state = self.state
        actions = self.last_actions
        if self.inner:
            self.inner = False
            self.drained()
        if name == "acquire":
            if len(self.held) > held:
                if actions:
                    self.drained()
            elif len(self.waiters) > queued:
                if actions or self.waiters[-1].deadline is not None or state.connect_failures or self.watched:
                    self.drained()
            elif actions:
                self.drained()
        elif name == "claim":
            if actions or len(self.held) == held:
                self.drained()
        elif name == "release":
            if kw["outcome"] is ReleaseOutcome.NEEDS_RESET:
                if actions or self.watched:
                    self.drained()
            else:
                self.after_hand_on()
        elif name == "finish_reset":
            self.after_hand_on()
        elif name == "arm_lease":
            self.arm()
        elif name not in ("answer_connect", "floor_upkeep", "toggle_black_hole"):
            self.drained()
        when = state.next_deadline()
        assert when is None or (self.timer_at is not None and self.timer_at <= when), (
            f"after {name}({kw}): a deadline at {when} and the timer at {self.timer_at} (now {self.now})"
        )


def rules_of(base: type) -> list[tuple[str, Any]]:
    return [(name, rule) for name in dir(base) if (rule := getattr(getattr(base, name), hs.RULE_MARKER, None))]


def timed(base: type) -> type:
    """``base`` with the timer model: each rule then checks the timer."""
    namespace: dict[str, Any] = {}
    for name, rule in rules_of(base):

        def step(self: Any, _fn: Any = rule.function, _name: str = name, **kw: Any) -> None:
            if _name in ("advance", "fire_next_deadline"):
                self.timer_at = None  # (the timer fires: on_timer re-arms it after its drain)
            self.last_actions = []
            self.watched = False
            held, queued = len(self.held), len(self.waiters)
            _fn(self, **kw)
            self.after(_name, held, queued, kw)

        step.__name__ = name
        setattr(step, hs.RULE_MARKER, hs.Rule(
            targets=rule.targets, function=step, arguments=rule.arguments, preconditions=rule.preconditions,
        ))
        namespace[name] = step
    return type("Timed" + base.__name__, (TimerModel, base), namespace)


def draw(name: str, rule: Any, rnd: random.Random, capped: bool) -> dict[str, Any]:
    """A rule's arguments, from the values its strategies draw from."""
    choices: dict[str, list[Any]] = {
        "timeout": ([None, 1.0] if name == "acquire_hog" else [0.05, 0.2, 1.0]) if capped else [None, 0.0, 0.5, 1.0, 4.0],
        "site": m.CAPPED_SITES[1:] if capped else ["a", "b", "c"],
        "outcome": list(ReleaseOutcome),
        "ok": [True, True, False, None, "program"] if name == "finish_connect" else [True, False],
        "dt": [0.05, 0.1, 0.3, 1.0] if capped else [0.0, 0.05, 0.3, 1.0, 2.5, 7.0],
        "lease_timeout": [None, 0.1, 1.0, 3.0],
        "warn_after": [None, 0.5, 2.0],
        "max_size": [1, 2, 3, 4, 5],
        "min_size": [None, 0, 1, 2, 3, 4, 5],
        "keep": [True, True, True, False],
        "late": [True, True, False],
        "wait": [0.0, 0.1],
    }
    return {k: rnd.randint(0, 1000) if k == "i" else rnd.choice(choices[k]) for k in rule.arguments}


# Uniform choices resize and expire a pool more than they lease from it:
# the leases' steps are drawn more often.
WEIGHTS = {
    "resize": 0.2, "expire_connections": 0.2, "cancel": 0.5, "claim": 4.0, "release": 3.0, "finish_reset": 3.0,
    "arm_lease": 2.0,
}


def walk(base: type, seed: int, steps: int) -> None:
    rnd = random.Random(seed)
    capped = issubclass(base, m.CappedPoolMachine)
    machine: Any = timed(base)()
    if capped:
        machine.setup(
            max_size=rnd.randint(4, 5), init_size=rnd.randint(1, 5),
            adaptive=rnd.choice([None, None, (0.05, 0.3)]), wait_on_error=rnd.random() < 0.5, start=1000.1,
        )
    else:
        machine.setup(
            max_size=rnd.randint(1, 4), min_size=rnd.randint(0, 4), init_size=rnd.randint(0, 4),
            max_waiters=rnd.choice([None, 0, 1, 3, 5]), max_connecting=rnd.choice([None, 1, 2, 3]),
            lifetime=rnd.choice([0.0, 2.0]), breaker=rnd.randint(1, 3), jitter=rnd.choice([0.0, 0.5, 1.0]),
            share=rnd.choice([None, None, 0.25, 0.5, 1.0]), adaptive=rnd.choice([None, None, (0.05, 0.3)]),
            wait_on_error=rnd.random() < 0.5, start=1000.1,
        )
    # (Closing ends a walk's interest: only in its last steps.)
    rules = [(n, r) for n, r in rules_of(type(machine)) if n != "begin_close"]
    closing = rules_of(type(machine))
    for done in range(steps):
        pick = closing if done >= steps - 5 else rules
        enabled = [(n, r) for n, r in pick if all(p(machine) for p in r.preconditions)]
        [(name, rule)] = rnd.choices(enabled, [WEIGHTS.get(n, 1.0) for n, _ in enabled])
        getattr(machine, name)(**draw(name, rule, rnd, capped))


@pytest.mark.parametrize(
    ("base", "walks"), [(m.PoolMachine, 400), (m.CappedPoolMachine, 300)], ids=["plain", "capped"]
)
def test_no_deadline_is_left_without_the_timer(base: type, walks: int) -> None:
    """Seeded walks of 120 steps: after each, the armed timer comes at or
    before ``next_deadline()`` (see the module note)."""
    for seed in range(walks):
        walk(base, seed, 120)


def test_a_release_that_makes_a_capped_task_eligible_arms_the_orphans_lost_deadline() -> None:
    """The walk (seed 10071) that found the gap, with it no longer let
    through: a plain machine with site caps releases a lease whose reset
    runs (``NEEDS_RESET``, no action), its site's waiting task becomes
    eligible, and a connect under way for a task that gave up is an orphan
    now, presumed lost at its start plus the hedge delay
    (``_lost_orphan_at``): no timer is armed for it. The real-server
    reproduction: tests/faults/test_review_s61_drain_audit.py. Fixed: the
    policy's release sets ``connects_to_watch`` while connects run, and the
    release drains for it. (The walk's draws have moved since: it keeps
    its seed as one more walk.)"""
    walk(m.PoolMachine, 10071, 150)
