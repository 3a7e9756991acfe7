"""Killing ``sandkeep serve`` (SIGKILL, whole process group) at any point of a recovery converges (SPEC §12.6).

A real serve, its real local host child and real machine processes. The machine of a running instance is
crashed; serve kills itself (``SANDKEEP_TEST_CRASH_AT``, :mod:`sandkeep.engine.crashpoints`) at one step of the
recovery -- before the fork, after it, after the replacement's create, while waiting for it, during cutover --
and the test SIGKILLs what is left of its process group (the host child, as ``kill -9`` of a shell job would).
A new serve on the same data dir (its host comes back with every machine ``stopped``) must bring the instance
back ``running`` with its data, with at most one started machine and no leaked volume.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
from pathlib import Path
from typing import Any

import pytest

from sandkeep.engine.crashpoints import ENV, POINTS
from tests.e2e.serving import Serve, running_serve
from tests.support.wait import wait_until

#: short enough that each case stays well under 15 s; the lease TTL bounds how soon a successor may take
#: over an instance the killed serve held (outside a wait)
CRASH_ENV = {"SANDKEEP_LEASE_TTL": "2", "SANDKEEP_MACHINE_WAIT_TIMEOUT": "5", "SANDKEEP_CLAIM_WAIT": "1"}


def _kill_group(serve: Serve) -> None:
    """serve killed itself at the crash point; SIGKILL the rest of its process group (the host child)."""
    popen = serve.proc.popen
    try:
        popen.wait(timeout=60)
    except Exception:
        raise AssertionError(f"serve never reached its crash point:\n{serve.proc.log()[-4000:]}") from None
    assert popen.returncode == -signal.SIGKILL, (popen.returncode, serve.proc.log()[-4000:])
    with contextlib.suppress(ProcessLookupError):
        os.killpg(popen.pid, signal.SIGKILL)


def _app_state(serve: Serve, app: str) -> tuple[list[str], set[str]]:
    machines = serve.host("GET", f"/v1/apps/{app}/machines").json()
    volumes = serve.host("GET", f"/v1/apps/{app}/volumes").json()
    return [m["id"] for m in machines if m["state"] == "started"], {v["id"] for v in volumes}


@pytest.mark.parametrize("point", POINTS)
def test_serve_killed_during_a_recovery_converges_after_a_restart(tmp_path: Path, point: str) -> None:
    secret, host_token = secrets.token_urlsafe(48), secrets.token_urlsafe(24)
    user = f"crash-{secrets.token_hex(4)}"
    with running_serve(tmp_path, extra_env={**CRASH_ENV, ENV: point}, secret=secret,
                       host_token=host_token) as first:
        with first.client(user) as client:
            created = client.post("/v1/instances", json={})
            assert created.status_code == 201, created.text
            iid = created.json()["id"]
            before = first.wait_status(client, iid, "running")
            put = client.put(f"/v1/instances/{iid}/gateway/data/keep.txt", content=b"precious")
            assert put.status_code < 300, put.text
            crash = first.host("POST", f"/_local/apps/{before['app_name']}/machines/{before['machine_id']}/crash")
            assert crash.status_code < 300, crash.text
            _kill_group(first)

    with running_serve(tmp_path, extra_env=CRASH_ENV, secret=secret, host_token=host_token) as second:
        with second.client(user) as client:
            def ended() -> dict[str, Any] | None:  # running again, or stopped (a failed recovery ends there)
                body: dict[str, Any] = client.get(f"/v1/instances/{iid}").json()
                if body["status"] == "stopped":
                    return body
                done = body["status"] == "running" and body["machine_id"] != before["machine_id"]
                return body if done and body["recovery"]["started_at"] is None else None

            after = wait_until(ended, timeout=90, message=f"the recovery to end after a kill at {point}")
            assert after["status"] == "running", after["recovery"]["last_error"]
            got = client.get(f"/v1/instances/{iid}/gateway/data/keep.txt")
            assert got.status_code == 200 and got.content == b"precious"

            def converged() -> tuple[list[str], set[str]] | None:
                started, volumes = _app_state(second, before["app_name"])
                keep = {after["volume_id"], after["recovery"]["retained_volume_id"]} - {None}
                return (started, volumes) if started == [after["machine_id"]] and volumes <= keep else None

            try:
                wait_until(converged, timeout=30, message="one started machine, no leaked volume")
            except Exception:
                raise AssertionError(f"after a kill at {point}: {_app_state(second, before['app_name'])}, "
                                     f"instance {after}") from None
            assert after["volume_id"] in _app_state(second, before["app_name"])[1]
