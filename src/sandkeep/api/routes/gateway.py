"""``/v1/instances/{id}/gateway/{path}``: traffic to the instance's gateway (owner or admin), streamed both ways.

503 with ``Retry-After`` while the instance is not running; 502/504 when its gateway does not answer.
"""

from __future__ import annotations

import math
from typing import Any
from urllib.parse import quote

import httpx
from fastapi import APIRouter, Request, Response

from sandkeep.api.deps import ERRORS, ActorDep, InstanceId, StateDep
from sandkeep.api.errors import ApiError
from sandkeep.api.proxy import HOP_BY_HOP, GatewayUnreachable, stream_gateway
from sandkeep.api.schemas import ErrorBody
from sandkeep.gateway import PROXY_TOKEN_HEADER
from sandkeep.gateway import TOKEN_HEADER as GATEWAY_TOKEN_HEADER
from sandkeep.logs import get_logger

DROP_REQUEST_HEADERS = HOP_BY_HOP | {"host", "authorization", "cookie", "fly-force-instance-id", "x-forwarded-for",
                                     "x-forwarded-proto", "x-forwarded-host", GATEWAY_TOKEN_HEADER,
                                     PROXY_TOKEN_HEADER}
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")

router = APIRouter(prefix="/v1", responses=ERRORS)


def log() -> Any:
    """The API's logger, as configured now (a logger bound at import would keep the configuration of then)."""
    return get_logger("sandkeep.api")


def _upstream_headers(request: Request, extra: dict[str, str]) -> list[tuple[str, str]]:
    headers = [(k, v) for k, v in request.headers.items() if k.lower() not in DROP_REQUEST_HEADERS]
    headers += list(extra.items())
    headers.append(("x-forwarded-for", request.client.host if request.client else ""))
    headers.append(("x-forwarded-proto", request.url.scheme))
    return headers


async def gateway(actor: ActorDep, api: StateDep, instance_id: InstanceId, path: str, request: Request) -> Response:
    """Proxy to the instance's gateway (owner or admin). 503 with Retry-After while not running."""
    retry_after = str(max(1, math.ceil(api.settings.interval_busy)))
    record = api.service.get_instance(actor, instance_id)
    target = api.service.gateway_target(actor, instance_id)
    if target is None:
        status = str(record.status)
        raise ApiError(503, "instance_not_running", f"instance {instance_id} is {status}, not running; "
                       f"retry in {retry_after}s", headers={"Retry-After": retry_after},
                       instance_status=status, busy=record.busy)
    base, extra_headers = target
    url = base.rstrip("/") + "/" + quote(path, safe="/:@!$&'()*+,;=-._~%")
    has_body = "content-length" in request.headers or "chunked" in request.headers.get("transfer-encoding", "")
    query: list[tuple[str, str | int | float | bool | None]] = list(request.query_params.multi_items())

    def broken(error: str) -> None:
        log().warning("api.gateway_stream_broken", instance_id=instance_id, error=error)

    try:
        return await stream_gateway(api.gateway.get(), request.method, url,
                                    headers=_upstream_headers(request, extra_headers),
                                    params=httpx.QueryParams(query),
                                    content=request.stream() if has_body else None, on_broken=broken)
    except GatewayUnreachable as exc:
        if exc.timed_out:
            log().warning("api.gateway_timeout", instance_id=instance_id, error=str(exc.error))
            raise ApiError(504, "gateway_timeout", f"the gateway of {instance_id} did not answer in time") from exc
        log().warning("api.gateway_unreachable", instance_id=instance_id, error=str(exc))
        raise ApiError(502, "gateway_unreachable", f"cannot reach the gateway of {instance_id}: "
                       f"{type(exc.error).__name__}", headers={"Retry-After": retry_after}) from exc


for _method in METHODS:
    router.add_api_route("/instances/{instance_id}/gateway/{path:path}", gateway, methods=[_method],
                         operation_id=f"gateway_{_method.lower()}", tags=["traffic"],
                         responses={502: {"model": ErrorBody}, 504: {"model": ErrorBody}})
