"""Binance USD-M futures protocol for the simulator: REST routes with request-weight
limits (429 / 418 ban) and the diff-depth WebSocket streams."""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest

from cryptoflow.sim.book import Aggregate
from cryptoflow.sim.faults import Faults, Stats
from cryptoflow.sim.http import HttpRequest, HttpResponse
from cryptoflow.sim.market import Market
from cryptoflow.sim.wsout import Outbox, abort_ws, close_ws

log = logging.getLogger(__name__)

DEPTH_LIMITS = (5, 10, 20, 50, 100, 500, 1000)
WEIGHT_HEADER = "X-MBX-USED-WEIGHT-1M"
MAX_BAN_SECONDS = 3 * 24 * 3600
STREAM_RE = re.compile(r"^([a-z0-9]+)@depth(?:@(100|250|500)ms)?$")
COMBINED_PATHS = ("/public/stream", "/stream")
RAW_PATHS = ("/public/ws", "/ws")
SILENT_PREFIXES = ("/market/",)  # accepted, but depth streams there deliver nothing


def depth_weight(limit: int) -> int:
    if limit <= 50:
        return 2
    if limit <= 100:
        return 5
    if limit <= 500:
        return 10
    return 20


def parse_stream(name: str) -> tuple[str, float] | None:
    """``btcusdt@depth@100ms`` -> ("BTCUSDT", 0.1); ``@depth`` is 250 ms."""
    m = STREAM_RE.match(name)
    if not m:
        return None
    ms = int(m.group(2) or 250)
    return m.group(1).upper(), ms / 1000


def _err(code: int, msg: str, status: int = 400) -> HttpResponse:
    return HttpResponse.json({"code": code, "msg": msg}, status=status)


@dataclass
class _Conn:
    id: int
    ws: WebSocketConnection
    path: str
    combined: bool
    silent: bool
    nursery: trio.Nursery | None = None
    streams: dict[str, trio.CancelScope] = field(default_factory=dict)
    pings_sent: int = 0
    pongs_received: int = 0
    events_sent: int = 0
    open: bool = True
    outbox: Outbox = field(init=False)

    def __post_init__(self) -> None:
        self.outbox = Outbox(self.ws)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "path": self.path,
            "streams": sorted(self.streams),
            "pings_sent": self.pings_sent,
            "pongs_received": self.pongs_received,
            "events_sent": self.events_sent,
            "open": self.open,
        }


class BinanceVenue:
    """Binance USD-M futures routes and streams over the shared market."""

    name = "binance"

    def __init__(
        self,
        market: Market,
        faults: Faults,
        stats: Stats,
        *,
        weight_limit: int = 2400,
        weight_window: float = 60.0,
        ban_seconds: float = 120.0,
        ping_interval: float | None = 180.0,
        pong_timeout: float = 10.0,
        connection_lifetime: float | None = None,
    ) -> None:
        self.market = market
        self.faults = faults
        self.stats = stats
        self.weight_limit = weight_limit
        self.weight_window = weight_window
        self.ban_seconds = ban_seconds
        self.ping_interval = ping_interval
        self.pong_timeout = pong_timeout
        self.connection_lifetime = connection_lifetime  # Binance cuts at 24 h
        self.routes = {
            ("GET", "/fapi/v1/depth"): (self._depth, self._depth_weight),
            ("GET", "/fapi/v1/exchangeInfo"): (self._exchange_info, lambda r: 1),
            ("GET", "/fapi/v1/ping"): (self._ping, lambda r: 1),
            ("GET", "/fapi/v1/time"): (self._time, lambda r: 1),
        }
        self.connections: list[_Conn] = []
        self._next_conn_id = 0

    # --- REST ---------------------------------------------------------------------------

    def owns_path(self, path: str) -> bool:
        return path.startswith("/fapi/")

    async def handle_rest(self, req: HttpRequest) -> HttpResponse:
        route = self.routes.get((req.method, req.path))
        if route is None:
            resp = _err(-5000, f"Path {req.path}, Method {req.method} is invalid", 404)
            return self._finish(req, resp, 0, None)
        handler, weight_fn = route
        weight = weight_fn(req)
        now = trio.current_time()
        c = self.stats.clients[req.client_ip]
        window_start = math.floor(now / self.weight_window) * self.weight_window
        if c.window_start != window_start:
            c.window_start = window_start
            c.used_weight = 0
        if now < c.banned_until:
            c.violations += 1
            retry = math.ceil(c.banned_until - now)
            resp = self._banned(retry)
            return self._finish(req, resp, weight, "banned")
        if now < c.throttled_until:
            c.violations += 1
            c.bans += 1
            dur = min(self.ban_seconds * 2 ** (c.bans - 1), MAX_BAN_SECONDS)
            c.banned_until = now + dur
            c.throttled_until = 0.0
            resp = self._banned(math.ceil(dur))
            return self._finish(req, resp, weight, "throttled")
        if c.used_weight + weight > self.weight_limit:
            reset = window_start + self.weight_window
            c.throttled_until = reset
            resp = self._throttled(max(1, math.ceil(reset - now)))
            return self._finish(req, resp, weight, None)
        c.used_weight += weight

        symbol = req.query.get("symbol", "").upper() or None
        kinds = {f.kind: f for f in self.faults.take_rest(self.name, req.path, symbol)}
        if "rest_slow" in kinds:
            await trio.sleep(kinds["rest_slow"].delay)
        if "rest_418" in kinds:
            ra = kinds["rest_418"].retry_after
            c.bans += 1
            c.banned_until = trio.current_time() + ra
            return self._finish(req, self._banned(ra), weight, None)
        if "rest_429" in kinds:
            ra = kinds["rest_429"].retry_after
            c.throttled_until = trio.current_time() + ra
            return self._finish(req, self._throttled(ra), weight, None)
        if "rest_5xx" in kinds:
            resp = _err(
                -1001,
                "Internal error; unable to process your request. Please try again.",
                kinds["rest_5xx"].status,
            )
            return self._finish(req, resp, weight, None)

        resp = await handler(req)
        if resp.status == 200 and resp.payload is not None:
            if "rest_malformed" in kinds:
                resp.body = resp.body[: max(1, len(resp.body) // 2)]
                resp.levels = 0
            elif "rest_missing_fields" in kinds and isinstance(resp.payload, dict):
                for k in kinds["rest_missing_fields"].fields:
                    resp.payload.pop(k, None)
                resp.body = orjson.dumps(resp.payload)
                resp.levels = 0
            elif "rest_undecodable" in kinds:
                resp.make_undecodable()
        if resp.status == 200 and resp.symbol and resp.levels:
            st = self.stats.symbols[resp.symbol]
            st.rest_snapshots += 1
            st.rest_levels += resp.levels
        return self._finish(req, resp, weight, None)

    def _finish(
        self, req: HttpRequest, resp: HttpResponse, weight: int, violation: str | None
    ) -> HttpResponse:
        c = self.stats.clients[req.client_ip]
        resp.headers.append((WEIGHT_HEADER, str(c.used_weight)))
        self.stats.log_request(
            req.client_ip, req.method, req.target, resp.status, weight, violation
        )
        return resp

    def _throttled(self, retry_after: int) -> HttpResponse:
        resp = _err(-1003, "Too many requests; current limit is exceeded.", 429)
        resp.headers.append(("Retry-After", str(retry_after)))
        return resp

    def _banned(self, retry_after: int) -> HttpResponse:
        until = int(time.time() * 1000) + retry_after * 1000
        resp = _err(-1003, f"Way too many requests; IP banned until {until}.", 418)
        resp.headers.append(("Retry-After", str(retry_after)))
        return resp

    def _depth_weight(self, req: HttpRequest) -> int:
        try:
            return depth_weight(int(req.query.get("limit", "500")))
        except ValueError:
            return 2

    async def _depth(self, req: HttpRequest) -> HttpResponse:
        symbol = req.query.get("symbol", "")
        if not symbol:
            return _err(
                -1102,
                "Mandatory parameter 'symbol' was not sent, was empty/null, or malformed.",
            )
        book = self.market.books.get(symbol.upper())
        if book is None:
            return _err(-1121, "Invalid symbol.")
        try:
            limit = int(req.query.get("limit", "500"))
        except ValueError:
            return _err(-1100, "Illegal characters found in parameter 'limit'.")
        if limit not in DEPTH_LIMITS:
            return _err(-1130, "Data sent for parameter 'limit' is not valid.")
        bids, asks = book.top(limit)
        now = int(time.time() * 1000)
        obj = {
            "lastUpdateId": book.last_update_id,
            "E": now,
            "T": now - 1,
            "bids": bids,
            "asks": asks,
        }
        resp = HttpResponse.json(obj)
        resp.symbol = book.spec.symbol
        resp.levels = len(bids) + len(asks)
        return resp

    async def _exchange_info(self, req: HttpRequest) -> HttpResponse:
        symbols = []
        for sym, book in self.market.books.items():
            sp = book.spec
            quote = next((q for q in ("USDT", "USDC", "BUSD") if sym.endswith(q)), "USDT")
            symbols.append(
                {
                    "symbol": sym,
                    "pair": sym,
                    "contractType": "PERPETUAL",
                    "status": "TRADING",
                    "baseAsset": sym[: -len(quote)],
                    "quoteAsset": quote,
                    "marginAsset": quote,
                    "pricePrecision": sp.price_decimals,
                    "quantityPrecision": sp.qty_decimals,
                    "baseAssetPrecision": 8,
                    "quotePrecision": 8,
                    "underlyingType": "COIN",
                    "filters": [
                        {
                            "filterType": "PRICE_FILTER",
                            "tickSize": sp.tick_size,
                            "minPrice": sp.tick_size,
                            "maxPrice": "10000000",
                        },
                        {
                            "filterType": "LOT_SIZE",
                            "stepSize": sp.step_size,
                            "minQty": sp.step_size,
                            "maxQty": "100000000",
                        },
                    ],
                }
            )
        obj = {
            "timezone": "UTC",
            "serverTime": int(time.time() * 1000),
            "futuresType": "U_MARGINED",
            "rateLimits": [
                {
                    "rateLimitType": "REQUEST_WEIGHT",
                    "interval": "MINUTE",
                    "intervalNum": 1,
                    "limit": self.weight_limit,
                },
                {
                    "rateLimitType": "ORDERS",
                    "interval": "MINUTE",
                    "intervalNum": 1,
                    "limit": 1200,
                },
            ],
            "exchangeFilters": [],
            "assets": [],
            "symbols": symbols,
        }
        return HttpResponse.json(obj)

    async def _ping(self, req: HttpRequest) -> HttpResponse:
        return HttpResponse.json({})

    async def _time(self, req: HttpRequest) -> HttpResponse:
        return HttpResponse.json({"serverTime": int(time.time() * 1000)})

    # --- WebSocket ----------------------------------------------------------------------

    def owns_ws_path(self, path: str) -> bool:
        p = urlsplit(path).path.rstrip("/") or "/"
        return (
            p in COMBINED_PATHS
            or p in RAW_PATHS
            or any(p.startswith(r + "/") for r in RAW_PATHS)
            or p.startswith(SILENT_PREFIXES)
        )

    async def handle_ws(self, request: WebSocketRequest) -> None:
        parts = urlsplit(request.path)
        p = parts.path.rstrip("/") or "/"
        silent = p.startswith(SILENT_PREFIXES)
        combined = p in COMBINED_PATHS or p.endswith("/stream")
        initial: list[str] = []
        if combined:
            q = dict(parse_qsl(parts.query))
            initial = [s for s in q.get("streams", "").split("/") if s]
        else:
            for r in RAW_PATHS:
                if p.startswith(r + "/"):
                    initial = [s for s in p[len(r) + 1 :].split("/") if s]
        ws = await request.accept()
        self._next_conn_id += 1
        conn = _Conn(self._next_conn_id, ws, request.path, combined, silent)
        self.connections.append(conn)
        self.stats.ws["connections"] += 1
        self.stats.ws["open"] += 1
        try:
            async with trio.open_nursery() as nursery:
                conn.nursery = nursery
                nursery.start_soon(self._writer, conn)
                for s in initial:
                    await self._subscribe(conn, s)
                if self.ping_interval:
                    nursery.start_soon(self._ping_loop, conn)
                if self.connection_lifetime:
                    nursery.start_soon(self._expire, conn, self.connection_lifetime)
                nursery.start_soon(self._recv_loop, conn)
        finally:
            conn.open = False
            self.stats.ws["open"] -= 1
            with trio.move_on_after(1) as cs:
                cs.shield = True
                await ws.aclose()

    async def _subscribe(self, conn: _Conn, name: str) -> None:
        if conn.silent or name in conn.streams:
            return
        parsed = parse_stream(name)
        if parsed is None:
            return
        symbol, speed = parsed
        if symbol not in self.market.books:
            return
        assert conn.nursery is not None
        scope = await conn.nursery.start(self._stream_loop, conn, name, symbol, speed)
        conn.streams[name] = scope

    def _unsubscribe(self, conn: _Conn, name: str) -> None:
        scope = conn.streams.pop(name, None)
        if scope is not None:
            scope.cancel()

    async def _send_json(self, conn: _Conn, obj: Any) -> None:
        await conn.outbox.send(orjson.dumps(obj).decode())

    async def _writer(self, conn: _Conn) -> None:
        """The connection's writer (``wsout.Outbox``); a failed write ends the connection."""
        try:
            await conn.outbox.run()
        except ConnectionClosed:
            assert conn.nursery is not None
            conn.nursery.cancel_scope.cancel()

    async def _close(self, conn: _Conn, code: int, reason: str) -> None:
        await close_ws(conn.outbox, code, reason)

    async def _recv_loop(self, conn: _Conn) -> None:
        assert conn.nursery is not None
        try:
            while True:
                msg = await conn.ws.get_message()
                self.stats.ws["messages_received"] += 1
                try:
                    obj = orjson.loads(msg)
                    method = obj["method"]
                    req_id = obj.get("id")
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    await self._send_json(conn, {"error": {"code": 3, "msg": "Invalid JSON"}})
                    continue
                params = obj.get("params") or []
                if method == "SUBSCRIBE":
                    for s in params:
                        await self._subscribe(conn, str(s))
                    await self._send_json(conn, {"result": None, "id": req_id})
                elif method == "UNSUBSCRIBE":
                    for s in params:
                        self._unsubscribe(conn, str(s))
                    await self._send_json(conn, {"result": None, "id": req_id})
                elif method == "LIST_SUBSCRIPTIONS":
                    await self._send_json(conn, {"result": sorted(conn.streams), "id": req_id})
                else:
                    await self._send_json(
                        conn,
                        {"error": {"code": 2, "msg": f"Invalid request: {method}"}, "id": req_id},
                    )
        except ConnectionClosed:
            conn.nursery.cancel_scope.cancel()

    async def _ping_once(self, conn: _Conn) -> None:
        conn.pings_sent += 1
        self.stats.ws["pings_sent"] += 1
        try:
            with trio.move_on_after(self.pong_timeout) as cs:
                await conn.ws.ping()
        except ConnectionClosed:
            return
        if cs.cancelled_caught:
            self.stats.ws["pings_unanswered"] += 1
        else:
            conn.pongs_received += 1
            self.stats.ws["pongs_received"] += 1

    async def _expire(self, conn: _Conn, lifetime: float) -> None:
        await trio.sleep(lifetime)
        self.stats.ws["closed_by_lifetime"] += 1
        await self._close(conn, 1000, "connection lifetime reached")
        assert conn.nursery is not None
        conn.nursery.cancel_scope.cancel()

    async def _ping_loop(self, conn: _Conn) -> None:
        assert self.ping_interval
        while True:
            await trio.sleep(self.ping_interval)
            await self._ping_once(conn)

    def _frame(self, conn: _Conn, stream: str, agg: Aggregate) -> str:
        book = self.market.books[agg.symbol]
        event = {
            "e": "depthUpdate",
            "E": agg.E,
            "T": agg.T,
            "s": agg.symbol,
            "U": agg.U,
            "u": agg.u,
            "pu": agg.pu,
            "b": book.levels_str(sorted(agg.bids.items(), reverse=True)),
            "a": book.levels_str(sorted(agg.asks.items())),
        }
        obj = {"stream": stream, "data": event} if conn.combined else event
        return orjson.dumps(obj).decode()

    async def _send_event(self, conn: _Conn, frame: str, agg: Aggregate) -> None:
        await conn.outbox.send(frame)
        conn.events_sent += 1
        st = self.stats.symbols[agg.symbol]
        st.ws_events += 1
        st.ws_levels += agg.levels
        st.ws_ticks += agg.ticks

    async def _stream_loop(
        self,
        conn: _Conn,
        stream: str,
        symbol: str,
        speed: float,
        task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        assert conn.nursery is not None
        with trio.CancelScope() as scope:
            sub = self.market.subscribe(symbol)
            task_status.started(scope)
            held: tuple[str, Aggregate] | None = None
            try:
                market = self.market
                k = market.next_k(speed)  # cuts on the market's grid: the same for all
                while True:
                    # right after the tick that ends the interval: E (that tick's time) is
                    # when the event leaves, as at the venue
                    cut = market.cut(k, speed)
                    await trio.sleep_until(market.due(cut))
                    await market.through(cut)
                    agg = sub.take_through(cut)
                    k += 1
                    if agg is None:  # no tick (paused): no event
                        continue
                    kinds = {f.kind: f for f in self.faults.take_ws(self.name, symbol)}
                    if "ws_stall" in kinds:  # then one event with every tick since
                        await trio.sleep(kinds["ws_stall"].seconds)
                        agg = sub.take_through(market.tick_no, into=agg)
                        k = market.next_k(speed)
                    if "ws_close" in kinds:
                        self.stats.ws["closed_by_fault"] += 1
                        await self._close(conn, kinds["ws_close"].code, kinds["ws_close"].reason)
                        conn.nursery.cancel_scope.cancel()
                        return
                    if "ws_abort" in kinds:
                        self.stats.ws["aborted_by_fault"] += 1
                        await abort_ws(conn.ws)
                        conn.nursery.cancel_scope.cancel()
                        return
                    if "ws_ping" in kinds:
                        conn.nursery.start_soon(self._ping_once, conn)
                    if "ws_malformed" in kinds:
                        await conn.outbox.send('{"stream": "' + stream + '", "data": {"e": ')
                    if "ws_drop" in kinds:
                        self.stats.symbols[symbol].ws_drops += 1
                        continue
                    frame = self._frame(conn, stream, agg)
                    if "ws_out_of_order" in kinds and held is None:
                        held = (frame, agg)
                        continue
                    await self._send_event(conn, frame, agg)
                    if "ws_duplicate" in kinds:
                        await self._send_event(conn, frame, agg)
                    if held is not None:
                        await self._send_event(conn, *held)
                        held = None
                    if trio.current_time() > market.due(market.cut(k, speed)):  # no catch-up
                        k = market.next_k(speed)
            except ConnectionClosed:
                conn.nursery.cancel_scope.cancel()
            finally:
                self.market.unsubscribe(sub)
