"""`--watch` on `instances list` and `instances show`: a new frame whenever the view changes, Ctrl-C ends it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import uuid

from tests.cli.test_cli import create
from tests.e2e.serving import Serve
from tests.support.wait import wait_until


def _ended(proc: subprocess.Popen[str], lines: list[str]) -> int:
    """The exit code once Ctrl-C ended it; if it does not end, its threads' stacks in the failure."""
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack, then it dies
        proc.wait(timeout=30)
        raise AssertionError("the watch did not end on Ctrl-C; its last output:\n" + "".join(lines[-60:])) from None


def _watch(serve: Serve, user: str, *args: str) -> tuple[subprocess.Popen[str], list[str]]:
    env = {**os.environ, "SANDKEEP_URL": serve.url, "SANDKEEP_TOKEN": serve.token(user), "PYTHONUNBUFFERED": "1"}
    # Ctrl-C as in a terminal: SIGINT at its default disposition (a SIG_IGN inherited from the test runner's worker
    # would make the child ignore it), and a thread dump on SIGABRT if it ever does not end (faulthandler)
    proc = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "sandkeep", "instances", *args, "--watch",
                             "--interval", "0.2"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    threading.Thread(target=pump, daemon=True).start()
    return proc, lines


def test_show_and_list_watch_print_a_new_frame_on_change_and_stop_on_ctrl_c(serve: Serve) -> None:
    user = f"watch-{uuid.uuid4().hex[:8]}"
    inst = create(serve, user)
    show, show_lines = _watch(serve, user, "show", inst["id"], "-o", "json")
    listing, list_lines = _watch(serve, user, "list", "-o", "yaml")
    try:
        wait_until(lambda: any('"status": "running"' in line for line in show_lines), message="a running frame")
        wait_until(lambda: any("status: running" in line for line in list_lines), message="a running list frame")
        with serve.client(user) as client:
            assert client.post(f"/v1/instances/{inst['id']}/stop").status_code == 202
        wait_until(lambda: any('"status": "stopped"' in line for line in show_lines), timeout=60,
                   message="a stopped frame")
        wait_until(lambda: any("status: stopped" in line for line in list_lines), timeout=60,
                   message="a stopped list frame")
    finally:
        for proc in (show, listing):
            proc.send_signal(signal.SIGINT)
    assert _ended(show, show_lines) == 0 and _ended(listing, list_lines) == 0
    frames = [line for line in show_lines if line.startswith("--- ")]
    assert len(frames) >= 2 and all("UTC (Ctrl-C to stop)" in f for f in frames)
    assert "Traceback" not in "".join(show_lines + list_lines)
