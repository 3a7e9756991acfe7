"""Shell completion as the README documents it (click's `_SANDKEEP_COMPLETE`), through the installed command."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def complete(words: str, cword: int, shell: str = "bash") -> list[str]:
    env = {**os.environ, "COMP_WORDS": words, "COMP_CWORD": str(cword), "_SANDKEEP_COMPLETE": f"{shell}_complete"}
    done = subprocess.run([sys.executable, "-m", "sandkeep"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [line.split(",", 1)[1] for line in done.stdout.splitlines() if "," in line]


def test_subcommands_and_output_choices_complete() -> None:
    assert "instances" in complete("sandkeep inst", 1)
    assert complete("sandkeep instances list -o ", 4) == ["table", "wide", "json", "yaml"]


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_the_activation_script_exists_for_each_documented_shell(shell: str) -> None:
    env = {**os.environ, "_SANDKEEP_COMPLETE": f"{shell}_source"}
    done = subprocess.run([sys.executable, "-m", "sandkeep"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "_SANDKEEP_COMPLETE" in done.stdout, done.stderr
