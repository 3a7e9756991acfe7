"""``/readyz``: can this process do its work? The database answers and the machine provider answers.

``/healthz`` only says the process is alive; ``/readyz`` is what a load balancer or an orchestrator should
route on. Each check is bounded by ``SANDKEEP_READY_TIMEOUT`` and reports ``"ok"``, ``"unavailable"`` or a
timeout; the route needs no token, so the reasons (hosts, error text) go to the log line ``readyz.not_ready``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from sandkeep.config import Settings
from sandkeep.logs import get_logger
from sandkeep.provider.client import MachinesClient
from sandkeep.store.base import Store


async def _database(store: Store) -> None:
    await asyncio.to_thread(store.ping)


async def _provider(provider: MachinesClient, org: str) -> None:
    await provider.list_apps(org, retry=False)


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


async def readiness_checks(settings: Settings, *, store: Store | None, provider: MachinesClient | None,
                           timeout: float) -> dict[str, str]:
    """``{"database": "ok" | reason, "provider": "ok" | reason}`` (a check with nothing to check is skipped:
    no store, or a provider that is not a Machines API client)."""
    log = get_logger("sandkeep.readyz")
    org = settings.fly_org if settings.provider == "fly" else "personal"
    checks: dict[str, Coroutine[Any, Any, None]] = {}
    if store is not None:
        checks["database"] = _database(store)
    if provider is not None:
        checks["provider"] = _provider(provider, org)
    results: dict[str, str] = {}
    reasons: dict[str, str] = {}
    for name, check in checks.items():
        try:
            await asyncio.wait_for(check, timeout=timeout)
            results[name] = "ok"
        except TimeoutError:
            results[name] = reasons[name] = f"no answer within {timeout:g}s"
        except Exception as exc:  # the answer is public: details (hosts, messages) go to the log only
            results[name] = "unavailable"
            reasons[name] = _reason(exc)
    if reasons:
        log.warning("readyz.not_ready", **reasons)
    return results
