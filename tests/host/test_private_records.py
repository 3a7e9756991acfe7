"""The host keeps machine env (secret values, gateway tokens) encrypted in host.db, old records included."""

from __future__ import annotations

import stat
from pathlib import Path

from sandkeep.clock import SystemClock
from sandkeep.host.core import Host, HostOptions
from sandkeep.host.db import HostDB
from sandkeep.secrets import SecretBox


def _files(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file())


def test_plaintext_env_of_an_older_host_is_encrypted_and_compacted_at_load(tmp_path: Path) -> None:
    secret = "plaintext-secret-4711"
    old = HostDB(tmp_path / "host.db")  # a record as hosts wrote them before env was encrypted
    old.put("machine", "m1", {"id": "m1", "app": "a", "state": "stopped", "pid": None, "pid_start": None,
                              "config": {"image": "sandkeep/gateway", "env": {"API_KEY": secret}}})
    old.close()
    assert secret.encode() in _files(tmp_path)

    key = SecretBox.generate_key()
    host = Host(HostOptions(data_dir=tmp_path, regions=["r1"], secrets_key=key), SystemClock())
    host.load()
    assert host.machines["m1"]["config"]["env"] == {"API_KEY": secret}, "the host still knows the value"
    host.db.close()
    assert secret.encode() not in _files(tmp_path), "no byte of the old plaintext survives in the files"
    assert stat.S_IMODE((tmp_path / "host.db").stat().st_mode) == 0o600

    again = Host(HostOptions(data_dir=tmp_path, regions=["r1"], secrets_key=key), SystemClock())
    again.load()
    assert again.machines["m1"]["config"]["env"] == {"API_KEY": secret}, "read back with the same key"
    again.db.close()


def test_a_root_host_refuses_to_run_machines_as_root(tmp_path: Path) -> None:
    import os

    import pytest

    from sandkeep.host.core import HostError, resolve_machine_user

    if os.geteuid() != 0:
        assert resolve_machine_user("nobody") is None, "a host that is not root runs machines as itself"
        return
    for bad in ("", "root", "0", "0:0", "no-such-user-xyz"):
        with pytest.raises(HostError):
            resolve_machine_user(bad)
    uid, gid = resolve_machine_user("nobody") or (0, 0)
    assert uid != 0 and gid != 0
    assert resolve_machine_user("4242:4343") == (4242, 4343)
