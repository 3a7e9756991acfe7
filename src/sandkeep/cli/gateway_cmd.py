"""`sandkeep gateway`: the program that runs inside a machine (see :mod:`sandkeep.gateway`)."""

from __future__ import annotations

import click


@click.command("gateway")
@click.option("--port", type=int, default=None, help="Port to listen on (default: $PORT, else 8080).")
@click.option("--host", default=None,
              help="Address to listen on (default: 127.0.0.1; 0.0.0.0 in a Fly machine, where Fly's proxy connects).")
def gateway(port: int | None, host: str | None) -> None:
    """Serve /health and /data/{key} on 127.0.0.1:$PORT, storing data in $SANDKEEP_VOLUME_PATH."""
    from sandkeep.gateway import GatewayConfig, serve

    cfg = GatewayConfig.from_env()
    if port is not None:
        cfg.port = port
    if host is not None:
        cfg.host = host
    raise SystemExit(serve(cfg))
