"""The spec checker itself rejects answers that break Fly's schemas (so the host tests can trust it)."""

from __future__ import annotations

import pytest

from tests.host.specvalidate import SPEC_PATH, validate


def test_spec_copy_and_notice_are_in_the_repository() -> None:
    notice = (SPEC_PATH.parent / "NOTICE").read_text()
    assert "Apache License, Version 2.0" in notice and "Fly.io" in notice
    assert '"swagger": "2.0"' in SPEC_PATH.read_text()


def test_validate_accepts_fly_shapes_and_rejects_wrong_types() -> None:
    validate("/v1/apps/a/machines/m1", "GET", 200, {"id": "m1", "state": "started", "config": {"image": "x"}})
    validate("/v1/apps/a/volumes/v", "GET", 200, {"id": "v", "attached_machine_id": None, "size_gb": 1})
    with pytest.raises(AssertionError, match="size_gb"):
        validate("/v1/apps/a/volumes/v", "GET", 200, {"id": "v", "size_gb": "1"})
    with pytest.raises(AssertionError, match="state"):
        validate("/v1/apps/a/machines", "GET", 200, [{"id": "m1", "state": 3}])
    with pytest.raises(AssertionError, match="env"):
        validate("/v1/apps/a/machines", "POST", 200, {"id": "m", "config": {"env": {"A": 1}}})
    validate("/v1/apps/a/machines/m/wait", "GET", 408, {"error": "deadline_exceeded: x", "status": "unknown"})
    with pytest.raises(AssertionError):
        validate("/v1/apps/a/machines/m/wait", "GET", 408, {"error": "x", "status": "bogus"})
    with pytest.raises(AssertionError, match="not a path"):
        validate("/v1/nothing", "GET", 200, {})
    with pytest.raises(AssertionError, match="does not list"):
        validate("/v1/apps/a/machines/m/metadata/k", "POST", 200, None)
