"""MachinesClient against a real ``sandkeep host`` process (real sockets, real machine processes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandkeep.gateway import TOKEN_ENV
from sandkeep.provider.errors import (
    CapacityError,
    ConflictError,
    HostUnavailableError,
    InvalidRequestError,
    MissingVolumeError,
    NotFoundError,
    ProviderError,
    RateLimitedError,
    TransientError,
    WaitTimeoutError,
)
from sandkeep.provider.models import Machine, MachineConfig, Mount, Volume
from tests.host.conftest import GATEWAY_TOKEN
from tests.provider.conftest import Local, make_local
from tests.support.procs import running_host
from tests.support.wait import async_wait_until

IMAGE = "sandkeep/gateway"


def gateway_config(volume_id: str | None = None, **metadata: str) -> MachineConfig:
    mounts = [Mount(volume=volume_id, path="/data")] if volume_id else []
    return MachineConfig(image=IMAGE, mounts=mounts, metadata=dict(metadata), env={TOKEN_ENV: GATEWAY_TOKEN})


async def started_machine(local: Local, app: str, *, name: str, region: str = "lcl-a",
                          volume: Volume | None = None, **metadata: str) -> Machine:
    m = await local.client.create_machine(app, config=gateway_config(volume.id if volume else None, **metadata),
                                          name=name, region=region)
    await local.client.wait_machine(app, m.id, state="started", timeout=30, instance_id=m.instance_id)
    return m


# --------------------------------------------------------------------------- apps


async def test_apps_ensure_get_and_missing(local: Local, app_name: str) -> None:
    c = local.client
    with pytest.raises(NotFoundError):
        await c.get_app(app_name)
    with pytest.raises(NotFoundError):
        await c.list_machines(app_name)
    with pytest.raises(NotFoundError):
        await c.list_volumes(app_name)
    app = await c.ensure_app(app_name, "personal")
    assert app.name == app_name
    again = await c.ensure_app(app_name, "personal")
    assert again.name == app_name and again.id == app.id
    assert (await c.get_app(app_name)).name == app_name
    # create_app of an existing app is refused (ensure_app tolerates exactly that)
    with pytest.raises((ConflictError, InvalidRequestError)):
        await c.create_app(app_name, "personal")


# --------------------------------------------------------------------------- machines


async def test_machine_lifecycle_through_the_client(local: Local, app_name: str) -> None:
    c = local.client
    await c.ensure_app(app_name, "personal")
    vol = await c.create_volume(app_name, name="data", region="lcl-a", size_gb=1)
    assert vol.region == "lcl-a" and vol.name == "data" and vol.attached_machine_id is None

    m = await started_machine(local, app_name, name="vm-1", volume=vol, instance="inst-1", owner="alice")
    got = await c.get_machine(app_name, m.id)
    assert got.state == "started" and got.name == "vm-1" and got.region == "lcl-a"
    assert got.metadata == {"instance": "inst-1", "owner": "alice"}
    assert got.volume_ids == [vol.id]
    assert (await c.get_volume(app_name, vol.id)).attached_machine_id == m.id

    other = await c.create_machine(app_name, config=gateway_config(instance="inst-2"), name="vm-2",
                                   region="lcl-b", skip_launch=True)
    assert other.state in ("created", "stopped")

    assert {x.id for x in await c.list_machines(app_name)} == {m.id, other.id}
    assert [x.id for x in await c.list_machines(app_name, metadata={"instance": "inst-1"})] == [m.id]
    assert [x.id for x in await c.list_machines(app_name, metadata={"instance": "inst-1", "owner": "alice"})] == [m.id]
    assert await c.list_machines(app_name, metadata={"instance": "nope"}) == []
    assert [x.id for x in await c.list_machines(app_name, region="lcl-b")] == [other.id]

    # metadata
    await c.set_metadata(app_name, m.id, "stage", "blue")
    assert (await c.get_metadata(app_name, m.id))["stage"] == "blue"
    await c.delete_metadata(app_name, m.id, "stage")
    assert "stage" not in await c.get_metadata(app_name, m.id)

    # stop / start / restart
    await c.stop_machine(app_name, m.id)
    await c.wait_machine(app_name, m.id, state="stopped", timeout=30, instance_id=m.instance_id)
    assert (await c.get_machine(app_name, m.id)).state == "stopped"
    await c.start_machine(app_name, m.id)
    await c.wait_machine(app_name, m.id, state="started", timeout=30)
    await c.restart_machine(app_name, m.id)
    await c.wait_machine(app_name, m.id, state="started", timeout=30)
    assert (await c.get_machine(app_name, m.id)).state == "started"

    # update: new env reaches the machine's config
    cfg = gateway_config(vol.id, instance="inst-1", owner="alice")
    cfg.env = {"GREETING": "hi"}
    updated = await c.update_machine(app_name, m.id, config=cfg)
    assert updated.config is not None and updated.config.env.get("GREETING") == "hi"
    await c.wait_machine(app_name, m.id, state="started", timeout=30)

    events = await c.list_machine_events(app_name, m.id)
    types = [e.type for e in events]
    assert "start" in types and "stop" in types
    assert events == sorted(events, key=lambda e: e.timestamp or 0, reverse=True)  # newest first

    # destroy: stopped-only without force, then gone; missing_ok makes a repeat harmless
    with pytest.raises(ProviderError) as info:
        await c.destroy_machine(app_name, m.id, force=False)
    assert not isinstance(info.value, NotFoundError | TransientError)
    await c.destroy_machine(app_name, m.id, force=True)
    await c.wait_machine(app_name, m.id, state="destroyed", timeout=30)

    async def gone() -> bool:
        try:
            return (await c.get_machine(app_name, m.id)).state == "destroyed"
        except NotFoundError:
            return True

    await async_wait_until(gone, timeout=30, message="destroyed machine")
    assert m.id not in {x.id for x in await c.list_machines(app_name)}
    await c.destroy_machine(app_name, m.id)
    with pytest.raises(NotFoundError):
        await c.destroy_machine(app_name, "no-such-machine", missing_ok=False)
    # the destroyed machine released its volume
    assert (await c.get_volume(app_name, vol.id)).attached_machine_id is None
    await c.destroy_machine(app_name, other.id)


async def test_bad_machine_requests_are_classified(local: Local, app_name: str) -> None:
    c = local.client
    await c.ensure_app(app_name, "personal")
    with pytest.raises(InvalidRequestError, match=r"(?i)image"):
        await c.create_machine(app_name, config=MachineConfig(image="nope/unknown"), name="bad", region="lcl-a")
    with pytest.raises(MissingVolumeError):
        await c.create_machine(app_name, config=gateway_config("vol_doesnotexist"), name="bad2", region="lcl-a")
    vol = await c.create_volume(app_name, name="data", region="lcl-a", size_gb=1)
    with pytest.raises(InvalidRequestError):  # a machine and its volume must share a region
        await c.create_machine(app_name, config=gateway_config(vol.id), name="bad3", region="lcl-b")
    with pytest.raises(NotFoundError):
        await c.get_machine(app_name, "nope")
    with pytest.raises(NotFoundError):
        await c.get_volume(app_name, "vol_nope")
    assert await c.list_machines(app_name) == []


async def test_proxy_reaches_the_right_machine_and_data_lives_on_the_volume(local: Local, app_name: str) -> None:
    c = local.client
    await c.ensure_app(app_name, "personal")
    va = await c.create_volume(app_name, name="a", region="lcl-a", size_gb=1)
    vb = await c.create_volume(app_name, name="b", region="lcl-b", size_gb=1)
    ma = await started_machine(local, app_name, name="ma", region="lcl-a", volume=va)
    mb = await started_machine(local, app_name, name="mb", region="lcl-b", volume=vb)
    assert (await local.put_data(app_name, ma.id, "k", b"from-a")).status_code < 300
    assert (await local.put_data(app_name, mb.id, "k", b"from-b")).status_code < 300
    assert (await local.get_data(app_name, ma.id, "k")).content == b"from-a"
    assert (await local.get_data(app_name, mb.id, "k")).content == b"from-b"
    assert (await local.get_data(app_name, ma.id, "missing")).status_code == 404
    # data survives a stop/start of the machine: it is on the volume
    await c.stop_machine(app_name, ma.id)
    await c.wait_machine(app_name, ma.id, state="stopped", timeout=30)
    assert (await local.get_data(app_name, ma.id, "k")).status_code == 503  # not started: proxy says so
    await c.start_machine(app_name, ma.id)
    await c.wait_machine(app_name, ma.id, state="started", timeout=30)
    assert (await local.get_data(app_name, ma.id, "k")).content == b"from-a"


# --------------------------------------------------------------------------- volumes


async def test_fork_copies_data_across_regions_and_the_copy_is_independent(local: Local, app_name: str) -> None:
    c = local.client
    await c.ensure_app(app_name, "personal")
    src = await c.create_volume(app_name, name="src", region="lcl-a", size_gb=1)
    m = await started_machine(local, app_name, name="orig", region="lcl-a", volume=src)
    assert (await local.put_data(app_name, m.id, "k", b"v1")).status_code < 300

    fork = await c.create_volume(app_name, name="fork", region="lcl-b", source_volume_id=src.id)
    assert fork.id != src.id and fork.region == "lcl-b"
    assert {v.id for v in await c.list_volumes(app_name)} >= {src.id, fork.id}

    m2 = await started_machine(local, app_name, name="copy", region="lcl-b", volume=fork)
    assert (await local.get_data(app_name, m2.id, "k")).content == b"v1"
    assert (await local.put_data(app_name, m2.id, "k", b"v2")).status_code < 300
    assert (await local.put_data(app_name, m2.id, "only-in-fork", b"x")).status_code < 300
    assert (await local.get_data(app_name, m.id, "k")).content == b"v1"
    assert (await local.get_data(app_name, m.id, "only-in-fork")).status_code == 404
    assert (await local.get_data(app_name, m2.id, "k")).content == b"v2"

    with pytest.raises(MissingVolumeError):
        await c.create_volume(app_name, name="fork2", region="lcl-b", source_volume_id="vol_doesnotexist")


async def test_snapshot_and_restore(local: Local, app_name: str) -> None:
    c = local.client
    await c.ensure_app(app_name, "personal")
    vol = await c.create_volume(app_name, name="data", region="lcl-a", size_gb=1)
    m = await started_machine(local, app_name, name="vm", region="lcl-a", volume=vol)
    assert (await local.put_data(app_name, m.id, "k", b"before")).status_code < 300

    before = {s.id for s in await c.list_snapshots(app_name, vol.id)}
    taken = await c.create_snapshot(app_name, vol.id)
    snaps = await c.list_snapshots(app_name, vol.id)
    new = [s for s in snaps if s.id not in before]
    assert len(new) == 1
    assert taken is not None and taken.id == new[0].id  # the local host answers with the snapshot

    assert (await local.put_data(app_name, m.id, "k", b"after")).status_code < 300
    restored = await c.create_volume(app_name, name="restored", region="lcl-c", snapshot_id=new[0].id)
    assert restored.region == "lcl-c"
    m2 = await started_machine(local, app_name, name="vm2", region="lcl-c", volume=restored)
    assert (await local.get_data(app_name, m2.id, "k")).content == b"before"
    assert (await local.get_data(app_name, m.id, "k")).content == b"after"


async def test_delete_attached_volume_is_refused_then_allowed(local: Local, app_name: str) -> None:
    c = local.client
    await c.ensure_app(app_name, "personal")
    vol = await c.create_volume(app_name, name="data", region="lcl-a", size_gb=1)
    m = await started_machine(local, app_name, name="vm", region="lcl-a", volume=vol)
    with pytest.raises(ConflictError, match="bound to machine"):
        await c.delete_volume(app_name, vol.id)
    assert (await c.get_volume(app_name, vol.id)).attached_machine_id == m.id
    await c.destroy_machine(app_name, m.id)
    await c.wait_machine(app_name, m.id, state="destroyed", timeout=30)
    await c.delete_volume(app_name, vol.id)

    async def deleted() -> bool:
        try:
            v = await c.get_volume(app_name, vol.id)
        except NotFoundError:
            return True
        return v.state in ("destroyed", "pending_destroy", "deleted")

    await async_wait_until(deleted, timeout=30, message="volume deleted")
    await c.delete_volume(app_name, vol.id)  # missing_ok
    with pytest.raises(NotFoundError):
        await c.delete_volume(app_name, "vol_nope", missing_ok=False)


# --------------------------------------------------------------------------- wait, crash, watch


async def test_wait_timeout_is_a_408(local: Local, app_name: str) -> None:
    c = local.client
    await c.ensure_app(app_name, "personal")
    m = await c.create_machine(app_name, config=gateway_config(), name="idle", region="lcl-a", skip_launch=True)
    with pytest.raises(WaitTimeoutError, match="deadline_exceeded") as info:
        await c.wait_machine(app_name, m.id, state="started", timeout=1)
    assert info.value.status == 408
    assert local.clock.sleeps == []  # a 408 is never retried by the client


async def test_crash_stops_the_machine_with_an_exit_event(local: Local, app_name: str) -> None:
    c = local.client
    await c.ensure_app(app_name, "personal")
    m = await started_machine(local, app_name, name="vm", region="lcl-a")
    seq, _ = await c.watch_events(since=0, timeout=0)
    await local.crash(app_name, m.id)
    await c.wait_machine(app_name, m.id, state="stopped", timeout=30)
    assert (await c.get_machine(app_name, m.id)).state == "stopped"
    exits = [e for e in await c.list_machine_events(app_name, m.id) if e.type == "exit"]
    assert exits, "no exit event"
    assert exits[0].exit_code == 137 and exits[0].requested_stop is False

    async def crash_seen() -> list[dict[str, object]]:
        _, events = await c.watch_events(since=seq, timeout=5)
        return [e for e in events if e.get("machine_id") == m.id and e.get("state") == "stopped"]

    seen = await async_wait_until(crash_seen, timeout=30, message="watch reports the crash")
    assert seen[-1]["app_name"] == app_name
    assert seen[-1]["exit_code"] == 137 and seen[-1]["requested_stop"] is False


async def test_watch_long_poll_returns_new_events_only(local: Local, app_name: str) -> None:
    c = local.client
    await c.ensure_app(app_name, "personal")
    seq0, _ = await c.watch_events(since=0, timeout=0)
    m = await started_machine(local, app_name, name="vm", region="lcl-a")
    seq1, events = await c.watch_events(since=seq0, timeout=5)
    assert seq1 > seq0
    assert events and all(int(e["seq"]) > seq0 for e in events)
    assert any(e["machine_id"] == m.id and e["state"] == "started" for e in events)


# --------------------------------------------------------------------------- host-wide faults (own host)


async def test_region_outage_and_capacity(fresh_local: Local, app_name: str) -> None:
    loc = fresh_local
    c = loc.client
    await c.ensure_app(app_name, "personal")
    vol = await c.create_volume(app_name, name="data", region="lcl-a", size_gb=1)
    m = await started_machine(loc, app_name, name="vm", region="lcl-a", volume=vol)

    await loc.outage("lcl-a", True)
    await c.wait_machine(app_name, m.id, state="stopped", timeout=30)
    assert (await c.get_volume(app_name, vol.id)).host_status == "unreachable"
    loc.clock.sleeps.clear()
    with pytest.raises(HostUnavailableError, match="unreachable") as info:  # a clear, final answer
        await c.create_volume(app_name, name="fork", region="lcl-b", source_volume_id=vol.id)
    assert "lcl-a" in str(info.value)
    assert loc.clock.sleeps == []  # not retried
    assert [v for v in await c.list_volumes(app_name) if v.name == "fork"] == []
    with pytest.raises(CapacityError):
        await c.create_volume(app_name, name="new", region="lcl-a", size_gb=1)

    # fallback skips the down region
    v2 = await c.create_volume_with_fallback(app_name, regions=["lcl-a", "lcl-b"], name="fb", size_gb=1)
    assert v2.region == "lcl-b"

    await loc.outage("lcl-a", False)
    assert (await c.get_volume(app_name, vol.id)).host_status == "ok"
    fork = await c.create_volume(app_name, name="fork", region="lcl-b", source_volume_id=vol.id)
    assert fork.region == "lcl-b"

    # capacity: both creates refused with Fly's capacity shape; fallback moves on
    await loc.capacity("lcl-a", False)
    with pytest.raises(CapacityError):
        await c.create_volume(app_name, name="x", region="lcl-a", size_gb=1)
    with pytest.raises(CapacityError):
        await c.create_machine(app_name, config=gateway_config(), name="x", region="lcl-a")
    await loc.capacity("lcl-b", False)
    v3 = await c.create_volume_with_fallback(app_name, regions=["lcl-a", "lcl-b", "lcl-c"], name="fb2", size_gb=1)
    assert v3.region == "lcl-c"
    await loc.capacity("lcl-c", False)
    with pytest.raises(CapacityError):
        await c.create_volume_with_fallback(app_name, regions=["lcl-a", "lcl-b", "lcl-c"], name="fb3")
    # any other error stops the fallback at once
    with pytest.raises(NotFoundError):
        await c.create_volume_with_fallback("no-such-app", regions=["lcl-a", "lcl-b"], name="fb4")
    await loc.capacity("lcl-a", True)
    assert (await c.create_volume(app_name, name="y", region="lcl-a", size_gb=1)).region == "lcl-a"


async def test_injected_429_and_5xx_are_retried(fresh_local: Local, app_name: str) -> None:
    loc = fresh_local
    c = loc.client
    await c.ensure_app(app_name, "personal")
    await loc.fault(operation="volume.list", status=429, retry_after=2, count=2)
    assert await c.list_volumes(app_name) == []
    assert loc.clock.sleeps[:2] == [2.0, 2.0]  # Retry-After honoured (asked of the clock, not waited)

    loc.clock.sleeps.clear()
    await loc.fault(operation="app.get", status=503, count=3)
    assert (await c.get_app(app_name)).name == app_name
    assert len(loc.clock.sleeps) == 3

    await loc.fault(operation="machine.list", status=500)  # permanent
    with pytest.raises(TransientError):
        await c.list_machines(app_name)
    await loc.clear_faults()
    await loc.fault(operation="machine.list", status=429, retry_after=3600)
    with pytest.raises(RateLimitedError) as info:
        await c.list_machines(app_name)
    assert info.value.retry_after == 3600
    await loc.clear_faults()
    assert await c.list_machines(app_name) == []


@pytest.mark.parametrize("status", [500, 408])
async def test_ambiguous_create_never_duplicates(fresh_local: Local, app_name: str, status: int) -> None:
    """The host creates, then answers an error (a lost reply): the client finds the machine by name."""
    loc = fresh_local
    c = loc.client
    await c.ensure_app(app_name, "personal")
    await loc.fault(operation="machine.create", status=status, phase="after", count=1)
    m = await c.create_machine(app_name, config=gateway_config(instance="i1"), name="vm", region="lcl-a")
    machines = await c.list_machines(app_name)
    assert [x.id for x in machines] == [m.id]

    await loc.fault(operation="volume.create", status=502, phase="after", count=1)
    v = await c.create_volume(app_name, name="data", region="lcl-a", size_gb=1)
    assert [x.id for x in await c.list_volumes(app_name)] == [v.id]


async def test_host_restart_keeps_volumes_and_snapshots_and_reports_old_machines_stopped(
        tmp_path: Path, app_name: str) -> None:
    data_dir = tmp_path / "host"
    with running_host(data_dir) as first:
        loc = await make_local(first)
        try:
            c = loc.client
            await c.ensure_app(app_name, "personal")
            vol = await c.create_volume(app_name, name="data", region="lcl-a", size_gb=1)
            m = await started_machine(loc, app_name, name="vm", region="lcl-a", volume=vol)
            assert (await loc.put_data(app_name, m.id, "k", b"kept")).status_code < 300
            await c.create_snapshot(app_name, vol.id)
            snaps = {s.id for s in await c.list_snapshots(app_name, vol.id)}
            assert snaps
        finally:
            await loc.aclose()
    with running_host(data_dir) as second:
        loc = await make_local(second)
        try:
            c = loc.client
            assert (await c.get_machine(app_name, m.id)).state == "stopped"
            assert (await c.get_volume(app_name, vol.id)).attached_machine_id == m.id
            assert {s.id for s in await c.list_snapshots(app_name, vol.id)} >= snaps
            await c.start_machine(app_name, m.id)
            await c.wait_machine(app_name, m.id, state="started", timeout=30)
            assert (await loc.get_data(app_name, m.id, "k")).content == b"kept"
        finally:
            await loc.aclose()
