"""The gateway's heartbeat sender (issue 11), on both machine runners: a machine whose env names a beat URL
holds a heartbeat stream and beats on it; a crashed machine's stream ends; a machine whose host died keeps its
connection but falls silent, and beats again on the same connection when the host returns."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.host.conftest import Api
from tests.support.wait import wait_until


@dataclass
class Stream:
    instance_id: str
    beats: int = 0
    closed: bool = False


@dataclass
class Receiver:
    """A raw TCP server that reads heartbeat streams (answers nothing until a stream ends)."""

    sock: socket.socket
    streams: list[Stream] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1/gateway/heartbeat"

    def of(self, instance_id: str) -> list[Stream]:
        return [s for s in self.streams if s.instance_id == instance_id]

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        buf = b""
        stream: Stream | None = None
        with conn:
            while True:
                try:
                    data = conn.recv(4096)
                except OSError:
                    data = b""
                if not data:
                    break
                buf += data
                if stream is None and b"\r\n\r\n" in buf:
                    head, buf = buf.split(b"\r\n\r\n", 1)
                    ident = [ln.split(b": ", 1)[1].decode() for ln in head.split(b"\r\n")
                             if ln.lower().startswith(b"sandkeep-instance-id:")]
                    stream = Stream(ident[0] if ident else "?")
                    self.streams.append(stream)
                if stream is not None:
                    stream.beats += buf.count(b"b\n")
                    buf = b""
        if stream is not None:
            stream.closed = True


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    r = Receiver(sock)
    threading.Thread(target=r.serve, daemon=True).start()
    yield r
    sock.close()


def _beating_machine(api: Api, receiver: Receiver, instance_id: str) -> tuple[str, dict[str, str]]:
    app = api.new_app("beat")
    vol = api.volume(app)
    env = {"SANDKEEP_HEARTBEAT_URL": receiver.url, "SANDKEEP_HEARTBEAT_INTERVAL": "0.1",
           "SANDKEEP_INSTANCE_ID": instance_id}
    m = api.machine(app, volume=vol["id"], config={"env": env})
    wait_until(lambda: any(s.beats >= 3 for s in receiver.of(instance_id)), timeout=30,
               message="the machine beats on its stream")
    return app, {"id": m["id"], "zone": vol["zone"]}


def test_a_crashed_machine_stops_beating_and_its_stream_ends(fapi: Api, receiver: Receiver) -> None:
    app, m = _beating_machine(fapi, receiver, "ins_crash")
    fapi.local("POST", f"/_local/apps/{app}/machines/{m['id']}/crash")
    wait_until(lambda: all(s.closed for s in receiver.of("ins_crash")), timeout=30, message="the stream ends")
    assert fapi.wait_until_state(app, m["id"], "stopped")["state"] == "stopped"


def test_a_frozen_machine_keeps_its_connection_and_beats_again_when_its_host_returns(
        fapi: Api, receiver: Receiver) -> None:
    _, m = _beating_machine(fapi, receiver, "ins_freeze")
    fapi.local("POST", f"/_local/hosts/{m['zone']}/die")
    try:
        [stream] = receiver.of("ins_freeze")
        assert not stream.closed  # a dead host's machine does not close anything: only its beats stop
    finally:
        fapi.local("POST", f"/_local/hosts/{m['zone']}/return")
    seen = stream.beats
    wait_until(lambda: stream.beats > seen + 2, timeout=30, message="beats resume on the same stream")
    assert receiver.of("ins_freeze") == [stream] and not stream.closed


def test_a_machine_without_a_beat_url_opens_no_stream(fapi: Api, receiver: Receiver) -> None:
    app = fapi.new_app("nobeat")
    fapi.machine(app)
    assert receiver.streams == []
