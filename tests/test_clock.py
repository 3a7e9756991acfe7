from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from sandkeep.clock import FakeClock, SystemClock, utc_iso


async def test_fake_clock_moves_only_when_told() -> None:
    clock = FakeClock(datetime(2026, 3, 1, tzinfo=UTC))
    assert clock.now() == datetime(2026, 3, 1, tzinfo=UTC)
    before = clock.monotonic()
    clock.advance(days=7, seconds=1)
    assert clock.now() == datetime(2026, 3, 8, 0, 0, 1, tzinfo=UTC)
    assert clock.monotonic() - before == pytest.approx(timedelta(days=7, seconds=1).total_seconds())
    await clock.sleep(600)
    assert clock.now() == datetime(2026, 3, 8, 0, 10, 1, tzinfo=UTC)


def test_fake_clock_set_requires_aware_datetime() -> None:
    clock = FakeClock()
    with pytest.raises(ValueError):
        clock.set(datetime(2026, 1, 2))
    clock.set(datetime(2026, 1, 2, tzinfo=UTC))
    assert clock.now().day == 2


def test_system_clock_is_utc() -> None:
    assert SystemClock().now().tzinfo is UTC


def test_utc_iso() -> None:
    assert utc_iso(None) is None
    assert utc_iso(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)) == "2026-01-02T03:04:05Z"
    assert utc_iso(datetime(2026, 1, 2, 3, 4, 5)) == "2026-01-02T03:04:05Z"
