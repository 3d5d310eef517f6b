"""A stream runner under trouble, over real sockets on 127.0.0.1 (found by an audit with
the simulator's faults): back-off that forgets old failures once a connection was
healthy, a stall seen through pongs, a frame of an odd shape skipped without dropping
the connection, a diff for a symbol the connection did not subscribe skipped, and diffs
dropped for overload recorded even when the stop comes next.
"""

from __future__ import annotations

import itertools
import json
import random

import trio
from test_stream_close import _drained, _runner, push
from wsfake import start_fake, wait_for

from cryptoflow.book.sync import BookSync
from cryptoflow.errors import ServerError
from cryptoflow.exchanges.bybit import rules as bybit_rules
from cryptoflow.exchanges.bybit.ws import BybitStream
from cryptoflow.models import DepthDiff, GapKind, StreamEvent
from cryptoflow.pipeline.stream import StreamStats, _Emitter, run_stream
from cryptoflow.pipeline.supervise import supervised

SYM = {"BTCUSDT": "BTCUSDT"}


async def test_backoff_starts_over_after_a_healthy_connection():
    """Each connection streams for longer than `backoff_max`, then drops: every drop is
    a first failure again (it used to double up to the cap: minutes lost per drop)."""
    spans: list[tuple[float, float]] = []

    async def script(ws, conn, fake):
        start = trio.current_time()
        await fake.recv(ws, conn)  # the subscribe
        await ws.send_message(push("snapshot", conn * 1000))
        u = conn * 1000
        while trio.current_time() - start < 0.6:
            u += 1
            await ws.send_message(push("delta", u))
            await trio.sleep(0.02)
        spans.append((start, trio.current_time()))
        await ws.aclose()  # a lost connection

    stopping = trio.Event()
    stats = StreamStats()
    send, _recv = trio.open_memory_channel(100_000)
    async with trio.open_nursery() as nursery:
        fake = await start_fake(nursery, script)
        with trio.fail_after(20):
            async with trio.open_nursery() as runner:
                runner.start_soon(
                    _runner(
                        fake.url,
                        send,
                        stats=stats,
                        backoff_initial=0.05,
                        backoff_max=0.5,
                        stopping=stopping,
                    )
                )
                await wait_for(lambda: len(spans) >= 5, timeout=15)
                stopping.set()
        nursery.cancel_scope.cancel()
    waits = [nxt[0] - prev[1] for prev, nxt in itertools.pairwise(spans)]
    # a first failure waits 0.025-0.05 s; without the reset the 4th would be >= 0.2 s
    assert max(waits) < 0.2, waits
    assert stats.disconnects >= 4


async def test_a_stall_is_seen_when_only_pongs_come():
    """The venue answers our pings but sends no book data: that is a stall (any frame
    used to count, so such a connection was never replaced)."""

    async def script(ws, conn, fake):
        await fake.recv(ws, conn)  # the subscribe
        await ws.send_message(push("snapshot", conn * 1000))
        while True:  # pongs only
            msg = json.loads(await fake.recv(ws, conn))
            if msg.get("op") == "ping":
                await ws.send_message(json.dumps({"op": "pong", "success": True}))

    stopping = trio.Event()
    stats = StreamStats()
    send, _recv = trio.open_memory_channel(10_000)
    async with trio.open_nursery() as nursery:
        fake = await start_fake(nursery, script)
        with trio.fail_after(10):
            async with trio.open_nursery() as runner:
                runner.start_soon(
                    _runner(
                        fake.url,
                        send,
                        0.05,  # a ping every 50 ms: a pong every 50 ms
                        stats=stats,
                        stall_timeout=0.5,
                        backoff_initial=0.01,
                        backoff_max=0.02,
                        stopping=stopping,
                    )
                )
                await wait_for(lambda: stats.connects >= 2, timeout=8)
                stopping.set()
        nursery.cancel_scope.cancel()
    assert "no book data for 0.5s (stalled)" in stats.last_error


class _OddStream(BybitStream):
    """Bybit whose parser meets a frame shape it did not foresee (a TypeError)."""

    def parse(self, raw, receive_ns):
        if "odd" in str(raw):
            raise TypeError("unhashable type: 'list'")
        return super().parse(raw, receive_ns)


async def test_a_frame_the_parser_trips_on_is_skipped_not_a_reconnect(caplog):
    async def script(ws, conn, fake):
        await fake.recv(ws, conn)
        await ws.send_message(push("snapshot", 1))
        await ws.send_message(json.dumps({"topic": "orderbook.50.BTCUSDT", "odd": [1]}))
        await ws.send_message(push("delta", 2))
        await trio.sleep_forever()

    stopping = trio.Event()
    stats = StreamStats()
    send, recv = trio.open_memory_channel(100)
    async with trio.open_nursery() as nursery:
        fake = await start_fake(nursery, script)
        stream = _OddStream(fake.url, 50, SYM)
        with trio.fail_after(10):
            async with trio.open_nursery() as runner:
                runner.start_soon(
                    lambda: run_stream(
                        stream, ["BTCUSDT"], SYM, send, stats=stats, stopping=stopping
                    )
                )
                await wait_for(lambda: stats.diffs >= 2)
                stopping.set()
        nursery.cancel_scope.cancel()
    diffs = [i.last_update_id for i in _drained(recv) if isinstance(i, DepthDiff)]
    assert diffs == [1, 2]
    assert (stats.malformed, stats.connects, stats.disconnects) == (1, 1, 0)
    assert "malformed frame skipped (TypeError: unhashable type: 'list')" in caplog.text


class _TokenOnce(BybitStream):
    """A venue whose every connect first asks REST for a token (KuCoin's bullet); the
    second ask fails (503)."""

    asked = 0

    async def url(self, venue_symbols: list[str]) -> str:
        self.asked += 1
        if self.asked == 2:
            raise ServerError("HTTP 503 from /api/v1/bullet-public", status=503, exchange="x")
        return await super().url(venue_symbols)


async def test_a_reconnect_gap_names_the_end_of_the_connection_before_it(caplog):
    """The RECONNECT markers' reason was `stats.last_error`: the venue closed (4000), the
    next token request failed (503), the one after worked, and the gap said 503 (audit
    ku_d logs). It must name what ended the connection the stream broke with."""

    async def script(ws, conn, fake):
        await fake.recv(ws, conn)
        if conn == 1:
            for u in (1, 2, 3):
                await ws.send_message(push("delta" if u > 1 else "snapshot", u))
            await ws.aclose(4000, "maintenance")
            return
        await ws.send_message(push("snapshot", 10))  # not the book at 3: updates missed
        await fake.drain(ws, conn)

    stopping = trio.Event()
    stats = StreamStats()
    send, recv = trio.open_memory_channel(100)
    async with trio.open_nursery() as nursery:
        fake = await start_fake(nursery, script)
        stream = _TokenOnce(fake.url, 50, SYM)
        with trio.fail_after(10):
            async with trio.open_nursery() as runner:
                runner.start_soon(
                    lambda: run_stream(
                        stream,
                        ["BTCUSDT"],
                        SYM,
                        send,
                        stats=stats,
                        backoff_initial=0.01,
                        backoff_max=0.02,
                        stopping=stopping,
                    )
                )
                await wait_for(lambda: stats.diffs >= 4)
                stopping.set()
        nursery.cancel_scope.cancel()
    assert (stream.asked, stats.connects, stats.disconnects) == (3, 2, 2)
    assert "stream lost (ServerError: x: HTTP 503" in caplog.text  # the attempt: logged
    got = _drained(recv)
    (marker,) = [i for i in got if isinstance(i, StreamEvent)]
    assert marker.kind is GapKind.RECONNECT
    assert marker.reason == "WsClosed: WebSocket closed (4000: maintenance)"

    sync = BookSync("bybit", "futures", "BTCUSDT", bybit_rules.RULES)
    gaps = []
    for item in got:
        d = sync.on_diff(item) if isinstance(item, DepthDiff) else sync.on_event(item)
        gaps.extend(d.gaps)
    assert [(g.kind, g.reason) for g in gaps if g.kind is GapKind.RECONNECT] == [
        (GapKind.RECONNECT, "WsClosed: WebSocket closed (4000: maintenance)")
    ]


def _named(symbol: str, u: int) -> str:
    """A Bybit delta on the BTCUSDT topic whose `data.s` names `symbol`."""
    msg = json.loads(push("delta", u))
    msg["data"]["s"] = symbol
    return json.dumps(msg)


async def test_a_diff_for_a_symbol_not_subscribed_is_skipped(caplog):
    """The parser keeps a symbol missing from the table as sent, and it became a storage
    path: a `data.s` of "../../../../../../ESCAPED" was spooled outside the spool (audit
    8, /tmp/audit8a/symbol_escape.py). Now the connection hands on only the symbols it
    subscribed; any other is a malformed frame: counted, logged, not captured raw, and
    the stream goes on."""

    async def script(ws, conn, fake):
        await fake.recv(ws, conn)
        await ws.send_message(push("snapshot", 1))
        await ws.send_message(_named("../../../../../../ESCAPED", 2))
        await ws.send_message(_named("ETHUSDT", 2))  # a real symbol, not on this socket
        await ws.send_message(push("delta", 2))
        await trio.sleep_forever()

    stopping = trio.Event()
    stats = StreamStats()
    captured: list[str] = []
    send, recv = trio.open_memory_channel(100)
    async with trio.open_nursery() as nursery:
        fake = await start_fake(nursery, script)
        with trio.fail_after(10):
            async with trio.open_nursery() as runner:
                runner.start_soon(
                    _runner(
                        fake.url,
                        send,
                        stats=stats,
                        stopping=stopping,
                        raw_sink=lambda sym, _frame, _ns: captured.append(sym),
                    )
                )
                await wait_for(lambda: stats.diffs >= 2)
                stopping.set()
        nursery.cancel_scope.cancel()
    diffs = [(i.symbol, i.last_update_id) for i in _drained(recv) if isinstance(i, DepthDiff)]
    assert diffs == [("BTCUSDT", 1), ("BTCUSDT", 2)]
    assert captured == ["BTCUSDT", "BTCUSDT"]
    assert (stats.malformed, stats.diffs, stats.connects, stats.disconnects) == (2, 2, 1, 0)
    assert (
        "bybit: malformed frame skipped: a diff for '../../../../../../ESCAPED', "
        "not subscribed on this connection"
    ) in caplog.text
    assert "a diff for 'ETHUSDT', not subscribed" in caplog.text


async def test_diffs_dropped_just_before_the_stop_are_still_a_gap():
    """The drop marker used to wait for the symbol's next diff; at the stop none comes,
    so the drops vanished. Now a `final` marker goes out at the stop, a gap at once."""

    async def script(ws, conn, fake):
        await fake.recv(ws, conn)
        await ws.send_message(push("snapshot", 1))
        for u in range(2, 12):
            await ws.send_message(push("delta", u))
        await fake.drain(ws, conn)

    stopping = trio.Event()
    stats = StreamStats()
    send, recv = trio.open_memory_channel(5)  # nobody reads until the stop: 6 dropped
    got: list[object] = []
    async with trio.open_nursery() as nursery:
        fake = await start_fake(nursery, script)
        with trio.fail_after(10):
            async with trio.open_nursery() as runner:
                runner.start_soon(_runner(fake.url, send, stats=stats, stopping=stopping))
                await wait_for(lambda: stats.diffs >= 11)
                stopping.set()
                async for item in recv:  # the normalizer drains on the stop
                    got.append(item)
        nursery.cancel_scope.cancel()
    assert stats.dropped == 6
    (marker,) = [i for i in got if isinstance(i, StreamEvent)]
    assert marker.final and marker.dropped == 6 and marker.kind is GapKind.CONSUMER_OVERLOAD

    sync = BookSync("bybit", "futures", "BTCUSDT", bybit_rules.RULES)
    gaps = []
    for item in got:
        d = sync.on_diff(item) if isinstance(item, DepthDiff) else sync.on_event(item)
        gaps.extend(d.gaps)
    (gap,) = gaps
    assert gap.kind is GapKind.CONSUMER_OVERLOAD and gap.last_good_id == 5
    assert "dropped 6 messages before the stop" in gap.reason


async def test_drop_counts_add_up_when_a_marker_goes_out_and_its_diff_does_not():
    """The drop marker fits in the channel but the diff after it does not: that diff is
    counted in the next marker. The gap row said only the first marker's count (audit:
    the rows' counts summed to less than the diffs dropped)."""
    stats = StreamStats()
    send, recv = trio.open_memory_channel(2)
    emitter = _Emitter(send, "bybit", stats)
    stream = BybitStream("ws://unused", 50, SYM)
    diffs = [stream.parse(push("delta" if u > 1 else "snapshot", u), u)[0] for u in range(1, 6)]
    got: list[object] = []
    assert [emitter.emit("BTCUSDT", x) for x in diffs[:3]] == [True, True, False]
    got.append(recv.receive_nowait())  # room for one: the marker, not the diff after it
    assert emitter.emit("BTCUSDT", diffs[3]) is False
    got.extend(_drained(recv))
    assert emitter.emit("BTCUSDT", diffs[4]) is True
    got.extend(_drained(recv))
    assert [i.dropped for i in got if isinstance(i, StreamEvent)] == [1, 1]

    sync = BookSync("bybit", "futures", "BTCUSDT", bybit_rules.RULES)
    gaps = []
    for item in got:
        d = sync.on_diff(item) if isinstance(item, DepthDiff) else sync.on_event(item)
        gaps.extend(d.gaps)
    (gap,) = gaps
    assert (gap.kind, gap.last_good_id, gap.first_id_after) == (GapKind.CONSUMER_OVERLOAD, 2, 5)
    assert stats.dropped == 2 and gap.reason == "normalizer channel full; dropped 2 messages"


async def test_supervised_backoff_starts_over_after_a_healthy_run(clock):
    starts: list[float] = []

    async def task() -> None:
        starts.append(trio.current_time())
        if len(starts) < 6:
            await trio.sleep(10.0)  # ran as long as the longest back-off: healthy
            raise RuntimeError("boom")

    await supervised("t", task, initial=1.0, maximum=10.0, rng=random.Random(7))
    waits = [b - a - 10.0 for a, b in itertools.pairwise(starts)]
    assert len(waits) == 5 and max(waits) <= 1.0, waits  # was 1, 2, 4, 8, 10 (jittered)


async def test_a_lost_stream_names_its_shard(caplog):
    """`binance: stream lost (...)` did not say which shard, hence which source IP,
    failed (audit: a shard on an address this host does not have)."""
    send, _recv = trio.open_memory_channel(100)
    stream = BybitStream("ws://127.0.0.1:9", 50, SYM)
    with trio.move_on_after(1):
        await run_stream(
            stream,
            ["BTCUSDT"],
            SYM,
            send,
            source_ip="192.0.2.1",  # TEST-NET-1: on no host
            backoff_initial=0.05,
            backoff_max=0.1,
            label="bybit/eip2",
        )
    lost = [r.getMessage() for r in caplog.records if "stream lost" in r.getMessage()]
    assert lost and all(m.startswith("bybit/eip2: stream lost (OSError: ") for m in lost), lost


def test_malformed_frame_warnings_are_the_forms_the_docs_give(caplog):
    """Found by an audit: docs/operations.md gave the WARNING as `<exchange>: malformed
    frame skipped: …`, while a run's connections log `<exchange>/<shard>: …`, and a
    second form (an error the parser did not foresee) was not documented at all."""
    import re
    from pathlib import Path

    from cryptoflow.errors import MalformedMessage
    from cryptoflow.pipeline.stream import _conn_state, _handle_frame

    class Odd:
        exchange = "binance"

        def __init__(self, exc: Exception) -> None:
            self.exc = exc

        def parse(self, raw, recv_ns):
            raise self.exc

    doc = (Path(__file__).resolve().parents[1] / "docs" / "operations.md").read_text()
    doc = " ".join(doc.split())  # lines rewrapped
    assert "`<exchange>/<shard>: malformed frame skipped: …`" in doc
    assert "`<exchange>/<shard>: malformed frame skipped (<Type>: …): '<frame>'`" in doc
    stats = StreamStats()
    for exc in (MalformedMessage("binance/BTCUSDT: field 'E' missing"), KeyError("E")):
        venue = Odd(exc)
        conn = _conn_state(venue, ["btcusdt"], 0.0, "binance/eip2")  # as the run labels it
        assert _handle_frame('{"e":1}', venue, None, stats, conn, None) is False
    first, second = [r.getMessage() for r in caplog.records if "malformed frame" in r.message]
    assert first == "binance/eip2: malformed frame skipped: binance/BTCUSDT: field 'E' missing"
    assert re.fullmatch(r"binance/eip2: malformed frame skipped \(KeyError: .+\): '.*'", second)
    assert stats.malformed == 2
