"""The shipped monitoring files against a real `sandkeep serve`: every metric the Grafana dashboard and the
Prometheus rules use is exported, the engine and provider series fill in once an instance runs, /readyz is
ready, and `promtool` accepts (and unit-tests) the rules."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.serving import Serve
from tests.support.wait import wait_until

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
METRIC_RE = re.compile(r"\bsandkeep_[a-z0-9_]+\b")


def exported_names(text: str) -> set[str]:
    """Every series name the exposition offers, including those of labelled families with no child yet."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names |= {s.name for s in family.samples}
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names |= {family.name + suffix for suffix in ("_bucket", "_sum", "_count")}
    return names


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert len(exprs) >= 10
    return exprs


def rule_exprs() -> list[str]:
    rules = yaml.safe_load((DEPLOY / "prometheus-rules.yml").read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    names = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    assert {"SandkeepRecoveryFailureRate", "SandkeepRecoveryStuck", "SandkeepAlarmLag", "SandkeepProviderErrorRate",
            "SandkeepRetainedVolumesOverdue", "SandkeepDestroyGaveUp"} <= names
    return exprs


def used_names(exprs: list[str]) -> set[str]:
    return {name for expr in exprs for name in METRIC_RE.findall(expr)}


def test_every_metric_the_dashboard_and_rules_use_is_exported_by_serve(serve: Serve) -> None:
    text = httpx.get(f"{serve.url}/metrics", timeout=10).text
    exported = exported_names(text)
    used = used_names(dashboard_exprs()) | used_names(rule_exprs())
    assert len(used) >= 20
    assert sorted(used - exported) == [], "metrics used by deploy/ but not exported"
    assert "_created" not in text


def test_engine_provider_and_http_series_fill_in_once_an_instance_runs(serve: Serve) -> None:
    user = f"mon-{uuid.uuid4().hex[:8]}"
    with serve.client(user) as client:
        created = client.post("/v1/instances", json={})
        assert created.status_code == 201, created.text
        serve.wait_status(client, created.json()["id"], "running")

    def samples() -> dict[str, float]:
        text = httpx.get(f"{serve.url}/metrics", timeout=10).text
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                key = s.name + json.dumps(dict(sorted(s.labels.items())))
                out[key] = s.value
        return out

    def filled() -> dict[str, float] | None:
        got = samples()

        def total(prefix: str, **labels: str) -> float:
            return sum(v for k, v in got.items() if k.startswith(prefix + "{")
                       and all(f'"{lk}": "{lv}"' in k for lk, lv in labels.items()))

        ready = (total("sandkeep_provider_requests_total", operation="create_machine", outcome="ok") >= 1
                 and total("sandkeep_provider_request_duration_seconds_count", operation="create_machine") >= 1
                 and total("sandkeep_engine_claims_total") >= 1
                 and total("sandkeep_alarm_lag_seconds_count") >= 1  # a running instance's alarm came due
                 and total("sandkeep_http_requests_total", route="/v1/instances", method="POST", status="201") >= 1
                 and total("sandkeep_instances", status="running") >= 1
                 and total("sandkeep_build_info") == 1)
        return got if ready else None

    got = wait_until(filled, timeout=60, message="engine, provider and HTTP metrics")
    assert not any("create_machine " in k or user in k for k in got), "no app or user names in labels"


def test_readyz_is_ready_on_a_serve_whose_database_and_host_answer(serve: Serve) -> None:
    ready = httpx.get(f"{serve.url}/readyz", timeout=10)
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "provider": "ok"}
    assert ready.headers["x-request-id"].startswith("req_")


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing in CI (.ci/run installs Debian's prometheus package)")
        pytest.skip("promtool not installed (apt-get install prometheus); CI installs it")
    return found


@pytest.mark.parametrize("args", [["check", "rules", "prometheus-rules.yml"],
                                  ["test", "rules", "prometheus-rules.test.yml"]], ids=["check", "test"])
def test_promtool_accepts_and_unit_tests_the_rules(args: list[str]) -> None:
    done = subprocess.run([_promtool(), *args], cwd=DEPLOY, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr
