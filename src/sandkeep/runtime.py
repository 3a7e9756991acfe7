"""The composition root: everything `sandkeep serve` runs, built in one place.

:func:`open_runtime` resolves the data directory and the secrets, opens the store (migrating it), starts
the local machine host as a child process (unless ``provider == "fly"`` or ``SANDKEEP_HOST_URL`` points
at a host that already runs), builds the Machines client and the engine, starts the engine, and undoes
all of it in reverse order on exit.

Secrets, each taken from its environment variable or generated once into the data dir (mode 0600):

* ``SANDKEEP_JWT_SECRET`` → ``DATA/jwt-secret`` (signs API tokens; ``sandkeep token`` reads the same);
* ``SANDKEEP_SECRETS_KEY`` → ``DATA/secrets.key`` (Fernet key that encrypts instance secrets at rest;
  handled by :mod:`sandkeep.secrets`);
* ``SANDKEEP_HOST_TOKEN`` → ``DATA/host-token`` (the local host's API token);
* ``SANDKEEP_APP_NAME_SECRET`` → ``DATA/app-name-secret`` (HMAC key of the per-owner app names).

Every file and directory of the data dir is private (mode 0600/0700; serve runs with umask 077 and clears
group/other bits left by older versions at start-up).

Provider ``fly``: the Machines API at ``FLY_API_URL`` with ``FLY_API_TOKEN``; regions ``FLY_REGIONS``
(preferred first); apps are created in ``FLY_ORG``. sandkeep creates **one Fly app per instance owner**:
its name is ``{SANDKEEP_APP_PREFIX}-{first 12 hex digits of HMAC-SHA256(app-name secret, user id)}`` (e.g.
``sk-3f2a…``; instances created before keep their stored ``sha256(user id)`` app; the
prefix, default ``sk``, is normalised to a valid Fly app name; see :mod:`sandkeep.engine.naming`), so every
machine and volume of one user lives in one app, user ids never appear in public hostnames, and apps of
different users never collide. Gateway traffic goes through
Fly's proxy (``https://<app>.fly.dev`` with ``fly-force-instance-id``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from structlog.typing import FilteringBoundLogger

from sandkeep.clock import Clock, SystemClock
from sandkeep.config import Settings
from sandkeep.credentials import Credentials
from sandkeep.engine.instances import InstanceService
from sandkeep.engine.runtime import Engine
from sandkeep.engine.service import InstanceServiceAPI
from sandkeep.logs import get_logger
from sandkeep.net import parse_hostport
from sandkeep.provider.base import MachineProvider
from sandkeep.provider.client import FLY_PROXY_TEMPLATE, MachinesClient
from sandkeep.secrets import app_name_secret, load_or_create_key
from sandkeep.store.base import Store
from sandkeep.store.sql import open_store


class StartupError(Exception):
    """Start-up failed with a message meant for the operator (bad settings, host did not come up, …)."""


@dataclass
class HostChild:
    """The local machine host that serve started as a child process."""

    popen: subprocess.Popen[bytes]
    url: str
    proxy_url: str
    token: str
    data_dir: Path
    log_path: Path

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=timeout)
        return self.popen.returncode


@dataclass
class Runtime:
    settings: Settings
    clock: Clock
    service: InstanceServiceAPI
    jwt_secret: str
    data_dir: Path
    base_url: str
    store: Store | None = None
    provider: MachineProvider | None = None
    engine: Engine | None = None
    host_process: HostChild | None = None
    host_url: str | None = None
    host_token: str | None = None
    host_proxy_url: str | None = None
    credentials: Credentials = field(kw_only=True)
    """API token registry, web sessions, sign-in codes."""
    extras: dict[str, object] = field(default_factory=dict)
    """Scratch space for other parts."""

    @property
    def local_mode(self) -> bool:
        return self.settings.provider != "fly"


# ---------------------------------------------------------------------------------------------- secrets


def load_or_create_secret(path: Path, from_env: str | None, generate: Callable[[], str]) -> tuple[str, bool]:
    """(value, generated?) — the env value wins; else the file's content; else a new value saved to the file."""
    if from_env:
        return from_env, False
    from sandkeep.secrets import read_or_create_private

    return read_or_create_private(path, generate)


def resolve_data_dir(settings: Settings, data_dir: Path | None = None) -> Path:
    directory = Path(data_dir) if data_dir is not None else Path(settings.home)
    directory = directory.expanduser().resolve()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StartupError(f"cannot use data directory {directory} (--data-dir / SANDKEEP_HOME): "
                           f"{exc.strerror or exc}") from exc
    return directory


def make_private(directory: Path) -> None:
    """Data-dir files 0600-style and directories 0700-style: clear every group and other permission bit.

    serve runs with umask 077, so what it creates now is private already; this also fixes data dirs written
    by older versions (world-readable ``sandkeep.db``, logs, machine output, volumes). Symlinks are skipped."""
    for path in (directory, *directory.rglob("*")):
        with contextlib.suppress(OSError):
            st = path.lstat()
            if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o077:
                os.chmod(path, stat.S_IMODE(st.st_mode) & 0o700)



def safe_database_url(url: str) -> str:
    """The database URL without its password (for messages and banners)."""
    try:
        from sqlalchemy.engine import make_url

        return str(make_url(url).render_as_string(hide_password=True))
    except Exception:
        return url.split("@")[-1]


def database_startup_error(exc: BaseException, url: str) -> StartupError:
    """One line for an operator whose database cannot be opened (never the password, never a traceback)."""
    where = safe_database_url(url)
    if isinstance(exc, ValueError):
        text = str(exc)
        if text.startswith("invalid database URL"):
            text = ("not a valid database URL (e.g. postgresql+psycopg://user@host:5432/db or "
                    "sqlite:////var/lib/sandkeep/sandkeep.db)")
        return StartupError(f"SANDKEEP_DATABASE_URL: {text}")
    if isinstance(exc, OSError):
        return StartupError(f"cannot open the database {where}: {exc.strerror or exc}")
    cause = getattr(exc, "orig", None) or exc
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    return StartupError(f"cannot open the database {where}: {lines[0] if lines else type(cause).__name__}")


def resolve_jwt_secret(settings: Settings, data_dir: Path) -> str:
    value, _ = load_or_create_secret(data_dir / "jwt-secret", settings.jwt_secret, lambda: secrets.token_urlsafe(48))
    return value


def http_url(listen: str) -> str:
    host, port = parse_hostport(listen, allow_zero=False)
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


# ---------------------------------------------------------------------------------------------- local host


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the host child gets SIGTERM when serve dies, even from SIGKILL (no orphaned machines)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def host_child_options(settings: Settings) -> list[str]:
    """The host options serve passes on: machine runner, hosts per region, delay profile, rate limits."""
    from sandkeep.host.runner import RUNNERS

    if settings.host_machines not in RUNNERS:
        raise StartupError(f"SANDKEEP_HOST_MACHINES must be one of {', '.join(RUNNERS)}, "
                           f"got {settings.host_machines!r}")
    if settings.host_profile not in ("none", "realistic"):
        raise StartupError(f"SANDKEEP_HOST_PROFILE must be 'none' or 'realistic', got {settings.host_profile!r}")
    if settings.host_hosts_per_region < 1:
        raise StartupError("SANDKEEP_HOST_HOSTS_PER_REGION must be at least 1")
    return ["--machines", settings.host_machines, "--hosts-per-region", str(settings.host_hosts_per_region),
            "--profile", settings.host_profile, "--rate-limits" if settings.host_rate_limits else "--no-rate-limits"]


def spawn_host_child(settings: Settings, data_dir: Path, token: str, *, log_path: Path) -> HostChild:
    """Start ``python -m sandkeep host`` (call from the main thread: the parent-death signal is per thread)."""
    host_dir = data_dir / "host"
    url, proxy_url = http_url(settings.host_listen), http_url(settings.host_proxy_listen)
    for listen, what in ((settings.host_listen, "--host-listen"), (settings.host_proxy_listen, "--host-proxy-listen")):
        _check_free(listen, what)
    args = [sys.executable, "-m", "sandkeep", "host", "--listen", settings.host_listen,
            "--proxy-listen", settings.host_proxy_listen, "--data-dir", str(host_dir),
            "--regions", settings.regions, "--log-level", settings.log_level,
            "--machine-user", settings.host_machine_user]
    args += host_child_options(settings)
    env = dict(os.environ)
    env["SANDKEEP_HOST_TOKEN"] = token
    # the host keeps machine env (secret values, gateway tokens) encrypted with serve's own secrets key
    env["SANDKEEP_SECRETS_KEY"] = settings.secrets_key or load_or_create_key(data_dir).decode()
    if settings.host_proxy_token:
        env["SANDKEEP_HOST_PROXY_TOKEN"] = settings.host_proxy_token
    env.setdefault("PYTHONUNBUFFERED", "1")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.touch(mode=0o600, exist_ok=True)
    with open(log_path, "ab") as fh:
        popen = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL,
                                 preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    return HostChild(popen=popen, url=url, proxy_url=proxy_url, token=token, data_dir=host_dir, log_path=log_path)


async def wait_host_ready(child: HostChild, timeout: float, *, interval: float = 0.1) -> None:
    """Wait until the child answers ``GET /healthz`` and accepts our token; StartupError otherwise."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    async with httpx.AsyncClient(timeout=5.0) as http:
        while True:
            code = child.popen.poll()
            if code is not None:
                raise StartupError(f"the local host exited with code {code} during start-up "
                                   f"(log {child.log_path}):\n{_tail(child.log_path)}")
            try:
                health = await http.get(f"{child.url}/healthz")
                if health.status_code == 200:
                    # make sure it is our child that answers, and that it accepts our token
                    auth = await http.get(f"{child.url}/v1/apps", headers={"Authorization": f"Bearer {child.token}"})
                    if child.popen.poll() is None and auth.status_code == 200:
                        return
                    last = f"a host answered but GET /v1/apps with our token gave HTTP {auth.status_code}"
                else:
                    last = f"healthz answered HTTP {health.status_code}"
            except httpx.HTTPError as exc:
                last = type(exc).__name__
            if time.monotonic() > deadline:
                raise StartupError(f"the local host did not answer {child.url}/healthz within {timeout:g}s "
                                   f"({last}; log {child.log_path})")
            await asyncio.sleep(interval)  # start-up polling of a child process, bounded by the deadline


def _check_free(listen: str, what: str) -> None:
    host, port = parse_hostport(listen, allow_zero=False)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise StartupError(f"cannot start the local host: {listen} ({what}) is not free: "
                               f"{exc.strerror or exc}") from exc


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------- assembly


PLANNED_RESTART_BUDGET = 10.0
"""Seconds a shutdown spends marking running instances before it stops the local host child."""


async def _note_planned_host_restart(service: InstanceService, log: FilteringBoundLogger) -> None:
    """serve is about to stop the local host it started, which stops every machine: a planned host restart.

    Running instances are marked so that, when serve comes back, their stopped machine is started again in
    place (same machine, same volume) rather than relocated by unexpected-stop recovery. A crash of serve or
    of the host (no clean shutdown) is not marked and recovers as usual.
    """
    try:
        # the API has stopped: nothing else to serve
        marked = service.note_planned_host_restart(budget_seconds=PLANNED_RESTART_BUDGET)
    except Exception as exc:  # never block the shutdown: unmarked instances simply recover
        log.warning("runtime.planned_host_restart_failed", error=str(exc))
        return
    log.info("runtime.planned_host_restart", running_instances_marked=marked)


ROLES = ("all", "api", "engine")
"""``sandkeep serve --role``: all (API + engine), api (never reconciles), engine (reconciles; its HTTP server
still answers /healthz, /readyz and /metrics, and the API)."""


def prepared_settings(settings: Settings, directory: Path) -> Settings:
    """``settings`` with the data dir, the JWT and app-name secrets resolved (created on first start), after the
    checks that need no network (provider name, Fly token present, ``FLY_REGIONS`` syntax)."""
    try:
        jwt_secret = resolve_jwt_secret(settings, directory)
    except OSError as exc:
        raise StartupError(f"cannot read or create {directory / 'jwt-secret'}: {exc.strerror or exc}") from exc
    # the secrets key (SANDKEEP_SECRETS_KEY, else DATA/secrets.key) is resolved by sandkeep.secrets.SecretBox
    try:
        name_secret = app_name_secret(settings.replace(home=directory))
    except OSError as exc:
        raise StartupError(f"cannot read or create {directory / 'app-name-secret'}: {exc.strerror or exc}") from exc
    settings = settings.replace(home=directory, jwt_secret=jwt_secret, app_name_secret=name_secret)
    if settings.provider == "fly" and not settings.fly_api_token:
        raise StartupError("provider 'fly' needs FLY_API_TOKEN (and FLY_ORG, FLY_REGIONS)")
    if settings.provider == "fly":
        from sandkeep.flycheck import FlyConfigError, parse_fly_regions

        try:
            parse_fly_regions(settings.fly_regions)
        except FlyConfigError as exc:
            raise StartupError(str(exc)) from exc
    if settings.provider not in ("local", "fly"):
        raise StartupError(f"unknown provider {settings.provider!r}: use 'local' or 'fly'")
    if settings.role not in ROLES:
        raise StartupError(f"unknown role {settings.role!r}: use {', '.join(ROLES)}")
    if not 1 <= settings.snapshot_retention <= 60:
        raise StartupError(f"SANDKEEP_SNAPSHOT_RETENTION must be 1-60 days (Fly's volume snapshot_retention), "
                           f"got {settings.snapshot_retention}")
    return settings


@contextlib.asynccontextmanager
async def open_runtime(settings: Settings, *, data_dir: Path | None = None, clock: Clock | None = None,
                       start_engine: bool = True) -> AsyncIterator[Runtime]:
    """Build and start everything; stop it all (engine, client, host child, store) on exit."""
    log = get_logger("sandkeep.runtime")
    clock = clock or SystemClock()
    directory = resolve_data_dir(settings, data_dir)
    await asyncio.to_thread(make_private, directory)
    settings = prepared_settings(settings, directory)
    jwt_secret = settings.jwt_secret or ""
    public = settings.public_url or http_url(settings.listen)
    if settings.heartbeat_url is None:  # machines' gateways beat to the API (SANDKEEP_HEARTBEAT_URL)
        settings = settings.replace(heartbeat_url=public)

    async with contextlib.AsyncExitStack() as stack:
        from sqlalchemy.exc import SQLAlchemyError

        from sandkeep.store.base import StoreError

        try:
            store = await asyncio.to_thread(open_store, settings.resolved_database_url, clock)
        except (ValueError, OSError, SQLAlchemyError, StoreError) as exc:
            raise database_startup_error(exc, settings.resolved_database_url) from exc
        stack.callback(store.close)

        host_child: HostChild | None = None
        host_token: str | None = None
        host_url: str | None = None
        host_proxy: str | None = None
        if settings.provider == "fly":
            if not settings.fly_api_token:
                raise StartupError("provider 'fly' needs FLY_API_TOKEN")
            # proxy_url stays None for Fly (a proxy URL means the local host): gateway traffic goes through
            # Fly's proxy at FLY_PROXY_URL, a template with {app} (default https://{app}.fly.dev).
            api_url, api_token, proxy_url = settings.fly_api_url, settings.fly_api_token, None
            if settings.fly_proxy_url and "{app}" not in settings.fly_proxy_url:
                raise StartupError(f"FLY_PROXY_URL must contain {{app}}, got {settings.fly_proxy_url!r}")
        elif settings.provider == "local":
            if settings.host_url:
                host_url = settings.host_url
                host_token = settings.host_token
                if not host_token:
                    raise StartupError("SANDKEEP_HOST_URL is set: SANDKEEP_HOST_TOKEN must be set too")
                host_proxy = settings.host_proxy_url or http_url(settings.host_proxy_listen)
            else:
                host_token, _ = load_or_create_secret(directory / "host-token", settings.host_token,
                                                      lambda: secrets.token_urlsafe(32))
                host_child = spawn_host_child(settings, directory, host_token, log_path=directory / "host.log")
                stack.callback(host_child.stop)
                await wait_host_ready(host_child, settings.host_start_timeout)
                host_url, host_proxy = host_child.url, host_child.proxy_url
                log.info("runtime.host_started", url=host_url, proxy=host_proxy, pid=host_child.popen.pid,
                         log=str(host_child.log_path))
            api_url, api_token, proxy_url = host_url, host_token, host_proxy
        else:
            raise StartupError(f"unknown provider {settings.provider!r}: use 'local' or 'fly'")

        provider = MachinesClient(api_url, api_token, proxy_url=proxy_url, clock=clock,
                                  fly_proxy_template=settings.fly_proxy_url or FLY_PROXY_TEMPLATE,
                                  proxy_token=settings.host_proxy_token if proxy_url else None,
                                  rate_limit=settings.provider_rate_limit, rate_burst=settings.provider_rate_burst,
                                  region_concurrency=settings.provider_region_concurrency,
                                  breaker_threshold=settings.provider_breaker_threshold,
                                  breaker_cooldown=settings.provider_breaker_cooldown,
                                  snapshot_retention=settings.snapshot_retention)
        stack.push_async_callback(provider.aclose)
        if settings.provider == "fly":
            from sandkeep.flycheck import FlyConfigError, check_fly

            try:
                await check_fly(provider, settings, timeout=settings.provider_check_timeout)
            except FlyConfigError as exc:
                raise StartupError(str(exc)) from exc

        try:
            # --role api: the engine object only serves the instance service (intents are persisted with
            # their alarm due; an engine process picks them up) and never reconciles
            engine = Engine(settings, store, provider, clock, role="api" if settings.role == "api" else "engine")
        except OSError as exc:  # the secrets key file (SANDKEEP_SECRETS_KEY unset) cannot be read or written
            raise StartupError(f"cannot start the engine: {exc.strerror or exc}"
                               f"{f' ({exc.filename})' if exc.filename else ''}") from exc
        if host_child is not None:
            # runs after the engine stopped and before the host child is stopped (exit callbacks run LIFO)
            stack.push_async_callback(_note_planned_host_restart, engine.service, log)
        if start_engine:
            await engine.start()
            stack.push_async_callback(engine.stop)
        runtime = Runtime(settings=settings, clock=clock, service=engine.service, jwt_secret=jwt_secret,
                          data_dir=directory, base_url=public, store=store, provider=provider, engine=engine,
                          credentials=Credentials(store, jwt_secret, clock),
                          host_process=host_child, host_url=host_url, host_token=host_token,
                          host_proxy_url=host_proxy)
        yield runtime
