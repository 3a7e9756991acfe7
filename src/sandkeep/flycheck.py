"""Start-up checks of Fly mode: ``FLY_REGIONS`` syntax, then the token, the organisation and the regions
with real Machines API calls, so a bad configuration stops ``serve`` with one clear line instead of leaving
instances ``starting`` forever.

* ``FLY_REGIONS``: a comma-separated list of region codes (lowercase letters, digits, dashes), no empties,
  no duplicates.
* Token and organisation: ``GET /v1/apps?org_slug=FLY_ORG`` — 401/403 means the token is refused, 404 (or
  another 4xx) that the organisation is unknown to this token, no answer that ``FLY_API_URL`` is unreachable.
* Regions: ``GET /v1/platform/regions`` when the API offers it; every configured region must be listed. When
  it answers 404 (the published Machines API description has no region list) only the syntax is checked and a
  warning says so.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from sandkeep.config import Settings
from sandkeep.logs import get_logger
from sandkeep.provider.errors import AuthError, NotFoundError, ProviderError, TransientError

REGION_RE = re.compile(r"^[a-z][a-z0-9-]{1,31}$")


class FlyConfigError(Exception):
    """Fly mode cannot work with this configuration; the message is one line for the operator."""


def parse_fly_regions(raw: str) -> list[str]:
    """``FLY_REGIONS`` as a list, or FlyConfigError naming what is wrong."""
    parts = [p.strip() for p in raw.split(",")]
    if not raw.strip() or any(p == "" for p in parts):
        raise FlyConfigError(f"FLY_REGIONS must be a comma-separated list of Fly region codes such as "
                             f"'iad,ord,dfw' (no empty entries), got {raw!r}")
    bad = [p for p in parts if not REGION_RE.match(p)]
    if bad:
        raise FlyConfigError(f"FLY_REGIONS: {bad[0][:40]!r} is not a Fly region code (lowercase letters, e.g. "
                             f"'iad'), got {raw!r}")
    if len(set(parts)) != len(parts):
        raise FlyConfigError(f"FLY_REGIONS names a region twice: {raw!r}")
    return parts


def _region_codes(data: Any) -> set[str] | None:
    """Region codes from a platform/regions answer (tolerant of the shapes seen: a list, or under Regions)."""
    if isinstance(data, dict):
        data = data.get("Regions", data.get("regions"))
    if not isinstance(data, list):
        return None
    codes: set[str] = set()
    for item in data:
        if isinstance(item, str):
            codes.add(item)
        elif isinstance(item, dict):
            code = item.get("code", item.get("Code"))
            if isinstance(code, str):
                codes.add(code)
    return codes or None


async def check_fly(provider: Any, settings: Settings, *, timeout: float) -> None:
    """Raise FlyConfigError (one line) unless the token, the organisation and the regions check out."""
    log = get_logger("sandkeep.flycheck")
    regions = parse_fly_regions(settings.fly_regions)
    url = settings.fly_api_url
    try:
        await asyncio.wait_for(provider.list_apps(settings.fly_org, retry=False), timeout=timeout)
    except TimeoutError as exc:
        raise FlyConfigError(f"the Fly API at {url} did not answer within {timeout:g}s "
                             f"(FLY_API_URL; SANDKEEP_PROVIDER_CHECK_TIMEOUT)") from exc
    except AuthError as exc:
        raise FlyConfigError(f"FLY_API_TOKEN was refused by {url} (HTTP {exc.status}): use a token that may "
                             f"manage apps, machines and volumes in organisation {settings.fly_org!r}") from exc
    except TransientError as exc:
        raise FlyConfigError(f"cannot reach the Fly API at {url} (FLY_API_URL): {exc.message}") from exc
    except ProviderError as exc:
        raise FlyConfigError(f"FLY_ORG {settings.fly_org!r} is not an organisation this token can use "
                             f"(listing its apps at {url} answered HTTP {exc.status}: {exc.message[:120]})") from exc
    try:
        data = await asyncio.wait_for(provider.platform_regions(), timeout=timeout)
    except NotFoundError:
        log.warning("flycheck.regions_not_verified", regions=regions,
                    reason="the API has no /v1/platform/regions; only the syntax of FLY_REGIONS was checked")
        return
    except (ProviderError, TimeoutError) as exc:
        log.warning("flycheck.regions_not_verified", regions=regions, reason=str(exc) or type(exc).__name__)
        return
    known = _region_codes(data)
    if known is None:
        log.warning("flycheck.regions_not_verified", regions=regions, reason="unrecognised region list")
        return
    unknown = [r for r in regions if r not in known]
    if unknown:
        raise FlyConfigError(f"FLY_REGIONS names regions Fly does not offer: {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(known))})")
    log.info("flycheck.ok", org=settings.fly_org, regions=regions)
