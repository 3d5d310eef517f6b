"""Bybit v5 linear protocol for the simulator, plus the small pieces the OKX and KuCoin
venue modules share with it (``SimVenue`` base: REST pipeline with per-IP limits and
fault injection, connection bookkeeping; ``DiffQueue``; ``TopView``; ``derived_spec``).

REST: ``GET /v5/market/orderbook``, ``GET /v5/market/instruments-info``,
``GET /v5/market/time``. Per-IP limit ``rate_limit`` requests per ``rate_window`` s
(600 / 5 s): over it the IP gets HTTP 403 and is blocked for ``ban_seconds``.
WebSocket ``/v5/public/linear``: ``orderbook.<1|50|200|1000>.<symbol>`` topics; a
``snapshot`` (top-N view) then one ``delta`` per book tick with ``u`` = previous ``u`` + 1
(``u`` counts book ticks, so REST ``result.u`` and the stream share one id space);
``{"op": "ping"}`` answered; connections without a ping for ``idle_timeout`` s closed.
"""

from __future__ import annotations

import bisect
import heapq
import logging
import math
import random
import re
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

import orjson
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest

from cryptoflow.sim.book import Book, Diff, SymbolSpec, spec_for
from cryptoflow.sim.faults import Fault, Faults, Stats
from cryptoflow.sim.http import HttpRequest, HttpResponse
from cryptoflow.sim.market import Market
from cryptoflow.sim.wsout import Outbox, abort_ws, close_ws

log = logging.getLogger(__name__)

# --- shared helpers (also used by okx.py and kucoin.py) ---------------------------------


def now_ms() -> int:
    return int(time.time() * 1000)


def derived_spec(
    venue_symbol: str, base: SymbolSpec, multiplier: Decimal, size_decimals: int
) -> SymbolSpec:
    """``base`` (sizes in base asset) re-expressed in venue size units (contracts, lots):
    same prices, sizes = base size / multiplier with ``size_decimals`` decimals."""
    max_base = Decimal(base.max_qty_units).scaleb(-base.qty_decimals)
    units = int(max_base / multiplier * (10**size_decimals))
    return SymbolSpec(
        venue_symbol,
        base.mid_price,
        base.price_decimals,
        base.tick_units,
        size_decimals,
        max(units, 10),
    )


def split_quote(sym: str) -> tuple[str, str]:
    """``BTCUSDT`` -> ("BTC", "USDT")."""
    for q in ("USDT", "USDC", "USD"):
        if sym.endswith(q) and len(sym) > len(q):
            return sym[: -len(q)], q
    return sym, "USDT"


def top_levels(side: dict[int, int], n: int, bids: bool) -> dict[int, int]:
    items = heapq.nlargest(n, side.items()) if bids else heapq.nsmallest(n, side.items())
    return dict(items)


class TopView:
    """The best ``n`` levels a side of one book, as a stream of that depth shows them.

    Kept up to date incrementally from each tick's diff (the view must see every tick of
    the book, from its creation on): only the changed prices and the levels between the
    old and the new view boundary are looked at, via the book's sorted price lists. The
    changes are exactly those of recomputing the top ``n`` after every tick and comparing
    (``tests/test_sim_lag.py`` checks that)."""

    def __init__(self, book: Book, n: int) -> None:
        self.book = book
        self.n = n
        self.full = n >= book.depth  # the view is the whole book: diffs pass through
        self.bids = dict(book.best_bids(n))
        self.asks = dict(book.best_asks(n))
        self._bid_edge = self._new_bid_edge()  # lowest bid in the view (None: empty)
        self._ask_edge = self._new_ask_edge()  # highest ask in the view

    def _new_bid_edge(self) -> int | None:
        bp = self.book.bid_prices
        if not bp or self.n <= 0:
            return None
        return bp[-self.n] if len(bp) >= self.n else bp[0]

    def _new_ask_edge(self) -> int | None:
        ap = self.book.ask_prices
        if not ap or self.n <= 0:
            return None
        return ap[self.n - 1] if len(ap) >= self.n else ap[-1]

    def update(self, d: Diff) -> tuple[dict[int, int], dict[int, int]]:
        """Changes of the view caused by diff ``d`` (already applied to the book)."""
        if self.full:
            return dict(d.bids), dict(d.asks)
        return self._update_bids(d.bids), self._update_asks(d.asks)

    def _update_bids(self, changed: dict[int, int]) -> dict[int, int]:
        view, side, prices = self.bids, self.book.bids, self.book.bid_prices
        old, new = self._bid_edge, self._new_bid_edge()
        out: dict[int, int] = {}
        for p in changed:
            q = side.get(p)
            if q is not None and new is not None and p >= new:
                if view.get(p) != q:
                    view[p] = out[p] = q
            elif p in view:
                del view[p]
                out[p] = 0
        if old is not None and new is not None and new > old:  # unchanged levels leave
            lo, hi = bisect.bisect_left(prices, old), bisect.bisect_left(prices, new)
            for p in prices[lo:hi]:
                if p in view:
                    del view[p]
                    out[p] = 0
        elif new is not None and (old is None or new < old):  # unchanged levels enter
            lo = bisect.bisect_left(prices, new)
            hi = len(prices) if old is None else bisect.bisect_left(prices, old)
            for p in prices[lo:hi]:
                if p not in view:
                    view[p] = out[p] = side[p]
        self._bid_edge = new
        return out

    def _update_asks(self, changed: dict[int, int]) -> dict[int, int]:
        view, side, prices = self.asks, self.book.asks, self.book.ask_prices
        old, new = self._ask_edge, self._new_ask_edge()
        out: dict[int, int] = {}
        for p in changed:
            q = side.get(p)
            if q is not None and new is not None and p <= new:
                if view.get(p) != q:
                    view[p] = out[p] = q
            elif p in view:
                del view[p]
                out[p] = 0
        if old is not None and new is not None and new < old:  # unchanged levels leave
            lo, hi = bisect.bisect_right(prices, new), bisect.bisect_right(prices, old)
            for p in prices[lo:hi]:
                if p in view:
                    del view[p]
                    out[p] = 0
        elif new is not None and (old is None or new > old):  # unchanged levels enter
            lo = 0 if old is None else bisect.bisect_right(prices, old)
            hi = bisect.bisect_right(prices, new)
            for p in prices[lo:hi]:
                if p not in view:
                    view[p] = out[p] = side[p]
        self._ask_edge = new
        return out


@dataclass
class Update:
    """One book tick as one stream sees it (view changes + the venue's id at that tick)."""

    uid: int
    diff: Diff
    bids: dict[int, int]
    asks: dict[int, int]


class DiffQueue:
    """A market subscriber that keeps every tick (no merging) for streams whose ids are
    per tick or per level. ``stamp`` gives the venue id right after the tick."""

    def __init__(
        self, symbol: str, stamp: Callable[[Diff], int], view: TopView | None = None
    ) -> None:
        self.symbol = symbol
        self.stamp = stamp
        self.view = view
        self.items: deque[Update] = deque()
        self._event = trio.Event()

    def push(self, d: Diff) -> None:
        if self.view is not None:
            cb, ca = self.view.update(d)
        else:
            cb, ca = dict(d.bids), dict(d.asks)
        self.items.append(Update(self.stamp(d), d, cb, ca))
        self._event.set()

    def take(self) -> list[Update]:
        out = list(self.items)
        self.items.clear()
        return out

    def take_through(self, cut: int) -> list[Update]:
        """The updates of the ticks numbered up to `cut` (`Market.cut`): a stream that
        merges ticks cuts them at the same tick on every connection."""
        items, out = self.items, []
        while items and items[0].diff.tick <= cut:
            out.append(items.popleft())
        return out

    async def wait(self) -> None:
        while not self.items:
            self._event = trio.Event()
            await self._event.wait()


class FixedWindow:
    """Per-key request counter over fixed windows of ``window`` seconds."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self.counts: dict[Any, tuple[float, int]] = {}

    def hit(self, key: Any, now: float) -> tuple[bool, int, float]:
        """Count one request; (allowed, used in window, seconds until the window resets)."""
        start = math.floor(now / self.window) * self.window
        s, n = self.counts.get(key, (start, 0))
        if s != start:
            n = 0
        reset = start + self.window - now
        if n >= self.limit:
            self.counts[key] = (start, n)
            return False, n, reset
        self.counts[key] = (start, n + 1)
        return True, n + 1, reset


@dataclass
class WsConn:
    id: str
    ws: WebSocketConnection
    path: str
    nursery: trio.Nursery | None = None
    streams: dict[str, trio.CancelScope] = field(default_factory=dict)
    pings_received: int = 0
    events_sent: int = 0
    last_ping: float = 0.0  # trio clock of the last client ping (or of the connect)
    last_activity: float = 0.0  # last frame either way
    open: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
    outbox: Outbox = field(init=False)

    def __post_init__(self) -> None:
        self.outbox = Outbox(self.ws)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "path": self.path,
            "streams": sorted(self.streams),
            "pings_received": self.pings_received,
            "events_sent": self.events_sent,
            "open": self.open,
        }


class SimVenue:
    """Base for the Bybit/OKX/KuCoin simulator venues: REST pipeline (routes, ban,
    per-venue rate limit, faults, stats) and connection bookkeeping. Subclasses fill in
    ``routes`` and the ``*_response`` hooks, and ``handle_ws``."""

    name = ""
    id_field = ""  # what rest_missing_fields removes by default ("lastUpdateId")
    default_depth = 1000

    def __init__(
        self,
        market: Market,
        faults: Faults,
        stats: Stats,
        *,
        connection_lifetime: float | None = None,
        **_ignored: Any,
    ) -> None:
        self.market = market
        self.faults = faults
        self.stats = stats
        self.connection_lifetime = connection_lifetime
        self.routes: dict[tuple[str, str], Callable[[HttpRequest], Any]] = {}
        self.connections: list[WsConn] = []
        self.ws_url = ""  # set by the server once the WS port listens
        self.rng = random.Random(self.name)

    # --- books ----------------------------------------------------------------------

    @staticmethod
    def from_normalized(symbol: str) -> str:
        return symbol

    @classmethod
    def spec(cls, venue_symbol: str) -> SymbolSpec:
        return spec_for(venue_symbol)

    @classmethod
    def make_books(cls, symbols: Sequence[str], seed: int | str, depth: int) -> dict[str, Book]:
        """One book per venue symbol; seeded per venue so venues differ."""
        d = min(depth, cls.default_depth)
        return {s: Book(cls.spec(s), seed=f"{seed}:{cls.name}", depth=d) for s in symbols}

    def book_view(self, symbol: str) -> dict[str, Any]:
        book = self.market.books[symbol]
        snap = book.snapshot()
        snap["lastUpdateId"] = self.current_id(symbol)
        return snap

    def current_id(self, symbol: str) -> int:
        return self.market.books[symbol].last_update_id

    # --- REST -----------------------------------------------------------------------

    def request_symbol(self, req: HttpRequest) -> str | None:
        return req.query.get("symbol") or None

    def rate_limit(self, req: HttpRequest, now: float) -> HttpResponse | None:
        return None

    def not_found_response(self, req: HttpRequest) -> HttpResponse:
        return HttpResponse.json({"code": "404", "msg": "Not Found"}, status=404)

    def throttled_response(self, retry_after: float) -> HttpResponse:
        raise NotImplementedError

    def banned_response(self, retry_after: float) -> HttpResponse:
        return self.throttled_response(retry_after)

    def server_error_response(self, status: int) -> HttpResponse:
        raise NotImplementedError

    def data_holder(self, payload: Any) -> dict[str, Any] | None:
        """The dict inside a response body that holds the book fields."""
        return None

    def extra_headers(self, req: HttpRequest) -> list[tuple[str, str]]:
        return []

    async def handle_rest(self, req: HttpRequest) -> HttpResponse:
        handler = self.routes.get((req.method, req.path))
        if handler is None:
            return self._finish(req, self.not_found_response(req), None)
        now = trio.current_time()
        c = self.stats.clients[req.client_ip]
        if now < c.banned_until:
            c.violations += 1
            resp = self.banned_response(c.banned_until - now)
            return self._finish(req, resp, "banned")
        limited = self.rate_limit(req, now)
        if limited is not None:
            return self._finish(req, limited, None)
        symbol = self.request_symbol(req)
        kinds: dict[str, Fault] = {
            f.kind: f for f in self.faults.take_rest(self.name, req.path, symbol)
        }
        if "rest_slow" in kinds:
            await trio.sleep(kinds["rest_slow"].delay)
        if "rest_418" in kinds:
            ra = kinds["rest_418"].retry_after
            c.bans += 1
            c.banned_until = trio.current_time() + ra
            return self._finish(req, self.banned_response(ra), None)
        if "rest_429" in kinds:
            return self._finish(req, self.throttled_response(kinds["rest_429"].retry_after), None)
        if "rest_5xx" in kinds:
            resp = self.server_error_response(kinds["rest_5xx"].status)
            return self._finish(req, resp, None)
        resp = await handler(req)
        if resp.status == 200 and resp.payload is not None:
            if "rest_malformed" in kinds:
                resp.body = resp.body[: max(1, len(resp.body) // 2)]
                resp.levels = 0
            elif "rest_missing_fields" in kinds:
                fields = [
                    self.id_field if f == "lastUpdateId" else f
                    for f in kinds["rest_missing_fields"].fields
                ]
                holder = self.data_holder(resp.payload)
                for k in fields:
                    if isinstance(resp.payload, dict):
                        resp.payload.pop(k, None)
                    if holder is not None:
                        holder.pop(k, None)
                resp.body = orjson.dumps(resp.payload)
                resp.levels = 0
            elif "rest_undecodable" in kinds:
                resp.make_undecodable()
        if resp.status == 200 and resp.symbol and resp.levels:
            st = self.stats.symbols[resp.symbol]
            st.rest_snapshots += 1
            st.rest_levels += resp.levels
        return self._finish(req, resp, None)

    def _finish(self, req: HttpRequest, resp: HttpResponse, violation: str | None) -> HttpResponse:
        resp.headers.extend(self.extra_headers(req))
        self.stats.log_request(req.client_ip, req.method, req.target, resp.status, 1, violation)
        return resp

    def ban(self, req: HttpRequest, now: float, seconds: float) -> None:
        c = self.stats.clients[req.client_ip]
        c.bans += 1
        c.banned_until = now + seconds

    # --- WebSocket ------------------------------------------------------------------

    def new_conn(self, ws: WebSocketConnection, path: str, conn_id: str | None = None) -> WsConn:
        now = trio.current_time()
        conn = WsConn(conn_id or uuid.uuid4().hex[:20], ws, path, last_ping=now, last_activity=now)
        self.connections.append(conn)
        self.stats.ws["connections"] += 1
        self.stats.ws["open"] += 1
        return conn

    async def run_conn(self, conn: WsConn, *tasks: Callable[..., Any]) -> None:
        """Run ``tasks(conn)`` in the connection's nursery until one ends it; clean up."""
        try:
            async with trio.open_nursery() as nursery:
                conn.nursery = nursery
                nursery.start_soon(self._writer, conn)
                if self.connection_lifetime:
                    nursery.start_soon(self._expire, conn, self.connection_lifetime)
                for t in tasks:
                    nursery.start_soon(t, conn)
        finally:
            conn.open = False
            self.stats.ws["open"] -= 1
            with trio.move_on_after(1) as cs:
                cs.shield = True
                await conn.ws.aclose()

    async def _expire(self, conn: WsConn, lifetime: float) -> None:
        await trio.sleep(lifetime)
        self.stats.ws["closed_by_lifetime"] += 1
        await self.close(conn, 1000, "connection lifetime reached")

    async def _writer(self, conn: WsConn) -> None:
        """The connection's writer (``wsout.Outbox``); a failed write ends the connection."""
        try:
            await conn.outbox.run()
        except ConnectionClosed:
            if conn.nursery is not None:
                conn.nursery.cancel_scope.cancel()

    async def close(self, conn: WsConn, code: int, reason: str) -> None:
        await close_ws(conn.outbox, code, reason)
        if conn.nursery is not None:
            conn.nursery.cancel_scope.cancel()

    async def send_json(self, conn: WsConn, obj: Any) -> None:
        await self.send_text(conn, orjson.dumps(obj).decode())

    async def send_text(self, conn: WsConn, text: str) -> None:
        """Queue ``text`` on the connection's writer (``ConnectionClosed`` once it is gone)."""
        await conn.outbox.send(text)
        conn.last_activity = trio.current_time()

    async def idle_watch(self, conn: WsConn, timeout: float, *, pings_only: bool) -> None:
        """Close the connection when no client ping (``pings_only``) or no frame either
        way arrived for ``timeout`` seconds."""
        while True:
            last = conn.last_ping if pings_only else conn.last_activity
            left = last + timeout - trio.current_time()
            if left <= 0:
                self.stats.ws.setdefault("closed_idle", 0)
                self.stats.ws["closed_idle"] += 1
                await self.close(conn, 1000, "idle timeout")
                return
            await trio.sleep(left)

    async def server_ping(self, conn: WsConn) -> None:
        """A protocol-level ping (the ``ws_ping`` fault)."""
        self.stats.ws["pings_sent"] += 1
        try:
            with trio.move_on_after(10) as cs:
                await conn.ws.ping()
        except ConnectionClosed:
            return
        if cs.cancelled_caught:
            self.stats.ws["pings_unanswered"] += 1
        else:
            self.stats.ws["pongs_received"] += 1

    def count_event(self, conn: WsConn, symbol: str, levels: int, ticks: int) -> None:
        conn.events_sent += 1
        st = self.stats.symbols[symbol]
        st.ws_events += 1
        st.ws_levels += levels
        st.ws_ticks += ticks

    async def start_stream(
        self, conn: WsConn, key: str, fn: Callable[..., Any], *args: Any
    ) -> bool:
        if key in conn.streams or conn.nursery is None:
            return False
        scope = await conn.nursery.start(self._stream_task, conn, fn, args)
        conn.streams[key] = scope
        return True

    async def start_streams(
        self, conn: WsConn, fn: Callable[..., Any], starts: Sequence[tuple[str, tuple[Any, ...]]]
    ) -> None:
        """`start_stream` for each (key, args) of one subscribe request, concurrently: all
        are subscribed on return, after ~1 scheduler pass instead of one per stream (on a
        busy loop, 33 topics one after the other held the last snapshots back ~20 s)."""
        unique = {key: args for key, args in starts}
        async with trio.open_nursery() as nursery:
            for key, args in unique.items():
                nursery.start_soon(self.start_stream, conn, key, fn, *args)

    def stop_stream(self, conn: WsConn, key: str) -> bool:
        scope = conn.streams.pop(key, None)
        if scope is None:
            return False
        scope.cancel()
        return True

    async def _stream_task(
        self,
        conn: WsConn,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        with trio.CancelScope() as scope:
            try:
                await fn(conn, *args, started=lambda: task_status.started(scope))
            except ConnectionClosed:
                if conn.nursery is not None:
                    conn.nursery.cancel_scope.cancel()

    async def send_with_faults(
        self,
        conn: WsConn,
        symbol: str,
        frames: list[tuple[str, int, int]],
        malformed: str,
        state: dict[str, Any],
    ) -> bool:
        """Send ``frames`` (text, levels, ticks) of one symbol, each one an "event" for
        the WS faults (except heartbeats: 0 levels, 0 ticks); ``state`` (one per stream)
        keeps a frame held back by ``ws_out_of_order`` until the next one. Returns False
        when a fault closed the connection."""
        held: tuple[str, int, int] | None = state.pop("held", None)
        if len(frames) > 1 and held is None and not self.faults.pending and len(conn.streams) > 1:
            # no fault to apply: the frames go out together (one queue entry, one wait;
            # a KuCoin tick is ~10 messages). Only on a connection shared by several
            # streams, where the sends contend; a lone stream keeps sending message by
            # message, so a fault queued meanwhile hits its very next message.
            await conn.outbox.send_many([f[0] for f in frames])
            conn.last_activity = trio.current_time()
            for _, levels, ticks in frames:
                self.count_event(conn, symbol, levels, ticks)
            return True
        for frame in frames:
            if frame[1] == 0 and frame[2] == 0:  # a heartbeat: not an event for faults
                await self._send_frame(conn, symbol, frame)
                continue
            kinds = {f.kind: f for f in self.faults.take_ws(self.name, symbol)}
            if "ws_stall" in kinds:
                await trio.sleep(kinds["ws_stall"].seconds)
            if "ws_close" in kinds:
                self.stats.ws["closed_by_fault"] += 1
                await self.on_fault_close(conn)
                await self.close(conn, kinds["ws_close"].code, kinds["ws_close"].reason)
                return False
            if "ws_abort" in kinds:
                self.stats.ws["aborted_by_fault"] += 1
                await abort_ws(conn.ws)
                if conn.nursery is not None:
                    conn.nursery.cancel_scope.cancel()
                return False
            if "ws_ping" in kinds and conn.nursery is not None:
                conn.nursery.start_soon(self.server_ping, conn)
            if "ws_malformed" in kinds:
                await self.send_text(conn, malformed)
            if "ws_drop" in kinds:
                self.stats.symbols[symbol].ws_drops += 1
                continue
            if "ws_out_of_order" in kinds and held is None:
                held = frame
                continue
            await self._send_frame(conn, symbol, frame)
            if "ws_duplicate" in kinds:
                await self._send_frame(conn, symbol, frame)
            if held is not None:
                await self._send_frame(conn, symbol, held)
                held = None
        if held is not None:  # nothing came after it yet: send it after the next frame
            state["held"] = held
        return True

    async def _send_frame(self, conn: WsConn, symbol: str, frame: tuple[str, int, int]) -> None:
        text, levels, ticks = frame
        await self.send_text(conn, text)
        self.count_event(conn, symbol, levels, ticks)

    async def on_fault_close(self, conn: WsConn) -> None:
        """Hook: what the venue sends before a ``ws_close`` fault closes (OKX: a notice)."""


# --- Bybit ------------------------------------------------------------------------------

TOPIC_RE = re.compile(r"^orderbook\.(1|50|200|1000)\.([A-Z0-9]+)$")
WS_PATH = "/v5/public/linear"


class BybitVenue(SimVenue):
    """Bybit v5 ``linear`` routes and the public orderbook stream."""

    name = "bybit"
    id_field = "u"
    default_depth = 500  # REST limit=500 then returns the whole book

    def __init__(
        self,
        market: Market,
        faults: Faults,
        stats: Stats,
        *,
        rate_limit: int = 600,
        rate_window: float = 5.0,
        ban_seconds: float = 600.0,
        idle_timeout: float | None = 600.0,
        connection_lifetime: float | None = None,
        **_ignored: Any,
    ) -> None:
        super().__init__(market, faults, stats, connection_lifetime=connection_lifetime)
        self.limiter = FixedWindow(rate_limit, rate_window)
        self.ban_seconds = ban_seconds
        self.idle_timeout = idle_timeout
        rng = random.Random(f"bybit:{sorted(market.books)}")
        self.u0 = {s: 5_000_000 + rng.randrange(1_000_000) for s in market.books}
        self.routes = {
            ("GET", "/v5/market/orderbook"): self._orderbook,
            ("GET", "/v5/market/instruments-info"): self._instruments,
            ("GET", "/v5/market/time"): self._time,
        }

    def current_id(self, symbol: str) -> int:
        """``u``: one per book tick."""
        return self.u0[symbol] + self.stats.symbols[symbol].ticks

    def seq(self, symbol: str) -> int:
        """``seq``: cross sequence, monotonic, not continuous."""
        return self.market.books[symbol].last_update_id * 3

    # --- REST -----------------------------------------------------------------------

    def owns_path(self, path: str) -> bool:
        return path.startswith("/v5/")

    @staticmethod
    def _body(ret_code: int, msg: str, result: Any = None) -> dict[str, Any]:
        return {
            "retCode": ret_code,
            "retMsg": msg,
            "result": {} if result is None else result,
            "retExtInfo": {},
            "time": now_ms(),
        }

    def not_found_response(self, req: HttpRequest) -> HttpResponse:
        return HttpResponse.json(self._body(10404, f"path {req.path} not found"), status=404)

    def rate_limit(self, req: HttpRequest, now: float) -> HttpResponse | None:
        ok, _, _ = self.limiter.hit(req.client_ip, now)
        if ok:
            return None
        self.ban(req, now, self.ban_seconds)
        return self.banned_response(self.ban_seconds)

    def throttled_response(self, retry_after: float) -> HttpResponse:
        # per-API limit: HTTP 200 with retCode 10006
        resp = HttpResponse.json(self._body(10006, "Too many visits!"))
        reset = now_ms() + int(retry_after * 1000)
        resp.headers += [
            ("X-Bapi-Limit", "600"),
            ("X-Bapi-Limit-Status", "0"),
            ("X-Bapi-Limit-Reset-Timestamp", str(reset)),
        ]
        return resp

    def banned_response(self, retry_after: float) -> HttpResponse:
        # IP rate ban: HTTP 403 "access too frequent", blocked for a while
        body = self._body(10018, f"access too frequent; IP blocked for {math.ceil(retry_after)} s")
        return HttpResponse.json(body, status=403)

    def server_error_response(self, status: int) -> HttpResponse:
        return HttpResponse.json(self._body(10016, "Internal system error."), status=status)

    def data_holder(self, payload: Any) -> dict[str, Any] | None:
        res = payload.get("result") if isinstance(payload, dict) else None
        return res if isinstance(res, dict) else None

    def _params_error(self, msg: str) -> HttpResponse:
        return HttpResponse.json(self._body(10001, msg))

    async def _orderbook(self, req: HttpRequest) -> HttpResponse:
        q = req.query
        if q.get("category") != "linear":
            return self._params_error("Illegal category")
        symbol = q.get("symbol", "")
        book = self.market.books.get(symbol)
        if book is None:
            return self._params_error("The requested symbol is invalid.")
        try:
            limit = int(q.get("limit", "25"))
        except ValueError:
            return self._params_error("params error: limit invalid")
        if not 1 <= limit <= 500:
            return self._params_error("params error: limit invalid")
        bids, asks = book.top(limit)
        ts = now_ms()
        result = {
            "s": symbol,
            "b": bids,
            "a": asks,
            "ts": ts,
            "u": self.current_id(symbol),
            "seq": self.seq(symbol),
            "cts": ts - 2,
        }
        resp = HttpResponse.json(self._body(0, "OK", result))
        resp.symbol = symbol
        resp.levels = len(bids) + len(asks)
        return resp

    async def _instruments(self, req: HttpRequest) -> HttpResponse:
        if req.query.get("category") != "linear":
            return self._params_error("Illegal category")
        want = req.query.get("symbol")
        items = []
        for sym, book in self.market.books.items():
            if want and want != sym:
                continue
            sp = book.spec
            base, quote = split_quote(sym)
            items.append(
                {
                    "symbol": sym,
                    "contractType": "LinearPerpetual",
                    "status": "Trading",
                    "baseCoin": base,
                    "quoteCoin": quote,
                    "settleCoin": quote,
                    "priceScale": str(sp.price_decimals),
                    "priceFilter": {
                        "minPrice": sp.tick_size,
                        "maxPrice": "1999999.80",
                        "tickSize": sp.tick_size,
                    },
                    "lotSizeFilter": {
                        "maxOrderQty": "1190.000",
                        "minOrderQty": sp.step_size,
                        "qtyStep": sp.step_size,
                        "maxMktOrderQty": "500.000",
                        "minNotionalValue": "5",
                    },
                }
            )
        result = {"category": "linear", "list": items, "nextPageCursor": ""}
        return HttpResponse.json(self._body(0, "OK", result))

    async def _time(self, req: HttpRequest) -> HttpResponse:
        t = time.time()
        result = {"timeSecond": str(int(t)), "timeNano": str(int(t * 1e9))}
        return HttpResponse.json(self._body(0, "OK", result))

    # --- WebSocket ------------------------------------------------------------------

    def owns_ws_path(self, path: str) -> bool:
        return urlsplit(path).path.rstrip("/") == WS_PATH

    async def handle_ws(self, request: WebSocketRequest) -> None:
        ws = await request.accept()
        conn = self.new_conn(ws, request.path)
        tasks: list[Callable[..., Any]] = [self._recv_loop]
        if self.idle_timeout:
            tasks.append(self._idle)
        await self.run_conn(conn, *tasks)

    async def _idle(self, conn: WsConn) -> None:
        assert self.idle_timeout
        await self.idle_watch(conn, self.idle_timeout, pings_only=True)

    def _reply(self, conn: WsConn, op: str, req_id: Any, ok: bool, msg: str) -> dict[str, Any]:
        out: dict[str, Any] = {"success": ok, "ret_msg": msg, "conn_id": conn.id}
        if req_id is not None:
            out["req_id"] = req_id
        out["op"] = op
        return out

    async def _recv_loop(self, conn: WsConn) -> None:
        try:
            while True:
                msg = await conn.ws.get_message()
                self.stats.ws["messages_received"] += 1
                conn.last_activity = trio.current_time()
                try:
                    obj = orjson.loads(msg)
                    op = obj["op"]
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    await self.send_json(
                        conn, self._reply(conn, "", None, False, "error:invalid op")
                    )
                    continue
                req_id = obj.get("req_id")
                args = obj.get("args") or []
                if op == "ping":
                    conn.pings_received += 1
                    conn.last_ping = trio.current_time()
                    await self.send_json(conn, self._reply(conn, "ping", req_id, True, "pong"))
                elif op in ("subscribe", "unsubscribe"):
                    bad = [a for a in args if not self._topic_ok(a)]
                    if bad or not args:
                        await self.send_json(
                            conn,
                            self._reply(conn, op, req_id, False, f"Invalid topic: {bad or args}"),
                        )
                        continue
                    await self.send_json(conn, self._reply(conn, op, req_id, True, ""))
                    if op == "subscribe":
                        starts = []
                        for topic in args:
                            m = TOPIC_RE.match(topic)
                            assert m is not None
                            starts.append((topic, (topic, m.group(2), int(m.group(1)))))
                        await self.start_streams(conn, self._stream, starts)
                    else:
                        for topic in args:
                            self.stop_stream(conn, topic)
                else:
                    await self.send_json(
                        conn, self._reply(conn, str(op), req_id, False, f"error:invalid op {op}")
                    )
        except ConnectionClosed:
            if conn.nursery is not None:
                conn.nursery.cancel_scope.cancel()

    def _topic_ok(self, topic: Any) -> bool:
        m = TOPIC_RE.match(topic) if isinstance(topic, str) else None
        return m is not None and m.group(2) in self.market.books

    def _push(self, topic: str, kind: str, symbol: str, b: Any, a: Any, u: int, seq: int) -> str:
        ts = now_ms()
        obj = {
            "topic": topic,
            "type": kind,
            "ts": ts,
            "data": {"s": symbol, "b": b, "a": a, "u": u, "seq": seq},
            "cts": ts - 2,
        }
        return orjson.dumps(obj).decode()

    async def _stream(
        self, conn: WsConn, topic: str, symbol: str, depth: int, *, started: Callable[[], None]
    ) -> None:
        book = self.market.books[symbol]
        view = TopView(book, depth)
        q = DiffQueue(symbol, lambda d: self.current_id(symbol), view)
        # snapshot and subscription taken together (no await in between)
        bids = book.levels_str(sorted(view.bids.items(), reverse=True))
        asks = book.levels_str(sorted(view.asks.items()))
        snap = self._push(
            topic, "snapshot", symbol, bids, asks, self.current_id(symbol), self.seq(symbol)
        )
        self.market.subscribers[symbol].add(q)  # type: ignore[arg-type]
        started()
        state: dict[str, Any] = {}
        try:
            await self.send_text(conn, snap)
            self.count_event(conn, symbol, len(bids) + len(asks), 0)
            while True:
                await q.wait()
                frames = []
                for up in q.take():
                    b = book.levels_str(sorted(up.bids.items(), reverse=True))
                    a = book.levels_str(sorted(up.asks.items()))
                    seq = up.diff.u * 3
                    text = self._push(topic, "delta", symbol, b, a, up.uid, seq)
                    frames.append((text, len(b) + len(a), 1))
                bad = '{"topic":"' + topic + '","type":"delta","data":{'
                if not await self.send_with_faults(conn, symbol, frames, bad, state):
                    return
        finally:
            self.market.unsubscribe(q)  # type: ignore[arg-type]
