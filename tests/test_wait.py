from __future__ import annotations

import pytest

from tests.support.wait import WaitTimeout, async_wait_until


class Fatal(Exception):
    pass


async def test_errors_keep_polling_until_a_value() -> None:
    calls = 0

    async def flaky() -> int:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise RuntimeError("not yet")
        return calls

    assert await async_wait_until(flaky, timeout=10, interval=0) == 3


async def test_fatal_errors_end_the_wait_at_once() -> None:
    calls = 0

    async def broken() -> int:
        nonlocal calls
        calls += 1
        raise Fatal("stop")

    with pytest.raises(Fatal):
        await async_wait_until(broken, timeout=10, interval=0, fatal=(Fatal,))
    assert calls == 1


async def test_timeout_reports_the_last_error() -> None:
    async def never() -> int:
        raise RuntimeError("still down")

    with pytest.raises(WaitTimeout, match="still down"):
        await async_wait_until(never, timeout=0, interval=0, message="never")
