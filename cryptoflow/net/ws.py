"""WebSocket client connections: a hand-written RFC 6455 frame codec on a trio stream.

Why not trio-websocket (used by the simulator's server side): its client runs a reader
task per connection that parses frames and hands each message through a memory channel
to `get_message()`, a task switch and a channel hop per message. At ~1,400 KuCoin
one-change frames/s that overhead was the largest block of the collector's profile
(docs/benchmarks.md). Here the task that consumes messages reads the socket itself: one
`receive_some` of up to 64 KiB, every complete message in it parsed in one go, handed
out as a burst (`receive_burst`) or one by one (`get_message`).

Why the frames are not parsed by wsproto: with the reader task gone, wsproto's per-frame
parsing (`process_buffer`, `parse_header`, `process_frame`, `events()`) became the
largest per-frame cost of the collector, ~45 µs/frame under cProfile at ~2,800 frames/s.
Server frames are unmasked and nearly all small whole text frames, so `FrameDecoder`
parses them with a few index reads and one slice-decode each. scripts/bench_ws.py
(100,000 ~200-byte KuCoin level2 frames in 64 KiB reads, no sockets, no profiler):
wsproto 11.7 µs/frame, `FrameDecoder.feed` 0.69 µs/frame (x17). wsproto still does the
HTTP upgrade handshake.

A shard's source IP is bound on the TCP stream (`local_address=`), TLS is added for
wss. Server pings are answered as they are read; a server close is answered and ends the
connection after every message that came before it has been handed out. A server that
breaks the protocol gets a close frame (1002; 1007 for bad UTF-8; 1009 for a message over
`max_message_size`). Failures are `WsClosed` / `WsHandshakeError`, both `TransportError`
(cryptoflow.errors): the stream runner reconnects on them.
"""

from __future__ import annotations

import math
import re
import ssl
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from urllib.parse import urlsplit

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, RejectConnection, RejectData, Request
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from cryptoflow.errors import TransportError
from cryptoflow.net.connect import describe_connect_failure
from cryptoflow.net.wsframe import (
    ABNORMAL_CLOSURE,
    OP_BINARY,
    OP_PONG,
    OP_TEXT,
    FrameDecoder,
    FrameError,
    close_frame,
    encode_frame,
)

_SSL_CONTEXT: ssl.SSLContext | None = None


def _ssl_context() -> ssl.SSLContext:
    global _SSL_CONTEXT
    if _SSL_CONTEXT is None:
        _SSL_CONTEXT = ssl.create_default_context()
    return _SSL_CONTEXT


#: bytes per socket read. 4 KiB (trio-websocket's default) was one read per scheduler
#: pass: on a busy loop a 30 KB book snapshot took ~0.5 s to read. 64 KiB is trio's own.
RECEIVE_BYTES = 64 * 1024

#: end of the HTTP response head (h11 accepts bare LF line endings too)
_HEAD_END = re.compile(b"\n\r?\n")
_MAX_HEAD = 64 * 1024
#: how long a best-effort close frame may take to send when we fail the connection
_CLOSE_SEND_TIMEOUT = 1.0


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
        self._decoder = FrameDecoder(max_message_size)
        self._receive_bytes = receive_bytes
        self._pending: deque[str | bytes] = deque()
        self._send_lock = trio.Lock()
        self._closed: WsClosed | None = None
        self._open = False  # upgraded, and we have sent no close frame

    @property
    def closed(self) -> WsClosed | None:
        """Why the connection ended, once it has (messages may still be pending)."""
        return self._closed

    async def handshake(self, host: str, resource: str) -> None:
        """Send the upgrade request and wait for the server's answer.

        Only the response head goes to wsproto: what follows it in the same read is
        already WebSocket frames (or, on a refusal, the HTTP body)."""
        proto = WSConnection(ConnectionType.CLIENT)
        await self._send_bytes(proto.send(Request(host=host, target=resource)))
        received = bytearray()
        while (head_end := _HEAD_END.search(received)) is None:
            if len(received) > _MAX_HEAD:
                raise WsHandshakeError(f"response head longer than {_MAX_HEAD} bytes")
            received += await self._handshake_read()
        rest = bytes(received[head_end.end() :])
        try:
            proto.receive_data(bytes(received[: head_end.end()]))
            event = next(proto.events(), None)
            if isinstance(event, AcceptConnection):
                self._open = True
                if rest:
                    await self._received(rest)
                return
            if not isinstance(event, RejectConnection):
                raise WsHandshakeError(f"unexpected answer to the upgrade: {event!r}")
            if not event.has_body:
                raise WsHandshakeError(f"upgrade refused: HTTP {event.status_code}")
            body = (await self._refusal_body(proto, rest)).decode("utf-8", "replace")
            raise WsHandshakeError(f"upgrade refused: HTTP {event.status_code}: {body}")
        except (LocalProtocolError, RemoteProtocolError) as exc:
            raise WsHandshakeError(f"WebSocket protocol error: {exc}") from None

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
        if self._closed is not None or not self._open:
            raise self._closed or WsClosed(ABNORMAL_CLOSURE, "connection is not open")
        if isinstance(message, str):
            frame = encode_frame(OP_TEXT, message.encode())
        else:
            frame = encode_frame(OP_BINARY, message)
        await self._send_bytes(frame)

    async def start_close(self, code: int = 1000) -> None:
        """Send our close frame and return; go on reading as before.

        What the server sent before it saw our close still comes out of `receive_burst`
        and `get_message`, then its close answer ends the connection (`WsClosed`). Why:
        a graceful stop reads to the end of what the venue sent instead of dropping the
        frames already on the wire. No message may be sent after this."""
        if self._open and self._closed is None:
            self._open = False
            await self._send_bytes(close_frame(code))

    async def aclose(self, code: int = 1000) -> None:
        """Close handshake (send ours, read until the server's), then close the stream.

        Bound it with a cancel scope: a server that never answers keeps this waiting."""
        try:
            if self._open and self._closed is None:
                self._open = False
                await self._send_bytes(close_frame(code))
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

    async def _read(self) -> bytes:
        try:
            data = await self._stream.receive_some(self._receive_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise self._lost(f"connection lost: {exc}") from None
        if not data:
            raise self._lost("connection closed without a close frame")
        return data

    async def _handshake_read(self) -> bytes:
        try:
            return await self._read()
        except WsClosed as exc:
            raise WsHandshakeError(f"connection closed during the handshake: {exc}") from None

    async def _refusal_body(self, proto: WSConnection, data: bytes) -> bytes:
        """The start of a refused upgrade's HTTP body (what names the refusal)."""
        body = bytearray()
        while len(body) < 200:
            if data:
                proto.receive_data(data)
            for event in proto.events():
                if isinstance(event, RejectData):
                    body += event.data
                    if event.body_finished:
                        return bytes(body[:200])
            try:
                data = await self._read()
            except WsClosed:  # a body that ends with the connection, or a cut one
                break
        return bytes(body[:200])

    async def _fill(self) -> None:
        """One socket read; every complete message in it goes to `_pending`."""
        await self._received(await self._read())

    async def _received(self, data: bytes) -> None:
        decoder = self._decoder
        try:
            decoder.feed(data, self._pending)
        except FrameError as exc:
            # fail the connection; messages parsed before the error are still handed out
            self._closed = WsClosed(exc.code, exc.reason)
            await self._send_close(exc.code, exc.reason)
            return
        if decoder.pings:
            pings, decoder.pings = decoder.pings, []
            with suppress(WsClosed):  # a failed send has set `_closed`: raised after `_pending`
                for payload in pings:
                    if self._open:
                        await self._send_bytes(encode_frame(OP_PONG, payload))
        if decoder.close is not None and self._closed is None:
            code, reason = decoder.close
            self._closed = WsClosed(code, reason)
            await self._send_close(code)  # answer the server's close

    async def _send_close(self, code: int, reason: str = "") -> None:
        """Best effort (the server may be gone or not reading), bounded, and only once."""
        if not self._open:
            return
        self._open = False
        with trio.move_on_after(_CLOSE_SEND_TIMEOUT), suppress(WsClosed):
            await self._send_bytes(close_frame(code, reason))


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
        try:
            stream: trio.abc.Stream = await trio.open_tcp_stream(
                host, port, local_address=source_ip
            )
        except OSError as exc:  # trio's message hides the cause (a source IP not here)
            raise OSError(describe_connect_failure(exc, source_ip)) from exc
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
