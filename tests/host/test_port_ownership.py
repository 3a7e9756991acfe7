"""The host counts a machine as started only when the listener on its port is the machine's own."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from sandkeep.host.process import _listener_owned_by


def test_listener_of_this_process_is_recognised() -> None:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]
        assert _listener_owned_by(os.getpid(), port) is True


def test_listener_of_another_process_is_not_ours() -> None:
    # a child that is alive but owns no listener on the port this process holds
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        with socket.create_server(("127.0.0.1", 0)) as srv:
            port = srv.getsockname()[1]
            assert _listener_owned_by(child.pid, port) is False
    finally:
        child.communicate(b"")


def test_no_listener_is_not_ours_and_unknown_pid_cannot_tell() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening
        assert _listener_owned_by(os.getpid(), port) is False
    assert _listener_owned_by(None, 1) is None
