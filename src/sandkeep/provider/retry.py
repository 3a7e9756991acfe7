"""Bounded, jittered exponential backoff for provider calls (tenacity, sleeping on the injected clock).

Only :class:`~sandkeep.provider.errors.TransientError` and
:class:`~sandkeep.provider.errors.RateLimitedError` are retried by default. A 429 waits at least its
``Retry-After``; a ``Retry-After`` longer than ``max_retry_after`` is not waited for inside the call
(the error goes to the caller, who can reschedule instead of blocking a worker).
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt
from tenacity.wait import wait_base

from sandkeep.provider.errors import ProviderError, RateLimitedError, TransientError

T = TypeVar("T")

RETRYABLE: tuple[type[ProviderError], ...] = (TransientError, RateLimitedError)


@dataclass
class RetryPolicy:
    """How often and how long to retry. ``max_attempts`` counts the first try."""

    max_attempts: int = 5
    backoff_base: float = 0.2
    backoff_max: float = 5.0
    max_retry_after: float = 60.0
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.backoff_base < 0 or self.backoff_max < 0 or self.max_retry_after < 0:
            raise ValueError("backoff_base, backoff_max and max_retry_after must not be negative")

    def backoff(self, attempt: int) -> float:
        """Sleep after failed attempt number ``attempt`` (1-based): "equal jitter" over a capped exponential.

        The result lies in ``[cap/2, cap]`` with ``cap = min(backoff_max, backoff_base * 2**(attempt-1))``.
        """
        cap = min(self.backoff_max, self.backoff_base * 2.0 ** max(0, attempt - 1))
        return float(cap / 2 + self.rng.uniform(0, cap / 2))

    def delay(self, exc: BaseException | None, attempt: int) -> float:
        """The sleep before the next attempt; never shorter than a 429's ``Retry-After``."""
        wait = self.backoff(attempt)
        if isinstance(exc, RateLimitedError) and exc.retry_after is not None:
            wait = max(wait, exc.retry_after)
        return wait

    def retryable(self, exc: BaseException, retry_on: tuple[type[BaseException], ...] = RETRYABLE) -> bool:
        if not isinstance(exc, retry_on):
            return False
        return not (isinstance(exc, RateLimitedError) and exc.retry_after is not None
                    and exc.retry_after > self.max_retry_after)


class _PolicyWait(wait_base):
    def __init__(self, policy: RetryPolicy, limit: Callable[[], float | None] | None = None) -> None:
        self.policy = policy
        self.limit = limit

    def __call__(self, retry_state: RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        wait = self.policy.delay(exc, retry_state.attempt_number)
        left = self.limit() if self.limit is not None else None
        return wait if left is None else max(0.0, min(wait, left))


def affordable(exc: BaseException, limit: Callable[[], float | None] | None) -> bool:
    """False for a 429 whose ``Retry-After`` is not shorter than the time ``limit`` says is left."""
    if limit is None or not isinstance(exc, RateLimitedError) or exc.retry_after is None:
        return True
    left = limit()
    return left is None or exc.retry_after < left


RetryHook = Callable[[RetryCallState], Awaitable[None] | None]


async def call_with_retry(fn: Callable[[], Awaitable[T]], *, policy: RetryPolicy,
                          sleep: Callable[[float], Awaitable[None]],
                          retry_on: tuple[type[BaseException], ...] = RETRYABLE,
                          before_sleep: RetryHook | None = None,
                          limit: Callable[[], float | None] | None = None) -> T:
    """Run ``fn`` until it succeeds, raises a non-retryable error, or ``max_attempts`` are used up.

    The last error is re-raised unchanged. Sleeps go through ``sleep`` (the injected clock's). ``limit``
    returns the seconds left before the caller's deadline (None: no deadline): no backoff sleep is longer than
    that (:mod:`sandkeep.provider.deadline` abandons the call there), and a 429 whose ``Retry-After`` the
    caller cannot afford (not less than what is left) is not waited for at all: the RateLimitedError goes to the
    caller at once, who backs off and lets go (a pass must not sleep out its lease inside one call).
    """
    kwargs: dict[str, Any] = {}
    if before_sleep is not None:
        kwargs["before_sleep"] = before_sleep
    retrying = AsyncRetrying(
        stop=stop_after_attempt(policy.max_attempts),
        wait=_PolicyWait(policy, limit),
        retry=retry_if_exception(lambda exc: policy.retryable(exc, retry_on) and affordable(exc, limit)),
        sleep=sleep,
        reraise=True,
        **kwargs,
    )

    async def run() -> T:  # a real coroutine function, whatever kind of callable ``fn`` is
        return await fn()

    result: T = await retrying(run)
    return result
