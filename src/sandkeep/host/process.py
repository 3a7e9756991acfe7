"""The real-process machine runner: one OS process per machine, started through the launcher.

Each machine runs ``python -m sandkeep.host.launch`` (see :mod:`sandkeep.host.launch`) with a minimal
environment of the host's own; the launcher drops to the machine user (when the host runs as root) and runs
the image in its volume's directory. The process listens on a free loopback port the proxy forwards to.
A dead or partitioned host freezes its machines (SIGSTOP) and lets them run again when it comes back (SIGCONT).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from sandkeep.clock import Clock
from sandkeep.host.errors import HostError
from sandkeep.host.images import Image
from sandkeep.host.runner import JSON, Gateway, LaunchError
from sandkeep.net import free_port


def _listening_inodes(port: int) -> set[str] | None:
    """Socket inodes listening on ``port`` (Linux /proc/net/tcp{,6}); None when /proc cannot tell."""
    inodes: set[str] = set()
    seen_table = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        seen_table = True
        for line in lines:
            parts = line.split()
            if len(parts) < 10 or parts[3] != "0A":  # 0A = LISTEN
                continue
            if int(parts[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(parts[9])
    return inodes if seen_table else None


def _listener_owned_by(pid: int | None, port: int) -> bool | None:
    """Whether the listener on ``port`` is one of ``pid``'s sockets; None when this cannot be checked."""
    if pid is None:
        return None
    inodes = _listening_inodes(port)
    if inodes is None:
        return None
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            return True
    return False


def _proc_start_time(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), to never signal a recycled pid."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return raw.rsplit(")", 1)[1].split()[19]
    except IndexError:
        return None


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to SIGKILL the machine if the host dies (a crashed host = stopped machines)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _killpg(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


#: the only environment a machine process inherits from the host (plus the instance's env and the host's
#: own FLY_*/PORT/SANDKEEP_* variables): nothing of the host's environment leaks into a machine
MACHINE_PATH = "/usr/local/bin:/usr/bin:/bin"


def launcher_env() -> dict[str, str]:
    """The environment a machine process is started with (nothing of the host's or the config's env)."""
    return {"PATH": MACHINE_PATH, "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONPATH": str(Path(__file__).resolve().parents[2])}


def resolve_machine_user(name: str) -> tuple[int, int] | None:
    """``(uid, gid)`` machine processes run as: None when the host is not root (it cannot switch users, and
    machines run as the host's own user). ``name`` is a user name or ``UID[:GID]``; an unknown user, an empty
    name or root is a HostError at start-up: a root host never runs machines as root."""
    if os.geteuid() != 0:
        return None
    if not name.strip():
        raise HostError(500, "the host runs as root: --machine-user (SANDKEEP_HOST_MACHINE_USER) must name an "
                             "unprivileged user for machine processes")
    name = name.strip()
    uid_s, _, gid_s = name.partition(":")
    if uid_s.isdigit():
        uid = int(uid_s)
        gid = int(gid_s) if gid_s.isdigit() else uid
    else:
        try:
            entry = pwd.getpwnam(name)
        except KeyError as exc:
            raise HostError(500, f"machine user {name!r} does not exist: create it (e.g. `useradd --system "
                                 f"--no-create-home {name}`) or pick another with --machine-user") from exc
        uid, gid = entry.pw_uid, entry.pw_gid
    if uid == 0:
        raise HostError(500, "machine processes must not run as root: pick an unprivileged --machine-user")
    return uid, gid


def _own_tree(root: Path, owner: tuple[int, int] | None) -> None:
    """Give ``root`` (a volume or a machine's home) to the machine's user, mode 0700; symlinks not followed."""
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    if owner is None:
        return
    uid, gid = owner
    for dirpath, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            path = os.path.join(dirpath, name)
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                if (st.st_uid, st.st_gid) != owner:
                    os.lchown(path, uid, gid)
    os.chown(root, uid, gid)



class ProcessRun:
    """One machine process."""

    gateway: Gateway | None = None  # reached through its port

    def __init__(self, proc: asyncio.subprocess.Process, port: int, clock: Clock, boot_timeout: float) -> None:
        self.proc = proc
        self.pid: int | None = proc.pid
        self.pid_start = _proc_start_time(proc.pid)
        self.port: int | None = port
        self._clock = clock
        self._boot_timeout = boot_timeout

    @property
    def exited(self) -> bool:
        return self.proc.returncode is not None

    def signal(self, sig: int) -> None:
        if self.proc.returncode is None:
            _killpg(self.proc.pid, sig)

    def freeze(self, frozen: bool) -> None:
        self.signal(signal.SIGSTOP if frozen else signal.SIGCONT)

    async def wait(self) -> int:
        return await self.proc.wait()

    async def ready(self, waiter: asyncio.Future[int], booting: Callable[[], bool]) -> bool:
        assert self.port is not None
        deadline = self._clock.monotonic() + self._boot_timeout
        while not waiter.done() and booting():
            try:
                _reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                pass
            else:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
                # Another process may hold the port (it was free when picked, then taken): only a listener
                # that belongs to this machine's process counts as ready.
                if _listener_owned_by(self.pid, self.port) is not False:
                    return True
            if self._clock.monotonic() > deadline:
                return False
            await self._clock.sleep(0.03)
        return False


class ProcessRunner:
    """Machines as real processes under the machine user (``SANDKEEP_HOST_MACHINES=process``)."""

    kind = "process"

    def __init__(self, *, clock: Clock, data_dir: Path, boot_timeout: float, owner: tuple[int, int] | None) -> None:
        self.clock = clock
        self.data_dir = data_dir
        self.boot_timeout = boot_timeout
        self.owner = owner

    def prepare_dir(self, path: Path) -> None:
        _own_tree(path, self.owner)

    def reap(self, m: JSON) -> None:
        pid, start = m.get("pid"), m.get("pid_start")
        if pid and start and _proc_start_time(int(pid)) == start:
            _killpg(int(pid), signal.SIGKILL)

    async def launch(self, m: JSON, image: Image, env: dict[str, str], volume_dir: Path | None) -> ProcessRun:
        port = free_port()
        env = {**env, "PORT": str(port)}
        work = self.data_dir / "machines" / m["id"]
        work.mkdir(parents=True, exist_ok=True)
        os.chmod(work, 0o700)
        # the process starts in its volume (or a home of its own) as the machine user; it never needs to
        # reach the host's directories above it, which stay private to the host (mode 0700)
        cwd = volume_dir if volume_dir is not None else work / "home"
        owner = self.owner
        spec = json.dumps({"args": list(image.argv[1:]), "env": env, "cwd": str(cwd),
                           "uid": owner[0] if owner else None, "gid": owner[1] if owner else None}).encode()
        try:
            await asyncio.to_thread(_own_tree, cwd, owner)
            out = os.open(work / "output.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError as exc:
            raise LaunchError(f"cannot prepare the machine: {exc.strerror}") from exc
        try:
            # the launcher starts with the host's minimal environment (never the config's env), drops to the
            # machine user and runs the image in-process (see sandkeep.host.launch)
            proc = await asyncio.create_subprocess_exec(
                image.argv[0], "-m", "sandkeep.host.launch", env=launcher_env(), cwd=str(work),
                stdin=asyncio.subprocess.PIPE, stdout=out, stderr=asyncio.subprocess.STDOUT,
                start_new_session=True, preexec_fn=_set_pdeathsig if sys.platform == "linux" else None)
        except OSError as exc:
            raise LaunchError(f"cannot start process: {exc.strerror}") from exc
        finally:
            os.close(out)
        assert proc.stdin is not None
        try:
            proc.stdin.write(spec)
            await proc.stdin.drain()
        except (ConnectionError, OSError):
            pass  # the process died at once: its exit is handled like any other
        finally:
            proc.stdin.close()
        return ProcessRun(proc, port, self.clock, self.boot_timeout)


