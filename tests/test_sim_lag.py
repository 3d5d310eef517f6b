"""The simulator's send path under the full-table load fixes (scripts/bench_sim.py):
incremental top-N views, sorted price lists in the book, the per-connection writer
(``sim/wsout.py``) and tick-aligned Binance events. Correctness and bounds only, never
speed; sockets on 127.0.0.1, bounded in time."""

from __future__ import annotations

import hashlib
import itertools

import httpx
import orjson
import pytest
import trio
from trio_websocket import open_websocket_url, serve_websocket

from cryptoflow.exchanges.kucoin import parse as kucoin
from cryptoflow.sim import open_simulator
from cryptoflow.sim.book import Book, spec_for
from cryptoflow.sim.bybit import TopView, top_levels
from cryptoflow.sim.faults import Stats
from cryptoflow.sim.market import Market
from cryptoflow.sim.wsout import Outbox

FAST = {"tick_interval": 0.02, "ping_interval": None}


# --- book model and views -----------------------------------------------------------------


@pytest.mark.parametrize("symbol", ["BTCUSDT", "XRPUSDT", "FOOUSDT"])
@pytest.mark.parametrize("depth", [12, 60, 1000])
def test_sorted_price_lists_follow_the_book(symbol, depth):
    book = Book(spec_for(symbol), seed=11, depth=depth)
    for _ in range(1500):
        d = book.tick(0)
        assert book.bid_prices == sorted(book.bids)
        assert book.ask_prices == sorted(book.asks)
        assert len(book.bids) <= depth and len(book.asks) <= depth
        assert d.u - d.U + 1 == d.levels  # one id per changed level
    assert book.best_bids() == sorted(book.bids.items(), reverse=True)
    assert book.best_asks(7) == sorted(book.asks.items())[:7]
    assert book.best_bids(0) == [] and book.best_asks(0) == []
    assert max(book.bids) < min(book.asks)


def _reference(view: list[dict[int, int]], book: Book, n: int) -> tuple[dict, dict]:
    """What TopView.update did before: recompute the top n, compare with the last one."""
    nb, na = top_levels(book.bids, n, True), top_levels(book.asks, n, False)
    cb = {p: 0 for p in view[0] if p not in nb}
    cb.update({p: q for p, q in nb.items() if view[0].get(p) != q})
    ca = {p: 0 for p in view[1] if p not in na}
    ca.update({p: q for p, q in na.items() if view[1].get(p) != q})
    view[0], view[1] = nb, na
    return cb, ca


@pytest.mark.parametrize("symbol", ["BTCUSDT", "DOGEUSDT", "FOOUSDT"])
@pytest.mark.parametrize("depth", [15, 80, 500])
def test_incremental_top_view_equals_recomputing_it(symbol, depth):
    book = Book(spec_for(symbol), seed=3, depth=depth)
    views = []
    for n in (1, 3, 10, 50, 200, 400):
        ref = [top_levels(book.bids, n, True), top_levels(book.asks, n, False)]
        views.append((n, TopView(book, n), ref))
    for i in range(800):
        d = book.tick(0)
        for n, view, ref in views:
            got = view.update(d)
            if view.full:  # the whole book: the diff passes through
                assert got == (d.bids, d.asks)
                continue
            assert got == _reference(ref, book, n), (n, i)
            assert view.bids == ref[0] and view.asks == ref[1]


def test_view_created_mid_run_starts_from_the_book():
    book = Book(spec_for("ETHUSDT"), seed=1, depth=300)
    for _ in range(50):
        book.tick(0)
    view = TopView(book, 20)
    assert view.bids == dict(sorted(book.bids.items(), reverse=True)[:20])
    assert view.asks == dict(sorted(book.asks.items())[:20])


# --- the connection writer ----------------------------------------------------------------


async def test_outbox_keeps_each_senders_order_and_coalesces_writes():
    """Many tasks sending on one connection: every message arrives once, each task's in
    its order, and the writer has written several per socket write."""
    senders, per_sender = 12, 40
    done = trio.Event()
    outboxes: list[Outbox] = []

    async def handler(request):
        ws = await request.accept()
        box = Outbox(ws)
        outboxes.append(box)

        async def sender(k: int) -> None:
            for i in range(per_sender):
                if i % 7 == 0:
                    await box.send_many([f"{k}:{i}:a", f"{k}:{i}:b"])
                else:
                    await box.send(f"{k}:{i}")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(box.run)
            async with trio.open_nursery() as inner:
                for k in range(senders):
                    inner.start_soon(sender, k)
            await box.flush()
            await done.wait()
            nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
        got: list[str] = []
        with trio.fail_after(10):
            async with open_websocket_url(f"ws://127.0.0.1:{server.port}/") as ws:
                expected = senders * (per_sender + len(range(0, per_sender, 7)))
                while len(got) < expected:
                    got.append(await ws.get_message())
        done.set()
        nursery.cancel_scope.cancel()
    assert len(got) == len(set(got))
    for k in range(senders):
        mine = [m for m in got if m.startswith(f"{k}:")]
        keys = [(int(m.split(":")[1]), m.split(":")[2] if m.count(":") == 2 else "") for m in mine]
        assert keys == sorted(keys)
        assert len(mine) == per_sender + len(range(0, per_sender, 7))
    box = outboxes[0]
    assert box.messages == len(got)
    assert box.writes < box.messages  # several messages per write


async def test_kucoin_shared_connection_keeps_sequences_and_faults():
    """Several symbols on one KuCoin connection (their ticks go out as one queue entry
    each): per symbol, sequence +1 from message to message; a ws_drop still makes exactly
    one gap of that symbol."""
    syms = ["XBTUSDTM", "ETHUSDTM", "SOLUSDTM"]
    async with (
        open_simulator(venue_symbols={"kucoin": syms}, **FAST) as sim,
        httpx.AsyncClient(base_url=sim.rest_url) as c,
    ):
        data = (await c.post("/api/v1/bullet-public")).json()["data"]
        url = f"{data['instanceServers'][0]['endpoint']}?token={data['token']}&connectId=t"
        async with open_websocket_url(url) as ws:
            topic = "/contractMarket/level2:" + ",".join(syms)
            await ws.send_message(orjson.dumps({"id": "1", "type": "subscribe", "topic": topic}))
            seqs: dict[str, list[int]] = {s: [] for s in syms}
            dropped = False
            with trio.fail_after(10):
                while min(len(v) for v in seqs.values()) < 60:
                    item = kucoin.parse_ws_message(await ws.get_message(), 0, {s: s for s in syms})
                    if not isinstance(item, list):
                        continue
                    for d in item:
                        seqs[d.symbol].append(d.last_update_id)
                    if not dropped and len(seqs["ETHUSDTM"]) >= 20:
                        sim.faults.add("ws_drop", venue="kucoin", symbol="ETHUSDTM")
                        dropped = True
    for s, ids in seqs.items():
        gaps = sum(1 for a, b in itertools.pairwise(ids) if b != a + 1)
        assert gaps == (1 if s == "ETHUSDTM" else 0), s
        assert all(b > a for a, b in itertools.pairwise(ids))


# --- Binance events leave on the tick ------------------------------------------------------


async def test_binance_event_follows_a_manual_tick_while_paused():
    """Paused, one manual step: the stream sends that tick's event (it waits for ticks,
    not for a timer of its own), and nothing else while no tick comes."""
    async with (
        open_simulator(symbols=["BTCUSDT"], **FAST) as sim,
        open_websocket_url(f"{sim.ws_url}/ws/btcusdt@depth@100ms") as ws,
    ):
        with trio.fail_after(5):
            await ws.get_message()
        sim.pause()
        with trio.move_on_after(0.4):  # drain what was made before the pause
            while True:
                await ws.get_message()
        for _ in range(3):
            sim.step()
            with trio.fail_after(5):
                e = orjson.loads(await ws.get_message())
            assert e["u"] == sim.book("BTCUSDT")["lastUpdateId"]
        with trio.move_on_after(0.4):
            m = await ws.get_message()
            pytest.fail(f"event without a tick: {m}")


async def test_binance_500ms_stream_aggregates_about_its_interval_of_ticks():
    async with open_simulator(symbols=["BTCUSDT"], **FAST) as sim:
        async with open_websocket_url(f"{sim.ws_url}/ws/btcusdt@depth@500ms") as ws:
            events = []
            with trio.fail_after(10):
                while len(events) < 4:
                    events.append(orjson.loads(await ws.get_message()))
        st = sim.stats.symbols["BTCUSDT"]
        # 500 ms of 20 ms ticks = 25 per event (the first: since the subscription)
        assert st.ws_events >= len(events)
        assert 10 <= st.ws_ticks / st.ws_events <= 40
        for a, b in itertools.pairwise(events):
            assert b["pu"] == a["u"]


def test_a_stream_that_stops_taking_events_stays_bounded_and_continuous():
    """A Binance stream whose events are not taken (its client stopped reading, so its
    sends block) must not keep every tick: its queue stops growing, older ticks are merged
    into one pending event (since events are cut at tick numbers every tick was kept,
    without bound). Nothing is lost: its next event carries every tick since it last
    took one, continuous with what it sent, and gives the book as it is now."""
    book = Book(spec_for("BTCUSDT"), seed=9, depth=100)
    market = Market({"BTCUSDT": book}, Stats())
    bids, asks, start = dict(book.bids), dict(book.asks), book.last_update_id
    stalled = market.subscribe("BTCUSDT")
    live = market.subscribe("BTCUSDT")  # a client that keeps up: one event per tick
    events = []

    def ticks(n: int) -> None:
        for _ in range(n):
            market.tick_no += 1
            market.step()
            events.append(live.take_through(market.tick_no))

    ticks(3000)
    queued = len(stalled.diffs)
    ticks(3000)  # 10 minutes of 100 ms ticks in all
    assert len(stalled.diffs) == queued < 3000  # bounded: no longer growing with the ticks
    assert len(live.diffs) == 0 and live.lagged is None
    agg = stalled.take_through(market.tick_no)
    assert agg is not None and stalled.take_through(market.tick_no) is None
    assert agg.ticks == 6000 and (agg.pu, agg.U) == (start, start + 1)
    assert agg.u == book.last_update_id == events[-1].u
    for side, changes in ((bids, agg.bids), (asks, agg.asks)):
        for price, qty in changes.items():
            if qty:
                side[price] = qty
            else:
                side.pop(price, None)
    assert (bids, asks) == (book.bids, book.asks)


def test_book_evolution_is_unchanged_by_the_sorted_lists():
    """Same seed, same diffs as before the sorted price lists (fingerprint taken from the
    previous implementation: ids, changed levels per tick, final id and mid)."""
    book = Book(spec_for("BTCUSDT"), seed=42, depth=200)
    h = hashlib.sha256()
    for _ in range(300):
        d = book.tick(0)
        h.update(repr((d.U, d.u, sorted(d.bids.items()), sorted(d.asks.items()))).encode())
    assert (h.hexdigest()[:16], book.last_update_id, book.mid) == (
        "311cbac75b819f06",
        1000122771,
        6000030,
    )
