"""The Fly Machines API client: one implementation for the local host and for real Fly.

``MachinesClient("http://127.0.0.1:4280", token, proxy_url="http://127.0.0.1:4281")`` talks to the
local host; ``MachinesClient("https://api.machines.dev", token)`` talks to Fly. Paths are Fly's, under
``/v1`` (a base URL that already ends in ``/v1`` is accepted too).

Every non-2xx answer becomes a :class:`~sandkeep.provider.errors.ProviderError` subclass via
:func:`~sandkeep.provider.errors.classify`; network failures and timeouts become
:class:`~sandkeep.provider.errors.TransientError`. Transient and 429 answers are retried with bounded,
jittered exponential backoff that honours ``Retry-After`` (see :mod:`sandkeep.provider.retry`), sleeping
on the injected clock. Creates are not idempotent: an ambiguous failure (5xx, timeout, network error or a
408) is resolved by looking the object up by name before retrying or failing, so a retry never makes a
duplicate.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import random
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, TypeAdapter, ValidationError
from tenacity import RetryCallState

from sandkeep import metrics
from sandkeep.clock import Clock, SystemClock
from sandkeep.gateway import PROXY_TOKEN_HEADER
from sandkeep.logs import get_logger
from sandkeep.provider.deadline import bounded, remaining
from sandkeep.provider.errors import (
    CapacityError,
    ConflictError,
    HostUnavailableError,
    InvalidRequestError,
    MissingVolumeError,
    NotFoundError,
    ProviderError,
    RateLimitedError,
    TransientError,
    WaitTimeoutError,
    classify,
)
from sandkeep.provider.limits import RegionBreaker, RegionGates, TokenBucket
from sandkeep.provider.models import App, Guest, Machine, MachineConfig, MachineEvent, Volume, VolumeSnapshot
from sandkeep.provider.retry import RETRYABLE, RetryPolicy, call_with_retry
from sandkeep.sim import plant

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

WAIT_MAX_SECONDS = 60
"""Fly's wait endpoint blocks for at most 60 s."""
WATCH_MAX_SECONDS = 30
"""The local host's /_local/watch long-poll blocks for at most 30 s."""
_GONE_STATES = frozenset({"destroyed", "destroying", "pending_destroy", "deleted"})
if importlib.util.find_spec("sniffio") is None:
    # httpcore runs ``import sniffio`` on every request and falls back to asyncio when it is missing; a failed
    # import searches sys.path each time (the burst profile's top entry). A None entry fails it at once.
    sys.modules.setdefault("sniffio", None)  # type: ignore[arg-type]

_AMBIGUOUS: tuple[type[ProviderError], ...] = (TransientError, WaitTimeoutError)
"""Failures after which a create may or may not have happened."""


def _log() -> Any:
    # Looked up per use so logging configured (or captured in tests) after import applies.
    return get_logger("sandkeep.provider")


def parse_retry_after(value: str | None, clock: Clock) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date (relative to ``clock``); None if absent/bad."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - clock.now()).total_seconds()
    if math.isnan(seconds) or math.isinf(seconds):
        return None
    return max(0.0, seconds)


def _seg(value: str) -> str:
    """One URL path segment, escaped so ids and keys cannot change the path."""
    if not value:
        raise InvalidRequestError("empty identifier in request path")
    return quote(value, safe="")


def _config_json(config: MachineConfig) -> dict[str, Any]:
    return config.model_dump(mode="json", exclude_none=True)


FLY_PROXY_TEMPLATE = "https://{app}.fly.dev"
"""Where gateway traffic for a Fly app goes (Fly's public proxy); ``{app}`` is the app name."""


class MachinesClient:
    """Async Fly Machines API client implementing :class:`sandkeep.provider.base.MachineProvider`."""

    def __init__(self, base_url: str, token: str, *, proxy_url: str | None = None,
                 fly_proxy_template: str = FLY_PROXY_TEMPLATE, clock: Clock | None = None,
                 timeout: float = 30.0, max_attempts: int = 5, backoff_base: float = 0.2,
                 backoff_max: float = 5.0, transport: httpx.AsyncBaseTransport | None = None,
                 max_retry_after: float = 60.0, rng: random.Random | None = None,
                 proxy_token: str | None = None, rate_limit: float = 0.0, rate_burst: float = 0.0,
                 region_concurrency: int = 0, breaker_threshold: int = 0, breaker_cooldown: float = 30.0,
                 snapshot_retention: int | None = None) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        root = base_url.strip().rstrip("/")
        if root.endswith("/v1"):
            root = root[: -len("/v1")]
        if not root.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}")
        self.base_url = root
        if snapshot_retention is not None and not 1 <= snapshot_retention <= 60:
            raise ValueError(f"snapshot_retention must be 1-60 days, got {snapshot_retention}")
        self.snapshot_retention = snapshot_retention  # days; sent with every volume create/fork/restore
        self.proxy_url = proxy_url.rstrip("/") if proxy_url else None
        self.proxy_token = proxy_token  # the local host's SANDKEEP_HOST_PROXY_TOKEN, sent with gateway traffic
        if "{app}" not in fly_proxy_template:
            raise ValueError(f"fly_proxy_template must contain '{{app}}', got {fly_proxy_template!r}")
        self.fly_proxy_template = fly_proxy_template.rstrip("/")
        self.clock: Clock = clock or SystemClock()
        self.timeout = float(timeout)
        self.policy = RetryPolicy(max_attempts=max_attempts, backoff_base=backoff_base, backoff_max=backoff_max,
                                  max_retry_after=max_retry_after, rng=rng or random.Random())
        # bounded storms (issue 11): a process-wide token bucket (0: off) that also honours Retry-After for
        # every caller, at most ``region_concurrency`` creates in flight per region, a per-region breaker
        burst = max(1.0, rate_burst or rate_limit)
        self.bucket = TokenBucket(rate_limit, burst, self.clock) if rate_limit > 0 else None
        self.gates = RegionGates(region_concurrency) if region_concurrency > 0 else None
        self.breaker = RegionBreaker(breaker_threshold, breaker_cooldown, self.clock) if breaker_threshold > 0 else None
        self._http = httpx.AsyncClient(
            base_url=root,
            headers={"Authorization": f"Bearer {token}", "Accept": "application/json",
                     "User-Agent": "sandkeep"},
            timeout=httpx.Timeout(self.timeout),
            transport=transport,
            follow_redirects=False,
        )

    # ------------------------------------------------------------------ plumbing

    @property
    def is_local(self) -> bool:
        """True when talking to the local host (a proxy URL was given)."""
        return self.proxy_url is not None

    @property
    def supports_watch(self) -> bool:
        """The local host offers the ``/_local/watch`` change stream; real Fly has none."""
        return self.is_local

    def __repr__(self) -> str:  # never show the token
        return f"MachinesClient(base_url={self.base_url!r}, local={self.is_local})"

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> MachinesClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _send(self, method: str, path: str, *, operation: str,
                    params: list[tuple[str, str]] | None = None, body: Any = None,
                    timeout: float | None = None, volume_404_is_not_found: bool = False) -> httpx.Response:
        """One HTTP exchange; a non-2xx answer or a network failure raises a classified ProviderError.

        Under a caller's deadline (:mod:`sandkeep.provider.deadline`) the exchange's timeout is capped by the time
        left and the exchange is abandoned when the deadline passes (DeadlineExceededError)."""
        if self.bucket is not None:  # the bucket's wait (a penalty for a Retry-After too) ends by the deadline
            await bounded(self.bucket.acquire(), operation=operation)
        started = self.clock.monotonic()
        left = remaining()
        if left is not None:
            timeout = max(0.001, min(timeout if timeout is not None else self.timeout, left))
        try:
            resp = await bounded(self._exchange(
                method, path, operation=operation, params=params, body=body, timeout=timeout,
                volume_404_is_not_found=volume_404_is_not_found), operation=operation)
        except ProviderError as exc:
            metrics.observe_provider_call(operation, exc, self.clock.monotonic() - started)
            if self.bucket is not None and isinstance(exc, RateLimitedError):
                self.bucket.penalise(exc.retry_after if exc.retry_after is not None else 1.0)
            raise
        metrics.observe_provider_call(operation, None, self.clock.monotonic() - started)
        return resp

    async def _exchange(self, method: str, path: str, *, operation: str, params: list[tuple[str, str]] | None,
                        body: Any, timeout: float | None, volume_404_is_not_found: bool) -> httpx.Response:
        try:
            resp = await self._http.request(
                method, path, params=tuple(params or ()), json=body,
                timeout=httpx.Timeout(timeout if timeout is not None else self.timeout))
        except httpx.TimeoutException as exc:
            raise TransientError(f"request timed out ({type(exc).__name__})", operation=operation) from exc
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            raise InvalidRequestError(f"bad request URL: {exc}", operation=operation) from exc
        except httpx.TransportError as exc:
            raise TransientError(f"network error ({type(exc).__name__}): {exc}", operation=operation) from exc
        if resp.is_success:
            return resp
        error = classify(resp.status_code, resp.text, operation=operation,
                         retry_after=parse_retry_after(resp.headers.get("retry-after"), self.clock))
        if volume_404_is_not_found and isinstance(error, MissingVolumeError) and error.status == 404:
            # "volume not found" on the volume's own URL: the object is gone (MissingVolumeError is for a
            # request that *refers* to a missing volume, e.g. a machine create mounting it).
            error = NotFoundError(error.message, status=error.status, body=error.body, operation=operation)
        raise error

    async def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        sleep = state.next_action.sleep if state.next_action else None
        metrics.PROVIDER_RETRIES.labels(operation=metrics.operation_label(getattr(exc, "operation", ""))).inc()
        _log().warning("provider.retry", operation=getattr(exc, "operation", ""), attempt=state.attempt_number,
                       max_attempts=self.policy.max_attempts, sleep_seconds=sleep,
                       error=type(exc).__name__ if exc else None, status=getattr(exc, "status", None),
                       message=getattr(exc, "message", str(exc)), retry_after=getattr(exc, "retry_after", None))

    async def _retry(self, fn: Callable[[], Awaitable[T]],
                     retry_on: tuple[type[BaseException], ...] = RETRYABLE) -> T:
        # every attempt and every backoff sleep (a Retry-After included) end by the caller's deadline, if any
        return await bounded(call_with_retry(
            fn, policy=self.policy, sleep=self.clock.sleep, retry_on=retry_on, before_sleep=self._log_retry,
            limit=remaining))

    async def _call(self, method: str, path: str, *, operation: str, params: list[tuple[str, str]] | None = None,
                    body: Any = None, timeout: float | None = None, retry: bool = True,
                    volume_404_is_not_found: bool = False) -> httpx.Response:
        async def once() -> httpx.Response:
            return await self._send(method, path, operation=operation, params=params, body=body, timeout=timeout,
                                    volume_404_is_not_found=volume_404_is_not_found)

        if not retry:
            return await once()
        return await self._retry(once)

    @staticmethod
    def _json(resp: httpx.Response, operation: str) -> Any:
        try:
            return resp.json()
        except ValueError as exc:
            raise ProviderError(f"malformed JSON in response: {resp.text[:200]!r}", status=resp.status_code,
                                body=resp.text, operation=operation) from exc

    @staticmethod
    def _optional_json(resp: httpx.Response) -> Any:
        if not resp.content.strip():
            return None
        try:
            return resp.json()
        except ValueError:
            return None

    def _model(self, model: type[M], resp: httpx.Response, operation: str) -> M:
        data = self._json(resp, operation)
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise ProviderError(f"unexpected response shape for {model.__name__}: {exc.errors()[:3]}",
                                status=resp.status_code, body=resp.text, operation=operation) from exc

    def _models(self, model: type[M], resp: httpx.Response, operation: str) -> list[M]:
        data = self._json(resp, operation)
        if data is None:
            return []
        try:
            return TypeAdapter(list[model]).validate_python(data)  # type: ignore[valid-type]
        except ValidationError as exc:
            raise ProviderError(f"unexpected response shape for list of {model.__name__}: {exc.errors()[:3]}",
                                status=resp.status_code, body=resp.text, operation=operation) from exc

    @staticmethod
    def _app_path(app_name: str) -> str:
        return f"/v1/apps/{_seg(app_name)}"

    def _machine_path(self, app_name: str, machine_id: str) -> str:
        return f"{self._app_path(app_name)}/machines/{_seg(machine_id)}"

    def _volume_path(self, app_name: str, volume_id: str) -> str:
        return f"{self._app_path(app_name)}/volumes/{_seg(volume_id)}"

    async def _create_resolving(self, create: Callable[[], Awaitable[T]],
                                lookup: Callable[[], Awaitable[T | None]], *, operation: str) -> T:
        """Retry a non-idempotent create; after any ambiguous failure, look the object up before going on.

        ``lookup`` finds the object this create would have made (by name), or None. After an ambiguous
        failure the next attempt starts with a lookup; once any attempt was ambiguous, the final error
        (including an "already exists" conflict from a retry racing the first create) is raised only
        after a last lookup.
        """
        ambiguous = False  # the next attempt must look first
        ever_ambiguous = False

        async def attempt() -> T:
            nonlocal ambiguous, ever_ambiguous
            if ambiguous:
                found = await lookup()
                if found is not None:
                    _log().info("provider.create_resolved", operation=operation)
                    return found
                ambiguous = False
            try:
                return await create()
            except _AMBIGUOUS:
                ambiguous = ever_ambiguous = True
                raise

        try:
            return await self._retry(attempt, retry_on=(*RETRYABLE, WaitTimeoutError))
        except ProviderError as exc:
            if not ever_ambiguous:  # e.g. a plain conflict: the name was taken before we started
                raise
            try:
                found = await lookup()
            except ProviderError:
                raise exc from None
            if found is None:
                raise
            _log().info("provider.create_resolved", operation=operation, after=type(exc).__name__)
            return found

    # ------------------------------------------------------------------ apps

    async def create_app(self, app_name: str, org_slug: str) -> App:
        op = f"create_app {app_name}"

        async def create() -> App:
            resp = await self._send("POST", "/v1/apps", operation=op,
                                    body={"app_name": app_name, "org_slug": org_slug})
            data = self._optional_json(resp)
            if isinstance(data, dict) and data.get("name"):
                return App.model_validate(data)
            return await self.get_app(app_name)

        async def lookup() -> App | None:
            try:
                return await self.get_app(app_name)
            except NotFoundError:
                return None

        return await self._create_resolving(create, lookup, operation=op)

    async def list_apps(self, org_slug: str, *, retry: bool = True) -> list[App]:
        """The organisation's apps (``GET /v1/apps?org_slug=``): also the cheapest check of token and org."""
        op = "list_apps"
        resp = await self._call("GET", "/v1/apps", operation=op, params=[("org_slug", org_slug)], retry=retry)
        data = self._json(resp, op)
        if isinstance(data, dict):  # Fly answers {"total_apps": n, "apps": [...]}
            data = data.get("apps") or []
        try:
            return TypeAdapter(list[App]).validate_python(data)
        except ValidationError as exc:
            raise ProviderError(f"unexpected response shape for list of App: {exc.errors()[:3]}",
                                status=resp.status_code, body=resp.text, operation=op) from exc

    async def platform_regions(self) -> Any:
        """``GET /v1/platform/regions`` as JSON (Fly's region list; NotFoundError where the API has none)."""
        op = "platform_regions"
        return self._json(await self._call("GET", "/v1/platform/regions", operation=op, retry=False), op)

    async def get_app(self, app_name: str) -> App:
        op = f"get_app {app_name}"
        return self._model(App, await self._call("GET", self._app_path(app_name), operation=op), op)

    async def ensure_app(self, app_name: str, org_slug: str) -> App:
        """The app, created when missing, with its public IPs (:meth:`ensure_public_ips`, also when an earlier
        call made the app but died before the IPs); a concurrent create by someone else counts as success."""
        app = await self._get_or_create_app(app_name, org_slug)
        await self.ensure_public_ips(app_name)
        return app

    async def _get_or_create_app(self, app_name: str, org_slug: str) -> App:
        try:
            return await self.get_app(app_name)
        except NotFoundError:
            pass
        try:
            return await self.create_app(app_name, org_slug)
        except (ConflictError, InvalidRequestError) as exc:
            try:
                return await self.get_app(app_name)
            except NotFoundError:
                raise exc from None

    async def list_ip_assignments(self, app_name: str) -> list[dict[str, Any]]:
        """The app's IP assignments (``GET /v1/apps/{app}/ip_assignments``, as fly-go's flaps client calls it)."""
        op = f"list_ip_assignments {app_name}"
        data = self._json(await self._call("GET", f"{self._app_path(app_name)}/ip_assignments", operation=op), op)
        ips = data.get("ips") if isinstance(data, dict) else None
        return [ip for ip in ips if isinstance(ip, dict)] if isinstance(ips, list) else []

    async def assign_ip(self, app_name: str, ip_type: str) -> dict[str, Any]:
        """Allocate an app IP of ``ip_type`` (``shared_v4``, ``v6``, ``v4``, ``private_v6``)."""
        op = f"assign_ip {app_name} {ip_type}"
        # not retried on ambiguous failures (a retry could allocate twice); ensure_public_ips looks first
        resp = await self._retry(lambda: self._send("POST", f"{self._app_path(app_name)}/ip_assignments",
                                                    operation=op, body={"type": ip_type}),
                                 retry_on=(RateLimitedError,))
        data = self._optional_json(resp)
        return data if isinstance(data, dict) else {}

    async def ensure_public_ips(self, app_name: str) -> None:
        """Give the app a shared IPv4 and an IPv6 address unless it has public ones: on Fly, ``<app>.fly.dev``
        (the gateway route through Fly's proxy) resolves only once the app has IPs. The local host records them."""
        have: set[str] = set()
        for ip in await self.list_ip_assignments(app_name):
            address = str(ip.get("ip") or "")
            kind = str(ip.get("type") or "") or (  # newer answers carry no type: derive it as fly-go does
                "private_v6" if address.startswith("fdaa:") else "shared_v4" if ip.get("shared")
                else "v6" if ":" in address else "v4")
            if not ip.get("egress"):
                have.add(kind)
        if not have & {"shared_v4", "v4"}:
            await self.assign_ip(app_name, "shared_v4")
        if "v6" not in have:
            await self.assign_ip(app_name, "v6")

    # ------------------------------------------------------------------ machines

    @contextlib.asynccontextmanager
    async def _region(self, region: str | None, operation: str) -> AsyncIterator[None]:
        """A create in ``region``: refused at once while the region's breaker is open, at most
        ``region_concurrency`` at a time, and its outcome counted by the breaker."""
        if region is None or (self.breaker is None and self.gates is None):
            yield
            return
        if self.breaker is not None and not self.breaker.allow(region):
            metrics.PROVIDER_BREAKER_REFUSALS.labels(region=region).inc()
            raise CapacityError(f"region {region} is failing every create: circuit open, not trying it now",
                                operation=operation)
        async with self.gates.hold(region) if self.gates is not None else contextlib.nullcontext():
            try:
                yield
            except (CapacityError, TransientError, HostUnavailableError, WaitTimeoutError):
                if self.breaker is not None:
                    self.breaker.failure(region)
                raise
            except BaseException:
                if self.breaker is not None and self.breaker.state(region) != "closed":
                    self.breaker.failure(region)  # a half-open trial that ended otherwise: stay careful
                raise
            if self.breaker is not None:
                self.breaker.success(region)

    async def create_machine(self, app_name: str, *, config: MachineConfig, name: str | None = None,
                             region: str | None = None, skip_launch: bool = False) -> Machine:
        async with self._region(region, f"create_machine {app_name}/{name or '?'}"):
            return await self._create_machine(app_name, config=config, name=name, region=region,
                                              skip_launch=skip_launch)

    async def _create_machine(self, app_name: str, *, config: MachineConfig, name: str | None,
                              region: str | None, skip_launch: bool) -> Machine:
        op = f"create_machine {app_name}/{name or '?'}"
        body: dict[str, Any] = {"config": _config_json(config)}
        if name:
            body["name"] = name
        if region:
            body["region"] = region
        if skip_launch:
            body["skip_launch"] = True
        path = f"{self._app_path(app_name)}/machines"

        async def create() -> Machine:
            return self._model(Machine, await self._send("POST", path, operation=op, body=body), op)

        if not name:
            # Without a name an ambiguous failure cannot be resolved: only retry what surely did not happen.
            return await self._retry(create, retry_on=(RateLimitedError,))

        existing = {m.id for m in await self._machines_named(app_name, name, region)}

        async def lookup() -> Machine | None:
            for m in await self._machines_named(app_name, name, region):
                if m.id not in existing:
                    return m
            return None

        return await self._create_resolving(create, lookup, operation=op)

    async def _machines_named(self, app_name: str, name: str, region: str | None) -> list[Machine]:
        return [m for m in await self.list_machines(app_name)
                if m.name == name and m.state not in _GONE_STATES and (region is None or m.region == region)]

    async def get_machine(self, app_name: str, machine_id: str) -> Machine:
        op = f"get_machine {app_name}/{machine_id}"
        return self._model(Machine, await self._call("GET", self._machine_path(app_name, machine_id),
                                                     operation=op), op)

    async def list_machines(self, app_name: str, *, metadata: dict[str, str] | None = None,
                            region: str | None = None, include_deleted: bool = False) -> list[Machine]:
        op = f"list_machines {app_name}"
        params: list[tuple[str, str]] = [(f"metadata.{k}", v) for k, v in sorted((metadata or {}).items())]
        if region:
            params.append(("region", region))
        if include_deleted:
            params.append(("include_deleted", "true"))
        resp = await self._call("GET", f"{self._app_path(app_name)}/machines", operation=op, params=params or None)
        return self._models(Machine, resp, op)

    async def update_machine(self, app_name: str, machine_id: str, *, config: MachineConfig,
                             skip_launch: bool = False) -> Machine:
        """Apply ``config``. As on Fly, the update (re)launches the machine — a running one restarts, a stopped
        or failed one starts — unless ``skip_launch``."""
        op = f"update_machine {app_name}/{machine_id}"
        body: dict[str, Any] = {"config": _config_json(config)}
        if skip_launch:
            body["skip_launch"] = True
        resp = await self._call("POST", self._machine_path(app_name, machine_id), operation=op, body=body)
        return self._model(Machine, resp, op)

    async def start_machine(self, app_name: str, machine_id: str) -> None:
        await self._call("POST", f"{self._machine_path(app_name, machine_id)}/start",
                         operation=f"start_machine {app_name}/{machine_id}")

    async def stop_machine(self, app_name: str, machine_id: str) -> None:
        await self._call("POST", f"{self._machine_path(app_name, machine_id)}/stop",
                         operation=f"stop_machine {app_name}/{machine_id}")

    async def restart_machine(self, app_name: str, machine_id: str) -> None:
        await self._call("POST", f"{self._machine_path(app_name, machine_id)}/restart",
                         operation=f"restart_machine {app_name}/{machine_id}")

    async def destroy_machine(self, app_name: str, machine_id: str, *, force: bool = True,
                              missing_ok: bool = True) -> None:
        op = f"destroy_machine {app_name}/{machine_id}"
        params = [("force", "true")] if force else None
        try:
            await self._call("DELETE", self._machine_path(app_name, machine_id), operation=op, params=params)
        except NotFoundError:
            if not missing_ok:
                raise

    async def wait_machine(self, app_name: str, machine_id: str, *, state: str = "started",
                           timeout: float = 60, instance_id: str | None = None) -> None:
        """Block until the machine reaches ``state``; :class:`WaitTimeoutError` (408) when it does not.

        ``timeout`` is capped at 60 s (Fly's limit) and rounded up to whole seconds. A 408 is never
        retried here: the caller decides what a machine that did not get there in time means.
        """
        op = f"wait_machine {app_name}/{machine_id} {state}"
        seconds = max(1, min(WAIT_MAX_SECONDS, math.ceil(timeout)))
        params = [("state", state), ("timeout", str(seconds))]
        if instance_id:
            params.append(("instance_id", instance_id))
        await self._call("GET", f"{self._machine_path(app_name, machine_id)}/wait", operation=op, params=params,
                         timeout=seconds + self.timeout)

    async def list_machine_events(self, app_name: str, machine_id: str) -> list[MachineEvent]:
        op = f"list_machine_events {app_name}/{machine_id}"
        resp = await self._call("GET", f"{self._machine_path(app_name, machine_id)}/events", operation=op)
        return self._models(MachineEvent, resp, op)

    async def get_metadata(self, app_name: str, machine_id: str) -> dict[str, str]:
        op = f"get_metadata {app_name}/{machine_id}"
        data = self._json(await self._call("GET", f"{self._machine_path(app_name, machine_id)}/metadata",
                                           operation=op), op)
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise ProviderError(f"unexpected metadata response: {data!r:.200}", operation=op)
        return {str(k): str(v) for k, v in data.items()}

    async def set_metadata(self, app_name: str, machine_id: str, key: str, value: str) -> None:
        await self._call("POST", f"{self._machine_path(app_name, machine_id)}/metadata/{_seg(key)}",
                         operation=f"set_metadata {app_name}/{machine_id} {key}", body={"value": value})

    async def delete_metadata(self, app_name: str, machine_id: str, key: str) -> None:
        await self._call("DELETE", f"{self._machine_path(app_name, machine_id)}/metadata/{_seg(key)}",
                         operation=f"delete_metadata {app_name}/{machine_id} {key}")

    # ------------------------------------------------------------------ volumes

    async def create_volume(self, app_name: str, *, name: str, region: str, size_gb: int | None = None,
                            source_volume_id: str | None = None, snapshot_id: str | None = None,
                            compute: Guest | None = None) -> Volume:
        async with self._region(region, f"create_volume {app_name}/{name} in {region}"):
            return await self._create_volume(app_name, name=name, region=region, size_gb=size_gb,
                                             source_volume_id=source_volume_id, snapshot_id=snapshot_id,
                                             compute=compute)

    async def _create_volume(self, app_name: str, *, name: str, region: str, size_gb: int | None,
                             source_volume_id: str | None, snapshot_id: str | None,
                             compute: Guest | None) -> Volume:
        op = f"create_volume {app_name}/{name} in {region}"
        body: dict[str, Any] = {"name": name, "region": region}
        if size_gb is not None:
            body["size_gb"] = size_gb
        if source_volume_id:
            body["source_volume_id"] = source_volume_id
        if snapshot_id:
            body["snapshot_id"] = snapshot_id
        if self.snapshot_retention is not None:
            body["snapshot_retention"] = self.snapshot_retention
        if compute is not None:
            body["compute"] = compute.model_dump(mode="json", exclude_none=True)
        path = f"{self._app_path(app_name)}/volumes"
        # Fly's volume names are not unique: remember which volumes of this name existed before.
        existing = {v.id for v in await self._volumes_named(app_name, name, region)}

        async def create() -> Volume:
            return self._model(Volume, await self._send("POST", path, operation=op, body=body), op)

        async def lookup() -> Volume | None:
            for v in await self._volumes_named(app_name, name, region):
                if v.id not in existing:
                    return v
            return None

        return await self._create_resolving(create, lookup, operation=op)

    async def _volumes_named(self, app_name: str, name: str, region: str) -> list[Volume]:
        return [v for v in await self.list_volumes(app_name)
                if v.name == name and v.region == region and (v.state or "") not in _GONE_STATES]

    async def create_volume_with_fallback(self, app_name: str, *, regions: Sequence[str], name: str,
                                          size_gb: int | None = None, source_volume_id: str | None = None,
                                          snapshot_id: str | None = None,
                                          compute: Guest | None = None) -> Volume:
        """Create in the first region that has capacity; only a CapacityError moves on to the next region."""
        if not regions:
            raise InvalidRequestError("create_volume_with_fallback needs at least one region",
                                      operation=f"create_volume {app_name}/{name}")
        last: CapacityError | None = None
        if plant.ACTIVE and plant.on("region_walk_reversed"):
            regions = list(reversed(regions))
        for region in regions:
            try:
                return await self.create_volume(app_name, name=name, region=region, size_gb=size_gb,
                                                source_volume_id=source_volume_id, snapshot_id=snapshot_id,
                                                compute=compute)
            except CapacityError as exc:
                _log().warning("provider.capacity_fallback", app=app_name, volume=name, region=region,
                               message=exc.message)
                last = exc
        assert last is not None
        raise last

    async def get_volume(self, app_name: str, volume_id: str) -> Volume:
        op = f"get_volume {app_name}/{volume_id}"
        return self._model(Volume, await self._call("GET", self._volume_path(app_name, volume_id), operation=op,
                                                   volume_404_is_not_found=True), op)

    async def list_volumes(self, app_name: str) -> list[Volume]:
        op = f"list_volumes {app_name}"
        return self._models(Volume, await self._call("GET", f"{self._app_path(app_name)}/volumes", operation=op), op)

    async def delete_volume(self, app_name: str, volume_id: str, *, missing_ok: bool = True) -> None:
        op = f"delete_volume {app_name}/{volume_id}"
        try:
            await self._call("DELETE", self._volume_path(app_name, volume_id), operation=op,
                             volume_404_is_not_found=True)
        except NotFoundError:
            if not missing_ok:
                raise

    async def extend_volume(self, app_name: str, volume_id: str, size_gb: int) -> tuple[Volume, bool]:
        """Grow a volume to ``size_gb``: the volume and whether its machine needs a restart to see the space."""
        op = f"extend_volume {app_name}/{volume_id}"
        resp = await self._call("PUT", f"{self._volume_path(app_name, volume_id)}/extend", operation=op,
                                body={"size_gb": size_gb}, volume_404_is_not_found=True)
        data = self._json(resp, op)
        if not isinstance(data, dict) or not isinstance(data.get("volume"), dict):
            raise ProviderError(f"unexpected extend response: {resp.text[:200]!r}", status=resp.status_code,
                                body=resp.text, operation=op)
        try:
            volume = Volume.model_validate(data["volume"])
        except ValidationError as exc:
            raise ProviderError(f"unexpected volume in extend response: {exc.errors()[:3]}", operation=op) from exc
        return volume, bool(data.get("needs_restart"))

    async def list_snapshots(self, app_name: str, volume_id: str) -> list[VolumeSnapshot]:
        op = f"list_snapshots {app_name}/{volume_id}"
        resp = await self._call("GET", f"{self._volume_path(app_name, volume_id)}/snapshots", operation=op,
                                volume_404_is_not_found=True)
        return self._models(VolumeSnapshot, resp, op)

    async def create_snapshot(self, app_name: str, volume_id: str) -> VolumeSnapshot | None:
        """Take a snapshot now. Fly answers 200 without a body (None); the local host returns the snapshot."""
        op = f"create_snapshot {app_name}/{volume_id}"
        # Not retried on ambiguous failures: a duplicate snapshot is harmless but an unbounded pile is not;
        # only a 429 (surely not taken) is retried.
        async def once() -> httpx.Response:
            return await self._send("POST", f"{self._volume_path(app_name, volume_id)}/snapshots", operation=op,
                                    volume_404_is_not_found=True)

        resp = await self._retry(once, retry_on=(RateLimitedError,))
        data = self._optional_json(resp)
        if isinstance(data, dict) and data.get("id"):
            try:
                return VolumeSnapshot.model_validate(data)
            except ValidationError:
                return None
        return None

    # ------------------------------------------------------------------ traffic and local extras

    def proxy_target(self, app_name: str, machine_id: str) -> tuple[str, dict[str, str]]:
        headers = {"fly-force-instance-id": machine_id}
        if self.proxy_url is not None:
            if self.proxy_token:
                headers[PROXY_TOKEN_HEADER] = self.proxy_token
            return self.proxy_url, headers
        return self.fly_proxy_template.replace("{app}", app_name), headers

    async def watch_events(self, since: int, timeout: float) -> tuple[int, list[dict[str, Any]]]:
        """Local host only: long-poll machine state changes after sequence ``since``.

        Returns ``(latest seq, events)``; ``timeout`` is capped at 30 s. Real Fly has no such endpoint.
        """
        op = "watch_events"
        seconds = max(0.0, min(float(WATCH_MAX_SECONDS), float(timeout)))
        params = [("since", str(int(since))), ("timeout", _fmt_seconds(seconds))]
        resp = await self._call("GET", "/_local/watch", operation=op, params=params, timeout=seconds + self.timeout)
        data = self._json(resp, op)
        if not isinstance(data, dict) or not isinstance(data.get("events", []), list):
            raise ProviderError(f"unexpected watch response: {json.dumps(data)[:200]}", operation=op)
        try:
            seq = int(data.get("seq", since))
        except (TypeError, ValueError) as exc:
            raise ProviderError(f"unexpected watch seq: {data.get('seq')!r}", operation=op) from exc
        events = [e for e in data.get("events", []) if isinstance(e, dict)]
        return seq, events


def _fmt_seconds(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"
