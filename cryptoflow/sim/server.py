"""The simulator: one market (books + clock loop), venue modules plugged into one REST
server and one WebSocket server (two ports on 127.0.0.1), fault injection and stats.

Venue modules provide ``name``, ``owns_path(path)``/``handle_rest(req)`` for REST and
``owns_ws_path(path)``/``handle_ws(request)`` for WebSocket; the first venue claiming a
path serves it. Admin endpoints live under ``/_sim/`` on the REST port.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

import orjson
import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

from cryptoflow.sim.binance import BinanceVenue
from cryptoflow.sim.book import Book, find_recorded_snapshot, spec_for
from cryptoflow.sim.faults import Faults, Stats
from cryptoflow.sim.http import HttpRequest, HttpResponse, serve_http
from cryptoflow.sim.market import Market

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


# name -> factory(market, faults, stats, **options). Bybit/OKX/KuCoin register here later;
# their REST and WS paths do not overlap Binance's, so all can share the two ports.
VENUES: dict[str, Callable[..., Venue]] = {"binance": BinanceVenue}


class Simulator:
    """Handle returned by :func:`open_simulator` / ``nursery.start(serve_simulator, ...)``."""

    def __init__(self, market: Market, faults: Faults, stats: Stats, venues: list[Venue]) -> None:
        self.market = market
        self.faults = faults
        self.stats = stats
        self.venues = venues
        self.rest_url = ""
        self.ws_url = ""
        self.rest_port = 0
        self.ws_port = 0

    @property
    def symbols(self) -> list[str]:
        return list(self.market.books)

    def book(self, symbol: str) -> dict[str, Any]:
        """Full current book: ``{"symbol", "lastUpdateId", "bids": {price: qty}, "asks"}``."""
        return self.market.books[symbol.upper()].snapshot()

    def pause(self) -> None:
        """Stop the clock loop from ticking the books (streams then go quiet)."""
        self.market.paused = True

    def resume(self) -> None:
        self.market.paused = False

    def step(self, n: int = 1) -> None:
        """Tick every book ``n`` times now (works while paused)."""
        for _ in range(n):
            self.market.step()

    def stats_json(self) -> dict[str, Any]:
        out = self.stats.to_json()
        out["faults"] = self.faults.to_json()
        out["ws"]["connection_list"] = [
            c.to_json() for v in self.venues for c in getattr(v, "connections", [])
        ]
        out["paused"] = self.market.paused
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
            sym = req.query.get("symbol", "").upper()
            if sym not in self.market.books:
                return HttpResponse.json({"ok": False, "error": "unknown symbol"}, status=404)
            return HttpResponse.json(self.book(sym))
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
    venues: Sequence[str] = ("binance",),
    host: str = "127.0.0.1",
    port: int = 0,
    ws_port: int = 0,
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
    venues: venue modules to plug in (keys of ``VENUES``).
    """
    stats = Stats()
    faults = Faults()
    market = Market(build_books(symbols, seed, depth, recorded_dir), stats)
    unknown = [v for v in venues if v not in VENUES]
    if unknown:
        raise ValueError(f"unknown simulator venue(s) {unknown}; known: {sorted(VENUES)}")
    plugged = [
        VENUES[v](
            market,
            faults,
            stats,
            weight_limit=weight_limit,
            weight_window=weight_window,
            ban_seconds=ban_seconds,
            ping_interval=ping_interval,
            pong_timeout=pong_timeout,
            connection_lifetime=connection_lifetime,
        )
        for v in venues
    ]
    sim = Simulator(market, faults, stats, plugged)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(serve_http, sim.handle_http, host, port)
        sim.rest_port = listeners[0].socket.getsockname()[1]
        ws_server = await nursery.start(
            functools.partial(serve_websocket, sim.handle_ws, host, ws_port, None)
        )
        sim.ws_port = ws_server.port
        sim.rest_url = f"http://{host}:{sim.rest_port}"
        sim.ws_url = f"ws://{host}:{sim.ws_port}"
        nursery.start_soon(market.run, tick_interval)
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
