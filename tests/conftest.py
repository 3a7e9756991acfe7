"""Shared pytest fixtures. Area-specific fixtures live in each test folder's conftest.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.procs import HostHandle, running_host

_WORKER_SPEC: dict[str, list[object]] = {"validated": [], "whole": []}


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: object, error: object) -> None:
    """pytest-xdist controller: collect what each worker validated against Fly's spec (tests/host/conftest.py)."""
    out = getattr(node, "workeroutput", {}) or {}
    _WORKER_SPEC["validated"].extend(tuple(v) for v in out.get("host_spec_validated", []))
    _WORKER_SPEC["whole"].append(bool(out.get("host_spec_whole_folder", False)))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under pytest-xdist, the host's spec-coverage check over the union of every worker's answers.

    Run only on the controller, when the whole tests/host folder was selected and nothing else failed; a gap
    fails the session with the list of operations never validated.
    """
    if hasattr(session.config, "workeroutput") or not _WORKER_SPEC["whole"]:
        return
    if not all(_WORKER_SPEC["whole"]) or exitstatus != 0:
        return
    from tests.host.specvalidate import missing_operations

    missing = missing_operations({tuple(v) for v in _WORKER_SPEC["validated"]})  # type: ignore[misc]
    if missing:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line("FAILED host spec coverage: never validated against Fly's spec: "
                                + ", ".join(missing), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def host_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostHandle]:
    """One real local host process shared by a whole test session (use unique app names per test)."""
    data_dir: Path = tmp_path_factory.mktemp("host-session") / "host"
    with running_host(data_dir) as handle:
        yield handle


@pytest.fixture()
def host(tmp_path: Path) -> Iterator[HostHandle]:
    """A fresh real local host process for one test."""
    with running_host(tmp_path / "host") as handle:
        yield handle
