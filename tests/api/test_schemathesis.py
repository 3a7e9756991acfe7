"""Property-based run (schemathesis) over every operation in /openapi.json: never a 5xx, always the error shape.

Skipped with a visible reason when schemathesis is not installed; the hand-written fuzz in test_no_500.py
always runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sandkeep.api.app import create_app
from sandkeep.store.records import Status
from tests.api.conftest import gateway_echo, make_runtime
from tests.support.fake_service import FakeService

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis not installed: property-based run skipped")
from hypothesis import HealthCheck, Phase, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

_service = FakeService()
_owned = _service.add("alice")
_service.add("bob", Status.RECOVERING)
_runtime = make_runtime(_service, Path("/nonexistent-sandkeep-test"))
_app = create_app(_runtime, proxy_transport=gateway_echo([]))
schema = schemathesis.openapi.from_asgi("/openapi.json", _app)
TOKENS = {role: _runtime.credentials.issue_token(user, role).token
          for user, role in (("root", "admin"), ("alice", "user"), ("backend", "platform"))}


@schema.parametrize()
@settings(max_examples=12, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
@pytest.mark.parametrize("role", sorted(TOKENS))
def test_openapi_operations_never_answer_5xx_to_generated_input(case: Any, role: str) -> None:
    response = case.call(headers={"Authorization": f"Bearer {TOKENS[role]}"})
    case.validate_response(response, checks=[not_a_server_error])
    if response.status_code >= 400 and case.method.upper() != "HEAD":
        err = response.json()["error"]
        assert err["status"] == response.status_code and err["code"] and err["message"]
