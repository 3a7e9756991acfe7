"""The engine against Fly's behaviour where it differs from the obvious (issue 8), on the one provider model.

The host follows Fly (README "Fidelity to Fly"): an update (re)launches the machine unless skip_launch. Where Fly
answers in a way the host does not (a start of a machine already on its way up refused with 412 "unable to start
machine from current state"; a fork refused for its source's host), the answer is Fly's, given at the model's
HTTP edge (:meth:`~tests.support.model.Model.refuse`).
"""

from __future__ import annotations

from typing import Any

from sandkeep.store.records import Status
from tests.engine.conftest import USER, Harness


def _calls(h: Harness, machine_id: str | None, since: int) -> list[str]:
    """What was asked of the machine since request ``since``: "update", "start", ..."""
    base = f"/machines/{machine_id}"
    out = []
    for method, path in h.model.requests[since:]:
        if method == "POST" and path.endswith(base):
            out.append("update")
        elif method == "POST" and base + "/" in path:
            out.append(path.rsplit("/", 1)[1])
    return out


async def _stopped_with_new_config(h: Harness) -> tuple[Any, int]:
    rec = await h.running()
    await h.service.stop(USER, rec.id)
    assert (await h.reconcile(rec.id)).status == Status.STOPPED
    await h.service.update_config(USER, rec.id, env={"NEW": "yes"})
    return rec, len(h.model.requests)


async def test_start_with_new_config_relies_on_the_updates_launch(h: Harness) -> None:
    rec, since = await _stopped_with_new_config(h)
    await h.service.start(USER, rec.id)
    final = await h.reconcile(rec.id)
    assert final.status == Status.RUNNING
    assert h.model.config(final.machine_id)["env"]["NEW"] == "yes"
    calls = _calls(h, rec.machine_id, since)
    assert "update" in calls and "start" not in calls, calls  # no start colliding with the launch
    assert "instance.start_failed" not in h.events(final.id)


async def test_restart_of_a_stopped_machine_with_new_config_relies_on_the_launch(h: Harness) -> None:
    rec, since = await _stopped_with_new_config(h)
    await h.service.restart(USER, rec.id)
    final = await h.reconcile(rec.id)
    assert final.status == Status.RUNNING
    calls = _calls(h, rec.machine_id, since)
    assert "update" in calls and "start" not in calls, calls


async def test_an_update_that_does_not_launch_is_followed_by_a_start(h: Harness) -> None:
    # should Fly leave the updated machine stopped after all, the level-triggered rules start it
    rec, since = await _stopped_with_new_config(h)
    client = h.model.client
    real_update = client.update_machine

    async def update_without_launch(app: str, mid: str, **kw: Any) -> Any:
        return await real_update(app, mid, config=kw["config"], skip_launch=True)

    client.update_machine = update_without_launch  # type: ignore[method-assign]
    try:
        await h.service.start(USER, rec.id)
        final = await h.reconcile(rec.id)
    finally:
        del client.update_machine
    assert final.status == Status.RUNNING
    assert _calls(h, rec.machine_id, since).count("start") == 1


async def test_a_start_that_finds_the_machine_already_starting_is_no_failure(h: Harness) -> None:
    rec = await h.running()
    await h.service.stop(USER, rec.id)
    await h.reconcile(rec.id)
    h.model.host.opt.delays["machine.boot"] = 100.0  # still starting after the pass's 60 s wait
    client = h.model.client
    real_start = client.start_machine

    async def start_racing_a_launch(app: str, mid: str) -> Any:
        await h.model.host.start_machine(app, mid)  # launched a moment earlier (e.g. by an update's launch)
        h.model.refuse("POST", f"/machines/{mid}/start", 412, "unable to start machine from current state: "
                                                              "'starting'")  # what Fly answers then
        return await real_start(app, mid)

    client.start_machine = start_racing_a_launch  # type: ignore[method-assign]
    try:
        await h.service.start(USER, rec.id)
        mid = await h.reconcile(rec.id)
    finally:
        del client.start_machine
    assert mid.status == Status.STARTING and "instance.start_failed" not in h.events(rec.id), h.events(rec.id)
    await h.model.settle(rec.machine_id, "started")
    assert (await h.reconcile(rec.id)).status == Status.RUNNING


async def test_a_missing_volume_answer_never_forgets_the_machine(h: Harness) -> None:
    rec, _since = await _stopped_with_new_config(h)
    h.model.refuse("POST", f"/machines/{rec.machine_id}", 400, "invalid_argument: volume does not exist")
    await h.service.start(USER, rec.id)
    final = await h.reconcile(rec.id)
    assert final.status == Status.STOPPED
    assert final.machine_id == rec.machine_id
    assert h.model.state(final.machine_id) == "stopped"  # still there, still ours
    assert h.event(final.id, "instance.start_failed").label == "update_failed"


async def test_a_fork_refused_for_an_unreachable_host_restores_the_newest_snapshot(h: Harness) -> None:
    rec = await h.running()
    await h.put(rec.id, "f", b"old")
    await h.model.snapshot(rec.volume_id)
    # the volume still says host_status "ok"; only the fork's answer tells (and not in the word "unreachable")
    h.model.refuse("POST", f"/apps/{rec.app_name}/volumes", 412,
                   "failed_precondition: source volume's host is unavailable")
    await h.model.crash(rec.machine_id)
    final = await h.reconcile(rec.id)
    assert final.status == Status.RUNNING and final.volume_id != rec.volume_id, h.events(rec.id)
    assert h.model.data(final.volume_id) == {"f": b"old"}
    assert h.event(rec.id, "instance.restored_from_snapshot").details["data_loss"] is True
