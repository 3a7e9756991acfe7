"""Detection on Fly (issue 11): gateway heartbeats, the targeted read after a missed beat, the paced backstop.

On the one provider model (tests/support/model.py) with Fly's capabilities (no change stream: the engine runs the
monitor and the paced backstop listing), on virtual time. The machines' gateways cannot reach sandkeep (nothing
listens at the beat URL): the tests beat for them and call ``flush`` / ``check_once`` / ``poll_once`` themselves.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from sandkeep.engine.heartbeat import (
    INSTANCE_ENV,
    INTERVAL_ENV,
    URL_ENV,
    BackstopDetector,
    BeatRefused,
    HeartbeatBook,
    HeartbeatMonitor,
)
from sandkeep.engine.recovery import EVENT_STARTED
from sandkeep.engine.runtime import Engine
from sandkeep.sim.loop import SimClock
from sandkeep.store.records import Status
from tests.engine.conftest import ADMIN, Harness, engine_settings
from tests.support.model import Model

# nothing listens there: a machine's beat stream is refused at once (no name to resolve, no wait)
BEAT_BASE = "http://127.0.0.1:1"
BEATS = {"heartbeat_url": BEAT_BASE, "heartbeat_interval": 3.0, "heartbeat_timeout": 8.0}


@pytest.fixture()
async def model(tmp_path: Path, sim_clock: SimClock) -> AsyncIterator[Model]:
    """The provider model as Fly is: the client offers no change stream."""
    m = Model(tmp_path / "host", sim_clock, watch=False)
    try:
        yield m
    finally:
        await m.close()


@pytest.fixture()
def hb(make_harness: Callable[..., Harness]) -> Harness:
    return make_harness(**BEATS)


def monitor_of(h: Harness) -> HeartbeatMonitor:
    monitor = h.engine.monitor
    assert monitor is not None, "beats are on: the engine has a monitor"
    monitor.wake = h.woken.append
    h.woken.clear()  # the wake-ups of the instances' creation
    return monitor


async def beat(book: HeartbeatBook, h: Harness, instance_id: str) -> None:
    token = h.engine.ctx.gateway_token(h.get(instance_id))
    await book.authenticate(instance_id, token)
    book.beat(instance_id)
    await book.flush()


async def test_the_machine_gets_the_beat_url_interval_and_its_instance_id(hb: Harness) -> None:
    record = await hb.running()
    env = hb.model.config(record.machine_id)["env"]
    assert env[URL_ENV] == BEAT_BASE + "/v1/gateway/heartbeat"
    assert env[INTERVAL_ENV] == "3" and env[INSTANCE_ENV] == record.id


async def test_without_a_beat_url_machines_are_not_asked_to_beat(h: Harness) -> None:
    record = await h.running()
    assert URL_ENV not in h.model.config(record.machine_id)["env"]
    assert h.engine.monitor is None


async def test_a_beat_with_the_gateway_token_is_written_in_a_batch(hb: Harness) -> None:
    a, b = await hb.running(), await hb.running()
    book = hb.engine.heartbeats
    for record in (a, b):
        await book.authenticate(record.id, hb.engine.ctx.gateway_token(record))
        book.beat(record.id)
    assert hb.store.heartbeat_times([a.id, b.id]) == {}  # in memory until the flush
    assert await book.flush() == 2
    assert hb.store.heartbeat_times([a.id, b.id]) == {a.id: hb.clock.now(), b.id: hb.clock.now()}


@pytest.mark.parametrize("case", ["no_id", "no_token", "wrong_token", "unknown_instance", "other_instance"])
async def test_beats_with_a_bad_token_are_refused(hb: Harness, case: str) -> None:
    record = await hb.running()
    other = await hb.running()
    token = hb.engine.ctx.gateway_token(record)
    ident: str | None = record.id
    presented: str | None = token
    if case == "no_id":
        ident = None
    elif case == "no_token":
        presented = None
    elif case == "wrong_token":
        presented = "x" * 43
    elif case == "unknown_instance":
        ident = "ins_missing"
    else:
        presented = hb.engine.ctx.gateway_token(other)
    with pytest.raises(BeatRefused) as exc:
        await hb.engine.heartbeats.authenticate(ident, presented)
    assert exc.value.code == "heartbeat_unauthorized"


async def test_a_rotated_token_is_refused_and_its_pending_beat_dropped(hb: Harness) -> None:
    record = await hb.running()
    book = hb.engine.heartbeats
    old = hb.engine.ctx.gateway_token(record)
    await book.authenticate(record.id, old)
    book.beat(record.id)
    await hb.service.rotate_gateway_token(ADMIN, record.id)
    assert await book.flush() == 0  # the beat checked with the old token is not written
    assert hb.store.heartbeat_times([record.id]) == {}
    with pytest.raises(BeatRefused):
        await book.authenticate(record.id, old)
    new = hb.engine.ctx.gateway_token(hb.get(record.id))
    assert new != old
    await book.authenticate(record.id, new)  # the new machine's beats are taken


async def test_a_missed_beat_triggers_one_targeted_read_and_the_recovery(hb: Harness) -> None:
    record = await hb.running()
    monitor = monitor_of(hb)
    await hb.pass_time(10)  # past the new machine's grace
    await beat(hb.engine.heartbeats, hb, record.id)
    await hb.pass_time(5)
    assert await monitor.check_once() == 0 and monitor.reads == 0  # beat 5 s ago: nothing to read
    await hb.model.crash(record.machine_id)
    await hb.pass_time(4)  # 9 s of silence > the 8 s timeout
    since = len(hb.model.requests)
    assert await monitor.check_once() == 1
    assert hb.woken == [record.id]
    # one targeted read of the machine, no listing
    assert hb.model.requests[since:] == [("GET", f"/v1/apps/{record.app_name}/machines/{record.machine_id}")]
    await hb.reconcile(record.id)
    assert EVENT_STARTED in hb.events(record.id)


async def test_a_silent_machine_that_is_alive_is_not_read_again_at_once(hb: Harness) -> None:
    record = await hb.running()
    monitor = monitor_of(hb)
    await hb.pass_time(10)
    await beat(hb.engine.heartbeats, hb, record.id)
    await hb.pass_time(9)
    assert await monitor.check_once() == 0 and monitor.reads == 1  # started: not woken
    await hb.pass_time(1)
    assert await monitor.check_once() == 0 and monitor.reads == 1  # backed off: no second read yet
    await hb.pass_time(20)
    await monitor.check_once()
    assert monitor.reads == 2 and hb.woken == []


async def test_an_ended_stream_is_read_without_waiting_for_the_timeout(hb: Harness) -> None:
    record = await hb.running()
    monitor = monitor_of(hb)
    await hb.pass_time(70)  # past the monitor's start-up grace
    book = hb.engine.heartbeats
    await beat(book, hb, record.id)
    await hb.model.crash(record.machine_id)
    book.stream_closed(record.id)  # the machine's connection dropped
    await book.flush()
    assert await monitor.check_once() == 1  # no clock advance: the close is the signal
    assert hb.woken == [record.id]


async def test_a_new_machine_gets_the_timeout_to_send_its_first_beat(hb: Harness) -> None:
    await hb.pass_time(70)  # past the monitor's start-up grace
    record = await hb.running()
    monitor = monitor_of(hb)
    book = hb.engine.heartbeats
    await beat(book, hb, record.id)
    book.stream_closed(record.id)
    await book.flush()
    assert await monitor.check_once() == 0 and monitor.reads == 0  # it started less than a timeout ago


async def test_an_instance_that_never_beat_is_left_to_the_backstop_listing(hb: Harness) -> None:
    beating, silent = await hb.running(), await hb.running()
    monitor = monitor_of(hb)
    await hb.pass_time(10)
    await beat(hb.engine.heartbeats, hb, beating.id)
    await hb.model.crash(silent.machine_id)
    await hb.pass_time(1)
    assert await monitor.check_once() == 0 and monitor.reads == 0  # it never beat: not the monitor's
    detector = hb.engine.detector
    assert isinstance(detector, BackstopDetector)
    detector.wake = hb.woken.append
    hb.woken.clear()
    assert await detector.poll_once() == 1
    assert hb.woken == [silent.id]


async def test_the_backstop_lists_unbeaten_apps_first_then_a_rotating_slice(hb: Harness) -> None:
    detector = hb.engine.detector
    assert isinstance(detector, BackstopDetector)
    now = hb.clock.now()
    records = [_rec(f"ins_{i}", f"app-{i}") for i in range(6)]
    beats = {f"ins_{i}": now for i in range(2, 6)}  # ins_0 and ins_1 never beat
    first = detector.plan(records, beats, budget=3)
    second = detector.plan(records, beats, budget=3)
    assert first[:2] == ["app-0", "app-1"] and second[:2] == ["app-0", "app-1"]
    assert len(first) == len(second) == 3 and first[2] != second[2]  # the beating apps take turns


def _rec(instance_id: str, app: str) -> Any:
    from types import SimpleNamespace

    return SimpleNamespace(id=instance_id, app_name=app, machine_id="m_" + instance_id)


async def test_beats_taken_by_an_api_process_reach_an_engine_through_the_database(
        hb: Harness, tmp_path: Any) -> None:
    record = await hb.running()
    api = Engine(engine_settings(tmp_path, secrets_key=hb.engine.settings.secrets_key, **BEATS), hb.store,
                 hb.model.client, hb.clock, worker_id="api", role="api", prober=hb.model.prober)
    try:
        await api.start()
        assert not api.started  # an API-only process runs no monitor, no reconcile
        monitor = monitor_of(hb)  # the engine's
        await hb.pass_time(10)
        await beat(api.heartbeats, hb, record.id)  # the beat lands on the API process
        assert hb.engine.heartbeats.age(record.id) is None  # the engine never saw it in memory
        await hb.pass_time(5)
        assert await monitor.check_once() == 0 and monitor.reads == 0  # the database says it beat 5 s ago
        await hb.model.crash(record.machine_id)
        await hb.pass_time(5)
        assert await monitor.check_once() == 1 and hb.woken == [record.id]
    finally:
        await api.stop()


async def test_a_recovered_instance_is_watched_on_its_new_machine(hb: Harness) -> None:
    record = await hb.running()
    monitor = monitor_of(hb)
    await hb.pass_time(10)
    await beat(hb.engine.heartbeats, hb, record.id)
    await hb.model.crash(record.machine_id)
    await hb.pass_time(9)
    assert await monitor.check_once() == 1
    for _ in range(10):
        current = await hb.reconcile(record.id)
        if current.status == Status.RUNNING and current.machine_id != record.machine_id:
            break
        await hb.pass_time(5)
    current = hb.get(record.id)
    assert current.status == Status.RUNNING and current.machine_id != record.machine_id
    assert await monitor.check_once() == 0  # the new machine is within its first-beat grace


async def test_silence_from_before_an_engine_started_waits_for_the_senders_to_reconnect(
        make_harness: Callable[..., Harness]) -> None:
    first = make_harness(**BEATS)
    record = await first.running()
    await first.pass_time(10)
    await beat(first.engine.heartbeats, first, record.id)
    await first.pass_time(30)  # sandkeep was down: nothing beat for 30 s
    restarted = make_harness(**BEATS)  # a new engine process
    monitor = monitor_of(restarted)
    assert await monitor.check_once() == 0 and monitor.reads == 0  # its senders may still be reconnecting
    await first.model.crash(record.machine_id)
    await first.pass_time(monitor.grace.total_seconds())
    assert await monitor.check_once() == 1 and restarted.woken == [record.id]


def count_token_reads(h: Harness) -> list[list[str]]:
    """Every database read of gateway tokens the book makes from now on (the ids each asked for)."""
    reads: list[list[str]] = []
    real = h.store.heartbeat_tokens

    def spy(ids: list[str]) -> dict[str, str]:
        reads.append(list(ids))
        return real(ids)

    h.store.heartbeat_tokens = spy  # type: ignore[method-assign]
    return reads


async def test_wrong_tokens_for_a_real_instance_cost_one_database_read_per_recheck(hb: Harness) -> None:
    record = await hb.running()
    book = hb.engine.heartbeats
    good = hb.engine.ctx.gateway_token(record)
    reads = count_token_reads(hb)
    await book.authenticate(record.id, good)
    assert reads == [[record.id]]  # the first beat reads the token once
    for i in range(200):  # an attacker guessing tokens for a known instance id
        with pytest.raises(BeatRefused) as exc:
            await book.authenticate(record.id, f"guess-{i}")
        assert exc.value.code == "heartbeat_unauthorized"
    assert len(reads) == 1, "guesses within the recheck interval re-read nothing"
    await book.authenticate(record.id, good)  # the real gateway is not locked out by the guesses
    await hb.clock.sleep(hb.engine.settings.heartbeat_auth_recheck)
    with pytest.raises(BeatRefused):
        await book.authenticate(record.id, "guess-late")
    assert len(reads) == 2, "after the recheck interval one guess may re-read (the token could have rotated)"


async def test_unknown_instance_ids_are_read_once_each_even_at_once(hb: Harness) -> None:
    book = hb.engine.heartbeats
    reads = count_token_reads(hb)
    ids = [f"ins_forged{i}" for i in range(20)]

    async def forged(ident: str) -> str:
        try:
            await book.authenticate(ident, "x" * 43)
        except BeatRefused as exc:
            return exc.code
        return "accepted"

    codes = await asyncio.gather(*(forged(ident) for ident in ids * 10))
    assert set(codes) == {"heartbeat_unauthorized"}
    assert sorted(i for read in reads for i in read) == sorted(ids), "one read per forged id, shared by its beats"


async def test_a_rotated_token_is_taken_once_the_recheck_allows_a_read(hb: Harness) -> None:
    record = await hb.running()
    book = hb.engine.heartbeats
    old = hb.engine.ctx.gateway_token(record)
    await book.authenticate(record.id, old)
    await hb.service.rotate_gateway_token(ADMIN, record.id)
    new = hb.engine.ctx.gateway_token(hb.get(record.id))
    with pytest.raises(BeatRefused):
        await book.authenticate(record.id, "guess")  # a guess just now: the recheck window is fresh
    await hb.clock.sleep(hb.engine.settings.heartbeat_auth_recheck)
    await book.authenticate(record.id, new)  # the new machine's gateway gets in (its sender retries anyway)
    with pytest.raises(BeatRefused):
        await book.authenticate(record.id, old)


async def test_two_engines_split_the_silent_machines_and_a_dead_engines_share_passes_on(hb: Harness) -> None:
    records = [await hb.running() for _ in range(8)]
    settings, store = hb.engine.settings, hb.store
    woken: list[str] = []
    a, b = (HeartbeatMonitor(settings, store, hb.model.client, hb.clock, woken.append, engine_id=name)
            for name in ("eng-a", "eng-b"))
    await hb.pass_time(60)  # past the new machines' grace and the monitors' start-up grace
    for r in records:
        await beat(hb.engine.heartbeats, hb, r.id)
    await hb.pass_time(9)  # 9 s of silence > the 8 s timeout; every machine is still started
    for name in ("eng-a", "eng-b"):
        store.engine_heartbeat(name, "engine", hb.clock.now(), 5.0)
    assert store.live_engine_ids(hb.clock.now()) == ["eng-a", "eng-b"]
    read: dict[str, list[str]] = {"eng-a": [], "eng-b": []}
    real = hb.model.client.get_machine

    async def counting(monitor: HeartbeatMonitor) -> None:
        async def get_machine(app: str, machine_id: str) -> Any:
            read[str(monitor.engine_id)].append(machine_id)
            return await real(app, machine_id)

        hb.model.client.get_machine = get_machine  # type: ignore[method-assign]
        try:
            await monitor.check_once()
        finally:
            hb.model.client.get_machine = real  # type: ignore[method-assign]

    await counting(a)
    await counting(b)
    machines = [r.machine_id for r in records]
    assert sorted(read["eng-a"] + read["eng-b"]) == sorted(machines), "each silent machine read once, by one engine"
    assert woken == []
    # eng-b stops beating: once its registration expires, eng-a reads eng-b's share too
    await hb.pass_time(6)
    store.engine_heartbeat("eng-a", "engine", hb.clock.now(), 5.0)
    assert store.live_engine_ids(hb.clock.now()) == ["eng-a"]
    before = list(read["eng-a"])
    await counting(a)
    assert sorted(before + read["eng-a"][len(before):]) == sorted(machines)
