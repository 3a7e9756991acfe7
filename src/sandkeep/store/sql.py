"""The SQL store: one implementation of :class:`sandkeep.store.base.Store` for SQLite and PostgreSQL.

Leases and fencing follow SPEC §5:

* ``claim`` is one conditional ``UPDATE … SET lease_owner = me, lease_expires_at = now + ttl,
  version = version + 1 WHERE id = ? AND (lease free OR lease_expires_at <= now) RETURNING *``.
* ``claim_due`` picks due alarms ordered by ``alarm_at`` (PostgreSQL: ``SELECT … FOR UPDATE SKIP LOCKED``;
  SQLite: inside a ``BEGIN IMMEDIATE`` write transaction, which serialises writers) and claims them with
  the same conditional ``UPDATE``.
* ``update`` / ``renew`` are conditional on ``lease_owner = me AND version = <the version I read>``; zero
  rows changed raises :class:`FencedError`. ``update`` bumps the version; ``renew`` only moves the expiry.
* ``release`` clears the lease if it is still ours.

Every time the store writes comes from the ``now`` argument or the injected clock, never from the database
server. Timestamps are stored in UTC and always read back timezone-aware (UTC), SQLite included.

SQLite runs in WAL mode with a busy timeout, so several processes can share one database file; write
transactions start with ``BEGIN IMMEDIATE`` so they queue on the busy timeout instead of failing.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import copy
import functools
import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import fields as dc_fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import (
    URL,
    BindParameter,
    ColumnElement,
    Connection,
    Engine,
    RowMapping,
    and_,
    bindparam,
    case,
    create_engine,
    delete,
    event,
    func,
    insert,
    make_url,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import StaticPool
from sqlalchemy.types import TypeEngine

from sandkeep.clock import Clock
from sandkeep.sim import plant
from sandkeep.store import heartbeats
from sandkeep.store.base import AlreadyExists, FencedError, NotFound, QuotaReached, StoreError
from sandkeep.store.orphan_rows import OrphanRows
from sandkeep.store.records import AuditRecord, EventRecord, InstanceRecord, Page, Status
from sandkeep.store.tables import JSONText, UTCDateTime, audit, engines, events, instances

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

#: Fields of InstanceRecord that ``update`` refuses: the store owns them (identity, fencing, lease).
STORE_MANAGED_FIELDS: frozenset[str] = frozenset({"id", "version", "lease_owner", "lease_expires_at"})

#: Largest page ``list_*`` hands out in one call.
MAX_PAGE_SIZE = 1000

_INSTANCE_FIELDS: tuple[str, ...] = tuple(InstanceRecord.field_names())
_EVENT_FIELDS: tuple[str, ...] = tuple(f.name for f in dc_fields(EventRecord))
_AUDIT_FIELDS: tuple[str, ...] = tuple(f.name for f in dc_fields(AuditRecord))

# advisory lock key that serialises concurrent migrations on PostgreSQL ("sndk")
_PG_MIGRATION_LOCK = 0x736E646B
# first key of the two-key advisory locks that serialise one user's instance creations ("sndq")
_PG_QUOTA_LOCK = 0x736E6471


class InvalidCursor(ValueError):
    """A pagination cursor that this store did not hand out (or for another listing)."""


# --------------------------------------------------------------------------------------------------
# Alembic, configured in code


def normalize_url(url: str | URL) -> URL:
    """Parse a database URL; plain ``postgresql://`` / ``postgres://`` use the psycopg 3 driver."""
    try:
        parsed = make_url(url)
    except Exception as exc:  # sqlalchemy raises ArgumentError with a terse message
        raise ValueError(f"invalid database URL {str(url)!r}: {exc}") from exc
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise ValueError(f"unsupported database {parsed.drivername!r}: use sqlite:/// or postgresql+psycopg://")
    return parsed


def alembic_config(*, connection: Connection | None = None, url: str | URL | None = None) -> Config:
    """The Alembic configuration of the store, built in code (no alembic.ini)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("path_separator", "os")
    if url is not None:
        rendered = normalize_url(url).render_as_string(hide_password=False)
        cfg.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    """The newest migration this version of sandkeep ships."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:  # pragma: no cover - the package always ships migrations
        raise StoreError("no migrations found")
    return head


# --------------------------------------------------------------------------------------------------
# value checking and conversion


def _aware(value: datetime, name: str = "now") -> datetime:
    if not isinstance(value, datetime):
        raise ValueError(f"{name} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware, got naive {value.isoformat()}")
    return value


def _ttl(ttl_seconds: float) -> timedelta:
    if not isinstance(ttl_seconds, (int, float)) or isinstance(ttl_seconds, bool) or ttl_seconds <= 0:
        raise ValueError(f"ttl_seconds must be a positive number, got {ttl_seconds!r}")
    return timedelta(seconds=float(ttl_seconds))


def _limit(limit: int) -> int:
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_PAGE_SIZE:
        raise ValueError(f"limit must be a whole number from 1 to {MAX_PAGE_SIZE}, got {limit!r}")
    return limit


def _check_value(table_name: str, name: str, col_type: TypeEngine[Any], nullable: bool, value: Any) -> Any:
    where = f"{table_name}.{name}"
    if value is None:
        if not nullable:
            raise ValueError(f"{where} must not be null")
        return None
    if isinstance(col_type, UTCDateTime):
        return _aware(value, where)
    if isinstance(col_type, JSONText) and name == "flagged_volume_ids":
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{where} must be a list of volume ids")
        return list(value)
    if isinstance(col_type, JSONText):
        if not isinstance(value, Mapping):
            raise ValueError(f"{where} must be a mapping, got {type(value).__name__}")
        if name in ("env", "secrets_encrypted", "labels") and not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise ValueError(f"{where} must map strings to strings")
        try:
            json.dumps(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where} is not JSON-serialisable: {exc}") from exc
        return dict(value)
    python_type = col_type.python_type
    if python_type is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{where} must be a whole number, got {value!r}")
        return value
    if python_type is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"{where} must be a number, got {value!r}")
        return float(value)
    if python_type is str:
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {type(value).__name__}")
        length = getattr(col_type, "length", None)
        if length is not None and len(value) > length:
            raise ValueError(f"{where} is longer than {length} characters")
        return value
    return value  # pragma: no cover - every column type is handled above


def _age(now: datetime, then: datetime | None) -> float:
    """Seconds from ``then`` to ``now`` (0 when None); naive values from SQLite are UTC."""
    if then is None:
        return 0.0
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    return max(0.0, (now - then).total_seconds())


def _instance_value(name: str, value: Any) -> Any:
    if name == "status":
        try:
            return Status(value).value
        except ValueError as exc:
            raise ValueError(f"unknown status {value!r}; one of {', '.join(s.value for s in Status)}") from exc
    col = instances.c[name]
    return _check_value("instances", name, col.type, bool(col.nullable), value)


def _instance_row(record: InstanceRecord) -> dict[str, Any]:
    return {name: _instance_value(name, getattr(record, name)) for name in _INSTANCE_FIELDS}


def _to_instance(row: RowMapping) -> InstanceRecord:
    data = {name: row[name] for name in _INSTANCE_FIELDS}
    data["status"] = Status(data["status"])
    data["env"] = dict(data["env"] or {})
    data["secrets_encrypted"] = dict(data["secrets_encrypted"] or {})
    data["flagged_volume_ids"] = list(data["flagged_volume_ids"] or [])
    return InstanceRecord(**data)


def _finished(record: InstanceRecord, owner: str, values: dict[str, Any]) -> InstanceRecord:
    """``record`` after a successful fenced finish of ``values`` (validated column values): the version it
    matched plus one, the lease dropped. A shallow copy (the fields were checked by ``_update_values``)."""
    new = copy.copy(record)
    new.__dict__.update(values)
    if "status" in values:
        new.status = Status(values["status"])
    new.version = record.version + 1
    new.lease_owner = None
    new.lease_expires_at = None
    return new


def _to_event(row: RowMapping) -> EventRecord:
    data = {name: row[name] for name in _EVENT_FIELDS}
    data["details"] = dict(data["details"] or {})
    return EventRecord(**data)


def _to_audit(row: RowMapping) -> AuditRecord:
    data = {name: row[name] for name in _AUDIT_FIELDS}
    data["details"] = dict(data["details"] or {})
    return AuditRecord(**data)


# --------------------------------------------------------------------------------------------------
# opaque cursors


def _encode_cursor(kind: str, payload: dict[str, Any]) -> str:
    raw = json.dumps({"k": kind, **payload}, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(kind: str, cursor: str) -> dict[str, Any]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (binascii.Error, ValueError, UnicodeError, TypeError, AttributeError) as exc:
        raise InvalidCursor(f"invalid cursor {cursor!r}") from exc
    if not isinstance(data, dict) or data.get("k") != kind:
        raise InvalidCursor(f"invalid cursor {cursor!r} for {kind}")
    return data


def _decode_id_cursor(kind: str, cursor: str) -> int:
    value = _decode_cursor(kind, cursor).get("i")
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidCursor(f"invalid cursor {cursor!r} for {kind}")
    return value


# --------------------------------------------------------------------------------------------------


def _enable_wal(cursor: Any, busy_timeout: float) -> None:
    """Switch the database file to WAL (persistent; a no-op once done).

    Changing the journal mode needs an exclusive lock and SQLite does not run the busy handler for it,
    so a fresh file opened by several connections at once can answer "database is locked": retry for a
    while (bounded by the busy timeout), then carry on in the current mode (still correct, since every
    writer honours busy_timeout; the next connection switches the file to WAL).
    """
    deadline = time.monotonic() + min(busy_timeout, 5.0)
    delay = 0.005
    while True:
        try:
            mode = cursor.execute("PRAGMA journal_mode").fetchone()[0]
            if str(mode).lower() == "wal":
                return
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            if time.monotonic() >= deadline:
                return
            time.sleep(delay)  # lock back-off inside a connection hook; not test synchronisation
            delay = min(delay * 2, 0.1)


def _owner(owner: str) -> str:
    if not isinstance(owner, str) or not owner.strip():
        raise ValueError(f"lease owner must be a non-empty string, got {owner!r}")
    value: str = _instance_value("lease_owner", owner)
    return value


def _lease_free(now: datetime | BindParameter[Any]) -> ColumnElement[bool]:
    c = instances.c
    return or_(c.lease_owner.is_(None), c.lease_expires_at.is_(None), c.lease_expires_at <= now)


# The statements an idle engine runs all the time (each heartbeat, each alarm poll), built once and bound per
# call: building a statement and its cache key costs about as much as running it.
_HEARTBEAT = (update(engines).where(engines.c.id == bindparam("engine_id_"))
              .values(heartbeat_at=bindparam("heartbeat_at_", type_=engines.c.heartbeat_at.type),
                      expires_at=bindparam("expires_at_", type_=engines.c.expires_at.type)))
_DEAD_ENGINES = select(engines.c.id).where(engines.c.expires_at < bindparam("now_", type_=engines.c.expires_at.type))
_DEAD_ENGINES_PG = _DEAD_ENGINES.with_for_update(skip_locked=True)
_NOW = bindparam("now_", type_=instances.c.lease_expires_at.type)
_NEXT_DUE = select(func.min(instances.c.alarm_at)).where(instances.c.alarm_at.is_not(None), _lease_free(_NOW))


class SqlStore(OrphanRows):
    """The store on SQLAlchemy 2 (sync engine, short transactions). Thread-safe.

    ``url``: ``sqlite:///path/to/file.db`` (parent directory created), ``sqlite://`` (in memory, one
    shared connection; for tests) or ``postgresql+psycopg://user@host:5432/db`` (``postgresql://`` is
    accepted and uses psycopg 3). Call :meth:`upgrade` (or use :func:`open_store`) before first use.
    """

    def __init__(self, url: str | URL, *, clock: Clock, sqlite_busy_timeout: float = 30.0,
                 connect_timeout: float = 10.0, pool_size: int = 10, echo: bool = False) -> None:
        self._clock = clock
        self._url = normalize_url(url)
        self._lock: threading.RLock | None = None
        self._dialect = self._url.get_backend_name()
        if self._dialect == "sqlite":
            self._engine = self._sqlite_engine(sqlite_busy_timeout, echo)
        else:
            self._engine = create_engine(
                self._url,
                echo=echo,
                pool_pre_ping=True,
                pool_size=pool_size,
                max_overflow=pool_size,
                connect_args={"connect_timeout": max(1, round(connect_timeout))},
            )

    def _sqlite_engine(self, busy_timeout: float, echo: bool) -> Engine:
        database = self._url.database or ""
        memory = database in ("", ":memory:") or "mode=memory" in database
        if memory:
            self._lock = threading.RLock()
            engine = create_engine(self._url, echo=echo, poolclass=StaticPool,
                                   connect_args={"check_same_thread": False})
        else:
            if not database.startswith("file:"):
                Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(self._url, echo=echo,
                                   connect_args={"check_same_thread": False, "timeout": busy_timeout})
        busy_ms = max(0, int(busy_timeout * 1000))

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            # SQLAlchemy emits BEGIN itself (below); sqlite3 must not start transactions on its own.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute(f"PRAGMA busy_timeout = {busy_ms}")
                if not memory:
                    _enable_wal(cursor, busy_timeout)
                    cursor.execute("PRAGMA synchronous = NORMAL")
                cursor.execute("PRAGMA foreign_keys = ON")
            finally:
                cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            # write transactions take the write lock up front: they queue on busy_timeout instead of
            # failing with SQLITE_BUSY when a deferred read lock cannot be upgraded.
            immediate = conn.get_execution_options().get("sandkeep_write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine

    # ---------------------------------------------------------------------------------------------
    # plumbing

    @property
    def engine(self) -> Engine:
        return self._engine

    @property
    def dialect(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self._dialect

    @property
    def url(self) -> str:
        """The database URL with any password masked."""
        return self._url.render_as_string(hide_password=True)

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._lock or contextlib.nullcontext(), self._engine.connect() as conn:
            yield conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._lock or contextlib.nullcontext(), self._engine.connect() as conn:
            conn.execution_options(sandkeep_write=True)
            with conn.begin():
                yield conn

    # ---------------------------------------------------------------------------------------------
    # migrations

    def upgrade(self, revision: str = "head") -> str | None:
        """Run the Alembic migrations up to ``revision`` (default head); returns the revision now current.

        Concurrent callers (several processes starting at once) migrate one after the other.
        """
        with self._write() as conn:
            if self._dialect == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
            try:
                command.upgrade(alembic_config(connection=conn), revision)
            except CommandError as exc:
                raise StoreError(f"cannot migrate {self.url}: {exc} (is the database from a newer sandkeep?)") \
                    from exc
            return MigrationContext.configure(conn).get_current_revision()

    def downgrade(self, revision: str) -> str | None:
        """Migrate down to ``revision`` (``"base"`` drops everything). For development and tests."""
        with self._write() as conn:
            if self._dialect == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
            command.downgrade(alembic_config(connection=conn), revision)
            return MigrationContext.configure(conn).get_current_revision()

    def current_revision(self) -> str | None:
        """The migration the database is at (None when never migrated)."""
        with self._read() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    @staticmethod
    def head_revision() -> str:
        return head_revision()

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> SqlStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------------
    # instances

    def insert_instance(self, record: InstanceRecord, *, max_for_user: int | None = None) -> InstanceRecord:
        """Insert a new instance. With ``max_for_user``, count the user's instances (not destroyed) and insert
        in one transaction that concurrent creations for the same user cannot interleave with (SQLite: the
        write lock of BEGIN IMMEDIATE; PostgreSQL: a transaction-scoped advisory lock on the user), raising
        :class:`QuotaReached` instead of exceeding it."""
        values = _instance_row(record)
        try:
            with self._write() as conn:
                if max_for_user is not None:
                    if self._dialect == "postgresql":
                        key = int.from_bytes(hashlib.sha256(record.user_id.encode()).digest()[:4], "big", signed=True)
                        conn.execute(text("SELECT pg_advisory_xact_lock(:a, :b)"), {"a": _PG_QUOTA_LOCK, "b": key})
                    count = int(conn.execute(select(func.count()).select_from(instances).where(
                        instances.c.user_id == record.user_id,
                        instances.c.status != Status.DESTROYED.value)).scalar() or 0)
                    if count >= max_for_user:
                        raise QuotaReached(count)
                row = conn.execute(insert(instances).values(**values).returning(*instances.c)).mappings().one()
        except IntegrityError as exc:
            raise AlreadyExists(
                f"instance {record.id!r} or sandbox {record.sandbox_id!r} already exists"
            ) from exc
        return _to_instance(row)

    def find_by_idempotency_key(self, user_id: str, key: str) -> InstanceRecord | None:
        """The instance of ``user_id`` created with idempotency key ``key``, if any."""
        c = instances.c
        with self._read() as conn:
            query = select(instances).where(c.user_id == user_id, c.idempotency_key == key)
            row = conn.execute(query).mappings().first()
        return _to_instance(row) if row is not None else None

    def get_instance(self, instance_id: str) -> InstanceRecord | None:
        with self._read() as conn:
            row = conn.execute(select(instances).where(instances.c.id == instance_id)).mappings().first()
        return _to_instance(row) if row is not None else None

    def list_instances(self, *, user_id: str | None = None, status: Sequence[str] | None = None,
                       region: str | None = None, include_destroyed: bool = False,
                       cursor: str | None = None, limit: int = 50) -> Page[InstanceRecord]:
        """Instances in creation order (``created_at``, then ``id``), ``limit`` at a time.

        ``status`` filters on any of the given statuses (unknown names raise ValueError); destroyed
        instances are left out unless ``include_destroyed`` or ``status`` names ``destroyed``.
        """
        limit = _limit(limit)
        c = instances.c
        query = select(instances)
        statuses: list[str] | None = None
        if status is not None:
            raw = [status] if isinstance(status, str) else list(status)
            statuses = [_instance_value("status", s) for s in raw]
            query = query.where(c.status.in_(statuses))
        if not include_destroyed and not (statuses and Status.DESTROYED.value in statuses):
            query = query.where(c.status != Status.DESTROYED.value)
        if user_id is not None:
            query = query.where(c.user_id == user_id)
        if region is not None:
            query = query.where(c.region == region)
        if cursor:
            data = _decode_cursor("instances", cursor)
            try:
                after_at = _aware(datetime.fromisoformat(data["t"]), "cursor")
                after_id = data["i"]
                if not isinstance(after_id, str):
                    raise TypeError("id")
            except (KeyError, TypeError, ValueError) as exc:
                raise InvalidCursor(f"invalid cursor {cursor!r} for instances") from exc
            query = query.where(or_(c.created_at > after_at, and_(c.created_at == after_at, c.id > after_id)))
        query = query.order_by(c.created_at, c.id).limit(limit + 1)
        with self._read() as conn:
            rows = conn.execute(query).mappings().all()
        items = [_to_instance(r) for r in rows[:limit]]
        next_cursor = None
        if len(rows) > limit:
            last = items[-1]
            next_cursor = _encode_cursor("instances", {"t": last.created_at.isoformat(), "i": last.id})
        return Page(items=items, next_cursor=next_cursor)

    def ping(self) -> None:
        """One round trip to the database (raises when it does not answer)."""
        with self._read() as conn:
            conn.execute(select(1)).scalar()

    def ops_gauges(self, now: datetime, *, overdue_grace: float = 3600.0) -> dict[str, float]:
        """Store-derived gauges for ``/metrics``: due alarms not claimed, age of the oldest recovery in
        progress, retained volumes and those whose cleanup is overdue by more than ``overdue_grace`` s."""
        _aware(now)
        c = instances.c
        overdue_before = now - timedelta(seconds=overdue_grace)
        with self._read() as conn:
            due = conn.execute(select(func.count()).where(c.alarm_at.is_not(None), c.alarm_at <= now,
                                                          _lease_free(now))).scalar() or 0
            oldest = conn.execute(select(func.min(c.recovery_started_at))
                                  .where(c.status == "recovering")).scalar()
            retained = conn.execute(select(func.count()).where(c.retained_volume_id.is_not(None))).scalar() or 0
            overdue = conn.execute(select(func.count()).where(
                c.retained_volume_id.is_not(None), c.retained_volume_cleanup_after.is_not(None),
                c.retained_volume_cleanup_after < overdue_before)).scalar() or 0
            suspects = conn.execute(select(func.count()).where(c.suspect_since.is_not(None))).scalar() or 0
            awaiting = conn.execute(select(func.count()).where(c.restore_approval == "awaiting")).scalar() or 0
            fencing = conn.execute(select(func.count()).where(c.fenced_machine_id.is_not(None))).scalar() or 0
            oldest_snap = conn.execute(select(func.min(c.last_snapshot_at)).where(c.status == "running")).scalar()
            flagged = conn.execute(select(func.count()).where(
                c.flagged_volume_ids.is_not(None), func.length(c.flagged_volume_ids) > 2)).scalar() or 0
        age = 0.0
        if oldest is not None:
            if oldest.tzinfo is None:
                oldest = oldest.replace(tzinfo=UTC)
            age = max(0.0, (now - oldest).total_seconds())
        return {"alarms_due": float(due), "recovery_oldest_age_seconds": age,
                "retained_volumes": float(retained), "retained_volumes_overdue": float(overdue),
                "dead_host_suspects": float(suspects), "restores_awaiting_approval": float(awaiting),
                "old_machines_to_fence": float(fencing), "instances_with_flagged_volumes": float(flagged),
                "snapshot_newest_age_max_seconds": _age(now, oldest_snap)}

    def count_by_status(self) -> dict[str, int]:
        """Number of instances per status (statuses with none are absent)."""
        query = select(instances.c.status, func.count()).group_by(instances.c.status)
        with self._read() as conn:
            return {str(s): int(n) for s, n in conn.execute(query).all()}

    # ---------------------------------------------------------------------------------------------
    # leases and fenced writes

    def claim(self, instance_id: str, owner: str, ttl_seconds: float, now: datetime) -> InstanceRecord | None:
        _aware(now)
        expires = now + _ttl(ttl_seconds)
        owner = _owner(owner)
        stmt = (
            update(instances)
            .where(instances.c.id == instance_id, _lease_free(now))
            .values(lease_owner=owner, lease_expires_at=expires, version=instances.c.version + 1)
            .returning(*instances.c)
        )
        with self._write() as conn:
            row = conn.execute(stmt).mappings().first()
        return _to_instance(row) if row is not None else None

    def claim_due(self, owner: str, ttl_seconds: float, now: datetime, limit: int) -> list[InstanceRecord]:
        _aware(now)
        expires = now + _ttl(ttl_seconds)
        owner = _owner(owner)
        limit = _limit(limit)
        c = instances.c
        candidates = (
            select(c.id)
            .where(c.alarm_at.is_not(None), c.alarm_at <= now, _lease_free(now))
            .order_by(c.alarm_at, c.id)
            .limit(limit)
        )
        # one statement, one round trip. PostgreSQL: the candidates are a MATERIALIZED CTE that locks its rows
        # (other engines skip them) and runs once -- as an IN subquery the planner may rescan it, and a rescan
        # of a SKIP LOCKED LIMIT query returns other rows (more than ``limit`` claimed); the UPDATE takes its
        # ids as one array (an InitPlan, then a primary-key lookup whatever the table's statistics say). SQLite:
        # BEGIN IMMEDIATE holds the database's write lock and the IN subquery is evaluated once. Either way the
        # UPDATE re-checks the lease.
        stmt = update(instances)
        if self._dialect == "postgresql":
            due = candidates.with_for_update(skip_locked=True).cte("due").prefix_with("MATERIALIZED")
            stmt = stmt.where(c.id == func.any(func.array(select(due.c.id).scalar_subquery())))
        else:
            stmt = stmt.where(c.id.in_(candidates.scalar_subquery()))
        stmt = (stmt.where(_lease_free(now))
                .values(lease_owner=owner, lease_expires_at=expires, version=c.version + 1)
                .returning(*instances.c))
        with self._write() as conn:
            rows = conn.execute(stmt).mappings().all()
        claimed = [_to_instance(r) for r in rows]
        claimed.sort(key=lambda r: (r.alarm_at or now, r.id))
        return claimed

    def _fenced(self, conn: Connection, record: InstanceRecord, owner: str, values: dict[str, Any],
                what: str) -> InstanceRecord:
        c = instances.c
        fence = [c.lease_owner == owner, c.version == record.version]
        if plant.ACTIVE and plant.on("unfenced_write"):
            fence = []
        stmt = (
            update(instances)
            .where(c.id == record.id, *fence)
            .values(**values)
            .returning(*instances.c)
        )
        row = conn.execute(stmt).mappings().first()
        if row is not None:
            return _to_instance(row)
        current = conn.execute(select(c.lease_owner, c.version).where(c.id == record.id)).first()
        if current is None:
            raise NotFound(f"instance {record.id!r} not found")
        raise FencedError(
            f"{what} of instance {record.id!r} fenced: expected lease {owner!r} at version {record.version}, "
            f"found lease {current.lease_owner!r} at version {current.version}"
        )

    def renew(self, record: InstanceRecord, owner: str, ttl_seconds: float, now: datetime) -> InstanceRecord:
        _aware(now)
        expires = now + _ttl(ttl_seconds)
        with self._write() as conn:
            return self._fenced(conn, record, owner, {"lease_expires_at": expires}, "renew")

    def _update_values(self, changes: dict[str, Any], *, bump: bool = True) -> dict[str, Any]:
        """Validated column values for a fenced write of ``changes`` (plus ``updated_at``; with ``bump`` the
        ``version + 1`` expression -- the batched finish bumps the version in its own statement)."""
        values: dict[str, Any] = {}
        for name, value in changes.items():
            if name not in instances.c or name not in _INSTANCE_FIELDS:
                raise ValueError(f"unknown instance field {name!r}")
            if name in STORE_MANAGED_FIELDS:
                raise ValueError(f"instance field {name!r} is managed by the store (claim/renew/release)")
            values[name] = _instance_value(name, value)
        if "updated_at" not in values:
            values["updated_at"] = _aware(self._clock.now(), "clock.now()")
        if bump:
            values["version"] = instances.c.version + 1
        return values

    def update(self, record: InstanceRecord, owner: str, changes: dict[str, Any]) -> InstanceRecord:
        """Fenced write of ``changes`` (field name -> value); bumps ``version``; sets ``updated_at`` to
        the clock's now unless ``changes`` sets it. Unknown or store-managed field names raise ValueError."""
        values = self._update_values(changes)
        with self._write() as conn:
            return self._fenced(conn, record, owner, values, "update")

    def finish(self, record: InstanceRecord, owner: str, changes: dict[str, Any]) -> InstanceRecord:
        """The end of a pass in one write: the fenced ``update`` of ``changes`` that also drops the lease.
        Raises FencedError / NotFound like ``update`` (then nothing is written)."""
        result = self.finish_many([(record, owner, changes)])[0]
        if isinstance(result, StoreError):
            raise result
        return result

    def finish_many(self, items: Sequence[tuple[InstanceRecord, str, dict[str, Any]]]
                    ) -> list[InstanceRecord | StoreError]:
        """Several :meth:`finish` writes in one transaction (one commit for a batch of passes). Each is fenced
        on its own: the result list holds, per item, the new record or the FencedError / NotFound it met.

        Items changing the same fields (a batch of requeues) go to the database as one ``executemany`` of the
        fenced UPDATE inside a savepoint (one round trip on PostgreSQL, where psycopg pipelines it); when the
        rows updated are fewer than the items (one of them was fenced) the savepoint is rolled back and that
        group is written row by row, so each item learns its own outcome."""
        prepared = [(record, _owner(owner), self._update_values(changes, bump=False))
                    for record, owner, changes in items]
        out: list[InstanceRecord | StoreError | None] = [None] * len(prepared)
        groups: dict[frozenset[str], list[int]] = {}
        for index, (_, _, values) in enumerate(prepared):
            groups.setdefault(frozenset(values), []).append(index)
        if not prepared:
            return []
        with self._write() as conn:
            for keys, indexes in groups.items():
                stmt = self._finish_stmt(keys)
                batch = [prepared[i] for i in indexes]
                if len(batch) > 1 and self._finish_all(conn, stmt, batch):
                    for i in indexes:
                        out[i] = _finished(*prepared[i])
                    continue
                for i in indexes:
                    out[i] = self._finish_one(conn, stmt, *prepared[i])
        return [r for r in out if r is not None]

    @staticmethod
    def _finish_params(record: InstanceRecord, owner: str, values: dict[str, Any]) -> dict[str, Any]:
        return {**values, "w_id": record.id, "w_owner": owner, "w_version": record.version}

    def _finish_all(self, conn: Connection, stmt: Any,
                    batch: list[tuple[InstanceRecord, str, dict[str, Any]]]) -> bool:
        """The whole ``batch`` in one executemany; False (nothing of it written) when a row did not match."""
        with conn.begin_nested() as savepoint:
            result = conn.execute(stmt, [self._finish_params(*item) for item in batch])
            if result.rowcount == len(batch):
                return True
            savepoint.rollback()
        return False

    def _finish_one(self, conn: Connection, stmt: Any, record: InstanceRecord, owner: str,
                    values: dict[str, Any]) -> InstanceRecord | StoreError:
        result = conn.execute(stmt, self._finish_params(record, owner, values))
        if result.rowcount == 1:
            return _finished(record, owner, values)
        c = instances.c
        current = conn.execute(select(c.lease_owner, c.version).where(c.id == record.id)).first()
        if current is None:
            return NotFound(f"instance {record.id!r} not found")
        return FencedError(
            f"finish of instance {record.id!r} fenced: expected lease {owner!r} at version "
            f"{record.version}, found lease {current.lease_owner!r} at version {current.version}")

    @functools.lru_cache(maxsize=64)  # noqa: B019 - a handful of key sets; the store lives as long as the process
    def _finish_stmt(self, keys: frozenset[str]) -> Any:
        """The fenced finish UPDATE for one set of changed fields, built once (bind parameters, no RETURNING:
        the row matched ``version``, so the new version is that plus one), so a batch of finishes costs one
        cached statement."""
        c = instances.c
        return (update(instances)
                .where(c.id == bindparam("w_id"), c.lease_owner == bindparam("w_owner"),
                       c.version == bindparam("w_version"))
                .values({**{k: bindparam(k, type_=c[k].type) for k in sorted(keys)},
                         "version": c.version + 1, "lease_owner": None, "lease_expires_at": None}))

    def release(self, record: InstanceRecord, owner: str) -> None:
        self.release_many([(record, owner)])

    def release_many(self, items: Sequence[tuple[InstanceRecord, str]]) -> None:
        """:meth:`release` for several leases in one transaction."""
        if not items:
            return
        c = instances.c
        with self._write() as conn:
            for record, owner in items:
                conn.execute(update(instances).where(c.id == record.id, c.lease_owner == owner)
                             .values(lease_owner=None, lease_expires_at=None))

    def next_due_at(self, now: datetime) -> datetime | None:
        """The earliest ``alarm_at`` among instances whose lease is free (what ``claim_due`` could take next)."""
        _aware(now)
        with self._read() as conn:
            value: datetime | None = conn.execute(_NEXT_DUE, {"now_": now}).scalar()
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value

    # ---------------------------------------------------------------------------------------------
    # engine processes: registration, heartbeat, voiding a dead engine's leases (fencing stays intact:
    # voiding bumps each row's version, so the dead holder's next fenced write fails)

    @staticmethod
    def _owned_by(engine_id: str) -> ColumnElement[bool]:
        prefix = f"{engine_id}#"
        return func.substr(instances.c.lease_owner, 1, len(prefix)) == prefix

    def _void(self, conn: Connection, engine_id: str, now: datetime) -> int:
        """Drop every lease of ``engine_id`` (bumping the version: its holder's fenced writes fail) and make
        those instances due now, so the next claim picks them up."""
        c = instances.c
        result = conn.execute(update(instances).where(c.lease_owner.is_not(None), self._owned_by(engine_id))
                              .values(lease_owner=None, lease_expires_at=None, version=c.version + 1,
                                      alarm_at=case((c.alarm_at > now, now), else_=c.alarm_at)))
        return int(result.rowcount or 0)

    def engine_heartbeat(self, engine_id: str, role: str, now: datetime, ttl_seconds: float) -> bool:
        """Register or refresh engine ``engine_id`` (alive until ``now + ttl``). False when its row was gone
        (first beat, or another engine declared it dead and voided its leases meanwhile)."""
        _aware(now)
        expires = now + _ttl(ttl_seconds)
        with self._write() as conn:
            done = conn.execute(_HEARTBEAT, {"engine_id_": engine_id, "heartbeat_at_": now,
                                             "expires_at_": expires}).rowcount
            if done:
                return True
            conn.execute(insert(engines).values(id=engine_id, role=role, started_at=now, heartbeat_at=now,
                                                expires_at=expires))
            return False

    def engine_leave(self, engine_id: str, now: datetime) -> int:
        """A planned stop: void the engine's leases at once and deregister it. Returns the leases voided."""
        _aware(now)
        with self._write() as conn:
            voided = self._void(conn, engine_id, now)
            conn.execute(delete(engines).where(engines.c.id == engine_id))
        return voided

    def void_dead_engines(self, now: datetime) -> dict[str, int]:
        """Engines whose heartbeat expired before ``now``: void their leases and deregister them.
        Returns engine id -> leases voided."""
        _aware(now)
        e = engines.c
        dead_q = _DEAD_ENGINES_PG if self._dialect == "postgresql" else _DEAD_ENGINES
        out: dict[str, int] = {}
        with self._write() as conn:
            for engine_id in conn.execute(dead_q, {"now_": now}).scalars().all():
                out[engine_id] = self._void(conn, engine_id, now)
                conn.execute(delete(engines).where(e.id == engine_id))
        return out

    # gateway heartbeats (issue 11): the SQL lives in sandkeep.store.heartbeats
    def record_heartbeats(self, beats: dict[str, datetime]) -> int:
        """Upsert ``instance id -> last beat`` in one transaction (a batch of beats)."""
        with self._write() as conn:
            return heartbeats.record(conn, self._dialect, beats)

    def heartbeat_tokens(self, instance_ids: Sequence[str]) -> dict[str, str | None]:
        """instance id -> encrypted gateway token, for those of ``instance_ids`` that exist (not destroyed)."""
        with self._read() as conn:
            return heartbeats.tokens(conn, instance_ids)

    def silent_instances(self, cutoff: datetime, limit: int = 1000) -> list[heartbeats.SilentInstance]:
        """Running instances that beat before but not since ``cutoff`` (oldest first)."""
        _aware(cutoff, "cutoff")
        with self._read() as conn:
            return heartbeats.silent(conn, cutoff, limit)

    def heartbeat_times(self, instance_ids: Sequence[str]) -> dict[str, datetime]:
        """instance id -> last beat, for those of ``instance_ids`` that ever beat."""
        with self._read() as conn:
            return heartbeats.beat_times(conn, instance_ids)

    def recovery_progress(self, now: datetime, since: datetime) -> dict[str, int]:
        """Recoveries right now and lately (the admin fleet page during a storm): ``queued`` (recovering,
        nobody holds the lease: waiting for an engine slot or a backoff), ``in_flight`` (recovering, leased),
        ``succeeded`` / ``failed`` (recovery events since ``since``)."""
        _aware(now)
        _aware(since, "since")
        c, e = instances.c, events.c
        recovering = c.status == Status.RECOVERING.value
        with self._read() as conn:
            queued = conn.execute(select(func.count()).where(recovering, _lease_free(now))).scalar() or 0
            total = conn.execute(select(func.count()).where(recovering)).scalar() or 0
            done: dict[str, int] = {str(name): int(n) for name, n in conn.execute(
                select(e.event, func.count()).where(
                    e.event.in_(["instance.unexpected_stop_recovery_succeeded",
                                 "instance.unexpected_stop_recovery_failed"]),
                    e.at >= since).group_by(e.event)).all()}
        return {"queued": int(queued), "in_flight": int(total) - int(queued),
                "succeeded": int(done.get("instance.unexpected_stop_recovery_succeeded", 0)),
                "failed": int(done.get("instance.unexpected_stop_recovery_failed", 0))}

    def list_engines(self) -> list[dict[str, Any]]:
        """The registered engine processes (id, role, started_at, heartbeat_at, expires_at)."""
        with self._read() as conn:
            rows = conn.execute(select(engines).order_by(engines.c.started_at)).mappings().all()
        return [dict(r) for r in rows]

    def live_engine_ids(self, now: datetime) -> list[str]:
        """Ids of the reconciling engines (not ``api``) whose heartbeat has not expired at ``now``, sorted."""
        _aware(now)
        e = engines.c
        with self._read() as conn:
            return [str(i) for i in conn.execute(select(e.id).where(e.expires_at > now, e.role != "api")
                                                 .order_by(e.id)).scalars()]

    def next_alarm_at(self) -> datetime | None:
        """The earliest ``alarm_at`` of any instance (leased or not), or None."""
        with self._read() as conn:
            value: datetime | None = conn.execute(select(func.min(instances.c.alarm_at))).scalar()
        return value

    # ---------------------------------------------------------------------------------------------
    # events and audit

    def add_event(self, event_record: EventRecord) -> EventRecord:
        values = {
            name: _check_value("events", name, events.c[name].type, bool(events.c[name].nullable),
                               getattr(event_record, name))
            for name in _EVENT_FIELDS if name != "id"
        }
        with self._write() as conn:
            row = conn.execute(insert(events).values(**values).returning(*events.c)).mappings().one()
        return _to_event(row)

    def list_events(self, *, instance_id: str | None = None, name: str | None = None,
                    cursor: str | None = None, limit: int = 100) -> Page[EventRecord]:
        """Newest first (by id); ``name`` is an exact event name."""
        limit = _limit(limit)
        c = events.c
        query = select(events)
        if instance_id is not None:
            query = query.where(c.instance_id == instance_id)
        if name is not None:
            query = query.where(c.event == name)
        if cursor:
            query = query.where(c.id < _decode_id_cursor("events", cursor))
        query = query.order_by(c.id.desc()).limit(limit + 1)
        with self._read() as conn:
            rows = conn.execute(query).mappings().all()
        items = [_to_event(r) for r in rows[:limit]]
        next_cursor = None
        if len(rows) > limit and items[-1].id is not None:
            next_cursor = _encode_cursor("events", {"i": items[-1].id})
        return Page(items=items, next_cursor=next_cursor)

    def add_audit(self, entry: AuditRecord) -> AuditRecord:
        values = {
            name: _check_value("audit", name, audit.c[name].type, bool(audit.c[name].nullable),
                               getattr(entry, name))
            for name in _AUDIT_FIELDS if name != "id"
        }
        with self._write() as conn:
            row = conn.execute(insert(audit).values(**values).returning(*audit.c)).mappings().one()
        return _to_audit(row)

    def list_audit(self, *, instance_id: str | None = None, cursor: str | None = None,
                   limit: int = 100) -> Page[AuditRecord]:
        """Newest first (by id)."""
        limit = _limit(limit)
        c = audit.c
        query = select(audit)
        if instance_id is not None:
            query = query.where(c.instance_id == instance_id)
        if cursor:
            query = query.where(c.id < _decode_id_cursor("audit", cursor))
        query = query.order_by(c.id.desc()).limit(limit + 1)
        with self._read() as conn:
            rows = conn.execute(query).mappings().all()
        items = [_to_audit(r) for r in rows[:limit]]
        next_cursor = None
        if len(rows) > limit and items[-1].id is not None:
            next_cursor = _encode_cursor("audit", {"i": items[-1].id})
        return Page(items=items, next_cursor=next_cursor)


def open_store(url: str | URL, clock: Clock, **options: Any) -> SqlStore:
    """Construct a :class:`SqlStore` and migrate its database to head (what start-up does)."""
    store = SqlStore(url, clock=clock, **options)
    try:
        store.upgrade()
    except BaseException:
        store.close()
        raise
    return store
