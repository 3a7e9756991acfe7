"""On SIGTERM the host answers its long polls at once instead of holding shutdown up for their timeout."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from sandkeep.clock import SystemClock
from sandkeep.host.core import Host, HostError, HostOptions


async def test_begin_shutdown_answers_pending_watch_and_wait(tmp_path: Path) -> None:
    host = Host(HostOptions(data_dir=tmp_path, regions=["r1"]), SystemClock())
    host.load()
    try:
        host.create_app({"app_name": "shut", "org_slug": "personal"})
        m, _ = await host.create_machine("shut", {"config": {"image": "sandkeep/gateway"}, "skip_launch": True})
        seq = host.seq
        watch = asyncio.ensure_future(host.watch(seq, 30.0))
        wait = asyncio.ensure_future(host.wait_machine("shut", m["id"], state="started", timeout=30.0))
        await asyncio.sleep(0)  # let both reach their long poll
        assert not watch.done() and not wait.done()
        host.begin_shutdown()
        # deadlines far below the 30 s polls: without begin_shutdown both would still be waiting
        answer = await asyncio.wait_for(watch, timeout=5)
        assert answer == {"seq": seq, "events": []}
        with pytest.raises(HostError) as exc:
            await asyncio.wait_for(wait, timeout=5)
        assert exc.value.status == 503
    finally:
        await host.shutdown()
