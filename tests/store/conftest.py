"""Store fixtures: a migrated SqlStore per backend (ids sqlite / postgres) on a FakeClock."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandkeep.clock import FakeClock
from sandkeep.store.records import InstanceRecord, Status
from sandkeep.store.sql import SqlStore, open_store
from tests.dbsupport import BACKENDS, database_url


@pytest.fixture()
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database of each backend."""
    with database_url(request.param, tmp_path) as value:
        yield value


@pytest.fixture()
def store(url: str, clock: FakeClock) -> Iterator[SqlStore]:
    s = open_store(url, clock)
    try:
        yield s
    finally:
        s.close()


def new_instance(clock: FakeClock, **changes: Any) -> InstanceRecord:
    suffix = uuid.uuid4().hex[:12]
    now = clock.now()
    values: dict[str, Any] = {
        "id": f"ins_{suffix}",
        "user_id": "user-a",
        "sandbox_id": f"sbx_{suffix}",
        "status": Status.PROVISIONED,
        "created_at": now,
        "updated_at": now,
        "app_name": "sk-user-a",
    }
    values.update(changes)
    return InstanceRecord(**values)
