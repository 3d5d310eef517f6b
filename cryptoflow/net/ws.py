"""WebSocket client connections: wsproto driven directly on a trio stream.

Why not trio-websocket (used by the simulator's server side): its client runs a reader
task per connection that parses frames and hands each message through a memory channel
to `get_message()`, a task switch and a channel hop per message. At ~1,400 KuCoin
one-change frames/s that overhead was the largest block of the collector's profile
(docs/benchmarks.md). Here the task that consumes messages reads the socket itself: one
`receive_some` of up to 64 KiB, every complete message in it parsed by wsproto in one
go, handed out as a burst (`receive_burst`) or one by one (`get_message`).

A shard's source IP is bound on the TCP stream (`local_address=`), TLS is added for
wss. Server pings are answered as they are read; a server close is answered and ends the
connection after every message that came before it has been handed out. Failures are
`WsClosed` / `WsHandshakeError`, both `TransportError` (cryptoflow.errors): the stream
runner reconnects on them.
"""

from __future__ import annotations

import math
import ssl
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from urllib.parse import urlsplit

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from cryptoflow.errors import TransportError

_SSL_CONTEXT: ssl.SSLContext | None = None


def _ssl_context() -> ssl.SSLContext:
    global _SSL_CONTEXT
    if _SSL_CONTEXT is None:
        _SSL_CONTEXT = ssl.create_default_context()
    return _SSL_CONTEXT


#: bytes per socket read. 4 KiB (trio-websocket's default) was one read per scheduler
#: pass: on a busy loop a 30 KB book snapshot took ~0.5 s to read. 64 KiB is trio's own.
RECEIVE_BYTES = 64 * 1024

#: close code for "connection lost without a close frame" (RFC 6455 §7.1.5)
ABNORMAL_CLOSURE = 1006
MESSAGE_TOO_BIG = 1009


class WsClosed(TransportError):
    """The connection is closed: by the venue (its close code and reason), the network or us."""

    def __init__(self, code: int, reason: str = "") -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"WebSocket closed ({code}{': ' + reason if reason else ''})")


class WsHandshakeError(TransportError):
    """The server refused the WebSocket upgrade (HTTP status, body) or broke it off."""


class WsConnection:
    """One client connection. Not for concurrent readers; sends may come from any task."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        max_message_size: int = 16 * 1024 * 1024,
        receive_bytes: int = RECEIVE_BYTES,
    ) -> None:
        self._stream = stream
        self._proto = WSConnection(ConnectionType.CLIENT)
        self._max_message_size = max_message_size
        self._receive_bytes = receive_bytes
        self._pending: deque[str | bytes] = deque()
        self._parts: list[str | bytes] = []  # fragments of the message being received
        self._parts_size = 0
        self._send_lock = trio.Lock()
        self._closed: WsClosed | None = None
        self._accepted = False
        self._reject_status = 0

    @property
    def closed(self) -> WsClosed | None:
        """Why the connection ended, once it has (messages may still be pending)."""
        return self._closed

    async def handshake(self, host: str, resource: str) -> None:
        """Send the upgrade request and wait for the server's answer."""
        await self._send_bytes(self._proto.send(Request(host=host, target=resource)))
        while not self._accepted:
            if self._closed is not None:
                raise WsHandshakeError(f"connection closed during the handshake: {self._closed}")
            await self._fill()

    async def get_message(self) -> str | bytes:
        """The next message (text as str, binary as bytes)."""
        while not self._pending:
            if self._closed is not None:
                raise self._closed
            await self._fill()
        return self._pending.popleft()

    async def receive_burst(self) -> list[str | bytes]:
        """Every message already received, after reading the socket if there are none.

        Always a checkpoint; never empty (raises `WsClosed` once all messages are out)."""
        if self._pending:
            await trio.lowlevel.checkpoint()
        while not self._pending:
            if self._closed is not None:
                raise self._closed
            await self._fill()
        burst = list(self._pending)
        self._pending.clear()
        return burst

    async def send_message(self, message: str | bytes) -> None:
        if self._closed is not None or self._proto.state is not ConnectionState.OPEN:
            raise self._closed or WsClosed(ABNORMAL_CLOSURE, "connection is not open")
        await self._send_bytes(self._proto.send(Message(data=message)))

    async def aclose(self, code: int = 1000) -> None:
        """Close handshake (send ours, read until the server's), then close the stream.

        Bound it with a cancel scope: a server that never answers keeps this waiting."""
        try:
            if self._proto.state is ConnectionState.OPEN:
                await self._send_bytes(self._proto.send(CloseConnection(code=code)))
                while self._closed is None:
                    await self._fill()
        except (WsClosed, WsHandshakeError):
            pass
        finally:
            if self._closed is None:
                self._closed = WsClosed(code, "closed by us")
            await trio.aclose_forcefully(self._stream)

    # -- internals ---------------------------------------------------------------------

    async def _send_bytes(self, data: bytes) -> None:
        async with self._send_lock:
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise self._lost(f"send failed: {exc}") from None

    def _lost(self, reason: str) -> WsClosed:
        if self._closed is None:
            self._closed = WsClosed(ABNORMAL_CLOSURE, reason)
        return self._closed

    async def _fill(self) -> None:
        """One socket read; every complete message in it goes to `_pending`."""
        try:
            data = await self._stream.receive_some(self._receive_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise self._lost(f"connection lost: {exc}") from None
        if not data:
            raise self._lost("connection closed without a close frame")
        try:
            self._proto.receive_data(data)
            for event in self._proto.events():
                if isinstance(event, (TextMessage, BytesMessage)):
                    self._message(event)
                elif isinstance(event, Ping):
                    await self._send_bytes(self._proto.send(event.response()))
                elif isinstance(event, CloseConnection):
                    await self._close_received(event)
                    return
                elif isinstance(event, AcceptConnection):
                    self._accepted = True
                elif isinstance(event, RejectConnection):
                    if not event.has_body:
                        raise WsHandshakeError(f"upgrade refused: HTTP {event.status_code}")
                    self._reject_status = event.status_code
                elif isinstance(event, RejectData):
                    self._parts.append(bytes(event.data))
                    if event.body_finished:
                        body = b"".join(self._parts)[:200].decode("utf-8", "replace")  # type: ignore[arg-type]
                        raise WsHandshakeError(
                            f"upgrade refused: HTTP {self._reject_status}: {body}"
                        )
                # Pong and anything else: nothing to do
        except (LocalProtocolError, RemoteProtocolError) as exc:
            raise WsHandshakeError(f"WebSocket protocol error: {exc}") from None

    def _message(self, event: TextMessage | BytesMessage) -> None:
        data = event.data
        if event.message_finished and not self._parts:
            self._pending.append(data if isinstance(data, str) else bytes(data))
            return
        self._parts.append(data)
        self._parts_size += len(data)
        if self._parts_size > self._max_message_size:
            self._parts.clear()
            raise self._lost(f"message larger than {self._max_message_size} bytes")
        if event.message_finished:
            joiner = "" if isinstance(data, str) else b""
            self._pending.append(joiner.join(self._parts))  # type: ignore[arg-type]
            self._parts.clear()
            self._parts_size = 0

    async def _close_received(self, event: CloseConnection) -> None:
        self._closed = WsClosed(event.code, event.reason or "")
        if self._proto.state is ConnectionState.REMOTE_CLOSING:
            # answer the close (best effort: the server may already be gone)
            with suppress(WsClosed):
                await self._send_bytes(self._proto.send(event.response()))


@asynccontextmanager
async def open_ws(
    url: str,
    *,
    source_ip: str | None = None,
    connect_timeout: float = 10.0,
    max_message_size: int = 16 * 1024 * 1024,
) -> AsyncIterator[WsConnection]:
    """Connect (from `source_ip` when given), upgrade, and close on exit (bounded)."""
    parts = urlsplit(url)
    secure = parts.scheme == "wss"
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if secure else 80)
    resource = parts.path or "/"
    if parts.query:
        resource += "?" + parts.query
    with trio.fail_after(connect_timeout):
        stream: trio.abc.Stream = await trio.open_tcp_stream(host, port, local_address=source_ip)
        try:
            if secure:
                ssl_stream = trio.SSLStream(stream, _ssl_context(), server_hostname=host)
                await ssl_stream.do_handshake()
                stream = ssl_stream
            ws = WsConnection(stream, max_message_size=max_message_size)
            await ws.handshake(host if port in (80, 443) else f"{host}:{port}", resource)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
    try:
        yield ws
    finally:
        # On shutdown (cancelled) send our close frame but do not wait the full 2 s for
        # the server's answer.
        cancelled = trio.current_effective_deadline() == -math.inf
        with trio.move_on_after(0.1 if cancelled else 2) as cleanup:
            cleanup.shield = True
            await ws.aclose()  # closes the stream even when cut short
