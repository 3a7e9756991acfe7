"""sandkeep benchmarks: real processes on loopback ports, bounded loops, results in bench/results.md.

Run from the repository root: ``python -m bench.run [--only NAME] [--quick]`` (or ``make bench``).
Tests never assert timing; these benchmarks do the measuring.
"""
