"""Fly mode tells the truth: `serve --provider fly` checks the token, the organisation and the regions with real
HTTP calls at start-up (the local host, or a small fake Fly API over HTTP, plays Fly) and stops with one clear
line; an instance whose provider calls keep failing shows the error and ends `stopped` after the start timeout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from sandkeep.net import free_port
from tests.e2e.serving import running_serve, serve_fails
from tests.support.procs import HostHandle, running_host

FAKE_TOKEN = "fake-fly-token"


class _FakeFly(BaseHTTPRequestHandler):
    """Just what the start-up check asks Fly: the org's apps and the platform's regions."""

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if self.headers.get("Authorization") != f"Bearer {FAKE_TOKEN}":
            return self._send(401, {"error": "unauthorized"})
        if url.path == "/v1/apps":
            org = parse_qs(url.query).get("org_slug", [""])[0]
            if org != "acme":
                return self._send(404, {"error": "Could not find organization " + org})
            return self._send(200, {"total_apps": 0, "apps": []})
        if url.path == "/v1/platform/regions":
            regions = [{"Code": "iad", "Name": "Ashburn"}, {"Code": "ord", "Name": "Chicago"}]
            return self._send(200, {"Regions": regions})
        return self._send(404, {"error": "not found"})

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def fake_fly() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeFly)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostHandle]:
    with running_host(tmp_path_factory.mktemp("fly-host") / "host") as handle:
        yield handle


def _serve_fails(tmp_path: Path, **env: str) -> str:
    return serve_fails(tmp_path / "data", "--provider", "fly", env=env)


def test_a_refused_token_stops_serve_with_one_line(tmp_path: Path, host: HostHandle) -> None:
    line = _serve_fails(tmp_path, FLY_API_URL=host.url, FLY_API_TOKEN="not-the-token", FLY_REGIONS="lcl-a")
    assert "FLY_API_TOKEN was refused" in line and "HTTP 401" in line and "not-the-token" not in line


def test_an_unknown_org_stops_serve_with_one_line(tmp_path: Path, fake_fly: str) -> None:
    line = _serve_fails(tmp_path, FLY_API_URL=fake_fly, FLY_API_TOKEN=FAKE_TOKEN, FLY_ORG="nope",
                        FLY_REGIONS="iad")
    assert "FLY_ORG 'nope' is not an organisation" in line and "HTTP 404" in line


def test_regions_fly_does_not_offer_stop_serve_with_one_line(tmp_path: Path, fake_fly: str) -> None:
    line = _serve_fails(tmp_path, FLY_API_URL=fake_fly, FLY_API_TOKEN=FAKE_TOKEN, FLY_ORG="acme",
                        FLY_REGIONS="iad,xyz")
    assert "FLY_REGIONS names regions Fly does not offer: xyz" in line and "iad" in line


@pytest.mark.parametrize("regions", ["iad,,ord", "IAD", "iad ord", "iad,iad", ""])
def test_malformed_fly_regions_stop_serve_before_any_call(tmp_path: Path, regions: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # never called: the syntax check comes first
    env = {"FLY_API_URL": dead, "FLY_API_TOKEN": "t", "FLY_REGIONS": regions}
    if regions == "":
        env["FLY_REGIONS"] = " "
    line = _serve_fails(tmp_path, **env)
    assert "FLY_REGIONS" in line and "cannot reach" not in line


def test_an_unreachable_api_stops_serve_with_one_line(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    line = _serve_fails(tmp_path, FLY_API_URL=dead, FLY_API_TOKEN="t", FLY_REGIONS="iad")
    assert f"cannot reach the Fly API at {dead}" in line


def test_good_settings_start_and_provider_errors_end_a_start_as_stopped_with_the_error(
        tmp_path: Path, host: HostHandle) -> None:
    env = {"SANDKEEP_PROVIDER": "fly", "FLY_API_URL": host.url, "FLY_API_TOKEN": host.token,
           "FLY_ORG": "personal", "FLY_REGIONS": "lcl-a,lcl-b", "SANDKEEP_START_TIMEOUT": "2",
           "SANDKEEP_PROVIDER_BACKOFF_MAX": "1"}
    with running_serve(tmp_path, extra_env=env) as serve:
        ready = httpx.get(f"{serve.url}/readyz", timeout=10)
        assert ready.status_code == 200, ready.text
        rule = {"operation": "*", "status": 503, "rate": 1.0, "message": "upstream connect error"}
        set_faults = httpx.post(f"{host.url}/_local/faults", json={"rules": [rule]}, headers=host.headers())
        assert set_faults.status_code in (200, 201), set_faults.text
        try:
            user = f"fly-{uuid.uuid4().hex[:8]}"
            with serve.client(user) as client:
                created = client.post("/v1/instances", json={})
                assert created.status_code == 201, created.text
                inst_id = created.json()["id"]

                final = serve.wait_status(client, inst_id, "stopped", timeout=90)
                history = client.get(f"/v1/instances/{inst_id}/events").json()["items"]
                assert final["last_provider_error"], json.dumps([final, history])
                assert "503" in final["last_provider_error"] and final["last_provider_error_at"]
                events = client.get(f"/v1/instances/{inst_id}/events", params={"name": "instance.start_failed"})
                [failed] = events.json()["items"]
                assert failed["label"] == "provider_error" and "the provider kept failing" in failed["error"]
                shown = subprocess.run([sys.executable, "-m", "sandkeep", "instances", "show", inst_id],
                                       env={**os.environ, "SANDKEEP_URL": serve.url,
                                            "SANDKEEP_TOKEN": serve.token(user)},
                                       capture_output=True, text=True, timeout=60)
                assert shown.returncode == 0, shown.stderr
                assert "last provider error " in shown.stdout and "503" in shown.stdout
        finally:
            httpx.delete(f"{host.url}/_local/faults", headers=host.headers())
