"""Pure pieces: region order, names, sizes, secrets, the emitter's metrics, the detector's poll."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from sandkeep import metrics
from sandkeep.clock import FakeClock
from sandkeep.config import Settings
from sandkeep.engine import recovery
from sandkeep.engine.actions import Observed, Persist
from sandkeep.engine.detector import Detector
from sandkeep.engine.events import Emitter
from sandkeep.engine.naming import (
    ConfigError,
    ForbiddenEnvNameError,
    app_name_for,
    forbidden_env_name,
    guest_for,
    validate_env,
)
from sandkeep.engine.policy import backoff_seconds, recovery_regions
from sandkeep.engine.reconcile import decide, housekeeping
from sandkeep.secrets import SecretBox, SecretsError, load_or_create_key
from sandkeep.store.records import InstanceRecord, Status
from sandkeep.store.sql import SqlStore
from tests.engine.conftest import ADMIN, USER, Harness
from tests.support.model import Model


def record(**changes: object) -> InstanceRecord:
    now = FakeClock().now()
    base = InstanceRecord(id="ins_1", user_id="u", sandbox_id="sbx_1", status=Status.RUNNING, created_at=now,
                          updated_at=now, app_name="sk-x", machine_id="m1", volume_id="v1", region="lcl-a")
    return base.copy(**changes)


def test_recovery_regions() -> None:
    assert recovery_regions(["a", "b", "c"], "a") == ("b", "c")  # dropped with 3+
    assert recovery_regions(["a", "b"], "a") == ("b", "a")  # moved last with 2
    assert recovery_regions(["a"], "a") == ("a",)
    assert recovery_regions(["a", "b", "c"], "z") == ("a", "b", "c")


def test_app_names_are_stable_valid_per_owner_and_keyed() -> None:
    a1, a2, b = app_name_for("alice", "sk", "k1"), app_name_for("alice", "sk", "k1"), app_name_for("bob", "sk", "k1")
    assert a1 == a2 != b
    assert a1.startswith("sk-") and len(a1) <= 63 and a1.replace("-", "").isalnum() and a1.islower()
    assert app_name_for("x", "9_Bad Prefix", "k1")[0].isalpha()
    # not derivable from the user id alone (SPEC §13): another secret, another name; never the plain hash
    assert app_name_for("alice", "sk", "k2") != a1
    assert a1 != "sk-" + hashlib.sha256(b"alice").hexdigest()[:12]
    with pytest.raises(ValueError):
        app_name_for("alice", "sk", "")


def test_sizes_and_env_validation() -> None:
    assert guest_for("performance-2x").memory_mb == 4096
    with pytest.raises(ConfigError):
        guest_for("nope")
    for bad in ({"1X": "v"}, {"PORT": "1"}, {"FLY_X": "1"}, {"OK": 3}, {"sandkeep_token": "x"}):
        with pytest.raises(ConfigError):
            validate_env(bad)
    assert validate_env({"A_1": "x"}) == {"A_1": "x"}


@pytest.mark.parametrize("name", ["LD_PRELOAD", "ld_library_path", "LD_AUDIT", "DYLD_INSERT_LIBRARIES", "PYTHONPATH",
                                  "PYTHONSTARTUP", "PYTHONHOME", "BASH_ENV", "ENV", "NODE_OPTIONS", "PERL5OPT",
                                  "PERL5LIB", "RUBYOPT", "RUBYLIB", "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS",
                                  "JEMALLOC_PRELOAD", "GCONV_PATH", "IFS", "PATH", "HOME", "PORT", "GLIBC_TUNABLES",
                                  "BASH_FUNC_x%%", "FLY_REGION", "SANDKEEP_GATEWAY_TOKEN"])
def test_loader_and_interpreter_hooks_are_forbidden(name: str) -> None:
    assert forbidden_env_name(name)
    with pytest.raises(ConfigError):
        validate_env({name: "/data/evil.so"})
    if name.isidentifier():
        with pytest.raises(ForbiddenEnvNameError, match="not allowed"):
            validate_env({name: "x"}, "secret")


@pytest.mark.parametrize("name", ["NODE_ENV", "DATABASE_URL", "API_KEY", "LANG", "TZ", "ENVIRONMENT", "MY_PATH_X"])
def test_ordinary_names_are_allowed(name: str) -> None:
    assert not forbidden_env_name(name)
    assert validate_env({name: "v"}) == {name: "v"}


def test_backoff_grows_and_is_capped() -> None:
    s = Settings(interval_busy=5.0, provider_backoff_max=60.0)
    assert [backoff_seconds(n, s) for n in (1, 2, 3, 4, 5)] == [5.0, 10.0, 20.0, 40.0, 60.0]
    assert backoff_seconds(1, s, retry_after=90.0) == 90.0


def test_secrets_roundtrip_and_key_file(tmp_path: Path) -> None:
    key = load_or_create_key(tmp_path)
    assert load_or_create_key(tmp_path) == key
    mode = stat.S_IMODE(os.stat(tmp_path / "secrets.key").st_mode)
    assert mode == 0o600
    box = SecretBox(key)
    token = box.encrypt("hunter2")
    assert "hunter2" not in token and box.decrypt(token) == "hunter2"
    with pytest.raises(SecretsError):
        SecretBox(SecretBox.generate_key()).decrypt(token)
    with pytest.raises(SecretsError):
        SecretBox("not-a-key")
    assert "key" not in repr(box).lower().replace("<key hidden>", "")
    from_settings = SecretBox.from_settings(Settings(home=tmp_path))
    assert from_settings.decrypt(token) == "hunter2"


def test_begin_recovery_persists_spec_fields() -> None:
    now = FakeClock().now()
    actions = recovery.begin(record(health_fail_count=0, last_recovery_error="old"), Observed(), Settings(), now,
                             fail_count=1)
    persist = next(a for a in actions if isinstance(a, Persist))
    assert persist.changes["status"] == Status.RECOVERING and persist.changes["recovery_started_at"] == now
    assert persist.changes["health_fail_count"] == 0 and persist.changes["pending_recovery_volume_id"] is None
    assert persist.changes["last_recovery_error"] is None


def test_housekeeping_never_touches_pending_volume_while_recovering() -> None:
    now = FakeClock().now()
    rec = record(status=Status.RECOVERING, recovery_started_at=now, pending_recovery_volume_id="v2",
                 recovery_step="wait", retained_volume_id="v0", retained_volume_cleanup_after=now)
    assert housekeeping(rec, Observed(), Settings(), now) == []
    actions = decide(rec, Observed(machine_missing=True), Settings(), now)
    assert not any(getattr(a, "volume_id", None) == "v2" and type(a).__name__ == "DeleteVolumeSafely"
                   for a in actions)


def test_destroyed_is_never_recreated() -> None:
    now = FakeClock().now()
    actions = decide(record(status=Status.DESTROYED, machine_id=None, volume_id=None), Observed(), Settings(), now)
    assert [type(a).__name__ for a in actions] == ["Done"]


def test_emitter_counts_metrics_and_never_logs_secrets(store: SqlStore, clock: FakeClock,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from sandkeep.logs import configure_logging

    configure_logging("info")
    emitter = Emitter(store, clock)
    rec = record(secrets_encrypted={"API_KEY": "gAAAA-cipher"}, env={"X": "1"})
    before = metrics.REGISTRY.get_sample_value("sandkeep_recoveries_started_total", {"label": "alarm_stopped"}) or 0
    emitter.emit(rec, "instance.unexpected_stop_recovery_started", label="alarm_stopped", value=1.0,
                 details={"detection_latency_ms": 250})
    after = metrics.REGISTRY.get_sample_value("sandkeep_recoveries_started_total", {"label": "alarm_stopped"})
    assert after == before + 1
    assert (metrics.REGISTRY.get_sample_value("sandkeep_events_total",
                                              {"event": "instance.unexpected_stop_recovery_started"}) or 0) >= 1
    assert (metrics.REGISTRY.get_sample_value("sandkeep_detection_latency_seconds_count") or 0) >= 1
    row = store.list_events(instance_id="ins_1").items[0]
    assert row.event == "instance.unexpected_stop_recovery_started" and row.details["detection_latency_ms"] == 250
    err = capsys.readouterr().err
    assert "instance.unexpected_stop_recovery_started" in err and "gAAAA-cipher" not in err
    body, ctype = metrics.render()
    assert b"sandkeep_instances" in body and ctype.startswith("text/plain")


async def test_a_required_event_is_never_silently_lost(store: SqlStore, clock: FakeClock,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Events are best effort (a store failure is logged, the pass goes on) -- except a data-loss record: sim small
    seed 4435 lost ``instance.restored_from_snapshot`` to a failed event write. A required event's failure ends the
    pass (the next one records it again)."""
    from sandkeep.store.base import StoreError

    emitter = Emitter(store, clock)
    rec = record()

    def failing(row: object) -> object:
        raise StoreError("database write failed")

    monkeypatch.setattr(store, "add_event", failing)
    await emitter.aemit(rec, "instance.snapshot_taken")  # best effort: swallowed
    with pytest.raises(StoreError):
        await emitter.aemit(rec, "instance.restored_from_snapshot", required=True)
    monkeypatch.undo()
    await emitter.aemit(rec, "instance.restored_from_snapshot", required=True)
    assert [e.event for e in store.list_events(instance_id=rec.id).items] == ["instance.restored_from_snapshot"]


async def test_detector_poll_wakes_instances_whose_machine_stopped(h: Harness) -> None:
    rec = await h.running()
    other = await h.running()
    woken: list[str] = []
    detector = Detector(h.engine.settings, h.store, h.model.client, woken.append)
    assert await detector.poll_once() == 0
    await h.model.crash(rec.machine_id)
    assert await detector.poll_once() == 1 and woken == [rec.id]
    await h.model.destroy(other.machine_id)
    woken.clear()
    await detector.poll_once()
    assert sorted(woken) == sorted([rec.id, other.id])


async def test_secrets_never_in_views_or_events(h: Harness) -> None:
    from sandkeep.engine.instances import public_view

    rec = await h.running(secrets={"API_KEY": "hunter2"})
    view = public_view(h.get(rec.id))
    debug = h.service.debug(ADMIN, rec.id)
    assert "hunter2" not in repr(view) and "hunter2" not in repr(debug)
    assert view["config"]["secret_names"] == ["API_KEY"]
    assert debug["secrets_encrypted"] == {"API_KEY": "<encrypted>"}
    events = h.store.list_events(instance_id=rec.id, limit=1000).items
    assert "hunter2" not in repr(events)
    assert h.model.config(rec.machine_id)["env"]["API_KEY"] == "hunter2"  # handed to the machine


async def test_the_model_client_is_a_machine_provider(model: Model) -> None:
    from sandkeep.provider.base import MachineProvider

    provider: MachineProvider = model.client
    assert provider.proxy_target("a", "m")[1] == {"fly-force-instance-id": "m"}
    assert USER.role == "user"


async def test_count_by_status_leaves_destroyed_instances_out(h: Harness) -> None:
    await h.running()
    await h.running()
    now = h.clock.now()
    h.store.insert_instance(InstanceRecord(id="ins_gone", user_id="u", sandbox_id="sbx_gone",
                                           status=Status.DESTROYED, created_at=now, updated_at=now, app_name="a"))
    h.store.insert_instance(InstanceRecord(id="ins_rec", user_id="u", sandbox_id="sbx_rec",
                                           status=Status.RECOVERING, created_at=now, updated_at=now, app_name="a"))
    assert h.store.count_by_status()["destroyed"] == 1
    assert h.service.count_by_status(ADMIN) == {"running": 2, "recovering": 1}


def test_forbidden_names_stored_before_the_list_never_reach_a_machine() -> None:
    from sandkeep.engine.naming import build_machine_config

    rec = record(env={"LD_PRELOAD": "/data/evil.so", "COLOR": "red"})
    cfg = build_machine_config(rec, volume_id="vol_1", secrets={"PYTHONSTARTUP": "x", "API_KEY": "k"},
                               gateway_port=8080, gateway_token="tok")
    assert cfg.env == {"COLOR": "red", "API_KEY": "k", "PORT": "8080", "SANDKEEP_GATEWAY_TOKEN": "tok"}
