"""``POST /v1/gateway/heartbeat``: a machine's gateway says it is alive (issue 11, detection on Fly).

Authenticated with the instance's own gateway token (``sandkeep-instance-id`` and ``sandkeep-gateway-token``
headers; SPEC §13), not a user token: 401 ``heartbeat_unauthorized`` for a missing, unknown or rotated token.
A plain POST is one beat (204). With ``?stream=true`` the request body is a heartbeat stream: every line is a
beat, the token is checked once (and again after a rotation is seen), and the end of the stream — the machine
stopped or crashed, or the connection broke — tells the engine to read that machine at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from sandkeep.api.deps import ApiState, StateDep
from sandkeep.api.errors import ApiError
from sandkeep.api.schemas import ErrorBody
from sandkeep.engine.heartbeat import HEARTBEAT_PATH, INSTANCE_HEADER, BeatRefused, HeartbeatBook
from sandkeep.gateway import TOKEN_HEADER

router = APIRouter(prefix="/v1")


def _refused(exc: BeatRefused) -> ApiError:
    return ApiError(401, exc.code, exc.message, headers={"WWW-Authenticate": "sandkeep-gateway-token"})


async def _follow(book: HeartbeatBook, request: Request, instance_id: str, digest: bytes) -> None:
    """Beat for every line of the stream until it ends; a rotated token ends it with 401."""
    try:
        async for chunk in request.stream():
            if b"\n" not in chunk:
                continue
            if not book.still_valid(instance_id, digest):
                raise _refused(BeatRefused("heartbeat_unauthorized", "the gateway token was rotated"))
            book.beat(instance_id)
    except ClientDisconnect:
        pass
    finally:
        book.stream_closed(instance_id)


@router.post("/gateway/heartbeat", status_code=204, tags=["traffic"], operation_id="gateway_heartbeat",
             responses={401: {"model": ErrorBody}})
async def heartbeat(api: StateDep, request: Request,
                    instance_id: Annotated[str | None, Header(alias="sandkeep-instance-id", max_length=200)] = None,
                    token: Annotated[str | None, Header(alias=TOKEN_HEADER, max_length=500)] = None,
                    stream: Annotated[bool, Query(description="the body is a stream of beats, one per line")] = False,
                    ) -> Response:
    """A gateway's heartbeat (authenticated with the instance's gateway token, not a user token)."""
    book = api.heartbeats
    try:
        if book is None:  # a process without an engine knows no instance's token
            raise BeatRefused("heartbeat_unauthorized", "this process does not take gateway heartbeats")
        digest = await book.authenticate(instance_id, token)
    except BeatRefused as exc:
        raise _refused(exc) from exc
    assert instance_id is not None  # authenticate refuses a missing id
    book.beat(instance_id)
    if stream:
        await _follow(book, request, instance_id, digest)
    return Response(status_code=204)


class HeartbeatStreams:
    """ASGI middleware (outermost): heartbeat *streams* go straight to the book, skipping the router and the
    per-request middlewares for each of their lines (a stream lasts an hour and carries a line every few
    seconds: the per-line cost is what 10,000 machines pay). Same contract as :func:`heartbeat` with
    ``stream=true``; every other request passes through."""

    def __init__(self, app: ASGIApp, state: ApiState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope.get("path") != HEARTBEAT_PATH or scope.get("method") != "POST"
                or b"stream=true" not in scope.get("query_string", b"") or self.state.heartbeats is None):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        instance_id = headers.get(INSTANCE_HEADER.encode(), b"").decode("latin-1")[:200] or None
        token = headers.get(TOKEN_HEADER.encode(), b"").decode("latin-1")[:500] or None
        book = self.state.heartbeats
        try:
            digest = await book.authenticate(instance_id, token)
        except BeatRefused as exc:
            await _answer(send, 401, exc)
            return
        assert instance_id is not None
        book.beat(instance_id)
        refused: BeatRefused | None = None
        task = asyncio.current_task()
        if task is not None:
            book.streams.add(task)
        by_server = False
        try:
            while True:
                try:
                    message = await receive()
                except asyncio.CancelledError:
                    by_server = True  # the server is stopping (end_streams): not a sign of the machine
                    if not book.closing:
                        raise
                    break
                if message["type"] == "http.disconnect":
                    return
                if b"\n" in message.get("body", b""):
                    if not book.still_valid(instance_id, digest):
                        refused = BeatRefused("heartbeat_unauthorized", "the gateway token was rotated")
                        break
                    book.beat(instance_id)
                if not message.get("more_body", False):
                    break
        finally:
            if task is not None:
                book.streams.discard(task)
            if not by_server:
                book.stream_closed(instance_id)
        with contextlib.suppress(OSError, RuntimeError):
            await _answer(send, 503 if by_server else 401 if refused else 204, refused)


async def _answer(send: Send, status: int, refused: BeatRefused | None) -> None:
    headers = [(b"content-type", b"application/json")]
    body = b""
    if refused is not None:
        body = json.dumps({"error": {"code": refused.code, "message": refused.message, "status": status}}).encode()
        headers.append((b"www-authenticate", b"sandkeep-gateway-token"))
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
