"""The gateway's heartbeat sender (issue 11): what a machine runs so sandkeep notices at once when it dies.

Contract (any image can implement it; the ``sandkeep/gateway`` image does, with this module):

* the machine's environment carries ``SANDKEEP_HEARTBEAT_URL`` (``<sandkeep>/v1/gateway/heartbeat``),
  ``SANDKEEP_HEARTBEAT_INTERVAL`` (seconds), ``SANDKEEP_INSTANCE_ID`` and ``SANDKEEP_GATEWAY_TOKEN``;
* the sender opens ``POST <url>?stream=true`` with headers ``sandkeep-instance-id`` and
  ``sandkeep-gateway-token`` and a chunked body, and writes one line (``b\\n``) every interval;
* the stream is ended and reopened about every hour (:data:`STREAM_LIFETIME`); when it breaks or is answered
  (401: wrong or rotated token; 503: that sandkeep process is stopping), the sender backs off (doubling from the
  interval to :data:`MAX_BACKOFF`) and opens a new one. A plain ``POST <url>`` (no ``stream``) is one beat,
  for senders that cannot stream.

Only the standard library is used (the gateway boots fast). :class:`BeatSender` runs in a thread of the real
gateway; the local host's simulated machines use the same request bytes over asyncio (:mod:`sandkeep.host.sim`).
"""

from __future__ import annotations

import json
import select
import socket
import ssl
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

URL_ENV = "SANDKEEP_HEARTBEAT_URL"
INTERVAL_ENV = "SANDKEEP_HEARTBEAT_INTERVAL"
INSTANCE_ENV = "SANDKEEP_INSTANCE_ID"
TOKEN_ENV = "SANDKEEP_GATEWAY_TOKEN"
INSTANCE_HEADER = "sandkeep-instance-id"
TOKEN_HEADER = "sandkeep-gateway-token"
BEAT_CHUNK = b"2\r\nb\n\r\n"
END_CHUNK = b"0\r\n\r\n"
STREAM_LIFETIME = 3600.0
MAX_BACKOFF = 30.0


@dataclass(frozen=True)
class BeatTarget:
    host: str
    port: int
    path: str
    tls: bool
    interval: float
    instance_id: str
    token: str

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> BeatTarget | None:
        """The target named by the machine's environment, or None when the machine is not asked to beat."""
        url, instance_id, token = env.get(URL_ENV, ""), env.get(INSTANCE_ENV, ""), env.get(TOKEN_ENV, "")
        if not (url and instance_id and token):
            return None
        try:
            interval = float(env.get(INTERVAL_ENV, "3") or "3")
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            return None
        if parts.scheme not in ("http", "https") or not parts.hostname or interval <= 0:
            return None
        return cls(host=parts.hostname, port=port, path=(parts.path or "/") + "?stream=true",
                   tls=parts.scheme == "https", interval=interval, instance_id=instance_id, token=token)

    def request_head(self) -> bytes:
        """The request line and headers that open a heartbeat stream."""
        host = self.host if self.port in (80, 443) else f"{self.host}:{self.port}"
        return (f"POST {self.path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: sandkeep-gateway\r\n"
                f"Content-Type: text/plain\r\nTransfer-Encoding: chunked\r\n{INSTANCE_HEADER}: {self.instance_id}\r\n"
                f"{TOKEN_HEADER}: {self.token}\r\n\r\n").encode("latin-1")


def answer_status(data: bytes) -> int | None:
    """The status code of an HTTP response's first bytes (None when there is none)."""
    try:
        return int(data.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None


class BeatSender:
    """Beats from a thread until :meth:`stop` (the gateway's own process)."""

    def __init__(self, target: BeatTarget) -> None:
        self.target = target
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="sandkeep-beat", daemon=True)
        self.streams = 0

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _connect(self) -> socket.socket:
        t = self.target
        sock = socket.create_connection((t.host, t.port), timeout=max(5.0, 2 * t.interval))
        if t.tls:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=t.host)
        return sock

    def _stream(self) -> int | None:
        """One stream: beats until its lifetime ends, the sender stops, or sandkeep answers; the answer's status."""
        t = self.target
        with self._connect() as sock:
            self.streams += 1
            sock.sendall(t.request_head() + BEAT_CHUNK)
            ends = time.monotonic() + STREAM_LIFETIME
            while not self._stop.wait(t.interval) and time.monotonic() < ends:
                readable, _, _ = select.select([sock], [], [], 0)
                if readable:  # sandkeep answered before the end of the stream: refused (or going away)
                    return answer_status(sock.recv(512))
                sock.sendall(BEAT_CHUNK)
            sock.sendall(END_CHUNK)
            try:
                return answer_status(sock.recv(512))
            except OSError:
                return None

    def _run(self) -> None:
        backoff = self.target.interval
        while not self._stop.is_set():
            try:
                status = self._stream()
            except OSError as exc:
                status = None
                _log("gateway.heartbeat_failed", error=type(exc).__name__)
            if status == 204:
                backoff = self.target.interval
                continue
            if status is not None:
                _log("gateway.heartbeat_refused", status=status)
            self._stop.wait(backoff)
            backoff = min(MAX_BACKOFF, backoff * 2)


def _log(event: str, **fields: object) -> None:
    sys.stderr.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stderr.flush()


def start_from_env(env: Mapping[str, str]) -> BeatSender | None:
    """Start beating when the environment asks for it (the gateway calls this at start-up)."""
    target = BeatTarget.from_env(env)
    if target is None:
        return None
    sender = BeatSender(target)
    sender.start()
    return sender
