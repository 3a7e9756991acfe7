"""Engine fixtures: FakeClock, a migrated SqlStore on SQLite, the in-memory provider, an engine factory."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sandkeep import metrics
from sandkeep.clock import FakeClock
from sandkeep.config import Settings
from sandkeep.engine.runtime import Engine
from sandkeep.engine.service import Actor
from sandkeep.secrets import SecretBox
from sandkeep.store.sql import SqlStore, open_store
from tests.dbsupport import BACKENDS, database_url
from tests.engine.fakes import FakeProber, FakeProvider
from tests.support.procs import HostHandle, running_host

USER = Actor(user_id="user-a", role="user")
ADMIN = Actor(user_id="root", role="admin")
PLATFORM = Actor(user_id="platform", role="platform")


def engine_settings(tmp_path: Path, **changes: Any) -> Settings:
    base: dict[str, Any] = {
        "home": tmp_path / "home", "secrets_key": SecretBox.generate_key(), "regions": "lcl-a,lcl-b,lcl-c",
        "lease_ttl": 30.0, "claim_wait": 1.0, "health_probe_timeout": 3.0, "health_probe_interval": 1.0,
        "detect_poll_interval": 0.0,
    }
    base.update(changes)
    return Settings(**base)


@pytest.fixture()
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> Iterator[SqlStore]:
    """The real store on each backend (PostgreSQL skipped with the reason when absent)."""
    with database_url(request.param, tmp_path) as url:
        s = open_store(url, clock)
        try:
            yield s
        finally:
            s.close()


@pytest.fixture()
def fake(clock: FakeClock) -> FakeProvider:
    return FakeProvider(clock)


class Harness:
    """An engine on the fake provider whose background wake-ups are recorded, not run."""

    def __init__(self, engine: Engine, fake: FakeProvider, store: SqlStore, clock: FakeClock,
                 prober: FakeProber) -> None:
        self.engine = engine
        self.fake = fake
        self.store = store
        self.clock = clock
        self.prober = prober
        self.woken: list[str] = []
        engine.service.wake = self.woken.append

    @property
    def service(self) -> Any:
        return self.engine.service

    async def reconcile(self, instance_id: str) -> Any:
        record = await self.engine.reconcile_now(instance_id)
        assert record is not None, "reconcile_now could not claim the instance"
        return self.store.get_instance(instance_id)

    def get(self, instance_id: str) -> Any:
        return self.store.get_instance(instance_id)

    def events(self, instance_id: str) -> list[str]:
        page = self.store.list_events(instance_id=instance_id, limit=1000)
        return [e.event for e in reversed(page.items)]

    def event(self, instance_id: str, name: str) -> Any:
        page = self.store.list_events(instance_id=instance_id, name=name, limit=10)
        assert page.items, f"no {name} event"
        return page.items[0]

    async def running(self, **kw: Any) -> Any:
        record = await self.service.create_instance(USER, user_id=USER.user_id, **kw)
        final = await self.reconcile(record.id)
        assert final.status == "running", final
        return final


@pytest.fixture()
async def make_harness(tmp_path: Path, store: SqlStore, fake: FakeProvider,
                       clock: FakeClock) -> AsyncIterator[Callable[..., Harness]]:
    made: list[Engine] = []
    loops_before = metrics.REGISTRY.get_sample_value("sandkeep_reconcile_step_limit_total") or 0.0

    def make(**settings: Any) -> Harness:
        prober = FakeProber(fake)
        engine = Engine(engine_settings(tmp_path, **settings), store, fake, clock, worker_id=f"w{len(made)}",
                        prober=prober)
        made.append(engine)
        return Harness(engine, fake, store, clock, prober)

    yield make
    for engine in made:
        await engine.stop()
    loops_after = metrics.REGISTRY.get_sample_value("sandkeep_reconcile_step_limit_total") or 0.0
    assert loops_after == loops_before, "a reconcile pass hit the step limit (decisions looped)"


@pytest.fixture()
async def h(make_harness: Callable[..., Harness]) -> Harness:
    return make_harness()


@pytest.fixture(scope="session")
def slow_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostHandle]:
    """A local host with Fly-like delays (first boot 1.5 s > a 1 s wait: a deterministic 408) and destroyed
    machines answering 404 at once."""
    data_dir = tmp_path_factory.mktemp("slow-host") / "host"
    with running_host(data_dir, extra_args=["--profile", "realistic", "--destroyed-retention", "0"]) as handle:
        yield handle


@pytest.fixture(scope="session")
def quick_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostHandle]:
    """A local host without delays whose destroyed machines answer 404 at once."""
    data_dir = tmp_path_factory.mktemp("quick-host") / "host"
    with running_host(data_dir, extra_args=["--destroyed-retention", "0"]) as handle:
        yield handle


def new_user() -> str:
    return f"u-{uuid.uuid4().hex[:10]}"
