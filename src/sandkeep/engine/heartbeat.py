"""Detection that scales on Fly (issue 11): gateway heartbeats, targeted reads, and a paced backstop listing.

* :class:`HeartbeatBook` (every process that serves the API): a machine's gateway beats on
  ``POST /v1/gateway/heartbeat`` with its instance id and its gateway token (SPEC §13). The token is checked
  against a cached SHA-256 digest (one database read and decrypt per instance per process, not per beat); beats
  are kept in memory and written to ``instance_heartbeats`` in one batch every ``heartbeat_flush_interval``. The
  flush re-reads the instances' encrypted tokens in the same batch: a beat carrying a token that was rotated
  (or of an instance destroyed) meanwhile is dropped and its cache entry forgotten, so the next beat is refused
  (401) in every process, API-only ones included. A heartbeat *stream* that ends (the machine crashed, was
  stopped, or the connection broke) is written as a beat already older than the timeout: the engine reads that
  machine at its next check instead of waiting for the timeout.
* :class:`HeartbeatMonitor` (engine processes): every ``heartbeat_check_interval`` it asks the database for
  running instances that beat before but are silent for ``heartbeat_timeout`` and issues one targeted
  ``get machine`` each; a machine stopped, failed, gone or on an unreachable host wakes its instance (the same
  wake-up the detector issues: the normal recovery path). A machine that answers ``started`` is read again
  after a doubling back-off (at most :data:`MAX_RECHECK`), so gateways that cannot reach sandkeep cost few
  reads; a new machine gets ``heartbeat_timeout`` from its start to send its first beat.
* :class:`BackstopDetector` (engine processes without the local host's watch stream): the per-app listing as a
  slow backstop. Each cycle lists first every app with a running instance that has no recent beat (never beat:
  old images, beats disabled, or a gateway that cannot reach sandkeep), then a rotating slice of the other apps;
  list calls are paced to ``detect_backstop_rate`` per second (default: a quarter of
  ``SANDKEEP_PROVIDER_RATE_LIMIT``), so the backstop never eats the rate limit recoveries need.

Loop cadences (flush, check, list pacing) are real time, like the detector's: they pace I/O. Whether a beat is
late is judged on the injected clock.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime, timedelta

from sandkeep import metrics
from sandkeep.clock import Clock
from sandkeep.config import Settings
from sandkeep.engine.detector import WAKE_STATES, Detector, _all_instances
from sandkeep.logs import get_logger
from sandkeep.provider.base import MachineProvider
from sandkeep.provider.errors import NotFoundError, ProviderError
from sandkeep.secrets import SecretBox, SecretsError
from sandkeep.store.base import Store
from sandkeep.store.heartbeats import SilentInstance
from sandkeep.store.records import InstanceRecord, Status

HEARTBEAT_PATH = "/v1/gateway/heartbeat"
INSTANCE_HEADER = "sandkeep-instance-id"
URL_ENV = "SANDKEEP_HEARTBEAT_URL"
INTERVAL_ENV = "SANDKEEP_HEARTBEAT_INTERVAL"
INSTANCE_ENV = "SANDKEEP_INSTANCE_ID"
MAX_RECHECK = 600.0
"""Longest pause between two targeted reads of a machine that answers ``started`` but does not beat."""
READ_CONCURRENCY = 16
AUTH_READ_CONCURRENCY = 4
"""Token reads (database read + decrypt, on a worker thread) in flight at once for heartbeat checks: a flood of
wrong tokens cannot take the shared thread pool from the rest of the process."""
AUTH_MEMORY = 100_000
"""Instance ids whose last token read time is remembered (oldest forgotten first): bounds the memory an attacker
sending random instance ids can make this process use."""
SILENT_BATCH = 10000
DEFAULT_BACKSTOP_RATE = 10.0
BACKSTOP_RECORDS_PER_SECOND = 1000.0
SENDER_RECONNECT = 40.0
"""How long a gateway's sender may take to reopen its stream after sandkeep restarted (its back-off doubles from
the interval to 30 s): silence that began before an engine started is not acted on for a timeout plus this."""


class BeatRefused(Exception):
    """A beat whose instance id or gateway token is missing, unknown or no longer valid (401)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def beats_enabled(settings: Settings) -> bool:
    return settings.heartbeat_interval > 0 and bool(settings.heartbeat_url) and settings.heartbeat_url != "off"


def machine_env(settings: Settings, instance_id: str) -> dict[str, str]:
    """What a machine's environment carries so its gateway beats (empty when beats are off)."""
    if not beats_enabled(settings):
        return {}
    base = str(settings.heartbeat_url).rstrip("/")
    return {URL_ENV: base + HEARTBEAT_PATH, INTERVAL_ENV: f"{settings.heartbeat_interval:g}",
            INSTANCE_ENV: instance_id}


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class HeartbeatBook:
    """The beats this process received: token checks (cached), the in-memory last beat, batched persistence."""

    def __init__(self, settings: Settings, store: Store, clock: Clock, secrets: SecretBox) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.secrets = secrets
        self.log = get_logger("sandkeep.heartbeat")
        self._tokens: dict[str, tuple[bytes, str]] = {}  # id -> (sha256(token), encrypted token as stored)
        # id -> clock.monotonic() of its last token read (found or not): a token other than the cached one is
        # re-read at most every heartbeat_auth_recheck (the negative cache)
        self._checked: OrderedDict[str, float] = OrderedDict()
        self._reading: dict[str, asyncio.Future[tuple[bytes, str] | None]] = {}  # single flight per id
        self._read_slots: asyncio.Semaphore | None = None
        self.token_reads = 0  # database reads made to check tokens (tests and benchmarks read it)
        self._pending: dict[str, datetime | None] = {}  # id -> beat time (None: the flush's time)
        self._beats_ok = metrics.GATEWAY_HEARTBEATS.labels(result="ok")
        self._last: dict[str, float] = {}  # id -> clock.monotonic() of its last beat in this process
        self._flusher: asyncio.Task[None] | None = None
        self.written = 0
        self.dropped = 0
        self.flush_cpu = 0.0  # CPU seconds spent writing batches (bench/fly_detect.py reports it)
        self.streams: set[asyncio.Task[object]] = set()  # the heartbeat streams this process serves now
        self.closing = False

    # ------------------------------------------------------------------ checking beats

    async def authenticate(self, instance_id: str | None, token: str | None) -> bytes:
        """The token's digest when ``token`` is ``instance_id``'s gateway token now; BeatRefused otherwise."""
        if not instance_id or not token:
            metrics.GATEWAY_HEARTBEATS.labels(result="refused").inc()
            raise BeatRefused("heartbeat_unauthorized", f"a heartbeat needs the '{INSTANCE_HEADER}' and "
                                                        "'sandkeep-gateway-token' headers")
        digest = _digest(token.strip())
        entry = self._tokens.get(instance_id)
        if entry is None or not hmac.compare_digest(entry[0], digest):
            # not cached, or another token than the cached one (the token may have been rotated): read it again,
            # unless this id's token was read less than heartbeat_auth_recheck ago (then the answer stands)
            checked = self._checked.get(instance_id)
            if checked is None or self.clock.monotonic() - checked >= self.settings.heartbeat_auth_recheck:
                entry = await self._read(instance_id)
        if entry is None or not hmac.compare_digest(entry[0], digest):
            metrics.GATEWAY_HEARTBEATS.labels(result="refused").inc()
            raise BeatRefused("heartbeat_unauthorized", "unknown instance or wrong (or rotated) gateway token")
        return digest

    async def _read(self, instance_id: str) -> tuple[bytes, str] | None:
        """One token read per id at a time (concurrent checks of one id share it), few ids at a time."""
        pending = self._reading.get(instance_id)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[tuple[bytes, str] | None] = asyncio.get_running_loop().create_future()
        self._reading[instance_id] = future
        try:
            if self._read_slots is None:
                self._read_slots = asyncio.Semaphore(AUTH_READ_CONCURRENCY)
            async with self._read_slots:
                self.token_reads += 1
                entry = await asyncio.to_thread(self._load, instance_id)
            self._checked[instance_id] = self.clock.monotonic()
            self._checked.move_to_end(instance_id)
            while len(self._checked) > AUTH_MEMORY:
                self._checked.popitem(last=False)
            future.set_result(entry)
            return entry
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: a read nobody else awaited is not "never retrieved"
            raise
        finally:
            del self._reading[instance_id]

    def _load(self, instance_id: str) -> tuple[bytes, str] | None:
        encrypted = self.store.heartbeat_tokens([instance_id]).get(instance_id)
        if not encrypted:
            self._tokens.pop(instance_id, None)
            self._last.pop(instance_id, None)
            return None
        try:
            plain = self.secrets.decrypt(encrypted)
        except SecretsError:
            return None
        entry = (_digest(plain), encrypted)
        self._tokens[instance_id] = entry
        return entry

    def still_valid(self, instance_id: str, digest: bytes) -> bool:
        """Whether a stream authenticated with ``digest`` may go on beating (False once the token rotated)."""
        entry = self._tokens.get(instance_id)
        return entry is not None and entry[0] == digest

    def forget(self, instance_id: str) -> None:
        """Drop the cached token (the next beat re-reads it, whenever it was last read)."""
        self._tokens.pop(instance_id, None)
        self._last.pop(instance_id, None)
        self._checked.pop(instance_id, None)

    # ------------------------------------------------------------------ recording beats

    def beat(self, instance_id: str) -> None:
        """One beat (the hot path: a dict write; the batch is stamped with the flush's time)."""
        now = self.clock.monotonic()
        self._pending[instance_id] = None
        self._last[instance_id] = now
        self._beats_ok.inc()
        if self._flusher is None or self._flusher.done():
            self._ensure_flusher()

    def stream_closed(self, instance_id: str) -> None:
        """A heartbeat stream ended: recorded as a beat already past the timeout, so an engine reads the machine
        at its next check (a crash is seen within a check interval, not a timeout)."""
        self._pending[instance_id] = self.clock.now() - timedelta(seconds=self.settings.heartbeat_timeout + 1.0)
        self._last.pop(instance_id, None)
        metrics.GATEWAY_HEARTBEATS.labels(result="stream_closed").inc()
        self._ensure_flusher()

    def end_streams(self) -> int:
        """The server is stopping: end every heartbeat stream now (not a sign of the machines: nothing is
        recorded; their senders reconnect, to another process or to this one restarted). Returns how many."""
        self.closing = True
        streams = list(self.streams)
        for task in streams:
            task.cancel()
        return len(streams)

    def age(self, instance_id: str) -> float | None:
        """Seconds since this process last received a beat of ``instance_id`` (None: none received)."""
        at = self._last.get(instance_id)
        return None if at is None else self.clock.monotonic() - at

    def _ensure_flusher(self) -> None:
        if self._flusher is None or self._flusher.done():
            try:
                self._flusher = asyncio.get_running_loop().create_task(self._flush_loop(), name="sandkeep-beats")
            except RuntimeError:  # no loop (a sync caller): flush() writes them
                self._flusher = None

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(max(0.01, self.settings.heartbeat_flush_interval))
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database hiccuped: the beats of this batch are lost, the next come
                self.log.warning("heartbeat.flush_failed", error=str(exc))

    async def flush(self) -> int:
        """Write the pending beats in one batch; returns how many were written."""
        batch, self._pending = self._pending, {}
        if not batch:
            return 0
        return await asyncio.to_thread(self._write, batch)

    def _write(self, batch: dict[str, datetime | None]) -> int:
        cpu = time.thread_time()
        try:
            return self._write_batch(batch)
        finally:
            self.flush_cpu += time.thread_time() - cpu

    def _write_batch(self, batch: dict[str, datetime | None]) -> int:
        stored = self.store.heartbeat_tokens(list(batch))
        keep: dict[str, datetime] = {}
        now = self.clock.now()
        for instance_id, when in batch.items():
            at = now if when is None else when
            entry = self._tokens.get(instance_id)
            encrypted = stored.get(instance_id)
            if entry is None or not encrypted or encrypted != entry[1]:
                self.forget(instance_id)  # rotated or destroyed since the beat was checked: refused from now on
                self.dropped += 1
                continue
            keep[instance_id] = at
        written = self.store.record_heartbeats(keep) if keep else 0
        self.written += written
        return written

    async def aclose(self) -> None:
        task, self._flusher = self._flusher, None
        if task is not None:
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        try:
            await self.flush()
        except Exception as exc:
            self.log.warning("heartbeat.flush_failed", error=str(exc))


class HeartbeatMonitor:
    """Engine side: a running instance whose beats stopped gets one targeted machine read."""

    def __init__(self, settings: Settings, store: Store, provider: MachineProvider, clock: Clock,
                 wake: Callable[[str], None], book: HeartbeatBook | None = None,
                 engine_id: str | None = None) -> None:
        self.settings = settings
        self.engine_id = engine_id
        self.store = store
        self.provider = provider
        self.clock = clock
        self.wake = wake
        self.book = book
        self.log = get_logger("sandkeep.heartbeat")
        self._next: dict[str, tuple[datetime, int]] = {}  # id -> (next read not before, reads that found it alive)
        self.started_at = clock.now()
        self.grace = timedelta(seconds=settings.heartbeat_timeout + SENDER_RECONNECT)
        self.reads = 0
        self.woken = 0

    def _due(self, s: SilentInstance, now: datetime, cutoff: datetime) -> bool:
        if not s.machine_id:
            return False
        if s.started_at is not None and s.started_at > cutoff:
            return False  # a machine started within the timeout: its first beat may still come
        if s.beat_at < self.started_at and now < self.started_at + self.grace:
            return False  # silent since before this engine started: the senders may be reconnecting
        age = self.book.age(s.instance_id) if self.book is not None else None
        if age is not None and age < self.settings.heartbeat_timeout:
            return False  # this process has a fresher beat that is not written yet
        nxt = self._next.get(s.instance_id)
        return nxt is None or now >= nxt[0]

    async def check_once(self) -> int:
        """Read every silent running instance's machine that is due a read; returns how many were woken."""
        now = self.clock.now()
        cutoff = now - timedelta(seconds=self.settings.heartbeat_timeout)
        silent = await asyncio.to_thread(self.store.silent_instances, cutoff, SILENT_BATCH)
        ids = {s.instance_id for s in silent}
        for gone in [k for k in self._next if k not in ids]:  # beating again, or no longer running
            del self._next[gone]
        todo = [s for s in silent if self._due(s, now, cutoff)]
        if todo and self.engine_id is not None:
            todo = await self._my_share(todo, now)
        if not todo:
            return 0
        gate = asyncio.Semaphore(READ_CONCURRENCY)

        async def one(s: SilentInstance) -> bool:
            async with gate:
                return await self._read(s, now)

        results = await asyncio.gather(*(one(s) for s in todo))
        return sum(1 for woke in results if woke)

    async def _my_share(self, todo: list[SilentInstance], now: datetime) -> list[SilentInstance]:
        """With several engines, each reads the silent instances of its own shard only (a CRC of the instance
        id modulo the live engines, in id order), so a silent machine costs one Machines API read, not one per
        engine. An engine that is not registered (yet) or alone reads them all. A dead engine's shard passes to
        the others as soon as its heartbeat expires (``SANDKEEP_ENGINE_HEARTBEAT_TTL``); while two engines
        disagree on who is alive, an instance may be read twice or wait one more check."""
        live = await asyncio.to_thread(self.store.live_engine_ids, now)
        if len(live) < 2 or self.engine_id not in live:
            return todo
        index, count = live.index(self.engine_id), len(live)
        return [s for s in todo if zlib.crc32(s.instance_id.encode()) % count == index]

    async def _read(self, s: SilentInstance, now: datetime) -> bool:
        self.reads += 1
        _, alive_reads = self._next.get(s.instance_id, (now, 0))
        try:
            machine = await self.provider.get_machine(s.app_name, s.machine_id or "")
            state, host = machine.state, machine.host_status
        except NotFoundError:
            state, host = None, None
        except ProviderError as exc:
            metrics.HEARTBEAT_READS.labels(outcome="error").inc()
            self.log.warning("heartbeat.read_failed", instance_id=s.instance_id, error=str(exc))
            self._next[s.instance_id] = (now + timedelta(seconds=self.settings.heartbeat_timeout), alive_reads)
            return False
        if state is None or state in WAKE_STATES or host not in (None, "ok"):
            metrics.HEARTBEAT_READS.labels(outcome="woken").inc()
            self.log.info("detector.wake", instance_id=s.instance_id, machine_id=s.machine_id,
                          state=state or "missing", host_status=host, via="heartbeat",
                          silent_for=round((now - s.beat_at).total_seconds(), 1))
            self._next[s.instance_id] = (now + timedelta(seconds=self.settings.heartbeat_timeout), alive_reads)
            self.woken += 1
            self.wake(s.instance_id)
            return True
        metrics.HEARTBEAT_READS.labels(outcome="alive").inc()
        pause = min(MAX_RECHECK, self.settings.heartbeat_timeout * 2 ** (alive_reads + 1))
        self._next[s.instance_id] = (now + timedelta(seconds=pause), alive_reads + 1)
        return False

    async def run(self) -> None:
        while True:
            await asyncio.sleep(max(0.05, self.settings.heartbeat_check_interval))
            try:
                await self.check_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep checking; the backstop and the alarms stay
                self.log.warning("heartbeat.check_failed", error=str(exc))


def backstop_rate(settings: Settings) -> float:
    """List calls per second the backstop listing may make."""
    if settings.detect_backstop_rate > 0:
        return settings.detect_backstop_rate
    if settings.provider_rate_limit > 0:
        return settings.provider_rate_limit / 4.0
    return DEFAULT_BACKSTOP_RATE


class BackstopDetector(Detector):
    """The per-app listing as a slow backstop while gateways beat (see the module docstring)."""

    def __init__(self, settings: Settings, store: Store, provider: MachineProvider,
                 wake: Callable[[str], None], clock: Clock) -> None:
        super().__init__(settings, store, provider, wake)
        self.clock = clock
        self._rotation = 0  # where the slice of beating apps starts next cycle
        self.listed = 0

    async def sweep(self) -> int:
        """At start-up: first give every machine a timeout (and its sender the time to reconnect) to beat (a
        beating machine is alive: no listing), then list the apps of the instances that did not."""
        await asyncio.sleep(self.settings.heartbeat_timeout + SENDER_RECONNECT)
        return await super().sweep()

    def plan(self, records: list[InstanceRecord], beats: dict[str, datetime], budget: int) -> list[str]:
        """The apps to list this cycle: every app with an instance that has no recent beat, then up to
        ``budget`` list calls in all with a rotating slice of the others."""
        fresh = self.clock.now() - timedelta(seconds=3 * self.settings.heartbeat_timeout)
        unbeaten: dict[str, None] = {}
        beating: dict[str, None] = {}
        for r in records:
            at = beats.get(r.id)
            if at is None or at < fresh:
                unbeaten[r.app_name] = None
        for r in records:
            if r.app_name not in unbeaten:
                beating[r.app_name] = None
        rest = sorted(beating)
        take = max(0, min(len(rest), budget - len(unbeaten)))
        start = self._rotation % len(rest) if rest else 0
        chosen = (rest[start:] + rest[:start])[:take]
        self._rotation = start + take
        return [*unbeaten, *chosen]

    async def poll_once(self, statuses: tuple[Status, ...] = (Status.RUNNING,)) -> int:
        running = [r for r in await asyncio.to_thread(_all_instances, self.store, [s.value for s in statuses])
                   if r.machine_id]
        beats = await asyncio.to_thread(self.store.heartbeat_times, [r.id for r in running])
        rate = backstop_rate(self.settings)
        budget = max(1, int(rate * max(1.0, self.settings.detect_poll_interval)))
        by_app: dict[str, list[InstanceRecord]] = {}
        for r in running:
            by_app.setdefault(r.app_name, []).append(r)
        woken = 0
        for app in self.plan(running, beats, budget):
            found = await self.check_app(app, by_app.get(app, []), via="backstop")
            if found is None:
                continue
            self.listed += 1
            woken += found
            await asyncio.sleep(1.0 / rate)  # paced: the backstop's share of the rate limit
        self.woken += woken
        # reading every running instance costs ~N x 30 µs: a large fleet's cycle is stretched to keep it small
        await asyncio.sleep(len(running) / BACKSTOP_RECORDS_PER_SECOND)
        return woken


def make_detection(settings: Settings, store: Store, provider: MachineProvider, clock: Clock,
                   wake: Callable[[str], None], secrets: SecretBox, engine_id: str | None = None,
                   ) -> tuple[Detector, HeartbeatBook, HeartbeatMonitor | None]:
    """The engine's detection: (detector, beat book, monitor). With beats on, a monitor reads silent instances'
    machines and, without the local host's watch stream (Fly), the per-app listing becomes the paced backstop."""
    book = HeartbeatBook(settings, store, clock, secrets)
    if not beats_enabled(settings):
        return Detector(settings, store, provider, wake, clock), book, None
    monitor = HeartbeatMonitor(settings, store, provider, clock, wake, book, engine_id=engine_id)
    if provider.supports_watch:
        return Detector(settings, store, provider, wake, clock), book, monitor
    return BackstopDetector(settings, store, provider, wake, clock), book, monitor
