"""A virtual clock with ordered timers, for tests that race work against deadlines without real time passing.

``FakeClock.sleep`` moves time forward as soon as anyone sleeps, so two concurrent sleeps (a 12 s provider
latency and a 6 s deadline) both "happen" and time ends 18 s on. :class:`VirtualClock` keeps the sleepers in a
timer queue instead and moves time only when nothing else can run, to the earliest timer: the 6 s deadline
fires while the 12 s call is still sleeping, exactly as on a wall clock, in no wall time.

"Nothing else can run" is read from the event loop's ready queue (CPython's ``loop._ready``), from the
loop's default executor (work handed to threads with ``asyncio.to_thread``, e.g. the host's file I/O, is
waited for in real time before time moves) and from the engine's store threads (``AsyncStore.pending``):
this is test support for worlds that live in one process (the
in-process host model, SQLite), not production code.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

from sandkeep.store.aio import AsyncStore


class CountingExecutor(ThreadPoolExecutor):
    """The loop's default executor, counting the jobs in flight (virtual time waits for them)."""

    def __init__(self) -> None:
        super().__init__(max_workers=4, thread_name_prefix="vclock")
        self.busy = 0
        self.last_done = 0.0
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        with self._lock:
            self.busy += 1
        future = super().submit(fn, *args, **kwargs)
        future.add_done_callback(self._done)
        return future

    def _done(self, _future: Future[Any]) -> None:
        with self._lock:
            self.busy -= 1
            self.last_done = time.monotonic()

    def working(self) -> bool:
        """A job is in flight, or finished so recently that its answer may not have reached the loop yet."""
        return self.busy > 0 or time.monotonic() - self.last_done < 0.005


class VirtualClock:
    ordered_timers = True  # sleepers wake in time order: provider/deadline.py may race a call against a sleep

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 1, 1, tzinfo=UTC)
        self._mono = 1000.0
        self._timers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._driver: asyncio.Task[None] | None = None

    def now(self) -> datetime:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> datetime:
        """Move time forward by hand (timers that fall due are woken by the driver)."""
        self._set(self._mono + max(0.0, seconds))
        return self._now

    def _set(self, mono: float) -> None:
        if mono > self._mono:
            self._now += timedelta(seconds=mono - self._mono)
            self._mono = mono

    async def sleep(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        heapq.heappush(self._timers, (self._mono + max(0.0, seconds), next(self._seq), fut))
        if self._driver is None or self._driver.done():
            self._driver = loop.create_task(self._drive())
        try:
            await fut
        finally:
            if not fut.done():
                fut.cancel()

    async def _drive(self) -> None:
        loop = asyncio.get_running_loop()
        executor = getattr(loop, "_default_executor", None)
        if not isinstance(executor, CountingExecutor):
            executor = CountingExecutor()
            loop.set_default_executor(executor)
        while self._timers:
            quiet = 0
            while quiet < 3:  # everything runnable runs first (a few quiet turns in a row), threads included
                if executor.working() or AsyncStore.pending:
                    await asyncio.sleep(0.001)  # real time: a thread (the loop's or the engine's store thread) works
                    quiet = 0
                    continue
                await asyncio.sleep(0)
                quiet = quiet + 1 if not loop._ready else 0  # type: ignore[attr-defined]
            while self._timers and self._timers[0][2].done():  # cancelled sleepers
                heapq.heappop(self._timers)
            if not self._timers:
                return
            when, _, fut = heapq.heappop(self._timers)
            self._set(when)
            fut.set_result(None)
