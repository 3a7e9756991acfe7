"""The first code of every machine process: read the launch spec, drop privileges, run the image.

The local host starts ``python -m sandkeep.host.launch`` with a minimal environment of its own (no byte of
the machine's config env: a user's ``LD_PRELOAD`` or ``PYTHON*`` never reaches the dynamic loader or the
interpreter's start-up) and writes the launch spec to its stdin as one JSON object::

    {"args": ["-m", "sandkeep", "gateway"] | ["-c", "<code>"], "env": {...}, "cwd": "<dir>",
     "uid": 65534 | null, "gid": 65534 | null}

This module then, still as the host's user: imports what the image needs (the interpreter's own files may
not be readable by the machine user), opens ``cwd``; then drops to ``uid``/``gid`` with no supplementary
groups (when given), moves into ``cwd`` through the open descriptor (the machine user needs no access to the
host's directories above its volume), replaces the environment with ``env`` and runs the image in this
process. There is no ``exec`` after the drop, so the process stays non-dumpable: other machine processes of
the same user cannot read its memory, environment or working directory through ``/proc``.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import linecache  # noqa: F401  - tracebacks after the drop need them loaded
import os
import runpy
import signal
import socket  # noqa: F401  - the test images use these once the interpreter's files may be unreadable
import sys
import time  # noqa: F401
import traceback  # noqa: F401
from typing import Any

#: imported before the drop: the gateway, and what the standard library imports lazily on its way (the
#: interpreter's files may be unreadable to the machine user, e.g. a Python installed under /root)
PRELOAD = ("sandkeep", "sandkeep.cli.main", "sandkeep.cli.gateway_cmd", "sandkeep.gateway", "encodings.idna",
           "encodings.ascii", "encodings.latin_1", "stringprep", "unicodedata", "email.utils", "email.message",
           "email.parser", "http.client", "http.server", "mimetypes", "socketserver", "html", "queue",
           "contextlib", "selectors", "weakref")


def _die_with_parent(parent: int) -> None:
    """Linux clears the parent-death signal when the user changes: ask for SIGKILL again (a crashed host
    means stopped machines), and stop now if the host is already gone."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() != parent:
        os._exit(137)


def _drop(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.geteuid() != uid or os.getegid() != gid:  # pragma: no cover - the kernel said yes above
        raise SystemExit("launch: could not drop privileges")


def _run(args: list[str]) -> None:
    if len(args) >= 2 and args[0] == "-m":
        sys.argv = [args[1], *args[2:]]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    elif len(args) >= 2 and args[0] == "-c":
        sys.argv = ["-c", *args[2:]]
        code = compile(args[1], "<string>", "exec")
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})  # catalogue images only
    else:
        raise SystemExit(f"launch: unsupported image arguments {args[:2]!r}")


def main() -> None:
    parent = os.getppid()
    spec: dict[str, Any] = json.loads(sys.stdin.buffer.read() or b"{}")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    args = [str(a) for a in spec.get("args") or []]
    if args[:2] == ["-m", "sandkeep"]:
        for name in PRELOAD:
            importlib.import_module(name)
    cwd = os.open(str(spec["cwd"]), os.O_RDONLY | os.O_DIRECTORY)
    uid, gid = spec.get("uid"), spec.get("gid")
    if uid is not None and gid is not None:
        _drop(int(uid), int(gid))
        _die_with_parent(parent)
    os.fchdir(cwd)
    os.close(cwd)
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in (spec.get("env") or {}).items()})
    _run(args)


if __name__ == "__main__":
    main()
