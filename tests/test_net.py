from __future__ import annotations

import asyncio
import socket

from sandkeep.net import bind_tcp


async def test_accepted_connections_have_nagle_disabled() -> None:
    listener = bind_tcp(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    accepted: asyncio.Queue[int] = asyncio.Queue()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        await accepted.put(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(on_client, sock=listener)
    try:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        nodelay = await asyncio.wait_for(accepted.get(), timeout=10)
        writer.close()
        assert nodelay != 0
    finally:
        server.close()
        await server.wait_closed()


def test_bind_failure_closes_the_socket_and_raises() -> None:
    first = bind_tcp(("127.0.0.1", 0))
    try:
        port = first.getsockname()[1]
        try:
            bind_tcp(("127.0.0.1", port))
        except OSError:
            pass
        else:  # pragma: no cover - SO_REUSEADDR does not allow two listeners on Linux
            raise AssertionError("second bind on a listening port succeeded")
    finally:
        first.close()


def test_parse_hostport() -> None:
    import pytest

    from sandkeep.net import parse_hostport

    assert parse_hostport(" 127.0.0.1:8080 ") == ("127.0.0.1", 8080)
    assert parse_hostport("[::1]:0") == ("::1", 0)
    with pytest.raises(ValueError, match="out of range"):
        parse_hostport("127.0.0.1:0", allow_zero=False)
    for bad, why in (("nonsense", "HOST:PORT"), (":80", "HOST:PORT"), ("h:x", "number"), ("h:70000", "range")):
        with pytest.raises(ValueError, match=why):
            parse_hostport(bad)
