"""Start real sandkeep processes (the local host, serve) on loopback ports for tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx

from sandkeep.net import free_port as free_port  # re-exported for the tests
from tests.support.wait import wait_until

SANDKEEP = [sys.executable, "-m", "sandkeep"]
T = TypeVar("T")


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=timeout)
        return int(self.popen.returncode)


def spawn(args: list[str], *, log_path: Path, env: dict[str, str] | None = None,
          cwd: Path | None = None) -> Proc:
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(log_path, "ab")
    popen = subprocess.Popen(SANDKEEP + args, stdout=fh, stderr=subprocess.STDOUT, env=full_env,
                             cwd=str(cwd) if cwd else None, start_new_session=True)
    fh.close()
    return Proc(popen=popen, log_path=log_path, env=full_env)


@dataclass
class HostHandle:
    url: str  # Machines API base, e.g. http://127.0.0.1:4280 (paths under /v1)
    proxy_url: str
    token: str
    data_dir: Path
    regions: list[str]
    proc: Proc

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def port_taken(proc: Proc) -> bool:
    """Whether ``proc`` exited because a port picked free was taken by another process before it bound it."""
    return proc.popen.poll() is not None and "address already in use" in proc.log().lower()


#: attempts at starting a process on freshly picked ports when one was taken in between (picked free, bound later)
PORT_ATTEMPTS = 3


def spawn_healthy(start: Callable[[], tuple[Proc, str, T]], *, what: str, timeout: float, retry: bool = True,
                  stop_signal: int = signal.SIGTERM) -> tuple[Proc, str, T]:
    """``start()`` picks ports, spawns a sandkeep process and returns (proc, base URL, anything); wait until its
    ``/healthz`` answers 200. When a port picked free was taken before the process bound it, start again on new
    ports (``retry``, at most PORT_ATTEMPTS times); any other failure stops the process and raises."""
    for attempt in range(1, PORT_ATTEMPTS + 1):
        proc, url, extra = start()

        def ready(proc: Proc = proc, url: str = url) -> bool:
            if proc.popen.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.popen.returncode}:\n{proc.log()}")
            return httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200

        try:
            wait_until(ready, timeout=timeout, message=f"{what} /healthz")
        except Exception:
            proc.stop(stop_signal)
            if retry and attempt < PORT_ATTEMPTS and port_taken(proc):
                continue
            raise
        return proc, url, extra
    raise AssertionError("unreachable")


def start_host_process(data_dir: Path, *, token: str = "test-host-token",
                       regions: tuple[str, ...] = ("lcl-a", "lcl-b", "lcl-c"),
                       extra_args: list[str] | None = None, api_port: int | None = None,
                       proxy_port: int | None = None, env: dict[str, str] | None = None) -> HostHandle:
    def start() -> tuple[Proc, str, int]:
        api, proxy = api_port or free_port(), proxy_port or free_port()
        args = ["host", "--listen", f"127.0.0.1:{api}", "--proxy-listen", f"127.0.0.1:{proxy}",
                "--data-dir", str(data_dir), "--regions", ",".join(regions), *(extra_args or [])]
        proc = spawn(args, log_path=data_dir.parent / f"{data_dir.name}-host.log",
                     env={"SANDKEEP_HOST_TOKEN": token, **(env or {})})
        return proc, f"http://127.0.0.1:{api}", proxy

    proc, url, proxy = spawn_healthy(start, what="local host", timeout=30, stop_signal=signal.SIGKILL,
                                     retry=api_port is None or proxy_port is None)
    return HostHandle(url=url, proxy_url=f"http://127.0.0.1:{proxy}", token=token, data_dir=data_dir,
                      regions=list(regions), proc=proc)


@contextmanager
def running_host(data_dir: Path, **kwargs: object) -> Iterator[HostHandle]:
    handle = start_host_process(data_dir, **kwargs)  # type: ignore[arg-type]
    try:
        yield handle
    finally:
        handle.proc.stop()
