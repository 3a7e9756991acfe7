"""Shared pieces of the benchmarks: samples and their statistics, sections of the report, deadlines."""

from __future__ import annotations

import hashlib
import math
import os
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

# Every HTTP request the benchmarks make goes to one of these hosts.
LOOPBACK = "127.0.0.1"


class BenchError(RuntimeError):
    """A benchmark could not complete (a process died, a deadline passed, data did not survive)."""


@dataclass
class Timing:
    """Samples of one measured operation, in seconds."""

    name: str
    samples: list[float] = field(default_factory=list)
    note: str = ""

    def add(self, seconds: float) -> None:
        self.samples.append(seconds)

    def stats(self) -> dict[str, float | int]:
        return summarize(self.samples)


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (``pct`` in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return ordered[rank - 1]


def summarize(samples: list[float]) -> dict[str, float | int]:
    if not samples:
        return {"n": 0}
    return {"n": len(samples), "median": statistics.median(samples), "p90": percentile(samples, 90),
            "max": max(samples), "min": min(samples)}


@dataclass
class Section:
    """One benchmark's results: timing rows, single figures ("facts") and notes."""

    name: str
    title: str
    description: str
    timings: dict[str, Timing] = field(default_factory=dict)
    facts: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None
    failed: str | None = None
    elapsed: float = 0.0

    def timing(self, name: str, note: str = "") -> Timing:
        if name not in self.timings:
            self.timings[name] = Timing(name=name, note=note)
        return self.timings[name]

    def fact(self, label: str, value: str) -> None:
        self.facts.append((label, value))

    @contextmanager
    def measure(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.timing(name).add(time.perf_counter() - start)

    @asynccontextmanager
    async def ameasure(self, name: str) -> AsyncIterator[None]:
        start = time.perf_counter()
        yield
        self.timing(name).add(time.perf_counter() - start)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "title": self.title, "description": self.description,
                "skipped": self.skipped, "failed": self.failed, "elapsed_s": round(self.elapsed, 3),
                "timings": [{"operation": t.name, "note": t.note, "unit": "s",
                             **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in t.stats().items()},
                             "samples": [round(s, 6) for s in t.samples]} for t in self.timings.values()],
                "facts": [{"label": label, "value": value} for label, value in self.facts],
                "notes": list(self.notes)}


def section_from_json(data: dict[str, Any]) -> Section:
    """Rebuild a section written by :meth:`Section.to_json` (to keep earlier results when using ``--only``)."""
    section = Section(name=str(data["name"]), title=str(data["title"]), description=str(data["description"]),
                      skipped=data.get("skipped"), failed=data.get("failed"), elapsed=float(data.get("elapsed_s", 0)))
    for row in data.get("timings", []):
        section.timings[row["operation"]] = Timing(name=row["operation"], samples=[float(x) for x in row["samples"]],
                                                   note=row.get("note", ""))
    section.facts = [(f["label"], f["value"]) for f in data.get("facts", [])]
    section.notes = list(data.get("notes", []))
    return section


class Deadline:
    """A time budget; ``check()`` raises once it is spent so no loop can run unbounded."""

    def __init__(self, seconds: float, what: str) -> None:
        self.what = what
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def check(self) -> None:
        if time.monotonic() > self.end:
            raise BenchError(f"{self.what}: time budget of {self.seconds:.0f}s spent")


async def poll_until(predicate: Callable[[], Awaitable[T | None]], *, timeout: float, interval: float,
                     what: str) -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns something truthy; bounded by ``timeout``."""
    from tests.support.wait import WaitTimeout, async_wait_until

    try:
        value = await async_wait_until(predicate, timeout=timeout, interval=interval, message=what,
                                       fatal=(BenchError,))
    except WaitTimeout as exc:
        raise BenchError(str(exc)) from exc
    assert value is not None  # async_wait_until returns only a truthy value
    return value


def payload(size: int, seed: int = 0) -> bytes:
    """Deterministic incompressible-looking bytes of ``size`` (random, seeded, so reruns write the same)."""
    import random

    return random.Random(seed).randbytes(size)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def mib(n: int) -> int:
    return n * 1024 * 1024


def fmt_seconds(value: float) -> str:
    """Milliseconds below 10 s, seconds above."""
    if value < 10:
        return f"{value * 1000:.1f} ms"
    return f"{value:.2f} s"


def cpu_count() -> int:
    return os.cpu_count() or 1
