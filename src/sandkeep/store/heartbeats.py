"""The ``instance_heartbeats`` table (issue 11, detection on Fly): batched writes of gateway beats and the
engine's look-up of running instances whose beats stopped. Used through :class:`~sandkeep.store.sql.SqlStore`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, select
from sqlalchemy.dialects import postgresql, sqlite

from sandkeep.store.records import Status
from sandkeep.store.tables import instance_heartbeats, instances

CHUNK = 500


@dataclass(frozen=True)
class SilentInstance:
    """A running instance whose gateway beat before but not since ``beat_at``."""

    instance_id: str
    app_name: str
    machine_id: str | None
    beat_at: datetime
    started_at: datetime | None
    """When its current machine started (``last_started_at``, else ``status_changed_at``): a new machine gets
    the timeout from its start to send its first beat."""


def _chunks(ids: Sequence[str]) -> Iterable[Sequence[str]]:
    for i in range(0, len(ids), CHUNK):
        yield ids[i:i + CHUNK]


def record(conn: Connection, dialect: str, beats: dict[str, datetime]) -> int:
    """Upsert ``instance id -> beat time`` (the newer time wins only by arrival: the caller batches)."""
    if not beats:
        return 0
    rows = [{"instance_id": k, "beat_at": v} for k, v in beats.items()]
    ins = postgresql.insert(instance_heartbeats) if dialect == "postgresql" else sqlite.insert(instance_heartbeats)
    stmt = ins.on_conflict_do_update(index_elements=["instance_id"], set_={"beat_at": ins.excluded.beat_at})
    for i in range(0, len(rows), CHUNK):
        conn.execute(stmt, rows[i:i + CHUNK])
    return len(rows)


def tokens(conn: Connection, ids: Sequence[str]) -> dict[str, str | None]:
    """instance id -> its encrypted gateway token, for the instances that exist and are not destroyed."""
    c = instances.c
    out: dict[str, str | None] = {}
    for part in _chunks(list(ids)):
        q = select(c.id, c.gateway_token_encrypted).where(c.id.in_(part), c.status != Status.DESTROYED.value)
        for row in conn.execute(q):
            out[row[0]] = row[1]
    return out


def silent(conn: Connection, cutoff: datetime, limit: int) -> list[SilentInstance]:
    """Running instances whose last beat is older than ``cutoff`` (oldest first, at most ``limit``)."""
    c, h = instances.c, instance_heartbeats.c
    q = (select(c.id, c.app_name, c.machine_id, h.beat_at, c.last_started_at, c.status_changed_at)
         .join_from(instance_heartbeats, instances, c.id == h.instance_id)
         .where(h.beat_at < cutoff, c.status == Status.RUNNING.value)
         .order_by(h.beat_at).limit(max(1, limit)))
    return [SilentInstance(instance_id=r[0], app_name=r[1], machine_id=r[2], beat_at=r[3],
                           started_at=r[4] or r[5]) for r in conn.execute(q)]


def beat_times(conn: Connection, ids: Sequence[str]) -> dict[str, datetime]:
    """instance id -> last beat, for those of ``ids`` that ever beat."""
    h = instance_heartbeats.c
    out: dict[str, datetime] = {}
    for part in _chunks(list(ids)):
        for row in conn.execute(select(h.instance_id, h.beat_at).where(h.instance_id.in_(part))):
            out[row[0]] = row[1]
    return out
