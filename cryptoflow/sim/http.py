"""A tiny HTTP/1.1 server on trio + h11 (keep-alive, one request at a time per
connection) with a route table that venue modules fill in."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import h11
import orjson
import trio

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20
IDLE_TIMEOUT = 75.0


@dataclass
class HttpRequest:
    method: str
    target: str  # raw target, path + query
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    client_ip: str

    def json(self) -> Any:
        return orjson.loads(self.body) if self.body else None


@dataclass
class HttpResponse:
    status: int = 200
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    content_type: str = "application/json"
    # set by venue handlers so the dispatcher can apply body faults and account levels
    payload: Any = None  # the JSON object before encoding
    symbol: str | None = None
    levels: int = 0

    @classmethod
    def json(cls, obj: Any, status: int = 200, **kw: Any) -> HttpResponse:
        return cls(status=status, body=orjson.dumps(obj), payload=obj, **kw)

    def make_undecodable(self) -> None:
        """The ``rest_undecodable`` fault: a gzip encoding the body does not have, so the
        client's decoding fails (a response came; its body cannot be read)."""
        self.headers.append(("Content-Encoding", "gzip"))
        self.body = b"this body is not gzip"
        self.levels = 0


Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]


async def serve_http(
    handler: Handler,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``handler`` on host:port; ``task_status.started`` gets the listeners."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    async with trio.open_nursery() as nursery:
        task_status.started(listeners)
        await trio.serve_listeners(
            lambda stream: _serve_connection(stream, handler), listeners, handler_nursery=nursery
        )


async def _send(stream: trio.SocketStream, conn: h11.Connection, event: Any) -> None:
    data = conn.send(event)
    if data:
        await stream.send_all(data)


async def _next_event(stream: trio.SocketStream, conn: h11.Connection) -> Any:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            with trio.fail_after(IDLE_TIMEOUT):
                data = await stream.receive_some(65536)
            conn.receive_data(data)
            continue
        return event


async def _serve_connection(stream: trio.SocketStream, handler: Handler) -> None:
    try:
        ip = stream.socket.getpeername()[0]
    except OSError:
        return
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=65536)
    try:
        while True:
            event = await _next_event(stream, conn)
            if isinstance(event, h11.ConnectionClosed):
                return
            if not isinstance(event, h11.Request):
                return
            body = b""
            while True:
                ev = await _next_event(stream, conn)
                if isinstance(ev, h11.Data):
                    body += ev.data
                    if len(body) > MAX_BODY:
                        raise h11.RemoteProtocolError("body too large")
                elif isinstance(ev, h11.EndOfMessage):
                    break
                else:
                    return
            target = event.target.decode("latin-1")
            parts = urlsplit(target)
            req = HttpRequest(
                method=event.method.decode("ascii"),
                target=target,
                path=parts.path,
                query=dict(parse_qsl(parts.query, keep_blank_values=True)),
                headers={
                    k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers
                },
                body=body,
                client_ip=ip,
            )
            try:
                resp = await handler(req)
            except Exception:  # a bug in a route must not kill the server
                log.exception("sim: handler failed for %s", target)
                resp = HttpResponse.json({"code": -1000, "msg": "internal error"}, status=500)
            headers = [
                ("Content-Type", resp.content_type),
                ("Content-Length", str(len(resp.body))),
                *resp.headers,
            ]
            await _send(stream, conn, h11.Response(status_code=resp.status, headers=headers))
            await _send(stream, conn, h11.Data(data=resp.body))
            await _send(stream, conn, h11.EndOfMessage())
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()
    except h11.RemoteProtocolError:
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            try:
                await _send(
                    stream,
                    conn,
                    h11.Response(
                        status_code=400, headers=[("Content-Length", "0"), ("Connection", "close")]
                    ),
                )
                await _send(stream, conn, h11.EndOfMessage())
            except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
                pass
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError):
        pass
    finally:
        with trio.move_on_after(1) as cs:
            cs.shield = True
            await stream.aclose()
