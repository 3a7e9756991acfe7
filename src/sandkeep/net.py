"""Listening sockets shared by `sandkeep serve` and `sandkeep host`."""

from __future__ import annotations

import socket


def parse_hostport(value: str, *, allow_zero: bool = True) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 hosts may be bracketed) -> (host, port). Port 0 ("any free port") only when allowed."""
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    try:
        number = int(port)
    except ValueError as exc:
        raise ValueError(f"port must be a number in {value!r}") from exc
    if not (0 if allow_zero else 1) <= number <= 65535:
        raise ValueError(f"port out of range in {value!r}")
    return host.strip("[]"), number


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free on ``host`` right now (another process may still take it before it is used)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


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
