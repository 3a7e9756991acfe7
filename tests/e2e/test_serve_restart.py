"""`sandkeep serve` on a fresh directory with no configuration at all, and a planned restart of serve.

Restarting serve in local mode restarts its local host child (every machine stops). A clean shutdown marks
the running instances first, so when serve comes back they are started again in place — same machine,
same volume, data intact — instead of being relocated by unexpected-stop recovery.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from tests.support.procs import Proc, free_port, spawn
from tests.support.wait import wait_until


def _no_configuration() -> dict[str, str]:
    """Blank out every sandkeep/Fly variable of the test environment (an empty value counts as unset)."""
    return {k: "" for k in os.environ if k.startswith(("SANDKEEP_", "FLY_"))}


def _start(cwd: Path, ports: tuple[int, int, int], log: Path) -> tuple[Proc, str]:
    api, host, proxy = ports
    proc = spawn(["serve", "--listen", f"127.0.0.1:{api}", "--host-listen", f"127.0.0.1:{host}",
                  "--host-proxy-listen", f"127.0.0.1:{proxy}", "--no-login-links"],
                 log_path=log, env=_no_configuration(), cwd=cwd)
    url = f"http://127.0.0.1:{api}"

    def ready() -> bool:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"serve exited with {proc.popen.returncode}:\n{proc.log()}")
        try:
            return httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, timeout=60, message="sandkeep serve /healthz")
    return proc, url


def test_fresh_directory_without_configuration_and_a_planned_restart_resumes_in_place(tmp_path: Path) -> None:
    ports = (free_port(), free_port(), free_port())
    proc, url = _start(tmp_path, ports, tmp_path / "serve-1.log")
    try:
        data_dir = tmp_path / ".sandkeep"  # the default SANDKEEP_HOME, relative to the working directory
        assert (data_dir / "sandkeep.db").exists() and (data_dir / "jwt-secret").exists()
        token = subprocess.run([sys.executable, "-m", "sandkeep", "token", "--user", "alice"], cwd=tmp_path,
                               env={**os.environ, **_no_configuration()}, capture_output=True, text=True,
                               timeout=60, check=True).stdout.strip()
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30.0)
        created = client.post("/v1/instances", json={})
        assert created.status_code == 201, created.text
        iid = created.json()["id"]

        def running() -> dict[str, Any] | None:
            body: dict[str, Any] = client.get(f"/v1/instances/{iid}").json()
            return body if body["status"] == "running" and body["pending_action"] is None else None

        before = wait_until(running, timeout=60, message="instance running")
        assert client.put(f"/v1/instances/{iid}/gateway/data/k", content=b"kept").status_code < 300
        assert proc.stop(signal.SIGTERM) == 0, proc.log()
        assert "runtime.planned_host_restart" in proc.log()

        proc, url = _start(tmp_path, ports, tmp_path / "serve-2.log")
        after = wait_until(running, timeout=60, message="instance running again after the restart")
        assert (after["machine_id"], after["volume_id"], after["region"]) == (
            before["machine_id"], before["volume_id"], before["region"])
        names = [e["event"] for e in client.get(f"/v1/instances/{iid}/events?limit=500").json()["items"]]
        assert "instance.unexpected_stop_recovery_started" not in names
        assert "reconcile.resume_after_host_restart" in names
        got = client.get(f"/v1/instances/{iid}/gateway/data/k")
        assert got.status_code == 200 and got.content == b"kept"
        client.close()
    finally:
        proc.stop(signal.SIGTERM)
