"""``python -m sandkeep.sim``: a campaign of seeds, or the replay of one.

    python -m sandkeep.sim --seeds 1000 [--first 1] [--small]     # a campaign; failing seeds are listed
    python -m sandkeep.sim --seed 42 [--small]                      # replay one seed with its trace

Runs with ``PYTHONHASHSEED=0`` (re-executing itself if needed) so set iteration order, too, is the same on every
replay. ``SANDKEEP_SIM_PLANT=<bug>`` plants a test-only bug (:mod:`sandkeep.sim.plant`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from sandkeep.sim.scenario import INVARIANTS, REPORT_ONLY, run_seed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandkeep.sim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, help="replay this one seed, printing its trace")
    parser.add_argument("--seeds", type=int, default=100, help="campaign: how many seeds (default 100)")
    parser.add_argument("--first", type=int, default=1, help="campaign: the first seed (default 1)")
    parser.add_argument("--small", action="store_true", help="the CI profile (1-3 instances, short runs)")
    parser.add_argument("--steps", type=int, default=None, help="steps per seed (default: chosen by the seed)")
    parser.add_argument("--progress", action="store_true", help="campaign: one line per seed")
    args = parser.parse_args(argv)
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, "-m", "sandkeep.sim", *(argv if argv is not None else sys.argv[1:])])
    small = " --small" if args.small else ""
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
    started = time.perf_counter()
    sim = 0.0
    failed: list[int] = []
    reported: dict[str, int] = {}
    for seed in range(args.first, args.first + args.seeds):
        result = run_seed(seed, steps=args.steps, small=args.small)
        sim += result.sim_seconds
        if args.progress:
            print(f"seed {seed} {'ok' if result.ok else 'FAILED'} sim={result.sim_seconds:.0f} "
                  f"wall={result.wall_seconds:.1f} instances={result.instances} steps={result.steps} "
                  f"reported={sorted({n for n, _ in result.reported})}", flush=True)
        for name, _ in result.reported:
            reported[name] = reported.get(name, 0) + 1
        if not result.ok:
            failed.append(seed)
            names = sorted({n for n, _ in result.violations})
            print(f"seed {seed} FAILED: {', '.join(names)}: {result.violations[0][1][:300]}", flush=True)
            print(f"  replay: make sim SEED={seed}{' SMALL=1' if args.small else ''}", flush=True)
    wall = time.perf_counter() - started
    print(f"{args.seeds} seeds ({args.first}..{args.first + args.seeds - 1}{small}): {len(failed)} failed; "
          f"{sim / 3600:.1f} simulated hours in {wall:.0f} wall s ({sim / max(wall, 1e-9):.0f} simulated s per "
          f"wall s)")
    for name, count in sorted(reported.items()):
        print(f"reported, not failing ({REPORT_ONLY[name]}): {name} in {count} seed(s)")
    if failed:
        print("failing seeds: " + " ".join(str(s) for s in failed))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
