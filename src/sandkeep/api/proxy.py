"""The one streaming proxy to an instance's gateway: the API's gateway route and the web UI's Open link.

The request is sent upstream and the answer streams back as it arrives (raw bytes, so ``content-length`` and
``content-encoding`` stay true); hop-by-hop headers (and whatever else the caller names) are dropped. A
gateway that cannot be reached raises :class:`GatewayUnreachable`; a stream that breaks after the status
line went out ends the body and is reported through ``on_broken``.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable

import httpx
from starlette.background import BackgroundTask
from starlette.responses import StreamingResponse

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                        "trailers", "transfer-encoding", "upgrade"})


class GatewayUnreachable(Exception):
    """The gateway did not answer (``timed_out``) or could not be reached at all."""

    def __init__(self, error: httpx.HTTPError) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.error = error
        self.timed_out = isinstance(error, httpx.TimeoutException)


async def stream_gateway(client: httpx.AsyncClient, method: str, url: str, *, headers: Iterable[tuple[str, str]],
                         params: httpx.QueryParams | None = None,
                         content: AsyncIterable[bytes] | None = None,
                         drop_headers: frozenset[str] = HOP_BY_HOP, add_headers: dict[str, str] | None = None,
                         on_broken: Callable[[str], None] | None = None,
                         close_client: bool = False) -> StreamingResponse:
    """Send the request upstream and stream the answer back. ``close_client`` closes ``client`` once the
    answer is done (a client made for this one request)."""
    request = client.build_request(method, url, params=params, headers=list(headers), content=content)
    try:
        upstream = await client.send(request, stream=True)
    except httpx.HTTPError as exc:
        if close_client:
            await client.aclose()
        raise GatewayUnreachable(exc) from exc
    out = {k: v for k, v in upstream.headers.items() if k.lower() not in drop_headers}
    out.update(add_headers or {})

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in upstream.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:  # the status line is out already: end the stream, say why
            if on_broken is not None:
                on_broken(f"{type(exc).__name__}: {exc}")

    async def close() -> None:
        await upstream.aclose()
        if close_client:
            await client.aclose()

    return StreamingResponse(body(), status_code=upstream.status_code, headers=out, background=BackgroundTask(close))
