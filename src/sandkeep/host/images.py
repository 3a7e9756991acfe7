"""The local image catalogue: what ``config.image`` may name on the local host."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Image:
    name: str
    argv: tuple[str, ...]
    ready: Literal["tcp", "spawn"]  # "tcp": started once $PORT accepts connections; "spawn": once running
    doc: str


CATALOGUE: dict[str, Image] = {
    "sandkeep/gateway": Image(
        "sandkeep/gateway", (sys.executable, "-m", "sandkeep", "gateway"), "tcp",
        "The sandkeep gateway (health endpoint and key/value data on the volume)."),
    "sandkeep/crashy": Image(
        "sandkeep/crashy",
        (sys.executable, "-c", "import sys; sys.stderr.write('crashy: failing on purpose\\n'); sys.exit(3)"),
        "tcp", "Exits with code 3 before listening: the machine goes to 'failed' (test image)."),
    "sandkeep/oneshot": Image(
        "sandkeep/oneshot",
        (sys.executable, "-c", "import os, sys; sys.exit(int(os.environ.get('EXIT_CODE', '0')))"),
        "spawn", "Runs, then exits on its own with $EXIT_CODE (default 0): 'stopped' + an exit event (test image)."),
    "sandkeep/stubborn": Image(
        "sandkeep/stubborn",
        # listens on $PORT only once SIGTERM is ignored, so "started" means a SIGTERM can no longer stop it
        (sys.executable, "-c", "import os, signal, socket, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                               "s = socket.create_server(('127.0.0.1', int(os.environ['PORT'])))\n"
                               "while True:\n    time.sleep(3600)"),
        "tcp", "Ignores SIGTERM: a stop needs the SIGKILL after the grace period (test image)."),
}


def resolve(name: str) -> Image | None:
    """Look an image up; a ``:tag`` suffix and a ``registry.fly.io/`` prefix are ignored."""
    base = name.strip()
    if base.startswith("registry.fly.io/"):
        base = base[len("registry.fly.io/"):]
    if ":" in base.rsplit("/", 1)[-1]:
        base = base.rsplit(":", 1)[0]
    return CATALOGUE.get(base)
