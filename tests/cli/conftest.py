from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.serving import Serve, running_serve


@pytest.fixture(scope="session")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    """One real `sandkeep serve` for the CLI tests (each test uses its own user ids)."""
    with running_serve(tmp_path_factory.mktemp("cli-serve")) as handle:
        yield handle
