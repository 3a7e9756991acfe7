"""A virtual-time asyncio event loop and the :class:`~sandkeep.clock.Clock` that reads it.

:class:`VirtualLoop` is a selector event loop whose ``time()`` is virtual: when every task is blocked (nothing
ready to run), the loop does not wait for the next timer -- it moves virtual time straight to it. So
``asyncio.sleep``, ``asyncio.wait_for``, ``asyncio.timeout`` and :meth:`SimClock.sleep` all run on simulated
time, sleepers wake in order of their deadline (ties in the order the loop's timer heap gives, which depends
only on the order of the calls, so a run is reproducible), and time never moves while any task can run.
Work handed to the default executor (``asyncio.to_thread``: the host model's volume copies) runs inline, so no
real thread ever decides an order. A loop with nothing ready and no timer is a deadlock: :class:`Deadlock`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import selectors
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

T = TypeVar("T")

#: Virtual wall-clock origin of every simulation (the clock can be jumped from there).
EPOCH = datetime(2026, 3, 1, tzinfo=UTC)


class Deadlock(RuntimeError):
    """Every task waits and no timer is set: the simulated world can never move again."""


class _VirtualSelector(selectors.BaseSelector):
    """Polls the real selector without blocking (the loop's self-pipe); a wait moves virtual time instead."""

    def __init__(self) -> None:
        self._real = selectors.DefaultSelector()
        self.now = 0.0

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._real.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.modify(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:  # the self-pipe is the only descriptor (no thread writes to it: executors run
            ready = self._real.select(0)  # inline); a wait with nothing pending is looked at once
            if ready:
                return ready
            raise Deadlock("every task is waiting and no timer is set")
        if timeout > 0:
            self.now += timeout
        return []

    def close(self) -> None:
        self._real.close()

    def get_map(self) -> Any:
        return self._real.get_map()


class _InlineExecutor(concurrent.futures.ThreadPoolExecutor):
    """Runs submitted work at once, in the loop's thread (deterministic ``asyncio.to_thread``)."""

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # handed to the awaiting task, as a thread pool would
            fut.set_exception(exc)
        return fut


class VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self._vsel = _VirtualSelector()
        super().__init__(self._vsel)
        self.set_default_executor(_InlineExecutor(max_workers=1))

    def time(self) -> float:
        return self._vsel.now

    def run_in_executor(self, executor: Any, func: Callable[..., T], *args: Any) -> asyncio.Future[T]:  # type: ignore[override]
        """Every executor runs inline here, the store's own thread (``store.aio.AsyncStore``) included. The
        answer is handed over on the next turn of the loop, as a thread pool's would be (the caller yields
        once), without the self-pipe write and read a thread's answer takes."""
        fut: asyncio.Future[T] = self.create_future()
        try:
            value = func(*args)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:  # handed to the awaiting task, as a thread pool would
            self.call_soon(_settle, fut, None, exc)
        else:
            self.call_soon(_settle, fut, value, None)
        return fut


def _settle(fut: asyncio.Future[Any], value: Any, exc: BaseException | None) -> None:
    if fut.cancelled():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(value)


class SimClock:
    """:class:`sandkeep.clock.Clock` on a :class:`VirtualLoop`: ``monotonic`` is the loop's virtual time and
    ``now`` the epoch plus that time plus any wall-clock jumps (:meth:`jump`, an NTP step: monotonic time and
    every sleeper are unaffected)."""

    ordered_timers = True
    """Sleepers wake in virtual-time order: :func:`sandkeep.provider.deadline.bounded` races a provider call
    against a sleep on this clock, so a call under a lease or a recovery's deadline is abandoned there, as
    ``asyncio.wait_for`` abandons it on the system clock. (Without it the simulation let such calls run to
    their end -- seed 1420: a 90 s volume read outlived its 10 s lease and the recovery overran its timeout.)"""

    def __init__(self, loop: asyncio.AbstractEventLoop, start: datetime = EPOCH) -> None:
        self._loop = loop
        self._start = start
        self.jumped = 0.0

    def now(self) -> datetime:
        return self._start + timedelta(seconds=self._loop.time() + self.jumped)

    def monotonic(self) -> float:
        return self._loop.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    def jump(self, seconds: float) -> None:
        """Step the wall clock by ``seconds`` (negative: back, as an NTP step back does)."""
        self.jumped += seconds


def run_virtual(main: Callable[[VirtualLoop], Coroutine[Any, Any, T]]) -> T:
    """Run ``main(loop)`` to completion on a fresh :class:`VirtualLoop`, then close the loop."""
    loop = VirtualLoop()
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(main(loop))
    finally:
        try:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        finally:
            asyncio.set_event_loop(None)
            loop.close()
