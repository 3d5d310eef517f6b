"""A tiny scripted WebSocket server on 127.0.0.1 for venue client tests."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket


@attrs.define
class FakeWs:
    """Each accepted connection runs `script(ws, conn_no, fake)`; received text is kept."""

    script: Callable[[WebSocketConnection, int, FakeWs], Awaitable[None]]
    received: list[tuple[int, str]] = attrs.field(factory=list)
    paths: list[str] = attrs.field(factory=list)
    connections: int = 0
    port: int = 0
    got: trio.Event = attrs.field(factory=trio.Event)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def texts(self, conn: int | None = None) -> list[str]:
        return [t for c, t in self.received if conn is None or c == conn]

    async def recv(self, ws: WebSocketConnection, conn: int) -> str:
        msg = await ws.get_message()
        self.received.append((conn, msg))
        self.got.set()
        self.got = trio.Event()
        return msg

    async def drain(self, ws: WebSocketConnection, conn: int) -> None:
        """Keep recording what the client sends until it closes."""
        while True:
            await self.recv(ws, conn)

    async def handler(self, request: WebSocketRequest) -> None:
        self.paths.append(request.path)
        ws = await request.accept()
        self.connections += 1
        with contextlib.suppress(ConnectionClosed):
            await self.script(ws, self.connections, self)


async def start_fake(nursery: trio.Nursery, script) -> FakeWs:
    fake = FakeWs(script)
    server = await nursery.start(serve_websocket, fake.handler, "127.0.0.1", 0, None)
    fake.port = server.port
    return fake


async def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.01)
