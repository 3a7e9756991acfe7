"""Simulated machines (``SANDKEEP_HOST_MACHINES=sim``): no OS process per machine.

A simulated machine is a few objects in the host process. The images behave as their real counterparts do
(:mod:`sandkeep.host.images`): ``sandkeep/gateway`` serves ``/health`` and ``/data`` through the host's proxy,
``sandkeep/crashy`` exits with code 3 before it is ready (``failed``), ``sandkeep/oneshot`` exits at once with
``$EXIT_CODE``, ``sandkeep/stubborn`` ignores SIGTERM (a stop needs the SIGKILL after the grace period).

The simulated gateway keeps its data where the real one does (``<volume>/data/<key>``, written through the
real gateway's :func:`~sandkeep.gateway.write_key`), so forks, snapshots, restores and a switch between
runners see the same bytes; it enforces the volume's size limit (507) and the gateway token (401) the same
way. It does not serve WebSockets (``/ws`` answers 501). Everything runs on the host's clock.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlsplit

from sandkeep.clock import Clock, utc_iso
from sandkeep.gateway import (
    MAX_BODY,
    TOKEN_HEADER,
    GatewayConfig,
    VolumeFull,
    valid_key,
    write_key,
)
from sandkeep.gatewaybeat import BEAT_CHUNK, END_CHUNK, MAX_BACKOFF, STREAM_LIFETIME, BeatTarget, answer_status
from sandkeep.host.images import Image
from sandkeep.host.runner import JSON, Gateway

_BAD_KEY = "invalid key: use 1-200 letters, digits, '.', '_' or '-' (no '..')"
_SIM_PIDS = itertools.count(100000)  # what /health reports as "pid": a new one per incarnation


def _json(status: int, obj: JSON) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(obj).encode()


class SimGateway:
    """The gateway of one simulated machine, answering the proxy's requests in process."""

    def __init__(self, env: dict[str, str], root: Path, clock: Clock) -> None:
        self.cfg = GatewayConfig.from_env({**env, "SANDKEEP_VOLUME_PATH": str(root), "PORT": "0"})
        self.cfg.started_at = utc_iso(clock.now()) or ""
        self.pid = next(_SIM_PIDS)

    async def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, str, bytes]:
        cfg = self.cfg
        if not cfg.authorized(headers.get(TOKEN_HEADER)):
            return _json(401, {"error": "unauthorized: this gateway answers only requests that carry its token"})
        path = urlsplit(path).path
        if method in ("GET", "HEAD"):
            if path == "/ws":
                return _json(501, {"error": "simulated machines do not serve WebSockets (run the host with "
                                            "SANDKEEP_HOST_MACHINES=process)"})
            if path == "/health":
                return _json(200, {"status": "ok", "started_at": cfg.started_at, "machine_id": cfg.machine_id,
                                   "app_name": cfg.app_name, "region": cfg.region, "pid": self.pid})
        if method not in ("GET", "HEAD", "PUT"):
            return _json(405, {"error": "method not allowed"})
        if not path.startswith("/data/"):
            return _json(404, {"error": f"not found: {path}"})
        key = unquote(path[len("/data/"):])
        if not valid_key(key):
            return _json(400, {"error": _BAD_KEY})
        if method == "PUT":
            if len(body) > MAX_BODY:
                return _json(400, {"error": f"a Content-Length of at most {MAX_BODY} bytes is required"})
            try:
                await asyncio.to_thread(write_key, cfg, key, body)
            except VolumeFull as exc:
                return _json(507, {"error": f"cannot store key {key}: {exc}", "limit_bytes": exc.limit})
            except OSError as exc:
                return _json(500, {"error": f"cannot store key {key}: {exc.strerror}"})
            return _json(201, {"key": key, "size": len(body)})
        try:
            data = await asyncio.to_thread((cfg.data_dir() / key).read_bytes)
        except FileNotFoundError:
            return _json(404, {"error": f"key not found: {key}"})
        except OSError as exc:
            return _json(500, {"error": f"cannot read key {key}: {exc.strerror}"})
        return 200, "application/octet-stream", data


class SimBeater:
    """The heartbeat stream of a simulated gateway (:mod:`sandkeep.gatewaybeat`'s contract, over asyncio): it
    beats while the machine runs, falls silent while it is frozen (its connection stays open, like a process
    stopped with its host) and its connection is torn down when the machine exits."""

    def __init__(self, target: BeatTarget) -> None:
        self.target = target
        self.frozen = False
        self.streams = 0
        self._writer: asyncio.StreamWriter | None = None
        self._task = asyncio.get_running_loop().create_task(self._run(), name="sim-beat")

    async def _stream(self) -> int | None:
        t = self.target
        reader, writer = await asyncio.open_connection(t.host, t.port, ssl=t.tls or None)
        self._writer = writer
        self.streams += 1
        try:
            writer.write(t.request_head() + BEAT_CHUNK)
            answer = asyncio.ensure_future(reader.read(512))
            ends = asyncio.get_running_loop().time() + STREAM_LIFETIME
            while asyncio.get_running_loop().time() < ends:
                done, _ = await asyncio.wait([answer], timeout=t.interval)
                if done:  # sandkeep answered (refused) or closed the connection
                    return answer_status(answer.result())
                if not self.frozen:
                    writer.write(BEAT_CHUNK)
            answer.cancel()
            writer.write(END_CHUNK)
            return answer_status(await reader.read(512))
        finally:
            writer.transport.abort()
            self._writer = None

    async def _run(self) -> None:
        backoff = self.target.interval
        while True:
            try:
                status = await self._stream()
            except OSError:
                status = None
            if status == 204:
                backoff = self.target.interval
                continue
            await asyncio.sleep(backoff)
            backoff = min(MAX_BACKOFF, backoff * 2)

    def stop(self) -> None:
        """The machine exited: its connection drops (sandkeep sees the stream end)."""
        self._task.cancel()
        if self._writer is not None:
            self._writer.transport.abort()


class SimRun:
    """One incarnation of a simulated machine: an exit future and the image's reaction to signals."""

    pid: int | None = None
    pid_start: str | None = None
    port: int | None = None

    def __init__(self, image: Image, env: dict[str, str], root: Path, clock: Clock) -> None:
        self.image = image
        self._exit: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.frozen = False
        self._pending: list[int] = []  # signals sent while frozen (delivered when thawed, like SIGSTOP)
        self.gateway: Gateway | None = None
        self.beater: SimBeater | None = None
        if image.name == "sandkeep/gateway":
            self.gateway = SimGateway(env, root, clock)
            target = BeatTarget.from_env(env)
            self.beater = SimBeater(target) if target is not None else None
        elif image.name == "sandkeep/crashy":
            self._finish(3)
        elif image.name == "sandkeep/oneshot":
            try:
                self._finish(int(env.get("EXIT_CODE", "0")))
            except ValueError:
                self._finish(1)  # Python's sys.exit(int("x")) fails with a traceback: exit code 1

    def _finish(self, code: int) -> None:
        if not self._exit.done():
            self._exit.set_result(code)
        if self.beater is not None:
            self.beater.stop()

    @property
    def exited(self) -> bool:
        return self._exit.done()

    async def ready(self, waiter: asyncio.Future[int], booting: Callable[[], bool]) -> bool:
        return not self._exit.done() and booting()

    def signal(self, sig: int) -> None:
        if self._exit.done():
            return
        if sig == signal.SIGKILL:
            self._finish(-signal.SIGKILL)
        elif self.frozen:
            self._pending.append(sig)
        elif sig in (signal.SIGTERM, signal.SIGINT) and self.image.name == "sandkeep/stubborn":
            return  # it ignores SIGTERM
        elif sig in (signal.SIGTERM, signal.SIGINT) and self.image.name == "sandkeep/gateway":
            self._finish(0)  # the gateway stops cleanly
        elif sig not in (signal.SIGCONT, signal.SIGCHLD, signal.SIGWINCH, signal.SIGURG):
            self._finish(-sig)  # the default action: terminated by the signal

    def freeze(self, frozen: bool) -> None:
        self.frozen = frozen
        if self.beater is not None:
            self.beater.frozen = frozen
        if not frozen:
            pending, self._pending = self._pending, []
            for sig in pending:
                self.signal(sig)

    async def wait(self) -> int:
        return await asyncio.shield(self._exit)


class SimRunner:
    """Simulated machines (``SANDKEEP_HOST_MACHINES=sim``)."""

    kind = "sim"

    def __init__(self, *, clock: Clock, data_dir: Path) -> None:
        self.clock = clock
        self.data_dir = data_dir

    def prepare_dir(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o700)

    def reap(self, m: JSON) -> None:
        return None  # nothing outlives the host process

    async def launch(self, m: JSON, image: Image, env: dict[str, str], volume_dir: Path | None) -> SimRun:
        # like a real machine, one without a volume keeps its data in a home of its own
        root = volume_dir if volume_dir is not None else self.data_dir / "machines" / m["id"] / "home"
        if volume_dir is None:
            self.prepare_dir(root)  # no thread hop: a launch completes without real time passing
        return SimRun(image, dict(env), root, self.clock)
