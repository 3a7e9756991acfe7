"""Test-only planted bugs: the simulation's proof that it finds bugs of the kinds that matter.

Production code consults :data:`ACTIVE` at four points (``if plant.ACTIVE and plant.on("...")``: one falsy
check of an empty frozenset when nothing is planted). Nothing is planted unless a test calls :func:`planted`
or the environment names a bug in ``SANDKEEP_SIM_PLANT`` (comma-separated; for ``python -m sandkeep.sim``).
Never set it in production.

=======================  ==========================================================================
``skip_ownership_check``  SPEC §7.5/§12.4: a volume delete destroys the attached machine without
                          checking that its metadata names the instance's sandbox (engine/executor.py)
``region_walk_reversed``  the provider client walks the regions of a create from the last one instead
                          of the first (provider/client.py ``create_volume_with_fallback``)
``unfenced_write``        the store's fenced write is conditional on the row id only, not on the lease
                          owner and version read (store/sql.py ``_fenced``)
``fork_without_source``   a recovery creates an empty volume instead of forking the old one
                          (engine/executor.py, CreateVolume)
=======================  ==========================================================================
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

BUGS: tuple[str, ...] = ("skip_ownership_check", "region_walk_reversed", "unfenced_write", "fork_without_source")

ACTIVE: frozenset[str] = frozenset(b for b in os.environ.get("SANDKEEP_SIM_PLANT", "").split(",") if b)


def on(bug: str) -> bool:
    return bug in ACTIVE


@contextlib.contextmanager
def planted(*bugs: str) -> Iterator[None]:
    """Plant ``bugs`` for the duration of the block (tests only)."""
    global ACTIVE
    unknown = set(bugs) - set(BUGS)
    if unknown:
        raise ValueError(f"unknown planted bug(s): {sorted(unknown)}; known: {BUGS}")
    before = ACTIVE
    ACTIVE = frozenset(bugs)
    try:
        yield
    finally:
        ACTIVE = before
