"""Issue 13's UI items: the owner page's Create form (CSRF like every form, the service's rules and codes), names
and labels on the cards, the fleet page's failed-recovery and retained-volume panels, and the recovery chart's
buckets fitted to the data with the time zone on its axis."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from sandkeep.store.records import EventRecord, Status
from sandkeep.web import charts
from tests.support.fake_service import FakeRuntime
from tests.web.conftest import Login, csrf_of

HX = {"HX-Request": "true"}


async def test_create_form_makes_an_instance_for_the_signed_in_user(rt: FakeRuntime, login: Login) -> None:
    client = await login("alice", "user")
    page = (await client.get("/ui/")).text
    assert 'id="create-form"' in page and 'action="/ui/instances"' in page
    assert '<option value="shared-cpu-1x" selected>' in page  # the sizes a user may pick, the default chosen
    r = await client.post("/ui/instances", data={"csrf_token": csrf_of(page), "name": "dev-box",
                                                 "labels": "team=ml, tier=gold", "size": "shared-cpu-2x"})
    assert r.status_code == 200 and "Created dev-box" in r.text
    [made] = rt.service.instances.values()
    assert (made.user_id, made.name, made.labels, made.machine_size) == (
        "alice", "dev-box", {"team": "ml", "tier": "gold"}, "shared-cpu-2x")
    assert rt.service.calls == [("create", "alice", None)]
    shown = (await client.get("/ui/")).text
    card = shown[shown.index(f'id="ins-{made.id}"'):]
    assert "dev-box" in card and "team=ml" in card and "tier=gold" in card


async def test_create_needs_the_csrf_token_and_a_signed_in_user(rt: FakeRuntime, login: Login,
                                                                 anon: object) -> None:
    client = await login("alice", "user")
    await client.get("/ui/")
    forged = await client.post("/ui/instances", data={"name": "x"})
    assert forged.status_code == 403 and "Form expired" in forged.text
    other = await login("bob", "user")
    stolen = await client.post("/ui/instances", data={"csrf_token": csrf_of((await other.get("/ui/")).text)})
    assert stolen.status_code == 403
    assert rt.service.instances == {} and rt.service.calls == []


async def test_create_refusals_show_the_services_message_and_make_nothing(rt: FakeRuntime, login: Login) -> None:
    client = await login("alice", "user")
    csrf = csrf_of((await client.get("/ui/")).text)
    bad_name = await client.post("/ui/instances", data={"csrf_token": csrf, "name": "Dev Box"}, headers=HX)
    assert 'data-status="422"' in bad_name.text and "invalid name" in bad_name.text
    bad_labels = await client.post("/ui/instances", data={"csrf_token": csrf, "labels": "no-equals-sign"})
    assert bad_labels.status_code == 422 and "must be key=value" in bad_labels.text
    assert 'id="create-form"' in bad_labels.text  # the form is there to try again
    assert rt.service.instances == {}


async def test_fleet_page_lists_failed_recoveries_and_retained_volumes(rt: FakeRuntime, login: Login) -> None:
    now = rt.clock.now()
    rt.service.put("ins_f1", "alice", Status.STOPPED, last_recovery_error="replacement machine gone",
                   last_recovery_error_at=now - timedelta(minutes=5))
    rt.service.put("ins_ok", "bob", Status.STOPPED)  # stopped by its owner: not a failed recovery
    rt.service.put("ins_r1", "carol", retained_volume_id="vol_old1",
                   retained_volume_cleanup_after=now + timedelta(days=6))
    rt.service.put("ins_r2", "dave", retained_volume_id="vol_old2",
                   retained_volume_cleanup_after=now - timedelta(hours=2))
    admin = await login("root", "admin")
    html = (await admin.get("/ui/admin/")).text
    failed = re.search(r'data-testid="failed-recoveries".*?</section>', html, re.S)
    retained = re.search(r'data-testid="retained-volumes".*?</section>', html, re.S)
    assert failed and retained
    assert "ins_f1" in failed.group(0) and "replacement machine gone" in failed.group(0)
    assert "ins_ok" not in failed.group(0) and "(1)" in failed.group(0)
    r = retained.group(0)
    assert "(2)" in r and r.index("ins_r2") < r.index("ins_r1")  # overdue first
    assert re.search(r'data-instance="ins_r2" data-overdue="yes"', r) and "vol_old1" in r
    assert 'data-instance="ins_r1" data-overdue' not in r


NOW = datetime(2026, 3, 1, 12, 30, tzinfo=UTC)


def _started(minutes_ago: float) -> EventRecord:
    return EventRecord(event=charts.STARTED, instance_id="ins_1", at=NOW - timedelta(minutes=minutes_ago))


def test_automatic_buckets_fit_the_time_span_of_the_data() -> None:
    recent = charts.recovery_buckets([_started(2), _started(7), _started(9)], NOW)
    assert recent[0].width == timedelta(minutes=1) and len(recent) <= charts.MAX_BUCKETS
    assert sum(b.counts["started"] for b in recent) == 3
    assert sum(1 for b in recent if b.counts["started"]) == 3  # three bars, not one hourly bar
    spread = charts.recovery_buckets([_started(20), _started(60 * 5)], NOW)
    assert spread[0].width == timedelta(minutes=15) and len(spread) <= charts.MAX_BUCKETS
    assert spread[0].start <= NOW - timedelta(hours=5) < spread[0].start + spread[0].width
    day = charts.recovery_buckets([_started(60 * 23), _started(60 * 30)], NOW)  # 30 h old is outside the day
    assert day[0].width == timedelta(hours=1) and sum(b.counts["started"] for b in day) == 1
    assert len(charts.recovery_buckets([], NOW)) == 24  # nothing to fit: the whole day in hours
    fixed = charts.recovery_buckets([_started(2)], NOW, "24h")  # a chosen window keeps its buckets
    assert fixed[0].width == timedelta(hours=1) and len(fixed) == 24


def test_the_time_axis_says_utc_and_the_bar_width() -> None:
    svg = str(charts.recovery_chart_svg(charts.recovery_buckets([_started(2), _started(9)], NOW)))
    label = re.search(r'<text[^>]*data-testid="time-zone"[^>]*>([^<]*)</text>', svg)
    assert label and label.group(1) == "time (UTC), 1 min per bar"
    assert "No recoveries in the last 24h" not in svg
    week = str(charts.recovery_chart_svg(charts.recovery_buckets([], NOW, "7d"), "7d"))
    assert "time (UTC), 6 h per bar" in week
