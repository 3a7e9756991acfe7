"""The host's durable records: one small SQLite file in the data dir (WAL, one row per object)."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (kind TEXT NOT NULL, id TEXT NOT NULL, data TEXT NOT NULL,
                                    PRIMARY KEY (kind, id));
CREATE TABLE IF NOT EXISTS watch (seq INTEGER PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class HostDB:
    def __init__(self, path: Path, *, watch_keep: int = 10000) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600, exist_ok=True)
        os.chmod(path, 0o600)  # SQLite gives the -wal and -shm files the database file's mode
        self._conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(_SCHEMA)
        self._watch_keep = watch_keep

    def close(self) -> None:
        self._conn.close()

    def put(self, kind: str, key: str, data: dict[str, Any]) -> None:
        self._conn.execute("INSERT OR REPLACE INTO records (kind, id, data) VALUES (?, ?, ?)",
                           (kind, key, json.dumps(data, sort_keys=True)))

    def delete(self, kind: str, key: str) -> None:
        self._conn.execute("DELETE FROM records WHERE kind = ? AND id = ?", (kind, key))

    def load(self, kind: str) -> list[dict[str, Any]]:
        rows = self._conn.execute("SELECT data FROM records WHERE kind = ? ORDER BY id", (kind,)).fetchall()
        return [json.loads(r[0]) for r in rows]

    def compact(self) -> None:
        """Rewrite the file so that no deleted or overwritten record survives in free pages or the WAL."""
        self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._conn.execute("VACUUM")
        self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def get_meta(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def add_watch(self, seq: int, data: dict[str, Any]) -> None:
        self._conn.execute("BEGIN")
        try:
            self._conn.execute("INSERT OR REPLACE INTO watch (seq, data) VALUES (?, ?)", (seq, json.dumps(data)))
            self._conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('seq', ?)", (str(seq),))
            if seq % 500 == 0:
                self._conn.execute("DELETE FROM watch WHERE seq <= ?", (seq - self._watch_keep,))
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise

    def watch_since(self, since: int, limit: int = 1000) -> list[dict[str, Any]]:
        rows = self._conn.execute("SELECT data FROM watch WHERE seq > ? ORDER BY seq LIMIT ?",
                                  (since, limit)).fetchall()
        return [json.loads(r[0]) for r in rows]
