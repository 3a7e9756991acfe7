"""Run the local machine host: the Machines API and the proxy, two uvicorn servers in one process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import sys
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

import structlog
import uvicorn

from sandkeep.clock import Clock, SystemClock
from sandkeep.host.api import HostAPI, ProxyApp, ProxyFront
from sandkeep.host.core import Host, HostError, HostOptions
from sandkeep.host.faults import Faults
from sandkeep.net import bind_tcp
from sandkeep.secrets import read_or_create_private

log = structlog.get_logger("sandkeep.host.server")  # lazy: configured by the command


@dataclass
class ServeConfig:
    listen: tuple[str, int]
    proxy_listen: tuple[str, int]
    options: HostOptions
    token: str
    fault_seed: int | None = None
    log_level: str = "info"
    rate_limits: bool = False
    proxy_token: str | None = None  # SANDKEEP_HOST_PROXY_TOKEN: the proxy then refuses requests without it


def load_or_create_token(data_dir: Path, env_token: str | None) -> tuple[str, Path | None]:
    """The token from the environment, else the one stored in ``data_dir/token`` (created once)."""
    if env_token:
        return env_token, None
    path = data_dir / "token"
    token, _ = read_or_create_private(path, lambda: secrets.token_urlsafe(32))
    return token, path


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signal handling to us (two servers share one process)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


async def serve(cfg: ServeConfig, clock: Clock | None = None) -> None:
    clock = clock or SystemClock()
    cfg.options.data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(cfg.options.data_dir, 0o700)
    try:
        host = Host(cfg.options, clock)
    except HostError as exc:
        raise SystemExit(f"sandkeep host: {exc.message}") from exc
    try:
        api_sock, proxy_sock = bind_tcp(cfg.listen), bind_tcp(cfg.proxy_listen)
        internal_sock = bind_tcp(("127.0.0.1", 0))  # the HTTP side of the proxy, behind ProxyFront
    except OSError as exc:
        raise SystemExit(f"sandkeep host: cannot listen: {exc}") from exc
    recovered = host.load()
    if recovered:
        log.info("host.recovered_machines_stopped", machines=recovered)
    api = HostAPI(host, cfg.token, Faults(seed=cfg.fault_seed), rate_limits=cfg.rate_limits)
    proxy = ProxyApp(host, token=cfg.proxy_token)
    common = {"log_config": None, "access_log": False, "lifespan": "on", "timeout_graceful_shutdown": 5,
              "log_level": "debug" if cfg.log_level == "debug" else "warning"}
    api_server = _Server(uvicorn.Config(api.app(), **common))  # type: ignore[arg-type]
    proxy_server = _Server(uvicorn.Config(proxy, **common))  # type: ignore[arg-type]
    servers = (api_server, proxy_server)
    front = ProxyFront(host, internal_sock.getsockname()[:2], token=cfg.proxy_token)
    front_server = await asyncio.start_server(front.handle, sock=proxy_sock, limit=front.max_head)

    def on_signal() -> None:
        host.begin_shutdown()
        for s in servers:
            if s.should_exit:
                s.force_exit = True
            s.should_exit = True

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    host.start_background()
    log.info("host.listening", api=f"http://{cfg.listen[0]}:{api_sock.getsockname()[1]}",
             proxy=f"http://{cfg.proxy_listen[0]}:{proxy_sock.getsockname()[1]}",
             data_dir=str(cfg.options.data_dir), regions=cfg.options.regions)
    try:
        await asyncio.gather(api_server.serve(sockets=[api_sock]), proxy_server.serve(sockets=[internal_sock]))
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        front_server.close()
        await front.close()
        await host.shutdown()
        log.info("host.stopped")


def run(cfg: ServeConfig) -> None:
    try:
        asyncio.run(serve(cfg))
    except KeyboardInterrupt:  # pragma: no cover
        sys.exit(130)
