"""The engine against Fly's behaviour where it differs from the obvious (issue 8), on the in-memory provider.

The fake follows Fly: an update (re)launches the machine unless skip_launch, and a start of a machine already on
its way up is refused with 412 "unable to start machine from current state".
"""

from __future__ import annotations

import json
from typing import Any

from sandkeep.provider.errors import HostUnavailableError, classify
from sandkeep.store.records import Status
from tests.engine.conftest import USER, Harness


def _ops(h: Harness) -> list[str]:
    return [op for op, _ in h.fake.calls]


async def _stopped_with_new_config(h: Harness) -> Any:
    rec = await h.running()
    await h.service.stop(USER, rec.id)
    assert (await h.reconcile(rec.id)).status == Status.STOPPED
    await h.service.update_config(USER, rec.id, env={"NEW": "yes"})
    h.fake.calls.clear()
    return rec


async def test_start_with_new_config_relies_on_the_updates_launch(h: Harness) -> None:
    rec = await _stopped_with_new_config(h)
    await h.service.start(USER, rec.id)
    final = await h.reconcile(rec.id)
    assert final.status == Status.RUNNING
    assert h.fake.machines[final.machine_id].config.env["NEW"] == "yes"
    assert "update_machine" in _ops(h) and "start_machine" not in _ops(h)  # no start colliding with the launch
    assert "instance.start_failed" not in h.events(final.id)


async def test_restart_of_a_stopped_machine_with_new_config_relies_on_the_launch(h: Harness) -> None:
    rec = await _stopped_with_new_config(h)
    await h.service.restart(USER, rec.id)
    final = await h.reconcile(rec.id)
    assert final.status == Status.RUNNING
    assert "update_machine" in _ops(h) and "start_machine" not in _ops(h)


async def test_an_update_that_does_not_launch_is_followed_by_a_start(h: Harness) -> None:
    # should Fly leave the updated machine stopped after all, the level-triggered rules start it
    rec = await _stopped_with_new_config(h)
    real_update = h.fake.update_machine

    async def update_without_launch(app: str, mid: str, **kw: Any) -> Any:
        return await real_update(app, mid, config=kw["config"], skip_launch=True)

    h.fake.update_machine = update_without_launch  # type: ignore[method-assign,assignment]
    await h.service.start(USER, rec.id)
    final = await h.reconcile(rec.id)
    assert final.status == Status.RUNNING
    assert _ops(h).count("start_machine") == 1


async def test_a_start_that_finds_the_machine_already_starting_is_no_failure(h: Harness) -> None:
    rec = await h.running()
    await h.service.stop(USER, rec.id)
    await h.reconcile(rec.id)
    h.fake.boot = "slow"
    real_start = h.fake.start_machine

    async def start_racing_a_launch(app: str, mid: str) -> None:
        h.fake._boot(h.fake.machines[mid])  # launched a moment earlier (e.g. by an update's launch)
        await real_start(app, mid)  # Fly: 412 unable to start machine from current state: 'starting'

    h.fake.start_machine = start_racing_a_launch  # type: ignore[method-assign]
    await h.service.start(USER, rec.id)
    mid = await h.reconcile(rec.id)
    assert mid.status == Status.STARTING and "instance.start_failed" not in h.events(rec.id)
    h.fake.finish_boot(rec.machine_id)
    assert (await h.reconcile(rec.id)).status == Status.RUNNING


async def test_a_missing_volume_answer_never_forgets_the_machine(h: Harness) -> None:
    rec = await _stopped_with_new_config(h)
    body = json.dumps({"error": "invalid_argument: volume does not exist", "status": "unknown"})
    h.fake.fail_next("update_machine", classify(400, body, operation="update_machine"))
    await h.service.start(USER, rec.id)
    final = await h.reconcile(rec.id)
    assert final.status == Status.STOPPED
    assert final.machine_id == rec.machine_id
    assert h.fake.machines[final.machine_id].state == "stopped"  # still there, still ours
    assert h.event(final.id, "instance.start_failed").label == "update_failed"


async def test_a_fork_refused_for_an_unreachable_host_restores_the_newest_snapshot(h: Harness) -> None:
    rec = await h.running()
    h.fake.volumes[rec.volume_id].data["f"] = "old"
    await h.fake.create_snapshot(rec.app_name, rec.volume_id)
    # the volume still says host_status "ok"; only the fork's answer tells (and not in the word "unreachable")
    h.fake.fail_next("create_volume", HostUnavailableError("failed_precondition: source volume's host is unavailable",
                                                           status=412))
    h.fake.crash(rec.machine_id)
    final = await h.reconcile(rec.id)
    assert final.status == Status.RUNNING and final.volume_id != rec.volume_id
    assert h.fake.volumes[final.volume_id].data == {"f": "old"}
    assert h.event(rec.id, "instance.restored_from_snapshot").details["data_loss"] is True
