"""Request ids, the access log, HTTP metrics, /readyz, /docs offline and readable operation ids."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sandkeep import __version__
from sandkeep.api.app import create_app
from sandkeep.clock import FakeClock
from sandkeep.logs import configure_logging
from sandkeep.provider.client import MachinesClient
from sandkeep.store.sql import SqlStore
from tests.api.conftest import Api, make_runtime, refusing_gateway_client
from tests.support.fake_service import FakeService


@pytest.fixture()
def log_lines() -> Iterator[io.StringIO]:
    out = io.StringIO()
    configure_logging("info", stream=out)
    try:
        yield out
    finally:
        configure_logging("warning")


def _lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_every_answer_carries_a_request_id_and_a_sane_one_from_the_caller_is_kept(api: Api) -> None:
    mine = await api.client.get("/healthz", headers={"X-Request-ID": "lb-7f3a.2:x_Y-9"})
    assert mine.headers["x-request-id"] == "lb-7f3a.2:x_Y-9"
    fresh = await api.client.get("/v1/instances")  # a 401 from the auth dependency gets one too
    assert fresh.status_code == 401 and fresh.headers["x-request-id"].startswith("req_")
    other = await api.client.get("/v1/instances")
    assert other.headers["x-request-id"] != fresh.headers["x-request-id"]
    for hostile in ("a" * 129, "bad id", "x\u00e9", "<script>", ""):
        resp = await api.client.get("/healthz", headers={"X-Request-ID": hostile.encode()})
        assert resp.headers["x-request-id"].startswith("req_"), hostile
    too_big = await api.client.post("/v1/instances", headers={**api.auth(), "X-Request-ID": "big-1"},
                                    content=b"{" + b" " * (1024 * 1024 + 10) + b"}")
    assert too_big.status_code == 413 and too_big.headers["x-request-id"] == "big-1"


async def test_one_access_line_per_request_and_handler_logs_carry_the_request_id(
        tmp_path: Path, log_lines: io.StringIO) -> None:
    client, instance_id = refusing_gateway_client(tmp_path)
    async with client:
        resp = await client.get(f"/v1/instances/{instance_id}/gateway/data/k", headers={"X-Request-ID": "trace-42"})
        await client.get("/healthz")
    assert resp.status_code == 502
    lines = _lines(log_lines)
    access = [line for line in lines if line["event"] == "http.request"]
    assert len(access) == 2
    first = access[0]
    assert first["request_id"] == "trace-42" and first["status"] == 502 and first["method"] == "GET"
    assert first["route"] == "/v1/instances/{instance_id}/gateway/{path:path}"
    assert first["path"] == f"/v1/instances/{instance_id}/gateway/data/k"
    assert isinstance(first["duration_ms"], float)
    handler = [line for line in lines if line["event"] == "api.gateway_unreachable"]
    assert handler and handler[0]["request_id"] == "trace-42"
    assert access[1]["route"] == "/healthz" and access[1]["request_id"] != "trace-42"


async def test_secret_path_segments_never_reach_the_access_log(api: Api, log_lines: io.StringIO) -> None:
    await api.client.get("/login/once/very-secret-one-time-code")
    access = [line for line in _lines(log_lines) if line["event"] == "http.request"]
    assert access and "very-secret-one-time-code" not in json.dumps(access)
    assert access[0]["path"] == access[0]["route"]


async def test_http_metrics_use_route_templates_and_there_are_no_created_series(api: Api) -> None:
    r = api.service.add("alice")
    before = _samples((await api.client.get("/metrics")).text)
    await api.client.get(f"/v1/instances/{r.id}", headers=api.auth())
    await api.client.get("/v1/instances/ins_nope", headers=api.auth())
    text = (await api.client.get("/metrics")).text
    after = _samples(text)
    key_ok = ("sandkeep_http_requests_total",
              (("method", "GET"), ("route", "/v1/instances/{instance_id}"), ("status", "200")))
    key_404 = ("sandkeep_http_requests_total",
               (("method", "GET"), ("route", "/v1/instances/{instance_id}"), ("status", "404")))
    assert after[key_ok] - before.get(key_ok, 0) == 1
    assert after[key_404] - before.get(key_404, 0) == 1
    assert r.id not in text and "ins_nope" not in text
    count = ("sandkeep_http_request_duration_seconds_count",
             (("method", "GET"), ("route", "/v1/instances/{instance_id}")))
    assert after[count] - before.get(count, 0) == 2
    assert ("sandkeep_build_info", (("python", _python()), ("version", __version__))) in after
    assert "_created" not in text


def _python() -> str:
    import platform

    return platform.python_version()


async def test_readyz_answers_503_naming_the_database_and_provider_that_do_not_answer(tmp_path: Path) -> None:
    from sandkeep.net import free_port

    clock = FakeClock()
    dead = free_port()  # nothing listens there
    store = SqlStore(f"postgresql+psycopg://postgres@127.0.0.1:{dead}/nope?connect_timeout=2", clock=clock)
    provider = MachinesClient(f"http://127.0.0.1:{dead}", "token", proxy_url=f"http://127.0.0.1:{dead}",
                              clock=clock)
    runtime = make_runtime(FakeService(), tmp_path)
    runtime.store, runtime.provider = store, provider
    app = create_app(runtime)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            ready = await client.get("/readyz")
            live = await client.get("/healthz")
    finally:
        await provider.aclose()
        store.close()
    assert live.status_code == 200
    assert ready.status_code == 503
    body = ready.json()
    assert body["error"]["code"] == "not_ready" and body["error"]["status"] == 503
    assert body["checks"] == {"database": "unavailable", "provider": "unavailable"}
    assert str(dead) not in ready.text  # no hosts or ports in the public answer


async def test_readyz_is_ok_when_both_answer(tmp_path: Path) -> None:
    from tests.support.procs import running_host

    clock = FakeClock()
    store = SqlStore(f"sqlite:///{tmp_path / 'r.db'}", clock=clock)
    store.upgrade()
    with running_host(tmp_path / "host") as host:
        provider = MachinesClient(host.url, host.token, proxy_url=host.proxy_url, clock=clock)
        runtime = make_runtime(FakeService(), tmp_path)
        runtime.store, runtime.provider = store, provider
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(runtime)),
                                         base_url="http://t") as client:
                ready = await client.get("/readyz")
        finally:
            await provider.aclose()
            store.close()
    assert ready.status_code == 200
    assert ready.json() == {"ok": True, "checks": {"database": "ok", "provider": "ok"}}


async def test_docs_load_swagger_ui_from_the_package_and_operation_ids_are_readable(api: Api) -> None:
    page = await api.client.get("/docs")
    assert page.status_code == 200
    assert "/docs/assets/swagger-ui-bundle.js" in page.text and "/docs/assets/swagger-ui.css" in page.text
    assert "cdn" not in page.text.lower() and "https://" not in page.text
    js = await api.client.get("/docs/assets/swagger-ui-bundle.js")
    css = await api.client.get("/docs/assets/swagger-ui.css")
    assert js.status_code == 200 and "SwaggerUIBundle" in js.text
    assert css.status_code == 200 and ".swagger-ui" in css.text
    spec = (await api.client.get("/openapi.json")).json()
    ids = {op["operationId"] for ops in spec["paths"].values() for op in ops.values()}
    assert {"create_instance", "list_instances", "get_instance", "readyz", "gateway_get"} <= ids
    assert all("_v1_" not in i for i in ids), sorted(ids)
    assert spec["info"]["version"] == __version__


async def test_a_body_without_json_content_type_is_415_naming_the_fix(api: Api) -> None:
    form = await api.client.post("/v1/instances", content=b'{"size": "shared-cpu-1x"}',
                                 headers={**api.auth(), "Content-Type": "application/x-www-form-urlencoded"})
    assert form.status_code == 415
    err = form.json()["error"]
    assert err["code"] == "unsupported_media_type" and "Content-Type: application/json" in err["message"]
    assert not api.service.instances
    ok = await api.client.post("/v1/instances", content=b'{"size": "shared-cpu-1x"}',
                               headers={**api.auth(), "Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code == 201
    empty = await api.client.post("/v1/instances", headers=api.auth())  # no body: all defaults
    assert empty.status_code == 201
