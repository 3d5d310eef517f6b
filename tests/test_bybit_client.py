"""Bybit REST client (error mapping, pagination) and WS stream (subscribe, keepalive,
resubscribe on a resync request, REST fallback) against local fakes."""

from __future__ import annotations

import json

import httpx
import orjson
import pytest
import trio
from wsfake import start_fake, wait_for

from cryptoflow.errors import IPBanned, RateLimited, RequestRejected
from cryptoflow.exchanges import registry
from cryptoflow.exchanges.bybit.rest import BybitRest
from cryptoflow.exchanges.bybit.ws import BybitStream
from cryptoflow.models import DepthDiff, SnapshotSource
from cryptoflow.net.ratelimit import RateBudget
from cryptoflow.pipeline.poller import PollStats, poll_snapshots
from cryptoflow.pipeline.resync import ResyncQueue, ResyncRouter
from cryptoflow.pipeline.stream import StreamStats, run_stream

BOOK = {
    "retCode": 0,
    "retMsg": "OK",
    "time": 1672765737734,
    "result": {
        "s": "BTCUSDT",
        "b": [["16493.50", "0.006"]],
        "a": [["16611.00", "0.029"]],
        "ts": 1672765737733,
        "u": 5277055,
        "seq": 7961638724,
        "cts": 1672765737731,
    },
}


def client(handler) -> tuple[BybitRest, RateBudget]:
    budget = RateBudget(7200)
    http = httpx.AsyncClient(base_url="http://bybit.test", transport=httpx.MockTransport(handler))
    return BybitRest(http, budget), budget


async def test_snapshot_request_and_parse():
    seen = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req.url)
        return httpx.Response(200, json=BOOK)

    rest, _ = client(handler)
    snap = await rest.fetch_snapshot(
        "BTCUSDT", "BTCUSDT", depth_limit=1000, source=SnapshotSource.RESYNC
    )
    assert seen[0].path == "/v5/market/orderbook"
    assert dict(seen[0].params) == {"category": "linear", "symbol": "BTCUSDT", "limit": "500"}
    assert snap.last_update_id == 5277055 and snap.bids == [("16493.50", "0.006")]
    assert snap.source is SnapshotSource.RESYNC


async def test_403_is_an_ip_ban_of_ten_minutes():
    rest, budget = client(lambda req: httpx.Response(403, text="access too frequent"))
    with pytest.raises(IPBanned) as ei:
        await rest.fetch_snapshot("BTCUSDT", "BTCUSDT")
    assert ei.value.retry_after == 600
    assert budget.blocked_for > 590 and budget.stats.bans == 1


async def test_ret_code_10006_throttles():
    body = {"retCode": 10006, "retMsg": "Too many visits!", "result": {}, "time": 1}
    rest, budget = client(lambda req: httpx.Response(200, json=body))
    with pytest.raises(RateLimited):
        await rest.fetch_snapshot("BTCUSDT", "BTCUSDT")
    assert budget.stats.throttles == 1 and budget.blocked_for > 0


async def test_other_ret_code_is_rejected():
    body = {"retCode": 10001, "retMsg": "params error", "result": {}, "time": 1}
    rest, _ = client(lambda req: httpx.Response(200, json=body))
    with pytest.raises(RequestRejected):
        await rest.fetch_snapshot("BTCUSDT", "NOPEUSDT")


async def test_ret_code_of_another_type_is_a_malformed_poll(autojump_clock, caplog):
    """A body whose `retCode` is a list: was a TypeError out of the code lookup, which
    crashed the poll task (restarted by the supervisor with a traceback). It is a
    malformed body now: counted `malformed` (of the `ok` polls: the venue answered), one
    log line, and polling goes on."""
    bodies = [{**BOOK, "retCode": [10006]}, BOOK]

    def handler(req: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=bodies.pop(0) if len(bodies) > 1 else bodies[0])

    rest, _ = client(handler)
    send, recv = trio.open_memory_channel(10)
    stats = PollStats()
    with trio.move_on_after(2.5):
        await poll_snapshots(
            lambda: rest.fetch_snapshot_body("BTCUSDT", "BTCUSDT"),
            send,
            exchange="bybit",
            symbol="BTCUSDT",
            interval=1.0,
            stats=stats,
        )
    assert stats.failed == 0 and stats.malformed == 1 and stats.ok >= 2
    assert recv.receive_nowait() is not None
    (line,) = [r.getMessage() for r in caplog.records if "snapshot failed" in r.getMessage()]
    assert line == (
        "snapshot failed: bybit/BTCUSDT: field 'retCode' is not an integer or string: [10006]"
    )


async def test_instruments_follow_the_cursor():
    pages = {
        "": (["BTCUSDT", "ETHUSDT"], "page2"),
        "page2": (["SHIB1000USDT"], ""),
    }
    calls = []

    def handler(req: httpx.Request) -> httpx.Response:
        cursor = req.url.params.get("cursor", "")
        calls.append(cursor)
        names, nxt = pages[cursor]
        items = [
            {
                "symbol": n,
                "status": "Trading",
                "priceFilter": {"tickSize": "0.1"},
                "lotSizeFilter": {"qtyStep": "0.001"},
            }
            for n in names
        ]
        result = {"category": "linear", "list": items, "nextPageCursor": nxt}
        return httpx.Response(200, json={"retCode": 0, "retMsg": "OK", "result": result})

    rest, _ = client(handler)
    inst = await rest.fetch_instruments()
    assert calls == ["", "page2"]
    assert sorted(inst) == ["BTCUSDT", "ETHUSDT", "SHIB1000USDT"]
    assert inst["BTCUSDT"].multiplier_text == "1" and inst["BTCUSDT"].status_ok


def push(sym: str, kind: str, u: int) -> str:
    return json.dumps(
        {
            "topic": f"orderbook.50.{sym}",
            "type": kind,
            "ts": 1671179923028 + u,
            "data": {"s": sym, "b": [["100.0", "1"]], "a": [["101.0", "2"]], "u": u, "seq": u},
            "cts": 1671179923026,
        }
    )


async def test_stream_subscribes_in_chunks_pings_and_resubscribes():
    symbols = [f"S{i}USDT" for i in range(25)]
    resub_snapshot = trio.Event()

    async def script(ws, conn, fake):
        while True:
            msg = orjson.loads(await fake.recv(ws, conn))
            if msg["op"] == "subscribe":
                await ws.send_message(json.dumps({"success": True, "op": "subscribe"}))
                for topic in msg["args"]:
                    sym = topic.rsplit(".", 1)[1]
                    await ws.send_message(push(sym, "snapshot", 10))
                    if sym == "S3USDT" and not resub_snapshot.is_set():
                        await ws.send_message(push(sym, "delta", 11))
            if msg["op"] == "unsubscribe":
                resub_snapshot.set()

    async with trio.open_nursery() as nursery:
        fake = await start_fake(nursery, script)
        stream = BybitStream(fake.url, 50, {s: s for s in symbols})
        stream.keepalive_interval = 0.05
        send, recv = trio.open_memory_channel(1000)
        conn_q = ResyncQueue()
        stats = StreamStats()
        nursery.start_soon(
            lambda: run_stream(
                stream, symbols, {s: s for s in symbols}, send, resync=conn_q, stats=stats
            )
        )
        await wait_for(lambda: any('"ping"' in t for t in fake.texts()))
        subs = [orjson.loads(t) for t in fake.texts() if '"subscribe"' in t]
        assert [len(s["args"]) for s in subs] == [10, 10, 5]
        assert fake.paths == ["/v5/public/linear"]
        conn_q.request("S3USDT")
        # a request right after subscribing whose snapshot came already: resubscribe
        await wait_for(resub_snapshot.is_set)
        await wait_for(lambda: len([t for t in fake.texts() if '"subscribe"' in t]) == 4)

        nursery.cancel_scope.cancel()
    items = []
    while True:
        try:
            items.append(recv.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            break
    diffs = [i for i in items if isinstance(i, DepthDiff)]
    s3 = [d for d in diffs if d.symbol == "S3USDT"]
    assert [d.is_snapshot for d in s3] == [True, False, True]
    assert stats.connects == 1


async def test_no_snapshot_after_resubscribe_falls_back_to_rest():
    async def script(ws, conn, fake):
        await fake.drain(ws, conn)  # acknowledges nothing, sends no snapshot

    fallbacks: list[str] = []
    async with trio.open_nursery() as nursery:
        fake = await start_fake(nursery, script)
        stream = BybitStream(fake.url, 50, {"BTCUSDT": "BTCUSDT"})
        stream.snapshot_timeout = 0.2
        send, _recv = trio.open_memory_channel(100)
        conn_q = ResyncQueue()
        nursery.start_soon(
            lambda: run_stream(
                stream,
                ["BTCUSDT"],
                {"BTCUSDT": "BTCUSDT"},
                send,
                resync=conn_q,
                fallback=fallbacks.append,
                stall_timeout=5,
            )
        )
        await wait_for(lambda: len(fake.texts()) == 1)
        conn_q.request("BTCUSDT")  # right after subscribing: no second subscribe
        await wait_for(lambda: fallbacks == ["BTCUSDT"])
        assert len(fake.texts()) == 1
        conn_q.request("BTCUSDT")  # later: unsubscribe + subscribe, then fallback again
        await wait_for(lambda: len(fake.texts()) == 3)
        await wait_for(lambda: fallbacks == ["BTCUSDT", "BTCUSDT"])
        nursery.cancel_scope.cancel()
    ops = [orjson.loads(t)["op"] for t in fake.texts()]
    assert ops == ["subscribe", "unsubscribe", "subscribe"]


def test_router_sends_resubscribe_venues_to_their_connection():
    rest_q, conn_q = ResyncQueue(), ResyncQueue()
    router = ResyncRouter(rest_q)
    router.route(["BTCUSDT"], conn_q)
    router.request("BTCUSDT")
    router.request("ETHUSDT")
    router.request_rest("BTCUSDT")
    assert list(conn_q._pending) == ["BTCUSDT"]
    assert list(rest_q._pending) == ["ETHUSDT", "BTCUSDT"]


def test_registry_entry():
    v = registry.get_venue("bybit")
    assert v.rules.resync_by == "resubscribe"
    assert v.default_ws_url == "wss://stream.bybit.com/v5/public/linear"
    assert v.weight_limit_per_minute == 7200
