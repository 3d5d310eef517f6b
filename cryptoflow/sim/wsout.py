"""Outgoing side of one simulator WebSocket connection: a queue and one writer task; and
how the simulator ends a connection (`close_ws`, `abort_ws`).

Why: trio-websocket's ``send_message`` holds the connection's send lock across the
socket write, which is a scheduler checkpoint, so a connection sends at most one message
per scheduler pass, whoever sends it. One KuCoin connection of the seed table carries
~2,000 one-change messages/s from 32 stream tasks; any pass slowed by other work (a book
tick, a 1000-level REST snapshot) left them queued behind the lock, and their event
times (stamped at the tick) grew seconds old before they left.

Here a send queues its message and waits until the connection's writer has written
it, as ``send_message`` waits for its write; the writer takes everything queued by then,
from all the connection's stream tasks, and writes it in one ``send_all`` (one syscall
and one scheduler pass for all of them). So one stream's messages still leave one after
the other as before (a fault queued meanwhile hits one of its next messages), while the
connection as a whole no longer sends one message per pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection
from wsproto.events import TextMessage


async def send_texts(ws: WebSocketConnection, texts: Sequence[str]) -> None:
    """Send text messages in order in one socket write (``send_message`` is one write per
    message). Same checks and errors as ``send_message``: ``ConnectionClosed`` once the
    connection is closing."""
    if len(texts) == 1 or not _BATCHED_SEND:
        for t in texts:
            await ws.send_message(t)
        return
    if ws._close_reason:
        raise ConnectionClosed(ws._close_reason)
    encode = ws._wsproto.send
    data = b"".join([encode(TextMessage(data=t)) for t in texts])
    async with ws._stream_lock:  # what trio-websocket's `_send` does for one message
        try:
            await ws._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await ws._abort_web_socket()
            assert ws._close_reason is not None
            raise ConnectionClosed(ws._close_reason) from None


#: the trio-websocket (0.12) internals `send_texts` writes through; without them it falls
#: back to one `send_message` per text
_BATCHED_SEND = hasattr(WebSocketConnection, "_abort_web_socket") and (
    "_stream_lock" in WebSocketConnection.__init__.__code__.co_names
)


class Outbox:
    """Queued text messages of one connection; ``run`` (one task) writes them."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.items: list[str] = []
        self.writes = 0  # socket writes so far (stats / tests)
        self.queued = 0  # messages queued so far
        self.messages = 0  # messages written so far
        self._writing = False
        self._wake: trio.Event | None = None  # the writer waits for messages
        self._progress: trio.Event | None = None  # senders / flush wait for the writer
        self._closed: ConnectionClosed | None = None

    def _check(self) -> None:
        if self._closed is not None:
            raise ConnectionClosed(self._closed.reason)
        if self.ws.closed is not None:
            raise ConnectionClosed(self.ws.closed)

    async def _wait_progress(self) -> None:
        if self._progress is None:
            self._progress = trio.Event()
        await self._progress.wait()

    async def send(self, text: str) -> None:
        """Queue one message and wait until it has been written (``ConnectionClosed``
        once the connection is gone)."""
        await self.send_many([text])

    async def send_many(self, texts: Sequence[str]) -> None:
        """Queue messages (in order) and wait until they have been written."""
        self._check()
        self.items.extend(texts)
        self.queued += len(texts)
        mine = self.queued
        if self._wake is not None:
            self._wake.set()
            self._wake = None
        while self.messages < mine:
            self._check()
            await self._wait_progress()

    async def flush(self) -> None:
        """Until everything queued so far has been written."""
        while self.items or self._writing:
            self._check()
            await self._wait_progress()

    async def run(self) -> None:
        """The writer: everything queued, one write at a time, until the connection
        fails (then ``ConnectionClosed``; later ``send`` calls raise it too)."""
        try:
            while True:
                while not self.items:
                    self._wake = trio.Event()
                    await self._wake.wait()
                items, self.items = self.items, []
                self._writing = True
                await send_texts(self.ws, items)
                self._writing = False
                self.writes += 1
                self.messages += len(items)
                self._notify()
        except ConnectionClosed as exc:
            self._closed = exc
            raise
        finally:
            self._writing = False
            if self._closed is None:
                self._closed = ConnectionClosed(self.ws.closed)  # type: ignore[arg-type]
            self._notify()

    def _notify(self) -> None:
        if self._progress is not None:
            self._progress.set()
            self._progress = None


#: how long the flush before a close, and the close handshake, may each take (then the
#: TCP connection is closed anyway)
CLOSE_TIMEOUT = 1.0


async def close_ws(outbox: Outbox, code: int, reason: str) -> None:
    """Close the connection the way a venue does: everything queued before the close goes
    out, then a close frame with ``code`` and ``reason``; the TCP connection is closed
    once the client answers it (bounded by ``CLOSE_TIMEOUT`` each).

    The handshake is shielded: once it begins, every other send on the connection raises
    ``ConnectionClosed`` and the task that made it cancels the connection's tasks, this
    one included. Unshielded, that cancel could land before the close frame was written
    (it waits for the send lock), and the client saw the TCP connection end without one
    (1006) whenever several streams shared the connection."""
    with trio.move_on_after(CLOSE_TIMEOUT), contextlib.suppress(ConnectionClosed):
        await outbox.flush()
    with trio.move_on_after(CLOSE_TIMEOUT) as cs:
        cs.shield = True
        await outbox.ws.aclose(code=code, reason=reason)


async def abort_ws(ws: WebSocketConnection) -> None:
    """Close the TCP connection without a close frame (the ``ws_abort`` fault): the
    client sees the connection end abnormally (1006), as after a network failure."""
    await trio.aclose_forcefully(ws._stream)
