"""Autogenerate a new migration: ``python -m sandkeep.store.migrations "add foo column"``.

Migrates a scratch SQLite database to the current head, compares it with the table metadata and writes
``versions/v<NNNN>_<slug>.py``. Review the file (and run the store tests on both backends) before use.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from alembic import command
from alembic.script import ScriptDirectory

from sandkeep.clock import SystemClock
from sandkeep.store.sql import SqlStore, alembic_config


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].strip():
        print('usage: python -m sandkeep.store.migrations "message"', file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        store = SqlStore(f"sqlite:///{Path(tmp) / 'scratch.db'}", clock=SystemClock())
        try:
            store.upgrade()
            with store.engine.begin() as conn:
                cfg = alembic_config(connection=conn)
                cfg.set_main_option("file_template", "v%%(rev)s_%%(slug)s")
                count = len(list(ScriptDirectory.from_config(cfg).walk_revisions()))
                command.revision(cfg, message=argv[0], autogenerate=True, rev_id=f"{count + 1:04d}")
        finally:
            store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
