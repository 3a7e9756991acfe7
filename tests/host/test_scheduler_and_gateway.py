"""Scheduled snapshots on a FakeClock (in-process), the realistic profile table, and the gateway process."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import pytest

from sandkeep.clock import FakeClock
from sandkeep.gateway import TOKEN_ENV, TOKEN_HEADER
from sandkeep.host.core import Host, HostError, HostOptions
from sandkeep.host.faults import REALISTIC_PROFILE, profile_delays
from tests.support.procs import Proc, free_port, spawn
from tests.support.wait import wait_until


async def test_scheduled_snapshots_follow_the_clock_and_retention(tmp_path: Path) -> None:
    clock = FakeClock()
    host = Host(HostOptions(data_dir=tmp_path, regions=["r1", "r2"], snapshot_interval=3600.0,
                            snapshot_retention=4 * 3600.0), clock)
    host.load()
    try:
        host.create_app({"app_name": "sched"})
        vol = await host.create_volume("sched", {"name": "data", "region": "r1"})
        (host.volume_dir(vol) / "file").write_text("one")
        assert (await host.scheduled_pass())["taken"] == []  # not due yet
        clock.advance(3600)
        first = (await host.scheduled_pass())["taken"]
        assert len(first) == 1
        assert (host.snapshot_dir(host.snapshots[first[0]]) / "file").read_text() == "one"
        clock.advance(1800)
        assert (await host.scheduled_pass())["taken"] == []
        for _ in range(4):
            clock.advance(3600)
            await host.scheduled_pass()
        ids = [s["id"] for s in host.list_snapshots("sched", vol["id"])]
        assert first[0] not in ids, "older than the retention: pruned"
        assert not host.snapshot_dir(host.snapshots.get(first[0]) or {"region": "r1", "id": first[0]}).exists()
        assert 3 <= len(ids) <= 5
        host.set_outage("r1", True)
        clock.advance(3600)
        assert (await host.scheduled_pass())["taken"] == []  # a down region takes no snapshots
        with pytest.raises(HostError) as exc:
            await host.create_snapshot("sched", vol["id"])
        assert exc.value.status == 412
    finally:
        await host.shutdown()


async def test_a_volume_snapshot_retention_expires_its_snapshots_on_the_host_clock(tmp_path: Path) -> None:
    """SANDKEEP_SNAPSHOT_RETENTION reaches the host as each volume's ``snapshot_retention`` (days): the host
    prunes that volume's snapshots (sandkeep's on-demand ones too) once they are older, on its own clock; a volume
    without one keeps the host's default; a volume restored from a snapshot keeps the retention it was given."""
    clock = FakeClock()
    host = Host(HostOptions(data_dir=tmp_path, regions=["r1"], snapshot_interval=30 * 86400.0,
                            snapshot_retention=5 * 86400.0, scheduler_tick=3600.0), clock)
    host.load()
    try:
        host.create_app({"app_name": "ret"})
        short = await host.create_volume("ret", {"name": "a", "region": "r1", "snapshot_retention": 2})
        plain = await host.create_volume("ret", {"name": "b", "region": "r1"})
        assert host.volume_json(short)["snapshot_retention"] == 2
        assert host.volume_json(plain)["snapshot_retention"] == 5
        s_short = await host.create_snapshot("ret", short["id"])
        s_plain = await host.create_snapshot("ret", plain["id"])
        restored = await host.create_volume("ret", {"name": "a", "region": "r1", "snapshot_id": s_short["id"],
                                                    "snapshot_retention": 2})
        assert host.volume_json(restored)["snapshot_retention"] == 2
        clock.advance(2 * 86400 - 60)
        assert (await host.scheduled_pass())["pruned"] == []
        clock.advance(120)
        assert (await host.scheduled_pass())["pruned"] == [s_short["id"]]
        assert [s["id"] for s in host.list_snapshots("ret", plain["id"])] == [s_plain["id"]]
        clock.advance(3 * 86400)
        assert (await host.scheduled_pass())["pruned"] == [s_plain["id"]]
        with pytest.raises(HostError) as exc:
            await host.create_volume("ret", {"name": "c", "region": "r1", "snapshot_retention": 61})
        assert exc.value.status == 422
    finally:
        await host.shutdown()


def test_realistic_profile_is_documented() -> None:
    delays = profile_delays("realistic")
    for name in ("machine.create", "machine.boot.first", "volume.fork", "volume.create"):
        assert delays[name] > 0 and REALISTIC_PROFILE[name][1]
    assert delays["volume.fork"] > delays["volume.create"]
    assert profile_delays("none") == {}
    with pytest.raises(ValueError):
        profile_delays("slow")


def spawn_gateway(tmp_path: Path) -> tuple[Proc, str, Path]:
    """A gateway process (machine m1, token ``gw-token``) on a fresh volume: the process, its URL, the volume."""
    port = free_port()
    volume = tmp_path / "vol"
    volume.mkdir()
    proc = spawn(["gateway"], log_path=tmp_path / "gw.log",
                 env={"PORT": str(port), "SANDKEEP_VOLUME_PATH": str(volume), "FLY_MACHINE_ID": "m1",
                      TOKEN_ENV: "gw-token"})
    return proc, f"http://127.0.0.1:{port}", volume


def test_gateway_stores_data_rejects_traversal_and_stops_on_sigterm(tmp_path: Path) -> None:
    proc, url, volume = spawn_gateway(tmp_path)
    http = httpx.Client(base_url=url, headers={TOKEN_HEADER: "gw-token"})
    try:
        health = wait_until(lambda: http.get("/health").json(), timeout=20, message="gateway up")
        assert health["status"] == "ok" and health["machine_id"] == "m1"
        assert str(tmp_path) not in str(health), "the gateway reveals no filesystem path"
        assert health["started_at"].endswith("Z")
        for path in ("/health", "/data/missing", "/ws"):  # without its token the gateway answers nothing
            for headers in ({}, {TOKEN_HEADER: "wrong"}):
                r = httpx.get(url + path, headers=headers)
                assert r.status_code == 401 and "m1" not in r.text, (path, headers)
        assert httpx.put(url + "/data/k.0", content=b"x").status_code == 401
        assert not (volume / "data" / "k.0").exists()
        assert http.get("/data/missing").status_code == 404
        assert http.put("/data/k.1", content=b"\x00bytes").status_code == 201
        assert http.get("/data/k.1").content == b"\x00bytes"
        assert (volume / "data" / "k.1").read_bytes() == b"\x00bytes"
        for bad in ("..", "..%2Fescape", "a%2Fb", "%2E%2E"):
            assert http.put(f"/data/{bad}", content=b"x").status_code in (400, 404), bad
        assert not (tmp_path / "escape").exists()
    finally:
        http.close()
        code = proc.stop(signal.SIGTERM)
    assert code == 0


def test_gateway_says_connection_close_when_it_closes_after_a_refusal(tmp_path: Path) -> None:
    """A refusal (401, or a PUT without a usable Content-Length) closes the connection, so it must say so: a
    keep-alive client (the host's proxy) that was not told sent its next request down the closed connection and
    got ``RemoteProtocolError`` (a 502 through the proxy) about one time in seven."""
    proc, url, volume = spawn_gateway(tmp_path)
    try:
        wait_until(lambda: httpx.get(url + "/health", headers={TOKEN_HEADER: "gw-token"}).status_code == 200,
                   timeout=20, message="gateway up")
        with httpx.Client(base_url=url) as keepalive:  # one pooled connection, reused while it stays open
            for i in range(200):
                refused = keepalive.put("/data/k", content=b"x", headers={} if i % 2 else {TOKEN_HEADER: "no"})
                assert refused.status_code == 401 and refused.headers.get("connection") == "close", i
            chunked = keepalive.put("/data/k", content=iter([b"x"]), headers={TOKEN_HEADER: "gw-token"})
            assert chunked.status_code == 400 and chunked.headers.get("connection") == "close"
            kept = keepalive.get("/health", headers={TOKEN_HEADER: "gw-token"})
            assert kept.status_code == 200 and kept.headers.get("connection") != "close"
        assert not (volume / "data" / "k").exists()
    finally:
        code = proc.stop(signal.SIGTERM)
    assert code == 0


def test_scheduler_runs_in_the_host_process(tmp_path: Path) -> None:
    from tests.host.conftest import Api
    from tests.support.procs import running_host

    with running_host(tmp_path / "host", extra_args=["--snapshot-interval", "0.5", "--snapshot-retention", "1.5",
                                                     "--scheduler-tick", "0.1"]) as handle:
        api = Api(handle)
        app = api.new_app()
        vol = api.volume(app, "lcl-a")
        snaps = f"/v1/apps/{app}/volumes/{vol['id']}/snapshots"
        first = wait_until(lambda: api.call("GET", snaps, 200), timeout=20, message="a scheduled snapshot")[0]
        wait_until(lambda: first["id"] not in [s["id"] for s in api.call("GET", snaps, 200)], timeout=20,
                   message="the first snapshot pruned after the retention")
        assert api.call("GET", snaps, 200), "newer snapshots are kept"
        ran = api.local("POST", "/_local/snapshots/run")
        assert set(ran) == {"taken", "pruned"}
        api.close()


def test_rate_limiter_buckets_on_a_fake_clock() -> None:
    from sandkeep.host.faults import RateLimiter

    clock = FakeClock()
    limiter = RateLimiter(clock.monotonic)
    key = "app/m1"
    assert [limiter.check("machine.start", key) for _ in range(3)] == [None, None, None]  # burst of 3
    wait = limiter.check("machine.start", key)
    assert wait is not None and 0 < wait <= 1.0
    assert limiter.check("machine.start", "app/m2") is None  # per machine
    assert limiter.check("machine.stop", key) is None  # per action
    clock.advance(1.0)
    assert limiter.check("machine.start", key) is None
    assert all(limiter.check("machine.get", key) is None for _ in range(10))
    assert limiter.check("machine.get", key) is not None
