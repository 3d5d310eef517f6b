"""WebSocket connections bound to a shard's source IP.

trio-websocket's `open_websocket_url` cannot bind a local address, so when a shard names
one we open the TCP stream ourselves (`local_address=`), add TLS for wss, and wrap it
(tooling-notes). Server pings are answered by trio-websocket itself.
"""

from __future__ import annotations

import math
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import trio
import trio_websocket

_SSL_CONTEXT: ssl.SSLContext | None = None


def _ssl_context() -> ssl.SSLContext:
    global _SSL_CONTEXT
    if _SSL_CONTEXT is None:
        _SSL_CONTEXT = ssl.create_default_context()
    return _SSL_CONTEXT


#: bytes per socket read. trio-websocket's default, 4 KiB, is one read per scheduler pass:
#: on a busy loop (all venues, 125 streams) a 30 KB book snapshot took ~0.5 s to read and
#: a connection's backlog grew for tens of seconds. 64 KiB is trio's own default.
RECEIVE_BYTES = 64 * 1024


@asynccontextmanager
async def open_ws(
    url: str,
    *,
    source_ip: str | None = None,
    connect_timeout: float = 10.0,
    max_message_size: int = 16 * 1024 * 1024,
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    parts = urlsplit(url)
    secure = parts.scheme == "wss"
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if secure else 80)
    resource = parts.path or "/"
    if parts.query:
        resource += "?" + parts.query
    async with trio.open_nursery() as nursery:
        with trio.fail_after(connect_timeout):
            stream: trio.abc.Stream = await trio.open_tcp_stream(
                host, port, local_address=source_ip
            )
            if secure:
                ssl_stream = trio.SSLStream(stream, _ssl_context(), server_hostname=host)
                await ssl_stream.do_handshake()
                stream = ssl_stream
            ws = await trio_websocket.wrap_client_stream(
                nursery,
                stream,
                host if port in (80, 443) else f"{host}:{port}",
                resource,
                message_queue_size=64,
                max_message_size=max_message_size,
                receive_buffer_size=RECEIVE_BYTES,
            )
        try:
            yield ws
        finally:
            # When we are being cancelled (shutdown), the connection's reader task in
            # `nursery` is cancelled too, so the server's close reply is never read:
            # send our close frame, but do not wait the full 2 s for the handshake.
            cancelled = trio.current_effective_deadline() == -math.inf
            with trio.move_on_after(0.1 if cancelled else 2) as cleanup:
                cleanup.shield = True
                await ws.aclose()
            nursery.cancel_scope.cancel()
