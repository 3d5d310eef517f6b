"""Our WebSocket client (`cryptoflow.net.ws`) against real servers on 127.0.0.1.

The peers: trio-websocket's server (another implementation, as the simulator uses) and,
for what it cannot send (fragments, oversized messages, a bare TCP drop), wsproto's
server side driven by hand."""

from __future__ import annotations

from functools import partial

import pytest
import trio
import trio_websocket
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Message, Request

from cryptoflow.errors import TransportError
from cryptoflow.net.ws import WsClosed, WsHandshakeError, open_ws


async def _serve(nursery: trio.Nursery, handler) -> str:
    server = await nursery.start(trio_websocket.serve_websocket, handler, "127.0.0.1", 0, None)
    return f"ws://127.0.0.1:{server.port}/stream?x=1"


async def test_burst_delivers_every_message_in_order_then_the_close_code():
    sent = trio.Event()

    async def handler(request):
        ws = await request.accept()
        for i in range(50):
            await ws.send_message(f"m{i}")
        await ws.send_message(b"\x00binary")
        sent.set()
        await ws.aclose(code=1001, reason="going away")

    got: list[str | bytes] = []
    bursts: list[int] = []
    async with trio.open_nursery() as nursery:
        url = await _serve(nursery, handler)
        async with open_ws(url) as ws:
            await sent.wait()
            with pytest.raises(WsClosed) as closed, trio.fail_after(5):
                while True:
                    burst = await ws.receive_burst()
                    bursts.append(len(burst))
                    got.extend(burst)
        nursery.cancel_scope.cancel()
    assert got == [f"m{i}" for i in range(50)] + [b"\x00binary"]
    assert max(bursts) > 1  # messages already in the socket come out together
    assert closed.value.code == 1001 and closed.value.reason == "going away"
    assert isinstance(closed.value, TransportError)


async def test_server_ping_is_answered_and_our_close_is_a_clean_handshake():
    outcome: dict[str, object] = {}

    async def handler(request):
        ws = await request.accept()
        with trio.fail_after(5):
            await ws.ping(b"are-you-there")  # returns when our pong arrives
        outcome["pong"] = True
        await ws.send_message("after-ping")
        try:
            await ws.get_message()
        except trio_websocket.ConnectionClosed as exc:
            outcome["close_code"] = exc.reason.code

    async with trio.open_nursery() as nursery:
        url = await _serve(nursery, handler)
        async with open_ws(url) as ws:
            with trio.fail_after(5):
                assert await ws.get_message() == "after-ping"
        with trio.fail_after(5):
            while "close_code" not in outcome:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert outcome == {"pong": True, "close_code": 1000}


async def test_sends_from_two_tasks_arrive_whole_and_a_closed_socket_refuses_sends():
    received: list[str] = []

    async def handler(request):
        ws = await request.accept()
        try:
            while True:
                received.append(await ws.get_message())
        except trio_websocket.ConnectionClosed:
            pass

    async with trio.open_nursery() as nursery:
        url = await _serve(nursery, handler)
        async with open_ws(url) as ws:

            async def sender(tag: str) -> None:
                for i in range(100):
                    await ws.send_message(f"{tag}{i}:" + "x" * 5000)

            async with trio.open_nursery() as senders:
                senders.start_soon(sender, "a")
                senders.start_soon(sender, "b")
            held = ws
        with pytest.raises(WsClosed):
            await held.send_message("too late")
        with trio.fail_after(5):
            while len(received) < 200:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert sorted(received) == sorted(f"{t}{i}:" + "x" * 5000 for t in "ab" for i in range(100))


async def test_rejected_upgrade_names_the_status_and_body():
    async def handler(request):
        await request.reject(403, body=b"token expired")

    async with trio.open_nursery() as nursery:
        url = await _serve(nursery, handler)
        with pytest.raises(WsHandshakeError, match=r"403.*token expired"):
            async with open_ws(url):
                pass
        nursery.cancel_scope.cancel()


async def _raw_server(nursery: trio.Nursery, script) -> str:
    """A wsproto server on a bare socket: `script(stream, conn)` after the upgrade."""

    async def handle(stream: trio.SocketStream) -> None:
        conn = WSConnection(ConnectionType.SERVER)
        while True:
            conn.receive_data(await stream.receive_some(65536))
            for event in conn.events():
                if isinstance(event, Request):
                    await stream.send_all(conn.send(AcceptConnection()))
                    await script(stream, conn)
                    return

    listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    return f"ws://127.0.0.1:{listeners[0].socket.getsockname()[1]}/"


async def test_fragmented_messages_are_joined():
    async def script(stream, conn):
        parts = ["{", '"a":', "1}"]
        for i, part in enumerate(parts):
            done = i == len(parts) - 1
            await stream.send_all(conn.send(Message(data=part, message_finished=done)))
        await stream.send_all(conn.send(Message(data=b"ab", message_finished=False)))
        await stream.send_all(conn.send(Message(data=b"cd", message_finished=True)))
        await trio.sleep(5)

    async with trio.open_nursery() as nursery:
        url = await _raw_server(nursery, script)
        async with open_ws(url) as ws:
            with trio.fail_after(5):
                assert await ws.get_message() == '{"a":1}'
                assert await ws.get_message() == b"abcd"
        nursery.cancel_scope.cancel()


async def test_oversized_message_and_tcp_drop_are_connection_losses():
    async def too_big(stream, conn):
        for _ in range(4):
            await stream.send_all(conn.send(Message(data="x" * 400, message_finished=False)))
        await trio.sleep(5)

    async def drop(stream, conn):
        await stream.send_all(conn.send(Message(data="last words")))
        await stream.aclose()  # no close frame

    async with trio.open_nursery() as nursery:
        url = await _raw_server(nursery, too_big)
        async with open_ws(url, max_message_size=1000) as ws:
            with pytest.raises(WsClosed, match="larger than 1000"), trio.fail_after(5):
                await ws.get_message()
        url = await _raw_server(nursery, drop)
        async with open_ws(url) as ws:
            with trio.fail_after(5):
                assert await ws.get_message() == "last words"
                with pytest.raises(WsClosed) as closed:
                    await ws.get_message()
            assert closed.value.code == 1006
        nursery.cancel_scope.cancel()


async def test_connect_refused_is_an_os_error_the_runner_retries():
    with trio.socket.socket() as probe:
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(OSError):
        async with open_ws(f"ws://127.0.0.1:{port}/"):
            pass
