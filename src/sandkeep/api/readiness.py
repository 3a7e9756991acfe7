"""``/readyz``: can this process do its work? The database answers and the machine provider answers.

``/healthz`` only says the process is alive; ``/readyz`` is what a load balancer or an orchestrator should
route on. Each check is bounded by ``SANDKEEP_READY_TIMEOUT`` and reports ``"ok"``, ``"unavailable"`` or a
timeout; the route needs no token, so the reasons (hosts, error text) go to the log line ``readyz.not_ready``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from sandkeep.logs import get_logger


async def _database(store: Any) -> None:
    ping = getattr(store, "ping", None)
    if ping is not None:
        await asyncio.to_thread(ping)
    else:
        await asyncio.to_thread(store.count_by_status)


async def _provider(provider: Any, org: str) -> None:
    await provider.list_apps(org, retry=False)


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


async def readiness_checks(runtime: Any, *, timeout: float) -> dict[str, str]:
    """``{"database": "ok" | reason, "provider": "ok" | reason}`` (a check with nothing to check is skipped)."""
    log = get_logger("sandkeep.readyz")
    settings = runtime.settings
    org = settings.fly_org if getattr(settings, "provider", "local") == "fly" else "personal"
    checks: dict[str, Any] = {}
    store = getattr(runtime, "store", None)
    if store is not None:
        checks["database"] = _database(store)
    provider = getattr(runtime, "provider", None)
    if provider is not None and hasattr(provider, "list_apps"):
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
