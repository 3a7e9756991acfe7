"""`sandkeep serve`: the API, the engine, the web UI and (unless --provider fly) the local machine host.

Embedded defaults everywhere: ``sandkeep serve`` on a fresh machine keeps its data in ``$SANDKEEP_HOME``
(``./.sandkeep``): the SQLite store, the generated JWT secret, the secrets key and the local host's
volumes. With ``--provider fly`` it uses ``FLY_API_TOKEN``, ``FLY_ORG`` and ``FLY_REGIONS`` and creates one
Fly app per instance owner (see :mod:`sandkeep.runtime` for the naming).

Stopping serve (SIGTERM / Ctrl-C) in local mode stops its local host child and so every machine. That is a
planned host restart, not a crash: running instances are marked first and, when serve starts again, their
machines are started again in place (same machine, same volume) instead of going through unexpected-stop
recovery. A serve that is killed (SIGKILL, crash) marks nothing: its instances recover as after a host failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
import socket
import sys
from collections.abc import Generator
from pathlib import Path
from typing import Any

import click


@click.command("serve")
@click.option("--listen", default=None, help="API and web UI address HOST:PORT [default: $SANDKEEP_LISTEN or "
              "127.0.0.1:8080].")
@click.option("--data-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Where sandkeep keeps its data [default: $SANDKEEP_HOME or ./.sandkeep].")
@click.option("--provider", type=click.Choice(["local", "fly"]), default=None,
              help="Machine provider [default: $SANDKEEP_PROVIDER or local].")
@click.option("--host-listen", default=None,
              help="Local host Machines API address [default: $SANDKEEP_HOST_LISTEN or 127.0.0.1:4280].")
@click.option("--host-proxy-listen", default=None,
              help="Local host proxy address [default: $SANDKEEP_HOST_PROXY_LISTEN or 127.0.0.1:4281].")
@click.option("--host-machines", type=click.Choice(["process", "sim"]), default=None,
              help="How the local host runs machines: real processes or simulated [default: $SANDKEEP_HOST_MACHINES "
                   "or process].")
@click.option("--host-profile", type=click.Choice(["none", "realistic"]), default=None,
              help="The local host's delay profile (its --profile) [default: $SANDKEEP_HOST_PROFILE or none].")
@click.option("--host-rate-limits/--no-host-rate-limits", default=None,
              help="The local host enforces Fly's API rate limits (its --rate-limits) [default: "
                   "$SANDKEEP_HOST_RATE_LIMITS or off].")
@click.option("--role", type=click.Choice(["all", "api", "engine"]), default=None,
              help="all: API + engine; api: API only, never reconciles (engines share the database); engine: "
                   "reconciles (several processes share one PostgreSQL) [default: $SANDKEEP_ROLE or all].")
@click.option("--log-level", default=None, help="debug, info, warning or error [default: $SANDKEEP_LOG_LEVEL].")
@click.option("--no-login-links", is_flag=True, help="Do not print one-time sign-in links.")
def serve(listen: str | None, data_dir: Path | None, provider: str | None, host_listen: str | None,
          host_proxy_listen: str | None, host_machines: str | None, host_profile: str | None,
          host_rate_limits: bool | None, role: str | None, log_level: str | None, no_login_links: bool) -> None:
    """Run sandkeep: HTTP API (+ /docs), web UI, engine and the local machine host."""
    from sandkeep.config import SettingsError, load_settings
    from sandkeep.logs import configure_logging
    from sandkeep.net import parse_hostport
    from sandkeep.runtime import StartupError

    try:
        settings = load_settings(listen=listen, provider=provider, host_listen=host_listen,
                                 host_proxy_listen=host_proxy_listen, log_level=log_level,
                                 host_machines=host_machines, host_profile=host_profile,
                                 host_rate_limits=host_rate_limits, role=role,
                                 home=data_dir)
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from exc
    for option, value, allow_zero in (("--listen", settings.listen, True),
                                      ("--host-listen", settings.host_listen, False),
                                      ("--host-proxy-listen", settings.host_proxy_listen, False)):
        try:
            parse_hostport(value, allow_zero=allow_zero)
        except ValueError as exc:
            raise click.UsageError(f"{option}: {exc}") from exc
    configure_logging(settings.log_level)
    os.umask(0o077)  # the data dir's files (database, secrets, logs, the host's volumes) are private
    try:
        code = asyncio.run(_serve(settings, login_links=not no_login_links))
    except StartupError as exc:
        click.echo(f"sandkeep serve: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:  # pragma: no cover
        code = 130
    sys.exit(code)


def _bind(addr: tuple[str, int]) -> socket.socket:
    from sandkeep.net import bind_tcp

    try:
        return bind_tcp(addr)
    except OSError as exc:
        from sandkeep.runtime import StartupError

        raise StartupError(f"cannot listen on {addr[0]}:{addr[1]}: {exc.strerror or exc}") from exc


async def _serve(settings: Any, *, login_links: bool) -> int:
    import uvicorn

    from sandkeep.api.app import create_app
    from sandkeep.logs import get_logger
    from sandkeep.runtime import open_runtime

    log = get_logger("sandkeep.serve")
    from sandkeep.net import parse_hostport

    host, port = parse_hostport(settings.listen)
    sock = _bind((host, port))  # fail fast before starting anything else when the port is taken
    actual_port = int(sock.getsockname()[1])
    if port == 0:
        settings = settings.replace(listen=f"{host}:{actual_port}")
    try:
        async with open_runtime(settings) as runtime:
            app = create_app(runtime)

            class Server(uvicorn.Server):
                @contextlib.contextmanager
                def capture_signals(self) -> Generator[None, None, None]:  # we handle signals below
                    yield

            server = Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="on",
                                           timeout_graceful_shutdown=5, proxy_headers=False))
            loop = asyncio.get_running_loop()

            def on_signal() -> None:
                if server.should_exit:
                    server.force_exit = True
                server.should_exit = True
                if runtime.engine is not None:  # heartbeat streams last an hour: end them now, not after the grace
                    runtime.engine.heartbeats.end_streams()

            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, on_signal)
            await _banner(runtime, login_links=login_links)
            log.info("serve.listening", url=runtime.base_url, data_dir=str(runtime.data_dir))
            try:
                await server.serve(sockets=[sock])
            finally:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
                log.info("serve.stopping")
    finally:
        sock.close()
    log.info("serve.stopped")
    return 0


async def _login_link(runtime: Any, user_id: str, role: str) -> str | None:
    try:
        from sandkeep.web.auth import issue_login_code  # WEB helper's module (optional)
    except ImportError:
        return None
    code = issue_login_code(runtime, user_id, role)
    if inspect.isawaitable(code):
        code = await code
    return f"{runtime.base_url}/login/once/{code}"


async def _banner(runtime: Any, *, login_links: bool) -> None:
    s = runtime.settings
    out = [f"sandkeep serve — API and web UI at {runtime.base_url}  (API docs {runtime.base_url}/docs)",
           f"  data dir   {runtime.data_dir}",
           f"  database   {_safe_url(s.resolved_database_url)}"]
    if s.provider == "fly":
        out.append(f"  provider   fly ({s.fly_api_url}, org {s.fly_org}, regions {s.fly_regions}; "
                   f"one app per owner: {s.app_prefix}-<hash of user id>)")
    elif runtime.host_process is not None:
        out.append(f"  provider   local host {runtime.host_url} (proxy {runtime.host_proxy_url}, regions {s.regions}, "
                   f"log {runtime.host_process.log_path})")
    else:
        out.append(f"  provider   local host at {runtime.host_url} (started elsewhere)")
    secret_src = "SANDKEEP_JWT_SECRET" if _from_env("SANDKEEP_JWT_SECRET") else str(runtime.data_dir / "jwt-secret")
    out.append(f"  tokens     signed with {secret_src}; make one: "
               f"sandkeep token --user ID [--role admin] --data-dir {runtime.data_dir}")
    if login_links and s.provider != "fly":
        admin = await _login_link(runtime, "admin", "admin")
        demo = await _login_link(runtime, "demo", "user")
        if admin and demo:
            out.append("  sign in    (one-time links)")
            out.append(f"    admin      {admin}")
            out.append(f"    demo user  {demo}")
    out.append("  stop       Ctrl-C")
    click.echo("\n".join(out))
    sys.stdout.flush()


def _from_env(name: str) -> bool:
    import os

    return bool(os.environ.get(name))


def _safe_url(url: str) -> str:
    """The database URL without its password."""
    from sandkeep.runtime import safe_database_url

    return safe_database_url(url)
