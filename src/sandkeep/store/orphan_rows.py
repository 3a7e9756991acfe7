"""The store's orphan table (migration ``v0008_orphans``; SPEC §15): what the inventory found that no record
references, and since when. Mixed into :class:`sandkeep.store.sql.SqlStore`.

``first_seen_at`` is what ``SANDKEEP_ORPHAN_GRACE`` counts from; keeping it in the database means an engine
restart (or another engine process taking over the inventory) does not restart the grace.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime

from sqlalchemy import Connection, and_, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from sandkeep.store.records import OrphanRecord
from sandkeep.store.tables import orphans

_KEY = tuple[str, str]  # (kind, resource_id) within one app


def _to_orphan(row: object) -> OrphanRecord:
    m = row._mapping  # type: ignore[attr-defined]
    return OrphanRecord(app_name=m["app_name"], kind=m["kind"], resource_id=m["resource_id"],
                        instance_id=m["instance_id"], region=m["region"], reason=m["reason"],
                        first_seen_at=m["first_seen_at"], last_seen_at=m["last_seen_at"])


class OrphanRows:
    """``record_orphans``, ``forget_orphan`` and ``list_orphans`` of the Store protocol."""

    def _read(self) -> contextlib.AbstractContextManager[Connection]:
        raise NotImplementedError

    def _write(self) -> contextlib.AbstractContextManager[Connection]:
        raise NotImplementedError

    def record_orphans(self, app_name: str, seen: Sequence[OrphanRecord], now: datetime) -> list[OrphanRecord]:
        wanted: dict[_KEY, OrphanRecord] = {(o.kind, o.resource_id): o for o in seen}
        for attempt in range(2):  # another engine may insert the same sighting at the same moment: read again
            try:
                return self._record(app_name, wanted, now)
            except IntegrityError:
                if attempt:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _record(self, app_name: str, wanted: dict[_KEY, OrphanRecord], now: datetime) -> list[OrphanRecord]:
        c = orphans.c
        out: list[OrphanRecord] = []
        with self._write() as conn:
            known = {(r.kind, r.resource_id): r
                     for r in map(_to_orphan, conn.execute(select(orphans).where(c.app_name == app_name)))}
            for key in known.keys() - wanted.keys():
                conn.execute(delete(orphans).where(and_(c.app_name == app_name, c.kind == key[0],
                                                        c.resource_id == key[1])))
            for key, o in wanted.items():
                row = replace(o, app_name=app_name, last_seen_at=now)
                before = known.get(key)
                if before is None:
                    row = replace(row, first_seen_at=now)
                    conn.execute(insert(orphans).values(**_values(row)))
                else:
                    row = replace(row, first_seen_at=before.first_seen_at)
                    conn.execute(update(orphans).where(and_(c.app_name == app_name, c.kind == key[0],
                                                            c.resource_id == key[1]))
                                 .values(instance_id=row.instance_id, region=row.region, reason=row.reason,
                                         last_seen_at=now))
                out.append(row)
        return out

    def forget_orphan(self, app_name: str, kind: str, resource_id: str) -> None:
        c = orphans.c
        with self._write() as conn:
            conn.execute(delete(orphans).where(and_(c.app_name == app_name, c.kind == kind,
                                                    c.resource_id == resource_id)))

    def list_orphans(self) -> list[OrphanRecord]:
        c = orphans.c
        with self._read() as conn:
            rows = conn.execute(select(orphans).order_by(c.first_seen_at, c.app_name, c.kind, c.resource_id))
            return [_to_orphan(r) for r in rows]


def _values(o: OrphanRecord) -> dict[str, object]:
    return {"app_name": o.app_name, "kind": o.kind, "resource_id": o.resource_id[:255],
            "instance_id": o.instance_id[:64], "region": o.region[:64] if o.region else None,
            "reason": o.reason[:255], "first_seen_at": o.first_seen_at, "last_seen_at": o.last_seen_at}
