"""The store off the event loop: every call runs on one dedicated store thread, and the ends of reconcile
passes are coalesced into one transaction.

``AsyncStore(store)`` keeps the synchronous :class:`~sandkeep.store.base.Store` protocol untouched (the store
stays usable directly, e.g. by the CLI and the API) and adds:

* ``await astore.call(fn, *args)`` -- run ``fn`` (a bound store method) on the store thread;
* ``await astore.finish(record, owner, changes)`` -- a pass's last write (``Store.finish``: fenced update +
  lease release); finishes requested while the previous batch was being written are written together by one
  ``Store.finish_many`` (one commit for many passes), each still fenced on its own;
* ``await astore.release(record, owner)`` -- likewise batched through ``Store.release_many``.

One thread is enough for SQLite (one writer at a time anyway). On PostgreSQL the default is two
(:data:`POSTGRES_THREADS`): a claim then runs while the previous batch of finishes commits, instead of
waiting for it (each is a round trip and a commit). Calls of one pass are awaited one after the other, so
they never overtake each other; the batching is what makes one commit serve many passes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, TypeVar

from sandkeep.store.base import Store, StoreError
from sandkeep.store.records import InstanceRecord

T = TypeVar("T")

MAX_BATCH = 500
"""Largest number of finishes / releases written in one transaction."""

POSTGRES_THREADS = 2
"""Store threads on PostgreSQL (each with its own connection from the pool); SQLite gets one."""


def default_threads(store: Store) -> int:
    """Two store threads for a PostgreSQL store, one otherwise (SQLite has one writer at a time)."""
    return POSTGRES_THREADS if getattr(store, "dialect", None) == "postgresql" else 1


class AsyncStore:
    #: store-thread calls in flight in this process, over every AsyncStore (read by the tests' virtual clock,
    #: which moves time only once the work handed to threads is done); touched on event-loop threads only
    pending: ClassVar[int] = 0

    def __init__(self, store: Store, *, threads: int | None = None) -> None:
        self.store = store
        self._threads = max(1, default_threads(store) if threads is None else threads)
        self._pool: ThreadPoolExecutor | None = None  # started on first use, again after aclose()
        self._finishes: list[tuple[InstanceRecord, str, dict[str, Any], asyncio.Future[InstanceRecord]]] = []
        self._releases: list[tuple[InstanceRecord, str, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self.batches = 0

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self._threads, thread_name_prefix="sandkeep-store")
        AsyncStore.pending += 1
        try:
            return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))
        finally:
            AsyncStore.pending -= 1

    async def finish(self, record: InstanceRecord, owner: str, changes: dict[str, Any]) -> InstanceRecord:
        fut: asyncio.Future[InstanceRecord] = asyncio.get_running_loop().create_future()
        self._finishes.append((record, owner, changes, fut))
        self._schedule()
        return await fut

    async def release(self, record: InstanceRecord, owner: str) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._releases.append((record, owner, fut))
        self._schedule()
        await fut

    def _schedule(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush(), name="sandkeep-store-flush")

    async def _flush(self) -> None:
        while self._finishes or self._releases:
            finishes, self._finishes = self._finishes[:MAX_BATCH], self._finishes[MAX_BATCH:]
            releases, self._releases = self._releases[:MAX_BATCH], self._releases[MAX_BATCH:]
            if finishes:
                await self._write_finishes(finishes)
            if releases:
                await self._write_releases(releases)

    async def _write_finishes(self, batch: list[tuple[InstanceRecord, str, dict[str, Any],
                                                      asyncio.Future[InstanceRecord]]]) -> None:
        self.batches += 1
        try:
            results = await self.call(self.store.finish_many, [(r, o, c) for r, o, c, _ in batch])
        except BaseException as exc:  # the whole batch failed (database down, a bad value): tell each pass
            for *_, fut in batch:
                if not fut.done():
                    fut.set_exception(exc if isinstance(exc, Exception) else StoreError(str(exc)))
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for (*_, fut), result in zip(batch, results, strict=True):
            if fut.done():
                continue
            if isinstance(result, StoreError):
                fut.set_exception(result)
            else:
                fut.set_result(result)

    async def _write_releases(self, batch: list[tuple[InstanceRecord, str, asyncio.Future[None]]]) -> None:
        self.batches += 1
        try:
            await self.call(self.store.release_many, [(r, o) for r, o, _ in batch])
        except BaseException as exc:
            for *_, fut in batch:
                if not fut.done():
                    fut.set_exception(exc if isinstance(exc, Exception) else StoreError(str(exc)))
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for *_, fut in batch:
            if not fut.done():
                fut.set_result(None)

    async def aclose(self) -> None:
        if self._flusher is not None:
            with contextlib.suppress(BaseException):
                await self._flusher
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=False)
