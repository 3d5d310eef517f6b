"""The simulator: one market (books + clock loop), venue modules plugged into one REST
server and one WebSocket server (two ports on 127.0.0.1), fault injection and stats.

Venue modules provide ``name``, ``owns_path(path)``/``handle_rest(req)`` for REST and
``owns_ws_path(path)``/``handle_ws(request)`` for WebSocket; the first venue claiming a
path serves it. Admin endpoints live under ``/_sim/`` on the REST port.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

import orjson
import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

from cryptoflow.sim.binance import BinanceVenue
from cryptoflow.sim.book import Book, find_recorded_snapshot, spec_for
from cryptoflow.sim.bybit import BybitVenue
from cryptoflow.sim.faults import Faults, Stats
from cryptoflow.sim.http import HttpRequest, HttpResponse, serve_http
from cryptoflow.sim.kucoin import KucoinVenue
from cryptoflow.sim.market import Market
from cryptoflow.sim.okx import OkxVenue

log = logging.getLogger(__name__)

DEFAULT_SYMBOLS = ("BTCUSDT", "ETHUSDT")
DEFAULT_RECORDED_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "recorded"


class Venue(Protocol):
    """What a venue module plugs into the simulator (see ``binance.BinanceVenue``).

    Constructed as ``factory(market, faults, stats, **options)``; the market's books are
    keyed by normalized symbol, the venue maps them to its own instrument names.
    """

    name: str

    def owns_path(self, path: str) -> bool: ...

    async def handle_rest(self, req: HttpRequest) -> HttpResponse: ...

    def owns_ws_path(self, path: str) -> bool: ...

    async def handle_ws(self, request: WebSocketRequest) -> None: ...


# name -> factory(market, faults, stats, **options). REST paths do not overlap (/fapi/,
# /v5/, /api/v5/, /api/v1/); OKX's WS path /ws/v5/public sits under Binance's /ws/ prefix,
# so Binance is asked last. Each venue has its own books (own ids) and its own Stats.
VENUES: dict[str, Callable[..., Venue]] = {
    "binance": BinanceVenue,
    "bybit": BybitVenue,
    "okx": OkxVenue,
    "kucoin": KucoinVenue,
}


class Simulator:
    """Handle returned by :func:`open_simulator` / ``nursery.start(serve_simulator, ...)``."""

    def __init__(
        self,
        market: Market,
        faults: Faults,
        stats: Stats,
        venues: list[Venue],
        markets: dict[str, Market] | None = None,
    ) -> None:
        self.market = market  # Binance's (or the first venue's) market
        self.faults = faults
        self.stats = stats  # Binance's stats (top level of stats_json)
        self.venues = venues
        self.markets = markets if markets is not None else {v.name: market for v in venues}
        self.rest_url = ""
        self.ws_url = ""
        self.rest_port = 0
        self.ws_port = 0

    @property
    def symbols(self) -> list[str]:
        return list(self.market.books)

    def venue(self, name: str) -> Venue:
        return next(v for v in self.venues if v.name == name)

    def venue_symbols(self, venue: str = "binance") -> list[str]:
        return list(self.markets[venue].books)

    def book(self, symbol: str, venue: str | None = None) -> dict[str, Any]:
        """Full current book: ``{"symbol", "lastUpdateId", "bids": {price: qty}, "asks"}``.

        ``venue`` (default Binance): the venue's id (Bybit ``u``, OKX ``seqId``, KuCoin
        ``sequence``) and sizes in the venue's units as served (OKX contracts, KuCoin lots;
        KuCoin prices/sizes in the canonical text the project's parser yields)."""
        if venue is None or venue == "binance":
            return self.markets.get("binance", self.market).books[symbol.upper()].snapshot()
        return self.venue(venue).book_view(symbol)  # type: ignore[attr-defined]

    def pause(self) -> None:
        """Stop the clock loops from ticking the books (streams then go quiet)."""
        for m in {id(m): m for m in (self.market, *self.markets.values())}.values():
            m.paused = True

    def resume(self) -> None:
        for m in {id(m): m for m in (self.market, *self.markets.values())}.values():
            m.paused = False

    def step(self, n: int = 1) -> None:
        """Tick every book of every venue ``n`` times now (works while paused)."""
        for _ in range(n):
            for m in {id(m): m for m in (self.market, *self.markets.values())}.values():
                m.step()

    def stats_json(self) -> dict[str, Any]:
        out = self.stats.to_json()
        out["faults"] = self.faults.to_json()
        out["ws"]["connection_list"] = [
            c.to_json() for v in self.venues for c in getattr(v, "connections", [])
        ]
        out["paused"] = self.market.paused
        venues: dict[str, Any] = {}
        for v in self.venues:
            vs: Stats = getattr(v, "stats", self.stats)
            d = vs.to_json()
            d["ws"]["connection_list"] = [c.to_json() for c in getattr(v, "connections", [])]
            venues[v.name] = d
        out["venues"] = venues
        return out

    # --- dispatch -----------------------------------------------------------------------

    async def handle_http(self, req: HttpRequest) -> HttpResponse:
        if req.path.startswith("/_sim/"):
            return await self._admin(req)
        for v in self.venues:
            if v.owns_path(req.path):
                return await v.handle_rest(req)
        return HttpResponse.json({"error": "not found", "path": req.path}, status=404)

    async def handle_ws(self, request: WebSocketRequest) -> None:
        try:
            try:
                for v in self.venues:
                    if v.owns_ws_path(request.path):
                        await v.handle_ws(request)
                        return
                await request.reject(404, body=b"unknown path")
            except* ConnectionClosed:
                pass
        except Exception:  # one broken connection must not stop the server
            log.exception("sim: websocket handler failed for %s", request.path)

    async def _admin(self, req: HttpRequest) -> HttpResponse:
        p, m = req.path, req.method
        if p == "/_sim/stats" and m == "GET":
            return HttpResponse.json(self.stats_json())
        if p == "/_sim/faults":
            if m == "GET":
                return HttpResponse.json(self.faults.to_json())
            if m == "DELETE":
                self.faults.clear()
                return HttpResponse.json({"ok": True})
            if m == "POST":
                try:
                    body = req.json()
                    items = body if isinstance(body, list) else [body]
                    queued = []
                    for it in items:
                        it = dict(it)
                        kind = it.pop("kind")
                        count = int(it.pop("count", 1))
                        queued.append(self.faults.add(kind, count, **it).to_json())
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                    return HttpResponse.json({"ok": False, "error": str(e)}, status=400)
                return HttpResponse.json({"ok": True, "queued": queued})
        if p == "/_sim/book" and m == "GET":
            venue = req.query.get("venue", "binance")
            sym = req.query.get("symbol", "")
            sym = sym.upper() if venue == "binance" else sym
            if venue not in self.markets or sym not in self.markets[venue].books:
                return HttpResponse.json({"ok": False, "error": "unknown symbol"}, status=404)
            return HttpResponse.json(self.book(sym, venue))
        if p == "/_sim/pause" and m == "POST":
            self.pause()
            return HttpResponse.json({"ok": True})
        if p == "/_sim/resume" and m == "POST":
            self.resume()
            return HttpResponse.json({"ok": True})
        return HttpResponse.json({"ok": False, "error": "unknown admin endpoint"}, status=404)


def build_books(
    symbols: Sequence[str],
    seed: int | str,
    depth: int,
    recorded_dir: str | Path | None,
) -> dict[str, Book]:
    books: dict[str, Book] = {}
    for s in symbols:
        s = s.upper()
        snap = None
        if recorded_dir is not None:
            snap = find_recorded_snapshot(Path(recorded_dir) / "binance", s)
        if snap is not None:
            books[s] = Book.from_snapshot(s, snap, seed=seed, depth=depth)
        else:
            books[s] = Book(spec_for(s), seed=seed, depth=depth)
    return books


async def serve_simulator(
    *,
    symbols: Sequence[str] = DEFAULT_SYMBOLS,
    seed: int | str = 0,
    tick_interval: float = 0.1,
    ping_interval: float | None = 180.0,
    pong_timeout: float = 10.0,
    weight_limit: int = 2400,
    weight_window: float = 60.0,
    ban_seconds: float = 120.0,
    depth: int = 1000,
    recorded_dir: str | Path | None = None,
    connection_lifetime: float | None = None,
    venues: Sequence[str] | None = None,
    venue_symbols: Mapping[str, Sequence[str]] | None = None,
    okx_snapshot_in_stream: bool = True,
    venue_options: Mapping[str, Mapping[str, Any]] | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    ws_port: int = 0,
    id_base: int = 0,
    task_status: trio.TaskStatus[Simulator] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the simulator until cancelled; ``task_status.started(sim)`` once both ports
    listen (REST on ``port``, WebSocket on ``ws_port``; 0 = ephemeral).

    symbols: normalized symbols, one book each.  seed: makes books and their evolution
    deterministic.  tick_interval: seconds between book ticks (the clock loop runs with or
    without clients).  ping_interval: seconds between server WS pings (None = off);
    pong_timeout: a ping without pong after this long counts as unanswered.
    weight_limit / weight_window: request weight allowed per client IP per fixed window
    (Binance: 2400 per 60 s); ban_seconds: first 418 ban length (doubles per ban, capped at
    3 days).  depth: max levels per side (1000 = a limit=1000 snapshot is the full book).
    recorded_dir (e.g. ``../shared/data/recorded``): seed a symbol's book from a recorded
    Binance REST snapshot under ``<recorded_dir>/binance/`` when one exists.
    connection_lifetime: close each WS connection after this many seconds (the 24 h cut).
    venues: venue modules to plug in (keys of ``VENUES``); default: the keys of
    ``venue_symbols`` when given, else ("binance",).
    venue_symbols: venue -> that venue's instrument ids (``{"okx": ["BTC-USDT-SWAP"],
    "kucoin": ["XBTUSDTM"], ...}``); a venue not in it gets ``symbols`` mapped to its
    names (BTCUSDT -> BTCUSDT / BTC-USDT-SWAP / XBTUSDTM). Binance uses ``symbols`` unless
    ``venue_symbols["binance"]`` is given. Each venue has its own books and ids.
    okx_snapshot_in_stream: False = OKX sends no in-stream snapshot (anchor on REST seqId).
    venue_options: venue -> extra keyword options of that venue class (e.g.
    ``{"bybit": {"rate_limit": 600, "rate_window": 5, "ban_seconds": 600,
    "idle_timeout": 600}, "okx": {"idle_timeout": 30, "books_limit": 40,
    "heartbeat_every": 50}, "kucoin": {"ping_interval_ms": 18000, "ping_timeout_ms":
    10000, "rate_limit": 2000}}``; see each module's class).
    id_base: added to every book's first update id. Ids are otherwise the same on every
    start (they follow ``seed``): ``collect --simulate`` passes one from the clock, so a
    second run into the same output continues above the first run's ids, as a venue's
    ids do across a collector restart (with equal ids, ``verify`` and ``book`` saw the
    two runs' updates as one stream with conflicting ranges).
    """
    faults = Faults()
    if venues is None:
        venues = list(venue_symbols) if venue_symbols else ["binance"]
    unknown = [v for v in venues if v not in VENUES]
    if unknown:
        raise ValueError(f"unknown simulator venue(s) {unknown}; known: {sorted(VENUES)}")
    vsyms = dict(venue_symbols or {})
    opts = {k: dict(v) for k, v in (venue_options or {}).items()}
    opts.setdefault("okx", {}).setdefault("snapshot_in_stream", okx_snapshot_in_stream)
    markets: dict[str, Market] = {}
    plugged = []
    for v in venues:
        factory: Any = VENUES[v]
        vstats = Stats()
        if hasattr(factory, "make_books"):
            names = (
                vsyms[v] if v in vsyms else [factory.from_normalized(s.upper()) for s in symbols]
            )
            books = factory.make_books(list(names), seed, depth)
        else:
            books = build_books(vsyms.get(v, symbols), seed, depth, recorded_dir)
        for book in books.values():
            book.last_update_id += id_base
        markets[v] = Market(books, vstats)
        plugged.append(
            factory(
                markets[v],
                faults,
                vstats,
                weight_limit=weight_limit,
                weight_window=weight_window,
                ban_seconds=ban_seconds,
                ping_interval=ping_interval,
                pong_timeout=pong_timeout,
                connection_lifetime=connection_lifetime,
            )
            if v == "binance"
            else factory(
                markets[v],
                faults,
                vstats,
                connection_lifetime=connection_lifetime,
                **opts.get(v, {}),
            )
        )
    main = markets.get("binance") or next(iter(markets.values()), None) or Market({}, Stats())
    stats = main.stats
    plugged.sort(key=lambda x: x.name == "binance")  # Binance's /ws/ prefix is asked last
    sim = Simulator(main, faults, stats, plugged, markets)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(serve_http, sim.handle_http, host, port)
        sim.rest_port = listeners[0].socket.getsockname()[1]
        ws_server = await nursery.start(
            functools.partial(serve_websocket, sim.handle_ws, host, ws_port, None)
        )
        sim.ws_port = ws_server.port
        sim.rest_url = f"http://{host}:{sim.rest_port}"
        sim.ws_url = f"ws://{host}:{sim.ws_port}"
        for v in plugged:
            if hasattr(v, "ws_url"):
                v.ws_url = sim.ws_url  # KuCoin's bullet endpoint points here
        for m in markets.values():
            nursery.start_soon(m.run, tick_interval)
        task_status.started(sim)


@asynccontextmanager
async def open_simulator(**kwargs: Any) -> AsyncIterator[Simulator]:
    """``async with open_simulator(symbols=[...], seed=0, ...) as sim:`` — same keyword
    arguments as :func:`serve_simulator`; stops everything on exit."""
    async with trio.open_nursery() as nursery:
        sim = await nursery.start(functools.partial(serve_simulator, **kwargs))
        try:
            yield sim
        finally:
            nursery.cancel_scope.cancel()
