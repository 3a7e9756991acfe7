"""The gateway: the small HTTP server that runs inside every machine.

It listens on ``127.0.0.1:$PORT``. Every request must carry the instance's gateway token in the
``sandkeep-gateway-token`` header (``$SANDKEEP_GATEWAY_TOKEN``, set by sandkeep; SPEC §13): without it, or
when the machine was given no token at all, every path answers 401 and reveals nothing. Then it serves:

* ``GET /health`` -> 200 ``{"status": "ok", "started_at", "machine_id", "app_name", "region", "pid"}`` (no
  filesystem path)
* ``PUT /data/{key}`` -> stores the request body in the volume (written to a temporary file, fsynced,
  renamed, directory fsynced) and answers 201 ``{"key", "size"}``; with ``$SANDKEEP_VOLUME_LIMIT_BYTES`` set
  (the local host sets it from the volume's ``size_gb``), a write that would take the volume's files over
  the limit answers 507 and leaves nothing behind (the size is checked before the temporary file is written
  and again, under a lock, before it is renamed into place)
* ``GET /data/{key}`` -> the stored bytes (404 when missing)
* ``GET /ws`` with a WebSocket upgrade -> an echo: every text or binary message comes back unchanged, a ping
  gets its pong, a close is answered with a close (RFC 6455, standard library only)

Keys are one path segment of letters, digits, ``.``, ``_`` and ``-`` (no ``..``); anything else is a 400.
SIGTERM and SIGINT stop the server cleanly (exit code 0). Only the standard library is used so a machine
boots fast.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import hmac
import json
import os
import re
import signal
import sys
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import unquote, urlsplit

from sandkeep.gatewaybeat import start_from_env  # at import: the machine user may not read the stdlib later

_KEY_RE = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
MAX_BODY = 64 * 1024 * 1024
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
WS_MAX_FRAME = 1024 * 1024


#: the environment variable that hands a machine its gateway token, and the header requests carry it in
TOKEN_ENV = "SANDKEEP_GATEWAY_TOKEN"
TOKEN_HEADER = "sandkeep-gateway-token"
#: the header the local host's proxy checks when it was given a token (SANDKEEP_HOST_PROXY_TOKEN)
PROXY_TOKEN_HEADER = "sandkeep-proxy-token"
#: the environment variable with the volume's size limit in bytes (set by the local host)
LIMIT_ENV = "SANDKEEP_VOLUME_LIMIT_BYTES"
_WRITE_LOCK = threading.Lock()


class VolumeFull(Exception):
    """A write would take the volume over its size limit."""

    def __init__(self, needed: int, limit: int) -> None:
        super().__init__(f"volume full: this write needs {needed} bytes in all, the volume holds {limit}")
        self.needed = needed
        self.limit = limit


class GatewayConfig:
    def __init__(self, port: int, volume_path: Path | None, machine_id: str, app_name: str, region: str,
                 host: str = "127.0.0.1", *, token: str = "", limit_bytes: int | None = None) -> None:
        self.port = port
        self.host = host
        self.volume_path = volume_path
        self.machine_id = machine_id
        self.app_name = app_name
        self.region = region
        self.token = token
        self.limit_bytes = limit_bytes
        self.started_at = datetime.now(UTC).isoformat().replace("+00:00", "Z")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> GatewayConfig:
        env = dict(os.environ if environ is None else environ)
        raw_port = env.get("PORT", "8080")
        try:
            port = int(raw_port)
        except ValueError as exc:
            raise SystemExit(f"gateway: PORT must be a number, got {raw_port!r}") from exc
        vol = env.get("SANDKEEP_VOLUME_PATH") or ""
        raw_limit = env.get(LIMIT_ENV) or ""
        try:
            limit = int(raw_limit) if raw_limit else None
        except ValueError as exc:
            raise SystemExit(f"gateway: {LIMIT_ENV} must be a number of bytes, got {raw_limit!r}") from exc
        return cls(port=port, volume_path=Path(vol) if vol else None, machine_id=env.get("FLY_MACHINE_ID", ""),
                   app_name=env.get("FLY_APP_NAME", ""), region=env.get("FLY_REGION", ""),
                   token=env.get(TOKEN_ENV, ""), limit_bytes=limit)

    def volume_root(self) -> Path:
        """The volume's directory; relative (the working directory) unless ``$SANDKEEP_VOLUME_PATH`` names one,
        so the gateway needs no access to the directories above its volume."""
        return self.volume_path if self.volume_path is not None else Path(".")

    def data_dir(self) -> Path:
        return self.volume_root() / "data"

    def authorized(self, presented: str | None) -> bool:
        """Whether a request's token is this machine's; with no token configured nothing is authorized."""
        if not self.token or not presented:
            return False
        return hmac.compare_digest(presented.strip().encode(), self.token.encode())


def valid_key(key: str) -> bool:
    return bool(_KEY_RE.match(key)) and key not in (".", "..") and ".." not in key


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def volume_usage(root: Path) -> int:
    """Bytes held by the regular files under ``root`` (symlinks are not followed)."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if not os.path.islink(os.path.join(dirpath, name)):
                total += st.st_size
    return total


def _size_of(path: Path) -> int:
    try:
        st = os.lstat(path)
    except OSError:
        return 0
    return st.st_size


def _check_limit(cfg: GatewayConfig, target: Path, extra: int) -> None:
    """Raise VolumeFull when the volume plus ``extra`` bytes, minus what ``target`` holds now, is over the limit."""
    if cfg.limit_bytes is None:
        return
    needed = volume_usage(cfg.volume_root()) + extra - _size_of(target)
    if needed > cfg.limit_bytes:
        raise VolumeFull(needed, cfg.limit_bytes)


def write_key(cfg: GatewayConfig, key: str, body: bytes) -> None:
    """Store ``body`` under ``key``: a temporary file, fsynced, renamed into place. Raises VolumeFull (and
    writes nothing) when the volume's limit would be exceeded."""
    directory = cfg.data_dir()
    target = directory / key
    _check_limit(cfg, target, len(body))  # before a byte is written
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{key}.tmp-{os.getpid()}-{threading.get_ident()}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(body)
            fh.flush()
            os.fsync(fh.fileno())
        with _WRITE_LOCK:  # concurrent writers must not both pass the check
            _check_limit(cfg, target, 0)  # the temporary file is counted now
            os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(directory)


def ws_accept(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` answer to a client's ``Sec-WebSocket-Key`` (RFC 6455 section 4.2.2)."""
    return base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()


def ws_frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bytes | None = None) -> bytes:
    """One WebSocket frame (servers send unmasked frames; clients pass a 4-byte ``mask``)."""
    head = bytearray([(0x80 if fin else 0) | opcode])
    mask_bit = 0x80 if mask is not None else 0
    n = len(payload)
    if n < 126:
        head.append(mask_bit | n)
    elif n < 65536:
        head += bytes([mask_bit | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([mask_bit | 127]) + n.to_bytes(8, "big")
    if mask is not None:
        head += mask
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes(head) + payload


def ws_read_frame(rfile: Any) -> tuple[bool, int, bytes] | None:
    """Read one frame: (fin, opcode, unmasked payload); None on EOF or a frame over ``WS_MAX_FRAME``."""
    first = rfile.read(2)
    if len(first) < 2:
        return None
    fin, opcode = bool(first[0] & 0x80), first[0] & 0x0F
    masked, n = bool(first[1] & 0x80), first[1] & 0x7F
    if n == 126:
        n = int.from_bytes(rfile.read(2), "big")
    elif n == 127:
        n = int.from_bytes(rfile.read(8), "big")
    if n > WS_MAX_FRAME:
        return None
    mask = rfile.read(4) if masked else b""
    payload = rfile.read(n)
    if len(payload) < n or (masked and len(mask) < 4):
        return None
    if masked:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return fin, opcode, payload


class GatewayHandler(BaseHTTPRequestHandler):
    """The gateway's HTTP handler; :func:`make_handler` binds it to one :class:`GatewayConfig`."""

    cfg: GatewayConfig
    server_version = "sandkeep-gateway/1"
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # no ~40 ms Nagle/delayed-ACK stall per keep-alive response

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write(json.dumps({"event": "request", "line": format % args}) + "\n")

    def _send(self, status: int, payload: bytes, content_type: str = "application/json", *,
              close: bool = False) -> None:
        """Answer; with ``close`` also say ``Connection: close`` (which makes the handler close after it), so a
        keep-alive client never sends its next request down a connection this side is closing."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        if close:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _json(self, status: int, obj: dict[str, Any], *, close: bool = False) -> None:
        self._send(status, json.dumps(obj).encode(), close=close)

    def _key(self) -> str | None:
        path = urlsplit(self.path).path
        if not path.startswith("/data/"):
            return None
        return unquote(path[len("/data/"):])

    def _drain(self) -> bytes | None:
        raw = self.headers.get("Content-Length")
        if raw is None:
            if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                return None  # not supported: send a Content-Length
            return b""
        try:
            length = int(raw)
        except ValueError:
            return None
        if length < 0 or length > MAX_BODY:
            return None
        return self.rfile.read(length)

    def _websocket_echo(self) -> None:
        key = self.headers.get("Sec-WebSocket-Key", "")
        if "websocket" not in (self.headers.get("Upgrade") or "").lower() or not key:
            self._json(426, {"error": "/ws needs a WebSocket upgrade (Upgrade: websocket, Sec-WebSocket-Key)"})
            return
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", ws_accept(key))
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        while True:
            frame = ws_read_frame(self.rfile)
            if frame is None:
                return
            fin, opcode, payload = frame
            if opcode == 0x8:  # close: answer with the same status code, then stop
                self.wfile.write(ws_frame(0x8, payload[:2]))
                self.wfile.flush()
                return
            if opcode == 0x9:  # ping
                self.wfile.write(ws_frame(0xA, payload))
            elif opcode in (0x0, 0x1, 0x2):  # continuation, text, binary: echo as received
                self.wfile.write(ws_frame(opcode, payload, fin=fin))
            self.wfile.flush()

    def _refused(self) -> bool:
        """Answer 401 (and close: an unread body must not become the next request) without the token."""
        if self.cfg.authorized(self.headers.get(TOKEN_HEADER)):
            return False
        self._json(401, {"error": "unauthorized: this gateway answers only requests that carry its token"}, close=True)
        return True

    def do_GET(self) -> None:
        if self._refused():
            return
        path = urlsplit(self.path).path
        if path == "/ws":
            self._websocket_echo()
            return
        if path == "/health":
            self._json(200, {"status": "ok", "started_at": self.cfg.started_at, "machine_id": self.cfg.machine_id,
                             "app_name": self.cfg.app_name, "region": self.cfg.region, "pid": os.getpid()})
            return
        key = self._key()
        if key is None:
            self._json(404, {"error": f"not found: {path}"})
            return
        if not valid_key(key):
            self._json(400, {"error": "invalid key: use 1-200 letters, digits, '.', '_' or '-' (no '..')"})
            return
        target = self.cfg.data_dir() / key
        try:
            data = target.read_bytes()
        except FileNotFoundError:
            self._json(404, {"error": f"key not found: {key}"})
            return
        except OSError as exc:
            self._json(500, {"error": f"cannot read key {key}: {exc.strerror}"})
            return
        self._send(200, data, "application/octet-stream")

    do_HEAD = do_GET

    def do_PUT(self) -> None:
        if self._refused():
            return
        key = self._key()
        body = self._drain()
        if body is None:
            self._json(400, {"error": f"a Content-Length of at most {MAX_BODY} bytes is required"}, close=True)
            return
        if key is None:
            self._json(404, {"error": f"not found: {urlsplit(self.path).path}"})
            return
        if not valid_key(key):
            self._json(400, {"error": "invalid key: use 1-200 letters, digits, '.', '_' or '-' (no '..')"})
            return
        try:
            write_key(self.cfg, key, body)
        except VolumeFull as exc:
            self._json(507, {"error": f"cannot store key {key}: {exc}", "limit_bytes": exc.limit})
            return
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                self._json(507, {"error": f"cannot store key {key}: no space left on the volume"})
                return
            self._json(500, {"error": f"cannot store key {key}: {exc.strerror}"})
            return
        self._json(201, {"key": key, "size": len(body)})

    def do_POST(self) -> None:
        if self._refused():
            return
        self._drain()
        self._json(405, {"error": "method not allowed"})

    do_DELETE = do_POST
    do_PATCH = do_POST


def make_handler(cfg: GatewayConfig) -> type[BaseHTTPRequestHandler]:
    return type("Handler", (GatewayHandler,), {"cfg": cfg})


def serve(cfg: GatewayConfig) -> int:
    """Run until SIGTERM/SIGINT; return the process exit code."""
    httpd = ThreadingHTTPServer((cfg.host, cfg.port), make_handler(cfg))
    httpd.daemon_threads = True

    def on_signal(signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=httpd.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    sys.stderr.write(json.dumps({"event": "gateway.listening", "port": cfg.port,
                                 "token": "set" if cfg.token else "missing (every request is refused)",
                                 "limit_bytes": cfg.limit_bytes}) + "\n")
    sys.stderr.flush()
    sender = start_from_env(os.environ)  # beats to sandkeep when the machine's env asks (issue 11)
    try:
        httpd.serve_forever(poll_interval=0.2)
    finally:
        if sender is not None:
            sender.stop()
        httpd.server_close()
    sys.stderr.write(json.dumps({"event": "gateway.stopped"}) + "\n")
    return 0


def main() -> int:
    return serve(GatewayConfig.from_env())
