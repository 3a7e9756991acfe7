"""The virtual-time loop the simulation runs on: time moves only when every task waits, in deadline order."""

from __future__ import annotations

import asyncio

import pytest

from sandkeep.provider.deadline import bounded, deadline
from sandkeep.provider.errors import DeadlineExceededError
from sandkeep.sim.loop import EPOCH, Deadlock, SimClock, VirtualLoop, run_virtual


def test_sleepers_wake_in_deadline_order_and_days_pass_at_once() -> None:
    woke: list[tuple[str, float]] = []

    async def main(loop: VirtualLoop) -> float:
        clock = SimClock(loop)

        async def sleeper(name: str, seconds: float) -> None:
            await clock.sleep(seconds)
            woke.append((name, clock.monotonic()))

        await asyncio.gather(sleeper("week", 7 * 86400.0), sleeper("second", 1.0), sleeper("minute", 60.0))
        return (clock.now() - EPOCH).total_seconds()

    elapsed = run_virtual(main)
    assert [name for name, _ in woke] == ["second", "minute", "week"]
    assert [at for _, at in woke] == pytest.approx([1.0, 60.0, 7 * 86400.0])
    assert elapsed == pytest.approx(7 * 86400.0)


def test_time_does_not_move_while_a_task_can_run_and_timeouts_are_virtual() -> None:
    async def main(loop: VirtualLoop) -> tuple[float, float, bool]:
        for _ in range(1000):
            await asyncio.sleep(0)
        busy = loop.time()
        timed_out = False
        try:
            await asyncio.wait_for(asyncio.Event().wait(), timeout=30.0)
        except TimeoutError:
            timed_out = True
        await asyncio.to_thread(sum, [1, 2])  # runs inline: no real thread decides an order
        return busy, loop.time(), timed_out

    busy, after, timed_out = run_virtual(main)
    assert busy == 0.0 and timed_out and after == pytest.approx(30.0)


def test_a_world_that_can_never_move_again_is_a_deadlock() -> None:
    async def main(loop: VirtualLoop) -> None:
        await asyncio.Event().wait()

    with pytest.raises(Deadlock):
        run_virtual(main)


def test_a_clock_jump_moves_wall_time_only() -> None:
    async def main(loop: VirtualLoop) -> tuple[float, float]:
        clock = SimClock(loop)
        clock.jump(120.0)
        return clock.monotonic(), (clock.now() - EPOCH).total_seconds()

    assert run_virtual(main) == (0.0, 120.0)


def test_an_ntp_step_back_moves_wall_time_back_and_monotonic_time_never() -> None:
    async def main(loop: VirtualLoop) -> tuple[float, float, float]:
        clock = SimClock(loop)
        await clock.sleep(10.0)
        clock.jump(-30.0)
        before = clock.monotonic()
        await clock.sleep(5.0)
        return before, clock.monotonic(), (clock.now() - EPOCH).total_seconds()

    assert run_virtual(main) == (10.0, 15.0, -15.0)


def test_the_simulation_clock_bounds_a_provider_call_like_the_system_clock() -> None:
    """A provider call under a deadline (a lease's end, a recovery's timeout) is abandoned there on the virtual
    clock too: the campaign must see what production does (seed 1420)."""
    finished: list[bool] = []

    async def main(loop: VirtualLoop) -> float:
        clock = SimClock(loop)
        start = clock.monotonic()

        async def slow_read() -> str:
            await clock.sleep(90.0)
            finished.append(True)
            return "late"

        with deadline(clock, start + 9.0), pytest.raises(DeadlineExceededError):
            await bounded(slow_read(), operation="get_volume")
        return clock.monotonic() - start

    assert run_virtual(main) == pytest.approx(9.0)
    assert not finished
