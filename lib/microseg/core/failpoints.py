"""Kill points for recovery tests.

A job calls `durable(what)` right after each step whose effect outlives the process: a Delta
commit, a saved model, a write to the online store, a deleted checkpoint. Each such step is
a kill point, named two ways: `step.N` (the N-th durable step of the process, from 1) and
`after.WHAT`. A few places name extra points with `failpoint(name)`.

- In a process: `MICROSEG_FAILPOINTS=step.3` (or `after.silver/sessions`, or a named point;
  comma-separated) makes the process die there at once, as a kill -9 would: no cleanup, no
  ops/runs row, exit code 137.
- In a test's own process: `with crash_at(step=3):` raises `Crash` there instead; Crash is
  not an Exception, so no job handler catches it, and ops/runs does not record the run (a
  killed job writes no row either). `with crash_at() as steps:` only lists the durable
  steps of an uninterrupted run, which is how a test enumerates every kill point of a job.

Unarmed, each call is a set lookup.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

ENV_VAR = "MICROSEG_FAILPOINTS"
EXIT_CODE = 137  # what a shell reports for a process killed by SIGKILL


class Crash(BaseException):
    """An in-process kill point was hit (tests only)."""


@dataclass
class _Armed:
    step: int | None = None
    names: frozenset[str] = frozenset()
    steps: list[str] = field(default_factory=list)  # durable steps seen, in order


_process_steps = 0
_armed: _Armed | None = None


def failpoint(name: str) -> None:
    armed = os.environ.get(ENV_VAR, "")
    if armed and name in {part.strip() for part in armed.split(",")}:
        sys.stderr.write(f"microseg: failpoint {name} hit, exiting without cleanup\n")
        sys.stderr.flush()
        os._exit(EXIT_CODE)
    if _armed is not None and name in _armed.names:
        raise Crash(name)


def durable(what: str) -> None:
    """Mark a durable step just done (`what`: the table or thing written)."""
    global _process_steps
    _process_steps += 1
    failpoint(f"step.{_process_steps}")
    failpoint(f"after.{what}")
    if _armed is not None:
        _armed.steps.append(what)
        if _armed.step == len(_armed.steps):
            raise Crash(f"step {_armed.step} (after {what})")


@contextmanager
def crash_at(step: int | None = None, names: tuple[str, ...] = ()) -> Iterator[list[str]]:
    """Raise Crash at the step-th durable step inside the block (counted from the block's
    start) or at a named failpoint; yields the list of durable steps seen so far."""
    global _armed
    previous, _armed = _armed, _Armed(step=step, names=frozenset(names))
    try:
        yield _armed.steps
    finally:
        _armed = previous
