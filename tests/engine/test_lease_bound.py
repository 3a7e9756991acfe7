"""A lease holder must not act after losing its lease (SPEC: persist intent before acting, look up before
creating; simulation seed 41 of the small profile).

A 429 with ``Retry-After: 30`` on the fork step's volume lookup used to be slept out inside the one provider call
(30 s, retried) while the pass held a 10 s lease it did not renew: the alarm re-claimed the instance, a second
pass ran the same fork step, and one of two same-named forks ended referenced by no record. Now every provider
call a pass makes under its lease is bounded by the lease's end, and a Retry-After the pass cannot afford ends
the call at once: the pass backs off and lets the instance go.

Virtual time (:class:`~tests.support.vclock.VirtualClock`): the 30 s answer costs no wall time.
"""

from __future__ import annotations

from pathlib import Path

from sandkeep.store.records import Status
from tests.engine.conftest import USER
from tests.engine.test_recovery_deadline import world

LEASE_TTL = 10.0
RETRY_AFTER = 30.0


async def test_a_retry_after_longer_than_the_lease_ends_the_pass_instead_of_sleeping_out_the_lease(
        tmp_path: Path) -> None:
    async with world(tmp_path, lease_ttl=LEASE_TTL, recovery_timeout=600.0) as w:
        created = await w.engine.service.create_instance(USER, user_id=USER.user_id)
        rec = await w.drive(created.id, lambda r: r.status == Status.RUNNING)
        assert rec.machine_id and rec.volume_id
        # every volume listing (the fork step looks its volume up by name first) answers 429, retry after 30 s
        w.faults.configure({"operation": "volume.list", "status": 429, "retry_after": RETRY_AFTER})
        await w.host.crash_machine(rec.app_name, rec.machine_id)
        await w.settle(rec.machine_id, "stopped")

        for _ in range(4):  # the passes up to the one that meets the 429
            before = w.clock.monotonic()
            await w.engine.reconcile_now(rec.id)
            spent = w.clock.monotonic() - before
            # no pass runs past its lease (it would have slept 30 s, up to 4 times, holding a 10 s lease)
            assert spent < LEASE_TTL, f"a pass held its {LEASE_TTL:.0f} s lease for {spent:.1f} s"
            after = w.get(rec.id)
            if after.last_provider_error:
                break
            w.clock.advance(max(0.0, ((after.alarm_at or w.clock.now()) - w.clock.now()).total_seconds()))

        assert after.status == Status.RECOVERING
        assert "429" in (after.last_provider_error or ""), after.last_provider_error
        # it let go (the lease is free at once) and comes back after the Retry-After, not before
        assert after.lease_owner is None
        assert after.alarm_at is not None
        assert (after.alarm_at - w.clock.now()).total_seconds() >= RETRY_AFTER - 0.5
        # and it created nothing it cannot name: no fork yet
        assert after.pending_recovery_volume_id is None
        forks = [v for v in w.host.volumes.values() if v.get("app") == rec.app_name
                 and v.get("state") not in ("destroyed", "pending_destroy") and v["id"] != rec.volume_id]
        assert forks == []

        # the 429s stop: the recovery completes with exactly one fork
        w.faults.configure({"rules": []})
        final = await w.drive(rec.id, lambda r: r.status == Status.RUNNING)
        live = [v["id"] for v in w.host.volumes.values() if v.get("app") == rec.app_name
                and v.get("state") not in ("destroyed", "pending_destroy")]
        assert live == [final.volume_id]
