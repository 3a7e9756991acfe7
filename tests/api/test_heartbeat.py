"""``POST /v1/gateway/heartbeat`` over HTTP against the real engine and store (issue 11, detection on Fly), on the one
provider model (tests/support/model.py) and its virtual clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from sandkeep.api.app import create_app
from sandkeep.credentials import Credentials
from sandkeep.engine.runtime import Engine
from sandkeep.gateway import TOKEN_HEADER
from sandkeep.gatewaybeat import BEAT_CHUNK, BeatTarget
from sandkeep.runtime import Runtime
from sandkeep.sim.loop import SimClock
from sandkeep.store.records import InstanceRecord
from sandkeep.store.sql import SqlStore, open_store
from tests.dbsupport import sqlite_url
from tests.engine.conftest import USER, engine_settings
from tests.support.model import Model, inline_threads, virtual_clock

SECRET = "beat-test-secret-0123456789abcdefghijklmnop"
URL = "/v1/gateway/heartbeat"
# the machines' own gateways cannot reach sandkeep (nothing listens there): the tests send the beats
BEAT_BASE = "http://127.0.0.1:1"


@dataclass
class Beats:
    client: httpx.AsyncClient
    engine: Engine
    store: SqlStore
    clock: SimClock
    record: InstanceRecord
    token: str

    def headers(self, token: str | None = None, instance_id: str | None = None) -> dict[str, str]:
        return {"sandkeep-instance-id": instance_id or self.record.id, TOKEN_HEADER: token or self.token}


@pytest.fixture()
async def model(tmp_path: Path) -> AsyncIterator[Model]:
    """The provider model (a test that uses it runs on the virtual loop: see loop_factories)."""
    m = Model(tmp_path / "host", virtual_clock())
    try:
        yield m
    finally:
        await m.close()


@pytest.fixture()
async def beats(tmp_path: Path, model: Model) -> AsyncIterator[Beats]:
    clock = model.clock
    store = open_store(sqlite_url(tmp_path), clock)
    settings = engine_settings(tmp_path, heartbeat_url=BEAT_BASE, heartbeat_timeout=8.0)
    engine = Engine(settings, store, model.client, clock, worker_id="beats", prober=model.prober)
    engine.service.wake = lambda _id: None
    created = await engine.service.create_instance(USER, user_id=USER.user_id)
    record = await engine.reconcile_now(created.id)
    assert record is not None and record.status == "running"
    token = engine.ctx.gateway_token(record)
    assert token
    runtime = Runtime(settings=settings, clock=clock, service=engine.service, jwt_secret=SECRET, data_dir=tmp_path,
                      base_url="http://testserver", store=store, provider=model.client, engine=engine,
                      credentials=Credentials(store, SECRET, clock))
    app = create_app(runtime)
    try:
        with inline_threads():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                                         base_url="http://testserver") as client:
                yield Beats(client, engine, store, clock, record, token)
    finally:
        await engine.stop()
        store.close()


async def test_a_beat_is_204_and_lands_in_the_database(beats: Beats) -> None:
    resp = await beats.client.post(URL, headers=beats.headers())
    assert resp.status_code == 204, resp.text
    await beats.engine.heartbeats.flush()
    assert beats.store.heartbeat_times([beats.record.id]) == {beats.record.id: beats.clock.now()}


@pytest.mark.parametrize("case", ["missing_headers", "wrong_token", "unknown_instance", "user_jwt"])
async def test_bad_beats_are_401_with_a_code_and_change_nothing(beats: Beats, case: str) -> None:
    headers = {"wrong_token": beats.headers(token="nope"),
               "unknown_instance": beats.headers(instance_id="ins_nope"),
               "missing_headers": {},
               "user_jwt": {"Authorization": f"Bearer {beats.engine.ctx.secrets.encrypt('x')}"}}[case]
    resp = await beats.client.post(URL, headers=headers)
    assert resp.status_code == 401
    err = resp.json()["error"]
    assert err["code"] == "heartbeat_unauthorized" and err["message"] and err["status"] == 401
    await beats.engine.heartbeats.flush()
    assert beats.store.heartbeat_times([beats.record.id]) == {}


async def test_a_stream_beats_per_line_and_its_end_asks_for_a_read(beats: Beats) -> None:
    sent = 0

    async def lines() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(3):
            sent += 1
            yield b"b\n"

    book = beats.engine.heartbeats
    resp = await beats.client.post(URL + "?stream=true", headers=beats.headers(), content=lines())
    assert resp.status_code == 204 and sent == 3
    await book.flush()
    written = beats.store.heartbeat_times([beats.record.id])[beats.record.id]
    # the ended stream is written as a beat already past the timeout: the engine reads the machine at once
    assert written < beats.clock.now() - timedelta(seconds=8)
    await beats.clock.sleep(30)  # past the new machine's grace
    silent = beats.store.silent_instances(beats.clock.now() - timedelta(seconds=8))
    assert [s.instance_id for s in silent] == [beats.record.id]


async def test_the_senders_request_bytes_are_what_the_route_takes(beats: Beats) -> None:
    target = BeatTarget.from_env({"SANDKEEP_HEARTBEAT_URL": "http://testserver" + URL,
                                  "SANDKEEP_HEARTBEAT_INTERVAL": "3", "SANDKEEP_INSTANCE_ID": beats.record.id,
                                  "SANDKEEP_GATEWAY_TOKEN": beats.token})
    assert target is not None and target.interval == 3.0
    head = target.request_head().decode()
    path = head.split(" ")[1]
    headers = dict(line.split(": ", 1) for line in head.split("\r\n")[1:] if ": " in line)
    assert headers.pop("Transfer-Encoding") == "chunked" and BEAT_CHUNK.endswith(b"b\n\r\n")
    resp = await beats.client.post(path, headers=headers, content=b"b\n")
    assert resp.status_code == 204, resp.text


@pytest.mark.parametrize("env", [{}, {"SANDKEEP_HEARTBEAT_URL": "ftp://x/"}, {"SANDKEEP_HEARTBEAT_INTERVAL": "0"},
                                 {"SANDKEEP_INSTANCE_ID": ""}])
def test_a_machine_not_asked_to_beat_does_not(env: dict[str, str]) -> None:
    full = {"SANDKEEP_HEARTBEAT_URL": "http://s/v1/gateway/heartbeat", "SANDKEEP_HEARTBEAT_INTERVAL": "3",
            "SANDKEEP_INSTANCE_ID": "ins_1", "SANDKEEP_GATEWAY_TOKEN": "t"}
    if not env:
        full.pop("SANDKEEP_GATEWAY_TOKEN")
    assert BeatTarget.from_env({**full, **env}) is None


async def test_a_stream_with_a_wrong_token_is_401_with_a_code(beats: Beats) -> None:
    resp = await beats.client.post(URL + "?stream=true", headers=beats.headers(token="nope"), content=b"b\nb\n")
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "heartbeat_unauthorized"
    assert resp.headers["www-authenticate"] == "sandkeep-gateway-token"
    await beats.engine.heartbeats.flush()
    assert beats.store.heartbeat_times([beats.record.id]) == {}


async def test_a_stream_whose_token_was_rotated_meanwhile_ends_with_401(beats: Beats) -> None:
    book = beats.engine.heartbeats

    async def lines() -> AsyncIterator[bytes]:
        yield b"b\n"
        book.forget(beats.record.id)  # what a flush does once it sees the token rotated
        yield b"b\n"

    resp = await beats.client.post(URL + "?stream=true", headers=beats.headers(), content=lines())
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "heartbeat_unauthorized"


async def test_streams_ended_by_a_stopping_server_record_nothing(beats: Beats) -> None:
    book = beats.engine.heartbeats
    more = asyncio.Event()

    async def lines() -> AsyncIterator[bytes]:
        yield b"b\n"
        await more.wait()  # the machine is between two beats
        yield b"b\n"

    request = asyncio.create_task(beats.client.post(URL + "?stream=true", headers=beats.headers(), content=lines()))
    await wait_for(lambda: len(book.streams) == 1)
    assert book.end_streams() == 1  # serve got SIGTERM
    resp = await request
    assert resp.status_code == 503
    await book.flush()
    written = beats.store.heartbeat_times([beats.record.id])[beats.record.id]
    assert written == beats.clock.now()  # the beat, not an ended-stream mark: no machine read follows


async def wait_for(predicate: Callable[[], bool]) -> None:
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0)  # yield to the request task until it is waiting for the next line
    raise AssertionError("condition not reached")
