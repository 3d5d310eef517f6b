"""Bybit, OKX and KuCoin in the simulator, over real sockets on 127.0.0.1 (bounded),
checked with the project's own parsers and normalized ids."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from cryptoflow.errors import RateLimited, RequestRejected
from cryptoflow.exchanges.base import Control
from cryptoflow.exchanges.binance import parse as binance
from cryptoflow.exchanges.bybit import parse as bybit
from cryptoflow.exchanges.kucoin import parse as kucoin
from cryptoflow.exchanges.okx import parse as okx
from cryptoflow.models import DepthDiff
from cryptoflow.net.ws import WsClosed, open_ws
from cryptoflow.sim import open_simulator

FAST = {"tick_interval": 0.02, "ping_interval": None}
VS = {
    "binance": ["BTCUSDT"],
    "bybit": ["BTCUSDT", "ETHUSDT"],
    "okx": ["BTC-USDT-SWAP", "ETH-USDT-SWAP"],
    "kucoin": ["XBTUSDTM", "ETHUSDTM"],
}


def sim_for(venue: str, **kw):
    opts = kw.pop("venue_options", {})
    return open_simulator(venue_symbols={venue: VS[venue]}, venue_options=opts, **FAST, **kw)


def breaks(diffs: list[DepthDiff]) -> int:
    """Continuity breaks per symbol with the project's normalized ids."""
    last: dict[str, int] = {}
    n = 0
    for d in diffs:
        if d.is_snapshot:
            last[d.symbol] = d.last_update_id
            continue
        if d.symbol in last and d.prev_update_id != last[d.symbol]:
            n += 1
        last[d.symbol] = d.last_update_id
    return n


def apply(book: dict[str, dict[str, str]], d: DepthDiff) -> None:
    if d.is_snapshot:
        book["bids"], book["asks"] = {}, {}
    for side, levels in (("bids", d.bids), ("asks", d.asks)):
        for p, q in levels:
            if Decimal(q) == 0:
                book[side].pop(p, None)
            else:
                book[side][p] = q


async def next_item(ws, parser, timeout: float = 5.0):
    with trio.fail_after(timeout):
        return parser(await ws.get_message(), 0)


async def read_diffs(ws, parser, n: int, timeout: float = 8.0) -> list[DepthDiff]:
    out: list[DepthDiff] = []
    with trio.fail_after(timeout):
        while len(out) < n:
            item = parser(await ws.get_message(), 0)
            if isinstance(item, list):
                out += item
    return out


# --- Bybit ------------------------------------------------------------------------------


async def test_bybit_rest_and_instruments_parse():
    async with sim_for("bybit") as sim, httpx.AsyncClient(base_url=sim.rest_url) as c:
        p = {"category": "linear", "symbol": "BTCUSDT", "limit": 50}
        r = await c.get("/v5/market/orderbook", params=p)
        assert r.status_code == 200
        body = r.json()
        assert body["retCode"] == 0 and set(body["result"]) == {
            "s",
            "b",
            "a",
            "ts",
            "u",
            "seq",
            "cts",
        }
        snap = bybit.parse_rest_snapshot(r.content, "BTCUSDT", 0)
        assert len(snap.bids) == 50 and len(snap.asks) == 50
        assert Decimal(snap.bids[0][0]) < Decimal(snap.asks[0][0])
        assert snap.last_update_id == body["result"]["u"]
        r = await c.get("/v5/market/instruments-info", params={"category": "linear"})
        inst = bybit.parse_instruments(r.content)
        assert set(inst) == {"BTCUSDT", "ETHUSDT"}
        assert inst["BTCUSDT"].status_ok and inst["BTCUSDT"].tick_size == "0.10"
        assert inst["BTCUSDT"].step_size == "0.001" and inst["BTCUSDT"].multiplier == 1.0
        r = await c.get("/v5/market/orderbook", params={**p, "category": "spot"})
        with pytest.raises(RequestRejected):
            bybit.parse_rest_snapshot(r.content, "BTCUSDT", 0)  # HTTP 200, retCode != 0
        # the Binance book with the same name is a different book with its own ids
        assert sim.book("BTCUSDT")["lastUpdateId"] != sim.book("BTCUSDT", "bybit")["lastUpdateId"]


async def test_bybit_rate_limit_403_block_and_faults():
    opts = {"bybit": {"rate_limit": 5, "rate_window": 60, "ban_seconds": 30}}
    async with sim_for("bybit", venue_options=opts) as sim:
        async with httpx.AsyncClient(base_url=sim.rest_url) as c:
            p = {"category": "linear", "symbol": "BTCUSDT", "limit": 1}
            codes = [(await c.get("/v5/market/orderbook", params=p)).status_code for _ in range(7)]
            assert codes == [200] * 5 + [403, 403]
            r = await c.get("/v5/market/instruments-info", params={"category": "linear"})
            assert r.status_code == 403  # the whole IP is blocked
        st = sim.stats_json()["venues"]["bybit"]["clients"]["127.0.0.1"]
        assert st["bans"] == 1 and st["violations"] == 2 and st["banned_for"] > 25
    async with sim_for("bybit") as sim, httpx.AsyncClient(base_url=sim.rest_url) as c:
        p = {"category": "linear", "symbol": "BTCUSDT", "limit": 1}
        sim.faults.add("rest_429", venue="bybit", symbol="BTCUSDT")
        r = await c.get("/v5/market/orderbook", params=p)
        assert r.status_code == 200 and r.json()["retCode"] == 10006
        with pytest.raises(RateLimited):
            bybit.parse_rest_snapshot(r.content, "BTCUSDT", 0)
        sim.faults.add("rest_418", venue="bybit", retry_after=5)
        assert (await c.get("/v5/market/orderbook", params=p)).status_code == 403
        assert (await c.get("/v5/market/orderbook", params=p)).status_code == 403


async def test_bybit_ws_subscribe_ping_continuity_drop_resubscribe():
    async with sim_for("bybit") as sim:
        async with open_websocket_url(sim.ws_url + "/v5/public/linear") as ws:
            topics = ["orderbook.200.BTCUSDT", "orderbook.200.ETHUSDT"]
            await ws.send_message(json.dumps({"op": "subscribe", "args": topics, "req_id": "1"}))
            ack = json.loads(await ws.get_message())
            assert ack["success"] is True and ack["op"] == "subscribe" and ack["req_id"] == "1"
            assert bybit.parse_ws_message(json.dumps(ack), 0).kind == "ack"
            diffs = await read_diffs(ws, bybit.parse_ws_message, 10)
            assert [d.is_snapshot for d in diffs[:2]] == [True, True]
            assert {d.symbol for d in diffs[:2]} == {"BTCUSDT", "ETHUSDT"}
            await ws.send_message(json.dumps({"op": "ping", "req_id": "p"}))
            got_pong = False
            with trio.fail_after(5):
                while not got_pong:
                    item = bybit.parse_ws_message(await ws.get_message(), 0)
                    if isinstance(item, Control):
                        got_pong = item.kind == "pong"
                    else:
                        diffs += item
            diffs += await read_diffs(ws, bybit.parse_ws_message, 10)
            assert breaks(diffs) == 0
            btc = [d for d in diffs if d.symbol == "BTCUSDT" and not d.is_snapshot]
            assert all(d.prev_update_id == d.last_update_id - 1 for d in btc)
            sim.faults.add("ws_drop", venue="bybit", symbol="BTCUSDT")
            more = await read_diffs(ws, bybit.parse_ws_message, 30)
            assert breaks([d for d in diffs + more if d.symbol == "BTCUSDT"]) == 1
            assert breaks([d for d in diffs + more if d.symbol == "ETHUSDT"]) == 0
            # resync: unsubscribe + subscribe -> a fresh snapshot
            with trio.fail_after(5):
                for op in ("unsubscribe", "subscribe"):
                    msg = {"op": op, "args": ["orderbook.200.BTCUSDT"], "req_id": op}
                    await ws.send_message(json.dumps(msg))
                    while json.loads(await ws.get_message()).get("req_id") != op:
                        pass
                while True:
                    item = bybit.parse_ws_message(await ws.get_message(), 0)
                    if isinstance(item, list) and item[0].symbol == "BTCUSDT":
                        break
            assert item[0].is_snapshot
            await ws.send_message(json.dumps({"op": "subscribe", "args": ["orderbook.7.NOPE"]}))
        st = sim.stats_json()["venues"]["bybit"]
        assert (
            st["symbols"]["BTCUSDT"]["ws_drops"] == 1 and st["symbols"]["BTCUSDT"]["ws_levels"] > 0
        )


async def test_bybit_rest_then_deltas_equals_book_and_top_view():
    async with (
        sim_for("bybit") as sim,
        httpx.AsyncClient(base_url=sim.rest_url) as c,
        open_websocket_url(sim.ws_url + "/v5/public/linear") as ws,
    ):
        args = ["orderbook.1000.BTCUSDT", "orderbook.1.BTCUSDT"]
        await ws.send_message(json.dumps({"op": "subscribe", "args": args}))
        await trio.sleep(0.1)
        p = {"category": "linear", "symbol": "BTCUSDT", "limit": 500}
        snap = bybit.parse_rest_snapshot(
            (await c.get("/v5/market/orderbook", params=p)).content, "BTCUSDT", 0
        )
        await trio.sleep(0.3)
        sim.pause()
        final = sim.book("BTCUSDT", "bybit")
        full: list[DepthDiff] = []
        top1: list[DepthDiff] = []
        with trio.fail_after(5):
            while (
                not full
                or full[-1].last_update_id < final["lastUpdateId"]
                or (top1[-1].last_update_id < final["lastUpdateId"])
            ):
                raw = await ws.get_message()
                item = bybit.parse_ws_message(raw, 0)
                if isinstance(item, list):
                    (full if '"orderbook.1000.' in raw else top1).extend(item)
        assert breaks(full) == 0 and breaks(top1) == 0
        # REST lane anchor: the first delta after the snapshot has u == L + 1
        book = {"bids": dict(snap.bids), "asks": dict(snap.asks)}
        after = [d for d in full if not d.is_snapshot and d.last_update_id > snap.last_update_id]
        assert after[0].prev_update_id == snap.last_update_id
        for d in after:
            apply(book, d)
        assert book["bids"] == final["bids"] and book["asks"] == final["asks"]
        # stream lane: snapshot + deltas
        ws_book: dict[str, dict[str, str]] = {"bids": {}, "asks": {}}
        for d in full:
            apply(ws_book, d)
        assert ws_book["bids"] == final["bids"]
        # depth 1: the view is the best level of each side
        t1: dict[str, dict[str, str]] = {"bids": {}, "asks": {}}
        for d in top1:
            apply(t1, d)
        best_bid = max(final["bids"], key=Decimal)
        best_ask = min(final["asks"], key=Decimal)
        assert t1 == {
            "bids": {best_bid: final["bids"][best_bid]},
            "asks": {best_ask: final["asks"][best_ask]},
        }


async def test_bybit_idle_connection_closed_without_pings():
    async with sim_for("bybit", venue_options={"bybit": {"idle_timeout": 0.5}}) as sim:
        async with open_websocket_url(sim.ws_url + "/v5/public/linear") as ws:
            for _ in range(4):  # pinging keeps it open
                await trio.sleep(0.25)
                await ws.send_message('{"op":"ping"}')
                assert json.loads(await ws.get_message())["ret_msg"] == "pong"
            with pytest.raises(ConnectionClosed), trio.fail_after(3):
                while True:
                    await ws.get_message()
        assert sim.stats_json()["venues"]["bybit"]["ws"]["closed_idle"] == 1


# --- OKX --------------------------------------------------------------------------------


async def test_okx_rest_books_and_instruments_parse():
    async with sim_for("okx") as sim, httpx.AsyncClient(base_url=sim.rest_url) as c:
        r = await c.get("/api/v5/market/books", params={"instId": "BTC-USDT-SWAP", "sz": 400})
        body = r.json()
        assert body["code"] == "0" and len(body["data"][0]["bids"][0]) == 4
        assert isinstance(body["data"][0]["ts"], str)
        snap = okx.parse_rest_snapshot(r.content, "BTCUSDT", 0)
        assert len(snap.bids) == 400 and snap.last_update_id == body["data"][0]["seqId"]
        sim.pause()  # the book must not move between the request and sim.book()
        r = await c.get("/api/v5/market/books-full", params={"instId": "BTC-USDT-SWAP", "sz": 5000})
        full = okx.parse_rest_snapshot(r.content, "BTCUSDT", 0)
        assert len(full.bids) == len(sim.book("BTC-USDT-SWAP", "okx")["bids"])
        r = await c.get("/api/v5/public/instruments", params={"instType": "SWAP"})
        inst = okx.parse_instruments(r.content)
        assert set(inst) == {"BTC-USDT-SWAP", "ETH-USDT-SWAP"}
        assert inst["BTC-USDT-SWAP"].multiplier_text == "0.01" and inst["BTC-USDT-SWAP"].status_ok
        assert inst["ETH-USDT-SWAP"].multiplier_text == "0.1"
        assert inst["BTC-USDT-SWAP"].step_size == "0.01"
        # sizes are contracts: 2 decimals (lotSz 0.01)
        assert all(len(q.split(".")[1]) == 2 for _, q in snap.bids)


async def test_okx_rate_limit_50011_and_5xx():
    async with (
        sim_for("okx", venue_options={"okx": {"books_limit": 3}}) as sim,
        httpx.AsyncClient(base_url=sim.rest_url) as c,
    ):
        p = {"instId": "BTC-USDT-SWAP", "sz": 5}
        rs = [await c.get("/api/v5/market/books", params=p) for _ in range(4)]
        assert [r.status_code for r in rs] == [200, 200, 200, 429]
        assert rs[-1].json()["code"] == "50011"
        with pytest.raises(RateLimited):
            okx.parse_rest_snapshot(rs[-1].content, "BTCUSDT", 0)
        # books-full has its own budget
        r = await c.get("/api/v5/market/books-full", params=p)
        assert r.status_code in (200, 429)
        sim.faults.add("rest_5xx", venue="okx", status=503)
        await trio.sleep(2.1)
        assert (await c.get("/api/v5/market/books", params=p)).status_code == 503
        sim.faults.add("rest_missing_fields", venue="okx")
        r = await c.get("/api/v5/market/books", params=p)
        assert "seqId" not in r.json()["data"][0]


async def test_okx_ws_snapshot_updates_heartbeat_drop_and_ping():
    opts = {"okx": {"heartbeat_every": 0, "heartbeat_idle": 0.3}}
    async with (
        sim_for("okx", venue_options=opts) as sim,
        open_websocket_url(sim.ws_url + "/ws/v5/public") as ws,
    ):
        args = [{"channel": "books", "instId": i} for i in VS["okx"]]
        await ws.send_message(json.dumps({"op": "subscribe", "args": args}))
        acks = [await next_item(ws, okx.parse_ws_message) for _ in range(2)]
        assert all(isinstance(a, Control) and a.kind == "ack" for a in acks)
        diffs = await read_diffs(ws, okx.parse_ws_message, 12)
        assert [d.is_snapshot for d in diffs[:2]] == [True, True]
        await ws.send_message("ping")
        with trio.fail_after(5):
            while True:
                raw = await ws.get_message()
                if raw == "pong":
                    assert okx.parse_ws_message(raw, 0) == Control("pong")
                    break
                diffs += okx.parse_ws_message(raw, 0)
        assert breaks(diffs) == 0
        steps = {d.last_update_id - d.prev_update_id for d in diffs if not d.is_snapshot}
        assert len(steps) > 1  # ids jump by arbitrary steps
        sim.faults.add("ws_drop", venue="okx", symbol="BTC-USDT-SWAP")
        diffs += await read_diffs(ws, okx.parse_ws_message, 12)
        assert breaks([d for d in diffs if d.symbol == "BTCUSDT"]) == 1
        assert breaks([d for d in diffs if d.symbol == "ETHUSDT"]) == 0
        sim.pause()
        hb = await read_diffs(ws, okx.parse_ws_message, 8, timeout=4)
        beats = [d for d in hb if d.prev_update_id == d.last_update_id]
        assert beats and all(not d.bids and not d.asks for d in beats)
        assert breaks(hb) == 0
        sim.resume()
        sim.faults.add("ws_close", venue="okx")
        notice = None
        with pytest.raises(ConnectionClosed), trio.fail_after(5):
            while True:
                item = okx.parse_ws_message(await ws.get_message(), 0)
                if isinstance(item, Control) and item.kind == "notice":
                    notice = item
        assert notice is not None and notice.reconnect


async def test_okx_no_snapshot_mode_anchors_on_rest_seqid():
    async with (
        sim_for("okx", okx_snapshot_in_stream=False) as sim,
        httpx.AsyncClient(base_url=sim.rest_url) as c,
        open_websocket_url(sim.ws_url + "/ws/v5/public") as ws,
    ):
        arg = {"channel": "books", "instId": "BTC-USDT-SWAP"}
        await ws.send_message(json.dumps({"op": "subscribe", "args": [arg]}))
        assert (await next_item(ws, okx.parse_ws_message)).kind == "ack"
        buffered = await read_diffs(ws, okx.parse_ws_message, 2)
        assert not any(d.is_snapshot for d in buffered)
        p = {"instId": "BTC-USDT-SWAP", "sz": 400}  # the `books` channel is a 400-level view
        r = await c.get("/api/v5/market/books", params=p)
        snap = okx.parse_rest_snapshot(r.content, "BTCUSDT", 0)
        L = snap.last_update_id
        await trio.sleep(0.3)
        sim.pause()
        final = sim.book("BTC-USDT-SWAP", "okx")
        top = {
            "bids": dict(sorted(final["bids"].items(), key=lambda x: -Decimal(x[0]))[:400]),
            "asks": dict(sorted(final["asks"].items(), key=lambda x: Decimal(x[0]))[:400]),
        }
        diffs = buffered
        with trio.fail_after(5):
            while diffs[-1].last_update_id < final["lastUpdateId"]:
                diffs += await read_diffs(ws, okx.parse_ws_message, 1)
        assert breaks(diffs) == 0
        book = {"bids": dict(snap.bids), "asks": dict(snap.asks)}
        applied = [d for d in diffs if d.last_update_id > L]
        first = applied[0]
        assert first.prev_update_id <= L < first.last_update_id  # OKX's anchor rule
        for d in applied:
            apply(book, d)
        assert book == top


async def test_okx_idle_connection_closed():
    async with (
        sim_for("okx", venue_options={"okx": {"idle_timeout": 0.5}}) as sim,
        open_websocket_url(sim.ws_url + "/ws/v5/public") as ws,
    ):
        for _ in range(3):
            await trio.sleep(0.3)
            await ws.send_message("ping")
            assert await ws.get_message() == "pong"
        with pytest.raises(ConnectionClosed), trio.fail_after(3):
            while True:
                await ws.get_message()


# --- KuCoin -----------------------------------------------------------------------------


async def bullet(c: httpx.AsyncClient) -> dict:
    r = await c.post("/api/v1/bullet-public")
    assert r.status_code == 200 and r.json()["code"] == "200000"
    return r.json()["data"]


async def test_kucoin_rest_contracts_and_rate_limit():
    async with (
        sim_for("kucoin", venue_options={"kucoin": {"rate_limit": 4}}) as sim,
        httpx.AsyncClient(base_url=sim.rest_url) as c,
    ):
        sim.pause()  # the book must not move between the request and sim.book()
        r = await c.get("/api/v1/level2/snapshot", params={"symbol": "XBTUSDTM"})
        raw = r.json()["data"]
        assert isinstance(raw["asks"][0][0], float) and isinstance(raw["asks"][0][1], int)
        assert raw["ts"] > 10**18  # nanoseconds
        snap = kucoin.parse_rest_snapshot(r.content, "BTCUSDT", 0)
        assert snap.last_update_id == raw["sequence"]
        expected = sim.book("XBTUSDTM", "kucoin")
        assert dict(snap.bids) == expected["bids"]  # whole book, canonical text
        r = await c.get("/api/v1/contracts/active")
        inst = kucoin.parse_instruments(r.content)
        assert inst["XBTUSDTM"].multiplier_text == "0.001" and inst["XBTUSDTM"].status_ok
        assert inst["ETHUSDTM"].multiplier_text == "0.01"
        assert r.json()["data"][0]["baseCurrency"] == "XBT"
        assert int(r.headers["gw-ratelimit-remaining"]) == 2
        await c.post("/api/v1/bullet-public")
        await c.get("/api/v1/timestamp")
        r = await c.get("/api/v1/level2/snapshot", params={"symbol": "XBTUSDTM"})
        assert r.status_code == 429 and r.json()["code"] == "429000"
        assert r.headers["gw-ratelimit-remaining"] == "0"
        assert 0 < int(r.headers["gw-ratelimit-reset"]) <= 30_000
        with pytest.raises(RateLimited):
            kucoin.parse_rest_snapshot(r.content, "BTCUSDT", 0)


async def test_kucoin_token_required():
    async with sim_for("kucoin") as sim, httpx.AsyncClient(base_url=sim.rest_url) as c:
        with pytest.raises(ConnectionRejected) as exc, trio.fail_after(5):
            async with open_websocket_url(sim.ws_url + "/?token=bogus&connectId=x"):
                pass
        assert exc.value.status_code == 401
        data = await bullet(c)
        ep = data["instanceServers"][0]
        assert ep["endpoint"] == sim.ws_url + "/" and ep["pingInterval"] == 18000
        url = f"{ep['endpoint']}?token={data['token']}&connectId=abc"
        async with open_websocket_url(url) as ws:
            welcome = kucoin.parse_ws_message(await ws.get_message(), 0)
            assert welcome == Control("welcome", detail="abc")


async def test_kucoin_ws_stream_continuity_rest_alignment_and_drop():
    opts = {"kucoin": {"ping_interval_ms": 400, "ping_timeout_ms": 300}}
    async with (
        sim_for("kucoin", venue_options=opts) as sim,
        httpx.AsyncClient(base_url=sim.rest_url) as c,
    ):
        data = await bullet(c)
        ep = data["instanceServers"][0]
        url = f"{ep['endpoint']}?token={data['token']}&connectId=c1"
        async with open_websocket_url(url) as ws:
            assert (await next_item(ws, kucoin.parse_ws_message)).kind == "welcome"
            sub = {
                "id": "1",
                "type": "subscribe",
                "topic": "/contractMarket/level2:XBTUSDTM,ETHUSDTM",
                "privateChannel": False,
                "response": True,
            }
            await ws.send_message(json.dumps(sub))
            assert await next_item(ws, kucoin.parse_ws_message) == Control("ack", detail="1")
            buffered = await read_diffs(ws, kucoin.parse_ws_message, 5)
            r = await c.get("/api/v1/level2/snapshot", params={"symbol": "XBTUSDTM"})
            snap = kucoin.parse_rest_snapshot(r.content, "BTCUSDT", 0)
            await ws.send_message(json.dumps({"id": "p1", "type": "ping"}))
            diffs = buffered
            with trio.fail_after(5):
                while True:
                    item = kucoin.parse_ws_message(await ws.get_message(), 0)
                    if isinstance(item, Control):
                        assert item == Control("pong", detail="p1")
                        break
                    diffs += item
            await trio.sleep(0.2)
            sim.pause()
            final = sim.book("XBTUSDTM", "kucoin")
            with trio.fail_after(5):
                while [d for d in diffs if d.symbol == "BTCUSDT"][-1].last_update_id < final[
                    "lastUpdateId"
                ]:
                    diffs += await read_diffs(ws, kucoin.parse_ws_message, 1)
            assert breaks(diffs) == 0
            btc = [d for d in diffs if d.symbol == "BTCUSDT"]
            book = {"bids": dict(snap.bids), "asks": dict(snap.asks)}
            applied = [d for d in btc if d.last_update_id > snap.last_update_id]
            assert applied[0].last_update_id == snap.last_update_id + 1
            for d in applied:
                apply(book, d)
            assert book["bids"] == final["bids"] and book["asks"] == final["asks"]
            sim.resume()
            await ws.send_message(json.dumps({"id": "p2", "type": "ping"}))
            sim.faults.add("ws_drop", venue="kucoin", symbol="XBTUSDTM")
            more = await read_diffs(ws, kucoin.parse_ws_message, 40)
            assert breaks([d for d in btc + more if d.symbol == "BTCUSDT"]) == 1
            assert breaks([d for d in diffs + more if d.symbol == "ETHUSDT"]) == 0
            # no more pings: closed after pingInterval + pingTimeout
            with pytest.raises(ConnectionClosed), trio.fail_after(3):
                while True:
                    await ws.get_message()
        st = sim.stats_json()["venues"]["kucoin"]
        assert st["symbols"]["XBTUSDTM"]["ws_drops"] == 1 and st["ws"]["closed_idle"] == 1


# --- all venues together ----------------------------------------------------------------


async def test_all_venues_share_ports_and_admin():
    async with (
        open_simulator(venue_symbols=VS, **FAST) as sim,
        httpx.AsyncClient(base_url=sim.rest_url) as c,
    ):
        assert (
            await c.get("/fapi/v1/depth", params={"symbol": "BTCUSDT", "limit": 5})
        ).status_code == 200
        assert (
            await c.get("/v5/market/orderbook", params={"category": "linear", "symbol": "ETHUSDT"})
        ).status_code == 200
        assert (
            await c.get("/api/v5/market/books", params={"instId": "ETH-USDT-SWAP"})
        ).status_code == 200
        assert (
            await c.get("/api/v1/level2/snapshot", params={"symbol": "ETHUSDTM"})
        ).status_code == 200
        r = await c.get("/_sim/book", params={"symbol": "ETH-USDT-SWAP", "venue": "okx"})
        assert r.status_code == 200 and r.json()["symbol"] == "ETH-USDT-SWAP"
        r = await c.post(
            "/_sim/faults", json={"kind": "ws_drop", "venue": "kucoin", "symbol": "XBTUSDTM"}
        )
        assert r.json()["ok"]
        st = (await c.get("/_sim/stats")).json()
        assert set(st["venues"]) == {"binance", "bybit", "okx", "kucoin"}
        assert st["venues"]["okx"]["symbols"]["ETH-USDT-SWAP"]["rest_snapshots"] == 1
        assert st["symbols"]["BTCUSDT"]["rest_snapshots"] == 1  # Binance stays top level
        # Binance's /ws/ prefix does not swallow OKX's /ws/v5/public
        async with open_websocket_url(sim.ws_url + "/ws/v5/public") as ws:
            await ws.send_message("ping")
            with trio.fail_after(3):
                assert await ws.get_message() == "pong"
        async with open_websocket_url(sim.ws_url + "/ws/btcusdt@depth@100ms") as ws:
            with trio.fail_after(3):
                assert json.loads(await ws.get_message())["s"] == "BTCUSDT"


@pytest.mark.slow
def test_standalone_serves_all_venues():
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cryptoflow.sim",
            "--venues",
            "binance,bybit,okx,kucoin",
            "--okx-symbols",
            "BTC-USDT-SWAP",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        cwd=Path(__file__).resolve().parents[1],
    )
    watchdog = threading.Timer(20, proc.kill)
    watchdog.start()
    try:
        info = json.loads(proc.stdout.readline())
        assert info["venues"]["okx"] == ["BTC-USDT-SWAP"]
        assert info["venues"]["kucoin"] == ["XBTUSDTM", "ETHUSDTM"]
        r = httpx.get(
            info["rest_url"] + "/api/v5/market/books", params={"instId": "BTC-USDT-SWAP"}, timeout=5
        )
        assert r.json()["code"] == "0"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)


async def _open_stream(sim, venue: str, c: httpx.AsyncClient):
    """(websocket context, parser, subscribe message) for one symbol of ``venue``."""
    if venue == "bybit":
        sub = {"op": "subscribe", "args": ["orderbook.200.BTCUSDT"]}
        return open_websocket_url(sim.ws_url + "/v5/public/linear"), bybit.parse_ws_message, sub
    if venue == "okx":
        sub = {"op": "subscribe", "args": [{"channel": "books", "instId": "BTC-USDT-SWAP"}]}
        return open_websocket_url(sim.ws_url + "/ws/v5/public"), okx.parse_ws_message, sub
    data = await bullet(c)
    url = f"{data['instanceServers'][0]['endpoint']}?token={data['token']}&connectId=f"
    sub = {"id": "1", "type": "subscribe", "topic": "/contractMarket/level2:XBTUSDTM"}
    return open_websocket_url(url), kucoin.parse_ws_message, sub


def _loose(parser):
    """The parser, but a malformed frame gives None."""

    def parse(raw, ns):
        try:
            return parser(raw, ns)
        except Exception:
            return None

    return parse


@pytest.mark.parametrize("venue", ["bybit", "okx", "kucoin"])
async def test_ws_faults_per_venue(venue):
    opts = {"okx": {"heartbeat_every": 0}}
    async with (
        sim_for(venue, venue_options=opts) as sim,
        httpx.AsyncClient(base_url=sim.rest_url) as c,
    ):
        cm, parser, sub = await _open_stream(sim, venue, c)
        async with cm as ws:
            await ws.send_message(json.dumps(sub))
            base = await read_diffs(ws, parser, 4)
            sim.faults.add("ws_stall", venue=venue, seconds=0.4)
            t0 = trio.current_time()
            stalled = await read_diffs(ws, parser, 2)
            assert trio.current_time() - t0 >= 0.35
            assert breaks(base + stalled) == 0  # a stall delays, it does not gap
            sim.faults.add("ws_duplicate", venue=venue)
            dup = await read_diffs(ws, parser, 4)
            assert any(dup[k] == dup[k + 1] for k in range(3))
            sim.faults.add("ws_out_of_order", venue=venue)
            ooo = await read_diffs(ws, parser, 4)
            lasts = [d.last_update_id for d in ooo]
            assert lasts != sorted(lasts)
            sim.faults.add("ws_malformed", venue=venue)
            got = []
            with trio.fail_after(5):
                while len(got) < 4:
                    got.append(_loose(parser)(await ws.get_message(), 0))
            assert got.count(None) == 1
            sim.faults.add("ws_close", venue=venue)
            with pytest.raises(ConnectionClosed), trio.fail_after(5):
                while True:
                    await ws.get_message()
        applied = dict(sim.faults.applied)
        assert applied == {
            k: 1
            for k in ("ws_stall", "ws_duplicate", "ws_out_of_order", "ws_malformed", "ws_close")
        }
        assert sim.stats_json()["venues"][venue]["ws"]["closed_by_fault"] == 1


VS2 = {**VS, "binance": ["BTCUSDT", "ETHUSDT"]}


async def _shared_connection(sim, venue: str, c: httpx.AsyncClient) -> tuple[str, str | None]:
    """(URL, subscribe message or None) for one connection carrying both of ``venue``'s
    symbols (``VS2``)."""
    syms = VS2[venue]
    if venue == "binance":
        streams = "/".join(f"{s.lower()}@depth@100ms" for s in syms)
        return f"{sim.ws_url}/stream?streams={streams}", None
    if venue == "bybit":
        sub = {"op": "subscribe", "args": [f"orderbook.50.{s}" for s in syms]}
        return sim.ws_url + "/v5/public/linear", json.dumps(sub)
    if venue == "okx":
        sub = {"op": "subscribe", "args": [{"channel": "books", "instId": s} for s in syms]}
        return sim.ws_url + "/ws/v5/public", json.dumps(sub)
    data = await bullet(c)
    url = f"{data['instanceServers'][0]['endpoint']}?token={data['token']}&connectId=f"
    sub = {"id": "1", "type": "subscribe", "topic": "/contractMarket/level2:" + ",".join(syms)}
    return url, json.dumps(sub)


@pytest.mark.parametrize("venue", ["binance", "bybit", "okx", "kucoin"])
async def test_ws_close_sends_a_close_frame_on_a_shared_connection(venue):
    """``ws_close`` on a connection that several streams share ends it with a close frame
    (default 1001, or the fault's ``code`` and ``reason``), read by the collector's own
    client; ``ws_abort`` ends it without one (1006). The simulator used to lose the close
    frame whenever another stream sent on the connection while the close began (its send
    failed and cancelled the closing task): the client saw TCP end without a frame, every
    time on KuCoin, ~1 in 3 on Binance. Several closes in a row, so a race shows."""
    default = (1001, "simulator fault: close")
    steps = [("ws_close", {}, default)] * 3 + [
        ("ws_close", {"code": 4000, "reason": "maintenance"}, (4000, "maintenance")),
        ("ws_abort", {}, (1006, "connection closed without a close frame")),
    ]
    async with (
        open_simulator(venue_symbols={venue: VS2[venue]}, **FAST) as sim,
        httpx.AsyncClient(base_url=sim.rest_url) as c,
    ):
        for i, (kind, params, want) in enumerate(steps):
            url, sub = await _shared_connection(sim, venue, c)
            async with open_ws(url) as ws:
                if sub is not None:
                    await ws.send_message(sub)
                with trio.fail_after(5):
                    for _ in range(4):  # both streams are sending
                        await ws.get_message()
                sim.faults.add(kind, venue=venue, symbol=VS2[venue][0], **params)
                with pytest.raises(WsClosed) as closed, trio.fail_after(5):
                    while True:
                        await ws.get_message()
            assert (closed.value.code, closed.value.reason) == want, (i, kind)
        ws_stats = sim.stats_json()["venues"][venue]["ws"]
    assert ws_stats["closed_by_fault"] == 4 and ws_stats["aborted_by_fault"] == 1


# --- every subscriber gets the same events --------------------------------------------------


async def _events(url: str, subscribe: str | None, parser, start: trio.Event | None, stop):
    """(first id, last id, previous id) of each diff on one connection, opened once `start`
    is set, until `stop()`."""
    if start is not None:
        await start.wait()
    out: list[tuple[int, int, int | None]] = []
    async with open_websocket_url(url) as ws:
        if subscribe is not None:
            await ws.send_message(subscribe)
        with trio.fail_after(10):
            while not stop(out):
                item = parser(await ws.get_message(), 0)
                if isinstance(item, list):
                    out += [
                        (d.first_update_id, d.last_update_id, d.prev_update_id)
                        for d in item
                        if not d.is_snapshot
                    ]
    return out


@pytest.mark.parametrize("venue", ["binance", "okx"])
async def test_connections_opened_at_different_times_get_the_same_events(venue):
    """Streams that merge ticks (Binance 100 ms, OKX books) cut them on the market's tick
    grid, not on a timer per connection: a venue sends every subscriber the same events,
    and a client's overlapped hand-over relies on it (one connection's event that spans
    two of the other's would break the chain at the switch)."""
    async with sim_for(venue) as sim:
        if venue == "binance":
            url, sub, parser = (
                sim.ws_url + "/ws/btcusdt@depth@100ms",
                None,
                binance.parse_ws_message,
            )
        else:
            url = sim.ws_url + "/ws/v5/public"
            arg = {"channel": "books", "instId": "BTC-USDT-SWAP"}
            sub, parser = json.dumps({"op": "subscribe", "args": [arg]}), okx.parse_ws_message
        results: dict[int, list] = {}
        later = trio.Event()

        async def one(n: int, start: trio.Event | None) -> None:
            results[n] = await _events(url, sub, parser, start, lambda out: len(out) >= 40)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, 1, None)
            await trio.sleep(0.137)  # off the tick grid (ticks every 0.02 s here)
            later.set()
            nursery.start_soon(one, 2, later)
    first, second = results[1], results[2][1:]  # its first event: the ticks since it subscribed
    shared = {e[1] for e in first} & {e[1] for e in second}
    assert len(shared) >= 20
    by_last = {e[1]: e for e in first}
    assert [e for e in second if e[1] in shared] == [by_last[u] for u in sorted(shared)]


async def test_okx_updates_leave_right_after_their_last_tick():
    """An OKX update carries every tick made up to its cut (review of aef24fc: cut half
    a tick after the ticks, it waited for the next tick and left one tick late)."""
    venues = {"okx": ["BTC-USDT-SWAP"]}
    async with (
        open_simulator(venue_symbols=venues, tick_interval=0.1, ping_interval=None) as sim,
        open_websocket_url(sim.ws_url + "/ws/v5/public") as ws,
    ):
        book = sim.venue("okx").market.books["BTC-USDT-SWAP"]
        arg = {"channel": "books", "instId": "BTC-USDT-SWAP"}
        await ws.send_message(json.dumps({"op": "subscribe", "args": [arg]}))
        behind = []
        with trio.fail_after(10):
            while len(behind) < 20:
                m = json.loads(await ws.get_message())
                if m.get("action") == "update" and m["data"][0]["bids"] + m["data"][0]["asks"]:
                    behind.append(book.last_update_id != m["data"][0]["seqId"])
    assert sum(behind) <= 2  # a tick may come between the send and our read, rarely


async def test_binance_250ms_stream_keeps_its_interval_on_the_grid():
    """Review of 82b4a22: cut at round(0.25 / 0.1) = 2 ticks, `@depth` (250 ms) sent every
    200 ms. The k-th cut is now the tick ending the k-th interval: 2, 5, 7, 10, …"""
    async with (
        open_simulator(symbols=["BTCUSDT"], tick_interval=0.1, ping_interval=None) as sim,
        open_websocket_url(f"{sim.ws_url}/ws/btcusdt@depth") as ws,
    ):
        times = []
        with trio.fail_after(10):
            while len(times) < 13:
                times.append(json.loads(await ws.get_message())["E"])
    steps = [b - a for a, b in itertools.pairwise(times[1:])]  # the first event: partial
    assert 240 <= sum(steps) / len(steps) <= 260
