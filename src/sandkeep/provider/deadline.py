"""Deadlines for provider calls: every call made on behalf of a deadline is bounded by the time left.

A caller with a deadline (a recovery that must end within ``recovery_timeout``, SPEC §12.5) runs its provider
calls inside :func:`deadline`; the client then caps each request's timeout, each retry's backoff (a 429's
``Retry-After`` included) and the whole call -- retries and the lookups that resolve an ambiguous create --
by what is left (:func:`bounded`). A call that cannot finish in time is abandoned with
:class:`~sandkeep.provider.errors.DeadlineExceededError` (a transient error: nothing is known to have failed),
and the caller decides, as it would at its deadline anyway.

The deadline lives in a context variable, with the clock it is measured on (the caller's injected clock: the
engine's, which may differ from the client's in tests), so it follows the task that set it (and tasks it
starts) and nothing else, and a virtual clock bounds calls in virtual time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Iterator
from contextvars import ContextVar
from typing import TypeVar

from sandkeep.clock import Clock, SystemClock
from sandkeep.provider.errors import DeadlineExceededError

T = TypeVar("T")

_DEADLINE: ContextVar[tuple[Clock, float] | None] = ContextVar("sandkeep_provider_deadline", default=None)


@contextlib.contextmanager
def deadline(clock: Clock, at_monotonic: float | None) -> Iterator[None]:
    """Bound the provider calls made inside the block by ``at_monotonic`` on ``clock``'s ``monotonic()`` scale;
    None leaves them unbounded (an outer deadline still applies). Nested deadlines keep the one with less left."""
    outer = _DEADLINE.get()
    effective = outer
    if at_monotonic is not None:
        mine = (clock, at_monotonic)
        left = remaining()
        if left is None or at_monotonic - clock.monotonic() < left:
            effective = mine
    token = _DEADLINE.set(effective)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def remaining() -> float | None:
    """Seconds left before the current deadline (never negative), or None without one."""
    current = _DEADLINE.get()
    if current is None:
        return None
    clock, at = current
    return max(0.0, at - clock.monotonic())


async def bounded(call: Awaitable[T], *, operation: str = "") -> T:
    """Await ``call``, abandoning it (cancelled) when the current deadline passes first."""
    current = _DEADLINE.get()
    left = remaining()
    if current is None or left is None:
        return await call
    clock = current[0]
    if left <= 0:
        if asyncio.iscoroutine(call):
            call.close()
        raise DeadlineExceededError("the deadline passed before the call was made", operation=operation)
    if isinstance(clock, SystemClock):
        try:
            return await asyncio.wait_for(call, timeout=left)
        except TimeoutError as exc:
            raise DeadlineExceededError(f"abandoned after {left:.1f} s: the deadline passed",
                                        operation=operation) from exc
    if not getattr(clock, "ordered_timers", False):
        # a clock whose sleep just jumps ahead (FakeClock) cannot time a race: only the per-request timeouts and
        # the retry loop's sleeps are capped then (the client reads remaining())
        return await call
    # a virtual clock whose sleepers wake in time order: race the call against a sleep on it
    work = asyncio.ensure_future(call)
    timer = asyncio.ensure_future(clock.sleep(left))
    try:
        await asyncio.wait({work, timer}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        timer.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await work
    if work.cancelled():
        raise DeadlineExceededError(f"abandoned after {left:.1f} s: the deadline passed", operation=operation)
    return work.result()
