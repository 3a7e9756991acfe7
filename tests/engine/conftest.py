"""Engine fixtures: FakeClock and a migrated SqlStore for store-level tests; for engine tests, the one provider
model (tests/support/model.py: the host's Fly model, simulated machines, the real client, virtual time) and an
engine factory over it."""

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
from sandkeep.sim.loop import SimClock
from sandkeep.store.sql import SqlStore, open_store
from tests.dbsupport import BACKENDS, database_url
from tests.support.model import Model, loop_factories, virtual_clock
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


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """Tests on the provider model run on the simulation's virtual loop (tests/support/model.py)."""
    return loop_factories(item)


@pytest.fixture()
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database on each backend (PostgreSQL skipped with the reason when absent)."""
    with database_url(request.param, tmp_path) as url:
        yield url


@pytest.fixture()
def store(db_url: str, clock: FakeClock) -> Iterator[SqlStore]:
    """The real store on each backend, on a FakeClock (store-level tests)."""
    s = open_store(db_url, clock)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture()
async def sim_clock() -> SimClock:
    """The virtual clock (a test that asks for it runs on the virtual loop: see loop_factories)."""
    return virtual_clock()


@pytest.fixture()
async def model(tmp_path: Path, sim_clock: SimClock) -> AsyncIterator[Model]:
    """The host's Fly model with simulated machines behind the real client, on the virtual clock."""
    m = Model(tmp_path / "host", sim_clock)
    try:
        yield m
    finally:
        await m.close()


class Harness:
    """An engine on the provider model whose background wake-ups are recorded, not run."""

    def __init__(self, engine: Engine, model: Model, store: SqlStore) -> None:
        self.engine = engine
        self.model = model
        self.store = store
        self.clock = model.clock
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
        assert final.status == "running", (final, self.events(record.id))
        return final

    async def pass_time(self, seconds: float) -> None:
        """Let ``seconds`` of simulated time pass (the host's own timers fire on the way)."""
        await self.clock.sleep(seconds)

    async def put(self, instance_id: str, key: str, value: bytes) -> None:
        """Write ``key`` through the instance's gateway (its machine must be running)."""
        target = self.service.gateway_target(USER, instance_id)
        assert target is not None
        resp = await self.model.gateway.put(f"/data/{key}", content=value, headers=target[1])
        assert resp.status_code == 201, resp.text


@pytest.fixture()
async def make_harness(tmp_path: Path, db_url: str, model: Model) -> AsyncIterator[Callable[..., Harness]]:
    made: list[Engine] = []
    store = open_store(db_url, model.clock)
    loops_before = metrics.REGISTRY.get_sample_value("sandkeep_reconcile_step_limit_total") or 0.0

    def make(**settings: Any) -> Harness:
        engine = Engine(engine_settings(tmp_path, **settings), store, model.client, model.clock,
                        worker_id=f"w{len(made)}", prober=model.prober)
        made.append(engine)
        return Harness(engine, model, store)

    yield make
    for engine in made:
        await engine.stop()
    store.close()
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
