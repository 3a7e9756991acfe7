"""`sandkeep token`: issue, list and revoke API tokens in the registry `sandkeep serve` checks.

``sandkeep token --user ID [--role R] [--ttl S]`` prints a new token signed with serve's secret and records
its id in serve's database (SANDKEEP_DATABASE_URL, else DATA/sandkeep.db), so it works at once and can be
revoked: ``sandkeep token revoke TOKEN_OR_ID``. ``sandkeep token list [--user ID] [--all]`` shows the ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

DATA_DIR_HELP = "serve's data dir, where the signing secret and the database live [default: $SANDKEEP_HOME]."


def _open(data_dir: Path | None) -> Any:
    """Credentials on serve's database, signed with serve's secret (both resolved like serve does)."""
    from sandkeep.clock import SystemClock
    from sandkeep.config import SettingsError, load_settings
    from sandkeep.credentials import open_credentials
    from sandkeep.runtime import resolve_data_dir, resolve_jwt_secret

    try:
        settings = load_settings()
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from exc
    directory = resolve_data_dir(settings, data_dir)
    secret = resolve_jwt_secret(settings, directory)
    settings = settings.replace(home=directory)
    try:
        return settings, open_credentials(settings.resolved_database_url, secret, SystemClock())
    except Exception as exc:  # StoreError, an unreachable database, a bad URL
        raise click.ClickException(f"cannot open the database {settings.resolved_database_url}: {exc}") from exc


@click.group("token", invoke_without_command=True)
@click.option("--user", "user_id", default=None, help="User id the token speaks for (claim 'sub').")
@click.option("--role", type=click.Choice(["user", "admin", "platform"]), default="user", show_default=True,
              help="Role claim.")
@click.option("--data-dir", type=click.Path(path_type=Path, file_okay=False), default=None, help=DATA_DIR_HELP)
@click.option("--ttl", type=click.FloatRange(min=0), default=None,
              help="Lifetime in seconds; 0 = no expiry [default: $SANDKEEP_TOKEN_TTL, 30 days].")
@click.pass_context
def token(ctx: click.Context, user_id: str | None, role: str, data_dir: Path | None, ttl: float | None) -> None:
    """Print a new token (recorded in serve's database), or list / revoke tokens."""
    ctx.ensure_object(dict)
    ctx.obj["data_dir"] = data_dir
    if ctx.invoked_subcommand is not None:
        return
    if not user_id:
        raise click.UsageError("Missing option '--user' (or use `sandkeep token list|revoke`).")
    settings, credentials = _open(data_dir)
    lifetime = settings.token_ttl if ttl is None else ttl
    try:
        issued = credentials.issue_token(user_id, role, lifetime if lifetime > 0 else None, issued_by="cli")
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--user") from exc
    finally:
        credentials.store.close()
    click.echo(issued.token)


@token.command("revoke")
@click.argument("token_or_id")
@click.option("--data-dir", type=click.Path(path_type=Path, file_okay=False), default=None, help=DATA_DIR_HELP)
@click.pass_context
def revoke(ctx: click.Context, token_or_id: str, data_dir: Path | None) -> None:
    """Revoke a token (its text or its id tok_...): requests with it get 401 token_revoked at once."""
    from sandkeep.credentials import TokenNotFound

    _, credentials = _open(data_dir or ctx.obj.get("data_dir"))
    try:
        record = credentials.revoke_token(token_or_id, by="cli")
    except TokenNotFound as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        credentials.store.close()
    click.echo(f"revoked {record.jti} (user {record.user_id}, role {record.role}) at "
               f"{record.revoked_at.isoformat() if record.revoked_at else '?'}")


@token.command("list")
@click.option("--user", "user_id", default=None, help="Only this user's tokens.")
@click.option("--all", "include_ended", is_flag=True, help="Also revoked and expired tokens.")
@click.option("--data-dir", type=click.Path(path_type=Path, file_okay=False), default=None, help=DATA_DIR_HELP)
@click.pass_context
def list_tokens(ctx: click.Context, user_id: str | None, include_ended: bool, data_dir: Path | None) -> None:
    """List token ids (newest first): id, user, role, issued, expires, revoked."""
    _, credentials = _open(data_dir or ctx.obj.get("data_dir"))
    try:
        rows = credentials.list_tokens(user_id=user_id, include_ended=include_ended)
    finally:
        credentials.store.close()
    for t in rows:
        click.echo("\t".join([t.jti, t.user_id, t.role, t.issued_at.isoformat(),
                              t.expires_at.isoformat() if t.expires_at else "never",
                              f"revoked {t.revoked_at.isoformat()}" if t.revoked_at else "live"]))
