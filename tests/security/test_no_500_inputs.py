"""Three inputs that used to answer 500 (or log a traceback), sent over a raw socket to a real `sandkeep serve`:
ambiguous framing on the gateway route, a NUL in the web UI's Open path, a client hanging up mid-body."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.serving import Serve, running_serve
from tests.security.authsupport import sign_in
from tests.support.wait import wait_until


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    with running_serve(tmp_path_factory.mktemp("no500")) as running:
        yield running


@pytest.fixture(scope="module")
def running(serve: Serve) -> dict[str, Any]:
    with serve.client("raw-alice") as client:
        created = client.post("/v1/instances", json={})
        assert created.status_code == 201, created.text
        return serve.wait_status(client, created.json()["id"], "running")


def address(serve: Serve) -> tuple[str, int]:
    host, port = serve.url.split("//", 1)[1].rsplit(":", 1)
    return host, int(port)


def exchange(serve: Serve, request: bytes) -> tuple[int, bytes]:
    """Send raw bytes, read the whole answer (the server closes: Connection: close); (status, raw answer)."""
    with socket.create_connection(address(serve), timeout=30) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", answer)
    assert match, answer[:200]
    return int(match.group(1)), answer


def assert_no_unhandled(serve: Serve) -> None:
    log = serve.proc.log()
    assert "api.unhandled_exception" not in log and "Traceback" not in log, log[-3000:]


@pytest.mark.parametrize("method", ["PUT", "POST", "GET"])
@pytest.mark.parametrize("te_first", [True, False])
def test_chunked_and_content_length_together_on_the_gateway_route_is_400(
        serve: Serve, running: dict[str, Any], method: str, te_first: bool) -> None:
    framing = ["Transfer-Encoding: chunked", "Content-Length: 100"]
    if not te_first:
        framing.reverse()
    request = (f"{method} /v1/instances/{running['id']}/gateway/data/smuggled HTTP/1.1\r\nHost: sandkeep\r\n"
               f"Authorization: Bearer {serve.token('raw-alice')}\r\n" + "\r\n".join(framing) +
               "\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n").encode()
    status, answer = exchange(serve, request)
    assert status == 400, answer[:500]
    assert b'"code":"bad_request"' in answer and b"Transfer-Encoding" in answer
    assert_no_unhandled(serve)


def test_a_nul_in_the_open_path_is_400(serve: Serve, running: dict[str, Any]) -> None:
    browser = sign_in(serve, serve.token("raw-alice"))
    request = (f"GET /ui/instances/{running['id']}/open/%00 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               f"Cookie: sk_session={browser.cookie}\r\nConnection: close\r\n\r\n").encode()
    status, answer = exchange(serve, request)
    assert status == 400, answer[:500]
    assert b"text/html" in answer.split(b"\r\n\r\n", 1)[0].lower()
    assert browser.get(f"/ui/instances/{running['id']}/open/health").status_code == 200  # the real path works
    assert_no_unhandled(serve)


def test_a_client_that_hangs_up_mid_body_is_a_quiet_4xx(serve: Serve, running: dict[str, Any]) -> None:
    before = serve.proc.log().count("api.client_disconnected")
    request = (f"PUT /v1/instances/{running['id']}/gateway/data/upload HTTP/1.1\r\nHost: sandkeep\r\n"
               f"Authorization: Bearer {serve.token('raw-alice')}\r\n"
               f"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n").encode() + b'{"env": {"A": "'
    with socket.create_connection(address(serve), timeout=30) as sock:
        sock.sendall(request)  # ... and hang up with most of the promised body unsent
    # the proxy was streaming the body upstream when the client left: one log line, not a traceback
    wait_until(lambda: serve.proc.log().count("api.client_disconnected") > before, timeout=30,
               message="the disconnect is logged as api.client_disconnected")
    with serve.client("raw-alice") as client:  # the server carries on, the instance is untouched
        after = client.get(f"/v1/instances/{running['id']}").json()
    assert after["status"] == "running" and after["env"] == running["env"]
    assert_no_unhandled(serve)
