"""The local exchange simulator, over real sockets on 127.0.0.1 (bounded in time)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path

import httpx
import orjson
import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from cryptoflow.sim import open_simulator
from cryptoflow.sim.book import Book, load_recorded_snapshot, spec_for

RECORDED = Path(__file__).resolve().parents[2] / "shared" / "data" / "recorded" / "binance"
SUSHI = RECORDED / "futures_depth_SUSHIUSDT_AKROUSDT_2021-07-22.jsonl"
FAST = {"tick_interval": 0.02, "ping_interval": None}


async def read_events(ws, n: int, timeout: float = 5.0) -> list[dict]:
    """Next ``n`` depth events (combined frames unwrapped)."""
    out = []
    with trio.fail_after(timeout):
        while len(out) < n:
            obj = orjson.loads(await ws.get_message())
            out.append(obj.get("data", obj))
    return out


def pu_breaks(events: list[dict]) -> int:
    last: dict[str, int] = {}
    breaks = 0
    for e in events:
        if e["s"] in last and e["pu"] != last[e["s"]]:
            breaks += 1
        last[e["s"]] = e["u"]
    return breaks


# --- book model ---------------------------------------------------------------------------


def test_book_is_deterministic_on_grid_and_never_crossed():
    a, b = Book(spec_for("BTCUSDT"), seed=7), Book(spec_for("BTCUSDT"), seed=7)
    prev_u = a.last_update_id
    for _ in range(500):
        da, db = a.tick(0), b.tick(0)
        assert (da.U, da.u, da.bids, da.asks) == (db.U, db.u, db.bids, db.asks)
        assert da.pu == prev_u and prev_u + 1 == da.U and da.u >= da.U
        assert da.u - da.U + 1 == da.levels  # one id per changed level
        prev_u = da.u
        assert max(a.bids) < min(a.asks)
        assert len(a.bids) <= a.depth and len(a.asks) <= a.depth
    tick = Decimal(a.spec.tick_size)
    bids, asks = a.top(1000)
    for p, q in bids + asks:
        assert Decimal(p) % tick == 0
        assert len(p.split(".")[1]) == 2 and len(q.split(".")[1]) == 3
        assert Decimal(q) > 0
    other = Book(spec_for("BTCUSDT"), seed=8)
    assert other.snapshot() != Book(spec_for("BTCUSDT"), seed=7).snapshot()


def test_book_seeded_from_recorded_snapshot():
    snap = load_recorded_snapshot(SUSHI, "SUSHIUSDT")
    assert snap is not None
    book = Book.from_snapshot("SUSHIUSDT", snap, depth=1000)
    bids, asks = book.top(5)
    assert bids == [list(x) for x in snap["bids"][:5]]
    assert asks == [list(x) for x in snap["asks"][:5]]
    assert book.last_update_id == snap["lastUpdateId"]
    for _ in range(200):
        book.tick(0)
        assert max(book.bids) < min(book.asks)


# --- REST ---------------------------------------------------------------------------------


async def test_depth_shape_weight_header_and_errors():
    async with open_simulator(symbols=["BTCUSDT", "ETHUSDT"], **FAST) as sim:
        async with httpx.AsyncClient(base_url=sim.rest_url, timeout=5) as c:
            r = await c.get("/fapi/v1/depth", params={"symbol": "BTCUSDT", "limit": 5})
            assert r.status_code == 200
            body = r.json()
            assert set(body) == {"lastUpdateId", "E", "T", "bids", "asks"}
            assert len(body["bids"]) == 5 and len(body["asks"]) == 5
            assert all(isinstance(x, str) for lvl in body["bids"] for x in lvl)
            assert Decimal(body["bids"][0][0]) < Decimal(body["asks"][0][0])
            assert r.headers["X-MBX-USED-WEIGHT-1M"] == "2"
            r = await c.get("/fapi/v1/depth", params={"symbol": "ETHUSDT", "limit": 100})
            assert r.headers["x-mbx-used-weight-1m"] == "7"
            assert len(r.json()["bids"]) == 100
            r = await c.get("/fapi/v1/depth", params={"symbol": "NOPEUSDT", "limit": 5})
            assert r.status_code == 400 and r.json() == {"code": -1121, "msg": "Invalid symbol."}
            assert "X-MBX-USED-WEIGHT-1M" in r.headers
            r = await c.get("/fapi/v1/depth", params={"symbol": "BTCUSDT", "limit": 7})
            assert r.status_code == 400
            r = await c.get("/fapi/v1/exchangeInfo")
            info = r.json()
            assert {s["symbol"] for s in info["symbols"]} == {"BTCUSDT", "ETHUSDT"}
            btc = next(s for s in info["symbols"] if s["symbol"] == "BTCUSDT")
            assert btc["status"] == "TRADING" and btc["contractType"] == "PERPETUAL"
            filters = {f["filterType"]: f for f in btc["filters"]}
            assert filters["PRICE_FILTER"]["tickSize"] == "0.10"
            assert info["rateLimits"][0]["rateLimitType"] == "REQUEST_WEIGHT"
            assert info["rateLimits"][0]["limit"] == 2400
        st = sim.stats_json()
        assert st["symbols"]["BTCUSDT"]["rest_levels"] == 10
        assert st["symbols"]["ETHUSDT"]["rest_levels"] == 200
        assert st["symbols"]["BTCUSDT"]["rest_snapshots"] == 1


async def test_book_advances_without_clients():
    async with open_simulator(symbols=["BTCUSDT"], **FAST) as sim:
        first = sim.book("BTCUSDT")["lastUpdateId"]
        await trio.sleep(0.2)
        assert sim.book("BTCUSDT")["lastUpdateId"] > first


async def test_weight_limit_429_then_418_ban():
    async with open_simulator(symbols=["BTCUSDT"], weight_limit=10, **FAST) as sim:
        async with httpx.AsyncClient(base_url=sim.rest_url, timeout=5) as c:
            p = {"symbol": "BTCUSDT", "limit": 5}
            for i in range(5):
                r = await c.get("/fapi/v1/depth", params=p)
                assert r.status_code == 200
                assert r.headers["X-MBX-USED-WEIGHT-1M"] == str(2 * (i + 1))
            r = await c.get("/fapi/v1/depth", params=p)
            assert r.status_code == 429
            assert 1 <= int(r.headers["Retry-After"]) <= 60
            r = await c.get("/fapi/v1/depth", params=p)  # sent while told to wait
            assert r.status_code == 418
            assert int(r.headers["Retry-After"]) >= 60
            r = await c.get("/fapi/v1/exchangeInfo")  # still banned, any route
            assert r.status_code == 418
        # another IP is not affected
        t = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
        async with httpx.AsyncClient(base_url=sim.rest_url, transport=t, timeout=5) as c2:
            assert (await c2.get("/fapi/v1/depth", params=p)).status_code == 200
        st = sim.stats_json()["clients"]
        log = st["127.0.0.1"]["requests"]
        assert [e["status"] for e in log] == [200] * 5 + [429, 418, 418]
        assert [e["violation"] for e in log[5:]] == [None, "throttled", "banned"]
        assert st["127.0.0.1"]["violations"] == 2 and st["127.0.0.1"]["bans"] == 1
        assert st["127.0.0.2"]["violations"] == 0


@pytest.mark.parametrize(
    "kind,params",
    [
        ("rest_429", {"retry_after": 3}),
        ("rest_418", {"retry_after": 4}),
        ("rest_5xx", {"status": 502}),
        ("rest_slow", {"delay": 0.4}),
        ("rest_malformed", {}),
        ("rest_missing_fields", {"fields": ["lastUpdateId", "bids"]}),
        ("rest_undecodable", {}),
    ],
)
async def test_rest_fault_applied_once_and_counted(kind, params):
    async with open_simulator(symbols=["BTCUSDT", "ETHUSDT"], **FAST) as sim:
        sim.faults.add(kind, symbol="BTCUSDT", **params)
        async with httpx.AsyncClient(base_url=sim.rest_url, timeout=5) as c:
            p = {"symbol": "BTCUSDT", "limit": 5}
            # another symbol does not consume a symbol-scoped fault
            r = await c.get("/fapi/v1/depth", params={"symbol": "ETHUSDT", "limit": 5})
            assert r.status_code == 200
            t0 = time.monotonic()
            if kind == "rest_undecodable":  # a 200 whose body the client cannot decode
                with pytest.raises(httpx.DecodingError):
                    await c.get("/fapi/v1/depth", params=p)
            else:
                r = await c.get("/fapi/v1/depth", params=p)
            elapsed = time.monotonic() - t0
            if kind == "rest_undecodable":
                pass
            elif kind == "rest_429":
                assert r.status_code == 429 and r.headers["Retry-After"] == "3"
            elif kind == "rest_418":
                assert r.status_code == 418 and r.headers["Retry-After"] == "4"
            elif kind == "rest_5xx":
                assert r.status_code == 502
            elif kind == "rest_slow":
                assert r.status_code == 200 and elapsed >= 0.4
                assert len(r.json()["bids"]) == 5
            elif kind == "rest_malformed":
                assert r.status_code == 200
                with pytest.raises(orjson.JSONDecodeError):
                    orjson.loads(r.content)
            else:
                assert r.status_code == 200
                body = r.json()
                assert "lastUpdateId" not in body and "bids" not in body and "asks" in body
            r2 = await c.get("/fapi/v1/depth", params=p)
        assert sim.faults.applied[kind] == 1
        assert sim.faults.pending == []
        if kind in ("rest_429", "rest_418"):
            assert r2.status_code == 418  # a client that ignores the wait gets banned
        else:
            assert r2.status_code == 200
        served = {"rest_429": 0, "rest_418": 0, "rest_slow": 2}.get(kind, 1)
        assert sim.stats.symbols["BTCUSDT"].rest_snapshots == served


async def test_admin_endpoints():
    async with (
        open_simulator(symbols=["BTCUSDT"], **FAST) as sim,
        httpx.AsyncClient(base_url=sim.rest_url, timeout=5) as c,
    ):
        r = await c.post("/_sim/faults", json={"kind": "rest_5xx", "status": 503, "count": 2})
        assert r.status_code == 200 and r.json()["ok"]
        r = await c.post("/_sim/faults", json={"kind": "bogus"})
        assert r.status_code == 400
        p = {"symbol": "BTCUSDT", "limit": 5}
        codes = [(await c.get("/fapi/v1/depth", params=p)).status_code for _ in range(3)]
        assert codes == [503, 503, 200]
        st = (await c.get("/_sim/stats")).json()
        assert st["faults"]["applied"] == {"rest_5xx": 2}
        assert [e["status"] for e in st["clients"]["127.0.0.1"]["requests"]] == codes
        assert st["symbols"]["BTCUSDT"]["rest_levels"] == 10
        await c.post("/_sim/pause")
        book = (await c.get("/_sim/book", params={"symbol": "BTCUSDT"})).json()
        assert book == sim.book("BTCUSDT")
        await c.post("/_sim/resume")
        assert not sim.market.paused


# --- WebSocket ----------------------------------------------------------------------------


async def test_ws_combined_stream_is_continuous():
    async with open_simulator(symbols=["BTCUSDT", "ETHUSDT"], **FAST) as sim:
        url = f"{sim.ws_url}/public/stream?streams=btcusdt@depth@100ms/ethusdt@depth@100ms"
        async with open_websocket_url(url) as ws:
            raw = orjson.loads(await ws.get_message())
            assert raw["stream"] in ("btcusdt@depth@100ms", "ethusdt@depth@100ms")
            events = [raw["data"], *await read_events(ws, 30)]
        assert {e["s"] for e in events} == {"BTCUSDT", "ETHUSDT"}
        assert pu_breaks(events) == 0
        for e in events:
            assert e["e"] == "depthUpdate" and e["U"] <= e["u"]
            assert set(e) == {"e", "E", "T", "s", "U", "u", "pu", "b", "a"}
        st = sim.stats.symbols["BTCUSDT"]
        assert st.ws_events >= 1 and st.ws_levels >= st.ws_events


@pytest.mark.parametrize("path", ["/ws/btcusdt@depth@100ms", "/public/ws/btcusdt@depth@100ms"])
async def test_ws_raw_paths(path):
    async with open_simulator(symbols=["BTCUSDT"], **FAST) as sim:
        async with open_websocket_url(sim.ws_url + path) as ws:
            events = await read_events(ws, 5)
        assert all("stream" not in orjson.loads(json.dumps(e)) for e in events)
        assert all(e["s"] == "BTCUSDT" for e in events)
        assert pu_breaks(events) == 0


async def test_ws_subscribe_unsubscribe_and_speeds():
    async with open_simulator(symbols=["BTCUSDT"], **FAST) as sim:
        async with open_websocket_url(sim.ws_url + "/public/ws") as ws:
            await ws.send_message(
                json.dumps({"method": "SUBSCRIBE", "params": ["btcusdt@depth@500ms"], "id": 7})
            )
            assert orjson.loads(await ws.get_message()) == {"result": None, "id": 7}
            t0 = trio.current_time()
            events = await read_events(ws, 3)
            assert trio.current_time() - t0 >= 0.9  # 500 ms cadence
            assert pu_breaks(events) == 0
            # several ticks aggregated into one event: ids of ~25 ticks
            await ws.send_message(json.dumps({"method": "LIST_SUBSCRIPTIONS", "id": 8}))
            await ws.send_message(
                json.dumps({"method": "UNSUBSCRIBE", "params": ["btcusdt@depth@500ms"], "id": 9})
            )
            replies = []
            with trio.fail_after(3):
                while len(replies) < 2:
                    m = orjson.loads(await ws.get_message())
                    if "id" in m:
                        replies.append(m)
            assert replies == [
                {"result": ["btcusdt@depth@500ms"], "id": 8},
                {"result": None, "id": 9},
            ]
            with trio.move_on_after(0.7):
                m = await ws.get_message()
                pytest.fail(f"message after unsubscribe: {m}")
        assert sim.stats.symbols["BTCUSDT"].ws_ticks >= 3 * 20


async def test_ws_drop_gives_exactly_one_gap():
    async with open_simulator(symbols=["BTCUSDT", "ETHUSDT"], **FAST) as sim:
        url = f"{sim.ws_url}/public/stream?streams=btcusdt@depth@100ms/ethusdt@depth@100ms"
        async with open_websocket_url(url) as ws:
            events = await read_events(ws, 6)
            sim.faults.add("ws_drop", symbol="BTCUSDT")
            events += await read_events(ws, 24)
        btc = [e for e in events if e["s"] == "BTCUSDT"]
        eth = [e for e in events if e["s"] == "ETHUSDT"]
        assert pu_breaks(btc) == 1 and pu_breaks(eth) == 0
        (i,) = [k for k in range(1, len(btc)) if btc[k]["pu"] != btc[k - 1]["u"]]
        assert btc[i]["pu"] > btc[i - 1]["u"]  # a real hole, not a replay
        assert sim.faults.applied["ws_drop"] == 1
        assert sim.stats.symbols["BTCUSDT"].ws_drops == 1


async def test_ws_duplicate_out_of_order_malformed():
    async with open_simulator(symbols=["BTCUSDT"], **FAST) as sim:
        async with open_websocket_url(f"{sim.ws_url}/ws/btcusdt@depth@100ms") as ws:
            await read_events(ws, 2)
            sim.faults.add("ws_duplicate")
            events = await read_events(ws, 4)
            assert any(events[k] == events[k + 1] for k in range(3))
            sim.faults.add("ws_out_of_order")
            events = await read_events(ws, 4)
            us = [e["u"] for e in events]
            assert us != sorted(us)
            sim.faults.add("ws_malformed")
            bad = 0
            with trio.fail_after(5):
                for _ in range(4):
                    try:
                        orjson.loads(await ws.get_message())
                    except orjson.JSONDecodeError:
                        bad += 1
            assert bad == 1
        assert dict(sim.faults.applied) == {
            "ws_duplicate": 1,
            "ws_out_of_order": 1,
            "ws_malformed": 1,
        }


async def test_ws_close_and_stall():
    async with open_simulator(symbols=["BTCUSDT"], **FAST) as sim:
        url = f"{sim.ws_url}/ws/btcusdt@depth@100ms"
        async with open_websocket_url(url) as ws:
            last = (await read_events(ws, 2))[-1]
            sim.faults.add("ws_stall", seconds=0.6)
            t0 = trio.current_time()
            nxt = (await read_events(ws, 1))[0]
            assert trio.current_time() - t0 >= 0.5
            assert nxt["pu"] == last["u"]  # stalled, not gapped
            sim.faults.add("ws_close")
            with pytest.raises(ConnectionClosed), trio.fail_after(5):
                while True:
                    await ws.get_message()
        assert sim.faults.applied["ws_close"] == 1 and sim.faults.applied["ws_stall"] == 1
        assert sim.stats.ws["closed_by_fault"] == 1


async def test_connection_lifetime_cut():
    async with open_simulator(symbols=["BTCUSDT"], connection_lifetime=0.5, **FAST) as sim:
        async with open_websocket_url(f"{sim.ws_url}/ws/btcusdt@depth@100ms") as ws:
            with pytest.raises(ConnectionClosed), trio.fail_after(5):
                while True:
                    await ws.get_message()
        assert sim.stats.ws["closed_by_lifetime"] == 1


async def test_unknown_ws_path_rejected_and_market_path_silent():
    async with open_simulator(symbols=["BTCUSDT"], **FAST) as sim:
        with pytest.raises(ConnectionRejected) as exc, trio.fail_after(5):
            async with open_websocket_url(f"{sim.ws_url}/nope"):
                pass
        assert exc.value.status_code == 404
        async with open_websocket_url(f"{sim.ws_url}/market/ws/btcusdt@depth@100ms") as ws:
            with trio.move_on_after(0.5):
                m = await ws.get_message()
                pytest.fail(f"depth delivered on /market: {m}")


async def test_server_pings_are_answered():
    async with open_simulator(symbols=["BTCUSDT"], tick_interval=0.02, ping_interval=0.2) as sim:
        async with open_websocket_url(f"{sim.ws_url}/ws/btcusdt@depth@100ms") as ws:
            await read_events(ws, 8)  # ~0.8 s of reading: the client pongs in the background
            sim.faults.add("ws_ping")
            await read_events(ws, 3)
        ws_stats = sim.stats.ws
        assert ws_stats["pings_sent"] >= 3
        assert ws_stats["pongs_received"] >= 2
        assert ws_stats["pings_unanswered"] == 0
        assert sim.faults.applied["ws_ping"] == 1


def _apply(book: dict[str, dict[str, str]], levels: list[list[str]], side: str) -> None:
    for p, q in levels:
        if Decimal(q) == 0:
            book[side].pop(p, None)
        else:
            book[side][p] = q


async def test_snapshot_plus_diffs_equals_simulator_book():
    async with open_simulator(symbols=["BTCUSDT"], **FAST) as sim:
        url = f"{sim.ws_url}/public/stream?streams=btcusdt@depth@100ms"
        async with (
            open_websocket_url(url) as ws,
            httpx.AsyncClient(base_url=sim.rest_url, timeout=5) as c,
        ):
            buffered = await read_events(ws, 3)  # the usual case: diffs before the snapshot
            p = {"symbol": "BTCUSDT", "limit": 1000}
            snap = (await c.get("/fapi/v1/depth", params=p)).json()
            L = snap["lastUpdateId"]
            book = {"bids": dict(map(tuple, snap["bids"])), "asks": dict(map(tuple, snap["asks"]))}
            await trio.sleep(0.3)
            sim.pause()
            final_u = sim.book("BTCUSDT")["lastUpdateId"]
            events = buffered
            while events[-1]["u"] < final_u:
                events += await read_events(ws, 1)
        applied = []
        for e in events:
            if e["u"] < L:
                continue
            if not applied:
                assert e["U"] <= L + 1 <= e["u"] + 1  # straddles the snapshot
            else:
                assert e["pu"] == applied[-1]["u"]
            _apply(book, e["b"], "bids")
            _apply(book, e["a"], "asks")
            applied.append(e)
        assert applied
        expected = sim.book("BTCUSDT")
        assert book["bids"] == expected["bids"]
        assert book["asks"] == expected["asks"]


# --- standalone process -------------------------------------------------------------------


@pytest.mark.slow
def test_standalone_process_prints_urls_and_stops_on_sigterm():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cryptoflow.sim", "--symbols", "BTCUSDT,ETHUSDT", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )
    watchdog = threading.Timer(20, proc.kill)  # bounds readline() if it never prints
    watchdog.start()
    try:
        line = proc.stdout.readline()
        info = json.loads(line)
        assert info["rest_url"].startswith("http://127.0.0.1:")
        assert info["ws_url"].startswith("ws://127.0.0.1:")
        r = httpx.get(
            info["rest_url"] + "/fapi/v1/depth", params={"symbol": "ETHUSDT", "limit": 5}, timeout=5
        )
        assert r.status_code == 200 and len(r.json()["asks"]) == 5
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
        assert time.monotonic() - t0 < 5
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
