"""A stream runner's graceful close, on stop (`stopping`) and on the planned reconnect
(`reconnect_after`), over real sockets on 127.0.0.1.

What it must hold: every frame the venue sent before it saw our close frame is handed
on (none left in the socket buffer), the close is bounded when the venue never answers,
a runner with no open connection stops at once, and a planned reconnect is no failure.
"""

from __future__ import annotations

import json
import logging
from functools import partial

import trio
from test_ws_client import _raw_server
from trio_websocket import ConnectionClosed
from wsfake import start_fake, wait_for
from wsproto.events import Message

from cryptoflow.exchanges.bybit.ws import BybitStream
from cryptoflow.models import DepthDiff, GapKind, StreamEvent
from cryptoflow.pipeline.stream import StreamStats, run_stream

SYM = {"BTCUSDT": "BTCUSDT"}


def push(kind: str, u: int) -> str:
    return json.dumps(
        {
            "topic": "orderbook.50.BTCUSDT",
            "type": kind,
            "ts": 1671179923028 + u,
            "data": {"s": "BTCUSDT", "b": [["100.0", "1"]], "a": [["101.0", "2"]], "u": u},
            "cts": 1671179923026,
        }
    )


def _drained(recv: trio.MemoryReceiveChannel) -> list[object]:
    items = []
    while True:
        try:
            items.append(recv.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            return items


def _runner(url: str, send: trio.MemorySendChannel, keepalive: float | None = None, **kw):
    """`run_stream` of one Bybit symbol at `url` (the runner under test)."""
    stream = BybitStream(url, 50, SYM)
    if keepalive is not None:
        stream.keepalive_interval = keepalive  # pings right up to the close: none after it
    return partial(run_stream, stream, ["BTCUSDT"], SYM, send, **kw)


async def _flood(ws, conn, fake, ids: list[int], start: int, limit: int | None = None) -> None:
    """After the subscribe: pushes as fast as the socket takes them (so frames are always
    in flight) until our close arrives; `ids` gets each id once its send has returned."""
    await fake.recv(ws, conn)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fake.drain, ws, conn)  # reads pings, and our close
            u = start
            await ws.send_message(push("snapshot", u))
            ids.append(u)
            while limit is None or len(ids) < limit:
                u += 1
                await ws.send_message(push("delta", u))
                ids.append(u)
            await trio.sleep_forever()
    except* ConnectionClosed:
        pass  # our close arrived: trio-websocket has answered it


async def test_stop_reads_every_frame_sent_before_the_venue_saw_our_close(caplog):
    sent: list[int] = []

    async def script(ws, conn, fake):
        await _flood(ws, conn, fake, sent, 1)

    stopping = trio.Event()
    stats = StreamStats()
    send, recv = trio.open_memory_channel(1_000_000)
    async with trio.open_nursery() as nursery:
        fake = await start_fake(nursery, script)
        with trio.fail_after(10):
            async with trio.open_nursery() as runner:
                runner.start_soon(_runner(fake.url, send, 0.01, stats=stats, stopping=stopping))
                await wait_for(lambda: len(sent) >= 2000)
                stopping.set()  # the runner must end by itself
        nursery.cancel_scope.cancel()
    diffs = [i for i in _drained(recv) if isinstance(i, DepthDiff)]
    assert [d.last_update_id for d in diffs] == sent
    assert stats.disconnects == 0 and stats.connects == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_stop_is_bounded_when_the_venue_never_answers_our_close(caplog):
    async def script(stream, conn):
        await stream.send_all(conn.send(Message(data=push("snapshot", 1))))
        await trio.sleep_forever()  # reads nothing: our close is never answered

    stopping = trio.Event()
    send, recv = trio.open_memory_channel(100)
    async with trio.open_nursery() as nursery:
        url = await _raw_server(nursery, script)
        with trio.fail_after(5):
            async with trio.open_nursery() as runner:
                runner.start_soon(_runner(url, send, drain_timeout=0.3, stopping=stopping))
                await wait_for(lambda: recv.statistics().current_buffer_used >= 1)
                stopping.set()
        nursery.cancel_scope.cancel()
    assert any("no close answer within 0.3s" in r.getMessage() for r in caplog.records)
    assert [type(i) for i in _drained(recv)] == [DepthDiff]  # what came before is kept


async def test_stop_while_backing_off_ends_at_once():
    with trio.socket.socket() as probe:  # a port nobody listens on: connect is refused
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    stopping = trio.Event()
    stats = StreamStats()
    send, recv = trio.open_memory_channel(10)
    url = f"ws://127.0.0.1:{port}"
    with trio.fail_after(5):  # the back-off below is 60 s
        async with trio.open_nursery() as runner:
            runner.start_soon(
                _runner(
                    url, send, stats=stats, backoff_initial=60, backoff_max=60, stopping=stopping
                )
            )
            await wait_for(lambda: stats.disconnects == 1)
            stopping.set()
    assert _drained(recv) == []  # and the channel is closed (EndOfChannel)


async def test_planned_reconnect_reads_the_old_connection_to_its_end(caplog):
    """The old connection is closed only after the next one is open (hand-over), read to
    its end, and the next one continues exactly where it stopped: its snapshot and the
    deltas the old one had handed on already are dropped."""
    sent: dict[int, list[int]] = {}

    async def script(ws, conn, fake):
        start = max((u for ids in sent.values() for u in ids), default=0) + 1
        # the venue's stream goes on across connections
        await _flood(ws, conn, fake, sent.setdefault(conn, []), start, 400 if conn > 1 else None)

    stats = StreamStats()
    send, recv = trio.open_memory_channel(1_000_000)
    async with trio.open_nursery() as nursery:
        fake = await start_fake(nursery, script)
        nursery.start_soon(_runner(fake.url, send, 0.01, stats=stats, reconnect_after=0.3))
        with trio.fail_after(10):
            await wait_for(lambda: len(sent.get(2, ())) >= 400 and stats.handovers == 1)
            await wait_for(lambda: stats.diffs >= len(sent[1]) + 400 - stats.repeated - 1)
        nursery.cancel_scope.cancel()
    items = _drained(recv)
    marker = next(i for i, x in enumerate(items) if isinstance(x, StreamEvent))
    assert items[marker].kind is GapKind.RECONNECT
    assert items[marker].reason == "planned reconnect"
    before = [d.last_update_id for d in items[:marker]]
    assert before == sent[1]  # the first connection's every frame, its tail included
    assert sent[2][0] < before[-1]  # the two overlapped
    after = [d for d in items[marker + 1 :] if isinstance(d, DepthDiff)]
    assert not any(d.is_snapshot for d in after)  # the next one's snapshot was older
    ids = [d.last_update_id for d in after]
    assert ids == [u for u in sent[2] if u > before[-1]][: len(ids)]
    assert ids[0] == before[-1] + 1 and len(ids) > 100  # no hole, no repeat
    assert stats.repeated == len([u for u in sent[2] if u <= before[-1]])
    assert stats.connects == 2 and stats.disconnects == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
