"""`sandkeep db`: database maintenance (Alembic migrations of the store)."""

from __future__ import annotations

from pathlib import Path

import click
from sqlalchemy.exc import SQLAlchemyError

from sandkeep.clock import SystemClock
from sandkeep.config import SettingsError, load_settings
from sandkeep.store.base import StoreError
from sandkeep.store.sql import SqlStore, head_revision

_database_url_option = click.option(
    "--database-url",
    metavar="URL",
    default=None,
    help="SQLAlchemy URL of the store (default: $SANDKEEP_DATABASE_URL, else sqlite:///DATA_DIR/sandkeep.db).",
)
_data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Data directory (default: $SANDKEEP_HOME, else ./.sandkeep); created when needed.",
)


def _open(database_url: str | None, data_dir: Path | None) -> SqlStore:
    try:
        settings = load_settings(home=data_dir, database_url=database_url)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from exc
    if settings.database_url is None:
        try:
            settings.home.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise click.ClickException(f"cannot create data directory {settings.home}: {exc}") from exc
    try:
        return SqlStore(settings.resolved_database_url, clock=SystemClock())
    except (ValueError, OSError, SQLAlchemyError) as exc:
        raise click.ClickException(str(exc)) from exc


@click.group()
def db() -> None:
    """Database maintenance (migrations)."""


@db.command()
@_database_url_option
@_data_dir_option
def upgrade(database_url: str | None, data_dir: Path | None) -> None:
    """Migrate the database to the newest schema (safe to run repeatedly; serve does it at start-up)."""
    store = _open(database_url, data_dir)
    try:
        before = store.current_revision()
        after = store.upgrade()
    except (StoreError, SQLAlchemyError, OSError) as exc:
        raise click.ClickException(f"upgrade of {store.url} failed: {exc}") from exc
    finally:
        store.close()
    if before == after:
        click.echo(f"{store.url}: already at revision {after} (head)")
    else:
        click.echo(f"{store.url}: upgraded from {before or 'empty'} to {after} (head)")


@db.command()
@_database_url_option
@_data_dir_option
@click.option("--check", is_flag=True, help="Exit with status 1 unless the database is at the newest revision.")
def current(database_url: str | None, data_dir: Path | None, check: bool) -> None:
    """Show the database's migration revision and the newest one this sandkeep ships."""
    store = _open(database_url, data_dir)
    try:
        revision = store.current_revision()
    except (SQLAlchemyError, OSError) as exc:
        raise click.ClickException(f"cannot read {store.url}: {exc}") from exc
    finally:
        store.close()
    head = head_revision()
    state = "up to date" if revision == head else "needs `sandkeep db upgrade`"
    click.echo(f"database: {store.url}")
    click.echo(f"current:  {revision or 'none (empty database)'}")
    click.echo(f"head:     {head} ({state})")
    if check and revision != head:
        raise SystemExit(1)
