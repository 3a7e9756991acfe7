"""Admin pages: access control, fleet counts/filters/pagination/charts, instance detail, actions, audit."""

from __future__ import annotations

import re
from datetime import timedelta

from sandkeep.store.records import Status
from sandkeep.web import charts
from tests.support.fake_service import FakeRuntime
from tests.web.conftest import Login, csrf_of

HX = {"HX-Request": "true"}
ADMIN_PAGES = ("/ui/admin/", "/ui/admin/live", "/ui/admin/audit", "/ui/admin/instances/ins_a1",
               "/ui/admin/instances/ins_a1/live", "/ui/admin/instances/ins_a1/restore")


def field(html: str, name: str) -> str:
    match = re.search(rf'<dd data-field="{name}">(.*?)</dd>', html, re.S)
    assert match, f"no field {name}"
    return re.sub(r"<[^>]+>", "", match.group(1)).strip()


async def test_non_admins_get_403(rt: FakeRuntime, login: Login) -> None:
    rt.service.put("ins_a1", "alice")
    for role in ("user", "platform"):
        client = await login("alice", role)
        for path in ADMIN_PAGES:
            r = await client.get(path)
            assert r.status_code == 403, (role, path)
            assert "Admins only" in r.text
        csrf = csrf_of((await client.get("/ui/")).text)
        r = await client.post("/ui/admin/instances/ins_a1/destroy-machine", data={"csrf_token": csrf,
                                                                              "confirm": "yes"})
        assert r.status_code == 403
    assert rt.service.calls == []


async def test_admin_navigation_only_for_admins(login: Login) -> None:
    user = await login("alice", "user")
    assert 'href="/ui/admin/"' not in (await user.get("/ui/")).text
    admin = await login("root", "admin")
    html = (await admin.get("/ui/")).text
    assert 'href="/ui/admin/"' in html and 'href="/ui/admin/audit"' in html


async def test_fleet_counts_and_recovering_now(rt: FakeRuntime, login: Login) -> None:
    rt.service.put("ins_1", "alice")
    rt.service.put("ins_2", "bob")
    rt.service.put("ins_3", "bob", Status.RECOVERING, recovery_started_at=rt.clock.now() - timedelta(minutes=2),
                   recovery_step="create_machine")
    rt.service.put("ins_4", "carol", Status.STOPPED)
    admin = await login("root", "admin")
    html = (await admin.get("/ui/admin/")).text
    counts = dict(re.findall(r'data-count-status="(\w+)"><span class="tile-n">(\d+)</span>', html))
    assert counts["running"] == "2" and counts["recovering"] == "1" and counts["stopped"] == "1"
    assert counts["destroying"] == "0"
    recovering = html[html.index('data-testid="recovering-now"'):html.index('data-testid="recovery-chart"')]
    assert "ins_3" in recovering and "2 min ago" in recovering and "create_machine" in recovering
    assert "ins_1" not in recovering


async def test_fleet_filters_and_pagination(rt: FakeRuntime, login: Login) -> None:
    for i in range(30):
        rt.service.put(f"ins_{i:02d}", "alice" if i % 2 else "bob", region="lcl-b" if i < 10 else "lcl-a")
    rt.service.put("ins_x", "bob", Status.STOPPED)
    admin = await login("root", "admin")

    def rows(html: str) -> list[str]:
        table = html[html.index('data-testid="instance-table"'):]
        return re.findall(r'<tr data-instance="([^"]+)">', table)

    first = (await admin.get("/ui/admin/")).text
    assert len(rows(first)) == 25
    nxt = re.search(r'href="/ui/admin/(\?[^"]+)" rel="next"', first)
    assert nxt
    second = (await admin.get("/ui/admin/" + nxt.group(1).replace("&amp;", "&"))).text
    assert len(rows(second)) == 6 and not set(rows(first)) & set(rows(second))
    prev = re.search(r'href="/ui/admin/(\?[^"]*)" rel="prev"', second)
    assert prev
    back = (await admin.get("/ui/admin/" + prev.group(1).replace("&amp;", "&"))).text
    assert rows(back) == rows(first)
    by_status = (await admin.get("/ui/admin/?status=stopped")).text
    assert rows(by_status) == ["ins_x"]
    by_user_region = (await admin.get("/ui/admin/?user=alice&region=lcl-b")).text
    assert rows(by_user_region) == ["ins_01", "ins_03", "ins_05", "ins_07", "ins_09"]
    bad = await admin.get("/ui/admin/?cursor=garbage")
    assert bad.status_code == 200 and "not valid any more" in bad.text


async def test_fleet_charts_count_recovery_events(rt: FakeRuntime, login: Login) -> None:
    now = rt.clock.now()
    for minutes in (10, 70, 130):
        rt.service.event(charts.STARTED, "ins_1", at=now - timedelta(minutes=minutes))
    rt.service.event(charts.SUCCEEDED, "ins_1", at=now - timedelta(minutes=9), duration_ms=7000)
    rt.service.event(charts.SUCCEEDED, "ins_1", at=now - timedelta(minutes=69), duration_ms=45000)
    rt.service.event(charts.FAILED, "ins_1", at=now - timedelta(minutes=120), duration_ms=600500)
    rt.service.event(charts.STARTED, "ins_1", at=now - timedelta(days=3))  # outside 24 h
    admin = await login("root", "admin")
    html = (await admin.get("/ui/admin/")).text
    chart = re.search(r'<svg class="chart"[^>]*aria-labelledby="rc-title rc-desc"[^>]*>', html)
    assert chart
    assert 'data-started="3"' in chart.group(0) and 'data-succeeded="2"' in chart.group(0)
    assert 'data-failed="1"' in chart.group(0)
    assert 'data-total="3"' in html  # histogram of finished recoveries
    assert "5-10 s: 1" in html and "30-60 s: 1" in html and "&gt; 10 min: 1" in html
    week = (await admin.get("/ui/admin/?window=7d")).text
    assert 'data-started="4"' in week


async def test_detail_recovery_card_while_recovering(rt: FakeRuntime, login: Login) -> None:
    began = rt.clock.now() - timedelta(minutes=3)
    rt.service.put("ins_a1", "alice", Status.RECOVERING, recovery_started_at=began,
                   pending_recovery_volume_id="vol_new", retained_volume_id="vol_old_prev",
                   retained_volume_cleanup_after=rt.clock.now() + timedelta(days=6),
                   alarm_at=rt.clock.now(), lease_owner="worker-1", secrets_encrypted={"API_KEY": "gAAAA..."})
    rt.service.event("instance.unexpected_stop_recovery_started", "ins_a1", at=began, label="alarm_stopped")
    admin = await login("root", "admin")
    r = await admin.get("/ui/admin/instances/ins_a1")
    assert r.status_code == 200
    html = r.text
    assert field(html, "recovery_state").startswith("Recovering now")
    assert field(html, "recovery_started_at").startswith("3 min ago")
    assert "UTC" in field(html, "recovery_started_at")
    assert field(html, "pending_recovery_volume_id") == "vol_new"
    assert field(html, "retained_volume_id") == "vol_old_prev"
    assert field(html, "retained_volume_cleanup_after").startswith("in 6 days")
    cleanup = re.search(r'<button[^>]*id="cleanup-ins_a1"[^>]*>', html)
    assert cleanup and "disabled" in cleanup.group(0) and "recovering" in cleanup.group(0)
    assert "Delete retained volume unavailable: Refused while the instance is recovering." in html
    assert 'data-field="alarm_at"' in html and 'data-field="lease_owner"' in html and "worker-1" in html
    assert "gAAAA" not in html and "(1 hidden)" in html
    assert "instance.unexpected_stop_recovery_started" in html and "alarm_stopped" in html


async def test_cleanup_button_only_when_a_volume_is_retained(rt: FakeRuntime, login: Login) -> None:
    rt.service.put("ins_a1", "alice")
    admin = await login("root", "admin")
    html = (await admin.get("/ui/admin/instances/ins_a1")).text
    assert "cleanup-ins_a1" not in html
    assert field(html, "retained_volume_id") == "—"
    assert field(html, "recovery_state") == "No recovery in progress"


async def test_delete_retained_volume_flow(rt: FakeRuntime, login: Login) -> None:
    rt.service.put("ins_a1", "alice", retained_volume_id="vol_old",
                   retained_volume_cleanup_after=rt.clock.now() + timedelta(days=7))
    admin = await login("root", "admin")
    html = (await admin.get("/ui/admin/instances/ins_a1")).text
    cleanup = re.search(r'<button[^>]*id="cleanup-ins_a1"[^>]*>', html)
    assert cleanup and "disabled" not in cleanup.group(0)
    assert 'hx-confirm="Delete retained volume vol_old of ins_a1?' in html
    csrf = csrf_of(html)
    # without confirmation nothing happens; the plain form shows a confirmation page
    page = await admin.post("/ui/admin/instances/ins_a1/cleanup-retained-volume", data={"csrf_token": csrf})
    assert "Please confirm" in page.text
    assert rt.service.calls == []
    r = await admin.post("/ui/admin/instances/ins_a1/cleanup-retained-volume",
                         data={"csrf_token": csrf, "confirm": "yes"}, headers=HX)
    assert "Deleted retained volume vol_old of ins_a1" in r.text
    assert rt.service.calls == [("cleanup_retained_volume", "root", "ins_a1")]
    after = (await admin.get("/ui/admin/instances/ins_a1")).text
    assert field(after, "retained_volume_id") == "—" and "cleanup-ins_a1" not in after
    assert "retained_volume_cleanup" in after  # the audit entry on the detail page
    audit = (await admin.get("/ui/admin/audit")).text
    assert re.search(r'<tr data-action="retained_volume_cleanup">.*?root.*?ins_a1.*?outcome-ok', audit, re.S)
    assert "vol_old" in audit


async def test_refused_cleanup_shows_the_error(rt: FakeRuntime, login: Login) -> None:
    rt.service.put("ins_a1", "alice", Status.RECOVERING, retained_volume_id="vol_old")
    admin = await login("root", "admin")
    csrf = csrf_of((await admin.get("/ui/admin/instances/ins_a1")).text)
    r = await admin.post("/ui/admin/instances/ins_a1/cleanup-retained-volume",
                         data={"csrf_token": csrf, "confirm": "yes"})
    assert r.status_code == 409
    assert "cleanup is refused" in r.text and "flash-error" in r.text
    assert rt.service.instances["ins_a1"].retained_volume_id == "vol_old"


async def test_cleanup_disabled_while_one_runs(rt: FakeRuntime, login: Login) -> None:
    rt.service.put("ins_a1", "alice", retained_volume_id="vol_old")
    admin = await login("root", "admin")
    seen: list[str] = []

    original = rt.service.cleanup_retained_volume

    async def observing(actor: object, instance_id: str) -> str | None:
        seen.append((await admin.get("/ui/admin/instances/ins_a1")).text)  # page while the cleanup runs
        return await original(actor, instance_id)  # type: ignore[arg-type]

    rt.service.cleanup_retained_volume = observing  # type: ignore[method-assign]
    csrf = csrf_of((await admin.get("/ui/admin/instances/ins_a1")).text)
    r = await admin.post("/ui/admin/instances/ins_a1/cleanup-retained-volume",
                         data={"csrf_token": csrf, "confirm": "yes"}, headers=HX)
    assert "Deleted retained volume vol_old" in r.text
    during = re.search(r'<button[^>]*id="cleanup-ins_a1"[^>]*>', seen[0])
    assert during and "disabled" in during.group(0) and "A cleanup of this volume is running." in seen[0]


async def test_retry_and_destroy_machine(rt: FakeRuntime, login: Login) -> None:
    rt.service.put("ins_a1", "alice", Status.STOPPED, last_recovery_error="boom")
    admin = await login("root", "admin")
    csrf = csrf_of((await admin.get("/ui/admin/instances/ins_a1")).text)
    r = await admin.post("/ui/admin/instances/ins_a1/retry-recovery", data={"csrf_token": csrf}, headers=HX)
    assert "Recovery of ins_a1 scheduled" in r.text
    confirm = await admin.post("/ui/admin/instances/ins_a1/destroy-machine", data={"csrf_token": csrf})
    assert "Please confirm" in confirm.text and "m_ins_a1" in confirm.text
    r = await admin.post("/ui/admin/instances/ins_a1/destroy-machine", data={"csrf_token": csrf, "confirm": "yes"})
    assert r.status_code == 200 and "Destroyed the machine of ins_a1" in r.text
    assert [c[0] for c in rt.service.calls] == ["retry_recovery", "destroy_machine"]
    html = (await admin.get("/ui/admin/instances/ins_a1")).text
    b = re.search(r'<button[^>]*id="destroy-machine-ins_a1"[^>]*>', html)
    assert b and "disabled" in b.group(0) and "There is no machine to destroy." in html


async def test_admin_actions_need_csrf(rt: FakeRuntime, login: Login) -> None:
    rt.service.put("ins_a1", "alice", retained_volume_id="vol_old")
    admin = await login("root", "admin")
    for action in ("cleanup-retained-volume", "retry-recovery", "destroy-machine"):
        r = await admin.post(f"/ui/admin/instances/ins_a1/{action}", data={"confirm": "yes"}, headers=HX)
        assert r.status_code == 403, action
    assert rt.service.calls == []


async def test_unknown_instance_detail_is_404(login: Login) -> None:
    admin = await login("root", "admin")
    r = await admin.get("/ui/admin/instances/ins_nope")
    assert r.status_code == 404 and "There is no instance ins_nope" in r.text
    live = await admin.get("/ui/admin/instances/ins_nope/live", headers=HX)
    assert live.status_code == 286  # tells htmx to stop polling


async def test_audit_log_paginates(rt: FakeRuntime, login: Login) -> None:
    from sandkeep.engine.service import Actor

    rt.service.put("ins_a1", "alice")
    for _ in range(60):
        rt.clock.advance(1)
        await rt.service.retry_recovery(Actor("root", "admin"), "ins_a1")
    admin = await login("root", "admin")
    first = (await admin.get("/ui/admin/audit")).text
    assert first.count('<tr data-action="retry_recovery">') == 50
    nxt = re.search(r'href="/ui/admin/audit(\?[^"]+)" rel="next"', first)
    assert nxt
    second = (await admin.get("/ui/admin/audit" + nxt.group(1).replace("&amp;", "&"))).text
    assert second.count('<tr data-action="retry_recovery">') == 10
    assert 'rel="prev"' in second


async def test_charts_refresh_after_their_cache_interval(rt: FakeRuntime, login: Login) -> None:
    admin = await login("root", "admin")
    assert 'data-started="0"' in (await admin.get("/ui/admin/")).text
    rt.service.event(charts.STARTED, "ins_1")
    assert 'data-started="0"' in (await admin.get("/ui/admin/live", headers=HX)).text  # polls reuse them
    assert 'data-started="1"' in (await admin.get("/ui/admin/")).text  # a page load recomputes
    rt.service.event(charts.STARTED, "ins_1")
    assert 'data-started="1"' in (await admin.get("/ui/admin/live", headers=HX)).text
    rt.clock.advance(max(5.0, 5 * rt.settings.web_poll_interval) + 1)
    assert 'data-started="2"' in (await admin.get("/ui/admin/live", headers=HX)).text


async def test_admin_destroy_while_recovering_is_forced(rt: FakeRuntime, login: Login) -> None:
    rt.service.put("ins_a1", "alice", Status.RECOVERING)
    admin = await login("root", "admin")
    html = (await admin.get("/ui/admin/instances/ins_a1")).text
    b = re.search(r'<button[^>]*id="destroy-ins_a1"[^>]*>', html)
    assert b and "disabled" not in b.group(0)
    assert 'hx-confirm="Force-destroy instance ins_a1 while it is recovering?' in html
    r = await admin.post("/ui/instances/ins_a1/destroy", data={"csrf_token": csrf_of(html), "confirm": "yes"},
                         headers=HX)
    assert "Destroy started for ins_a1 (forced)" in r.text
    assert rt.service.instances["ins_a1"].status == Status.DESTROYING


async def test_cleanup_disabled_while_the_engines_automatic_cleanup_runs(rt: FakeRuntime, login: Login) -> None:
    now = rt.clock.now()
    rt.service.put("ins_a1", "alice", retained_volume_id="vol_old",
                   retained_volume_cleanup_after=now - timedelta(seconds=5),
                   lease_owner="worker-1", lease_expires_at=now + timedelta(seconds=20))
    admin = await login("root", "admin")
    page = (await admin.get("/ui/admin/instances/ins_a1")).text
    button = re.search(r'<button[^>]*id="cleanup-ins_a1"[^>]*>', page)
    assert button and "disabled" in button.group(0)
    assert "The automatic cleanup of this volume is running now" in page
    # the deadline passed but nobody holds the lease (e.g. the cleanup keeps failing): the admin may act
    rt.service.instances["ins_a1"] = rt.service.instances["ins_a1"].copy(lease_owner=None, lease_expires_at=None)
    page = (await admin.get("/ui/admin/instances/ins_a1")).text
    button = re.search(r'<button[^>]*id="cleanup-ins_a1"[^>]*>', page)
    assert button and "disabled" not in button.group(0)


async def test_dead_host_card_and_approve_button(rt: FakeRuntime, login: Login) -> None:
    rt.service.put("ins_a1", "alice", suspect_since=rt.clock.now(), suspect_reason="host_unreachable",
                   restore_approval="awaiting", fenced_machine_id="m_old", flagged_volume_ids=["vol_flag"],
                   incident_note="The host of this instance stopped answering.")
    admin = await login("root", "admin")
    html = (await admin.get("/ui/admin/instances/ins_a1")).text
    assert "needs approval" in html and "vol_flag" in html and "m_old" in html
    csrf = csrf_of(html)
    confirm = await admin.post("/ui/admin/instances/ins_a1/approve-restore", data={"csrf_token": csrf})
    assert "Please confirm" in confirm.text and rt.service.calls == []
    assert "newest snapshot" in confirm.text and "Approve snapshot restore" in confirm.text
    r = await admin.post("/ui/admin/instances/ins_a1/approve-restore", data={"csrf_token": csrf, "confirm": "yes"},
                         headers=HX)
    assert "Snapshot restore of ins_a1 approved" in r.text
    assert [c[0] for c in rt.service.calls] == ["approve_restore"]
    after = (await admin.get("/ui/admin/instances/ins_a1")).text
    assert 'id="approve-restore-ins_a1"' not in after
    # the owner reads what happened in plain words
    owner = await login("alice", "user")
    page = (await owner.get("/ui/")).text
    assert "The host of this instance stopped answering." in page


async def test_restore_from_a_flagged_volume_and_delete_it(rt: FakeRuntime, login: Login) -> None:
    """The dead-host card's buttons: restore from the flagged (or retained) volume, delete the flagged one; each
    asks for a confirmation first and needs the form's CSRF token."""
    rt.service.put("ins_a1", "alice", volume_id="vol_new", flagged_volume_ids=["vol_flag"],
                   retained_volume_id="vol_kept", retained_volume_cleanup_after=rt.clock.now() + timedelta(days=7))
    admin = await login("root", "admin")
    html = (await admin.get("/ui/admin/instances/ins_a1")).text
    for button in ("restore-volume-vol_flag", "delete-flagged-vol_flag", "restore-volume-vol_kept",
                   "restore-page-ins_a1"):
        assert f'id="{button}"' in html, button
    assert 'hx-confirm="Delete flagged volume vol_flag of ins_a1?' in html
    csrf = csrf_of(html)
    # no CSRF token: refused, nothing done
    r = await admin.post("/ui/admin/instances/ins_a1/restore", data={"volume_id": "vol_flag", "confirm": "yes"})
    assert r.status_code == 403 and rt.service.calls == []
    # the plain form shows a confirmation that carries the chosen volume on
    page = await admin.post("/ui/admin/instances/ins_a1/restore", data={"csrf_token": csrf, "volume_id": "vol_flag"})
    assert "Please confirm" in page.text and "volume vol_flag" in page.text and rt.service.calls == []
    assert '<input type="hidden" name="volume_id" value="vol_flag">' in page.text
    r = await admin.post("/ui/admin/instances/ins_a1/restore", data={"csrf_token": csrf_of(page.text),
                                                                     "volume_id": "vol_flag", "confirm": "yes"})
    assert r.status_code == 200 and "Restore of ins_a1 from volume vol_flag started" in r.text
    assert rt.service.restores == [{"snapshot_id": None, "volume_id": "vol_flag"}]
    confirm = await admin.post("/ui/admin/instances/ins_a1/delete-flagged-volume",
                               data={"csrf_token": csrf, "volume_id": "vol_flag"})
    assert "Please confirm" in confirm.text and "newer than the snapshot" in confirm.text
    assert [c[0] for c in rt.service.calls] == ["restore_volume"]
    r = await admin.post("/ui/admin/instances/ins_a1/delete-flagged-volume",
                         data={"csrf_token": csrf, "volume_id": "vol_flag", "confirm": "yes"}, headers=HX)
    assert "Deleted flagged volume vol_flag of ins_a1" in r.text
    assert [c[0] for c in rt.service.calls] == ["restore_volume", "delete_flagged_volume"]
    after = (await admin.get("/ui/admin/instances/ins_a1")).text
    assert 'id="delete-flagged-vol_flag"' not in after and 'id="restore-volume-vol_kept"' in after
    # a refusal from the service (not flagged) is shown, not a 500
    rt.service.delete_flagged_volume = _refuse  # type: ignore[method-assign]
    r = await admin.post("/ui/admin/instances/ins_a1/delete-flagged-volume",
                         data={"csrf_token": csrf, "volume_id": "vol_other", "confirm": "yes"}, headers=HX)
    assert "Delete flagged volume failed for ins_a1: vol_other is not a flagged volume" in r.text
    assert r.headers["X-Sandkeep-Status"] == "400"


async def _refuse(actor: object, instance_id: str, volume_id: str) -> str:
    from sandkeep.engine.service import InvalidArgument

    raise InvalidArgument(f"{volume_id} is not a flagged volume")


async def test_restore_page_lists_snapshots_and_restores_one(rt: FakeRuntime, login: Login) -> None:
    rt.service.put("ins_a1", "alice", volume_id="vol_cur", flagged_volume_ids=["vol_flag"])
    rt.service.snapshots = [
        {"volume_id": "vol_cur", "volume_role": "current", "snapshot_id": "vs_new",
         "created_at": "2026-11-30T09:00:00Z", "status": "created", "size": 10, "source_volume_size": 1},
        {"volume_id": "vol_flag", "volume_role": "flagged", "snapshot_id": "vs_old",
         "created_at": "2026-11-29T09:00:00Z", "status": "created", "size": 10, "source_volume_size": 1}]
    admin = await login("root", "admin")
    page = await admin.get("/ui/admin/instances/ins_a1/restore")
    assert page.status_code == 200
    assert 'id="restore-snapshot-vs_new"' in page.text and 'id="restore-snapshot-vs_old"' in page.text
    assert 'id="restore-kept-vol_flag"' in page.text and "vol_cur" in page.text
    confirm = await admin.post("/ui/admin/instances/ins_a1/restore",
                               data={"csrf_token": csrf_of(page.text), "snapshot_id": "vs_old"})
    assert "Please confirm" in confirm.text and "snapshot vs_old" in confirm.text
    assert rt.service.restores == []
    done = await admin.post("/ui/admin/instances/ins_a1/restore",
                            data={"csrf_token": csrf_of(confirm.text), "snapshot_id": "vs_old", "confirm": "yes"})
    assert "Restore of ins_a1 from snapshot vs_old started" in done.text
    assert rt.service.restores == [{"snapshot_id": "vs_old", "volume_id": None}]
    missing = await admin.get("/ui/admin/instances/ins_nope/restore")
    assert missing.status_code == 404


async def test_fleet_page_lists_orphans(rt: FakeRuntime, login: Login) -> None:
    now = rt.clock.now()
    rt.service.orphans = [{"kind": "volume", "id": "vol_leftover", "app_name": "sk-abc", "region": "lcl-a",
                           "instance_id": "ins_gone", "reason": "instance destroyed", "first_seen_at": now,
                           "last_seen_at": now, "deletes_at": now + timedelta(hours=24)}]
    admin = await login("root", "admin")
    html = (await admin.get("/ui/admin/")).text
    panel = re.search(r'<section[^>]*data-testid="orphans".*?</section>', html, re.S)
    assert panel, "no orphans panel"
    text = panel.group(0)
    assert "Orphans <span class=\"muted\">(1)</span>" in text
    assert 'data-orphan="vol_leftover"' in text and "sk-abc" in text and "instance destroyed" in text
    assert 'href="/ui/admin/instances/ins_gone"' in text
