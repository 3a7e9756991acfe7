"""Alembic migrations of the store; run them with :meth:`sandkeep.store.sql.SqlStore.upgrade` or
``sandkeep db upgrade`` (the Alembic configuration is built in code, no alembic.ini needed).

New revision (developers): ``python -m sandkeep.store.migrations "message"`` autogenerates a file in
``versions/`` by comparing a database migrated to head with :data:`sandkeep.store.tables.metadata`.
"""
