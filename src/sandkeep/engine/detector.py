"""Fast detection (SPEC §6): wake an instance as soon as the provider signals that its machine stopped.

* Local host: follow ``GET /_local/watch`` (long-poll of every machine state change) and wake the instance
  that owns the machine -- also on a ``host_status`` event (its host died or came back, SPEC §15), for the
  instance's machine or its fenced old one.
* Elsewhere (Fly): every ``detect_poll_interval`` seconds, one ``list_machines`` per app that has running
  instances; a machine that is stopped/failed/gone while its instance is ``running`` wakes it.

The periodic alarm stays the backstop; a wake-up is just ``reconcile_now``. The detector's own cadence
(long-poll, poll interval, error backoff, index refresh) runs on the event loop and the injected clock.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable

from sandkeep.clock import Clock, SystemClock
from sandkeep.config import Settings
from sandkeep.logs import get_logger
from sandkeep.provider.base import MachineProvider
from sandkeep.provider.errors import AuthError, InvalidRequestError, NotFoundError, ProviderError
from sandkeep.store.base import Store
from sandkeep.store.records import InstanceRecord, Status

WAKE_STATES = frozenset({"stopped", "failed", "destroyed", "destroying"})
HOST_STATUS_EVENT = "host_status"
"""The local host's watch event for a machine whose host died or came back (its ``state`` does not change)."""
WATCH_TIMEOUT = 25.0
ERROR_PAUSE = 1.0
WATCH_GIVE_UP = 5
SWEEP_STATUSES = (Status.RUNNING, Status.RECOVERING)
"""What a sweep looks at: an instance whose machine stopped while nobody watched (running: a new recovery;
recovering: its replacement stopped, e.g. with the host that was restarted together with the controller)."""


def _all_instances(store: Store, statuses: list[str] | None = None) -> list[InstanceRecord]:
    out: list[InstanceRecord] = []
    cursor: str | None = None
    while True:
        page = store.list_instances(status=statuses, cursor=cursor, limit=500)
        out.extend(page.items)
        if not page.next_cursor:
            return out
        cursor = page.next_cursor


class Detector:
    def __init__(self, settings: Settings, store: Store, provider: MachineProvider,
                 wake: Callable[[str], None], clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self.store = store
        self.provider = provider
        self.wake = wake
        self.log = get_logger("sandkeep.detector")
        self._index: dict[str, str] = {}
        self._index_at: float | None = None
        self._sweep_task: asyncio.Task[int] | None = None
        self.woken = 0

    @property
    def uses_watch(self) -> bool:
        return self.provider.supports_watch

    async def run(self) -> None:
        if self.uses_watch:
            await self._watch_loop()
            self.log.warning("detector.watch_unavailable", fallback="poll")
        if self.settings.detect_poll_interval > 0:
            await self._poll_loop()

    # ------------------------------------------------------------------ local host: watch

    def _instance_for_machine(self, machine_id: str) -> str | None:
        found = self._index.get(machine_id)
        now = self.clock.monotonic()
        if found is None and (self._index_at is None or now - self._index_at > 0.2):
            self._index = {}
            for r in _all_instances(self.store):  # the fenced old machine too: its host returning wakes it
                self._index.update({m: r.id for m in (r.fenced_machine_id, r.machine_id) if m})
            self._index_at = now
            found = self._index.get(machine_id)
        return found

    async def _watch_loop(self) -> None:
        """Follow the host's change stream. Whenever events may have been missed -- at start-up (a controller
        that was killed missed what happened meanwhile), after the stream failed (the host may have restarted
        and stopped machines while we were not listening), when the host's sequence went backwards -- take the
        current sequence first, then sweep (:meth:`sweep`): nothing that stopped is left for the alarm alone."""
        try:
            await self._follow()
        finally:
            if self._sweep_task is not None:
                self._sweep_task.cancel()

    def _start_sweep(self) -> None:
        """Sweep in the background while the stream is followed: at 10 k instances a sweep lists apps for
        minutes, and a machine that stops meanwhile must not wait for it. A sweep still running started before
        the new sequence was taken, so it is replaced, not kept."""
        if self._sweep_task is not None:
            self._sweep_task.cancel()
        self._sweep_task = asyncio.create_task(self.sweep(), name="detector-sweep")

    async def _follow(self) -> None:
        watch = self.provider.watch_events
        seq: int | None = None
        unsupported = 0
        while True:
            try:
                if seq is None:
                    seq, _ = await watch(2**62, 0)  # the current sequence, no history
                    self._start_sweep()  # after taking the sequence: a stop from now on is in the stream
                latest, events = await watch(seq, WATCH_TIMEOUT)
                unsupported = 0
            except (NotFoundError, InvalidRequestError, AuthError) as exc:
                unsupported += 1
                self.log.warning("detector.watch_failed", error=str(exc), attempt=unsupported)
                if unsupported >= WATCH_GIVE_UP:
                    return  # this provider has no watch stream after all: poll instead
                seq = None
                await asyncio.sleep(ERROR_PAUSE)
                continue
            except ProviderError as exc:
                self.log.warning("detector.watch_failed", error=str(exc))
                seq = None  # events may be lost meanwhile: start over with a sweep
                await asyncio.sleep(ERROR_PAUSE)
                continue
            if latest < seq:  # the host restarted with fewer events: start over from its sequence (and sweep)
                seq = None
                continue
            seq = latest
            for event in events:
                if event.get("state") not in WAKE_STATES and event.get("type") != HOST_STATUS_EVENT:
                    continue  # a host dying or returning changes no state: its own event (SPEC §15)
                machine_id = str(event.get("machine_id") or "")
                instance_id = self._instance_for_machine(machine_id) if machine_id else None
                if instance_id is not None:
                    self.woken += 1
                    self.log.info("detector.wake", instance_id=instance_id, machine_id=machine_id,
                                  state=event.get("state"), host_status=event.get("host_status"),
                                  machine_event_at=event.get("at"))
                    self.wake(instance_id)

    # ------------------------------------------------------------------ anywhere: list per app

    async def sweep(self) -> int:
        """List and wake what stopped unseen: every ``running`` or ``recovering`` instance whose machine (the
        replacement, while recovering) is stopped, failed or gone. Returns how many were woken."""
        try:
            woken = await self.poll_once(SWEEP_STATUSES)
        except Exception as exc:  # keep detecting; the alarm is the backstop anyway
            self.log.warning("detector.sweep_failed", error=str(exc))
            return 0
        self.log.info("detector.sweep", woken=woken)
        return woken

    async def poll_once(self, statuses: tuple[Status, ...] = (Status.RUNNING,)) -> int:
        running = _all_instances(self.store, [s.value for s in statuses])
        by_app: dict[str, list[InstanceRecord]] = defaultdict(list)
        for record in running:
            if record.machine_id:
                by_app[record.app_name].append(record)
        woken = 0
        for app, records in by_app.items():
            woken += await self.check_app(app, records) or 0
        self.woken += woken
        return woken

    async def check_app(self, app: str, records: list[InstanceRecord], via: str = "poll") -> int | None:
        """List ``app``'s machines once and wake each of ``records`` whose machine stopped, failed or is gone.
        Returns how many were woken, or None when the listing failed (logged; the alarm is the backstop)."""
        try:
            machines = await self.provider.list_machines(app)
        except NotFoundError:
            machines = []
        except ProviderError as exc:
            self.log.warning("detector.poll_failed", app=app, error=str(exc))
            return None
        states = {m.id: m.state for m in machines}
        woken = 0
        for record in records:
            state = states.get(record.machine_id or "")
            if state is None or state in WAKE_STATES:
                woken += 1
                self.log.info("detector.wake", instance_id=record.id, machine_id=record.machine_id,
                              state=state or "missing", via=via)
                self.wake(record.id)
        return woken

    async def _poll_loop(self) -> None:
        await self.sweep()  # at start-up: recovering instances too (a replacement that stopped meanwhile)
        while True:
            try:
                await self.poll_once()
            except Exception as exc:  # keep detecting; the alarm is the backstop anyway
                self.log.warning("detector.poll_crashed", error=str(exc))
            await asyncio.sleep(max(0.05, self.settings.detect_poll_interval))
