"""Shared pytest fixtures. Area-specific fixtures live in each test folder's conftest.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.procs import HostHandle, running_host


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
