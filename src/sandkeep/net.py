"""Listening sockets shared by `sandkeep serve` and `sandkeep host`."""

from __future__ import annotations

import socket


def bind_tcp(addr: tuple[str, int], *, backlog: int = 512) -> socket.socket:
    """A bound, listening TCP socket for uvicorn's ``sockets=``.

    The protocol is given explicitly (``IPPROTO_TCP``): asyncio sets TCP_NODELAY on accepted connections
    only for sockets whose ``proto`` says TCP. With protocol 0, Nagle's algorithm meets delayed ACKs and
    every keep-alive response waits ~40 ms (measured in bench/).
    """
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(addr)
        sock.listen(backlog)
        sock.set_inheritable(False)
    except OSError:
        sock.close()
        raise
    return sock
