"""KuCoin Futures for the simulator.

REST: ``POST /api/v1/bullet-public`` (token + instanceServers pointing at this
simulator's WebSocket port, path ``/``), ``GET /api/v1/level2/snapshot?symbol=S`` (full
book; prices/sizes JSON numbers, ``ts`` in ns), ``GET /api/v1/contracts/active``,
``GET /api/v1/timestamp``. One public pool per IP: ``rate_limit`` requests per
``rate_window`` s; every response carries ``gw-ratelimit-limit``, ``-remaining``,
``-reset`` (ms); over it HTTP 429 with code 429000. Sizes are lots (× multiplier).
WebSocket ``/`` (or ``/endpoint``) ``?token=T&connectId=C``: a bad/expired token is
rejected (HTTP 401); ``{"id": C, "type": "welcome"}`` first; subscribe to
``/contractMarket/level2:A,B`` (ack when ``response`` is true); one message per level
change, ``sequence`` +1 each (the REST ``sequence`` shares the id space); ``ping`` ->
``pong``; closed when no ping came for ``ping_interval_ms + ping_timeout_ms``.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson
import trio
from trio_websocket import ConnectionClosed, WebSocketRequest

from cryptoflow.sim.book import SymbolSpec, spec_for
from cryptoflow.sim.bybit import (
    DiffQueue,
    FixedWindow,
    SimVenue,
    WsConn,
    derived_spec,
    now_ms,
    split_quote,
)
from cryptoflow.sim.faults import Faults, Stats
from cryptoflow.sim.http import HttpRequest, HttpResponse
from cryptoflow.sim.market import Market

WS_PATHS = ("/", "/endpoint")
TOPIC_PREFIX = "/contractMarket/level2:"
#: base coin (KuCoin name) -> multiplier (base units per lot); others: 1
MULTIPLIERS: dict[str, str] = {
    "XBT": "0.001",
    "ETH": "0.01",
    "SOL": "0.1",
    "BNB": "0.01",
    "XRP": "10",
    "DOGE": "100",
}


def normalized(symbol: str) -> str:
    """``XBTUSDTM`` -> ``BTCUSDT``."""
    s = symbol.removesuffix("M")
    return "BTC" + s[3:] if s.startswith("XBT") else s


def base_currency(symbol: str) -> tuple[str, str]:
    """``XBTUSDTM`` -> ("XBT", "USDT")."""
    return split_quote(symbol.removesuffix("M"))


def multiplier(symbol: str) -> str:
    return MULTIPLIERS.get(base_currency(symbol)[0], "1")


def num(text: str) -> int | float:
    """Decimal text -> the JSON number KuCoin would send (int for whole lots)."""
    return int(text) if "." not in text else float(text)


def canonical(text: str) -> str:
    """What the project's parser turns a served number into ("60000.0" -> "60000")."""
    s = format(Decimal(text), "f")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return s or "0"


class KucoinVenue(SimVenue):
    """KuCoin Futures routes, bullet tokens and the level2 stream; sizes in lots."""

    name = "kucoin"
    id_field = "sequence"
    default_depth = 1000

    def __init__(
        self,
        market: Market,
        faults: Faults,
        stats: Stats,
        *,
        ping_interval_ms: int = 18000,
        ping_timeout_ms: int = 10000,
        token_ttl: float = 24 * 3600.0,
        rate_limit: int = 2000,
        rate_window: float = 30.0,
        connection_lifetime: float | None = None,
        **_ignored: Any,
    ) -> None:
        super().__init__(market, faults, stats, connection_lifetime=connection_lifetime)
        self.ping_interval_ms = ping_interval_ms
        self.ping_timeout_ms = ping_timeout_ms
        self.token_ttl = token_ttl
        self.limiter = FixedWindow(rate_limit, rate_window)
        self.tokens: dict[str, float] = {}  # token -> trio-clock expiry
        self.routes = {
            ("POST", "/api/v1/bullet-public"): self._bullet,
            ("GET", "/api/v1/level2/snapshot"): self._snapshot,
            ("GET", "/api/v1/contracts/active"): self._contracts,
            ("GET", "/api/v1/timestamp"): self._timestamp,
        }

    # --- books ----------------------------------------------------------------------

    @staticmethod
    def from_normalized(symbol: str) -> str:
        base, quote = split_quote(symbol)
        return ("XBT" if base == "BTC" else base) + quote + "M"

    @classmethod
    def spec(cls, venue_symbol: str) -> SymbolSpec:
        base = spec_for(normalized(venue_symbol))
        return derived_spec(venue_symbol, base, Decimal(multiplier(venue_symbol)), 0)

    def book_view(self, symbol: str) -> dict[str, Any]:
        """Prices and sizes in the canonical text the project's parser yields."""
        book = self.market.books[symbol]
        return {
            "symbol": symbol,
            "lastUpdateId": book.last_update_id,
            "bids": {canonical(book.price_str(p)): str(q) for p, q in book.bids.items()},
            "asks": {canonical(book.price_str(p)): str(q) for p, q in book.asks.items()},
        }

    # --- REST -----------------------------------------------------------------------

    def owns_path(self, path: str) -> bool:
        return path.startswith("/api/v1/")

    @staticmethod
    def _err(code: str, msg: str, status: int = 200) -> HttpResponse:
        return HttpResponse.json({"code": code, "msg": msg}, status=status)

    def not_found_response(self, req: HttpRequest) -> HttpResponse:
        return self._err("404000", f"Url Not Found: {req.path}", 404)

    def rate_limit(self, req: HttpRequest, now: float) -> HttpResponse | None:
        ok, _, reset = self.limiter.hit(req.client_ip, now)
        return None if ok else self.throttled_response(reset)

    def extra_headers(self, req: HttpRequest) -> list[tuple[str, str]]:
        now = trio.current_time()
        start, used = self.limiter.counts.get(req.client_ip, (now, 0))
        reset = max(0.0, start + self.limiter.window - now)
        return [
            ("gw-ratelimit-limit", str(self.limiter.limit)),
            ("gw-ratelimit-remaining", str(max(0, self.limiter.limit - used))),
            ("gw-ratelimit-reset", str(int(reset * 1000))),
        ]

    def throttled_response(self, retry_after: float) -> HttpResponse:
        return self._err("429000", "Too Many Requests", 429)

    def banned_response(self, retry_after: float) -> HttpResponse:
        resp = self.throttled_response(retry_after)
        resp.headers.append(("Retry-After", str(max(1, round(retry_after)))))
        return resp

    def server_error_response(self, status: int) -> HttpResponse:
        return self._err("500000", "Internal Server Error", status)

    def data_holder(self, payload: Any) -> dict[str, Any] | None:
        data = payload.get("data") if isinstance(payload, dict) else None
        return data if isinstance(data, dict) else None

    async def _bullet(self, req: HttpRequest) -> HttpResponse:
        token = secrets.token_urlsafe(48)
        self.tokens[token] = trio.current_time() + self.token_ttl
        endpoint = (self.ws_url or "ws://127.0.0.1:0") + "/"
        data = {
            "token": token,
            "instanceServers": [
                {
                    "endpoint": endpoint,
                    "encrypt": False,
                    "protocol": "websocket",
                    "pingInterval": self.ping_interval_ms,
                    "pingTimeout": self.ping_timeout_ms,
                }
            ],
        }
        return HttpResponse.json({"code": "200000", "data": data})

    async def _snapshot(self, req: HttpRequest) -> HttpResponse:
        symbol = req.query.get("symbol", "")
        book = self.market.books.get(symbol)
        if book is None:
            return self._err("300000", "Contract parameter invalid.")
        bids = book.best_bids()
        asks = book.best_asks()
        data = {
            "symbol": symbol,
            "sequence": book.last_update_id,
            "asks": [[num(book.price_str(p)), q] for p, q in asks],
            "bids": [[num(book.price_str(p)), q] for p, q in bids],
            "ts": now_ms() * 1_000_000 + 123_456,
        }
        resp = HttpResponse.json({"code": "200000", "data": data})
        resp.symbol = symbol
        resp.levels = len(bids) + len(asks)
        return resp

    async def _contracts(self, req: HttpRequest) -> HttpResponse:
        data = []
        for sym, book in self.market.books.items():
            base, quote = base_currency(sym)
            data.append(
                {
                    "symbol": sym,
                    "rootSymbol": quote,
                    "type": "FFWCSX",
                    "baseCurrency": base,
                    "quoteCurrency": quote,
                    "settleCurrency": quote,
                    "maxOrderQty": 1000000,
                    "maxPrice": 1000000.0,
                    "lotSize": 1,
                    "tickSize": num(book.spec.tick_size),
                    "indexPriceTickSize": num(book.spec.tick_size),
                    # an inverse contract (XBTUSDM): one lot is 1 USD, multiplier -1
                    "multiplier": -1 if quote == "USD" else num(multiplier(sym)),
                    "isInverse": quote == "USD",
                    "isQuanto": False,
                    "status": "Open",
                }
            )
        return HttpResponse.json({"code": "200000", "data": data})

    async def _timestamp(self, req: HttpRequest) -> HttpResponse:
        return HttpResponse.json({"code": "200000", "data": now_ms()})

    # --- WebSocket ------------------------------------------------------------------

    def owns_ws_path(self, path: str) -> bool:
        p = urlsplit(path).path
        return p in WS_PATHS or p.rstrip("/") in WS_PATHS

    async def handle_ws(self, request: WebSocketRequest) -> None:
        q = dict(parse_qsl(urlsplit(request.path).query))
        token = q.get("token", "")
        expiry = self.tokens.get(token)
        if expiry is None or trio.current_time() > expiry:
            self.stats.ws.setdefault("rejected_token", 0)
            self.stats.ws["rejected_token"] += 1
            body = orjson.dumps({"code": "401003", "msg": "token is invalid or expired"})
            await request.reject(401, body=body)
            return
        ws = await request.accept()
        conn_id = q.get("connectId") or secrets.token_hex(8)
        conn = self.new_conn(ws, request.path, conn_id)
        await self.run_conn(conn, self._session, self._ping_watch)

    async def _ping_watch(self, conn: WsConn) -> None:
        await self.idle_watch(
            conn, (self.ping_interval_ms + self.ping_timeout_ms) / 1000, pings_only=True
        )

    async def _session(self, conn: WsConn) -> None:
        try:
            await self.send_json(conn, {"id": conn.id, "type": "welcome"})
            while True:
                msg = await conn.ws.get_message()
                self.stats.ws["messages_received"] += 1
                conn.last_activity = trio.current_time()
                try:
                    obj = orjson.loads(msg)
                    kind = obj["type"]
                    mid = obj.get("id")
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    await self.send_json(
                        conn, {"type": "error", "code": 400, "data": "malformed message"}
                    )
                    continue
                if kind == "ping":
                    conn.pings_received += 1
                    conn.last_ping = trio.current_time()
                    await self.send_json(conn, {"id": mid, "type": "pong", "timestamp": now_ms()})
                elif kind in ("subscribe", "unsubscribe"):
                    await self._sub(conn, kind, obj)
                else:
                    await self.send_json(
                        conn, {"id": mid, "type": "error", "code": 400, "data": f"bad type {kind}"}
                    )
        except ConnectionClosed:
            if conn.nursery is not None:
                conn.nursery.cancel_scope.cancel()

    async def _sub(self, conn: WsConn, kind: str, obj: dict[str, Any]) -> None:
        mid = obj.get("id")
        topic = obj.get("topic")
        if not isinstance(topic, str) or not topic.startswith(TOPIC_PREFIX):
            await self.send_json(
                conn,
                {"id": mid, "type": "error", "code": 404, "data": f"topic {topic} is not found"},
            )
            return
        syms = [s.strip() for s in topic[len(TOPIC_PREFIX) :].split(",") if s.strip()]
        bad = [s for s in syms if s not in self.market.books]
        if bad or not syms:
            await self.send_json(
                conn,
                {"id": mid, "type": "error", "code": 404, "data": f"topic {topic} is not found"},
            )
            return
        if obj.get("response"):
            await self.send_json(conn, {"id": mid, "type": "ack"})
        if kind == "subscribe":
            await self.start_streams(conn, self._stream, [(s, (s,)) for s in syms])
        else:
            for s in syms:
                self.stop_stream(conn, s)

    async def _stream(self, conn: WsConn, symbol: str, *, started: Callable[[], None]) -> None:
        book = self.market.books[symbol]
        q = DiffQueue(symbol, lambda d: d.u)
        self.market.subscribers[symbol].add(q)  # type: ignore[arg-type]
        started()
        state: dict[str, Any] = {}
        topic = TOPIC_PREFIX + symbol
        bad = '{"type":"message","topic":"' + topic + '","data":{"sequence":'
        # the message as orjson.dumps would write it (same keys, order and bytes), built
        # as text: one format per change instead of a dict and an encode
        head = orjson.dumps(topic).decode()  # the topic as a JSON string
        head = '{"type":"message","topic":' + head + ',"subject":"level2","data":{"sequence":'
        price_text: dict[int, str] = {}  # price units -> JSON-safe number text
        try:
            while True:
                await q.wait()
                frames = []
                for up in q.take():
                    seq = up.diff.U
                    tail = ":" + str(up.diff.E) + "}}"
                    changes = [(p, "buy", qty) for p, qty in up.bids.items()]
                    changes += [(p, "sell", qty) for p, qty in up.asks.items()]
                    for i, (p, side, qty) in enumerate(changes):
                        pt = price_text.get(p)
                        if pt is None:
                            if len(price_text) > 50_000:
                                price_text.clear()
                            pt = price_text[p] = str(num(book.price_str(p)))
                        text = f'{head}{seq},"change":"{pt},{side},{qty}","timestamp"{tail}'
                        frames.append((text, 1, 1 if i == 0 else 0))
                        seq += 1
                    assert seq == up.diff.u + 1
                if not await self.send_with_faults(conn, symbol, frames, bad, state):
                    return
        finally:
            self.market.unsubscribe(q)  # type: ignore[arg-type]
