"""`sandkeep token`: print an API token signed with the same secret `sandkeep serve` uses."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("token")
@click.option("--user", "user_id", required=True, help="User id the token speaks for (claim 'sub').")
@click.option("--role", type=click.Choice(["user", "admin", "platform"]), default="user", show_default=True,
              help="Role claim.")
@click.option("--data-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="serve's data dir, where the signing secret lives [default: $SANDKEEP_HOME].")
@click.option("--ttl", type=click.FloatRange(min=0), default=None,
              help="Lifetime in seconds; 0 = no expiry [default: $SANDKEEP_TOKEN_TTL, 30 days].")
def token(user_id: str, role: str, data_dir: Path | None, ttl: float | None) -> None:
    """Print a token. The secret is SANDKEEP_JWT_SECRET, else DATA/jwt-secret (generated once, like serve)."""
    from sandkeep.api.auth import issue_token
    from sandkeep.config import SettingsError, load_settings
    from sandkeep.runtime import resolve_data_dir, resolve_jwt_secret

    try:
        settings = load_settings()
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from exc
    directory = resolve_data_dir(settings, data_dir)
    secret = resolve_jwt_secret(settings, directory)
    lifetime = settings.token_ttl if ttl is None else ttl
    try:
        value = issue_token(secret, user_id, role, lifetime if lifetime > 0 else None)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--user") from exc
    click.echo(value)
