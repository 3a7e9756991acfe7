"""Test-only crash points: ``SANDKEEP_TEST_CRASH_AT=<point>`` makes the process SIGKILL itself at that point.

The real-process crash test (``tests/e2e/test_crash_recovery.py``) uses it to kill ``sandkeep serve`` at exact
steps of a recovery -- before the fork, after it, after the machine create, during the wait, during cutover
-- and then checks that a restarted serve converges (SPEC §12.6). The variable is read once at import; unset
(always, outside that test) every :func:`reached` is one comparison with None. It is not a setting on purpose:
nothing but that test may ever set it.
"""

from __future__ import annotations

import os
import signal

ENV = "SANDKEEP_TEST_CRASH_AT"
POINTS = ("recovery.before_fork", "recovery.after_fork", "recovery.after_create", "recovery.wait",
          "recovery.cutover")

_AT: str | None = os.environ.get(ENV) or None


def reached(point: str) -> None:
    """Die here, like ``kill -9``, when the test asked for this point."""
    if _AT is not None and _AT == point:
        os.kill(os.getpid(), signal.SIGKILL)
