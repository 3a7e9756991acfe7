"""`sandkeep serve` as a process: clear start-up errors, clean shutdown, no orphaned local host."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx

from tests.e2e.serving import running_serve
from tests.support.procs import free_port
from tests.support.wait import wait_until


def _serve(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "SANDKEEP_DATABASE_URL": "", **(env or {})}
    return subprocess.run([sys.executable, "-m", "sandkeep", "serve", *args], env=full, capture_output=True,
                          text=True, timeout=60)


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_fly_without_a_token_is_a_clear_start_up_error(tmp_path: Path) -> None:
    out = _serve(["--provider", "fly", "--data-dir", str(tmp_path), "--listen", f"127.0.0.1:{free_port()}"],
                 env={"FLY_API_TOKEN": ""})
    assert out.returncode == 1
    assert "FLY_API_TOKEN" in out.stderr


def test_fly_proxy_url_without_app_placeholder_is_a_clear_start_up_error(tmp_path: Path) -> None:
    out = _serve(["--provider", "fly", "--data-dir", str(tmp_path), "--listen", f"127.0.0.1:{free_port()}"],
                 env={"FLY_API_TOKEN": "x", "FLY_PROXY_URL": "https://proxy.example"})
    assert out.returncode == 1
    assert "FLY_PROXY_URL" in out.stderr and "{app}" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_taken_port_is_a_clear_start_up_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        out = _serve(["--data-dir", str(tmp_path), "--listen", f"127.0.0.1:{port}"])
    assert out.returncode == 1 and "cannot listen" in out.stderr and str(port) in out.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        out = _serve(["--data-dir", str(tmp_path), "--listen", f"127.0.0.1:{free_port()}",
                      "--host-listen", f"127.0.0.1:{port}", "--host-proxy-listen", f"127.0.0.1:{free_port()}"])
    assert out.returncode == 1 and "--host-listen" in out.stderr


def test_bad_listen_value_is_a_usage_error(tmp_path: Path) -> None:
    out = _serve(["--data-dir", str(tmp_path), "--listen", "nonsense"])
    assert out.returncode == 2 and "HOST:PORT" in out.stderr


def test_sigterm_stops_cleanly_and_takes_the_host_down(tmp_path: Path) -> None:
    with running_serve(tmp_path) as serve:
        assert "sign in" in serve.proc.log() and "/login/once/" in serve.proc.log()
        assert (serve.data_dir / "host-token").exists() is False  # token came from SANDKEEP_HOST_TOKEN
        hosts = wait_until(lambda: _children(serve.proc.popen.pid), timeout=10, message="host child")
        assert httpx.get(f"{serve.host_url}/healthz").status_code == 200
        code = serve.proc.stop(signal.SIGTERM)
        assert code == 0, serve.proc.log()
        assert not any(_alive(p) for p in hosts)


def test_sigkill_of_serve_does_not_orphan_the_host(tmp_path: Path) -> None:
    with running_serve(tmp_path) as serve:
        hosts = wait_until(lambda: _children(serve.proc.popen.pid), timeout=10, message="host child")
        serve.proc.stop(signal.SIGKILL)
        wait_until(lambda: not any(_alive(p) for p in hosts), timeout=30, message="host child to exit")


def test_generated_secrets_are_private_and_reused(tmp_path: Path) -> None:
    with running_serve(tmp_path, extra_env={"SANDKEEP_JWT_SECRET": "", "SANDKEEP_HOST_TOKEN": ""}) as serve:
        secret_file = serve.data_dir / "jwt-secret"
        assert secret_file.stat().st_mode & 0o777 == 0o600
        assert (serve.data_dir / "host-token").stat().st_mode & 0o777 == 0o600
        out = subprocess.run([sys.executable, "-m", "sandkeep", "token", "--user", "ann", "--role", "admin",
                              "--data-dir", str(serve.data_dir)], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "SANDKEEP_JWT_SECRET": ""}, check=True)
        resp = httpx.get(f"{serve.url}/v1/audit", headers={"Authorization": f"Bearer {out.stdout.strip()}"})
        assert resp.status_code == 200


def test_serve_can_use_an_already_running_host(tmp_path: Path) -> None:
    from tests.support.procs import running_host

    with running_host(tmp_path / "ext-host") as host:
        env = {"SANDKEEP_HOST_URL": host.url, "SANDKEEP_HOST_TOKEN": host.token,
               "SANDKEEP_HOST_PROXY_URL": host.proxy_url}
        with running_serve(tmp_path / "s", extra_env=env) as serve:
            assert "started elsewhere" in serve.proc.log()
            assert not _children(serve.proc.popen.pid)  # no host child of its own
            with serve.client("ext-user") as client:
                created = client.post("/v1/instances", json={}).json()
                inst = serve.wait_status(client, created["id"], "running")
            machines = httpx.get(f"{host.url}/v1/apps/{inst['app_name']}/machines", headers=host.headers()).json()
            assert [m["id"] for m in machines] == [inst["machine_id"]]
