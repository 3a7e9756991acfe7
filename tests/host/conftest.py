"""Fixtures for the local host tests: a raw-HTTP client that checks every /v1 answer against Fly's spec.

Every test that takes ``api`` or ``fapi`` runs twice: against a host with real machine processes and against a
host with simulated machines (``--machines sim``), proving the simulated machines pass the host's contract.
Tests (or modules) marked ``process_only`` need real processes (WebSockets, process signals) and run once.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sandkeep.gateway import TOKEN_ENV, TOKEN_HEADER
from tests.host.specvalidate import VALIDATED, validate
from tests.support.procs import HostHandle, running_host
from tests.support.wait import wait_until

_counter = itertools.count(1)
GATEWAY_TOKEN = "test-gateway-token"


class Api:
    """httpx against one host; ``call`` asserts the status and validates /v1 answers against the spec."""

    def __init__(self, handle: HostHandle) -> None:
        self.handle = handle
        self.http = httpx.Client(base_url=handle.url, headers=handle.headers(), timeout=70.0)
        # gateway machines made by ``machine()`` get GATEWAY_TOKEN; the proxy client sends it (SPEC §13)
        self.proxy = httpx.Client(base_url=handle.proxy_url, timeout=30.0, headers={TOKEN_HEADER: GATEWAY_TOKEN})
        self.apps: list[str] = []

    def cleanup(self) -> None:
        """Delete the apps this test made (their machines and volumes go with them): the host is shared."""
        for app in self.apps:
            r = self.http.delete(f"/v1/apps/{app}")
            assert r.status_code in (202, 404), r.text
            validate(f"/v1/apps/{app}", "DELETE", r.status_code, r.json() if r.content else None)

    def close(self) -> None:
        self.http.close()
        self.proxy.close()

    def call(self, method: str, path: str, expect: int | None = None, *, json: Any = None,
             content: bytes | None = None, params: Any = None, headers: dict[str, str] | None = None) -> Any:
        resp = self.http.request(method, path, json=json, content=content, params=params, headers=headers)
        body: Any = None
        if resp.content:
            body = resp.json()
        if expect is not None:
            assert resp.status_code == expect, f"{method} {path} -> {resp.status_code} {resp.text}"
        if path.startswith("/v1/"):
            validate(path, method, resp.status_code, body)
        if resp.status_code >= 400:
            assert isinstance(body, dict) and set(body) >= {"error", "status"}, resp.text
        return body

    def raw(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return self.http.request(method, path, **kw)

    # conveniences
    def new_app(self, prefix: str = "t") -> str:
        name = f"{prefix}-{os.getpid()}-{next(_counter)}"
        self.call("POST", "/v1/apps", 201, json={"app_name": name, "org_slug": "personal"})
        self.apps.append(name)
        return name

    def volume(self, app: str, region: str = "lcl-a", name: str = "data", **extra: Any) -> dict[str, Any]:
        return self.call("POST", f"/v1/apps/{app}/volumes", 200,  # type: ignore[no-any-return]
                         json={"name": name, "region": region, "size_gb": 1, **extra})

    def machine(self, app: str, *, volume: str | None = None, region: str | None = None,
                image: str = "sandkeep/gateway", wait: str | None = "started", **body: Any) -> dict[str, Any]:
        config: dict[str, Any] = {"image": image, **body.pop("config", {})}
        config["env"] = {TOKEN_ENV: GATEWAY_TOKEN, **(config.get("env") or {})}
        if volume:
            config["mounts"] = [{"volume": volume, "path": "/data"}]
        payload: dict[str, Any] = {"config": config, **body}
        if region:
            payload["region"] = region
        m = self.call("POST", f"/v1/apps/{app}/machines", 200, json=payload)
        if wait:
            self.wait(app, m["id"], wait)
        return m  # type: ignore[no-any-return]

    def wait(self, app: str, mid: str, state: str, timeout: int = 30) -> None:
        self.call("GET", f"/v1/apps/{app}/machines/{mid}/wait", 200, params={"state": state, "timeout": timeout})

    def get(self, app: str, mid: str) -> dict[str, Any]:
        return self.call("GET", f"/v1/apps/{app}/machines/{mid}", 200)  # type: ignore[no-any-return]

    def put_key(self, mid: str, key: str, value: bytes) -> None:
        r = self.proxy.put(f"/data/{key}", content=value, headers={"fly-force-instance-id": mid})
        assert r.status_code == 201, r.text

    def get_key(self, mid: str, key: str) -> httpx.Response:
        return self.proxy.get(f"/data/{key}", headers={"fly-force-instance-id": mid})

    def local(self, method: str, path: str, expect: int = 200, json: Any = None) -> Any:
        r = self.http.request(method, path, json=json)
        assert r.status_code == expect, f"{method} {path} -> {r.status_code} {r.text}"
        return r.json() if r.content else None

    def wait_until_state(self, app: str, mid: str, state: str) -> dict[str, Any]:
        return wait_until(lambda: (m := self.get(app, mid))["state"] == state and m,  # type: ignore[return-value]
                          timeout=30, message=f"machine {mid} {state}")


RUNNERS = ("process", "sim")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "process_only: needs real machine processes (not run with --machines sim)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``machines``: the runner of the host behind ``api``/``fapi`` -- both, unless the test is process_only."""
    if "machines" in metafunc.fixturenames:
        only = metafunc.definition.get_closest_marker("process_only") is not None
        metafunc.parametrize("machines", ["process"] if only else list(RUNNERS), scope="module")


@pytest.fixture(scope="session")
def sim_host_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostHandle]:
    """A host with simulated machines shared by the session (the process twin is ``host_session``)."""
    with running_host(tmp_path_factory.mktemp("sim-host-session") / "host", extra_args=["--machines", "sim"]) as h:
        yield h


@pytest.fixture()
def api(machines: str, request: pytest.FixtureRequest) -> Iterator[Api]:
    a = Api(request.getfixturevalue("host_session" if machines == "process" else "sim_host_session"))
    yield a
    a.cleanup()
    a.close()


@pytest.fixture(scope="module")
def faults_host(machines: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostHandle]:
    """A host of their own for tests that take regions or hosts down or inject faults."""
    with running_host(tmp_path_factory.mktemp("faults") / "host",
                      extra_args=["--destroyed-retention", "0.3", "--stop-timeout", "2", "--machines", machines]
                      ) as handle:
        yield handle


@pytest.fixture()
def fapi(faults_host: HostHandle) -> Iterator[Api]:
    a = Api(faults_host)
    yield a
    a.local("DELETE", "/_local/faults")
    for h in a.local("GET", "/_local/hosts")["hosts"]:
        if h["dead"]:
            a.local("POST", f"/_local/hosts/{h['name']}/return")
    a.cleanup()
    for region in faults_host.regions:
        a.local("POST", f"/_local/regions/{region}/outage", json={"down": False})
        a.local("POST", f"/_local/regions/{region}/capacity", json={"available": True})
    a.close()


def host_log(handle: HostHandle) -> str:
    return handle.proc.log()


def data_path(handle: HostHandle) -> Path:
    return handle.data_dir


# ------------------------------------------------------------------ spec coverage bookkeeping
COVERAGE_TEST = "test_zz_spec_coverage.py"
DESELECTED_HOST_TESTS: list[str] = []
WHOLE_FOLDER: list[bool] = []
"""[True] once collection selected every test module of this folder (and deselected none of them)."""


def whole_host_folder_selected(paths: list[Path], here: Path) -> bool:
    modules = {p.name for p in here.glob("test_*.py")} - {COVERAGE_TEST}
    ran = {p.name for p in paths if p.resolve().parent == here}
    return modules <= ran and not DESELECTED_HOST_TESTS


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Under pytest-xdist each worker validates part of the folder: hand its share to the controller, whose
    session-end check (tests/conftest.py) looks at the union of every worker's answers."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["host_spec_validated"] = sorted(list(v) for v in VALIDATED)
        workeroutput["host_spec_whole_folder"] = bool(WHOLE_FOLDER and WHOLE_FOLDER[0])


def pytest_deselected(items: list[pytest.Item]) -> None:
    here = Path(__file__).resolve().parent
    DESELECTED_HOST_TESTS.extend(i.nodeid for i in items if Path(str(i.path)).resolve().parent == here)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The spec-coverage check runs after every other test of the session (it reads what they validated)."""
    here = Path(__file__).resolve().parent
    WHOLE_FOLDER[:] = [whole_host_folder_selected([Path(str(i.path)) for i in items], here)]
    last = [i for i in items if Path(str(i.path)).name == COVERAGE_TEST]
    if last:
        items[:] = [i for i in items if Path(str(i.path)).name != COVERAGE_TEST] + last
