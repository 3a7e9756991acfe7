"""The one way to claim an instance and write it: claim (with a brief retry), renew, fenced persist, release.

Both the reconcile pass (:class:`sandkeep.engine.executor.Pass`) and the user/admin intents
(:class:`sandkeep.engine.instances.InstanceService`) hold a :class:`Lease` and write through
:meth:`Lease.persist`, so every write is fenced (lease owner + version last read) and every status change
stamps ``status_changed_at`` and reschedules the alarm the same way.
"""

from __future__ import annotations

import random
import secrets as _pysecrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sandkeep.clock import Clock
from sandkeep.config import Settings
from sandkeep.engine.actions import Changes
from sandkeep.engine.events import Emitter
from sandkeep.engine.health import Prober
from sandkeep.engine.heartbeat import machine_env as heartbeat_env
from sandkeep.engine.naming import build_machine_config
from sandkeep.engine.policy import deadline_cap, interval_for
from sandkeep.provider.base import MachineProvider
from sandkeep.provider.errors import InvalidRequestError
from sandkeep.provider.models import MachineConfig
from sandkeep.secrets import SecretBox, SecretsError
from sandkeep.store.aio import AsyncStore
from sandkeep.store.base import Store
from sandkeep.store.records import InstanceRecord, Status

T = TypeVar("T")

CLAIM_RETRY_PAUSE = 0.05
"""Real-time pause between claim attempts while another worker holds the instance."""

TraceFn = Callable[[str, str, str], None]


@dataclass
class EngineContext:
    settings: Settings
    store: Store
    provider: MachineProvider
    clock: Clock
    emitter: Emitter
    secrets: SecretBox
    prober: Prober
    rng: random.Random = field(default_factory=random.Random)
    trace: TraceFn | None = None
    #: the store off the event loop (the engine's store thread); None: call the store directly
    astore: AsyncStore | None = None

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a store method on the store thread when there is one (else directly)."""
        if self.astore is not None:
            return await self.astore.call(fn, *args, **kwargs)
        return fn(*args, **kwargs)

    def traced(self, what: str, instance_id: str, owner: str) -> None:
        if self.trace is not None:
            self.trace(what, instance_id, owner)

    def alarm_in(self, seconds: float, record: InstanceRecord) -> datetime:
        now = self.clock.now()
        jitter = max(0.0, self.settings.jitter_fraction)
        delay = max(0.0, seconds) * (1.0 + self.rng.uniform(0.0, jitter))
        when = now + timedelta(seconds=delay)
        cap = deadline_cap(record, self.settings)
        # a deadline still ahead pulls the alarm in; one already passed has had its decision (a refused or
        # failed overdue cleanup, say) and must not pin the alarm to "now" — that would be a tight loop
        if cap is not None and now < cap < when:
            when = cap
        return when

    def machine_config(self, record: InstanceRecord, volume_id: str) -> MachineConfig:
        try:
            secrets = self.secrets.decrypt_map(record.secrets_encrypted)
            token = self.gateway_token(record)
        except SecretsError as exc:
            raise InvalidRequestError(str(exc), operation="decrypt secrets") from exc
        return build_machine_config(record, volume_id=volume_id, secrets=secrets,
                                    gateway_port=self.settings.gateway_port, gateway_token=token,
                                    beat_env=heartbeat_env(self.settings, record.id))

    def gateway_token(self, record: InstanceRecord) -> str | None:
        """The instance's gateway token in plaintext (None for an instance that has not started since tokens)."""
        if not record.gateway_token_encrypted:
            return None
        return self.secrets.decrypt(record.gateway_token_encrypted)

    def new_gateway_token(self) -> str:
        """A fresh random gateway token, encrypted for the record (SPEC §13)."""
        return self.secrets.encrypt(_pysecrets.token_urlsafe(32))


class Lease:
    """A claimed instance row: the record as last written, and the owner that holds it."""

    def __init__(self, ctx: EngineContext, record: InstanceRecord, owner: str) -> None:
        self.ctx = ctx
        self.record = record
        self.owner = owner
        #: True once a :meth:`finish` dropped the lease (nothing left to release)
        self.released = False

    async def persist(self, changes: Changes) -> InstanceRecord:
        """Fenced write, on the engine's store thread when there is one (the caller awaits it, so a pass's writes
        and events keep their order). A status change stamps ``status_changed_at`` and, unless ``alarm_at`` is
        given, reschedules the alarm at the new status's interval (a destroyed instance gets none)."""
        changes = Changes(**changes)
        if "status" in changes:
            new_status = Status(changes["status"])
            changes["status"] = new_status
            if new_status != self.record.status:
                changes.setdefault("status_changed_at", self.ctx.clock.now())
                if new_status == Status.RUNNING and self.record.last_provider_error is not None:
                    changes.setdefault("last_provider_error", None)  # running again: the error is history
                    changes.setdefault("last_provider_error_at", None)
                if "alarm_at" not in changes and new_status != Status.DESTROYED:
                    preview = self.record.copy(**changes)
                    changes["alarm_at"] = self.ctx.alarm_in(interval_for(new_status, self.ctx.settings), preview)
        self.record = await self.ctx.call(self.ctx.store.update, self.record, self.owner, dict(changes))
        return self.record

    async def renew(self) -> None:
        self.record = await self.ctx.call(self.ctx.store.renew, self.record, self.owner, self.ctx.settings.lease_ttl,
                                           self.ctx.clock.now())

    def renew_due(self, fraction: float = 0.5) -> bool:
        """True unless more than ``fraction`` of the lease is left."""
        expires = self.record.lease_expires_at
        ttl = self.ctx.settings.lease_ttl
        return expires is None or (expires - self.ctx.clock.now()).total_seconds() <= ttl * fraction

    async def renew_if_needed(self) -> None:
        """Renew (fenced) unless more than half the lease is left: a pass that just claimed writes nothing."""
        if not self.renew_due():
            return
        self.record = await self.ctx.call(self.ctx.store.renew, self.record, self.owner, self.ctx.settings.lease_ttl,
                                           self.ctx.clock.now())

    async def finish(self, changes: Changes) -> InstanceRecord:
        """The pass's last write and the lease release in one fenced write (batched with other passes' ends
        on the engine's store thread). Only for changes without a status change (requeue / backoff)."""
        assert "status" not in changes, "finish() does not handle status changes: persist() them"
        # the pass acts no more from here; the release commits on the store thread, and another engine on this
        # loop may claim as soon as it has, before this coroutine resumes: trace the release first
        self.ctx.traced("release", self.record.id, self.owner)
        if self.ctx.astore is not None:
            record = await self.ctx.astore.finish(self.record, self.owner, dict(changes))
        else:
            record = self.ctx.store.finish(self.record, self.owner, dict(changes))
        self.record = record
        self.released = True
        return record

    async def release(self) -> None:
        self.ctx.traced("release", self.record.id, self.owner)
        await self.ctx.call(self.ctx.store.release, self.record, self.owner)

    async def reclaim(self) -> bool:
        """Claim again after :meth:`release` (one attempt); False when someone else holds it now."""
        claimed = await self.ctx.call(self.ctx.store.claim, self.record.id, self.owner, self.ctx.settings.lease_ttl,
                                      self.ctx.clock.now())
        if claimed is None:
            return False
        self.ctx.traced("acquire", claimed.id, self.owner)
        self.record = claimed
        return True


async def claim(ctx: EngineContext, instance_id: str, owner: str, *, wait: float | None = None) -> Lease | None:
    """The one claim-with-retry loop: retry while another worker holds the instance, up to ``wait`` seconds
    (on the injected clock's monotonic time; ``claim_wait`` by default). None when the instance is unknown or
    still held elsewhere."""
    store, settings, clock = ctx.store, ctx.settings, ctx.clock
    deadline = clock.monotonic() + (settings.claim_wait if wait is None else wait)
    while True:
        record = await ctx.call(store.claim, instance_id, owner, settings.lease_ttl, clock.now())
        if record is not None:
            return Lease(ctx, record, owner)
        if await ctx.call(store.get_instance, instance_id) is None or clock.monotonic() >= deadline:
            return None
        await clock.sleep(CLAIM_RETRY_PAUSE)
