"""`sandkeep host`: run the local machine host (Fly Machines API on --listen, proxy on --proxy-listen)."""

from __future__ import annotations

import os
from pathlib import Path

import click


@click.command("host")
@click.option("--listen", default="127.0.0.1:4280", show_default=True, help="Machines API address (HOST:PORT).")
@click.option("--proxy-listen", default="127.0.0.1:4281", show_default=True,
              help="Proxy address; requests with 'fly-force-instance-id: <machine id>' reach that machine.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Where records, volumes and snapshots live [default: $SANDKEEP_HOME/host].")
@click.option("--regions", default="lcl-a,lcl-b,lcl-c", show_default=True, help="Comma-separated region names.")
@click.option("--profile", type=click.Choice(["none", "realistic"]), default="none", show_default=True,
              help="'realistic' adds Fly-like create, fork and boot delays (see sandkeep.host.faults).")
@click.option("--snapshot-interval", type=float, default=86400.0, show_default=True,
              help="Seconds between scheduled snapshots of each volume.")
@click.option("--snapshot-retention", type=float, default=432000.0, show_default=True,
              help="Seconds a snapshot is kept (default 5 days; a volume's snapshot_retention days wins).")
@click.option("--scheduler-tick", type=float, default=60.0, show_default=True,
              help="How often the snapshot scheduler looks for due work, in seconds.")
@click.option("--stop-timeout", type=float, default=10.0, show_default=True,
              help="Seconds between SIGTERM and SIGKILL when a machine is stopped.")
@click.option("--boot-timeout", type=float, default=30.0, show_default=True,
              help="Seconds a machine has to listen on $PORT before it is marked failed.")
@click.option("--destroyed-retention", type=float, default=30.0, show_default=True,
              help="Seconds a destroyed machine still answers GET with state 'destroyed' before 404.")
@click.option("--rate-limits/--no-rate-limits", default=False, show_default=True,
              help="Enforce Fly's documented per-machine, per-action rate limits (429 + Retry-After).")
@click.option("--machine-user", default=None,
              help="When the host runs as root, machine processes run as this unprivileged user (a name or "
                   "UID[:GID]) [default: $SANDKEEP_HOST_MACHINE_USER or nobody].")
@click.option("--bytes-per-gb", type=int, default=1024 ** 3, show_default=True,
              help="Bytes in one GB of a volume's size_gb, the limit the gateway enforces (tests make it tiny).")
@click.option("--fault-seed", type=int, default=None, help="Seed for fault-injection rate draws.")
@click.option("--log-level", default=None, help="debug, info, warning or error [default: $SANDKEEP_LOG_LEVEL or info].")
def host(listen: str, proxy_listen: str, data_dir: Path | None, regions: str, profile: str,
         snapshot_interval: float, snapshot_retention: float, scheduler_tick: float, stop_timeout: float,
         boot_timeout: float, destroyed_retention: float, rate_limits: bool, machine_user: str | None,
         bytes_per_gb: int, fault_seed: int | None, log_level: str | None) -> None:
    """Run the local machine host: Fly Machines API (Bearer token), proxy, real processes, directory volumes."""
    from sandkeep.host.core import HostOptions
    from sandkeep.host.faults import profile_delays
    from sandkeep.host.server import ServeConfig, load_or_create_token, run
    from sandkeep.logs import configure_logging
    from sandkeep.net import parse_hostport
    from sandkeep.secrets import load_or_create_key

    os.umask(0o077)  # everything the host writes (records, logs, volumes, snapshots) is private to it
    if bytes_per_gb < 1:
        raise click.BadParameter("--bytes-per-gb must be >= 1")
    level = (log_level or os.environ.get("SANDKEEP_LOG_LEVEL") or "info").lower()
    configure_logging(level)
    try:
        api_addr, proxy_addr = parse_hostport(listen), parse_hostport(proxy_listen)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    region_list = [r.strip() for r in regions.split(",") if r.strip()]
    if not region_list or len(set(region_list)) != len(region_list):
        raise click.BadParameter("--regions needs one or more distinct names")
    for value, name in ((snapshot_interval, "--snapshot-interval"), (snapshot_retention, "--snapshot-retention"),
                        (scheduler_tick, "--scheduler-tick")):
        if value <= 0:
            raise click.BadParameter(f"{name} must be > 0")
    for value, name in ((stop_timeout, "--stop-timeout"), (boot_timeout, "--boot-timeout"),
                        (destroyed_retention, "--destroyed-retention")):
        if value < 0:
            raise click.BadParameter(f"{name} must be >= 0")
    home = Path(os.environ.get("SANDKEEP_HOME") or "./.sandkeep")
    directory = (data_dir or home / "host").resolve()
    token, token_path = load_or_create_token(directory, os.environ.get("SANDKEEP_HOST_TOKEN"))
    if token_path is not None:
        click.echo(f"sandkeep host: API token stored in {token_path}", err=True)
    else:
        click.echo("sandkeep host: API token taken from SANDKEEP_HOST_TOKEN", err=True)
    click.echo(f"sandkeep host: API http://{listen}/v1  proxy http://{proxy_listen}  data {directory}", err=True)
    # machine env (secret values, gateway tokens) is encrypted in host.db with SANDKEEP_SECRETS_KEY (serve hands
    # the host its own key), else with a key generated once into the host's data dir
    secrets_key = os.environ.get("SANDKEEP_SECRETS_KEY") or load_or_create_key(directory).decode()
    user = machine_user if machine_user is not None else os.environ.get("SANDKEEP_HOST_MACHINE_USER", "nobody")
    options = HostOptions(data_dir=directory, regions=region_list, stop_timeout=stop_timeout,
                          boot_timeout=boot_timeout, destroyed_retention=destroyed_retention,
                          snapshot_interval=snapshot_interval, snapshot_retention=snapshot_retention,
                          scheduler_tick=scheduler_tick, delays=profile_delays(profile), machine_user=user,
                          bytes_per_gb=bytes_per_gb, secrets_key=secrets_key)
    run(ServeConfig(listen=api_addr, proxy_listen=proxy_addr, options=options, token=token, fault_seed=fault_seed,
                    log_level=level, rate_limits=rate_limits,
                    proxy_token=os.environ.get("SANDKEEP_HOST_PROXY_TOKEN") or None))
