"""`sandkeep gateway`: the program that runs inside a machine (see :mod:`sandkeep.gateway`)."""

from __future__ import annotations

import click


@click.command("gateway")
@click.option("--port", type=int, default=None, help="Port to listen on (default: $PORT, else 8080).")
def gateway(port: int | None) -> None:
    """Serve /health and /data/{key} on 127.0.0.1:$PORT, storing data in $SANDKEEP_VOLUME_PATH."""
    from sandkeep.gateway import GatewayConfig, serve

    cfg = GatewayConfig.from_env()
    if port is not None:
        cfg.port = port
    raise SystemExit(serve(cfg))
