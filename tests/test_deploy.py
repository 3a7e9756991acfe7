"""deploy/ cannot be built here (no container engine): these tests parse every file and cross-check it with the
code — environment names against the settings table, commands and options against the CLI, ports against
the settings each process listens on, health-check paths against the API's routes."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import pytest
import yaml

from sandkeep.cli.main import cli
from sandkeep.config import SETTINGS, Settings
from sandkeep.net import parse_hostport

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
SETTING_ENVS = {s.env for s in SETTINGS}
OTHER_ENVS = {"PYTHONUNBUFFERED", "PORT", "POSTGRES_USER", "POSTGRES_DB", "POSTGRES_PASSWORD"}
"""Names the files may set that are not sandkeep settings: Python's, the gateway's $PORT, the postgres image's."""


# ---------------------------------------------------------------------------------------------- parsers


def dockerfile(path: Path) -> dict[str, Any]:
    """The instructions a Dockerfile sets that matter here: ENV, EXPOSE, CMD, ENTRYPOINT, HEALTHCHECK."""
    logical: list[str] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    out: dict[str, Any] = {"env": {}, "expose": [], "cmd": None, "entrypoint": None, "healthcheck": None}
    for line in logical:
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                out["env"][key] = value
        elif word == "EXPOSE":
            out["expose"] += [int(p.split("/")[0]) for p in rest.split()]
        elif word in ("CMD", "ENTRYPOINT"):
            out[word.lower()] = json.loads(rest)
        elif word == "HEALTHCHECK":
            out["healthcheck"] = json.loads(rest.split(" CMD ", 1)[1])
    return out


def unit_file(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def env_file(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip().lstrip("#").strip()
        if "=" in line and line.split("=", 1)[0].isupper() and " " not in line.split("=", 1)[0]:
            key, _, value = line.partition("=")
            out[key] = value
    return out


def check_command(argv: list[str]) -> tuple[str, dict[str, Any]]:
    """Parse ``argv`` with the real CLI (no invocation): unknown commands or options raise UsageError."""
    assert argv and (argv[0] == "sandkeep" or argv[0].endswith("/sandkeep")), argv
    args, cmd, ctx, name = list(argv[1:]), cli, None, "sandkeep"
    while True:
        ctx = cmd.make_context(name, args, parent=ctx)
        if not isinstance(cmd, click.Group):
            return str(cmd.name), dict(ctx.params)
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
        resolved_name, sub, args = cmd.resolve_command(ctx, rest)
        assert sub is not None and resolved_name is not None, rest
        cmd, name = sub, resolved_name


def check_envs(env: dict[str, str], where: str) -> None:
    unknown = sorted(set(env) - SETTING_ENVS - OTHER_ENVS)
    assert unknown == [], f"{where} sets names that are not in the settings table (config.py): {unknown}"


def port_of(listen: str) -> int:
    return parse_hostport(listen)[1]


def app_paths() -> set[str]:
    from sandkeep.api.app import create_app
    from sandkeep.clock import SystemClock
    from sandkeep.credentials import memory_credentials
    from sandkeep.runtime import Runtime

    clock, secret = SystemClock(), "x" * 40
    runtime = Runtime(settings=Settings(), clock=clock, service=None,  # type: ignore[arg-type]
                      jwt_secret=secret, data_dir=Path("."), base_url="http://t",
                      credentials=memory_credentials(secret, clock))
    paths: set[str] = set()
    routes = list(create_app(runtime).routes)
    while routes:  # included routers appear as one entry holding the router (FastAPI's original_router)
        route = routes.pop()
        paths.add(getattr(route, "path", ""))
        inner = getattr(route, "original_router", None)
        if inner is not None:
            routes.extend(inner.routes)
    return paths


def url_in(argv: list[str]) -> str:
    [url] = [u for part in argv for u in part.replace("'", " ").replace('"', " ").split() if "://" in u]
    return url


# ---------------------------------------------------------------------------------------------- tests


def test_control_plane_dockerfile_listens_where_it_exposes_and_runs_a_real_command() -> None:
    df = dockerfile(DEPLOY / "Dockerfile")
    check_envs(df["env"], "deploy/Dockerfile")
    listen = port_of(df["env"]["SANDKEEP_LISTEN"])
    assert df["expose"] == [listen]
    assert df["entrypoint"] == ["sandkeep"]
    name, _ = check_command(["sandkeep", *df["cmd"]])
    assert name == "serve"
    health = urlsplit(url_in(df["healthcheck"]))
    assert health.port == listen and health.path in app_paths()


def test_gateway_dockerfile_serves_the_port_sandkeep_puts_in_the_machine_config() -> None:
    df = dockerfile(DEPLOY / "Dockerfile.gateway")
    import sandkeep.gateway

    gateway_source = Path(sandkeep.gateway.__file__).read_text()
    gateway_envs = {name for name in df["env"] if f'env.get("{name}"' in gateway_source}  # what the gateway reads
    assert gateway_envs == {"PORT", "SANDKEEP_VOLUME_PATH"}
    check_envs({k: v for k, v in df["env"].items() if k not in gateway_envs}, "deploy/Dockerfile.gateway")
    gateway_port = Settings().gateway_port  # the engine sets PORT and services.internal_port to this
    assert int(df["env"]["PORT"]) == gateway_port and df["expose"] == [gateway_port]
    from sandkeep.engine.naming import VOLUME_MOUNT_PATH

    assert df["env"]["SANDKEEP_VOLUME_PATH"] == VOLUME_MOUNT_PATH
    name, params = check_command(df["cmd"])
    assert name == "gateway" and params["host"] == "0.0.0.0"  # Fly's proxy does not connect to loopback


def test_compose_stack_has_postgres_a_host_one_api_and_two_engines_wired_consistently() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services: dict[str, Any] = compose["services"]
    assert set(services) == {"postgres", "host", "api", "engine-1", "engine-2"}
    df = dockerfile(DEPLOY / "Dockerfile")
    paths = app_paths()
    host_cmd = check_command([*df["entrypoint"], *services["host"]["command"]])
    assert host_cmd[0] == "host"
    host_api_port, host_proxy_port = port_of(host_cmd[1]["listen"]), port_of(host_cmd[1]["proxy_listen"])
    for name in ("api", "engine-1", "engine-2"):
        svc = services[name]
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile"
        env = {k: str(v) for k, v in svc["environment"].items()}
        check_envs(env, f"compose service {name}")
        command, params = check_command([*df["entrypoint"], *svc["command"]])
        assert command == "serve"
        assert params["role"] == ("api" if name == "api" else "engine")  # one API process, two engines
        assert urlsplit(env["SANDKEEP_HOST_URL"]).port == host_api_port
        assert urlsplit(env["SANDKEEP_HOST_PROXY_URL"]).port == host_proxy_port
        assert urlsplit(env["SANDKEEP_HOST_URL"]).hostname == "host"
        assert env["SANDKEEP_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert "@postgres:5432/" in env["SANDKEEP_DATABASE_URL"]
        # every process must share the secrets (tokens signed by one are checked by another)
        assert env["SANDKEEP_JWT_SECRET"].startswith("${") and env["SANDKEEP_SECRETS_KEY"].startswith("${")
    check_envs({k: str(v) for k, v in services["host"]["environment"].items()}, "compose service host")
    api = services["api"]
    listen = port_of(api["environment"]["SANDKEEP_LISTEN"])
    [mapping] = api["ports"]
    assert int(str(mapping).split(":")[-1]) == listen
    health = urlsplit(url_in(api["healthcheck"]["test"]))
    assert health.port == listen and health.path == "/readyz" and health.path in paths
    host_health = urlsplit(url_in(services["host"]["healthcheck"]["test"]))
    assert host_health.port == host_api_port and host_health.path == "/healthz"
    example = env_file(DEPLOY / "compose.env.example")
    referenced = set(re.findall(r"\$\{([A-Z_]+)", (DEPLOY / "docker-compose.yml").read_text()))
    assert referenced
    assert referenced <= set(example), f"compose.env.example lacks {referenced - set(example)}"


def test_fly_toml_runs_the_control_plane_on_fly_with_checks_on_real_routes() -> None:
    fly = tomllib.loads((DEPLOY / "fly.toml").read_text())
    check_envs(fly["env"], "deploy/fly.toml")
    assert fly["env"]["SANDKEEP_PROVIDER"] == "fly"
    listen = port_of(fly["env"]["SANDKEEP_LISTEN"])
    assert fly["http_service"]["internal_port"] == listen
    assert fly["metrics"]["port"] == listen and fly["metrics"]["path"] in app_paths()
    assert all(check["path"] in app_paths() for check in fly["http_service"]["checks"])
    assert (DEPLOY / fly["build"]["dockerfile"]).is_file()
    assert fly["http_service"]["auto_stop_machines"] in ("off", False)  # the engine must keep running
    Settings(provider="fly", fly_regions=fly["env"]["FLY_REGIONS"]).region_list  # noqa: B018 - parses


def test_systemd_unit_runs_an_existing_command_with_known_settings() -> None:
    unit = unit_file(DEPLOY / "sandkeep.service")
    [exec_start] = unit["ExecStart"]
    name, params = check_command(shlex.split(exec_start))
    assert name == "serve" and params["no_login_links"] is True
    env = dict(e.split("=", 1) for e in unit.get("Environment", []))
    check_envs(env, "deploy/sandkeep.service")
    assert env["SANDKEEP_HOME"] == "/var/lib/" + unit["StateDirectory"][0]
    check_envs(env_file(DEPLOY / "sandkeep.env"), "deploy/sandkeep.env")


@pytest.mark.parametrize("bad", [["sandkeep", "serve", "--no-such-option"], ["sandkeep", "nope"]])
def test_the_command_check_refuses_what_the_cli_refuses(bad: list[str]) -> None:
    with pytest.raises(click.UsageError):
        check_command(bad)
