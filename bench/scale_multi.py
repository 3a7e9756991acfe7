"""Alarm lag with several engine processes on one PostgreSQL database:
``python -m bench.scale_multi [--n N] [--processes K] [--seconds S]``.

The parent creates a fresh PostgreSQL database, inserts N running instances (``ANALYZE``d, as autovacuum would)
with their alarms spread over one 30 s interval starting a few seconds ahead, and starts K engine processes
(``--child``) on it. Each child runs the real Engine with default settings against the stub provider of
``bench/scale.py`` (every read answers at once: the engine and the database are measured, not a provider) until
the common end time, and prints every alarm's lag (claim time - alarm_at) and its own CPU time. The parent merges
them: alarm lag p50/p99/max over every claim of every process, reconciles/s, the engines' CPU (sum over the
processes, as a fraction of one core, and per reconcile). Prints one JSON line.

Engines share the fleet through ``SELECT ... FOR UPDATE SKIP LOCKED`` claims; the database server's own CPU is
not included (it runs on the same 2 cores here).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from bench.scale import LagRecorder, StubProber, StubProvider, _bulk_insert, _pg_url, _records, _set_alarms
from sandkeep import metrics
from sandkeep.clock import SystemClock
from sandkeep.config import Settings
from sandkeep.engine.runtime import Engine
from sandkeep.secrets import SecretBox
from sandkeep.store.sql import open_store

WARMUP = 2.0
"""Seconds between the alarms' set-up (every engine process already started) and the first alarm."""
SPREAD = 30.0


async def child(url: str) -> dict[str, Any]:
    """One engine process: started, it says ``ready`` and reads the first alarm's and the end's wall-clock
    times (one line, ``start_at until``) from the parent."""
    clock = SystemClock()
    store = open_store(url, clock)
    lag = LagRecorder()
    metrics.ALARM_LAG = lag  # type: ignore[assignment]
    tmp = tempfile.mkdtemp(prefix="skbench-multi-")
    settings = Settings(home=tmp, secrets_key=SecretBox.generate_key(), regions="lcl-a", detect_poll_interval=0.0)
    engine = Engine(settings, store, StubProvider(), clock, prober=StubProber())  # type: ignore[arg-type]
    passes = metrics.RECONCILE_PASSES.labels(status="running")
    await engine.start()
    print("ready", flush=True)
    line = await asyncio.to_thread(sys.stdin.readline)
    start_at, until = (float(x) for x in line.split())
    # measure from the first alarm on (start-up CPU excluded) to the common end
    await asyncio.sleep(max(0.0, start_at - time.time()))
    base = passes._value.get()
    cpu0 = time.process_time()
    await asyncio.sleep(max(0.0, until - time.time()))
    done = passes._value.get() - base
    cpu = time.process_time() - cpu0
    await engine.stop()
    store.close()
    return {"reconciles": int(done), "cpu_s": round(cpu, 3), "lags": [round(v, 3) for v in lag.values]}


def _pct(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


def parent(n: int, processes: int, seconds: float) -> dict[str, Any]:
    url, drop = _pg_url()
    try:
        clock = SystemClock()
        store = open_store(url, clock)
        # every alarm far ahead while the engines start; then spread over one interval from start_at
        _bulk_insert(store, _records(n, clock.now() + timedelta(hours=1), 0.0))
        with store.engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE instances")
        store.close()
        env = dict(os.environ)
        kids = [subprocess.Popen([sys.executable, "-m", "bench.scale_multi", "--child", "--url", url],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                 env=env) for _ in range(processes)]
        for kid in kids:  # every engine is up (imports done, registered) before the first alarm
            assert kid.stdout is not None
            while (line := kid.stdout.readline()) and line.strip() != "ready":
                pass  # the engine's own log lines
            if not line:
                raise RuntimeError("an engine process did not start")
        store = open_store(url, clock)
        start_at = time.time() + WARMUP + n / 20000  # the alarms' UPDATE itself takes ~1 s per 20 k rows
        _set_alarms(store, n, datetime.fromtimestamp(start_at, UTC), SPREAD)
        store.close()
        until = start_at + seconds
        for kid in kids:
            assert kid.stdin is not None
            kid.stdin.write(f"{start_at!r} {until!r}\n")
            kid.stdin.flush()
        rows = []
        for kid in kids:
            out, _ = kid.communicate(timeout=seconds + WARMUP + 600)
            rows.extend(json.loads(line) for line in out.splitlines() if line.startswith("{"))
        if len(rows) != processes:
            raise RuntimeError(f"{processes - len(rows)} engine process(es) printed nothing")
        lags = sorted(v for r in rows for v in r["lags"])
        done = sum(r["reconciles"] for r in rows)
        cpu = sum(r["cpu_s"] for r in rows)
        return {"db": "postgres", "n": n, "processes": processes, "seconds": seconds, "reconciles": done,
                "reconciles_per_s": round(done / seconds, 1), "demand_per_s": round(n / SPREAD, 1),
                "alarm_lag_p50": _pct(lags, 0.5), "alarm_lag_p99": _pct(lags, 0.99), "alarm_lag_max": _pct(lags, 1.0),
                "claims": len(lags), "engines_cpu_fraction": round(cpu / seconds, 3),
                "cpu_ms_per_reconcile": round(1000 * cpu / max(1, done), 3),
                "per_process_reconciles": [r["reconciles"] for r in rows]}
    finally:
        drop()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(asyncio.run(child(a.url))))
    else:
        print(json.dumps(parent(a.n, a.processes, a.seconds)))
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
