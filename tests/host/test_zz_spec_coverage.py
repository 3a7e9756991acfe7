"""Every Fly operation the host serves had a success and an error answer validated against Fly's spec.

Runs last (see ``pytest_collection_modifyitems`` in conftest.py) and reads ``specvalidate.VALIDATED``, which
every ``Api.call`` fills. Skipped, visibly, when the session did not run the whole tests/host folder.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import cast

import pytest

from sandkeep.host.api import HostAPI
from sandkeep.host.core import Host
from tests.host.conftest import COVERAGE_TEST, DESELECTED_HOST_TESTS
from tests.host.specvalidate import VALIDATED, spec

HERE = Path(__file__).resolve().parent


def _shape(template: str) -> str:
    return re.sub(r"\{[^}]+\}", "{}", template)


def served_operations() -> set[tuple[str, str]]:
    """(METHOD, spec template) for every /v1 route of the host, mapped onto Fly's spec."""
    api = HostAPI(cast(Host, object()), "token")  # routes() only builds handlers; no host is touched
    by_shape = {_shape(t): t for t in spec()["paths"]}
    out: set[tuple[str, str]] = set()
    for route in api.routes():
        if not route.path.startswith("/v1/"):
            continue
        template = by_shape.get(_shape(route.path[len("/v1"):]))
        assert template is not None, f"{route.path} is not a path of Fly's Machines API"
        for method in route.methods or ():
            if method == "HEAD":
                continue
            assert method.lower() in spec()["paths"][template], f"{method} {template} is not a Fly operation"
            out.add((method, template))
    return out


def test_served_operations_are_the_implemented_subset() -> None:
    ops = served_operations()
    assert len(ops) == 27  # + volume extend and the three ip_assignments operations
    assert ("GET", "/apps/{app_name}/machines/{machine_id}/wait") in ops
    assert ("POST", "/apps/{app_name}/volumes/{volume_id}/snapshots") in ops


def test_every_served_operation_was_validated_both_ways(request: pytest.FixtureRequest) -> None:
    modules = {p.name for p in HERE.glob("test_*.py")} - {COVERAGE_TEST}
    ran = {Path(str(i.path)).name for i in request.session.items if Path(str(i.path)).resolve().parent == HERE}
    if not modules <= ran or DESELECTED_HOST_TESTS:
        pytest.skip("spec coverage needs the whole tests/host folder in the session")
    if request.session.testsfailed:
        pytest.skip("other tests failed; their answers may not have been validated")
    missing = sorted(f"{method} {template} ({kind})" for method, template in served_operations()
                     for kind in ("ok", "error") if (method, template, kind) not in VALIDATED)
    assert not missing, "never validated against Fly's spec: " + ", ".join(missing)
