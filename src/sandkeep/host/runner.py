"""What runs a machine: the interface between the host's model (:mod:`sandkeep.host.core`) and its machines.

The model decides *when* a machine starts, stops, crashes or freezes (states, events, delays, faults); a
:class:`MachineRunner` decides *what* runs. Two runners exist:

* :class:`sandkeep.host.process.ProcessRunner` (``SANDKEEP_HOST_MACHINES=process``, the default): a real OS
  process per machine, started through the launcher under the machine user, listening on a loopback port;
* :class:`sandkeep.host.sim.SimRunner` (``SANDKEEP_HOST_MACHINES=sim``): no OS process; a simulated gateway
  (``/health``, ``/data``) served in the host process by its proxy, keeping its data in the volume's directory
  with the same layout and size limit as the real gateway.

A runner's :meth:`MachineRunner.launch` returns a :class:`Run`: one incarnation of a machine, from launch to
exit. Exit codes follow :class:`asyncio.subprocess.Process`: a negative code is "killed by that signal".
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from sandkeep.host.images import Image

JSON = dict[str, Any]
RUNNERS = ("process", "sim")


class LaunchError(Exception):
    """The machine could not be launched at all (the model marks it ``failed`` with this message)."""


class Gateway(Protocol):
    """A machine's gateway served inside the host process (simulated machines)."""

    async def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, str, bytes]:
        """Answer one request: (status, content type, body)."""
        ...


class Run(Protocol):
    """One incarnation of a machine."""

    pid: int | None  # the OS process (None: simulated)
    pid_start: str | None  # the process's start time, so a recycled pid is never signalled
    port: int | None  # the loopback port the proxy forwards to (None: see ``gateway``)
    gateway: Gateway | None  # served in process by the proxy (simulated gateway machines)

    async def ready(self, waiter: asyncio.Future[int], booting: Callable[[], bool]) -> bool:
        """Wait until a "tcp" image accepts connections; False when it exits or times out first."""
        ...

    def signal(self, sig: int) -> None:
        """Deliver ``sig`` (SIGTERM: asked to stop; SIGKILL: killed)."""
        ...

    def freeze(self, frozen: bool) -> None:
        """Freeze the machine (its host died or is partitioned) or let it run again (the host came back)."""
        ...

    async def wait(self) -> int:
        """Wait for the exit; its code (negative: killed by that signal)."""
        ...

    @property
    def exited(self) -> bool: ...


class MachineRunner(Protocol):
    kind: str

    def prepare_dir(self, path: Path) -> None:
        """Make a volume's (or a machine home's) directory usable by machines (blocking; run in a thread)."""
        ...

    async def launch(self, m: JSON, image: Image, env: dict[str, str], volume_dir: Path | None) -> Run:
        """Start machine ``m`` (``env`` is its full environment except ``PORT``); LaunchError if impossible."""
        ...

    def reap(self, m: JSON) -> None:
        """After a restart of the host: end whatever is left of ``m``'s previous incarnation."""
        ...


def make_runner(kind: str, *, clock: Any, data_dir: Path, boot_timeout: float,
                machine_owner: tuple[int, int] | None) -> MachineRunner:
    if kind == "process":
        from sandkeep.host.process import ProcessRunner

        return ProcessRunner(clock=clock, data_dir=data_dir, boot_timeout=boot_timeout, owner=machine_owner)
    if kind == "sim":
        from sandkeep.host.sim import SimRunner

        return SimRunner(clock=clock, data_dir=data_dir)
    raise ValueError(f"unknown machine runner {kind!r}: use one of {', '.join(RUNNERS)}")
