"""Every Fly operation the host serves had a success and an error answer validated against Fly's spec.

Runs last (see ``pytest_collection_modifyitems`` in conftest.py) and reads ``specvalidate.VALIDATED``, which
every ``Api.call`` fills. Skipped, visibly, when the session did not run the whole tests/host folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.host.conftest import whole_host_folder_selected
from tests.host.specvalidate import VALIDATED, missing_operations, served_operations

HERE = Path(__file__).resolve().parent


def test_served_operations_are_the_implemented_subset() -> None:
    ops = served_operations()
    assert len(ops) == 27  # + volume extend and the three ip_assignments operations
    assert ("GET", "/apps/{app_name}/machines/{machine_id}/wait") in ops
    assert ("POST", "/apps/{app_name}/volumes/{volume_id}/snapshots") in ops


def test_every_served_operation_was_validated_both_ways(request: pytest.FixtureRequest) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        pytest.skip("under pytest-xdist this check runs at session end over every worker's answers "
                    "(tests/conftest.py)")
    if not whole_host_folder_selected([Path(str(i.path)) for i in request.session.items], HERE):
        pytest.skip("spec coverage needs the whole tests/host folder in the session")
    if request.session.testsfailed:
        pytest.skip("other tests failed; their answers may not have been validated")
    missing = missing_operations(VALIDATED)
    assert not missing, "never validated against Fly's spec: " + ", ".join(missing)
