"""Our WebSocket client (`cryptoflow.net.ws`) against real servers on 127.0.0.1.

The peers: trio-websocket's server (another implementation, as the simulator uses) and,
for what it cannot send (fragments, oversized messages, a bare TCP drop), wsproto's
server side driven by hand; frames that break RFC 6455 are written as raw bytes. The
frame decoder's parse step is also checked on its own (no sockets)."""

from __future__ import annotations

import os
import random
from contextlib import suppress
from functools import partial

import pytest
import trio
import trio_websocket
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection
from wsproto.events import AcceptConnection, CloseConnection, Message, Ping, Pong, Request

from cryptoflow.errors import TransportError
from cryptoflow.net.ws import WsClosed, WsHandshakeError, open_ws
from cryptoflow.net.wsframe import OP_TEXT, FrameDecoder, FrameError, encode_frame


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


async def _raw_server(nursery: trio.Nursery, script, *, with_accept: bytes = b"") -> str:
    """A wsproto server on a bare socket: `script(stream, conn)` after the upgrade.

    `with_accept`: bytes sent in the same write as the 101 response."""

    async def handle(stream: trio.SocketStream) -> None:
        conn = WSConnection(ConnectionType.SERVER)
        while True:
            conn.receive_data(await stream.receive_some(65536))
            for event in conn.events():
                if isinstance(event, Request):
                    await stream.send_all(conn.send(AcceptConnection()) + with_accept)
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


def _frame(payload: bytes, b0: int = 0x81) -> bytes:
    """A server frame written by hand (unmasked): `b0` is FIN, RSV bits and opcode."""
    n = len(payload)
    if n < 126:
        head = bytes((b0, n))
    elif n < 0x10000:
        head = bytes((b0, 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, 127)) + n.to_bytes(8, "big")
    return head + payload


async def _client_events(stream: trio.SocketStream, conn: WSConnection, until: type):
    """What our client sent, read until an event of type `until` (or the end)."""
    events = []
    while not any(isinstance(e, until) for e in events):
        data = await stream.receive_some(65536)
        conn.receive_data(data or None)
        events.extend(conn.events())
        if not data:
            break
    return events


async def _answer_close(stream: trio.SocketStream, conn: WSConnection) -> None:
    """Read until our client's close and answer it (its `aclose` then returns at once)."""
    for event in await _client_events(stream, conn, CloseConnection):
        if isinstance(event, CloseConnection):
            await stream.send_all(conn.send(event.response()))


async def test_bytes_in_the_same_read_as_the_upgrade_response_are_kept():
    async def script(stream, conn):
        with trio.fail_after(5):
            await _answer_close(stream, conn)

    early = _frame(b"first") + _frame(b"\x01\x02", 0x82)
    async with trio.open_nursery() as nursery:
        url = await _raw_server(nursery, script, with_accept=early)
        async with open_ws(url) as ws:
            with trio.fail_after(5):
                assert await ws.receive_burst() == ["first", b"\x01\x02"]
        nursery.cancel_scope.cancel()


async def test_ping_between_fragments_is_answered_and_the_message_is_whole():
    answered: list[bytes] = []

    async def script(stream, conn):
        # "h€llo" with the euro sign cut between the fragments: decoded once whole
        text = "h€llo".encode()
        await stream.send_all(_frame(text[:2], 0x01))
        await stream.send_all(conn.send(Ping(payload=b"between")))
        await stream.send_all(_frame(text[2:], 0x80))
        with trio.fail_after(5):
            events = await _client_events(stream, conn, Pong)
        answered.extend(bytes(e.payload) for e in events if isinstance(e, Pong))
        with trio.fail_after(5):
            await _answer_close(stream, conn)

    async with trio.open_nursery() as nursery:
        url = await _raw_server(nursery, script)
        async with open_ws(url) as ws:
            with trio.fail_after(5):
                assert await ws.get_message() == "h€llo"
                while not answered:
                    await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert answered == [b"between"]


async def test_7_16_and_64_bit_payload_lengths_from_trio_websocket():
    sizes = (0, 125, 126, 200, 65535, 65536, 70_000)

    def blob(n: int) -> bytes:
        return (bytes(range(256)) * (n // 256 + 1))[:n]

    async def handler(request):
        ws = await request.accept()
        for n in sizes:
            await ws.send_message("t" * n)
            await ws.send_message(blob(n))
        await trio.sleep(5)

    async with trio.open_nursery() as nursery:
        url = await _serve(nursery, handler)
        async with open_ws(url) as ws:
            with trio.fail_after(5):
                for n in sizes:
                    assert await ws.get_message() == "t" * n
                    assert await ws.get_message() == blob(n)
        nursery.cancel_scope.cancel()


async def test_our_frames_are_masked_for_every_length_encoding():
    """trio-websocket's server refuses unmasked client frames and unmasks ours: the echo
    comes back equal only if header, key and masking are right."""

    async def echo(request):
        ws = await request.accept()
        with suppress(trio_websocket.ConnectionClosed):
            while True:
                await ws.send_message(await ws.get_message())

    async with trio.open_nursery() as nursery:
        url = await _serve(nursery, echo)
        async with open_ws(url) as ws:
            with trio.fail_after(5):
                for n in (0, 1, 125, 126, 65535, 65536, 70_000):
                    text = "".join(random.Random(n).choices("abc{}:,0123456789", k=n))
                    binary = os.urandom(n)
                    await ws.send_message(text)
                    assert await ws.get_message() == text
                    await ws.send_message(binary)
                    assert await ws.get_message() == binary
        nursery.cancel_scope.cancel()
    keys = {encode_frame(OP_TEXT, b"same")[2:6] for _ in range(8)}
    assert len(keys) > 1  # a fresh random key per frame


_KEY = b"\x01\x02\x03\x04"
_MASKED = bytes((0x81, 0x85)) + _KEY + bytes(b ^ _KEY[i % 4] for i, b in enumerate(b"hello"))


@pytest.mark.parametrize(
    ("bad", "code", "reason"),
    [
        (_MASKED, 1002, "masked frame from the server"),
        (_frame(b"hi", 0xC1), 1002, "reserved bits set"),
        (_frame(b"", 0x83), 1002, "unknown opcode 0x3"),
        (_frame(b"", 0x8B), 1002, "unknown opcode 0xb"),
        (_frame(b"\x03", 0x88), 1002, "1-byte payload"),
        (_frame(b"\x03\xed", 0x88), 1002, "invalid close code 1005"),
        (_frame(b"\xff\xfe"), 1007, "invalid UTF-8"),
        (_frame(b"\xe2", 0x01) + _frame(b"\x28", 0x80), 1007, "invalid UTF-8"),
        (_frame(b"x" * 126, 0x89), 1002, "control frame longer than 125"),
        (_frame(b"", 0x09), 1002, "fragmented control frame"),
        (_frame(b"x", 0x80), 1002, "continuation frame without a message"),
        (_frame(b"a", 0x01) + _frame(b"b"), 1002, "new message inside a fragmented"),
        (bytes((0x81, 126, 0, 5)) + b"hello", 1002, "non-minimal payload length"),
    ],
)
async def test_protocol_errors_close_with_1002_or_1007_and_name_the_problem(bad, code, reason):
    client_close: list[int] = []

    async def script(stream, conn):
        await stream.send_all(conn.send(Message(data="before")) + bad + _frame(b"after"))
        with trio.fail_after(5):
            events = await _client_events(stream, conn, CloseConnection)
        client_close.extend(e.code for e in events if isinstance(e, CloseConnection))

    async with trio.open_nursery() as nursery:
        url = await _raw_server(nursery, script)
        async with open_ws(url) as ws:
            with trio.fail_after(5):
                assert await ws.get_message() == "before"  # what came before the error
                with pytest.raises(WsClosed) as closed:
                    await ws.get_message()
                with pytest.raises(WsClosed):
                    await ws.send_message("refused")
        with trio.fail_after(5):
            while not client_close:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert closed.value.code == code and reason in closed.value.reason
    assert client_close == [code]  # our close frame carries the same code


def test_decoder_gives_the_same_messages_however_the_stream_is_cut():
    server = Connection(ConnectionType.SERVER)  # wsproto as the independent encoder
    sizes = (0, 1, 125, 126, 200, 65535, 65536, 70_000)
    expected: list[str | bytes] = []
    wire = b""
    for n in sizes:
        text, binary = "é" * (n // 2), os.urandom(n)
        expected += [text, binary]
        wire += server.send(Message(data=text)) + server.send(Message(data=binary))
    # fragments of a text and a binary message, with control frames between them
    wire += _frame("h€".encode()[:2], 0x01) + _frame(b"p1", 0x89) + _frame(b"", 0x8A)
    wire += _frame("h€".encode()[2:], 0x00) + _frame(b"llo", 0x80)
    wire += server.send(Message(data=b"ab", message_finished=False))
    wire += server.send(Ping(payload=b"p2")) + server.send(Message(data=b"cd"))
    expected += ["h€llo", b"abcd"]
    wire += server.send(CloseConnection(code=1001, reason="bye")) + b"\xff\xff ignored"

    rng = random.Random(7)
    cuts = {
        "whole": [len(wire)],
        "64KiB": [65536] * (len(wire) // 65536 + 1),
        "random": [rng.randint(1, 3000) for _ in range(len(wire))],
        "bytewise": [1] * len(wire),
    }
    for name, lengths in cuts.items():
        decoder = FrameDecoder(16 * 1024 * 1024)
        got: list[str | bytes] = []
        pos = 0
        for n in lengths:
            if pos >= len(wire):
                break
            decoder.feed(wire[pos : pos + n], got)
            pos += n
        assert got == expected, name
        assert decoder.pings == [b"p1", b"p2"], name
        assert decoder.close == (1001, "bye"), name


def test_decoder_refuses_an_oversized_frame_from_its_header():
    decoder = FrameDecoder(1000)
    with pytest.raises(FrameError, match="larger than 1000") as err:
        decoder.feed(bytes((0x82, 126)) + (1001).to_bytes(2, "big"), [])  # no payload yet
    assert err.value.code == 1009


async def test_start_close_still_hands_out_what_came_before_the_answer():
    """A graceful stop: our close goes out, every frame the server sent before it saw
    the close is still read, then the server's answer ends the connection."""
    sent = trio.Event()

    async def script(stream, conn):
        await stream.send_all(b"".join(conn.send(Message(data=f"m{i}")) for i in range(30)))
        sent.set()
        await _answer_close(stream, conn)

    got: list[str | bytes] = []
    async with trio.open_nursery() as nursery:
        url = await _raw_server(nursery, script)
        async with open_ws(url) as ws:
            await sent.wait()
            await ws.start_close()
            with pytest.raises(WsClosed, match="connection is not open"):
                await ws.send_message("nothing may follow our close")
            with pytest.raises(WsClosed) as closed, trio.fail_after(5):
                while True:
                    got.extend(await ws.receive_burst())
        nursery.cancel_scope.cancel()
    assert got == [f"m{i}" for i in range(30)]
    assert closed.value.code == 1000
