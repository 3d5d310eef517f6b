"""OKX REST client (books vs books-full, throttle mapping, ctVal), WS stream (text ping,
notice 64008 -> reconnect, batched resubscribes within the 480-per-hour cap), the checksum
hook and anchoring on a REST seqId."""

from __future__ import annotations

import json
import logging

import httpx
import orjson
import pytest
import trio
from wsfake import start_fake, wait_for

from cryptoflow.book.sync import BookState, BookSync
from cryptoflow.errors import RateLimited
from cryptoflow.exchanges.binance.rules import RULES as BINANCE_RULES
from cryptoflow.exchanges.okx import parse
from cryptoflow.exchanges.okx.checksum import okx_checksum
from cryptoflow.exchanges.okx.rest import OkxRest
from cryptoflow.exchanges.okx.rules import RULES
from cryptoflow.exchanges.okx.ws import OkxStream
from cryptoflow.models import MARKET_FUTURES, DepthDiff, GapKind, SnapshotSource, StreamEvent
from cryptoflow.net.ratelimit import RateBudget
from cryptoflow.pipeline.resync import ResyncQueue
from cryptoflow.pipeline.stream import (
    StreamStats,
    _conn_state,
    _Reconnect,
    _serve_resubscribe,
    run_stream,
)


def book_body(seq: int | None = 123) -> dict:
    d = {"asks": [["41006.8", "0.6", "0", "1"]], "bids": [["41006.3", "0.3", "0", "2"]]}
    d["ts"] = "1629966436396"
    if seq is not None:
        d["seqId"] = seq
    return {"code": "0", "msg": "", "data": [d]}


def client(handler) -> tuple[OkxRest, RateBudget]:
    budget = RateBudget(1200)
    http = httpx.AsyncClient(base_url="http://okx.test", transport=httpx.MockTransport(handler))
    return OkxRest(http, budget), budget


@pytest.mark.parametrize(
    ("depth", "path", "sz"),
    [(1000, "/api/v5/market/books-full", "1000"), (400, "/api/v5/market/books", "400")],
)
async def test_depth_picks_the_endpoint(depth, path, sz):
    seen = []

    def handler(req):
        seen.append(req.url)
        return httpx.Response(200, json=book_body())

    rest, budget = client(handler)
    snap = await rest.fetch_snapshot("BTCUSDT", "BTC-USDT-SWAP", depth_limit=depth)
    assert seen[0].path == path and seen[0].params["sz"] == sz
    assert seen[0].params["instId"] == "BTC-USDT-SWAP"
    assert snap.last_update_id == 123 and snap.symbol == "BTCUSDT"
    assert budget.stats.requests == 1


async def test_a_resync_snapshot_reads_books_whatever_the_poll_depth():
    """The stream's REST fallback must anchor: `books` carries the seqId live;
    `books-full` (the polls' endpoint past 400 levels) is a once-a-second cache."""
    seen = []

    def handler(req):
        seen.append(req.url)
        return httpx.Response(200, json=book_body())

    rest, _ = client(handler)
    snap = await rest.fetch_snapshot(
        "BTCUSDT", "BTC-USDT-SWAP", depth_limit=1000, source=SnapshotSource.RESYNC
    )
    assert seen[0].path == "/api/v5/market/books" and seen[0].params["sz"] == "400"
    assert snap.source is SnapshotSource.RESYNC and snap.last_update_id == 123
    await rest.fetch_snapshot("BTCUSDT", "BTC-USDT-SWAP", depth_limit=1000)
    assert seen[1].path == "/api/v5/market/books-full"  # polls keep their depth


async def test_http_429_and_code_50011_throttle():
    rest, budget = client(lambda req: httpx.Response(429, json={"code": "50011", "msg": "x"}))
    with pytest.raises(RateLimited):
        await rest.fetch_snapshot("BTCUSDT", "BTC-USDT-SWAP")
    assert budget.stats.throttles == 1
    rest, budget = client(lambda req: httpx.Response(200, json={"code": "50011", "msg": "x"}))
    with pytest.raises(RateLimited):
        await rest.fetch_snapshot("BTCUSDT", "BTC-USDT-SWAP")
    assert budget.stats.throttles == 1 and budget.blocked_for > 0


async def test_instruments_give_ctval_as_multiplier():
    def handler(req):
        assert req.url.path == "/api/v5/public/instruments"
        assert req.url.params["instType"] == "SWAP"
        data = [
            {"instId": "BTC-USDT-SWAP", "ctVal": "0.01", "state": "live", "tickSz": "0.1"},
            {"instId": "OLD-USDT-SWAP", "ctVal": "10", "state": "suspend"},
        ]
        return httpx.Response(200, json={"code": "0", "msg": "", "data": data})

    rest, _ = client(handler)
    inst = await rest.fetch_instruments()
    assert inst["BTC-USDT-SWAP"].multiplier_text == "0.01" and inst["BTC-USDT-SWAP"].status_ok
    assert not inst["OLD-USDT-SWAP"].status_ok


def frame(action: str, seq: int, prev: int, bids=(), asks=(), checksum: int = 0) -> str:
    return json.dumps(
        {
            "arg": {"channel": "books", "instId": "BTC-USDT-SWAP"},
            "action": action,
            "data": [
                {
                    "asks": [[p, q, "0", "1"] for p, q in asks],
                    "bids": [[p, q, "0", "1"] for p, q in bids],
                    "ts": "1597026383085",
                    "checksum": checksum,
                    "prevSeqId": prev,
                    "seqId": seq,
                }
            ],
        }
    )


async def test_stream_text_ping_and_notice_reconnect():
    async def script(ws, conn, fake):
        msg = orjson.loads(await fake.recv(ws, conn))
        assert msg == {"op": "subscribe", "args": [{"channel": "books", "instId": "BTC-USDT-SWAP"}]}
        await ws.send_message(frame("snapshot", 10, -1, bids=[("1", "1")]))
        await ws.send_message(frame("update", 12, 10, bids=[("1", "2")]))
        if conn == 1:
            while "ping" not in fake.texts(conn):
                await fake.recv(ws, conn)
            await ws.send_message("pong")
            await ws.send_message(json.dumps({"event": "notice", "code": "64008", "msg": "x"}))
        await fake.drain(ws, conn)

    async with trio.open_nursery() as nursery:
        fake = await start_fake(nursery, script)
        stream = OkxStream(fake.url, {"BTC-USDT-SWAP": "BTCUSDT"})
        stream.keepalive_interval = 0.05
        send, recv = trio.open_memory_channel(100)
        stats = StreamStats()
        nursery.start_soon(
            lambda: run_stream(
                stream,
                ["BTC-USDT-SWAP"],
                {"BTC-USDT-SWAP": "BTCUSDT"},
                send,
                stats=stats,
                backoff_initial=0.01,
                backoff_max=0.02,
            )
        )
        await wait_for(lambda: stats.connects == 2)
        nursery.cancel_scope.cancel()
    assert fake.paths == ["/ws/v5/public", "/ws/v5/public"]
    items = []
    while True:
        try:
            items.append(recv.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            break
    kinds = [type(i).__name__ for i in items]
    assert kinds[:2] == ["DepthDiff", "DepthDiff"] and "StreamEvent" in kinds
    assert "64008" in stats.last_error or "notice" in stats.last_error


def book_frame(inst: str, action: str, seq: int, prev: int) -> str:
    entry = {"asks": [], "bids": [["1", "1", "0", "1"]], "ts": "1597026383085", "checksum": 0}
    entry.update(prevSeqId=prev, seqId=seq)
    return orjson.dumps(
        {"arg": {"channel": "books", "instId": inst}, "action": action, "data": [entry]}
    ).decode()


async def test_resubscribes_asked_at_once_share_one_unsubscribe_and_one_subscribe():
    """OKX counts requests (messages) against 480 per hour per connection: three symbols
    broken at the same moment cost one unsubscribe + one subscribe, not three of each."""
    insts = ["BTC-USDT-SWAP", "ETH-USDT-SWAP", "SOL-USDT-SWAP"]
    symbol_of = {i: i.split("-")[0] + "USDT" for i in insts}

    async def script(ws, conn, fake):
        seq = 10
        while True:
            msg = orjson.loads(await fake.recv(ws, conn))
            if msg["op"] == "subscribe":
                for arg in msg["args"]:
                    seq += 1
                    await ws.send_message(book_frame(arg["instId"], "snapshot", seq, -1))

    async with trio.open_nursery() as nursery:
        fake = await start_fake(nursery, script)
        stream = OkxStream(fake.url, symbol_of)
        send, _recv = trio.open_memory_channel(100)
        stats, conn_q = StreamStats(), ResyncQueue()
        nursery.start_soon(
            lambda: run_stream(stream, insts, symbol_of, send, stats=stats, resync=conn_q)
        )
        await wait_for(lambda: stats.diffs == 3)  # the first snapshots came
        for sym in symbol_of.values():
            conn_q.request(sym)
        await wait_for(lambda: stats.diffs == 6)  # and the fresh ones
        nursery.cancel_scope.cancel()
    sent = [orjson.loads(t) for t in fake.texts()]
    assert [(m["op"], [a["instId"] for a in m["args"]]) for m in sent] == [
        ("subscribe", insts),
        ("unsubscribe", insts),
        ("subscribe", insts),
    ]


class SentLog:
    """Stands in for the connection: records what a resubscribe sends."""

    def __init__(self) -> None:
        self.sent: list[dict] = []

    async def send_message(self, text: str) -> None:
        self.sent.append(orjson.loads(text))


async def test_resubscribes_stop_at_the_hourly_cap_and_go_to_rest_until_it_frees(
    autojump_clock, caplog
):
    """Each connection counts its subscribe-type requests in a sliding hour, the initial
    subscription included; a resubscribe that would pass 90 % of the cap is not sent: its
    symbols get a REST snapshot at once (WARNING); an hour later it resubscribes again."""
    insts = [f"C{i}-USDT-SWAP" for i in range(25)]  # on_open: 2 requests of <= 20 args
    venue_of = {f"C{i}USDT": inst for i, inst in enumerate(insts)}
    stream = OkxStream("ws://okx.test", {v: s for s, v in venue_of.items()})
    stream.subscribe_requests_per_hour = 10  # 9 usable: 2 + 3 resubscribes of 2
    t0 = trio.current_time()
    conn = _conn_state(stream, list(venue_of), t0)
    ws, queue, rest = SentLog(), ResyncQueue(), []

    async def ask(*symbols: str) -> None:
        """Break `symbols` at once; their fresh snapshots come a second later."""
        for sym in symbols:
            queue.request(sym)
        await trio.sleep(1)
        for sym in symbols:
            conn.snapshot_at[sym] = trio.current_time()
        await trio.sleep(stream.snapshot_timeout + 1)

    with caplog.at_level(logging.INFO, logger="cryptoflow.stream"):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                _serve_resubscribe, ws, stream, queue, conn, venue_of, rest.append, nursery
            )
            await trio.sleep(1)
            conn.snapshot_at.update(dict.fromkeys(venue_of, trio.current_time()))
            await trio.sleep(stream.snapshot_timeout)  # subscribed, snapshots in
            for _ in range(3):
                await ask("C1USDT", "C2USDT")
            assert [m["op"] for m in ws.sent] == ["unsubscribe", "subscribe"] * 3
            assert [len(m["args"]) for m in ws.sent] == [2] * 6
            await ask("C3USDT")  # 2 + 6 sent: no room for 2 more
            assert len(ws.sent) == 6 and rest == ["C3USDT"]
            await trio.sleep_until(t0 + 3600.5)
            await ask("C4USDT")  # the initial subscription is an hour old: room for 2
            assert len(ws.sent) == 8 and ws.sent[-1]["args"][0]["instId"] == "C4-USDT-SWAP"
            assert rest == ["C3USDT"]
            nursery.cancel_scope.cancel()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("8 subscribe requests sent on this connection in the last hour" in w
               and "C3USDT by REST snapshot" in w for w in warnings), warnings  # fmt: skip


async def test_a_subscribe_sent_while_watching_the_last_one_is_watched_too(autojump_clock):
    """Was: a symbol resubscribed while the watch of its previous subscribe still ran got
    no watch of its own; the old one saw the earlier snapshot and sent no REST fallback,
    so a second subscribe answered by no snapshot left the book waiting for good."""
    stream = OkxStream("ws://okx.test", {"BTC-USDT-SWAP": "BTCUSDT"})
    venue_of = {"BTCUSDT": "BTC-USDT-SWAP"}
    t0 = trio.current_time()
    conn = _conn_state(stream, ["BTCUSDT"], t0)
    ws, queue, rest = SentLog(), ResyncQueue(), []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            _serve_resubscribe, ws, stream, queue, conn, venue_of, rest.append, nursery
        )
        await trio.sleep(1)
        conn.snapshot_at["BTCUSDT"] = trio.current_time()
        await trio.sleep(9)  # t=10: the book breaks
        queue.request("BTCUSDT")
        await trio.sleep(1)  # t=11: its fresh snapshot
        conn.snapshot_at["BTCUSDT"] = trio.current_time()
        await trio.sleep(1)  # t=12: it breaks again; this subscribe brings no snapshot
        queue.request("BTCUSDT")
        await trio.sleep(2 * stream.snapshot_timeout + 1)
        nursery.cancel_scope.cancel()
    assert [m["op"] for m in ws.sent] == ["unsubscribe", "subscribe"] * 2
    assert rest == ["BTCUSDT"]


async def test_a_snapshot_dropped_for_a_full_channel_does_not_count_as_come(autojump_clock):
    """Was: `snapshot_at` was set before the emit that dropped the snapshot (normalizer
    channel full), so the watch saw it as arrived and never fell back to REST."""
    from cryptoflow.pipeline.stream import _Emitter, _handle_frame

    stream = OkxStream("ws://okx.test", {"BTC-USDT-SWAP": "BTCUSDT"})
    conn = _conn_state(stream, ["BTCUSDT"], 0.0)
    send, recv = trio.open_memory_channel(1)
    stats = StreamStats()
    emitter = _Emitter(send, "okx", stats)
    snap = (
        '{"arg": {"channel": "books", "instId": "BTC-USDT-SWAP"}, "action": "snapshot", "data":'
        ' [{"asks": [["8476.98", "415", "0", "13"]], "bids": [["8476.97", "256", "0", "12"]],'
        ' "ts": "1764300000000", "checksum": 0, "prevSeqId": -1, "seqId": 123456}]}'
    )
    assert _handle_frame(snap, stream, emitter, stats, conn, None)  # fits
    assert conn.snapshot_at["BTCUSDT"] == trio.current_time()
    del conn.snapshot_at["BTCUSDT"]
    assert _handle_frame(snap, stream, emitter, stats, conn, None)  # channel full: dropped
    assert "BTCUSDT" not in conn.snapshot_at and emitter.dropped["BTCUSDT"] == 1
    recv.close()


async def test_without_a_rest_fallback_the_cap_reconnects(autojump_clock):
    stream = OkxStream("ws://okx.test", {"BTC-USDT-SWAP": "BTCUSDT"})
    stream.subscribe_requests_per_hour = 2  # 1 usable: the initial subscribe
    conn = _conn_state(stream, ["BTCUSDT"], trio.current_time())
    queue = ResyncQueue()
    await trio.sleep(10)
    queue.request("BTCUSDT")
    ws, caught = SentLog(), []
    try:
        async with trio.open_nursery() as nursery:
            await _serve_resubscribe(
                ws, stream, queue, conn, {"BTCUSDT": "BTC-USDT-SWAP"}, None, nursery
            )
    except* _Reconnect as group:
        caught.extend(group.exceptions)
    assert len(caught) == 1 and "reconnecting for a fresh count" in str(caught[0])
    assert ws.sent == []


def diff_of(raw: str) -> DepthDiff:
    out = parse.parse_ws_message(raw, 1, {"BTC-USDT-SWAP": "BTCUSDT"})
    assert isinstance(out, list)
    return out[0]


def test_checksum_hook_validates_nonzero_only_and_resyncs():
    sync = BookSync("okx", MARKET_FUTURES, "BTCUSDT", RULES)
    assert sync.book is not None  # forced by the checksum rule
    bids, asks = [("100", "1"), ("99", "2")], [("101", "3")]
    good = okx_checksum(bids, asks)
    assert sync.on_diff(diff_of(frame("snapshot", 1, -1, bids, asks, good))).gaps == ()
    after = okx_checksum([("100", "5"), ("99", "2")], asks)
    assert sync.on_diff(diff_of(frame("update", 2, 1, [("100", "5")], [], after))).gaps == ()
    assert sync.on_diff(diff_of(frame("update", 3, 2, [("98", "1")], [], 0))).gaps == ()  # 0
    d = sync.on_diff(diff_of(frame("update", 4, 3, [("97", "1")], [], 12345)))
    assert [g.kind for g in d.gaps] == [GapKind.CHECKSUM] and d.need_snapshot
    assert d.gaps[0].last_good_id == 3 and sync.state is BookState.WAITING
    d = sync.on_diff(diff_of(frame("snapshot", 9, -1, bids, asks, good)))
    assert [g.kind for g in d.gaps] == [GapKind.RESYNC] and sync.state is BookState.SYNCED


def test_binance_rules_keep_no_book():
    assert BookSync("binance", MARKET_FUTURES, "BTCUSDT", BINANCE_RULES).book is None
    assert "on_diff" not in vars(BookSync("binance", MARKET_FUTURES, "BTCUSDT", BINANCE_RULES))


def test_rest_seq_id_anchors_without_in_stream_snapshot():
    """OKX without in-stream snapshot: prevSeqId <= seqId_REST < seqId is the first update."""
    sync = BookSync("okx", MARKET_FUTURES, "BTCUSDT", RULES)
    d1 = sync.on_diff(diff_of(frame("update", 105, 100, [("1", "1")])))
    assert d1.need_snapshot
    sync.on_diff(diff_of(frame("update", 110, 105, [("1", "2")])))
    sync.on_diff(diff_of(frame("update", 110, 110)))  # heartbeat
    rest = parse.parse_rest_snapshot(orjson.dumps(book_body(seq=107)), "BTCUSDT", 1)
    d = sync.on_snapshot(rest)
    assert d.gaps == () and sync.state is BookState.SYNCED and sync.book_id == 110
    assert sync.counters.stale_dropped == 1  # seqId 105 < 107: already in the snapshot


def test_reconnect_then_snapshot_at_a_new_id_is_a_gap_and_a_resync():
    sync = BookSync("okx", MARKET_FUTURES, "BTCUSDT", RULES)
    sync.on_diff(diff_of(frame("snapshot", 10, -1, [("1", "1")])))
    sync.on_diff(diff_of(frame("update", 12, 10, [("1", "2")])))
    ev = StreamEvent("okx", MARKET_FUTURES, "BTCUSDT", GapKind.RECONNECT, 0, reason="drop")
    sync.on_event(ev)
    d = sync.on_diff(diff_of(frame("snapshot", 12, -1, [("1", "2")])))  # nothing missed
    assert d.gaps == ()
    sync.on_event(ev)
    d = sync.on_diff(diff_of(frame("snapshot", 20, -1, [("1", "3")])))
    assert [g.kind for g in d.gaps] == [GapKind.RECONNECT, GapKind.RESYNC]


def test_books_full_costs_one_unit_of_its_own_budget():
    """books-full has its own 10-per-2-s limit, which is the shard's whole OKX budget when
    depth > 400; charging it 4 (as if it shared books' 40/2 s) cut polling to a quarter."""
    from cryptoflow.exchanges.okx import rest

    assert rest.BOOKS_FULL_WEIGHT == 1
