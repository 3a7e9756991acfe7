"""The README's configuration table, generated from sandkeep.config.SETTINGS so the docs stay exact.

    python tools/settings_table.py            # print the table
    python tools/settings_table.py --write    # rewrite it in README.md between the markers
"""

from __future__ import annotations

import sys
from pathlib import Path

from sandkeep.config import SETTINGS

START = "<!-- settings:start -->"
END = "<!-- settings:end -->"
README = Path(__file__).resolve().parent.parent / "README.md"


def render() -> str:
    lines = ["| environment variable | default | meaning |", "|---|---|---|"]
    for s in SETTINGS:
        default = "(unset)" if s.default is None else f"`{s.default}`"
        lines.append(f"| `{s.env}` | {default} | {s.doc} |")
    return "\n".join(lines)


def embedded(text: str) -> str:
    start, end = text.index(START) + len(START), text.index(END)
    return text[start:end].strip()


def write() -> None:
    text = README.read_text()
    start, end = text.index(START) + len(START), text.index(END)
    README.write_text(text[:start] + "\n" + render() + "\n" + text[end:])


if __name__ == "__main__":
    if "--write" in sys.argv[1:]:
        write()
    else:
        print(render())
