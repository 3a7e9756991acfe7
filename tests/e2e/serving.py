"""A real `sandkeep serve` process (API + engine + its own local host child) on free loopback ports."""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from sandkeep.clock import SystemClock
from sandkeep.credentials import Credentials, open_credentials
from tests.support.procs import SANDKEEP, Proc, free_port, spawn, spawn_healthy
from tests.support.wait import wait_until

FAST_ENV = {
    "SANDKEEP_INTERVAL_RUNNING": "2",
    "SANDKEEP_INTERVAL_BUSY": "0.3",
    "SANDKEEP_ALARM_POLL_INTERVAL": "0.1",
    "SANDKEEP_DETECT_POLL_INTERVAL": "0.3",
    "SANDKEEP_HEALTH_PROBE_INTERVAL": "0.1",
    "SANDKEEP_HEALTH_PROBE_TIMEOUT": "10",
    "SANDKEEP_RECOVERY_TIMEOUT": "60",
    "SANDKEEP_LOG_LEVEL": "info",
}


@dataclass
class Serve:
    url: str
    data_dir: Path
    secret: str
    host_url: str
    host_proxy_url: str
    host_token: str
    proc: Proc
    database_url: str = ""
    _credentials: list[Credentials] = field(default_factory=list)

    @property
    def credentials(self) -> Credentials:
        """serve's token registry, sessions and sign-in codes (its database, opened from the test)."""
        if not self._credentials:
            self._credentials.append(open_credentials(self.database_url, self.secret, SystemClock()))
        return self._credentials[0]

    def token(self, user_id: str, role: str = "user") -> str:
        """A token recorded in serve's database, as `sandkeep token` makes them."""
        return self.credentials.issue_token(user_id, role, 3600, issued_by="test").token

    def close(self) -> None:
        for credentials in self._credentials:
            credentials.store.close()
        self._credentials.clear()

    def headers(self, user_id: str, role: str = "user") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(user_id, role)}"}

    def client(self, user_id: str, role: str = "user") -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers(user_id, role), timeout=30.0)

    def host(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.request(method, f"{self.host_url}{path}", headers={"Authorization": f"Bearer {self.host_token}"},
                             timeout=30.0, **kwargs)

    def wait_status(self, client: httpx.Client, instance_id: str, *statuses: str,
                    timeout: float = 60.0) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            body: dict[str, Any] = client.get(f"/v1/instances/{instance_id}").json()
            return body if body.get("status") in statuses else None

        return wait_until(check, timeout=timeout, message=f"{instance_id} to reach {statuses}")


@contextmanager
def running_serve(base: Path, *, extra_env: dict[str, str] | None = None, secret: str | None = None,
                  host_token: str | None = None) -> Iterator[Serve]:
    """``serve`` on ``base/data``; pass the ``secret`` and ``host_token`` of an earlier one to restart it."""
    data = base / "data"
    secret, host_token = secret or secrets.token_urlsafe(48), host_token or secrets.token_urlsafe(24)
    env = {**FAST_ENV, "SANDKEEP_JWT_SECRET": secret, "SANDKEEP_HOST_TOKEN": host_token,
           "SANDKEEP_DATABASE_URL": "", "SANDKEEP_HOST_URL": "", "SANDKEEP_PROVIDER": "local",
           **(extra_env or {})}
    def start() -> tuple[Proc, str, tuple[int, int]]:
        api, host, proxy = free_port(), free_port(), free_port()
        proc = spawn(["serve", "--listen", f"127.0.0.1:{api}", "--data-dir", str(data), "--host-listen",
                      f"127.0.0.1:{host}", "--host-proxy-listen", f"127.0.0.1:{proxy}"],
                     log_path=base / "serve.log", env=env)
        return proc, f"http://127.0.0.1:{api}", (host, proxy)

    proc, url, (host, proxy) = spawn_healthy(start, what="sandkeep serve", timeout=60)
    database_url = env.get("SANDKEEP_DATABASE_URL") or f"sqlite:///{(data / 'sandkeep.db').resolve()}"
    serve: Serve | None = None
    try:
        serve = Serve(url=url, data_dir=data, secret=secret, host_url=f"http://127.0.0.1:{host}",
                      host_proxy_url=f"http://127.0.0.1:{proxy}", host_token=host_token, proc=proc,
                      database_url=database_url)
        yield serve
    finally:
        if serve is not None:
            serve.close()
        proc.stop()


def serve_fails(data_dir: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """Run ``sandkeep serve ARGS`` until it exits; assert exit code 1 and exactly one line on stderr, no
    traceback; return that line. The environment has no SANDKEEP_* or FLY_* variables but ``env``."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("SANDKEEP_", "FLY_"))}
    full.update({"SANDKEEP_HOME": str(data_dir), "SANDKEEP_LOG_LEVEL": "info", **(env or {})})
    done = subprocess.run([*SANDKEEP, "serve", "--listen", f"127.0.0.1:{free_port()}", "--no-login-links", *args],
                          env=full, capture_output=True, text=True, timeout=90, stdin=subprocess.DEVNULL)
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr and lines[0].startswith("sandkeep serve: "), done.stderr
    return lines[0]
