"""Alembic revision files (loaded by Alembic by path; the package marker keeps tools happy)."""
