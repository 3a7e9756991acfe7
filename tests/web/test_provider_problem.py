"""A provider that keeps failing, as owners and admins see it: plain words for owners, the error for admins."""

from __future__ import annotations

from datetime import timedelta

from sandkeep.store.records import Status
from tests.support.fake_service import FakeRuntime
from tests.web.conftest import Login

RAW = "create_app sk-3f2a9c0d1e2f: unauthorized (HTTP 401)"


async def test_owner_sees_plain_words_and_no_raw_error_or_app_name(rt: FakeRuntime, login: Login) -> None:
    when = rt.clock.now() - timedelta(minutes=3)
    rt.service.put("ins_s1", "alice", Status.STOPPED, last_provider_error=RAW, last_provider_error_at=when)
    rt.service.put("ins_b1", "alice", Status.STARTING, last_provider_error=RAW, last_provider_error_at=when)
    rt.service.put("ins_ok", "alice", Status.RUNNING)
    client = await login("alice", "user")
    html = (await client.get("/ui/")).text
    assert "Your machine could not be started" in html and "3 min ago" in html
    assert "The cloud provider is not answering" in html
    assert RAW not in html and "sk-3f2a9c0d1e2f" not in html and "HTTP 401" not in html
    assert html.count('data-testid="provider-problem"') == 2


async def test_admin_instance_page_shows_the_provider_error_and_its_time(rt: FakeRuntime, login: Login) -> None:
    when = rt.clock.now() - timedelta(minutes=3)
    rt.service.put("ins_s1", "alice", Status.STOPPED, last_provider_error=RAW, last_provider_error_at=when)
    client = await login("root", "admin")
    html = (await client.get("/ui/admin/instances/ins_s1")).text
    start = html.index('data-field="last_provider_error"')
    field = html[start:html.index("</dd>", start)]
    assert RAW in field and "3 min ago" in field


async def test_retry_recovery_is_offered_only_while_recovering_or_after_a_failed_recovery(
        rt: FakeRuntime, login: Login) -> None:
    import re

    rt.service.put("ins_run", "alice", Status.RUNNING)
    rt.service.put("ins_rec", "alice", Status.RECOVERING, recovery_started_at=rt.clock.now())
    rt.service.put("ins_fail", "alice", Status.STOPPED, last_recovery_error="recovery timed out after 600s")
    rt.service.put("ins_stop", "alice", Status.STOPPED)
    client = await login("root", "admin")
    for instance_id, offered in (("ins_run", False), ("ins_rec", True), ("ins_fail", True), ("ins_stop", False)):
        html = (await client.get(f"/ui/admin/instances/{instance_id}")).text
        match = re.search(rf'<button[^>]*id="retry-{instance_id}"[^>]*>', html)
        assert match, instance_id
        assert ("disabled" not in match.group(0)) == offered, (instance_id, match.group(0))
        if not offered:
            assert "Nothing to retry" in match.group(0)


async def test_the_card_shows_the_last_recovery_when_how_long_and_where(rt: FakeRuntime, login: Login) -> None:
    now = rt.clock.now()
    rt.service.put("ins_a1", "alice", Status.RUNNING, region="lcl-b")
    rt.service.put("ins_a2", "alice", Status.RUNNING)
    rt.service.event("instance.unexpected_stop_recovery_succeeded", "ins_a1", at=now - timedelta(hours=2),
                     duration_ms=9000, region="lcl-c", details={"old_region": "lcl-a"})
    rt.service.event("instance.unexpected_stop_recovery_succeeded", "ins_a1", at=now - timedelta(minutes=5),
                     duration_ms=6200, region="lcl-b", details={"old_region": "lcl-c"})
    rt.service.event("instance.unexpected_stop_recovery_failed", "ins_a2", at=now - timedelta(minutes=1))
    client = await login("alice", "user")
    html = (await client.get("/ui/")).text
    start = html.index('data-field="last_recovery"')
    field = html[start:html.index("</dd>", start)]
    assert "5 min ago" in field and "took 6.2 s" in field and "lcl-c → lcl-b" in field
    assert html.count('data-field="last_recovery"') == 1  # ins_a2 never recovered successfully
