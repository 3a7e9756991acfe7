"""Fixtures shared by the security tests: a real `sandkeep serve` per test module (use your own user ids)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.serving import Serve, running_serve


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    """A real `sandkeep serve` (API, engine, web UI and its local host child) on free loopback ports."""
    with running_serve(tmp_path_factory.mktemp("security-serve")) as handle:
        yield handle
