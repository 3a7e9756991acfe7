"""The demo's recovery timeline waits for the recovery's last event, which is written just after its status."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from sandkeep.cli import demo_cmd


class FakeAdmin:
    """The API as the demo sees it mid-recovery: the instance already reads ``running`` while the
    ``..._succeeded`` event shows up only on a later page (the engine writes it after the status)."""

    def __init__(self) -> None:
        self.pages = 0
        now = datetime.now(UTC).isoformat()
        self.early = [{"id": 1, "event": "instance.unexpected_stop_recovery_started", "at": now, "details": {}}]
        self.late = [{"id": 2, "event": "instance.unexpected_stop_recovery_succeeded", "at": now, "details": {}}]

    def request(self, method: str, path: str, params: Any = None) -> dict[str, Any]:
        self.pages += 1
        # page 1 is read before the crash; the event appears on the 4th page
        items = [] if self.pages == 1 else self.early + (self.late if self.pages >= 4 else [])
        return {"items": items}

    def get(self, instance_id: str) -> dict[str, Any]:
        return {"id": instance_id, "status": "running", "busy": False}


def test_the_timeline_waits_for_the_recoverys_last_event(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo_cmd, "_host_post", lambda *a, **k: 200)
    said: list[str] = []
    admin = FakeAdmin()
    run = demo_cmd._Demo(say=said.append, timeout=30.0, url="http://api", host_url="http://host", host_token="t",
                         admin=admin, platform=admin,  # type: ignore[arg-type]
                         created=[{"id": "ins_1", "machine_id": "m1", "app_name": "sk-1", "status": "running"}])
    timeline = demo_cmd._crash_and_watch(run)
    assert timeline.ended == "instance.unexpected_stop_recovery_succeeded"
    assert any("unexpected_stop_recovery_succeeded" in line for line in said), said
