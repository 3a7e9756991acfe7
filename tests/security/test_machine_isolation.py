"""Machine isolation (issue 7, SPEC §13): each test performs an attack against a real `sandkeep serve` or a
real local host, and asserts that it fails.

* the LD_PRELOAD chain (upload a shared object, learn its path, preload it, restart) stops at the env check;
* with the check bypassed, the machine process is not root and never sees loader hooks in its environment;
* anyone who reaches the host's proxy with a machine id gets 401 from the gateway without its token;
* nothing sandkeep returns reveals a filesystem path of the host;
* a volume cannot hold more than its size (507, nothing half-written);
* the data dir is private (0600 files, 0700 directories) and holds no secret value in plaintext.
"""

from __future__ import annotations

import os
import pwd
import secrets
import stat
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.serving import Serve
from tests.support.procs import HostHandle, running_host
from tests.support.wait import wait_until

# the contract, spelled out (sandkeep.gateway defines the same names)
TOKEN_ENV, TOKEN_HEADER, PROXY_TOKEN_HEADER = "SANDKEEP_GATEWAY_TOKEN", "sandkeep-gateway-token", "sandkeep-proxy-token"
GATEWAY_TOKEN = "tok-" + secrets.token_hex(8)


def running_instance(serve: Serve, user: str, **body: Any) -> tuple[httpx.Client, dict[str, Any]]:
    client = serve.client(user)
    created = client.post("/v1/instances", json=body)
    assert created.status_code == 201, created.text
    return client, serve.wait_status(client, created.json()["id"], "running", timeout=90)


def uids_of(pid: int) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return [int(x) for x in line.split()[1:]]
    raise AssertionError(f"no Uid line for pid {pid}")


def expected_machine_uid() -> int | None:
    """The uid machine processes must run as: the default machine user when the host runs as root."""
    return pwd.getpwnam("nobody").pw_uid if os.geteuid() == 0 else None


def host_machine(handle: HostHandle, env: dict[str, str], *,
                 size_gb: int = 1) -> tuple[str, str, str, httpx.Client]:
    """A started gateway machine with a volume on a real local host: (app, machine id, volume id, proxy client)."""
    http = httpx.Client(base_url=handle.url, headers=handle.headers(), timeout=60.0)
    app = "sec-" + secrets.token_hex(4)
    assert http.post("/v1/apps", json={"app_name": app, "org_slug": "personal"}).status_code == 201
    vol = http.post(f"/v1/apps/{app}/volumes", json={"name": "data", "region": "lcl-a", "size_gb": size_gb}).json()
    m = http.post(f"/v1/apps/{app}/machines", json={"region": "lcl-a", "config": {
        "image": "sandkeep/gateway", "env": env, "mounts": [{"volume": vol["id"], "path": "/data"}]}}).json()
    waited = http.get(f"/v1/apps/{app}/machines/{m['id']}/wait", params={"state": "started", "timeout": 30})
    assert waited.status_code == 200, waited.text
    http.close()
    proxy = httpx.Client(base_url=handle.proxy_url, timeout=30.0,
                         headers={"fly-force-instance-id": m["id"], TOKEN_HEADER: GATEWAY_TOKEN})
    return app, m["id"], vol["id"], proxy


# ------------------------------------------------------------------------------------------ code execution


def test_ld_preload_chain_is_refused_at_the_first_step(serve: Serve) -> None:
    client, inst = running_instance(serve, "sec-preload", env={"GREETING": "hi"})
    iid = inst["id"]
    # the attacker uploads a shared object through their own gateway (allowed: it is just data) ...
    so = b"\x7fELF" + os.urandom(64)
    assert client.put(f"/v1/instances/{iid}/gateway/data/evil.so", content=so).status_code == 201
    # ... cannot learn where it lives ...
    health = client.get(f"/v1/instances/{iid}/gateway/health")
    assert health.status_code == 200 and "volume_path" not in health.json()
    # ... and cannot point a loader or interpreter hook at it, by env or by secret, on update or on create
    for field, name in (("env", "LD_PRELOAD"), ("secrets", "LD_PRELOAD"), ("env", "LD_LIBRARY_PATH"),
                        ("env", "PYTHONSTARTUP"), ("secrets", "PYTHONPATH"), ("env", "BASH_ENV"), ("env", "ENV"),
                        ("env", "NODE_OPTIONS"), ("env", "PERL5OPT"), ("env", "RUBYOPT"),
                        ("secrets", "JAVA_TOOL_OPTIONS"), ("env", "GCONV_PATH"), ("env", "DYLD_INSERT_LIBRARIES"),
                        ("env", "MY_PRELOAD"), ("env", "PATH"), ("env", "IFS")):
        patched = client.patch(f"/v1/instances/{iid}", json={field: {name: "data/evil.so"}})
        assert patched.status_code == 422, (field, name, patched.text)
        err = patched.json()["error"]
        assert err["code"] == "forbidden_env_name" and name in err["message"], err
        created = client.post("/v1/instances", json={field: {name: "data/evil.so"}})
        assert created.status_code == 422 and created.json()["error"]["code"] == "forbidden_env_name", created.text
    after = client.get(f"/v1/instances/{iid}").json()
    assert after["env"] == {"GREETING": "hi"} and after["secret_names"] == []
    assert after["config_generation"] == inst["config_generation"], "nothing was half-written"
    mine = client.get("/v1/instances").json()
    assert [i["id"] for i in mine["items"]] == [iid], "no instance was created by the refused requests"
    # the restart that would have loaded it runs the gateway as before, not as root
    pid = health.json()["pid"]
    assert 0 not in uids_of(pid)


def test_machine_process_is_unprivileged_even_with_the_env_check_bypassed(tmp_path: Path) -> None:
    """The host itself is handed loader hooks (as if the service's check were bypassed): the machine runs as
    the unprivileged machine user, never sees them in its environment, and owns only its own volume."""
    with running_host(tmp_path / "host") as handle:
        _app, _mid, vid, proxy = host_machine(handle, {TOKEN_ENV: GATEWAY_TOKEN, "LD_PRELOAD": "/nonexistent/evil.so",
                                                "PYTHONSTARTUP": "/nonexistent/evil.py", "SECRET_X": "s3"})
        with proxy:
            health = proxy.get("/health")
            assert health.status_code == 200, health.text
            pid = health.json()["pid"]
            uids = uids_of(pid)
            assert 0 not in uids, f"machine process {pid} runs with uids {uids}"
            if expected_machine_uid() is not None:
                assert uids == [expected_machine_uid()] * 4
            exec_env = Path(f"/proc/{pid}/environ").read_bytes()
            assert b"LD_PRELOAD" not in exec_env and b"PYTHONSTARTUP" not in exec_env and b"s3" not in exec_env
            volume = handle.data_dir / "regions" / "lcl-a" / "volumes" / vid
            st = volume.stat()
            assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == uids[0]
            assert proxy.put("/data/k", content=b"v").status_code == 201
            assert (volume / "data" / "k").stat().st_uid == uids[0]


# ------------------------------------------------------------------------------------------ the gateway token


def test_gateway_refuses_anyone_without_the_instance_token(serve: Serve) -> None:
    alice, inst = running_instance(serve, "sec-alice")
    iid, mid = inst["id"], inst["machine_id"]
    note = b"alice's private note " + secrets.token_hex(4).encode()
    assert alice.put(f"/v1/instances/{iid}/gateway/data/note", content=note).status_code == 201
    # an attacker who learned the machine id goes straight to the provider's proxy (the host's, here)
    attempts: list[dict[str, str]] = [{}, {TOKEN_HEADER: "guess"}, {TOKEN_HEADER: ""},
                                      {"Authorization": f"Bearer {serve.token('sec-alice')}"}]
    with httpx.Client(base_url=serve.host_proxy_url, timeout=30.0) as proxy:
        for method, path, body in (("GET", "/data/note", None), ("PUT", "/data/note", b"overwritten"),
                                   ("GET", "/health", None), ("GET", "/ws", None), ("GET", "/", None)):
            for extra in attempts:
                r = proxy.request(method, path, content=body, headers={"fly-force-instance-id": mid, **extra})
                assert r.status_code == 401, (method, path, extra, r.text)
                assert b"alice" not in r.content and mid.encode() not in r.content and b"/" not in r.content
    # the data is untouched, and reachable only through sandkeep by its owner
    assert alice.get(f"/v1/instances/{iid}/gateway/data/note").content == note
    with serve.client("sec-mallory") as mallory:
        assert mallory.get(f"/v1/instances/{iid}/gateway/data/note").status_code == 404
    # users never see the token: not in the instance, not echoed by the gateway route
    shown = alice.get(f"/v1/instances/{iid}")
    assert "gateway_token" not in shown.text and TOKEN_HEADER not in shown.text
    echoed = alice.get(f"/v1/instances/{iid}/gateway/health")
    assert TOKEN_HEADER not in {k.lower() for k in echoed.headers}


def test_admin_rotates_the_gateway_token(serve: Serve) -> None:
    owner, inst = running_instance(serve, "sec-rotate")
    iid = inst["id"]
    assert owner.put(f"/v1/instances/{iid}/gateway/data/k", content=b"kept").status_code == 201
    assert owner.post(f"/v1/instances/{iid}/gateway-token/rotate").status_code == 403
    with serve.client("sec-root", "admin") as admin:
        rotated = admin.post(f"/v1/instances/{iid}/gateway-token/rotate")
        assert rotated.status_code == 202 and rotated.json()["status"] == "restarting", rotated.text
        serve.wait_status(owner, iid, "running", timeout=90)
        assert owner.get(f"/v1/instances/{iid}/gateway/data/k").content == b"kept"
        audit = admin.get("/v1/audit", params={"instance_id": iid}).json()["items"]
        outcomes = [(a["actor"], a["action"], a["outcome"]) for a in audit if a["action"] == "rotate_gateway_token"]
        assert ("sec-root", "rotate_gateway_token", "ok") in outcomes
        assert ("sec-rotate", "rotate_gateway_token", "refused") in outcomes
        events = [e["event"] for e in admin.get(f"/v1/instances/{iid}/events").json()["items"]]
        assert "instance.gateway_token_rotated" in events


def test_host_proxy_token_when_configured(tmp_path: Path) -> None:
    with running_host(tmp_path / "host", env={"SANDKEEP_HOST_PROXY_TOKEN": "proxy-secret"}) as handle:
        _app, mid, _vid, proxy = host_machine(handle, {TOKEN_ENV: GATEWAY_TOKEN})
        with proxy:
            for extra in ({}, {PROXY_TOKEN_HEADER: "wrong"}):
                r = proxy.get("/health", headers=extra)
                assert r.status_code == 401 and PROXY_TOKEN_HEADER in r.json()["error"], r.text
            r = proxy.get("/health", headers={PROXY_TOKEN_HEADER: "proxy-secret", TOKEN_HEADER: "wrong"})
            assert r.status_code == 401 and "gateway" in r.json()["error"], "the proxy token alone opens nothing"
            r = proxy.get("/health", headers={PROXY_TOKEN_HEADER: "proxy-secret"})
            assert r.status_code == 200 and r.json()["machine_id"] == mid


# ------------------------------------------------------------------------------------------ paths


def test_nothing_sandkeep_returns_reveals_a_host_path(serve: Serve) -> None:
    owner, inst = running_instance(serve, "sec-paths")
    iid = inst["id"]
    roots = {str(serve.data_dir), str(serve.data_dir.resolve()), "/regions/", "/volumes/"}
    with serve.client("sec-paths-admin", "admin") as admin:
        answers = [owner.get(f"/v1/instances/{iid}/gateway/health"), owner.get(f"/v1/instances/{iid}"),
                   owner.get(f"/v1/instances/{iid}/events"), admin.get(f"/v1/instances/{iid}/debug"),
                   owner.get(f"/v1/instances/{iid}/gateway/data/missing")]
    for r in answers:
        assert r.status_code in (200, 404), r.text
        for root in roots:
            assert root not in r.text, (r.request.url, root, r.text[:300])
    assert set(answers[0].json()) == {"status", "started_at", "machine_id", "app_name", "region", "pid"}


# ------------------------------------------------------------------------------------------ volume size


def test_a_write_over_the_volume_size_is_507_and_leaves_nothing_behind(tmp_path: Path) -> None:
    # one "GB" is 4096 bytes on this host, so a 1 GB volume holds 4096 bytes of files
    with running_host(tmp_path / "host", extra_args=["--bytes-per-gb", "4096"]) as handle:
        app, mid, vid, proxy = host_machine(handle, {TOKEN_ENV: GATEWAY_TOKEN})
        volume = handle.data_dir / "regions" / "lcl-a" / "volumes" / vid

        def files() -> list[str]:
            return sorted(str(p.relative_to(volume)) for p in volume.rglob("*") if p.is_file())

        with proxy:
            assert proxy.put("/data/a", content=b"a" * 3000).status_code == 201
            over = proxy.put("/data/b", content=b"b" * 2000)
            assert over.status_code == 507, over.text
            assert over.json()["limit_bytes"] == 4096
            assert proxy.get("/data/b").status_code == 404
            assert files() == ["data/a"], "no temporary or partial file is left"
            # replacing a key counts only what it adds
            assert proxy.put("/data/a", content=b"A" * 4000).status_code == 201
            assert proxy.put("/data/a", content=b"X" * 5000).status_code == 507
            assert proxy.get("/data/a").content == b"A" * 4000, "the old value is intact"
            assert files() == ["data/a"]
            # a bigger volume takes effect when the machine restarts with it
            with httpx.Client(base_url=handle.url, headers=handle.headers(), timeout=60.0) as http:
                vol_path = f"/v1/apps/{app}/volumes/{vid}"
                extended = http.put(f"{vol_path}/extend", json={"size_gb": 2}).json()
                assert extended["needs_restart"] is True
                assert http.post(f"/v1/apps/{app}/machines/{mid}/restart").status_code == 200
            wait_until(lambda: proxy.put("/data/a", content=b"X" * 5000).status_code == 201, timeout=30,
                       message="the restarted machine accepts 5000 bytes in a 2 x 4096-byte volume")
            assert proxy.get("/data/a").content == b"X" * 5000


# ------------------------------------------------------------------------------------------ the data dir


def test_data_dir_is_private_and_holds_no_secret_in_plaintext(serve: Serve) -> None:
    secret_value, later_secret = "sk-live-" + secrets.token_hex(12), "pw-" + secrets.token_hex(12)
    visible = "visible-" + secrets.token_hex(8)
    client, inst = running_instance(serve, "sec-files", env={"PLAIN": visible}, secrets={"API_KEY": secret_value})
    iid = inst["id"]
    assert client.put(f"/v1/instances/{iid}/gateway/data/f", content=b"data").status_code == 201
    assert client.patch(f"/v1/instances/{iid}", json={"secrets": {"DB_PASSWORD": later_secret}}).status_code == 200
    assert client.post(f"/v1/instances/{iid}/restart").status_code == 202
    serve.wait_status(client, iid, "running", timeout=90)

    loose: list[str] = []
    found: dict[str, list[str]] = {secret_value: [], later_secret: [], visible: []}
    for path in [serve.data_dir, *serve.data_dir.rglob("*")]:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            continue
        if st.st_mode & 0o077:
            loose.append(f"{path.relative_to(serve.data_dir)} {stat.filemode(st.st_mode)}")
        if stat.S_ISREG(st.st_mode):
            content = path.read_bytes()
            for value, where in found.items():
                if value.encode() in content:
                    where.append(str(path.relative_to(serve.data_dir)))
    assert found[secret_value] == [] and found[later_secret] == [], f"secret values in plaintext: {found}"
    assert loose == [], f"group/other may access: {loose}"
    assert found[visible], "control: the plain env value is stored (the grep works)"
    log = serve.proc.log_path.read_bytes()
    assert secret_value.encode() not in log and later_secret.encode() not in log


@pytest.mark.parametrize("name", ["sandkeep.db", "host.log", "secrets.key", "app-name-secret", "host/host.db"])
def test_files_sandkeep_writes_are_0600(serve: Serve, name: str) -> None:
    assert stat.S_IMODE((serve.data_dir / name).stat().st_mode) == 0o600
    for directory in (serve.data_dir, serve.data_dir / "host"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
