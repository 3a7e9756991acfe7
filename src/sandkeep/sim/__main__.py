"""``python -m sandkeep.sim``: a campaign of seeds, or the replay of one.

    python -m sandkeep.sim --seeds 1000 [--first 1] [--small] [--jobs 2] [--summary FILE]   # a campaign
    python -m sandkeep.sim --seed 42 [--small]                      # replay one seed with its trace

Runs with ``PYTHONHASHSEED=0`` (re-executing itself if needed) so set iteration order, too, is the same on every
replay. ``SANDKEEP_SIM_PLANT=<bug>`` plants a test-only bug (:mod:`sandkeep.sim.plant`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sandkeep.sim.scenario import INVARIANTS, REPORT_ONLY, Result, run_seed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandkeep.sim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, help="replay this one seed, printing its trace")
    parser.add_argument("--seeds", type=int, default=100, help="campaign: how many seeds (default 100)")
    parser.add_argument("--first", type=int, default=1, help="campaign: the first seed (default 1)")
    parser.add_argument("--small", action="store_true", help="the CI profile (1-3 instances, short runs)")
    parser.add_argument("--steps", type=int, default=None, help="steps per seed (default: chosen by the seed)")
    parser.add_argument("--progress", action="store_true", help="campaign: one line per seed")
    parser.add_argument("--jobs", type=int, default=1, help="campaign: worker processes (default 1)")
    parser.add_argument("--summary", metavar="FILE", help="campaign: write the summary as JSON to FILE")
    args = parser.parse_args(argv)
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, "-m", "sandkeep.sim", *(argv if argv is not None else sys.argv[1:])])
    if args.seed is not None:
        result = run_seed(args.seed, steps=args.steps, trace=True, small=args.small)
        print("--- the engine's events, per instance ---")
        for line in result.trace:
            if line.startswith("  event "):
                print(line)
        print(f"seed {args.seed}: {'ok' if result.ok else 'FAILED'}; {result.sim_seconds:.0f} simulated s in "
              f"{result.wall_seconds:.1f} wall s; {result.steps} steps, {result.instances} instances")
        for name, detail in result.violations:
            print(f"  violation {name} ({INVARIANTS.get(name, '')}): {detail}")
        for name, detail in result.reported:
            print(f"  reported (not failing: {REPORT_ONLY[name]}) {name}: {detail}")
        return 0 if result.ok else 1
    return campaign(range(args.first, args.first + args.seeds), steps=args.steps, small=args.small,
                    jobs=max(1, args.jobs), progress=args.progress, summary=args.summary)


def _run_quiet(seed: int, steps: int | None, small: bool) -> Result:
    """One seed in a worker process; the trace stays behind (a failing seed is replayed for it)."""
    result = run_seed(seed, steps=steps, small=small)
    result.trace = []
    return result


def _results(seeds: range, steps: int | None, small: bool, jobs: int) -> Iterator[Result]:
    """Every seed's result, in seed order, from ``jobs`` worker processes (each seed is deterministic on its
    own: which worker runs it, and after which seeds, changes nothing)."""
    if jobs <= 1 or len(seeds) <= 1:
        for seed in seeds:
            yield _run_quiet(seed, steps, small)
        return
    ctx = multiprocessing.get_context("fork" if sys.platform != "win32" else "spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        yield from pool.map(_run_quiet, seeds, itertools.repeat(steps), itertools.repeat(small), chunksize=1)


def campaign(seeds: range, *, steps: int | None = None, small: bool = False, jobs: int = 1,
             progress: bool = False, summary: str | None = None) -> int:
    """Run ``seeds``, print failures (with their replay command) and the summary line; 1 if any failed."""
    started = time.perf_counter()
    sim = cpu = 0.0
    failed: list[int] = []
    failures: list[dict[str, Any]] = []
    reported: dict[str, int] = {}
    per_seed: list[float] = []
    replay_flag = " SMALL=1" if small else ""
    for result in _results(seeds, steps, small, jobs):
        sim += result.sim_seconds
        cpu += result.cpu_seconds
        per_seed.append(result.cpu_seconds)
        if progress:
            print(f"seed {result.seed} {'ok' if result.ok else 'FAILED'} sim={result.sim_seconds:.0f} "
                  f"wall={result.wall_seconds:.1f} cpu={result.cpu_seconds:.2f} instances={result.instances} "
                  f"steps={result.steps} reported={sorted({n for n, _ in result.reported})}", flush=True)
        for name, _ in result.reported:
            reported[name] = reported.get(name, 0) + 1
        if not result.ok:
            failed.append(result.seed)
            names = sorted({n for n, _ in result.violations})
            replay = f"make sim SEED={result.seed}{replay_flag}"
            failures.append({"seed": result.seed, "invariants": names, "detail": result.violations[0][1][:300],
                             "replay": replay})
            print(f"seed {result.seed} FAILED: {', '.join(names)}: {result.violations[0][1][:300]}", flush=True)
            print(f"  replay: {replay}", flush=True)
    wall = time.perf_counter() - started
    per_seed.sort()
    out = {"seeds": len(seeds), "first": seeds.start, "last": seeds.stop - 1, "small": small, "jobs": jobs,
           "failed": len(failed), "failures": failures, "simulated_hours": round(sim / 3600, 2),
           "wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
           "speedup": round(sim / max(wall, 1e-9)), "speedup_per_cpu": round(sim / max(cpu, 1e-9)),
           "median_cpu_per_seed": round(per_seed[len(per_seed) // 2], 3) if per_seed else 0.0,
           "reported": reported}
    print(f"summary: {out['seeds']} seeds ({seeds.start}..{seeds.stop - 1}{' small' if small else ''}, "
          f"{jobs} job(s)): {len(failed)} failed; {out['simulated_hours']} simulated hours in {wall:.0f} wall s "
          f"({out['speedup']} simulated s per wall s; {cpu:.0f} CPU s, {out['speedup_per_cpu']} simulated s per "
          f"CPU s, median {out['median_cpu_per_seed']} CPU s per seed)")
    for name, count in sorted(reported.items()):
        print(f"reported, not failing ({REPORT_ONLY[name]}): {name} in {count} seed(s)")
    if failed:
        print("failing seeds: " + " ".join(str(s) for s in failed))
        for f in failures:
            print(f"  {f['replay']}")
    if summary:
        Path(summary).write_text(json.dumps(out, indent=2) + "\n")
    return 1 if failed else 0

if __name__ == "__main__":
    raise SystemExit(main())
