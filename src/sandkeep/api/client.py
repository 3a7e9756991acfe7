"""A small synchronous client of sandkeep's HTTP API, used by the CLI and the demo.

Errors come back as :class:`ApiCallError` carrying the API's ``{"error": {"code", "message", "status"}}``;
a server that cannot be reached is :class:`ApiUnreachable`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

BUSY = frozenset({"starting", "restarting", "recovering", "destroying"})


class ApiUnreachable(Exception):
    pass


class ApiCallError(Exception):
    def __init__(self, status: int, code: str, message: str, body: Any = None) -> None:
        super().__init__(f"{code} ({status}): {message}")
        self.status = status
        self.code = code
        self.message = message
        self.body = body


class WaitTimedOut(Exception):
    def __init__(self, message: str, last: dict[str, Any] | None) -> None:
        super().__init__(message)
        self.last = last


@dataclass
class Transition:
    elapsed: float
    status: str | None  # None: the instance is gone (404)
    instance: dict[str, Any] | None


class ApiClient:
    def __init__(self, url: str, token: str | None, *, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        headers = {"Accept": "application/json", "User-Agent": "sandkeep-cli"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ plumbing

    def request(self, method: str, path: str, *, json: Any = None, params: Any = None,
                content: bytes | None = None, expect_json: bool = True,
                headers: dict[str, str] | None = None) -> Any:
        try:
            resp = self._http.request(method, path, json=json, params=params, content=content, headers=headers)
        except httpx.TransportError as exc:
            raise ApiUnreachable(f"cannot reach the sandkeep API at {self.url}: {type(exc).__name__}: {exc}") from exc
        if resp.status_code >= 400:
            raise _error_from(resp)
        if not expect_json:
            return resp
        if not resp.content:
            return None
        try:
            return resp.json()
        except ValueError as exc:
            raise ApiCallError(resp.status_code, "bad_response", f"the API answered non-JSON: {resp.text[:200]}") \
                from exc

    def pages(self, path: str, params: dict[str, Any], *, max_items: int | None = None) -> Iterator[dict[str, Any]]:
        """Every item of a cursor-paginated listing (up to ``max_items``)."""
        params = dict(params)
        count = 0
        while True:
            page = self.request("GET", path, params=params)
            for item in page["items"]:
                yield item
                count += 1
                if max_items is not None and count >= max_items:
                    return
            if not page.get("next_cursor"):
                return
            params["cursor"] = page["next_cursor"]

    # ------------------------------------------------------------------------------------------ API

    def create(self, *, idempotency_key: str | None = None, **body: Any) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return dict(self.request("POST", "/v1/instances", json={k: v for k, v in body.items() if v is not None},
                                 headers=headers))

    def get(self, instance_id: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/v1/instances/{instance_id}"))

    def action(self, instance_id: str, action: str) -> dict[str, Any]:
        return dict(self.request("POST", f"/v1/instances/{instance_id}/{action}"))

    def destroy(self, instance_id: str, *, force: bool = False) -> dict[str, Any]:
        params = {"force": "true"} if force else None
        return dict(self.request("DELETE", f"/v1/instances/{instance_id}", params=params))

    def update(self, instance_id: str, **body: Any) -> dict[str, Any]:
        return dict(self.request("PATCH", f"/v1/instances/{instance_id}",
                                 json={k: v for k, v in body.items() if v is not None}))

    def gateway(self, method: str, instance_id: str, path: str, content: bytes | None = None) -> httpx.Response:
        resp: httpx.Response = self.request(method, f"/v1/instances/{instance_id}/gateway/{path.lstrip('/')}",
                                            content=content, expect_json=False)
        return resp

    def wait_settled(self, instance_id: str, *, timeout: float, interval: float = 0.5,
                     on_change: Callable[[Transition], None] | None = None,
                     clock: Callable[[], float] = time.monotonic,
                     sleep: Callable[[float], None] = time.sleep) -> dict[str, Any] | None:
        """Poll until the instance settles: not busy and no pending action (or gone); report each change.

        Returns the settled instance, or None when it disappeared (404: destroyed and purged).
        Raises :class:`WaitTimedOut` after ``timeout`` seconds.
        """
        start = clock()
        last_status: str | None = "<unknown>"
        last: dict[str, Any] | None = None
        while True:
            try:
                inst: dict[str, Any] | None = self.get(instance_id)
            except ApiCallError as exc:
                if exc.status != 404:
                    raise
                inst = None
            status = None if inst is None else str(inst["status"])
            if inst is not None and inst.get("pending_action"):
                status = f"{status} ({inst['pending_action']} pending)"
            if status != last_status:
                last_status = status
                if on_change is not None:
                    on_change(Transition(elapsed=clock() - start, status=status, instance=inst))
            last = inst
            if inst is None or (not inst.get("busy", inst.get("status") in BUSY) and not inst.get("pending_action")):
                return inst
            if clock() - start > timeout:
                raise WaitTimedOut(f"instance {instance_id} still {status} after {timeout:g}s", last)
            sleep(interval)


def _error_from(resp: httpx.Response) -> ApiCallError:
    try:
        body = resp.json()
        err = body["error"]
        return ApiCallError(int(err.get("status", resp.status_code)), str(err.get("code", "error")),
                            str(err.get("message", "")), body)
    except (ValueError, KeyError, TypeError, AttributeError):
        text = resp.text[:300] if resp.content else resp.reason_phrase
        return ApiCallError(resp.status_code, "http_error", text or f"HTTP {resp.status_code}")
