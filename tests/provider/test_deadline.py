"""provider/deadline.py: calls made under a deadline end by it, on the clock the deadline was set on."""

from __future__ import annotations

import pytest

from sandkeep.clock import FakeClock
from sandkeep.provider.deadline import bounded, deadline, remaining
from sandkeep.provider.errors import DeadlineExceededError, RateLimitedError, TransientError
from sandkeep.provider.retry import RetryPolicy, call_with_retry
from tests.support.vclock import VirtualClock


async def test_a_call_slower_than_the_deadline_is_abandoned_at_the_deadline() -> None:
    clock = VirtualClock()
    start = clock.monotonic()
    finished: list[bool] = []

    async def slow() -> str:
        await clock.sleep(12.0)
        finished.append(True)
        return "late"

    with deadline(clock, start + 6.0), pytest.raises(DeadlineExceededError):
        await bounded(slow(), operation="create_machine")
    assert clock.monotonic() - start == 6.0 and not finished
    with deadline(clock, clock.monotonic() + 20.0):
        assert await bounded(slow()) == "late"  # in time: the answer


async def test_nested_deadlines_keep_the_one_with_less_left_and_none_means_unbounded() -> None:
    clock = FakeClock()
    now = clock.monotonic()
    assert remaining() is None
    with deadline(clock, now + 10.0):
        with deadline(clock, now + 30.0):
            assert remaining() == 10.0
        with deadline(clock, now + 4.0):
            assert remaining() == 4.0
        with deadline(clock, None):
            assert remaining() == 10.0
    assert remaining() is None


async def test_the_retry_loop_never_sleeps_past_what_is_left() -> None:
    clock = FakeClock()
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        await clock.sleep(seconds)

    async def busy() -> None:
        raise TransientError("busy")

    left = iter([0.05, 0.01, 0.0, 0.0])
    with pytest.raises(TransientError):
        await call_with_retry(busy, policy=RetryPolicy(max_attempts=4, backoff_base=1.0), sleep=sleep,
                              limit=lambda: next(left))
    assert slept == [0.05, 0.01, 0.0]  # the policy's backoff (0.5 s and more), capped by the time left each time


async def test_a_retry_after_the_caller_cannot_afford_ends_the_call_at_once() -> None:
    """Simulation seed 41: a 30 s Retry-After slept out inside one call by a pass holding a 10 s lease."""
    slept: list[float] = []
    attempts: list[int] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    async def refused() -> None:
        attempts.append(1)
        raise RateLimitedError("slow down", retry_after=30.0)

    with pytest.raises(RateLimitedError) as info:
        await call_with_retry(refused, policy=RetryPolicy(max_attempts=4), sleep=sleep, limit=lambda: 9.0)
    assert info.value.retry_after == 30.0  # the caller backs off by it
    assert (len(attempts), slept) == (1, [])

    attempts.clear()
    with pytest.raises(RateLimitedError):  # one it can afford is waited for, as before
        await call_with_retry(refused, policy=RetryPolicy(max_attempts=3), sleep=sleep, limit=lambda: 31.0)
    assert (len(attempts), slept) == (3, [30.0, 30.0])

    attempts.clear()
    slept.clear()
    with pytest.raises(RateLimitedError):  # no deadline: waited for (up to the policy's max_retry_after)
        await call_with_retry(refused, policy=RetryPolicy(max_attempts=2), sleep=sleep)
    assert (len(attempts), slept) == (2, [30.0])


    async def flaky() -> None:
        raise TransientError("boom")

    with pytest.raises(TransientError):  # without a limit: the policy's own backoff
        await call_with_retry(flaky, policy=RetryPolicy(max_attempts=2, backoff_base=0.0), sleep=sleep)
