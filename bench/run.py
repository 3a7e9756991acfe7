"""``python -m bench.run [--only NAME ...] [--quick]``: run sandkeep's benchmarks and write the results.

Benchmarks (``--only`` takes these names, repeatable or comma-separated):

* ``host`` — local host lifecycle through ``MachinesClient`` (create volume, boot, stop, start, fork
  1 MiB / 20 MiB across regions, snapshot, destroy), default profile.
* ``host-realistic`` — the same against ``sandkeep host --profile realistic`` (Fly-like delays).
* ``gateway`` — PUT/GET /data through the host's proxy: latency and requests/s.
* ``recovery`` — ``sandkeep serve``: fresh provision time, crash -> recovering (detection latency),
  crash -> running (time to running), data intact afterwards.
* ``recovery-realistic`` — the same with serve using a ``--profile realistic`` host.

Results go to ``bench/results.md`` and ``bench/results.json`` (``--out DIR`` to write elsewhere).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import gateway, host_ops, recovery
from bench.common import Section, cpu_count, section_from_json
from bench.report import write

BENCH_DIR = Path(__file__).resolve().parent


def _sections(quick: bool) -> list[tuple[Section, Callable[[Section], None]]]:
    q = quick
    host_cfg = host_ops.HostOpsConfig(reps=3 if q else 10, fork_reps=2 if q else 6, fork_sizes_mib=(1, 20),
                                      profile="none", budget=60 if q else 120)
    real_cfg = host_ops.HostOpsConfig(reps=1 if q else 3, fork_reps=1 if q else 3,
                                      fork_sizes_mib=(1,) if q else (1, 20),
                                      profile="realistic", budget=60 if q else 150)
    gw_cfg = gateway.GatewayConfig(requests=50 if q else 500, concurrent_requests=100 if q else 1000,
                                   concurrency=8, body_bytes=1024, large_reps=3 if q else 10, budget=60 if q else 150)
    rec_cfg = recovery.RecoveryConfig(instances=2 if q else 5, data_mib=1, profile="none", concurrent_round=not q,
                                      budget=90 if q else 150, api_route_requests=50 if q else 200)
    rec_real_cfg = recovery.RecoveryConfig(instances=1 if q else 3, data_mib=1, profile="realistic",
                                           concurrent_round=False, budget=90 if q else 150)
    return [
        (Section("host", "1. Local host lifecycle (MachinesClient, default profile)", _HOST_DESC),
         lambda s: host_ops.run(host_cfg, s)),
        (Section("host-realistic", "1b. Local host lifecycle with `--profile realistic`", _HOST_REAL_DESC),
         lambda s: host_ops.run(real_cfg, s)),
        (Section("gateway", "2. Gateway traffic through the host proxy", _GW_DESC),
         lambda s: gateway.run(gw_cfg, s)),
        (Section("recovery", "3. Recovery with `sandkeep serve` (headline figures)", recovery.DESCRIPTION),
         lambda s: recovery.run(rec_cfg, s)),
        (Section("recovery-realistic", "3b. Recovery with `sandkeep serve` on a `--profile realistic` host",
                 recovery.DESCRIPTION_REALISTIC),
         lambda s: recovery.run(rec_real_cfg, s)),
    ]


_HOST_DESC = ("`sandkeep host` (no added delays) driven by `sandkeep.provider.client.MachinesClient`, the engine's "
              "client. Figures include the client's idempotency look-ups (a named create lists first). "
              "Forks copy a volume written through the gateway in lcl-a into lcl-b; the last fork of each size is "
              "booted and read back.")
_HOST_REAL_DESC = ("Same cycle against `sandkeep host --profile realistic`, which adds Fly-like delays "
                   "(see `sandkeep.host.faults.REALISTIC_PROFILE`: 50 ms per API call, machine create 0.5 s, "
                   "first boot 1.5 s, boot of an existing machine 0.4 s, stop 0.3 s, volume create 1 s, "
                   "fork 3 s, snapshot 0.5 s). The difference to section 1 is what the profile adds.")
_GW_DESC = ("HTTP to the host's proxy with `fly-force-instance-id`, forwarded to the machine's gateway "
            "(`PUT /data/{key}` writes + fsyncs into the volume, `GET` reads it back). Keep-alive clients. "
            "Baseline row: the same `sandkeep gateway` program started directly and hit on its own port.")


def _meta(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m bench.run" + (" " + " ".join(argv) if argv else ""),
        "machine": platform.node() or "?",
        "cpus": f"{cpu_count()} (nproc)",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(terse=True),
        "mode": "quick" if args.quick else "full",
        "load average at start": " / ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1/5/15 min; other work on "
                                 "the machine skews the figures)",
    }


def _skip_quick(section: Section) -> None:
    section.skipped = "not run with --quick (about 25 s on its own); run `python -m bench.run --only " \
                      "recovery-realistic` or a full run"


def _merge(path: Path, fresh: list[Section], order: list[str], meta: dict[str, Any]) -> tuple[list[Section],
                                                                                             dict[str, Any]]:
    """With ``--only``: keep the other sections of an earlier results.json, replace the ones just run."""
    try:
        old = json.loads(path.read_text())
        kept = {d["name"]: section_from_json(d) for d in old.get("sections", [])}
    except (OSError, ValueError, KeyError, TypeError):
        return fresh, meta
    kept.update({s.name: s for s in fresh})
    merged = dict(meta)
    merged["command"] = f"{meta['command']} (other sections kept from: {old.get('meta', {}).get('command', '?')}, "\
                        f"{old.get('meta', {}).get('date', '?')})"
    return [kept[n] for n in order if n in kept], merged


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", default=[],
                        help="run only these benchmarks (repeatable or comma-separated)")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (about a minute)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR, help="directory for results.md/results.json")
    args = parser.parse_args(argv)
    sections = _sections(args.quick)
    names = [s.name for s, _ in sections]
    only = {n.strip() for item in args.only for n in item.split(",") if n.strip()}
    unknown = only - set(names)
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(sorted(unknown))}; choose from {', '.join(names)}")
    chosen = [(s, fn) for s, fn in sections if not only or s.name in only]
    if args.quick and not only:
        # keep --quick near a minute: the realistic recovery (about 25 s on its own) runs only when asked for
        chosen = [(s, _skip_quick if s.name == "recovery-realistic" else fn) for s, fn in chosen]
    meta = _meta(args, argv)
    started = time.perf_counter()
    failures = 0
    for section, fn in chosen:
        print(f"== {section.name}: {section.title}", flush=True)
        t0 = time.perf_counter()
        try:
            fn(section)
        except Exception as exc:
            failures += 1
            section.failed = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        section.elapsed = time.perf_counter() - t0
        status = "skipped" if section.skipped else ("FAILED" if section.failed else "ok")
        print(f"   {status} in {section.elapsed:.1f}s" + (f" ({section.skipped})" if section.skipped else ""),
              flush=True)
        for t in section.timings.values():
            st = t.stats()
            print(f"   {t.name}: n={st['n']} median={st['median'] * 1000:.1f}ms p90={st['p90'] * 1000:.1f}ms "
                  f"max={st['max'] * 1000:.1f}ms", flush=True)
        for label, value in section.facts:
            print(f"   {label}: {value}", flush=True)
    meta["total"] = f"{time.perf_counter() - started:.1f} s"
    out_sections = [s for s, _ in chosen]
    if only:
        out_sections, meta = _merge(args.out / "results.json", out_sections, [s.name for s, _ in sections], meta)
    md, js = write(args.out, meta, out_sections)
    print(f"wrote {md} and {js}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
