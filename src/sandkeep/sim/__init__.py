"""Deterministic simulation of the fleet (issue 10): the real engine on a virtual clock against the host model.

See ``python -m sandkeep.sim --help`` and the README section "Deterministic simulation"."""
