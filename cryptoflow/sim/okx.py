"""OKX v5 swaps for the simulator.

REST: ``GET /api/v5/market/books`` (sz <= 400), ``GET /api/v5/market/books-full``
(sz <= 5000), ``GET /api/v5/public/instruments?instType=SWAP``, ``GET
/api/v5/public/time``. Per-IP limits per endpoint (books 40 / 2 s, books-full 10 / 2 s,
instruments 20 / 2 s): over it HTTP 429 with code 50011. Sizes are contracts (× ctVal).
WebSocket ``/ws/v5/public``: channels ``books`` (400 levels, pushes every
``push_interval``), ``books50-l2-tbt`` (50), ``books-l2-tbt`` (400); an ``action:
snapshot`` (``prevSeqId`` -1; omitted when ``snapshot_in_stream`` is False) then
``update``s with ``prevSeqId`` == previous ``seqId`` (ids jump by the number of level
changes); a heartbeat update (``seqId == prevSeqId``, no levels) after every
``heartbeat_every`` updates and when nothing changed for ``heartbeat_idle`` s; ``checksum``
0; text ``ping`` -> ``pong``; connections idle (no frame either way) for
``idle_timeout`` s are closed. A ``ws_close`` fault sends ``{"event": "notice", "code":
"64008"}`` first.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

import orjson
import trio
from trio_websocket import ConnectionClosed, WebSocketRequest

from cryptoflow.sim.book import Book, SymbolSpec, spec_for
from cryptoflow.sim.bybit import (
    DiffQueue,
    FixedWindow,
    SimVenue,
    TopView,
    WsConn,
    derived_spec,
    now_ms,
    split_quote,
)
from cryptoflow.sim.faults import Faults, Stats
from cryptoflow.sim.http import HttpRequest, HttpResponse
from cryptoflow.sim.market import Market

WS_PATH = "/ws/v5/public"
#: base coin -> (ctVal, lotSz); others: ctVal 1, lotSz 1
CONTRACTS: dict[str, tuple[str, str]] = {
    "BTC": ("0.01", "0.01"),
    "ETH": ("0.1", "0.01"),
    "SOL": ("1", "0.01"),
    "BNB": ("0.01", "0.01"),
    "XRP": ("100", "1"),
    "DOGE": ("1000", "1"),
}
#: ctVal of an inverse swap (…-USD-SWAP), in USD
INVERSE_CT_VAL = "10"
#: channel -> levels in the view
CHANNELS = {"books": 400, "books-l2-tbt": 400, "books50-l2-tbt": 50}
#: path -> (max sz, default sz, requests per 2 s)
BOOK_PATHS = {
    "/api/v5/market/books": (400, 1, 40),
    "/api/v5/market/books-full": (5000, 1, 10),
}


def normalized(inst_id: str) -> str:
    """``BTC-USDT-SWAP`` -> ``BTCUSDT``."""
    return inst_id.removesuffix("-SWAP").replace("-", "")


def contract(inst_id: str) -> tuple[str, str]:
    """(ctVal, lotSz) served for an instrument."""
    base = inst_id.split("-", 1)[0]
    return CONTRACTS.get(base, ("1", "1"))


class OkxVenue(SimVenue):
    """OKX SWAP routes and the public order-book channels; sizes in contracts."""

    name = "okx"
    id_field = "seqId"
    default_depth = 5000

    def __init__(
        self,
        market: Market,
        faults: Faults,
        stats: Stats,
        *,
        snapshot_in_stream: bool = True,
        push_interval: float = 0.1,
        heartbeat_every: int = 50,
        heartbeat_idle: float = 5.0,
        idle_timeout: float | None = 30.0,
        books_limit: int = 40,
        books_full_limit: int = 10,
        rate_window: float = 2.0,
        connection_lifetime: float | None = None,
        **_ignored: Any,
    ) -> None:
        super().__init__(market, faults, stats, connection_lifetime=connection_lifetime)
        self.snapshot_in_stream = snapshot_in_stream
        self.push_interval = push_interval
        self.heartbeat_every = heartbeat_every
        self.heartbeat_idle = heartbeat_idle
        self.idle_timeout = idle_timeout
        self.limiters = {
            "/api/v5/market/books": FixedWindow(books_limit, rate_window),
            "/api/v5/market/books-full": FixedWindow(books_full_limit, rate_window),
            "/api/v5/public/instruments": FixedWindow(20, rate_window),
        }
        self.routes = {
            ("GET", "/api/v5/market/books"): self._books,
            ("GET", "/api/v5/market/books-full"): self._books,
            ("GET", "/api/v5/public/instruments"): self._instruments,
            ("GET", "/api/v5/public/time"): self._time,
        }

    # --- books ----------------------------------------------------------------------

    @staticmethod
    def from_normalized(symbol: str) -> str:
        base, quote = split_quote(symbol)
        return f"{base}-{quote}-SWAP"

    @classmethod
    def spec(cls, venue_symbol: str) -> SymbolSpec:
        ct_val, lot = contract(venue_symbol)
        decimals = len(lot.split(".")[1]) if "." in lot else 0
        return derived_spec(
            venue_symbol, spec_for(normalized(venue_symbol)), Decimal(ct_val), decimals
        )

    @classmethod
    def make_books(cls, symbols: Any, seed: int | str, depth: int) -> dict[str, Book]:
        return super().make_books([s.upper() for s in symbols], seed, depth)

    # --- REST -----------------------------------------------------------------------

    def owns_path(self, path: str) -> bool:
        return path.startswith("/api/v5/")

    def request_symbol(self, req: HttpRequest) -> str | None:
        return req.query.get("instId") or None

    @staticmethod
    def _body(code: str, msg: str, data: Any = None) -> dict[str, Any]:
        return {"code": code, "msg": msg, "data": [] if data is None else data}

    def not_found_response(self, req: HttpRequest) -> HttpResponse:
        return HttpResponse.json(self._body("50000", f"Path {req.path} not found"), status=404)

    def rate_limit(self, req: HttpRequest, now: float) -> HttpResponse | None:
        lim = self.limiters.get(req.path)
        if lim is None:
            return None
        ok, _, reset = lim.hit(req.client_ip, now)
        return None if ok else self.throttled_response(reset)

    def throttled_response(self, retry_after: float) -> HttpResponse:
        return HttpResponse.json(self._body("50011", "Too Many Requests"), status=429)

    def server_error_response(self, status: int) -> HttpResponse:
        return HttpResponse.json(
            self._body("50001", "Service temporarily unavailable, please try again later."),
            status=status,
        )

    def data_holder(self, payload: Any) -> dict[str, Any] | None:
        data = payload.get("data") if isinstance(payload, dict) else None
        if isinstance(data, list) and data and isinstance(data[0], dict):
            return data[0]
        return None

    def _levels(self, book: Book, levels: Any) -> list[list[str]]:
        return [
            [p, q, "0", str(_orders(pu, qu))]
            for (pu, qu), (p, q) in zip(levels, book.levels_str(levels), strict=True)
        ]

    async def _books(self, req: HttpRequest) -> HttpResponse:
        inst = req.query.get("instId", "")
        if not inst:
            return HttpResponse.json(self._body("50014", "Parameter instId can not be empty"))
        book = self.market.books.get(inst)
        if book is None:
            return HttpResponse.json(self._body("51001", "Instrument ID does not exist"))
        max_sz, default_sz, _ = BOOK_PATHS[req.path]
        try:
            sz = int(req.query.get("sz", str(default_sz)))
        except ValueError:
            return HttpResponse.json(self._body("51000", "Parameter sz error"))
        sz = max(1, min(sz, max_sz))
        bids = book.best_bids(sz)
        asks = book.best_asks(sz)
        entry = {
            "asks": self._levels(book, asks),
            "bids": self._levels(book, bids),
            "ts": str(now_ms()),
            "seqId": book.last_update_id,
        }
        resp = HttpResponse.json(self._body("0", "", [entry]))
        resp.symbol = inst
        resp.levels = len(bids) + len(asks)
        return resp

    async def _instruments(self, req: HttpRequest) -> HttpResponse:
        if req.query.get("instType") != "SWAP":
            return HttpResponse.json(self._body("51000", "Parameter instType error"))
        want = req.query.get("instId")
        data = []
        for inst, book in self.market.books.items():
            if want and want != inst:
                continue
            ct_val, lot = contract(inst)
            base, quote = split_quote(normalized(inst))
            # an inverse swap (BTC-USD-SWAP): a contract is worth ctVal USD, settled in base
            inverse = quote == "USD"
            if inverse:
                ct_val = INVERSE_CT_VAL
            data.append(
                {
                    "instType": "SWAP",
                    "instId": inst,
                    "uly": f"{base}-{quote}",
                    "instFamily": f"{base}-{quote}",
                    "settleCcy": base if inverse else quote,
                    "ctVal": ct_val,
                    "ctMult": "1",
                    "ctValCcy": quote if inverse else base,
                    "ctType": "inverse" if inverse else "linear",
                    "lotSz": lot,
                    "minSz": lot,
                    "tickSz": book.spec.tick_size,
                    "state": "live",
                    "listTime": "1611916828000",
                }
            )
        return HttpResponse.json(self._body("0", "", data))

    async def _time(self, req: HttpRequest) -> HttpResponse:
        return HttpResponse.json(self._body("0", "", [{"ts": str(now_ms())}]))

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
        await self.idle_watch(conn, self.idle_timeout, pings_only=False)

    async def on_fault_close(self, conn: WsConn) -> None:
        await self.send_json(
            conn,
            {
                "event": "notice",
                "code": "64008",
                "msg": "The connection will soon be closed for a service upgrade. "
                "Please reconnect.",
                "connId": conn.id,
            },
        )

    async def notice(self, close_after: float | None = None) -> None:
        """Send the 64008 notice on every open connection (then close them after
        ``close_after`` s when given)."""
        for conn in [c for c in self.connections if c.open]:
            try:
                await self.on_fault_close(conn)
            except ConnectionClosed:
                continue
            if close_after is not None and conn.nursery is not None:
                conn.nursery.start_soon(self._close_later, conn, close_after)

    async def _close_later(self, conn: WsConn, delay: float) -> None:
        await trio.sleep(delay)
        await self.close(conn, 1001, "service upgrade")

    async def _recv_loop(self, conn: WsConn) -> None:
        try:
            while True:
                msg = await conn.ws.get_message()
                self.stats.ws["messages_received"] += 1
                conn.last_activity = trio.current_time()
                if msg == "ping":
                    conn.pings_received += 1
                    conn.last_ping = trio.current_time()
                    await self.send_text(conn, "pong")
                    continue
                try:
                    obj = orjson.loads(msg)
                    op = obj["op"]
                    args = obj.get("args") or []
                    if not isinstance(args, list):
                        raise TypeError
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    await self.send_json(
                        conn,
                        {
                            "event": "error",
                            "code": "60012",
                            "msg": f"Invalid request: {msg}"[:200],
                            "connId": conn.id,
                        },
                    )
                    continue
                if op not in ("subscribe", "unsubscribe"):
                    await self.send_json(
                        conn,
                        {
                            "event": "error",
                            "code": "60012",
                            "msg": f"Invalid request: {msg}"[:200],
                            "connId": conn.id,
                        },
                    )
                    continue
                ok = [a for a in [await self._check(conn, op, a) for a in args] if a]
                keys = [f"{arg['channel']}:{arg['instId']}" for arg in ok]
                if op == "subscribe":  # all acks first, then the data
                    await self.start_streams(
                        conn,
                        self._stream,
                        [(k, (a, CHANNELS[a["channel"]])) for k, a in zip(keys, ok, strict=True)],
                    )
                else:
                    for key in keys:
                        self.stop_stream(conn, key)
        except ConnectionClosed:
            if conn.nursery is not None:
                conn.nursery.cancel_scope.cancel()

    async def _check(self, conn: WsConn, op: str, arg: Any) -> dict[str, str] | None:
        """Answer one subscribe/unsubscribe arg (event or error); the arg if valid."""
        channel = arg.get("channel") if isinstance(arg, dict) else None
        inst = arg.get("instId") if isinstance(arg, dict) else None
        if channel not in CHANNELS or inst not in self.market.books:
            await self.send_json(
                conn,
                {
                    "event": "error",
                    "code": "60018",
                    "msg": f"Wrong URL or channel:{channel},instId:{inst} doesn't exist. "
                    "Please use the correct URL, channel and parameters referring to API document.",
                    "connId": conn.id,
                },
            )
            return None
        out_arg = {"channel": channel, "instId": inst}
        await self.send_json(conn, {"event": op, "arg": out_arg, "connId": conn.id})
        return out_arg

    def _push(
        self,
        arg: dict[str, str],
        action: str,
        book: Book,
        bids: Any,
        asks: Any,
        prev: int,
        seq: int,
    ) -> str:
        entry = {
            "asks": self._levels(book, asks),
            "bids": self._levels(book, bids),
            "ts": str(now_ms()),
            "checksum": 0,
            "prevSeqId": prev,
            "seqId": seq,
        }
        return orjson.dumps({"arg": arg, "action": action, "data": [entry]}).decode()

    async def _stream(
        self, conn: WsConn, arg: dict[str, str], depth: int, *, started: Callable[[], None]
    ) -> None:
        inst = arg["instId"]
        book = self.market.books[inst]
        view = TopView(book, depth)
        q = DiffQueue(inst, lambda d: d.u, view)
        last = book.last_update_id
        snap = None
        if self.snapshot_in_stream:
            bids = book.best_bids(depth)  # the view, best first
            asks = book.best_asks(depth)
            snap = (self._push(arg, "snapshot", book, bids, asks, -1, last), len(bids) + len(asks))
        self.market.subscribers[inst].add(q)  # type: ignore[arg-type]
        # pushes cut on the market's grid (the same ticks for every connection), the first
        # at the first cut after the subscription, however late the snapshot's send ends
        market = self.market
        k = market.next_k(self.push_interval)
        started()
        state: dict[str, Any] = {}
        try:
            if snap is not None:
                await self.send_text(conn, snap[0])
                self.count_event(conn, inst, snap[1], 0)
            updates = 0
            quiet_since = trio.current_time()
            bad = '{"arg":{"channel":"' + arg["channel"] + '"},"action":"update","data":[{'
            while True:
                cut = market.cut(k, self.push_interval)
                await trio.sleep_until(market.due(cut))
                await market.through(cut)
                ups = q.take_through(cut)
                k += 1
                frames = []
                if ups:
                    cb: dict[int, int] = {}
                    ca: dict[int, int] = {}
                    for up in ups:
                        cb.update(up.bids)
                        ca.update(up.asks)
                    seq = ups[-1].uid
                    b = sorted(cb.items(), reverse=True)
                    a = sorted(ca.items())
                    frames.append(
                        (
                            self._push(arg, "update", book, b, a, last, seq),
                            len(b) + len(a),
                            len(ups),
                        )
                    )
                    last = seq
                    updates += 1
                    quiet_since = trio.current_time()
                    if self.heartbeat_every and updates % self.heartbeat_every == 0:
                        frames.append((self._push(arg, "update", book, [], [], last, last), 0, 0))
                elif trio.current_time() - quiet_since >= self.heartbeat_idle:
                    frames.append((self._push(arg, "update", book, [], [], last, last), 0, 0))
                    quiet_since = trio.current_time()
                if frames and not await self.send_with_faults(conn, inst, frames, bad, state):
                    return
                if trio.current_time() > market.due(market.cut(k, self.push_interval)):
                    k = market.next_k(self.push_interval)  # after a stall: no catch-up
        finally:
            self.market.unsubscribe(q)  # type: ignore[arg-type]


def _orders(price: int, qty: int) -> int:
    """A plausible, deterministic order count for a level (0 for a removed level)."""
    return 0 if qty == 0 else 1 + (price * 31 + qty) % 9
