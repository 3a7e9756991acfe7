"""Recovery progress for the admin fleet page (issue 11): during a storm, how many recoveries are queued,
in flight and done in the last hour, and which engine processes are alive. Rendered by
``_recovery_progress.html`` inside the live fleet fragment."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

PROGRESS_WINDOW = timedelta(hours=1)


def fleet_progress(rt: Any) -> dict[str, Any]:
    """``{"queued", "in_flight", "succeeded", "failed", "engines"}``; empty when the store cannot say."""
    store = getattr(rt, "store", None)
    if store is None:
        return {}
    now = rt.clock.now()
    try:
        progress: dict[str, Any] = dict(store.recovery_progress(now, now - PROGRESS_WINDOW))
        progress["engines"] = [e for e in store.list_engines() if e["expires_at"] >= now]
    except Exception:  # a store hiccup must not break the fleet page; the rest of it says the store is down
        return {}
    return progress
