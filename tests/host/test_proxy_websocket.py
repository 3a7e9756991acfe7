"""WebSocket through the local proxy: the upgrade is tunnelled to the machine's gateway, which echoes.

The client side is written here from RFC 6455 (not with the gateway's own helpers), over plain sockets.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
from urllib.parse import urlsplit

import httpx

from sandkeep.gateway import TOKEN_HEADER
from tests.host.conftest import GATEWAY_TOKEN, Api

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class WsClient:
    def __init__(self, url: str, headers: dict[str, str], path: str = "/ws") -> None:
        parts = urlsplit(url)
        self.sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout=15)
        self.file = self.sock.makefile("rb")
        self.key = base64.b64encode(os.urandom(16)).decode()
        lines = [f"GET {path} HTTP/1.1", f"Host: {parts.netloc}", "Upgrade: websocket", "Connection: Upgrade",
                 f"Sec-WebSocket-Key: {self.key}", "Sec-WebSocket-Version: 13",
                 *(f"{k}: {v}" for k, v in headers.items())]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.status = int(self.file.readline().split()[1])
        self.headers: dict[str, str] = {}
        while (line := self.file.readline().decode("latin-1").strip()):
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()

    def body(self) -> bytes:
        return self.file.read(int(self.headers.get("content-length", "0")))

    def send(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        n = len(payload)
        size = bytes([0x80 | n]) if n < 126 else (bytes([0x80 | 126]) + n.to_bytes(2, "big") if n < 65536
                                                  else bytes([0x80 | 127]) + n.to_bytes(8, "big"))
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes([0x80 | opcode]) + size + mask + masked)

    def recv(self) -> tuple[int, bytes]:
        first = self.file.read(2)
        assert len(first) == 2, "connection closed"
        assert first[1] & 0x80 == 0, "a server must not mask its frames"
        n = first[1] & 0x7F
        if n == 126:
            n = int.from_bytes(self.file.read(2), "big")
        elif n == 127:
            n = int.from_bytes(self.file.read(8), "big")
        return first[0] & 0x0F, self.file.read(n)

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def test_websocket_echo_through_the_proxy(api: Api) -> None:
    app = api.new_app()
    one = api.machine(app, region="lcl-a")
    two = api.machine(app, region="lcl-b")
    for m in (one, two):
        ws = WsClient(api.handle.proxy_url, {"fly-force-instance-id": m["id"], TOKEN_HEADER: GATEWAY_TOKEN})
        try:
            assert ws.status == 101, ws.headers
            expected = base64.b64encode(hashlib.sha1((ws.key + GUID).encode()).digest()).decode()
            assert ws.headers["sec-websocket-accept"] == expected
            ws.send(0x1, f"hello {m['id']}".encode())
            assert ws.recv() == (0x1, f"hello {m['id']}".encode())
            big = os.urandom(70_000)  # a 64-bit length frame
            ws.send(0x2, big)
            assert ws.recv() == (0x2, big)
            ws.send(0x9, b"are you there")
            assert ws.recv() == (0xA, b"are you there")
            ws.send(0x8, (1000).to_bytes(2, "big"))
            assert ws.recv() == (0x8, (1000).to_bytes(2, "big"))
        finally:
            ws.close()
    # plain HTTP on the same proxy port still routes per request
    assert api.proxy.get("/health", headers={"fly-force-instance-id": two["id"]}).json()["machine_id"] == two["id"]


def test_websocket_upgrade_errors_are_clear(api: Api) -> None:
    app = api.new_app()
    idle = api.machine(app, wait=None, skip_launch=True)
    for headers, status, text in (({}, 400, "fly-force-instance-id"),
                                  ({"fly-force-instance-id": "00000000000000"}, 404, "machine not found"),
                                  ({"fly-force-instance-id": idle["id"]}, 503, "not started")):
        ws = WsClient(api.handle.proxy_url, headers)
        try:
            assert ws.status == status
            assert text in json.loads(ws.body())["error"]
        finally:
            ws.close()


def test_gateway_ws_needs_an_upgrade(api: Api) -> None:
    app = api.new_app()
    m = api.machine(app)
    r = api.proxy.get("/ws", headers={"fly-force-instance-id": m["id"]})
    assert r.status_code == 426 and "WebSocket" in r.json()["error"]
    assert httpx.get(api.handle.url + "/healthz").status_code == 200
